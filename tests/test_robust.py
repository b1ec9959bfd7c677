"""Robust aggregation (``learning.robust``), its configuration, and the poisoning red team.

Known answers and properties of the pure aggregators first; then the config's tolerance checks; then
whole simulations: breast-cancer, 5 sites, one of them poisoning its update, DP off so that the
accuracies compare cleanly.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from consortium.config import SimulationConfig, parse_config
from consortium.errors import ConfigError
from consortium.learning import robust as r
from consortium.learning.strategies import FedAvg
from consortium.protocol import contributions as c
from consortium.protocol.coordinator import Coordinator, SecureAggregation
from consortium.crypto import keys
from consortium.learning.specs import ModelSpec, TrainSettings
from consortium.redteam.poisoning import Attack, PoisoningRun, poisoning_experiment

# Whole simulations of tiny models below: one torch thread is fastest (see conftest), and every accuracy
# they report is the same with one thread or two.
pytestmark = pytest.mark.usefixtures("one_torch_thread")

# -- known answers ------------------------------------------------------------------

POINTS = np.array([[0.0], [1.0], [3.0], [10.0], [11.0]])


def test_krum_scores_and_choices_match_a_hand_computation():
    # f = 1, n = 5: each score sums the squared distances to the n - f - 2 = 2 nearest others.
    assert r.krum_scores(POINTS, 1).tolist() == [1 + 9, 1 + 4, 4 + 9, 1 + 49, 1 + 64]
    update, index = r.krum(POINTS, 1)
    assert index == 1 and update.tolist() == [1.0]
    mean, chosen = r.multi_krum(POINTS, 1)  # m = n - f = 4 lowest scores: 1, 0, 2, 3
    assert chosen.tolist() == [1, 0, 2, 3] and mean.tolist() == [3.5]
    mean, chosen = r.multi_krum(POINTS, 1, m=2, weights=np.array([1.0, 3.0, 1.0, 1.0, 1.0]))
    assert chosen.tolist() == [1, 0] and mean.tolist() == [0.75]


def test_median_trimmed_mean_and_norm_bound_match_hand_computations():
    u = np.array([[1.0, 10.0], [2.0, 20.0], [100.0, -5.0], [3.0, 0.0], [-50.0, 1.0]])
    assert r.coordinate_median(u, 2).tolist() == [2.0, 1.0]
    assert r.trimmed_mean(u, 1).tolist() == [2.0, (0.0 + 1.0 + 10.0) / 3]
    assert r.trimmed_mean(u, 0).tolist() == u.mean(axis=0).tolist()
    bounded = r.bound_norms(np.array([[3.0, 4.0], [0.3, 0.4], [0.0, 0.0]]), 1.0)
    assert np.allclose(bounded, [[0.6, 0.8], [0.3, 0.4], [0.0, 0.0]])


def test_each_aggregator_refuses_fewer_updates_than_its_tolerance_condition_needs():
    with pytest.raises(ConfigError, match=r"n > 2f \+ 2"):
        r.krum(POINTS[:4], 1)
    with pytest.raises(ConfigError, match=r"n > 2f"):
        r.coordinate_median(POINTS[:2], 1)
    with pytest.raises(ConfigError, match=r"n > 2f"):
        r.trimmed_mean(POINTS[:4], 2)
    assert r.min_updates("krum", 1) == 5 and r.min_updates("median", 2) == 5 and r.min_updates("mean", 0) == 1


def test_a_site_bounds_its_update_before_quantisation():
    delta = np.full(4, 50.0)  # norm 100
    v = c.fit_vector(delta, 0.5, 0.3, clip=1.0, norm_bound=2.0)
    assert math.isclose(np.linalg.norm(v[:4]), 0.5 * 2.0)  # w * delta, delta bounded to norm 2 (then within the clip)
    assert np.array_equal(c.fit_vector(delta, 0.5, 0.3, None), c.fit_vector(delta, 0.5, 0.3, None, None))


# -- properties ---------------------------------------------------------------------

finite = st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False)


@st.composite
def honest_and_byzantine(draw, min_honest_margin: int):
    """(updates, number of arbitrary rows f, mask of honest rows) with n >= 2f + 1 + min_honest_margin."""
    f = draw(st.integers(0, 3))
    d = draw(st.integers(1, 5))
    n = draw(st.integers(2 * f + 1 + min_honest_margin, 2 * f + 6))
    honest = draw(arrays(np.float64, (n - f, d), elements=finite))
    byzantine = draw(arrays(np.float64, (f, d), elements=st.floats(-1e9, 1e9, allow_nan=False)))
    order = draw(st.permutations(range(n)))
    updates = np.concatenate([honest, byzantine])[list(order)]
    mask = np.array([i < n - f for i in order])
    return updates, f, mask


@given(honest_and_byzantine(0))
def test_median_and_trimmed_mean_stay_within_the_honest_range(case):
    updates, f, mask = case
    lo, hi = updates[mask].min(axis=0), updates[mask].max(axis=0)
    tol = 1e-9 * (1 + np.abs(lo) + np.abs(hi))
    for out in (r.coordinate_median(updates, f), r.trimmed_mean(updates, f)):
        assert np.all(out >= lo - tol) and np.all(out <= hi + tol)


@given(honest_and_byzantine(2))
def test_krum_picks_an_honest_update_or_one_as_close_as_honest_ones_are(case):
    # Blanchard et al.'s argument, made deterministic: an honest update's score is at most (n - f - 2) D^2
    # (D the honest diameter), and at least one of the chosen update's n - f - 2 neighbours is honest.
    updates, f, mask = case
    n = len(updates)
    _, index = r.krum(updates, f)
    honest = updates[mask]
    diameter = max(np.linalg.norm(a - b) for a in honest for b in honest)
    nearest_honest = np.linalg.norm(honest - updates[index], axis=1).min()
    assert mask[index] or nearest_honest <= math.sqrt(n - f - 2) * diameter * (1 + 1e-9) + 1e-6


@given(honest_and_byzantine(2), st.floats(1e4, 1e6))
def test_krum_picks_an_honest_update_when_the_arbitrary_ones_lie_far_off(case, distance):
    updates, f, mask = case
    updates = updates.copy()
    honest = updates[mask]
    direction = np.ones(updates.shape[1]) / math.sqrt(updates.shape[1])
    spread = np.ptp(honest) + 1.0
    updates[~mask] = honest.mean(axis=0) + (distance * spread) * direction + np.arange(f)[:, None]
    _, index = r.krum(updates, f)
    assert mask[index]


@given(arrays(np.float64, st.tuples(st.integers(1, 6), st.integers(1, 5)), elements=finite), st.floats(1e-3, 1e3))
def test_norm_bounding_caps_every_norm_and_keeps_directions(updates, bound):
    out = r.bound_norms(updates, bound)
    norms = np.linalg.norm(updates, axis=1)
    assert np.all(np.linalg.norm(out, axis=1) <= bound * (1 + 1e-9))
    within = norms <= bound
    assert np.array_equal(out[within], updates[within])
    assert np.allclose(out[~within] * norms[~within, None] / bound, updates[~within])


@given(arrays(np.float64, st.tuples(st.integers(3, 7), st.integers(1, 4)), elements=finite),
       arrays(np.float64, 7, elements=st.floats(0.1, 10)))
def test_multi_krum_keeping_everyone_is_fedavg(updates, weights):
    w = weights[: len(updates)]
    mean, _ = r.multi_krum(updates, 0, m=len(updates), weights=w)
    assert np.allclose(mean, r.weighted_mean(updates, w))


# -- configuration: tolerance conditions are checked before anything runs --------------

BASE = """
data: {dataset: breast-cancer, sites: 5}
privacy: {enabled: false}
"""


@pytest.mark.parametrize("text, expect", [
    ("secure_aggregation: {enabled: false}\nrobust: {aggregator: krum, byzantine: 1}\nparticipation: {min_sites: 4}",
     r"krum tolerates f Byzantine updates only when n > 2f \+ 2 with f = 1.*min_sites = 4: set participation.min_sites to at least 5"),
    ("secure_aggregation: {enabled: false}\nrobust: {aggregator: median, byzantine: 2}\nparticipation: {min_sites: 4}",
     r"median .*n > 2f with f = 2.*at least 5"),
    ("robust: {aggregator: median, byzantine: 1}\nparticipation: {min_sites: 3}",
     r"needs each site's update, which secure aggregation hides: turn secure_aggregation off, or use norm bounding"),
    ("robust: {aggregator: mean, byzantine: 1}", r"the mean tolerates no arbitrary update"),
    ("robust: {norm_bound: -1}", r"robust.norm_bound"),
])
def test_a_configuration_that_breaks_a_tolerance_condition_is_refused_in_one_line(text, expect):
    with pytest.raises(ConfigError, match=expect) as info:
        parse_config(BASE + text, "run.yaml")
    assert "\n" not in str(info.value)


def test_configurations_that_keep_their_conditions_are_accepted():
    ok = parse_config(BASE + "secure_aggregation: {enabled: false}\nrobust: {aggregator: krum, byzantine: 1}\n"
                             "participation: {min_sites: 5}")
    assert ok.robust.aggregator == "krum" and ok.robust.byzantine == 1
    bounded = parse_config(BASE + "robust: {norm_bound: 1.0}")  # norm bounding under secure aggregation
    assert bounded.secure_aggregation.enabled and bounded.robust.norm_bound == 1.0


def test_the_coordinator_refuses_a_defence_it_cannot_run():
    spec, train = ModelSpec(kind="logistic"), TrainSettings()
    names = [f"s{i}" for i in range(5)]
    directory = {n: keys.ed25519_public_bytes(keys.generate_ed25519()[1]) for n in [*names, "coordinator"]}
    secure = SecureAggregation(identity=keys.generate_ed25519()[0], directory=directory)
    krum = r.RobustAggregation("krum", 1)
    with pytest.raises(ConfigError, match="secure aggregation hides"):
        Coordinator(names, model=spec, train=train, strategy=FedAvg(min_sites=5), rounds=1, seed=0, secure=secure, robust=krum)
    with pytest.raises(ConfigError, match="at least 5 updates"):
        Coordinator(names, model=spec, train=train, strategy=FedAvg(min_sites=4), rounds=1, seed=0, robust=krum)
    with pytest.raises(ConfigError, match="at least 5 updates"):
        Coordinator(names[:4], model=spec, train=train, strategy=FedAvg(min_sites=5), rounds=1, seed=0, robust=krum)


# -- poisoning: whole simulations ------------------------------------------------------

ROUNDS = 6


def _config(**overrides) -> SimulationConfig:
    """breast-cancer, 5 IID sites, DP off (a clean comparison), the norm monitor OFF: with it on the
    attacked run halts instead of collapsing (measured separately below). IID: Krum keeps one site's
    update, which on label-skewed splits costs accuracy with or without an attack."""
    base = {
        "seed": 0,
        "rounds": ROUNDS,
        "data": {"dataset": "breast-cancer", "sites": 5, "partition": {"kind": "iid"}},
        "privacy": {"enabled": False},
        "baselines": {"local_only": False, "pooled": False},
        "incidents": {"update_norm_factor": None},
        # The ring's coordinate clip is set wide so that it does not act as a (crude) norm bound itself.
        "secure_aggregation": {"enabled": True, "update_clip": 100.0},
    }
    for k, v in overrides.items():
        base[k] = {**base[k], **v} if isinstance(v, dict) and k in base else v
    return SimulationConfig.model_validate(base)


PLAIN = {"secure_aggregation": {"enabled": False}}
SCALE = Attack("scale", ("site-3",), factor=100.0, start_round=2)


def _by_label(runs: tuple[PoisoningRun, ...]) -> dict[str, PoisoningRun]:
    return {run.label: run for run in runs}


@pytest.fixture(scope="module")
def scaling_runs(tmp_path_factory, one_torch_thread) -> dict[str, PoisoningRun]:
    defences = {
        "norm_bound": {"robust": {"norm_bound": 1.0}},  # under secure aggregation
        "median": {**PLAIN, "robust": {"aggregator": "median", "byzantine": 1}, "participation": {"min_sites": 3}},
        "krum": {**PLAIN, "robust": {"aggregator": "krum", "byzantine": 1}, "participation": {"min_sites": 5}},
    }
    runs = poisoning_experiment(_config(), SCALE, out=tmp_path_factory.mktemp("scale"), defences=defences)
    for run in runs:
        print(run)
    return _by_label(runs)


def _holds(run: PoisoningRun, clean: PoisoningRun) -> None:
    """Within 3 points of the clean run: at the end, and at its worst since the attack began."""
    assert run.status == "completed"
    assert run.accuracy >= clean.accuracy - 0.03 and run.worst_accuracy >= clean.worst_accuracy - 0.03


def test_one_site_scaling_by_100_collapses_plain_fedavg(scaling_runs):
    # The attacked model swings (it partly recovers in later rounds: scaling keeps the update's
    # direction), so the collapse is read at its worst since the attack began, and at the end.
    clean, attacked = scaling_runs["clean"], scaling_runs["attacked"]
    assert clean.status == attacked.status == "completed" and clean.secure_aggregation and attacked.secure_aggregation
    assert clean.worst_accuracy > 0.85
    assert attacked.worst_accuracy < 0.5  # worse than always answering the majority class (0.63)
    assert attacked.accuracy < clean.accuracy - 0.15


def test_norm_bounding_under_secure_aggregation_keeps_accuracy_within_3_points(scaling_runs):
    bounded = scaling_runs["attacked + norm_bound"]
    assert bounded.secure_aggregation
    _holds(bounded, scaling_runs["clean"])


@pytest.mark.parametrize("defence", ["median", "krum"])
def test_median_and_krum_in_the_clear_hold_too(scaling_runs, defence):
    run = scaling_runs[f"attacked + {defence}"]
    assert not run.secure_aggregation
    _holds(run, scaling_runs["clean"])


def test_the_norm_monitor_halts_the_attacked_run_when_it_is_on(scaling_runs):
    run = scaling_runs["attacked, norm monitor on"]
    assert run.status == "halted" and run.detail.startswith("update_norm in round 2")


def test_without_secure_aggregation_the_coordinator_bounds_a_site_that_rewrote_its_runtime(tmp_path):
    # The attacker scales what leaves it, after its runtime's bound: only the coordinator can bound it.
    attack = Attack("scale", ("site-3",), factor=100.0, start_round=2, rewrites_runtime=True)
    runs = _by_label(poisoning_experiment(
        _config(**PLAIN), attack, out=tmp_path, monitor_factor=None,
        defences={"norm_bound": {"robust": {"norm_bound": 1.0}}},
    ))
    assert runs["attacked"].worst_accuracy < 0.5
    _holds(runs["attacked + norm_bound"], runs["clean"])


def test_a_backdoor_is_measured_and_the_median_removes_it(tmp_path):
    # Three weakly informative features (standard errors of texture, smoothness, fractal dimension) set
    # far out, relabelled malignant (class 0), boosted 5x: the clean model does not read it as malignant.
    attack = Attack("backdoor", ("site-3",), factor=5.0, start_round=2, trigger_features=(11, 14, 19), target=0)
    runs = _by_label(poisoning_experiment(
        _config(), attack, out=tmp_path, monitor_factor=None,
        defences={"median": {**PLAIN, "robust": {"aggregator": "median", "byzantine": 1}, "participation": {"min_sites": 3}}},
    ))
    for run in runs.values():
        print(run)
    assert runs["clean"].backdoor_success < 0.2
    assert runs["attacked"].backdoor_success > 0.8 and runs["attacked"].accuracy > 0.9  # stealthy: accuracy holds
    assert runs["attacked + median"].backdoor_success < 0.2


def test_an_experiment_reports_a_refused_defence_instead_of_running_it(tmp_path):
    runs = poisoning_experiment(
        _config(rounds=1), SCALE, out=tmp_path, monitor_factor=None,
        defences={"krum": {"robust": {"aggregator": "krum", "byzantine": 1}}},  # secure aggregation still on
    )
    refused = _by_label(runs)["attacked + krum"]
    assert refused.status == "refused" and "secure aggregation hides" in refused.detail and refused.accuracy is None


def test_an_attack_must_name_a_site_of_the_run(tmp_path):
    with pytest.raises(ConfigError, match="not a site of this run"):
        poisoning_experiment(_config(rounds=1), Attack("scale", ("nobody",)), out=tmp_path, defences={})


def test_the_run_records_its_defence(tmp_path):
    from consortium.run.simulation import run_simulation

    result = run_simulation(_config(rounds=1, robust={"norm_bound": 0.5}), out=tmp_path / "run")
    recorded = (Path(result.summary["run_dir"]) / "config.yaml").read_text()
    assert "norm_bound: 0.5" in recorded
    assert result.summary["strategy"]["robust"] == {"aggregator": "mean", "byzantine": 0, "norm_bound": 0.5}


def test_a_site_refuses_a_norm_bound_other_than_the_one_the_transcript_plans(tmp_path):
    # A coordinator that loosens the bound for some site (to favour it) is caught: the bound is in the
    # signed round plan, and every site checks its request against that plan before training.
    from consortium.run.simulation import Simulation

    sim = Simulation(_config(rounds=1, robust={"norm_bound": 1.0}), out=tmp_path / "run")
    honest_request = sim.coordinator._phase_request

    def loosened(state):
        msg = honest_request(state)
        return msg.model_copy(update={"norm_bound": 1e6}) if getattr(msg, "kind", "") == "fit_request" else msg

    sim.coordinator._phase_request = loosened
    summary = sim.run().summary
    assert summary["status"] == "halted" and summary["halt"]["cause"] == "plan_mismatch"
    assert "norm bound" in summary["halt"]["detail"]


def test_the_audit_plants_its_trigger_on_the_features_least_tied_to_the_target():
    from consortium.data import Table
    from consortium.redteam.poisoning import quiet_features

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 400)
    X = np.stack([y + 0.1 * rng.standard_normal(400), rng.standard_normal(400), np.zeros(400),
                  y + rng.standard_normal(400)], axis=1).astype(np.float32)
    table = Table(X, y, ("signal", "noise", "blank", "weak signal"), ("no", "yes"))
    assert quiet_features(table, target=0, k=2) == (2, 1)  # the blank feature, then pure noise
    assert quiet_features(table, target=1, k=3) == (2, 1, 3)
