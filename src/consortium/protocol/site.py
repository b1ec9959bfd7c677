"""The site runtime: an I/O-free state machine that answers the coordinator.

A site holds its own train / validation / test splits and never hands any
of them out. What leaves is one summable vector per phase (feature sums at
setup, the weighted update when training, evaluation counts), in the clear
only when secure aggregation is off; under secure aggregation the vector
stays here until it leaves masked, and the coordinator only learns sums.
The splits live in a name-mangled attribute and nothing returns them.

``Site`` is a dispatcher over its parts, one module each, by message type::

    Site (this module): transport entry, envelope checks, roles, the dispatch table
     +-- Witness          site_witness   endorse, co-sign, memory, signed record, proofs
     +-- Training         site_training  setup, fit (via the LocalTrainer), evaluate, site-level DP
     +-- SecAggSessions   site_sessions  pending vectors, secure-aggregation sessions, paid noise
     +-- LifecycleAgent   site_agent     deploy, monitor (drift)
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from consortium.crypto import keys
from consortium.data import Splits, Table
from consortium.errors import ModelError, ProtocolError, VerificationError
from consortium.governance.agreement import Agreement
from consortium.governance.approval import require_task_approval
from consortium.governance.guard import Clock, Refused, SiteGuard, utc_now
from consortium.governance.policy import SitePolicy
from consortium.governance.roles import PermissionDenied, Roles
from consortium.learning.adapter import ModelAdapter
from consortium.learning.task import Task, load_task, task_identity
from consortium.learning.training import TrainingData
from consortium.privacy.dpsgd import secure_generator, secure_numpy_generator
from consortium.privacy.ledger import BudgetLedger, Discrepancy
from consortium.protocol import messages as m
from consortium.protocol.sealed import EnvelopeGuard, seal
from consortium.protocol.site_agent import LifecycleAgent, SiteLifecycle
from consortium.protocol.site_sessions import SecAggSessions
from consortium.protocol.site_training import EvaluationJournal, Training, model_sha256, table_fingerprint
from consortium.protocol.site_witness import Witness
from consortium.protocol.task import data_shape
from consortium.protocol.trainer import LocalTrainer, PlainTrainer, trainer_for
from consortium.transcript.log import TreeHead
from consortium.transcript.site_record import payments
from consortium.wire import Tensor

__all__ = ["COORDINATOR", "EvaluationJournal", "Site", "SiteLifecycle", "table_fingerprint"]

COORDINATOR = m.COORDINATOR
_model_sha256 = model_sha256  # the name this module had for it

#: A message kind's handler: (round, message) -> the reply's message.
Handler = Callable[[int, m.BaseModel], m.BaseModel]


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
    ``task`` is the study's task, from this site's own copy of its code (default: the built-in
    classifier); the site refuses a request for any other task.
    ``trainer`` does the local training of a fit request (default: the task's ``train``); a
    record-level round always trains with DP-SGD on the task's loss instead (see
    ``consortium.protocol.trainer``).
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
        task: Task | None = None,
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
        state = SiteLifecycle(lifecycle) if lifecycle is not None else None
        self._seed = seed
        self._journal = None if journal is None else EvaluationJournal(journal)
        self._identity = identity
        self._directory = dict(directory or {})
        self.task = task if task is not None else load_task("classification")
        #: The identity of the code loaded above, hashed once: what this site endorses in a manifest and
        #: checks each request against (the bytes on disk may change later; the code running does not).
        self.task_identity = task_identity(self.task)
        if agreement is not None:  # default-deny: a study's code runs only if the agreement and this site approved it
            require_task_approval(self.task_identity, self.task, name, agreement, policy)
        self._trainer: LocalTrainer = PlainTrainer(self.task) if trainer is None else trainer
        # With a ledger the site trains only under DP, within its own cap.
        self.ledger = ledger
        self.guard = SiteGuard(name, agreement=agreement, policy=policy, ledger=ledger, clock=clock)
        self._roles = Roles.of_agreement(agreement) if agreement is not None else None
        self._noise = secure_generator(noise_test_seed)
        self._witness = Witness(
            name, identity=identity, directory=self._directory, guard=self.guard, fingerprint=lambda: self.fingerprint(),
            memory=memory, record=record, task=self.task_identity,
        )
        if strict and self._witness.head is None:
            raise ProtocolError("strict checks need this site's identity key and the directory of members' keys")
        self._guard = EnvelopeGuard(name, self._directory) if strict else None
        # The parts call the site's hooks late-bound: a subclass (or a test swapping the class) overrides them.
        self._sessions = SecAggSessions(
            name, identity=identity, directory=self._directory, guard=self.guard, rng=lambda *a: self._rng(*a),
            int_noise=secure_numpy_generator(noise_test_seed),
        )
        self._training = Training(
            data, task=self.task, task_sha256=self.task_identity["sha256"], guard=self.guard, witness=self._witness, sessions=self._sessions,
            journal=self._journal, strict=strict, local_update=lambda *a: self._local_update(*a),
            contribute=lambda *a: self._contribute(*a), rng=lambda *a: self._rng(*a),
        )
        self._agent = LifecycleAgent(
            name, data.train, lifecycle=state, agreement=agreement, policy=policy, strict=strict,
            witness=self._witness, model_for=self._training.model_for,
        )
        self._fingerprint_salt = os.urandom(16)
        self._handlers: dict[type[m.BaseModel], Handler] = {
            m.SetupRequest: self._training.setup,
            m.FitRequest: self._training.fit,
            m.EvaluateRequest: self._training.evaluate,
            m.SecAggStart: self._sessions.start,
            m.SecAggRoster: self._sessions.roster,
            m.SecAggDeliver: self._sessions.deliver,
            m.SecAggSurvivors: self._sessions.survivors,
            m.SecAggUnmask: self._sessions.unmask,
            m.DeployRequest: self._agent.deploy,
            m.MonitorRequest: self._agent.monitor,
            m.DescribeRequest: self._describe,
            m.EndorseRequest: self._witness.endorse,
            m.CosignRequest: self._cosign,
        }  # type: ignore[dict-item]
        self.restored: list[Discrepancy] = []  # ledger rows put back from the signed record at start
        self._witness.recall()
        if self._witness.record is not None and ledger is not None and identity is not None:
            # Before anything is spent: every round this site signed as paid is in its ledger, as signed.
            own = keys.ed25519_public_bytes(identity.public_key())
            self.restored = ledger.reconcile(payments(self._witness.record.decisions(name, own)), restore=True)

    @property
    def _model(self) -> tuple[m.TaskSpec, torch.nn.Module, ModelAdapter] | None:
        """The task this site last built a model for, the module and its adapter (None before any)."""
        return self._training.model

    @property
    def _held(self) -> tuple[str, Tensor] | None:
        """The last model this site received, by its hash (a fit request may name it instead of sending it)."""
        return self._training.held

    @_held.setter
    def _held(self, value: tuple[str, Tensor] | None) -> None:
        self._training.held = value  # None: forgotten, as after a restart

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
        witness = self._witness
        if 0 < request.round < witness.round_seen:  # round 0 is a run's setup: a new run starts there (see endorse)
            raise ProtocolError(f"a request for round {request.round} after round {witness.round_seen}: refused as a replay")
        witness.round_seen = max(witness.round_seen, request.round)
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
            reply = self._witness.sign_decision(request.round, msg, reply)
        return m.make_envelope(self.name, request.sender, request.round, reply)

    def _dispatch(self, rnd: int, msg: m.BaseModel) -> m.BaseModel:
        """The message's part answers it: looked up by the message's class, never by trying each in turn."""
        handler = self._handlers.get(type(msg))
        if handler is None:
            raise ProtocolError(f"a site does not answer '{msg.kind}' messages")  # type: ignore[attr-defined]
        return handler(rnd, msg)

    # -- hooks a subclass may override (the red team's poisoned sites do) ------------

    def _local_update(
        self, rnd: int, msg: m.FitRequest, module: torch.nn.Module, adapter: ModelAdapter, global_params: np.ndarray
    ) -> tuple[np.ndarray, float]:
        """Train on this site's split from the global model: (the model delta, the training loss).

        The site's trainer does the training, except in a record-level round: that one is always DP-SGD.
        """
        shape = data_shape(msg.task)
        data = TrainingData(self.__data.train, targets=lambda y: self.task.training_targets(y, shape))
        seed = int(np.random.SeedSequence([self._seed, rnd]).generate_state(1)[0])
        delta, loss = trainer_for(msg.privacy, self._trainer, self.task).train(
            adapter, data, msg.train, privacy=msg.privacy, proximal_mu=msg.proximal_mu, seed=seed, noise=self._noise
        )
        delta = np.asarray(delta)
        if delta.shape != (adapter.size,):
            raise ModelError(
                f"the trainer returned a delta of shape {delta.shape}, and the model has {adapter.size} parameters: "
                "return model.get_vector() after training minus before"
            )
        return delta, float(loss)

    def _contribute(self, rnd: int, phase: str, vector: np.ndarray, secure: bool) -> Tensor | None:
        """Send the vector now (plain) or keep it for the secure-aggregation session."""
        if not secure:
            return Tensor.from_numpy(vector)
        self._sessions.keep(rnd, phase, vector.astype(np.float64))
        return None

    def _rng(self, rnd: int, phase: str) -> np.random.Generator:
        return np.random.default_rng(np.random.SeedSequence([self._seed, rnd, ["setup", "fit", "evaluate"].index(phase)]))

    # -- what the site says of itself, and the transcript --------------------------

    def fingerprint(self) -> dict[str, object]:
        """What the transcript records of this site's data: its schema hash, row count and a salted content hash.

        The salt is the site's own secret: nobody else can test a guessed
        dataset against the hash, and the site can later show its data is unchanged.
        """
        digest = hashlib.sha256(self._fingerprint_salt)
        rows = 0
        for part in (self.__data.train, self.__data.validation, self.__data.test):
            for batch in part.batches():  # the features' bytes in row order, then the labels'
                digest.update(np.ascontiguousarray(batch.X).tobytes())
            digest.update(np.ascontiguousarray(part.labels).tobytes())
            rows += part.n_rows
        return {"schema_sha256": table_fingerprint(self.__data.train), "rows": rows, "content_sha256": digest.hexdigest()}

    def _describe(self, rnd: int, msg: m.DescribeRequest) -> m.Description:
        return m.Description(fingerprint=m.DataFingerprint.model_validate(self.fingerprint()))

    def resume_from(self, head: TreeHead) -> None:
        """After a restart: the last head this site co-signed, recognised by its own co-signature."""
        self._witness.resume_from(head)

    def cosign_head(self, head: TreeHead, proof: list[bytes]) -> bytes:
        """Co-sign a transcript head that the coordinator signed and that extends the last one this site signed."""
        return self._witness.cosign_head(head, proof)

    def _cosign(self, rnd: int, msg: m.CosignRequest) -> m.Cosignature:
        try:
            return m.Cosignature(signature=self.cosign_head(msg.head, list(msg.proof)))
        except (VerificationError, ProtocolError) as exc:  # the proof fails, or the head's signature does
            raise Refused("consistency_proof", f"this site will not co-sign tree head {msg.head.size}: {exc}") from None

    # -- the model lifecycle --------------------------------------------------------

    def observe(self, incoming: Table) -> None:
        """The records that arrived since training (the hospital's feed): what the drift check compares."""
        self._agent.observe(incoming)
