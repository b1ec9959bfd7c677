"""Incident response: what halts a run, and the record a halt leaves.

A run halts automatically when a check fails while it runs: a site finds that
the model it was sent, or the plan it was shown, is not what the transcript
holds (``INTEGRITY_RULES`` of the guard); a site will not co-sign a tree head
because the consistency proof fails; an update's norm is far outside the
cohort's; the run's own verification fails. A member may also halt a run by
hand (``consortium halt``). Either way a ``halt`` entry in the transcript
records the cause, and only the signatures of the quorum the agreement names
resume it (``consortium resume``).
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass

from consortium.errors import ConsortiumError

RESUME_DOMAIN = b"consortium/resume/v1\x00"


@dataclass(frozen=True)
class Incident:
    cause: str  # a stable identifier: model_hash, plan_proof, consistency_proof, update_norm, verification, manual
    detail: str  # what was seen, in words
    round: int
    raised_by: str  # the member whose check failed, or who halted by hand
    site: str | None = None  # the site the incident names, when one is known

    def to_json(self) -> dict[str, object]:
        return asdict(self)


class RunHalted(ConsortiumError):
    """The run stopped on an incident; it resumes only with a quorum's signatures."""

    def __init__(self, incident: Incident) -> None:
        where = f" (site '{incident.site}')" if incident.site else ""
        super().__init__(
            f"run halted in round {incident.round}: {incident.cause}{where}: {incident.detail}; "
            "inspect the run, then resume with a quorum's signatures (consortium resume)"
        )
        self.incident = incident


class NormMonitor:
    """Flags a round whose updates' L2 norms are more than ``factor`` times the usual.

    The usual is the median over the previous rounds, so an attack shows from
    the second round on. Under secure aggregation only the mean update is
    visible, and its norm is compared with the previous means'. In the clear
    each site's update is also compared with that site's own earlier ones (a
    site with little data may be outvoted in the mean). Sites are not compared
    with each other: on non-IID data an honest site's update may well be ten
    times its cohort's median.
    """

    def __init__(self, factor: float = 10.0) -> None:
        if not factor > 1:
            raise ValueError(f"the anomaly factor must exceed 1, found {factor}")
        self.factor = factor
        self._history: list[float] = []
        self._site_history: dict[str, list[float]] = {}

    def _beyond(self, norm: float, history: list[float]) -> float | None:
        """The multiple of the historical median, when it exceeds the factor."""
        if not history:
            return None
        median = statistics.median(history)
        return norm / median if median > 0 and norm > self.factor * median else None

    def check(self, norm: float, site_norms: dict[str, float] | None = None) -> tuple[str, str | None] | None:
        """(detail, the site it names, when known) for an anomalous round; None, and the norms are kept, otherwise."""
        limit = f"(the limit is {self.factor:g} times)"
        flagged = {
            site: ratio for site, n in (site_norms or {}).items()
            if (ratio := self._beyond(n, self._site_history.get(site, []))) is not None
        }
        if flagged:
            site, ratio = max(flagged.items(), key=lambda kv: kv[1])
            return f"the norm of its update, {site_norms[site]:.4g}, is {ratio:.0f} times the median of its earlier ones {limit}", site  # type: ignore[index]
        ratio = self._beyond(norm, self._history)
        if ratio is not None:
            return f"the mean update's norm {norm:.4g} is {ratio:.0f} times the median of the rounds before {limit}", None
        self._history.append(norm)
        for site, n in (site_norms or {}).items():
            self._site_history.setdefault(site, []).append(n)
        return None

    def state(self) -> dict[str, object]:
        return {"history": list(self._history), "sites": {k: list(v) for k, v in self._site_history.items()}}

    def load_state(self, state: dict[str, object]) -> None:
        self._history = [float(x) for x in state["history"]]  # type: ignore[union-attr]
        self._site_history = {k: [float(x) for x in v] for k, v in state["sites"].items()}  # type: ignore[union-attr]
