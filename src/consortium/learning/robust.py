"""Robust aggregation: defences against poisoned updates, as pure numpy functions.

Every function here takes the round's updates as an ``[n_sites, d]`` matrix
(one row per site, the model delta it sent) and returns what the server step
should use in place of their mean. ``f`` is the number of arbitrary
("Byzantine") updates the defence is meant to tolerate.

- ``bound_norms`` / ``bound_norm``: L2 norm bounding (Sun et al., "Can You
  Really Backdoor Federated Learning?", 2019): each update is scaled into the
  ball of radius ``bound``. It is applied to each update on its own, so it
  composes with a sum and is the one defence here usable under secure
  aggregation: each site's runtime bounds its own update before it is
  masked. That only binds a site that runs the consortium's software: a site
  that rewrites its own runtime can send any update inside the ring's
  coordinate clip, and proving the bound without revealing the update needs
  zero-knowledge range proofs, which Consortium does not have. Without
  secure aggregation the coordinator enforces the bound itself on every
  update it sees. Bounding does not prevent poisoning; it caps one site's
  pull on the mean at its weight times ``bound``, and the weight is the
  site's own claim (its row count, under ``weighting: examples``): a
  rewritten runtime can claim a large one, which ``weighting: uniform``
  takes away. A bounded update still carries its direction, so a boosted
  backdoor can survive a bound that honest updates fit under.
- ``coordinate_median``: the median of each coordinate (Yin et al., ICML
  2018); tolerates ``f`` arbitrary updates when ``n > 2f``.
- ``trimmed_mean``: per coordinate, drop the ``f`` largest and ``f``
  smallest values and average the rest (Yin et al. 2018); ``n > 2f``.
- ``krum`` / ``multi_krum`` (Blanchard et al., "Machine Learning with
  Adversaries: Byzantine Tolerant Gradient Descent", NeurIPS 2017): each
  update's score is the sum of its squared distances to its ``n - f - 2``
  nearest others; Krum keeps the lowest-scoring update, Multi-Krum averages
  the ``m`` lowest (``m = n - f`` unless given); ``n > 2f + 2``.

Median, trimmed mean and the Krums need each site's update, which secure
aggregation hides: they run only in rounds aggregated in the clear. They
weigh every update equally (Multi-Krum averages its choice with the sites'
weights, so that with ``f = 0`` it is exactly FedAvg).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

from consortium.errors import ConfigError

Aggregator = Literal["mean", "median", "trimmed_mean", "krum", "multi_krum"]
AGGREGATORS: tuple[Aggregator, ...] = ("mean", "median", "trimmed_mean", "krum", "multi_krum")

#: The tolerance condition of each aggregator, as text for error messages.
CONDITIONS: dict[str, str] = {
    "mean": "f = 0 (the mean tolerates no arbitrary update)",
    "median": "n > 2f",
    "trimmed_mean": "n > 2f",
    "krum": "n > 2f + 2",
    "multi_krum": "n > 2f + 2",
}


def min_updates(aggregator: Aggregator, f: int) -> int:
    """The fewest updates a round must aggregate for ``aggregator`` to tolerate ``f`` arbitrary ones."""
    if aggregator in ("median", "trimmed_mean"):
        return 2 * f + 1
    if aggregator in ("krum", "multi_krum"):
        return 2 * f + 3
    return 1


def needs_updates(aggregator: Aggregator) -> bool:
    """Whether the aggregator reads each site's update (and so cannot run under secure aggregation)."""
    return aggregator != "mean"


def check_tolerance(aggregator: Aggregator, f: int, n: int) -> None:
    """Raise ConfigError unless ``aggregator`` tolerates ``f`` arbitrary updates among ``n``."""
    if aggregator not in AGGREGATORS:
        raise ConfigError(f"unknown robust aggregator '{aggregator}': choose one of {', '.join(AGGREGATORS)}")
    if f < 0:
        raise ConfigError(f"the number of Byzantine updates f must be 0 or more, found {f}")
    if aggregator == "mean" and f > 0:
        raise ConfigError(
            f"the mean tolerates no arbitrary update, found byzantine={f}: choose median, trimmed_mean, krum "
            "or multi_krum, or set byzantine to 0 (and bound norms with norm_bound)"
        )
    need = min_updates(aggregator, f)
    if n < need:
        raise ConfigError(
            f"{aggregator} tolerates f={f} arbitrary updates only when {CONDITIONS[aggregator]}, i.e. at least "
            f"{need} updates, and it was given {n}"
        )


def _matrix(updates: np.ndarray) -> np.ndarray:
    u = np.asarray(updates, dtype=np.float64)
    if u.ndim != 2 or u.shape[0] < 1:
        raise ValueError(f"updates must be an [n_sites, d] matrix with at least one row, found shape {u.shape}")
    if not np.all(np.isfinite(u)):
        raise ValueError("updates contain NaN or infinity")
    return u


def _weights(weights: np.ndarray | None, n: int) -> np.ndarray:
    if weights is None:
        return np.ones(n)
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != (n,) or not np.all(np.isfinite(w)) or np.any(w < 0) or not w.sum() > 0:
        raise ValueError(f"weights must be {n} non-negative numbers with a positive sum, found {w}")
    return w


def bound_norm(update: np.ndarray, bound: float | None) -> np.ndarray:
    """``update`` scaled into the L2 ball of radius ``bound`` (unchanged when within it, or bound is None)."""
    if bound is None:
        return update
    if not (math.isfinite(bound) and bound > 0):
        raise ValueError(f"the norm bound must be a positive number, found {bound}")
    norm = float(np.linalg.norm(update))
    return update * (bound / norm) if norm > bound else update


def bound_norms(updates: np.ndarray, bound: float) -> np.ndarray:
    """Each row scaled into the L2 ball of radius ``bound`` (Sun et al. 2019)."""
    u = _matrix(updates)
    norms = np.linalg.norm(u, axis=1)
    scale = np.where(norms > bound, bound / np.where(norms > 0, norms, 1.0), 1.0)
    return u * scale[:, None]


def weighted_mean(updates: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """FedAvg's aggregate: ``sum(w_k u_k) / sum(w_k)``."""
    u = _matrix(updates)
    w = _weights(weights, u.shape[0])
    return (w @ u) / w.sum()


def coordinate_median(updates: np.ndarray, f: int = 0) -> np.ndarray:
    """The coordinate-wise median (for an even count, the mean of the two middle values)."""
    u = _matrix(updates)
    check_tolerance("median", f, u.shape[0])
    return np.median(u, axis=0)


def trimmed_mean(updates: np.ndarray, f: int) -> np.ndarray:
    """Per coordinate, the mean of the values left after dropping the ``f`` largest and ``f`` smallest."""
    u = _matrix(updates)
    check_tolerance("trimmed_mean", f, u.shape[0])
    n = u.shape[0]
    return np.sort(u, axis=0)[f : n - f].mean(axis=0)


def krum_scores(updates: np.ndarray, f: int) -> np.ndarray:
    """Each update's Krum score: the sum of its squared L2 distances to its ``n - f - 2`` nearest others."""
    u = _matrix(updates)
    check_tolerance("krum", f, u.shape[0])
    n = u.shape[0]
    sq = np.sum(u * u, axis=1)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2.0 * (u @ u.T), 0.0)
    np.fill_diagonal(d2, np.inf)  # an update is not its own neighbour
    k = n - f - 2
    return np.sort(d2, axis=1)[:, :k].sum(axis=1)


def multi_krum_select(updates: np.ndarray, f: int, m: int | None = None) -> np.ndarray:
    """The indices of the ``m`` lowest Krum scores (``m = n - f`` by default), lowest first; ties by index."""
    scores = krum_scores(updates, f)
    n = scores.shape[0]
    m = n - f if m is None else m
    if not 1 <= m <= n:
        raise ValueError(f"Multi-Krum selects between 1 and {n} updates, asked for {m}")
    return np.argsort(scores, kind="stable")[:m]


def krum(updates: np.ndarray, f: int) -> tuple[np.ndarray, int]:
    """(the selected update, its row index): the update with the lowest Krum score."""
    chosen = int(multi_krum_select(updates, f, 1)[0])
    return _matrix(updates)[chosen], chosen


def multi_krum(
    updates: np.ndarray, f: int, m: int | None = None, weights: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(the weighted mean of the selected updates, their row indices, lowest score first)."""
    u = _matrix(updates)
    chosen = multi_krum_select(u, f, m)
    w = _weights(weights, u.shape[0])[chosen]
    if not w.sum() > 0:
        w = np.ones_like(w)
    return (w @ u[chosen]) / w.sum(), chosen


@dataclass(frozen=True)
class Aggregate:
    """What a robust aggregation made of one round's updates, and whose updates it touched."""

    update: np.ndarray  # what the server step uses in place of the mean update
    bounded: tuple[int, ...]  # rows whose norm the bound cut
    selected: tuple[int, ...] | None  # Krum / Multi-Krum: the rows chosen


@dataclass(frozen=True)
class RobustAggregation:
    """The run's defence against poisoned updates: an aggregator, the Byzantine updates it must tolerate,
    and an optional L2 bound on each update. ``min_updates`` is the fewest a round may aggregate."""

    aggregator: Aggregator = "mean"
    byzantine: int = 0
    norm_bound: float | None = None

    def __post_init__(self) -> None:
        check_tolerance(self.aggregator, self.byzantine, min_updates(self.aggregator, self.byzantine))
        if self.norm_bound is not None and not (math.isfinite(self.norm_bound) and self.norm_bound > 0):
            raise ConfigError(f"robust.norm_bound must be a positive number, found {self.norm_bound}")

    @property
    def needs_updates(self) -> bool:
        return needs_updates(self.aggregator)

    @property
    def min_updates(self) -> int:
        return min_updates(self.aggregator, self.byzantine)

    def aggregate(self, updates: np.ndarray, weights: np.ndarray | None = None) -> Aggregate:
        """Bound (if asked), then aggregate; the tolerance condition is checked again on the actual count."""
        u = _matrix(updates)
        bounded: tuple[int, ...] = ()
        if self.norm_bound is not None:
            norms = np.linalg.norm(u, axis=1)
            bounded = tuple(int(i) for i in np.flatnonzero(norms > self.norm_bound))
            u = bound_norms(u, self.norm_bound)
        f, selected = self.byzantine, None
        if self.aggregator == "median":
            out = coordinate_median(u, f)
        elif self.aggregator == "trimmed_mean":
            out = trimmed_mean(u, f)
        elif self.aggregator == "krum":
            out, index = krum(u, f)
            selected = (index,)
        elif self.aggregator == "multi_krum":
            out, chosen = multi_krum(u, f, weights=weights)
            selected = tuple(int(i) for i in chosen)
        else:
            out = weighted_mean(u, weights)
        return Aggregate(out, bounded, selected)

    def describe(self) -> dict[str, object]:
        return {"aggregator": self.aggregator, "byzantine": self.byzantine, "norm_bound": self.norm_bound}
