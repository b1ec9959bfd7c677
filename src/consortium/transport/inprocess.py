"""The in-process channel and transport used by simulation.

Sites are called directly, but every request and reply is still encoded to
bytes and parsed back, exactly as over the network, so simulation exercises
the same schema checks as deployment. ``InProcessTransport`` is the one
``SealedTransport`` over an ``InProcessChannel``: given the coordinator's
``identity`` and the ``directory`` of members' keys, requests leave sealed by
the coordinator (``protocol.sealed``) and a reply counts only if its seal
checks out: from the site asked, for the round asked. Site dropout is
injected here: with probability ``dropout`` a site asked to train in a round
never answers.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from consortium.errors import ConfigError, ProtocolError
from consortium.protocol import messages as m
from consortium.protocol.site import Site
from consortium.transport.channel import Accept, SealedTransport


class InProcessChannel:
    """A ``Channel`` that hands each sealed request to its ``Site`` in this process, one member at a time.

    ``sites``: member name -> its site (the mapping is kept, not copied). A member with no site here does not
    answer; a reply ``accept`` refuses leaves its member silent (nothing else can come from it in process).
    """

    def __init__(self, sites: Mapping[str, Site]) -> None:
        self.sites = sites

    def handle_stage(self, requests: Mapping[str, bytes], accept: Accept) -> dict[str, m.Envelope]:
        """Ask each member in order (``site.handle_bytes``); its accepted reply by name (see ``Channel``)."""
        replies: dict[str, m.Envelope] = {}
        for member, raw in requests.items():
            site = self.sites.get(member)
            if site is None:
                continue
            reply = site.handle_bytes(raw)
            try:
                replies[member] = accept(member, reply)
            except ProtocolError:
                continue  # refused: recorded by the transport, counted as no answer
        return replies


class SimulatedDropout:
    """Simulated site dropout: each fit request, in the order asked, vanishes with probability ``rate``.

    Every simulation backend draws through one of these, request by request in the coordinator's order,
    so the same seed drops the same sites whoever plays them.

    Raises:
        ConfigError: ``rate`` out of [0, 1), or dropout without ``rng``.
    """

    def __init__(self, rate: float, rng: np.random.Generator | None) -> None:
        if not (0.0 <= rate < 1.0):
            raise ConfigError(f"dropout must be in [0, 1), found {rate}: it is the chance a site vanishes in a round")
        if rate > 0 and rng is None:
            raise ConfigError("simulated dropout needs a random generator: pass rng=np.random.default_rng(seed)")
        self.rate, self._rng = rate, rng

    def vanishes(self, request: m.Envelope) -> bool:
        """Whether the site asked by ``request`` never answers it (drawn for fit requests only)."""
        if self.rate > 0 and isinstance(request.message, m.FitRequest):
            assert self._rng is not None
            return bool(self._rng.random() < self.rate)
        return False


class InProcessTransport(SealedTransport):
    """Simulation's transport: ``SealedTransport`` over an ``InProcessChannel``, with simulated dropout.

    Args:
        sites: member name -> its site.
        dropout: the chance, in [0, 1), that a site asked to train in a round never answers.
        rng: the random generator that draws dropout; required when ``dropout`` > 0.
        identity, directory: as for ``SealedTransport`` (no ``identity``: unsealed; no ``directory``: replies
            unchecked).

    Raises:
        ConfigError: ``dropout`` out of range, or dropout without ``rng``.

    Each request is its own stage (``exchange_many`` asks through ``exchange``, one request at a time), so a
    subclass that overrides ``exchange`` sees every request.
    """

    def __init__(
        self,
        sites: Mapping[str, Site],
        *,
        dropout: float = 0.0,
        rng: np.random.Generator | None = None,
        identity: Ed25519PrivateKey | None = None,
        directory: Mapping[str, bytes] | None = None,
    ) -> None:
        self._dropout = SimulatedDropout(dropout, rng)
        self._sites = dict(sites)
        super().__init__(InProcessChannel(self._sites), identity, directory or None)

    def exchange(self, request: m.Envelope) -> m.Envelope | None:
        """The site's checked reply; None if there is no such site, it dropped out, or its reply was refused."""
        if request.recipient not in self._sites:
            return None
        if self._dropout.vanishes(request):
            return None
        return super().exchange(request)

    def exchange_many(self, requests: list[m.Envelope]) -> list[m.Envelope | None]:
        """Each request through ``exchange``, in order."""
        return [self.exchange(r) for r in requests]
