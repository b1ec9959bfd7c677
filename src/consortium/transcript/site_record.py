"""A member's own record of what it signed: the tree heads it co-signed and the decisions it made.

A site keeps this file in its own state folder (``signed-record.jsonl``,
0600, appended and synced before the signature leaves). It is the anchor
that nobody else holds:

- ``verify RUN --kit KIT`` checks that the run's transcript has, at each
  size the site co-signed, the very root the site co-signed. A run folder
  re-signed end to end with fresh keys, or another run's transcript, has
  other roots.
- the site's privacy ledger is reconciled with the decisions it signed as
  paid, and restored from them before a run starts: a ledger row deleted or
  edited never lets the site spend its cap a second time.

Every line is checked when read: a head must carry the coordinator's
signature, a decision the site's own, so an edited line is refused, not
believed. What the record cannot do: survive the loss of the whole state
folder (back it up with the identity key); then each run's transcript, which
holds the same signed decisions, is the copy to reconcile from.
"""

from __future__ import annotations

import base64
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from consortium.crypto import keys
from consortium.errors import ConfigError, ConsortiumError
from consortium.privacy.events import EVENT
from consortium.privacy.ledger import Paid
from consortium.transcript.log import Entry, TreeHead, canonical, signed_entry_bytes

RECORD_FILE = "signed-record.jsonl"


@dataclass(frozen=True)
class SignedDecision:
    """A site's signed decision on one round of one run, as it sent it."""

    run_id: str
    round: int
    site: str
    body: dict[str, Any]
    signature: bytes


class SignedRecord:
    """Append-only, one JSON line per signature given; read back with every signature checked."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def _append(self, line: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, canonical(line) + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)

    def note_head(self, run_id: str, head: TreeHead) -> None:
        """Before a co-signature of ``head`` leaves: the head, with the coordinator's signature on it."""
        self._append({"type": "head", "run_id": run_id, "head": head.bare().model_dump(mode="json")})

    def note_decision(self, run_id: str, rnd: int, site: str, body: dict[str, Any], signature: bytes) -> None:
        """Before a signed decision leaves: what it says and the site's signature."""
        self._append({
            "type": "decision", "run_id": run_id, "round": rnd, "site": site, "body": body,
            "signature": base64.b64encode(signature).decode(),
        })

    def _lines(self) -> list[tuple[int, dict[str, Any]]]:
        if not self.path.exists():
            return []
        out = []
        for number, raw in enumerate(self.path.read_bytes().split(b"\n"), start=1):
            if not raw:
                continue
            try:
                line = json.loads(raw)
                if not isinstance(line, dict) or line.get("type") not in ("head", "decision"):
                    raise ValueError("not a record line")
            except ValueError:
                raise ConfigError(f"{self.path} line {number} is damaged: restore the file from a backup") from None
            out.append((number, line))
        return out

    def heads(self, run_id: str, coordinator_key: bytes | None) -> list[TreeHead]:
        """The heads this member co-signed in run ``run_id``, each checked against the coordinator's key
        when the caller holds it (from an agreement or a kit; the run folder's own key would prove nothing)."""
        found = []
        for number, line in self._lines():
            if line["type"] != "head" or line.get("run_id") != run_id:
                continue
            try:
                head = TreeHead.model_validate(line["head"])
                if coordinator_key is not None:
                    keys.verify(coordinator_key, head.signature, head.signed_bytes())
            except (ValueError, KeyError, ConsortiumError):
                raise ConfigError(f"{self.path} line {number}: the head does not carry the coordinator's signature (edited?)") from None
            found.append(head)
        return found

    def decisions(self, site: str, site_key: bytes) -> list[SignedDecision]:
        """Every decision ``site`` recorded, each checked against its own public key."""
        found = []
        for number, line in self._lines():
            if line["type"] != "decision" or line.get("site") != site:
                continue
            try:
                decision = SignedDecision(
                    str(line["run_id"]), int(line["round"]), site, dict(line["body"]), base64.b64decode(line["signature"]),
                )
                keys.verify(site_key, decision.signature, signed_entry_bytes("site_decision", decision.round, site, decision.body))
            except (ValueError, KeyError, TypeError, ConsortiumError):
                raise ConfigError(f"{self.path} line {number}: the decision does not carry {site}'s signature (edited?)") from None
            found.append(decision)
        return found


def payments(decisions: list[SignedDecision]) -> list[Paid]:
    """The rounds a site signed that it paid for: its accepted decisions that carry a privacy event."""
    return [
        Paid(d.run_id, d.round, EVENT.validate_python(d.body["privacy_event"]))
        for d in decisions
        if d.body.get("accepted") and d.body.get("privacy_event") is not None
    ]


def transcript_payments(entries: list[Entry], site: str) -> list[Paid]:
    """The same, from a run's transcript: ``site``'s accepted decisions there (verify the transcript first)."""
    run_id = str(entries[0].body.get("run_id") or "") if entries else ""
    return payments([
        SignedDecision(run_id, e.round, site, e.body, e.signature)
        for e in entries
        if e.kind == "site_decision" and e.author == site
    ])
