"""The distributed discrete Gaussian (Kairouz, Liu, Steinke, ICML 2021): integer noise added inside the ring.

Every site of a secure-aggregation session adds discrete Gaussian noise
N_Z(0, s) (an integer variance s, in the ring's integer units) to its
integer-encoded update, so any sum the coordinator can unmask, over at least
``cohort`` sites, carries the noise of ``cohort`` sites or more, and nobody
ever sees the sum without it.

Sampling is exact (Canonne, Kamath, Steinke, NeurIPS 2020): only uniform
integers (numpy's ``Generator.integers``, seeded from the OS CSPRNG outside
test mode) and integer comparisons, no floating point, vectorised over the
vector's coordinates; the few draws whose integers would exceed 64 bits take
the same algorithm in Python integers.

A sum of discrete Gaussians is not quite a discrete Gaussian;
dp-accounting has no event for it, so the published RDP bound (Kairouz et
al. 2021, Proposition 14) is implemented here as a pure function of the L1
and L2 sensitivities, the per-site variance, the number of sites and the
dimension, and tested against the exact Renyi divergence computed with
mpmath. With tau = 10 sum_{k=1}^{n-1} exp(-2 pi^2 s k / (k + 1)) and the
sensitivities over sqrt(n s) written a (L2) and b (L1):

    eps(alpha) = min(alpha a^2 / 2 + tau d,
                     alpha (a^2 + 2 b tau + tau^2 d) / 2,
                     alpha (a + sqrt(d) tau)^2 / 2)

tau is below 1e-170 once s >= 40: the mechanism is then the Gaussian one.

Rounding to integers can lengthen a vector: each site rounds stochastically
and redraws until the L2 norm is within ``rounded_l2_bound`` (conditional
rounding), which is what bounds the sensitivity. Every bound is checked
ahead of time against the ring: a sum of ``max_sites`` vectors plus the
noise's tail (sub-Gaussian, failure probability at most 2^-40 per vector)
never wraps around.
"""

from __future__ import annotations

import functools
import math

import numpy as np
from dp_accounting.rdp.rdp_privacy_accountant import compute_epsilon

from consortium.errors import ConfigError, ProtocolError
from consortium.privacy.events import DiscreteGaussianNoise

#: Renyi orders the bound is evaluated at.
ORDERS: tuple[int, ...] = tuple(range(2, 129)) + (160, 192, 256, 384, 512, 768, 1024)
#: Conditional rounding accepts a draw with probability at least 1 - beta (a few draws at worst).
ROUNDING_BETA = math.exp(-0.5)
#: The noise may exceed the ring's headroom with probability at most 2^-TAIL_BITS per vector.
TAIL_BITS = 40
#: At most 2^20 integer units per clip bound: ample precision.
MAX_SCALE_CLIP = 1 << 20
#: Per-site variances up to 2^24 keep every integer of the vectorised sampler within 64 bits.
MAX_SITE_VARIANCE = 1 << 24
MAX_ROUNDING_DRAWS = 64


# -- accounting ------------------------------------------------------------------------


def ddg_tau(site_variance: float, n_sites: int) -> float:
    """How far a sum of ``n_sites`` discrete Gaussians of variance ``site_variance`` is from one."""
    return 10 * sum(math.exp(-2 * math.pi**2 * site_variance * k / (k + 1)) for k in range(1, n_sites))


def ddg_rdp(order: float, l1: float, l2: float, site_variance: float, n_sites: int, dim: int) -> float:
    """RDP at ``order`` of the sum of ``n_sites`` N_Z(0, site_variance) per coordinate (Kairouz et al. 2021, Prop. 14)."""
    if order <= 1:
        raise ValueError(f"RDP orders must exceed 1, got {order}")
    if not (site_variance >= 1 and n_sites >= 1 and dim >= 1 and l1 >= 0 and l2 >= 0):
        raise ValueError("need a variance >= 1, at least one site and one coordinate, and non-negative sensitivities")
    scale = math.sqrt(n_sites * site_variance)
    a, b, tau = l2 / scale, l1 / scale, ddg_tau(site_variance, n_sites)
    return min(
        order * a * a / 2 + tau * dim,
        order * (a * a + 2 * b * tau + tau * tau * dim) / 2,
        order * (a + math.sqrt(dim) * tau) ** 2 / 2,
    )


def ddg_rdp_curve(noise: DiscreteGaussianNoise, n_sites: int, rounds: int = 1) -> np.ndarray:
    """RDP of ``rounds`` releases, each a sum over ``n_sites`` sites, at every order of ``ORDERS``."""
    dim = noise.dim + (1 if noise.count_scale else 0)
    return rounds * np.array(
        [ddg_rdp(a, noise.l1_sensitivity, noise.l2_sensitivity, noise.site_variance, n_sites, dim) for a in ORDERS]
    )


def rdp_epsilon(rdp: np.ndarray, delta: float) -> float:
    """(epsilon, delta) from an RDP curve over ``ORDERS``, with dp-accounting's conversion."""
    eps, _ = compute_epsilon(np.asarray(ORDERS, dtype=float), np.asarray(rdp, dtype=float), delta)
    return float(eps)


def ddg_epsilon(noise: DiscreteGaussianNoise, n_sites: int, rounds: int, delta: float) -> float:
    return rdp_epsilon(ddg_rdp_curve(noise, n_sites, rounds), delta)


# -- exact sampling (Canonne, Kamath, Steinke 2020) -----------------------------------------


def _bernoulli_exp_neg_unit(rng: np.random.Generator, num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """Bernoulli(exp(-num/den)) for 0 <= num <= den (Algorithm 1): K is odd after a run of Bernoulli(gamma / K)."""
    k = np.ones(num.shape[0], dtype=np.int64)
    active = np.arange(num.shape[0])
    while active.size:
        success = rng.integers(0, den[active] * k[active]) < num[active]
        k[active[success]] += 1
        active = active[success]
    return (k & 1) == 1


def _bernoulli_exp_neg(rng: np.random.Generator, num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """Bernoulli(exp(-num/den)) for any num >= 0: one Bernoulli(exp(-1)) per whole unit, then the rest."""
    out = np.ones(num.shape[0], dtype=bool)
    num = num.copy()
    over = np.flatnonzero(num > den)
    while over.size:
        ones = np.ones(over.size, dtype=np.int64)
        out[over[~_bernoulli_exp_neg_unit(rng, ones, ones)]] = False
        num[over] -= den[over]
        over = over[out[over] & (num[over] > den[over])]
    alive = np.flatnonzero(out)
    out[alive] = _bernoulli_exp_neg_unit(rng, num[alive], den[alive])
    return out


def _uniform_below(rng: np.random.Generator, bound: int) -> int:
    """A uniform integer in [0, bound) of any size, by rejection from whole bytes."""
    nbytes = (bound.bit_length() + 7) // 8
    while True:
        value = int.from_bytes(rng.bytes(nbytes), "little")
        if value < bound:
            return value


def _bernoulli_exp_neg_big(rng: np.random.Generator, num: int, den: int) -> bool:
    """Bernoulli(exp(-num/den)) in Python integers: the same algorithm for the rare huge draws."""
    while num > den:
        if not _bernoulli_exp_neg_big(rng, 1, 1):
            return False
        num -= den
    k = 1
    while _uniform_below(rng, den * k) < num:
        k += 1
    return k % 2 == 1


def _discrete_laplace(rng: np.random.Generator, t: int, size: int) -> np.ndarray:
    """``size`` exact draws with P(y) proportional to exp(-|y| / t) (Algorithm 2)."""
    out = np.empty(size, dtype=np.int64)
    pending = np.arange(size)
    while pending.size:
        u = rng.integers(0, t, pending.size)
        kept = _bernoulli_exp_neg_unit(rng, u, np.full(pending.size, t, dtype=np.int64))
        idx, u = pending[kept], u[kept]
        v = np.zeros(idx.size, dtype=np.int64)  # geometric: runs of Bernoulli(exp(-1))
        going = np.arange(idx.size)
        while going.size:
            ones = np.ones(going.size, dtype=np.int64)
            success = _bernoulli_exp_neg_unit(rng, ones, ones)
            v[going[success]] += 1
            going = going[success]
        x = u + t * v
        negative = rng.integers(0, 2, idx.size) == 1
        ok = ~(negative & (x == 0))  # -0 is redrawn, so 0 is not counted twice
        out[idx[ok]] = np.where(negative, -x, x)[ok]
        pending = np.concatenate([pending[~kept], idx[~ok]])
    return out


def sample_discrete_gaussian(rng: np.random.Generator, variance: int, size: int) -> np.ndarray:
    """``size`` exact draws of N_Z(0, variance), P(y) proportional to exp(-y^2 / (2 variance)) (Algorithm 3)."""
    if not (isinstance(variance, (int, np.integer)) and 1 <= variance <= MAX_SITE_VARIANCE):
        raise ValueError(f"the variance must be an integer in [1, {MAX_SITE_VARIANCE}], got {variance!r}")
    s = int(variance)
    t = math.isqrt(s) + 1
    den = 2 * s * t * t  # accept Y with probability exp(-(|Y| t - s)^2 / den)
    safe = (1 << 31) // t  # below it, (|Y| t - s)^2 fits in 63 bits
    out = np.empty(size, dtype=np.int64)
    pending = np.arange(size)
    while pending.size:
        y = _discrete_laplace(rng, t, pending.size)
        accept = np.zeros(pending.size, dtype=bool)
        small = np.abs(y) < safe
        diff = np.abs(y[small]) * t - s
        accept[small] = _bernoulli_exp_neg(rng, diff * diff, np.full(diff.size, den, dtype=np.int64))
        for i in np.flatnonzero(~small):  # probability below e^-170 each: exactness, not speed
            accept[i] = _bernoulli_exp_neg_big(rng, (abs(int(y[i])) * t - s) ** 2, den)
        out[pending[accept]] = y[accept]
        pending = pending[~accept]
    return out


def discrete_gaussian_variance(variance: int) -> float:
    """The exact variance of N_Z(0, variance) (a little below ``variance`` when it is small)."""
    reach = int(40 * math.sqrt(variance)) + 40
    k = np.arange(-reach, reach + 1, dtype=np.float64)
    w = np.exp(-k * k / (2 * variance))
    return float((w * k * k).sum() / w.sum())


# -- rounding and the ring ------------------------------------------------------------------


def rounded_l2_bound(norm: float, dim: int, beta: float = ROUNDING_BETA) -> float:
    """An L2 bound that stochastic rounding of a vector of norm ``norm`` meets with probability >= 1 - beta.

    norm + sqrt(dim) always holds; the second bound (Kairouz et al. 2021,
    Theorem 23) is far tighter when norm >> sqrt(dim).
    """
    sq = norm * norm + dim / 4 + math.sqrt(2 * math.log(1 / beta)) * (norm + math.sqrt(dim) / 2)
    return min(norm + math.sqrt(dim), math.sqrt(sq))


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


def tail_bound(total_variance: float, dim: int) -> float:
    """t with P(some coordinate of the summed noise exceeds t in magnitude) <= 2^-TAIL_BITS.

    A discrete Gaussian of variance s is s-subgaussian (Canonne et al. 2020),
    so a sum of them with variances adding to V has P(|X| >= t) <= 2 exp(-t^2 / 2V).
    """
    return math.sqrt(2 * total_variance * (math.log(2 * dim) + TAIL_BITS * math.log(2)))


def ring_headroom_ok(noise: DiscreteGaussianNoise, *, n_sites: int, bits: int) -> bool:
    """Can a sum of ``n_sites`` encoded vectors (noise included) not wrap around Z_{2^bits}?"""
    largest = max(noise.l2_bound, noise.count_scale / 2)
    dim = noise.dim + 1
    return n_sites * largest + tail_bound(n_sites * noise.site_variance, dim) < 2 ** (bits - 1)


# -- calibration ------------------------------------------------------------------------------


def _noise_for(multiplier: float, scale_clip: int, dim: int, cohort: int, count_share: float) -> DiscreteGaussianNoise:
    """Noise whose summed Gaussian part has multiplier ``multiplier`` for the whole vector, split by ``count_share``."""
    l2_update = rounded_l2_bound(float(scale_clip), dim)
    site_variance = max(1, math.ceil((multiplier * l2_update) ** 2 / ((1 - count_share) * cohort)))
    count_scale = 0
    if count_share > 0:  # the count's sensitivity s/2 takes count_share of the squared budget
        count_scale = max(2, 2 * math.ceil(math.sqrt(count_share * site_variance * cohort) / multiplier))
    return DiscreteGaussianNoise(
        scale_clip=scale_clip,
        dim=dim,
        l2_bound=l2_update,
        count_scale=count_scale,
        site_variance=site_variance,
        l2_sensitivity=math.sqrt(l2_update**2 + (count_scale / 2) ** 2),
        l1_sensitivity=l2_update * min(math.sqrt(dim), l2_update) + count_scale / 2,
    )


@functools.lru_cache(maxsize=256)  # pure in its arguments: a process planning many runs alike plans once
def plan_ddg(
    *,
    target_epsilon: float,
    delta: float,
    rounds: int,
    dim: int,
    cohort: int,
    max_sites: int,
    bits: int,
    count_share: float = 0.0,
) -> DiscreteGaussianNoise:
    """The least noise whose ``rounds`` releases over ``cohort`` sites stay within ``target_epsilon``, fitting the ring.

    ``dim`` is the update's length (the count coordinate excluded); the sum
    of up to ``max_sites`` vectors must fit in Z_{2^bits}. The clip bound maps
    to the largest power of two of integer units (at most 2^20) for which the
    per-site variance stays within the exact sampler's 2^24 and the sum fits.
    """
    if not (target_epsilon > 0 and math.isfinite(target_epsilon)):
        raise ConfigError(f"target epsilon must be a positive number, found {target_epsilon}")
    if not 0 <= count_share < 1:
        raise ConfigError(f"the count's share of the budget must be in [0, 1), found {count_share}")

    def eps(m: float, scale_clip: int) -> float:
        return ddg_epsilon(_noise_for(m, scale_clip, dim, cohort, count_share), cohort, rounds, delta)

    scale_clip = MAX_SCALE_CLIP
    while scale_clip >= 2 * math.sqrt(dim):  # below, rounding alone would add a quarter of the clip's length
        lo, hi = 1e-3, 1.0  # bisection on the Gaussian-equivalent multiplier: epsilon falls as it grows
        while eps(hi, scale_clip) > target_epsilon:
            lo, hi = hi, hi * 2
            if hi > 1e6:
                raise ConfigError(f"no noise reaches epsilon {target_epsilon} over {rounds} rounds")
        while hi / lo > 1 + 1e-4:
            mid = math.sqrt(lo * hi)
            lo, hi = (mid, hi) if eps(mid, scale_clip) > target_epsilon else (lo, mid)
        noise = _noise_for(hi, scale_clip, dim, cohort, count_share)
        if noise.site_variance <= MAX_SITE_VARIANCE and ring_headroom_ok(noise, n_sites=max_sites, bits=bits):
            return noise
        scale_clip //= 2
    raise ConfigError(
        f"no integer encoding of {dim} values carries the noise for epsilon {target_epsilon} over {rounds} rounds "
        f"within a 2^{bits} ring and the exact sampler's variance 2^24: raise secure_aggregation.bits, "
        "the epsilon or the number of sites, or use fewer rounds"
    )


def noise_multiplier_of(noise: DiscreteGaussianNoise, cohort: int) -> float:
    """The summed noise's standard deviation over the clip bound (both in integer units), at ``cohort`` sites."""
    return math.sqrt(cohort * noise.site_variance) / noise.scale_clip
