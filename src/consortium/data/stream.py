"""A site's records read on demand from a ``torch.utils.data.Dataset``, for data that does not fit in memory.

A :class:`StreamedTable` has what a :class:`~consortium.data.datasets.Table`
has (feature names, classes, image shape, the features that may be missing,
a row count and every row's label), but reads the features of a row only when
a step asks for it: the setup sums, the training steps (DP-SGD's Poisson
samples included) and the evaluation read it ``batch_rows`` records at a time,
and each batch is checked as a ``Table`` is (float32, finite, labels in range).
Peak memory is then one batch, whatever the dataset's size.

The two share one interface, :data:`Records`, which every site-side path
reads through:

- ``n_rows``, ``n_features``, ``feature_names``, ``classes``, ``image_shape``,
  ``imputed``, ``is_regression``;
- ``labels``: every row's label, in memory (labels are small; splits and the
  drift check's label shares need them);
- ``take(idx)``: the rows at ``idx`` as an in-memory ``Table``;
- ``subset(idx)``: the rows at ``idx`` as the same kind of records (a
  streamed subset reads nothing);
- ``batches()``: the rows in order, ``batch_rows`` at a time, each a ``Table``.

The dataset must be map-style (``__len__`` and ``__getitem__``): DP-SGD samples
rows at random. Item ``i`` is ``(x, y)``: ``x`` anything ``numpy.asarray`` reads
as ``n_features`` numbers (an image's (C, H, W) tensor, flattened), ``y`` a class
index (int) or, for a regression, a number.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from consortium.data.datasets import Table, concat_tables
from consortium.errors import DataError

#: Records a streamed table reads at a time unless told otherwise.
DEFAULT_BATCH_ROWS = 512


class StreamedTable:
    """Records read from a map-style dataset a batch at a time (see the module docstring).

    Args:
        dataset: a map-style ``torch.utils.data.Dataset`` (or any object with ``__len__`` and
            ``__getitem__``) whose item ``i`` is ``(features, label)``.
        feature_names: one name per feature; default: an image's pixels ``c<channel>_<row>_<col>`` when
            ``image_shape`` is given (as ``load_image_array`` names them), else ``x0``, ``x1``, ... by the
            first record's size. Every site must name them alike (the schema fingerprint compares them).
        classes: the class labels in index order; ``()`` for a regression (float targets).
        image_shape: ``(channels, height, width)`` when each record is an image.
        imputed: the features that may be missing (NaN), as in ``Table``.
        labels: every row's label, when the dataset knows them without reading the features
            (an image folder does, from its sub-folders); else they are read once, a batch at a time.
        batch_rows: how many records are read at a time (the peak memory is one batch).

    Raises:
        DataError: the dataset is not map-style, is empty, its first record does not have one value
            per feature name, or a label is out of range (one line naming the fix).
    """

    def __init__(
        self,
        dataset: Any,
        *,
        feature_names: Sequence[str] | None = None,
        classes: Sequence[str] = (),
        image_shape: tuple[int, int, int] | None = None,
        imputed: Sequence[str] = (),
        labels: np.ndarray | Sequence[int | float] | None = None,
        batch_rows: int = DEFAULT_BATCH_ROWS,
    ) -> None:
        iterable = any(c.__name__ == "IterableDataset" for c in type(dataset).__mro__)  # torch's, without importing it
        if iterable or not (hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")):
            raise DataError(
                f"a {type(dataset).__name__} cannot be sampled at random (an iterable, or no __len__ and __getitem__): "
                "return a map-style torch.utils.data.Dataset, since DP-SGD samples records by index"
            )
        if not isinstance(batch_rows, int) or batch_rows < 1:
            raise DataError(f"batch_rows must be a positive int, got {batch_rows!r}")
        self.dataset = dataset
        self.batch_rows = batch_rows
        self._indices: np.ndarray | None = None  # None: every row of the dataset, in order
        if len(dataset) < 1:
            raise DataError("the dataset holds no record: give each site at least one")
        if feature_names is None:
            feature_names = _default_names(image_shape, dataset)
        # The layout is checked once, as a Table checks it, on the first record; the empty table keeps it.
        first = self._read(np.zeros(1, dtype=np.int64), feature_names, classes, image_shape, imputed)
        self._empty = first.take(np.zeros(0, dtype=np.int64))
        self._labels = None if labels is None else self._checked_labels(np.asarray(labels))

    # -- what a Table has ------------------------------------------------------------

    @property
    def feature_names(self) -> tuple[str, ...]:
        return self._empty.feature_names

    @property
    def classes(self) -> tuple[str, ...]:
        return self._empty.classes

    @property
    def image_shape(self) -> tuple[int, int, int] | None:
        return self._empty.image_shape

    @property
    def imputed(self) -> tuple[str, ...]:
        return self._empty.imputed

    @property
    def n_features(self) -> int:
        return self._empty.n_features

    @property
    def n_classes(self) -> int:
        return self._empty.n_classes

    @property
    def is_regression(self) -> bool:
        return self._empty.is_regression

    @property
    def n_rows(self) -> int:
        return len(self.dataset) if self._indices is None else int(self._indices.size)

    @property
    def labels(self) -> np.ndarray:
        """Every row's label (int64 class indices, or float32 targets), read once and kept."""
        if self._labels is None:
            self._labels = np.concatenate([batch.y for batch in self.batches()])
        return self._labels

    def take(self, idx: np.ndarray) -> Table:
        """The rows at ``idx`` (positions in this table) read into a ``Table``, checked as one."""
        positions = np.asarray(idx)
        if positions.dtype == bool:
            positions = np.flatnonzero(positions)
        rows = positions.astype(np.int64) if self._indices is None else self._indices[positions]
        return self._read(rows, self.feature_names, self.classes, self.image_shape, self.imputed)

    def subset(self, idx: np.ndarray) -> StreamedTable:
        """The rows at ``idx`` (positions in this table), still read on demand: nothing is read now."""
        positions = np.asarray(idx)
        if positions.dtype == bool:
            positions = np.flatnonzero(positions)
        positions = positions.astype(np.int64)
        part = object.__new__(StreamedTable)
        part.dataset, part.batch_rows, part._empty = self.dataset, self.batch_rows, self._empty
        part._indices = positions if self._indices is None else self._indices[positions]
        part._labels = None if self._labels is None else self._labels[positions]
        return part

    def batches(self) -> Iterator[Table]:
        """The rows in order, ``batch_rows`` at a time."""
        for start in range(0, self.n_rows, self.batch_rows):
            yield self.take(np.arange(start, min(start + self.batch_rows, self.n_rows)))

    def to_table(self) -> Table:
        """Every row in memory at once: for what needs the whole table (the red team's replays)."""
        return self.take(np.arange(self.n_rows))

    # -- reading ------------------------------------------------------------------------

    def _read(
        self, rows: np.ndarray, names: Sequence[str], classes: Sequence[str],
        image_shape: tuple[int, int, int] | None, imputed: Sequence[str],
    ) -> Table:
        n_features = len(names)
        X = np.empty((rows.size, n_features), dtype=np.float32)
        y: list[Any] = []
        for k, row in enumerate(rows.tolist()):
            try:
                x, label = self.dataset[row]
            except (TypeError, ValueError, NotImplementedError) as exc:
                raise DataError(
                    f"record {row} of the dataset is not a (features, label) pair ({exc}): return (x, y) from __getitem__"
                ) from None
            values = np.asarray(x, dtype=np.float32).reshape(-1)
            if values.size != n_features:
                raise DataError(
                    f"record {row} of the dataset has {values.size} values and {n_features} feature names are given: "
                    "name one feature per value (an image's C*H*W pixels)"
                )
            X[k] = values
            y.append(np.asarray(label).item())
        target = np.asarray(y, dtype=np.int64 if classes else np.float32).reshape(-1)
        try:
            return Table(X=X, y=target, feature_names=tuple(names), classes=tuple(classes), image_shape=image_shape,
                         imputed=tuple(imputed))
        except DataError as exc:  # name the dataset's rows, not a table the user never made
            raise DataError(f"dataset rows {_span(rows)}: {exc}") from None

    def _checked_labels(self, labels: np.ndarray) -> np.ndarray:
        if labels.shape != (self.n_rows,):
            raise DataError(f"labels has shape {labels.shape} for a dataset of {self.n_rows} records: give one label per record")
        labels = labels.astype(np.int64 if self.classes else np.float32)
        if self.classes and labels.size and (labels.min() < 0 or labels.max() >= len(self.classes)):
            raise DataError(f"labels hold values outside 0..{len(self.classes) - 1}: give class indices of the {len(self.classes)} classes")
        return labels


class _Concat:
    """A map-style dataset of several records' rows one after the other (``concat_records``)."""

    def __init__(self, parts: Sequence[Records]) -> None:
        self.parts = list(parts)
        self.ends = np.cumsum([p.n_rows for p in self.parts])

    def __len__(self) -> int:
        return int(self.ends[-1])

    def __getitem__(self, i: int) -> tuple[np.ndarray, Any]:
        k = int(np.searchsorted(self.ends, i, side="right"))
        row = self.parts[k].take(np.array([i - (self.ends[k - 1] if k else 0)]))
        return row.X[0], row.y[0]


def concat_records(parts: Sequence[Records]) -> Records:
    """The rows of ``parts`` one after the other, with the first's layout (they must share it): a ``Table``
    when every part is in memory, else records read on demand from each part in turn."""
    if all(isinstance(p, Table) for p in parts):
        return concat_tables(list(parts))  # type: ignore[arg-type]
    first = parts[0]
    return StreamedTable(
        _Concat(parts), feature_names=first.feature_names, classes=first.classes, image_shape=first.image_shape,
        imputed=first.imputed, labels=np.concatenate([p.labels for p in parts]), batch_rows=max(p.batch_rows for p in parts),
    )


def _default_names(image_shape: tuple[int, int, int] | None, dataset: Any) -> tuple[str, ...]:
    if image_shape is not None:
        channels, height, width = image_shape
        return tuple(f"c{k}_{r}_{c}" for k in range(channels) for r in range(height) for c in range(width))
    size = np.asarray(dataset[0][0]).size
    return tuple(f"x{j}" for j in range(size))


def _span(rows: np.ndarray) -> str:
    return f"{rows[0]}..{rows[-1]}" if rows.size > 1 else str(rows[0]) if rows.size else "(none)"


#: A site's records: in memory (``Table``) or read on demand (``StreamedTable``); see the module docstring.
Records = Table | StreamedTable
