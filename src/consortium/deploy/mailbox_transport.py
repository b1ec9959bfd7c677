"""The coordinator's transport in deployment: each stage's sealed requests wait in the mailbox for their sites.

Sites poll (``consortium.deploy.agent``) over the HTTPS service
(``consortium.deploy.service``); a stage ends when every addressee has
answered or ``stage_timeout_s`` has passed, and whoever has not answered has
dropped out of the stage. Requests leave sealed by the coordinator and a
reply counts only if its seal checks out, from the site asked, for the round
asked: the same checks as the in-process transport. They run as the reply
arrives, before it takes the site's place in the stage, so a replayed reply
is refused there and never displaces the genuine one.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from consortium.deploy.mailbox import Mailbox
from consortium.errors import ProtocolError
from consortium.protocol import messages as m
from consortium.protocol.sealed import EnvelopeGuard, seal


log = logging.getLogger("consortium.service")


class MailboxTransport:
    """The protocol's transport over the coordinator's mailbox (see the module's docstring)."""

    def __init__(
        self, mailbox: Mailbox, *, identity: Ed25519PrivateKey, directory: Mapping[str, bytes], stage_timeout_s: float = 120.0,
        pickup_timeout_s: float | None = None,
    ) -> None:
        """``pickup_timeout_s``: how long a stage waits for a site to take its request before it counts it gone
        (see ``Mailbox.run_stage``); None: the whole stage timeout."""
        self.mailbox = mailbox
        self.pickup_timeout_s = pickup_timeout_s
        self._identity = identity
        self._guard = EnvelopeGuard(m.COORDINATOR, directory)
        self.stage_timeout_s = stage_timeout_s
        self.bytes_sent = 0
        self.bytes_received = 0
        self.rejected: list[str] = []

    def exchange_many(self, requests: list[m.Envelope]) -> list[m.Envelope | None]:
        """Post one stage's requests; each site's reply, None for one that did not answer or was rejected."""
        if len({r.recipient for r in requests}) != len(requests):
            raise ProtocolError("one stage asks each site once")
        sealed = {r.recipient: seal(r, self._identity) for r in requests}
        rounds = {r.recipient: r.round for r in requests}
        self.bytes_sent += sum(len(raw) for raw in sealed.values())

        def accept(member: str, raw: bytes) -> m.Envelope:
            """A reply takes its site's place in the stage only once its seal checks out (sender, round,
            freshness, nonce): a replayed or forged one is refused and leaves the place to the genuine one."""
            self.bytes_received += len(raw)
            try:
                return self._guard.open(raw, sender=member, rnd=rounds[member])
            except ProtocolError as exc:
                self.rejected.append(f"{member}: {exc}")
                log.warning("rejected a reply from %s: %s", member, exc)
                raise

        replies = self.mailbox.run_stage(sealed, self.stage_timeout_s, self.pickup_timeout_s, accept=accept)
        return [replies.get(request.recipient) for request in requests]

    def exchange(self, request: m.Envelope) -> m.Envelope | None:
        return self.exchange_many([request])[0]
