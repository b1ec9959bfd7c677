"""The coordinator's read-only dashboard: one page per member, showing what that member's role may see.

It shows the rounds and their status, who took part in each, the accuracy
over rounds as a chart, each site's epsilon (from the privacy events the site
signed in the transcript) against the agreement's cap, and the latest tree
head with whether it checks out: the coordinator's signature, every
co-signature, and its root recomputed from the entries. The agreement's
exposure matrix decides what each member sees (observers: rounds and
accuracy; privacy events and the transcript head only to the roles they are
exposed to); it is computed by the run between rounds, so a page never reads
a half-written round.

Access is a grant the member signs with its own identity key
(``consortium dashboard-link KIT``): its name and an expiry, checked against
the public key the agreement names for it; a grant valid for more than 24 h
from now is refused, whoever signed it. A refusal's reason (it may quote the
site's spent epsilon and its own cap) is shown only to the roles that see
privacy events; the others see that the site refused. The page is served over TLS with
the coordinator's certificate on its own port, where a browser needs no
client certificate; it is plain HTML with the chart as inline SVG, and loads
nothing from anywhere else.
"""

from __future__ import annotations

import base64
import html
import json
import logging
import math
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fastapi import FastAPI, HTTPException, Query
from fastapi.responses import HTMLResponse

from consortium.crypto import keys
from consortium.errors import ConsortiumError
from consortium.governance.agreement import Agreement
from consortium.protocol.messages import COORDINATOR
from consortium.governance.roles import PermissionDenied, Roles
from consortium.transcript.log import TranscriptWriter

log = logging.getLogger("consortium.service")
GRANT_DOMAIN = b"consortium/dashboard-grant/v1\x00"
MAX_GRANT_S = 24 * 3600  # three times the 8 h a link lasts by default; the page checks it too, whoever signed
CLOCK_SKEW_S = 300  # a grant signed on a clock a little ahead is still within the cap


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def grant(member: str, key: Ed25519PrivateKey, *, seconds: float, now: float | None = None) -> str:
    """A token that lets ``member`` read the dashboard for ``seconds``, signed with its identity key."""
    if not 0 < seconds <= MAX_GRANT_S:
        raise ConsortiumError(f"a dashboard grant lasts at most {MAX_GRANT_S // 3600} hours (and over 0 s), not "
                              f"{seconds / 3600:g} hours: ask for a shorter link")
    payload = json.dumps({"member": member, "expires": int((now or time.time()) + seconds)}, separators=(",", ":")).encode()
    return f"{_b64(payload)}.{_b64(keys.sign(key, GRANT_DOMAIN + payload))}"


def check_grant(token: str, agreement: Agreement, *, now: float | None = None) -> str:
    """The member a grant is from, once its signature, its member's key and its expiry check out.

    A grant valid for longer than ``MAX_GRANT_S`` from now is refused, signed or not: a link that
    works for years is a standing password. Names in the errors are quoted with ``repr``: a name
    from a token never puts a line break into the log."""
    try:
        payload_text, signature_text = token.split(".")
        payload, signature = _unb64(payload_text), _unb64(signature_text)
        claims = json.loads(payload)
        member, expires = claims["member"], float(claims["expires"])
        if not isinstance(member, str) or not math.isfinite(expires):
            raise TypeError
    except (ValueError, KeyError, TypeError):
        raise ConsortiumError("the dashboard grant is malformed: ask for a new link (consortium dashboard-link)") from None
    named = next((m for m in agreement.members if m.name == member), None)
    if named is None or named.public_key is None:
        raise ConsortiumError(f"{member!r} is not a member with a key in the agreement")
    keys.verify(bytes.fromhex(named.public_key), signature, GRANT_DOMAIN + payload)
    clock = time.time() if now is None else now
    if clock > expires:
        raise ConsortiumError(f"the dashboard grant of {member!r} has expired: ask for a new link (consortium dashboard-link)")
    if expires - clock > MAX_GRANT_S + CLOCK_SKEW_S:
        raise ConsortiumError(
            f"the dashboard grant of {member!r} is valid for {(expires - clock) / 3600:.0f} more hours; this dashboard "
            f"accepts grants of at most {MAX_GRANT_S // 3600} hours: ask for a new link (consortium dashboard-link --hours 8)"
        )
    return member


@dataclass
class Snapshot:
    """What the dashboard shows, as the run last left it (replaced whole, between rounds)."""

    consortium: str
    run_dir: str
    total_rounds: int
    status: str = "waiting for sites"
    rounds: list[dict[str, Any]] = field(default_factory=list)
    epsilon: dict[str, float] = field(default_factory=dict)
    epsilon_cap: float | None = None
    head: dict[str, Any] | None = None
    updated: float = field(default_factory=time.time)


class Board:
    """The latest snapshot, shared between the run (which replaces it) and the page (which reads it)."""

    def __init__(self, snapshot: Snapshot) -> None:
        self._lock = threading.Lock()
        self._snapshot = snapshot

    def publish(self, snapshot: Snapshot) -> None:
        with self._lock:
            self._snapshot = snapshot

    def read(self) -> Snapshot:
        with self._lock:
            return self._snapshot


def head_status(writer: TranscriptWriter, directory: Mapping[str, bytes]) -> dict[str, Any] | None:
    """The latest tree head and whether it checks out: signature, co-signatures, root over the entries."""
    if not writer.heads:
        return None
    head = writer.heads[-1]
    problem = ""
    try:
        keys.verify(directory[COORDINATOR], head.signature, head.signed_bytes())
        for site, signature in head.cosignatures.items():
            keys.verify(directory[site], signature, head.signed_bytes())
        if writer.root(head.size).hex() != head.root:
            problem = "its root is not that of the entries it covers"
    except (ConsortiumError, KeyError) as exc:
        problem = f"a signature does not verify ({exc})"
    return {"size": head.size, "root": head.root, "cosigners": sorted(head.cosignatures), "verified": not problem,
            "problem": problem}


#: Which artefact a part of a round's record reveals, beyond the aggregate metrics: a refusal's reason
#: quotes the site's budget and its private cap (privacy events); whose update the norm bound cut and the
#: secure-aggregation survivors are the transcript's.
ROUND_ARTEFACTS: dict[str, str] = {
    "refusal_reasons": "privacy_events", "privacy": "privacy_events", "robust": "transcript", "secure_aggregation": "transcript",
}
_ROUND_LISTS = ("selected", "answered", "dropped", "evaluation")  # who took part, and the summed evaluation
HIDDEN_REASON = "(the reason is hidden from your role)"


def round_view(record: Mapping[str, Any], member: str, roles: Roles) -> dict[str, Any]:
    """One round's record as ``member`` may see it: its status, who took part and the aggregate metrics,
    and each further part only if the exposure matrix shows its artefact to ``member``'s role; a part this
    table does not know is left out (deny by default)."""
    out: dict[str, Any] = {}
    for key, value in record.items():
        if key == "refused":  # who refused is participation; why may quote a site's spent budget and its own cap
            reasons = roles.may_see(member, ROUND_ARTEFACTS["refusal_reasons"])
            out[key] = {site: (why if reasons else HIDDEN_REASON) for site, why in dict(value).items()}
        elif key in ROUND_ARTEFACTS:
            if roles.may_see(member, ROUND_ARTEFACTS[key]):
                out[key] = value
        elif key in _ROUND_LISTS or value is None or isinstance(value, (str, int, float)):
            out[key] = value  # the round's number, status and reason, and its aggregate metrics
    return out


def member_view(snapshot: Snapshot, member: str, roles: Roles) -> dict[str, Any]:
    """The snapshot as ``member`` may see it (deny by default)."""
    roles.authorize(member, "view_aggregates")
    out: dict[str, Any] = {
        "member": member,
        "role": roles.role(member),
        "consortium": snapshot.consortium,
        "status": snapshot.status,
        "rounds_planned": snapshot.total_rounds,
        "updated": snapshot.updated,
    }
    hidden = []
    if roles.may_see(member, "aggregate_metrics"):
        out["rounds"] = [round_view(r, member, roles) for r in snapshot.rounds]
        present = {k for r in snapshot.rounds for k in ROUND_ARTEFACTS if r.get("refused" if k == "refusal_reasons" else k)}
        hidden = [k for k in ROUND_ARTEFACTS if k in present and not roles.may_see(member, ROUND_ARTEFACTS[k])]
    if roles.may_see(member, "privacy_events"):
        out["epsilon_per_site"] = snapshot.epsilon
        out["epsilon_cap"] = snapshot.epsilon_cap
    if roles.may_see(member, "transcript"):
        out["tree_head"] = snapshot.head
    out["hidden_from_you"] = [k for k in ("rounds", "epsilon_per_site", "tree_head") if k not in out] + [
        f"rounds' {k.replace('_', ' ')}" for k in hidden
    ]
    return out


def _chart(rounds: list[dict[str, Any]]) -> str:
    """Accuracy over rounds as inline SVG (0 to 1 on the vertical axis)."""
    points = [(r["round"], r["accuracy"]) for r in rounds if r.get("accuracy") is not None]
    width, height, pad = 560, 220, 36
    last = max([r["round"] for r in rounds], default=1)
    def x(rnd: float) -> float:
        return pad + (width - 2 * pad) * (rnd - 1) / max(1, last - 1)
    def y(acc: float) -> float:
        return height - pad - (height - 2 * pad) * acc
    grid = "".join(
        f'<line x1="{pad}" x2="{width - pad}" y1="{y(v):.1f}" y2="{y(v):.1f}" stroke="#ddd"/>'
        f'<text x="4" y="{y(v) + 4:.1f}" font-size="11">{v:.1f}</text>'
        for v in (0.0, 0.25, 0.5, 0.75, 1.0)
    )
    line = " ".join(f"{x(r):.1f},{y(a):.1f}" for r, a in points)
    dots = "".join(f'<circle cx="{x(r):.1f}" cy="{y(a):.1f}" r="3" fill="#1f5fa8"><title>round {r}: {a:.4f}</title></circle>'
                   for r, a in points)
    return (
        f'<svg id="accuracy-chart" role="img" aria-label="accuracy over rounds" width="{width}" height="{height}" '
        f'xmlns="http://www.w3.org/2000/svg">{grid}'
        f'<polyline points="{line}" fill="none" stroke="#1f5fa8" stroke-width="2"/>{dots}'
        f'<text x="{width / 2:.0f}" y="{height - 6}" font-size="11" text-anchor="middle">round</text></svg>'
    )


def render(view: Mapping[str, Any]) -> str:
    """The page for one member's view: plain HTML, nothing loaded from elsewhere, refreshed every 5 s."""
    e = html.escape
    parts = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>"
        "<meta http-equiv='refresh' content='5'>"
        f"<title>{e(view['consortium'])}: consortium dashboard</title>"
        "<style>body{font-family:sans-serif;margin:2em;color:#222}table{border-collapse:collapse;margin:1em 0}"
        "td,th{border:1px solid #ccc;padding:4px 10px;text-align:right}th{background:#f3f3f3}"
        ".bar{background:#1f5fa8;height:10px}.over{background:#b00020}</style></head><body>",
        f"<h1>{e(view['consortium'])}</h1>",
        f"<p id='status'>Run status: <b>{e(view['status'])}</b>; {view['rounds_planned']} rounds planned. "
        f"You are {e(view['member'])} ({e(str(view['role']))}).</p>",
    ]
    if "rounds" in view:
        rounds = view["rounds"]
        parts.append("<h2>Accuracy over rounds</h2>" + _chart(rounds))
        parts.append("<h2>Rounds</h2><table id='rounds'><tr><th>round</th><th>status</th><th>asked</th>"
                     "<th>answered</th><th>dropped</th><th>refused</th><th>accuracy</th></tr>")
        for r in rounds:
            acc = "-" if r.get("accuracy") is None else f"{r['accuracy']:.4f}"
            parts.append(
                f"<tr class='round'><td>{r['round']}</td><td>{e(r['status'])}</td><td>{len(r['selected'])}</td>"
                f"<td>{len(r['answered'])}</td><td>{len(r['dropped'])}</td><td>{len(r['refused'])}</td><td>{acc}</td></tr>"
            )
        parts.append("</table>")
    if "epsilon_per_site" in view:
        cap = view["epsilon_cap"]
        parts.append("<h2>Privacy budget spent</h2><table id='epsilon'><tr><th>site</th><th>epsilon</th>"
                     "<th>cap</th><th></th></tr>")
        for site, eps in view["epsilon_per_site"].items():
            share = 0.0 if not cap else min(1.0, eps / cap)
            cls = "bar over" if cap and eps > cap else "bar"
            parts.append(
                f"<tr class='site'><td>{e(site)}</td><td>{eps:.4f}</td><td>{'-' if cap is None else f'{cap:g}'}</td>"
                f"<td style='width:200px;text-align:left'><div class='{cls}' style='width:{share * 100:.0f}%'></div></td></tr>"
            )
        parts.append("</table><p>Each site's epsilon is recomputed from the privacy events it signed; "
                     "a site may hold a stricter cap of its own.</p>")
    if "tree_head" in view and view["tree_head"] is not None:
        h = view["tree_head"]
        state = "verified" if h["verified"] else f"NOT verified: {e(h['problem'])}"
        parts.append(
            f"<h2>Latest tree head</h2><p id='head'>size {h['size']}, root <code>{e(h['root'][:32])}...</code>, "
            f"co-signed by {e(', '.join(h['cosigners']) or 'nobody')}: <b>{state}</b></p>"
        )
    if view["hidden_from_you"]:
        parts.append(f"<p>Not shown to your role: {e(', '.join(view['hidden_from_you']))}.</p>")
    parts.append("</body></html>")
    return "".join(parts)


def create_dashboard_app(board: Board, agreement: Agreement) -> FastAPI:
    """The dashboard's app: each member's page and its data, behind a grant that member signed."""
    from consortium.deploy.service import printable  # the service's web stack; a grant is made without it

    roles = Roles.of_agreement(agreement)
    app = FastAPI(title="Consortium dashboard", version="1", docs_url=None, redoc_url=None)

    def viewer(token: str) -> dict[str, Any]:
        try:
            member = check_grant(token, agreement)
            return member_view(board.read(), member, roles)
        except ConsortiumError as exc:
            status = 403 if isinstance(exc, PermissionDenied) else 401
            log.warning("refused %s dashboard: %s", status, printable(exc))  # one line, whatever the token says
            raise HTTPException(status, str(exc)) from None

    @app.get("/dashboard", response_class=HTMLResponse)
    def page(token: str = Query(..., max_length=4096)) -> HTMLResponse:
        return HTMLResponse(render(viewer(token)))

    @app.get("/dashboard.json")
    def data(token: str = Query(..., max_length=4096)) -> dict[str, Any]:
        return viewer(token)

    return app
