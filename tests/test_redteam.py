"""The red team's scoring: known answers for ROC summaries, exact intervals and the DP ceiling."""

from __future__ import annotations

import math

import numpy as np
import pytest

from consortium.errors import ConfigError
from consortium.redteam.metrics import clopper_pearson, dp_tpr_bound, evaluate_attack


def test_clopper_pearson_known_answers():
    low, high = clopper_pearson(0, 10)
    assert low == 0.0 and high == pytest.approx(1 - 0.025 ** (1 / 10), abs=1e-12)  # 0.30850
    assert clopper_pearson(5, 10) == pytest.approx((0.187086, 0.812914), abs=1e-6)
    assert clopper_pearson(10, 10)[1] == 1.0
    with pytest.raises(ConfigError):
        clopper_pearson(11, 10)


def test_the_dp_ceiling_known_answers():
    assert dp_tpr_bound(0.001, 1.0, 1e-5) == pytest.approx(math.e * 0.001 + 1e-5)
    assert dp_tpr_bound(0.5, 0.0, 0.0) == pytest.approx(0.5)  # epsilon 0: no test beats a coin
    assert dp_tpr_bound(0.9, 1.0, 0.0) == pytest.approx(1 - math.exp(-1) * 0.1)  # the other side of the region
    assert dp_tpr_bound(0.01, 50.0, 0.0) == 1.0


def test_an_attack_is_scored_by_auc_and_by_tpr_at_low_fpr():
    # members 0.9, 0.8, 0.3; non-members 0.7, 0.4, 0.2, 0.1: 10 of 12 pairs ranked right
    result = evaluate_attack(np.array([0.9, 0.8, 0.3]), np.array([0.7, 0.2, 0.1, 0.4]), fprs=(0.2, 0.5))
    assert result.auc == pytest.approx(10 / 12)
    # above 0.7: 2 of 3 members and no non-member; down to 0.3: every member, and 2 of 4 non-members
    assert [p.tpr for p in result.points] == pytest.approx([2 / 3, 1.0])
    perfect = evaluate_attack(np.array([2.0, 3.0, 4.0]), np.array([0.0, 1.0]), fprs=(0.001,))
    assert perfect.auc == 1.0 and perfect.points[0].tpr == 1.0
    blind = evaluate_attack(np.zeros(100), np.zeros(100), fprs=(0.01,))
    assert blind.auc == 0.5 and blind.points[0].tpr == 0.0


def test_a_private_mechanism_stays_under_its_ceiling_and_a_leaky_one_does_not():
    """Randomised response on one bit (epsilon-DP): the best test reaches the ceiling, never beyond."""
    rng = np.random.default_rng(0)
    n, eps = 20_000, 1.0
    keep = math.exp(eps) / (1 + math.exp(eps))
    members = (rng.random(n) < keep).astype(float)  # a member's bit is 1, reported truthfully w.p. keep
    nonmembers = (rng.random(n) >= keep).astype(float)
    result = evaluate_attack(members, nonmembers, fprs=(1 - keep + 0.01,))
    point = result.points[0]
    assert point.low <= dp_tpr_bound(point.fpr, eps, 0.0)  # within its interval of the ceiling
    assert not point.contradicts(eps, 0.0)
    leaky = evaluate_attack(members + rng.normal(0, 0.01, n) + 1.0, nonmembers, fprs=(0.01,)).points[0]
    assert leaky.low > dp_tpr_bound(0.01, eps, 0.0)  # a mechanism that leaks is caught above the ceiling
    assert leaky.contradicts(eps, 0.0)


def test_the_ceiling_check_allows_for_the_uncertainty_of_the_fpr():
    """120 non-members all below 5 of 400 members: FPR 0 is measured, but up to 3% is plausible."""
    members = np.concatenate([np.full(5, 10.0), np.zeros(395)])
    point = evaluate_attack(members, np.full(120, 1.0), fprs=(0.001,)).points[0]
    assert point.fpr_reached == 0.0 and point.tpr == 5 / 400
    assert point.fpr_high == pytest.approx(clopper_pearson(0, 120)[1]) and point.fpr_high > 0.03
    assert point.low > dp_tpr_bound(0.001, 1.0, 1e-5)  # against the nominal FPR it would look like a breach
    assert not point.contradicts(1.0, 1e-5)  # but 5 members are no proof at this sample size
    # The same rates measured on 100 times more records are proof.
    big = evaluate_attack(np.tile(members, 100), np.full(12_000, 1.0), fprs=(0.001,)).points[0]
    assert big.contradicts(1.0, 1e-5)


def test_bad_scores_are_refused():
    with pytest.raises(ConfigError, match="finite"):
        evaluate_attack(np.array([np.nan]), np.array([0.0]))
    with pytest.raises(ConfigError, match="at least one"):
        evaluate_attack(np.array([]), np.array([0.0]))
