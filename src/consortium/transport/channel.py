"""The coordinator's one sealed transport, over a byte-level channel.

Two parts, as httpx splits a client from its ``BaseTransport``:

- a ``Channel`` carries one stage's sealed requests to their members and
  brings their sealed replies back. It knows members and bytes, nothing of
  envelopes, seals or rounds: ``InProcessChannel`` (``transport.inprocess``,
  what simulation uses) calls each site directly; ``MailboxChannel``
  (``deploy.mailbox_transport``) posts the stage in the HTTPS mailbox that
  sites poll, with its stage and pickup timeouts and the agents' heartbeats.
- ``SealedTransport`` is the coordinator's ``Transport`` over any channel:
  it seals every request with the coordinator's key, opens and checks every
  reply once (from the member asked, for the round asked, fresh, never seen
  before), and counts the bytes each way once (``bytes_sent``,
  ``bytes_received``, which the run's summary reports as ``traffic_bytes``).

The check runs as each reply arrives, through the ``accept`` callback the
transport hands the channel, before the reply takes its member's place in
the stage: a replayed or forged reply is refused there and never displaces
the genuine one (the mailbox keeps the place open for it).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Protocol

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from consortium.errors import ProtocolError
from consortium.protocol import messages as m
from consortium.protocol.sealed import EnvelopeGuard, seal

Accept = Callable[[str, bytes], m.Envelope]
"""``accept(member, raw_reply) -> envelope``: the transport's check of one reply; raises ``ProtocolError`` to refuse it."""


class Channel(Protocol):
    """Moves sealed bytes between the coordinator and its members: one stage at a time, one request per member."""

    def handle_stage(self, requests: Mapping[str, bytes], accept: Accept) -> dict[str, m.Envelope]:
        """Carry one stage: each member's sealed request to it, and its sealed reply back.

        Args:
            requests: member name -> the sealed request for it; each member once. A channel that asks one
                member at a time asks them in this order.
            accept: call it once for every reply as it arrives, with the member it came from (as the channel
                knows it: the site it called, the name in the client certificate) and the reply's raw bytes.
                It returns the opened envelope, or raises ``ProtocolError`` to refuse the reply (unsealed,
                forged, from another round, a replay). A refused reply does not answer for its member: a
                channel that can still wait (the mailbox, until the stage ends) keeps the member's place open
                for its genuine reply, and may tell whoever brought the refused one why (the mailbox's service
                answers 400); one that cannot (in process) counts the member silent.

        Returns:
            member name -> what ``accept`` returned, for each member whose reply was accepted before the stage
            ended. A member missing from it did not answer: unreachable, crashed, dropped out, timed out, or
            every reply it sent was refused. The channel decides when a stage ends (the mailbox: every member
            answered, ``stage_timeout_s`` passed, or the silent ones were not heard from for
            ``pickup_timeout_s``).

        Raises:
            Nothing for a member's silence or a refused reply: neither leaves ``handle_stage``. Whatever a
            member's own handler raises in process (a bug, not a refusal) propagates.
        """
        ...


class _SealOnRead(Mapping[str, bytes]):
    """One stage's requests as the channel reads them: each sealed when read, and not kept here.

    A channel that sends as it reads (the Ray workers get their first batch while the rest of the stage is
    still to be sealed) starts the members' work sooner and holds only what is in flight; one that reads
    everything first (``dict(requests)``) sees no difference. Read a member twice and it is sealed twice,
    with two nonces: a channel reads each once. ``bytes_sealed`` counts what the channel was handed.
    """

    def __init__(self, requests: dict[str, m.Envelope], encode: Callable[[m.Envelope], bytes]) -> None:
        self._requests, self._encode = requests, encode
        self.bytes_sealed = 0

    def __getitem__(self, member: str) -> bytes:
        raw = self._encode(self._requests[member])
        self.bytes_sealed += len(raw)
        return raw

    def __iter__(self) -> Iterator[str]:
        return iter(self._requests)

    def __len__(self) -> int:
        return len(self._requests)


class SealedTransport:
    """The coordinator's ``Transport`` over a ``Channel``: seals, checks and counts every message once.

    Args:
        channel: carries the sealed bytes (``InProcessChannel``, ``MailboxChannel``, or a test's own).
        identity: the coordinator's Ed25519 key; every request leaves sealed with it. None: requests travel
            encoded but unsealed (tests of the bare protocol, whose sites hold no keys).
        directory: member name -> Ed25519 public key; a reply counts only if its seal checks out against it,
            from the member asked, for the round asked. None (or no ``identity``): replies are parsed unchecked.

    Each request is sealed when the channel reads it (a channel may start sending before the rest of the
    stage is sealed). ``bytes_sent`` and ``bytes_received`` count every sealed request the channel read and
    every reply it brought back (a refused reply included); ``rejected`` lists each refused reply as ``"member: reason"``.
    """

    def __init__(
        self, channel: Channel, identity: Ed25519PrivateKey | None = None, directory: Mapping[str, bytes] | None = None,
    ) -> None:
        self.channel = channel
        self._identity = identity
        self._guard = EnvelopeGuard(m.COORDINATOR, directory) if identity is not None and directory is not None else None
        self.bytes_sent = 0
        self.bytes_received = 0
        self.rejected: list[str] = []  # replies whose seal did not check out: counted as no answer

    def exchange(self, request: m.Envelope) -> m.Envelope | None:
        """One request, as a stage of its own: the reply, or None if the member did not answer or was refused."""
        return self._stage([request])[0]

    def exchange_many(self, requests: list[m.Envelope]) -> list[m.Envelope | None]:
        """One stage's requests (each member once, else ``ProtocolError``); each member's reply in the requests'
        order, None for one that did not answer or whose reply was refused."""
        return self._stage(requests)

    def _stage(self, requests: list[m.Envelope]) -> list[m.Envelope | None]:
        if len({r.recipient for r in requests}) != len(requests):
            raise ProtocolError("one stage asks each site once")
        sealed = _SealOnRead({r.recipient: r for r in requests}, self._encode)
        rounds = {r.recipient: r.round for r in requests}
        try:
            replies = self.channel.handle_stage(sealed, lambda member, raw: self._accept(member, raw, rounds))
        finally:
            self.bytes_sent += sealed.bytes_sealed
        return [replies.get(r.recipient) for r in requests]

    def _encode(self, request: m.Envelope) -> bytes:
        return m.encode(request) if self._identity is None else seal(request, self._identity)

    def _accept(self, member: str, raw: bytes, rounds: Mapping[str, int]) -> m.Envelope:
        """A reply counts only once its seal checks out (sender, round, freshness, nonce); refused, it raises."""
        if member not in rounds:
            raise ProtocolError(f"'{member}' was not asked in this stage")
        self.bytes_received += len(raw)
        if self._guard is None:
            return m.decode(raw)
        try:
            return self._guard.open(raw, sender=member, rnd=rounds[member])
        except ProtocolError as exc:
            self.rejected.append(f"{member}: {exc}")
            raise
