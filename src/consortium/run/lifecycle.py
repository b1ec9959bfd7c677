"""The model lifecycle on a run folder: register, canary, promote in stages, monitor, roll back.

Everything here goes through the protocol and into the transcript, in the
order a privacy officer would want to read it:

- **Registration** (``model_version``): a version's tensors are written under
  ``registry/versions/`` first, then the signed entry that names them by hash.
- **Canary** (``promote``): the candidate moves to ``canary`` and the canary
  sites the agreement names evaluate it, and the production version beside it,
  on their *validation* splits; each evaluation is summed under secure
  aggregation like a round's, so no site's own figures reach the coordinator.
  A ``model_evaluation`` entry quotes both sums, the agreement's tolerances
  and the metrics that regressed; the candidate goes to production only if
  none did, and is retired (with the numbers in its reason) otherwise.
- **Staged rollout**: the new production version is deployed to a growing
  share of the sites (the agreement's ``rollout``, canary sites first); each
  site signs a ``deployment`` receipt, or refuses by its own policy
  (``pin_model``). After each stage the sites running it evaluate it and the
  previous version on their test splits; a regression beyond tolerance rolls
  it back at once, automatically, and the previous version is restored
  everywhere.
- **Monitoring** (``monitor``): each site checks its incoming records against
  its training records (``consortium.learning.drift``) and, where the
  agreement lets a ``drift_incident`` out, files a signed incident naming
  itself and the drifting features; no promotion happens while one is open.
- **Rollback** by hand (``rollback``): a coordinator, site or auditor signs
  the request; the coordinator records it and restores the version everywhere.

The coordinator side (``Lifecycle``) reaches the sites over any transport. In
simulation (``simulated``) every member's key is at hand (the agreement's key
folder), as ``consortium halt`` and ``resume`` assume, and the sites are
rebuilt from the run's config, each keeping its lifecycle state beside its
ledger; deployed (``consortium.deploy.serve.serve_lifecycle``), the sites'
own agents answer through the coordinator's mailbox.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from safetensors import SafetensorError, safe_open
from safetensors.numpy import load as safetensors_load

from consortium.config import SimulationConfig, load_config
from consortium.crypto import keys
from consortium.data import Records, Table, load_schema, read_csv
from consortium.data.schema import schema_of
from consortium.errors import ConfigError, ConsortiumError
from consortium.governance.agreement import REGRESSION_METRICS, Agreement, load_member_key
from consortium.governance.policy import SitePolicy
from consortium.governance.roles import Roles
from consortium.learning.adapter import ModelAdapter
from consortium.lifecycle.lineage import Lineage, describe_failures, regressions, replay, rollback_statement, version_body
from consortium.lifecycle.registry import Change, ModelRegistry, RegistryError, Version, now
from consortium.run.plan import RunPlan, plan_run
from consortium.protocol import messages as m
from consortium.protocol.coordinator import COORDINATOR, Coordinator
from consortium.protocol.task import build_model, spec_from_json
from consortium.run.simulation import site_policies, site_splits
from consortium.run.sites import build_site, site_state
from consortium.transcript.log import Entry, TranscriptWriter, cosign_quorum, last_cosigned, signed_entry_bytes, vector_sha256
from consortium.run.session import Session
from consortium.transcript.records import LogRecord
from consortium.audit.verify import read_entries, run_agreement, verify_run
from consortium.transport import InProcessTransport, Transport, ask_all, ask_each
from consortium.wire import Tensor


class LifecycleError(RegistryError):
    """A lifecycle operation that cannot go ahead: the run, the agreement or the version's state forbids it."""


@dataclass
class Promotion:
    """What ``promote`` did: the canary's verdict and, past it, each stage of the rollout."""

    version: str
    baseline: str | None
    passed: bool
    failed: list[dict[str, Any]]
    canary: dict[str, Any]  # the canary's model_evaluation body
    stages: list[dict[str, Any]] = field(default_factory=list)  # per stage: sites, refusals, the monitoring verdict
    rolled_back: bool = False
    held_after: int | None = None  # the rollout stopped after this stage, as asked (``advance`` goes on)

    @property
    def outcome(self) -> str:
        if not self.passed:
            return "rejected"
        return "rolled_back" if self.rolled_back else "production"

    def to_json(self) -> dict[str, Any]:
        return {
            "version": self.version, "baseline": self.baseline, "outcome": self.outcome, "failed": self.failed,
            "canary": self.canary, "stages": self.stages, "held_after": self.held_after,
        }


def run_model(run_dir: Path) -> dict[str, np.ndarray]:
    """The run's final model tensors (``model.safetensors``), as ``verify`` has checked them."""
    path = Path(run_dir) / "model.safetensors"
    try:
        return safetensors_load(path.read_bytes())
    except FileNotFoundError:
        raise LifecycleError(f"{path} is missing: the run has no final model to register") from None
    except SafetensorError as exc:
        raise LifecycleError(f"{path} is not a safetensors file ({exc})") from None


def run_task_spec(run_dir: Path) -> m.TaskSpec:
    """The task spec the run trained (its task, layout and the consortium's feature statistics), as the
    final model file records it; parsed by the message schema."""
    path = Path(run_dir) / "model.safetensors"
    try:
        with safe_open(path, framework="np") as f:
            text = (f.metadata() or {}).get("task_spec")
    except (OSError, SafetensorError) as exc:
        raise LifecycleError(f"{path} cannot be read ({exc}): the run has no final model to register") from None
    if text is None:
        raise LifecycleError(f"{path} records no task spec: it was written before tasks; run the study again")
    try:
        return spec_from_json(text)
    except ValueError as exc:
        raise LifecycleError(f"{path}: its task spec does not parse ({str(exc).splitlines()[0]})") from None


def read_model_file(path: Path) -> dict[str, np.ndarray]:
    try:
        return safetensors_load(Path(path).read_bytes())
    except FileNotFoundError:
        raise LifecycleError(f"model file '{path}' does not exist: pass a .safetensors file with the run's layout") from None
    except SafetensorError as exc:
        raise LifecycleError(f"'{path}' is not a safetensors file ({exc}): pass one with the run's layout") from None


def read_incoming(run_dir: Path, specs: list[str]) -> dict[str, Table]:
    """``SITE=FILE.csv`` pairs: the records that reached each named site since training, read under the
    site's own schema (its CSV schema, or the layout of a built-in dataset with a ``label`` column)."""
    if not specs:
        return {}
    config = load_config(Path(run_dir) / "config.yaml").resolved()
    names = [n for n, mm in read_entries(Path(run_dir))[0].body["members"].items() if mm["role"] == "site"]
    layouts = None
    out: dict[str, Table] = {}
    for spec in specs:
        site, sep, file = spec.partition("=")
        if not sep or not site or not file:
            raise ConfigError(f"--incoming '{spec}': write SITE=FILE.csv, e.g. site-2=data/site-2-march.csv")
        if site not in names:
            raise ConfigError(f"--incoming names '{site}', which is not a site of this run (its sites: {', '.join(names)})")
        csv_site = next((c for c in config.data.csv_sites or [] if c.name == site), None)
        if csv_site is not None:
            schema = load_schema(csv_site.schema_file)
        else:
            layouts = layouts or site_splits(config)
            schema = schema_of(layouts[site].train)
        out[site] = read_csv(file, schema)
    return out


class Lifecycle:
    """A finished run folder reopened by its coordinator to move model versions through their states.

    The sites are reached over ``transport``: in-process simulated sites (``simulated``), or the sites'
    own agents polling the coordinator's service (``consortium.deploy.serve.serve_lifecycle``).
    ``sample``: a table with the data's layout (its rows are never read). ``plan``: the run's plan
    (``reopen_plan``; default: from its recorded config and agreement, without the sites' own policies,
    which a deployed site keeps to itself).
    """

    def __init__(
        self, run_dir: Path, *, coordinator_key: Ed25519PrivateKey, directory: dict[str, bytes], transport: Transport,
        sample: Records, plan: RunPlan | None = None,
    ) -> None:
        self.run_dir = Path(run_dir)
        report = verify_run(self.run_dir)  # a disputed transcript gets no lifecycle operation: it is investigated
        if report.status != "completed":
            raise LifecycleError(f"{self.run_dir} holds a {report.status} run: only a completed run's models move on")
        entries = read_entries(self.run_dir)
        manifest = entries[0].body
        self.agreement: Agreement = lifecycle_agreement(self.run_dir, manifest)
        self.terms = self.agreement.lifecycle
        self.names = [n for n, mm in manifest["members"].items() if mm["role"] == "site"]
        self.plan = plan or reopen_plan(
            load_config(self.run_dir / "config.yaml"), sample=sample, names=self.names, agreement=self.agreement,
        )
        self.config = self.plan.config
        self._coordinator_key = coordinator_key
        self._directory = directory
        self._sample = sample
        self.round = entries[-1].round
        self.transport = transport
        # The sites are reached, and the transcript extended, through one session; each evaluation is a
        # coordinator it drives.
        self.session = Session(
            transport, self.run_dir, coordinator_key=coordinator_key, sites=self.names, round_of=lambda: self.round,
            quorum=cosign_quorum(int(manifest.get("min_sites", 1)), len(self.names)),
        )
        self.recorder = self.session.recorder
        self.registry = ModelRegistry(self.run_dir)
        self.task = self._task()
        self.lineage = self._sync()

    # -- reading ---------------------------------------------------------------------

    @property
    def entries(self) -> list[Entry]:
        return self.recorder.writer.entries

    def _sync(self) -> Lineage:
        """Replay the transcript; the registry index is rebuilt from it wherever the two differ."""
        lineage = replay(self.entries, self.agreement, self.names)
        if lineage.registry.index_json() != self.registry.index_json():
            self.registry.rebuild(lineage.registry.versions)
        self.lineage = lineage
        return lineage

    def _task(self) -> m.TaskSpec:
        """The run's task spec (task, model, input standardisation, layout), as its final model file records it."""
        return run_task_spec(self.run_dir)

    def _module(self, tensors: dict[str, np.ndarray]) -> torch.nn.Module:
        """The run's architecture holding ``tensors``; a file of another layout is refused."""
        model = build_model(self.plan.task, self._task(), 0)
        try:
            model.load_state_dict({k: torch.from_numpy(np.array(v, copy=True)) for k, v in tensors.items()})
        except RuntimeError as exc:
            first = str(exc).splitlines()[0]
            raise LifecycleError(f"the model does not have this run's layout ({first}): it cannot be a version of it") from None
        return model

    def params(self, version: str) -> np.ndarray:
        """A version's parameters as the protocol sends them, read from its hash-checked tensor file."""
        return ModelAdapter(self._module(self.registry.tensors(version))).get_vector()

    # -- writing -----------------------------------------------------------------------

    def _append(self, kind: str, body: dict[str, Any]) -> Entry:
        self.recorder.record([LogRecord(kind, self.round, COORDINATOR, body)])  # type: ignore[arg-type]
        return self.entries[-1]

    def _close(self) -> None:
        """Seal what was appended under a head every site co-signs, then bring the registry index up to date."""
        self.recorder.close_round()
        self._sync()

    def _move(self, version: str, to: str, reason: str, by: str) -> None:
        self._append("model_state", {"version": version, "to": to, "reason": reason, "by": by, "at": now(), "rollback": False})
        self._sync()

    def register(self, tensors: dict[str, np.ndarray], *, parent: str | None, by: str) -> Version:
        """A new candidate version trained from ``parent`` outside the run (fine-tuned, say), brought in by
        ``by``: its tensor file, then the signed entry naming it by hash. (The run's own final model is
        registered as v1 when the run ends.)"""
        module = self._module(tensors)
        # Buffers are no parameters: the protocol never sends them, so a version must keep the run's (the
        # input standardisation the task built from the consortium's statistics, for one).
        run_buffers = dict(build_model(self.plan.task, self.task, 0).named_buffers())
        for name, buffer in module.named_buffers():
            if not torch.equal(buffer, run_buffers[name]):
                raise LifecycleError(f"the model's buffer '{name}' differs from the run's (its input standardisation): keep the run's buffers")
        if parent is not None:
            self.registry.get(parent)
        vid = self.registry.next_id
        version = Version(
            id=vid, sha256=self.registry.store_tensors(vid, tensors), parent=parent, round=self.round, sites=[],
            epsilon={}, metrics={}, history=[Change("candidate", None, "registered", by, now())],
        )
        self._append("model_version", version_body(version, vector_sha256(ModelAdapter(module).get_vector()), "file"))
        self._close()
        return self.registry.get(vid)

    def _site_entry(self, kind: str, site: str, signed: m.SiteDecision) -> LogRecord | None:
        """A site's signed entry, recorded only if its signature holds (a bad one would spoil the transcript)."""
        try:
            keys.verify(self._directory[site], signed.signature, signed_entry_bytes(kind, self.round, site, dict(signed.body)))
        except ConsortiumError:
            return None
        return LogRecord(kind, self.round, site, dict(signed.body), signed.signature)  # type: ignore[arg-type]

    # -- evaluation through secure sums -------------------------------------------------

    def _evaluate(self, version: str, sites: list[str], purpose: Literal["canary", "monitor"]) -> Entry:
        """``sites`` evaluate ``version`` (canary: validation splits; monitor: test splits), summed securely."""
        plan, config = self.plan, self.config
        assert config.model is not None and config.training is not None
        coordinator = Coordinator(
            self.names, model=config.model, train=config.training, strategy=plan.strategy, rounds=config.rounds,
            seed=config.seed, secure=plan.secure_aggregation(self._coordinator_key, self._directory),
            evaluation=plan.evaluation, task=plan.task,
        )
        coordinator.open_evaluation(self.task, self.params(version), sites, rnd=self.round, purpose=purpose)
        record = self.session.evaluate(coordinator)
        if record.evaluated_sites < len(sites):
            raise LifecycleError(
                f"the {purpose} evaluation of {version} was summed over {record.evaluated_sites} of the "
                f"{len(sites)} sites asked ({record.evaluation_note or 'some did not answer'}): try again when they are up"
            )
        return self.entries[-1]

    def _judge(self, version: str, baseline: str | None, sites: list[str], purpose: Literal["canary", "monitor"], stage: int) -> Entry:
        """Evaluate ``version`` and ``baseline`` on the same sites, compare them, record the verdict."""
        candidate = self._evaluate(version, sites, purpose)
        base = self._evaluate(baseline, sites, purpose) if baseline is not None else None
        tolerances = dict(self.terms.tolerances)
        failed = regressions(candidate.body["metrics"], base.body["metrics"] if base else None, tolerances)
        return self._append("model_evaluation", {
            "version": version, "baseline": baseline, "purpose": purpose, "stage": stage, "sites": sorted(sites),
            "secure": self.config.secure_aggregation.enabled,
            "candidate_entry": candidate.index, "baseline_entry": base.index if base else None,
            "candidate_metrics": candidate.body["metrics"], "baseline_metrics": base.body["metrics"] if base else None,
            "tolerances": tolerances, "failed": failed, "passed": not failed,
        })

    def _check_measured(self) -> None:
        ev, target = self.config.evaluation, self.plan.task.target
        for metric in self.terms.tolerances:
            if (metric in REGRESSION_METRICS) != (target == "regression"):
                raise LifecycleError(
                    f"the agreement's tolerances name {metric}, which a {target} does not measure: "
                    f"name the task's metrics ({'mse, mae, r2' if target == 'regression' else 'accuracy, auc, loss, ece'})"
                )
            if metric.endswith("_gap") and ev.sensitive_feature is None:
                raise LifecycleError(
                    f"the agreement's tolerances name {metric}, which this run does not measure: "
                    "set evaluation.sensitive_feature in the run's config"
                )
            if metric == "shift_accuracy" and ev.shift_noise is None:
                raise LifecycleError("the agreement's tolerances name shift_accuracy: set evaluation.shift_noise in the run's config")

    # -- deployment -------------------------------------------------------------------------

    def _deploy(self, version: str, sites: list[str], *, reason: Literal["rollout", "rollback"], stage: int) -> dict[str, str]:
        """Ask ``sites`` to run ``version``; each signed receipt goes in the transcript. Returns each site's
        answer: ``deployed``, ``refused: <why>`` (its policy) or ``no answer: <why>``."""
        if not sites:
            return {}
        params = self.params(version)
        tensor = Tensor.from_numpy(params.astype(np.float32))
        registered = next(e for e in self.entries if e.kind == "model_version" and e.body["version"] == version)
        promoted = next(e for e in reversed(self.entries)
                        if e.kind == "model_state" and e.body["version"] == version and e.body["to"] == "production")
        request = m.DeployRequest(
            version=version, model_sha256=tensor.sha256, task=self.task, params=tensor, reason=reason, stage=stage,
            registered=self._proof(registered), promoted=self._proof(promoted),
        )
        out: dict[str, str] = {}
        records = []
        for site, answer in ask_each(self.transport, self.round, {s: request for s in sites}, m.DeployReply).items():
            if not isinstance(answer, m.DeployReply) or answer.receipt.site != site:
                out[site] = f"no answer: {answer}"
                continue
            record = self._site_entry("deployment", site, answer.receipt)
            if record is None:
                out[site] = "no answer: its receipt's signature does not verify"
                continue
            records.append(record)
            out[site] = "deployed" if record.body["accepted"] else f"refused: {record.body['detail']}"
        self.recorder.record(records)
        return out

    def _proof(self, entry: Entry) -> m.PlanProof:
        """``entry`` with its inclusion proof in the last head, which every site co-signed."""
        head = self.recorder.writer.heads[-1]
        return m.PlanProof(entry=entry, head=head.bare(), path=self.recorder.writer.inclusion(entry.index, head.size))

    def _rollout_order(self) -> list[str]:
        """Canary sites first (they have seen the version), then the others in the agreement's order."""
        canary = list(self.terms.canary_sites)
        return canary + [s for s in self.agreement.sites() if s not in canary and s in self.names]

    def _stage_size(self, share: float) -> int:
        n = len(self.names)
        size = math.ceil(share * n - 1e-9)
        if self.config.secure_aggregation.enabled:  # monitoring sums over the stage's sites: never fewer than a cohort
            size = max(size, 2, self.agreement.min_cohort)
        return min(size, n)

    # -- the operations -------------------------------------------------------------------------

    def promote(self, version: str, *, by: str = COORDINATOR, stages: int | None = None) -> Promotion:
        """Canary, then production in stages (all of them, or the first ``stages``: ``advance`` goes on),
        with monitoring after each; the first regression rolls it back."""
        lineage = self._sync()
        v = self.registry.get(version)
        if v.state != "candidate":
            raise LifecycleError(f"version {version} is {v.state}: only a candidate can be promoted (register a new version)")
        self._refuse_while_drifting(lineage)
        self._check_measured()
        baseline = lineage.production.id if lineage.production is not None else None
        canary_sites = sorted(self.terms.canary_sites)
        self._move(version, "canary", f"canary evaluation by {', '.join(canary_sites)} against {baseline or 'no production version'}", by)
        verdict = self._judge(version, baseline, canary_sites, "canary", 0)
        failed = verdict.body["failed"]
        promotion = Promotion(version, baseline, not failed, failed, verdict.body)
        if failed:
            self._move(version, "retired", f"rejected at canary: {describe_failures(failed)}", by)
            self._close()
            return promotion
        self._move(version, "production", f"canary passed on {', '.join(canary_sites)}", by)
        self._close()
        return self._rollout(promotion, 1, stages)

    def advance(self, *, stages: int | None = None) -> Promotion:
        """Take the production version's rollout on from the stage it reached (all the rest, or ``stages`` more)."""
        lineage = self._sync()
        self._refuse_while_drifting(lineage)
        current = lineage.production
        canary = next((e for e in reversed(lineage.evaluations)
                       if current is not None and e.body["version"] == current.id and e.body["purpose"] == "canary"), None)
        if current is None or canary is None or current.history[-1].reason.startswith("rollback"):
            raise LifecycleError("no version is being rolled out: promote a candidate first (consortium models promote)")
        reached = max((e.body["stage"] for e in self.entries
                       if e.kind == "deployment" and e.body["version"] == current.id and e.body["reason"] == "rollout"), default=0)
        if reached >= len(self.terms.rollout):
            raise LifecycleError(f"{current.id} has been through every stage of its rollout: there is nothing to advance")
        promotion = Promotion(current.id, canary.body["baseline"], True, [], canary.body)
        return self._rollout(promotion, reached + 1, stages)

    def _rollout(self, promotion: Promotion, first: int, stages: int | None) -> Promotion:
        """Stages ``first``.. of the agreement's rollout: deploy, then the sites running it compare it with
        the baseline; a regression restores the baseline everywhere."""
        version, baseline = promotion.version, promotion.baseline
        last = len(self.terms.rollout) if stages is None else min(len(self.terms.rollout), first - 1 + stages)
        order = self._rollout_order()
        running = [s for s in order if self.lineage.deployed.get(s) == version]
        for stage in range(first, last + 1):
            share = self.terms.rollout[stage - 1]
            asked = [s for s in order[: self._stage_size(share)] if s not in running]
            answers = self._deploy(version, asked, reason="rollout", stage=stage)
            running += [s for s, a in answers.items() if a == "deployed"]
            info: dict[str, Any] = {"stage": stage, "share": share, "asked": asked, "answers": answers, "running": sorted(running)}
            promotion.stages.append(info)
            self._close()
            if baseline is None or len(running) < (max(2, self.agreement.min_cohort) if self.config.secure_aggregation.enabled else 1):
                info["monitoring"] = "not compared: " + ("no earlier version" if baseline is None else "too few sites run it to sum")
                continue
            check = self._judge(version, baseline, sorted(running), "monitor", stage)
            info["monitoring"] = {"failed": check.body["failed"], "passed": check.body["passed"]}
            if check.body["failed"]:
                why = f"automatic: at rollout stage {stage} on {', '.join(sorted(running))}: {describe_failures(check.body['failed'])}"
                self._restore(baseline, why, by=f"{COORDINATOR} (monitoring)", request=None)
                promotion.rolled_back = True
                return promotion
            self._close()
        promotion.held_after = last if last < len(self.terms.rollout) else None
        return promotion

    def rollback(self, to: str, *, reason: str, member: str = COORDINATOR, key: Ed25519PrivateKey | None = None) -> dict[str, str]:
        """``member`` (a coordinator, site or auditor) demands version ``to`` back in production everywhere,
        signing the demand with ``key`` (its identity key; the coordinator's own by default)."""
        if not reason.strip():
            raise LifecycleError("a rollback needs a reason (--reason): it goes in the transcript for every member")
        Roles.of_agreement(self.agreement).authorize(member, "rollback")
        key = key if key is not None else self._coordinator_key
        if keys.ed25519_public_bytes(key.public_key()).hex() != next(m.public_key for m in self.agreement.members if m.name == member):
            raise LifecycleError(f"the key given is not {member}'s identity key: the member who demands a rollback signs it")
        self._sync()
        target = self.registry.get(to)
        if target.state == "production":
            raise LifecycleError(f"version {to} is already in production: there is nothing to roll back")
        if target.state != "retired" or not any(c.state == "production" for c in target.history):
            raise LifecycleError(f"version {to} is {target.state} and was never in production: roll back only to a former production version")
        statement = rollback_statement(to, reason.strip(), len(self.entries))
        request = {"member": member, "signature": keys.sign(key, statement).hex()}
        return self._restore(to, reason.strip(), by=member, request=request)

    def _restore(self, to: str, reason: str, *, by: str, request: dict[str, str] | None) -> dict[str, str]:
        """Put ``to`` back in production (the current version is rolled back) and on every site."""
        self._append("model_state", {
            "version": to, "to": "production", "reason": reason, "by": by, "at": now(), "rollback": True, "request": request,
        })
        self._close()  # the sites see the rollback under a head they co-sign before they are asked to act on it
        answers = self._deploy(to, [s for s in self.names if self.lineage.deployed.get(s) != to], reason="rollback", stage=0)
        self._close()
        return answers

    def monitor(self) -> list[Entry]:
        """Every site checks its incoming data for drift; what the agreement lets out is recorded, signed."""
        answers = ask_all(self.transport, self.names, self.round, m.MonitorRequest(), m.MonitorReply)
        records = [
            record
            for site, a in answers.items()
            if isinstance(a, m.MonitorReply) and a.report is not None and a.entry_kind is not None
            and (record := self._site_entry(a.entry_kind, site, a.report)) is not None
        ]
        if not records:
            return []
        self.recorder.record(records)  # type: ignore[arg-type]
        self._close()
        return self.entries[-len(records):]

    def _refuse_while_drifting(self, lineage: Lineage) -> None:
        if lineage.open_incidents:
            site, incident = next(iter(sorted(lineage.open_incidents.items())))
            features = ", ".join(incident.body.get("features", [])) or "the label rates"
            raise LifecycleError(
                f"promotion is paused: {site} reported drift in {features} (transcript entry {incident.index}); "
                "it resumes once that site's own check is clean again (consortium models monitor)"
            )


def reopen_plan(
    config: SimulationConfig, *, sample: Records, names: list[str], agreement: Agreement,
    policies: Mapping[str, SitePolicy] | None = None,
) -> RunPlan:
    """A finished run's plan, from the config it recorded (its ``config.yaml``), for its model lifecycle:
    the strategy, secure aggregation, evaluation and each site's budget (``policies``: the sites' own,
    where they are at hand) as the run had them; no round's noise is calibrated again (it trains no more).

    Raises:
        ConfigError: the recorded config no longer keeps the agreement.
    """
    return plan_run(config, sample=sample, names=names, agreement=agreement, policies=policies, calibrate=False)


def lifecycle_agreement(run_dir: Path, manifest: dict[str, Any]) -> Agreement:
    """The run's agreement, which must set lifecycle terms: no version moves without them."""
    agreement = run_agreement(run_dir, manifest)
    if agreement is None or agreement.lifecycle is None:
        raise LifecycleError(
            "this run's agreement sets no lifecycle terms (canary sites, tolerances, rollout, drift): "
            "add a lifecycle section to the agreement and have it signed again"
        )
    return agreement


def simulated(run_dir: Path, keys_dir: Path, *, incoming: Mapping[str, Table] | None = None) -> Lifecycle:
    """A simulated run's lifecycle: its sites rebuilt from the run's config, each with its own state beside
    its ledger, and every member's key from ``keys_dir`` (as ``consortium halt`` and ``resume`` use them).
    ``incoming``: the records that reached each site since training (its drift check's input; a site
    given none has nothing to check)."""
    run_dir = Path(run_dir)
    entries = read_entries(run_dir)
    agreement = lifecycle_agreement(run_dir, entries[0].body)
    config = load_config(run_dir / "config.yaml")
    names = [n for n, mm in entries[0].body["members"].items() if mm["role"] == "site"]
    identities = {n: load_member_key(agreement, Path(keys_dir), n) for n in [*names, COORDINATOR]}
    directory = {n: keys.ed25519_public_bytes(k.public_key()) for n, k in identities.items()}
    splits = site_splits(config)
    # The sites' budgets as the run planned them (the least of the config's, the agreement's and each policy's cap).
    plan = reopen_plan(config, sample=splits[names[0]].train, names=names, agreement=agreement,
                       policies=site_policies(config, agreement, names))
    heads = TranscriptWriter(run_dir).heads
    sites = {}
    for n in names:
        sites[n] = build_site(
            n, splits[n], identity=identities[n], directory=directory, state=site_state(run_dir, n), seed=config.seed,
            budget=plan.privacy.budget(n),  # a site under DP keeps its ledger
            agreement=agreement, policy=plan.policies.get(n), task=plan.task,
            journal=False, record=False,  # its lifecycle state only, beside the ledger its run left
        )
        head = last_cosigned(heads, n)
        if head is not None:
            sites[n].resume_from(head)
        if incoming and n in incoming:
            sites[n].observe(incoming[n])
    transport = InProcessTransport(sites, identity=identities[COORDINATOR], directory=directory)
    return Lifecycle(run_dir, coordinator_key=identities[COORDINATOR], directory=directory, transport=transport,
                     sample=splits[names[0]].train, plan=plan)


def open_lifecycle(run_dir: Path, keys_dir: Path, *, incoming: Mapping[str, Table] | None = None) -> Lifecycle:
    """Reopen a simulated run for lifecycle operations; any failure to do so is one line (``ConsortiumError``)."""
    try:
        return simulated(run_dir, keys_dir, incoming=incoming)
    except ConsortiumError:
        raise
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot reopen {run_dir} for the model lifecycle: {exc}") from None
