"""The coordinator's service played by an attacker: floods, forged log lines, broken bodies, replays.

Every test here plays one attack against the live service on 127.0.0.1 (or
against the file it defends) and fails when the defence is removed.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import shutil
import socket
import ssl
import stat
import sys
import threading
import time

import httpx
import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from consortium.crypto import keys
from consortium.config import SimulationConfig
from consortium.data import load_builtin, load_schema, partition_iid
from consortium.deploy.agent import SiteAgent
from consortium.deploy.join import build_site
from consortium.deploy.local import provision_local
from consortium.deploy.mailbox import Mailbox
from consortium.deploy.provision import load_kit, provision
from consortium.deploy.serve import ServedRun
from consortium.deploy.service import HttpsServer, create_app
from consortium.errors import ConfigError
from consortium.privacy.ledger import BudgetLedger
from consortium.protocol import messages as m
from consortium.protocol.coordinator import COORDINATOR
from consortium.protocol.site import EvaluationJournal
from consortium.protocol.sealed import seal
from consortium.runs import write_atomic
from consortium.deploy.mailbox_transport import MailboxTransport
from tests import forkserver

SITES = ["site-1", "site-2", "site-3"]
AUDITOR = "auditor-1"
ROLES = {COORDINATOR: "coordinator", **{s: "site" for s in SITES}, AUDITOR: "auditor"}


@pytest.fixture(scope="module")
def kits(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hardening") / "c"
    provision(folder, sites=SITES, auditors=[AUDITOR], coordinator_address="127.0.0.1:8443", consortium="hospitals")
    return folder / "kits"


@pytest.fixture
def service(kits):
    """The coordinator's service with 10 s long polls, and its mailbox."""
    mailbox = Mailbox()
    server = HttpsServer(create_app(mailbox, ROLES, poll_wait_s=10.0), load_kit(kits / COORDINATOR), port=0)
    port = server.start()
    yield mailbox, f"https://127.0.0.1:{port}"
    mailbox.close()
    server.stop()


def _flood(url: str, kit, n: int) -> tuple[list[threading.Thread], list[int]]:
    """``n`` concurrent long polls with ``kit``'s certificate, each on a connection of its own."""
    context = kit.client_context()
    codes: list[int] = []

    def one() -> None:
        try:
            with httpx.Client(base_url=url, verify=context, timeout=30) as client:
                codes.append(client.post("/v1/poll").status_code)
        except httpx.HTTPError:
            codes.append(-1)

    threads = [threading.Thread(target=one, daemon=True) for _ in range(n)]
    for t in threads:
        t.start()
    return threads, codes


@pytest.mark.parametrize("flooder", ["site-1", AUDITOR])
def test_a_member_flooding_long_polls_starves_nobody(kits, service, flooder):
    """100 concurrent polls from one certificate (a site's, or an auditor's, who has no business polling):
    another site's health check, poll and reply still answer at once, and its stage completes."""
    mailbox, url = service
    threads, codes = _flood(url, load_kit(kits / flooder), 100)
    deadline = time.monotonic() + 5  # the flood is in: its excess answered, or (unbounded) all of it waiting
    while len(codes) < 90 and time.monotonic() < deadline:
        time.sleep(0.05)
    replies: dict[str, bytes] = {}
    stage = threading.Thread(target=lambda: replies.update(mailbox.run_stage({"site-2": b"request"}, 20)), daemon=True)
    stage.start()
    with httpx.Client(base_url=url, verify=load_kit(kits / "site-2").client_context(), timeout=30) as client:
        t0 = time.monotonic()
        assert client.get("/v1/health").json() == {"status": "running"}
        health_s = time.monotonic() - t0
        t0 = time.monotonic()
        assert client.post("/v1/poll").content == b"request"
        assert client.post("/v1/reply", content=b"answer").status_code == 202
        stage_s = time.monotonic() - t0
    stage.join(10)
    assert replies == {"site-2": b"answer"}
    assert health_s < 1.5 and stage_s < 2.0, (health_s, stage_s)
    mailbox.close()  # the polls still waiting (the flooder's own share) are told the run is over
    for t in threads:
        t.join(30)
    if flooder == AUDITOR:  # no business polling: refused outright, holding nothing
        assert set(codes) == {403}, codes
    else:  # a couple of polls wait their turn; the rest are told at once to come back later
        assert codes.count(429) >= 90 and set(codes) <= {204, 410, 429}, codes


def _site_client(kits, url: str, site: str = "site-2") -> httpx.Client:
    return httpx.Client(base_url=url, verify=load_kit(kits / site).client_context(), timeout=30)


def test_a_replayed_reply_is_refused_and_the_genuine_one_still_counts(kits, service):
    """A site's reply from an earlier round, replayed into this round's stage before the genuine reply,
    is refused when it arrives (400, its seal names round 1) and does not take the site's place: the
    genuine reply is taken (202) and the stage returns it. A copy of the genuine reply is then a replay (409)."""
    mailbox, url = service
    coordinator, site = keys.generate_ed25519()[0], keys.generate_ed25519()[0]
    directory = {COORDINATOR: keys.ed25519_public_bytes(coordinator.public_key()),
                 "site-2": keys.ed25519_public_bytes(site.public_key())}
    transport = MailboxTransport(mailbox, identity=coordinator, directory=directory, stage_timeout_s=20)
    old = seal(m.make_envelope("site-2", COORDINATOR, 1, m.Refusal(reason="round one's answer")), site)
    genuine = seal(m.make_envelope("site-2", COORDINATOR, 2, m.Refusal(reason="round two's answer")), site)
    got: list[m.Envelope | None] = []
    stage = threading.Thread(target=lambda: got.extend(transport.exchange_many(
        [m.make_envelope(COORDINATOR, "site-2", 2, m.Refusal(reason="a request"))])), daemon=True)
    stage.start()
    with _site_client(kits, url) as client:
        assert client.post("/v1/poll").status_code == 200  # its request
        garbage = client.post("/v1/reply", content=b"not a sealed message")
        assert garbage.status_code == 400 and "unsealed" in garbage.json()["detail"]
        replayed = client.post("/v1/reply", content=old)
        assert replayed.status_code == 400 and "round 1 where round 2 was expected" in replayed.json()["detail"]
        assert client.post("/v1/reply", content=genuine).status_code == 202
        assert client.post("/v1/reply", content=genuine).status_code == 409
    stage.join(10)
    assert len(got) == 1 and got[0] is not None and got[0].message.reason == "round two's answer"
    assert transport.rejected[1:] == ["site-2: a message for round 1 where round 2 was expected"]


def test_a_client_that_disconnects_mid_body_is_one_log_line(kits, service, caplog):
    """A reply that announces 100 kB and hangs up after 10 bytes: one warning line, no traceback."""
    _, url = service
    port = int(url.rsplit(":", 1)[1])
    kit = load_kit(kits / "site-2")
    context = kit.client_context()
    caplog.set_level(logging.INFO)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
            context.wrap_socket(raw, server_hostname="coordinator") as tls:
        tls.sendall(b"POST /v1/reply HTTP/1.1\r\nHost: coordinator\r\nContent-Type: application/octet-stream\r\n"
                    b"Content-Length: 100000\r\n\r\n" + b"x" * 10)
        time.sleep(0.3)
    deadline = time.monotonic() + 5
    while not any("disconnected" in r.getMessage() for r in caplog.records) and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)  # whatever else the server would say of it
    said = [r for r in caplog.records if r.name.startswith(("consortium", "uvicorn"))]
    assert [r.getMessage() for r in said] == ["site-2 disconnected after 10 bytes of its reply: nothing was taken"]
    assert all(r.exc_info is None for r in said)


def test_a_name_with_a_newline_never_forges_a_log_line(kits, tmp_path, caplog):
    """A certificate from the consortium's CA whose common name carries a newline and a forged line:
    the refusal is logged on one line, the newline escaped."""
    folder = kits.parent
    ca_key = serialization.load_pem_private_key((folder / "ca.key").read_bytes(), password=None)
    ca_cert = x509.load_pem_x509_certificate((folder / "ca.crt").read_bytes())
    forged_name = "site-1\nrefused TLS handshake: all is well"
    tls_key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, forged_name)]))
            .issuer_name(ca_cert.subject).public_key(tls_key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    (tmp_path / "tls.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "tls.key").write_bytes(tls_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                             serialization.NoEncryption()))
    context = ssl.create_default_context(cafile=str(folder / "ca.crt"))
    context.load_cert_chain(tmp_path / "tls.crt", tmp_path / "tls.key")
    mailbox = Mailbox()
    server = HttpsServer(create_app(mailbox, ROLES, poll_wait_s=0.1), load_kit(kits / COORDINATOR), port=0)
    port = server.start()
    try:
        with httpx.Client(base_url=f"https://127.0.0.1:{port}", verify=context, timeout=10) as client:
            assert client.post("/v1/poll").status_code == 403
    finally:
        server.stop()
    lines = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("consortium")).splitlines()
    assert lines == ["refused 403 site-1\\nrefused TLS handshake: all is well: "
                     "'site-1\\nrefused TLS handshake: all is well' is not a member that polls this coordinator (only sites do)"]


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    table = load_builtin("breast-cancer")
    parts = partition_iid(table.n_rows, len(SITES), np.random.default_rng(5))
    return provision_local(tmp_path_factory.mktemp("join") / "c", {s: table.take(i) for s, i in zip(SITES, parts)})


def test_a_sites_state_files_are_its_own(local, tmp_path):
    """Under the usual umask 022, the state folder is 0700 and the ledger, the evaluation journal and the
    transcript memory are 0600, as created and as written to; a loose file left from before is tightened."""
    state = tmp_path / "state"
    state.mkdir()
    old_umask = os.umask(0o022)
    try:
        (state / "evaluation.jsonl").write_text("")  # an older agent's journal, world-readable
        os.chmod(state / "evaluation.jsonl", 0o644)
        site = build_site(load_kit(local.kit("site-1")), local.data("site-1"), local.schema, state=state, test_seed=1)
        site._journal.append(1, 2, {"accuracy": 0.5, "loss": 0.25})
        write_atomic(state / "transcript-memory.json", b"{}")  # the memory's writer
        assert site.ledger.spent() == 0.0
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in state.iterdir()}
    assert {"budget.sqlite", "evaluation.jsonl", "transcript-memory.json"} <= set(modes)
    assert all(mode == 0o600 for mode in modes.values()), modes


def test_join_refuses_a_tls_key_that_others_can_read(local, tmp_path):
    """As for the identity key: a TLS key the group or others can read is refused, in one line naming the fix."""
    kit = tmp_path / "kit"
    shutil.copytree(local.kit("site-1"), kit)
    os.chmod(kit / "tls.key", 0o644)
    with pytest.raises(ConfigError, match=r"tls.key is accessible to others \(mode 0644\): run 'chmod 600"):
        load_kit(kit)
    joined = forkserver.run([sys.executable, "-m", "consortium.cli", "join", str(kit), "--data", str(local.data("site-1")),
                             "--schema", str(local.schema)], capture_output=True, text=True, timeout=120)
    assert joined.returncode != 0 and "accessible to others" in joined.stderr and "Traceback" not in joined.stderr
    assert len(joined.stderr.strip().splitlines()) == 1, joined.stderr
    os.chmod(kit / "tls.key", 0o600)
    assert load_kit(kit).member == "site-1"


def _served_run(local, out, state):
    """One run served in this process (1 round, test mode), each site's agent a thread built from its kit
    and its state folder, as ``consortium join`` builds it; the run's result and the sites."""
    raw = {"rounds": 1, "seed": 0, "participation": {"min_sites": 3}, "privacy": {"test_seed": 7, "epsilon": 3.0},
           "baselines": {"local_only": False, "pooled": False}}
    served = ServedRun(load_kit(local.kit(COORDINATOR)), SimulationConfig.model_validate(raw), load_schema(local.schema),
                       out=out, port=0, poll_wait_s=1.0, stage_timeout_s=60, pickup_timeout_s=20)
    port = served.server.start()
    sites = [build_site(load_kit(local.kit(s)), local.data(s), local.schema, state=state / s, test_seed=7) for s in SITES]
    agents = [SiteAgent(load_kit(local.kit(s.name)), s, base_url=f"https://127.0.0.1:{port}") for s in sites]
    threads = [threading.Thread(target=a.run, daemon=True) for a in agents]
    for t in threads:
        t.start()
    try:
        assert served.mailbox.wait_seen(served.names, since=0, timeout_s=30) == []
        result = served.run()
    finally:
        served.stop(grace_s=10)
        for t in threads:
            t.join(10)
    return result, sites


def test_a_second_run_on_the_same_kits_starts_and_each_ledger_carries_over(local, tmp_path):
    """Replay protection is per run: the round numbers and the last head a site remembers from one run do
    not refuse the next run's setup (they did: "a request for round 0 after round 1: refused as a replay"),
    while what each site spent stays in its ledger and counts against its cap in the next run."""
    first, sites = _served_run(local, tmp_path / "run-1", tmp_path / "state")
    assert first.summary["status"] == "completed"
    spent = {s.name: s.ledger.spent() for s in sites}
    second, sites = _served_run(local, tmp_path / "run-2", tmp_path / "state")
    assert second.summary["status"] == "completed" and [r.status for r in second.history] == ["ok"]
    for site in sites:
        assert site.ledger.spent() > spent[site.name] > 0  # both runs' rounds, in the one ledger
        assert len(site.ledger.history()) == 2


def test_the_ledger_and_the_journal_are_created_private_wherever_they_are(tmp_path):
    """Not only under ``join``: a ledger and an evaluation journal are created 0600 under umask 022."""
    old_umask = os.umask(0o022)
    try:
        ledger = BudgetLedger(tmp_path / "a" / "budget.sqlite", site="site-1", epsilon_cap=8.0, delta=1e-5)
        assert ledger.spent() == 0.0
        EvaluationJournal(tmp_path / "b" / "evaluation.jsonl").append(1, 2, {"accuracy": 0.5, "loss": 0.25})
    finally:
        os.umask(old_umask)
    for path in (tmp_path / "a" / "budget.sqlite", tmp_path / "b" / "evaluation.jsonl"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path


def test_a_request_taken_by_a_poll_whose_agent_died_waits_for_its_next_poll(kits, service):
    """An agent killed mid-poll leaves its long poll waiting on the coordinator; the stage's request must not
    be spent on that dead connection, or the restarted agent never gets it and the round goes on without it."""
    mailbox, url = service
    context = load_kit(kits / "site-2").client_context()
    dead = context.wrap_socket(socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1]))), server_hostname=COORDINATOR)
    dead.sendall(b"POST /v1/poll HTTP/1.1\r\nHost: coordinator\r\nContent-Length: 0\r\n\r\n")
    time.sleep(0.5)
    dead.close()  # the agent dies while its poll waits
    time.sleep(0.5)
    replies: dict = {}
    stage = threading.Thread(target=lambda: replies.update(mailbox.run_stage({"site-2": b"the request"}, timeout_s=8)))
    stage.start()
    time.sleep(1.0)  # the dead poll has taken the request by now
    with httpx.Client(base_url=url, verify=context, timeout=15) as restarted:
        answer = restarted.post("/v1/poll")
    mailbox.close()
    stage.join()
    assert answer.status_code == 200 and answer.content == b"the request"
