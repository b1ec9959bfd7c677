"""The pseudorandom generator that expands a 32-byte seed into a mask vector.

SecAgg (Bonawitz et al., CCS 2017, Sec. 4) masks each site's quantised
update with PRG(b_u) (its self mask) and with +/-PRG(s_uv) for each
neighbour v (pairwise masks that cancel in the sum). Bell et al. (CCS 2020)
keep the same masks on a sparse neighbour graph. The PRG must be a
cryptographic stream cipher: a statistical generator such as MT19937 can be
inverted from its output, which would unmask the update.

Construction: AES-256 in counter mode (NIST SP 800-38A, Sec. 6.5) keyed by
the seed, initial counter block all zeros, keystream = encryption of zeros.
Each output element takes 4 little-endian keystream bytes when bits <= 32
and 8 bytes otherwise, and keeps its low ``bits`` bits, which is uniform on
[0, 2^bits) because 2^bits divides 2^32 (or 2^64). The result is always
``uint64`` (the dtype ``quantize`` produces), so the protocol adds masks with
numpy's wraparound and reduces with ``& (2**bits - 1)``.

Why AES-CTR and not ChaCha20: both come from pyca/cryptography and both
meet the budget; AES-256-CTR was faster on the development machine (x86-64
with AES-NI). Medians of 50 runs, end to end including the numpy
conversion, for 1M elements: 64-bit masks (8 MB of keystream) 0.93 ms with
AES-256-CTR against 1.09 ms with ChaCha20 (``algorithms.ChaCha20``, zero
nonce); bits <= 32 (4 MB) 0.66 ms against 0.77 ms. The 128-bit counter also
never wraps for any vector that fits in memory, whereas ChaCha20's 32-bit
block counter caps one stream at 256 GiB. On a CPU without AES-NI ChaCha20
would win; the choice is fixed here because every site must produce the
same stream.

``derive_seed`` turns a key-agreement secret into a 32-byte seed with
HKDF-SHA256 (RFC 5869); ``info`` binds the purpose and round.
"""

from __future__ import annotations

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from consortium.crypto.keys import CryptoError

__all__ = ["SEED_BYTES", "MAX_BITS", "add_mask", "derive_seed", "expand_mask", "mask_words", "ring_dtype"]

SEED_BYTES = 32
MAX_BITS = 64


_CHUNK = 1 << 18  # encrypt zeros 256 KiB at a time from one cached buffer: a fresh
_ZEROS = bytes(_CHUNK)  # zero buffer per call costs page faults that dominate the cipher


def _aes_ctr_keystream(key: bytes, nbytes: int, *, counter_block: bytes = bytes(16)) -> np.ndarray:
    """``nbytes`` of AES-CTR keystream (the encryption of zeros) from ``counter_block``, as writable uint8."""
    encryptor = Cipher(algorithms.AES(key), modes.CTR(counter_block)).encryptor()
    buf = np.empty(nbytes + 15, dtype=np.uint8)  # update_into wants block_size - 1 bytes of slack
    zeros = memoryview(_ZEROS)
    for offset in range(0, nbytes, _CHUNK):  # per 256 KiB chunk, not per element
        n = min(_CHUNK, nbytes - offset)
        encryptor.update_into(zeros[:n], buf[offset : offset + n + 15])
    encryptor.finalize()
    return buf[:nbytes]


def ring_dtype(bits: int) -> np.dtype:
    """The narrowest unsigned word holding Z_{2^bits}: numpy's wraparound is arithmetic mod 2^32 or 2^64,
    and 2^bits divides either, so sums need reducing mod 2^bits only once, at the end."""
    return np.dtype(np.uint32) if bits <= 32 else np.dtype(np.uint64)


def _check(seed: bytes, length: int, bits: int) -> int:
    if not isinstance(seed, (bytes, bytearray, memoryview)) or len(seed) != SEED_BYTES:
        raise CryptoError(f"a mask seed must be {SEED_BYTES} bytes: use os.urandom(32) or derive_seed")
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= MAX_BITS:
        raise CryptoError(f"bits must be an integer in [1, {MAX_BITS}], got {bits!r}")
    if isinstance(length, bool) or not isinstance(length, (int, np.integer)) or length < 0:
        raise CryptoError(f"length must be a non-negative integer, got {length!r}")
    return int(length)


def mask_words(seed: bytes, length: int, *, bits: int) -> np.ndarray:
    """``length`` keystream words of ``ring_dtype(bits)``, NOT yet reduced mod 2^bits.

    The fast path for masking: a view of the keystream, no conversion. Each
    word reduced mod 2^bits equals the matching element of ``expand_mask``.
    """
    length = _check(seed, length, bits)
    dtype = ring_dtype(bits)
    return _aes_ctr_keystream(bytes(seed), length * dtype.itemsize).view(dtype.newbyteorder("<")).view(dtype)


def add_mask(acc: np.ndarray, seed: bytes, *, bits: int, subtract: bool = False) -> None:
    """``acc += mask`` (or ``-=``) in place, wrapping at the word size, without materialising the mask.

    The keystream streams through one cache-sized buffer and is added chunk by
    chunk, so masking costs little more than the cipher itself. The mask is
    exactly ``mask_words(seed, len(acc), bits=bits)``.
    """
    dtype = ring_dtype(bits)
    if acc.dtype != dtype or acc.ndim != 1 or not acc.flags.c_contiguous:
        raise CryptoError(f"add_mask needs a contiguous 1-D {dtype.name} accumulator, got {acc.dtype} {acc.shape}")
    length = _check(seed, acc.shape[0], bits)
    encryptor = Cipher(algorithms.AES(bytes(seed)), modes.CTR(bytes(16))).encryptor()
    buf = np.empty(_CHUNK + 15, dtype=np.uint8)
    words = buf[:_CHUNK].view(dtype)
    per_chunk = _CHUNK // dtype.itemsize
    zeros = memoryview(_ZEROS)
    op = np.subtract if subtract else np.add
    for start in range(0, length, per_chunk):
        k = min(per_chunk, length - start)
        encryptor.update_into(zeros[: k * dtype.itemsize], buf[: k * dtype.itemsize + 15])
        part = acc[start : start + k]
        op(part, words[:k], out=part)
    encryptor.finalize()


def expand_mask(seed: bytes, length: int, *, bits: int) -> np.ndarray:
    """``length`` pseudorandom integers uniform in [0, 2^bits), dtype uint64.

    Deterministic in ``(seed, length, bits)``; a longer vector from the same
    seed and bits starts with the shorter one. ``seed`` must be 32 secret,
    uniformly random bytes (from ``os.urandom`` or ``derive_seed``).
    """
    out = mask_words(seed, length, bits=bits).astype(np.uint64, copy=False)  # no copy for 64-bit words
    if bits < 64:
        out &= np.uint64((1 << bits) - 1)
    return out


def derive_seed(shared_secret_or_key: bytes, *, info: bytes) -> bytes:
    """A 32-byte mask seed from a shared secret or key, by HKDF-SHA256 (no salt).

    ``shared_secret_or_key`` is, for a pairwise mask, the X25519 secret from
    ``keys.exchange``; ``info`` (non-empty) names the purpose and round, for
    example ``b"consortium/secagg/pair-mask/v1" + round + sorted names``.
    """
    secret = shared_secret_or_key
    if not isinstance(secret, (bytes, bytearray, memoryview)) or len(secret) < 16:
        raise CryptoError("derive_seed needs a secret of at least 16 bytes (an X25519 shared secret is 32)")
    if not isinstance(info, bytes) or not info:
        raise CryptoError("derive_seed needs a non-empty info (purpose and round) to bind the seed to its context")
    return HKDF(algorithm=hashes.SHA256(), length=SEED_BYTES, salt=None, info=info).derive(bytes(secret))
