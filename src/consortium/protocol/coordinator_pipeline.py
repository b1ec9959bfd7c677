"""The coordinator's update pipeline: how a fit phase's sum becomes the next model.

One object, its steps in a fixed order (``UpdatePipeline.STEPS``):

1. ``quorum``: fewer updates than the strategy's ``min_sites`` (or no sum): the round is skipped;
2. ``norm_bound``: in the clear, each site's update is scaled into the robust norm bound
   (under secure aggregation the sites bound their own, as the signed round plan says);
3. ``site_dp_release``: site level, the noisy mean of DP-FedAvg (and the adaptive clip's
   next value) is released, and goes straight to the strategy;
4. ``secure_sum``: otherwise the sum is read as weighted update, weight and loss;
5. ``robust_rule``: in the clear, a median, trimmed mean or Krum replaces the mean;
6. ``monitor``: an anomalous update halts the run, the model unchanged;
7. ``strategy``: the strategy's server step makes the next model.

The strategy comes last and sees only the mean: whatever a strategy does,
the privacy steps before it have already run.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from consortium.errors import ConfigError
from consortium.governance.incident import Incident, NormMonitor
from consortium.learning.robust import RobustAggregation
from consortium.learning.strategies import Strategy
from consortium.privacy.events import RecordLevelEvent
from consortium.protocol.sitedp import SiteLevelDP
from consortium.protocol import contributions as c
from consortium.protocol import messages as m
from consortium.protocol.coordinator_rounds import PhaseResult, PhaseState, RoundRecord, SecureAggregation

COORDINATOR = m.COORDINATOR


@dataclass(frozen=True)
class FitOutcome:
    """What the pipeline made of a round: the next model (None: unchanged) and any incident it raised."""

    params: np.ndarray | None
    incident: Incident | None = None


class UpdatePipeline:
    """The fit phase's steps, in order, over the coordinator's settings (see the module docstring)."""

    STEPS = ("quorum", "norm_bound", "site_dp_release", "secure_sum", "robust_rule", "monitor", "strategy")

    def __init__(
        self,
        *,
        strategy: Strategy,
        secure: SecureAggregation | None,
        privacy: RecordLevelEvent | SiteLevelDP | None,
        robust: RobustAggregation | None,
        monitor: NormMonitor | None,
    ) -> None:
        self.strategy = strategy
        self.secure = secure
        self.privacy = privacy
        self.robust = robust
        self.monitor = monitor

    @property
    def site_dp(self) -> SiteLevelDP | None:
        return self.privacy if isinstance(self.privacy, SiteLevelDP) else None

    def check(self, n_sites: int) -> None:
        """The robust rule's tolerance condition holds in every round that aggregates, or ConfigError."""
        robust = self.robust
        if robust is None or not robust.needs_updates:
            return
        if self.secure is not None:
            raise ConfigError(
                f"robust aggregator {robust.aggregator} needs each site's update, which secure aggregation hides: "
                "turn secure_aggregation off, or use norm bounding"
            )
        if self.site_dp is not None:
            raise ConfigError(
                f"robust aggregator {robust.aggregator} does not compute the sum that site-level DP adds its noise to: "
                "use the mean with a norm bound, or record-level privacy"
            )
        need = robust.min_updates
        if self.strategy.min_sites < need or n_sites < need:
            raise ConfigError(
                f"robust aggregator {robust.aggregator} tolerates f={robust.byzantine} Byzantine updates only in rounds "
                f"of at least {need} updates; min_sites is {self.strategy.min_sites} and there are {n_sites} "
                f"sites: set min_sites to at least {need} (with as many sites), or lower byzantine"
            )

    def run(self, st: PhaseState, result: PhaseResult, record: RoundRecord, params: np.ndarray, rnd: int) -> FitOutcome:
        """Every step in order; ``record`` gets the round's status, reason, loss, privacy and robust notes."""
        record.answered = sorted(result.included)
        record.refused = dict(st.refused)
        record.dropped = sorted(set(record.selected) - set(result.included) - set(st.refused))
        # quorum
        if result.total is None or len(result.included) < self.strategy.min_sites:
            record.status = "skipped"
            record.reason = result.reason or (
                f"only {len(result.included)} of {len(record.selected)} sites returned an update "
                f"(min_sites={self.strategy.min_sites})"
            )
            record.reason += ": the model is unchanged this round"
            return FitOutcome(None)
        n_params = params.shape[0]
        total = result.total
        # norm_bound
        if self.secure is None and self.robust is not None and self.robust.norm_bound is not None:
            total = self._bounded_plain_sum(st, record, n_params)  # in the clear the coordinator enforces the bound
        # site_dp_release
        site_dp = self.site_dp
        if site_dp is not None:
            clip = site_dp.clip
            mean, fraction = site_dp.release(total, n_params, len(result.included))
            record.privacy = {"clip": clip, "fraction_under_clip": fraction}
            return FitOutcome(self.strategy.apply(rnd, params, mean.astype(np.float32)))
        # secure_sum
        s = c.read_fit_sum(total, n_params, self.secure.update_clip if self.secure else None)
        if s.weight <= 0:
            record.status, record.reason = "skipped", "the updates carry no weight: the model is unchanged"
            return FitOutcome(None)
        if self.privacy is None:  # a training loss is not covered by any DP guarantee: not read under DP
            record.train_loss = s.weighted_loss / s.weight
        mean_update = (s.weighted_update / s.weight).astype(np.float32)
        # robust_rule
        if self.robust is not None and self.robust.needs_updates:
            robust_update = self._robust_update(st, record, n_params)
            if robust_update is None:
                record.status = "skipped"
                record.reason = (
                    f"fewer than {self.robust.min_updates} updates carry weight, which {self.robust.aggregator} needs "
                    f"to tolerate {self.robust.byzantine} Byzantine: the model is unchanged"
                )
                return FitOutcome(None)
            mean_update = robust_update
        # monitor
        incident = self._anomaly(st, mean_update, n_params, rnd)
        if incident is not None:
            record.status, record.reason = "halted", f"halted: {incident.detail}: the model is unchanged"
            return FitOutcome(None, incident)
        # strategy
        return FitOutcome(self.strategy.apply(rnd, params, mean_update))

    def _bounded_plain_sum(self, st: PhaseState, record: RoundRecord, n_params: int) -> np.ndarray:
        """The plain round's sum with each site's update scaled into the norm bound (as its runtime should have).

        Each vector carries ``w * delta`` (site level: ``delta``), so the bound applies to ``delta``."""
        assert self.robust is not None and self.robust.norm_bound is not None
        bound, cut, vectors = self.robust.norm_bound, [], []
        for site in record.answered:
            v = st.plain[site].copy()
            w = 1.0 if self.site_dp is not None else float(v[n_params])
            norm = float(np.linalg.norm(v[:n_params]))
            if w <= 0:  # no weight, no update: a weightless vector would otherwise slip past the bound
                if norm > 0:
                    v[:n_params] = 0.0
                    cut.append(site)
            elif norm / w > bound * (1 + 1e-6):  # float32 transport: a site's own bounding may round just above
                v[:n_params] *= bound * w / norm
                cut.append(site)
            vectors.append(v)
        record.robust = {**(record.robust or {}), "bounded": cut}
        return np.sum(vectors, axis=0)

    def _robust_update(self, st: PhaseState, record: RoundRecord, n_params: int) -> np.ndarray | None:
        """Median, trimmed mean or (Multi-)Krum over the plain round's updates, each bounded first if asked;
        None when fewer updates carry weight than the aggregator's tolerance condition needs."""
        assert self.robust is not None
        sites = [u for u in record.answered if st.plain[u][n_params] > 0]
        if len(sites) < self.robust.min_updates:
            return None
        weights = np.array([st.plain[u][n_params] for u in sites])
        updates = np.stack([st.plain[u][:n_params] / st.plain[u][n_params] for u in sites])
        agg = self.robust.aggregate(updates, weights)
        info: dict[str, object] = {**(record.robust or {}), "bounded": [sites[i] for i in agg.bounded]}
        if agg.selected is not None:
            info["selected"] = [sites[i] for i in agg.selected]
        record.robust = info
        return agg.update.astype(np.float32)

    def _anomaly(self, st: PhaseState, mean_update: np.ndarray, n_params: int, rnd: int) -> Incident | None:
        """The round's updates against the monitor: an anomaly is returned as the run's incident."""
        if self.monitor is None:
            return None
        site_norms = None
        if self.secure is None:  # in the clear each site's update is seen anyway: name the largest
            site_norms = {u: float(np.linalg.norm(v[:n_params]) / v[n_params]) for u, v in st.plain.items() if v[n_params] > 0}
        found = self.monitor.check(float(np.linalg.norm(mean_update)), site_norms)
        if found is None:
            return None
        return Incident("update_norm", found[0], rnd, raised_by=COORDINATOR, site=found[1])
