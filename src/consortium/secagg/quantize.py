"""Quantisation of real-valued updates into the ring Z_{2^bits} that SecAgg masks live in.

Secure aggregation adds integers modulo 2^bits (Bonawitz et al., CCS 2017;
Bell et al., CCS 2020), so each site maps its update to integers first:

1. clip every coordinate to [-clip, clip];
2. map it affinely onto [0, levels - 1]: u = (x + clip) / step with
   step = 2 clip / (levels - 1);
3. round u to floor(u) or floor(u) + 1 at random, up with probability
   u - floor(u) (stochastic rounding), so E[q] = u exactly and the
   dequantised sum is an unbiased estimate of the sum of clipped updates.

The coordinator unmasks the sum T of n_included quantised vectors and
recovers sum(x) ~= T * step - n_included * clip. Because every q is at most
levels - 1, that sum is exact in the ring as long as
n_included * (levels - 1) < 2^bits; ``plan_quantization`` enforces it and
refuses configurations that could wrap around.

Error: each site's rounding moves a coordinate by less than one step, so
the dequantised sum is within ``sum_error_bound = n_included * step`` of the
sum of clipped values, per coordinate (deterministically; the typical error
is about step * sqrt(n_included) / 2).

All functions are pure; randomness for rounding comes from the
``np.random.Generator`` the caller passes (not secret: it only decides
rounding directions), never from numpy's global state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from consortium.crypto.prg import iter_mask_words as mask_stream
from consortium.errors import ConfigError, ModelError, ProtocolError

__all__ = [
    "AUTO_MAX_LEVELS",
    "MAX_LEVELS",
    "MIN_BITS",
    "MAX_BITS",
    "QuantizationError",
    "QuantConfig",
    "plan_quantization",
    "quantize",
    "dequantize_sum",
    "sum_error_bound",
]

MIN_BITS = 8
MAX_BITS = 62  # sums of two ring elements never overflow uint64, so masks can be added before reducing
AUTO_MAX_LEVELS = 1 << 24  # float32 updates carry 24 significant bits: finer steps add nothing
MAX_LEVELS = 1 << 32  # beyond this, float64 cannot hold the fractional part stochastic rounding needs


class QuantizationError(ConfigError):
    """A quantisation setting that is malformed or could overflow the ring."""


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _pow2(n: int) -> str:
    return f"2^{n.bit_length() - 1}" if n > 0 and n & (n - 1) == 0 else str(n)


def _check_clip(clip: object) -> float:
    if isinstance(clip, (bool, np.bool_)) or not isinstance(clip, (int, float, np.integer, np.floating)):
        raise QuantizationError(f"clip must be a number, got {clip!r}: use the bound each update coordinate is clipped to")
    value = float(clip)
    if not math.isfinite(value) or value <= 0:
        raise QuantizationError(f"clip must be positive and finite, got {value}: use the bound each update coordinate is clipped to")
    return value


def _check_bits(bits: object) -> int:
    if not _is_int(bits) or not MIN_BITS <= int(bits) <= MAX_BITS:
        raise QuantizationError(f"bits must be an integer in [{MIN_BITS}, {MAX_BITS}], got {bits!r}: 32 suits most federations")
    return int(bits)


def _check_levels(levels: object) -> int:
    if not _is_int(levels) or int(levels) < 2 or int(levels) & (int(levels) - 1):
        raise QuantizationError(f"levels must be a power of two >= 2, got {levels!r}")
    if int(levels) > MAX_LEVELS:
        raise QuantizationError(
            f"levels {_pow2(int(levels))} exceeds {_pow2(MAX_LEVELS)}: float64 stochastic rounding would be biased; use fewer levels"
        )
    return int(levels)


def _check_fits(n_sites: int, levels: int, bits: int) -> None:
    if n_sites * (levels - 1) >= 1 << bits:
        max_levels = 1 << (((1 << bits) - 1) // n_sites + 1).bit_length() - 1
        fix = f"use at most {_pow2(max_levels)} levels or" if max_levels >= 2 else "use"
        raise QuantizationError(
            f"{n_sites} sites x {_pow2(levels)} levels overflow the 2^{bits} ring: "
            f"{fix} a {(n_sites * (levels - 1)).bit_length()}-bit ring"
        )


@dataclass(frozen=True)
class QuantConfig:
    """Clip bound, number of levels (a power of two) and ring size 2^bits; validated on creation."""

    clip: float
    levels: int
    bits: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "clip", _check_clip(self.clip))
        object.__setattr__(self, "levels", _check_levels(self.levels))
        object.__setattr__(self, "bits", _check_bits(self.bits))
        _check_fits(1, self.levels, self.bits)

    @property
    def step(self) -> float:
        """The spacing between adjacent levels: 2 clip / (levels - 1)."""
        return 2.0 * self.clip / (self.levels - 1)

    @property
    def max_sites(self) -> int:
        """The most quantised vectors whose sum cannot wrap around the ring."""
        return ((1 << self.bits) - 1) // (self.levels - 1)


def plan_quantization(*, clip: float, n_sites: int, bits: int = 32, levels: int | None = None) -> QuantConfig:
    """The quantisation for summing ``n_sites`` updates clipped to [-clip, clip] in Z_{2^bits}.

    With ``levels`` None, the largest power of two with
    n_sites * (levels - 1) < 2^bits, capped at 2^24 (float32 resolution).
    A given ``levels`` that could overflow is refused with the fix.
    """
    clip = _check_clip(clip)
    if not _is_int(n_sites) or int(n_sites) < 1:
        raise QuantizationError(f"n_sites must be a positive integer, got {n_sites!r}")
    n_sites = int(n_sites)
    bits = _check_bits(bits)
    if levels is None:
        fitting = 1 << (((1 << bits) - 1) // n_sites + 1).bit_length() - 1  # largest 2^m with n (2^m - 1) < 2^bits
        if fitting < 2:
            raise QuantizationError(
                f"{n_sites} sites overflow the 2^{bits} ring even with 2 levels: use a {n_sites.bit_length() + 1}-bit ring"
            )
        levels = min(fitting, AUTO_MAX_LEVELS)
    levels = _check_levels(levels)
    _check_fits(n_sites, levels, bits)
    return QuantConfig(clip=clip, levels=levels, bits=bits)


_QCHUNK = 1 << 15  # elements per pass: 256 KiB of float64 and 256 KiB of uint64 scratch stay in L2


def quantize(
    x: np.ndarray, cfg: QuantConfig, rng: np.random.Generator, *, dtype: np.dtype | type = np.uint64
) -> np.ndarray:
    """Clip ``x`` and round it stochastically to integers in [0, levels - 1], as ``dtype`` words.

    Unbiased up to 2^-32 of a step: with u = (clip(x) + clip) / step in
    float64, W = floor(u * 2^32) is u in fixed point with 32 fractional
    bits (exact: scaling by 2^32 is exact, and u * 2^32 < 2^64), and the
    result is (W + d) >> 32 for a uniform 32-bit draw d, that is floor(u)
    plus one with probability floor(frac(u) * 2^32) / 2^32, which is within
    2^-32 below frac(u). The draws are AES-CTR keystream keyed from ``rng``
    (four times faster than numpy's float draws). ``dtype`` may be uint32
    when levels <= 2^32 (the ring word for bits <= 32). Refuses NaN and
    infinite values (``ModelError``): they signal a broken update, not one
    to clip. The caller's array is never modified.

    The work streams through 32k-element chunks in preallocated scratch, so
    every step reads and writes cached memory and only the result is a
    fresh allocation.
    """
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy Generator (np.random.default_rng(seed)), got {type(rng).__name__}")
    arr = np.asarray(x)
    if not np.issubdtype(arr.dtype, np.floating):
        raise ModelError(f"quantize needs a float32 or float64 update, got dtype {arr.dtype}")
    dtype = np.dtype(dtype)
    if dtype not in (np.dtype(np.uint32), np.dtype(np.uint64)) or cfg.levels - 1 > np.iinfo(dtype).max:
        raise QuantizationError(f"{cfg.levels} levels do not fit {dtype} words: use uint64")
    flat = arr.reshape(-1)  # a view when arr is contiguous; never written to
    n = flat.size
    q = np.empty(n, dtype=dtype)
    key = rng.bytes(32)
    if n == 0:
        return q.reshape(arr.shape)
    inv_step = (cfg.levels - 1) / (2.0 * cfg.clip)
    scale = inv_step * 4294967296.0  # 1/step, times 2^32: exact power-of-two scaling...
    split = not math.isfinite(scale)  # ...unless a clip below ~1e-290 overflows it: then two multiplies
    top = float(cfg.levels - 1) * 4294967296.0  # (levels - 1) 2^32 < 2^64, exact in float64
    chunk = min(_QCHUNK, n)
    u = np.empty(chunk, dtype=np.float64)
    w = np.empty(chunk, dtype=np.uint64)
    draws = mask_stream(key, n, bits=32, chunk=chunk)
    with np.errstate(over="ignore"):  # a huge finite x may overflow (x + clip) / step to inf: clipped to the top
        for start in range(0, n, chunk):
            k = min(chunk, n - start)
            part, uk, wk = flat[start : start + k], u[:k], w[:k]
            np.add(part, cfg.clip, out=uk, dtype=np.float64)  # float64 arithmetic, whatever the input's width
            if not math.isfinite(float(np.add.reduce(uk))):  # fast path: a finite sum means every value is finite
                bad = int(n - np.count_nonzero(np.isfinite(flat)))
                if bad:
                    raise ModelError(
                        f"the update has {bad} NaN or infinite coordinates: training diverged; fix it before aggregating"
                    )
            if split:
                uk *= inv_step
                uk *= 4294967296.0
            else:
                uk *= scale  # u * 2^32, where u = (x + clip) / step
            np.clip(uk, 0.0, top, out=uk)  # clipping u to [0, levels - 1] is clipping x to [-clip, clip]
            np.copyto(wk, uk, casting="unsafe")  # floor(u * 2^32): truncation of a non-negative value
            wk += next(draws)  # <= (levels - 1) 2^32 + 2^32 - 1 < 2^64: no wraparound
            np.right_shift(wk, 32, out=q[start : start + k], casting="unsafe")
    return q.reshape(arr.shape)


def dequantize_sum(total: np.ndarray, n_included: int, cfg: QuantConfig) -> np.ndarray:
    """Map the unmasked sum of ``n_included`` quantised vectors back to the sum of updates (float64).

    Raises ``ProtocolError`` if a coordinate exceeds n_included * (levels - 1):
    the masks did not cancel, or n_included is not the number of summed vectors.
    """
    if not _is_int(n_included) or int(n_included) < 1:
        raise QuantizationError(f"n_included must be a positive integer, got {n_included!r}")
    n_included = int(n_included)
    _check_fits(n_included, cfg.levels, cfg.bits)
    arr = np.asarray(total)
    if arr.dtype.kind != "u":
        raise ProtocolError(f"the aggregate must be unsigned integers (uint64), got dtype {arr.dtype}")
    ceiling = n_included * (cfg.levels - 1)
    if arr.size and int(arr.max()) > ceiling:
        raise ProtocolError(
            f"an aggregate coordinate exceeds {n_included} x (levels - 1) = {ceiling}: "
            "the masks did not cancel or n_included is not the number of summed updates"
        )
    return arr.astype(np.float64) * cfg.step - n_included * cfg.clip


def sum_error_bound(n_included: int, cfg: QuantConfig) -> float:
    """Per-coordinate bound on |dequantize_sum(sum of quantize(x_i)) - sum of clip(x_i)|: n_included * step."""
    if not _is_int(n_included) or int(n_included) < 1:
        raise QuantizationError(f"n_included must be a positive integer, got {n_included!r}")
    return int(n_included) * cfg.step
