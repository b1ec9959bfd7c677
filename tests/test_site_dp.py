"""Site-level DP (DP-FedAvg): the distributed discrete Gaussian's bound against a high-precision
reference, its exact sampler, noise levels, reduction to plain FedAvg, adaptive clipping, and the
checks a site makes before adding its noise."""

import math

import dp_accounting
import mpmath
import numpy as np
import pytest
from dp_accounting import pld

from consortium.config import SimulationConfig
from consortium.crypto import keys
from consortium.errors import ConfigError
from consortium.learning.specs import ModelSpec, TrainSettings
from consortium.learning.strategies import FedAvg
from consortium.privacy import ddg
from consortium.privacy.accountant import PLD_INTERVAL, calibrate_site_noise, epsilon
from consortium.privacy.events import DiscreteGaussianNoise, RecordLevelEvent, SiteLevelEvent, parse_event
from consortium.privacy.ledger import BudgetExceeded, BudgetLedger
from consortium.protocol.sitedp import AdaptiveClipping, SiteLevelDP
from consortium.protocol import contributions as c
from consortium.protocol.coordinator import COORDINATOR, Coordinator, SecureAggregation
from consortium.run.loop import RoundLoop
from consortium.protocol.site import Site
from consortium.secagg.encoding import DiscreteGaussianEncoding
from consortium.run.simulation import run_simulation
from consortium.transport import InProcessTransport
from tests.conftest import make_splits

# -- the distributed discrete Gaussian: bound, sampler, plan ----------------------------------


def _dg_pmf(variance: int, reach: int) -> list:
    w = [mpmath.exp(-mpmath.mpf(k * k) / (2 * variance)) for k in range(-reach, reach + 1)]
    total = mpmath.fsum(w)
    return [x / total for x in w]


def _exact_ddg_rdp(order: int, shift: int, variance: int, n_sites: int) -> float:
    """D_order(S + shift || S) for S a sum of ``n_sites`` N_Z(0, variance), by convolution at 40 digits."""
    mpmath.mp.dps = 40
    reach = int(30 * math.sqrt(variance)) + 10
    pmf = _dg_pmf(variance, reach)
    total = pmf
    for _ in range(n_sites - 1):  # convolve: support grows by 2 reach each time
        out = [mpmath.mpf(0)] * (len(total) + len(pmf) - 1)
        for i, a in enumerate(total):
            for j, b in enumerate(pmf):
                out[i + j] += a * b
        total = out
    terms = [total[k] ** order * total[k - shift] ** (1 - order) for k in range(shift, len(total))]
    return float(mpmath.log(mpmath.fsum(terms)) / (order - 1))


@pytest.mark.parametrize("variance,n_sites", [(1, 2), (1, 3), (2, 2), (4, 3), (60, 2)])
@pytest.mark.parametrize("shift", [1, 2])
@pytest.mark.parametrize("order", [2, 4, 8])
def test_ddg_bound_holds_against_the_exact_divergence(variance, n_sites, shift, order):
    exact = _exact_ddg_rdp(order, shift, variance, n_sites)
    bound = ddg.ddg_rdp(order, shift, shift, variance, n_sites, dim=1)  # one coordinate: L1 = L2 = shift
    assert exact <= bound * (1 + 1e-9)  # float64 rounding of the bound itself
    if variance >= 40:  # tau is negligible: the bound is the Gaussian one, and tight
        assert bound <= 1.05 * exact


def test_ddg_bound_known_answers():
    # One site: tau = 0 and the bound is the Gaussian alpha (D2 / sigma)^2 / 2.
    assert ddg.ddg_rdp(2, 1, 1, 100, 1, 1) == pytest.approx(0.01, rel=1e-12)
    # Two sites of variance 1: tau = 10 exp(-pi^2), a = b = 1 / sqrt(2).
    tau = 10 * math.exp(-math.pi**2)
    expected = min(2 * 0.5 / 2 + tau, 2 * (0.5 + 2 * tau / math.sqrt(2) + tau * tau) / 2, 2 * (1 / math.sqrt(2) + tau) ** 2 / 2)
    assert ddg.ddg_rdp(2, 1, 1, 1, 2, 1) == pytest.approx(expected, rel=1e-12)
    assert ddg.ddg_tau(40, 5) < 1e-170


@pytest.mark.parametrize("variance", [1, 4, 9, 1 << 24])
def test_the_exact_sampler_matches_the_discrete_gaussian(variance):
    draws = ddg.sample_discrete_gaussian(np.random.default_rng(variance), variance, 200_000)
    assert draws.dtype == np.int64
    truth = ddg.discrete_gaussian_variance(variance)
    assert draws.var() == pytest.approx(truth, rel=0.02)
    assert abs(draws.mean()) < 5 * math.sqrt(truth / 200_000)
    if variance < 100:  # the whole distribution: total variation distance to the exact PMF
        reach = int(8 * math.sqrt(variance)) + 2
        k = np.arange(-reach, reach + 1)
        pmf = np.exp(-k * k / (2 * variance))
        pmf /= pmf.sum()
        counts = np.array([(draws == v).sum() for v in k]) / draws.size
        assert 0.5 * np.abs(counts - pmf).sum() < 0.005


def test_huge_laplace_proposals_take_the_exact_integer_path():
    rng = np.random.default_rng(0)
    # exp(-((|y| t - s)^2) / (2 s t^2)) for |y| = 10^6, s = 4, t = 3: far past int64, and far below 1.
    assert not ddg._bernoulli_exp_neg_big(rng, (10**6 * 3 - 4) ** 2, 2 * 4 * 9)
    assert all(ddg._bernoulli_exp_neg_big(rng, 0, 5) for _ in range(20))
    ones = np.ones(100_000, dtype=np.int64)
    assert ddg._bernoulli_exp_neg_unit(rng, ones, ones).mean() == pytest.approx(math.exp(-1), abs=0.01)
    assert ddg._bernoulli_exp_neg(rng, 5 * ones, 2 * ones).mean() == pytest.approx(math.exp(-2.5), abs=0.005)


def test_planned_noise_meets_its_target_tightly_and_approaches_the_gaussian():
    noise = ddg.plan_ddg(target_epsilon=3.0, delta=1e-5, rounds=10, dim=1000, cohort=4, max_sites=8, bits=32)
    assert ddg.ddg_epsilon(noise, 4, 10, 1e-5) <= 3.0
    assert noise.site_variance <= ddg.MAX_SITE_VARIANCE and ddg.ring_headroom_ok(noise, n_sites=8, bits=32)
    # The integer price is negligible: the summed noise's multiplier is the Gaussian one under RDP.
    z = ddg.noise_multiplier_of(noise, 4)
    gaussian = dp_accounting.rdp.RdpAccountant(ddg.ORDERS).compose(
        dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(z), 10)
    )
    assert gaussian.get_epsilon(1e-5) == pytest.approx(3.0, rel=0.01)


def test_a_ring_too_small_for_the_noise_is_refused():
    with pytest.raises(ConfigError, match="bits"):
        ddg.plan_ddg(target_epsilon=1.0, delta=1e-5, rounds=50, dim=10_000, cohort=10, max_sites=1000, bits=16)


def test_conditional_rounding_meets_its_bound_and_is_unbiased():
    rng = np.random.default_rng(0)
    x = rng.standard_normal(400)
    x *= 50 / np.linalg.norm(x)
    bound = ddg.rounded_l2_bound(50.0, 400)
    draws = np.stack([ddg.conditional_round(x, bound, rng) for _ in range(2000)])
    assert np.all(np.linalg.norm(draws, axis=1) <= bound)
    assert np.abs(draws.mean(axis=0) - x).max() < 0.1  # per-coordinate std of the mean ~ 0.5 / sqrt(2000)


# -- noise levels: measured within 15% of theory ------------------------------------------


def test_distributed_noise_in_the_decoded_sum_matches_theory():
    noise = ddg.plan_ddg(target_epsilon=2.0, delta=1e-5, rounds=5, dim=3000, cohort=3, max_sites=5, bits=32)
    enc = DiscreteGaussianEncoding(bits=32, clip=0.5, cohort=3, noise=noise)
    rng, secret = np.random.default_rng(1), np.random.default_rng(2)
    n = 5
    total = np.zeros(3000, dtype=np.uint64)
    for _ in range(n):
        total = (total + enc.encode(np.zeros(3000), n, rng, secret).astype(np.uint64)) & np.uint64((1 << 32) - 1)
    decoded = enc.decode_sum(total.astype(np.uint32), n)
    theory = math.sqrt(n * ddg.discrete_gaussian_variance(noise.site_variance)) / enc.scale
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


def test_distributed_events_are_accounted_in_rdp_and_never_mix_with_record_level(tmp_path):
    noise = ddg.plan_ddg(target_epsilon=2.0, delta=1e-5, rounds=4, dim=100, cohort=2, max_sites=3, bits=32)
    ev = SiteLevelEvent(
        mechanism="dp-fedavg-distributed-discrete-gaussian", noise_multiplier=ddg.noise_multiplier_of(noise, 2),
        clip=1.0, cohort=2, ddg=noise,
    )
    assert epsilon([ev] * 4, 1e-5) == pytest.approx(ddg.ddg_epsilon(noise, 2, 4, 1e-5), rel=1e-9)
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
    # The least noise there is: variance 1 in units of 10 / 2^20 of an update coordinate.
    noise = DiscreteGaussianNoise(
        scale_clip=1 << 20, dim=74, l2_bound=float(1 << 21), site_variance=1, l2_sensitivity=float(1 << 21), l1_sensitivity=1.0
    )
    event = SiteLevelEvent(
        mechanism="dp-fedavg-distributed-discrete-gaussian", noise_multiplier=0.0, clip=10.0, cohort=3, ddg=noise
    )
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
    # Calibrated for 2 honest sites, with 1 more assumed to collude: every sum must span 3.
    noise = ddg.plan_ddg(target_epsilon=4.0, delta=1e-5, rounds=3, dim=74, cohort=2, max_sites=sites_count, bits=32)
    event = SiteLevelEvent(
        mechanism="dp-fedavg-distributed-discrete-gaussian", noise_multiplier=ddg.noise_multiplier_of(noise, 2),
        clip=1.0, cohort=2, colluders=1, ddg=noise,
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
    assert p["level"] == "site" and p["noise"] == "distributed"
    assert p["mechanism"] == "dp-fedavg-distributed-discrete-gaussian"
    assert p["accountant"] == "rdp" and p["weighting"] == "uniform" and p["adaptive_clipping"]
    assert p["cohort"] == 2 and p["colluders_assumed"] == 1  # threshold 3 for 4 sites, one assumed colluding
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
