"""The driver's side of the transcript: the manifest, each round's entries, signed and co-signed heads.

A session (``consortium.run.session``) hands it what the coordinator logged; the
recorder signs the coordinator's entries, appends the sites' own signed
decisions as they are, and after each round has the coordinator sign a tree
head that every site co-signs only once a consistency proof shows it extends
the last head that site signed.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from safetensors.numpy import save as safetensors_save

from consortium import crashpoints
from consortium.crypto import keys
from consortium.errors import ConfigError, ConsortiumError
from consortium.governance.incident import Incident, RunHalted
from consortium.protocol.messages import COORDINATOR, CosignRequest, Cosignature
from consortium.runs import SPOOL_SUFFIX, MaskedSpool, write_atomic
from consortium.transcript.log import Entry, TranscriptWriter, TreeHead, canonical, last_cosigned, manifest_bytes, sha256_hex
from consortium.transcript.records import LogRecord, SessionArchive
from consortium.audit.verify import EVIDENCE_DIR
from consortium.transport import NoAnswer, Transport, ask_each

LIBRARIES = ("numpy", "torch", "cryptography", "dp-accounting", "pydantic", "rfc8785")
Cosigner = Callable[[TreeHead, list[bytes]], bytes]
#: The consistency proof a site needs to co-sign a head: from the last head it co-signed.
ProofFor = Callable[[str], list[bytes]]
#: Asks every site at once to co-sign a head, each with its own proof: each site's signature, or the error
#: that stands for its refusal (``VerificationError``) or its silence (``NoAnswer``).
CosignAll = Callable[[TreeHead, ProofFor], dict[str, "bytes | ConsortiumError"]]


def direct(cosigners: Mapping[str, Cosigner]) -> CosignAll:
    """Co-signing by calling each site's witness directly (tools that hold every member's key)."""

    def cosign_all(head: TreeHead, proof_for: ProofFor) -> dict[str, bytes | ConsortiumError]:
        out: dict[str, bytes | ConsortiumError] = {}
        for name, cosign in cosigners.items():
            try:
                out[name] = cosign(head, proof_for(name))
            except ConsortiumError as exc:
                out[name] = exc
        return out

    return cosign_all


def code_sha256() -> str:
    """SHA-256 over this package's source files (path and bytes, in path order)."""
    root = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode() + b"\0")
        digest.update(path.read_bytes())
    return digest.hexdigest()


def library_versions() -> dict[str, str]:
    return {name: metadata.version(name) for name in LIBRARIES}


def over_transport(transport: Transport, sites: list[str], round_of: Callable[[], int]) -> CosignAll:
    """Co-signing as a protocol request (``CosignRequest``), sealed and sent like any other, to every site at once."""

    def cosign_all(head: TreeHead, proof_for: ProofFor) -> dict[str, bytes | ConsortiumError]:
        requests = {name: CosignRequest(head=head, proof=proof_for(name)) for name in sites}
        answers = ask_each(transport, round_of(), requests, Cosignature)
        return {name: a.signature if isinstance(a, Cosignature) else a for name, a in answers.items()}

    return cosign_all


class TranscriptRecorder:
    """Writes one run's transcript into ``folder``."""

    def __init__(self, folder: Path, *, coordinator_key: Ed25519PrivateKey, cosign: CosignAll, quorum: int | None = None) -> None:
        """``quorum``: how many sites must co-sign each head (None: every site asked)."""
        self.writer = TranscriptWriter(folder)
        self.evidence_dir = folder / EVIDENCE_DIR
        self._key = coordinator_key
        self._cosign = cosign
        self.quorum = quorum

    def start(self, body: dict[str, Any], endorsements: Mapping[str, bytes]) -> None:
        """Entry 0: the manifest, with the coordinator's endorsement and the members' (over ``manifest_bytes``)."""
        own = keys.sign(self._key, manifest_bytes(body))
        body = {**body, "endorsements": {COORDINATOR: own.hex(), **{name: s.hex() for name, s in endorsements.items()}}}
        self.writer.append("manifest", 0, COORDINATOR, body, key=self._key)
        self.close_round()

    def record(self, records: list[LogRecord]) -> None:
        self.commit(self.prepare(records))

    def prepare(self, records: list[LogRecord]) -> list[Entry]:
        """``records`` as the transcript's next entries, signed but not written: the write-ahead record
        that the driver commits with its own state before ``commit`` appends them."""
        return [
            self.writer.make_entry(
                r.kind, r.round, r.author, r.body, index=self.writer.size + i,
                key=self._key if r.signature is None else None, signature=r.signature,
            )
            for i, r in enumerate(records)
        ]

    def commit(self, entries: list[Entry], *, crash_point: str | None = None) -> None:
        """Append prepared entries. After a crash the same record is committed again: an entry the
        transcript already holds must be that very entry, and only the missing ones are appended.
        ``crash_point``: the name of the point after the first of several entries (``consortium.crashpoints``)."""
        for i, entry in enumerate(entries):
            if entry.index < self.writer.size:
                if self.writer.entries[entry.index] != entry:
                    raise ConfigError(
                        f"transcript entry {entry.index} is not the one the coordinator's state committed: the run folder "
                        "was changed after the coordinator stopped, and it cannot be recovered"
                    )
                continue
            self.writer.append_entry(entry)
            if i == 0 and len(entries) > 1 and crash_point is not None:
                crashpoints.reached(crash_point)

    def close_round(self, *, halting: bool = False) -> TreeHead:
        """Sign a head over everything so far; the sites co-sign it after checking consistency.

        Each site gets the consistency proof from the last head it co-signed
        (a site that was away catches up in one proof). A site that will not
        co-sign (the proof fails: history was rewritten) halts the run; so do
        fewer co-signatures than the quorum. A site that does not answer
        (crashed, unreachable) is only absent from this head. The head is
        published with the co-signatures it got either way, so a dispute stays
        on record. ``halting``: the head that records a halt, published
        whoever co-signs it.
        """
        heads = self.writer.heads
        head = self.writer.sign_head(COORDINATOR, self._key, time.time_ns() // 1_000_000)

        def proof_for(site: str) -> list[bytes]:
            last = last_cosigned(heads, site)
            return self.writer.consistency(last.size if last is not None else 0, head.size)

        answers = self._cosign(head, proof_for)
        cosigned = {name: a for name, a in answers.items() if isinstance(a, bytes)}
        refused = {name: str(a) for name, a in answers.items() if not isinstance(a, (bytes, NoAnswer))}
        head = head.model_copy(update={"cosignatures": cosigned})
        self.writer.publish_head(head)
        if halting:
            return head
        rnd = self.writer.entries[-1].round if self.writer.entries else 0
        if refused:
            site, why = next(iter(refused.items()))
            raise RunHalted(Incident("consistency_proof", f"it will not co-sign tree head {head.size}: {why}", rnd, site, site))
        needed = len(answers) if self.quorum is None else self.quorum
        if len(cosigned) < needed:
            absent = ", ".join(sorted(set(answers) - set(cosigned)))
            raise RunHalted(Incident(
                "witnesses", f"only {len(cosigned)} sites co-signed tree head {head.size}, {needed} must ({absent} did not answer)",
                rnd, raised_by=COORDINATOR,
            ))
        return head

    def halt(self, incident: Incident, model_sha256: str | None) -> TreeHead:
        """Record why the run stopped, and the model it stopped at, under a head of its own."""
        self.writer.append("halt", incident.round, COORDINATOR, {**incident.to_json(), "model_sha256": model_sha256}, key=self._key)
        return self.close_round(halting=True)

    def spool(self, rnd: int, session_id: str) -> MaskedSpool:
        """A file in the evidence folder for a fit session's masked inputs as they arrive (the coordinator's
        ``evidence_spool``): ``archive`` writes it out, or removes it if its session never finished."""
        return MaskedSpool(self.evidence_dir / f".round-{rnd:05d}-{session_id[:16]}{SPOOL_SUFFIX}")

    def archive(self, sessions: list[SessionArchive]) -> None:
        """Each fit session's masked inputs and unmasking evidence, for ``verify`` to recompute its sum."""
        for s in sessions:
            stem = self.evidence_dir / f"round-{s.round:05d}"
            if isinstance(s.masked, MaskedSpool):
                s.masked.write_safetensors(stem.with_suffix(".safetensors"))
            else:
                write_atomic(stem.with_suffix(".safetensors"), safetensors_save(dict(s.masked)))
            meta = {"evidence": s.evidence.model_dump(mode="json"), "encoding": s.encoding.model_dump(mode="json")}
            write_atomic(stem.with_suffix(".json"), canonical(meta))
        for stale in self.evidence_dir.glob(f"*{SPOOL_SUFFIX}"):  # between rounds no session is open: these were cut off
            stale.unlink(missing_ok=True)

    def finish(self, model_file: Path, model_sha256: str, rnd: int, then: list[LogRecord] | None = None) -> TreeHead:
        """The last entry: the model file the run wrote, by its bytes' hash (``then``: entries that follow
        from it, such as its registration as a model version), under one head."""
        self.writer.append("final_model", rnd, COORDINATOR, {
            "file": model_file.name,
            "file_sha256": sha256_hex(model_file.read_bytes()),
            "model_sha256": model_sha256,
        }, key=self._key)
        self.record(then or [])
        crashpoints.reached("final_appended")
        return self.close_round()
