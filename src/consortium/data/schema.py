"""A site's own data: a CSV file read against a declared schema (YAML).

In a real consortium every institution exports its data to CSV and declares
what each column holds. The schema is the contract that lets several sites
train one model: the same columns, the same types, the same category values in
the same order, hence the same feature vector. Sites compare schemas before
training (:func:`check_schemas`, :meth:`DataSchema.fingerprint`), and every row
is checked against the schema on load, so a bad cell is reported by file, line
and column instead of silently becoming a wrong number. A missing value is an
error unless its column declares what to do with it (``missing: impute`` or
``missing: indicator``); a row is never dropped silently. A category label makes
a classification table, a float or int label a regression table.
``docs/schema.md`` documents the format; ``consortium schema infer`` drafts one.

Example schema file::

    version: 1
    label: outcome
    columns:
      - {name: age, type: float, min: 0, max: 120}
      - {name: sex, type: category, values: ["F", "M"]}
      - {name: bmi, type: float, missing: impute}
      - {name: smoker, type: category, values: ["no", "yes"], missing: indicator}
      - {name: outcome, type: category, values: ["no-event", "event"]}

It reads into the features ``age, sex=F, sex=M, bmi, smoker=no, smoker=yes,
smoker=missing``; ``bmi``, ``smoker=no`` and ``smoker=yes`` may hold NaN.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Literal

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from consortium.data.datasets import Table
from consortium.runs import write_atomic
from consortium.errors import ConfigError, DataError, SchemaError, SchemaMismatchError
from consortium.yamlfile import duplicates, parse_yaml, read_text, validate


#: The cells that mean "missing" in a column that declares ``missing: impute`` or ``indicator`` (after
#: stripping spaces; case-sensitive). A category value declared in the schema is always that value.
MISSING_SPELLINGS: frozenset[str] = frozenset({"", "NA", "N/A", "NaN", "nan", "NULL", "null"})

#: The suffix of a ``missing: indicator`` column's extra feature: ``smoker=missing``.
INDICATOR_SUFFIX = "=missing"


class ColumnSpec(BaseModel):
    """One column: its name, its type, its allowed values or bounds, and what a missing cell means."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1)
    type: Literal["float", "int", "category"]
    values: list[str] | None = None  # required for category columns, in the order used for encoding
    min: float | None = None  # optional bounds, float and int columns only
    max: float | None = None
    # error: a missing cell is an error; impute: NaN in the column's features; indicator: that, and a 0/1 feature
    missing: Literal["error", "impute", "indicator"] = "error"

    @model_validator(mode="after")
    def _consistent(self) -> ColumnSpec:
        if self.type == "category":
            if not self.values:
                raise ValueError(f"category column '{self.name}' needs a non-empty list of values")
            if len(set(self.values)) != len(self.values):
                raise ValueError(f"category column '{self.name}' lists a value twice: {self.values}")
            if self.missing == "indicator" and "missing" in self.values:
                raise ValueError(
                    f"category column '{self.name}' has a value 'missing', which clashes with its missing-indicator "
                    f"feature '{self.name}{INDICATOR_SUFFIX}': rename the value or use missing: impute"
                )
            if self.min is not None or self.max is not None:
                raise ValueError(f"category column '{self.name}' cannot have min or max; remove them")
        else:
            if self.values is not None:
                raise ValueError(f"{self.type} column '{self.name}' cannot have values; only category columns do")
            for bound in (self.min, self.max):
                if bound is not None and not math.isfinite(bound):
                    raise ValueError(f"column '{self.name}' has a bound that is not a finite number")
            if self.min is not None and self.max is not None and self.min > self.max:
                raise ValueError(f"column '{self.name}' has min {self.min} greater than max {self.max}")
        return self


class DataSchema(BaseModel):
    """The declared layout of a site's CSV: its columns and which one is the label."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    version: Literal[1] = 1
    label: str
    columns: list[ColumnSpec]

    @field_validator("columns")
    @classmethod
    def _unique(cls, columns: list[ColumnSpec]) -> list[ColumnSpec]:
        dupes = duplicates([c.name for c in columns])
        if dupes:
            raise ValueError(f"column names must be unique, but {dupes} appear more than once")
        if len(columns) < 2:
            raise ValueError("the schema needs the label column and at least one feature column")
        return columns

    @model_validator(mode="after")
    def _label(self) -> DataSchema:
        # Only label checks live here: load_schema reports model-level errors against the 'label' key.
        names = [c.name for c in self.columns]
        label = next((c for c in self.columns if c.name == self.label), None)
        if label is None:
            raise ValueError(f"label '{self.label}' is not one of the columns {names}")
        if label.missing != "error":
            raise ValueError(
                f"label column '{self.label}' cannot be missing: remove `missing: {label.missing}` from it "
                "(leave rows without a label out of the export)"
            )
        if label.type == "category" and len(label.values or ()) < 2:
            raise ValueError(f"label column '{self.label}' must declare at least 2 values (the classes)")
        return self

    @property
    def label_column(self) -> ColumnSpec:
        return next(c for c in self.columns if c.name == self.label)

    @property
    def is_regression(self) -> bool:
        """True when the label is a float or int column: the table's target is a value, not a class."""
        return self.label_column.type != "category"

    def classes(self) -> tuple[str, ...]:
        """The label's values (the classes); () for a regression label."""
        return tuple(self.label_column.values or ()) if not self.is_regression else ()

    def _features_of(self, col: ColumnSpec) -> list[str]:
        """The features column ``col`` encodes into, without its missing indicator."""
        if col.type == "category":
            return [f"{col.name}={v}" for v in col.values or ()]
        return [col.name]

    def feature_names(self) -> tuple[str, ...]:
        """Names of the encoded features, in schema order: ``sex=F, sex=M`` for categories, else the column name;
        a ``missing: indicator`` column's 0/1 feature ``name=missing`` follows its own features."""
        out: list[str] = []
        for col in self.columns:
            if col.name == self.label:
                continue
            out.extend(self._features_of(col))
            if col.missing == "indicator":
                out.append(col.name + INDICATOR_SUFFIX)
        return tuple(out)

    def imputed_features(self) -> tuple[str, ...]:
        """The features that may hold NaN: every feature of a ``missing: impute`` or ``indicator`` column
        (not the indicator itself, which is always 0 or 1)."""
        return tuple(f for c in self.columns if c.name != self.label and c.missing != "error" for f in self._features_of(c))

    def fingerprint(self) -> str:
        """SHA-256 (hex) of the schema's canonical JSON: identical schemas, identical fingerprints.

        ``missing`` enters only where it is not the default ``error``, so a schema that declares no
        missing values keeps the fingerprint it had before the key existed."""
        canonical = json.dumps(_plain(self), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def _plain(schema: DataSchema, *, exclude_none: bool = False) -> dict:
    """The schema as plain data, leaving out each column's ``missing`` where it is the default ``error``."""
    data = schema.model_dump(mode="json", exclude_none=exclude_none)
    for col in data["columns"]:
        if col.get("missing") == "error":
            del col["missing"]
    return data


# ---------------------------------------------------------------------------
# Loading a schema


def load_schema(path: str | Path) -> DataSchema:
    """Read and validate a schema file; every problem is a :class:`SchemaError` naming the file and line."""
    source = str(path)
    tree, raw = parse_yaml(read_text(path, SchemaError, "schema file"), source, SchemaError)
    if not isinstance(raw, dict):
        found = "nothing" if raw is None else f"a {type(raw).__name__}"
        raise SchemaError(f"{source}: a schema must be a mapping with 'label' and 'columns', found {found}")
    # DataSchema's model-level checks are all about the label.
    return validate(DataSchema, raw, tree, source, SchemaError, "fix the schema", default_loc=("label",))


# ---------------------------------------------------------------------------
# Reading a CSV


_FLOAT32_MAX = float(np.finfo(np.float32).max)


class _BadCell(ValueError):
    """A cell that does not fit its column; the message says why."""


def _cell_parser(col: ColumnSpec) -> Callable[[str], float | int]:
    """A function from cell text to its value (a float, an int, or a category index)."""

    def check_bounds(v: float, s: str) -> None:
        if abs(v) > _FLOAT32_MAX:  # the table is float32: the value would become infinite
            raise _BadCell(f"'{s}' is beyond the float32 range of +-{_FLOAT32_MAX:.3g} that training uses")
        if (col.min is not None and v < col.min) or (col.max is not None and v > col.max):
            low = "-inf" if col.min is None else f"{col.min:g}"
            high = "inf" if col.max is None else f"{col.max:g}"
            raise _BadCell(f"{v:g} is outside the allowed range [{low}, {high}]")

    if col.type == "float":

        def parse_float(s: str) -> float:
            try:
                v = float(s)
            except ValueError:
                raise _BadCell(f"'{s}' is not a float") from None
            if not math.isfinite(v):
                raise _BadCell(f"'{s}' is not a finite float")
            check_bounds(v, s)
            return v

        return parse_float

    if col.type == "int":

        def parse_int(s: str) -> int:
            try:
                v = int(s)
            except ValueError:
                try:
                    f = float(s)  # accept "3.0", as spreadsheets often write integers
                except ValueError:
                    raise _BadCell(f"'{s}' is not an int") from None
                if not f.is_integer():
                    raise _BadCell(f"'{s}' is not an int") from None
                v = int(f)
            check_bounds(v, s)
            return v

        return parse_int

    index = {v: i for i, v in enumerate(col.values or ())}

    def parse_category(s: str) -> int:
        if s not in index:
            raise _BadCell(f"'{s}' is not one of {list(index)}")
        return index[s]

    return parse_category


def _row_bound(path: Path, n_columns: int) -> int:
    """An upper bound on the data rows of ``path``, so that the arrays are allocated once: its line count,
    and no more rows than its bytes can hold (a row is ``n_columns`` non-empty cells and a comma between each)."""
    lines, size = 1, 0
    with path.open("rb") as raw:
        while block := raw.read(1 << 20):
            lines += max(block.count(b"\n"), block.count(b"\r"))
            size += len(block)
    return max(1, min(lines, (size + 1) // (2 * n_columns)))


def _grown(a: np.ndarray) -> np.ndarray:
    """``a`` with twice the rows, the first ones copied: the file grew after it was counted."""
    bigger = np.empty((2 * len(a), *a.shape[1:]), dtype=a.dtype)
    bigger[: len(a)] = a
    return bigger


def read_csv(path: str | Path, schema: DataSchema) -> Table:
    """Read a site's CSV into a :class:`Table`, checking every cell against ``schema``.

    The header must hold exactly the schema's columns, in any order. Category
    features are one-hot encoded in the order of their declared values; a
    category label becomes class indices into its values, which become the
    table's classes, and a float or int label a float32 regression target
    (classes ``()``). A missing cell (one of :data:`MISSING_SPELLINGS`) is an
    error naming the fix unless its column declares ``missing: impute`` (NaN in
    all of the column's features, which the table lists in ``imputed``) or
    ``missing: indicator`` (the same, and 1 in its ``name=missing`` feature).
    The file is streamed row by row into arrays allocated once from its line count,
    so reading it holds little more than the table itself.
    """
    p = Path(path)
    try:
        bound = _row_bound(p, len(schema.columns))
        handle = p.open(newline="", encoding="utf-8-sig")
    except FileNotFoundError:
        raise DataError(f"data file '{p}' does not exist: check the path") from None
    except OSError as exc:
        raise DataError(f"cannot read data file '{p}' ({exc}): check its permissions") from None

    n_features = len(schema.feature_names())
    X = np.empty((bound, n_features), dtype=np.float32)
    y = np.empty(bound, dtype=np.float32 if schema.is_regression else np.int64)
    n = 0
    with handle:
        reader = csv.reader(handle)
        try:
            header = next(reader, None)
            if header is None:
                raise SchemaError(f"{p} is empty: it needs a header row naming the columns and at least one data row")
            header = [h.strip() for h in header]
            for name in header:
                if header.count(name) > 1:
                    raise SchemaError(f"{p} line 1: column '{name}' appears more than once in the header")
            for col in schema.columns:
                if col.name not in header:
                    raise SchemaError(f"{p} line 1: column '{col.name}' is missing from the header; add it or fix the schema")
            declared = {c.name for c in schema.columns}
            for name in header:
                if name not in declared:
                    raise SchemaError(
                        f"{p} line 1: column '{name}' is not in the schema; remove it from the file or declare it"
                    )
            plan = _read_plan(schema, header)
            zeros = [0.0] * n_features

            for row in reader:
                line = reader.line_num
                if not row or (len(row) == 1 and not row[0].strip()):
                    continue  # a blank line
                if len(row) != len(header):
                    raise SchemaError(
                        f"{p} line {line}: expected {len(header)} cells but found {len(row)}; fix the row"
                    )
                x = zeros.copy()
                label: float | int = 0
                for name, pos, parse, at, one_hot, na, missing in plan:
                    text = row[pos].strip()
                    if text in na:
                        if missing is None:
                            raise SchemaError(f"{p} line {line}, column '{name}': {_missing_problem(text, name, at)}")
                        x[at : at + len(missing)] = missing  # NaN in the column's features, then its indicator
                        continue
                    try:
                        value = parse(text)
                    except _BadCell as exc:
                        raise SchemaError(
                            f"{p} line {line}, column '{name}': {exc}; fix the row or the schema"
                        ) from None
                    if at is None:
                        label = value
                    elif one_hot:
                        x[at + int(value)] = 1.0
                    else:
                        x[at] = value
                if n == len(y):
                    X, y = _grown(X), _grown(y)
                X[n] = x
                y[n] = label
                n += 1
        except csv.Error as exc:
            raise SchemaError(f"{p} line {reader.line_num}: not valid CSV ({exc}); fix the file") from None
        except UnicodeDecodeError:
            raise DataError(f"{p} is not UTF-8 text: save it as UTF-8 CSV") from None

    if n == 0:
        raise SchemaError(f"{p} has a header but no data rows: a site needs at least one row")
    return Table(
        X=X[:n],  # the leading rows: contiguous, no copy; rows never written were never touched
        y=y[:n],
        feature_names=schema.feature_names(),
        classes=schema.classes(),
        imputed=schema.imputed_features(),
    )


#: Per column of a read: its name, position in the row, parser, where its value goes (None: the label),
#: whether it is one-hot, the cells that mean missing, and what a missing cell writes (None: an error).
_Step = tuple[str, int, Callable[[str], float | int], int | None, bool, frozenset[str], list[float] | None]


def _read_plan(schema: DataSchema, header: list[str]) -> list[_Step]:
    plan: list[_Step] = []
    j = 0
    for col in schema.columns:
        at = None if col.name == schema.label else j
        width = len(col.values or ()) if col.type == "category" else 1
        declared = set(col.values or ()) - {""}  # a declared category value is that value, never "missing"
        fill = None if col.missing == "error" else [math.nan] * width + [1.0] * (col.missing == "indicator")
        plan.append((col.name, header.index(col.name), _cell_parser(col), at, col.type == "category",
                     MISSING_SPELLINGS - declared, fill))
        if at is not None:
            j += width + (col.missing == "indicator")
    return plan


def _missing_problem(text: str, name: str, at: int | None) -> str:
    """What is wrong with a missing cell in a column that allows none, and the fix."""
    what = "the cell is empty" if not text else f"'{text}' marks a missing value"
    if at is None:
        return f"{what}; a label can never be missing: fill it, or leave the row out of the export"
    return (f"{what}; fill it, or declare `missing: impute` or `missing: indicator` for column '{name}' "
            "in the schema")


def layout_table(schema: DataSchema) -> Table:
    """A table with no rows and the layout ``read_csv`` gives under ``schema``: what a coordinator,
    which holds no data, needs to know of it (feature names, classes or a regression target, imputed features)."""
    names = schema.feature_names()
    return Table(
        X=np.zeros((0, len(names)), dtype=np.float32),
        y=np.zeros(0, dtype=np.float32 if schema.is_regression else np.int64),
        feature_names=names, classes=schema.classes(), imputed=schema.imputed_features(),
    )


def schema_of(table: Table, *, label: str = "label") -> DataSchema:
    """The schema of ``table`` written by ``write_csv``: one float column per feature (``missing: impute``
    for the table's imputed features), then the label (a category of its classes, or float for regression)."""
    if label in table.feature_names:
        raise SchemaError(f"'{label}' names a feature already: choose another label column name")
    imputed = set(table.imputed)
    target = (ColumnSpec(name=label, type="float") if table.is_regression
              else ColumnSpec(name=label, type="category", values=list(table.classes)))
    return DataSchema(
        label=label,
        columns=[*(ColumnSpec(name=f, type="float", missing="impute" if f in imputed else "error")
                   for f in table.feature_names), target],
    )


def write_csv(table: Table, path: Path, *, label: str = "label") -> None:
    """Write ``table`` as the CSV ``read_csv(path, schema_of(table, label=label))`` reads back exactly
    (floats in shortest round-trip form, a NaN of an imputed feature as an empty cell); atomically, like
    every file a run writes."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow([*table.feature_names, label])
    regression = table.is_regression
    for x, y in zip(table.X.tolist(), table.y.tolist()):
        cells = ["" if v != v else repr(v) for v in x]  # v != v: NaN, which only imputed features hold
        writer.writerow([*cells, repr(y) if regression else table.classes[y]])
    write_atomic(Path(path), buf.getvalue().encode("utf-8"))


def write_schema(schema: DataSchema, path: Path) -> None:
    """Write ``schema`` as the YAML ``load_schema`` reads (``missing`` only where it is not ``error``)."""
    text = yaml.safe_dump(_plain(schema, exclude_none=True), sort_keys=False)
    write_atomic(Path(path), text.encode("utf-8"))


# ---------------------------------------------------------------------------
# Comparing sites


def _column_difference(a: ColumnSpec, b: ColumnSpec) -> str:
    for field in ("type", "values", "min", "max", "missing"):
        va, vb = getattr(a, field), getattr(b, field)
        if va != vb:
            return f"{field} {va!r} vs {vb!r}"
    return "the declarations differ"


def _schema_difference(first: str, a: DataSchema, site: str, b: DataSchema) -> str:
    """Describe the first way ``b`` differs from ``a``, naming the column."""
    if a.label != b.label:
        return f"the label column: '{a.label}' vs '{b.label}'"
    cols_a = {c.name: c for c in a.columns}
    cols_b = {c.name: c for c in b.columns}
    for name, col in cols_a.items():
        if name not in cols_b:
            return f"column '{name}': declared by '{first}' but missing at '{site}'"
        if cols_b[name] != col:
            return f"column '{name}': {_column_difference(col, cols_b[name])}"
    for name in cols_b:
        if name not in cols_a:
            return f"column '{name}': declared by '{site}' but missing at '{first}'"
    for i, (ca, cb) in enumerate(zip(a.columns, b.columns)):
        if ca.name != cb.name:
            return f"column order: position {i + 1} is '{ca.name}' vs '{cb.name}'"
    return f"version {a.version} vs {b.version}"


def check_schemas(schemas: Mapping[str, DataSchema]) -> DataSchema:
    """Check that every site declares the same schema, and return it.

    Sites are compared with the first one; the first that differs raises
    :class:`SchemaMismatchError` naming both sites and the first differing column.
    """
    if not schemas:
        raise ConfigError("check_schemas needs at least one site's schema")
    items = list(schemas.items())
    first, common = items[0]
    for site, schema in items[1:]:
        if schema != common:
            what = _schema_difference(first, common, site, schema)
            raise SchemaMismatchError(
                f"site '{site}' disagrees with '{first}' on {what}; every site must declare the same schema"
            )
    return common
