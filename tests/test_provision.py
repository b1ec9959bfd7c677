"""Provisioning: a consortium CA and one kit per member, and mutual TLS between them on loopback.

The handshakes are real (Python's ssl over 127.0.0.1): a member's kit gets
through; a certificate from another consortium's CA, an expired one, or none
at all does not.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import socket
import ssl
import stat
import sys
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import ExtendedKeyUsageOID

from consortium.crypto import keys
from consortium.crypto.keyfile import load_identity_key
from consortium.deploy.provision import Kit, certificate_member, load_kit, parse_address, provision
from consortium.errors import ConfigError
from consortium.governance.agreement import load_agreement
from consortium.governance.policy import load_policy
from tests import forkserver


@pytest.fixture(scope="module")
def prov(tmp_path_factory):
    folder = tmp_path_factory.mktemp("prov") / "hospitals"
    provision(folder, sites=["a", "b", "c"], coordinator_address="127.0.0.1:8443", consortium="hospitals", auditors=["audit"])
    return folder


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_every_member_gets_a_kit_with_only_its_own_secrets(prov):
    manifest = json.loads((prov / "consortium.json").read_text())
    assert sorted(manifest["members"]) == ["a", "audit", "b", "c", "coordinator"]
    assert manifest["coordinator"] == {"host": "127.0.0.1", "port": 8443}
    ca = _cert(prov / "ca.crt")
    for name, member in manifest["members"].items():
        kit = prov / "kits" / name
        for secret in ("tls.key", "identity.key"):
            assert stat.S_IMODE(os.stat(kit / secret).st_mode) == 0o600
        assert not (kit / "ca.key").exists()
        cert = _cert(kit / "tls.crt")
        cert.verify_directly_issued_by(ca)  # signed by the consortium's CA
        assert cert.subject.rfc4514_string().startswith(f"CN={name},OU={member['role']}")
        assert cert.fingerprint(hashes.SHA256()).hex() == member["tls_certificate_sha256"]
        usages = set(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
        assert (ExtendedKeyUsageOID.SERVER_AUTH in usages) == (name == "coordinator")
        identity = load_identity_key(kit / "identity.key")
        assert keys.ed25519_public_bytes(identity.public_key()).hex() == member["public_key"]
    assert stat.S_IMODE(os.stat(prov / "ca.key").st_mode) == 0o600
    coordinator = _cert(prov / "kits" / "coordinator" / "tls.crt")
    san = coordinator.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "coordinator" in san.get_values_for_type(x509.DNSName)
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]


def test_the_agreement_names_every_members_key_and_each_site_gets_a_valid_policy(prov):
    agreement = load_agreement(prov / "agreement.yaml")
    manifest = json.loads((prov / "consortium.json").read_text())
    assert {m.name: m.public_key for m in agreement.members} == {n: m["public_key"] for n, m in manifest["members"].items()}
    assert {m.name: m.role for m in agreement.members}["audit"] == "auditor"
    for site in ("a", "b", "c"):
        assert load_policy(prov / "kits" / site / "policy.yaml", agreement).site == site
    assert not (prov / "kits" / "coordinator" / "policy.yaml").exists()


@pytest.mark.parametrize("kwargs,message", [
    ({"coordinator_address": "example.org"}, "not HOST:PORT"),
    ({"coordinator_address": "127.0.0.1:70000"}, "port from 1 to 65535"),
    ({"coordinator_address": "bad host!:80"}, "neither an IP address nor a DNS name"),
    ({"sites": ["a"]}, "at least 2 sites"),
    ({"sites": ["a", "a"]}, "unique"),
    ({"sites": ["a", "coordinator"]}, "unique and not 'coordinator'"),
    ({"sites": ["a", "b/../c"]}, "not a valid name"),
    ({"days": 0}, "choose 1 to 3650"),
])
def test_bad_provisioning_requests_are_refused_before_anything_is_written(tmp_path, kwargs, message):
    args = {"sites": ["a", "b"], "coordinator_address": "127.0.0.1:8443", **kwargs}
    with pytest.raises(ConfigError, match=message):
        provision(tmp_path / "out", **args)
    assert not (tmp_path / "out").exists()


def test_an_existing_folder_is_never_overwritten(prov):
    before = (prov / "ca.key").read_bytes()
    result = forkserver.run(
        [sys.executable, "-m", "consortium.cli", "init", str(prov), "--sites", "a,b", "--coordinator", "127.0.0.1:1"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2 and "never overwrites keys" in result.stderr and "Traceback" not in result.stderr
    assert (prov / "ca.key").read_bytes() == before


def test_addresses():
    assert parse_address("[::1]:443") == ("::1", 443)
    assert parse_address("coord.example.org:8443") == ("coord.example.org", 8443)


# -- mutual TLS on loopback ---------------------------------------------------------------------


def _serve_once(ctx: ssl.SSLContext) -> tuple[int, dict]:
    """Accept one connection; record whom the client certificate names, or why the handshake failed."""
    listener = socket.create_server(("127.0.0.1", 0))
    outcome: dict = {}

    def run():
        conn, _ = listener.accept()
        try:
            with ctx.wrap_socket(conn, server_side=True) as tls:
                outcome["member"] = certificate_member(tls.getpeercert(binary_form=True))
                tls.sendall(outcome["member"].encode())
        except (ssl.SSLError, OSError) as exc:
            outcome["error"] = str(exc)
        finally:
            listener.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    outcome["thread"] = thread
    return listener.getsockname()[1], outcome


def _connect(port: int, ctx: ssl.SSLContext, hostname: str = "127.0.0.1") -> str:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, ctx.wrap_socket(raw, server_hostname=hostname) as tls:
        return tls.recv(100).decode()


def test_a_site_and_the_coordinator_authenticate_each_other(prov):
    server = load_kit(prov / "kits" / "coordinator")
    port, outcome = _serve_once(server.server_context())
    assert _connect(port, load_kit(prov / "kits" / "b").client_context()) == "b"
    outcome["thread"].join(10)
    assert outcome.get("member") == "b"


def _refused(server: Kit, client_ctx: ssl.SSLContext) -> dict:
    port, outcome = _serve_once(server.server_context())
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        reply = _connect(port, client_ctx)
        if not reply:  # TLS 1.3: the client may finish first and only see the server's refusal on reading
            raise ConnectionError("closed")
    outcome["thread"].join(10)
    assert "member" not in outcome
    return outcome


def test_a_certificate_from_another_consortium_is_refused(prov, tmp_path):
    provision(tmp_path / "other", sites=["a", "b"], coordinator_address="127.0.0.1:8443")
    # A client that trusts our coordinator but presents a certificate our CA never issued.
    stranger = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    stranger.load_cert_chain(tmp_path / "other" / "kits" / "a" / "tls.crt", tmp_path / "other" / "kits" / "a" / "tls.key")
    stranger.load_verify_locations(prov / "ca.crt")
    outcome = _refused(load_kit(prov / "kits" / "coordinator"), stranger)
    assert "certificate verify failed" in outcome["error"]
    # ...and a member does not talk to a coordinator of another consortium either.
    port, _ = _serve_once(load_kit(tmp_path / "other" / "kits" / "coordinator").server_context())
    with pytest.raises(ssl.SSLCertVerificationError):
        _connect(port, load_kit(prov / "kits" / "a").client_context())


def test_an_expired_certificate_is_refused_and_its_kit_says_so(prov, tmp_path):
    old = dt.datetime.now(dt.UTC) - dt.timedelta(days=30)
    provision(tmp_path / "old", sites=["a", "b"], coordinator_address="127.0.0.1:8443", days=2, now=old)
    with pytest.raises(ConfigError, match=r"tls.crt expired on .*: ask the consortium's provisioner for a new kit"):
        load_kit(tmp_path / "old" / "kits" / "a")
    expired = Kit(tmp_path / "old" / "kits" / "a", "a", "site", "127.0.0.1", 8443)
    server = Kit(tmp_path / "old" / "kits" / "coordinator", "coordinator", "coordinator", "127.0.0.1", 8443)
    with pytest.raises(ssl.SSLCertVerificationError, match="expired"):  # the member sees the coordinator's has expired
        port, _ = _serve_once(server.server_context())
        _connect(port, expired.client_context())
    # And the coordinator refuses the member's expired certificate, even from a client that checks nothing itself.
    careless = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    careless.check_hostname, careless.verify_mode = False, ssl.CERT_NONE
    careless.load_cert_chain(expired.folder / "tls.crt", expired.folder / "tls.key")
    assert "certificate has expired" in _refused(server, careless)["error"]


def test_a_client_without_a_certificate_is_refused(prov):
    anonymous = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    anonymous.load_verify_locations(str(prov / "kits" / "a" / "ca.crt"))
    outcome = _refused(load_kit(prov / "kits" / "coordinator"), anonymous)
    assert "certificate" in outcome["error"]
