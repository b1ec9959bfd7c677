"""A site's guard: every round plan is checked against the agreement, the site's policy and its budget.

The guard answers before any training, and its answer is the site's signed
decision in the transcript: an acceptance, or a refusal naming the rule that
refused. Budget comes last, so a plan refused for any other reason costs no
epsilon. Under secure aggregation the minimum cohort is also enforced where
it counts: the site helps unmask no sum over fewer sites, whatever the plan
said (it checks the signed list of survivors before it reveals any share).

Rules are named, stable identifiers (``min_cohort``, ``budget``...). Those in
``INTEGRITY_RULES`` mean the coordinator or the transcript misbehaved rather
than that the plan was unwelcome: a refusal under one of them halts the run.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable

from consortium.errors import ConfigError, ProtocolError
from consortium.governance.agreement import Agreement
from consortium.governance.policy import SitePolicy
from consortium.privacy.events import PrivacyEvent
from consortium.privacy.ledger import BudgetExceeded, BudgetLedger

Clock = Callable[[], dt.datetime]

#: Refusals that mean an integrity check failed (not a policy choice): each halts the run.
INTEGRITY_RULES = frozenset({"plan_proof", "model_hash", "plan_mismatch", "task"})


class Refused(ProtocolError):
    """A site declines a request under a named rule."""

    def __init__(self, rule: str, reason: str) -> None:
        super().__init__(reason)
        self.rule = rule


def utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def epsilon_cap(agreement: Agreement, policy: SitePolicy | None) -> float:
    """The most epsilon a site may spend: its agreement's cap, or its own policy's if stricter."""
    own = policy.max_epsilon if policy is not None and policy.max_epsilon is not None else agreement.privacy.max_epsilon
    return min(agreement.privacy.max_epsilon, own)


class SiteGuard:
    """The checks one site applies to each round plan; ``clock`` is injectable for tests of quiet hours."""

    def __init__(
        self,
        site: str,
        *,
        agreement: Agreement | None = None,
        policy: SitePolicy | None = None,
        ledger: BudgetLedger | None = None,
        clock: Clock = utc_now,
    ) -> None:
        if policy is not None and policy.site != site:
            raise ConfigError(f"the policy is '{policy.site}'s, not '{site}'s")
        if agreement is not None:  # the budget the site keeps must be the one it agreed to, or stricter
            if ledger is None:
                raise ConfigError(f"the agreement requires differential privacy: site '{site}' needs its budget ledger")
            cap = epsilon_cap(agreement, policy)
            if ledger.epsilon_cap > cap or ledger.delta > agreement.privacy.delta:
                raise ConfigError(
                    f"site '{site}''s ledger allows epsilon {ledger.epsilon_cap:g} at delta {ledger.delta:g}; its agreement "
                    f"and policy allow at most {cap:g} at delta {agreement.privacy.delta:g}: lower the ledger's cap"
                )
        self.site = site
        self.agreement = agreement
        self.policy = policy
        self.ledger = ledger
        self._clock = clock

    @property
    def min_cohort(self) -> int:
        """The smallest cohort this site trains with: the larger of the agreement's and its own."""
        agreed = self.agreement.min_cohort if self.agreement is not None else 1
        own = self.policy.min_cohort if self.policy is not None and self.policy.min_cohort is not None else 1
        return max(agreed, own)

    def check_plan(
        self,
        rnd: int,
        *,
        cohort: list[str] | None,
        layout_hash: str,
        secure_aggregation: bool,
        privacy: PrivacyEvent | None,
        run: str = "",
    ) -> None:
        """Accept (and pay for) round ``rnd`` of run ``run``'s plan, or raise ``Refused`` naming the rule."""
        ag, policy = self.agreement, self.policy
        if policy is not None:
            quiet = policy.quiet_at(self._clock())
            if quiet is not None:
                raise Refused("quiet_hours", f"this site does not train during {quiet} ({policy.timezone}), by its policy")
        if cohort is not None and len(cohort) < self.min_cohort:
            raise Refused(
                "min_cohort", f"the plan's cohort has {len(cohort)} site(s); this site trains only with {self.min_cohort} or more"
            )
        if ag is not None:
            if cohort is None:
                raise Refused("min_cohort", "the plan names no cohort, so the agreement's minimum cohort cannot be checked")
            if ag.secure_aggregation_required and not secure_aggregation:
                raise Refused("secure_aggregation", "the agreement requires secure aggregation and this plan has none")
            if privacy is None or privacy.level != ag.privacy.level:
                found = "none" if privacy is None else f"{privacy.level}-level"
                raise Refused(
                    "privacy_level", f"the agreement requires {ag.privacy.level}-level differential privacy; the plan has {found}"
                )
            if ag.allowed_layouts and layout_hash not in ag.allowed_layouts:
                raise Refused("allowed_layouts", f"model layout {layout_hash[:12]}... is not among the agreement's allowed layouts")
        if policy is not None and layout_hash in policy.refused_layouts:
            raise Refused("refused_layouts", f"model layout {layout_hash[:12]}... is one this site's policy refuses")
        if self.ledger is not None:
            if privacy is None:
                raise Refused("budget", "this site trains only with differential privacy: the round plan has none")
            try:  # recorded as spent before any training, or refused
                self.ledger.spend(privacy, rnd=rnd, label=f"round {rnd}", run=run)
            except BudgetExceeded as exc:
                raise Refused("budget", str(exc)) from None

    def check_survivors(self, survivors: int) -> None:
        """Under secure aggregation: this site helps unmask no sum over fewer than the minimum cohort."""
        if survivors < self.min_cohort:
            raise Refused(
                "min_cohort", f"the sum would be over {survivors} site(s); this site unmasks none of fewer than {self.min_cohort}"
            )
