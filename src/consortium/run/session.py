"""A session: one transport, one transcript, and the coordinator that drives the sites through them.

Every driver (a run, simulated or served; the lifecycle manager) opens one
session and goes through it for everything that reaches the sites or the
transcript. The coordinator state machine hands its log over here, and
nowhere else (``Session._take``):

- ``run_rounds``: the training rounds, recorded so that no crash splits the
  transcript from the coordinator's state (``consortium.run.recovery``):
  a round's plan is logged and co-signed before any site sees it; what each
  site signed that it paid is on record as soon as the request stage closes;
  the round's outcome is committed with the coordinator's state (when the
  run keeps one), then appended and co-signed under a head of its own;
- ``evaluate``: one evaluation pass of a coordinator opened for it (the
  lifecycle's canary and monitoring), its entries handed over for the caller
  to seal with what it records next;
- ``halt``: the run stops on an incident: what happened so far, the evidence,
  the model it stopped at, then the halt under a head of its own.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from consortium import crashpoints
from consortium.governance.incident import Incident
from consortium.protocol.coordinator import Coordinator, RoundRecord
from consortium.protocol.messages import PlanProof
from consortium.run.loop import RoundLoop
from consortium.run.recorder import TranscriptRecorder, over_transport
from consortium.run.recovery import COVERS, WAL, StateStore
from consortium.runs import RunFolder
from consortium.transcript.log import TreeHead, vector_sha256
from consortium.transport import Transport


def finite_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    """Metrics as JSON can hold them: NaN and infinities become None."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}


class Session:
    """The coordinator's side of talking to the sites: ``transport`` reaches them, the transcript in
    ``folder`` records it (each head co-signed by the sites through the same transport).

    Args:
        transport: how requests reach the sites (sealed, checked and counted by it).
        folder: the run folder whose transcript this session extends.
        coordinator_key: the coordinator's signing key, for its entries and heads.
        sites: the sites asked to co-sign each head.
        round_of: the round a co-signing request belongs to (default: the coordinator's).
        quorum: how many sites must co-sign each head (None: every site asked).
        coordinator: the state machine the session drives (a lifecycle session gets one per ``evaluate``).
        run: the run folder's writer, where ``run_rounds`` appends each round's metrics and ``halt``
            the checkpoint a quorum's resume continues from.
        state: the coordinator's durable state, committed with each round's entries (None: a run
            that does not survive its coordinator's crash, such as a simulation).
        setup_saved: setup's entries are already committed (a resumed run).
    """

    def __init__(
        self, transport: Transport, folder: Path, *, coordinator_key: Ed25519PrivateKey, sites: list[str],
        round_of: Callable[[], int] | None = None, quorum: int | None = None, coordinator: Coordinator | None = None,
        run: RunFolder | None = None, state: StateStore | None = None, setup_saved: bool = False,
    ) -> None:
        self.transport = transport
        self._coordinator = coordinator
        self.run, self.state = run, state
        self._setup_saved = setup_saved
        self._on_round: Callable[[RoundRecord], None] | None = None
        round_of = round_of or (lambda: self.coordinator.round)
        self.recorder = TranscriptRecorder(
            folder, coordinator_key=coordinator_key, cosign=over_transport(transport, sites, round_of), quorum=quorum,
        )
        self.loop = RoundLoop(before_stage=self._before_stage, after_stage=self._after_stage)

    @property
    def coordinator(self) -> Coordinator:
        """The coordinator this session drives."""
        if self._coordinator is None:
            raise RuntimeError("this session drives no coordinator yet")
        return self._coordinator

    # -- the one place the coordinator's log is taken ----------------------------------------

    def _take(self, *, through: int | None = None, only: str | None = None) -> None:
        """Hand the coordinator's log over to the transcript (all of it, or what ``through``/``only`` select)."""
        self.recorder.record(self.coordinator.drain_log(through=through, only=only))

    def commit(self, rnd: int, record: RoundRecord | None) -> None:
        """Round ``rnd``'s entries (0: setup's) and the coordinator's state after it, as one step: signed
        but unwritten, the entries are committed with the state first (the write-ahead record), then appended."""
        coordinator, recorder = self.coordinator, self.recorder
        pending = recorder.prepare(coordinator.drain_log(through=rnd))  # the next round's plan is logged as it goes out
        if self.state is not None:
            meta, arrays = coordinator.checkpoint()
            # The coordinator may have planned the next round already; the checkpoint is of round ``rnd``.
            meta = {**meta, "round": rnd, WAL: [e.model_dump(mode="json") for e in pending],
                    COVERS: recorder.writer.size + len(pending)}
            self.state.save_round(None if record is None else finite_metrics(record.to_json()), meta, arrays)
            crashpoints.reached("setup_committed" if record is None else "round_committed")
        recorder.commit(pending, crash_point="round_appending")

    # -- training rounds ----------------------------------------------------------------------

    def run_rounds(self, on_round: Callable[[RoundRecord], None] | None = None) -> list[RoundRecord]:
        """Drive the coordinator's rounds to the end. Returns its history.

        Raises:
            RunHalted: a site refused to co-sign, too few co-signed, or an incident stopped the run
                (``halt`` then records it).
        """
        self._on_round = on_round
        self.coordinator.evidence_spool = self.recorder.spool  # masked inputs to disk as they arrive: it holds their sum
        return self.loop.run(self.coordinator, self.transport, on_round=self.record_round)

    def record_round(self, record: RoundRecord) -> None:
        """A round has ended: its evidence, its entries with the state, its metrics, a co-signed head."""
        self.recorder.archive(self.coordinator.drain_archives())  # the evidence the round's entries refer to
        crashpoints.reached("round_archived")
        self.commit(record.round, record)
        crashpoints.reached("round_appended")
        if self.run is not None:
            self.run.append_metrics(finite_metrics(record.to_json()))
        self.recorder.close_round()
        crashpoints.reached("round_cosigned")
        if self._on_round is not None:
            self._on_round(record)

    def _before_stage(self, coordinator: Coordinator) -> None:
        if coordinator.stage != "fit:request":
            return
        if not self._setup_saved:  # setup is over: what a restart needs first
            self._setup_saved = True
            self.commit(0, None)
        if coordinator.plan_proven:
            return
        # The round's plan, logged and co-signed; its proof goes out with the requests.
        self._take()
        crashpoints.reached("plan_appended")
        head = self.recorder.close_round()
        crashpoints.reached("plan_cosigned")
        writer = self.recorder.writer
        plan = next(e for e in reversed(writer.entries) if e.kind == "round_plan")
        proof = PlanProof(entry=plan, head=head.bare(), path=writer.inclusion(plan.index, head.size))
        coordinator.attach_plan_proof(proof, cosigners=head.cosignatures)  # a site away for this head sits the round out

    def _after_stage(self, coordinator: Coordinator, closed: str) -> None:
        if closed == "fit:request":  # what each site signed that it paid, on record before the round goes on
            self._take(only="site_decision")
            crashpoints.reached("decisions_appended")

    # -- evaluation, halt ---------------------------------------------------------------------

    def evaluate(self, coordinator: Coordinator) -> RoundRecord:
        """Drive ``coordinator``, opened for one evaluation, to its end; its entries go in the transcript
        (unsealed: the caller's next head covers them). Returns the evaluation's record."""
        self._coordinator = coordinator
        RoundLoop().run(coordinator, self.transport)
        self._take()
        return coordinator.history[-1]

    def halt(self, incident: Incident) -> TreeHead:
        """Stop the run on ``incident``: the entries and evidence so far, the checkpoint a quorum's resume
        continues from, then the halt with the model it stopped at, under a head of its own."""
        coordinator = self.coordinator
        history = coordinator.history
        if self.run is not None and history and history[-1].status == "halted":
            self.run.append_metrics(finite_metrics(history[-1].to_json()))
        self._take()
        self.recorder.archive(coordinator.drain_archives())
        if self.run is not None and coordinator.task is not None:
            self.run.write_checkpoint(*coordinator.checkpoint())
        params = coordinator.params
        return self.recorder.halt(incident, vector_sha256(params) if params is not None else None)
