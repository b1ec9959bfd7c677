"""Transports carry envelopes between the coordinator and sites.

A transport has one method, ``exchange(request) -> reply | None``; ``None``
means the site did not answer (dropped out, unreachable). The protocol code
never does I/O itself, so simulation and deployment share it.
"""

from __future__ import annotations

from typing import Protocol

from consortium.protocol.messages import Envelope


class Transport(Protocol):
    def exchange(self, request: Envelope) -> Envelope | None: ...


from consortium.transport.inprocess import InProcessTransport  # noqa: E402

__all__ = ["InProcessTransport", "Transport"]
