"""Distributed DP noise: the exact discrete Gaussian sampler and the noisy encoding, against float baselines.

Baselines, measured in the same run: numpy's float Gaussian draws (what
central noise costs) and the plain quantised SecAgg encoding of the same
vector. Measured: 1M exact N_Z(0, 2^22) draws (Canonne, Kamath, Steinke
2020, in integer arithmetic), and one site's whole distributed-DP encoding
of a 1M-value update (conditional rounding plus its noise). Median of 5.
"""

from __future__ import annotations

import statistics
import time

import numpy as np

from consortium.privacy import ddg
from consortium.protocol import contributions as c
from consortium.secagg.encoding import DiscreteGaussianEncoding

D, REPEATS = 1_000_000, 5


def _median_seconds(run) -> float:
    times = []
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> list[tuple[str, float, str]]:
    rng = np.random.default_rng(0)
    update = rng.standard_normal(D)
    update *= 0.5 / np.linalg.norm(update)
    normal = _median_seconds(lambda: rng.normal(0.0, 2048.0, D))
    exact = _median_seconds(lambda: ddg.sample_discrete_gaussian(rng, 1 << 22, D))
    plain_enc = c.fit_encoding(1.0, 10, 32)
    quantised = _median_seconds(lambda: plain_enc.encode(update, 10, rng))
    noise = ddg.plan_ddg(target_epsilon=8.0, delta=1e-5, rounds=20, dim=D, cohort=6, max_sites=10, bits=32)
    noisy_enc = DiscreteGaussianEncoding(bits=32, clip=1.0, cohort=6, noise=noise)
    noisy = _median_seconds(lambda: noisy_enc.encode(update, 10, rng, rng))
    return [
        ("numpy float Gaussian, 1M draws (s)  [baseline]", normal, "1.00x"),
        ("exact discrete Gaussian, 1M draws (s)", exact, f"{exact / normal:.1f}x"),
        ("  per coordinate (us)", exact / D * 1e6, ""),
        ("quantised SecAgg encoding, 1M values (s)  [baseline]", quantised, "1.00x"),
        ("distributed-DP encoding with its noise, 1M values (s)", noisy, f"{noisy / quantised:.1f}x"),
    ]


if __name__ == "__main__":
    for name, value, ratio in main():
        print(f"{name:60s} {value:>10.4g}  {ratio}")
