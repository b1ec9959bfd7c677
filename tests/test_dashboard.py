"""The coordinator's dashboard: signed grants, role-restricted views, and the page in headless Chromium."""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import ssl
import subprocess
import time

import httpx
import numpy as np
import pytest
import yaml
from fastapi.testclient import TestClient
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from consortium.crypto.keyfile import load_identity_key
from consortium.data import load_builtin, partition_iid
from consortium.crypto import keys
from consortium.deploy.dashboard import (
    GRANT_DOMAIN, MAX_GRANT_S, Board, Snapshot, _b64, check_grant, create_dashboard_app, grant, member_view, render,
)
from consortium.deploy.local import free_port, launch, provision_local
from consortium.errors import ConsortiumError
from consortium.governance.agreement import load_agreement
from consortium.governance.roles import PermissionDenied, Roles
from consortium.protocol.coordinator import COORDINATOR

SITES = ["site-1", "site-2", "site-3"]
CHROMIUM = shutil.which("chromium")


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    table = load_builtin("breast-cancer")
    parts = partition_iid(table.n_rows, len(SITES), np.random.default_rng(5))
    folder = tmp_path_factory.mktemp("dashboard") / "consortium"
    return provision_local(folder, {s: table.take(idx) for s, idx in zip(SITES, parts)}, consortium="hospitals")


def test_a_grant_opens_the_dashboard_only_for_its_member_and_only_until_it_expires(local):
    agreement = load_agreement(local.folder / "agreement.yaml")
    key = load_identity_key(local.kit("site-1") / "identity.key")
    token = grant("site-1", key, seconds=60, now=1000.0)
    assert check_grant(token, agreement, now=1030.0) == "site-1"
    with pytest.raises(ConsortiumError, match="has expired"):
        check_grant(token, agreement, now=1061.0)
    with pytest.raises(ConsortiumError):  # site-1's key cannot speak for site-2
        check_grant(grant("site-2", key, seconds=60, now=1000.0), agreement, now=1030.0)
    payload, signature = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=="))
    claims["expires"] += 10**6  # a longer grant than was signed
    longer = base64.urlsafe_b64encode(json.dumps(claims, separators=(",", ":")).encode()).decode().rstrip("=")
    with pytest.raises(ConsortiumError):
        check_grant(f"{longer}.{signature}", agreement, now=1030.0)
    with pytest.raises(ConsortiumError, match="malformed"):
        check_grant("not-a-grant", agreement)


def test_each_role_sees_what_the_exposure_matrix_shows_it():
    roles = Roles(
        {"coordinator": "coordinator", "site-1": "site", "auditor": "auditor", "watcher": "observer"},
        {"aggregate_metrics": ["coordinator", "site", "auditor", "observer"], "privacy_events": ["coordinator", "site", "auditor"],
         "transcript": ["coordinator", "site", "auditor"]},
    )
    snap = Snapshot("hospitals", "run", 3, status="running",
                    rounds=[{"round": 1, "status": "ok", "selected": ["site-1"], "answered": ["site-1"], "dropped": [],
                             "refused": {}, "accuracy": 0.9}],
                    epsilon={"site-1": 1.5}, epsilon_cap=8.0,
                    head={"size": 5, "root": "ab" * 32, "cosigners": ["site-1"], "verified": True, "problem": ""})
    site = member_view(snap, "site-1", roles)
    assert site["epsilon_per_site"] == {"site-1": 1.5} and site["tree_head"]["verified"] and site["hidden_from_you"] == []
    watcher = member_view(snap, "watcher", roles)
    assert watcher["rounds"] == snap.rounds
    assert "epsilon_per_site" not in watcher and "tree_head" not in watcher
    assert watcher["hidden_from_you"] == ["epsilon_per_site", "tree_head"]
    assert "Privacy budget" not in render(watcher) and "Privacy budget" in render(site)
    with pytest.raises(PermissionDenied):
        member_view(snap, "stranger", roles)


def test_a_refusal_reason_quoting_a_sites_budget_is_shown_only_to_roles_that_see_privacy_events():
    """site-2 refused round 2 saying what it spent and its own (private) cap: a site and an auditor see why,
    an observer sees only that it refused; the round's privacy and robust parts follow the matrix too."""
    roles = Roles(
        {"coordinator": "coordinator", "site-1": "site", "auditor": "auditor", "watcher": "observer"},
        {"aggregate_metrics": ["coordinator", "site", "auditor", "observer"], "privacy_events": ["coordinator", "site", "auditor"],
         "transcript": ["coordinator", "site"]},
    )
    secret = "epsilon spent 7.91 would exceed this site's own cap of 7.95"
    snap = Snapshot("hospitals", "run", 3, status="running", rounds=[{
        "round": 2, "status": "ok", "reason": "", "selected": ["site-1", "site-2"], "answered": ["site-1"], "dropped": [],
        "refused": {"site-2": secret}, "accuracy": 0.9, "privacy": {"clip": 0.73, "fraction_under_clip": 0.5},
        "robust": {"cut": ["site-1"]}, "secure_aggregation": None, "something_new": {"per_site": [1, 2]},
    }])
    watcher = member_view(snap, "watcher", roles)
    (shown,) = watcher["rounds"]
    assert shown["refused"] == {"site-2": "(the reason is hidden from your role)"} and shown["accuracy"] == 0.9
    assert "privacy" not in shown and "robust" not in shown and "something_new" not in shown  # deny by default
    assert watcher["hidden_from_you"] == ["epsilon_per_site", "tree_head", "rounds' refusal reasons", "rounds' privacy",
                                          "rounds' robust"]
    for text in (json.dumps(watcher), render(watcher)):
        assert "7.91" not in text and "7.95" not in text and "0.73" not in text
    auditor = member_view(snap, "auditor", roles)
    assert auditor["rounds"][0]["refused"] == {"site-2": secret} and auditor["rounds"][0]["privacy"]["clip"] == 0.73
    assert "robust" not in auditor["rounds"][0]  # the transcript is not shown to auditors under this matrix
    assert member_view(snap, "site-1", roles)["rounds"][0]["robust"] == {"cut": ["site-1"]}


def test_the_dashboard_refuses_a_grant_for_too_long_and_logs_a_forged_name_on_one_line(local, caplog):
    """A grant signed by its member's own key for 100 years is refused (at most 24 h); a token whose member
    name carries a newline and a fake log line is refused on one log line."""
    agreement = load_agreement(local.folder / "agreement.yaml")
    key = load_identity_key(local.kit("site-1") / "identity.key")
    century = 100 * 365 * 24 * 3600
    payload = json.dumps({"member": "site-1", "expires": int(time.time() + century)}, separators=(",", ":")).encode()
    forever = f"{_b64(payload)}.{_b64(keys.sign(key, GRANT_DOMAIN + payload))}"
    with pytest.raises(ConsortiumError, match="at most 24 hours"):
        check_grant(forever, agreement)
    with pytest.raises(ConsortiumError, match="at most 24 hours"):
        grant("site-1", key, seconds=century)
    assert check_grant(grant("site-1", key, seconds=MAX_GRANT_S), agreement) == "site-1"  # the cap itself is fine
    forged = "site-9\nrefused 401 dashboard: all is well"
    payload = json.dumps({"member": forged, "expires": int(time.time() + 60)}, separators=(",", ":")).encode()
    token = f"{_b64(payload)}.{_b64(keys.sign(key, GRANT_DOMAIN + payload))}"
    board = Board(Snapshot("hospitals", "run", 3))
    with TestClient(create_dashboard_app(board, agreement)) as client:
        assert client.get("/dashboard.json", params={"token": forever}).status_code == 401
        assert client.get("/dashboard.json", params={"token": token}).status_code == 401
    lines = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("consortium")).splitlines()
    assert len(lines) == 2 and "at most 24 hours" in lines[0], lines
    assert lines[1] == "refused 401 dashboard: 'site-9\\nrefused 401 dashboard: all is well' is not a member with a key in the agreement"


def _spki_pin(cert_path) -> str:
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    spki = cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(hashlib.sha256(spki).digest()).decode()


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (.ci/run installs it: apt-get install chromium)")
def test_the_dashboard_page_in_headless_chromium_shows_rounds_and_epsilon_per_site(local, tmp_path):
    raw = {"rounds": 6, "seed": 0, "participation": {"min_sites": 3}, "privacy": {"test_seed": 7},
           "baselines": {"local_only": False, "pooled": False}}
    config_file = tmp_path / "run.yaml"
    config_file.write_text(yaml.safe_dump(raw))
    port = free_port()
    procs = launch(local, config_file, tmp_path / "served", test_seed=7, serve_args=("--dashboard-port", str(port), "--json"),
                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, logs=tmp_path / "logs", state=tmp_path / "state")
    token = grant("site-1", load_identity_key(local.kit("site-1") / "identity.key"), seconds=600)
    url = f"https://127.0.0.1:{port}/dashboard?token={token}"
    try:
        metrics = tmp_path / "served" / "metrics.jsonl"
        deadline = time.monotonic() + 300
        while not (metrics.exists() and metrics.read_text().count("\n") >= 3):  # two rounds are over and shown
            assert procs.coordinator.poll() is None and time.monotonic() < deadline, procs.coordinator.stderr.read().decode()
            time.sleep(0.05)
        ca = str(local.kit("site-1") / "ca.crt")
        with httpx.Client(verify=ssl.create_default_context(cafile=ca)) as client:  # the page's data, and the refusals, over TLS
            view = client.get(url.replace("/dashboard?", "/dashboard.json?")).json()
            assert view["role"] == "site" and len(view["rounds"]) >= 2 and set(view["epsilon_per_site"]) == set(SITES)
            assert client.get(f"https://127.0.0.1:{port}/dashboard?token=forged").status_code == 401
            assert client.get(f"https://127.0.0.1:{port}/dashboard").status_code == 422
        profile, shot = tmp_path / "chromium", tmp_path / "dashboard.png"
        flags = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={profile}", f"--ignore-certificate-errors-spki-list={_spki_pin(local.kit(COORDINATOR) / 'tls.crt')}"]
        dom = subprocess.run([*flags, "--dump-dom", url], capture_output=True, text=True, timeout=120).stdout
        subprocess.run([*flags, "--window-size=900,1200", f"--screenshot={shot}", url], capture_output=True, timeout=120)
    finally:
        procs.stop()  # the page is what this test is about: the run need not finish
    assert "hospitals" in dom and 'id="accuracy-chart"' in dom
    assert dom.count('class="round"') >= 2  # the rounds, each with its status and accuracy
    for site in SITES:  # and each site's epsilon against the cap
        assert f"<td>{site}</td>" in dom
    assert "<b>verified</b>" in dom and "<polyline" in dom  # the latest head checks out
    assert shot.exists() and shot.stat().st_size > 10_000  # it rendered
