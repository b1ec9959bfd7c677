"""Shamir secret sharing of short byte strings over a 384-bit prime field.

SecAgg (Bonawitz et al., CCS 2017, Sec. 4) has each site t-out-of-k share
two 32-byte secrets among its neighbours: the seed of its self mask and the
X25519 private key of its pairwise masks. Shamir's scheme (Shamir, "How to
share a secret", CACM 1979): pick a uniformly random polynomial f of
degree < t over GF(p) with f(0) = secret; the share for x is f(x). Any t
shares determine f(0) by Lagrange interpolation; any t - 1 shares are
uniformly distributed whatever the secret, so they reveal nothing about it.

The field: p = 2^384 - 2^128 - 2^96 + 2^32 - 1, the prime of the NIST P-384
curve's base field (FIPS 186-4, App. D.1.2.4; SEC 2 v2, Sec. 2.5.1,
secp384r1). Any secret of up to 47 bytes is one field element; a share is
one element, encoded as 48 big-endian bytes. A well-known prime is used
rather than a home-chosen one so its primality is not ours to get wrong
(the tests still check it with Miller-Rabin).

Speed: evaluation by Horner's rule, reduced once per 16 steps; Lagrange coefficients at 0 computed
once per set of evaluation points (the differences multiplied in numpy groups, one batched
``pow(d, -1, p)``) and cached. Coefficients are drawn from ``os.urandom`` (or the ``rng_bytes``
the caller passes, for reproducible tests) by rejection sampling, so they
are exactly uniform in the field.

What this module does not do: authenticate shares. ``combine`` detects a
corrupted share with overwhelming probability when it is given more than
``threshold`` shares (two interpolations must agree) or when the result is
not a ``length``-byte string, but a share forged by someone who knows the
evaluation points can still shift the secret undetected when exactly
``threshold`` shares are given. Shares travel inside AES-GCM
(``aead.seal``), which is what authenticates them.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from consortium.crypto.keys import CryptoError

__all__ = ["PRIME", "SHARE_BYTES", "MAX_SECRET_BYTES", "ShamirError", "split", "combine"]

PRIME = 2**384 - 2**128 - 2**96 + 2**32 - 1
SHARE_BYTES = 48
MAX_SECRET_BYTES = 47  # every 47-byte string is below PRIME; some 48-byte ones are not


class ShamirError(CryptoError):
    """Shares or sharing parameters that cannot work: too few, malformed or inconsistent."""


def _check_threshold(threshold: object) -> int:
    if isinstance(threshold, bool) or not isinstance(threshold, int) or threshold < 1:
        raise ShamirError(f"threshold must be a positive integer, got {threshold!r}")
    return threshold


def _check_x(x: object) -> int:
    if isinstance(x, bool) or not isinstance(x, int):
        raise ShamirError(f"an evaluation point must be an integer, got {x!r}")
    if not 1 <= x < PRIME:
        raise ShamirError(f"evaluation point {x} is not in [1, p): x = 0 would be the secret itself")
    return x


def _random_element(rng_bytes: Callable[[int], bytes]) -> int:
    """Uniform in [0, PRIME) by rejection sampling (a draw is rejected with probability < 2^-127)."""
    while True:
        value = int.from_bytes(rng_bytes(SHARE_BYTES), "big")
        if value < PRIME:
            return value


def split(
    secret: bytes,
    *,
    threshold: int,
    xs: Sequence[int],
    rng_bytes: Callable[[int], bytes] = os.urandom,
) -> dict[int, bytes]:
    """Share ``secret`` so that any ``threshold`` of the returned shares recover it.

    ``xs`` are the distinct evaluation points (>= 1), one per share holder,
    for example 1-based positions in a sorted list of neighbours. Returns
    ``{x: 48-byte share}`` in the order of ``xs``.
    """
    if not isinstance(secret, (bytes, bytearray, memoryview)):
        raise ShamirError(f"the secret must be bytes, got {type(secret).__name__}")
    if not 1 <= len(secret) <= MAX_SECRET_BYTES:
        raise ShamirError(f"the secret must be 1 to {MAX_SECRET_BYTES} bytes, got {len(secret)}")
    threshold = _check_threshold(threshold)
    points = [_check_x(x) for x in xs]
    if len(set(points)) != len(points):
        raise ShamirError("evaluation points must be distinct: two share holders would get the same share")
    if len(points) < threshold:
        raise ShamirError(f"{len(points)} share holders cannot meet threshold {threshold}: the secret would be lost")
    coefficients = [int.from_bytes(secret, "big")] + [_random_element(rng_bytes) for _ in range(threshold - 1)]
    highest_first = coefficients[::-1]
    # Horner's rule over the t coefficients, reduced mod p once per 16 steps rather than at each: the points
    # are small, so 16 steps grow a reduced value by 16 x (bits of x + 1) bits, and one reduction costs more
    # than all those multiplications by a small number. Same value, about half the time.
    chunks = [highest_first[i : i + 16] for i in range(0, len(highest_first), 16)]
    shares = {}
    for x in points:
        acc = 0
        for chunk in chunks:
            for c in chunk:
                acc = acc * x + c
            acc %= PRIME
        shares[x] = acc.to_bytes(SHARE_BYTES, "big")
    return shares


@functools.lru_cache(maxsize=1024)
def _lagrange_at_zero(points: tuple[int, ...]) -> tuple[int, ...]:
    """lambda_i = prod_{j != i} x_j / (x_j - x_i) mod p, so that f(0) = sum lambda_i f(x_i).

    Written as lambda_i = (prod_j x_j) / (x_i * prod_{j != i} (x_j - x_i)); the
    denominators are inverted together with a single ``pow(d, -1, p)``
    (Montgomery's batch inversion), which makes an uncached set of 50 points
    cost a fraction of a millisecond.
    """
    numerator = math.prod(points) % PRIME
    dens = [xi * d % PRIME for xi, d in zip(points, _difference_products(points))]
    prefix = [1]
    for d in dens:
        prefix.append(prefix[-1] * d % PRIME)
    inverse = pow(prefix[-1], -1, PRIME)  # the inverse of the product of all denominators
    lambdas = [0] * len(dens)
    for i in range(len(dens) - 1, -1, -1):
        lambdas[i] = numerator * inverse * prefix[i] % PRIME  # prefix[i] / prod(dens[:i+1]) = 1 / dens[i]
        inverse = inverse * dens[i] % PRIME
    return tuple(lambdas)


def _difference_products(points: tuple[int, ...]) -> list[int]:
    """prod_{j != i} (x_j - x_i) for each i, exactly (not reduced).

    The t x t differences are products of small numbers when the points are
    site positions: numpy multiplies them in groups that cannot overflow 63
    bits (g factors below 2^b each, g * b <= 62), and Python multiplies the t / g
    group products exactly, a few times faster than t^2 steps in Python.
    Points of more than 31 bits take the plain loop.
    """
    bits = max(points).bit_length()
    if bits > 31:
        return [math.prod(xj - xi for xj in points if xj != xi) for xi in points]
    t, g = len(points), 62 // bits  # every |x_j - x_i| < max(points) < 2^bits
    x = np.asarray(points, dtype=np.int64)
    diff = x[None, :] - x[:, None]
    np.fill_diagonal(diff, 1)
    pad = -t % g
    if pad:
        diff = np.concatenate([diff, np.ones((t, pad), dtype=np.int64)], axis=1)
    return [math.prod(row) for row in diff.reshape(t, -1, g).prod(axis=2).tolist()]


def _interpolate(points: tuple[int, ...], values: Mapping[int, int]) -> int:
    lambdas = _lagrange_at_zero(points)
    return sum(lam * values[x] for lam, x in zip(lambdas, points)) % PRIME


def combine(shares: Mapping[int, bytes], *, threshold: int, length: int = 32) -> bytes:
    """Recover the ``length``-byte secret from at least ``threshold`` shares ``{x: share}``.

    With more than ``threshold`` shares, the lowest and the highest
    ``threshold`` points are interpolated separately and must agree, so a
    corrupted share raises ``ShamirError`` instead of yielding a wrong secret.
    """
    threshold = _check_threshold(threshold)
    if isinstance(length, bool) or not isinstance(length, int) or not 1 <= length <= MAX_SECRET_BYTES:
        raise ShamirError(f"length must be 1 to {MAX_SECRET_BYTES} bytes, got {length!r}")
    if len(shares) < threshold:
        raise ShamirError(f"{len(shares)} shares cannot recover a secret shared with threshold {threshold}")
    values: dict[int, int] = {}
    for x, share in shares.items():
        x = _check_x(x)
        if x in values:
            raise ShamirError(f"evaluation point {x} appears twice")
        if not isinstance(share, (bytes, bytearray, memoryview)) or len(share) != SHARE_BYTES:
            raise ShamirError(f"the share for x = {x} must be {SHARE_BYTES} bytes: it is malformed")
        value = int.from_bytes(share, "big")
        if value >= PRIME:
            raise ShamirError(f"the share for x = {x} is not a field element (>= p): it is malformed")
        values[x] = value
    ordered = sorted(values)
    secret = _interpolate(tuple(ordered[:threshold]), values)
    if len(ordered) > threshold and _interpolate(tuple(ordered[-threshold:]), values) != secret:
        raise ShamirError("the shares are inconsistent: at least one is corrupted or belongs to another secret")
    if secret >= 1 << (8 * length):
        raise ShamirError(
            f"the shares do not reconstruct a {length}-byte secret: a share is corrupted or the threshold is wrong"
        )
    return secret.to_bytes(length, "big")
