"""Per-site tables of 200 or 1,000 sites are read as a spread and the worst sites on the console; the run
folder (summary.json, --json) keeps every row."""

from __future__ import annotations

from consortium.cli.common import out_console, spread
from consortium.cli.summary import print_summary


def _summary(n: int) -> dict:
    per_site = {f"site-{k:04d}": 0.5 + 0.4 * k / n for k in range(n)}
    return {
        "dataset": "synthetic-hospitals", "sites": n, "rounds": 2, "run_dir": "runs/x",
        "task": {"name": "classification", "target": "classification", "headline": "accuracy"},
        "federated": {"accuracy": 0.8, "loss": 0.5, "auc": 0.8, "majority_accuracy": 0.6, "constant_loss": 0.67},
        "local_only": {"accuracy_mean": 0.7, "accuracy_per_site": per_site, "own_split_accuracy_per_site": per_site},
        "secure_aggregation": {"enabled": False}, "privacy": {"enabled": False},
    }


def test_a_long_per_site_table_is_summarised_by_its_worst_sites_and_quantiles(monkeypatch):
    monkeypatch.setattr(out_console, "width", 200)
    with out_console.capture() as captured:
        print_summary(_summary(200))
    text = captured.get()
    assert "site-0150 alone" not in text and text.count("alone") < 12  # not 200 rows
    for line in ("worst: site-0000", "worst: site-0001", "worst: site-0002", "10th percentile", "50th percentile",
                 "90th percentile", "best: site-0199", "every one of the 200 sites: summary.json"):
        assert line in text
    with out_console.capture() as captured:
        print_summary(_summary(5))
    assert "site-0004 alone (own split" in captured.get()  # a short table is shown whole


def test_the_spread_ranks_by_what_is_worst():
    eps = {"a": 1.0, "b": 3.0, "c": 2.0}
    assert [label for label, _, _ in spread(eps, worst="high", shown=1)] == [
        "worst: b", "90th percentile", "50th percentile", "10th percentile", "best: a"]
    assert spread(eps, worst="low", shown=1)[0] == ("worst: a", 1.0, "a") and spread(eps, worst="low")[-1] == ("best: b", 3.0, "b")


def test_a_site_whose_table_is_one_row_is_named_with_its_file(tmp_path):
    import subprocess
    import sys

    import numpy as np

    from consortium.data import load_builtin, schema_of, write_csv, write_schema

    table = load_builtin("breast-cancer")
    write_schema(schema_of(table), tmp_path / "schema.yaml")
    sites = []
    for name, rows in (("a", np.arange(0, 100)), ("b", np.arange(100, 101)), ("c", np.arange(101, 200))):
        write_csv(table.take(rows), tmp_path / f"{name}.csv")
        sites.append(f"    - {{name: {name}, csv: {tmp_path / f'{name}.csv'}, schema: {tmp_path / 'schema.yaml'}}}")
    (tmp_path / "run.yaml").write_text("rounds: 1\ndata:\n  dataset: csv\n  csv_sites:\n" + "\n".join(sites) + "\n")
    proc = subprocess.run([sys.executable, "-m", "consortium.cli", "simulate", str(tmp_path / "run.yaml")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    line = " ".join(proc.stderr.split())
    assert f"site 'b' ({tmp_path / 'b.csv'}): a table of 1 row is too small to split" in line, proc.stderr
