"""What a site contributes to each sum, as one float vector, and how the coordinator reads the sum.

The same layouts serve plain and secure aggregation: in plain mode the
vectors travel as they are and are added up; under secure aggregation they
are encoded into the ring (``consortium.secagg.encoding``) and only their
sum is ever decoded. Either way the coordinator reads nothing but sums.

- setup:    [n_train, sum of x (d), sum of x^2 (d)]
- fit:      [w * delta (P), w, w * loss]; delta is first scaled into the L2 ball of
            radius norm_bound when the round has one (robust aggregation); under
            secure aggregation delta is then clipped to [-clip, clip] coordinate-wise, w is scaled to (0, 1]
            and the last two entries are scaled into [0, clip] so that every
            entry lies in the quantiser's range
            Under site-level DP: [delta clipped to L2 norm clip (P)], then, with
            adaptive clipping, [1/2 if the update was within the clip else -1/2];
            no weight (every site counts once) and no loss (the guarantee does
            not cover it)
- evaluate: [n, correct, loss sum, negatives per score bin, positives per score bin,
            calibration (records, confidence sum, correct per confidence bin),
            per group of the sensitive attribute (GROUP_FIELDS), the site's
            [1, accuracy, accuracy^2] (so the spread across sites is a sum),
            and [n, correct] under the declared shift]; zeros where not measured
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from consortium.learning.robust import bound_norm
from consortium.learning.training import AUC_BINS, CAL_BINS, GROUP_FIELDS, EvalStats
from consortium.secagg.encoding import RingEncoding
from consortium.secagg.quantize import plan_quantization

#: Training losses above this are reported as this under secure aggregation (to bound the entry).
MAX_REPORTED_LOSS = 100.0
SETUP_FRAC_BITS = 8
EVAL_FRAC_BITS = 16
#: The evaluation vector's parts, in order, and their lengths.
EVAL_PARTS = {
    "counts": 3, "score_hist": 2 * AUC_BINS, "calibration": 3 * CAL_BINS, "groups": 2 * len(GROUP_FIELDS),
    "sites": 3, "shift": 2,
}
EVAL_LENGTH = sum(EVAL_PARTS.values())


def setup_vector(X: np.ndarray) -> np.ndarray:
    X = X.astype(np.float64)
    return np.concatenate([[X.shape[0]], X.sum(axis=0), (X * X).sum(axis=0)])


def read_setup_sum(total: np.ndarray, n_features: int) -> tuple[float, np.ndarray, np.ndarray]:
    """(rows, per-feature mean, per-feature standard deviation) of the pooled training data; a constant
    feature's deviation is given as 1, so that it passes ``Standardize`` unscaled."""
    n = float(round(total[0]))
    mean = total[1 : 1 + n_features] / n
    std = np.sqrt(np.maximum(total[1 + n_features : 1 + 2 * n_features] / n - mean * mean, 0.0))
    return n, mean, np.where(std < 1e-6, 1.0, std)


def fit_vector(
    delta: np.ndarray, weight: float, loss: float, clip: float | None, norm_bound: float | None = None
) -> np.ndarray:
    delta = bound_norm(delta.astype(np.float64), norm_bound)
    if clip is None:
        return np.concatenate([delta.astype(np.float64) * weight, [weight, weight * loss]])
    clipped = np.clip(delta.astype(np.float64), -clip, clip)
    return np.concatenate([clipped * weight, [weight * clip, weight * min(loss, MAX_REPORTED_LOSS) * clip / MAX_REPORTED_LOSS]])


def site_dp_vector(delta: np.ndarray, clip: float, with_count: bool) -> np.ndarray:
    """The update scaled into the L2 ball of radius ``clip``, and (adaptive clipping) whether it was inside."""
    delta = delta.astype(np.float64)
    norm = float(np.linalg.norm(delta))
    clipped = delta * min(1.0, clip / norm) if norm > 0 else delta
    if not with_count:
        return clipped
    return np.concatenate([clipped, [0.5 if norm <= clip else -0.5]])


def read_site_dp_sum(total: np.ndarray, n_params: int, with_count: bool) -> tuple[np.ndarray, float | None]:
    """(sum of clipped updates, sum of centred clipped-count bits or None), noise included."""
    return total[:n_params], float(total[n_params]) if with_count else None


@dataclass(frozen=True)
class FitSum:
    weighted_update: np.ndarray  # sum of w * delta
    weight: float  # sum of w
    weighted_loss: float  # sum of w * loss


def read_fit_sum(total: np.ndarray, n_params: int, clip: float | None) -> FitSum:
    scale = 1.0 if clip is None else clip
    weight = float(total[n_params]) / scale
    loss = float(total[n_params + 1]) / scale * (1.0 if clip is None else MAX_REPORTED_LOSS)
    return FitSum(total[:n_params], weight, loss)


def eval_vector(stats: EvalStats) -> np.ndarray:
    """One site's evaluation as the vector that is summed (see the module docstring)."""
    site = [1.0, stats.correct / stats.n, (stats.correct / stats.n) ** 2] if stats.n else [0.0, 0.0, 0.0]
    parts = {
        "counts": [stats.n, stats.correct, stats.loss_sum],
        "score_hist": stats.score_hist,
        "calibration": stats.calibration,
        "groups": stats.groups,
        "sites": site,
        "shift": stats.shift,
    }
    return np.concatenate([
        np.zeros(size) if parts[name] is None else np.asarray(parts[name], dtype=np.float64).ravel()
        for name, size in EVAL_PARTS.items()
    ])


def read_eval_sum(total: np.ndarray, n_classes: int, *, groups: bool = False, shift: bool = False) -> EvalStats:
    """The summed evaluation; ``groups`` / ``shift``: whether the round asked for them."""
    offsets = np.cumsum([0, *EVAL_PARTS.values()])
    part = {name: total[offsets[i] : offsets[i + 1]] for i, name in enumerate(EVAL_PARTS)}
    counts = np.rint(part["counts"]).astype(np.int64)
    return EvalStats(
        int(counts[0]),
        int(counts[1]),
        float(part["counts"][2]),
        np.rint(part["score_hist"]).astype(np.int64).reshape(2, AUC_BINS) if n_classes == 2 else None,
        part["calibration"].reshape(3, CAL_BINS),
        np.rint(part["groups"]).reshape(2, len(GROUP_FIELDS)) if groups else None,
        part["sites"].copy(),
        np.rint(part["shift"]) if shift else None,
    )


def setup_encoding() -> RingEncoding:
    return RingEncoding.fixed(SETUP_FRAC_BITS)


def eval_encoding() -> RingEncoding:
    return RingEncoding.fixed(EVAL_FRAC_BITS)


def fit_encoding(clip: float, n_sites: int, bits: int) -> RingEncoding:
    return RingEncoding.quantized(plan_quantization(clip=clip, n_sites=n_sites, bits=bits))
