"""What a verifier holds itself, and the checks that tie a run folder to it.

``verify RUN`` on its own checks that the run folder is consistent: every
signature against the keys the folder's own manifest names. That proves
nothing against whoever can write the folder: re-sign every entry, head and
co-signature with fresh keys and it is consistent again. An anchor is
something the verifier did not get from the folder (sigstore verifies
against its trusted root, RFC 9162 monitors against heads they gossiped):

- ``agreement_anchor(FILE)``: the consortium agreement the verifier holds,
  with the approvers' signatures over its hash checked against the keys it
  names. The run must name this agreement's hash, and every member's key in
  its manifest must be the key the agreement names.
- ``kit_anchor(DIR)``: a member's kit, as provisioned. Its agreement (as
  above), the provisioning manifest's keys (which must agree with it), and
  the member's own identity key, which must be the one the run names.
- ``state_anchor(DIR)``: a site's own record of the heads it co-signed
  (``transcript.site_record``): at each of those sizes, the transcript's root must
  be the root the site co-signed.

What an anchor does not prove: that the members behaved (the transcript's
own checks do that), nor anything about a member whose key the anchor does
not name.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes

from consortium.crypto import keys
from consortium.crypto.keyfile import load_identity_key
from consortium.errors import ConfigError, VerificationError
from consortium.governance.agreement import Agreement, agreement_hash, approval, load_agreement, read_signatures, signatures_path
from consortium.transcript import merkle
from consortium.transcript.log import Entry
from consortium.transcript.site_record import RECORD_FILE, SignedRecord

CONSISTENCY_ONLY = (
    "checked for consistency only: every key came from the run folder itself, so whoever can write this folder "
    "(its coordinator, or anyone with a copy) could have re-signed it end to end with fresh keys; "
    "anchor the check in what you hold: --agreement FILE, --kit DIR, or a site's --state DIR"
)


@dataclass(frozen=True)
class Anchor:
    """One thing the verifier holds: where it came from, the agreement and keys it vouches for, a site's record."""

    holder: str  # in words: "the agreement at FILE", "the kit of site-1"
    agreement: Agreement | None = None
    signatures: dict[str, str] = field(default_factory=dict)  # approvers' signatures over the agreement's hash
    keys: dict[str, str] = field(default_factory=dict)  # member -> Ed25519 public key (hex) the holder vouches for
    record: SignedRecord | None = None  # a site's own record of the heads it co-signed
    record_required: bool = False  # named by the verifier: a record with no head of the run is a failure


def agreement_anchor(path: Path) -> Anchor:
    """The agreement at ``path`` (and its signatures beside it), every member's key as it names them.

    Raises ``ConfigError`` when the file does not parse or names a member without a key.
    """
    agreement = load_agreement(path)
    missing = [m.name for m in agreement.members if m.public_key is None]
    if missing:
        raise ConfigError(f"{path} names no public key for {', '.join(missing)}: an agreement anchors a check only with every member's key")
    return Anchor(
        f"the agreement at {path}", agreement, read_signatures(Path(path)),
        {m.name: str(m.public_key) for m in agreement.members},
    )


def kit_anchor(folder: Path) -> Anchor:
    """A member's kit: its agreement, checked against the provisioning manifest and the member's own key.

    Raises ``ConfigError`` when the kit is incomplete or its parts disagree (it was tampered with).
    """
    folder = Path(folder)
    try:
        kit = json.loads((folder / "kit.json").read_text())
        member = str(kit["member"])
        provisioned = json.loads((folder / "consortium.json").read_text())
    except (OSError, ValueError, KeyError, TypeError):
        raise ConfigError(f"{folder} is not a member's kit (kit.json and consortium.json): pass a folder under DIR/kits") from None
    anchor = agreement_anchor(folder / "agreement.yaml")
    for name, m in (provisioned.get("members") or {}).items():
        if anchor.keys.get(name) != m.get("public_key"):
            raise ConfigError(f"{folder}: the kit's agreement and its provisioning manifest disagree on the key of '{name}': restore the kit")
    ca = x509.load_pem_x509_certificate((folder / "ca.crt").read_bytes())
    if ca.fingerprint(hashes.SHA256()).hex() != provisioned.get("ca_certificate_sha256"):
        raise ConfigError(f"{folder / 'ca.crt'} is not the CA the kit was provisioned with: restore the kit")
    own = keys.ed25519_public_bytes(load_identity_key(folder / "identity.key").public_key()).hex()
    if anchor.keys.get(member) != own:
        raise ConfigError(f"{folder}: the kit's identity key is not the key its agreement names for '{member}': restore the kit")
    state = folder / "state" / RECORD_FILE
    return Anchor(
        f"the kit of {member}", anchor.agreement, anchor.signatures, anchor.keys,
        SignedRecord(state) if state.exists() else None,
    )


def state_anchor(folder: Path) -> Anchor:
    """A site's state folder: its own record of the heads it co-signed. Raises ``ConfigError`` when it has none."""
    path = Path(folder) / RECORD_FILE
    if not path.exists():
        raise ConfigError(f"no {RECORD_FILE} in {folder}: pass the site's state folder (the one 'consortium join --state' used)")
    return Anchor(f"the site record in {folder}", record=SignedRecord(path), record_required=True)


def check_anchor(
    anchor: Anchor, entries: list[Entry], run_signatures: dict[str, str], held_keys: dict[str, str] | None = None
) -> list[str]:
    """Tie a run (already checked for consistency) to ``anchor``; what it proved, one line each.

    ``run_signatures`` are the approvals in the run folder: each is checked against the anchored
    agreement's own keys, so they count whatever their source. ``held_keys`` are the keys the
    verifier's other anchors vouch for: a site's record is checked against the coordinator's key
    among them. Raises ``VerificationError``.
    """
    manifest = entries[0].body
    proved: list[str] = []
    members: dict[str, dict[str, str]] = manifest.get("members") or {}
    if anchor.agreement is not None:
        expected = agreement_hash(anchor.agreement)
        if manifest.get("agreement_sha256") != expected:
            raise VerificationError(
                f"the run names agreement {str(manifest.get('agreement_sha256'))[:16]}..., {anchor.holder} is {expected[:16]}...: "
                "this is not a run of your consortium, or its history was forged under another agreement"
            )
        signed, unsigned = approval(anchor.agreement, {**run_signatures, **anchor.signatures})
        if unsigned:
            raise VerificationError(f"{anchor.holder} is not approved: {', '.join(unsigned)} did not sign it, so it anchors nothing")
        proved.append(f"the run is held to {anchor.holder}, signed by its approvers ({', '.join(signed)})")
        proved.append(_check_task(manifest.get("task"), anchor))
    if anchor.keys:
        for name, member in members.items():
            if anchor.keys.get(name) != member.get("public_key"):
                raise VerificationError(
                    f"the transcript's key for '{name}' is not the one {anchor.holder} names: "
                    "the run folder was signed with other keys (forged, or from another consortium)"
                )
        proved.append(f"every member's key in the transcript is the one {anchor.holder} names")
    if anchor.record is not None:
        coordinator = next((n for n, m in members.items() if m.get("role") == "coordinator"), "")
        key = anchor.keys.get(coordinator) or (held_keys or {}).get(coordinator)
        cosigned = anchor.record.heads(str(manifest.get("run_id") or ""), bytes.fromhex(key) if key else None)
        leaves = [e.leaf() for e in entries]
        for head in cosigned:
            if head.size > len(leaves) or merkle.root(leaves[: head.size]).hex() != head.root:
                raise VerificationError(
                    f"{anchor.holder} co-signed tree head {head.seq} (size {head.size}, root {head.root[:16]}...), "
                    "and this transcript does not extend it: its history was rewritten or it is another run's"
                )
        if cosigned:
            proved.append(f"the transcript extends all {len(cosigned)} heads {anchor.holder} co-signed (the last of size {cosigned[-1].size})")
        elif anchor.record_required:
            raise VerificationError(
                f"{anchor.holder} holds no head of run {str(manifest.get('run_id'))[:16]}: this site never co-signed this run "
                "(the folder is another run's, or a forgery under a new run id)"
            )
        else:
            proved.append(f"{anchor.holder} holds no head of this run: it did not co-sign it")
    return proved


def _check_task(task: dict[str, str] | None, anchor: Anchor) -> str:
    """The task the manifest names (and every member endorsed) must be one the anchored agreement accepts:
    a study's by its code's hash, or a built-in (the framework's own code, pinned by ``code_sha256``)."""
    assert anchor.agreement is not None
    if not task:
        return "the run names no task: it trained the built-in classifier"
    name, sha = str(task.get("name")), str(task.get("sha256"))
    if task.get("code") == "framework":
        if ":" in name:  # a built-in's name is a bare word; a study's names its module or file
            raise VerificationError(f"the manifest passes off task {name} as a built-in: it is a study's code")
        return f"the task is the built-in {name}: the framework's own code"
    if sha not in {t.sha256 for t in anchor.agreement.tasks}:
        raise VerificationError(
            f"the manifest names task {name} with code {sha[:16]}..., which {anchor.holder} does not accept: "
            "the sites were made to run, or the transcript claims, code the consortium never agreed to"
        )
    return f"the task every member endorsed ({name}, code {sha[:16]}...) is one {anchor.holder} accepts"


def run_signatures(run_dir: Path, agreement_file: str) -> dict[str, str]:
    """The approvals the run folder carries beside its copy of the agreement (checked by ``check_anchor``)."""
    path = Path(run_dir) / agreement_file
    return read_signatures(path) if signatures_path(path).exists() else {}
