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

Applying masks: a site adds k + 1 masks to its input and the coordinator
removes n self masks from n inputs. ``mask_sum`` (and ``iter_mask_sum``,
which streams the result) does all of them in one pass: per 128 KiB block,
every mask's keystream is generated and added while the block is in cache,
so the cost is the cipher plus one in-cache add per mask, not one trip
through main memory per mask. Measured (x86-64, AES-NI, 1 MiB L2): ten
masks over 1M 32-bit words 5.7 ms against 4.6 ms for the cipher alone; 53
masks over 100k words 3.0 ms against 2.6 ms.

``derive_seed`` turns a key-agreement secret into a 32-byte seed with
HKDF-SHA256 (RFC 5869); ``info`` binds the purpose and round.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from consortium.crypto.keys import CryptoError

__all__ = [
    "SEED_BYTES",
    "MAX_BITS",
    "derive_seed",
    "expand_mask",
    "iter_mask_sum",
    "iter_mask_words",
    "mask_sum",
    "mask_words",
    "ring_dtype",
]

SEED_BYTES = 32
MAX_BITS = 64


_CHUNK = 1 << 18  # encrypt zeros 256 KiB at a time from one cached buffer: a fresh
_ZEROS = bytes(_CHUNK)  # zero buffer per call costs page faults that dominate the cipher
# Masks are summed 128 KiB of keystream at a time (32k words of 32 bits): the keystream chunk
# and the accumulator chunk stay in L2 while every mask is added to them, so the
# accumulator crosses main memory once however many masks there are (measured on a
# 1 MiB-L2 x86-64: 64 KiB-512 KiB chunks are within 3% of each other; 4 MiB, one
# whole 1M-word vector per mask, is 2.3x slower for the additions).
_SUM_CHUNK = 1 << 17


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


def iter_mask_words(seed: bytes, length: int, *, bits: int, chunk: int):
    """``mask_words(seed, length, bits=bits)`` as successive views of at most ``chunk`` words.

    Every view lives in one reused buffer and is overwritten by the next
    iteration: consume (or copy) it before asking for the next. Streaming
    keeps the keystream in cache and allocates nothing per chunk.
    """
    length = _check(seed, length, bits)
    dtype = ring_dtype(bits)
    if isinstance(chunk, bool) or not isinstance(chunk, int) or not 1 <= chunk * dtype.itemsize <= _CHUNK:
        raise CryptoError(f"chunk must be 1 to {_CHUNK // dtype.itemsize} words, got {chunk!r}")
    encryptor = Cipher(algorithms.AES(bytes(seed)), modes.CTR(bytes(16))).encryptor()
    buf = np.empty(chunk * dtype.itemsize + 15, dtype=np.uint8)  # update_into wants 15 bytes of slack
    words = buf[: chunk * dtype.itemsize].view(dtype.newbyteorder("<")).view(dtype)
    zeros = memoryview(_ZEROS)
    for start in range(0, length, chunk):
        k = min(chunk, length - start)
        encryptor.update_into(zeros[: k * dtype.itemsize], buf[: k * dtype.itemsize + 15])
        yield words[:k]
    encryptor.finalize()


def _check_sum_args(bits, length, seeds, subtract, inputs):
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= MAX_BITS:
        raise CryptoError(f"bits must be an integer in [1, {MAX_BITS}], got {bits!r}")
    if isinstance(length, bool) or not isinstance(length, (int, np.integer)) or length < 0:
        raise CryptoError(f"length must be a non-negative integer, got {length!r}")
    seeds = list(seeds)
    signs = [bool(s) for s in subtract] if len(subtract) else [False] * len(seeds)
    if len(signs) != len(seeds):
        raise CryptoError(f"{len(seeds)} seeds but {len(signs)} subtract flags")
    for seed in seeds:
        _check(seed, length, bits)
    inputs = [np.asarray(x) for x in inputs]
    for x in inputs:
        if x.dtype.kind != "u" or x.shape != (length,):
            raise CryptoError(f"mask sum inputs must be 1-D unsigned arrays of length {length}, got {x.dtype} {x.shape}")
    return int(length), seeds, signs, inputs


def _sum_blocks(length, seeds, signs, inputs, bits, reduce, out):
    """Yield (start, block): the ring words [start, start + len(block)) of sum(inputs) +/- masks.

    ``block`` is a slice of ``out`` when ``out`` has the ring dtype, else a
    reused scratch buffer (valid until the next block).
    """
    dtype = ring_dtype(bits)
    per = _SUM_CHUNK // dtype.itemsize
    scratch = None if out is not None and out.dtype == dtype else np.empty(min(per, length), dtype=dtype)
    encryptors = [Cipher(algorithms.AES(bytes(seed)), modes.CTR(bytes(16))).encryptor() for seed in seeds]
    steps = [(e.update_into, np.subtract if sign else np.add) for e, sign in zip(encryptors, signs)]
    first, rest = (steps[0], steps[1:]) if steps else (None, [])
    buf = np.empty(per * dtype.itemsize + 15, dtype=np.uint8)  # update_into wants 15 bytes of slack
    words = buf[: per * dtype.itemsize].view(dtype.newbyteorder("<")).view(dtype)
    zeros = memoryview(_ZEROS)[: per * dtype.itemsize]
    top = dtype.type((1 << bits) - 1) if reduce and bits % (8 * dtype.itemsize) else None
    for start in range(0, length, per):
        k = min(per, length - start)
        if k == per:  # the slices of a full block, made once per block rather than once per mask
            z, b, w = zeros, buf, words
        else:
            z, b, w = zeros[: k * dtype.itemsize], buf[: k * dtype.itemsize + 15], words[:k]
        acc = out[start : start + k] if scratch is None else scratch[:k]
        parts = [x[start : start + k] for x in inputs]
        if first is not None:
            update, op = first
            update(z, b)
            if parts:  # the first mask meets the first input: no separate copy
                op(parts.pop(0), w, out=acc, casting="same_kind")
            elif op is np.add:
                np.copyto(acc, w)
            else:
                np.negative(w, out=acc)
        elif parts:
            np.copyto(acc, parts.pop(0), casting="same_kind")
        else:
            acc.fill(0)
        for update, op in rest:
            update(z, b)
            op(acc, w, out=acc)
        for part in parts:
            np.add(acc, part, out=acc, casting="same_kind")
        if top is not None:
            acc &= top
        yield start, acc
    for encryptor in encryptors:
        encryptor.finalize()


def iter_mask_sum(
    length: int,
    seeds: Sequence[bytes],
    *,
    bits: int,
    subtract: Sequence[bool] = (),
    inputs: Sequence[np.ndarray] = (),
    reduce: bool = False,
):
    """``mask_sum`` as successive ``ring_dtype(bits)`` blocks of at most 128 KiB, for streaming the result.

    Each block lives in one reused buffer, overwritten by the next
    iteration: consume it (hash it, copy it out) first. A caller that
    serialises the masked vector never needs the whole of it as an array.
    """
    length, seeds, signs, inputs = _check_sum_args(bits, length, seeds, subtract, inputs)
    for _, block in _sum_blocks(length, seeds, signs, inputs, bits, reduce, None):
        yield block


def mask_sum(
    out: np.ndarray,
    seeds: Sequence[bytes],
    *,
    bits: int,
    subtract: Sequence[bool] = (),
    inputs: Sequence[np.ndarray] = (),
    reduce: bool = False,
) -> np.ndarray:
    """``out = sum(inputs) + sum_i (-1)^subtract[i] * mask_words(seeds[i])``, wrapping at the ring word.

    The masked-input computation of SecAgg in one pass: for each 128 KiB
    block of the vector, the inputs are summed and every mask's keystream is
    added to (or subtracted from) it while both sit in cache, so the cost is
    the cipher plus one add per mask on cached data, and main memory is
    crossed once instead of once per mask. ``out`` may be one of ``inputs``
    (in-place masking). With ``reduce`` the result is reduced mod 2^bits;
    otherwise only the word size wraps.

    ``out``: contiguous 1-D uint32 or uint64, at least as wide as
    ``ring_dtype(bits)`` (a wider ``out`` receives the ring words widened,
    so reduce them, or pass ``reduce=True``). ``inputs``: 1-D unsigned
    arrays of ``out``'s length, of any width or byte order; only their
    values mod the ring word count. Returns ``out``.
    """
    if (
        not isinstance(out, np.ndarray)
        or out.dtype not in (np.dtype(np.uint32), np.dtype(np.uint64))
        or out.ndim != 1
        or not out.flags.c_contiguous
        or not out.flags.writeable
    ):
        raise CryptoError(
            "mask_sum needs a writable contiguous 1-D uint32 or uint64 output, "
            f"got {getattr(out, 'dtype', type(out).__name__)} {getattr(out, 'shape', '')}"
        )
    length, seeds, signs, inputs = _check_sum_args(bits, out.shape[0], seeds, subtract, inputs)
    if out.dtype.itemsize < ring_dtype(bits).itemsize:
        raise CryptoError(f"a {out.dtype.name} output cannot hold {bits}-bit ring words")
    widen = out.dtype != ring_dtype(bits)  # then blocks come in scratch and are widened into out
    for start, block in _sum_blocks(length, seeds, signs, inputs, bits, reduce, out):
        if widen:
            out[start : start + len(block)] = block
    return out


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
