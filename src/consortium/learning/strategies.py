"""Federated strategies: small hooks around one aggregate.

A strategy sees only *sums*: the coordinator hands it the weighted mean of
the sites' updates (``sum(w_k * delta_k) / sum(w_k)``), never one site's
update. That keeps every strategy here usable under secure aggregation.

Hooks (override what you need):

- ``select(round, sites, rng)``: which sites train this round;
- ``weighting``: how a site weights its update (``examples`` or ``uniform``);
- ``proximal_mu``: FedProx's proximal term, sent to the sites;
- ``apply(round, params, mean_update)``: the server step that makes the next model.

References: FedAvg (McMahan et al., AISTATS 2017); FedProx (Li et al.,
MLSys 2020); FedAdam and FedYogi (Reddi et al., "Adaptive Federated
Optimization", ICLR 2021, Algorithm 2).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import numpy as np

from consortium.errors import ConfigError

Weighting = Literal["examples", "uniform"]


class FedAvg:
    """Sample-weighted federated averaging: ``x <- x + server_lr * mean_update``."""

    name = "fedavg"

    def __init__(
        self,
        *,
        fraction: float = 1.0,
        min_sites: int = 1,
        weighting: Weighting = "examples",
        server_lr: float = 1.0,
    ) -> None:
        if not (0.0 < fraction <= 1.0):
            raise ConfigError(f"fraction must be in (0, 1], found {fraction}: it is the share of sites asked per round")
        if min_sites < 1:
            raise ConfigError(f"min_sites must be at least 1, found {min_sites}")
        if not (math.isfinite(server_lr) and server_lr > 0):
            raise ConfigError(f"server_lr must be a positive number, found {server_lr}")
        self.fraction = fraction
        self.min_sites = min_sites
        self.weighting: Weighting = weighting
        self.server_lr = server_lr

    @property
    def proximal_mu(self) -> float:
        return 0.0

    def select(self, rnd: int, sites: Sequence[str], rng: np.random.Generator) -> list[str]:
        """Sample ``ceil(fraction * n)`` sites (at least ``min_sites``) without replacement."""
        k = min(len(sites), max(self.min_sites, math.ceil(self.fraction * len(sites))))
        if k == len(sites):
            return list(sites)
        chosen = rng.choice(len(sites), size=k, replace=False)
        return [sites[i] for i in sorted(chosen)]

    def apply(self, rnd: int, params: np.ndarray, mean_update: np.ndarray) -> np.ndarray:
        """The server step: the next global parameters."""
        return (params + np.float32(self.server_lr) * mean_update).astype(np.float32)

    def describe(self) -> dict[str, object]:
        return {"name": self.name, "fraction": self.fraction, "weighting": self.weighting, "server_lr": self.server_lr}

    def state(self) -> dict[str, np.ndarray]:
        """What the server step carries from round to round (nothing here), for a checkpoint."""
        return {}

    def load_state(self, arrays: dict[str, np.ndarray]) -> None:
        """Restore ``state()`` from a checkpoint."""


class FedProx(FedAvg):
    """FedAvg whose sites add ``mu/2 * ||w - w_global||^2`` to their local loss."""

    name = "fedprox"

    def __init__(self, *, mu: float = 0.01, **kwargs) -> None:
        super().__init__(**kwargs)
        if not (math.isfinite(mu) and mu >= 0):
            raise ConfigError(f"FedProx mu must be a non-negative number, found {mu}")
        self.mu = mu

    @property
    def proximal_mu(self) -> float:
        return self.mu

    def describe(self) -> dict[str, object]:
        return {**super().describe(), "mu": self.mu}


class FedAdam(FedAvg):
    """Adaptive server optimiser: the mean update is a pseudo-gradient for Adam.

    m <- b1 m + (1 - b1) d;  v <- b2 v + (1 - b2) d^2;  x <- x + lr m / (sqrt(v) + tau)
    (Reddi et al. 2021 use no bias correction; tau is their adaptivity floor.)
    """

    name = "fedadam"

    def __init__(
        self, *, server_lr: float = 0.01, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3, **kwargs
    ) -> None:
        super().__init__(server_lr=server_lr, **kwargs)
        for label, value in (("beta1", beta1), ("beta2", beta2)):
            if not (0.0 <= value < 1.0):
                raise ConfigError(f"{label} must be in [0, 1), found {value}")
        if not (math.isfinite(tau) and tau > 0):
            raise ConfigError(f"tau must be a positive number, found {tau}")
        self.beta1, self.beta2, self.tau = beta1, beta2, tau
        self.m: np.ndarray | None = None
        self.v: np.ndarray | None = None

    def _second_moment(self, v: np.ndarray, d2: np.ndarray) -> np.ndarray:
        return self.beta2 * v + (1.0 - self.beta2) * d2

    def apply(self, rnd: int, params: np.ndarray, mean_update: np.ndarray) -> np.ndarray:
        d = mean_update.astype(np.float64)
        if self.m is None or self.v is None:
            self.m = np.zeros_like(d)
            self.v = np.full_like(d, self.tau**2)
        self.m = self.beta1 * self.m + (1.0 - self.beta1) * d
        self.v = self._second_moment(self.v, d * d)
        step = self.server_lr * self.m / (np.sqrt(self.v) + self.tau)
        return (params.astype(np.float64) + step).astype(np.float32)

    def describe(self) -> dict[str, object]:
        return {**super().describe(), "beta1": self.beta1, "beta2": self.beta2, "tau": self.tau}

    def state(self) -> dict[str, np.ndarray]:
        return {} if self.m is None or self.v is None else {"m": self.m, "v": self.v}

    def load_state(self, arrays: dict[str, np.ndarray]) -> None:
        if arrays:
            self.m, self.v = arrays["m"].astype(np.float64), arrays["v"].astype(np.float64)


class FedYogi(FedAdam):
    """FedAdam with Yogi's additive second moment: v <- v - (1 - b2) d^2 sign(v - d^2)."""

    name = "fedyogi"

    def _second_moment(self, v: np.ndarray, d2: np.ndarray) -> np.ndarray:
        return v - (1.0 - self.beta2) * d2 * np.sign(v - d2)


STRATEGIES: dict[str, type[FedAvg]] = {cls.name: cls for cls in (FedAvg, FedProx, FedAdam, FedYogi)}
