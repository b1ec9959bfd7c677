"""Tables of examples, the built-in datasets and a synthetic consortium of hospitals.

A :class:`Table` is the one in-memory form of a site's data that the rest of
Consortium trains on: a float32 feature matrix, int64 class indices and the
names that give them meaning. The target is either int64 class indices
(classification) or, when the table names no classes, float32 values
(regression). It checks itself on construction, so a shape or dtype mistake, or
a missing value where none was declared, surfaces where the table is made
rather than deep inside training.

Three real datasets ship inside scikit-learn and need no network, which makes them
good for demonstrations; :func:`synthetic_hospitals` builds a consortium whose
heterogeneity is set by explicit knobs, which makes it good for experiments on
*when* federation helps.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from consortium.errors import ConfigError, DataError, UnknownDatasetError


#: Rows a step reads from an in-memory table at a time (setup sums, evaluation, DP-SGD's chunks).
TABLE_BATCH_ROWS = 4096


@dataclass(frozen=True)
class Table:
    """Rows of examples with their labels and the names that give them meaning.

    ``X`` is float32 of shape (n, d) and C-contiguous. For classification ``y``
    is int64 of shape (n,) holding indices into ``classes``; for regression
    ``classes`` is ``()`` and ``y`` is float32 of shape (n,), every value finite
    (:attr:`is_regression`). ``image_shape`` is (channels, height, width) when
    each row is a flattened image, so an image model can unflatten it.

    ``imputed`` names the feature columns that may hold NaN: a missing value,
    declared in the schema (``missing: impute`` or ``indicator``), which the
    model's standardisation replaces with the consortium-wide mean. NaN in any
    other column is an error, and so is an infinity anywhere.
    """

    X: np.ndarray
    y: np.ndarray
    feature_names: tuple[str, ...]
    classes: tuple[str, ...]
    image_shape: tuple[int, int, int] | None = None
    imputed: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        # Names are stored as tuples so that tables compare and hash their metadata reliably.
        object.__setattr__(self, "feature_names", tuple(self.feature_names))
        object.__setattr__(self, "classes", tuple(self.classes))
        object.__setattr__(self, "imputed", tuple(self.imputed))
        X, y = self.X, self.y
        if not isinstance(X, np.ndarray) or X.ndim != 2:
            raise DataError(f"Table.X must be a 2-D numpy array (rows, features), got {_describe(X)}")
        if X.dtype != np.float32:
            raise DataError(f"Table.X must be float32, got {X.dtype}: convert with X.astype(np.float32)")
        if not X.flags.c_contiguous:
            raise DataError("Table.X must be C-contiguous: wrap it in np.ascontiguousarray(X)")
        if not all(isinstance(c, str) for c in self.classes):
            raise DataError("Table.classes must be a tuple of strings (the class labels; () for a regression table)")
        if self.classes:
            if not isinstance(y, np.ndarray) or y.ndim != 1:
                raise DataError(f"Table.y must be a 1-D numpy array of class indices, got {_describe(y)}")
            if y.dtype != np.int64:
                raise DataError(f"Table.y must be int64, got {y.dtype}: convert with y.astype(np.int64)")
        else:
            if not isinstance(y, np.ndarray) or y.ndim != 1:
                raise DataError(f"Table.y of a regression table must be a 1-D numpy array of targets, got {_describe(y)}")
            if y.dtype != np.float32:
                raise DataError(
                    f"Table.y of a regression table (classes=()) must be float32, got {y.dtype}: convert with "
                    "y.astype(np.float32), or name the classes for a classification table"
                )
        if len(y) != len(X):
            raise DataError(f"Table has {len(X)} rows in X but {len(y)} labels in y: they must match")
        if not all(isinstance(n, str) for n in self.feature_names):
            raise DataError("Table.feature_names must all be strings")
        if len(self.feature_names) != X.shape[1]:
            raise DataError(
                f"Table has {X.shape[1]} feature columns but {len(self.feature_names)} feature names: they must match"
            )
        if self.classes:
            if len(y) and (y.min() < 0 or y.max() >= len(self.classes)):
                raise DataError(
                    f"Table.y holds values in [{y.min()}, {y.max()}] but there are {len(self.classes)} classes: "
                    f"labels must lie in 0..{len(self.classes) - 1}"
                )
        elif len(y) and not np.isfinite(y).all():
            row = int(np.flatnonzero(~np.isfinite(y))[0])
            raise DataError(f"Table.y has a NaN or infinite target (first in row {row}): a label can never be missing")
        columns = self._imputed_columns()
        bad = _first_non_finite(X, columns)
        if bad is not None:
            row, col = bad
            value, name = X[row, col], self.feature_names[col]
            if np.isnan(value):
                raise DataError(
                    f"Table.X has a NaN in row {row}, feature '{name}', which is not declared imputed: clean or drop "
                    "those rows, or declare the column `missing: impute` in the schema"
                )
            raise DataError(f"Table.X has an infinite value in row {row}, feature '{name}': clean or drop those rows")
        if self.image_shape is not None:
            shape = tuple(self.image_shape)
            if len(shape) != 3 or not all(isinstance(s, int) and s > 0 for s in shape):
                raise DataError(f"Table.image_shape must be (channels, height, width) of positive ints, got {shape}")
            if math.prod(shape) != X.shape[1]:
                raise DataError(
                    f"Table.image_shape {shape} holds {math.prod(shape)} values but rows have {X.shape[1]} features"
                )
            object.__setattr__(self, "image_shape", shape)

    def _imputed_columns(self) -> np.ndarray:
        """The column indices of ``imputed``, each checked to name a feature once."""
        if not all(isinstance(n, str) for n in self.imputed):
            raise DataError("Table.imputed must be a tuple of feature names (strings)")
        index = {n: i for i, n in enumerate(self.feature_names)}
        seen: set[str] = set()
        for name in self.imputed:
            if name not in index:
                raise DataError(f"Table.imputed names '{name}', which is not a feature: list only feature names")
            if name in seen:
                raise DataError(f"Table.imputed names '{name}' twice: list each feature once")
            seen.add(name)
        return np.array([index[n] for n in self.imputed], dtype=np.int64)

    @property
    def n_rows(self) -> int:
        return int(self.X.shape[0])

    @property
    def n_features(self) -> int:
        return int(self.X.shape[1])

    @property
    def n_classes(self) -> int:
        """The number of classes; 0 for a regression table."""
        return len(self.classes)

    @property
    def is_regression(self) -> bool:
        """True when the target is a float32 value rather than a class index (the table names no classes)."""
        return not self.classes

    @property
    def labels(self) -> np.ndarray:
        """Every row's label: ``y`` (the name ``StreamedTable`` shares, whose features are not in memory)."""
        return self.y

    @property
    def batch_rows(self) -> int:
        """How many rows a step handles at a time (``batches``, DP-SGD's chunks): ``TABLE_BATCH_ROWS`` at most."""
        return max(1, min(self.n_rows, TABLE_BATCH_ROWS))

    def batches(self) -> Iterator[Table]:
        """The rows in order, ``batch_rows`` at a time (views, not copies): the table itself when it is
        no larger, so that a step's temporaries (float64 sums, a model's activations) stay bounded."""
        if self.n_rows <= TABLE_BATCH_ROWS:
            yield self
            return
        for start in range(0, self.n_rows, TABLE_BATCH_ROWS):
            end = min(start + TABLE_BATCH_ROWS, self.n_rows)
            yield Table(X=self.X[start:end], y=self.y[start:end], feature_names=self.feature_names,
                        classes=self.classes, image_shape=self.image_shape, imputed=self.imputed)

    def subset(self, idx: np.ndarray) -> Table:
        """The rows at ``idx``: ``take`` (a ``StreamedTable``'s subset reads nothing until asked)."""
        return self.take(idx)

    def to_table(self) -> Table:
        """This table (a ``StreamedTable`` reads its rows into one)."""
        return self

    def take(self, idx: np.ndarray) -> Table:
        """The rows at ``idx`` (integer indices or a boolean mask), with the same metadata."""
        idx = np.asarray(idx)
        if idx.size == 0:
            idx = idx.astype(np.int64)
        return Table(
            X=np.ascontiguousarray(self.X[idx]),
            y=np.ascontiguousarray(self.y[idx]),
            feature_names=self.feature_names,
            classes=self.classes,
            image_shape=self.image_shape,
            imputed=self.imputed,
        )


def concat_tables(tables: list[Table]) -> Table:
    """The rows of ``tables`` one after the other; the first table's metadata (they must share it)."""
    first = tables[0]
    return Table(
        X=np.concatenate([t.X for t in tables]),
        y=np.concatenate([t.y for t in tables]),
        feature_names=first.feature_names,
        classes=first.classes,
        image_shape=first.image_shape,
        imputed=first.imputed,
    )


def _first_non_finite(X: np.ndarray, nan_ok: np.ndarray) -> tuple[int, int] | None:
    """(row, column) of the first NaN or infinity, or None; a NaN in a column of ``nan_ok`` is allowed (an
    infinity never is). Checked in blocks of about 4M values, so that a large table is not shadowed by a
    boolean copy of itself."""
    step = max(1, (1 << 22) // max(1, X.shape[1]))
    for start in range(0, len(X), step):
        block = X[start : start + step]
        bad = ~np.isfinite(block)
        if len(nan_ok):
            bad[:, nan_ok] = np.isinf(block[:, nan_ok])
        if bad.any():
            row, col = np.argwhere(bad)[0]
            return start + int(row), int(col)
    return None


def _describe(a: object) -> str:
    if isinstance(a, np.ndarray):
        return f"an array of shape {a.shape}"
    return type(a).__name__


# ---------------------------------------------------------------------------
# Built-in datasets

BUILTIN_DATASETS: tuple[str, ...] = ("breast-cancer", "diabetes", "digits", "synthetic-hospitals")


def load_builtin(name: str) -> Table:
    """Load a dataset that ships with scikit-learn (no network needed).

    ``"breast-cancer"``: Wisconsin diagnostic, 569 rows, 30 features, classes
    ("malignant", "benign"). ``"digits"``: 1797 8x8 images of handwritten digits,
    raw pixel values 0..16, classes "0".."9". ``"diabetes"``: a regression table
    (no classes), 442 rows, 10 raw features (age, sex, bmi, bp, s1..s6) and a
    float32 target, a measure of disease progression one year later (25..346).
    ``"synthetic-hospitals"`` is a
    whole consortium rather than one table: use :func:`synthetic_hospitals`.
    """
    if name == "breast-cancer":
        from sklearn.datasets import load_breast_cancer

        bunch = load_breast_cancer()
        return Table(
            X=np.ascontiguousarray(bunch.data, dtype=np.float32),
            y=np.asarray(bunch.target, dtype=np.int64),
            feature_names=tuple(str(n) for n in bunch.feature_names),
            classes=tuple(str(c) for c in bunch.target_names),
        )
    if name == "diabetes":
        from sklearn.datasets import load_diabetes

        bunch = load_diabetes(scaled=False)  # raw units: the model standardises its inputs itself
        return Table(
            X=np.ascontiguousarray(bunch.data, dtype=np.float32),
            y=np.asarray(bunch.target, dtype=np.float32),
            feature_names=tuple(str(n) for n in bunch.feature_names),
            classes=(),
        )
    if name == "digits":
        from sklearn.datasets import load_digits

        bunch = load_digits()
        names = getattr(bunch, "feature_names", None) or [f"pixel_{r}_{c}" for r in range(8) for c in range(8)]
        return Table(
            X=np.ascontiguousarray(bunch.data, dtype=np.float32),
            y=np.asarray(bunch.target, dtype=np.int64),
            feature_names=tuple(str(n) for n in names),
            classes=tuple(str(c) for c in range(10)),
            image_shape=(1, 8, 8),
        )
    if name == "synthetic-hospitals":
        raise ConfigError(
            "'synthetic-hospitals' is a set of sites, not a single table: "
            "use synthetic_hospitals(n_sites, SyntheticHospitals(...), rng)"
        )
    raise UnknownDatasetError(f"unknown dataset '{name}': choose one of {', '.join(BUILTIN_DATASETS)}")


# ---------------------------------------------------------------------------
# Synthetic hospitals

#: Descriptive names and (mean, sd) units for the first synthetic features;
#: any further features are called f8, f9, ... and stay on a standard scale.
_CLINICAL = (
    ("age", 58.0, 14.0),
    ("bmi", 27.5, 5.0),
    ("sbp", 132.0, 18.0),
    ("heart_rate", 76.0, 12.0),
    ("glucose", 105.0, 25.0),
    ("cholesterol", 195.0, 38.0),
    ("creatinine", 1.0, 0.3),
    ("hemoglobin", 13.5, 1.6),
)

_MIN_SITE_ROWS = 20


@dataclass(frozen=True)
class SyntheticHospitals:
    """Knobs of the synthetic consortium; every knob at 0 means "no heterogeneity".

    - ``rows_per_site``: mean rows per site (>= 20).
    - ``n_features``: number of features (>= 2).
    - ``label_skew``: spread of site-specific intercepts (>= 0), so outcome prevalence differs by site.
    - ``feature_shift``: spread of site-specific feature offsets and scales (>= 0): covariate shift.
    - ``size_imbalance``: sigma of a lognormal spread of site sizes (>= 0); every site keeps >= 20 rows.
    """

    rows_per_site: int = 400
    n_features: int = 12
    label_skew: float = 0.0
    feature_shift: float = 0.0
    size_imbalance: float = 0.0

    def __post_init__(self) -> None:
        for name, low in (("rows_per_site", _MIN_SITE_ROWS), ("n_features", 2)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
                raise ConfigError(f"SyntheticHospitals.{name} = {value!r} is invalid: it must be an integer >= {low}")
        for name in ("label_skew", "feature_shift", "size_imbalance"):
            value = getattr(self, name)
            ok = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
            if not ok or not math.isfinite(value) or value < 0:
                raise ConfigError(
                    f"SyntheticHospitals.{name} = {value!r} is invalid: it must be a finite number >= 0 (0 = none)"
                )


def _feature_names(d: int) -> tuple[str, ...]:
    return tuple(_CLINICAL[i][0] if i < len(_CLINICAL) else f"f{i}" for i in range(d))


def _site_sizes(n_sites: int, spec: SyntheticHospitals, rng: np.random.Generator) -> np.ndarray:
    """Site sizes with mean ``rows_per_site`` before the 20-row floor; lognormal spread ``size_imbalance``."""
    if spec.size_imbalance == 0:
        return np.full(n_sites, spec.rows_per_site, dtype=np.int64)
    z = spec.size_imbalance * rng.standard_normal(n_sites)
    w = np.exp(z - z.max())  # shifted to avoid overflow; normalised below
    sizes = np.rint(w / w.mean() * spec.rows_per_site).astype(np.int64)
    return np.maximum(sizes, _MIN_SITE_ROWS)


def synthetic_hospitals(n_sites: int, spec: SyntheticHospitals, rng: np.random.Generator) -> list[Table]:
    """A consortium of ``n_sites`` hospitals predicting a binary event from the same true model.

    Every site draws its outcome from one shared logistic model whose logit is a
    linear score plus a few pairwise interactions and a squared term, so the
    relationship is learnable but rewards more data: a model pooled over sites
    beats any single small site. The sites differ only through ``spec``'s knobs:
    a site-specific intercept (``label_skew``), a site-specific shift and scale
    of the features (``feature_shift``) and the site sizes (``size_imbalance``).
    The same generator state gives the same consortium.
    """
    if isinstance(n_sites, bool) or not isinstance(n_sites, (int, np.integer)) or n_sites < 1:
        raise ConfigError(f"n_sites = {n_sites!r} is invalid: a consortium needs at least 1 site")
    if not isinstance(spec, SyntheticHospitals):
        raise ConfigError(f"spec must be a SyntheticHospitals, got {type(spec).__name__}")
    d = spec.n_features

    # The shared ground truth, drawn first so it does not depend on the knobs.
    rho = 0.2  # mild equicorrelation between features, as in real clinical panels
    mix = np.linalg.cholesky((1 - rho) * np.eye(d) + rho * np.ones((d, d)))
    weights = rng.standard_normal(d) * (1.5 / math.sqrt(d))
    n_pairs = min(3, d // 2)
    pairs = rng.permutation(d)[: 2 * n_pairs].reshape(n_pairs, 2)
    pair_coef = rng.choice([-1.0, 1.0], size=n_pairs) * rng.uniform(0.6, 1.0, size=n_pairs)
    square_col = int(rng.integers(d))
    intercept = -1.0  # about 30% prevalence at a site with no skew

    sizes = _site_sizes(n_sites, spec, rng)
    names = _feature_names(d)
    units_mean = np.array([_CLINICAL[i][1] if i < len(_CLINICAL) else 0.0 for i in range(d)])
    units_sd = np.array([_CLINICAL[i][2] if i < len(_CLINICAL) else 1.0 for i in range(d)])

    tables = []
    for n in sizes:
        site_intercept = spec.label_skew * rng.standard_normal()
        offset = spec.feature_shift * rng.standard_normal(d)
        scale = np.exp(0.3 * spec.feature_shift * rng.standard_normal(d))
        z = (rng.standard_normal((int(n), d)) @ mix.T) * scale + offset
        logit = (
            intercept
            + site_intercept
            + z @ weights
            + (z[:, pairs[:, 0]] * z[:, pairs[:, 1]]) @ pair_coef
            - 0.5 * (z[:, square_col] ** 2 - 1.0)
        )
        p = 1.0 / (1.0 + np.exp(-np.clip(logit, -30, 30)))
        y = (rng.random(int(n)) < p).astype(np.int64)
        X = np.ascontiguousarray(z * units_sd + units_mean, dtype=np.float32)
        tables.append(Table(X=X, y=y, feature_names=names, classes=("no-event", "event")))
    return tables
