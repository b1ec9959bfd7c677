"""Split one table across simulated sites, and each site's table into train/validation/test.

Simulations need sites whose data differ the way real institutions do. The
partitioners here produce the three standard regimes of the federated-learning
literature: IID, label skew (per-class Dirichlet proportions, Hsu et al. 2019;
Yurochkin et al. 2019) and quantity skew (Dirichlet site sizes). Each returns
sorted, disjoint int64 index arrays that together use every row exactly once,
and each guarantees a minimum number of rows per site or says why it cannot.
All randomness comes from the ``rng`` passed in, so a seed reproduces a split.

A regression table (a continuous target) has no classes to skew: label skew
refuses it, and :func:`split_table` stratifies it by quantile bins of the target.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from consortium.data.stream import Records
from consortium.errors import ConfigError, DataError, PartitionError

#: How many Dirichlet draws :func:`partition_dirichlet` tries before giving up.
MAX_ATTEMPTS = 1000

#: How many quantile bins of the target :func:`split_table` stratifies a regression table by.
REGRESSION_STRATA = 10


def _check_sites(n_sites: int) -> None:
    if isinstance(n_sites, bool) or not isinstance(n_sites, (int, np.integer)) or n_sites < 1:
        raise ConfigError(f"n_sites = {n_sites!r} is invalid: use at least 1 site")


def _check_concentration(name: str, value: float, meaning: str) -> None:
    ok = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
    if not ok or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{name} = {value!r} is invalid: it must be a finite number > 0 ({meaning})")


def _check_capacity(n_rows: int, n_sites: int, min_rows: int, *, adjustable: bool = True) -> None:
    """Fail early when ``n_rows`` cannot give every site ``min_rows`` rows (``adjustable``: min_rows is a knob)."""
    if isinstance(min_rows, bool) or not isinstance(min_rows, (int, np.integer)) or min_rows < 1:
        raise ConfigError(f"min_rows = {min_rows!r} is invalid: it must be an integer >= 1")
    if n_rows < n_sites * min_rows:
        most = n_rows // min_rows
        fixes = [f"use at most {most} site{'s' if most != 1 else ''}"] if most else []
        if adjustable:
            fixes.append("a smaller min_rows" if fixes else "use a smaller min_rows")
        sites = f"{n_sites} site{'s' if n_sites != 1 else ''}"
        rows = "row" if min_rows == 1 else "rows"
        raise PartitionError(
            f"cannot give {sites} at least {min_rows} {rows} each from {n_rows} rows: {' or '.join(fixes) or 'add rows'}"
        )


def _split_by_sizes(order: np.ndarray, sizes: np.ndarray) -> list[np.ndarray]:
    """Cut ``order`` into consecutive pieces of ``sizes`` rows, each sorted int64."""
    cuts = np.cumsum(sizes)[:-1]
    return [np.sort(part).astype(np.int64) for part in np.split(order, cuts)]


def partition_iid(n_rows: int, n_sites: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Shuffle the rows and deal them into ``n_sites`` near-equal parts (sizes differ by at most 1)."""
    _check_sites(n_sites)
    _check_capacity(n_rows, n_sites, 1, adjustable=False)
    return [np.sort(p).astype(np.int64) for p in np.array_split(rng.permutation(n_rows), n_sites)]


def partition_dirichlet(
    y: np.ndarray, n_sites: int, alpha: float, rng: np.random.Generator, min_rows: int = 10
) -> list[np.ndarray]:
    """Label skew: each class is spread over the sites by proportions drawn from Dirichlet(alpha).

    Small ``alpha`` (0.1) gives sites dominated by a few classes; large ``alpha``
    (100) approaches IID. As in the reference implementation, a site that already
    holds its fair share ``n / n_sites`` of rows takes no more of later classes,
    which keeps sizes from collapsing. The draw is repeated (up to
    ``MAX_ATTEMPTS`` times, with the same ``rng``) until every site has at least
    ``min_rows`` rows; otherwise :class:`PartitionError` says what to change.
    """
    y = np.asarray(y)
    if y.ndim == 1 and np.issubdtype(y.dtype, np.floating):
        raise DataError(
            "label skew (partition kind 'dirichlet') needs class labels, but this target is continuous "
            "(a regression table): use partition kind 'iid' or 'quantity'"
        )
    if y.ndim != 1 or (y.size and not np.issubdtype(y.dtype, np.integer)):
        raise DataError(f"y must be a 1-D array of integer class labels, got dtype {y.dtype} and shape {y.shape}")
    _check_sites(n_sites)
    _check_concentration("alpha", alpha, "small = strong label skew, large = close to IID")
    n_rows = len(y)
    _check_capacity(n_rows, n_sites, min_rows)

    by_class = [np.flatnonzero(y == c) for c in np.unique(y)]
    fair_share = n_rows / n_sites
    for _ in range(MAX_ATTEMPTS):
        parts: list[list[np.ndarray]] = [[] for _ in range(n_sites)]
        sizes = np.zeros(n_sites, dtype=np.int64)
        for rows in by_class:
            p = rng.dirichlet(np.full(n_sites, float(alpha)))
            p = np.where(sizes < fair_share, p, 0.0)
            if not np.isfinite(p).all() or p.sum() <= 0:
                break  # every open site drew a zero share: draw again
            p = p / p.sum()
            rows = rng.permutation(rows)
            cuts = (np.cumsum(p) * len(rows)).astype(np.int64)[:-1]
            for site, piece in enumerate(np.split(rows, cuts)):
                parts[site].append(piece)
                sizes[site] += len(piece)
        else:
            if sizes.min() >= min_rows:
                return [np.sort(np.concatenate(p)).astype(np.int64) for p in parts]
    raise PartitionError(
        f"could not give {n_sites} sites at least {min_rows} rows each from {n_rows} rows with alpha={alpha} "
        f"in {MAX_ATTEMPTS} Dirichlet draws: use fewer sites or a larger alpha"
    )


def partition_quantity(
    n_rows: int, n_sites: int, beta: float, rng: np.random.Generator, min_rows: int = 10
) -> list[np.ndarray]:
    """Quantity skew: site sizes follow Dirichlet(beta) proportions; labels stay IID.

    Small ``beta`` (0.1) gives very unequal sizes, large ``beta`` near-equal ones.
    Every site first receives ``min_rows`` rows and the remaining rows are shared
    out by the Dirichlet proportions, so the minimum holds whenever the table is
    large enough at all.
    """
    _check_sites(n_sites)
    _check_concentration("beta", beta, "small = very unequal site sizes, large = near-equal")
    _check_capacity(n_rows, n_sites, min_rows)
    p = rng.dirichlet(np.full(n_sites, float(beta)))
    p = p / p.sum()  # guard the multinomial's sum check against rounding
    sizes = min_rows + rng.multinomial(n_rows - n_sites * min_rows, p)
    return _split_by_sizes(rng.permutation(n_rows), sizes)


# ---------------------------------------------------------------------------
# Train / validation / test


@dataclass(frozen=True)
class Splits:
    """A site's data cut three ways: fit on ``train``, tune on ``validation``, report on ``test``; each in
    memory or read on demand, as the site's records were."""

    train: Records
    validation: Records
    test: Records

    def in_memory(self) -> Splits:
        """These splits with every record read into memory (``Table``): for what needs them all at once,
        such as the red team's replays (in memory already: these very splits)."""
        return Splits(self.train.to_table(), self.validation.to_table(), self.test.to_table())


def _check_fraction(name: str, value: float) -> None:
    ok = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
    if not ok or not math.isfinite(value) or not 0 <= value < 0.5:
        raise ConfigError(f"{name} fraction = {value!r} is invalid: it must lie in [0, 0.5)")


def split_table(table: Records, rng: np.random.Generator, *, validation: float = 0.1, test: float = 0.2) -> Splits:
    """Cut ``table`` into train, validation and test, stratified by class.

    A ``StreamedTable`` is cut into streamed parts: only its labels are read.

    Stratification is systematic: the rows of each class are shuffled and spread
    evenly along one ordering, whose first rows form the test split, the next the
    validation split and the rest train. Every split then holds each class in
    proportion, to within one row. A class too small to reach every split simply
    lands in a random split, which is the plain random split the small case calls
    for. A split with a fraction > 0 keeps at least one row, and train always does.

    A regression table is stratified the same way by ``REGRESSION_STRATA``
    quantile bins of its target (rows ranked by target, ties in row order, cut
    into near-equal bins), so every split spans the target's range.
    """
    _check_fraction("validation", validation)
    _check_fraction("test", test)
    if validation + test >= 0.9:
        raise ConfigError(
            f"validation + test = {validation + test:g} leaves too little to train on: keep their sum below 0.9"
        )
    n = table.n_rows
    n_test = max(1, round(test * n)) if test > 0 else 0
    n_val = max(1, round(validation * n)) if validation > 0 else 0
    needed = 1 + (test > 0) + (validation > 0)
    if n < needed:
        raise DataError(
            f"a table of {n} row{'s' if n != 1 else ''} is too small to split into train, validation and test: it needs "
            f"at least {needed} rows"
        )
    # Rounding up tiny splits to one row must never leave train empty.
    while n - n_test - n_val < 1:
        if n_val > 1 and n_val >= n_test:
            n_val -= 1
        else:
            n_test -= 1

    # Position of each row along the stratified ordering: (rank within its class + U(0,1)) / class size.
    strata = _target_bins(table.labels) if table.is_regression else table.labels
    key = np.empty(n, dtype=np.float64)
    for c in np.unique(strata):
        rows = np.flatnonzero(strata == c)
        rank = rng.permutation(len(rows))
        key[rows] = (rank + rng.random(len(rows))) / len(rows)
    order = np.argsort(key, kind="stable")
    test_idx, val_idx, train_idx = np.split(order, [n_test, n_test + n_val])
    return Splits(
        train=table.subset(np.sort(train_idx)),
        validation=table.subset(np.sort(val_idx)),
        test=table.subset(np.sort(test_idx)),
    )


def _target_bins(y: np.ndarray) -> np.ndarray:
    """The quantile bin (0..REGRESSION_STRATA - 1) of each continuous target: rank by value, ties in row order."""
    n = len(y)
    rank = np.empty(n, dtype=np.int64)
    rank[np.argsort(y, kind="stable")] = np.arange(n)
    return rank * min(REGRESSION_STRATA, max(1, n)) // max(1, n)
