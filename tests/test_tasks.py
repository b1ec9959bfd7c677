"""Tasks: a study's own model, loss and evaluation run through the whole protocol with every protection on.

Regression on the diabetes data under secure aggregation and record-level DP, scored from secure sums
that equal numpy's on the pooled predictions; a study's class-weighted loss reaches DP-SGD; a site refuses a
request, or a manifest, for task code other than its own; missing values are imputed with the
consortium-wide mean; a task named by file in a config runs from the real command line.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.nn import functional as F

import consortium
from consortium.learning.identity import task_code
from consortium.audit.verify import read_entries, verify_run
from consortium.config import SimulationConfig
from consortium.data import load_builtin, schema_of, write_csv, write_schema
from consortium.errors import ConfigError, ConsortiumError
from consortium.governance.guard import INTEGRITY_RULES, Refused
from consortium.learning.models import Standardize
from consortium.learning.task import load_task
from consortium.protocol import contributions as c
from consortium.protocol.site import Site
from consortium.run.simulation import Simulation
from tests.conftest import make_splits
from tests import forkserver

REPO = Path(__file__).resolve().parents[1]


def _config(**overrides: object) -> SimulationConfig:
    body = {
        "rounds": 8, "data": {"dataset": "diabetes", "sites": 3},
        "privacy": {"test_seed": 1}, "secure_aggregation": {"enabled": True},
    }
    return SimulationConfig.model_validate({**body, **overrides})


@pytest.fixture(scope="module")
def regression(tmp_path_factory):
    sim = Simulation(_config(), out=tmp_path_factory.mktemp("reg") / "run")
    return sim, sim.run()


def test_a_regression_runs_under_secure_aggregation_and_record_level_dp_and_beats_local_only(regression):
    sim, run = regression
    s = run.summary
    assert s["task"]["name"] == "regression" and s["task"]["target"] == "regression"
    assert s["secure_aggregation"]["enabled"] and s["privacy"]["level"] == "record"
    fed = s["federated"]
    assert fed["mse"] < s["local_only"]["mse_mean"]  # the consortium beats each site alone
    assert fed["mse"] < fed["mean_mse"] and fed["r2"] > 0.3  # and is better than predicting the mean
    assert not any("no better than predicting" in w for w in s["warnings"])
    assert verify_run(Path(s["run_dir"])).status == "completed"


def test_regression_metrics_from_secure_sums_equal_numpys_on_the_pooled_predictions(regression):
    sim, run = regression
    spec = sim.coordinator.task
    assert spec is not None and spec.n_classes == 0 and spec.target_scale > 1  # the target was standardised
    model = consortium.load_task("regression").with_model(spec.model)
    from consortium.protocol.task import build_model

    module = build_model(model, spec, 0)
    from consortium.learning.adapter import ModelAdapter

    ModelAdapter(module).set_vector(run.params)
    X = np.concatenate([sim._splits[n].test.X for n in sim.names])
    y = np.concatenate([sim._splits[n].test.y for n in sim.names]).astype(np.float64)
    with torch.no_grad():
        pred = module(torch.from_numpy(X)).reshape(-1).numpy().astype(np.float64) * spec.target_scale + spec.target_mean
    mse = float(np.mean((y - pred) ** 2))
    fed = run.summary["federated"]
    assert fed["mse"] == pytest.approx(mse, rel=1e-4)
    assert fed["mae"] == pytest.approx(float(np.mean(np.abs(y - pred))), rel=1e-4)
    assert fed["r2"] == pytest.approx(1 - mse / float(np.var(y)), rel=1e-3)
    assert fed["mean_mse"] == pytest.approx(float(np.var(y)), rel=1e-4)


class Weighted(consortium.ClassificationTask):
    """A study's own task: a small MLP and a class-weighted, label-smoothed loss (counting its calls)."""

    calls = 0

    def model(self, shape):
        return torch.nn.Sequential(
            shape.standardize(), torch.nn.Linear(shape.n_features, 8), torch.nn.Tanh(), torch.nn.Linear(8, shape.n_classes)
        )

    def loss(self, outputs, targets):
        type(self).calls += 1
        weight = torch.tensor([2.0, 1.0])
        return F.cross_entropy(outputs, targets, weight=weight, label_smoothing=0.05, reduction="none")


def test_a_studys_loss_reaches_dp_sgd_and_the_manifest_names_its_code(tmp_path):
    Weighted.calls = 0
    result = consortium.simulate(
        {"rounds": 2, "data": {"dataset": "breast-cancer", "sites": 3}, "privacy": {"test_seed": 1}},
        task=Weighted(), out=tmp_path / "run",
    )
    assert result.summary["privacy"]["level"] == "record" and Weighted.calls > 0
    manifest = read_entries(tmp_path / "run")[0].body
    code = task_code(f"{__file__}:Weighted")  # this file, the modules beside it it imports, their distributions
    assert manifest["task"] == {"name": f"{Weighted.__module__}:Weighted", "sha256": code.sha256, "code": "package"}
    assert "test_tasks.py" in code.files and "conftest.py" in code.files and "torch" in code.dependencies
    assert result.verify().status == "completed"
    assert result.metrics["accuracy"] > 0.8 and "majority_accuracy" in result.metrics


def test_a_site_refuses_a_request_for_another_task(rng):
    site = Site("s", make_splits(rng), seed=0, task=load_task("regression"))
    plain = Site("t", make_splits(rng), seed=0)  # the built-in classifier
    spec = _spec(load_task("classification"), 6)
    plain._training.model_for(spec, _params(spec))  # its own task: built
    with pytest.raises(Refused, match="this site runs 'regression'") as err:
        site._training.model_for(spec, _params(spec))
    assert err.value.rule == "task" and "task" in INTEGRITY_RULES  # an integrity refusal: it halts the run


def test_a_site_will_not_endorse_a_manifest_naming_other_task_code(tmp_path, monkeypatch):
    """The coordinator's manifest claims a task whose bytes differ from the sites' copy: no site endorses it,
    and the run never starts."""
    import consortium.run.orchestrator as orchestrator

    real = orchestrator.task_identity
    monkeypatch.setattr(orchestrator, "task_identity", lambda task: {**real(task), "sha256": "0" * 64})
    with pytest.raises(ConsortiumError, match="manifest"):
        Simulation(_config(rounds=1), out=tmp_path / "run").run()


def test_missing_values_are_imputed_with_the_consortium_wide_mean():
    X = np.array([[1.0, np.nan], [3.0, 4.0], [np.nan, 8.0]])
    parts = [c.setup_vector(X[:2]), c.setup_vector(X[2:])]
    summed = c.read_setup_sum(sum(parts), 2)
    assert summed.rows == 3
    np.testing.assert_allclose(summed.mean, np.nanmean(X, axis=0))
    np.testing.assert_allclose(summed.scale, np.nanstd(X, axis=0))
    layer = Standardize(summed.mean, summed.scale)
    out = layer(torch.tensor([[np.nan, 6.0]], dtype=torch.float32))
    assert out[0, 0] == 0.0 and torch.isfinite(out).all()  # missing: the consortium's mean


def test_a_consortium_of_csv_sites_with_missing_values_trains_and_verifies(tmp_path):
    table = load_builtin("breast-cancer")
    rng = np.random.default_rng(3)
    X = table.X.copy()
    for col in (0, 4):  # two columns lose 15% of their values
        X[rng.random(len(X)) < 0.15, col] = np.nan
    from consortium.data import Table

    holey = Table(X, table.y, table.feature_names, table.classes, imputed=(table.feature_names[0], table.feature_names[4]))
    sites = []
    for i, idx in enumerate(np.array_split(rng.permutation(len(X)), 3)):
        part = holey.take(idx)
        write_csv(part, tmp_path / f"s{i}.csv")
        write_schema(schema_of(part), tmp_path / f"s{i}.yaml")
        sites.append({"name": f"site-{i + 1}", "csv": str(tmp_path / f"s{i}.csv"), "schema": str(tmp_path / f"s{i}.yaml")})
    result = consortium.simulate(
        {"rounds": 3, "data": {"dataset": "csv", "csv_sites": sites}, "privacy": {"test_seed": 1}}, out=tmp_path / "run",
    )
    assert result.metrics["accuracy"] > 0.85 and result.verify().status == "completed"


def test_a_model_no_better_than_the_majority_class_is_named_in_the_warnings(tmp_path):
    class Constant(consortium.ClassificationTask):
        def model(self, shape):  # no weight of the input reaches the output: the class prior at best
            return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(shape.n_features, shape.n_classes, bias=True))

        def loss(self, outputs, targets):
            return 0.0 * outputs.sum(dim=1)  # learns nothing

    result = consortium.simulate(
        {"rounds": 1, "data": {"dataset": "breast-cancer", "sites": 3}, "privacy": {"test_seed": 1},
         "baselines": {"local_only": False, "pooled": False}},
        task=Constant(), out=tmp_path / "run",
    )
    assert any("no better than predicting the majority class" in w for w in result.summary["warnings"])


@pytest.mark.parametrize("ref, message", [
    ("nonesuch", "unknown task 'nonesuch'"),
    ("missing/file.py:Task", "task file 'missing/file.py' does not exist"),
    ("consortium.errors:ConfigError", "has no Task subclass 'ConfigError'"),
    ("no_such_module_xyz:Task", "cannot be imported"),
])
def test_a_task_that_cannot_be_loaded_is_one_line_with_the_fix(ref, message):
    with pytest.raises(ConfigError, match=message):
        load_task(ref)


TASK_FILE = '''
import torch
from consortium import RegressionTask


class Linear(RegressionTask):
    """A linear model of the standardised target."""

    def model(self, shape):
        return torch.nn.Sequential(shape.standardize(), torch.nn.Linear(shape.n_features, 1))


class Normed(RegressionTask):
    """BatchNorm: one record's output depends on the others in its batch."""

    def model(self, shape):
        return torch.nn.Sequential(torch.nn.Linear(shape.n_features, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 1))
'''


def test_a_task_named_by_file_in_the_config_runs_from_the_command_line(tmp_path):
    (tmp_path / "study.py").write_text(textwrap.dedent(TASK_FILE))
    config = tmp_path / "study.yaml"
    config.write_text(
        f"task: {tmp_path / 'study.py'}:Linear\nrounds: 4\ndata: {{dataset: diabetes, sites: 3}}\nprivacy: {{test_seed: 1}}\n"
        "baselines: {local_only: false, pooled: false}\n"
    )
    proc = _cli("simulate", str(config), "--out", str(tmp_path / "run"), "--json")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["task"]["name"].endswith("study.py:Linear") and summary["model"]["kind"] == "Linear"
    assert summary["model"]["parameters"] == 11 and summary["federated"]["mse"] < summary["federated"]["mean_mse"]
    bad = tmp_path / "bad.yaml"
    bad.write_text("task: nowhere/study.py:Linear\nrounds: 1\ndata: {dataset: diabetes, sites: 3}\n")
    proc = _cli("simulate", str(bad), "--out", str(tmp_path / "bad-run"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "task file 'nowhere/study.py' does not exist" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "bad-run").exists()
    # A study model that mixes the examples of a batch is refused under record-level DP: exit 2, one line, the fix.
    normed = tmp_path / "normed.yaml"
    normed.write_text(config.read_text().replace(":Linear", ":Normed"))
    proc = _cli("simulate", str(normed), "--out", str(tmp_path / "normed-run"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert "module '1' (BatchNorm1d) mixes the examples of a batch" in proc.stderr and "GroupNorm" in proc.stderr
    assert not (tmp_path / "normed-run").exists()


# -- helpers -------------------------------------------------------------------------


def _cli(*args: str) -> subprocess.CompletedProcess:
    return forkserver.run([sys.executable, "-m", "consortium.cli", *args], capture_output=True, text=True, cwd=REPO, timeout=600)


def _spec(task, n_features: int):
    from consortium.learning.adapter import ModelAdapter
    from consortium.learning.specs import ModelSpec
    from consortium.protocol import messages as m
    from consortium.protocol.task import build_model
    from consortium.wire import Tensor

    spec = m.TaskSpec(
        task=task.name, model=ModelSpec(), n_features=n_features, n_classes=2, classes=("a", "b"),
        mean=Tensor.from_numpy(np.zeros(n_features, np.float32)), scale=Tensor.from_numpy(np.ones(n_features, np.float32)),
        layout_hash="0" * 64,
    )
    return spec.model_copy(update={"layout_hash": ModelAdapter(build_model(task, spec)).layout_hash})


def _params(spec):
    from consortium.learning.adapter import ModelAdapter
    from consortium.protocol.task import build_model
    from consortium.wire import Tensor

    return Tensor.from_numpy(ModelAdapter(build_model(load_task(spec.task), spec)).get_vector())


def test_simulate_takes_the_task_first_and_refuses_one_whose_source_no_site_could_check(tmp_path):
    namespace: dict = {"__name__": "__main__"}
    exec(compile("import consortium, torch\nclass Typed(consortium.RegressionTask):\n"  # as at an interactive prompt
                 "    def model(self, shape):\n        return torch.nn.Linear(shape.n_features, 1)\n", "<stdin>", "exec"), namespace)
    with pytest.raises(ConfigError, match="source of task .*Typed cannot be read"):
        consortium.simulate(namespace["Typed"](), rounds=1, data={"dataset": "diabetes", "sites": 3}, out=tmp_path / "run")
    assert not (tmp_path / "run").exists()
