"""Check a run from its transcript and run folder alone: ``consortium verify RUN_DIR``.

Nothing here trusts the coordinator: every entry's signature is checked
against the key the manifest (entry 0, endorsed by every member) gives its
author, the Merkle tree is rebuilt from the entries and every signed head
must match it, with the coordinator's signature and every site's
co-signature; each site's epsilon is recomputed from the privacy events the
site itself signed and compared with what the run reported; the final model
file must hash to what the transcript holds. The first violation raises
``VerificationError`` naming the entry, what was expected and what was found.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import TypeAdapter, ValidationError
from safetensors import SafetensorError, safe_open

from consortium.crypto import keys
from consortium.errors import ConfigError, ConsortiumError, VerificationError
from consortium.governance.agreement import Agreement, agreement_hash, load_agreement
from consortium.governance.incident import RESUME_DOMAIN
from consortium.governance.roles import ENTRY_OPERATION, Roles
from consortium.lifecycle.lineage import Lineage, replay, rollback_statement
from consortium.lifecycle.registry import ModelRegistry
from consortium.privacy.accountant import epsilon
from consortium.privacy.events import EVENT
from consortium.transcript import merkle
from consortium.secagg.encoding import SessionEncoding
from consortium.secagg.protocol import SessionEvidence, unmask_total
from consortium.transcript.log import cosign_quorum, vector_sha256
from consortium.audit.anchor import Anchor, check_anchor, run_signatures
from consortium.audit.summary import check_summary, read_summary
from consortium.runs import require_run_folder
from consortium.transcript.log import (
    HEADS_FILE,
    TRANSCRIPT_FILE,
    Entry,
    TreeHead,
    manifest_bytes,
    parse_entry,
    parse_head,
)

EVIDENCE_DIR = "evidence"
AGREEMENT_FILE = "agreement.yaml"  # a copy of the agreement the run was held to, with its signatures beside it
_ENCODING: TypeAdapter[Any] = TypeAdapter(SessionEncoding)


@dataclass
class Verified:
    """What ``verify_run`` checked and found: counts, the last head, each site's epsilon (signed, and its
    bound), the final model's hash, refusals, halts, resumes, the lineage, whether the summary was there
    to bind, and ``anchored_by``: what each anchor proved (empty: consistency only)."""

    entries: int
    heads: int
    tree_head: dict[str, Any]
    rounds: int
    members: list[str]
    epsilon_per_site: dict[str, float] = field(default_factory=dict)  # from the events each site signed
    epsilon_bound_per_site: dict[str, float] = field(default_factory=dict)  # with rounds whose answer was lost
    final_model_sha256: str | None = None
    refusals: list[dict[str, Any]] = field(default_factory=list)  # each signed refusal: round, site, rule, reason
    halts: list[dict[str, Any]] = field(default_factory=list)  # each halt: its entry, round, cause and author
    resumes: list[dict[str, Any]] = field(default_factory=list)  # each resume: the halt it ends and who approved
    status: str = "completed"  # completed | halted | unfinished
    lineage: Lineage | None = None  # the model lifecycle, replayed (None: no version was ever registered)
    registry_stale: bool = False  # registry.json is behind the transcript (a write was cut short)
    summary: str = "missing"  # "bound": summary.json's claims match the signed record; "missing": there is none
    anchored_by: list[str] = field(default_factory=list)  # what each anchor proved; empty: consistency only

    def to_json(self) -> dict[str, Any]:
        return {
            "verified": True,
            "status": self.status,
            "lifecycle": self.lineage.to_json() if self.lineage is not None else None,
            "registry_stale": self.registry_stale,
            "summary": self.summary,
            "anchored_by": self.anchored_by,
            "consistency_only": not self.anchored_by,
            "refusals": self.refusals,
            "halts": self.halts,
            "resumes": self.resumes,
            "entries": self.entries,
            "heads": self.heads,
            "tree_head": self.tree_head,
            "rounds": self.rounds,
            "members": self.members,
            "epsilon_per_site": self.epsilon_per_site,
            "epsilon_bound_per_site": self.epsilon_bound_per_site,
            "final_model_sha256": self.final_model_sha256,
        }


def _lines(path: Path, what: str) -> list[bytes]:
    if not path.exists():
        raise VerificationError(f"no {what} at {path}: is this a run folder written with a transcript?")
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        raise VerificationError(f"{path.name} ends in a partial line: a write was cut short after its last complete entry")
    return [line for line in data.split(b"\n") if line]


def _key(members: dict[str, Any], name: str, where: str) -> bytes:
    member = members.get(name)
    if member is None or member.get("public_key") is None:
        raise VerificationError(f"{where}: '{name}' is not a member of the consortium (nor has a key in its agreement)")
    return _hex(member.get("public_key"), f"{where}: the public key of '{name}'")


def run_agreement(run_dir: Path, manifest: dict[str, Any]) -> Agreement | None:
    """The agreement the run was held to: its copy in the run folder must hash to what the manifest names."""
    expected = manifest.get("agreement_sha256")
    if expected is None:
        return None
    path = run_dir / AGREEMENT_FILE
    if not path.exists():
        raise VerificationError(f"the manifest names agreement {expected[:16]}..., and the run folder holds no {AGREEMENT_FILE}")
    try:
        agreement = load_agreement(path)
    except ConfigError as exc:
        raise VerificationError(f"the run's copy of its agreement does not parse: {exc}") from None
    if agreement_hash(agreement) != expected:
        raise VerificationError(f"{AGREEMENT_FILE} is not the agreement the manifest names (it was altered)")
    return agreement


def _hex(value: object, what: str) -> bytes:
    try:
        return bytes.fromhex(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise VerificationError(f"{what} is not hexadecimal") from None


def _entry_check(entry: Entry, check) -> None:  # type: ignore[no-untyped-def]
    """Run one check on one entry; a missing or mistyped field is a violation naming the entry."""
    try:
        check(entry)
    except (KeyError, TypeError, AttributeError, ValueError) as exc:
        raise VerificationError(f"entry {entry.index} ({entry.kind}): malformed body ({type(exc).__name__}: {exc})") from None


def _check_signature(public: bytes, signature: bytes, data: bytes, where: str) -> None:
    try:
        keys.verify(public, signature, data)
    except ConsortiumError as exc:
        raise VerificationError(f"{where}: {exc}") from None


def read_entries(run_dir: Path) -> list[Entry]:
    """The transcript's entries, parsed (not verified: ``verify_run`` does that)."""
    return [parse_entry(line, i) for i, line in enumerate(_lines(run_dir / TRANSCRIPT_FILE, "transcript"))]


def verify_run(run_dir: Path, *, anchors: Sequence[Anchor] = ()) -> Verified:
    """Check the run folder for consistency, then against each anchor the verifier holds.

    Without an anchor the report says so (``anchored_by`` empty): every key came from the folder
    itself. Raises ``VerificationError`` naming the first violation, ``ConfigError`` for a missing folder.
    """
    run_dir = Path(run_dir)
    require_run_folder(run_dir)
    entries = read_entries(run_dir)
    heads = [parse_head(line, i) for i, line in enumerate(_lines(run_dir / HEADS_FILE, "tree heads"))]
    if not entries:
        raise VerificationError("the transcript is empty")
    members: dict[str, Any] = {}
    _entry_check(entries[0], lambda e: members.update(_check_manifest(e)))
    agreement = run_agreement(run_dir, entries[0].body)
    roles = Roles.of_agreement(agreement) if agreement is not None else Roles.of_manifest(entries[0].body)
    # Who may sign entries: the manifest's members, and the agreement's other members (an auditor who halts).
    signers = {
        **{m.name: {"role": m.role, "public_key": m.public_key} for m in (agreement.members if agreement else [])},
        **members,
    }
    for i, entry in enumerate(entries):
        if entry.index != i:
            raise VerificationError(f"entry {i}: expected index {i}, found {entry.index} (an entry was removed or moved)")
        if i and entry.kind == "manifest":
            raise VerificationError(f"entry {i}: a second manifest")
        author_key = _key(signers, entry.author, f"entry {i}")
        operation = ENTRY_OPERATION.get(entry.kind, "sign_tree_head")
        if not roles.allowed(entry.author, operation):
            raise VerificationError(
                f"entry {i}: a {entry.kind} entry by '{entry.author}' ({roles.role(entry.author)}), "
                f"whose role may not {operation.replace('_', ' ')}"
            )
        _check_signature(author_key, entry.signature, entry.signed_bytes(), f"entry {i} ({entry.kind} by {entry.author})")
    leaves = [e.leaf() for e in entries]
    _check_heads(heads, entries, leaves, members, int(entries[0].body.get("min_sites", len(members))))
    report = Verified(
        entries=len(entries),
        heads=len(heads),
        tree_head={"size": heads[-1].size, "root": heads[-1].root, "cosigned_by": sorted(heads[-1].cosignatures)},
        rounds=max(e.round for e in entries),
        members=sorted(members),
    )
    _check_rounds(entries, entries[0].body)
    _check_halts(entries, agreement, signers, report)
    lineage = replay(entries, agreement, sorted(n for n, m in members.items() if m["role"] == "site"))
    if lineage.registry.versions:
        _check_rollback_requests(entries, roles, signers)
        report.registry_stale = _check_registry(run_dir, lineage)
        report.lineage = lineage
    report.refusals = [
        {"entry": e.index, "round": e.round, "site": e.author, "rule": e.body.get("rule", ""), "reason": e.body["reason"]}
        for e in entries
        if e.kind == "site_decision" and not e.body["accepted"]
    ]
    if entries[0].body.get("secure_aggregation"):
        for entry in entries:
            if entry.kind == "aggregate":
                _entry_check(entry, lambda e: _recompute_aggregate(e, entries, run_dir))
    report.epsilon_per_site = signed_epsilon(entries, entries[0].body)
    report.epsilon_bound_per_site = epsilon_bound(entries, report.epsilon_per_site)
    summary = read_summary(run_dir)
    if summary is not None:
        check_summary(summary, entries, heads, report.epsilon_per_site, report.epsilon_bound_per_site)
    report.summary = "missing" if summary is None else "bound"
    signatures = run_signatures(run_dir, AGREEMENT_FILE)
    held = {name: key for anchor in anchors for name, key in anchor.keys.items()}
    for anchor in anchors:
        report.anchored_by.extend(check_anchor(anchor, entries, signatures, held))
    finals = [e for e in entries if e.kind == "final_model"]
    if finals:
        _entry_check(finals[-1], lambda e: setattr(report, "final_model_sha256", _check_model(e, entries, run_dir)))
    report.status = "halted" if report.halts and len(report.resumes) < len(report.halts) else (
        "completed" if finals else "unfinished"
    )
    return report


def _check_rollback_requests(entries: list[Entry], roles: Roles, signers: dict[str, Any]) -> None:
    """A rollback someone asked for carries that member's signature over it, and its role allows it."""
    for e in entries:
        request = e.body.get("request") if e.kind == "model_state" else None
        if not request:
            continue
        member = request["member"]
        if not roles.allowed(member, "rollback"):
            raise VerificationError(f"entry {e.index}: '{member}' ({roles.role(member)}) demanded a rollback, which its role may not")
        _check_signature(
            _key(signers, member, f"entry {e.index}"), _hex(request["signature"], "a rollback request's signature"),
            rollback_statement(e.body["version"], e.body["reason"], e.index), f"entry {e.index} (rollback requested by {member})",
        )
        if e.body["by"] != member:
            raise VerificationError(f"entry {e.index}: the rollback is recorded as by '{e.body['by']}', and {member} signed it")


def _check_registry(run_dir: Path, lineage: Lineage) -> bool:
    """Every registered version's tensor file hashes to what its entry says; whether registry.json lags."""
    registry = ModelRegistry(run_dir)
    for version in lineage.registry.versions.values():
        path = registry.tensor_path(version.id)
        if not path.exists():
            raise VerificationError(f"model version {version.id}: its tensor file {path.name} is missing")
        if hashlib.sha256(path.read_bytes()).hexdigest() != version.sha256:
            raise VerificationError(f"model version {version.id}: {path.name} is not the file the transcript registered (it was swapped or damaged)")
    return registry.index_json() != lineage.registry.index_json()


def resume_statement(halt: Entry) -> bytes:
    """What each approver signs to resume a run: the halt entry itself, by its leaf hash in this transcript."""
    return RESUME_DOMAIN + halt.leaf()


def _check_halts(entries: list[Entry], agreement: Agreement | None, signers: dict[str, Any], report: Verified) -> None:
    """After a halt nothing happens but further halts, until a resume that a quorum of approvers signed."""
    halted: Entry | None = None
    for e in entries:
        if e.kind == "halt":
            report.halts.append({
                "entry": e.index, "round": e.round, "cause": e.body.get("cause"), "author": e.author,
                "site": e.body.get("site"), "detail": e.body.get("detail"),
            })
            halted = halted or e
        elif e.kind == "resume":
            if halted is None:
                raise VerificationError(f"entry {e.index}: a resume, and the run is not halted")
            _entry_check(e, lambda r, h=halted: _check_resume(r, h, agreement, signers))
            report.resumes.append({"entry": e.index, "halt_entry": halted.index, "approvers": sorted(e.body["approvals"])})
            halted = None
        elif halted is not None:
            raise VerificationError(
                f"entry {e.index}: a {e.kind} entry after the halt in entry {halted.index}, with no resume between"
            )


def _check_resume(e: Entry, halt: Entry, agreement: Agreement | None, signers: dict[str, Any]) -> None:
    if agreement is None:
        raise VerificationError(f"entry {e.index}: a resume in a run without an agreement, which alone names the quorum")
    if e.body["halt_entry"] != halt.index:
        raise VerificationError(f"entry {e.index}: resumes entry {e.body['halt_entry']}, the halt is entry {halt.index}")
    approvers = set(agreement.approvers())
    for name, signature in e.body["approvals"].items():
        if name not in approvers:
            raise VerificationError(f"entry {e.index}: '{name}' approved the resume and is not an approver")
        _check_signature(_key(signers, name, f"entry {e.index}"), _hex(signature, "an approval"), resume_statement(halt),
                         f"entry {e.index} (approval by {name})")
    if len(e.body["approvals"]) < agreement.resume_quorum:
        raise VerificationError(
            f"entry {e.index}: {len(e.body['approvals'])} approval(s) of the resume, the agreement's quorum is {agreement.resume_quorum}"
        )


def _coordinator(members: dict[str, Any]) -> str:
    return next(name for name, m in members.items() if m["role"] == "coordinator")


def _check_manifest(entry: Entry) -> dict[str, Any]:
    if entry.kind != "manifest":
        raise VerificationError(f"entry 0: expected the manifest, found a {entry.kind} entry")
    members = entry.body.get("members")
    if not isinstance(members, dict) or [m.get("role") for m in members.values()].count("coordinator") != 1:
        raise VerificationError("entry 0: the manifest must list the members with exactly one coordinator")
    endorsed = manifest_bytes(entry.body)
    endorsements = entry.body.get("endorsements", {})
    for name in members:
        if name not in endorsements:
            raise VerificationError(f"entry 0: member '{name}' did not endorse the manifest")
        signature = _hex(endorsements[name], f"entry 0: the endorsement by {name}")
        _check_signature(_key(members, name, "entry 0"), signature, endorsed, f"entry 0 (endorsement by {name})")
    return members


def _check_heads(heads: list[TreeHead], entries: list[Entry], leaves: list[bytes], members: dict[str, Any], min_sites: int) -> None:
    if not heads:
        raise VerificationError("no signed tree head: nothing vouches for the transcript")
    coordinator = _coordinator(members)
    sites = sorted(n for n, m in members.items() if m["role"] == "site")
    quorum = cosign_quorum(min_sites, len(sites))
    kinds = [e.kind for e in entries]
    previous = 0
    for i, head in enumerate(heads):
        where = f"tree head {i} (size {head.size})"
        if head.seq != i:  # numbered under the coordinator's signature: a gap is a head taken out
            raise VerificationError(
                f"{where}: numbered {head.seq} by its signature, found at place {i} of the heads file: "
                f"{'head(s) before it were deleted' if head.seq > i else 'heads were reordered or repeated'}"
            )
        if head.signer != coordinator:
            raise VerificationError(f"{where}: signed by '{head.signer}', expected the coordinator '{coordinator}'")
        _check_signature(_key(members, coordinator, where), head.signature, head.signed_bytes(), where)
        if head.size < previous:
            raise VerificationError(f"{where}: smaller than the head before it ({previous}): history was cut")
        if head.size > len(leaves):
            raise VerificationError(f"{where}: covers {head.size} entries, the transcript has {len(leaves)} (entries are missing)")
        root = merkle.root(leaves[: head.size]).hex()
        if root != head.root:
            raise VerificationError(
                f"{where}: the entries give root {root[:16]}..., the signed head says {head.root[:16]}... "
                f"(an entry before {head.size} was altered)"
            )
        # Every head needs the run's quorum of co-signatures (a site that was away catches up later, over a
        # consistency proof from the last head it co-signed); a head that records a halt needs only its signer.
        halting = head.size > 0 and kinds[head.size - 1] == "halt"
        if len(head.cosignatures) < quorum and not halting:
            absent = ", ".join(repr(s) for s in sites if s not in head.cosignatures)
            raise VerificationError(
                f"{where}: {absent} did not co-sign it, which leaves {len(head.cosignatures)} co-signatures "
                f"where the run needs {quorum}"
            )
        for site, sig in head.cosignatures.items():
            if members.get(site, {}).get("role") != "site":
                raise VerificationError(f"{where}: co-signed by '{site}', who is not a site")
            _check_signature(_key(members, site, where), sig, head.signed_bytes(), f"{where}, co-signature of {site}")
        previous = head.size
    if heads[-1].size != len(leaves):
        raise VerificationError(
            f"the last signed head covers {heads[-1].size} entries, the transcript has {len(leaves)}: "
            "entries were added after it"
        )


def _check_rounds(entries: list[Entry], manifest: dict[str, Any]) -> None:
    """Each round's decisions are about the model its plan names, and its aggregate extends that model
    over at least the manifest's minimum cohort."""
    plans: dict[int, Entry] = {}
    for e in entries:
        if e.kind == "round_plan":
            if e.round in plans:
                raise VerificationError(f"entry {e.index}: a second plan for round {e.round} (entry {plans[e.round].index})")
            plans[e.round] = e
    masked = {e.round: e for e in entries if e.kind == "masked_inputs" and e.body.get("phase") == "fit"}
    min_sites = manifest.get("min_sites", 1)
    secure = bool(manifest.get("secure_aggregation"))
    for entry in entries:
        _entry_check(entry, lambda e: _check_round_entry(e, plans, masked if secure else None, min_sites))
    # Each planned round has one outcome: its aggregate (ok or skipped), or the halt that stopped it.
    outcomes: dict[int, list[Entry]] = {}
    for e in entries:
        if e.kind in ("aggregate", "halt"):
            outcomes.setdefault(e.round, []).append(e)
    for rnd, plan in plans.items():
        found = [e for e in outcomes.get(rnd, []) if e.kind == "aggregate"]
        if len(found) > 1:
            raise VerificationError(f"entry {found[1].index}: round {rnd} has a second aggregate (entry {found[0].index} is its first)")
        if not outcomes.get(rnd):
            raise VerificationError(f"entry {plan.index}: round {rnd} was planned, and has neither an aggregate nor a halt")


def _check_round_entry(e: Entry, plans: dict[int, Entry], masked: dict[int, Entry] | None, min_sites: int) -> None:
    if e.kind == "site_decision":
        plan = plans.get(e.round)
        if plan is None:
            raise VerificationError(f"entry {e.index}: a decision for round {e.round}, which has no plan")
        if e.body["model_sha256"] != plan.body["model_sha256"]:
            raise VerificationError(
                f"entry {e.index}: site '{e.author}' was sent model {e.body['model_sha256'][:12]}..., "
                f"the plan (entry {plan.index}) names {plan.body['model_sha256'][:12]}..."
            )
        if e.body["accepted"] and e.body["privacy_event"] != plan.body["privacy_event"]:
            raise VerificationError(
                f"entry {e.index}: site '{e.author}' accepted a privacy event other than the plan's (entry {plan.index})"
            )
    if e.kind == "aggregate":
        plan = plans.get(e.round)
        if plan is None or e.body["parent_model_sha256"] != plan.body["model_sha256"]:
            raise VerificationError(f"entry {e.index}: the aggregate of round {e.round} does not start from its plan's model")
        if e.body["status"] == "ok" and len(e.body["included"]) < min_sites:
            raise VerificationError(
                f"entry {e.index}: round {e.round} aggregated {len(e.body['included'])} site(s), "
                f"the manifest's minimum is {min_sites}"
            )
        if e.body["status"] != "ok" and e.body["model_sha256"] != e.body["parent_model_sha256"]:
            raise VerificationError(f"entry {e.index}: round {e.round} was skipped, yet the model changed")
        if masked is not None and e.body["status"] == "ok":  # the sum is over exactly the committed survivors
            commit = masked.get(e.round)
            if commit is None or sorted(commit.body["survivors"]) != sorted(e.body["included"]):
                raise VerificationError(
                    f"entry {e.index}: round {e.round} summed {e.body['included']}, "
                    f"which are not the survivors whose masked inputs were committed"
                )


def _recompute_aggregate(e: Entry, entries: list[Entry], run_dir: Path) -> None:
    """Redo the round's unmasking from the archived masked inputs and revealed shares; compare the sum's hash."""
    if e.body["status"] != "ok":
        return
    stem = run_dir / EVIDENCE_DIR / f"round-{e.round:05d}"
    if not stem.with_suffix(".json").exists() or not stem.with_suffix(".safetensors").exists():
        raise VerificationError(f"entry {e.index}: the archive of round {e.round}'s masked inputs is missing ({stem.name})")
    commit = next((c for c in entries if c.kind == "masked_inputs" and c.round == e.round and c.body["phase"] == "fit"), None)
    if commit is None:
        raise VerificationError(f"entry {e.index}: round {e.round} has no committed masked inputs")
    try:
        meta = json.loads(stem.with_suffix(".json").read_bytes())
        evidence = SessionEvidence.model_validate(meta["evidence"])
        encoding = _ENCODING.validate_python(meta["encoding"])
        masked_total = _masked_total(stem.with_suffix(".safetensors"), commit, evidence)
    except (ValueError, KeyError, ValidationError, SafetensorError) as exc:
        raise VerificationError(f"{stem.name}: the archive does not parse ({type(exc).__name__})") from None
    try:
        total = encoding.decode_sum(unmask_total(evidence, masked_total), len(evidence.survivors))
    except ConsortiumError as exc:
        raise VerificationError(f"{stem.name}: unmasking fails ({exc})") from None
    if vector_sha256(total) != e.body["sum_sha256"]:
        raise VerificationError(
            f"entry {e.index}: round {e.round}'s sum recomputed from the archive is not the one recorded "
            f"({vector_sha256(total)[:12]}... vs {str(e.body['sum_sha256'])[:12]}...)"
        )


def _masked_total(path: Path, commit: Entry, evidence: SessionEvidence) -> np.ndarray:
    """The sum of the archived masked inputs (uint64, wrapping), each checked against its commitment; read one
    at a time, so checking a round holds one vector, not one per site. ``VerificationError`` on a mismatch."""
    with safe_open(path, framework="numpy") as archive:
        names = sorted(archive.keys())
        if names != sorted(commit.body["commitments"]) or list(evidence.survivors) != sorted(commit.body["survivors"]):
            raise VerificationError(f"{path.stem}: the archive's sites are not the ones entry {commit.index} committed")
        total = np.zeros(evidence.params.length, dtype=np.uint64)
        for site in names:
            vector = archive.get_tensor(site)
            if hashlib.sha256(np.ascontiguousarray(vector).tobytes()).hexdigest() != commit.body["commitments"][site]:
                raise VerificationError(f"{path.stem}: {site}'s masked input is not the one committed in entry {commit.index}")
            if vector.shape != total.shape or vector.dtype.kind != "u":
                raise VerificationError(f"{path.stem}: {site}'s masked input is {vector.dtype} {vector.shape}, not ring words")
            np.add(total, vector, out=total)
    return total


def signed_events(entries: list[Entry], manifest: dict[str, Any]) -> dict[str, list[tuple[int, Any]]]:
    """Each site's (round, privacy event) pairs, as it signed them in its decisions (empty when DP is off)."""
    if not (manifest.get("privacy") or {}).get("enabled"):
        return {}
    paid: dict[str, list[tuple[int, Any]]] = {n: [] for n, m in manifest["members"].items() if m["role"] == "site"}

    def collect(e: Entry) -> None:
        if e.kind == "site_decision" and e.body["accepted"]:
            if e.body["privacy_event"] is None:
                raise VerificationError(f"entry {e.index}: site '{e.author}' took part in a private run without a privacy event")
            try:
                paid[e.author].append((e.round, EVENT.validate_python(e.body["privacy_event"])))
            except ValidationError:
                raise VerificationError(f"entry {e.index}: the privacy event does not parse") from None

    for entry in entries:
        _entry_check(entry, collect)
    return paid


def signed_epsilon(entries: list[Entry], manifest: dict[str, Any]) -> dict[str, float]:
    """Each site's epsilon, from the privacy events it signed in its decisions (empty when DP is off)."""
    privacy = manifest.get("privacy") or {}
    return {
        site: epsilon([ev for _, ev in paid], privacy["delta"], privacy["accountant"]) if paid else 0.0
        for site, paid in signed_events(entries, manifest).items()
    }


def epsilon_bound(entries: list[Entry], spent: dict[str, float]) -> dict[str, float]:
    """Each site's epsilon counting, besides the events it signed, the planned events of rounds it was asked
    to join and whose answer never arrived (an aggregate's ``unaccounted``: a crash of the coordinator, or a
    site lost after it paid): never below what its ledger may hold."""
    manifest = entries[0].body
    privacy = manifest.get("privacy") or {}
    lost: dict[str, list[Any]] = {}
    for e in entries:
        if e.kind == "aggregate":
            for site, event in (e.body.get("unaccounted") or {}).items():
                lost.setdefault(site, []).append(EVENT.validate_python(event))
    if not lost:
        return dict(spent)
    signed = signed_events(entries, manifest)
    out = dict(spent)
    for site, events in lost.items():
        everything = [ev for _, ev in signed.get(site, [])] + events
        out[site] = max(spent.get(site, 0.0), epsilon(everything, privacy["delta"], privacy["accountant"]))
    return out


def _check_model(final: Entry, entries: list[Entry], run_dir: Path) -> str:
    expected = final.body["file_sha256"]
    name = Path(final.body["file"]).name  # a bare file name: the transcript cannot point outside the run
    model = run_dir / name
    if not model.exists():
        raise VerificationError(f"entry {final.index}: the final model file {name} is missing")
    found = hashlib.sha256(model.read_bytes()).hexdigest()
    if found != expected:
        raise VerificationError(f"{name}: SHA-256 {found[:16]}..., the transcript (entry {final.index}) says {expected[:16]}...")
    aggregates = [e for e in entries if e.kind == "aggregate"]
    if aggregates and final.body["model_sha256"] != aggregates[-1].body["model_sha256"]:
        raise VerificationError(f"entry {final.index}: the final model is not the last round's")
    return expected
