"""The site runtime: an I/O-free state machine that answers the coordinator.

A site holds its own train / validation / test splits and never hands any
of them out. What leaves is one summable vector per phase (feature sums at
setup, the weighted update when training, evaluation counts), in the clear
only when secure aggregation is off; under secure aggregation the vector
stays here until it leaves masked, and the coordinator only learns sums.
The splits live in a name-mangled attribute and nothing returns them.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from consortium.data import Splits, Table
from consortium.crypto import keys
from consortium.errors import ConfigError, ModelError, ProtocolError, VerificationError
from consortium.governance.agreement import Agreement, agreement_hash
from consortium.governance.guard import Clock, Refused, SiteGuard, utc_now
from consortium.governance.policy import SitePolicy
from consortium.governance.roles import PermissionDenied, Roles
from consortium.learning.adapter import ModelAdapter
from consortium.learning.robust import bound_norm
from consortium.learning.training import EvalStats, Groups, evaluate
from consortium.lifecycle.drift import DriftReport, check_drift
from consortium.privacy.dpsgd import secure_generator, secure_numpy_generator
from consortium.privacy.events import SiteLevelEvent
from consortium.privacy.ledger import BudgetLedger, Discrepancy
from consortium.protocol import contributions as c
from consortium.protocol import messages as m
from consortium.protocol.task import ModelBuilder, build_task_model
from consortium.protocol.sealed import EnvelopeGuard, seal
from consortium.protocol.trainer import LocalTrainer, PlainTrainer, trainer_for
from consortium.runs import write_atomic
from consortium.secagg import SecAggClient
from consortium.secagg.encoding import DiscreteGaussianEncoding
from consortium.transcript import merkle
from consortium.transcript.site_record import SignedRecord, payments
from consortium.transcript.log import (
    Entry,
    HeadWitness,
    TreeHead,
    canonical,
    manifest_bytes,
    signed_entry_bytes,
    vector_sha256,
)
from consortium.wire import Tensor

COORDINATOR = m.COORDINATOR


def table_fingerprint(table: Table) -> str:
    """SHA-256 of what must agree across sites: feature names, classes, image shape."""
    canonical = json.dumps(
        {"features": list(table.feature_names), "classes": list(table.classes), "image_shape": table.image_shape},
        sort_keys=True,
        separators=(",", ":"),
    )
    return hashlib.sha256(canonical.encode()).hexdigest()


def _model_sha256(params: Tensor) -> str:
    """A received model's transcript hash: float32 bytes, whose SHA-256 the wire already checked on arrival."""
    return params.sha256 if params.dtype == "float32" else vector_sha256(params.to_numpy())


class EvaluationJournal:
    """A site's own record of how each round's model did on its test split: kept by the site, never sent.

    One JSON line per evaluated round, appended and flushed to disk; a torn
    last line (a crash mid-write) is skipped by whoever reads it.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)

    def append(self, rnd: int, stats: EvalStats) -> None:
        metrics = {k: (float(v) if math.isfinite(v) else None) for k, v in stats.metrics().items()}
        line = json.dumps({"round": rnd, "n": stats.n, **metrics}, allow_nan=False)
        with open(os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600), "a") as f:  # the site's own: 0600
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())


class SiteLifecycle:
    """A site's own lifecycle state, in one JSON file written atomically: the model version it runs,
    whether it has a drift incident open, and its last drift check (the check stays here)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.state: dict[str, object] = {"version": None, "model_sha256": None, "incident_open": False, "drift": None}
        if path.exists():
            try:
                self.state.update(json.loads(path.read_text()))
            except ValueError:
                raise ConfigError(f"{path} is damaged: restore it from a backup") from None

    @property
    def version(self) -> str | None:
        return self.state["version"]  # type: ignore[return-value]

    @property
    def incident_open(self) -> bool:
        return bool(self.state["incident_open"])

    def _save(self) -> None:
        write_atomic(self.path, json.dumps(self.state, indent=1).encode())

    def deploy(self, version: str, model_sha256: str) -> None:
        self.state.update(version=version, model_sha256=model_sha256)
        self._save()

    def set_incident(self, open_: bool) -> None:
        self.state["incident_open"] = open_
        self._save()

    def note_drift(self, report: DriftReport) -> None:
        self.state["drift"] = {"psi": report.psi, "label_shift": report.label_shift, "breached": report.breached}
        self._save()


class Site:
    """One institution's agent in the protocol.

    ``identity`` (an Ed25519 key) and ``directory`` (every member's public
    key, the coordinator's included) are needed for secure aggregation.
    ``ledger`` is the site's own privacy budget: with one, the site takes
    part only in rounds under differential privacy (record or site level)
    and refuses a round that would exceed its cap.
    ``agreement`` and ``policy`` (the site's own, stricter) feed the site's
    guard, which checks each round plan before any training (see
    ``consortium.governance.guard``); ``clock`` tells it the time.
    ``noise_test_seed`` makes the privacy noise reproducible: test mode only.
    ``strict``: deployment-grade checks. Every request must be sealed by the
    coordinator (``sealed``: signed header, fresh, never replayed, in round
    order) and every reply is sealed by this site; a fit request must carry
    the round's plan, proven to be in the last transcript head this site
    co-signed, naming the model it sends.
    ``trainer`` does the local training of a fit request (default: plain local training); a
    record-level round always trains with DP-SGD instead (see ``consortium.protocol.trainer``).
    """

    def __init__(
        self,
        name: str,
        data: Splits,
        *,
        seed: int,
        identity: Ed25519PrivateKey | None = None,
        directory: Mapping[str, bytes] | None = None,
        ledger: BudgetLedger | None = None,
        noise_test_seed: int | None = None,
        strict: bool = False,
        model_builder: ModelBuilder = build_task_model,
        agreement: Agreement | None = None,
        policy: SitePolicy | None = None,
        clock: Clock = utc_now,
        memory: Path | None = None,
        journal: Path | None = None,
        lifecycle: Path | None = None,
        record: Path | None = None,
        trainer: LocalTrainer | None = None,
    ) -> None:
        self.name = name
        self.__data = data
        self.__train = (torch.from_numpy(data.train.X), torch.from_numpy(data.train.y))
        self.__valid = (torch.from_numpy(data.validation.X), torch.from_numpy(data.validation.y))
        self.__test = (torch.from_numpy(data.test.X), torch.from_numpy(data.test.y))
        self.__incoming: Table | None = None  # the records arriving since training, for the drift check
        self._lifecycle = SiteLifecycle(lifecycle) if lifecycle is not None else None
        self._agreement = agreement
        self._policy = policy
        self._seed = seed
        self._journal = None if journal is None else EvaluationJournal(journal)
        self._identity = identity
        self._directory = dict(directory or {})
        self._build = model_builder
        self._trainer: LocalTrainer = PlainTrainer() if trainer is None else trainer
        # With a ledger the site trains only under DP, within its own cap.
        self.ledger = ledger
        self.guard = SiteGuard(name, agreement=agreement, policy=policy, ledger=ledger, clock=clock)
        self._roles = Roles.of_agreement(agreement) if agreement is not None else None
        self._noise = secure_generator(noise_test_seed)
        self._int_noise = secure_numpy_generator(noise_test_seed)
        self.__paid: dict[int, SiteLevelEvent] = {}  # site-level events paid, by round: their sessions must match
        self._model: tuple[m.TaskSpec, torch.nn.Module, ModelAdapter] | None = None
        self._held: tuple[str, Tensor] | None = None  # the last model received, by its hash
        self.__pending: dict[tuple[int, str], np.ndarray] = {}  # contributions awaiting their session
        self.__sessions: dict[str, tuple[SecAggClient, np.ndarray]] = {}
        self._used_sessions: set[str] = set()
        coordinator_key = self._directory.get(COORDINATOR)
        self._witness = HeadWitness(name, identity, coordinator_key) if identity and coordinator_key else None
        if strict and self._witness is None:
            raise ProtocolError("strict checks need this site's identity key and the directory of members' keys")
        self._strict = strict
        self._guard = EnvelopeGuard(name, self._directory) if strict else None
        self._round_seen = 0
        self._fingerprint_salt = os.urandom(16)
        self._memory = memory
        self._run_id = ""  # the run whose manifest this site endorsed: its ledger rows and its record name it
        self._record = SignedRecord(record) if record is not None else None
        self.restored: list[Discrepancy] = []  # ledger rows put back from the signed record at start
        if memory is not None and memory.exists():
            self._recall(memory)
        if self._record is not None and ledger is not None and identity is not None:
            # Before anything is spent: every round this site signed as paid is in its ledger, as signed.
            own = keys.ed25519_public_bytes(identity.public_key())
            self.restored = ledger.reconcile(payments(self._record.decisions(name, own)), restore=True)

    def _recall(self, path: Path) -> None:
        """A restarted site picks up where it was: the last head it co-signed, the last round it answered."""
        try:
            saved = json.loads(path.read_text())
            head, rnd = TreeHead.model_validate(saved["head"]), int(saved["round"])
            self._run_id = str(saved.get("run_id", ""))
        except (ValueError, KeyError, TypeError):
            raise ConfigError(f"{path} is damaged: restore it from a backup (without it this site cannot check the transcript)") from None
        if self._witness is None:
            raise ProtocolError("this site has no identity key or directory: it keeps no transcript memory")
        self._witness.remember(head)
        self._round_seen = rnd

    # -- transport entry points ------------------------------------------------

    def handle_bytes(self, raw: bytes) -> bytes:
        """Parse a request (strict: open and check its seal), answer it, and encode (strict: seal) the reply."""
        try:
            request = m.decode(raw) if self._guard is None else self._open(raw)
        except ProtocolError as exc:
            reply = m.make_envelope(self.name, COORDINATOR, 0, m.Refusal(reason=str(exc)[:2000]))
        else:
            reply = self.handle(request)
        if self._guard is None:
            return m.encode(reply)
        assert self._identity is not None
        return seal(reply, self._identity)

    def _open(self, raw: bytes) -> m.Envelope:
        assert self._guard is not None
        request = self._guard.open(raw, sender=COORDINATOR)
        if 0 < request.round < self._round_seen:  # round 0 is a run's setup: a new run starts there (see endorse)
            raise ProtocolError(f"a request for round {request.round} after round {self._round_seen}: refused as a replay")
        self._round_seen = max(self._round_seen, request.round)
        return request

    def handle(self, request: m.Envelope) -> m.Envelope:
        msg = request.message
        try:
            if request.recipient != self.name:
                raise ProtocolError(f"message addressed to '{request.recipient}', not to this site")
            if self._roles is not None:
                self._roles.authorize(request.sender, "plan_round")
            reply = self._dispatch(request.round, msg)
        except (ProtocolError, ModelError, PermissionDenied) as exc:
            reply = m.Refusal(reason=str(exc)[:2000], rule=getattr(exc, "rule", "protocol"))
        if isinstance(msg, m.FitRequest) and request.recipient == self.name:
            reply = self._sign_decision(request.round, msg, reply)
        return m.make_envelope(self.name, request.sender, request.round, reply)

    # -- the transcript ------------------------------------------------------------

    def _signed(self, kind: str, rnd: int, body: dict[str, object]) -> m.SiteDecision:
        """A transcript entry of ``kind`` that this site authors, signed before it knows where it will land."""
        if self._identity is None:
            raise ProtocolError("this site has no identity key: it cannot sign what the transcript records")
        body = json.loads(canonical(body))
        signature = self._identity.sign(signed_entry_bytes(kind, rnd, self.name, body))
        if self._record is not None and kind == "site_decision":  # noted down before it leaves
            self._record.note_decision(self._run_id, rnd, self.name, body, signature)
        return m.SiteDecision(round=rnd, site=self.name, body=body, signature=signature)

    def _sign_decision(self, rnd: int, msg: m.FitRequest, reply: m.BaseModel) -> m.BaseModel:
        """Attach the site's signed yes or no to a round plan: the model it was sent and what it paid."""
        if self._identity is None or not isinstance(reply, (m.FitReply, m.Refusal)):
            return reply
        accepted = isinstance(reply, m.FitReply)
        return reply.model_copy(update={"decision": self._signed("site_decision", rnd, {
            "model_sha256": _model_sha256(msg.params) if msg.params is not None else msg.model_sha256,
            "accepted": accepted,
            "reason": "" if accepted else reply.reason,  # type: ignore[union-attr]
            "rule": "" if accepted else reply.rule,  # type: ignore[union-attr]
            "privacy_event": msg.privacy.model_dump(mode="json") if accepted and msg.privacy is not None else None,
        })})

    def _received_model(self, msg: m.FitRequest) -> tuple[str, Tensor]:
        """The model a fit request sends, or names by hash among what this site holds, with its hash."""
        if msg.params is None:
            assert msg.model_sha256 is not None
            if self._held is None or self._held[0] != msg.model_sha256:
                raise ProtocolError(f"this site does not hold model {msg.model_sha256[:12]}...: send it")
            return self._held
        sent = _model_sha256(msg.params)
        if msg.model_sha256 is not None and msg.model_sha256 != sent:
            raise Refused(
                "model_hash", f"the model sent (sha256 {sent[:12]}...) is not the one the request names ({msg.model_sha256[:12]}...)"
            )
        return sent, msg.params

    def _proven(self, proof: m.PlanProof | None, kind: str, what: str, rule: str) -> Entry:
        """An entry of ``kind`` by the coordinator, in the last tree head this site co-signed; a refusal
        under ``rule`` otherwise (round plans before training, lifecycle entries before deploying)."""
        assert self._witness is not None
        last = self._witness.last
        if proof is None or last is None or proof.head.model_copy(update={"cosignatures": {}}) != last:
            raise Refused(rule, f"{what} is not proven against the last tree head this site co-signed")
        entry = proof.entry
        if entry.kind != kind or entry.author != COORDINATOR:
            raise Refused(rule, f"{what}: the proof is of a {entry.kind} entry, not a {kind} entry")
        try:
            keys.verify(self._directory[COORDINATOR], entry.signature, entry.signed_bytes())
            merkle.verify_inclusion(entry.leaf(), entry.index, last.size, proof.path, bytes.fromhex(last.root))
        except VerificationError as exc:
            raise Refused(rule, f"{what} is not in the transcript: {exc}") from None
        return entry

    def _check_plan(self, rnd: int, msg: m.FitRequest, sent: str) -> None:
        """The request must be the round plan the transcript holds, in the last head this site co-signed."""
        proof = msg.plan
        if proof is None:
            raise Refused("plan_proof", "this site trains only on a round plan the transcript holds, and the request carries none")
        entry = self._proven(proof, "round_plan", "the round plan", "plan_proof")
        if entry.round != rnd:
            raise Refused("plan_proof", f"the proof is of the plan for round {entry.round}, not this round's plan")
        if entry.body.get("model_sha256") != sent:
            raise Refused(
                "model_hash",
                f"the model sent (sha256 {sent[:12]}...) is not the one the transcript plans for round {rnd} "
                f"({str(entry.body.get('model_sha256'))[:12]}...): refusing to train on it"
            )
        declared = json.loads(canonical(msg.privacy.model_dump(mode="json"))) if msg.privacy is not None else None
        if entry.body.get("privacy_event") != declared:
            raise Refused("plan_mismatch", "the request's privacy event is not the one the transcript plans for this round")
        planned_bound = (entry.body.get("robust") or {}).get("norm_bound")
        if msg.norm_bound != planned_bound:
            raise Refused(
                "plan_mismatch",
                f"the request's norm bound {msg.norm_bound} is not the one the transcript plans for this round ({planned_bound})",
            )
        if self.name not in entry.body.get("cohort", []):
            raise Refused("plan_mismatch", f"the transcript's plan for round {rnd} does not include this site")

    def _endorse(self, manifest: dict[str, object]) -> m.Endorsement:
        """Sign the run's manifest only if it states this site, the keys it knows, its agreement and its data truly."""
        if self._identity is None:
            raise ProtocolError("this site has no identity key: it cannot endorse a manifest")
        members = manifest.get("members")
        if not isinstance(members, dict):
            raise Refused("manifest", "the manifest lists no members")
        own = keys.ed25519_public_bytes(self._identity.public_key()).hex()
        if members.get(self.name) != {"role": "site", "public_key": own}:
            raise Refused("manifest", "the manifest does not list this site, as a site, with its own key")
        for name, member in members.items():
            known = self._directory.get(name)
            if known is None or not isinstance(member, dict) or member.get("public_key") != known.hex():
                raise Refused("manifest", f"the manifest's key for '{name}' is not the one this site knows")
        if members.get(COORDINATOR, {}).get("role") != "coordinator":
            raise Refused("manifest", f"the manifest does not name '{COORDINATOR}' as the coordinator")
        if self.guard.agreement is not None and manifest.get("agreement_sha256") != agreement_hash(self.guard.agreement):
            raise Refused("manifest", "the manifest names another agreement than the one this site signed")
        provenance = manifest.get("provenance")
        datasets = provenance.get("datasets") if isinstance(provenance, dict) else None
        if not isinstance(datasets, dict) or datasets.get(self.name) != self.fingerprint():
            raise Refused("manifest", "the manifest misstates this site's data")
        run_id = str(manifest.get("run_id") or "")
        if self._witness is not None and (not run_id or run_id != self._run_id):
            # A new run on the same kits: a new transcript, its own rounds from 1 (the ledger carries over).
            self._witness.last, self._round_seen = None, 0
        self._run_id = run_id
        return m.Endorsement(signature=keys.sign(self._identity, manifest_bytes(manifest)))

    def resume_from(self, head: TreeHead) -> None:
        """After a restart: the last head this site co-signed, recognised by its own co-signature."""
        if self._witness is None:
            raise ProtocolError("this site has no identity key or directory: it keeps no transcript memory")
        self._witness.resume_from(head)

    def cosign_head(self, head: TreeHead, proof: list[bytes]) -> bytes:
        """Co-sign a transcript head that the coordinator signed and that extends the last one this site signed."""
        if self._witness is None:
            raise ProtocolError("this site has no identity key or directory: it cannot co-sign the transcript")
        signature = self._witness.cosign(head, proof)
        if self._record is not None:
            self._record.note_head(self._run_id, head)
        if self._memory is not None:  # noted down before the co-signature leaves: a restart resumes from it
            memo = {
                "head": head.model_copy(update={"cosignatures": {}}).model_dump(mode="json"), "round": self._round_seen,
                "run_id": self._run_id,
            }
            write_atomic(self._memory, json.dumps(memo).encode())
        return signature

    def fingerprint(self) -> dict[str, object]:
        """What the transcript records of this site's data: its schema hash, row count and a salted content hash.

        The salt is the site's own secret: nobody else can test a guessed
        dataset against the hash, and the site can later show its data is unchanged.
        """
        digest = hashlib.sha256(self._fingerprint_salt)
        rows = 0
        for part in (self.__data.train, self.__data.validation, self.__data.test):
            digest.update(np.ascontiguousarray(part.X).tobytes())
            digest.update(np.ascontiguousarray(part.y).tobytes())
            rows += part.n_rows
        return {"schema_sha256": table_fingerprint(self.__data.train), "rows": rows, "content_sha256": digest.hexdigest()}

    def _dispatch(self, rnd: int, msg: m.BaseModel) -> m.BaseModel:
        if isinstance(msg, m.SetupRequest):
            return self._setup(rnd, msg)
        if isinstance(msg, m.FitRequest):
            return self._fit(rnd, msg)
        if isinstance(msg, m.EvaluateRequest):
            return self._evaluate(rnd, msg)
        if isinstance(msg, m.SecAggStart):
            return self._secagg_start(rnd, msg)
        if isinstance(msg, (m.SecAggRoster, m.SecAggDeliver, m.SecAggSurvivors, m.SecAggUnmask)):
            return self._secagg_step(msg)
        if isinstance(msg, m.DeployRequest):
            return self._deploy(rnd, msg)
        if isinstance(msg, m.MonitorRequest):
            return self._monitor(rnd)
        if isinstance(msg, m.DescribeRequest):
            return m.Description(fingerprint=m.DataFingerprint.model_validate(self.fingerprint()))
        if isinstance(msg, m.EndorseRequest):
            return self._endorse(msg.manifest)
        if isinstance(msg, m.CosignRequest):
            try:
                return m.Cosignature(signature=self.cosign_head(msg.head, list(msg.proof)))
            except (VerificationError, ProtocolError) as exc:  # the proof fails, or the head's signature does
                raise Refused("consistency_proof", f"this site will not co-sign tree head {msg.head.size}: {exc}") from None
        raise ProtocolError(f"a site does not answer '{msg.kind}' messages")

    def _rng(self, rnd: int, phase: str) -> np.random.Generator:
        return np.random.default_rng(np.random.SeedSequence([self._seed, rnd, ["setup", "fit", "evaluate"].index(phase)]))

    def _contribute(self, rnd: int, phase: str, vector: np.ndarray, secure: bool) -> Tensor | None:
        """Send the vector now (plain) or keep it for the secure-aggregation session."""
        if not secure:
            return Tensor.from_numpy(vector)
        self.__pending[(rnd, phase)] = vector.astype(np.float64)
        return None

    # -- phases ----------------------------------------------------------------

    def _setup(self, rnd: int, msg: m.SetupRequest) -> m.SetupReply:
        train = self.__data.train
        return m.SetupReply(
            schema_fingerprint=table_fingerprint(train),
            feature_names=train.feature_names,
            classes=train.classes,
            image_shape=train.image_shape,
            contribution=self._contribute(rnd, "setup", c.setup_vector(train.X), msg.secure_aggregation),
        )

    def _model_for(self, task: m.TaskSpec, params: Tensor) -> tuple[torch.nn.Module, ModelAdapter, np.ndarray]:
        if self._model is None or self._model[0] != task:
            module = self._build(task, 0)
            adapter = ModelAdapter(module)
            if adapter.layout_hash != task.layout_hash:
                raise ModelError(
                    f"the task's layout hash {task.layout_hash[:12]} does not match the model this site builds "
                    f"({adapter.layout_hash[:12]}): refusing an architecture the task does not describe"
                )
            self._model = (task, module, adapter)
        module, adapter = self._model[1], self._model[2]
        vector = params.to_numpy()
        adapter.set_vector(vector)
        return module, adapter, vector

    def _fit(self, rnd: int, msg: m.FitRequest) -> m.FitReply:
        sha, params = self._received_model(msg)
        if self._strict:
            self._check_plan(rnd, msg, sha)
        self.guard.check_plan(
            rnd,
            cohort=msg.plan.entry.body.get("cohort") if msg.plan is not None else None,
            layout_hash=msg.task.layout_hash,
            secure_aggregation=msg.secure_aggregation,
            privacy=msg.privacy,
            run=self._run_id,
        )
        module, adapter, global_params = self._model_for(msg.task, params)
        self._held = (sha, params)
        delta, loss = self._local_update(rnd, msg, module, adapter, global_params)
        rows = float(self.__train[0].shape[0]) if msg.weighting == "examples" else 1.0
        if isinstance(msg.privacy, SiteLevelEvent):
            return self._fit_site_level(rnd, msg, msg.privacy, bound_norm(delta, msg.norm_bound))
        weight = min(rows / msg.weight_scale, 1.0) if msg.secure_aggregation else rows
        # The round's norm bound (robust aggregation) is applied here, before quantisation and masking.
        if msg.secure_aggregation:
            vector = c.fit_vector(delta, weight, loss, msg.update_clip, msg.norm_bound)
        else:  # in the clear, float32 like the update itself: half the traffic of float64
            vector = c.fit_vector(delta, weight, loss, None, msg.norm_bound).astype(np.float32)
        return m.FitReply(contribution=self._contribute(rnd, "fit", vector, msg.secure_aggregation))

    def _local_update(
        self, rnd: int, msg: m.FitRequest, module: torch.nn.Module, adapter: ModelAdapter, global_params: np.ndarray
    ) -> tuple[np.ndarray, float]:
        """Train on this site's split from the global model: (the model delta, the training loss).

        The site's trainer does the training, except in a record-level round: that one is always DP-SGD.
        """
        X, y = self.__train
        seed = int(np.random.SeedSequence([self._seed, rnd]).generate_state(1)[0])
        delta, loss = trainer_for(msg.privacy, self._trainer).train(
            adapter, X, y, msg.train, privacy=msg.privacy, proximal_mu=msg.proximal_mu, seed=seed, noise=self._noise
        )
        delta = np.asarray(delta)
        if delta.shape != (adapter.size,):
            raise ModelError(
                f"the trainer returned a delta of shape {delta.shape}, and the model has {adapter.size} parameters: "
                "return model.get_vector() after training minus before"
            )
        return delta, float(loss)

    def _fit_site_level(self, rnd: int, msg: m.FitRequest, event: SiteLevelEvent, delta: np.ndarray) -> m.FitReply:
        """DP-FedAvg: the update clipped to L2 norm ``event.clip``; distributed noise joins it in the ring."""
        if event.ddg is not None:
            if not msg.secure_aggregation:
                raise ProtocolError("distributed noise needs secure aggregation, and this round has none")
            self.__paid[rnd] = event
        vector = c.site_dp_vector(delta, event.clip, event.adaptive)
        return m.FitReply(contribution=self._contribute(rnd, "fit", vector, msg.secure_aggregation))

    def _check_noise(self, rnd: int, msg: m.SecAggStart) -> None:
        """A round paid for with distributed noise runs only in a session that adds exactly that noise."""
        paid = self.__paid.pop(rnd, None) if msg.phase == "fit" else None
        if paid is None:
            if isinstance(msg.encoding, DiscreteGaussianEncoding):
                raise ProtocolError("a noisy encoding for a round this site did not pay for")
            return
        assert paid.ddg is not None
        expected = DiscreteGaussianEncoding(
            bits=msg.encoding.bits, clip=paid.clip, cohort=paid.cohort, colluders=paid.colluders, noise=paid.ddg
        )
        if msg.encoding != expected:
            raise ProtocolError("the session's encoding does not add the noise this round's privacy event declares")
        if msg.params.threshold < expected.min_sum:
            raise ProtocolError(
                f"the session's threshold {msg.params.threshold} would let a sum of fewer than the {expected.min_sum} "
                "noisy updates the noise is calibrated for be unmasked"
            )

    def _evaluate(self, rnd: int, msg: m.EvaluateRequest) -> m.EvaluateReply:
        module, _, _ = self._model_for(msg.task, msg.params)
        self._held = (_model_sha256(msg.params), msg.params)  # the next fit request may name it instead of resending it
        X, y = self.__valid if msg.purpose == "canary" else self.__test
        spec = msg.evaluation
        groups = None
        if spec.sensitive_feature is not None:
            if spec.sensitive_threshold is None or spec.sensitive_feature >= X.shape[1]:
                raise ProtocolError("the evaluation names a sensitive feature without a threshold, or one the data lacks")
            groups = Groups(spec.sensitive_feature, spec.sensitive_threshold, spec.positive_class)
        shifted = None
        if spec.shift_noise is not None:  # the site's own draw: deterministic per round, never sent
            noise = self._rng(rnd, "evaluate").standard_normal(X.shape) * spec.shift_noise * msg.task.scale.to_numpy()
            shifted = X + torch.from_numpy(noise.astype(np.float32))
        stats = evaluate(module, X, y, msg.task.n_classes, groups=groups, shifted=shifted)
        if self._journal is not None and stats.n and msg.purpose == "round":
            self._journal.append(rnd, stats)
        return m.EvaluateReply(
            contribution=self._contribute(rnd, "evaluate", c.eval_vector(stats), msg.secure_aggregation)
        )

    # -- the model lifecycle --------------------------------------------------------

    def observe(self, incoming: Table) -> None:
        """The records that arrived since training (the hospital's feed): what the drift check compares."""
        if incoming.feature_names != self.__data.train.feature_names:
            raise ConfigError(f"{self.name}'s incoming data has other features than its training data: same schema only")
        self.__incoming = incoming

    def _deploy(self, rnd: int, msg: m.DeployRequest) -> m.DeployReply:
        """Run ``msg.version`` from now on, unless this site's policy pins another; sign the receipt either way."""
        if self._lifecycle is None:
            raise ProtocolError("this site keeps no lifecycle state: it cannot run a model version")
        if _model_sha256(msg.params) != msg.model_sha256:
            raise Refused("model_hash", f"the model sent is not version {msg.version} ({msg.model_sha256[:12]}...) as requested")
        if self._strict:
            self._check_promoted(msg)
        self._model_for(msg.task, msg.params)  # the architecture must be the one the task describes
        pin = self._policy.pin_model if self._policy is not None else None
        refused = pin is not None and msg.version != pin
        if not refused:
            self._lifecycle.deploy(msg.version, msg.model_sha256)
        return m.DeployReply(receipt=self._signed("deployment", rnd, {
            "version": msg.version,
            "model_sha256": msg.model_sha256,
            "reason": msg.reason,
            "stage": msg.stage,
            "accepted": not refused,
            "rule": "pinned_model" if refused else "",
            "detail": f"this site's policy pins model {pin}: it runs no other version" if refused else "",
            "running": self._lifecycle.version,
        }))

    def _check_promoted(self, msg: m.DeployRequest) -> None:
        """A site runs only a version the transcript registered with this very model and put in production."""
        registered = self._proven(msg.registered, "model_version", f"version {msg.version}'s registration", "deploy_proof")
        if registered.body.get("version") != msg.version or registered.body.get("model_sha256") != msg.model_sha256:
            raise Refused("deploy_proof", f"the transcript registered another model as {registered.body.get('version')}, not this one")
        promoted = self._proven(msg.promoted, "model_state", f"version {msg.version}'s promotion", "deploy_proof")
        body = promoted.body
        if body.get("version") != msg.version or body.get("to") != "production" or promoted.index < registered.index:
            raise Refused("deploy_proof", f"the transcript does not put version {msg.version} in production: refusing to run it")

    def _monitor(self, rnd: int) -> m.MonitorReply:
        """Check the incoming records against the training records; disclose a breach only where the agreement
        lets this artefact out, and say when a breach it disclosed has ended."""
        if self._lifecycle is None or self.__incoming is None or self._agreement is None or self._agreement.lifecycle is None:
            return m.MonitorReply()
        train, incoming, terms = self.__data.train, self.__incoming, self._agreement.lifecycle.drift
        if incoming.n_rows < terms.min_rows:  # too few to tell drift from noise: nothing is judged, nothing said
            return m.MonitorReply()
        report = check_drift(
            train.X, train.y, incoming.X, incoming.y, feature_names=train.feature_names,
            n_classes=len(train.classes), psi_threshold=terms.psi, label_threshold=terms.label_shift,
        )
        self._lifecycle.note_drift(report)
        if not self._agreement.visible_to("drift_incident", "coordinator"):
            return m.MonitorReply()  # kept here: the agreement does not let this report leave the site
        if report.breached and not self._lifecycle.incident_open:
            self._lifecycle.set_incident(True)
            return m.MonitorReply(entry_kind="drift_incident", report=self._signed("drift_incident", rnd, {
                "site": self.name,
                "features": report.drifting_features,
                "psi": {f: round(report.psi[f], 6) for f in report.drifting_features},
                "label_shift": round(report.label_shift, 6),
                "thresholds": {"psi": terms.psi, "label_shift": terms.label_shift},
                "rows": incoming.n_rows,
            }))
        if not report.breached and self._lifecycle.incident_open:
            self._lifecycle.set_incident(False)
            return m.MonitorReply(entry_kind="drift_resolved", report=self._signed("drift_resolved", rnd, {
                "site": self.name, "rows": incoming.n_rows,
            }))
        return m.MonitorReply()

    # -- secure aggregation ---------------------------------------------------------

    def _secagg_start(self, rnd: int, msg: m.SecAggStart) -> m.SecAggAdvert:
        if self._identity is None or COORDINATOR not in self._directory:
            raise ProtocolError("this site has no identity key or directory: it cannot join secure aggregation")
        sid = msg.params.session_id
        if sid in self._used_sessions:
            raise ProtocolError(f"session {sid[:12]} was already used: a session id is never reused")
        vector = self.__pending.pop((rnd, msg.phase), None)
        if vector is None:
            raise ProtocolError(f"nothing is pending for round {rnd} phase {msg.phase}: refusing to start a session")
        if vector.shape != (msg.params.length,):
            raise ProtocolError(f"the session expects {msg.params.length} values, this site has {vector.shape[0]}")
        self._check_noise(rnd, msg)
        n = len(msg.params.participants)
        if isinstance(msg.encoding, DiscreteGaussianEncoding):
            encoded = msg.encoding.encode(vector, n, self._rng(rnd, msg.phase), self._int_noise)
        else:
            encoded = msg.encoding.encode(vector, n, self._rng(rnd, msg.phase))
        client = SecAggClient(self.name, self._identity, msg.params, self._directory, self._directory[COORDINATOR])
        self._used_sessions.add(sid)
        self.__sessions[sid] = (client, encoded)
        return m.SecAggAdvert(advert=client.advertise_keys())

    def _secagg_step(self, msg: m.BaseModel) -> m.BaseModel:
        session = self.__sessions.get(msg.session_id)  # type: ignore[attr-defined]
        if session is None:
            raise ProtocolError("no open secure-aggregation session with that id")
        client, encoded = session
        if isinstance(msg, m.SecAggRoster):
            return m.SecAggShares(bundle=client.share_keys(msg.roster))
        if isinstance(msg, m.SecAggDeliver):
            return m.SecAggMasked(masked=client.collect_masked(msg.delivery, encoded))
        if isinstance(msg, m.SecAggSurvivors):
            self.guard.check_survivors(len(msg.survivors.survivors))
            return m.SecAggAck(ack=client.consistency_check(msg.survivors))
        assert isinstance(msg, m.SecAggUnmask)
        del self.__sessions[msg.session_id]  # one unmask per session, then the secrets are gone
        return m.SecAggReveal(reply=client.unmask(msg.request))
