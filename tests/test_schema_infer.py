"""``consortium schema infer``: a drafted schema loads, reads the CSV it was drafted from, and says what it guessed."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from consortium.data import load_schema, read_csv, write_csv
from consortium.data.datasets import load_builtin
from consortium.data.infer import infer_schema
from consortium.errors import DataError, SchemaError

REPO = Path(__file__).resolve().parents[1]
CONSORTIUM = REPO / ".venv" / "bin" / "consortium"

CSV = """\
age,sex,bmi,smoker,site code,outcome
54,F,31.2,no,7,1
61,M,,yes,3,0
33,M,NA,,12,1
47,F,24.5,yes,7,0
"""


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    exe = str(CONSORTIUM) if CONSORTIUM.exists() else "consortium"
    return subprocess.run([exe, *args], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, "COLUMNS": "200"}, timeout=120)


def test_the_cli_drafts_a_schema_that_reads_the_csv(tmp_path: Path) -> None:
    (tmp_path / "site.csv").write_text(CSV)
    proc = cli("schema", "infer", "site.csv", "--out", "schema.yaml", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "wrote schema.yaml" in proc.stdout and "label 'outcome' (2 classes)" in proc.stdout
    text = (tmp_path / "schema.yaml").read_text()
    assert '- {name: "sex", type: category, values: ["F", "M"]}' in text
    assert '- {name: "outcome", type: category, values: ["0", "1"]}' in text  # few whole numbers: classes, by value
    assert "# 'bmi': 2 of 4 cells missing: impute proposed" in text
    assert '- {name: "bmi", type: float, missing: impute}' in text
    assert '- {name: "smoker", type: category, values: ["no", "yes"], missing: impute}' in text
    assert '- {name: "site code", type: int}' in text and "min:" not in text and "max:" not in text
    schema = load_schema(tmp_path / "schema.yaml")
    table = read_csv(tmp_path / "site.csv", schema)
    assert table.feature_names == ("age", "sex=F", "sex=M", "bmi", "smoker=no", "smoker=yes", "site code")
    assert table.imputed == ("bmi", "smoker=no", "smoker=yes") and table.classes == ("0", "1")
    assert np.isnan(table.X[1, 3]) and np.isnan(table.X[2, 3:6]).all() and table.y.tolist() == [1, 0, 1, 0]

    # Printed without --out, with another label: the YAML alone on stdout.
    proc = cli("schema", "infer", "site.csv", "--label", "age", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("# Drafted by `consortium schema infer` from site.csv (4 rows)")
    assert "label: \"age\"" in proc.stdout and "a regression target" in proc.stderr
    (tmp_path / "age.yaml").write_text(proc.stdout)
    assert read_csv(tmp_path / "site.csv", load_schema(tmp_path / "age.yaml")).is_regression


@pytest.mark.parametrize(
    "args, expected",
    [
        (("nope.csv",), "data file 'nope.csv' does not exist: check the path"),
        (("site.csv", "--label", "zip"), "--label 'zip' is not a column of site.csv (its columns: age, sex, bmi"),
        (("site.csv", "--label", "bmi"), "site.csv line 3: the label column 'bmi' has 2 missing cell(s)"),
        (("header.csv",), "header.csv has a header but no data rows"),
        (("site.csv", "--out", "taken.yaml"), "taken.yaml already exists: edit it, or remove it first"),
    ],
)
def test_cli_errors_are_one_line_with_exit_code_2(tmp_path: Path, args: tuple[str, ...], expected: str) -> None:
    (tmp_path / "site.csv").write_text(CSV)
    (tmp_path / "header.csv").write_text("a,b\n")
    (tmp_path / "taken.yaml").write_text("keep me\n")
    proc = cli("schema", "infer", *args, cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.startswith("error: ") and expected in proc.stderr, proc.stderr
    assert (tmp_path / "taken.yaml").read_text() == "keep me\n"


def test_a_regression_table_drafts_its_own_schema(tmp_path: Path) -> None:
    table = load_builtin("diabetes")
    write_csv(table, tmp_path / "diabetes.csv", label="progression")
    draft = infer_schema(tmp_path / "diabetes.csv")
    assert draft.rows == 442 and draft.schema.is_regression and draft.schema.label == "progression"
    types = {c.name: c.type for c in draft.schema.columns}
    # Whole numbers ("59.0" too) draft as int; 214 distinct whole-number targets are a regression target.
    assert (types["age"], types["bmi"], types["progression"]) == ("int", "float", "int")
    back = read_csv(tmp_path / "diabetes.csv", draft.schema)
    assert np.array_equal(back.X, table.X) and np.array_equal(back.y, table.y)


def test_the_rules_for_awkward_columns(tmp_path: Path) -> None:
    rows = ["id,empty,code,score,flag,label"]
    for i in range(60):  # 60 distinct text ids, a column with no value, numbers beyond float32, a 0/1 int
        rows.append(f"p{i},,1e39,{i * 0.5},{i % 2},{'yes' if i % 3 else 'no'}")
    path = tmp_path / "t.csv"
    path.write_text("\n".join(rows) + "\n\n")
    draft = infer_schema(path)
    cols = {c.name: c for c in draft.schema.columns}
    assert cols["id"].type == "category" and len(cols["id"].values) == 60
    assert cols["id"].values[:3] == ["p0", "p1", "p10"]  # sorted, not first seen
    assert "'id': 60 distinct values: an identifier or free text?" in draft.text
    assert (cols["empty"].type, cols["empty"].missing) == ("float", "impute") and "every cell is missing" in draft.text
    assert cols["code"].type == "category"  # 1e39 does not fit float32, so it cannot be a number here
    assert (cols["score"].type, cols["flag"].type) == ("float", "int")
    assert cols["label"].values == ["no", "yes"]
    read_csv(path, load_schema(_saved_as(tmp_path, "drafted.yaml", draft.text)))
    # A label of many whole numbers is a regression target; one of a single text value is refused.
    assert infer_schema(path, label="score").schema.is_regression
    with pytest.raises(SchemaError, match="holds one value only \\('1e39'\\)"):
        infer_schema(path, label="code")
    path.write_text("a,b\n1,x\n2\n")
    with pytest.raises(SchemaError, match="line 3: expected 2 cells but found 1"):
        infer_schema(path)
    path.write_bytes(b"a,b\n1,\xff\n")
    with pytest.raises(DataError, match="not UTF-8"):
        infer_schema(path)
    path.write_text("a,a\n1,2\n")
    with pytest.raises(SchemaError, match="'a' appears more than once"):
        infer_schema(path)


def test_the_documented_example_reads_as_documented(tmp_path: Path) -> None:
    import re

    doc = (REPO / "docs" / "schema.md").read_text()
    schema_text, csv_text = re.findall(r"```(?:yaml|text)\n(.*?)```", doc, re.S)[:2]
    csv_path = _saved_as(tmp_path, "site.csv", csv_text)
    table = read_csv(csv_path, load_schema(_saved_as(tmp_path, "schema.yaml", schema_text)))
    header = re.search(r"\n\| (age .*) \|\n", doc).group(1).split(" | ")
    assert list(table.feature_names) == header
    assert table.imputed == ("bmi", "smoker=no", "smoker=yes") and table.y.tolist() == [1, 0, 1]
    nan = np.nan
    expected = [[54.5, 1, 0, 3, 31.2, 1, 0, 0], [61, 0, 1, 0, nan, 0, 1, 0], [33.25, 0, 1, 12, nan, nan, nan, 1]]
    assert np.array_equal(table.X, np.array(expected, dtype=np.float32), equal_nan=True)
    drafted = infer_schema(csv_path)  # the draft reads it too: bmi and smoker with missing: impute
    assert read_csv(csv_path, drafted.schema).imputed == ("bmi", "smoker=no", "smoker=yes")


def _saved_as(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path
