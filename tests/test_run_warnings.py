"""What a run says when its model is useless: before training (site-level DP whose noise swamps what the
sites can send), and after (no better than a constant, or than a site training alone)."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from consortium.config import SimulationConfig
from consortium.data import SyntheticHospitals, synthetic_hospitals
from consortium.run.orchestrator import baseline_warnings
from consortium.run.plan import plan_run
from tests import forkserver


@pytest.fixture(scope="module")
def sample():
    return synthetic_hospitals(1, SyntheticHospitals(), np.random.default_rng(0))[0]


def _plan(sample, sites: int, **privacy):
    config = SimulationConfig.model_validate({
        "rounds": 20, "data": {"dataset": "synthetic-hospitals", "sites": sites},
        "privacy": {"level": "site", "epsilon": 8.0, **privacy},
    })
    return plan_run(config, sample=sample, names=[f"hospital-{k}" for k in range(sites)])


def test_site_level_noise_that_swamps_five_sites_is_said_before_training_and_not_for_two_hundred(sample):
    few = _plan(sample, 5)
    (warning,) = few.warnings
    event = few.privacy.event
    m, d, c = 5, few.model_size, event.cohort  # distributed noise: every site adds its share, calibrated for c
    ratio = event.noise_multiplier * np.sqrt(d) * np.sqrt(m / c) / m
    assert ratio > 1 and f"about {ratio:.1f}x the largest sum the 5 sites' clipped updates can reach" in warning
    assert f"over {d:,} parameters" in warning and "use record-level DP" in warning
    many = _plan(sample, 200, noise="central")  # z C on the sum, whatever the cohort
    assert many.privacy.event.noise_multiplier * np.sqrt(d) / 200 < 1 and many.warnings == ()
    assert _plan(sample, 200).warnings == ()  # distributed noise too, though each site adds its share
    assert plan_run(SimulationConfig.model_validate({"data": {"dataset": "synthetic-hospitals", "sites": 5}}),
                    sample=sample, names=["a", "b", "c", "d", "e"]).warnings == ()  # record level: not this estimate


def test_a_federated_model_worse_than_a_site_alone_is_named(sample):
    def summary(fed, local, headline="accuracy", private=True):
        return {"federated": {headline: fed}, "local_only": {f"{headline}_mean": local}, "privacy": {"enabled": private}}

    (worse,) = baseline_warnings(summary(0.57, 0.65), "accuracy")
    assert "no better than a site training alone: accuracy 0.57 against the local-only mean 0.65" in worse
    assert "local models that are not private" in worse
    assert baseline_warnings(summary(0.70, 0.65), "accuracy") == []
    assert baseline_warnings(summary(3500.0, 3400.0, "mse", False), "mse")  # MSE: lower is better
    assert baseline_warnings(summary(3300.0, 3400.0, "mse"), "mse") == []
    assert baseline_warnings({"federated": {"accuracy": 0.5}, "privacy": {}}, "accuracy") == []  # no baseline run


def test_the_command_line_warns_before_training_once_and_the_summary_keeps_every_warning(tmp_path):
    (tmp_path / "run.yaml").write_text(
        "rounds: 1\ndata: {dataset: synthetic-hospitals, sites: 5}\nprivacy: {level: site, epsilon: 8.0, test_seed: 3}\n"
        "baselines: {local_only: true, pooled: false}\n"
    )
    proc = forkserver.run([sys.executable, "-m", "consortium.cli", "simulate", str(tmp_path / "run.yaml"), "--out",
                           str(tmp_path / "run"), "--json"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    err = " ".join(proc.stderr.split())
    assert err.count("site-level DP: each round's noise") == 1 and "WARNING (before training): site-level DP" in err
    warnings = json.loads(proc.stdout)["warnings"]
    assert any(w.startswith("site-level DP: each round's noise") for w in warnings)
    assert any("no better than predicting the majority class" in w for w in warnings)  # at chance, and said
    assert any("no better than a site training alone" in w for w in warnings)
