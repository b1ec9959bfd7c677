"""Cryptographic building blocks for secure aggregation. hazmat: experts only.

These are primitives, not recipes: used in the wrong order, with a reused
``info`` or a predictable seed, they give no protection. Protocol code
(``consortium.secagg``) composes them; nothing else should.

- ``keys``: X25519 and Ed25519 keys as raw bytes; ``verify`` raises.
- ``aead``: HKDF-derived pairwise keys, AES-256-GCM ``seal`` / ``open_``.
- ``prg``: AES-256-CTR expansion of a 32-byte seed into a uint64 mask vector.
- ``shamir``: t-out-of-n sharing of short secrets over the P-384 prime field.

Every primitive comes from pyca/cryptography; nothing here is a home-made
cipher, and no randomness comes from numpy's generators.
"""

from consortium.crypto.aead import DecryptionError, derive_key, open_, seal
from consortium.crypto.keys import (
    CryptoError,
    InvalidSignatureError,
    ed25519_public_bytes,
    exchange,
    generate_ed25519,
    generate_x25519,
    load_ed25519_public,
    load_x25519_private,
    load_x25519_public,
    sign,
    verify,
    x25519_private_bytes,
    x25519_public_bytes,
)
from consortium.crypto.prg import derive_seed, expand_mask
from consortium.crypto.shamir import ShamirError, combine, split

__all__ = [
    "CryptoError",
    "DecryptionError",
    "InvalidSignatureError",
    "ShamirError",
    "combine",
    "derive_key",
    "derive_seed",
    "ed25519_public_bytes",
    "exchange",
    "expand_mask",
    "generate_ed25519",
    "generate_x25519",
    "load_ed25519_public",
    "load_x25519_private",
    "load_x25519_public",
    "open_",
    "seal",
    "sign",
    "split",
    "verify",
    "x25519_private_bytes",
    "x25519_public_bytes",
]
