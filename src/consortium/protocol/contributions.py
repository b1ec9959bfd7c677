"""What a site contributes to each sum, as one float vector, and how the coordinator reads the sum.

The same layouts serve plain and secure aggregation: in plain mode the
vectors travel as they are and are added up; under secure aggregation they
are encoded into the ring (``consortium.secagg.encoding``) and only their
sum is ever decoded. Either way the coordinator reads nothing but sums.

- setup:    [n_train, sum of x (d), sum of x^2 (d), present values (d)]: a missing
            value (NaN) counts in none of the sums, so each feature's mean and
            deviation are over the values the sites hold; a regression adds
            [sum of y, sum of y^2], whence the target's mean and deviation
- fit:      [w * delta (P), w, w * loss]; delta is first scaled into the L2 ball of
            radius norm_bound when the round has one (robust aggregation); under
            secure aggregation delta is then clipped to [-clip, clip] coordinate-wise, w is scaled to (0, 1]
            and the last two entries are scaled into [0, clip] so that every
            entry lies in the quantiser's range
            Under site-level DP: [delta clipped to L2 norm clip (P)], then, with
            adaptive clipping, [1/2 if the update was within the clip else -1/2];
            no weight (every site counts once) and no loss (the guarantee does
            not cover it)
- evaluate: the task's own fixed-length vector of sums (``Task.evaluate``; a
            classification's is laid out in ``consortium.learning.classification``)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from consortium.data import Records
from consortium.learning.robust import bound_norm
from consortium.secagg.encoding import RingEncoding
from consortium.secagg.quantize import plan_quantization

#: Training losses above this are reported as this under secure aggregation (to bound the entry).
MAX_REPORTED_LOSS = 100.0
SETUP_FRAC_BITS = 8
EVAL_FRAC_BITS = 16


def setup_vector(X: np.ndarray, y: np.ndarray | None = None) -> np.ndarray:
    """A site's setup sums over its training rows ``X``; ``y``: a regression's targets (None: classes)."""
    X = X.astype(np.float64)
    present = ~np.isnan(X)
    filled = np.where(present, X, 0.0)
    parts = [[X.shape[0]], filled.sum(axis=0), (filled * filled).sum(axis=0), present.sum(axis=0)]
    if y is not None:
        y64 = y.astype(np.float64)
        parts.append([y64.sum(), (y64 * y64).sum()])
    return np.concatenate(parts)


def setup_sums(records: Records) -> np.ndarray:
    """``setup_vector`` of a site's training records, summed a batch at a time (in memory: one batch)."""
    total = np.zeros(setup_length(records.n_features, records.is_regression))
    for batch in records.batches():
        total = total + setup_vector(batch.X, batch.y if batch.is_regression else None)
    return total


def setup_length(n_features: int, regression: bool = False) -> int:
    """The length of a setup vector over ``n_features`` features (and a regression's target)."""
    return 1 + 3 * n_features + (2 if regression else 0)


@dataclass(frozen=True)
class SetupSum:
    """The pooled training data's rows, each feature's mean and deviation over the values present (a
    constant feature's deviation 1, so that it passes ``Standardize`` unscaled; a feature no site holds a
    value of, mean 0), and a regression target's mean and deviation (0 and 1 for classes)."""

    rows: float
    mean: np.ndarray
    scale: np.ndarray
    target_mean: float = 0.0
    target_scale: float = 1.0


def read_setup_sum(total: np.ndarray, n_features: int, regression: bool = False) -> SetupSum:
    """The summed setup vectors, read (see ``SetupSum``)."""
    d = n_features
    n = float(round(total[0]))
    count = np.maximum(np.rint(total[1 + 2 * d : 1 + 3 * d]), 1.0)
    mean = total[1 : 1 + d] / count
    std = np.sqrt(np.maximum(total[1 + d : 1 + 2 * d] / count - mean * mean, 0.0))
    out = SetupSum(n, mean, np.where(std < 1e-6, 1.0, std))
    if regression and n > 0:
        sy, syy = float(total[1 + 3 * d]), float(total[2 + 3 * d])
        y_mean = sy / n
        y_std = math.sqrt(max(syy / n - y_mean * y_mean, 0.0))
        out = SetupSum(n, out.mean, out.scale, y_mean, y_std if y_std > 1e-6 else 1.0)
    return out


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


def setup_encoding() -> RingEncoding:
    return RingEncoding.fixed(SETUP_FRAC_BITS)


def eval_encoding() -> RingEncoding:
    return RingEncoding.fixed(EVAL_FRAC_BITS)


def fit_encoding(clip: float, n_sites: int, bits: int) -> RingEncoding:
    return RingEncoding.quantized(plan_quantization(clip=clip, n_sites=n_sites, bits=bits))
