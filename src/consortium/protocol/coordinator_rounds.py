"""The coordinator's records and plans: its settings for secure aggregation, what each round did,
and the state of the phase in progress.

``RoundRecord`` is what the drivers keep, write to ``metrics.jsonl`` and
restore from a checkpoint; ``PhaseState`` and ``PhaseResult`` are the
coordinator's working state, shared by its update pipeline
(``consortium.protocol.coordinator_pipeline``) and its secure-aggregation sessions
(``consortium.protocol.coordinator_sessions``).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from consortium.errors import ConfigError
from consortium.privacy.events import RecordLevelEvent, SiteLevelEvent
from consortium.protocol import messages as m
from consortium.runs import MaskedSpool
from consortium.secagg import SecAggServer
from consortium.secagg.encoding import DiscreteGaussianEncoding, RingEncoding

Phase = Literal["setup", "fit", "evaluate"]


@dataclass(frozen=True)
class SecureAggregation:
    """Settings of secure aggregation; ``None`` in its place means plain sums (insecure)."""

    identity: Ed25519PrivateKey  # the coordinator's signing key
    directory: dict[str, bytes]  # every member's Ed25519 public key
    update_clip: float = 1.0  # model-update coordinates are clipped to [-clip, clip]
    bits: int = 32  # ring Z_{2^bits} for model updates
    dropout_rate: float = 0.1  # expected, for choosing the graph
    corruption_rate: float = 0.1  # sites assumed to collude with the coordinator

    def __post_init__(self) -> None:
        if not (math.isfinite(self.update_clip) and self.update_clip > 0):
            raise ConfigError(f"update_clip must be a positive number, found {self.update_clip}")


@dataclass
class RoundRecord:
    """What happened in one round, as the coordinator saw it."""

    round: int
    selected: list[str]
    answered: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    refused: dict[str, str] = field(default_factory=dict)
    status: Literal["ok", "skipped", "halted"] = "ok"
    reason: str = ""
    train_loss: float | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    evaluated_sites: int = 0
    evaluation_note: str = ""
    secure: dict[str, object] | None = None
    privacy: dict[str, object] | None = None  # site level: the clip used, and the noisy share of sites under it
    robust: dict[str, object] | None = None  # in the clear: whose updates the norm bound cut, whom Krum selected
    evaluation: dict[str, object] | None = None  # the summed reliability diagram and the groups' counts

    def to_json(self) -> dict[str, object]:
        return {
            "round": self.round,
            "status": self.status,
            "reason": self.reason,
            "selected": self.selected,
            "answered": self.answered,
            "dropped": self.dropped,
            "refused": self.refused,
            "train_loss": self.train_loss,
            "evaluated_sites": self.evaluated_sites,
            "evaluation_note": self.evaluation_note,
            "secure_aggregation": self.secure,
            "privacy": self.privacy,
            "robust": self.robust,
            "evaluation": self.evaluation,
            **self.metrics,
        }

    @classmethod
    def from_json(cls, d: dict[str, object]) -> RoundRecord:
        fields = {"secure_aggregation": "secure", **{f.name: f.name for f in dataclasses.fields(cls) if f.name not in ("secure", "metrics")}}
        kwargs = {attr: d[key] for key, attr in fields.items() if key in d}
        metrics = {k: float("nan") if v is None else v for k, v in d.items() if k not in fields}
        return cls(**kwargs, metrics=metrics)  # type: ignore[arg-type]


@dataclass
class PhaseState:
    """One phase of a round as it stands: whom it asked, who answered, and its secure-aggregation session."""

    phase: Phase
    targets: list[str]
    stage: str = "request"
    ready: list[str] = field(default_factory=list)  # answered the request
    refused: dict[str, str] = field(default_factory=dict)
    plain: dict[str, np.ndarray] = field(default_factory=dict)
    server: SecAggServer | None = None
    event: RecordLevelEvent | SiteLevelEvent | None = None  # fit: this round's privacy event, as planned
    encoding: RingEncoding | DiscreteGaussianEncoding | None = None
    outgoing: dict[str, m.BaseModel] = field(default_factory=dict)
    commitments: dict[str, str] = field(default_factory=dict)  # site -> SHA-256 of its masked input
    spool: MaskedSpool | None = None  # a fit session's masked inputs, as they arrived (the evidence archive)


@dataclass(frozen=True)
class PhaseResult:
    """How a phase ended: the sum over the included sites, or why there is none."""

    total: np.ndarray | None  # the float sum, None when the phase failed
    included: list[str]
    reason: str = ""
