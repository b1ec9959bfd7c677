"""The coordinator's transport in deployment: each stage's sealed requests wait in the mailbox for their sites.

Sites poll (``consortium.deploy.agent``) over the HTTPS service
(``consortium.deploy.service``); a stage ends when every addressee has
answered or ``stage_timeout_s`` has passed, and whoever has not answered has
dropped out of the stage (or sooner, for a site not heard from, neither
taking its request nor sending heartbeats, for ``pickup_timeout_s``).
``MailboxChannel`` carries the bytes; ``MailboxTransport`` is the one
``SealedTransport`` over it, so requests leave sealed by the coordinator and
a reply counts only if its seal checks out, from the site asked, for the
round asked: the same checks as the in-process transport. They run as the
reply arrives, before it takes the site's place in the stage, so a replayed
reply is refused there and never displaces the genuine one.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from consortium.deploy.mailbox import Mailbox
from consortium.errors import ProtocolError
from consortium.protocol import messages as m
from consortium.transport.channel import Accept, SealedTransport


log = logging.getLogger("consortium.service")


class MailboxChannel:
    """A ``Channel`` over the coordinator's mailbox: a whole stage posted at once, replies collected until it ends.

    Args:
        mailbox: the mailbox the HTTPS service serves to the sites.
        stage_timeout_s: how long a stage waits for its replies.
        pickup_timeout_s: how long a stage waits for a site to take its request (or, once taken, between its
            heartbeats) before it counts the site gone (see ``Mailbox.run_stage``); None: the whole stage timeout.
    """

    def __init__(self, mailbox: Mailbox, *, stage_timeout_s: float = 120.0, pickup_timeout_s: float | None = None) -> None:
        self.mailbox = mailbox
        self.stage_timeout_s = stage_timeout_s
        self.pickup_timeout_s = pickup_timeout_s

    def handle_stage(self, requests: Mapping[str, bytes], accept: Accept) -> dict[str, m.Envelope]:
        """Post the stage and wait for it to end (see ``Channel``). ``accept`` runs in the service's thread as
        each reply arrives; a refusal is logged and answered to the site (400), and its place stays open."""

        def checked(member: str, raw: bytes) -> m.Envelope:
            try:
                return accept(member, raw)
            except ProtocolError as exc:
                log.warning("rejected a reply from %s: %s", member, exc)
                raise

        return self.mailbox.run_stage(dict(requests), self.stage_timeout_s, self.pickup_timeout_s, accept=checked)


class MailboxTransport(SealedTransport):
    """The protocol's transport over the coordinator's mailbox: ``SealedTransport`` over a ``MailboxChannel``.

    ``identity``: the coordinator's key; ``directory``: members' public keys (see ``SealedTransport``);
    ``stage_timeout_s``, ``pickup_timeout_s``: as for ``MailboxChannel``.
    """

    def __init__(
        self, mailbox: Mailbox, *, identity: Ed25519PrivateKey, directory: Mapping[str, bytes], stage_timeout_s: float = 120.0,
        pickup_timeout_s: float | None = None,
    ) -> None:
        channel = MailboxChannel(mailbox, stage_timeout_s=stage_timeout_s, pickup_timeout_s=pickup_timeout_s)
        super().__init__(channel, identity, directory)
