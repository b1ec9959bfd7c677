"""Simulate a consortium on one machine, with the coordinator and site code of deployment.

The harness plays the part of the institutions: it gives each simulated site
its own splits, then steps aside. Training runs through the real protocol
(coordinator and sites exchanging encoded messages over the in-process
transport). The two baselines, *local-only* and *pooled*, need every site's
data in one place and so exist only here, as a yardstick: all three are
scored on the consortium's population (every site's test split).
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from consortium.config import SimulationConfig, load_config
from consortium.errors import ConfigError, ConsortiumError, ProtocolError, VerificationError
from consortium.governance.agreement import (
    Agreement,
    agreement_hash,
    check_run,
    load_agreement,
    load_member_key,
    read_signatures,
    require_approval,
    signatures_path,
)
from consortium.governance.incident import Incident, NormMonitor, RunHalted
from consortium.governance.policy import SitePolicy, load_policy
from consortium.crypto import keys
from consortium.data import (
    Splits,
    SyntheticHospitals,
    Table,
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
from consortium.learning.adapter import ModelAdapter
from consortium.learning.models import build_model
from consortium.learning.strategies import STRATEGIES, FedAvg
from consortium.learning.training import EvalStats, TrainSettings, evaluate, train_local
from consortium.privacy import ddg
from consortium.privacy.accountant import accountant_used, calibrate_noise, calibrate_site_noise
from consortium.privacy.dpsgd import secure_numpy_generator
from consortium.privacy.events import RecordLevelEvent, SiteLevelEvent
from consortium.privacy.ledger import BudgetLedger
from consortium.privacy.sitedp import AdaptiveClipping, SiteLevelDP
from consortium.protocol.coordinator import (
    COORDINATOR,
    Coordinator,
    RoundRecord,
    SecureAggregation,
)
from consortium.protocol.loop import RoundLoop
from consortium.protocol.site import Site
from consortium.protocol.task import ModelBuilder, build_task_model
from consortium.runs import RunFolder, new_run_dir, write_atomic
from consortium.secagg.graph import plan_graph
from consortium.transcript.log import vector_sha256
from consortium.protocol import messages as m
from consortium.transcript.recorder import TranscriptRecorder, code_sha256, library_versions, over_transport
from consortium.transcript.verify import AGREEMENT_FILE, verify_run
from consortium.transport import Answer, InProcessTransport, ask_all

#: Said loudly in every run whose protections are weaker than the defaults.
SECURE_AGGREGATION_OFF = "secure aggregation is OFF: the coordinator sees every site's update and statistics in the clear"
PRIVACY_OFF = "differential privacy is OFF: the model carries no formal privacy guarantee for any patient"
PRIVACY_TEST_MODE = "privacy noise is in TEST MODE (fixed seed): reproducible, and NOT private"
CENTRAL_NOISE = (
    "site-level DP noise is CENTRAL: the coordinator sees the exact sum of the clipped updates "
    "before it adds the noise (weaker than distributed noise, which no party ever sees without)"
)
CENTRAL_NOISE_NO_SECAGG = (
    "site-level DP noise is CENTRAL and secure aggregation is OFF: the coordinator sees every site's clipped update"
)


def _answer(answer: Answer | ConsortiumError) -> Answer:
    if isinstance(answer, ConsortiumError):
        raise ProtocolError(f"the run cannot start: {answer}")
    return answer


def _finite(metrics: dict[str, float]) -> dict[str, float | None]:
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}


def site_datasets(config: SimulationConfig, rng: np.random.Generator) -> dict[str, Table]:
    """Each simulated site's full table, keyed by site name."""
    data = config.data
    if data.dataset == "csv":
        assert data.csv_sites is not None
        schemas = {s.name: load_schema(s.schema_file) for s in data.csv_sites}
        common = check_schemas(schemas)
        return {s.name: read_csv(s.csv, common) for s in data.csv_sites}
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


def make_strategy(config: SimulationConfig) -> FedAvg:
    s, part = config.strategy, config.participation
    common: dict[str, Any] = {"fraction": part.fraction, "min_sites": part.min_sites, "weighting": s.weighting}
    if s.server_lr is not None:
        common["server_lr"] = s.server_lr
    cls = STRATEGIES[s.name]
    if s.name == "fedprox":
        return cls(mu=s.mu, **common)  # type: ignore[call-arg]
    if s.name in ("fedadam", "fedyogi"):
        return cls(beta1=s.beta1, beta2=s.beta2, tau=s.tau, **common)  # type: ignore[call-arg]
    return cls(**common)


def _concat(tables: list[Table]) -> Table:
    first = tables[0]
    return Table(
        X=np.concatenate([t.X for t in tables]),
        y=np.concatenate([t.y for t in tables]),
        feature_names=first.feature_names,
        classes=first.classes,
        image_shape=first.image_shape,
    )


def _train_alone(
    train: Table, config: SimulationConfig, n_classes: int, seed: int
) -> torch.nn.Module:
    """Train on one table with no one else: the baselines' procedure, same model and budget."""
    X = train.X.astype(np.float64)
    mean = X.mean(axis=0)
    scale = X.std(axis=0)
    scale[scale < 1e-6] = 1.0
    assert config.model is not None and config.training is not None
    model = build_model(
        config.model,
        n_features=train.n_features,
        n_classes=n_classes,
        mean=mean,
        scale=scale,
        image_shape=train.image_shape,
        seed=config.seed,
    )
    budget = TrainSettings(**{**config.training.model_dump(), "epochs": config.training.epochs * config.rounds})
    train_local(model, torch.from_numpy(train.X), torch.from_numpy(train.y), budget, seed=seed)
    return model


def _score(model: torch.nn.Module, table: Table, n_classes: int) -> EvalStats:
    return evaluate(model, torch.from_numpy(table.X), torch.from_numpy(table.y), n_classes)


@dataclass
class SimulationResult:
    summary: dict[str, Any]
    history: list[RoundRecord]
    params: np.ndarray


class Simulation:
    """A consortium on one machine. Building one checks everything (config, data, schemas);
    ``run`` then trains, writes the run folder and returns the summary."""

    def __init__(
        self,
        config: SimulationConfig,
        *,
        out: Path | None = None,
        runs_root: Path = Path("runs"),
        model_builder: ModelBuilder = build_task_model,
        resume: bool = False,
    ) -> None:
        config = config.resolved()
        self._resume = resume  # continue the halted run in ``out`` from its checkpoint
        assert config.model is not None and config.training is not None
        self.config = config
        self._build = model_builder
        data_rng, split_seq, site_seq, drop_seq, self._base_seq = np.random.SeedSequence(config.seed).spawn(5)

        tables = site_datasets(config, np.random.default_rng(data_rng))
        self.names = list(tables)
        split_rngs = [np.random.default_rng(s) for s in split_seq.spawn(len(self.names))]
        split = config.data.split
        # Held by the harness only for the simulation-only baselines; each Site gets its own.
        self._splits: dict[str, Splits] = {
            name: split_table(tables[name], rng, validation=split.validation, test=split.test)
            for name, rng in zip(self.names, split_rngs)
        }
        self.n_classes = len(tables[self.names[0]].classes)
        site_seeds = [int(s.generate_state(1)[0]) for s in site_seq.spawn(len(self.names))]
        self.privacy_plan = self._plan_privacy(tables[self.names[0]])
        self.agreement = self._check_agreement(config, tables[self.names[0]])
        self.policies = self._load_policies(config)
        # Every input is checked: only now does the run get its folder (site ledgers live in it).
        self.run_dir = out if out is not None else new_run_dir(runs_root, f"{config.data.dataset}-seed{config.seed}")
        pc = config.privacy
        ledgers = {
            name: BudgetLedger(
                self.run_dir / "sites" / name / "budget.sqlite",
                site=name,
                epsilon_cap=min(pc.site_epsilon_caps.get(name, pc.epsilon), self._policy_cap(name)),
                delta=pc.delta,
                accountant=pc.accountant,
            )
            if pc.enabled
            else None
            for name in self.names
        }
        # Each member's identity key (Ed25519): the agreement's members' own key files, or fresh ones;
        # the directory of public keys is shared.
        identities = self._identities_for(config)
        directory = {name: keys.ed25519_public_bytes(k.public_key()) for name, k in identities.items()}
        sites = {
            name: Site(
                name,
                self._splits[name],
                seed=sd,
                identity=identities[name],
                directory=directory,
                ledger=ledgers[name],
                noise_test_seed=None if pc.test_seed is None else pc.test_seed + i,
                strict=True,  # sealed messages, and each round's plan proven by the transcript before training
                model_builder=model_builder,
                agreement=self.agreement,
                policy=self.policies.get(name),
            )
            for i, (name, sd) in enumerate(zip(self.names, site_seeds))
        }
        sa = config.secure_aggregation
        secure = (
            SecureAggregation(
                identity=identities[COORDINATOR],
                directory=directory,
                update_clip=sa.update_clip,
                bits=sa.bits,
                dropout_rate=sa.dropout_rate,
                corruption_rate=sa.corruption_rate,
            )
            if sa.enabled
            else None
        )
        self.strategy = make_strategy(config)
        self.coordinator = Coordinator(
            self.names,
            model=config.model,
            train=config.training,
            strategy=self.strategy,
            rounds=config.rounds,
            seed=config.seed,
            secure=secure,
            privacy=self.privacy_plan,
            model_builder=model_builder,
            monitor=NormMonitor(factor) if (factor := config.incidents.update_norm_factor) is not None else None,
        )
        self._ledgers = ledgers
        self._identities = identities
        self._directory = directory
        self._sites = sites
        self.transport = InProcessTransport(
            sites, dropout=config.participation.dropout, rng=np.random.default_rng(drop_seq),
            identity=identities[COORDINATOR], directory=directory,
        )

    def _check_agreement(self, config: SimulationConfig, sample: Table) -> Agreement | None:
        """No run starts unless every approver signed this agreement and the config keeps it."""
        if config.agreement is None:
            return None
        agreement = load_agreement(config.agreement.file)
        require_approval(agreement, read_signatures(config.agreement.file))
        check_run(agreement, config, self.names, self._adapter(sample).layout_hash)
        return agreement

    def _load_policies(self, config: SimulationConfig) -> dict[str, SitePolicy]:
        """Each site's own policy, where its folder holds one; each is checked against the agreement."""
        if config.agreement is None or config.agreement.policies is None or self.agreement is None:
            return {}
        folder = config.agreement.policies
        if not folder.is_dir():
            raise ConfigError(f"the policies folder '{folder}' does not exist: create it, or remove agreement.policies")
        policies = {}
        for name in self.names:
            path = folder / f"{name}.yaml"
            if path.exists():
                policy = load_policy(path, self.agreement)
                if policy.site != name:
                    raise ConfigError(f"{path}: the policy is for site '{policy.site}', not '{name}': fix its site field")
                policies[name] = policy
        return policies

    def _policy_cap(self, site: str) -> float:
        policy = self.policies.get(site)
        return policy.max_epsilon if policy is not None and policy.max_epsilon is not None else math.inf

    def _adapter(self, sample: Table) -> ModelAdapter:
        """The configured model's layout (its parameters' names and shapes), as every site will build it."""
        assert self.config.model is not None
        return ModelAdapter(
            build_model(
                self.config.model,
                n_features=sample.n_features,
                n_classes=self.n_classes,
                mean=np.zeros(sample.n_features),
                scale=np.ones(sample.n_features),
                image_shape=sample.image_shape,
                seed=0,
            )
        )

    def _identities_for(self, config: SimulationConfig) -> dict[str, Ed25519PrivateKey]:
        names = [*self.names, COORDINATOR]
        if self.agreement is None:
            return {name: keys.generate_ed25519()[0] for name in names}
        assert config.agreement is not None
        return {name: load_member_key(self.agreement, config.agreement.keys, name) for name in names}

    def _plan_privacy(self, sample: Table) -> RecordLevelEvent | SiteLevelDP | None:
        """Each round's privacy, with the noise calibrated so the whole run meets the target epsilon."""
        pc, training = self.config.privacy, self.config.training
        if not pc.enabled:
            return None
        if pc.level == "site":
            return self._plan_site_level(sample)
        assert training is not None
        steps = max(1, math.ceil(training.epochs / pc.sampling_rate))  # `epochs` expected passes per round
        sigma = pc.noise_multiplier
        if sigma is None:
            sigma = calibrate_noise(
                target_epsilon=pc.epsilon,
                delta=pc.delta,
                sampling_rate=pc.sampling_rate,
                steps=steps * self.config.rounds,
                accountant=pc.accountant,
            )
        return RecordLevelEvent(noise_multiplier=sigma, clip=pc.clip, sampling_rate=pc.sampling_rate, steps=steps)

    def _plan_site_level(self, sample: Table) -> SiteLevelDP:
        """DP-FedAvg over the run's rounds: every round a site joins is paid in full (no sampling amplification)."""
        config = self.config
        pc, sa, part = config.privacy, config.secure_aggregation, config.participation
        adaptive = pc.adaptive_clipping
        share = adaptive.count_share if adaptive.enabled else 0.0
        n_sites = len(self.names)
        cohort = max(part.min_sites, math.ceil(part.fraction * n_sites))
        if pc.noise == "distributed":
            if pc.noise_multiplier is not None:
                raise ConfigError("distributed noise is calibrated from privacy.epsilon: remove privacy.noise_multiplier")
            # Calibrated for the smallest sum secure aggregation will unmask (its threshold), less the
            # sites assumed to collude with the coordinator: they can take their own noise back out.
            graph = plan_graph(cohort, dropout_rate=sa.dropout_rate, corruption_rate=sa.corruption_rate)
            colluders = min(math.ceil(round(sa.corruption_rate * cohort, 9)), graph.threshold - 1)
            cohort = graph.threshold - colluders
            dim = self._adapter(sample).size
            noise = ddg.plan_ddg(
                target_epsilon=pc.epsilon, delta=pc.delta, rounds=config.rounds, dim=dim,
                cohort=cohort, max_sites=n_sites, bits=sa.bits, count_share=share,
            )
            summed_sd = math.sqrt(cohort * noise.site_variance)
            count_z = 2 * summed_sd / noise.count_scale if noise.count_scale else None
            event = SiteLevelEvent(
                mechanism="dp-fedavg-distributed-discrete-gaussian", noise_multiplier=ddg.noise_multiplier_of(noise, cohort),
                clip=pc.update_clip, cohort=cohort, colluders=colluders, count_noise_multiplier=count_z, ddg=noise,
            )
        else:
            if pc.noise_multiplier is not None:
                z = pc.noise_multiplier
                z_update, count_z = (z / math.sqrt(1 - share), z / math.sqrt(share)) if share else (z, None)
            else:
                z_update, count_z = calibrate_site_noise(
                    target_epsilon=pc.epsilon, delta=pc.delta, rounds=config.rounds, count_share=share,
                    accountant=pc.accountant,
                )
            event = SiteLevelEvent(
                mechanism="dp-fedavg-gaussian", noise_multiplier=z_update, clip=pc.update_clip, cohort=cohort,
                count_noise_multiplier=count_z,
            )
        return SiteLevelDP(
            template=event,
            noise_rng=secure_numpy_generator(None if pc.test_seed is None else pc.test_seed + 0xC0),
            adaptive=AdaptiveClipping(adaptive.target_quantile, adaptive.learning_rate) if adaptive.enabled else None,
        )

    def run(self, *, on_round: Callable[[RoundRecord], None] | None = None) -> SimulationResult:
        config, coordinator, names = self.config, self.coordinator, self.names
        assert config.model is not None
        started = time.perf_counter()
        run = RunFolder(self.run_dir, resume=self._resume)
        # Sites co-sign each head through the transport, like any other request.
        cosign = over_transport(self.transport, self.names, lambda: coordinator.round)
        transcript = TranscriptRecorder(self.run_dir, coordinator_key=self._identities[COORDINATOR], cosign=cosign)
        if self._resume:  # after a quorum's resume entry: every site picks up from the last head it co-signed
            for site in self._sites.values():
                site.resume_from(transcript.writer.heads[-1])
            coordinator.restore(*self._checkpoint(run, transcript))
        else:
            config_text = yaml.safe_dump(config.model_dump(mode="json", by_alias=True), sort_keys=False)
            run.write_config(config_text)
            if self.agreement is not None and config.agreement is not None:  # what verify checks the run against
                write_atomic(run.path / AGREEMENT_FILE, config.agreement.file.read_bytes())
                write_atomic(signatures_path(run.path / AGREEMENT_FILE), signatures_path(config.agreement.file).read_bytes())
            transcript.start(*self._endorsed_manifest(config_text))

        def record_round(record: RoundRecord) -> None:
            run.append_metrics(_finite(record.to_json()))  # type: ignore[arg-type]
            transcript.record(coordinator.drain_log())
            transcript.archive(coordinator.drain_archives())
            transcript.close_round()
            if on_round is not None:
                on_round(record)

        halted: Incident | None = None
        try:
            history = RoundLoop(before_stage=transcript.prove_plan).run(coordinator, self.transport, on_round=record_round)
        except RunHalted as exc:  # recorded with its cause, and no final model: nothing more happens until resumed
            halted = exc.incident
            history = coordinator.history
            if history and history[-1].status == "halted":
                run.append_metrics(_finite(history[-1].to_json()))  # type: ignore[arg-type]
            transcript.record(coordinator.drain_log())
            transcript.archive(coordinator.drain_archives())
            if coordinator.task is not None:  # what a quorum's resume continues from
                run.write_checkpoint(*coordinator.checkpoint())
            head = transcript.halt(halted, vector_sha256(coordinator.params) if coordinator.params is not None else None)
        assert coordinator.params is not None and coordinator.task is not None

        # The final model, parameters by name, with the standardisation it was trained under.
        final = self._build(coordinator.task, 0)
        adapter = ModelAdapter(final)
        adapter.set_vector(coordinator.params)
        if halted is None:
            run.write_model(
                {k: v.detach().numpy().copy() for k, v in final.state_dict().items()},
                {"layout_hash": adapter.layout_hash, "rounds": str(config.rounds), "dataset": config.data.dataset},
            )
            head = transcript.finish(run.path / "model.safetensors", vector_sha256(coordinator.params), coordinator.round)

        summary: dict[str, Any] = {
            "run_dir": str(run.path),
            "status": "completed" if halted is None else "halted",
            "halt": None if halted is None else halted.to_json(),
            "dataset": config.data.dataset,
            "sites": len(names),
            "site_names": names,
            "excluded_at_setup": dict(coordinator.excluded),  # site -> why it never joined
            "rounds": config.rounds,
            "seed": config.seed,
            "federated": {
                **_finite(history[-1].metrics),
                "rounds_completed": sum(r.status == "ok" for r in history),
                "rounds_skipped": sum(r.status == "skipped" for r in history),
            },
            "model": {"kind": config.model.kind, "parameters": adapter.size, "layout_hash": adapter.layout_hash},
            "strategy": self.strategy.describe(),
            "partition": config.data.partition.model_dump() if config.data.dataset in ("breast-cancer", "digits") else None,
            "secure_aggregation": self._secure_summary(history),
            "privacy": self._privacy_summary(history),
            "warnings": self._warnings(),
            "traffic_bytes": {"to_sites": self.transport.bytes_sent, "to_coordinator": self.transport.bytes_received},
        }
        if halted is None:
            summary.update(self._baselines())
        summary["transcript"] = {"entries": head.size, "tree_head": {"size": head.size, "root": head.root}, "verified": False}
        run.write_summary(summary)
        # The run checks itself the way any participant would: from the folder alone. A failure halts it.
        try:
            verify_run(run.path)
            summary["transcript"]["verified"] = True
        except VerificationError as exc:
            summary["transcript"]["violation"] = str(exc)
            if halted is None:
                halted = Incident("verification", str(exc), coordinator.round, raised_by=COORDINATOR)
                head = transcript.halt(halted, vector_sha256(coordinator.params))
                summary.update(status="halted", halt=halted.to_json())
                summary["transcript"].update(entries=head.size, tree_head={"size": head.size, "root": head.root})
        summary["elapsed_s"] = round(time.perf_counter() - started, 3)
        run.write_summary(summary)
        return SimulationResult(summary=summary, history=history, params=coordinator.params)

    @staticmethod
    def _checkpoint(run: RunFolder, transcript: TranscriptRecorder) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """The state a halted run continues from: only right after a resume, and only the model it halted at."""
        entries = transcript.writer.entries
        if entries[-1].kind != "resume":
            raise ConfigError("the run is not resumed: a quorum of approvers must sign its resume first (consortium resume)")
        meta, arrays = run.read_checkpoint()
        halt = entries[entries[-1].body["halt_entry"]]
        if halt.body.get("model_sha256") != vector_sha256(arrays["params"]):
            raise VerificationError("the checkpoint is not the model the run halted at: the run cannot continue from it")
        return meta, arrays

    def _endorsed_manifest(self, config_text: str) -> tuple[dict[str, Any], dict[str, bytes]]:
        """The manifest, after each site has described its data, and every site's endorsement of it.

        Both are protocol requests: the coordinator holds no site's key or data. A site that will not
        endorse (the manifest misstates it) stops the run before it starts.
        """
        described = ask_all(self.transport, self.names, 0, m.DescribeRequest(), m.Description)
        body = self._manifest(config_text, {n: _answer(a).fingerprint.model_dump() for n, a in described.items()})
        endorsed = ask_all(self.transport, self.names, 0, m.EndorseRequest(manifest=body), m.Endorsement)
        return body, {n: _answer(a).signature for n, a in endorsed.items()}

    def _manifest(self, config_text: str, datasets: dict[str, Any]) -> dict[str, Any]:
        """Entry 0 of the transcript: who takes part with which key, under which config, code and data."""
        pc = self.config.privacy
        members = {
            name: {"role": "coordinator" if name == COORDINATOR else "site", "public_key": keys.ed25519_public_bytes(k.public_key()).hex()}
            for name, k in self._identities.items()
        }
        return {
            "members": members,
            "config_sha256": hashlib.sha256(config_text.encode()).hexdigest(),
            "rounds": self.config.rounds,
            "min_sites": self.config.participation.min_sites,
            "agreement_sha256": agreement_hash(self.agreement) if self.agreement is not None else None,
            "secure_aggregation": self.config.secure_aggregation.enabled,
            "privacy": {"enabled": pc.enabled, "level": pc.level, "delta": pc.delta, "accountant": pc.accountant},
            "provenance": {
                "code_sha256": code_sha256(),
                "libraries": library_versions(),
                "datasets": datasets,
            },
        }

    def _warnings(self) -> list[str]:
        out = []
        if not self.config.secure_aggregation.enabled:
            out.append(SECURE_AGGREGATION_OFF)
        pc = self.config.privacy
        if not pc.enabled:
            out.append(PRIVACY_OFF)
            return out
        if pc.level == "site" and pc.noise == "central":
            out.append(CENTRAL_NOISE if self.config.secure_aggregation.enabled else CENTRAL_NOISE_NO_SECAGG)
        if pc.test_seed is not None:
            out.append(PRIVACY_TEST_MODE)
        return out

    def _privacy_summary(self, history: list[RoundRecord]) -> dict[str, Any]:
        pc, plan = self.config.privacy, self.privacy_plan
        if not pc.enabled or plan is None:
            return {"enabled": False}
        refusals: dict[str, list[int]] = {}
        for r in history:
            for site, reason in r.refused.items():
                if reason.startswith("privacy budget"):
                    refusals.setdefault(site, []).append(r.round)
        ledgers = {n: lg for n, lg in self._ledgers.items() if lg is not None}
        ev = plan.template if isinstance(plan, SiteLevelDP) else plan
        out: dict[str, Any] = {
            "enabled": True,
            "level": ev.level,
            "mechanism": ev.mechanism,
            "neighbouring": ev.neighbouring,
            "noise_multiplier": ev.noise_multiplier,
            "clip": ev.clip,
            "sampling_rate": ev.sampling_rate,
            "delta": pc.delta,
            "accountant": accountant_used([ev], pc.accountant),
            "target_epsilon": pc.epsilon,
            "epsilon_per_site": {n: lg.spent() for n, lg in ledgers.items()},
            "epsilon_cap_per_site": {n: lg.epsilon_cap for n, lg in ledgers.items()},
            "refusals": refusals,
            "test_mode": pc.test_seed is not None,
            "not_covered": [
                "setup: row count and feature means and variances (sums across sites, exact)",
                "evaluation counts on the sites' test splits (sums across sites, exact)",
            ],
        }
        if isinstance(ev, RecordLevelEvent):
            out["steps_per_round"] = ev.steps
        else:
            assert isinstance(plan, SiteLevelDP)
            out.update(
                noise=pc.noise,
                cohort=ev.cohort,
                colluders_assumed=ev.colluders,
                weighting="uniform",
                count_noise_multiplier=ev.count_noise_multiplier,
                adaptive_clipping=plan.adaptive is not None,
                clip_per_round=[(r.privacy or {}).get("clip") for r in history],
                final_clip=plan.clip,
            )
            if ev.ddg is not None:
                out["distributed_noise"] = ev.ddg.model_dump()
        return out

    def _secure_summary(self, history: list[RoundRecord]) -> dict[str, Any]:
        sa = self.config.secure_aggregation
        if not sa.enabled:
            return {"enabled": False}
        fit_plans = [p for p in self.coordinator.secure_plans if p["phase"] == "fit"]
        last = fit_plans[-1] if fit_plans else {"graph": None, "threshold": None}
        return {
            "enabled": True,
            "graph": last["graph"],
            "threshold": last["threshold"],
            "update_clip": sa.update_clip,
            "bits": sa.bits,
            "survivors_per_round": [(r.secure or {}).get("fit_included", 0) for r in history],
        }

    def _baselines(self) -> dict[str, Any]:
        """Local-only and pooled (simulation only): same model, seed and number of epochs,
        scored on the consortium's population (every site's test split)."""
        config, names, splits, k = self.config, self.names, self._splits, self.n_classes
        population = _concat([splits[n].test for n in names])
        seeds = [int(s.generate_state(1)[0]) for s in self._base_seq.spawn(len(names) + 1)]
        out: dict[str, Any] = {}
        if config.baselines.local_only:
            per_site, own = {}, {}
            for name, seed in zip(names, seeds):
                model = _train_alone(splits[name].train, config, k, seed)
                per_site[name] = _score(model, population, k).metrics()["accuracy"]
                own[name] = _finite(_score(model, splits[name].test, k).metrics())["accuracy"]
            out["local_only"] = {
                "accuracy_mean": float(np.mean(list(per_site.values()))),
                "accuracy_per_site": per_site,
                "own_split_accuracy_per_site": own,
            }
        if config.baselines.pooled:
            model = _train_alone(_concat([splits[n].train for n in names]), config, k, seeds[-1])
            out["pooled"] = _finite(_score(model, population, k).metrics())
        return out


def run_simulation(
    config: SimulationConfig,
    *,
    out: Path | None = None,
    runs_root: Path = Path("runs"),
    on_round: Callable[[RoundRecord], None] | None = None,
    model_builder: ModelBuilder = build_task_model,
) -> SimulationResult:
    """Check, run and record a whole simulation in one call."""
    return Simulation(config, out=out, runs_root=runs_root, model_builder=model_builder).run(on_round=on_round)


def continue_run(run_dir: Path, keys_dir: Path, *, on_round: Callable[[RoundRecord], None] | None = None) -> SimulationResult:
    """Train a resumed run's remaining rounds, under the agreement copy the run holds and the members' keys."""
    config = load_config(run_dir / "config.yaml")
    if config.agreement is None:
        raise ConfigError("this run was held to no agreement: only a run under an agreement can be resumed")
    agreement = config.agreement.model_copy(update={"file": run_dir / AGREEMENT_FILE, "keys": keys_dir})
    return Simulation(config.model_copy(update={"agreement": agreement}), out=run_dir, resume=True).run(on_round=on_round)
