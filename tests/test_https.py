"""The protocol over real mutual TLS on 127.0.0.1: the coordinator's HTTPS service, sites polling it.

The coordinator and the sites are the simulation's own state machines; only
the transport differs. In test mode (every seed fixed, DP noise included) a
secure, private run over HTTPS must end with exactly the model of its
in-process twin.
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
import socket
import ssl
import threading
import time

import httpx
import numpy as np
import pytest

from consortium.config import SimulationConfig
from consortium.crypto.keyfile import load_identity_key
from consortium.deploy.agent import SiteAgent
from consortium.deploy.mailbox import Mailbox
from consortium.deploy.provision import Kit, load_kit, provision
from consortium.deploy.service import HttpsServer, create_app
from consortium.governance.agreement import load_agreement, sign_agreement, signatures_path
from consortium.protocol.coordinator import COORDINATOR
from consortium.run.simulation import Simulation
from consortium.deploy.mailbox_transport import MailboxTransport
from consortium.audit.verify import verify_run

SITES = ["site-1", "site-2", "site-3"]
AUDITOR = "auditor-1"


@pytest.fixture(scope="module")
def consortium_dir(tmp_path_factory):
    """Kits for three sites and an auditor, and their agreement signed by every approver with the kits' own keys."""
    folder = tmp_path_factory.mktemp("https") / "hospitals"
    provision(folder, sites=SITES, auditors=[AUDITOR], coordinator_address="127.0.0.1:8443", consortium="hospitals")
    keys_dir = folder / "keys"
    keys_dir.mkdir()
    for member in [COORDINATOR, *SITES, AUDITOR]:
        shutil.copy2(folder / "kits" / member / "identity.key", keys_dir / f"{member}.key")
    agreement = load_agreement(folder / "agreement.yaml")
    signatures = {m: sign_agreement(agreement, m, load_identity_key(keys_dir / f"{m}.key")) for m in agreement.approvers()}
    signatures_path(folder / "agreement.yaml").write_text(json.dumps(signatures))
    return folder


def _config(folder, **over) -> SimulationConfig:
    raw = {
        "rounds": 2, "data": {"dataset": "breast-cancer", "sites": 3}, "participation": {"min_sites": 3},
        "privacy": {"test_seed": 7}, "baselines": {"local_only": False, "pooled": False},
        "agreement": {"file": str(folder / "agreement.yaml"), "keys": str(folder / "keys")},
    }
    raw.update(over)
    return SimulationConfig.model_validate(raw)


class Deployment:
    """The coordinator's service on a free port, and one polling agent per site, in threads."""

    def __init__(self, folder, sim: Simulation) -> None:
        self.mailbox = Mailbox()
        roles = {m.name: m.role for m in load_agreement(folder / "agreement.yaml").members}
        self.server = HttpsServer(create_app(self.mailbox, roles, poll_wait_s=2.0), load_kit(folder / "kits" / COORDINATOR), port=0)
        self.port = self.server.start()
        self.url = f"https://127.0.0.1:{self.port}"
        self.agents = [SiteAgent(load_kit(folder / "kits" / n), sim._sites[n], base_url=self.url) for n in SITES]
        self.threads = [threading.Thread(target=a.run, daemon=True) for a in self.agents]
        for t in self.threads:
            t.start()
        sim.transport = MailboxTransport(
            self.mailbox, identity=sim._identity, directory=sim._directory, stage_timeout_s=60
        )

    def close(self) -> None:
        self.mailbox.close()
        for t in self.threads:
            t.join(30)
        self.server.stop()


def test_a_secure_private_run_over_mutual_tls_equals_its_in_process_twin(consortium_dir, tmp_path):
    twin = Simulation(_config(consortium_dir), out=tmp_path / "in-process").run()

    sim = Simulation(_config(consortium_dir), out=tmp_path / "https")
    deployment = Deployment(consortium_dir, sim)
    try:
        result = sim.run()
    finally:
        deployment.close()
    assert all(not t.is_alive() for t in deployment.threads)  # told the run is over (410), they stopped
    assert result.summary["status"] == "completed" and result.summary["secure_aggregation"]["enabled"]
    assert result.summary["transcript"]["verified"] and verify_run(tmp_path / "https").status == "completed"
    assert np.array_equal(result.params, twin.params)  # test mode: the same model, bit for bit
    other = Simulation(_config(consortium_dir, privacy={"test_seed": 8}), out=tmp_path / "other-seed").run()
    assert not np.array_equal(other.params, twin.params)  # ...and that equality is not vacuous
    assert result.summary["federated"]["accuracy"] == twin.summary["federated"]["accuracy"]
    assert all(a.answered > 10 for a in deployment.agents)  # every stage of every round went over HTTPS
    assert result.summary["traffic_bytes"]["to_coordinator"] > 0


def test_a_run_completes_while_the_auditor_floods_the_service_with_polls(consortium_dir, tmp_path):
    """100 clients with the auditor's certificate poll without pause for the whole run (such a flood once
    held every worker thread, and the run halted: "only 0 sites co-signed"): refused at once, they hold
    nothing, and the run completes."""
    sim = Simulation(_config(consortium_dir, rounds=1), out=tmp_path / "flooded")
    deployment = Deployment(consortium_dir, sim)
    stop, refused = threading.Event(), []
    context = load_kit(consortium_dir / "kits" / AUDITOR).client_context()

    def flood() -> None:
        with httpx.Client(base_url=deployment.url, verify=context, timeout=30) as client:
            while not stop.is_set():
                refused.append(client.post("/v1/poll").status_code)
                stop.wait(0.2)  # a hundred of these: some 500 polls a second

    flooders = [threading.Thread(target=flood, daemon=True) for _ in range(100)]
    for t in flooders:
        t.start()
    try:
        t0 = time.monotonic()
        result = sim.run()
        elapsed = time.monotonic() - t0
    finally:
        stop.set()
        deployment.close()
        for t in flooders:
            t.join(30)
    assert result.summary["status"] == "completed" and [r.status for r in result.history] == ["ok"]
    assert len(refused) > 100 and set(refused) == {403} and elapsed < 60


def test_the_service_refuses_strangers_unsolicited_and_oversized_messages(consortium_dir, tmp_path, caplog):
    mailbox = Mailbox()
    roles = {m.name: m.role for m in load_agreement(consortium_dir / "agreement.yaml").members}
    server = HttpsServer(create_app(mailbox, roles, poll_wait_s=0.2, max_message_bytes=1024),
                         load_kit(consortium_dir / "kits" / COORDINATOR), port=0)
    port = server.start()
    url = f"https://127.0.0.1:{port}"
    try:
        site = load_kit(consortium_dir / "kits" / "site-1")
        with httpx.Client(base_url=url, verify=site.client_context()) as client:
            assert client.get("/v1/health").json() == {"status": "running"}
            assert client.post("/v1/poll").status_code == 204  # nothing for it yet
            unsolicited = client.post("/v1/reply", content=b"x" * 10)
            assert unsolicited.status_code == 409 and "was not asked" in unsolicited.json()["detail"]
            big = client.post("/v1/reply", content=b"x" * 2048)
            assert big.status_code == 413
            assert "openapi" in client.get("/openapi.json").json()
        coordinator = load_kit(consortium_dir / "kits" / COORDINATOR)
        with httpx.Client(base_url=url, verify=coordinator.client_context()) as client:
            assert client.post("/v1/poll").status_code == 403  # a valid certificate, but not a member that polls
        # A stage: the request goes to its site once, and only that site's reply is taken, once.
        stage = threading.Thread(target=lambda: mailbox.run_stage({"site-1": b"request"}, 10), daemon=True)
        stage.start()
        with httpx.Client(base_url=url, verify=site.client_context()) as client:
            assert client.post("/v1/poll").content == b"request"
            assert client.post("/v1/reply", content=b"answer").status_code == 202
            assert client.post("/v1/reply", content=b"again").status_code == 409  # a replay
        stage.join(10)
        assert "refused 409 site-1: 'site-1' was not asked in this stage, or has answered already (a replay?)" in caplog.text
        assert "refused 413 site-1: a message may carry at most 1024 bytes" in caplog.text
        assert "refused 403 coordinator" in caplog.text
        mailbox.close()
        with httpx.Client(base_url=url, verify=site.client_context()) as client:
            assert client.post("/v1/poll").status_code == 410
    finally:
        server.stop()


def test_a_stage_stops_waiting_for_a_site_that_falls_silent_but_not_for_one_that_works():
    mailbox = Mailbox()
    replies = {}

    def stage():
        replies.update(mailbox.run_stage({"quick": b"q", "busy": b"b", "gone": b"g"}, timeout_s=30, pickup_s=0.6))

    t0 = time.monotonic()
    runner = threading.Thread(target=stage)
    runner.start()
    assert mailbox.take("quick", 5) == b"q" and mailbox.put_reply("quick", b"Q")
    assert mailbox.take("busy", 5) == b"b"  # "gone" never takes its request
    for _ in range(5):  # busy works for 1.5 s, saying so every 0.3 s: well past the 0.6 s pickup
        time.sleep(0.3)
        mailbox.heartbeat("busy")
    assert runner.is_alive()  # still waiting for busy, though "gone" was given up on
    assert mailbox.put_reply("busy", b"B")
    runner.join(5)
    assert replies == {"quick": b"Q", "busy": b"B"} and time.monotonic() - t0 < 5
    # A site that takes its request and falls silent is given up on after the pickup time, not the stage's 30 s.
    t0 = time.monotonic()
    runner = threading.Thread(target=lambda: replies.update(mailbox.run_stage({"dies": b"d"}, timeout_s=30, pickup_s=0.6)))
    runner.start()
    assert mailbox.take("dies", 5) == b"d"
    runner.join(10)
    assert not runner.is_alive() and time.monotonic() - t0 < 3


def test_closing_counts_a_poll_it_ends_as_the_site_being_told():
    """A site long-polling when the run ends is answered at once that it is over: the coordinator need not
    wait for a poll that will never come (it did, for its whole grace period, before every shutdown)."""
    mailbox = Mailbox()
    poller = threading.Thread(target=lambda: mailbox.take("site-1", 20))
    poller.start()
    time.sleep(0.2)  # site-1 is in its long poll
    closed = time.monotonic()
    mailbox.close()
    assert mailbox.wait_seen(["site-1"], since=closed, timeout_s=10) == []
    assert time.monotonic() - closed < 2
    poller.join(5)
    assert mailbox.wait_seen(["site-2"], since=closed, timeout_s=0.3) == ["site-2"]  # one that never polled is not


def _handshake(port: int, cert_dir=None) -> None:
    """Connect as a careless client (it checks nothing itself), presenting the certificate in ``cert_dir``, if any."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    if cert_dir is not None:
        ctx.load_cert_chain(cert_dir / "tls.crt", cert_dir / "tls.key")
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, ctx.wrap_socket(raw) as tls:
            tls.sendall(b"GET /v1/health HTTP/1.1\r\nHost: coordinator\r\n\r\n")
            assert tls.recv(100) == b""  # TLS 1.3: the refusal arrives after the client's side of the handshake
    except (ssl.SSLError, ConnectionError):
        pass


def test_strangers_and_expired_certificates_are_refused_at_the_handshake_with_a_log_line(consortium_dir, tmp_path, caplog):
    members = {COORDINATOR: "coordinator", **{s: "site" for s in SITES}}
    other = provision(tmp_path / "other", sites=SITES, coordinator_address="127.0.0.1:8443", consortium="hospitals")
    old = provision(tmp_path / "old", sites=SITES, coordinator_address="127.0.0.1:8443", consortium="hospitals",
                    now=dt.datetime.now(dt.UTC) - dt.timedelta(days=10), days=2)  # every certificate long expired
    ours = HttpsServer(create_app(Mailbox(), members), load_kit(consortium_dir / "kits" / COORDINATOR), port=0)
    theirs = HttpsServer(create_app(Mailbox(), members),  # the old consortium's coordinator, its CA still trusted
                         Kit(old.folder / "kits" / COORDINATOR, COORDINATOR, "coordinator", "127.0.0.1", 0), port=0)
    port, old_port = ours.start(), theirs.start()
    try:
        _handshake(port, other.folder / "kits" / "site-1")  # a certificate from another consortium's CA
        _handshake(port, None)  # no certificate at all
        _handshake(old_port, old.folder / "kits" / "site-1")  # the right CA, but expired
        time.sleep(0.5)
    finally:
        ours.stop()
        theirs.stop()
    refused = [r.getMessage() for r in caplog.records if r.getMessage().startswith("refused TLS handshake")]
    assert len(refused) == 3, refused
    assert "unable to get local issuer certificate" in refused[0]
    assert "certificate" in refused[1].split("(")[0]
    assert "certificate has expired" in refused[2]
