"""Authenticated encryption of Shamir shares between two sites.

In SecAgg (Bonawitz et al., CCS 2017, Sec. 4, round ShareKeys) each site
sends its shares to every neighbour *through the coordinator*, encrypted
under a key agreed with that neighbour, so the coordinator relays bytes it
cannot read or alter.

- ``derive_key``: X25519 (RFC 7748) shared secret, then HKDF-SHA256
  (RFC 5869) with no salt and a caller-chosen ``info`` that binds the
  context, for example ``b"consortium/secagg/share-key/v1" + round + sorted
  pair of site names``. Different contexts give independent keys.
- ``derive_keys``: several such keys from one X25519 agreement, one per
  ``info`` (the share key and the acknowledgement key of one pair of sites).
- ``mac`` / ``check_mac``: HMAC-SHA256 (RFC 2104) under such a key, for a
  statement one site addresses to one neighbour: only the two of them hold
  the key, so it convinces that neighbour as a signature would, for a
  fraction of an Ed25519 verification.
- ``seal`` / ``open_``: AES-256-GCM (NIST SP 800-38D) with a fresh random
  12-byte nonce prepended: ``nonce || ciphertext || 16-byte tag``. Random
  nonces are safe for far more than 2^32 messages per key (SP 800-38D,
  Sec. 8.3); SecAgg sends a handful per key.

``open_`` raises ``DecryptionError`` on every failure (a flipped bit, other
associated data, another key, a truncated input), as Fernet raises
``InvalidToken``: the caller cannot forget to check a bool; ``check_mac``
raises ``MacError`` likewise.
"""

from __future__ import annotations

import os

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, hmac
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from consortium.crypto.keys import CryptoError, exchange

__all__ = [
    "DecryptionError",
    "KEY_BYTES",
    "MacError",
    "NONCE_BYTES",
    "TAG_BYTES",
    "check_mac",
    "derive_key",
    "derive_keys",
    "mac",
    "seal",
    "open_",
]

KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16

_FAILED = "ciphertext failed authentication: it was tampered with or sent to the wrong recipient"


class DecryptionError(CryptoError):
    """A ciphertext that does not authenticate under this key and associated data."""


class MacError(CryptoError):
    """A message authentication code that does not match its statement under this key."""


def _key(key: bytes) -> bytes:
    if not isinstance(key, (bytes, bytearray, memoryview)) or len(key) != KEY_BYTES:
        raise CryptoError(f"an AES-256-GCM or HMAC key must be {KEY_BYTES} bytes: derive it with derive_key")
    return bytes(key)


def derive_key(own_private_x25519: X25519PrivateKey, peer_public_bytes: bytes, *, info: bytes) -> bytes:
    """A 32-byte symmetric key shared with the owner of ``peer_public_bytes``.

    HKDF-SHA256 (salt None) over the X25519 shared secret; ``info`` must be
    non-empty and should name the purpose, the round and both parties so a
    key never serves two contexts. Both sides get the same key when they
    pass the same ``info``.
    """
    return derive_keys(own_private_x25519, peer_public_bytes, infos=(info,))[0]


def derive_keys(own_private_x25519: X25519PrivateKey, peer_public_bytes: bytes, *, infos: tuple[bytes, ...]) -> tuple[bytes, ...]:
    """``derive_key`` for each of ``infos``, from one X25519 agreement: independent keys, one per purpose."""
    if not infos or any(not isinstance(info, bytes) or not info for info in infos) or len(set(infos)) != len(infos):
        raise CryptoError(
            "derive_keys needs distinct non-empty infos (purpose, round and sorted site names) to bind each key to its context"
        )
    secret = exchange(own_private_x25519, peer_public_bytes)
    return tuple(HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=info).derive(secret) for info in infos)


def _hmac(key: bytes, data: bytes) -> hmac.HMAC:
    h = hmac.HMAC(_key(key), hashes.SHA256())
    h.update(bytes(data))
    return h


def mac(key: bytes, data: bytes) -> bytes:
    """HMAC-SHA256 of ``data`` under ``key`` (32 bytes)."""
    return _hmac(key, data).finalize()


def check_mac(key: bytes, tag: bytes, data: bytes) -> None:
    """Raise ``MacError`` unless ``tag`` is ``mac(key, data)`` (compared in constant time)."""
    try:
        _hmac(key, data).verify(bytes(tag))
    except InvalidSignature:
        raise MacError("authentication code does not match: the statement was altered or not made by the key's other holder") from None


def seal(key: bytes, plaintext: bytes, *, associated_data: bytes) -> bytes:
    """Encrypt and authenticate: ``nonce(12) || ciphertext || tag(16)``.

    ``associated_data`` is authenticated but not encrypted: put the sender,
    recipient and round there so a ciphertext cannot be replayed elsewhere.
    """
    nonce = os.urandom(NONCE_BYTES)
    return nonce + AESGCM(_key(key)).encrypt(nonce, bytes(plaintext), bytes(associated_data))


def open_(key: bytes, data: bytes, *, associated_data: bytes) -> bytes:
    """Decrypt what ``seal`` produced; raise ``DecryptionError`` unless it authenticates."""
    aead = AESGCM(_key(key))
    if not isinstance(data, (bytes, bytearray, memoryview)) or len(data) < NONCE_BYTES + TAG_BYTES:
        raise DecryptionError(_FAILED + " (input too short)")
    data = bytes(data)
    try:
        return aead.decrypt(data[:NONCE_BYTES], data[NONCE_BYTES:], bytes(associated_data))
    except InvalidTag:
        raise DecryptionError(_FAILED) from None
