"""Key helpers: X25519 key agreement and Ed25519 signatures, as raw 32-byte strings.

Thin wrappers over pyca/cryptography, so that the rest of Consortium never
handles key objects from bytes it has not checked. Keys travel as raw bytes
(RFC 7748 for X25519, RFC 8032 for Ed25519): 32-byte public keys, 64-byte
signatures. The X25519 *private* key can be exported as raw bytes because
SecAgg (Bonawitz et al., CCS 2017, Sec. 4) Shamir-shares each site's mask
private key so the survivors can remove a dropped site's pairwise masks.

Verification raises, it never returns a bool (``verify -> None`` raising
``InvalidSignatureError``), so a forgotten check cannot pass silently.

The crypto error classes live here, the root of the ``crypto`` package:

    ProtocolError (consortium.errors)
    └── CryptoError              key material or ciphertext that does not parse or verify
        ├── InvalidSignatureError    (here)
        ├── DecryptionError          (aead.py)
        └── ShamirError              (shamir.py)
"""

from __future__ import annotations

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.asymmetric.x25519 import (
    X25519PrivateKey,
    X25519PublicKey,
)
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from consortium.errors import ProtocolError

__all__ = [
    "CryptoError",
    "InvalidSignatureError",
    "KEY_BYTES",
    "SIGNATURE_BYTES",
    "generate_x25519",
    "x25519_public_bytes",
    "load_x25519_public",
    "x25519_private_bytes",
    "load_x25519_private",
    "exchange",
    "generate_ed25519",
    "ed25519_public_bytes",
    "load_ed25519_public",
    "sign",
    "verify",
]

KEY_BYTES = 32
SIGNATURE_BYTES = 64


class CryptoError(ProtocolError, ValueError):
    """Key material, a share or a ciphertext that does not parse or does not verify."""


class InvalidSignatureError(CryptoError):
    """A signature that does not verify under the claimed public key."""


def _raw(value: object, what: str, size: int) -> bytes:
    if not isinstance(value, (bytes, bytearray, memoryview)):
        raise CryptoError(f"{what} must be {size} raw bytes, got {type(value).__name__}")
    raw = bytes(value)
    if len(raw) != size:
        raise CryptoError(f"{what} must be exactly {size} bytes, got {len(raw)}: it was truncated or is not a raw key")
    return raw


# --- X25519 (key agreement) -------------------------------------------------


def generate_x25519() -> tuple[X25519PrivateKey, X25519PublicKey]:
    """A fresh X25519 key pair from the operating system's CSPRNG."""
    private = X25519PrivateKey.generate()
    return private, private.public_key()


def x25519_public_bytes(public: X25519PublicKey) -> bytes:
    """The 32-byte raw encoding of an X25519 public key (RFC 7748)."""
    return public.public_bytes_raw()


def load_x25519_public(data: bytes) -> X25519PublicKey:
    """Parse a 32-byte raw X25519 public key; raise ``CryptoError`` on any other length."""
    return X25519PublicKey.from_public_bytes(_raw(data, "an X25519 public key", KEY_BYTES))


def x25519_private_bytes(private: X25519PrivateKey) -> bytes:
    """The 32-byte raw X25519 private key, for Shamir sharing. Handle as a secret."""
    return private.private_bytes_raw()


def load_x25519_private(data: bytes) -> X25519PrivateKey:
    """Rebuild an X25519 private key from its 32 raw bytes (for example after Shamir recovery)."""
    return X25519PrivateKey.from_private_bytes(_raw(data, "an X25519 private key", KEY_BYTES))


def exchange(own_private: X25519PrivateKey, peer_public_bytes: bytes) -> bytes:
    """The raw 32-byte X25519 shared secret with a peer's raw public key.

    Never use it directly as a key: pass it through HKDF (``aead.derive_key``,
    ``prg.derive_seed``). A low-order peer key, which would force an all-zero
    secret known to everyone, raises ``CryptoError`` (RFC 7748, Sec. 6.1).
    """
    peer = load_x25519_public(peer_public_bytes)
    try:
        secret = own_private.exchange(peer)
    except ValueError:
        raise CryptoError("X25519 key agreement gave the all-zero secret: the peer sent a low-order public key") from None
    if secret == bytes(KEY_BYTES):  # defensive: older backends return it instead of raising
        raise CryptoError("X25519 key agreement gave the all-zero secret: the peer sent a low-order public key")
    return secret


# --- Ed25519 (signatures) ---------------------------------------------------


def generate_ed25519() -> tuple[Ed25519PrivateKey, Ed25519PublicKey]:
    """A fresh Ed25519 signing key pair from the operating system's CSPRNG."""
    private = Ed25519PrivateKey.generate()
    return private, private.public_key()


def ed25519_public_bytes(public: Ed25519PublicKey) -> bytes:
    """The 32-byte raw encoding of an Ed25519 public key (RFC 8032)."""
    return public.public_bytes_raw()


def load_ed25519_public(data: bytes) -> Ed25519PublicKey:
    """Parse a 32-byte raw Ed25519 public key; raise ``CryptoError`` on any other length."""
    raw = _raw(data, "an Ed25519 public key", KEY_BYTES)
    try:
        return Ed25519PublicKey.from_public_bytes(raw)
    except ValueError as exc:
        raise CryptoError(f"not a valid Ed25519 public key ({exc})") from None


def derive_ed25519(secret: bytes, label: str) -> Ed25519PrivateKey:
    """An Ed25519 key derived from ``secret`` for ``label``: HKDF-SHA256 (RFC 5869) with the label in ``info``.

    A simulation draws one fresh 32-byte secret per run and derives every simulated member's key from it,
    so that whoever plays a member (a Ray worker) rebuilds its key, and everyone's public key, from that
    secret and the names. Independent keys for distinct labels; never for a deployed member (it makes its
    own, ``generate_ed25519``). ``CryptoError`` if the secret is shorter than 32 bytes.
    """
    if len(secret) < KEY_BYTES:
        raise CryptoError(f"a key-derivation secret needs at least {KEY_BYTES} bytes, got {len(secret)}")
    seed = HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None,
                info=b"consortium/simulated-member-key/v1\x00" + label.encode()).derive(secret)
    return Ed25519PrivateKey.from_private_bytes(seed)


def sign(private: Ed25519PrivateKey, data: bytes) -> bytes:
    """A 64-byte Ed25519 signature over ``data``."""
    return private.sign(bytes(data))


def verify(public_bytes: bytes, signature: bytes, data: bytes) -> None:
    """Check an Ed25519 signature; return nothing, raise ``InvalidSignatureError`` if it does not verify.

    ``public_bytes`` is the signer's raw 32-byte key. A malformed key raises
    ``CryptoError``; a signature of the wrong length, over other data or by
    another key raises ``InvalidSignatureError``.
    """
    key = load_ed25519_public(public_bytes)
    if not isinstance(signature, (bytes, bytearray, memoryview)) or len(signature) != SIGNATURE_BYTES:
        raise InvalidSignatureError(f"an Ed25519 signature must be {SIGNATURE_BYTES} bytes: the signature is malformed")
    try:
        key.verify(bytes(signature), bytes(data))
    except InvalidSignature:
        raise InvalidSignatureError(
            "signature does not verify: the data was altered or it was signed by another key"
        ) from None
