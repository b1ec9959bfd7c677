"""Acting on a run folder as a member: ``consortium halt``, ``consortium resume`` and ``consortium show``.

Both act on a run folder held to an agreement, with the members' key files
(the simulation's ``agreement.keys`` folder). A halt is an entry signed by
the member who halts, which its role must allow; a resume is an entry that
carries the signatures of at least the agreement's ``resume_quorum`` of
approvers over the very halt entry it ends. Each is sealed under a new tree
head that the coordinator signs and every site co-signs after checking that
it extends the last head it signed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from consortium.crypto import keys
from consortium.errors import ConfigError, VerificationError
from consortium.governance.agreement import Agreement, load_member_key
from consortium.governance.incident import Incident
from consortium.governance.roles import Roles
from consortium.protocol.messages import COORDINATOR
from consortium.transcript.log import TRANSCRIPT_FILE, Entry, HeadWitness, last_cosigned, parse_entry, signed_entry_bytes
from consortium.run.recorder import TranscriptRecorder, direct
from consortium.transcript.records import LogRecord
from consortium.audit.verify import Verified, resume_statement, run_agreement, verify_run


@dataclass(frozen=True)
class RunControl:
    """A run folder reopened with the keys to extend its transcript."""

    run_dir: Path
    agreement: Agreement
    recorder: TranscriptRecorder
    keys_dir: Path

    @property
    def entries(self) -> list[Entry]:
        return self.recorder.writer.entries


def open_run(run_dir: Path, keys_dir: Path) -> RunControl:
    """Reopen a run's transcript; every site's witness resumes from the last head it co-signed."""
    run_dir, keys_dir = Path(run_dir), Path(keys_dir)
    manifest = _manifest(run_dir)
    agreement = _agreement(run_dir, manifest)
    if agreement is None:
        raise ConfigError("this run was held to no agreement, which alone names who may halt it and the quorum to resume it")
    sites = [name for name, m in manifest["members"].items() if m["role"] == "site"]  # type: ignore[union-attr]
    coordinator_key = load_member_key(agreement, keys_dir, COORDINATOR)
    coordinator_public = keys.ed25519_public_bytes(coordinator_key.public_key())
    witnesses = {name: HeadWitness(name, load_member_key(agreement, keys_dir, name), coordinator_public) for name in sites}
    recorder = TranscriptRecorder(run_dir, coordinator_key=coordinator_key, cosign=direct({n: w.cosign for n, w in witnesses.items()}))
    for name, witness in witnesses.items():
        head = last_cosigned(recorder.writer.heads, name)
        if head is not None:
            witness.resume_from(head)
    return RunControl(run_dir, agreement, recorder, keys_dir)


def _manifest(run_dir: Path) -> dict[str, object]:
    path = run_dir / TRANSCRIPT_FILE
    if not path.exists():
        raise ConfigError(f"'{run_dir}' holds no transcript: pass the folder a run printed")
    with path.open("rb") as f:
        return parse_entry(f.readline(), 0).body


def _agreement(run_dir: Path, manifest: dict[str, object]) -> Agreement | None:
    try:
        return run_agreement(run_dir, manifest)
    except VerificationError as exc:
        raise ConfigError(f"cannot trust the run's agreement: {exc}") from None


def member_view(run_dir: Path, member: str) -> dict[str, object]:
    """The run's summary as ``member``'s role may see it (the agreement's exposure matrix decides)."""
    run_dir = Path(run_dir)
    manifest = _manifest(run_dir)
    agreement = _agreement(run_dir, manifest)
    roles = Roles.of_agreement(agreement) if agreement is not None else Roles.of_manifest(manifest)
    summary_path = run_dir / "summary.json"
    if not summary_path.exists():
        raise ConfigError(f"'{run_dir}' has no summary.json: the run did not finish writing it")
    return roles.view(member, json.loads(summary_path.read_text()))


def open_halt(entries: list[Entry]) -> Entry | None:
    """The halt entry no resume has ended yet, if any."""
    halted: Entry | None = None
    for e in entries:
        if e.kind == "halt" and halted is None:
            halted = e
        elif e.kind == "resume":
            halted = None
    return halted


def halt_run(run_dir: Path, keys_dir: Path, member: str, reason: str) -> Entry:
    """``member`` halts the run: a halt entry it signs, under a new co-signed head."""
    if not reason.strip():
        raise ConfigError("a halt needs a reason (--reason): it goes in the transcript for every member to read")
    ctl = open_run(run_dir, keys_dir)
    Roles.of_agreement(ctl.agreement).authorize(member, "halt")
    halted = open_halt(ctl.entries)
    if halted is not None:
        raise ConfigError(f"the run is already halted (entry {halted.index}): resume it first")
    key = load_member_key(ctl.agreement, ctl.keys_dir, member)
    rnd = ctl.entries[-1].round
    models = [e.body["model_sha256"] for e in ctl.entries if e.kind == "aggregate"]
    body = {**Incident("manual", reason.strip(), rnd, raised_by=member).to_json(), "model_sha256": models[-1] if models else None}
    signature = keys.sign(key, signed_entry_bytes("halt", rnd, member, body))
    ctl.recorder.record([LogRecord("halt", rnd, member, body, signature)])
    entry = ctl.entries[-1]
    ctl.recorder.close_round(halting=True)
    return entry


def approve_resume(halt: Entry, key: Ed25519PrivateKey) -> str:
    """An approver's signature (hex) over the halt entry a resume would end."""
    return keys.sign(key, resume_statement(halt)).hex()


def resume_run(run_dir: Path, keys_dir: Path, approvers: list[str]) -> tuple[Entry, Verified]:
    """End the open halt with the signatures of ``approvers``, who must reach the agreement's quorum."""
    report = verify_run(Path(run_dir))  # a disputed transcript is not resumed: it is investigated
    ctl = open_run(run_dir, keys_dir)
    halt = open_halt(ctl.entries)
    if halt is None:
        raise ConfigError("the run is not halted: there is nothing to resume")
    named = set(ctl.agreement.approvers())
    unknown = [a for a in approvers if a not in named]
    if unknown:
        raise ConfigError(f"'{unknown[0]}' is not an approver of the agreement, whose approvers are {', '.join(sorted(named))}")
    given = sorted(set(approvers))
    quorum = ctl.agreement.resume_quorum
    if len(given) < quorum:
        raise ConfigError(
            f"resuming needs the signatures of {quorum} approvers (the agreement's resume_quorum); "
            f"{len(given)} given ({', '.join(given) or 'none'}): ask {quorum - len(given)} more approver(s) to sign"
        )
    approvals = {name: approve_resume(halt, load_member_key(ctl.agreement, ctl.keys_dir, name)) for name in given}
    ctl.recorder.record([LogRecord("resume", halt.round, COORDINATOR, {"halt_entry": halt.index, "approvals": approvals})])
    entry = ctl.entries[-1]
    ctl.recorder.close_round()
    return entry, report
