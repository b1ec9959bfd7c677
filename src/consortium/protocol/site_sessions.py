"""A site's secure-aggregation part: the vectors awaiting their session, and the sessions themselves.

A phase's vector waits here (``keep``) until the coordinator opens a session for it; the session
encodes it (adding the distributed noise the round paid for, and only that), masks it and answers
the protocol's steps; after its one unmask the session's secrets are gone, and its id is never reused.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from consortium.errors import ProtocolError
from consortium.governance.guard import SiteGuard
from consortium.privacy.events import SiteLevelEvent
from consortium.protocol import messages as m
from consortium.secagg import SecAggClient
from consortium.secagg.encoding import DiscreteGaussianEncoding

COORDINATOR = m.COORDINATOR


class SecAggSessions:
    """The site ``name``'s secure-aggregation sessions (see the module docstring).

    ``rng`` gives the site's per-round, per-phase draw (for the encoding's rounding); ``int_noise``
    is its secure generator for the distributed discrete Gaussian noise.
    """

    def __init__(
        self,
        name: str,
        *,
        identity: Ed25519PrivateKey | None,
        directory: Mapping[str, bytes],
        guard: SiteGuard,
        rng: Callable[[int, str], np.random.Generator],
        int_noise: np.random.Generator,
    ) -> None:
        self.name = name
        self._identity = identity
        self._directory = directory
        self._guard = guard
        self._rng = rng
        self._int_noise = int_noise
        self.__paid: dict[int, SiteLevelEvent] = {}  # site-level events paid, by round: their sessions must match
        self.__pending: dict[tuple[int, str], np.ndarray] = {}  # contributions awaiting their session
        self.__sessions: dict[str, tuple[SecAggClient, np.ndarray]] = {}
        self.used: set[str] = set()

    def keep(self, rnd: int, phase: str, vector: np.ndarray) -> None:
        """Hold ``vector`` (float64) for the session of ``rnd``'s ``phase``."""
        self.__pending[(rnd, phase)] = vector

    def expect_noise(self, rnd: int, event: SiteLevelEvent) -> None:
        """Round ``rnd`` was paid for with ``event``'s distributed noise: its fit session must add exactly that."""
        self.__paid[rnd] = event

    def _check_noise(self, rnd: int, msg: m.SecAggStart) -> None:
        """A round paid for with distributed noise runs only in a session that adds exactly that noise."""
        paid = self.__paid.pop(rnd, None) if msg.phase == "fit" else None
        if paid is None:
            if isinstance(msg.encoding, DiscreteGaussianEncoding):
                raise ProtocolError("a noisy encoding for a round this site did not pay for")
            return
        assert paid.ddg is not None
        expected = DiscreteGaussianEncoding(
            bits=msg.encoding.bits, clip=paid.clip, cohort=paid.cohort, colluders=paid.colluders, noise=paid.ddg
        )
        if msg.encoding != expected:
            raise ProtocolError("the session's encoding does not add the noise this round's privacy event declares")
        if msg.params.threshold < expected.min_sum:
            raise ProtocolError(
                f"the session's threshold {msg.params.threshold} would let a sum of fewer than the {expected.min_sum} "
                "noisy updates the noise is calibrated for be unmasked"
            )

    def start(self, rnd: int, msg: m.SecAggStart) -> m.SecAggAdvert:
        if self._identity is None or COORDINATOR not in self._directory:
            raise ProtocolError("this site has no identity key or directory: it cannot join secure aggregation")
        sid = msg.params.session_id
        if sid in self.used:
            raise ProtocolError(f"session {sid[:12]} was already used: a session id is never reused")
        vector = self.__pending.pop((rnd, msg.phase), None)
        if vector is None:
            raise ProtocolError(f"nothing is pending for round {rnd} phase {msg.phase}: refusing to start a session")
        if vector.shape != (msg.params.length,):
            raise ProtocolError(f"the session expects {msg.params.length} values, this site has {vector.shape[0]}")
        self._check_noise(rnd, msg)
        n = len(msg.params.participants)
        if isinstance(msg.encoding, DiscreteGaussianEncoding):
            encoded = msg.encoding.encode(vector, n, self._rng(rnd, msg.phase), self._int_noise)
        else:
            encoded = msg.encoding.encode(vector, n, self._rng(rnd, msg.phase))
        client = SecAggClient(self.name, self._identity, msg.params, self._directory, self._directory[COORDINATOR])
        self.used.add(sid)
        self.__sessions[sid] = (client, encoded)
        return m.SecAggAdvert(advert=client.advertise_keys())

    def _session(self, session_id: str) -> tuple[SecAggClient, np.ndarray]:
        session = self.__sessions.get(session_id)
        if session is None:
            raise ProtocolError("no open secure-aggregation session with that id")
        return session

    def roster(self, rnd: int, msg: m.SecAggRoster) -> m.SecAggShares:
        client, _ = self._session(msg.session_id)
        return m.SecAggShares(bundle=client.share_keys(msg.roster))

    def deliver(self, rnd: int, msg: m.SecAggDeliver) -> m.SecAggMasked:
        client, encoded = self._session(msg.session_id)
        return m.SecAggMasked(masked=client.collect_masked(msg.delivery, encoded))

    def survivors(self, rnd: int, msg: m.SecAggSurvivors) -> m.SecAggAck:
        client, _ = self._session(msg.session_id)
        self._guard.check_survivors(len(msg.survivors.survivors))
        return m.SecAggAck(ack=client.consistency_check(msg.survivors))

    def unmask(self, rnd: int, msg: m.SecAggUnmask) -> m.SecAggReveal:
        client, _ = self._session(msg.session_id)
        del self.__sessions[msg.session_id]  # one unmask per session, then the secrets are gone
        return m.SecAggReveal(reply=client.unmask(msg.request))
