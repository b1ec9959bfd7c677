"""The run plan: everything a run derives from its config, derived once.

``plan_run`` resolves the config (the dataset's defaults filled in) and
derives from it, and from the agreement and the sites' policies where there
are any, what every driver needs: the strategy (from the registry), the
secure-aggregation settings, the privacy plan (its level, the noise
calibrated to meet the target epsilon, and each site's effective epsilon
cap), the evaluation spec, and the task (its own code, loaded once) with
the layout of the model it builds. The simulation, ``consortium serve`` and the lifecycle
manager read the one ``RunPlan`` instead of each deriving their own.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Literal

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from consortium.config import SecureAggregationConfig, SimulationConfig
from consortium.data import Records
from consortium.errors import ConfigError
from consortium.governance.agreement import Agreement, check_run, with_agreed_terms
from consortium.governance.guard import epsilon_cap
from consortium.governance.policy import SitePolicy
from consortium.learning.adapter import ModelAdapter
from consortium.learning.strategies import Strategy, strategy_from_config
from consortium.learning.task import DataShape, Task, build_task_model, load_task, task_identity
from consortium.privacy import ddg
from consortium.privacy.accountant import calibrate_noise, calibrate_site_noise
from consortium.privacy.dpsgd import require_per_example, secure_numpy_generator
from consortium.privacy.events import RecordLevelEvent, SiteLevelEvent
from consortium.protocol import messages as m
from consortium.protocol.coordinator import SecureAggregation
from consortium.protocol.sitedp import AdaptiveClipping, SiteLevelDP
from consortium.run.sites import Budget
from consortium.secagg.graph import plan_graph


def make_strategy(config: SimulationConfig) -> Strategy:
    """The run's strategy, from the registry (see ``consortium.learning.strategies.register_strategy``)."""
    return strategy_from_config(config)


def evaluation_spec(config: SimulationConfig, sample: Records) -> m.EvaluationSpec:
    """What the sites measure beyond accuracy, the sensitive attribute named by its column in the schema."""
    ev = config.evaluation
    n_classes = len(sample.classes)
    if not n_classes:
        if ev.sensitive_feature is not None or ev.shift_noise is not None:
            raise ConfigError(
                "evaluation.sensitive_feature and evaluation.shift_noise are measured on classifications, and this "
                "task is a regression: remove them from the evaluation section"
            )
        return m.EvaluationSpec()
    if ev.positive_class >= n_classes:
        raise ConfigError(
            f"evaluation.positive_class is {ev.positive_class}, but the data has {n_classes} classes: "
            f"choose a class index from 0 to {n_classes - 1}"
        )
    feature = None
    if ev.sensitive_feature is not None:
        if ev.sensitive_feature not in sample.feature_names:
            raise ConfigError(
                f"evaluation.sensitive_feature '{ev.sensitive_feature}' is not a feature of the data: choose one of "
                f"{', '.join(sample.feature_names[:8])}{', ...' if len(sample.feature_names) > 8 else ''}"
            )
        feature = sample.feature_names.index(ev.sensitive_feature)
    return m.EvaluationSpec(
        sensitive_feature=feature, sensitive_threshold=ev.sensitive_threshold,
        positive_class=ev.positive_class, shift_noise=ev.shift_noise,
    )


def secure_aggregation(config: SimulationConfig, identity: Ed25519PrivateKey, directory: dict[str, bytes]) -> SecureAggregation | None:
    """The run's secure-aggregation settings for the coordinator, or None where the config turned it off."""
    sa = config.secure_aggregation
    if not sa.enabled:
        return None
    return SecureAggregation(
        identity=identity, directory=directory, update_clip=sa.update_clip, bits=sa.bits,
        dropout_rate=sa.dropout_rate, corruption_rate=sa.corruption_rate,
    )


def sample_shape(sample: Records) -> DataShape:
    """The shape of ``sample``'s data, with placeholder statistics (mean 0, scale 1): what a layout needs."""
    return DataShape(
        n_features=sample.n_features, classes=sample.classes, image_shape=sample.image_shape,
        mean=np.zeros(sample.n_features), scale=np.ones(sample.n_features),
    )


def run_task(config: SimulationConfig, sample: Records, task: Task | None = None) -> Task:
    """The run's task: ``task`` if given, else the one the config names (its model spec for a built-in),
    checked against the data: a classification's labels are classes, a regression's are numbers.

    Raises:
        ConfigError: the task cannot be loaded, its source cannot be read (no site could check it), or its
            target is not the data's.
    """
    if task is None:
        assert config.task is not None
        task = load_task(config.task, config.model)
    task_identity(task)  # what the manifest will name: refused now, before the run has a folder
    regression = not sample.classes
    if (task.target == "regression") != regression:
        label = "numbers" if regression else "classes"
        raise ConfigError(
            f"the task {task.name} is a {task.target}, and the data's labels are {label}: choose a "
            f"{'regression' if regression else 'classification'} task, or declare the label column's type to match"
        )
    return task


def model_adapter(config: SimulationConfig, sample: Records, task: Task) -> ModelAdapter:
    """The layout (parameters' names and shapes) of ``task``'s model for ``sample``'s data."""
    return ModelAdapter(build_task_model(task, sample_shape(sample), 0))


@dataclass(frozen=True)
class PrivacyPlan:
    """The run's differential privacy, planned: ``level`` None when the run is not private; ``event`` is
    each round's (the site-level one a template the coordinator's release fills in), None too in a plan
    that trains no more (``plan_run(..., calibrate=False)``); ``epsilon_caps`` holds each site's effective
    cap (the config's, the agreement's and the site's own policy's, whichever is least)."""

    level: Literal["record", "site"] | None
    event: RecordLevelEvent | SiteLevelEvent | None
    epsilon_caps: Mapping[str, float]
    delta: float
    accountant: str
    noise_seed: int | None = None  # the coordinator's noise seed in test mode (site level), None for a secure one
    adaptive: tuple[float, float] | None = None  # (target quantile, learning rate) under adaptive clipping

    @property
    def enabled(self) -> bool:
        return self.level is not None

    def budget(self, site: str) -> Budget | None:
        """The budget ``site``'s ledger keeps, or None when the run is not under differential privacy."""
        if self.level is None:
            return None
        return Budget(self.epsilon_caps[site], self.delta, self.accountant)  # type: ignore[arg-type]

    def coordinator_privacy(self) -> RecordLevelEvent | SiteLevelDP | None:
        """What the coordinator is given: the record-level event, or a fresh site-level release (its noise
        generator and clipping state are the run's own)."""
        if self.level is not None and self.event is None:
            raise ValueError("this privacy plan was made for a run that trains no more: no round's noise is calibrated")
        if not isinstance(self.event, SiteLevelEvent):
            return self.event
        return SiteLevelDP(
            template=self.event,
            noise_rng=secure_numpy_generator(self.noise_seed),
            adaptive=AdaptiveClipping(*self.adaptive) if self.adaptive is not None else None,
        )


@dataclass(frozen=True)
class RunPlan:
    """One run, resolved once: built by ``plan_run``, read by the simulation, ``serve`` and the lifecycle."""

    config: SimulationConfig  # resolved: the dataset's defaults filled in
    names: tuple[str, ...]
    strategy: Strategy
    secure: SecureAggregationConfig | None  # None where secure aggregation is off
    privacy: PrivacyPlan
    evaluation: m.EvaluationSpec
    task: Task  # the study's task (this machine's own copy of its code)
    layout_hash: str  # of the task's model
    model_size: int
    agreement: Agreement | None = None
    policies: Mapping[str, SitePolicy] = field(default_factory=lambda: MappingProxyType({}))

    def with_policies(self, policies: Mapping[str, SitePolicy]) -> RunPlan:
        """The same plan with the sites' own policies: each site's cap the least of the config's, the
        agreement's and its policy's (a new plan; this one is unchanged)."""
        held = dict(policies)
        caps = epsilon_caps(self.config, list(self.names), self.agreement, held)
        return replace(
            self, privacy=replace(self.privacy, epsilon_caps=MappingProxyType(caps)), policies=MappingProxyType(held)
        )

    @property
    def warnings(self) -> tuple[str, ...]:
        """What can be said before any site trains (``site_level_noise_warning``); the run's summary and
        the command line repeat it."""
        warning = site_level_noise_warning(self)
        return (warning,) if warning else ()

    def secure_aggregation(self, identity: Ed25519PrivateKey, directory: dict[str, bytes]) -> SecureAggregation | None:
        """The coordinator's secure-aggregation settings under ``identity``, or None where it is off."""
        return secure_aggregation(self.config, identity, directory)


def plan_run(
    config: SimulationConfig,
    *,
    sample: Records,
    names: list[str] | None = None,
    agreement: Agreement | None = None,
    policies: Mapping[str, SitePolicy] | None = None,
    task: Task | None = None,
    calibrate: bool = True,
) -> RunPlan:
    """Resolve ``config`` once and derive the run's plan.

    Args:
        config: the run's configuration (resolved here; resolving a resolved one changes nothing); under an
            agreement, the rounds, minimum cohort and privacy terms it does not set are the agreement's.
        sample: a table with the data's layout (feature names, classes, image shape); its rows are never read.
        names: the sites, in order (default: the agreement's, or the config's capped sites).
        agreement: the signed agreement the run is held to, if any (its ``max_epsilon`` caps every site).
        policies: each site's own policy, by name, where it has one (its ``max_epsilon`` caps that site).
        task: the study's task (default: the one the config names, or the built-in task for the data's
            labels); the plan's layout hash and noise dimension are its model's.
        calibrate: False for a run that trains no more (a finished run reopened for its model lifecycle):
            each site's budget is planned, no round's noise is calibrated (seconds saved, nothing lost).

    Returns:
        The frozen ``RunPlan``.

    Raises:
        ConfigError: the privacy plan or the evaluation spec cannot be met by this config and data, the
            model mixes the examples of a batch under record-level DP (BatchNorm), or the agreement does
            not allow this config or this model's layout.
    """
    if agreement is not None:  # what the config leaves unsaid, the agreement's terms say (the recipe follows)
        config = with_agreed_terms(config, agreement)
    config = config.resolved()
    assert config.model is not None and config.training is not None
    if task is not None:
        config = config.model_copy(update={"task": task.name})
    elif config.task is None:  # the built-in task for the data's labels: what the run records
        config = config.model_copy(update={"task": "classification" if sample.classes else "regression"})
    task = run_task(config, sample, task)
    if names is None:
        names = agreement.sites() if agreement is not None else sorted(config.privacy.site_epsilon_caps)
    adapter = model_adapter(config, sample, task)
    if config.privacy.enabled and config.privacy.level == "record":  # refused before any site trains, with the fix
        require_per_example(adapter.module)
    privacy = _plan_privacy(config, list(names), adapter.size, calibrate=calibrate)
    if agreement is not None:  # no run starts unless the config and the model keep the agreement
        check_run(agreement, config, list(names), adapter.layout_hash, task_identity(task))
    plan = RunPlan(
        config=config,
        names=tuple(names),
        strategy=make_strategy(config),
        secure=config.secure_aggregation if config.secure_aggregation.enabled else None,
        privacy=privacy,
        evaluation=evaluation_spec(config, sample),
        task=task,
        layout_hash=adapter.layout_hash,
        model_size=adapter.size,
        agreement=agreement,
    )
    return plan.with_policies(policies or {})


def site_level_noise_warning(plan: RunPlan) -> str | None:
    """A dry-run estimate, before training, of whether site-level DP's noise swamps what the sites can send.

    Each round, ``m`` sites (the participation's expected cohort) send updates clipped to L2 norm C, so
    their sum is at most m C long; the noise on the sum has standard deviation z C per coordinate (under
    distributed noise, calibrated for the smallest honest cohort c, sqrt(m / c) times that, since every
    site adds its share), so over the model's d parameters its norm is about z C sqrt(d). When that is
    larger than m C, no round's sum can point anywhere the noise does not drown: the warning names the
    ratio and what would bring it under 1. None when the run is not at site level or the ratio is below 1.
    """
    event = plan.privacy.event
    if not isinstance(event, SiteLevelEvent) or event.noise_multiplier == 0:
        return None
    part, n = plan.config.participation, len(plan.names)
    m = min(n, max(part.min_sites, math.ceil(part.fraction * n)))
    d, z = plan.model_size, event.noise_multiplier
    spread = math.sqrt(m / event.cohort) if event.ddg is not None else 1.0
    ratio = z * math.sqrt(d) * spread / m
    if ratio <= 1:
        return None
    needed = z * z * d / event.cohort if event.ddg is not None else z * math.sqrt(d)
    return (
        f"site-level DP: each round's noise is about {ratio:.1f}x the largest sum the {m} sites' clipped updates can "
        f"reach (noise multiplier {z:.2f} over {d:,} parameters), so the model will learn little: it takes about "
        f"{math.ceil(needed):,} sites per round for the signal to match the noise; use record-level DP, a smaller "
        "model, or a larger epsilon"
    )


def epsilon_caps(
    config: SimulationConfig, names: list[str], agreement: Agreement | None, policies: Mapping[str, SitePolicy]
) -> dict[str, float]:
    """Each site's effective epsilon cap: the least of the config's (its own cap, or the run's epsilon),
    the agreement's ``max_epsilon`` and the site's own policy's."""
    pc = config.privacy
    return {  # the agreement and policy part is the site guard's own rule (a policy exists only under an agreement)
        name: min(pc.site_epsilon_caps.get(name, pc.epsilon),
                  epsilon_cap(agreement, policies.get(name)) if agreement is not None else math.inf)
        for name in names
    }


def _plan_privacy(config: SimulationConfig, names: list[str], dim: int, *, calibrate: bool = True) -> PrivacyPlan:
    """Each round's privacy, with the noise calibrated so the whole run meets the target epsilon (each
    site's cap the config's here: ``RunPlan.with_policies`` lowers it to the agreement's and the policy's)."""
    pc, training = config.privacy, config.training
    caps = MappingProxyType(epsilon_caps(config, names, None, {}))
    if not pc.enabled or not calibrate:
        return PrivacyPlan(
            level=pc.level if pc.enabled else None, event=None, epsilon_caps=caps, delta=pc.delta, accountant=pc.accountant,
        )
    if pc.level == "site":
        adaptive = pc.adaptive_clipping
        return PrivacyPlan(
            level="site", event=_plan_site_level(config, len(names), dim), epsilon_caps=caps, delta=pc.delta,
            accountant=pc.accountant, noise_seed=None if pc.test_seed is None else pc.test_seed + 0xC0,
            adaptive=(adaptive.target_quantile, adaptive.learning_rate) if adaptive.enabled else None,
        )
    assert training is not None
    steps = max(1, math.ceil(training.epochs / pc.sampling_rate))  # `epochs` expected passes per round
    sigma = pc.noise_multiplier
    if sigma is None:
        sigma = calibrate_noise(
            target_epsilon=pc.epsilon,
            delta=pc.delta,
            sampling_rate=pc.sampling_rate,
            steps=steps * config.rounds,
            accountant=pc.accountant,
        )
    event = RecordLevelEvent(noise_multiplier=sigma, clip=pc.clip, sampling_rate=pc.sampling_rate, steps=steps)
    return PrivacyPlan(level="record", event=event, epsilon_caps=caps, delta=pc.delta, accountant=pc.accountant)


def _plan_site_level(config: SimulationConfig, n_sites: int, dim: int) -> SiteLevelEvent:
    """DP-FedAvg over the run's rounds: every round a site joins is paid in full (no sampling amplification)."""
    pc, sa, part = config.privacy, config.secure_aggregation, config.participation
    adaptive = pc.adaptive_clipping
    share = adaptive.count_share if adaptive.enabled else 0.0
    cohort = max(part.min_sites, math.ceil(part.fraction * n_sites))
    if pc.noise == "distributed":
        if pc.noise_multiplier is not None:
            raise ConfigError("distributed noise is calibrated from privacy.epsilon: remove privacy.noise_multiplier")
        # Calibrated for the smallest sum secure aggregation will unmask (its threshold), less the
        # sites assumed to collude with the coordinator: they can take their own noise back out.
        graph = plan_graph(cohort, dropout_rate=sa.dropout_rate, corruption_rate=sa.corruption_rate)
        colluders = min(math.ceil(round(sa.corruption_rate * cohort, 9)), graph.threshold - 1)
        cohort = graph.threshold - colluders
        noise = ddg.plan_ddg(
            target_epsilon=pc.epsilon, delta=pc.delta, rounds=config.rounds, dim=dim,
            cohort=cohort, max_sites=n_sites, bits=sa.bits, count_share=share,
        )
        summed_sd = math.sqrt(cohort * noise.site_variance)
        count_z = 2 * summed_sd / noise.count_scale if noise.count_scale else None
        return SiteLevelEvent(
            mechanism="dp-fedavg-distributed-discrete-gaussian", noise_multiplier=ddg.noise_multiplier_of(noise, cohort),
            clip=pc.update_clip, cohort=cohort, colluders=colluders, count_noise_multiplier=count_z, ddg=noise,
        )
    if pc.noise_multiplier is not None:
        z = pc.noise_multiplier
        z_update, count_z = (z / math.sqrt(1 - share), z / math.sqrt(share)) if share else (z, None)
    else:
        z_update, count_z = calibrate_site_noise(
            target_epsilon=pc.epsilon, delta=pc.delta, rounds=config.rounds, count_share=share,
            accountant=pc.accountant,
        )
    return SiteLevelEvent(
        mechanism="dp-fedavg-gaussian", noise_multiplier=z_update, clip=pc.update_clip, cohort=cohort,
        count_noise_multiplier=count_z,
    )
