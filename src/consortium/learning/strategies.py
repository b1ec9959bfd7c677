"""Federated strategies: the server step, one small class behind a registry.

A strategy sees only *sums*: the coordinator hands it the weighted mean of
the sites' updates (``sum(w_k * delta_k) / sum(w_k)``), never one site's
update. That keeps every strategy here usable under secure aggregation, and
leaves the privacy of a round (clipping, noise, secure sum, norm bound) to
the coordinator's update pipeline, which runs before the strategy and which
no strategy can switch off.

A user's strategy subclasses :class:`Strategy` (or a built-in such as
:class:`FedAvg`) and registers a factory by name::

    register_strategy("fedmedianlr", lambda options: MyStrategy(min_sites=options.min_sites))

A config then names it (``strategy: {name: fedmedianlr}``); the name is
checked against the registry when the config is validated.

References: FedAvg (McMahan et al., AISTATS 2017); FedProx (Li et al.,
MLSys 2020); FedAdam and FedYogi (Reddi et al., "Adaptive Federated
Optimization", ICLR 2021, Algorithm 2).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Literal

import numpy as np

from consortium.errors import ConfigError

if TYPE_CHECKING:
    from consortium.config import SimulationConfig

Weighting = Literal["examples", "uniform"]


class Strategy:
    """The server side of federated learning: whom to ask, and what the next model is.

    The coordinator owns the round loop and everything privacy depends on; a
    strategy only answers its hooks. Override ``select`` and ``apply``; the
    other hooks have defaults that suit a stateless strategy.

    Attributes:
        name: the registry name, written into every round plan of the transcript.
        min_sites: a round with fewer answering sites is skipped (the model is
            unchanged); the coordinator also checks robust aggregators against it.
        weighting: how a site weights its update in the mean, ``"examples"``
            (by its number of training rows) or ``"uniform"``. Site-level DP
            always uses ``"uniform"``, whatever this says.
    """

    name: ClassVar[str] = "strategy"
    min_sites: int = 1
    weighting: Weighting = "examples"

    @property
    def proximal_mu(self) -> float:
        """FedProx's proximal coefficient sent to the sites with each fit request (0.0: none)."""
        return 0.0

    def select(self, rnd: int, sites: Sequence[str], rng: np.random.Generator) -> list[str]:
        """Choose the cohort of round ``rnd``.

        Args:
            rnd: the round number, from 1.
            sites: the members that passed setup, sorted.
            rng: the coordinator's seeded generator; use it for any sampling,
                never a global one, so that a run is reproducible.

        Returns:
            The sites asked to train this round: a subset of ``sites``, without
            repeats. It is signed into the round plan before any request goes out.
        """
        raise NotImplementedError

    def apply(self, rnd: int, params: np.ndarray, mean_update: np.ndarray) -> np.ndarray:
        """The server step: the next global model.

        Args:
            rnd: the round number, from 1.
            params: the current global parameters (flat float32 vector).
            mean_update: the weighted mean of the included sites' updates, after
                the norm bound, the site-level DP release or the robust rule
                (float32, the same length as ``params``).

        Returns:
            The next global parameters: a new float32 vector of the same length.
            It must not modify ``params`` in place.
        """
        raise NotImplementedError

    def describe(self) -> dict[str, object]:
        """The strategy's settings as plain JSON, signed into every round plan and the run's summary."""
        return {"name": self.name}

    def state(self) -> dict[str, np.ndarray]:
        """What the server step carries from round to round (named arrays), for a checkpoint; ``{}`` if nothing."""
        return {}

    def load_state(self, arrays: dict[str, np.ndarray]) -> None:
        """Restore ``state()`` from a checkpoint (``{}`` when the checkpoint was taken before any round)."""


@dataclass(frozen=True)
class StrategyOptions:
    """What a config says about the strategy, handed to a registered factory.

    ``server_lr`` is None where the config left it out: the strategy's own default applies.
    """

    fraction: float = 1.0
    min_sites: int = 1
    weighting: Weighting = "examples"
    server_lr: float | None = None
    mu: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3


StrategyFactory = Callable[[StrategyOptions], Strategy]
_REGISTRY: dict[str, StrategyFactory] = {}


def register_strategy(name: str, factory: StrategyFactory) -> None:
    """Make ``name`` a strategy a config can choose.

    Args:
        name: the name the config's ``strategy.name`` gives.
        factory: called once per run with the config's :class:`StrategyOptions`;
            returns a fresh :class:`Strategy` (strategies may carry state).

    Raises:
        ConfigError: ``name`` is empty or already registered (a built-in is never replaced silently).
    """
    if not name or not isinstance(name, str):
        raise ConfigError(f"a strategy needs a non-empty name, found {name!r}")
    if name in _REGISTRY:
        raise ConfigError(f"strategy '{name}' is already registered: choose another name")
    if not callable(factory):
        raise ConfigError(f"strategy '{name}' needs a callable factory, found {factory!r}")
    _REGISTRY[name] = factory


def known_strategies() -> list[str]:
    """The registered names, sorted."""
    return sorted(_REGISTRY)


def check_strategy_name(name: str) -> str:
    """``name`` if it is registered; otherwise a ConfigError naming the known strategies."""
    if name not in _REGISTRY:
        known = ", ".join(known_strategies())
        raise ConfigError(f"unknown strategy '{name}': choose one of {known}, or register_strategy it first")
    return name


def strategy_from_config(config: SimulationConfig) -> Strategy:
    """The run's strategy, built by the factory registered under ``config.strategy.name``.

    Raises:
        ConfigError: the name is not registered, or the factory refused its options.
    """
    s, part = config.strategy, config.participation
    factory = _REGISTRY[check_strategy_name(s.name)]
    return factory(StrategyOptions(
        fraction=part.fraction, min_sites=part.min_sites, weighting=s.weighting, server_lr=s.server_lr,
        mu=s.mu, beta1=s.beta1, beta2=s.beta2, tau=s.tau,
    ))


class FedAvg(Strategy):
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


def _common(o: StrategyOptions) -> dict[str, object]:
    common: dict[str, object] = {"fraction": o.fraction, "min_sites": o.min_sites, "weighting": o.weighting}
    if o.server_lr is not None:
        common["server_lr"] = o.server_lr
    return common


register_strategy("fedavg", lambda o: FedAvg(**_common(o)))  # type: ignore[arg-type]
register_strategy("fedprox", lambda o: FedProx(mu=o.mu, **_common(o)))
register_strategy("fedadam", lambda o: FedAdam(beta1=o.beta1, beta2=o.beta2, tau=o.tau, **_common(o)))  # type: ignore[arg-type]
register_strategy("fedyogi", lambda o: FedYogi(beta1=o.beta1, beta2=o.beta2, tau=o.tau, **_common(o)))  # type: ignore[arg-type]
