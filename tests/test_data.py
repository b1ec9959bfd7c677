"""Tests of consortium.data: built-in and synthetic datasets, partitions, splits, schemas and CSVs."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from consortium.data import (
    BUILTIN_DATASETS,
    DataSchema,
    SyntheticHospitals,
    Table,
    check_schemas,
    load_builtin,
    load_schema,
    partition_dirichlet,
    partition_iid,
    partition_quantity,
    read_csv,
    split_table,
    synthetic_hospitals,
)
from consortium.errors import (
    ConfigError,
    DataError,
    PartitionError,
    SchemaError,
    SchemaMismatchError,
    UnknownDatasetError,
)

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def assert_partition(parts: list[np.ndarray], n_rows: int, n_sites: int, min_rows: int = 1) -> None:
    """Disjoint, sorted int64 parts that together cover range(n_rows) exactly."""
    assert len(parts) == n_sites
    for p in parts:
        assert p.dtype == np.int64
        assert np.all(np.diff(p) > 0), "each part is sorted without duplicates"
        assert len(p) >= min_rows
    joined = np.concatenate(parts)
    assert len(joined) == n_rows
    assert np.array_equal(np.sort(joined), np.arange(n_rows))


def label_dist(y: np.ndarray, n_classes: int) -> np.ndarray:
    return np.bincount(y, minlength=n_classes) / len(y)


def mean_tv(y: np.ndarray, parts: list[np.ndarray]) -> float:
    """Mean total-variation distance between each site's label distribution and the global one."""
    k = int(y.max()) + 1
    glob = label_dist(y, k)
    return float(np.mean([0.5 * np.abs(label_dist(y[p], k) - glob).sum() for p in parts]))


# ---------------------------------------------------------------------------
# Table and built-ins


def test_breast_cancer_loads() -> None:
    t = load_builtin("breast-cancer")
    assert (t.n_rows, t.n_features, t.n_classes) == (569, 30, 2)
    assert t.classes == ("malignant", "benign")
    assert t.X.dtype == np.float32 and t.X.flags.c_contiguous and t.y.dtype == np.int64
    assert len(t.feature_names) == 30 and t.image_shape is None
    assert set(np.unique(t.y)) == {0, 1}


def test_digits_loads() -> None:
    t = load_builtin("digits")
    assert (t.n_rows, t.n_features, t.n_classes) == (1797, 64, 10)
    assert t.classes == tuple(str(i) for i in range(10))
    assert t.image_shape == (1, 8, 8)
    assert t.X.dtype == np.float32 and t.X.min() == 0 and t.X.max() == 16


def test_unknown_dataset_lists_the_valid_names() -> None:
    with pytest.raises(UnknownDatasetError) as info:
        load_builtin("xyz")
    msg = str(info.value)
    assert "'xyz'" in msg
    assert all(name in msg for name in BUILTIN_DATASETS)


def test_synthetic_hospitals_is_not_a_single_table() -> None:
    with pytest.raises(ConfigError, match="synthetic_hospitals"):
        load_builtin("synthetic-hospitals")


def test_table_validates_and_takes(rng: np.random.Generator) -> None:
    X = rng.standard_normal((5, 3)).astype(np.float32)
    y = np.array([0, 1, 0, 1, 1])
    t = Table(X=X, y=y, feature_names=("a", "b", "c"), classes=("no", "yes"))
    sub = t.take(np.array([4, 0]))
    assert np.array_equal(sub.y, [1, 0]) and sub.feature_names == t.feature_names and sub.X.flags.c_contiguous
    assert t.take(np.array([], dtype=np.int64)).n_rows == 0
    with pytest.raises(DataError, match="float32"):
        Table(X=X.astype(np.float64), y=y, feature_names=("a", "b", "c"), classes=("no", "yes"))
    with pytest.raises(DataError, match="int64"):
        Table(X=X, y=y.astype(np.int32), feature_names=("a", "b", "c"), classes=("no", "yes"))
    with pytest.raises(DataError, match="feature names"):
        Table(X=X, y=y, feature_names=("a", "b"), classes=("no", "yes"))
    with pytest.raises(DataError, match="rows"):
        Table(X=X, y=y[:4], feature_names=("a", "b", "c"), classes=("no", "yes"))
    with pytest.raises(DataError, match="classes"):
        Table(X=X, y=y + 1, feature_names=("a", "b", "c"), classes=("no", "yes"))
    with pytest.raises(DataError, match="image_shape"):
        Table(X=X, y=y, feature_names=("a", "b", "c"), classes=("no", "yes"), image_shape=(1, 2, 2))
    X[2, 1] = np.nan
    with pytest.raises(DataError, match="row 2"):
        Table(X=X, y=y, feature_names=("a", "b", "c"), classes=("no", "yes"))


# ---------------------------------------------------------------------------
# Partitions


@FAST
@given(n_rows=st.integers(1, 500), n_sites=st.integers(1, 12), seed=st.integers(0, 2**32 - 1))
def test_iid_partition_invariants(n_rows: int, n_sites: int, seed: int) -> None:
    assume(n_rows >= n_sites)
    parts = partition_iid(n_rows, n_sites, np.random.default_rng(seed))
    assert_partition(parts, n_rows, n_sites)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    again = partition_iid(n_rows, n_sites, np.random.default_rng(seed))
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))


@FAST
@given(
    n_rows=st.integers(20, 600),
    n_sites=st.integers(1, 8),
    n_classes=st.integers(2, 6),
    alpha=st.floats(0.05, 100.0),
    min_rows=st.integers(1, 10),
    seed=st.integers(0, 2**32 - 1),
)
def test_dirichlet_partition_invariants(
    n_rows: int, n_sites: int, n_classes: int, alpha: float, min_rows: int, seed: int
) -> None:
    assume(n_rows >= n_sites * min_rows)
    y = np.random.default_rng(seed).integers(0, n_classes, n_rows)
    try:
        parts = partition_dirichlet(y, n_sites, alpha, np.random.default_rng(seed), min_rows=min_rows)
    except PartitionError as exc:  # possible when alpha is tiny and the table barely fits
        assert "use fewer sites or a larger alpha" in str(exc)
        assert str(n_rows) in str(exc) and str(n_sites) in str(exc) and str(min_rows) in str(exc)
        assume(False)
        return
    assert_partition(parts, n_rows, n_sites, min_rows)
    again = partition_dirichlet(y, n_sites, alpha, np.random.default_rng(seed), min_rows=min_rows)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))


@FAST
@given(
    n_rows=st.integers(1, 600),
    n_sites=st.integers(1, 10),
    beta=st.floats(0.01, 100.0),
    min_rows=st.integers(1, 20),
    seed=st.integers(0, 2**32 - 1),
)
def test_quantity_partition_invariants(n_rows: int, n_sites: int, beta: float, min_rows: int, seed: int) -> None:
    assume(n_rows >= n_sites * min_rows)
    parts = partition_quantity(n_rows, n_sites, beta, np.random.default_rng(seed), min_rows=min_rows)
    assert_partition(parts, n_rows, n_sites, min_rows)
    again = partition_quantity(n_rows, n_sites, beta, np.random.default_rng(seed), min_rows=min_rows)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))


def test_feasible_dirichlet_requests_succeed() -> None:
    y = load_builtin("digits").y
    for seed in range(5):
        for alpha in (0.05, 0.1, 1.0):
            parts = partition_dirichlet(y, 10, alpha, np.random.default_rng(seed), min_rows=10)
            assert_partition(parts, len(y), 10, 10)


def test_dirichlet_alpha_controls_label_skew() -> None:
    y = load_builtin("digits").y
    tv = {}
    for name, make in {
        "iid": lambda r: partition_iid(len(y), 10, r),
        "alpha=0.1": lambda r: partition_dirichlet(y, 10, 0.1, r),
        "alpha=1000": lambda r: partition_dirichlet(y, 10, 1000.0, r),
    }.items():
        tv[name] = np.mean([mean_tv(y, make(np.random.default_rng(s))) for s in range(5)])
    assert tv["iid"] < 0.1
    assert tv["alpha=1000"] < 0.1
    assert tv["alpha=0.1"] > 0.4
    assert tv["alpha=0.1"] > 4 * tv["iid"]


def test_quantity_beta_controls_size_skew() -> None:
    def size_cv(beta: float) -> float:
        cvs = []
        for s in range(10):
            sizes = np.array([len(p) for p in partition_quantity(2000, 8, beta, np.random.default_rng(s))])
            cvs.append(sizes.std() / sizes.mean())
        return float(np.mean(cvs))

    assert size_cv(0.1) > 1.0  # very unequal
    assert size_cv(1000.0) < 0.1  # near-equal
    sizes = [len(p) for p in partition_quantity(569, 5, 0.1, np.random.default_rng(0))]
    assert sum(sizes) == 569 and min(sizes) >= 10 and max(sizes) > 200


def test_impossible_partitions_say_how_to_fix_them() -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(PartitionError) as info:
        partition_quantity(25, 3, 1.0, rng, min_rows=10)
    assert str(info.value) == "cannot give 3 sites at least 10 rows each from 25 rows: use at most 2 sites or a smaller min_rows"
    with pytest.raises(PartitionError, match="use at most 2 sites"):
        partition_dirichlet(np.zeros(25, dtype=np.int64), 3, 1.0, rng, min_rows=10)
    with pytest.raises(PartitionError, match="from 3 rows"):
        partition_iid(3, 4, rng)
    # Feasible by count but not by Dirichlet luck: two classes, ten sites, extreme skew.
    y = np.repeat([0, 1], 50)
    with pytest.raises(PartitionError) as info:
        partition_dirichlet(y, 10, 1e-4, rng, min_rows=10)
    msg = str(info.value)
    assert "100 rows" in msg and "10 sites" in msg and "10 rows each" in msg
    assert "use fewer sites or a larger alpha" in msg


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_concentrations_are_config_errors(bad: float) -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(ConfigError, match="alpha"):
        partition_dirichlet(np.zeros(50, dtype=np.int64), 2, bad, rng)
    with pytest.raises(ConfigError, match="beta"):
        partition_quantity(50, 2, bad, rng)


def test_bad_site_counts_are_config_errors() -> None:
    rng = np.random.default_rng(0)
    for call in (
        lambda: partition_iid(10, 0, rng),
        lambda: partition_dirichlet(np.zeros(10, dtype=np.int64), 0, 1.0, rng),
        lambda: partition_quantity(10, -1, 1.0, rng),
        lambda: partition_quantity(10, 2, 1.0, rng, min_rows=0),
    ):
        with pytest.raises(ConfigError):
            call()


# ---------------------------------------------------------------------------
# Synthetic hospitals


def hospitals(seed: int = 7, n_sites: int = 10, **knobs: float) -> list[Table]:
    return synthetic_hospitals(n_sites, SyntheticHospitals(**knobs), np.random.default_rng(seed))


def test_synthetic_hospitals_shape_and_determinism() -> None:
    sites = hospitals(n_sites=4, n_features=12)
    assert len(sites) == 4
    for t in sites:
        assert (t.n_rows, t.n_features) == (400, 12)
        assert t.classes == ("no-event", "event")
        assert len(set(t.feature_names)) == 12 and t.feature_names[:2] == ("age", "bmi")
        assert 0.1 < t.y.mean() < 0.6  # both outcomes occur
    again = hospitals(n_sites=4, n_features=12)
    for a, b in zip(sites, again):
        assert np.array_equal(a.X, b.X) and np.array_equal(a.y, b.y)
    other = hospitals(seed=8, n_sites=4, n_features=12)
    assert not np.array_equal(sites[0].X, other[0].X)


def test_label_skew_spreads_prevalence() -> None:
    spread = {s: np.std([t.y.mean() for t in hospitals(label_skew=s)]) for s in (0.0, 2.0)}
    assert spread[0.0] < 0.05  # binomial noise only: sd about 0.023 at 400 rows
    assert spread[2.0] > 0.15
    assert spread[2.0] > 4 * spread[0.0]


def test_feature_shift_moves_site_means_apart() -> None:
    def spread(shift: float) -> float:
        sites = hospitals(feature_shift=shift)
        pooled_sd = np.concatenate([t.X for t in hospitals()]).std(axis=0)
        means = np.stack([t.X.mean(axis=0) for t in sites])
        return float(np.mean(means.std(axis=0) / pooled_sd))

    assert spread(0.0) < 0.1  # sampling noise: about 1/sqrt(400)
    assert spread(1.0) > 0.6
    # the same knob also changes feature scales
    sd0 = np.stack([t.X.std(axis=0) for t in hospitals()])
    sd1 = np.stack([t.X.std(axis=0) for t in hospitals(feature_shift=1.0)])
    assert np.mean(np.abs(np.log(sd1 / sd1.mean(axis=0)))) > 2 * np.mean(np.abs(np.log(sd0 / sd0.mean(axis=0))))


def test_size_imbalance_spreads_sizes() -> None:
    equal = [t.n_rows for t in hospitals(n_sites=8)]
    assert equal == [400] * 8
    sizes = np.array([t.n_rows for t in hospitals(n_sites=8, size_imbalance=1.0)])
    assert sizes.std() / sizes.mean() > 0.5
    assert sizes.min() >= 20
    tiny = [t.n_rows for t in hospitals(n_sites=8, size_imbalance=5.0)]
    assert min(tiny) >= 20


def test_sites_agree_when_every_knob_is_zero() -> None:
    # With no heterogeneity every site draws from the same distribution, so prevalences agree.
    sites = hospitals(n_sites=5, rows_per_site=4000)
    prev = [t.y.mean() for t in sites]
    assert max(prev) - min(prev) < 0.05


@pytest.mark.parametrize(
    "knobs, field",
    [
        ({"rows_per_site": 19}, "rows_per_site"),
        ({"n_features": 1}, "n_features"),
        ({"label_skew": -0.1}, "label_skew"),
        ({"feature_shift": float("nan")}, "feature_shift"),
        ({"size_imbalance": -1.0}, "size_imbalance"),
        ({"rows_per_site": 100.5}, "rows_per_site"),
    ],
)
def test_invalid_knobs_are_config_errors(knobs: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        SyntheticHospitals(**knobs)


def test_synthetic_hospitals_needs_a_site() -> None:
    with pytest.raises(ConfigError, match="n_sites"):
        synthetic_hospitals(0, SyntheticHospitals(), np.random.default_rng(0))


# ---------------------------------------------------------------------------
# Train / validation / test


def test_split_table_is_a_stratified_cover() -> None:
    table = load_builtin("digits")
    s = split_table(table, np.random.default_rng(3), validation=0.1, test=0.2)
    n = table.n_rows
    assert s.train.n_rows + s.validation.n_rows + s.test.n_rows == n
    assert abs(s.test.n_rows - 0.2 * n) <= 1 and abs(s.validation.n_rows - 0.1 * n) <= 1
    # Rows are disjoint and cover the table: compare whole rows (digits has a few duplicate images, so use counts).
    rows = np.concatenate([np.column_stack([t.X, t.y]) for t in (s.train, s.validation, s.test)])
    whole = np.column_stack([table.X, table.y])
    assert np.array_equal(np.unique(rows, axis=0, return_counts=True)[1], np.unique(whole, axis=0, return_counts=True)[1])
    counts = np.bincount(table.y)
    for part, frac in ((s.test, 0.2), (s.validation, 0.1)):
        got = np.bincount(part.y, minlength=10)
        assert np.all(np.abs(got - counts * frac) <= 1.5), "each class is split in proportion"


def test_split_table_with_indices(rng: np.random.Generator) -> None:
    # Tag each row with its index to check disjointness exactly.
    n = 101
    X = np.arange(n, dtype=np.float32).reshape(n, 1)
    y = (np.arange(n) % 3 == 0).astype(np.int64)
    t = Table(X=X, y=y, feature_names=("row",), classes=("a", "b"))
    s = split_table(t, rng, validation=0.15, test=0.25)
    ids = [part.X[:, 0].astype(int) for part in (s.train, s.validation, s.test)]
    assert sorted(np.concatenate(ids).tolist()) == list(range(n))
    assert (len(ids[1]), len(ids[2])) == (15, 25)
    again = split_table(t, np.random.default_rng(1234), validation=0.15, test=0.25)
    assert np.array_equal(again.test.X, s.test.X)


def test_split_table_small_and_invalid(rng: np.random.Generator) -> None:
    X = np.zeros((3, 2), dtype=np.float32)
    t = Table(X=X, y=np.array([0, 1, 1]), feature_names=("a", "b"), classes=("a", "b"))
    s = split_table(t, rng, validation=0.1, test=0.2)
    assert (s.train.n_rows, s.validation.n_rows, s.test.n_rows) == (1, 1, 1)
    s = split_table(t, rng, validation=0.0, test=0.2)
    assert (s.train.n_rows, s.validation.n_rows, s.test.n_rows) == (2, 0, 1)
    with pytest.raises(DataError, match="2 rows"):
        split_table(t.take(np.array([0, 1])), rng)
    for kw in ({"validation": 0.5}, {"test": -0.1}, {"test": float("nan")}, {"validation": 0.45, "test": 0.45}):
        with pytest.raises(ConfigError):
            split_table(t, rng, **kw)


# ---------------------------------------------------------------------------
# Schemas and CSV files

SCHEMA = """\
version: 1
label: outcome
columns:
  - {name: age, type: float, min: 0, max: 120}
  - {name: sex, type: category, values: [F, M]}
  - {name: visits, type: int, min: 0}
  - {name: outcome, type: category, values: [no-event, event]}
"""

GOOD_CSV = """\
sex,age,outcome,visits
F,54.5,event,3
M,61,no-event,0
M,33.25,event,12
"""


def write(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


@pytest.fixture
def schema(tmp_path: Path) -> DataSchema:
    return load_schema(write(tmp_path, "schema.yaml", SCHEMA))


def test_schema_feature_names_and_fingerprint(schema: DataSchema, tmp_path: Path) -> None:
    assert schema.feature_names() == ("age", "sex=F", "sex=M", "visits")
    same = load_schema(write(tmp_path, "copy.yaml", SCHEMA))
    assert same.fingerprint() == schema.fingerprint() and len(schema.fingerprint()) == 64
    other = load_schema(write(tmp_path, "other.yaml", SCHEMA.replace("[F, M]", "[F, M, X]")))
    assert other.fingerprint() != schema.fingerprint()


def test_good_csv_parses_with_one_hot_encoding(schema: DataSchema, tmp_path: Path) -> None:
    t = read_csv(write(tmp_path, "site.csv", GOOD_CSV + "\n"), schema)
    assert t.feature_names == ("age", "sex=F", "sex=M", "visits")
    assert t.classes == ("no-event", "event")
    expected = np.array([[54.5, 1, 0, 3], [61, 0, 1, 0], [33.25, 0, 1, 12]], dtype=np.float32)
    assert np.array_equal(t.X, expected)
    assert np.array_equal(t.y, [1, 0, 1]) and t.y.dtype == np.int64 and t.X.dtype == np.float32


@pytest.mark.parametrize(
    "csv_text, expected",
    [
        (GOOD_CSV + "F,abc,event,1\n", "line 5, column 'age': 'abc' is not a float"),
        (GOOD_CSV + "F,130,event,1\n", "line 5, column 'age': 130 is outside the allowed range [0, 120]"),
        (GOOD_CSV + "F,30,event,1.5\n", "line 5, column 'visits': '1.5' is not an int"),
        (GOOD_CSV + "X,30,event,1\n", "line 5, column 'sex': 'X' is not one of ['F', 'M']"),
        (GOOD_CSV + "F,30,death,1\n", "line 5, column 'outcome': 'death' is not one of"),
        (GOOD_CSV + "F,,event,1\n", "line 5, column 'age': the cell is empty"),
        (GOOD_CSV + "F,30,event," + "9" * 40 + "\n", "line 5, column 'visits': '" + "9" * 40 + "' is beyond the float32"),
        (GOOD_CSV + "F,30,event\n", "line 5: expected 4 cells but found 3"),
        ("sex,age,outcome\nF,30,event\n", "line 1: column 'visits' is missing"),
        ("sex,age,outcome,visits,zip\nF,30,event,1,123\n", "line 1: column 'zip' is not in the schema"),
        ("sex,age,outcome,visits\n", "no data rows"),
        ("", "is empty"),
    ],
)
def test_bad_csv_names_file_line_and_column(schema: DataSchema, tmp_path: Path, csv_text: str, expected: str) -> None:
    path = write(tmp_path, "site.csv", csv_text)
    with pytest.raises(SchemaError) as info:
        read_csv(path, schema)
    msg = str(info.value)
    assert str(path) in msg
    assert expected in msg


def test_bad_cell_message_matches_the_documented_form(schema: DataSchema, tmp_path: Path) -> None:
    path = write(tmp_path, "file.csv", GOOD_CSV + "F,abc,event,1\n")
    with pytest.raises(SchemaError) as info:
        read_csv(path, schema)
    assert str(info.value) == f"{path} line 5, column 'age': 'abc' is not a float; fix the row or the schema"


def test_rows_past_the_counted_bound_and_lone_cr_line_ends_still_read(
    schema: DataSchema, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    expected = read_csv(write(tmp_path, "site.csv", GOOD_CSV), schema)
    for text in (GOOD_CSV.replace("\n", "\r"), GOOD_CSV.replace("\n", "\r\n\r\n")):
        t = read_csv(write(tmp_path, "other.csv", text), schema)
        assert np.array_equal(t.X, expected.X) and np.array_equal(t.y, expected.y)
    monkeypatch.setattr("consortium.data.schema._row_bound", lambda path, n_columns: 1)  # as if the file grew
    t = read_csv(write(tmp_path, "grown.csv", GOOD_CSV), schema)
    assert np.array_equal(t.X, expected.X) and np.array_equal(t.y, expected.y)


MEMORY_PROBE = """\
import contextlib, re, sys
from consortium.data.schema import load_schema, read_csv
schema = load_schema(sys.argv[2])
def status(key):
    with open("/proc/self/status") as f:
        return int(re.search(key + r":\\s+(\\d+) kB", f.read()).group(1)) * 1024
with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # forget the imports' peak (if refused, the check is only stricter)
before = status("VmRSS")
table = read_csv(sys.argv[1], schema)
print(status("VmHWM") - before, table.n_rows)
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the peak resident set from Linux's /proc")
def test_reading_a_csv_streams_it_into_the_table(tmp_path: Path) -> None:
    """A 17 MB file is read holding under 3x its size (1.6x, the table alone being 1.4x; 22x as rows of arrays)."""
    rng = np.random.default_rng(0)
    block = "".join(f"{s},{a:.2f},{o},{v}\n" for s, a, o, v in zip(
        rng.choice(["F", "M"], 1000), rng.uniform(0, 120, 1000), rng.choice(["no-event", "event"], 1000), rng.poisson(3, 1000)))
    path = write(tmp_path, "big.csv", "sex,age,outcome,visits\n" + block * 1000)
    proc = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(path), str(write(tmp_path, "s.yaml", SCHEMA))],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    growth, rows = map(int, proc.stdout.split())
    size = path.stat().st_size
    assert rows == 1_000_000 and size > 15_000_000
    assert growth < 3 * size, f"reading {size / 2**20:.0f} MB grew the process by {growth / 2**20:.0f} MB"


def test_missing_csv_file(schema: DataSchema, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        read_csv(tmp_path / "nope.csv", schema)


def test_malformed_yaml_names_the_line(tmp_path: Path) -> None:
    path = write(tmp_path, "schema.yaml", "version: 1\nlabel: outcome\ncolumns:\n  - {name: age, type: float\n")
    with pytest.raises(SchemaError) as info:
        load_schema(path)
    msg = str(info.value)
    assert str(path) in msg and "malformed YAML" in msg
    assert " line 5" in msg or " line 4" in msg


@pytest.mark.parametrize(
    "text, expected",
    [
        (SCHEMA.replace("type: float", "type: double"), "line 4: columns.0.type"),
        (SCHEMA.replace("label: outcome", "label: death"), "line 2: label: label 'death' is not one of the columns"),
        (SCHEMA.replace("values: [no-event, event]}", "values: [no-event, event], missing: impute}"),
         "line 2: label: label column 'outcome' cannot be missing: remove `missing: impute`"),
        (SCHEMA.replace("values: [no-event, event]}", "values: [event]}"), "must declare at least 2 values"),
        (SCHEMA.replace("values: [F, M]}", "values: [F, missing], missing: indicator}"), "clashes with its missing-indicator"),
        (SCHEMA.replace("type: int, min: 0", "type: int, missing: drop"), "line 6: columns.2.missing"),
        (SCHEMA.replace("name: visits", "name: age"), "must be unique"),
        (SCHEMA.replace("{name: sex, type: category, values: [F, M]}", "{name: sex, type: category}"), "needs a non-empty list"),
        (SCHEMA.replace("type: int, min: 0", "type: int, values: [a]"), "cannot have values"),
        (SCHEMA + "extra: 1\n", "line 8: extra"),
        ("- a\n- b\n", "must be a mapping"),
    ],
)
def test_invalid_schema_names_file_and_field(tmp_path: Path, text: str, expected: str) -> None:
    path = write(tmp_path, "schema.yaml", text)
    with pytest.raises(SchemaError) as info:
        load_schema(path)
    assert str(path) in str(info.value)
    assert expected in str(info.value)


def test_missing_schema_file(tmp_path: Path) -> None:
    with pytest.raises(SchemaError, match="does not exist"):
        load_schema(tmp_path / "missing.yaml")


def test_check_schemas_accepts_identical_schemas(schema: DataSchema, tmp_path: Path) -> None:
    b = load_schema(write(tmp_path, "b.yaml", SCHEMA))
    assert check_schemas({"hospital-a": schema, "hospital-b": b}) == schema


@pytest.mark.parametrize(
    "change, expected",
    [
        (("[F, M]", "[F, M, X]"), "on column 'sex': values ['F', 'M'] vs ['F', 'M', 'X']"),
        (("name: age, type: float", "name: age, type: int"), "on column 'age': type 'float' vs 'int'"),
        (("  - {name: visits, type: int, min: 0}\n", ""), "on column 'visits': declared by 'hospital-a' but missing"),
        (("name: visits", "name: n_visits"), "column 'visits'"),
        (
            ("  - {name: outcome", "  - {name: death, type: category, values: [a, b]}\n  - {name: outcome"),
            "on column 'death': declared by 'hospital-b' but missing at 'hospital-a'",
        ),
    ],
)
def test_check_schemas_names_the_site_and_column(
    schema: DataSchema, tmp_path: Path, change: tuple[str, str], expected: str
) -> None:
    other = load_schema(write(tmp_path, "b.yaml", SCHEMA.replace(*change)))
    with pytest.raises(SchemaMismatchError) as info:
        check_schemas({"hospital-a": schema, "hospital-c": schema, "hospital-b": other})
    msg = str(info.value)
    assert msg.startswith("site 'hospital-b' disagrees with 'hospital-a'")
    assert expected in msg
    assert msg.endswith("every site must declare the same schema")


def test_check_schemas_label_and_order(schema: DataSchema) -> None:
    cols = list(schema.columns)
    reordered = DataSchema(label="outcome", columns=[cols[1], cols[0], *cols[2:]])
    with pytest.raises(SchemaMismatchError, match="column order"):
        check_schemas({"a": schema, "b": reordered})
    relabelled = DataSchema(label="sex", columns=cols)
    with pytest.raises(SchemaMismatchError, match="the label column: 'outcome' vs 'sex'"):
        check_schemas({"a": schema, "b": relabelled})
    with pytest.raises(ConfigError):
        check_schemas({})


def test_schema_is_loadable_from_textwrap(tmp_path: Path) -> None:
    text = textwrap.dedent(
        """
        label: y
        columns:
          - name: x
            type: float
          - name: y
            type: category
            values: ["0", "1"]
        """
    )
    s = load_schema(write(tmp_path, "s.yaml", text))
    assert s.version == 1 and s.feature_names() == ("x",)


# ---------------------------------------------------------------------------
# Regression tables, missing values


def test_regression_table_is_accepted_and_classification_checks_stay(rng: np.random.Generator) -> None:
    X = rng.standard_normal((6, 2)).astype(np.float32)
    y = rng.standard_normal(6).astype(np.float32)
    t = Table(X=X, y=y, feature_names=("a", "b"), classes=())
    assert t.is_regression and t.n_classes == 0 and t.y.dtype == np.float32
    sub = t.take(np.array([5, 1]))
    assert sub.is_regression and np.array_equal(sub.y, y[[5, 1]])
    from consortium.data.datasets import concat_tables

    both = concat_tables([t, sub])
    assert both.is_regression and both.n_rows == 8
    with pytest.raises(DataError, match="must be float32, got int64"):
        Table(X=X, y=np.zeros(6, dtype=np.int64), feature_names=("a", "b"), classes=())
    with pytest.raises(DataError, match="must be float32, got float64"):
        Table(X=X, y=y.astype(np.float64), feature_names=("a", "b"), classes=())
    bad = y.copy()
    bad[3] = np.nan
    with pytest.raises(DataError, match=r"row 3\): a label can never be missing"):
        Table(X=X, y=bad, feature_names=("a", "b"), classes=())
    # Classification: a float target is still refused, and so are indices outside the classes.
    assert not Table(X=X, y=np.zeros(6, dtype=np.int64), feature_names=("a", "b"), classes=("x", "y")).is_regression
    with pytest.raises(DataError, match="must be int64"):
        Table(X=X, y=y, feature_names=("a", "b"), classes=("x", "y"))
    with pytest.raises(DataError, match="labels must lie in 0..1"):
        Table(X=X, y=np.full(6, 2, dtype=np.int64), feature_names=("a", "b"), classes=("x", "y"))


def test_nan_only_in_imputed_columns(rng: np.random.Generator) -> None:
    X = rng.standard_normal((4, 3)).astype(np.float32)
    X[1, 2] = np.nan
    y = np.array([0, 1, 0, 1])
    names = ("a", "b", "c")
    with pytest.raises(DataError, match="NaN in row 1, feature 'c', which is not declared imputed"):
        Table(X=X, y=y, feature_names=names, classes=("n", "p"))
    with pytest.raises(DataError, match="NaN in row 1, feature 'c'"):
        Table(X=X, y=y, feature_names=names, classes=("n", "p"), imputed=("a",))
    t = Table(X=X, y=y, feature_names=names, classes=("n", "p"), imputed=["c"])
    assert t.imputed == ("c",)
    assert t.take(np.array([1, 2])).imputed == ("c",) and np.isnan(t.take(np.array([1])).X[0, 2])
    from consortium.data.datasets import concat_tables

    assert concat_tables([t, t]).imputed == ("c",)
    X[3, 2] = np.inf  # an infinity is never a missing value
    with pytest.raises(DataError, match="infinite value in row 3, feature 'c'"):
        Table(X=X, y=y, feature_names=names, classes=("n", "p"), imputed=("c",))
    X[3, 2] = 0
    with pytest.raises(DataError, match="'z', which is not a feature"):
        Table(X=X, y=y, feature_names=names, classes=("n", "p"), imputed=("c", "z"))
    with pytest.raises(DataError, match="twice"):
        Table(X=X, y=y, feature_names=names, classes=("n", "p"), imputed=("c", "c"))


def test_diabetes_is_a_builtin_regression_table() -> None:
    assert "diabetes" in BUILTIN_DATASETS
    t = load_builtin("diabetes")
    assert (t.n_rows, t.n_features) == (442, 10) and t.is_regression and t.classes == ()
    assert t.y.dtype == np.float32 and t.y.min() == 25 and t.y.max() == 346
    assert t.feature_names[:4] == ("age", "sex", "bmi", "bp") and t.X[:, 0].max() > 1  # raw units, not scaled


def test_label_skew_is_refused_on_a_regression_target() -> None:
    y = load_builtin("diabetes").y
    with pytest.raises(DataError, match="continuous .*use partition kind 'iid' or 'quantity'") as info:
        partition_dirichlet(y, 3, 0.5, np.random.default_rng(0))
    assert "\n" not in str(info.value)
    assert_partition(partition_quantity(len(y), 3, 1.0, np.random.default_rng(0)), len(y), 3)


def test_split_table_on_regression_is_deterministic_and_stratified() -> None:
    n = 203
    y = np.random.default_rng(9).gamma(2.0, 10.0, n).astype(np.float32)
    t = Table(X=np.arange(n, dtype=np.float32).reshape(n, 1), y=y, feature_names=("row",), classes=())
    s = split_table(t, np.random.default_rng(5), validation=0.1, test=0.2)
    ids = [part.X[:, 0].astype(int) for part in (s.train, s.validation, s.test)]
    assert sorted(np.concatenate(ids).tolist()) == list(range(n))
    assert (len(ids[1]), len(ids[2])) == (20, 41) and all(p.is_regression for p in (s.train, s.validation, s.test))
    again = split_table(t, np.random.default_rng(5), validation=0.1, test=0.2)
    assert np.array_equal(again.test.X, s.test.X) and np.array_equal(again.validation.X, s.validation.X)
    other = split_table(t, np.random.default_rng(6), validation=0.1, test=0.2)
    assert not np.array_equal(other.test.X, s.test.X)
    # Stratified by deciles of the target: each decile gives the test split 4 or 5 of its ~20 rows.
    rank = np.empty(n, dtype=np.int64)
    rank[np.argsort(y, kind="stable")] = np.arange(n)
    deciles = rank * 10 // n
    per_decile = np.bincount(deciles[ids[2]], minlength=10)
    assert per_decile.min() >= 3 and per_decile.max() <= 5, per_decile


MISSING_SCHEMA = """\
version: 1
label: outcome
columns:
  - {name: age, type: float}
  - {name: smoker, type: category, values: ["no", "yes"], missing: MODE}
  - {name: bmi, type: float, missing: impute}
  - {name: outcome, type: category, values: ["no-event", "event"]}
"""

MISSING_CSV = """\
age,smoker,bmi,outcome
54,yes,31.5,event
61,,NA,no-event
33,no, NaN ,event
40,null,22,no-event
"""


def test_missing_impute_and_indicator(tmp_path: Path) -> None:
    csv_path = write(tmp_path, "site.csv", MISSING_CSV)
    nan = np.nan
    t = read_csv(csv_path, load_schema(write(tmp_path, "i.yaml", MISSING_SCHEMA.replace("MODE", "impute"))))
    assert t.feature_names == ("age", "smoker=no", "smoker=yes", "bmi")
    assert t.imputed == ("smoker=no", "smoker=yes", "bmi")
    expected = [[54, 0, 1, 31.5], [61, nan, nan, nan], [33, 1, 0, nan], [40, nan, nan, 22]]
    assert np.array_equal(t.X, np.array(expected, dtype=np.float32), equal_nan=True)
    assert np.array_equal(t.y, [1, 0, 1, 0])

    schema = load_schema(write(tmp_path, "d.yaml", MISSING_SCHEMA.replace("MODE", "indicator")))
    t = read_csv(csv_path, schema)
    assert t.feature_names == ("age", "smoker=no", "smoker=yes", "smoker=missing", "bmi")
    assert t.imputed == ("smoker=no", "smoker=yes", "bmi")  # the indicator itself is never missing
    expected = [[54, 0, 1, 0, 31.5], [61, nan, nan, 1, nan], [33, 1, 0, 0, nan], [40, nan, nan, 1, 22]]
    assert np.array_equal(t.X, np.array(expected, dtype=np.float32), equal_nan=True)
    from consortium.data import layout_table

    layout = layout_table(schema)
    assert (layout.feature_names, layout.imputed, layout.classes) == (t.feature_names, t.imputed, t.classes)


def test_missing_error_names_the_fix_and_a_label_is_never_missing(tmp_path: Path) -> None:
    schema = load_schema(write(tmp_path, "e.yaml", MISSING_SCHEMA.replace("MODE", "error")))
    csv_path = write(tmp_path, "site.csv", MISSING_CSV)
    with pytest.raises(SchemaError) as info:
        read_csv(csv_path, schema)
    assert str(info.value) == (
        f"{csv_path} line 3, column 'smoker': the cell is empty; fill it, or declare `missing: impute` or "
        "`missing: indicator` for column 'smoker' in the schema"
    )
    with pytest.raises(SchemaError, match="line 2, column 'age': 'NA' marks a missing value; fill it, or declare"):
        read_csv(write(tmp_path, "na.csv", "age,smoker,bmi,outcome\nNA,no,1,event\n"), schema)
    impute = load_schema(write(tmp_path, "i.yaml", MISSING_SCHEMA.replace("MODE", "impute")))
    for cell, what in (("", "the cell is empty"), ("NA", "'NA' marks a missing value")):
        path = write(tmp_path, "nolabel.csv", f"age,smoker,bmi,outcome\n1,no,1,event\n2,no,1,{cell}\n")
        with pytest.raises(SchemaError) as info:
            read_csv(path, impute)
        assert f"line 3, column 'outcome': {what}; a label can never be missing" in str(info.value)
    # A declared category value is that value, never "missing"; anything else is still checked.
    na_value = MISSING_SCHEMA.replace('["no", "yes"], missing: MODE', '["no", "yes", "NA"], missing: impute')
    t = read_csv(write(tmp_path, "v.csv", "age,smoker,bmi,outcome\n1,NA,2,event\n"), load_schema(write(tmp_path, "v.yaml", na_value)))
    assert t.X.tolist() == [[1, 0, 0, 1, 2]]
    with pytest.raises(SchemaError, match="'maybe' is not one of"):
        read_csv(write(tmp_path, "m.csv", "age,smoker,bmi,outcome\n1,maybe,2,event\n"), impute)


def test_regression_label_from_csv_round_trips(tmp_path: Path) -> None:
    text = SCHEMA.replace("{name: outcome, type: category, values: [no-event, event]}", "{name: outcome, type: float, min: 0}")
    schema = load_schema(write(tmp_path, "r.yaml", text))
    assert schema.is_regression and schema.classes() == ()
    t = read_csv(write(tmp_path, "r.csv", "sex,age,outcome,visits\nF,54.5,0.125,3\nM,61,17,0\n"), schema)
    assert t.is_regression and t.classes == () and t.y.dtype == np.float32 and t.y.tolist() == [0.125, 17.0]
    with pytest.raises(SchemaError, match="line 2, column 'outcome': -1 is outside the allowed range"):
        read_csv(write(tmp_path, "neg.csv", "sex,age,outcome,visits\nF,54.5,-1,3\n"), schema)
    as_int = load_schema(write(tmp_path, "n.yaml", text.replace("type: float, min: 0", "type: int")))
    assert read_csv(write(tmp_path, "n.csv", "sex,age,outcome,visits\nF,1,4,3\n"), as_int).y.tolist() == [4.0]
    from consortium.data import layout_table, schema_of, write_csv, write_schema

    assert layout_table(schema).is_regression and layout_table(schema).y.dtype == np.float32
    # write_csv / schema_of / write_schema: a regression table with an imputed feature reads back exactly.
    X = np.array([[1.5, np.nan], [0.1, 2.0]], dtype=np.float32)
    table = Table(X=X, y=np.array([3.25, 0.1], dtype=np.float32), feature_names=("a", "b"), classes=(), imputed=("b",))
    write_csv(table, tmp_path / "t.csv")
    assert (tmp_path / "t.csv").read_text().splitlines()[1] == "1.5,,3.25"
    write_schema(schema_of(table), tmp_path / "t.yaml")
    assert "missing: impute" in (tmp_path / "t.yaml").read_text()
    back = read_csv(tmp_path / "t.csv", load_schema(tmp_path / "t.yaml"))
    assert np.array_equal(back.X, X, equal_nan=True) and np.array_equal(back.y, table.y)
    assert (back.imputed, back.classes) == (("b",), ())


def test_missing_declarations_change_the_fingerprint(schema: DataSchema, tmp_path: Path) -> None:
    before = "abb05136c7c3ae89"  # a schema declaring no missing values keeps its fingerprint from before the key
    assert schema.fingerprint().startswith(before), schema.fingerprint()
    explicit = load_schema(write(tmp_path, "x.yaml", SCHEMA.replace("min: 0}", "min: 0, missing: error}")))
    assert explicit.fingerprint() == schema.fingerprint()
    prints = {schema.fingerprint()}
    for mode in ("impute", "indicator"):
        other = load_schema(write(tmp_path, f"{mode}.yaml", SCHEMA.replace("type: int, min: 0", f"type: int, min: 0, missing: {mode}")))
        prints.add(other.fingerprint())
        with pytest.raises(SchemaMismatchError, match=f"on column 'visits': missing 'error' vs '{mode}'"):
            check_schemas({"hospital-a": schema, "hospital-b": other})
    assert len(prints) == 3
