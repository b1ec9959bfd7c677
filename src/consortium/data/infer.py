"""A first draft of a site's schema, read off its CSV: what ``consortium schema infer`` writes.

The draft is a starting point for a person to check, never a contract by
itself: it proposes a type per column, the values of each category column,
``missing: impute`` for a column with missing cells, and the label, with a
comment line wherever a choice was a guess. It always loads with
:func:`~consortium.data.schema.load_schema` and reads the same CSV with
:func:`~consortium.data.schema.read_csv`, because every cell is judged by the
parsers ``read_csv`` itself uses.

The rules (``docs/schema.md`` repeats them):

- a column whose every non-missing cell is an int (``3``, ``-2``, ``3.0``) is
  ``int``; else one whose every such cell is a finite float is ``float``; else
  ``category``, its values the distinct cells, sorted (so that two sites holding
  the same values draft the same list: the order sets the one-hot encoding);
- a cell is missing when it is one of ``MISSING_SPELLINGS`` (after stripping
  spaces); a feature column with a missing cell gets ``missing: impute``; a
  column with no value at all is a ``float`` column that is all missing;
- the label is the named column, else the last one. A label that is not
  numeric, or numeric with 2 to ``LABEL_CLASSES`` distinct integer values, is a
  category (numbers sorted by value), provided the rows hold each value twice
  on average: classification; any other numeric label is a regression target.
  A label can never be missing;
- no ``min``/``max`` is written: a bound states what is plausible, which the
  sites must agree on (the data's own extremes differ by site, and each is one
  person's value), so bounds are added by hand.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from consortium.data.schema import MISSING_SPELLINGS, ColumnSpec, DataSchema, _BadCell, _cell_parser
from consortium.errors import DataError, SchemaError
from consortium.yamlfile import parse_yaml, validate

#: A numeric label with at most this many distinct integer values is proposed as classes.
LABEL_CLASSES = 10

#: A category feature with more distinct values than this gets a comment: an identifier or free text?
MANY_VALUES = 50

_INT = _cell_parser(ColumnSpec(name="int", type="int"))
_FLOAT = _cell_parser(ColumnSpec(name="float", type="float"))


@dataclass
class _Seen:
    """What one pass saw of a column."""

    name: str
    ints: bool = True
    floats: bool = True
    present: int = 0  # non-missing cells
    missing: int = 0
    first_missing: int = 0  # the line of the first missing cell
    numbers: dict[str, float] = field(default_factory=dict)  # distinct numeric cells, up to LABEL_CLASSES + 1
    values: set[str] = field(default_factory=set)  # distinct cells of a category column (second pass)

    @property
    def numeric(self) -> bool:
        return self.present > 0 and (self.ints or self.floats)


@dataclass(frozen=True)
class Draft:
    """A drafted schema: the object, the commented YAML text that loads as it, and the rows it was read from."""

    schema: DataSchema
    text: str
    rows: int


def _rows(path: Path) -> Iterator[tuple[int, list[str]]]:
    """(line, stripped cells) of each data row after the header; the header is the first item (line 1)."""
    try:
        handle = path.open(newline="", encoding="utf-8-sig")
    except FileNotFoundError:
        raise DataError(f"data file '{path}' does not exist: check the path") from None
    except OSError as exc:
        raise DataError(f"cannot read data file '{path}' ({exc}): check its permissions") from None
    with handle:
        reader = csv.reader(handle)
        header = True
        try:
            for row in reader:
                if not header and (not row or (len(row) == 1 and not row[0].strip())):
                    continue  # a blank line, skipped as read_csv skips it
                header = False
                yield reader.line_num, [c.strip() for c in row]
        except csv.Error as exc:
            raise SchemaError(f"{path} line {reader.line_num}: not valid CSV ({exc}); fix the file") from None
        except UnicodeDecodeError:
            raise DataError(f"{path} is not UTF-8 text: save it as UTF-8 CSV") from None


def _header(path: Path, rows: Iterator[tuple[int, list[str]]]) -> list[str]:
    first = next(rows, None)
    if first is None:
        raise SchemaError(f"{path} is empty: it needs a header row naming the columns and at least one data row")
    header = first[1]
    for i, name in enumerate(header):
        if not name:
            raise SchemaError(f"{path} line 1: column {i + 1} of the header has no name; name it in the file")
        if header.count(name) > 1:
            raise SchemaError(f"{path} line 1: column '{name}' appears more than once in the header; rename one")
    if len(header) < 2:
        raise SchemaError(
            f"{path} line 1: the header names {len(header)} column(s); a schema needs a label and at least one feature"
        )
    return header


def _cells(path: Path, header: list[str], rows: Iterator[tuple[int, list[str]]]) -> Iterator[tuple[int, list[str]]]:
    for line, row in rows:
        if len(row) != len(header):
            raise SchemaError(f"{path} line {line}: expected {len(header)} cells but found {len(row)}; fix the row")
        yield line, row


def _fits(parse: object, text: str) -> bool:
    try:
        parse(text)  # type: ignore[operator]
    except _BadCell:
        return False
    return True


def infer_schema(path: str | Path, label: str | None = None) -> Draft:
    """Draft the schema of the CSV at ``path`` (see the module's rules); ``label`` names the label column
    (default: the last). Every problem is one :class:`DataError` naming the file and the fix."""
    p = Path(path)
    rows = _rows(p)
    header = _header(p, rows)
    if label is None:
        label = header[-1]
    elif label not in header:
        raise SchemaError(
            f"--label '{label}' is not a column of {p} (its columns: {', '.join(header)}): name one of them"
        )
    seen = [_Seen(name) for name in header]
    n = 0
    for line, row in _cells(p, header, rows):
        n += 1
        for s, text in zip(seen, row):
            if text in MISSING_SPELLINGS:
                if not s.missing:
                    s.first_missing = line
                s.missing += 1
                continue
            s.present += 1
            if s.ints and not _fits(_INT, text):
                s.ints = False
            if s.floats and not _fits(_FLOAT, text):
                s.floats = False
            if (s.ints or s.floats) and len(s.numbers) <= LABEL_CLASSES and text not in s.numbers:
                s.numbers[text] = float(text)
    if n == 0:
        raise SchemaError(f"{p} has a header but no data rows: a schema is drafted from at least one row")

    target = seen[header.index(label)]
    if target.missing:
        raise SchemaError(
            f"{p} line {target.first_missing}: the label column '{label}' has {target.missing} missing cell(s), and a "
            "label can never be missing: leave those rows out of the export, or name another column with --label"
        )
    categories = [s for s in seen if not s.numeric and s.present]
    if categories:  # a second pass collects the values of the category columns
        wanted = [header.index(s.name) for s in categories]
        rows = _rows(p)
        _header(p, rows)
        for _, row in _cells(p, header, rows):
            for s, j in zip(categories, wanted):
                if row[j] not in MISSING_SPELLINGS:
                    s.values.add(row[j])

    columns: list[tuple[ColumnSpec, str | None]] = [
        _label_column(p, target) if s is target else _feature_column(s, n) for s in seen
    ]
    schema = DataSchema(label=label, columns=[c for c, _ in columns])
    text = _render(p, n, schema, [note for _, note in columns])
    tree, raw = parse_yaml(text, str(p), SchemaError)
    drafted = validate(DataSchema, raw, tree, "the drafted schema", SchemaError, "report this", default_loc=("label",))
    if drafted != schema:  # the text must say what the object says
        raise SchemaError(f"the schema drafted from {p} does not read back as drafted: report this")
    return Draft(schema=drafted, text=text, rows=n)


def _label_column(path: Path, s: _Seen) -> tuple[ColumnSpec, str | None]:
    if not s.numeric:
        if len(s.values) < 2:
            raise SchemaError(
                f"{path}: the label column '{s.name}' holds one value only ({next(iter(s.values))!r}); a label needs "
                "two classes or numbers: name another column with --label"
            )
        note = f"label '{s.name}': {len(s.values)} classes (a classification target)"
        return ColumnSpec(name=s.name, type="category", values=sorted(s.values)), note
    distinct = set(s.numbers.values())
    few = 2 <= len(s.numbers) <= LABEL_CLASSES and 2 * len(s.numbers) <= s.present  # each seen twice on average
    if s.ints and few and len(distinct) == len(s.numbers):
        values = sorted(s.numbers, key=lambda v: (s.numbers[v], v))
        note = (f"label '{s.name}': {len(values)} distinct whole numbers, read as classes; "
                "for a regression target write {type: float} instead")
        return ColumnSpec(name=s.name, type="category", values=values), note
    kind = "int" if s.ints else "float"
    note = (f"label '{s.name}': numbers, read as a regression target; "
            "to classify, make it {type: category, values: [...]} listing its values")
    return ColumnSpec(name=s.name, type=kind), note


def _feature_column(s: _Seen, n: int) -> tuple[ColumnSpec, str | None]:
    if not s.present:
        note = (f"'{s.name}': every cell is missing, so it carries nothing to learn from; "
                "consider leaving it out of the export")
        return ColumnSpec(name=s.name, type="float", missing="impute"), note
    missing = "impute" if s.missing else "error"
    notes = []
    if s.missing:
        notes.append(f"'{s.name}': {s.missing} of {n} cells missing: impute proposed "
                     "(indicator also adds a 0/1 feature; error refuses such rows)")
    if s.numeric:
        spec = ColumnSpec(name=s.name, type="int" if s.ints else "float", missing=missing)
    else:
        spec = ColumnSpec(name=s.name, type="category", values=sorted(s.values), missing=missing)
        if len(s.values) > MANY_VALUES:
            notes.append(f"'{s.name}': {len(s.values)} distinct values: an identifier or free text? "
                         "such a column does not generalise; consider leaving it out of the export")
    return spec, "\n# ".join(notes) or None


def _render(path: Path, n: int, schema: DataSchema, notes: list[str | None]) -> str:
    """The schema as YAML, one flow mapping per column, every name and value a quoted string."""
    q = lambda s: json.dumps(s, ensure_ascii=False)  # noqa: E731 (a JSON string is a YAML double-quoted scalar)
    lines = [
        f"# Drafted by `consortium schema infer` from {path.name} ({n} rows). Check every column, add bounds",
        "# (min/max) where they are known, then agree it with the other sites: they must declare the same",
        "# schema. docs/schema.md documents every key.",
        "version: 1",
        f"label: {q(schema.label)}",
        "columns:",
    ]
    for col, note in zip(schema.columns, notes):
        if note:
            lines.append(f"  # {note}".replace("\n# ", "\n  # "))
        parts = [f"name: {q(col.name)}", f"type: {col.type}"]
        if col.values is not None:
            parts.append(f"values: [{', '.join(q(v) for v in col.values)}]")
        if col.missing != "error":
            parts.append(f"missing: {col.missing}")
        lines.append("  - {" + ", ".join(parts) + "}")
    return "\n".join(lines) + "\n"


__all__ = ["LABEL_CLASSES", "MANY_VALUES", "Draft", "infer_schema"]
