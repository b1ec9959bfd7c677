"""Transports carry envelopes between the coordinator and sites.

A transport answers ``exchange_many(requests) -> [reply | None]`` for one
stage (``None``: that site did not answer: dropped out, unreachable), and
``exchange(request)`` for one request. The protocol code never does I/O
itself, so simulation and deployment share it.

There is one transport, ``SealedTransport`` (``transport.channel``): it seals,
checks and counts every message, over a byte-level ``Channel`` that moves the
sealed bytes: ``InProcessChannel`` in simulation (``InProcessTransport``),
the HTTPS mailbox in deployment (``deploy.mailbox_transport``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol, TypeVar

from pydantic import BaseModel

from consortium.errors import ConsortiumError, ProtocolError, VerificationError
from consortium.protocol.messages import COORDINATOR, Envelope, Refusal, make_envelope
from consortium.transport.channel import Accept, Channel, SealedTransport

Answer = TypeVar("Answer", bound=BaseModel)


class Transport(Protocol):
    """What the coordinator's drivers ask members through (``SealedTransport`` over a ``Channel``)."""

    def exchange(self, request: Envelope) -> Envelope | None:
        """The recipient's reply to ``request``; None if it did not answer (or its reply was refused)."""
        ...

    def exchange_many(self, requests: list[Envelope]) -> list[Envelope | None]:
        """One stage: each recipient's reply, in the requests' order; None for one that did not answer."""
        ...


class NoAnswer(ProtocolError):
    """A site that did not answer a request: unreachable, crashed, or dropped out (not a refusal)."""


def ask_each(
    transport: Transport, rnd: int, requests: Mapping[str, BaseModel], answer: type[Answer]
) -> dict[str, Answer | ConsortiumError]:
    """Send each site its own request, all at once; each site's answer, or the error that stands for its
    silence (``NoAnswer``) or its refusal (``VerificationError``)."""
    sites = list(requests)
    envelopes = [make_envelope(COORDINATOR, name, rnd, requests[name]) for name in sites]
    out: dict[str, Answer | ConsortiumError] = {}
    for name, reply in zip(sites, transport.exchange_many(envelopes)):
        if reply is None:
            kind = requests[name].kind.replace("_", " ")  # type: ignore[attr-defined]
            out[name] = NoAnswer(f"'{name}' did not answer the {kind}")
        elif isinstance(reply.message, answer):
            out[name] = reply.message
        else:
            reason = reply.message.reason if isinstance(reply.message, Refusal) else f"sent '{reply.message.kind}'"
            out[name] = VerificationError(f"'{name}': {reason}")
    return out


def ask_all(transport: Transport, sites: list[str], rnd: int, request: BaseModel, answer: type[Answer]) -> dict[str, Answer | ConsortiumError]:
    """Send ``request`` to every site at once; each site's answer, or the error that stands for its refusal or silence."""
    return ask_each(transport, rnd, {name: request for name in sites}, answer)


def __getattr__(name: str) -> object:
    """``InProcessTransport`` and ``InProcessChannel`` on first use: they run whole sites (and so load torch),
    which the commands that only append to a transcript (halt, resume) never need."""
    if name in ("InProcessTransport", "InProcessChannel"):
        from consortium.transport import inprocess

        return getattr(inprocess, name)
    raise AttributeError(f"module 'consortium.transport' has no attribute '{name}'")


__all__ = [
    "Accept", "Answer", "Channel", "InProcessChannel", "InProcessTransport", "NoAnswer", "SealedTransport", "Transport",
    "ask_all", "ask_each",
]
