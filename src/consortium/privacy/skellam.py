"""Distributed Skellam noise (Agarwal, Kairouz, Liu, NeurIPS 2021): integer noise that sums exactly.

Skellam(mu) is the difference of two independent Poisson(mu / 2) draws: an
integer, symmetric, of variance mu; and a sum of independent Skellams is a
Skellam whose variance is the sum. So when every site of a secure-aggregation
session adds Skellam(mu / n_min) to its integer-encoded update, any sum of at
least n_min of them carries exactly Skellam(>= mu), and nobody, the
coordinator included, ever sees the sum without it.

dp-accounting has no event for it, so its published RDP bound (Agarwal et al.
2021, Corollary 3.6 / 4.1; integer orders alpha > 1) is implemented here as a
pure function of the L1 and L2 sensitivities and the variance:

    eps(alpha) <= alpha D2^2 / (2 mu) + min(((2 alpha - 1) D2^2 + 6 D1) / (4 mu^2), 3 D1 / (2 mu))

and tested against the exact Renyi divergence computed with mpmath. The
first term is the Gaussian mechanism's; the second is the price of
integrality, negligible once mu is large.

Rounding to integers can lengthen a vector: each site rounds stochastically
and redraws until the L2 norm is within ``rounded_l2_bound`` (conditional
rounding, Kairouz, Liu, Steinke ICML 2021), which is what bounds the
sensitivity. Every bound is checked ahead of time against the ring: a sum of
``max_sites`` vectors plus the noise's tail (Bennett's inequality, failure
probability at most 2^-40 per vector) never wraps around.
"""

from __future__ import annotations

import math
import numpy as np
from dp_accounting.rdp.rdp_privacy_accountant import compute_epsilon

from consortium.errors import ConfigError, ProtocolError
from consortium.privacy.events import SkellamNoise

#: Integer Renyi orders the bound is evaluated at (it holds for integer alpha > 1 only).
ORDERS: tuple[int, ...] = tuple(range(2, 129)) + (160, 192, 256, 384, 512, 768, 1024)
#: Conditional rounding accepts a draw with probability at least 1 - beta (a few draws at worst).
ROUNDING_BETA = math.exp(-0.5)
#: The noise may exceed the ring's headroom with probability at most 2^-TAIL_BITS per vector.
TAIL_BITS = 40
#: The clip bound is at most 2^20 integer units: ample precision, and noise variances that float64 holds exactly.
MAX_SCALE_CLIP = 1 << 20
MAX_ROUNDING_DRAWS = 64


def skellam_rdp(order: int, l1: float, l2: float, variance: float) -> float:
    """RDP at integer ``order`` of adding Skellam(``variance``) per coordinate, sensitivities ``l1`` and ``l2``."""
    if int(order) != order or order < 2:
        raise ValueError(f"the Skellam RDP bound holds for integer orders >= 2, got {order}")
    if not (variance > 0 and l1 >= 0 and l2 >= 0):
        raise ValueError("need a positive variance and non-negative sensitivities")
    a, mu = float(order), float(variance)
    return a * l2 * l2 / (2 * mu) + min(((2 * a - 1) * l2 * l2 + 6 * l1) / (4 * mu * mu), 3 * l1 / (2 * mu))


def skellam_rdp_curve(noise: SkellamNoise, rounds: int = 1) -> np.ndarray:
    """RDP of ``rounds`` releases at every order of ``ORDERS``."""
    return rounds * np.array([skellam_rdp(a, noise.l1_sensitivity, noise.l2_sensitivity, noise.variance) for a in ORDERS])


def rdp_epsilon(rdp: np.ndarray, delta: float) -> float:
    """(epsilon, delta) from an RDP curve over ``ORDERS``, with dp-accounting's conversion."""
    eps, _ = compute_epsilon(np.asarray(ORDERS, dtype=float), np.asarray(rdp, dtype=float), delta)
    return float(eps)


def rounded_l2_bound(norm: float, dim: int, beta: float = ROUNDING_BETA) -> float:
    """An L2 bound that stochastic rounding of a vector of norm ``norm`` meets with probability >= 1 - beta.

    norm + sqrt(dim) always holds; the second bound (Kairouz et al. 2021,
    Theorem 23) is far tighter when norm >> sqrt(dim).
    """
    sq = norm * norm + dim / 4 + math.sqrt(2 * math.log(1 / beta)) * (norm + math.sqrt(dim) / 2)
    return min(norm + math.sqrt(dim), math.sqrt(sq))


def tail_bound(variance: float, dim: int) -> float:
    """t with P(some coordinate of a Skellam(variance) vector of ``dim`` exceeds t in magnitude) <= 2^-TAIL_BITS.

    Bennett/Bernstein for a difference of Poissons (unit jumps):
    P(|X| >= t) <= 2 exp(-t^2 / (2 (variance + t / 3))), union over coordinates.
    """
    log_terms = math.log(2 * dim) + TAIL_BITS * math.log(2)
    return log_terms / 3 + math.sqrt(log_terms * log_terms / 9 + 2 * variance * log_terms)


def sample_skellam(rng: np.random.Generator, variance: float, size: int) -> np.ndarray:
    """``size`` independent Skellam(``variance``) integers (int64): Poisson(v/2) - Poisson(v/2).

    numpy's Poisson sampler is a rejection sampler (PTRS, Hoermann 1993) whose
    outputs are integers by construction; its acceptance test runs in float64.
    """
    if variance <= 0:
        return np.zeros(size, dtype=np.int64)
    lam = variance / 2
    return rng.poisson(lam, size).astype(np.int64) - rng.poisson(lam, size).astype(np.int64)


def conditional_round(scaled: np.ndarray, bound: float, rng: np.random.Generator) -> np.ndarray:
    """Round each coordinate down or up at random (unbiased), redrawing until the L2 norm is <= ``bound``."""
    floor = np.floor(scaled)
    frac = scaled - floor
    for _ in range(MAX_ROUNDING_DRAWS):
        rounded = floor + (rng.random(scaled.shape) < frac)
        if float(np.dot(rounded, rounded)) <= bound * bound:
            return rounded.astype(np.int64)
    raise ProtocolError(
        f"stochastic rounding did not meet the L2 bound {bound:.1f} in {MAX_ROUNDING_DRAWS} draws: "
        "the update was not clipped to the declared norm"
    )


def ring_headroom_ok(noise: SkellamNoise, *, n_sites: int, cohort: int, dim: int, bits: int) -> bool:
    """Can a sum of ``n_sites`` encoded vectors (noise included) not wrap around Z_{2^bits}?"""
    largest = max(noise.l2_bound, noise.count_scale / 2)
    return n_sites * largest + tail_bound(noise.variance * n_sites / cohort, dim) < 2 ** (bits - 1)


def _noise_for(multiplier: float, scale_clip: int, dim: int, count_share: float) -> SkellamNoise:
    """Noise whose Gaussian part has multiplier ``multiplier`` for the whole vector, split by ``count_share``."""
    l2_update = rounded_l2_bound(float(scale_clip), dim)
    variance = (multiplier * l2_update) ** 2 / (1 - count_share)
    count_scale = 0
    if count_share > 0:  # the count's sensitivity s/2 takes count_share of the squared budget
        count_scale = max(2, 2 * math.ceil(math.sqrt(count_share * variance) / multiplier))
    l2 = math.sqrt(l2_update**2 + (count_scale / 2) ** 2)
    l1 = l2_update * min(math.sqrt(dim), l2_update) + count_scale / 2
    return SkellamNoise(
        scale_clip=scale_clip, l2_bound=l2_update, count_scale=count_scale, variance=variance, l2_sensitivity=l2, l1_sensitivity=l1
    )


def skellam_epsilon(noise: SkellamNoise, rounds: int, delta: float) -> float:
    return rdp_epsilon(skellam_rdp_curve(noise, rounds), delta)


def plan_skellam(
    *,
    target_epsilon: float,
    delta: float,
    rounds: int,
    dim: int,
    cohort: int,
    max_sites: int,
    bits: int,
    count_share: float = 0.0,
) -> SkellamNoise:
    """The least Skellam noise whose ``rounds`` releases stay within ``target_epsilon``, and fit the ring.

    ``dim`` is the update's length (the count coordinate excluded); the noise
    is calibrated for sums of ``cohort`` sites and sized for at most
    ``max_sites``. The clip bound maps to the largest power of two of integer
    units (at most 2^20) whose worst-case sum fits in the ring, so rounding
    adds as little as the ring allows.
    """
    if not (target_epsilon > 0 and math.isfinite(target_epsilon)):
        raise ConfigError(f"target epsilon must be a positive number, found {target_epsilon}")
    if not 0 <= count_share < 1:
        raise ConfigError(f"the count's share of the budget must be in [0, 1), found {count_share}")

    def fits(noise: SkellamNoise) -> bool:  # in the ring, and each Poisson mean well within float64's integers
        return noise.variance / cohort < 2.0**50 and ring_headroom_ok(
            noise, n_sites=max_sites, cohort=cohort, dim=dim, bits=bits
        )

    scale_clip = MAX_SCALE_CLIP
    while True:
        # Bisection on the Gaussian-equivalent multiplier: epsilon falls as it grows.
        lo, hi = 1e-3, 1.0
        while skellam_epsilon(_noise_for(hi, scale_clip, dim, count_share), rounds, delta) > target_epsilon:
            lo, hi = hi, hi * 2
            if hi > 1e6:
                raise ConfigError(f"no Skellam noise reaches epsilon {target_epsilon} over {rounds} rounds")
        for _ in range(40):
            mid = math.sqrt(lo * hi)
            if skellam_epsilon(_noise_for(mid, scale_clip, dim, count_share), rounds, delta) > target_epsilon:
                lo = mid
            else:
                hi = mid
            if hi / lo < 1 + 1e-4:
                break
        noise = _noise_for(hi, scale_clip, dim, count_share)
        if fits(noise):
            return noise
        scale_clip //= 2
        if scale_clip < 8 * math.sqrt(dim):
            raise ConfigError(
                f"a 2^{bits} ring cannot hold {max_sites} noisy updates of {dim} values without losing precision: "
                f"raise secure_aggregation.bits"
            )


def noise_multiplier_of(noise: SkellamNoise) -> float:
    """The update noise's standard deviation over the clip bound (both in integer units), at the cohort."""
    return math.sqrt(noise.variance) / noise.scale_clip
