"""Transports carry envelopes between the coordinator and sites.

A transport answers ``exchange_many(requests) -> [reply | None]`` for one
stage (``None``: that site did not answer: dropped out, unreachable), and
``exchange(request)`` for one request. The protocol code never does I/O
itself, so simulation and deployment share it.
"""

from __future__ import annotations

from typing import Protocol

from consortium.protocol.messages import Envelope


class Transport(Protocol):
    def exchange(self, request: Envelope) -> Envelope | None: ...

    def exchange_many(self, requests: list[Envelope]) -> list[Envelope | None]: ...


from consortium.transport.inprocess import InProcessTransport  # noqa: E402

__all__ = ["InProcessTransport", "Transport"]
