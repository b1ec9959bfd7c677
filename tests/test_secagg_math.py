"""Tests of the pure SecAgg+ maths: quantisation and neighbour-graph planning.

Graph plans are checked against an independent exact recomputation (integers
and Fractions, no floating point), quantisation against its stated bound and
statistically for unbiasedness.
"""

import math
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from consortium.crypto.prg import expand_mask
from consortium.errors import ConfigError, ModelError, ProtocolError
from consortium.secagg.graph import (
    GraphPlan,
    GraphPlanError,
    complete_graph,
    plan_graph,
    random_regular_graph,
    ring_neighbours,
)
from consortium.secagg.quantize import (
    AUTO_MAX_LEVELS,
    QuantConfig,
    QuantizationError,
    dequantize_sum,
    plan_quantization,
    quantize,
    sum_error_bound,
)

# --- plan_quantization ------------------------------------------------------------


def test_errors_are_config_errors():
    assert issubclass(QuantizationError, ConfigError) and issubclass(GraphPlanError, ConfigError)


def test_plan_picks_the_largest_levels_that_fit():
    assert plan_quantization(clip=1.0, n_sites=10).levels == AUTO_MAX_LEVELS  # capped at 2^24
    assert plan_quantization(clip=1.0, n_sites=1000).levels == 2**22  # 1000 (2^22 - 1) < 2^32 <= 1000 (2^23 - 1)
    assert plan_quantization(clip=1.0, n_sites=3, bits=16).levels == 2**14
    assert plan_quantization(clip=1.0, n_sites=1, bits=8).levels == 2**8
    cfg = plan_quantization(clip=0.5, n_sites=7, bits=20, levels=2**10)
    assert cfg == QuantConfig(clip=0.5, levels=2**10, bits=20)


@given(n_sites=st.integers(1, 10**7), bits=st.integers(24, 62))
def test_planned_levels_never_overflow_and_are_maximal(n_sites, bits):
    cfg = plan_quantization(clip=1.0, n_sites=n_sites, bits=bits)
    assert n_sites * (cfg.levels - 1) < 2**bits
    assert cfg.levels == AUTO_MAX_LEVELS or n_sites * (2 * cfg.levels - 1) >= 2**bits
    assert cfg.max_sites >= n_sites


def test_overflowing_levels_are_refused_with_the_fix():
    with pytest.raises(QuantizationError) as info:
        plan_quantization(clip=1.0, n_sites=3, bits=32, levels=2**31)
    assert str(info.value) == "3 sites x 2^31 levels overflow the 2^32 ring: use at most 2^30 levels or a 33-bit ring"
    assert plan_quantization(clip=1.0, n_sites=3, bits=33, levels=2**31).levels == 2**31  # the fix works
    assert plan_quantization(clip=1.0, n_sites=3, bits=32, levels=2**30).levels == 2**30
    with pytest.raises(QuantizationError, match="even with 2 levels: use a 10-bit ring"):
        plan_quantization(clip=1.0, n_sites=300, bits=8)


@pytest.mark.parametrize("clip", [0, 0.0, -1.0, float("nan"), float("inf"), float("-inf"), "1", None, True])
def test_bad_clip_is_refused(clip):
    with pytest.raises(QuantizationError, match="clip"):
        plan_quantization(clip=clip, n_sites=3)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(n_sites=0), "n_sites"),
        (dict(n_sites=2.0), "n_sites"),
        (dict(n_sites=3, bits=7), "bits"),
        (dict(n_sites=3, bits=63), "bits"),
        (dict(n_sites=3, bits=True), "bits"),
        (dict(n_sites=3, levels=1000), "power of two"),
        (dict(n_sites=3, levels=1), "power of two"),
        (dict(n_sites=1, bits=62, levels=2**40), "biased"),
    ],
)
def test_bad_settings_are_refused(kwargs, match):
    with pytest.raises(QuantizationError, match=match):
        plan_quantization(clip=1.0, **kwargs)


def test_quant_config_validates_on_construction():
    with pytest.raises(QuantizationError):
        QuantConfig(clip=-1.0, levels=16, bits=32)
    with pytest.raises(QuantizationError):
        QuantConfig(clip=1.0, levels=2**9, bits=8)
    assert QuantConfig(clip=2, levels=5 - 1, bits=8).step == pytest.approx(4 / 3)


# --- quantize / dequantize_sum ----------------------------------------------------------


def test_quantize_shape_dtype_range_and_ends():
    cfg = plan_quantization(clip=1.0, n_sites=4, bits=16)
    x = np.array([[-5.0, -1.0, 0.0], [0.3, 1.0, 7.0]], dtype=np.float32)
    before = x.copy()
    q = quantize(x, cfg, np.random.default_rng(0))
    assert q.dtype == np.uint64 and q.shape == x.shape
    assert q[0, 0] == 0 and q[0, 1] == 0 and q[1, 1] == cfg.levels - 1 and q[1, 2] == cfg.levels - 1
    assert int(q.max()) <= cfg.levels - 1
    assert np.array_equal(x, before)  # the caller's array is not modified
    again = quantize(x, cfg, np.random.default_rng(0))
    assert np.array_equal(q, again)


def test_quantize_refuses_broken_updates():
    cfg = plan_quantization(clip=1.0, n_sites=4)
    rng = np.random.default_rng(0)
    with pytest.raises(ModelError, match="1 NaN or infinite"):
        quantize(np.array([0.0, np.nan, 0.5]), cfg, rng)
    with pytest.raises(ModelError, match="NaN or infinite"):
        quantize(np.array([np.inf]), cfg, rng)
    with pytest.raises(ModelError, match="float"):
        quantize(np.array([1, 2, 3]), cfg, rng)
    with pytest.raises(TypeError, match="Generator"):
        quantize(np.zeros(3), cfg, np.random.RandomState(0))


@settings(max_examples=80, deadline=None)
@given(
    n=st.integers(1, 12),
    d=st.integers(1, 16),
    clip=st.floats(0.01, 10.0),
    bits=st.integers(12, 48),
    seed=st.integers(0, 2**32 - 1),
    scale=st.floats(0.0, 30.0),
)
def test_dequantized_sum_is_within_the_bound(n, d, clip, bits, seed, scale):
    if n >= 2**bits:
        return
    cfg = plan_quantization(clip=clip, n_sites=n, bits=bits)
    rng = np.random.default_rng(seed)
    xs = rng.standard_normal((n, d)) * scale
    total = np.zeros(d, dtype=np.uint64)
    for x in xs:
        total += quantize(x, cfg, rng)
    estimate = dequantize_sum(total, n, cfg)
    truth = np.clip(xs, -clip, clip).sum(axis=0)
    assert np.all(np.abs(estimate - truth) <= sum_error_bound(n, cfg) * (1 + 1e-9) + 1e-9 * n * clip)


def test_masked_sum_dequantizes_like_the_plain_sum():
    """Masks added in the ring (numpy uint64 wraparound, then & (2^bits - 1)) cancel and leave the exact sum."""
    n, d = 5, 1000
    cfg = plan_quantization(clip=1.0, n_sites=n, bits=32)
    ring = np.uint64(2**cfg.bits - 1)
    rng = np.random.default_rng(1)
    xs = rng.standard_normal((n, d))
    qs = [quantize(x, cfg, rng) for x in xs]
    seeds = {(i, j): bytes([i, j]) * 16 for i in range(n) for j in range(i + 1, n)}
    masked = np.zeros(d, dtype=np.uint64)
    for i, q in enumerate(qs):
        y = q.copy()
        for (a, b), seed in seeds.items():
            if i == a:
                y += expand_mask(seed, d, bits=cfg.bits)
            elif i == b:
                y -= expand_mask(seed, d, bits=cfg.bits)
        masked += y & ring
    assert np.array_equal(masked & ring, sum(qs))
    np.testing.assert_allclose(dequantize_sum(masked & ring, n, cfg), dequantize_sum(sum(qs), n, cfg))


def _max_z_of_mean(quantizer, x, cfg, draws, seed):
    """Largest |mean of dequantised draws - clip(x)| over coordinates, in standard errors (<= step / 2 / sqrt(draws))."""
    rng = np.random.default_rng(seed)
    total = np.zeros(x.shape, dtype=np.uint64)
    for _ in range(draws):
        total += quantizer(x, cfg, rng)
    mean = dequantize_sum(total, draws, cfg) / draws
    se = cfg.step * 0.5 / math.sqrt(draws)
    return float(np.max(np.abs(mean - np.clip(x, -cfg.clip, cfg.clip))) / se)


def test_stochastic_rounding_is_unbiased():
    cfg = plan_quantization(clip=1.0, n_sites=2000, bits=16, levels=4)  # coarse: step = 2/3
    x = np.random.default_rng(2).uniform(-1.5, 1.5, size=500)
    assert _max_z_of_mean(quantize, x, cfg, draws=2000, seed=3) < 5.0


def test_the_unbiasedness_check_catches_a_biased_rounding():
    def round_to_nearest(x, cfg, rng):
        u = (np.clip(x, -cfg.clip, cfg.clip) + cfg.clip) / cfg.step
        return np.rint(u).astype(np.uint64)

    cfg = plan_quantization(clip=1.0, n_sites=2000, bits=16, levels=4)
    x = np.random.default_rng(2).uniform(-1.5, 1.5, size=500)
    assert _max_z_of_mean(round_to_nearest, x, cfg, draws=2000, seed=3) > 5.0


def test_dequantize_sum_checks_its_inputs():
    cfg = plan_quantization(clip=1.0, n_sites=4, bits=16)
    assert sum_error_bound(3, cfg) == pytest.approx(3 * 2.0 / (cfg.levels - 1))
    ok = np.array([0, 3 * (cfg.levels - 1)], dtype=np.uint64)
    np.testing.assert_allclose(dequantize_sum(ok, 3, cfg), [-3.0, 3.0])
    with pytest.raises(ProtocolError, match="masks did not cancel"):
        dequantize_sum(ok + np.uint64(1), 3, cfg)
    with pytest.raises(QuantizationError, match="overflow"):
        dequantize_sum(ok, cfg.max_sites + 1, cfg)
    with pytest.raises(QuantizationError):
        dequantize_sum(ok, 0, cfg)
    with pytest.raises(ProtocolError, match="unsigned"):
        dequantize_sum(ok.astype(np.int64), 3, cfg)


# --- graphs ---------------------------------------------------------------------

NAMES = [f"site-{i:03d}" for i in range(120)]


def _check_regular(graph, names, degree):
    assert list(graph) == list(names)
    for name, neighbours in graph.items():
        assert name not in neighbours
        assert len(neighbours) == degree
        for other in neighbours:
            assert name in graph[other]


def test_complete_graph():
    graph = complete_graph(NAMES[:7])
    _check_regular(graph, NAMES[:7], 6)


@pytest.mark.parametrize("n,degree", [(2, 1), (5, 2), (10, 4), (11, 4), (12, 5), (12, 11), (13, 12), (50, 8), (120, 52)])
def test_random_regular_graph_is_symmetric_regular_and_loop_free(n, degree):
    graph = random_regular_graph(NAMES[:n], degree, np.random.default_rng(n))
    _check_regular(graph, NAMES[:n], degree)


@pytest.mark.parametrize("n,degree", [(2, 1), (11, 4), (12, 5), (120, 52)])
def test_a_sites_own_neighbours_are_its_row_of_the_whole_graph(n, degree):
    # What a site checks (its own neighbours, O(n)) is what the coordinator builds (every site's, O(n x degree)).
    graph = random_regular_graph(NAMES[:n], degree, np.random.default_rng(n))
    for name in NAMES[:n]:
        assert ring_neighbours(NAMES[:n], degree, np.random.default_rng(n), name) == graph[name]
    with pytest.raises(GraphPlanError, match="not one of"):
        ring_neighbours(NAMES[:n], degree, np.random.default_rng(n), "stranger")


def test_random_regular_graph_is_deterministic_per_seed():
    a = random_regular_graph(NAMES[:50], 6, np.random.default_rng(7))
    b = random_regular_graph(NAMES[:50], 6, np.random.default_rng(7))
    c = random_regular_graph(NAMES[:50], 6, np.random.default_rng(8))
    assert a == b and a != c


def test_random_regular_graph_refuses_impossible_requests():
    rng = np.random.default_rng(0)
    with pytest.raises(GraphPlanError, match="n x degree must be even"):
        random_regular_graph(NAMES[:7], 3, rng)
    for degree in (0, 7, -2, 2.0):
        with pytest.raises(GraphPlanError, match="degree"):
            random_regular_graph(NAMES[:7], degree, rng)
    with pytest.raises(GraphPlanError, match="distinct"):
        random_regular_graph(["a", "b", "a"], 2, rng)
    with pytest.raises(GraphPlanError):
        complete_graph(["only"])


# --- plan_graph: an independent exact recomputation -------------------------------------


def _exact_binomial_tail(k: int, p: Fraction, m: int) -> Fraction:
    """P[Binomial(k, p) >= m], exactly."""
    return sum((math.comb(k, i) * p**i * (1 - p) ** (k - i) for i in range(max(m, 0), k + 1)), Fraction(0))


def _exact_hypergeometric_tail(population: int, marked: int, draws: int, m: int) -> Fraction:
    """P[X >= m] for X marked items among ``draws`` taken without replacement, exactly."""
    top = sum(math.comb(marked, i) * math.comb(population - marked, draws - i) for i in range(max(m, 0), min(draws, marked) + 1))
    return Fraction(top, math.comb(population, draws))


def _exact_bounds(n: int, k: int, t: int, dropout: float, corruption: float) -> tuple[Fraction, Fraction]:
    """(exposure bound, failure bound) of a k-regular plan, as defined in graph.py's docstring, with exact arithmetic."""
    delta = Fraction(dropout)
    corrupt = math.ceil(Fraction(str(corruption)) * n)  # exact, of the decimal the user wrote
    exposure = n * _exact_hypergeometric_tail(n - 1, corrupt, k, 2 * t - k) + n * (Fraction(corrupt, n) + delta) ** (k // 2)
    failure = n * _exact_binomial_tail(k, delta, k - t + 1)
    return exposure, failure


@pytest.mark.parametrize("n,degree,threshold", [(100, 52, 32), (1000, 106, 73), (10000, 124, 86)])
def test_sparse_plans_hold_when_recomputed_exactly(n, degree, threshold):
    plan = plan_graph(n)
    assert (plan.kind, plan.degree, plan.threshold) == ("k-regular", degree, threshold)  # pinned
    exposure, failure = _exact_bounds(n, plan.degree, plan.threshold, 0.1, 0.1)
    assert exposure < Fraction(1, 2**40) and failure < Fraction(1, 2**20)
    assert plan.security_bits == pytest.approx(-math.log2(exposure), rel=1e-9)
    assert plan.failure_log2 == pytest.approx(math.log2(failure), rel=1e-9)
    assert 2 * plan.threshold > plan.degree  # t > k/2, as Bell et al. require against an active server
    # The threshold is the smallest secure one, so the security constraint is really what sets it ...
    exposure_below, _ = _exact_bounds(n, plan.degree, plan.threshold - 1, 0.1, 0.1)
    assert exposure_below >= Fraction(1, 2**40)
    # ... and no smaller even degree has a threshold meeting both targets.
    k = plan.degree - 2
    assert not any(
        all(bound < target for bound, target in zip(_exact_bounds(n, k, t, 0.1, 0.1), (Fraction(1, 2**40), Fraction(1, 2**20))))
        for t in range(k // 2 + 1, k + 1)
    )


def test_sparse_degree_grows_like_log_n():
    degrees = {n: plan_graph(n).degree for n in (100, 1000, 10_000, 100_000)}
    for n, k in degrees.items():
        assert k < n and k <= 16 * math.log(n)
    assert degrees[1000] / 1000 < 0.15 and degrees[10_000] / 10_000 < 0.02
    assert degrees[100_000] - degrees[10_000] <= 20 and degrees[10_000] - degrees[1000] <= 20


def test_small_consortia_get_the_complete_graph():
    plan = plan_graph(10, dropout_rate=0.01, failure_bits=16)
    assert (plan.kind, plan.degree, plan.threshold) == ("complete", 9, 6)  # 2t > 9 neighbours + 1 corrupt
    assert plan.security_bits == math.inf
    exact = _exact_binomial_tail(10, Fraction(0.01), 10 - 6)  # the round fails iff 4 or more drop out
    assert plan.failure_log2 == pytest.approx(math.log2(exact), rel=1e-9)
    graph = plan.build(NAMES[:10], np.random.default_rng(0))
    assert graph == complete_graph(NAMES[:10])


def test_complete_threshold_defeats_conflicting_views():
    """With t from the plan, two views that each collect t shares need more than the k neighbours plus c corrupt."""
    for n in range(3, 41):
        try:
            plan = plan_graph(n, dropout_rate=0.001, failure_bits=5)
        except GraphPlanError:
            continue
        corrupt = min(math.ceil(Fraction("0.1") * n), n - 1)
        assert 2 * plan.threshold > plan.degree + corrupt
        assert 2 * (plan.threshold - 1) <= plan.degree + corrupt  # and it is the smallest such threshold


def test_two_sites_assume_no_colluder_since_none_could_be_resisted():
    plan = plan_graph(2, corruption_rate=0.4)
    assert (plan.kind, plan.degree, plan.threshold) == ("complete", 1, 1)
    assert plan_graph(3).threshold == 2  # one assumed colluder among three: t = 2 of 2 neighbours


def test_complete_plan_reports_but_does_not_refuse_its_failure_probability():
    plan = plan_graph(10)  # 10% dropout: 4 of 10 sites drop out with probability ~ 2^-6.3
    assert plan.kind == "complete" and plan.threshold == 6
    assert plan.failure_log2 == pytest.approx(-6.3, abs=0.05)
    assert plan_graph(10, dropout_rate=0.0).failure_log2 == -math.inf


@pytest.mark.parametrize(
    "n,kwargs,match",
    [
        (100, dict(dropout_rate=0.6, corruption_rate=0.4), "cannot be met by any graph"),
        (1000, dict(dropout_rate=0.3, corruption_rate=0.4), "corruption_rate \\+ 2 x dropout_rate < 1"),
        (1, dict(), "at least 2 sites"),
        (100, dict(dropout_rate=1.0), "dropout_rate"),
        (100, dict(dropout_rate=-0.1), "dropout_rate"),
        (100, dict(corruption_rate=float("nan")), "corruption_rate"),
        (100, dict(security_bits=0), "security_bits"),
        (100, dict(failure_bits=-3), "failure_bits"),
    ],
)
def test_impossible_or_malformed_requests_raise(n, kwargs, match):
    with pytest.raises(GraphPlanError, match=match):
        plan_graph(n, **kwargs)


def test_mid_sized_cohorts_fall_back_to_the_complete_graph():
    plan = plan_graph(40)  # no sparse degree below 39 meets both targets
    assert plan.kind == "complete" and plan.degree == 39


def test_sparse_plan_builds_a_matching_graph():
    plan = plan_graph(120)
    graph = plan.build(NAMES, np.random.default_rng(5))
    _check_regular(graph, NAMES, plan.degree)
    with pytest.raises(GraphPlanError, match="plan again"):
        plan.build(NAMES[:100], np.random.default_rng(5))


def test_graph_plan_validates_its_fields():
    with pytest.raises(GraphPlanError):
        GraphPlan("k-regular", 10, 11, 40.0, -20.0, 100, 0.1, 0.1)
    with pytest.raises(GraphPlanError):
        GraphPlan("complete", 10, 6, math.inf, -20.0, 100, 0.1, 0.1)
    with pytest.raises(GraphPlanError):
        GraphPlan("ring", 10, 6, 40.0, -20.0, 100, 0.1, 0.1)


# --- quantize: the fixed-point stochastic rounding, chunk by chunk ----------------------


def test_quantize_rounds_to_a_neighbouring_level_of_the_exact_value():
    """Every q is floor(u) or floor(u) + 1 for u = (clip(x) + clip) / step, computed exactly with Fractions."""
    cfg = plan_quantization(clip=0.7, n_sites=3, bits=16, levels=2**9)
    x = np.random.default_rng(4).uniform(-1.0, 1.0, 3000)
    q = quantize(x, cfg, np.random.default_rng(5))
    clip, levels = Fraction(cfg.clip), cfg.levels
    for xi, qi in zip(x.tolist(), q.tolist()):
        u = (min(max(Fraction(xi), -clip), clip) + clip) * (levels - 1) / (2 * clip)
        assert math.floor(u) <= qi <= math.floor(u) + 1 and qi <= levels - 1


def test_quantize_is_chunk_independent_and_accepts_any_layout():
    """The draws are one keystream, so a prefix of the input quantises to a prefix of the output."""
    cfg = plan_quantization(clip=1.0, n_sites=10, bits=32)
    x = np.random.default_rng(6).uniform(-1.2, 1.2, 100_003).astype(np.float32)  # > 3 chunks of 32k
    full = quantize(x, cfg, np.random.default_rng(7), dtype=np.uint32)
    assert full.dtype == np.uint32
    assert np.array_equal(quantize(x[:40_000], cfg, np.random.default_rng(7), dtype=np.uint32), full[:40_000])
    as64 = quantize(x, cfg, np.random.default_rng(7))
    assert as64.dtype == np.uint64 and np.array_equal(as64, full)
    twice = np.repeat(x, 2)[::2]  # a strided view: the same values, not contiguous
    assert np.array_equal(quantize(twice, cfg, np.random.default_rng(7), dtype=np.uint32), full)
    grid = x[:100_000].reshape(250, 400)
    assert np.array_equal(quantize(grid, cfg, np.random.default_rng(7)).ravel(), full[:100_000])
    for dtype in (np.float16, np.float64):
        q = quantize(x.astype(dtype), cfg, np.random.default_rng(7))
        assert q.shape == x.shape and int(q.max()) <= cfg.levels - 1
    assert quantize(np.zeros(0, np.float32), cfg, np.random.default_rng(7)).shape == (0,)


def test_quantize_finds_a_broken_value_in_any_chunk():
    cfg = plan_quantization(clip=1.0, n_sites=4)
    x = np.zeros(200_000)
    x[150_000] = np.nan
    x[199_999] = -np.inf
    with pytest.raises(ModelError, match="2 NaN or infinite"):
        quantize(x, cfg, np.random.default_rng(0))
    huge = np.full(10, np.finfo(np.float64).max)  # finite, but their sum overflows: clipped, not refused
    assert np.all(quantize(huge, cfg, np.random.default_rng(0)) == cfg.levels - 1)


def test_quantize_at_the_widest_levels_never_wraps():
    """levels = 2^32: (levels - 1) 2^32 + a 32-bit draw still fits 64 bits, so the top level stays the top."""
    cfg = QuantConfig(clip=1.0, levels=2**32, bits=62)
    x = np.array([-2.0, -1.0, 1.0, 3.0, 0.0, 1.0 - 1e-12] * 1000)
    q = quantize(x, cfg, np.random.default_rng(1))
    assert np.all(q[0::6] == 0) and np.all(q[1::6] == 0)
    assert np.all(q[2::6] == 2**32 - 1) and np.all(q[3::6] == 2**32 - 1)
    assert set(np.unique(q[4::6]).tolist()) <= {2**31 - 1, 2**31}  # u = (2^32 - 1) / 2
    assert int(q.max()) == 2**32 - 1


def test_stochastic_rounding_hits_the_fraction_at_fine_levels():
    """At 2^24 levels the probability of rounding up equals frac(u) to within sampling error."""
    cfg = plan_quantization(clip=1.0, n_sites=10, bits=32)  # 2^24 levels, float32-sized steps
    fracs = np.array([0.0, 0.1, 0.25, 0.5, 0.9, 0.999])
    base = 1_000_000
    x = ((base + fracs) * cfg.step - cfg.clip).repeat(40_000)  # u = base + frac (up to float rounding)
    q = quantize(x, cfg, np.random.default_rng(8)).reshape(len(fracs), -1)
    u = (x.reshape(len(fracs), -1)[:, 0] + cfg.clip) / cfg.step
    up = (q - np.floor(u)[:, None].astype(np.uint64)).mean(axis=1)
    se = np.sqrt(np.maximum(fracs * (1 - fracs), 1e-6) / q.shape[1])
    assert np.all(np.abs(up - (u - np.floor(u))) < 5 * se + 1e-9)


def test_error_bound_holds_for_float32_updates_at_scale():
    """The production shape: float32 updates, 2^24 levels, a large vector and several sites."""
    n, d = 6, 300_000
    cfg = plan_quantization(clip=1.0, n_sites=n, bits=32)
    rng = np.random.default_rng(9)
    xs = [rng.uniform(-1.3, 1.3, d).astype(np.float32) for _ in range(n)]
    total = np.zeros(d, dtype=np.uint64)
    for x in xs:
        total += quantize(x, cfg, rng, dtype=np.uint32)
    estimate = dequantize_sum(total, n, cfg)
    truth = np.clip(np.array(xs, dtype=np.float64), -1.0, 1.0).sum(axis=0)
    err = np.abs(estimate - truth)
    assert err.max() <= sum_error_bound(n, cfg)
    assert abs(float((estimate - truth).mean())) < 4 * cfg.step * math.sqrt(n) / math.sqrt(d)  # no drift


@pytest.mark.parametrize("bits", [20, 32, 40])
def test_secure_sum_end_to_end_with_dropouts_in_narrow_and_wide_rings(bits):
    """The masked round (one-pass masking, streamed message bytes, one-pass unmasking) at several ring sizes."""
    from consortium.secagg import secure_sum

    rng = np.random.default_rng(bits)
    updates = [rng.uniform(-1.0, 1.0, 70_001) for _ in range(7)]
    r = secure_sum(updates, clip=1.0, drop={2: "collect_masked", 5: "unmask"}, seed=bits, bits=bits)
    assert r.survivors == [0, 1, 3, 4, 5, 6]
    truth = np.sum([updates[i] for i in r.survivors], axis=0)
    assert np.max(np.abs(r.total - truth)) <= r.error_bound


@pytest.mark.parametrize("clip", [1e-300, 1e-6, 1e300])
def test_quantize_handles_extreme_clip_bounds(clip):
    cfg = plan_quantization(clip=clip, n_sites=5, bits=32)
    x = np.array([-2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0]) * clip
    q = quantize(x, cfg, np.random.default_rng(0)).tolist()
    assert q[0] == q[1] == 0 and q[5] == q[6] == cfg.levels - 1
    mid = (cfg.levels - 1) / 2
    assert abs(q[3] - mid) <= 1 and abs(q[2] - mid / 2) <= 1 and abs(q[4] - 3 * mid / 2) <= 1
