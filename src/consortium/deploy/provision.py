"""Provisioning a real consortium: a certificate authority and one kit per member.

``consortium init DIR --sites a,b,c --coordinator HOST:PORT`` creates:

    DIR/ca.crt, DIR/ca.key           the consortium's CA (the key stays with whoever provisions, 0600)
    DIR/consortium.json              the manifest: members, roles, certificate and key fingerprints
    DIR/agreement.yaml               a starting agreement with every member's public key filled in
    DIR/kits/<member>/               what each member installs, and nothing of anyone else's:
        kit.json                     its name, role, the coordinator's address, the files below
        ca.crt                       the CA certificate (trust anchor for mutual TLS)
        tls.crt, tls.key             its TLS certificate (its name as CN and SAN) and key (0600)
        identity.key                 its Ed25519 signing key (0600)
        consortium.json, agreement.yaml
        policy.yaml                  (sites) a starting site policy, as strict as the agreement

TLS keys are ECDSA P-256 (what every TLS stack accepts); certificates carry
the member's name as common name and subject alternative name, key usages for
their role (the coordinator serves and calls; sites and auditors are
clients), and a validity period. Every key is written 0600, created
exclusively; an existing folder is never overwritten. All of it through
``cryptography``'s X.509 support.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import re
import ssl
import stat
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from consortium.crypto import keys
from consortium.crypto.keyfile import save_identity_key, save_private_pem
from consortium.errors import ConfigError
from consortium.governance import policy as site_policy
from consortium.governance.agreement import parse_agreement, template
from consortium.protocol.messages import COORDINATOR
from consortium.runs import write_atomic

_NAME = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")  # \Z: "$" would accept a final newline
_HOST = re.compile(r"\A[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?\Z")
KIT_FILE = "kit.json"
MANIFEST_FILE = "consortium.json"


def parse_address(address: str) -> tuple[str, int]:
    """``HOST:PORT`` (an IPv6 host in brackets), checked; the error names the fix."""
    host, sep, port = address.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ConfigError(f"coordinator address '{address}' is not HOST:PORT with a port from 1 to 65535")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if not _HOST.match(host):
            raise ConfigError(f"coordinator host {host!r} is neither an IP address nor a DNS name") from None
    return host, int(port)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def _fingerprint(cert: x509.Certificate) -> str:
    return cert.fingerprint(hashes.SHA256()).hex()


def _san(name: str, host: str | None) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = [x509.DNSName(name)]
    if host is not None:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            entries.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(entries)


def _certificate(
    subject: x509.Name,
    public: ec.EllipticCurvePublicKey,
    issuer: x509.Name,
    issuer_key: ec.EllipticCurvePrivateKey,
    *,
    now: dt.datetime,
    days: int,
    ca: bool,
    usages: list[x509.ObjectIdentifier] | None = None,
    san: x509.SubjectAlternativeName | None = None,
) -> x509.Certificate:
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))  # tolerate small clock skew between members
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=not ca, content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=False, key_cert_sign=ca, crl_sign=ca, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), critical=False)
    )
    if usages:
        builder = builder.add_extension(x509.ExtendedKeyUsage(usages), critical=False)
    if san is not None:
        builder = builder.add_extension(san, critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


@dataclass(frozen=True)
class Provisioned:
    folder: Path
    manifest: dict[str, object]


def provision(
    folder: Path,
    *,
    sites: list[str],
    coordinator_address: str,
    consortium: str = "consortium",
    auditors: list[str] | None = None,
    days: int = 365,
    now: dt.datetime | None = None,
) -> Provisioned:
    """Create the CA, every member's keys and certificate, the manifest and one kit per member."""
    folder = Path(folder)
    if folder.exists() and any(folder.iterdir()):
        raise ConfigError(f"{folder} already exists and is not empty: provisioning never overwrites keys, choose a new folder")
    auditors = list(auditors or [])
    names = [*sites, *auditors]
    for name in [consortium, *names]:
        if not _NAME.match(name):
            raise ConfigError(f"{name!r} is not a valid name: letters, digits, '.', '_' and '-', starting with a letter or digit")
    if len(sites) < 2:
        raise ConfigError("a consortium needs at least 2 sites: list them with --sites a,b")
    if len(set(names)) != len(names) or COORDINATOR in names:
        raise ConfigError(f"member names must be unique and not '{COORDINATOR}', which names the coordinator")
    if not 1 <= days <= 3650:
        raise ConfigError(f"certificates valid for {days} days: choose 1 to 3650")
    host, port = parse_address(coordinator_address)
    now = now or dt.datetime.now(dt.UTC)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, consortium),
        x509.NameAttribute(NameOID.COMMON_NAME, f"{consortium} consortium CA"),
    ])
    ca_cert = _certificate(ca_name, ca_key.public_key(), ca_name, ca_key, now=now, days=days, ca=True)
    folder.mkdir(parents=True, exist_ok=True)
    save_private_pem(folder / "ca.key", _pem_key(ca_key))
    ca_pem = ca_cert.public_bytes(serialization.Encoding.PEM)
    write_atomic(folder / "ca.crt", ca_pem)

    roles = {COORDINATOR: "coordinator", **{s: "site" for s in sites}, **{a: "auditor" for a in auditors}}
    members: dict[str, dict[str, str]] = {}
    material: dict[str, tuple[bytes, bytes, object]] = {}
    for name, role in roles.items():
        tls_key = ec.generate_private_key(ec.SECP256R1())
        usages = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH] if role == "coordinator" else [
            ExtendedKeyUsageOID.CLIENT_AUTH
        ]
        subject = x509.Name([
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, consortium),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role),
            x509.NameAttribute(NameOID.COMMON_NAME, name),
        ])
        cert = _certificate(
            subject, tls_key.public_key(), ca_name, ca_key, now=now, days=days, ca=False, usages=usages,
            san=_san(name, host if role == "coordinator" else None),
        )
        identity, public = keys.generate_ed25519()
        members[name] = {
            "role": role,
            "tls_certificate_sha256": _fingerprint(cert),
            "public_key": keys.ed25519_public_bytes(public).hex(),
        }
        material[name] = (cert.public_bytes(serialization.Encoding.PEM), _pem_key(tls_key), identity)

    manifest: dict[str, object] = {
        "version": 1,
        "consortium": consortium,
        "coordinator": {"host": host, "port": port},
        "ca_certificate_sha256": _fingerprint(ca_cert),
        "not_valid_after": (now + dt.timedelta(days=days)).isoformat(),
        "members": members,
    }
    manifest_bytes = (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode()
    write_atomic(folder / MANIFEST_FILE, manifest_bytes)
    agreement_text = _agreement_with_keys(consortium, sites, auditors, members)
    agreement = parse_agreement(agreement_text, source=str(folder / "agreement.yaml"))
    write_atomic(folder / "agreement.yaml", agreement_text.encode())

    for name, (cert_pem, tls_pem, identity) in material.items():
        kit = folder / "kits" / name
        write_atomic(kit / "ca.crt", ca_pem)
        write_atomic(kit / "tls.crt", cert_pem)
        save_private_pem(kit / "tls.key", tls_pem)
        save_identity_key(kit / "identity.key", identity)  # type: ignore[arg-type]
        write_atomic(kit / MANIFEST_FILE, manifest_bytes)
        write_atomic(kit / "agreement.yaml", agreement_text.encode())
        if roles[name] == "site":
            write_atomic(kit / "policy.yaml", site_policy.template(name, agreement).encode())
        write_atomic(kit / KIT_FILE, (json.dumps({
            "member": name,
            "role": roles[name],
            "consortium": consortium,
            "coordinator": {"host": host, "port": port},
            "files": {"ca": "ca.crt", "certificate": "tls.crt", "key": "tls.key", "identity": "identity.key"},
        }, indent=1) + "\n").encode())
    return Provisioned(folder, manifest)


def _agreement_with_keys(consortium: str, sites: list[str], auditors: list[str], members: dict[str, dict[str, str]]) -> str:
    text = template(consortium, sites)
    if auditors:
        extra = "".join(f"\n  - {{name: {a}, role: auditor}}" for a in auditors)
        last = f"  - {{name: {sites[-1]}, role: site}}"
        text = text.replace(last, last + extra)
    for name, m in members.items():
        text = text.replace(f"{{name: {name}, role:", f"{{name: {name}, public_key: {m['public_key']}, role:")
    return text


# -- a member's kit, loaded --------------------------------------------------------------------


@dataclass(frozen=True)
class Kit:
    """One member's kit: who it is, where the coordinator is, and TLS contexts that require the peer's certificate."""

    folder: Path
    member: str
    role: str
    host: str
    port: int

    def _path(self, name: str) -> str:
        return str(self.folder / name)

    def server_context(self) -> ssl.SSLContext:
        """The coordinator's: TLS 1.3, and a client certificate from the consortium's CA is required."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.load_cert_chain(self._path("tls.crt"), self._path("tls.key"))
        ctx.load_verify_locations(self._path("ca.crt"))
        ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx

    def client_context(self) -> ssl.SSLContext:
        """A member's, towards the coordinator: its own certificate, and only the consortium's CA trusted."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.load_cert_chain(self._path("tls.crt"), self._path("tls.key"))
        ctx.load_verify_locations(self._path("ca.crt"))  # and no system CAs
        ctx.check_hostname = True
        return ctx


def load_kit(folder: Path) -> Kit:
    folder = Path(folder)
    path = folder / KIT_FILE
    if not path.exists():
        raise ConfigError(f"{folder} is not a member's kit (no {KIT_FILE}): pass a folder under DIR/kits from 'consortium init'")
    try:
        data = json.loads(path.read_text())
        kit = Kit(folder, data["member"], data["role"], data["coordinator"]["host"], int(data["coordinator"]["port"]))
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{path} is damaged ({type(exc).__name__}): restore it from the provisioned kit") from None
    for name in ("ca.crt", "tls.crt", "tls.key", "identity.key"):
        if not (folder / name).exists():
            raise ConfigError(f"{folder / name} is missing: the kit is incomplete, restore it from the provisioned kit")
    for name in ("tls.key", "identity.key"):
        require_private(folder / name)
    cert = x509.load_pem_x509_certificate((folder / "tls.crt").read_bytes())
    if dt.datetime.now(dt.UTC) > cert.not_valid_after_utc:
        raise ConfigError(
            f"{folder / 'tls.crt'} expired on {cert.not_valid_after_utc:%Y-%m-%d}: ask the consortium's provisioner for a new kit"
        )
    return kit


def require_private(path: Path) -> None:
    """Refuse a private key file that its group or others can read or change (the TLS key as the identity
    key): such a key may already be someone else's too, and a connection made with it proves nothing."""
    mode = path.stat().st_mode
    if not stat.S_ISREG(mode):
        raise ConfigError(f"key file {path} is not a regular file")
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(
            f"key file {path} is accessible to others (mode {stat.S_IMODE(mode):04o}): "
            f"run 'chmod 600 {path}' if it was not exposed, otherwise ask for a new kit"
        )


def certificate_member(der: bytes) -> str:
    """The member a peer certificate names (its common name); the TLS layer has already checked the chain."""
    cert = x509.load_der_x509_certificate(der)
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(names) != 1:
        raise ConfigError("the peer certificate names no single member")
    return str(names[0].value)
