"""The ``LocalTrainer`` seam: a trainer written here runs a whole simulated round under secure
aggregation and site-level DP, and the run verifies; a record-level round never reaches it."""

import pytest
import torch
from torch.nn import functional as F

from consortium.config import SimulationConfig
from consortium.errors import ProtocolError
from consortium.learning.adapter import ModelAdapter
from consortium.privacy.events import RecordLevelEvent
from consortium.learning.task import load_task
from consortium.learning.training import TrainingData
from consortium.protocol.trainer import DPSGDTrainer, LocalTrainer, PlainTrainer, trainer_for
from consortium.run.simulation import run_simulation
from consortium.audit.verify import verify_run


class FullBatchGD:
    """A study's own local training: full-batch gradient descent, counting its calls."""

    def __init__(self, lr: float = 0.1, steps: int = 3) -> None:
        self.lr, self.steps = lr, steps
        self.calls: list[tuple[int, str | None]] = []

    def train(self, model, data, settings, *, privacy, proximal_mu, seed, noise):
        X, y = data.tensors()
        self.calls.append((int(X.shape[0]), None if privacy is None else privacy.level))
        start = model.get_vector()
        params = [p for p in model.module.parameters() if p.requires_grad]
        loss = torch.tensor(0.0)
        for _ in range(self.steps):
            loss = F.cross_entropy(model.module(X), y)
            grads = torch.autograd.grad(loss, params)
            with torch.no_grad():
                for p, g in zip(params, grads):
                    p -= self.lr * g
        return model.get_vector() - start, float(loss.detach())


def _config(level: str, rounds: int = 2) -> SimulationConfig:
    return SimulationConfig.model_validate({
        "rounds": rounds,
        "data": {"dataset": "breast-cancer", "sites": 3},
        "privacy": {"level": level, "epsilon": 8.0, "test_seed": 1},
        "baselines": {"local_only": False, "pooled": False},
    })


TASK = load_task("classification")


def test_the_shipped_trainers_are_local_trainers():
    assert isinstance(PlainTrainer(TASK), LocalTrainer) and isinstance(DPSGDTrainer(TASK), LocalTrainer)
    assert isinstance(FullBatchGD(), LocalTrainer)


def test_a_record_level_round_always_trains_with_dp_sgd():
    event = RecordLevelEvent(sampling_rate=0.1, noise_multiplier=1.0, clip=1.0, steps=2)
    own = FullBatchGD()
    dp = trainer_for(event, own, TASK)
    assert isinstance(dp, DPSGDTrainer) and dp.task is TASK  # DP-SGD, on the task's loss
    assert trainer_for(None, own, TASK) is own
    model = ModelAdapter(torch.nn.Linear(3, 2))
    X, y = torch.zeros(4, 3), torch.zeros(4, dtype=torch.int64)
    with pytest.raises(ProtocolError, match="DP-SGD"):  # plain training refuses a record-level event
        PlainTrainer(TASK).train(model, TrainingData.of(X, y), None, privacy=event, proximal_mu=0.0, seed=0, noise=torch.Generator())


def test_a_trainer_from_the_study_runs_a_secure_site_level_dp_round_that_verifies(tmp_path):
    trainer = FullBatchGD()
    result = run_simulation(_config("site"), out=tmp_path / "run", trainer=trainer)
    summary = result.summary
    assert summary["privacy"]["level"] == "site" and summary["privacy"]["noise"] == "distributed"
    assert summary["federated"]["rounds_completed"] == 2
    assert summary["secure_aggregation"]["enabled"] and all(n >= 2 for n in summary["secure_aggregation"]["survivors_per_round"])
    assert len(trainer.calls) >= 2 * 2  # at least a cohort of two sites, both rounds
    assert all(level == "site" for _, level in trainer.calls)
    verify_run(tmp_path / "run")


def test_a_record_level_simulation_never_calls_the_study_trainer(tmp_path):
    trainer = FullBatchGD()
    result = run_simulation(_config("record", rounds=1), out=tmp_path / "run", trainer=trainer)
    assert result.summary["federated"]["rounds_completed"] == 1
    assert trainer.calls == []
