"""The in-process transport used by simulation.

Every request and reply is encoded to bytes and parsed back, exactly as over
the network, so simulation exercises the same schema checks as deployment.
Given the coordinator's ``identity`` and the ``directory`` of members' keys,
requests leave sealed by the coordinator (``protocol.sealed``) and a reply
counts only if its seal checks out: from the site asked, for the round asked.
Site dropout is injected here: with probability ``dropout`` a site asked to
train in a round never answers.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from consortium.errors import ConfigError, ProtocolError
from consortium.protocol import messages as m
from consortium.protocol.sealed import EnvelopeGuard, seal
from consortium.protocol.site import Site


class InProcessTransport:
    def __init__(
        self,
        sites: Mapping[str, Site],
        *,
        dropout: float = 0.0,
        rng: np.random.Generator | None = None,
        identity: Ed25519PrivateKey | None = None,
        directory: Mapping[str, bytes] | None = None,
    ) -> None:
        if not (0.0 <= dropout < 1.0):
            raise ConfigError(f"dropout must be in [0, 1), found {dropout}: it is the chance a site vanishes in a round")
        if dropout > 0 and rng is None:
            raise ConfigError("simulated dropout needs a random generator: pass rng=np.random.default_rng(seed)")
        self._sites = dict(sites)
        self._dropout = dropout
        self._rng = rng
        self.bytes_sent = 0
        self.bytes_received = 0
        self._identity = identity
        self._guard = EnvelopeGuard(m.COORDINATOR, directory) if identity is not None and directory else None
        self.rejected: list[str] = []  # replies whose seal did not check out: counted as no answer

    def exchange(self, request: m.Envelope) -> m.Envelope | None:
        site = self._sites.get(request.recipient)
        if site is None:
            return None
        if self._dropout > 0 and isinstance(request.message, m.FitRequest):
            assert self._rng is not None
            if self._rng.random() < self._dropout:
                return None
        raw = m.encode(request) if self._identity is None else seal(request, self._identity)
        self.bytes_sent += len(raw)
        reply = site.handle_bytes(raw)
        self.bytes_received += len(reply)
        if self._guard is None:
            return m.decode(reply)
        try:
            return self._guard.open(reply, sender=request.recipient, rnd=request.round)
        except ProtocolError as exc:
            self.rejected.append(f"{request.recipient}: {exc}")
            return None

    def exchange_many(self, requests: list[m.Envelope]) -> list[m.Envelope | None]:
        return [self.exchange(r) for r in requests]
