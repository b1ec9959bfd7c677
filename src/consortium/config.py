"""The simulation configuration: one pydantic model, loaded from YAML with line numbers.

Every field is documented in ``examples/simulate.yaml``. Unknown keys are
errors (a typo must not silently fall back to a default), and a validation
error names the file, the line and the field.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from consortium.data import BUILTIN_DATASETS
from consortium.errors import ConfigError
from consortium.learning.robust import AGGREGATORS, CONDITIONS, Aggregator, min_updates, needs_updates
from consortium.learning.specs import ModelSpec, TrainSettings
from consortium.learning.strategies import check_strategy_name
from consortium.yamlfile import parse_yaml, read_text, validate

SiteName = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


#: The built-in datasets whose label is a number (their task is a regression).
REGRESSION_DATASETS = ("diabetes",)


class PartitionConfig(_Strict):
    """How a built-in dataset is split across simulated sites."""

    kind: Literal["iid", "dirichlet", "quantity"] = "dirichlet"
    alpha: float = Field(0.5, gt=0, le=1e6)  # Dirichlet label skew: small = skewed
    beta: float = Field(1.0, gt=0, le=1e6)  # Dirichlet quantity skew: small = unequal sizes
    min_rows: int = Field(10, ge=1)


class SplitConfig(_Strict):
    validation: float = Field(0.1, ge=0, lt=0.5)
    test: float = Field(0.2, gt=0, lt=0.5)


class SyntheticConfig(_Strict):
    rows_per_site: int = Field(400, ge=20, le=10_000_000)
    n_features: int = Field(12, ge=2, le=10_000)
    # Moderately heterogeneous by default; 0 makes the hospitals alike in that respect.
    label_skew: float = Field(0.5, ge=0, le=100)
    feature_shift: float = Field(0.5, ge=0, le=100)
    size_imbalance: float = Field(0.5, ge=0, le=100)


class CsvSiteConfig(_Strict):
    name: SiteName
    csv: Path
    schema_file: Path = Field(alias="schema")

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class TaskSiteConfig(_Strict):
    """A simulated site whose data the task loads itself (``Task.load``) from ``path``: a folder of images,
    an array, anything the task reads."""

    name: SiteName
    path: Path


class DataConfig(_Strict):
    dataset: str = "breast-cancer"
    sites: int | None = Field(None, ge=1, le=10_000)
    partition: PartitionConfig = PartitionConfig()
    split: SplitConfig = SplitConfig()
    synthetic: SyntheticConfig = SyntheticConfig()
    csv_sites: list[CsvSiteConfig] | None = None
    task_sites: list[TaskSiteConfig] | None = None  # dataset 'task': each site's path, read by the task's load

    @field_validator("dataset")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in ("csv", "task") and v not in BUILTIN_DATASETS:
            raise ValueError(
                f"unknown dataset '{v}': choose one of {', '.join(BUILTIN_DATASETS)}, 'csv' with csv_sites, "
                "or 'task' with task_sites (the task loads each site's data)"
            )
        return v

    @model_validator(mode="after")
    def _check(self) -> DataConfig:
        if self.dataset == "csv":  # deployed, each site names its own CSV (join --data): no csv_sites
            names = [s.name for s in self.csv_sites or []]
            if len(set(names)) != len(names):
                raise ValueError(f"csv_sites names must be unique, found {names}")
        elif self.csv_sites:
            raise ValueError("csv_sites is only read when dataset is 'csv'")
        if self.dataset == "task":  # deployed, each site names its own path (join --data): no task_sites
            names = [s.name for s in self.task_sites or []]
            if len(set(names)) != len(names):
                raise ValueError(f"task_sites names must be unique, found {names}")
        elif self.task_sites:
            raise ValueError("task_sites is only read when dataset is 'task'")
        if self.dataset in REGRESSION_DATASETS and "partition" not in self.model_fields_set:
            # label skew needs classes: a built-in regression dataset is split IID unless the config says how
            object.__setattr__(self, "partition", PartitionConfig(kind="iid"))
        return self

    @property
    def n_sites(self) -> int:
        if self.csv_sites:
            return len(self.csv_sites)
        if self.task_sites:
            return len(self.task_sites)
        return self.sites if self.sites is not None else 3


class StrategyConfig(_Strict):
    name: str = "fedavg"  # a registered strategy (consortium.learning.strategies.register_strategy)
    weighting: Literal["examples", "uniform"] = "examples"
    mu: float = Field(0.01, ge=0, le=1e3)  # fedprox only
    server_lr: float | None = Field(None, gt=0, le=100)  # default 1.0 for fedavg/fedprox, 0.01 for fedadam/fedyogi
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.99, ge=0, lt=1)
    tau: float = Field(1e-3, gt=0, le=10)

    @field_validator("name")
    @classmethod
    def _registered(cls, v: str) -> str:
        try:
            return check_strategy_name(v)
        except ConfigError as exc:
            raise ValueError(str(exc)) from None


class ParticipationConfig(_Strict):
    fraction: float = Field(1.0, gt=0, le=1)  # share of sites asked to train each round
    min_sites: int = Field(1, ge=1)  # fewer answers than this: the round is skipped
    dropout: float = Field(0.0, ge=0, lt=1)  # chance that an asked site never answers (simulation)


class SecureAggregationConfig(_Strict):
    """SecAgg+ (on unless turned off): the coordinator learns only sums."""

    enabled: bool = True
    update_clip: float = Field(1.0, gt=0, le=1e6)  # each update coordinate is clipped to [-clip, clip]
    bits: int = Field(32, ge=16, le=62)  # ring Z_{2^bits} for model updates
    dropout_rate: float = Field(0.1, ge=0, lt=1)  # expected share of sites lost mid-round (graph planning)
    corruption_rate: float = Field(0.1, ge=0, lt=1)  # share of sites assumed to collude with the coordinator


class AdaptiveClippingConfig(_Strict):
    """Site level only: move the clip towards a quantile of the update norms (Andrew et al., NeurIPS 2021)."""

    enabled: bool = False
    target_quantile: float = Field(0.5, gt=0, lt=1)  # share of sites whose update should fit under the clip
    learning_rate: float = Field(0.2, gt=0, le=10)  # geometric step of the clip per round
    count_share: float = Field(0.1, gt=0, lt=1)  # share of each round's privacy budget the clipped count takes


class PrivacyConfig(_Strict):
    """Differential privacy, on unless turned off: record level (DP-SGD at every site) or site level (DP-FedAvg)."""

    enabled: bool = True
    level: Literal["record", "site"] = "record"
    epsilon: float = Field(8.0, gt=0, le=1000)  # each site's target for the whole run; calibrates the noise
    delta: float = Field(1e-5, gt=0, lt=1)
    #: Per-example gradient L2 bound. 3, not the customary 1: a clip that bites on most examples turns
    #: DP-SGD into normalised SGD, whose fixed point is miscalibrated (Bu et al., TMLR 2023), and a
    #: tabular run at epsilon 8 then ends with a log-loss worse than a constant prediction.
    clip: float = Field(3.0, gt=0, le=1e6)
    sampling_rate: float = Field(0.1, gt=0, le=1)  # Poisson sampling probability per record and step (declared)
    noise_multiplier: float | None = Field(None, ge=0, le=1e6)  # set it to skip calibration (epsilon is then reported)
    accountant: Literal["pld", "rdp"] = "pld"
    site_epsilon_caps: dict[str, float] = {}  # a site's own stricter cap; default: epsilon
    test_seed: int | None = Field(None, ge=0)  # TEST MODE: reproducible noise, labelled as not private
    # Site level only:
    noise: Literal["distributed", "central"] | None = None  # default: distributed under secure aggregation
    update_clip: float = Field(1.0, gt=0, le=1e6)  # L2 bound on each site's model update (the start, if adaptive)
    adaptive_clipping: AdaptiveClippingConfig = AdaptiveClippingConfig()

    @model_validator(mode="after")
    def _caps(self) -> PrivacyConfig:
        bad = {k: v for k, v in self.site_epsilon_caps.items() if not v > 0}
        if bad:
            raise ValueError(f"site epsilon caps must be positive, found {bad}")
        if self.level == "record" and (self.noise is not None or self.adaptive_clipping.enabled):
            raise ValueError("noise and adaptive_clipping are site-level settings: set level: site, or remove them")
        return self


class AgreementConfig(_Strict):
    """A signed consortium agreement the run must keep (``consortium agreement init|sign``)."""

    file: Path  # the agreement (YAML); its signatures lie beside it
    keys: Path  # a folder of the members' identity key files, <member>.key (simulation only)
    policies: Path | None = None  # a folder of sites' own policies, <site>.yaml (simulation only; any site may have none)


class IncidentConfig(_Strict):
    """Automatic halts: integrity failures always halt; an anomalous update norm halts above this factor."""

    update_norm_factor: float | None = Field(10.0, gt=1, le=1e6)  # null: no norm monitoring


class RobustConfig(_Strict):
    """Defences against poisoned updates (``consortium.learning.robust``).

    ``norm_bound`` works under secure aggregation (each site's runtime bounds its own update; without
    secure aggregation the coordinator also enforces it); ``median``, ``trimmed_mean``, ``krum`` and
    ``multi_krum`` read each site's update, so they need secure aggregation off.
    """

    aggregator: Aggregator = "mean"
    byzantine: int = Field(0, ge=0, le=10_000)  # f: arbitrary updates the aggregator must tolerate per round
    norm_bound: float | None = Field(None, gt=0, le=1e6)  # L2 bound on each site's model update; null: none

    @model_validator(mode="after")
    def _mean(self) -> RobustConfig:
        if self.aggregator == "mean" and self.byzantine > 0:
            raise ValueError(
                f"the mean tolerates no arbitrary update, found byzantine: {self.byzantine}: choose aggregator "
                f"{' | '.join(a for a in AGGREGATORS if a != 'mean')}, or set byzantine: 0 and bound norms with norm_bound"
            )
        return self


class EvaluationConfig(_Strict):
    """What the sites measure beyond accuracy, each summed through secure aggregation like accuracy itself."""

    sensitive_feature: str | None = None  # a feature of the schema whose groups the fairness gaps compare
    sensitive_threshold: float | None = None  # groups: at or below / above it; default: the consortium's mean
    positive_class: int = Field(1, ge=0)  # the favourable prediction (class index)
    shift_noise: float | None = Field(None, gt=0, le=100)  # robustness: Gaussian noise, in feature standard deviations


class BaselineConfig(_Strict):
    local_only: bool = True
    pooled: bool = True


class RayConfig(_Strict):
    """Where and how the Ray backend plays the sites (``backend: ray``; ``consortium.run.ray_backend``).

    A pool of worker actors plays every site: each worker holds several sites, each site on one worker,
    and a site's durable state (its ledger, signed record and memory of co-signed heads) lives in the run
    folder, so a worker that is lost and restarted picks its sites up from there.
    """

    #: An existing cluster ("auto", "host:port", "ray://host:10001"); null: a local Ray on this machine.
    #: On a cluster of several machines the run folder must be on storage every node shares.
    address: str | None = Field(None, min_length=1, max_length=512)
    num_cpus: float = Field(1.0, gt=0, le=1024)  # each worker's CPUs, as Flower's client resources
    num_gpus: float = Field(0.0, ge=0, le=64)  # each worker's GPUs
    workers: int | None = Field(None, ge=1, le=100_000)  # null: as many as the cluster's CPUs / num_cpus (at most one per site)


class SimulationConfig(_Strict):
    """Everything a run is: data and sites, model and training, rounds, secure aggregation and differential
    privacy (both on unless turned off), strategy, robust aggregation, evaluation, agreement. Every key
    and its default is documented in ``examples/simulate.yaml``; unknown keys are errors."""

    seed: int = Field(0, ge=0, le=2**63 - 1)
    rounds: int = Field(20, ge=1, le=100_000)
    data: DataConfig = DataConfig()
    #: The study's task: a built-in (classification, regression), ``package.module:Class`` or
    #: ``path/to/file.py:Class`` (see ``consortium.learning.task``). None: the built-in one for the data's labels.
    task: str | None = Field(None, pattern=r"^(?:[a-z][a-z0-9-]*|[A-Za-z0-9_./\\-]+:[A-Za-z_]\w*)$")
    model: ModelSpec | None = None  # the built-in tasks' model; None: the dataset's default (see DATASET_DEFAULTS)
    training: TrainSettings | None = None
    strategy: StrategyConfig = StrategyConfig()
    participation: ParticipationConfig = ParticipationConfig()
    secure_aggregation: SecureAggregationConfig = SecureAggregationConfig()
    privacy: PrivacyConfig = PrivacyConfig()
    baselines: BaselineConfig = BaselineConfig()
    evaluation: EvaluationConfig = EvaluationConfig()
    incidents: IncidentConfig = IncidentConfig()
    robust: RobustConfig = RobustConfig()
    agreement: AgreementConfig | None = None  # None: no agreement (the run says so)
    #: Who plays the simulated sites: this process, one after another (in-process), or a pool of Ray workers.
    backend: Literal["in-process", "ray"] = "in-process"
    ray: RayConfig = RayConfig()

    @model_validator(mode="after")
    def _noise_needs_secagg(self) -> SimulationConfig:
        p = self.privacy
        if p.enabled and p.level == "site" and p.noise == "distributed" and not self.secure_aggregation.enabled:
            raise ValueError(
                "distributed noise is added inside secure aggregation, which is off: turn it on, or set "
                "privacy.noise: central (weaker: the coordinator then sees every update before adding noise)"
            )
        return self

    @model_validator(mode="after")
    def _robust_tolerance(self) -> SimulationConfig:
        """A defence's tolerance condition must hold in every round that aggregates, however few answer."""
        r = self.robust
        if not needs_updates(r.aggregator):
            return self
        if self.secure_aggregation.enabled:
            raise ValueError(
                f"robust.aggregator {r.aggregator} needs each site's update, which secure aggregation hides: "
                "turn secure_aggregation off, or use norm bounding (aggregator: mean, norm_bound: B)"
            )
        if self.privacy.enabled and self.privacy.level == "site":
            raise ValueError(
                f"robust.aggregator {r.aggregator} does not compute the sum that site-level DP adds its noise to: "
                "use aggregator: mean (with norm_bound), or record-level privacy"
            )
        # A round aggregates as few as participation.min_sites updates (fewer and it is skipped), whatever
        # the cohort: dropouts can take it down to that. So the condition must hold for n = min_sites.
        need, f = min_updates(r.aggregator, r.byzantine), r.byzantine
        condition = f"{CONDITIONS[r.aggregator]} with f = {f}"
        if self.participation.min_sites < need:
            raise ValueError(
                f"robust.aggregator {r.aggregator} tolerates f Byzantine updates only when {condition}, and a round "
                f"may aggregate as few as participation.min_sites = {self.participation.min_sites}: set "
                f"participation.min_sites to at least {need}, or lower robust.byzantine"
            )
        return self  # the consortium's own size is checked where its sites are known (the coordinator)

    def resolved(self) -> SimulationConfig:
        """The same config with the dataset's defaults filled in: what a run records."""
        model, plain, dp_sgd = DATASET_DEFAULTS.get(self.data.dataset, DATASET_DEFAULTS["breast-cancer"])
        privacy = self.privacy
        # The keys a config sets replace the dataset's recipe for this run, the rest keep it: DP-SGD's
        # (no momentum, a step sized to the noise) whenever the run trains under record-level DP.
        recipe = dp_sgd if privacy.enabled and privacy.level == "record" else plain
        given = self.training.model_dump(include=self.training.model_fields_set) if self.training else {}
        training = recipe.model_copy(update=given)
        if privacy.level == "site" and privacy.noise is None:
            noise = "distributed" if self.secure_aggregation.enabled else "central"
            privacy = privacy.model_copy(update={"noise": noise})
        return self.model_copy(
            update={"model": self.model or model, "training": training, "privacy": privacy}
        )


#: Per-dataset defaults for the model and each site's training per round: without DP (or under site-level
#: DP), and under record-level DP-SGD. DP-SGD's recipe has no momentum (momentum 0.9 multiplies each
#: step's noise tenfold) and a step of 0.05 at the clip of 3 (0.1 on digits, whose classes separate
#: widely); chosen so that no run of synthetic-hospitals (5 or 10 sites, 100 or 400 rows each), the
#: table example or breast-cancer ends with a log-loss worse than a constant prediction at epsilon 8
#: (docs/dp-recipe.md has the measurements; benchmarks/bench_dp_recipe.py repeats them).
_SGD = TrainSettings(epochs=1, batch_size=32, lr=0.05)
_DP_SGD = TrainSettings(epochs=1, batch_size=32, lr=0.05, momentum=0.0)
DATASET_DEFAULTS: dict[str, tuple[ModelSpec, TrainSettings, TrainSettings]] = {
    "breast-cancer": (ModelSpec(kind="mlp", hidden=(32,)), _SGD.model_copy(update={"batch_size": 16}), _DP_SGD),
    "digits": (
        ModelSpec(kind="mlp", hidden=(128,)), _SGD.model_copy(update={"batch_size": 16}),
        _DP_SGD.model_copy(update={"lr": 0.1}),
    ),
    "synthetic-hospitals": (ModelSpec(kind="mlp", hidden=(32,)), _SGD, _DP_SGD),
    "csv": (ModelSpec(kind="mlp", hidden=(32,)), _SGD, _DP_SGD),
    "task": (ModelSpec(kind="mlp", hidden=(32,)), _SGD, _DP_SGD),
    "diabetes": (ModelSpec(kind="mlp", hidden=(16,)), _SGD.model_copy(update={"batch_size": 16}), _DP_SGD),
}


def parse_config(text: str, source: str = "<config>") -> SimulationConfig:
    """Parse YAML text into a SimulationConfig; every failure is a ConfigError naming the line."""
    tree, raw = parse_yaml(text, source, ConfigError)
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of settings, found {type(raw).__name__}")
    return validate(SimulationConfig, raw, tree, source, ConfigError, "fix that value")


def load_config(path: str | Path) -> SimulationConfig:
    """Read a YAML config file (``examples/simulate.yaml`` documents every key) into a SimulationConfig.

    Raises ``ConfigError`` naming the file, line and field of the first problem, with the fix.
    """
    return parse_config(read_text(path, ConfigError, "config file"), source=str(path))
