"""One frozen record per round of what a site's participation spent in privacy.

The same object is declared in the fit request, checked by the site's guard,
written to the site's ledger, composed by the accountant and (in a later
layer) signed into the transcript, so the reported epsilon and the audited
epsilon cannot drift apart. Assumptions are values: the neighbouring
relation, the sampling scheme and rate are declared, never inferred from a
data loader (opacus issue #813).

Two levels, never mixed in one ledger:

- ``RecordLevelEvent``: DP-SGD inside the site (a patient within a site);
- ``SiteLevelEvent``: DP-FedAvg (a whole institution's contribution), with
  Gaussian noise added centrally, or discrete Gaussian noise added by the
  sites inside the secure-aggregation ring (distributed).
"""

from __future__ import annotations

from typing import Annotated, Literal

import dp_accounting
from pydantic import Field, TypeAdapter, model_validator

from consortium.wire import Frozen


class RecordLevelEvent(Frozen):
    """What one round of DP-SGD at one site costs: T steps of the Poisson-subsampled Gaussian mechanism.

    Record level, add/remove-one-record neighbours: each step samples every
    record independently with probability ``sampling_rate``, clips each
    example's gradient to L2 norm ``clip`` and adds N(0, (noise_multiplier *
    clip)^2) to their sum.
    """

    level: Literal["record"] = "record"
    mechanism: Literal["dp-sgd-poisson-gaussian"] = "dp-sgd-poisson-gaussian"
    neighbouring: Literal["add_or_remove_one"] = "add_or_remove_one"
    noise_multiplier: float = Field(ge=0, le=1e6)
    clip: float = Field(gt=0, le=1e6)
    sampling_rate: float = Field(gt=0, le=1)
    steps: int = Field(ge=1, le=10_000_000)
    #: How many sites were asked to train in the round: recorded, not accounted (each site's
    #: DP-SGD protects its own records whoever else takes part).
    cohort: int | None = Field(None, ge=1)

    def to_dp_event(self) -> dp_accounting.DpEvent:
        if self.noise_multiplier == 0:
            return dp_accounting.NonPrivateDpEvent()
        step = dp_accounting.PoissonSampledDpEvent(
            self.sampling_rate, dp_accounting.GaussianDpEvent(self.noise_multiplier)
        )
        return dp_accounting.SelfComposedDpEvent(step, self.steps)


class DiscreteGaussianNoise(Frozen):
    """Distributed discrete Gaussian noise, in the integer units of the secure-aggregation ring.

    Each site scales its clipped update (``dim`` values) by ``scale_clip /
    clip`` (the clip bound becomes ``scale_clip`` integer units), rounds it
    stochastically until its L2 norm is at most ``l2_bound`` (conditional
    rounding), appends its clipped-count bit as +-``count_scale / 2`` when
    adaptive clipping is on, and adds N_Z(0, ``site_variance``) to every
    coordinate. Sensitivities, for the whole vector: ``l2_sensitivity`` and
    ``l1_sensitivity`` (a site's vector replaced by zeros).
    """

    scale_clip: int = Field(ge=1, le=1 << 40)
    dim: int = Field(ge=1)
    l2_bound: float = Field(gt=0)
    count_scale: int = Field(0, ge=0)
    site_variance: int = Field(ge=1)
    l2_sensitivity: float = Field(gt=0)
    l1_sensitivity: float = Field(gt=0)


class SiteLevelEvent(Frozen):
    """What one round of DP-FedAvg costs a site that takes part: one noisy sum.

    Site level, zero-out neighbours: one site's contribution replaced by the
    zero update. The coordinator picks the cohort and knows it, so no
    amplification by sampling is claimed (``sampling_rate`` is 1): every
    round a site takes part in is paid in full. Each site clips its update
    to L2 norm ``clip``; the sum gets noise of standard deviation
    ``noise_multiplier * clip`` per coordinate. With adaptive clipping
    (Andrew et al., NeurIPS 2021) the sum also releases how many sites were
    under the clip, each bit centred to +-1/2, with noise of standard
    deviation ``count_noise_multiplier / 2``: a second Gaussian release,
    accounted here. ``cohort`` is the smallest number of sites whose noise
    the sum carries. With distributed noise it counts honest sites only:
    ``colluders`` sites are assumed to collude with the coordinator and
    subtract their own noise, so every sum unmasked spans at least
    ``cohort + colluders`` sites (the secure-aggregation threshold);
    ``noise_multiplier`` is the noise's at ``cohort`` honest sites, and
    ``ddg`` holds what the accountant composes.
    """

    level: Literal["site"] = "site"
    mechanism: Literal["dp-fedavg-gaussian", "dp-fedavg-distributed-discrete-gaussian"]
    neighbouring: Literal["zero_out_one_site"] = "zero_out_one_site"
    noise_multiplier: float = Field(ge=0, le=1e6)
    clip: float = Field(gt=0, le=1e6)
    sampling_rate: float = Field(1.0, ge=1.0, le=1.0)
    cohort: int = Field(ge=1)
    colluders: int = Field(0, ge=0)
    count_noise_multiplier: float | None = Field(None, gt=0, le=1e6)
    ddg: DiscreteGaussianNoise | None = None
    steps: int = Field(1, ge=1, le=10_000_000)  # rounds of the same mechanism, composed

    @model_validator(mode="after")
    def _consistent(self) -> SiteLevelEvent:
        if (self.mechanism == "dp-fedavg-distributed-discrete-gaussian") != (self.ddg is not None):
            raise ValueError("the distributed mechanism, and only it, carries discrete Gaussian noise parameters")
        if self.ddg is not None and (self.ddg.count_scale > 0) != (self.count_noise_multiplier is not None):
            raise ValueError("a count scale goes with a count noise multiplier (adaptive clipping)")
        return self

    @property
    def adaptive(self) -> bool:
        return self.count_noise_multiplier is not None

    def to_dp_event(self) -> dp_accounting.DpEvent | None:
        """The dp-accounting event; None for distributed noise, which it has no event for (see ``ddg``)."""
        if self.ddg is not None:
            return None
        if self.noise_multiplier == 0:
            return dp_accounting.NonPrivateDpEvent()
        one: dp_accounting.DpEvent = dp_accounting.GaussianDpEvent(self.noise_multiplier)
        if self.count_noise_multiplier is not None:
            one = dp_accounting.ComposedDpEvent([one, dp_accounting.GaussianDpEvent(self.count_noise_multiplier)])
        return dp_accounting.SelfComposedDpEvent(one, self.steps)


#: Either level, told apart by ``level``: what fit requests carry and ledgers store.
PrivacyEvent = Annotated[RecordLevelEvent | SiteLevelEvent, Field(discriminator="level")]
EVENT: TypeAdapter[RecordLevelEvent | SiteLevelEvent] = TypeAdapter(PrivacyEvent)


def parse_event(text: str) -> RecordLevelEvent | SiteLevelEvent:
    """An event from its JSON (a ledger row); raises pydantic's ValidationError on anything else."""
    return EVENT.validate_json(text)
