"""The coordinator's side of a run, the same in simulation and in deployment.

It reads the run's plan (``consortium.run.plan``: the config resolved once,
the privacy plan, the strategy, the model's layout, checked against the
signed agreement), drives the rounds through the transport it is given (one
``Session``), keeps the signed, co-signed transcript, halts on an incident,
and writes the final model and the summary. It holds no site's data or key:
sites are reached only through the transport, in-process sites for the
simulation (``consortium.run.simulation``), sites polling over mutual TLS for
``consortium serve`` (``consortium.deploy.serve``).
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from consortium import crashpoints
from consortium.run import recovery
from consortium.config import SimulationConfig
from consortium.errors import ConfigError, ConsortiumError, ProtocolError, VerificationError
from consortium.governance.agreement import (
    Agreement,
    agreement_hash,
    load_agreement,
    read_signatures,
    require_approval,
    signatures_path,
)
from consortium.governance.incident import Incident, NormMonitor, RunHalted
from consortium.learning.adapter import ModelAdapter
from consortium.learning.robust import RobustAggregation
from consortium.learning.task import task_identity
from consortium.lifecycle.lineage import version_body
from consortium.lifecycle.registry import Change, ModelRegistry, Version, now
from consortium.privacy.accountant import accountant_used
from consortium.privacy.events import RecordLevelEvent
from consortium.protocol.sitedp import SiteLevelDP
from consortium.protocol import messages as m
from consortium.protocol.coordinator import COORDINATOR, Coordinator, RoundRecord
from consortium.protocol.task import build_model, spec_to_json
from consortium.run.session import Session, finite_metrics
from consortium.run.plan import RunPlan
from consortium.runs import RunFolder, new_run_dir, write_atomic
from consortium.transcript.log import TreeHead, cosign_quorum, vector_sha256
from consortium.run.recorder import TranscriptRecorder, code_sha256, library_versions
from consortium.transcript.records import LogRecord
from consortium.audit.verify import AGREEMENT_FILE, epsilon_bound, signed_epsilon, verify_run
from consortium.transport import Answer, Transport, ask_all

#: Said loudly in every run whose protections are weaker than the defaults.
def baseline_warnings(summary: dict[str, Any], headline: str) -> list[str]:
    """A warning when the federated model scores worse on the consortium's population than the sites'
    local-only models do on average (``headline``: the task's metric; MSE-like metrics are better lower)."""
    fed, local = summary.get("federated", {}).get(headline), summary.get("local_only", {}).get(f"{headline}_mean")
    if fed is None or local is None:
        return []
    lower = headline in ("mse", "rmse", "mae", "loss")
    if (fed >= local) if lower else (fed <= local):
        private = " (itself under DP, against local models that are not private)" if summary["privacy"].get("enabled") else ""
        return [
            f"the federated model is no better than a site training alone: {headline} {fed:.4g} against the local-only "
            f"mean {local:.4g} on every site's test records{private}; collaborating bought nothing here: check the "
            "privacy budget, the rounds and the learning rate, or whether the sites' data differ too much"
        ]
    return []


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


def _head_json(head: TreeHead) -> dict[str, Any]:
    return {"size": head.size, "root": head.root, "cosigners": sorted(head.cosignatures)}


@dataclass
class RunResult:
    summary: dict[str, Any]
    history: list[RoundRecord]
    params: np.ndarray


def signed_agreement(config: SimulationConfig) -> Agreement | None:
    """The agreement ``config`` names, once every approver signed it; None for a run under none.

    Raises:
        ConfigError: the agreement does not load, or an approver has not signed it.
    """
    if config.agreement is None:
        return None
    agreement = load_agreement(config.agreement.file)
    require_approval(agreement, read_signatures(config.agreement.file))
    return agreement


def run_folder(plan: RunPlan, out: Path | None, runs_root: Path) -> Path:
    """The run's folder: ``out``, or a fresh one under ``runs_root`` named after the data and the seed.
    Called once every input is checked, so that a refused run leaves no folder behind."""
    return out if out is not None else new_run_dir(runs_root, f"{plan.config.data.dataset}-seed{plan.config.seed}")


class CoordinatorRun:
    """One run, from the coordinator's side: ``run`` trains through the transport it was given, writes
    the run folder and returns the summary. It holds no site's data or key.

    Args:
        plan: the run, resolved once (``consortium.run.plan.plan_run``), with the agreement and whatever
            site policies the coordinator holds.
        transport: how the coordinator reaches the sites (in-process sites, or their agents over HTTPS).
        identity: the coordinator's signing key. ``directory``: every member's public key, by name.
        run_dir: the run's folder (``run_folder``); with ``resume``, the halted or crashed run it holds.
        state: where the coordinator commits its state with each round's entries; a run with one
            survives a crash of its coordinator (``consortium.run.recovery``; ``serve`` keeps one).
        resume: continue the run in ``run_dir`` (after a quorum's resume, or from its committed state).
    """

    plan: RunPlan  # the run, resolved once (``consortium.run.plan``)
    recorder: TranscriptRecorder | None = None  # the run's transcript, once ``run`` has opened it

    def __init__(
        self, plan: RunPlan, *, transport: Transport, identity: Ed25519PrivateKey, directory: dict[str, bytes],
        run_dir: Path, state: recovery.StateStore | None = None, resume: bool = False,
    ) -> None:
        self.plan = plan
        self.config = config = plan.config
        self.names = list(plan.names)
        self.agreement = plan.agreement
        self.transport = transport
        self._identity, self._directory = identity, directory
        self.run_dir = run_dir
        self.state = state
        self._resume = resume
        self.privacy_plan = plan.privacy.coordinator_privacy()
        self.strategy = plan.strategy
        rc = config.robust
        self.robust = RobustAggregation(rc.aggregator, rc.byzantine, rc.norm_bound)
        self.coordinator = Coordinator(
            self.names,
            model=config.model,
            train=config.training,
            strategy=self.strategy,
            rounds=config.rounds,
            seed=config.seed,
            secure=plan.secure_aggregation(identity, directory),
            privacy=self.privacy_plan,
            task=plan.task,
            monitor=NormMonitor(factor) if (factor := config.incidents.update_norm_factor) is not None else None,
            robust=self.robust if (rc.aggregator != "mean" or rc.norm_bound is not None) else None,
            evaluation=plan.evaluation,
        )

    def run(self, *, on_round: Callable[[RoundRecord], None] | None = None) -> RunResult:
        config, coordinator, names = self.config, self.coordinator, self.names
        assert config.model is not None
        started = time.perf_counter()
        run = RunFolder(self.run_dir, resume=self._resume)
        # One session: the rounds, the transcript (each head co-signed through the transport, like any
        # other request) and the coordinator's state, committed with each round's entries.
        session = Session(
            self.transport, self.run_dir, coordinator_key=self._identity, sites=names,
            quorum=cosign_quorum(config.participation.min_sites, len(names)), coordinator=coordinator,
            run=run, state=self.state, setup_saved=self._resume,
        )
        transcript = self.recorder = session.recorder
        if not self._resume:
            config_text = yaml.safe_dump(config.model_dump(mode="json", by_alias=True), sort_keys=False)
            run.write_config(config_text)
            if self.agreement is not None and config.agreement is not None:  # what verify checks the run against
                write_atomic(run.path / AGREEMENT_FILE, config.agreement.file.read_bytes())
                write_atomic(signatures_path(run.path / AGREEMENT_FILE), signatures_path(config.agreement.file).read_bytes())
            transcript.start(*self._endorsed_manifest(config_text))

        halted: Incident | None = None
        try:
            if self._resume:  # every site picks up from the last head it co-signed
                self._resume_sites(transcript.writer.heads)
                self._restart(session)
            history = session.run_rounds(on_round)
        except RunHalted as exc:  # recorded with its cause, and no final model: nothing more happens until resumed
            halted = exc.incident
            history = coordinator.history
            head = session.halt(halted)
        assert coordinator.params is not None and coordinator.task is not None

        # The final model, parameters by name, with the standardisation it was trained under.
        final = build_model(self.plan.task, coordinator.task, 0)
        adapter = ModelAdapter(final)
        adapter.set_vector(coordinator.params)
        finished = next((e for e in transcript.writer.entries if e.kind == "final_model"), None)
        if halted is None and finished is not None:  # recovered after its final entry: the model file is written
            head = transcript.writer.heads[-1]
        elif halted is None:
            tensors = {k: v.detach().numpy().copy() for k, v in final.state_dict().items()}
            run.write_model(tensors, {  # the task spec: what the lifecycle rebuilds the model and evaluates with
                "layout_hash": adapter.layout_hash, "rounds": str(config.rounds), "dataset": config.data.dataset,
                "task_spec": spec_to_json(coordinator.task),
            })
            crashpoints.reached("model_written")
            registered = self._register_final(run.path, tensors, history, transcript)
            head = transcript.finish(
                run.path / "model.safetensors", vector_sha256(coordinator.params), coordinator.round,
                then=[registered[1]] if registered else None,
            )
            if registered:
                ModelRegistry(run.path).add(registered[0])

        summary: dict[str, Any] = {
            "run_id": transcript.writer.entries[0].body.get("run_id"),
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
                **finite_metrics(history[-1].metrics if history else {}),
                "rounds_completed": sum(r.status == "ok" for r in history),
                "rounds_skipped": sum(r.status == "skipped" for r in history),
            },
            # the task as the manifest named it and every site endorsed it (not read again: its file may have changed)
            "task": {
                **transcript.writer.entries[0].body["task"], "target": self.plan.task.target, "headline": self.plan.task.headline,
            },
            "model": {  # a study's own model is its task's: its kind is the task's class
                "kind": config.model.kind if ":" not in self.plan.task.name else type(self.plan.task).__name__,
                "parameters": adapter.size, "layout_hash": adapter.layout_hash,
            },
            "strategy": {**self.strategy.describe(), "robust": self.robust.describe()},
            "partition": config.data.partition.model_dump() if config.data.dataset in ("breast-cancer", "digits") else None,
            "secure_aggregation": self._secure_summary(history),
            "privacy": self._privacy_summary(history, transcript),
            "warnings": self._warnings(history),
            "traffic_bytes": {"to_sites": self.transport.bytes_sent, "to_coordinator": self.transport.bytes_received},
            **({"backend": where} if (where := self._backend()) is not None else {}),
        }
        if halted is None:
            summary.update(self._baselines())
            summary["warnings"] += baseline_warnings(summary, self.plan.task.headline)
        summary["transcript"] = {"entries": head.size, "tree_head": _head_json(head), "verified": False}
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
                summary["transcript"].update(entries=head.size, tree_head=_head_json(head))
        summary["elapsed_s"] = round(time.perf_counter() - started, 3)
        run.write_summary(summary)
        return RunResult(summary=summary, history=history, params=coordinator.params)

    def _register_final(
        self, run_path: Path, tensors: dict[str, np.ndarray], history: list[RoundRecord], transcript: TranscriptRecorder,
    ) -> tuple[Version, LogRecord] | None:
        """Under an agreement with lifecycle terms, the final model becomes candidate v1 of the model registry:
        its tensor file now, its ``model_version`` entry right after the final model's."""
        if self.agreement is None or self.agreement.lifecycle is None:
            return None
        assert self.coordinator.params is not None
        ok = [r for r in history if r.status == "ok"]
        version = Version(
            id="v1", sha256=ModelRegistry(run_path).store_tensors("v1", tensors), parent=None, round=self.coordinator.round,
            sites=sorted(ok[-1].answered) if ok else [],
            epsilon=signed_epsilon(transcript.writer.entries, transcript.writer.entries[0].body),
            metrics=finite_metrics(history[-1].metrics) if history else {},
            history=[Change("candidate", None, "registered", COORDINATOR, now())],
        )
        body = version_body(version, vector_sha256(self.coordinator.params), "run")
        return version, LogRecord("model_version", self.coordinator.round, COORDINATOR, body)

    def _restart(self, session: Session) -> None:
        """Where a resumed run picks up: after a quorum's resume entry, from the model it halted at; after a
        crash (a run with a state store), from its last committed state (``consortium.run.recovery``)."""
        assert session.run is not None
        if session.recorder.writer.entries[-1].kind != "resume" and self.state is not None:
            recovery.recover(self.state, session)
            return
        self.coordinator.restore(*self._checkpoint(session.run, session.recorder))

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
            name: {"role": "coordinator" if name == COORDINATOR else "site", "public_key": public.hex()}
            for name, public in self._directory.items()
        }
        return {
            # A fresh identity for this run: the summary names it, and a site keeps its record of the heads
            # it co-signed under it, so neither can be passed off as another run's.
            "run_id": secrets.token_hex(16),
            "members": members,
            "config_sha256": hashlib.sha256(config_text.encode()).hexdigest(),
            "rounds": self.config.rounds,
            "min_sites": self.config.participation.min_sites,
            "agreement_sha256": agreement_hash(self.agreement) if self.agreement is not None else None,
            "secure_aggregation": self.config.secure_aggregation.enabled,
            "task": task_identity(self.plan.task),  # each site endorses only the task code it holds
            "privacy": {
                "enabled": pc.enabled, "level": pc.level, "delta": pc.delta, "accountant": pc.accountant,
                "target_epsilon": pc.epsilon if pc.enabled else None,
            },
            "provenance": {
                "code_sha256": code_sha256(),
                "libraries": library_versions(),
                "datasets": datasets,
            },
        }

    @property
    def warnings(self) -> tuple[str, ...]:
        """What can be said before any site trains (the plan's warnings): the command line prints them first,
        and the summary's warnings repeat them."""
        return self.plan.warnings

    def _warnings(self, history: list[RoundRecord]) -> list[str]:
        out = list(self.warnings)  # what was said before training still holds
        final = history[-1].metrics if history else {}
        useless = self.plan.task.no_better_than_constant(final) if final else None
        if useless is not None:  # a private run that learned nothing is a result to state, not to hide
            out.append(useless)
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

    def _privacy_summary(self, history: list[RoundRecord], transcript: TranscriptRecorder) -> dict[str, Any]:
        pc, plan = self.config.privacy, self.privacy_plan
        if not pc.enabled or plan is None:
            return {"enabled": False}
        refusals: dict[str, list[int]] = {}
        for r in history:
            for site, reason in r.refused.items():
                if reason.startswith("privacy budget"):
                    refusals.setdefault(site, []).append(r.round)
        spent, caps = self._epsilon(transcript)
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
            "epsilon_per_site": spent,
            # At least what any site's ledger holds: with the events of rounds a coordinator crash cut off whose
            # decision was lost, which the site may have paid (``transcript.verify.epsilon_bound``).
            "epsilon_bound_per_site": epsilon_bound(transcript.writer.entries, spent),
            "epsilon_cap_per_site": caps,
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

    def _epsilon(self, transcript: TranscriptRecorder) -> tuple[dict[str, float], dict[str, float]]:
        """Each site's epsilon spent, from the privacy events it signed in the transcript, and its cap
        under the run's plan (a deployed site may hold a stricter one in its own policy, which it keeps)."""
        entries = transcript.writer.entries
        return signed_epsilon(entries, entries[0].body), dict(self.plan.privacy.epsilon_caps)

    def _backend(self) -> dict[str, Any] | None:
        """Who played the sites, for the summary (a simulation's backend); None: the sites are real members."""
        return None

    def _baselines(self) -> dict[str, Any]:
        """Yardsticks that need every site's data in one place: the simulation's only."""
        return {}

    def _resume_sites(self, heads: list[TreeHead]) -> None:
        """After a resume: sites that keep running pick up from the last of ``heads`` each co-signed."""

