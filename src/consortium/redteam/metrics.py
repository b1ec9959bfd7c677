"""How well a membership attack did, and how well differential privacy says it could have done.

An attack gives every candidate record a score, higher meaning "more likely
a member". What matters at the privacy officer's table is not the average
(AUC) but the true-positive rate at a very low false-positive rate: does the
attack confidently pick out *some* patients (Carlini et al., "Membership
Inference Attacks From First Principles", S&P 2022)? Each rate comes with an
exact (Clopper-Pearson) confidence interval, since at FPR 0.1% a few hundred
non-members leave the rate barely measured.

Differential privacy bounds every such test (Kairouz, Oh and Viswanath,
ICML 2015): under (epsilon, delta)-DP, TPR <= e^epsilon FPR + delta and
TPR <= 1 - e^-epsilon (1 - delta - FPR), for every threshold at once.
The ROC curve comes from scikit-learn; the interval from SciPy's beta
distribution.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.stats import beta
from sklearn.metrics import roc_auc_score, roc_curve

from consortium.errors import ConfigError


def clopper_pearson(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """The exact two-sided interval for a binomial rate after ``k`` successes in ``n`` trials."""
    if not (0 <= k <= n and n >= 1):
        raise ConfigError(f"a rate needs 0 <= successes <= trials and trials >= 1, got {k} of {n}")
    if not 0 < confidence < 1:
        raise ConfigError(f"confidence must lie strictly between 0 and 1, got {confidence}")
    alpha = 1 - confidence
    low = 0.0 if k == 0 else float(beta.ppf(alpha / 2, k, n - k + 1))
    high = 1.0 if k == n else float(beta.ppf(1 - alpha / 2, k + 1, n - k))
    return low, high


def dp_tpr_bound(fpr: float, epsilon: float, delta: float) -> float:
    """The highest TPR any membership test can reach at ``fpr`` against an (epsilon, delta)-DP mechanism."""
    if not (0 <= fpr <= 1 and epsilon >= 0 and 0 <= delta < 1):
        raise ConfigError(f"need 0 <= fpr <= 1, epsilon >= 0 and 0 <= delta < 1, got {fpr}, {epsilon}, {delta}")
    return min(1.0, math.exp(epsilon) * fpr + delta, 1 - math.exp(-epsilon) * (1 - delta - fpr))


@dataclass(frozen=True)
class RatePoint:
    fpr: float  # the false-positive rate asked for
    tpr: float  # the best true-positive rate at a threshold whose FPR does not exceed it
    low: float  # the Clopper-Pearson interval of that TPR
    high: float
    fpr_reached: float  # that threshold's own FPR on the non-members (at most ``fpr``)
    fpr_high: float  # the upper end of its interval: with 300 non-members an FPR of 0 may truly be 1%

    def contradicts(self, epsilon: float, delta: float) -> bool:
        """True when this point proves (at the intervals' confidence) that the mechanism is not (epsilon, delta)-DP.

        Both rates are estimates: the TPR is taken at its lowest plausible value
        and the FPR at its highest, so sampling luck alone does not contradict
        the guarantee.
        """
        return self.low > dp_tpr_bound(self.fpr_high, epsilon, delta)


@dataclass(frozen=True)
class AttackResult:
    auc: float
    points: tuple[RatePoint, ...]
    members: int
    nonmembers: int
    fpr: np.ndarray  # the whole ROC curve, for plots on log axes
    tpr: np.ndarray


def evaluate_attack(
    member_scores: np.ndarray, nonmember_scores: np.ndarray, *, fprs: tuple[float, ...] = (0.001, 0.01),
    confidence: float = 0.95,
) -> AttackResult:
    """Score an attack: AUC, and TPR at each of ``fprs`` with its interval. Higher scores mean "member"."""
    members = np.asarray(member_scores, dtype=np.float64).ravel()
    nonmembers = np.asarray(nonmember_scores, dtype=np.float64).ravel()
    if members.size == 0 or nonmembers.size == 0:
        raise ConfigError("an attack is scored on at least one member and one non-member")
    if not (np.all(np.isfinite(members)) and np.all(np.isfinite(nonmembers))):
        raise ConfigError("attack scores must be finite numbers: fix the attack's score (NaN or infinity found)")
    labels = np.concatenate([np.ones(members.size), np.zeros(nonmembers.size)])
    scores = np.concatenate([members, nonmembers])
    fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
    points = []
    for target in fprs:
        if not 0 < target < 1:
            raise ConfigError(f"a false-positive rate to report must lie strictly between 0 and 1, got {target}")
        allowed = np.flatnonzero(fpr <= target)  # fpr[0] == 0: the threshold above every score
        best = allowed[np.argmax(tpr[allowed])]  # the first (lowest-FPR) threshold reaching the best TPR
        low, high = clopper_pearson(round(tpr[best] * members.size), members.size, confidence)
        false_pos = round(fpr[best] * nonmembers.size)
        fpr_high = clopper_pearson(false_pos, nonmembers.size, confidence)[1]
        points.append(RatePoint(target, float(tpr[best]), low, high, float(fpr[best]), fpr_high))
    return AttackResult(float(roc_auc_score(labels, scores)), tuple(points), members.size, nonmembers.size, fpr, tpr)
