"""A site's own data: a CSV file read against a declared schema (YAML).

In a real consortium every institution exports its data to CSV and declares
what each column holds. The schema is the contract that lets several sites
train one model: the same columns, the same types, the same category values in
the same order, hence the same feature vector. Sites compare schemas before
training (:func:`check_schemas`, :meth:`DataSchema.fingerprint`), and every row
is checked against the schema on load, so a bad cell is reported by file, line
and column instead of silently becoming a wrong number.

Example schema file::

    version: 1
    label: outcome
    columns:
      - {name: age, type: float, min: 0, max: 120}
      - {name: sex, type: category, values: [F, M]}
      - {name: outcome, type: category, values: [no-event, event]}
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


class ColumnSpec(BaseModel):
    """One column: its name, its type, and its allowed values or bounds."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1)
    type: Literal["float", "int", "category"]
    values: list[str] | None = None  # required for category columns, in the order used for encoding
    min: float | None = None  # optional bounds, float and int columns only
    max: float | None = None

    @model_validator(mode="after")
    def _consistent(self) -> ColumnSpec:
        if self.type == "category":
            if not self.values:
                raise ValueError(f"category column '{self.name}' needs a non-empty list of values")
            if len(set(self.values)) != len(self.values):
                raise ValueError(f"category column '{self.name}' lists a value twice: {self.values}")
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
        if label.type != "category":
            raise ValueError(f"label column '{self.label}' must be a category column, not {label.type}")
        if len(label.values or ()) < 2:
            raise ValueError(f"label column '{self.label}' must declare at least 2 values (the classes)")
        return self

    def feature_names(self) -> tuple[str, ...]:
        """Names of the encoded features, in schema order: ``sex=F, sex=M`` for categories, else the column name."""
        out: list[str] = []
        for col in self.columns:
            if col.name == self.label:
                continue
            if col.type == "category":
                out.extend(f"{col.name}={v}" for v in col.values or ())
            else:
                out.append(col.name)
        return tuple(out)

    def fingerprint(self) -> str:
        """SHA-256 (hex) of the schema's canonical JSON: identical schemas, identical fingerprints."""
        canonical = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


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
    features are one-hot encoded in the order of their declared values; the
    label becomes class indices into its values, which become the table's classes.
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
    y = np.empty(bound, dtype=np.int64)
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
            # Per column: its name, position in the row, parser, and where its value goes (None: the label).
            plan: list[tuple[str, int, Callable[[str], float | int], int | None, bool]] = []
            j = 0
            for col in schema.columns:
                at = None if col.name == schema.label else j
                plan.append((col.name, header.index(col.name), _cell_parser(col), at, col.type == "category"))
                if at is not None:
                    j += len(col.values or ()) if col.type == "category" else 1
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
                label = 0
                for name, pos, parse, at, one_hot in plan:
                    text = row[pos].strip()
                    try:
                        if not text:
                            raise _BadCell("the cell is empty")
                        value = parse(text)
                    except _BadCell as exc:
                        raise SchemaError(
                            f"{p} line {line}, column '{name}': {exc}; fix the row or the schema"
                        ) from None
                    if at is None:
                        label = int(value)
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
    label_col = next(c for c in schema.columns if c.name == schema.label)
    return Table(
        X=X[:n],  # the leading rows: contiguous, no copy; rows never written were never touched
        y=y[:n],
        feature_names=schema.feature_names(),
        classes=tuple(label_col.values or ()),
    )


def layout_table(schema: DataSchema) -> Table:
    """A table with no rows and the layout ``read_csv`` gives under ``schema``: what a coordinator,
    which holds no data, needs to know of it (feature names and classes)."""
    label = next(c for c in schema.columns if c.name == schema.label)
    names = schema.feature_names()
    return Table(
        X=np.zeros((0, len(names)), dtype=np.float32), y=np.zeros(0, dtype=np.int64),
        feature_names=names, classes=tuple(label.values or ()),
    )


def schema_of(table: Table, *, label: str = "label") -> DataSchema:
    """The schema of ``table`` written by ``write_csv``: one float column per feature, then the label."""
    if label in table.feature_names:
        raise SchemaError(f"'{label}' names a feature already: choose another label column name")
    return DataSchema(
        label=label,
        columns=[*(ColumnSpec(name=f, type="float") for f in table.feature_names),
                 ColumnSpec(name=label, type="category", values=list(table.classes))],
    )


def write_csv(table: Table, path: Path, *, label: str = "label") -> None:
    """Write ``table`` as the CSV ``read_csv(path, schema_of(table, label=label))`` reads back exactly
    (floats in shortest round-trip form); atomically, like every file a run writes."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow([*table.feature_names, label])
    for x, y in zip(table.X.tolist(), table.y.tolist()):
        writer.writerow([*map(repr, x), table.classes[y]])
    write_atomic(Path(path), buf.getvalue().encode("utf-8"))


def write_schema(schema: DataSchema, path: Path) -> None:
    """Write ``schema`` as the YAML ``load_schema`` reads."""
    text = yaml.safe_dump(schema.model_dump(mode="json", exclude_none=True), sort_keys=False)
    write_atomic(Path(path), text.encode("utf-8"))


# ---------------------------------------------------------------------------
# Comparing sites


def _column_difference(a: ColumnSpec, b: ColumnSpec) -> str:
    for field in ("type", "values", "min", "max"):
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
