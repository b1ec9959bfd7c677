"""How a float vector becomes ring elements for secure aggregation, and its sum comes back.

Two encodings, both declared in the session so every site encodes alike:

- ``quantized``: clip to [-clip, clip] and round stochastically (unbiased) to
  ``levels`` levels (``quantize``); for model updates, whose range is declared.
- ``fixed``: two's-complement fixed point with ``frac_bits`` fractional bits
  in a 64-bit ring; exact for counts and histogram bins, 2^-frac_bits for
  sums such as losses and feature moments. A value too large for the ring to
  hold the sum of every participant is refused, never wrapped.

And one for site-level differential privacy with distributed noise,
``DiscreteGaussianEncoding`` (``ddg``): the update, already clipped to L2
norm ``clip``, scaled to integer units, rounded conditionally on its norm,
plus each site's discrete Gaussian noise (``consortium.privacy.ddg``), in
two's complement. The sum unmasks to the noisy sum and no party ever sees
it without the noise.
"""

from __future__ import annotations

from typing import Annotated, Literal

import numpy as np
from pydantic import Field, model_validator

from consortium.crypto.prg import ring_dtype
from consortium.errors import ProtocolError
from consortium.privacy import ddg
from consortium.privacy.events import DiscreteGaussianNoise
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


class DiscreteGaussianEncoding(Frozen):
    """Integer encoding with distributed discrete Gaussian noise, for site-level DP under secure aggregation.

    The vector a site encodes is its update clipped to L2 norm ``clip``,
    followed, when ``noise.count_scale`` is set (adaptive clipping), by its
    clipped-count bit centred to +-1/2. Each site adds N_Z(0,
    ``noise.site_variance``) to every coordinate. The noise is calibrated
    for ``cohort`` honest sites; ``colluders`` more may subtract their own,
    so a sum is decoded only over ``min_sum = cohort + colluders`` sites or more.
    """

    kind: Literal["ddg"] = "ddg"
    bits: int = Field(ge=16, le=62)
    clip: float = Field(gt=0)
    cohort: int = Field(ge=1)
    colluders: int = Field(0, ge=0)
    noise: DiscreteGaussianNoise

    @property
    def min_sum(self) -> int:
        return self.cohort + self.colluders

    @property
    def scale(self) -> float:
        return self.noise.scale_clip / self.clip

    @property
    def count_coords(self) -> int:
        return 1 if self.noise.count_scale else 0

    def check_capacity(self, n_sites: int, length: int) -> None:
        if length != self.noise.dim + self.count_coords:
            raise ProtocolError(f"a vector of {length} values where the noise was planned for {self.noise.dim}")
        if not ddg.ring_headroom_ok(self.noise, n_sites=n_sites, bits=self.bits):
            raise ProtocolError(f"{n_sites} noisy updates could overflow the 2^{self.bits} ring: refusing the session")

    def encode(
        self, values: np.ndarray, n_sites: int, rng: np.random.Generator, noise_rng: np.random.Generator
    ) -> np.ndarray:
        """Ring words of ``values`` plus this site's noise; ``noise_rng`` must be secret (CSPRNG-seeded)."""
        values = np.asarray(values, dtype=np.float64)
        self.check_capacity(n_sites, values.shape[0])
        if not np.all(np.isfinite(values)):
            raise ProtocolError("the update has NaN or infinite coordinates: training diverged")
        update = values[: self.noise.dim]
        norm = float(np.linalg.norm(update))
        if norm > self.clip * (1 + 1e-9):
            raise ProtocolError(f"the update's L2 norm {norm:.4g} exceeds the declared clip {self.clip:.4g}")
        words = [ddg.conditional_round(update * self.scale, self.noise.l2_bound, rng)]
        if self.count_coords:
            bit = values[-1]
            if bit not in (-0.5, 0.5):
                raise ProtocolError(f"the clipped-count entry must be -1/2 or +1/2, found {bit}")
            words.append(np.array([round(bit * self.noise.count_scale)], dtype=np.int64))
        integers = np.concatenate(words)
        integers += ddg.sample_discrete_gaussian(noise_rng, self.noise.site_variance, integers.shape[0])
        return (integers & ((1 << self.bits) - 1)).astype(ring_dtype(self.bits))

    def decode_sum(self, total: np.ndarray, n_included: int) -> np.ndarray:
        """The noisy float sum: the update part in update units, the count part as sum(bit - 1/2) + noise."""
        if n_included < self.min_sum:
            raise ProtocolError(f"only {n_included} noisy updates where the noise needs {self.min_sum}: refusing to decode")
        half = 1 << (self.bits - 1)
        signed = ((np.asarray(total, dtype=np.uint64).astype(np.int64) + half) & ((1 << self.bits) - 1)) - half
        out = signed.astype(np.float64)
        out[: self.noise.dim] /= self.scale
        if self.count_coords:
            out[-1] /= self.noise.count_scale
        return out


#: Either encoding, told apart by ``kind``: what a session declares and a verifier reads back.
SessionEncoding = Annotated[RingEncoding | DiscreteGaussianEncoding, Field(discriminator="kind")]
