"""Site-level differential privacy: DP-FedAvg (McMahan et al., ICLR 2018), the coordinator's side.

Every site clips its model update to L2 norm C (``contributions.site_dp_vector``)
and counts once (uniform weights: a weight that depends on the site's size
would escape the clip). The sum of the cohort's clipped updates gets Gaussian
noise of standard deviation z * C per coordinate, and the new model moves by
that noisy sum over the number of sites included, so what leaves the sum
is a Gaussian mechanism with sensitivity C whatever one site did.

Where the noise comes from is the event's mechanism:

- ``dp-fedavg-distributed-discrete-gaussian`` (distributed, the default under
  secure aggregation): every site adds discrete Gaussian noise inside the
  ring, so the sum the coordinator unmasks is already noisy
  (``DiscreteGaussianEncoding``);
- ``dp-fedavg-gaussian`` (central): the coordinator adds the noise itself
  after it has seen the exact sum. Weaker: the sites must trust the
  coordinator to add it; runs that choose it say so.

Adaptive clipping (Andrew et al., NeurIPS 2021): each site also reports
whether its update was within C, as +-1/2; the noisy count gives the
fraction b of sites under the clip, and C <- C exp(-eta (b - gamma)) moves C
towards the gamma-quantile of the update norms. The count is a second
Gaussian release, paid for in the same event.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from consortium.errors import ConfigError
from consortium.privacy.events import SiteLevelEvent
from consortium.protocol import contributions as c
from consortium.secagg.encoding import DiscreteGaussianEncoding, RingEncoding


@dataclass(frozen=True)
class AdaptiveClipping:
    target_quantile: float = 0.5  # gamma: the share of sites whose update should fit under the clip
    learning_rate: float = 0.2  # eta of the geometric update

    def __post_init__(self) -> None:
        if not (0 < self.target_quantile < 1 and self.learning_rate > 0):
            raise ConfigError("adaptive clipping needs a target quantile in (0, 1) and a positive learning rate")


@dataclass
class SiteLevelDP:
    """What the coordinator declares, releases and adapts for site-level DP, round after round."""

    template: SiteLevelEvent
    noise_rng: np.random.Generator  # central noise; seeded from the OS CSPRNG outside test mode
    adaptive: AdaptiveClipping | None = None
    clip: float = field(init=False)

    def __post_init__(self) -> None:
        if (self.adaptive is not None) != self.template.adaptive:
            raise ConfigError("adaptive clipping and the event's count noise go together")
        self.clip = self.template.clip

    @property
    def distributed(self) -> bool:
        return self.template.ddg is not None

    def event(self) -> SiteLevelEvent:
        """This round's event: the template at the current clip."""
        return self.template.model_copy(update={"clip": self.clip})

    def vector_length(self, n_params: int) -> int:
        return n_params + (1 if self.template.adaptive else 0)

    def encoding(self, event: SiteLevelEvent, n_sites: int, bits: int) -> RingEncoding | DiscreteGaussianEncoding:
        """How the cohort encodes its vectors for secure aggregation."""
        if event.ddg is not None:
            return DiscreteGaussianEncoding(
                bits=bits, clip=event.clip, cohort=event.cohort, colluders=event.colluders, noise=event.ddg
            )
        # Central noise: every entry lies in [-clip, clip] (the update) or is +-1/2 (the count).
        return c.fit_encoding(max(event.clip, 0.5), n_sites, bits)

    def release(self, total: np.ndarray, n_params: int, n_included: int) -> tuple[np.ndarray, float | None]:
        """(mean noisy update, noisy fraction of sites under the clip or None) from the sum; adapts the clip."""
        event = self.event()
        update, count = c.read_site_dp_sum(total, n_params, event.adaptive)
        if not self.distributed:  # central: the coordinator adds the noise now
            update = update + self.noise_rng.normal(0.0, event.noise_multiplier * event.clip, update.shape)
            if count is not None:
                assert event.count_noise_multiplier is not None
                count += float(self.noise_rng.normal(0.0, event.count_noise_multiplier / 2))
        mean = update / n_included
        fraction = None
        if count is not None and self.adaptive is not None:
            fraction = min(1.0, max(0.0, count / n_included + 0.5))
            step = math.exp(-self.adaptive.learning_rate * (fraction - self.adaptive.target_quantile))
            self.clip = min(max(self.clip * step, 1e-6), 1e6)
        return mean, fraction
