"""The one-run DP audit: known answers for its statistics, their coverage by simulation, and DP-SGD audited."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from consortium.errors import ConfigError
from consortium.learning.specs import ModelSpec
from consortium.privacy.dpsgd import secure_generator
from consortium.redteam.canary import (
    CanaryAuditSettings,
    epsilon_lower_bound,
    p_value,
    run_canary_audit,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def logit(q: float) -> float:
    return math.log(q / (1 - q))


# -- the statistics ------------------------------------------------------------------------


def test_pure_bound_for_all_correct_guesses_solves_the_binomial_tail():
    # delta = 0, r of r right: the tail P[Binomial(r, q) >= r] = q^r equals 0.05 at q = 0.05^(1/r)
    for r in (10, 100, 200):
        assert epsilon_lower_bound(r, r, r, 0.0) == pytest.approx(logit(0.05 ** (1 / r)), abs=1e-7)
    assert epsilon_lower_bound(10, 10, 10, 0.0) == pytest.approx(1.0518732, abs=1e-6)
    assert epsilon_lower_bound(500, 100, 100, 0.0) == pytest.approx(3.4929654, abs=1e-6)  # abstentions do not count
    assert epsilon_lower_bound(10, 10, 10, 0.0, confidence=0.99) == pytest.approx(logit(0.01 ** 0.1), abs=1e-7)
    # one guess: even a right one refutes nothing at 95% (P = e^eps / (1 + e^eps) >= 1/2)
    assert epsilon_lower_bound(1, 1, 1, 0.0) == 0.0


def test_p_value_with_delta_matches_the_theorem_by_hand():
    # Theorem 5.2 for m = 5 canaries, r = 4 guesses, v = 4 right, eps = 1, delta = 0.01
    q = math.e / (1 + math.e)
    pmf = [math.comb(4, k) * q**k * (1 - q) ** (4 - k) for k in range(5)]
    f = lambda v: sum(pmf[max(v, 0):])
    expected = f(4) + 2 * 5 * 0.01 * max((f(4 - i) - f(4)) / i for i in range(1, 6))
    assert p_value(5, 4, 4, 1.0, 0.01) == pytest.approx(expected, rel=1e-12)
    assert p_value(5, 4, 4, 1.0, 0.0) == pytest.approx(q**4, rel=1e-12)
    assert p_value(5, 4, 4, 1.0, 0.01) > q**4  # delta costs something
    # the delta term lowers the bound: 200 right guesses about 1000 canaries, delta 1e-5 against 0
    assert epsilon_lower_bound(1000, 200, 200, 1e-5) == pytest.approx(4.1664902, abs=1e-6)
    assert epsilon_lower_bound(1000, 200, 200, 0.0) == pytest.approx(4.1936300, abs=1e-6)
    assert epsilon_lower_bound(1000, 200, 200, 1e-3) < epsilon_lower_bound(1000, 200, 200, 1e-5)


def test_the_bound_grows_with_correct_guesses_and_is_zero_at_chance():
    for delta in (0.0, 1e-5):
        bounds = [epsilon_lower_bound(1000, 200, v, delta) for v in range(201)]
        assert all(a <= b for a, b in itertools.pairwise(bounds))
        assert bounds[100] == 0.0 and bounds[110] == 0.0  # a coin does as well (110: p = 0.09)
        assert bounds[130] > 0.0
    assert epsilon_lower_bound(1000, 0, 0, 1e-5) == 0.0
    with pytest.raises(ConfigError, match="201 correct of 200"):
        epsilon_lower_bound(1000, 200, 201, 1e-5)
    with pytest.raises(ConfigError, match="confidence"):
        epsilon_lower_bound(1000, 200, 150, 1e-5, confidence=1.0)


def _violation_rate(m: int, guesses: int, correct: np.ndarray, epsilon: float, delta: float) -> float:
    cache: dict[int, float] = {}
    for v in np.unique(correct):
        cache[int(v)] = epsilon_lower_bound(m, guesses, int(v), delta)
    return float(np.mean([cache[int(v)] > epsilon for v in correct]))


def test_randomised_response_is_refuted_above_its_epsilon_at_most_five_percent_of_the_time():
    # m canaries, a mechanism that tells each canary's bit truthfully with probability e^eps / (1 + e^eps):
    # exactly eps-DP, and the best possible guesser is its output. The auditor guesses on 400 and abstains on 100.
    rng = np.random.default_rng(2023)
    eps, m, r, trials = 1.0, 500, 400, 2000
    bits = rng.random((trials, m)) < 0.5
    said = np.where(rng.random((trials, m)) < math.e / (1 + math.e), bits, ~bits)
    correct = (said[:, :r] == bits[:, :r]).sum(axis=1)
    rate = _violation_rate(m, r, correct, eps, 0.0)
    assert 0.02 < rate <= 0.06  # at most 5% by the theorem, not far below it (the bound is tight here)
    assert _violation_rate(m, r, correct, 0.5, 0.0) > 0.5  # and a lower claim is usually refuted


def test_an_eps_delta_mechanism_fools_the_pure_bound_but_not_the_delta_bound():
    # each canary's bit is revealed outright with probability delta, else randomised response at eps:
    # (eps, delta)-DP per canary, and not eps-DP
    rng = np.random.default_rng(7)
    eps, delta, m, trials = 1.0, 0.05, 1000, 1000
    bits = rng.random((trials, m)) < 0.5
    said = np.where(rng.random((trials, m)) < math.e / (1 + math.e), bits, ~bits)
    said = np.where(rng.random((trials, m)) < delta, bits, said)
    correct = (said == bits).sum(axis=1)
    assert _violation_rate(m, m, correct, eps, delta) <= 0.05
    assert _violation_rate(m, m, correct, eps, 0.0) > 0.15  # ignoring delta would wrongly convict it


# -- DP-SGD, audited -----------------------------------------------------------------------


# digits, an MLP of width 512, 1000 canaries, 100 steps at q = 0.1, sigma = 2: accounted epsilon 2.34 at 1e-5
AUDIT = CanaryAuditSettings(noise_multiplier=2.0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_correct_dp_sgd_run_is_never_caught_above_its_accounted_epsilon(seed):
    result = run_canary_audit(AUDIT, generator=secure_generator(seed))
    assert 2 < result.accounted_epsilon < 8
    assert (result.canaries, result.guesses, result.delta) == (1000, 200, 1e-5)
    assert 0 <= result.lower_bound <= result.accounted_epsilon and not result.caught
    assert result.lower_bound > 0  # the canaries are seen: the audit has power even here (this seed, pinned)
    assert abs(result.included - 500) < 50  # the coin flips are fair


@pytest.mark.parametrize("seed", [0, 1])
def test_a_run_with_a_tenth_of_the_declared_noise_is_caught(seed):
    broken = run_canary_audit(
        CanaryAuditSettings(noise_multiplier=2.0, noise_divisor=10.0), generator=secure_generator(seed)
    )
    honest = run_canary_audit(AUDIT, generator=secure_generator(seed))
    assert broken.accounted_epsilon == honest.accounted_epsilon  # the claim is the declared noise's
    assert broken.correct > honest.correct
    assert broken.lower_bound > broken.accounted_epsilon and broken.caught


def test_the_audit_is_deterministic_under_a_seed_and_validates_its_settings():
    small = CanaryAuditSettings(noise_multiplier=2.0, canaries=200, guess_in=20, guess_out=20, steps=20)
    assert run_canary_audit(small, generator=secure_generator(5)) == run_canary_audit(small, generator=secure_generator(5))
    with pytest.raises(ConfigError, match="600 'in' and 600 'out'"):
        CanaryAuditSettings(guess_in=600, guess_out=600)
    with pytest.raises(ConfigError, match="noise divisor"):
        CanaryAuditSettings(noise_divisor=0.5)
    with pytest.raises(ConfigError, match="coordinates"):
        run_canary_audit(
            CanaryAuditSettings(dataset="breast-cancer", model=ModelSpec(kind="logistic"), canaries=100, guess_in=10, guess_out=10, steps=1),
            generator=secure_generator(0),
        )
