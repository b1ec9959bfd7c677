"""A site's witness part: it endorses the run's manifest, co-signs the transcript's heads, signs what
the transcript records of it, and proves the coordinator's entries against the last head it co-signed.

It keeps the transcript memory (the last head co-signed, the last round answered, the run endorsed),
so a restarted site picks up where it was, and the site's own signed record of heads and decisions.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from consortium.crypto import keys
from consortium.errors import ConfigError, ProtocolError, VerificationError
from consortium.governance.agreement import agreement_hash
from consortium.governance.guard import Refused, SiteGuard
from consortium.protocol import messages as m
from consortium.protocol.site_training import model_sha256
from consortium.runs import write_atomic
from consortium.transcript import merkle
from consortium.transcript.log import Entry, HeadWitness, TreeHead, canonical, manifest_bytes, signed_entry_bytes
from consortium.transcript.site_record import SignedRecord

COORDINATOR = m.COORDINATOR


class Witness:
    """Endorsement, co-signing and signing for the site ``name`` (see the module docstring).

    ``fingerprint`` gives the site's data fingerprint (what a manifest must state truly);
    ``memory`` and ``record`` are the site's transcript memory and signed record files.
    """

    def __init__(
        self,
        name: str,
        *,
        identity: Ed25519PrivateKey | None,
        directory: Mapping[str, bytes],
        guard: SiteGuard,
        fingerprint: Callable[[], dict[str, object]],
        memory: Path | None,
        record: Path | None,
        task: dict[str, str] | None = None,
    ) -> None:
        self.name = name
        self._identity = identity
        self._directory = directory
        self._guard = guard
        self._fingerprint = fingerprint
        self._task = task
        coordinator_key = directory.get(COORDINATOR)
        self.head = HeadWitness(name, identity, coordinator_key) if identity and coordinator_key else None
        self.round_seen = 0
        self.run_id = ""  # the run whose manifest this site endorsed: its ledger rows and its record name it
        self._memory = memory
        self.record = SignedRecord(record) if record is not None else None

    def recall(self) -> None:
        """A restarted site picks up where it was: the last head it co-signed, the last round it answered."""
        path = self._memory
        if path is None or not path.exists():
            return
        try:
            saved = json.loads(path.read_text())
            head, rnd = TreeHead.model_validate(saved["head"]), int(saved["round"])
            self.run_id = str(saved.get("run_id", ""))
        except (ValueError, KeyError, TypeError):
            raise ConfigError(f"{path} is damaged: restore it from a backup (without it this site cannot check the transcript)") from None
        if self.head is None:
            raise ProtocolError("this site has no identity key or directory: it keeps no transcript memory")
        self.head.remember(head)
        self.round_seen = rnd

    # -- what the site signs ---------------------------------------------------------

    def signed(self, kind: str, rnd: int, body: dict[str, object]) -> m.SiteDecision:
        """A transcript entry of ``kind`` that this site authors, signed before it knows where it will land."""
        if self._identity is None:
            raise ProtocolError("this site has no identity key: it cannot sign what the transcript records")
        body = json.loads(canonical(body))
        signature = self._identity.sign(signed_entry_bytes(kind, rnd, self.name, body))
        if self.record is not None and kind == "site_decision":  # noted down before it leaves
            self.record.note_decision(self.run_id, rnd, self.name, body, signature)
        return m.SiteDecision(round=rnd, site=self.name, body=body, signature=signature)

    def sign_decision(self, rnd: int, msg: m.FitRequest, reply: m.BaseModel) -> m.BaseModel:
        """Attach the site's signed yes or no to a round plan: the model it was sent and what it paid."""
        if self._identity is None or not isinstance(reply, (m.FitReply, m.Refusal)):
            return reply
        accepted = isinstance(reply, m.FitReply)
        return reply.model_copy(update={"decision": self.signed("site_decision", rnd, {
            "model_sha256": model_sha256(msg.params) if msg.params is not None else msg.model_sha256,
            "accepted": accepted,
            "reason": "" if accepted else reply.reason,  # type: ignore[union-attr]
            "rule": "" if accepted else reply.rule,  # type: ignore[union-attr]
            "privacy_event": msg.privacy.model_dump(mode="json") if accepted and msg.privacy is not None else None,
        })})

    # -- what the site checks against the transcript --------------------------------

    def proven(self, proof: m.PlanProof | None, kind: str, what: str, rule: str) -> Entry:
        """An entry of ``kind`` by the coordinator, in the last tree head this site co-signed; a refusal
        under ``rule`` otherwise (round plans before training, lifecycle entries before deploying)."""
        assert self.head is not None
        last = self.head.last
        if proof is None or last is None or proof.head.bare() != last:
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

    def check_plan(self, rnd: int, msg: m.FitRequest, sent: str) -> None:
        """The request must be the round plan the transcript holds, in the last head this site co-signed."""
        proof = msg.plan
        if proof is None:
            raise Refused("plan_proof", "this site trains only on a round plan the transcript holds, and the request carries none")
        entry = self.proven(proof, "round_plan", "the round plan", "plan_proof")
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

    # -- endorsing and co-signing ----------------------------------------------------

    def endorse(self, rnd: int, msg: m.EndorseRequest) -> m.Endorsement:
        """Sign the run's manifest only if it states this site, the keys it knows, its agreement and its data truly."""
        manifest = msg.manifest
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
        if self._guard.agreement is not None and manifest.get("agreement_sha256") != agreement_hash(self._guard.agreement):
            raise Refused("manifest", "the manifest names another agreement than the one this site signed")
        provenance = manifest.get("provenance")
        datasets = provenance.get("datasets") if isinstance(provenance, dict) else None
        if not isinstance(datasets, dict) or datasets.get(self.name) != self._fingerprint():
            raise Refused("manifest", "the manifest misstates this site's data")
        named, own_task = manifest.get("task"), self._task
        # The code is what counts, not how each machine names its copy (a path differs from one to the next).
        if own_task is not None and (not isinstance(named, dict) or (named.get("sha256"), named.get("code")) != (
                own_task["sha256"], own_task.get("code"))):
            raise Refused(
                "manifest", f"the manifest names task {named!r}, and this site runs {own_task!r}: "
                "a site endorses only the task code it holds"
            )
        run_id = str(manifest.get("run_id") or "")
        if self.head is not None and (not run_id or run_id != self.run_id):
            # A new run on the same kits: a new transcript, its own rounds from 1 (the ledger carries over).
            self.head.last, self.round_seen = None, 0
        self.run_id = run_id
        return m.Endorsement(signature=keys.sign(self._identity, manifest_bytes(manifest)))

    def resume_from(self, head: TreeHead) -> None:
        """After a restart: the last head this site co-signed, recognised by its own co-signature."""
        if self.head is None:
            raise ProtocolError("this site has no identity key or directory: it keeps no transcript memory")
        self.head.resume_from(head)

    def cosign_head(self, head: TreeHead, proof: list[bytes]) -> bytes:
        """Co-sign a transcript head that the coordinator signed and that extends the last one this site signed."""
        if self.head is None:
            raise ProtocolError("this site has no identity key or directory: it cannot co-sign the transcript")
        signature = self.head.cosign(head, proof)
        if self.record is not None:
            self.record.note_head(self.run_id, head)
        if self._memory is not None:  # noted down before the co-signature leaves: a restart resumes from it
            memo = {
                "head": head.bare().model_dump(mode="json"), "round": self.round_seen,
                "run_id": self.run_id,
            }
            write_atomic(self._memory, json.dumps(memo).encode())
        return signature
