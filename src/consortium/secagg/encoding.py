"""How a float vector becomes ring elements for secure aggregation, and its sum comes back.

Two encodings, both declared in the session so every site encodes alike:

- ``quantized``: clip to [-clip, clip] and round stochastically (unbiased) to
  ``levels`` levels (``quantize``); for model updates, whose range is declared.
- ``fixed``: two's-complement fixed point with ``frac_bits`` fractional bits
  in a 64-bit ring; exact for counts and histogram bins, 2^-frac_bits for
  sums such as losses and feature moments. A value too large for the ring to
  hold the sum of every participant is refused, never wrapped.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field, model_validator

from consortium.crypto.prg import ring_dtype
from consortium.errors import ProtocolError
from consortium.secagg.quantize import QuantConfig, dequantize_sum, quantize
from consortium.wire import Frozen


class RingEncoding(Frozen):
    kind: Literal["quantized", "fixed"]
    bits: int = Field(ge=8, le=64)
    clip: float | None = Field(None, gt=0)
    levels: int | None = Field(None, ge=2)
    frac_bits: int | None = Field(None, ge=0, le=40)

    @model_validator(mode="after")
    def _complete(self) -> RingEncoding:
        if self.kind == "quantized":
            if self.clip is None or self.levels is None or self.frac_bits is not None:
                raise ValueError("a quantized encoding has clip and levels, no frac_bits")
            QuantConfig(clip=self.clip, levels=self.levels, bits=self.bits)  # validates itself
        elif self.frac_bits is None or self.clip is not None or self.levels is not None or self.bits != 64:
            raise ValueError("a fixed encoding has frac_bits in a 64-bit ring, no clip or levels")
        return self

    @classmethod
    def quantized(cls, q: QuantConfig) -> RingEncoding:
        return cls(kind="quantized", bits=q.bits, clip=q.clip, levels=q.levels)

    @classmethod
    def fixed(cls, frac_bits: int) -> RingEncoding:
        return cls(kind="fixed", bits=64, frac_bits=frac_bits)

    def _quant(self) -> QuantConfig:
        assert self.clip is not None and self.levels is not None
        return QuantConfig(clip=self.clip, levels=self.levels, bits=self.bits)

    def check_capacity(self, n_sites: int) -> None:
        """Refuse a session whose sum could wrap around the ring."""
        if self.kind == "quantized" and n_sites > self._quant().max_sites:
            raise ProtocolError(
                f"{n_sites} sites x {self.levels} levels overflow the 2^{self.bits} ring: refusing the session"
            )

    def encode(self, values: np.ndarray, n_sites: int, rng: np.random.Generator) -> np.ndarray:
        """``values`` (float) as ring words (``ring_dtype(bits)``), for a sum over at most ``n_sites`` sites."""
        self.check_capacity(n_sites)
        if self.kind == "quantized":
            return quantize(values, self._quant(), rng, dtype=ring_dtype(self.bits))
        assert self.frac_bits is not None
        scaled = np.rint(np.asarray(values, dtype=np.float64) * float(2**self.frac_bits))
        limit = float(2**62 // n_sites)
        if not np.all(np.isfinite(scaled)) or (scaled.size and float(np.abs(scaled).max()) >= limit):
            raise ProtocolError(
                f"a statistic of magnitude {float(np.abs(values).max()):.4g} is too large for a fixed-point sum over "
                f"{n_sites} sites with {self.frac_bits} fractional bits: refusing rather than wrapping"
            )
        return scaled.astype(np.int64).view(np.uint64)

    def decode_sum(self, total: np.ndarray, n_included: int) -> np.ndarray:
        """The float sum of ``n_included`` encoded vectors from their ring sum."""
        if self.kind == "quantized":
            return dequantize_sum(total, n_included, self._quant())
        assert self.frac_bits is not None
        return np.asarray(total, dtype=np.uint64).view(np.int64).astype(np.float64) / float(2**self.frac_bits)
