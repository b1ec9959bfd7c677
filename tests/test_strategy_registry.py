"""A strategy defined here, registered by name, runs a whole simulation (secure aggregation and DP on)."""

from collections.abc import Sequence

import json

import numpy as np
import pytest

from consortium.config import SimulationConfig
from consortium.errors import ConfigError
from consortium.learning.strategies import (
    FedAvg,
    Strategy,
    StrategyOptions,
    known_strategies,
    register_strategy,
    strategy_from_config,
)
from consortium.run.simulation import run_simulation
from consortium.audit.verify import verify_run

NAME = "test-halfstep"


class HalfStep(Strategy):
    """Every site, every round; the server moves half of the mean update. Counts its calls."""

    name = NAME

    def __init__(self, min_sites: int) -> None:
        self.min_sites = min_sites
        self.selected: list[int] = []
        self.applied: list[int] = []

    def select(self, rnd: int, sites: Sequence[str], rng: np.random.Generator) -> list[str]:
        self.selected.append(rnd)
        return list(sites)

    def apply(self, rnd: int, params: np.ndarray, mean_update: np.ndarray) -> np.ndarray:
        self.applied.append(rnd)
        return (params + np.float32(0.5) * mean_update).astype(np.float32)


BUILT: list[HalfStep] = []


def _factory(options: StrategyOptions) -> HalfStep:
    BUILT.append(HalfStep(options.min_sites))
    return BUILT[-1]


if NAME not in known_strategies():
    register_strategy(NAME, _factory)

CONFIG = {
    "data": {"dataset": "breast-cancer", "sites": 3},
    "rounds": 2,
    "participation": {"min_sites": 2},
    "model": {"kind": "logistic"},
    "strategy": {"name": NAME},
    "secure_aggregation": {"enabled": True},
    "privacy": {"enabled": True, "test_seed": 7, "epsilon": 4.0, "noise_multiplier": 1.5},  # no calibration
    "baselines": {"local_only": False, "pooled": False},
}


def test_the_built_ins_are_registered():
    assert {"fedavg", "fedprox", "fedadam", "fedyogi"} <= set(known_strategies())
    config = SimulationConfig.model_validate({"strategy": {"name": "fedprox", "mu": 0.5}, "participation": {"min_sites": 2}})
    strategy = strategy_from_config(config)
    assert isinstance(strategy, FedAvg) and strategy.proximal_mu == 0.5 and strategy.min_sites == 2


def test_an_unknown_name_is_refused_at_config_time_naming_the_known_ones():
    with pytest.raises(ValueError, match="unknown strategy 'fedmagic': choose one of .*fedavg.*test-halfstep"):
        SimulationConfig.model_validate({"strategy": {"name": "fedmagic"}})


def test_a_name_is_registered_once():
    with pytest.raises(ConfigError, match="already registered"):
        register_strategy("fedavg", _factory)


@pytest.mark.parametrize("name", sorted(set(known_strategies()) | {NAME}))
def test_every_registered_strategy_keeps_the_contract(name):
    # The contract every strategy keeps, whoever wrote it: a cohort drawn from the members without
    # repeats, a new float32 model of the same length with the current one untouched, a JSON description
    # that names it, and a state that a checkpoint carries over.
    config = SimulationConfig.model_validate({"strategy": {"name": name}, "participation": {"min_sites": 2}})
    strategy, twin = strategy_from_config(config), strategy_from_config(config)
    assert isinstance(strategy, Strategy) and strategy is not twin and strategy.min_sites == 2
    sites = [f"s{i}" for i in range(5)]
    cohort = strategy.select(1, sites, np.random.default_rng(0))
    assert set(cohort) <= set(sites) and len(set(cohort)) == len(cohort) >= strategy.min_sites
    assert strategy.weighting in ("examples", "uniform") and strategy.proximal_mu >= 0
    params = np.linspace(-1, 1, 7, dtype=np.float32)
    before = params.copy()
    update = np.full(7, 0.1, dtype=np.float32)
    new = strategy.apply(1, params, update)
    assert new.dtype == np.float32 and new.shape == params.shape and np.array_equal(params, before)
    assert json.loads(json.dumps(strategy.describe()))["name"] == name
    twin.load_state({k: v.copy() for k, v in strategy.state().items()})
    assert np.array_equal(strategy.apply(2, new, update), twin.apply(2, new, update))


def test_a_registered_strategy_runs_a_secure_private_simulation_that_verifies(tmp_path):
    BUILT.clear()
    result = run_simulation(SimulationConfig.model_validate(CONFIG), out=tmp_path / "run")
    assert result.summary["status"] == "completed", result.summary.get("halt")
    assert len(BUILT) == 1 and BUILT[0].selected == [1, 2] and BUILT[0].applied == [1, 2]
    assert result.summary["strategy"]["name"] == NAME
    report = verify_run(tmp_path / "run")
    assert report.status == "completed" and report.rounds == 2
    assert report.epsilon_per_site  # DP was on: each site signed what it paid
