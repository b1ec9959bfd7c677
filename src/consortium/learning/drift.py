"""Drift on a site's own incoming data, against the data it trained on: computed by the site, for the site.

- **Population stability index** per feature (the credit-risk industry's
  measure, e.g. Yurdakul, "Statistical properties of population stability
  index", 2018): bin the feature at the deciles of the training data, then
  ``PSI = sum_i (a_i - e_i) ln(a_i / e_i)`` over the bins, with ``e_i`` and
  ``a_i`` the training and incoming shares of bin ``i``. It is the symmetric
  Kullback-Leibler divergence between the two binned distributions. The usual
  reading: below 0.1 stable, 0.1 to 0.25 a moderate shift, above 0.25 a
  significant one. A feature with fewer distinct training values than bins is
  binned by those values. Shares are floored at ``SHARE_FLOOR`` so that an
  empty bin on either side gives a large, finite index.
- **Label-rate shift**: the total variation distance between the training and
  incoming label distributions (half the L1 distance of the class shares):
  0 when the rates are equal, 1 when no class is shared.

Both read only the site's own rows; what leaves the site, when a threshold
is breached, is the site's decision (an incident naming the drifting
features, where the agreement permits it).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from consortium.errors import DataError

#: The smallest share a bin may have in the index: an empty bin counts as this (1 in 10,000).
SHARE_FLOOR = 1e-4
DEFAULT_BINS = 10


def bin_edges(expected: np.ndarray, bins: int = DEFAULT_BINS) -> np.ndarray:
    """Inner bin edges from the training values present (NaN: missing): their quantiles, or their distinct
    values when fewer."""
    values = np.asarray(expected, dtype=np.float64)
    values = values[~np.isnan(values)]
    if values.size == 0:
        return np.zeros(0)
    distinct = np.unique(values)
    if distinct.size <= bins:  # a categorical or coarse feature: one bin per value seen in training
        return (distinct[:-1] + distinct[1:]) / 2
    return np.unique(np.quantile(values, np.linspace(0, 1, bins + 1)[1:-1]))


def shares(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """The share of ``values`` in each bin that ``edges`` delimit (len(edges) + 1 bins), then the share
    missing (NaN): a change in how often a value is missing is a drift too."""
    v = np.asarray(values, dtype=np.float64)
    missing = np.isnan(v)
    counts = np.bincount(np.searchsorted(edges, v[~missing], side="right"), minlength=edges.size + 1)
    counts = np.append(counts, missing.sum())
    return counts / max(counts.sum(), 1)


def psi(expected: np.ndarray, actual: np.ndarray, bins: int = DEFAULT_BINS) -> float:
    """The population stability index of ``actual`` against ``expected`` (one feature's values)."""
    if np.asarray(expected).size == 0 or np.asarray(actual).size == 0:
        raise DataError("the population stability index needs training and incoming values: one side is empty")
    edges = bin_edges(expected, bins)
    e = np.maximum(shares(expected, edges), SHARE_FLOOR)
    a = np.maximum(shares(actual, edges), SHARE_FLOOR)
    return float(np.sum((a - e) * np.log(a / e)))


def label_shift(expected: np.ndarray, actual: np.ndarray, n_classes: int) -> float:
    """Total variation distance between the two label distributions; for a regression (``n_classes`` 0),
    between the targets' shares in the bins of the training targets' deciles."""
    if np.asarray(expected).size == 0 or np.asarray(actual).size == 0:
        raise DataError("a label-rate shift needs training and incoming labels: one side is empty")
    if n_classes == 0:
        edges = bin_edges(expected)
        p, q = shares(expected, edges), shares(actual, edges)
    else:
        p = np.bincount(expected, minlength=n_classes) / len(expected)
        q = np.bincount(actual, minlength=n_classes) / len(actual)
    return float(0.5 * np.abs(p - q).sum())


@dataclass(frozen=True)
class DriftReport:
    """A site's drift check: the index per feature, the label shift, and what breached the thresholds."""

    psi: dict[str, float]
    label_shift: float
    psi_threshold: float
    label_threshold: float

    @property
    def drifting_features(self) -> list[str]:
        """The features whose index exceeds the threshold, most drifted first."""
        return sorted((f for f, v in self.psi.items() if v > self.psi_threshold), key=lambda f: -self.psi[f])

    @property
    def breached(self) -> bool:
        return bool(self.drifting_features) or self.label_shift > self.label_threshold


def check_drift(
    train_X: np.ndarray, train_y: np.ndarray, incoming_X: np.ndarray, incoming_y: np.ndarray, *,
    feature_names: tuple[str, ...], n_classes: int, psi_threshold: float = 0.25, label_threshold: float = 0.1,
    bins: int = DEFAULT_BINS,
) -> DriftReport:
    """Compare a site's incoming rows with its training rows, feature by feature and label by label."""
    if train_X.shape[1] != incoming_X.shape[1] or train_X.shape[1] != len(feature_names):
        raise DataError(
            f"incoming data has {incoming_X.shape[1]} features, training data {train_X.shape[1]} and the schema "
            f"{len(feature_names)}: drift is measured on the same schema"
        )
    return DriftReport(
        psi={name: psi(train_X[:, j], incoming_X[:, j], bins) for j, name in enumerate(feature_names)},
        label_shift=label_shift(train_y, incoming_y, n_classes),
        psi_threshold=psi_threshold,
        label_threshold=label_threshold,
    )
