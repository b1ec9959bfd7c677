"""Simulate a consortium on one machine, with the coordinator and site code of deployment.

The harness plays the part of the institutions: it gives each simulated site
its own splits, then steps aside. Training runs through the real protocol
(coordinator and sites exchanging encoded messages over the in-process
transport). The two baselines, *local-only* and *pooled*, need every site's
data in one place and so exist only here, as a yardstick: all three are
scored on the consortium's population (every site's test split).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from consortium.config import SimulationConfig, load_config
from consortium.crypto import keys
from consortium.data import (
    Records,
    Splits,
    SyntheticHospitals,
    check_schemas,
    load_builtin,
    load_schema,
    partition_dirichlet,
    partition_iid,
    partition_quantity,
    read_csv,
    split_table,
    synthetic_hospitals,
)
from consortium.data.stream import concat_records
from consortium.errors import ConfigError, DataError
from consortium.governance.agreement import Agreement, load_member_key
from consortium.governance.policy import SitePolicy, load_policy
from consortium.learning.specs import TrainSettings
from consortium.learning.task import DataShape, Task, build_task_model, evaluate_records, load_task
from consortium.learning.training import TrainingData
from consortium.run.orchestrator import CoordinatorRun, RunResult, run_folder, signed_agreement
from consortium.run.plan import RunPlan, plan_run
from consortium.run.session import finite_metrics
from consortium.protocol.contributions import read_setup_sum, setup_sums
from consortium.protocol.coordinator import COORDINATOR, RoundRecord
from consortium.protocol.site import Site
from consortium.protocol.trainer import LocalTrainer
from consortium.transcript.log import TreeHead, last_cosigned
from consortium.run.recorder import TranscriptRecorder
from consortium.run.sites import build_site, site_randomness, site_state
from consortium.audit.verify import AGREEMENT_FILE
from consortium.transport import InProcessTransport, SealedTransport


def site_splits(config: SimulationConfig, task: Task | None = None) -> dict[str, Splits]:
    """Each simulated site's train / validation / test split: the ones its ``Site`` trains and tests on
    (``task``: the study's task, which reads the data of a ``dataset: task`` config; default: the config's)."""
    split, data = config.data.split, config.data
    sources = {s.name: f" ({s.csv})" for s in data.csv_sites or []} | {s.name: f" ({s.path})" for s in data.task_sites or []}
    out = {}
    for name, table in site_datasets(config, task).items():
        try:
            out[name] = split_table(table, site_randomness(config.seed, name)[0], validation=split.validation, test=split.test)
        except DataError as exc:  # say whose data, and where it was read from
            raise DataError(f"site '{name}'{sources.get(name, '')}: {exc}") from None
    return out


def site_datasets(config: SimulationConfig, task: Task | None = None) -> dict[str, Records]:
    """Each simulated site's full table, keyed by site name: the same for the same config."""
    data = config.data
    rng = np.random.default_rng(np.random.SeedSequence([config.seed, 0xDA7A]))
    if data.dataset == "csv":
        if not data.csv_sites:
            raise ConfigError("dataset 'csv' needs csv_sites to simulate: a list of {name, csv, schema} per site")
        schemas = {s.name: load_schema(s.schema_file) for s in data.csv_sites}
        common = check_schemas(schemas)
        return {s.name: read_csv(s.csv, common) for s in data.csv_sites}
    if data.dataset == "task":  # each site's data as the study's task reads it
        if not data.task_sites:
            raise ConfigError("dataset 'task' needs task_sites to simulate: a list of {name, path} per site, read by the task's load")
        if task is None and config.task is None:
            raise ConfigError("dataset 'task' has each site's data read by the task's load: name the task (task: module:Class)")
        task = task or load_task(config.task, config.model)  # type: ignore[arg-type]
        if not task.loads_data:
            raise ConfigError(f"dataset 'task' needs a task that loads data, and {task.name} defines no load(path): "
                              "define it, or give csv_sites")
        return {s.name: task.records(s.path) for s in data.task_sites}
    k = data.n_sites
    if data.dataset == "synthetic-hospitals":
        spec = SyntheticHospitals(**data.synthetic.model_dump())
        return {f"hospital-{i + 1}": t for i, t in enumerate(synthetic_hospitals(k, spec, rng))}
    table = load_builtin(data.dataset)
    p = data.partition
    if p.kind == "iid":
        parts = partition_iid(table.n_rows, k, rng)
    elif p.kind == "dirichlet":
        parts = partition_dirichlet(table.y, k, p.alpha, rng, min_rows=p.min_rows)
    else:
        parts = partition_quantity(table.n_rows, k, p.beta, rng, min_rows=p.min_rows)
    return {f"site-{i + 1}": table.take(idx) for i, idx in enumerate(parts)}


def site_policies(config: SimulationConfig, agreement: Agreement | None, names: list[str]) -> dict[str, SitePolicy]:
    """Each simulated site's own policy, where the policies folder holds one; each checked against the agreement."""
    if config.agreement is None or config.agreement.policies is None or agreement is None:
        return {}
    folder = config.agreement.policies
    if not folder.is_dir():
        raise ConfigError(f"the policies folder '{folder}' does not exist: create it, or remove agreement.policies")
    policies = {}
    for name in names:
        path = folder / f"{name}.yaml"
        if path.exists():
            policy = load_policy(path, agreement)
            if policy.site != name:
                raise ConfigError(f"{path}: the policy is for site '{policy.site}', not '{name}': fix its site field")
            policies[name] = policy
    return policies


def _shape(table: Records, classes: tuple[str, ...]) -> DataShape:
    """``table``'s own layout and statistics (a baseline sees only its own rows), from the setup sums a
    site would release, read a batch at a time."""
    s = read_setup_sum(setup_sums(table), table.n_features, not classes)
    return DataShape(table.n_features, classes, table.image_shape, s.mean, s.scale, s.target_mean, s.target_scale)


def _train_alone(
    train: Records, config: SimulationConfig, task: Task, classes: tuple[str, ...], seed: int
) -> tuple[torch.nn.Module, DataShape]:
    """Train on one table with no one else: the baselines' procedure, the task's own model, loss and
    training step, the same initial weights and the same number of epochs as the federated run."""
    assert config.training is not None
    shape = _shape(train, classes)
    model = build_task_model(task, shape, config.seed)
    budget = TrainSettings(**{**config.training.model_dump(), "epochs": config.training.epochs * config.rounds})
    task.train(model, TrainingData(train, targets=lambda y: task.training_targets(y, shape)), budget, seed=seed)
    return model, shape


def _score(model: torch.nn.Module, shape: DataShape, table: Records, task: Task) -> dict[str, float]:
    """The task's metrics of ``model`` (trained under ``shape``) on ``table``, through the same sums a site releases."""
    return task.summarise(evaluate_records(task, model, table, shape), shape).metrics


def local_only_scores(
    config: SimulationConfig, task: Task, splits: Mapping[str, Splits], seeds: Mapping[str, int]
) -> dict[str, list[float]]:
    """The local-only baseline of each site in ``seeds``: its model trained on its own training split alone
    (with that seed), scored on the consortium's population (every site's test split) and on its own test
    split: ``[population, own]`` in the task's headline metric. Runs where the splits are (a Ray worker
    plays its own sites' baselines), so the same for the same seeds wherever it runs."""
    names = list(splits)
    classes = splits[names[0]].train.classes
    population = concat_records([splits[n].test for n in names])
    out = {}
    for name, seed in seeds.items():
        model, shape = _train_alone(splits[name].train, config, task, classes, seed)
        out[name] = [finite_metrics(_score(model, shape, table, task))[task.headline] for table in (population, splits[name].test)]
    return out


class Simulation(CoordinatorRun):
    """A consortium on one machine: the coordinator's run (``CoordinatorRun``) with simulated sites, played in
    this process or by a pool of Ray workers (``backend: ray``, ``consortium.run.ray_backend``).

    Building one checks everything (config, data, schemas, agreement, the sites' policies);
    ``run`` then trains, writes the run folder and returns the summary. Each site's randomness
    (its splits, its training seed, its noise in test mode) comes from the run's seed and the
    site's name alone (``site_randomness``), so a site process given the same seed
    (``consortium join --seed``) draws exactly what its simulated twin draws.
    """

    def __init__(
        self,
        config: SimulationConfig,
        *,
        out: Path | None = None,
        runs_root: Path = Path("runs"),
        task: Task | None = None,
        resume: bool = False,
        trainer: LocalTrainer | None = None,
    ) -> None:
        drop_seq, self._base_seq = np.random.SeedSequence(config.seed).spawn(2)
        self._pool: Any = None  # the Ray workers that play the sites (backend: ray)
        self._key_secret: bytes | None = None  # what fresh member keys derive from (no agreement)
        # Held by the harness only for the simulation-only baselines; each Site gets its own.
        self._splits = site_splits(config, task)
        names = list(self._splits)
        sample = self._splits[names[0]].train
        self.n_classes = len(sample.classes)
        self.classes = sample.classes
        # Resolved once: the strategy, the privacy plan, the task and its model's layout, checked against
        # the agreement, then the sites' policies; then every member's key.
        agreement = signed_agreement(config)
        plan = plan_run(config, sample=sample, names=names, agreement=agreement, task=task)
        plan = plan.with_policies(site_policies(plan.config, agreement, names))
        if plan.config.backend == "ray":
            self._check_ray(trainer)  # before the run has a folder, as every other input check
        identities = self._member_keys(plan)
        directory = {name: keys.ed25519_public_bytes(k.public_key()) for name, k in identities.items()}
        run_dir = run_folder(plan, out, runs_root)  # every input is checked: only now does the run get its folder
        config = plan.config
        rng = np.random.default_rng(drop_seq)
        if config.backend == "ray":
            transport = self._ray_transport(plan, run_dir, identities, directory, rng, trainer)
        else:
            transport = self._in_process_transport(plan, run_dir, identities, directory, rng, trainer)
        super().__init__(
            plan, transport=transport, identity=identities[COORDINATOR], directory=directory, run_dir=run_dir, resume=resume,
        )
        self._identities = identities  # the harness holds every member's key (tests play a member with it)

    def _in_process_transport(
        self, plan: RunPlan, run_dir: Path, identities: dict[str, Ed25519PrivateKey], directory: dict[str, bytes],
        rng: np.random.Generator, trainer: LocalTrainer | None,
    ) -> InProcessTransport:
        """Every site built here, in this process (``_make_site``), and the transport that calls them."""
        config, agreement = plan.config, plan.agreement
        sites = {
            name: build_site(
                name,
                self._splits[name],
                identity=identities[name],
                directory=directory,
                state=site_state(run_dir, name),  # its ledger, evaluation journal and signed record
                seed=config.seed,
                budget=plan.privacy.budget(name),  # the least of the config's, agreement's and policy's caps
                agreement=agreement,
                policy=plan.policies.get(name),
                test_seed=config.privacy.test_seed,
                task=plan.task,  # every simulated site runs this machine's copy of the task
                trainer=trainer,  # each site's local training (None: plain; record-level DP is always DP-SGD)
                lifecycle=False,  # a simulated site's lifecycle state is the lifecycle manager's (consortium models)
                make=self._make_site,
            )
            for name in plan.names
        }
        self._ledgers = {name: site.ledger for name, site in sites.items()}
        self._sites = sites
        return InProcessTransport(
            sites, dropout=config.participation.dropout, rng=rng, identity=identities[COORDINATOR], directory=directory,
        )

    def _ray_transport(
        self, plan: RunPlan, run_dir: Path, identities: dict[str, Ed25519PrivateKey], directory: dict[str, bytes],
        rng: np.random.Generator, trainer: LocalTrainer | None,
    ) -> SealedTransport:
        """The sites played by a pool of Ray workers (``consortium.run.ray_backend``), each building its own from
        the run's config: so only what the config names runs there (the task as ``task:`` names it, loaded
        from its file by each worker; no trainer object, no red-team site)."""
        from consortium.run.ray_backend import RayPool, RayTransport

        self._sites, self._ledgers = {}, {}
        rows = {name: splits.train.n_rows for name, splits in self._splits.items()}
        self._pool = RayPool(plan, run_dir, key_secret=self._key_secret, rows=rows)
        return RayTransport(
            self._pool.channel, dropout=plan.config.participation.dropout, rng=rng, identity=identities[COORDINATOR],
            directory=directory,
        )

    def _check_ray(self, trainer: LocalTrainer | None) -> None:
        """What the Ray backend refuses: Ray missing, a trainer object or a red-team site (neither is in the config)."""
        from consortium.run.ray_backend import require_ray

        require_ray()
        if trainer is not None or type(self)._make_site is not Simulation._make_site:
            what = "a trainer object" if trainer is not None else "a site of its own (_make_site)"
            raise ConfigError(f"the Ray backend builds every site from the config alone, and this run passes {what}: "
                              "use backend: in-process")

    def run(self, *, on_round: Callable[[RoundRecord], None] | None = None) -> RunResult:
        """Train, record and summarise the run (``CoordinatorRun.run``); then stop the Ray workers, if any."""
        try:
            return super().run(on_round=on_round)
        finally:
            if self._pool is not None:
                self._pool.close()

    def _make_site(self, name: str, splits: Splits, **kwargs: Any) -> Site:
        """One simulated institution's agent. The red team overrides this to play a malicious site
        (``consortium.redteam.poisoning``); everyone else gets the honest runtime. Called while the run is
        being built, before ``CoordinatorRun.__init__``: it may read only what the subclass set first."""
        return Site(name, splits, **kwargs)

    def _member_keys(self, plan: RunPlan) -> dict[str, Ed25519PrivateKey]:
        """Every member's identity key: the agreement's members' own key files, or fresh ones, each derived from
        one fresh secret (``_key_secret``, kept in memory only) that a Ray worker rebuilds its members' from."""
        names = [*plan.names, COORDINATOR]
        if plan.agreement is None:
            self._key_secret = os.urandom(32)
            return {name: keys.derive_ed25519(self._key_secret, name) for name in names}
        assert plan.config.agreement is not None
        return {name: load_member_key(plan.agreement, plan.config.agreement.keys, name) for name in names}

    def _resume_sites(self, heads: list[TreeHead]) -> None:
        """In process, each site is told the last head it co-signed; a Ray worker's sites recalled it themselves
        from their memory files when the worker built them."""
        for name, site in self._sites.items():
            head = last_cosigned(heads, name)
            if head is not None:
                site.resume_from(head)

    def _epsilon(self, transcript: TranscriptRecorder) -> tuple[dict[str, float], dict[str, float]]:
        """From the sites' own ledgers, read where each site runs (``verify`` checks them against the signed events)."""
        if self._pool is not None:
            read = self._pool.ledgers()
            return {n: v[0] for n, v in read.items()}, {n: v[1] for n, v in read.items()}
        ledgers = {n: lg for n, lg in self._ledgers.items() if lg is not None}
        return {n: lg.spent() for n, lg in ledgers.items()}, {n: lg.epsilon_cap for n, lg in ledgers.items()}

    @property
    def warnings(self) -> tuple[str, ...]:
        """The plan's warnings, and the Ray backend's: a Ray without its token authentication."""
        return super().warnings + (self._pool.warnings if self._pool is not None else ())

    def _backend(self) -> dict[str, Any]:
        """In this process, or the Ray workers: how many, on how many Ray nodes, of which cluster."""
        return self._pool.describe() if self._pool is not None else {"kind": "in-process"}

    def _baselines(self) -> dict[str, Any]:
        """Local-only and pooled (simulation only): the task's model, loss and training, the same seed and
        number of epochs, scored on the consortium's population (every site's test split)."""
        config, names, splits, task, classes = self.config, self.names, self._splits, self.plan.task, self.classes
        seeds = [int(s.generate_state(1)[0]) for s in self._base_seq.spawn(len(names) + 1)]
        headline = task.headline  # accuracy, or a regression's mse
        local = dict(zip(names, seeds)) if config.baselines.local_only else {}
        # On Ray each worker trains its own sites' local models, in parallel, while the pooled one trains here.
        scores = self._pool.local_only(local) if self._pool is not None and local else None
        pooled = None
        if config.baselines.pooled:
            population = concat_records([splits[n].test for n in names])
            model, shape = _train_alone(concat_records([splits[n].train for n in names]), config, task, classes, seeds[-1])
            pooled = finite_metrics(_score(model, shape, population, task))
        out: dict[str, Any] = {}
        if local:
            got = scores() if scores is not None else local_only_scores(config, task, splits, local)
            per_site = {n: got[n][0] for n in names}
            out["local_only"] = {
                f"{headline}_mean": float(np.mean(list(per_site.values()))),
                f"{headline}_per_site": per_site,
                f"own_split_{headline}_per_site": {n: got[n][1] for n in names},
            }
        if pooled is not None:
            out["pooled"] = pooled
        return out


def run_simulation(
    config: SimulationConfig,
    *,
    out: Path | None = None,
    runs_root: Path = Path("runs"),
    on_round: Callable[[RoundRecord], None] | None = None,
    task: Task | None = None,
    trainer: LocalTrainer | None = None,
) -> RunResult:
    """Check, run and record a whole simulation in one call (``task``: the study's task, default the one
    the config names; ``trainer``: every site's local training)."""
    return Simulation(config, out=out, runs_root=runs_root, task=task, trainer=trainer).run(on_round=on_round)


def continue_run(run_dir: Path, keys_dir: Path, *, on_round: Callable[[RoundRecord], None] | None = None) -> RunResult:
    """Train a resumed run's remaining rounds, under the agreement copy the run holds and the members' keys."""
    config = load_config(run_dir / "config.yaml")
    if config.agreement is None:
        raise ConfigError("this run was held to no agreement: only a run under an agreement can be resumed")
    agreement = config.agreement.model_copy(update={"file": run_dir / AGREEMENT_FILE, "keys": keys_dir})
    return Simulation(config.model_copy(update={"agreement": agreement}), out=run_dir, resume=True).run(on_round=on_round)
