"""Site-level DP (DP-FedAvg): Skellam accounting against a high-precision reference, noise levels,
reduction to plain FedAvg, adaptive clipping, and the checks a site makes before adding its noise."""

import math

import dp_accounting
import mpmath
import numpy as np
import pytest
from dp_accounting import pld

from consortium.config import SimulationConfig
from consortium.crypto import keys
from consortium.errors import ConfigError
from consortium.learning.models import ModelSpec
from consortium.learning.strategies import FedAvg
from consortium.learning.training import TrainSettings
from consortium.privacy import skellam
from consortium.privacy.accountant import PLD_INTERVAL, calibrate_site_noise, epsilon
from consortium.privacy.events import RecordLevelEvent, SiteLevelEvent, parse_event
from consortium.privacy.ledger import BudgetExceeded, BudgetLedger
from consortium.privacy.sitedp import AdaptiveClipping, SiteLevelDP
from consortium.protocol import contributions as c
from consortium.protocol import messages as m
from consortium.protocol.coordinator import COORDINATOR, Coordinator, SecureAggregation
from consortium.protocol.loop import RoundLoop
from consortium.protocol.site import Site
from consortium.secagg.encoding import SkellamEncoding
from consortium.simulation import run_simulation
from consortium.transport import InProcessTransport
from tests.conftest import make_splits

# -- the Skellam RDP bound ----------------------------------------------------------


def _exact_skellam_rdp(order: int, shift: int, variance: float) -> float:
    """D_order(Sk(variance) + shift || Sk(variance)), summed term by term at 40 digits.

    Sk(mu) = Poisson(mu/2) - Poisson(mu/2) has P(k) = exp(-mu) I_|k|(mu).
    """
    mpmath.mp.dps = 40
    mu = mpmath.mpf(variance)

    def p(k: int) -> mpmath.mpf:
        return mpmath.exp(-mu) * mpmath.besseli(abs(k), mu)

    reach = int(shift + 60 * math.sqrt(variance) + 60)
    total = mpmath.fsum(p(k - shift) ** order * p(k) ** (1 - order) for k in range(-reach, reach + 1))
    return float(mpmath.log(total) / (order - 1))


@pytest.mark.parametrize("variance", [4.0, 20.0, 100.0])
@pytest.mark.parametrize("shift", [1, 3])
@pytest.mark.parametrize("order", [2, 5, 16])
def test_skellam_bound_holds_against_the_exact_divergence(variance, shift, order):
    exact = _exact_skellam_rdp(order, shift, variance)
    bound = skellam.skellam_rdp(order, shift, shift, variance)  # one coordinate: L1 = L2 = shift
    assert exact <= bound
    if variance >= 100:  # and it is tight once the noise is large: the Gaussian term dominates
        assert bound <= 1.1 * exact


def test_skellam_bound_known_answers():
    # alpha D2^2 / (2 mu) + min(((2 alpha - 1) D2^2 + 6 D1) / (4 mu^2), 3 D1 / (2 mu)), by hand:
    assert skellam.skellam_rdp(2, 1, 1, 10) == pytest.approx(0.1 + 9 / 400, rel=1e-12)
    assert skellam.skellam_rdp(3, 4, 2, 1) == pytest.approx(6.0 + min((20 + 24) / 4, 6.0), rel=1e-12)
    with pytest.raises(ValueError):
        skellam.skellam_rdp(2.5, 1, 1, 10)  # the bound is proven for integer orders only


def test_planned_skellam_meets_its_target_tightly_and_approaches_the_gaussian():
    noise = skellam.plan_skellam(target_epsilon=3.0, delta=1e-5, rounds=10, dim=1000, cohort=4, max_sites=8, bits=32)
    assert skellam.skellam_epsilon(noise, 10, 1e-5) <= 3.0
    assert skellam.ring_headroom_ok(noise, n_sites=8, cohort=4, dim=1000, bits=32)
    # With 2^20 units per clip the integer price is negligible: the multiplier is the Gaussian one under RDP.
    z = skellam.noise_multiplier_of(noise)
    gaussian = dp_accounting.rdp.RdpAccountant(skellam.ORDERS).compose(
        dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(z), 10)
    )
    assert gaussian.get_epsilon(1e-5) == pytest.approx(3.0, rel=0.01)


def test_a_ring_too_small_for_the_noise_is_refused():
    with pytest.raises(ConfigError, match="bits"):
        skellam.plan_skellam(target_epsilon=1.0, delta=1e-5, rounds=50, dim=10_000, cohort=10, max_sites=1000, bits=16)


def test_conditional_rounding_meets_its_bound_and_is_unbiased():
    rng = np.random.default_rng(0)
    x = rng.standard_normal(400)
    x *= 50 / np.linalg.norm(x)
    bound = skellam.rounded_l2_bound(50.0, 400)
    draws = np.stack([skellam.conditional_round(x, bound, rng) for _ in range(2000)])
    assert np.all(np.linalg.norm(draws, axis=1) <= bound)
    assert np.abs(draws.mean(axis=0) - x).max() < 0.1  # per-coordinate std of the mean ~ 0.5 / sqrt(2000)


# -- noise levels: measured within 15% of theory ------------------------------------------


def test_distributed_noise_in_the_decoded_sum_matches_theory():
    noise = skellam.plan_skellam(target_epsilon=2.0, delta=1e-5, rounds=5, dim=3000, cohort=3, max_sites=5, bits=32)
    enc = SkellamEncoding(bits=32, clip=0.5, cohort=3, noise=noise)
    rng, secret = np.random.default_rng(1), np.random.default_rng(2)
    n = 5
    words = [enc.encode(np.zeros(3000), n, rng, secret) for _ in range(n)]
    total = np.zeros(3000, dtype=np.uint64)
    for w in words:
        total = (total + w.astype(np.uint64)) & np.uint64((1 << 32) - 1)
    decoded = enc.decode_sum(total.astype(np.uint32), n)
    theory = math.sqrt(noise.variance * n / 3) / enc.scale  # n sites each adding variance / cohort
    assert decoded.std() == pytest.approx(theory, rel=0.15)
    assert abs(decoded.mean()) < 4 * theory / math.sqrt(3000)


def test_central_noise_in_the_released_mean_matches_theory():
    event = SiteLevelEvent(mechanism="dp-fedavg-gaussian", noise_multiplier=1.3, clip=0.7, cohort=4)
    dp = SiteLevelDP(template=event, noise_rng=np.random.default_rng(5))
    mean, fraction = dp.release(np.zeros(5000), 5000, 4)
    assert fraction is None
    assert mean.std() == pytest.approx(1.3 * 0.7 / 4, rel=0.15)


# -- accounting of site-level events ---------------------------------------------------


def test_gaussian_site_events_compose_like_dp_accounting():
    z, count_z = calibrate_site_noise(target_epsilon=4.0, delta=1e-5, rounds=12)
    assert count_z is None
    ev = SiteLevelEvent(mechanism="dp-fedavg-gaussian", noise_multiplier=z, clip=1.0, cohort=5)
    direct = pld.PLDAccountant(value_discretization_interval=PLD_INTERVAL).compose(
        dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(z), 12)
    )
    # Rounds at different clips (adaptive clipping) cost the same: the clip is a unit.
    rounds = [ev.model_copy(update={"clip": 0.5 + 0.1 * i}) for i in range(12)]
    assert epsilon(rounds, 1e-5) == pytest.approx(direct.get_epsilon(1e-5), rel=1e-9)
    assert epsilon(rounds, 1e-5) <= 4.0


def test_the_clipped_count_is_paid_for_and_the_split_keeps_the_total():
    z_update, z_count = calibrate_site_noise(target_epsilon=4.0, delta=1e-5, rounds=12, count_share=0.2)
    plain, _ = calibrate_site_noise(target_epsilon=4.0, delta=1e-5, rounds=12)
    assert z_update > plain  # the update gets less of the budget...
    with_count = SiteLevelEvent(
        mechanism="dp-fedavg-gaussian", noise_multiplier=z_update, clip=1.0, cohort=5, count_noise_multiplier=z_count
    )
    without = with_count.model_copy(update={"count_noise_multiplier": None})
    eps_with, eps_without = epsilon([with_count] * 12, 1e-5), epsilon([without] * 12, 1e-5)
    assert eps_with <= 4.0 < eps_with + 0.01  # ...and the two releases together spend the whole target
    assert eps_without < eps_with - 0.2  # leaving the count out would under-report


def test_skellam_events_are_accounted_in_rdp_and_never_mix_with_record_level(tmp_path):
    noise = skellam.plan_skellam(target_epsilon=2.0, delta=1e-5, rounds=4, dim=100, cohort=2, max_sites=3, bits=32)
    ev = SiteLevelEvent(
        mechanism="dp-fedavg-skellam", noise_multiplier=skellam.noise_multiplier_of(noise), clip=1.0, cohort=2, skellam=noise
    )
    assert epsilon([ev] * 4, 1e-5) == pytest.approx(skellam.skellam_epsilon(noise, 4, 1e-5), rel=1e-9)
    assert parse_event(ev.model_dump_json()) == ev
    ledger = BudgetLedger(tmp_path / "b.sqlite", site="a", epsilon_cap=2.0, delta=1e-5)
    for rnd in range(1, 5):
        ledger.spend(ev, rnd=rnd)
    with pytest.raises(BudgetExceeded):
        ledger.spend(ev, rnd=5)
    reopened = BudgetLedger(tmp_path / "b.sqlite", site="a", epsilon_cap=2.0, delta=1e-5)
    assert reopened.events() == [ev] * 4 and reopened.spent() <= 2.0
    record = RecordLevelEvent(noise_multiplier=5.0, clip=1.0, sampling_rate=0.01, steps=1)
    decision = reopened.check(record)
    assert not decision.accepted and "one level" in decision.reason
    with pytest.raises(ConfigError, match="do not compose"):
        epsilon([ev, record], 1e-5)


# -- DP-FedAvg through the protocol -------------------------------------------------------


def _consortium(rng, privacy, *, secure: bool, n_sites=4, rounds=3, strategy=None):
    names = [f"s{i}" for i in range(n_sites)]
    ids = {u: keys.generate_ed25519()[0] for u in [*names, COORDINATOR]}
    directory = {u: keys.ed25519_public_bytes(k.public_key()) for u, k in ids.items()}
    splits = [make_splits(rng) for _ in names]
    sites = {
        u: Site(u, sp, seed=i, identity=ids[u], directory=directory, noise_test_seed=i)
        for i, (u, sp) in enumerate(zip(names, splits))
    }
    coord = Coordinator(
        names, model=ModelSpec(kind="mlp", hidden=(8,)), train=TrainSettings(lr=0.1, batch_size=16),
        strategy=strategy or FedAvg(weighting="uniform"), rounds=rounds, seed=0,
        secure=SecureAggregation(identity=ids[COORDINATOR], directory=directory) if secure else None,
        privacy=privacy,
    )
    return sites, coord, InProcessTransport(sites, dropout=0.0, rng=np.random.default_rng(3))


def _run(sites, coord, transport):
    history = RoundLoop().run(coord, transport)
    return history, coord.params


def test_zero_noise_and_an_unbounded_clip_reproduce_plain_fedavg():
    plain_hist, plain = _run(*_consortium(np.random.default_rng(7), None, secure=False))
    event = SiteLevelEvent(mechanism="dp-fedavg-gaussian", noise_multiplier=0.0, clip=1e6, cohort=4)
    dp = SiteLevelDP(template=event, noise_rng=np.random.default_rng(0))
    dp_hist, private = _run(*_consortium(np.random.default_rng(7), dp, secure=False))
    assert all(r.status == "ok" for r in dp_hist) and [r.privacy["clip"] for r in dp_hist] == [1e6] * 3
    np.testing.assert_allclose(private, plain, atol=1e-6)
    assert dp_hist[-1].train_loss is None and plain_hist[-1].train_loss is not None  # no unaccounted loss release


def test_near_zero_distributed_noise_reproduces_plain_fedavg_through_secure_aggregation():
    plain_hist, plain = _run(*_consortium(np.random.default_rng(7), None, secure=True))
    noise = skellam.SkellamNoise(
        scale_clip=1 << 20, l2_bound=float(1 << 21), variance=1e-9, l2_sensitivity=float(1 << 21), l1_sensitivity=1.0
    )
    event = SiteLevelEvent(mechanism="dp-fedavg-skellam", noise_multiplier=0.0, clip=10.0, cohort=3, skellam=noise)
    dp = SiteLevelDP(template=event, noise_rng=np.random.default_rng(0))
    hist, private = _run(*_consortium(np.random.default_rng(7), dp, secure=True))
    assert all(r.status == "ok" for r in hist)
    np.testing.assert_allclose(private, plain, atol=1e-4)  # 2^20 units per 10: rounding is ~1e-5


def _to_fit_session(coord, transport):
    loop = RoundLoop()
    while coord.stage != "fit:advertise_keys":
        loop.step(coord, transport)
    return loop


def _noisy_dp(sites_count=4):
    noise = skellam.plan_skellam(target_epsilon=4.0, delta=1e-5, rounds=3, dim=65, cohort=3, max_sites=sites_count, bits=32)
    event = SiteLevelEvent(
        mechanism="dp-fedavg-skellam", noise_multiplier=skellam.noise_multiplier_of(noise), clip=1.0, cohort=3, skellam=noise
    )
    return SiteLevelDP(template=event, noise_rng=np.random.default_rng(0))


def test_a_site_refuses_a_session_that_drops_the_noise_it_paid_for(rng):
    sites, coord, transport = _consortium(rng, _noisy_dp(), secure=True)
    loop = _to_fit_session(coord, transport)
    st = coord._state
    quiet = c.fit_encoding(1.0, 4, 32)  # a coordinator swapping the noisy encoding for a plain one
    st.outgoing = {u: msg.model_copy(update={"encoding": quiet}) for u, msg in st.outgoing.items()}
    loop.step(coord, transport)
    assert set(st.refused) == set(sites)
    assert all("does not add the noise" in why for why in st.refused.values())


def test_a_site_refuses_a_threshold_below_the_noise_cohort(rng):
    sites, coord, transport = _consortium(rng, _noisy_dp(), secure=True)
    loop = _to_fit_session(coord, transport)
    st = coord._state
    assert all(msg.params.threshold >= 3 for msg in st.outgoing.values())  # raised to the cohort
    low = {u: msg.model_copy(update={"params": msg.params.model_copy(update={"threshold": 2})}) for u, msg in st.outgoing.items()}
    st.outgoing = low
    loop.step(coord, transport)
    assert all("threshold 2" in why for why in st.refused.values()) and set(st.refused) == set(sites)


def test_a_site_refuses_a_noisy_session_it_did_not_pay_for(rng):
    sites, coord, transport = _consortium(rng, None, secure=True)
    loop = _to_fit_session(coord, transport)
    st = coord._state
    noisy = _noisy_dp().encoding(_noisy_dp().event(), 4, 32)
    st.outgoing = {u: msg.model_copy(update={"encoding": noisy}) for u, msg in st.outgoing.items()}
    loop.step(coord, transport)
    assert all("did not pay for" in why for why in st.refused.values())


def test_adaptive_clipping_converges_to_the_target_quantile():
    norms = np.random.default_rng(11).lognormal(mean=0.0, sigma=0.5, size=200)  # 200 sites' update norms
    template = SiteLevelEvent(
        mechanism="dp-fedavg-gaussian", noise_multiplier=0.01, clip=0.1, cohort=200, count_noise_multiplier=0.01
    )
    dp = SiteLevelDP(template=template, noise_rng=np.random.default_rng(0), adaptive=AdaptiveClipping(0.7, 0.2))
    direction = np.zeros(10)
    direction[0] = 1.0
    for _ in range(100):
        total = sum(c.site_dp_vector(direction * n, dp.clip, True) for n in norms)
        dp.release(total, 10, len(norms))
    assert dp.clip == pytest.approx(np.quantile(norms, 0.7), rel=0.1)


def test_a_simulation_at_site_level_records_everything_and_meets_its_target(tmp_path):
    cfg = SimulationConfig.model_validate({
        "rounds": 3,
        "data": {"dataset": "breast-cancer", "sites": 4},
        "privacy": {"level": "site", "epsilon": 4.0, "test_seed": 1, "adaptive_clipping": {"enabled": True}},
        "baselines": {"local_only": False, "pooled": False},
    })
    summary = run_simulation(cfg, out=tmp_path / "run").summary
    p = summary["privacy"]
    assert p["level"] == "site" and p["noise"] == "distributed" and p["mechanism"] == "dp-fedavg-skellam"
    assert p["accountant"] == "rdp" and p["weighting"] == "uniform" and p["adaptive_clipping"]
    assert p["cohort"] == 3  # the SecAgg+ threshold of 4 sites
    assert all(0 < e <= 4.0 for e in p["epsilon_per_site"].values())
    assert len(p["clip_per_round"]) == 3 and p["clip_per_round"][0] == 1.0
    assert summary["federated"]["rounds_completed"] == 3


def test_distributed_noise_without_secure_aggregation_is_refused():
    with pytest.raises(Exception, match="distributed noise"):
        SimulationConfig.model_validate(
            {"privacy": {"level": "site", "noise": "distributed"}, "secure_aggregation": {"enabled": False}}
        )
    with pytest.raises(Exception, match="site-level settings"):
        SimulationConfig.model_validate({"privacy": {"level": "record", "noise": "central"}})


def test_central_noise_is_labelled_weaker(tmp_path):
    cfg = SimulationConfig.model_validate({
        "rounds": 1,
        "privacy": {"level": "site", "noise": "central", "test_seed": 0},
        "baselines": {"local_only": False, "pooled": False},
    })
    summary = run_simulation(cfg, out=tmp_path / "run").summary
    assert summary["privacy"]["mechanism"] == "dp-fedavg-gaussian"
    assert any("CENTRAL" in w for w in summary["warnings"])


def test_the_threshold_is_raised_to_the_noise_cohort_when_sites_drop(rng):
    sites, coord, transport = _consortium(rng, _noisy_dp(), secure=True)
    loop = RoundLoop()
    while coord.stage != "fit:request":
        loop.step(coord, transport)
    for request in coord.requests()[:3]:  # the fourth site never answers
        coord.receive(transport.exchange(request))
    coord.close_stage()
    starts = coord._state.outgoing.values()
    # SecAgg+ alone would pick threshold 2 for 3 sites: too few noisy updates for the calibration.
    assert all(len(s.params.participants) == 3 and s.params.threshold == 3 for s in starts)
