"""Accounting with Google's dp-accounting: pure functions from events to epsilon and back.

PLD (privacy loss distributions, Koskela et al.; Doroshenko et al. 2022) gives
the figures we report; RDP (Mironov 2017) is available for comparison and is
looser. dp-accounting has no event for the distributed discrete Gaussian: a
run with it is accounted in RDP, its published bound (``ddg``) added to
dp-accounting's RDP of the other events, and converted by dp-accounting;
``accountant_used`` says so. Nothing here keeps state: a site's ledger stores its events and asks
these functions what they add up to.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable, Sequence
from typing import Literal

import dp_accounting
import numpy as np
from dp_accounting import pld, rdp

from consortium.errors import ConfigError
from consortium.privacy import ddg
from consortium.privacy.events import PrivacyEvent, RecordLevelEvent, SiteLevelEvent

Accountant = Literal["pld", "rdp"]

# The RDP accountant logs a warning whenever it drops a fractional order that failed to
# converge; dropping an order only makes its bound looser (safe), so keep the console clean.
logging.getLogger("absl").setLevel(logging.ERROR)


#: PLD's privacy-loss grid. Its estimates are pessimistic at any resolution (an upper bound on
#: epsilon); 1e-3 costs a tenth of dp-accounting's default 1e-4 and reads at most ~1e-4 higher.
#: Runs, ledgers and calibration all use it, so a calibrated run meets its target under the
#: very accountant that guards it. The CLI's `privacy epsilon` defaults to dp-accounting's 1e-4.
PLD_INTERVAL = 1e-3


def _accountant(kind: Accountant, pld_interval: float = PLD_INTERVAL) -> dp_accounting.PrivacyAccountant:
    if kind == "pld":
        return pld.PLDAccountant(
            neighboring_relation=dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE,
            value_discretization_interval=pld_interval,
        )
    if kind == "rdp":
        return rdp.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE)
    raise ConfigError(f"unknown accountant '{kind}': choose pld or rdp")


def _check_delta(delta: float) -> None:
    if not (0 < delta < 1):
        raise ConfigError(f"delta must be in (0, 1), found {delta}")


def uses_rdp_only(events: Sequence[PrivacyEvent]) -> bool:
    """True when some event has no dp-accounting form (distributed noise): only RDP can compose them."""
    return any(isinstance(e, SiteLevelEvent) and e.ddg is not None for e in events)


def accountant_used(events: Sequence[PrivacyEvent], requested: Accountant) -> Accountant:
    return "rdp" if uses_rdp_only(events) else requested


def epsilon(
    events: Sequence[PrivacyEvent], delta: float, accountant: Accountant = "pld", *, pld_interval: float = PLD_INTERVAL
) -> float:
    """The epsilon at ``delta`` of all ``events`` composed; 0 for no events, inf for a non-private one."""
    _check_delta(delta)
    if not events:
        return 0.0
    if len({e.level for e in events}) > 1:
        raise ConfigError(
            "record-level and site-level events protect different things and do not compose into one guarantee: "
            "keep one level per ledger"
        )
    # Rounds with the same mechanism compose as one run of their summed steps: the same
    # privacy loss, and far cheaper for PLD than convolving round by round. The clip is a
    # unit, not a privacy parameter: rounds that differ only in it (adaptive clipping) group too.
    steps: dict[PrivacyEvent, int] = {}
    for e in events:
        key = e.model_copy(update={"steps": 1, "clip": 1.0})
        if isinstance(key, RecordLevelEvent):  # its cohort is a record, not a privacy parameter
            key = key.model_copy(update={"cohort": None})
        steps[key] = steps.get(key, 0) + e.steps
    grouped = tuple(sorted((k.model_copy(update={"steps": n}) for k, n in steps.items()), key=lambda e: e.model_dump_json()))
    return _epsilon_of(grouped, delta, accountant, pld_interval)


@functools.lru_cache(maxsize=4096)
def _epsilon_of(grouped: tuple[PrivacyEvent, ...], delta: float, accountant: Accountant, pld_interval: float) -> float:
    """Pure in its arguments, so cached: every site of a simulation asks the same question each round."""
    if uses_rdp_only(grouped):
        acc = rdp.RdpAccountant(orders=ddg.ORDERS, neighboring_relation=dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE)
        curve = np.zeros(len(ddg.ORDERS))
        for e in grouped:
            dp_event = e.to_dp_event()
            if dp_event is None:
                assert isinstance(e, SiteLevelEvent) and e.ddg is not None
                curve += ddg.ddg_rdp_curve(e.ddg, e.cohort, e.steps)
            else:
                acc.compose(dp_event)
        return ddg.rdp_epsilon(curve + acc.rdp, delta)
    acc = _accountant(accountant, pld_interval)
    composed = dp_accounting.ComposedDpEvent([e.to_dp_event() for e in grouped])
    if not acc.supports(composed):
        raise ConfigError(f"the {accountant} accountant cannot account these events: {composed}")
    acc.compose(composed)
    return float(acc.get_epsilon(delta))


def _check_run(sampling_rate: float, steps: int) -> None:
    if not (0 < sampling_rate <= 1) or steps < 1:
        raise ConfigError(
            f"need a sampling rate in (0, 1] and at least 1 step, found {sampling_rate} and {steps}: "
            "the sampling rate is the declared Poisson probability per record and step"
        )


def dp_sgd_epsilon(
    *,
    noise_multiplier: float,
    sampling_rate: float,
    steps: int,
    delta: float,
    accountant: Accountant = "pld",
    pld_interval: float = PLD_INTERVAL,
) -> float:
    _check_run(sampling_rate, steps)
    if not (math.isfinite(noise_multiplier) and noise_multiplier >= 0):
        raise ConfigError(f"the noise multiplier must be a non-negative number, found {noise_multiplier}")
    event = RecordLevelEvent(noise_multiplier=noise_multiplier, clip=1.0, sampling_rate=sampling_rate, steps=steps)
    return epsilon([event], delta, accountant, pld_interval=pld_interval)


@functools.lru_cache(maxsize=256)  # pure in its arguments: a process planning many runs alike calibrates once
def calibrate_noise(
    *,
    target_epsilon: float,
    delta: float,
    sampling_rate: float,
    steps: int,
    accountant: Accountant = "pld",
    pld_interval: float = PLD_INTERVAL,
) -> float:
    """The smallest noise multiplier whose DP-SGD run stays within ``target_epsilon``.

    Pessimistic by construction: ``calibrate_dp_mechanism`` searches for a
    noise multiplier whose epsilon does not exceed the target.
    """
    if not (math.isfinite(target_epsilon) and target_epsilon > 0):
        raise ConfigError(f"target epsilon must be a positive number, found {target_epsilon}")
    _check_delta(delta)
    _check_run(sampling_rate, steps)

    def make_event(sigma: float) -> dp_accounting.DpEvent:
        return RecordLevelEvent(noise_multiplier=sigma, clip=1.0, sampling_rate=sampling_rate, steps=steps).to_dp_event()

    return _calibrate(make_event, target_epsilon, delta, accountant, pld_interval)


@functools.lru_cache(maxsize=256)  # pure in its arguments, as above
def calibrate_site_noise(
    *,
    target_epsilon: float,
    delta: float,
    rounds: int,
    count_share: float = 0.0,
    accountant: Accountant = "pld",
    pld_interval: float = PLD_INTERVAL,
) -> tuple[float, float | None]:
    """DP-FedAvg's Gaussian noise for ``rounds`` releases within ``target_epsilon``: (update z, count z).

    The whole release per round is a Gaussian mechanism with multiplier z;
    with adaptive clipping, the clipped count takes ``count_share`` of it
    (1/z^2 = 1/z_update^2 + 1/z_count^2, Andrew et al. 2021, Sec. 3.1), so
    the update's multiplier is z / sqrt(1 - share) and the count's z / sqrt(share).
    """
    if not (math.isfinite(target_epsilon) and target_epsilon > 0):
        raise ConfigError(f"target epsilon must be a positive number, found {target_epsilon}")
    _check_delta(delta)
    if rounds < 1 or not 0 <= count_share < 1:
        raise ConfigError(f"need at least one round and a count share in [0, 1), found {rounds} and {count_share}")

    def make_event(z: float) -> dp_accounting.DpEvent:
        return dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(z), rounds)

    z = _calibrate(make_event, target_epsilon, delta, accountant, pld_interval)
    if count_share == 0:
        return z, None
    return z / math.sqrt(1 - count_share), z / math.sqrt(count_share)


def _calibrate(
    make_event: Callable[[float], dp_accounting.DpEvent],
    target_epsilon: float,
    delta: float,
    accountant: Accountant,
    pld_interval: float,
) -> float:
    """The smallest noise multiplier whose event stays within ``target_epsilon`` (never above it)."""

    def search(kind: Accountant, lo: float, hi: float) -> float:
        return float(
            dp_accounting.calibrate_dp_mechanism(
                lambda: _accountant(kind, pld_interval),
                make_event,
                target_epsilon,
                delta,
                bracket_interval=dp_accounting.ExplicitBracketInterval(lo, hi),
                tol=1e-4,
            )
        )

    def pld_epsilon(sigma: float) -> float:
        return float(_accountant("pld", pld_interval).compose(make_event(sigma)).get_epsilon(delta))

    # RDP is cheap at any noise level and never below PLD's epsilon, so its answer bounds
    # PLD's from above; PLD is then searched just below it (PLD at tiny noise is costly).
    upper = search("rdp", 1e-2, 1e4)
    if accountant == "rdp":
        return upper
    lower = upper / 2
    while lower > 1e-2 and pld_epsilon(lower) <= target_epsilon:
        lower /= 2
    return search("pld", lower, upper)
