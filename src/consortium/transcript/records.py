"""What the coordinator hands the transcript recorder: entries to append and the evidence of secure sums.

Plain dataclasses, apart from the coordinator's code, so that the commands
that only write to a transcript (halt, resume) load neither the protocol
engine nor torch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from consortium.runs import MaskedSpool
from consortium.secagg.encoding import DiscreteGaussianEncoding, RingEncoding
from consortium.secagg.protocol import SessionEvidence
from consortium.transcript.log import Kind


@dataclass(frozen=True)
class LogRecord:
    """A transcript entry the coordinator has to hand: its own (``signature`` None) or a site's signed one."""

    kind: Kind
    round: int
    author: str
    body: dict[str, object]
    signature: bytes | None = None


@dataclass(frozen=True)
class SessionArchive:
    """A fit session's unmasking evidence and masked inputs: what lets anyone recompute its sum."""

    round: int
    evidence: SessionEvidence
    masked: dict[str, np.ndarray] | MaskedSpool  # in memory, or spooled to the evidence folder as they arrived
    encoding: RingEncoding | DiscreteGaussianEncoding
