"""One frozen record per round of what a site's training spent in privacy.

The same object is declared in the fit request, checked by the site's guard,
written to the site's ledger, composed by the accountant and (in a later
layer) signed into the transcript, so the reported epsilon and the audited
epsilon cannot drift apart. Assumptions are values: the neighbouring
relation, the sampling scheme and rate are declared, never inferred from a
data loader (opacus issue #813).
"""

from __future__ import annotations

from typing import Literal

import dp_accounting
from pydantic import Field

from consortium.wire import Frozen


class PrivacyEvent(Frozen):
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

    def to_dp_event(self) -> dp_accounting.DpEvent:
        if self.noise_multiplier == 0:
            return dp_accounting.NonPrivateDpEvent()
        step = dp_accounting.PoissonSampledDpEvent(
            self.sampling_rate, dp_accounting.GaussianDpEvent(self.noise_multiplier)
        )
        return dp_accounting.SelfComposedDpEvent(step, self.steps)
