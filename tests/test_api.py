"""The public Python API: a pinned, documented surface that stays light to import, and works end to end."""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
from pathlib import Path

import pytest

import consortium

ROOT = Path(__file__).resolve().parents[1]

#: The public surface. Adding a name is a decision: change it here on purpose.
EXPORTED = [
    "ClassificationTask", "ConfigError", "ConsortiumError", "DataShape", "LocalTrainer", "ProtocolError", "RegressionTask",
    "SimulationConfig", "SimulationResult", "Strategy", "StrategyOptions", "Task", "VerificationError", "Verified",
    "load_config", "load_task", "parse_config", "register_strategy", "simulate", "verify",
]


def test_the_public_names_are_pinned():
    assert consortium.__all__ == EXPORTED
    assert sorted(dir(consortium)) == sorted([*EXPORTED, "__version__"])
    with pytest.raises(AttributeError):
        consortium.Simulation  # noqa: B018 the machinery stays internal


@pytest.mark.parametrize("name", EXPORTED)
def test_every_public_name_is_documented(name):
    obj = getattr(consortium, name)
    doc = inspect.getdoc(obj) or ""
    assert len(doc) > 30, f"consortium.{name} needs a docstring"
    if inspect.isfunction(obj) and name in ("simulate", "verify"):  # arguments, returns and errors
        assert all(part in doc for part in ("Args:", "Returns:", "Raises:"))


def test_import_consortium_loads_no_torch():
    code = "import sys, consortium; consortium.verify; consortium.SimulationConfig; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_the_python_api_example_runs_a_simulation_and_verifies_it(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "python_api.py"), str(tmp_path / "run")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "accuracy: 0." in out.stdout and "verified:" in out.stdout and "summary bound" in out.stdout
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["privacy"]["enabled"] and summary["secure_aggregation"]["enabled"]  # the defaults: every protection on


def test_simulate_returns_plain_floats_the_model_and_the_epsilon(tmp_path):
    result = consortium.simulate(
        {"rounds": 2, "data": {"dataset": "breast-cancer", "sites": 3}}, baselines={"local_only": False, "pooled": False},
        out=tmp_path / "run", privacy={"test_seed": 1},
    )
    assert all(type(v) is float for v in result.metrics.values())
    assert result.metrics == {k: v for k, v in result.summary["federated"].items() if k not in ("rounds_completed", "rounds_skipped")}
    assert set(result.epsilon) == {"site-1", "site-2", "site-3"} and all(0 < e <= 8.0 + 1e-9 for e in result.epsilon.values())
    import torch

    from consortium.learning.adapter import ModelAdapter

    assert isinstance(result.model, torch.nn.Module)
    assert (ModelAdapter(result.model).get_vector() == result.params).all()
    assert result.verify().summary == "bound"


def test_bad_input_is_one_config_error(tmp_path):
    with pytest.raises(consortium.ConfigError, match=r"^rounds: .*found -1.*fix that value$"):
        consortium.simulate(rounds=-1, out=tmp_path / "run")
    with pytest.raises(consortium.ConfigError, match="not-a-file.yaml"):
        consortium.simulate(tmp_path / "not-a-file.yaml")
    with pytest.raises(consortium.ConfigError, match="does not exist"):
        consortium.verify(tmp_path / "nowhere")


def test_a_model_that_mixes_the_examples_of_a_batch_is_refused_before_the_run_starts(tmp_path):
    """Under record-level DP a BatchNorm model is refused in one line naming the module and the fix,
    before the run gets a folder and before any site trains."""
    import torch

    class WithBatchNorm(consortium.ClassificationTask):
        def model(self, shape):
            return torch.nn.Sequential(torch.nn.Linear(shape.n_features, 8), torch.nn.BatchNorm1d(8),
                                       torch.nn.Linear(8, shape.n_classes))

    with pytest.raises(consortium.ConfigError, match=r"module '1' \(BatchNorm1d\) mixes the examples .* GroupNorm"):
        consortium.simulate(rounds=1, out=tmp_path / "run", task=WithBatchNorm())
    assert not (tmp_path / "run").exists()


def test_simulate_hands_the_studys_trainer_to_every_site(tmp_path):
    from tests.test_trainer_seam import FullBatchGD

    trainer = FullBatchGD()
    result = consortium.simulate(
        {"rounds": 1, "data": {"dataset": "breast-cancer", "sites": 3}}, trainer=trainer, out=tmp_path / "run",
        privacy={"level": "site", "epsilon": 8.0, "test_seed": 1}, baselines={"local_only": False, "pooled": False},
    )
    assert len(trainer.calls) >= 2 and result.verify().status == "completed"
