"""Identity keys on disk: an Ed25519 private key in a file only its owner can read.

A member's signing key is written as PKCS#8 PEM with mode 0600, created
exclusively (never over an existing key) and renamed into place, so a crash
leaves either no key or the whole key. Loading refuses a key file that its
group or others can read or write: such a key may already be someone else's
as well, and signatures made with it prove nothing.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from consortium.errors import ConfigError


def save_identity_key(path: Path, key: Ed25519PrivateKey) -> None:
    """Write ``key`` to ``path`` (mode 0600); refuses to overwrite an existing file."""
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    save_private_pem(path, pem)


def save_private_pem(path: Path, pem: bytes) -> None:
    """Any private key, as PEM: mode 0600 from the first byte, complete or absent after a crash, never over a file."""
    path = Path(path)
    if path.exists():
        raise ConfigError(f"key file {path} already exists: a private key is never overwritten")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, pem)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.chmod(tmp, 0o600)  # whatever the umask
    try:
        os.link(tmp, path)  # fails if the key appeared meanwhile: never replaced
    finally:
        tmp.unlink()


def load_identity_key(path: Path) -> Ed25519PrivateKey:
    """Read an identity key, refusing one that anybody but its owner can read or change."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise ConfigError(f"key file {path} does not exist: pass the member's key file") from None
    if not stat.S_ISREG(mode):
        raise ConfigError(f"key file {path} is not a regular file")
    loose = mode & (stat.S_IRWXG | stat.S_IRWXO)
    if loose:
        raise ConfigError(
            f"key file {path} is accessible to others (mode {stat.S_IMODE(mode):04o}): "
            f"run 'chmod 600 {path}' if it was not exposed, otherwise replace the key"
        )
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError):
        raise ConfigError(f"key file {path} does not hold a PEM private key") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"key file {path} holds a {type(key).__name__}, not an Ed25519 identity key")
    return key
