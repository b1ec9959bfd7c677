"""The examples run offline, from the command line and from Python, with secure aggregation and record-level
DP on; each run verifies, and the consortium beats its sites alone."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml

import consortium
from consortium.run.orchestrator import PRIVACY_TEST_MODE
from tests import forkserver

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"


def _cli(*args: str) -> subprocess.CompletedProcess:
    return forkserver.run([sys.executable, "-m", "consortium.cli", *args], capture_output=True, text=True, cwd=REPO, timeout=900)


def _simulate_both_ways(config: Path, tmp_path: Path) -> list[dict]:
    """The same config from the command line (its JSON summary) and from Python; both verify, and with the
    test seed for the noise they train the same model. Their summaries."""
    proc = _cli("simulate", str(config), "--out", str(tmp_path / "cli"), "--json")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["transcript"]["verified"] and summary["secure_aggregation"]["enabled"]
    assert summary["privacy"]["level"] == "record"
    result = consortium.simulate(config, out=tmp_path / "python")
    assert result.verify().status == "completed"
    assert result.summary["federated"] == summary["federated"]
    return [summary, result.summary]


def _local(config: Path, tmp_path: Path, data: Path | None = None) -> Path:
    """The example's config with its data paths under ``data`` (a test writes the data there) and the test
    seed for the DP noise (reproducible, so the suite is deterministic; the noise is as large)."""
    body = yaml.safe_load(config.read_text())
    body["privacy"] = {**body.get("privacy", {}), "test_seed": 1}
    data = data or tmp_path
    for site in body["data"].get("csv_sites", []):
        site["csv"] = str(data / Path(site["csv"]).name)
        site["schema"] = str(EXAMPLES / "table" / "schema.yaml")
    for site in body["data"].get("task_sites", []):
        site["path"] = str(data / Path(site["path"]).name)
    if "task" in body and body["task"].endswith(".py:" + body["task"].rpartition(":")[2]):
        body["task"] = str(REPO / body["task"])
    out = tmp_path / "config.yaml"
    out.write_text(yaml.safe_dump(body))
    return out


def test_the_regression_example_beats_local_only(tmp_path):
    for summary in _simulate_both_ways(_local(EXAMPLES / "diabetes.yaml", tmp_path), tmp_path):
        fed = summary["federated"]
        assert summary["task"]["target"] == "regression"
        assert fed["mse"] < summary["local_only"]["mse_mean"] and fed["mse"] < fed["mean_mse"]
        assert summary["warnings"] == [PRIVACY_TEST_MODE]


def test_the_table_example_with_categories_and_missing_values_beats_local_only(tmp_path):
    data = tmp_path / "data"
    subprocess.run([sys.executable, str(EXAMPLES / "table" / "make_data.py"), "--out", str(data)], check=True, capture_output=True)
    assert any(line.split(",")[2] == "" for line in (data / "hospital-b.csv").read_text().splitlines())  # BMI missing
    for summary in _simulate_both_ways(_local(EXAMPLES / "table" / "config.yaml", tmp_path, data), tmp_path):
        fed = summary["federated"]
        assert fed["accuracy"] > summary["local_only"]["accuracy_mean"]
        assert fed["loss"] < fed["constant_loss"] and summary["warnings"] == [PRIVACY_TEST_MODE]  # beats the constant


def test_the_image_example_reads_each_sites_folder_and_trains_its_groupnorm_cnn(tmp_path):
    """The image example, cut to two rounds of a few images per site for the suite (its full run and figures
    are in the README): each site reads its own PNG folder through the task's load, DP-SGD trains the
    GroupNorm CNN on the class-weighted loss, and the run verifies, the same from the CLI and from Python."""
    data = tmp_path / "data"
    subprocess.run([sys.executable, str(EXAMPLES / "images" / "make_data.py"), "--out", str(data), "--per-site", "40"],
                   check=True, capture_output=True)
    config = _local(EXAMPLES / "images" / "config.yaml", tmp_path, data)
    body = yaml.safe_load(config.read_text())
    body.update(rounds=2, baselines={"local_only": False, "pooled": False})
    body["training"]["epochs"] = 1
    config.write_text(yaml.safe_dump(body))
    for summary in _simulate_both_ways(config, tmp_path):
        assert summary["task"]["name"].endswith("examples/images/task.py:Shapes")
        assert summary["model"]["kind"] == "Shapes" and summary["federated"]["rounds_completed"] == 2
