"""The messages of one SecAgg+ session, and the exact bytes every signature covers.

Every signed statement starts with a domain tag and the session id, so a
signature can never be replayed in another session or for another purpose.
"""

from __future__ import annotations

from functools import cached_property, lru_cache
from typing import Annotated, Literal

import numpy as np
from pydantic import Field, field_validator

from consortium.secagg.graph import complete_graph, random_regular_graph, ring_neighbours
from consortium.wire import B64, Frozen, Tensor

STAGES = ("advertise_keys", "share_keys", "collect_masked", "consistency_check", "unmask")
Stage = Literal["advertise_keys", "share_keys", "collect_masked", "consistency_check", "unmask"]

Name = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")]
SessionId = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]


class SessionParams(Frozen):
    """What every party of one session agrees on; each site re-derives its neighbours itself."""

    session_id: SessionId
    participants: tuple[Name, ...]
    graph: Literal["complete", "k-regular"]
    degree: int = Field(ge=1)
    threshold: int = Field(ge=1)
    bits: int = Field(ge=8, le=64)
    length: int = Field(ge=1, le=1 << 31)
    # A site counts its own signature of the survivor list toward the threshold of acknowledgements:
    # only where the plan's threshold stays secure with it (``GraphPlan.self_ack``).
    self_ack: bool = False

    @field_validator("participants")
    @classmethod
    def _sorted_unique(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if list(v) != sorted(set(v)) or len(v) < 2:
            raise ValueError("participants must be at least 2 distinct names in sorted order")
        return v

    def neighbours(self) -> dict[str, frozenset[str]]:
        """The neighbour graph, from public randomness bound to the session id."""
        if self.graph == "complete":
            return complete_graph(self.participants)
        return random_regular_graph(self.participants, self.degree, self._graph_rng())

    def neighbours_of(self, name: str) -> frozenset[str]:
        """One participant's neighbours in ``neighbours()``, without the others' (what a site checks: O(n), not
        O(n x degree))."""
        if self.graph == "complete":
            return frozenset(self.participants) - {name}
        return ring_neighbours(self.participants, self.degree, self._graph_rng(), name)

    def _graph_rng(self) -> np.random.Generator:
        return np.random.default_rng(int.from_bytes(bytes.fromhex(self.session_id)[:8], "big"))

    @cached_property
    def positions(self) -> dict[str, int]:
        """Each participant's Shamir evaluation point (its 1-based position), looked up once per session."""
        return {name: i + 1 for i, name in enumerate(self.participants)}

    def x_of(self, name: str) -> int:
        """A participant's Shamir evaluation point: its 1-based position (KeyError if it is none)."""
        return self.positions[name]


class KeyAdvert(Frozen):
    """A site's two X25519 public keys for this session, signed with its identity key."""

    site: Name
    c_pk: B64  # encrypts shares
    s_pk: B64  # agrees pairwise mask seeds
    signature: B64


class KeyRoster(Frozen):
    """The coordinator forwards each site its neighbours' adverts."""

    adverts: tuple[KeyAdvert, ...]


class ShareBundle(Frozen):
    """From a site: per neighbour, the ciphertext of its shares that only that neighbour can open.

    A map of names to bytes rather than an object per share: the coordinator routes n x degree of them
    per session (106,000 at 1,000 sites), and an object each held 2.4 times the memory."""

    shares: dict[Name, B64]  # recipient -> ciphertext


class ShareDelivery(Frozen):
    """To a site: the ciphertexts its neighbours addressed to it, by sender."""

    shares: dict[Name, B64]  # sender -> ciphertext


class SharePlaintext(Frozen):
    """Inside a share ciphertext: who shared what with whom."""

    sender: Name
    recipient: Name
    seed_share: B64
    key_share: B64

    def to_bytes(self) -> bytes:
        """What the ciphertext holds: each name after its length (one byte), then the two shares, each after
        its length: a fixed layout (a site seals k of these per session) rather than JSON."""
        parts = [self.sender.encode(), self.recipient.encode(), self.seed_share, self.key_share]
        return b"".join(bytes([len(part)]) + part for part in parts)

    @classmethod
    def from_bytes(cls, raw: bytes) -> SharePlaintext:
        """Parse ``to_bytes``; ``ValueError`` (a pydantic ``ValidationError`` among them) if it is not that layout."""
        parts, at = [], 0
        for _ in range(4):
            if at >= len(raw) or at + 1 + raw[at] > len(raw):
                raise ValueError("a share plaintext shorter than its lengths say")
            parts.append(raw[at + 1 : at + 1 + raw[at]])
            at += 1 + raw[at]
        if at != len(raw):
            raise ValueError("a share plaintext longer than its lengths say")
        sender, recipient, seed_share, key_share = parts
        return cls(sender=sender.decode("ascii"), recipient=recipient.decode("ascii"), seed_share=seed_share, key_share=key_share)


class MaskedInput(Frozen):
    vector: Tensor

    @field_validator("vector")
    @classmethod
    def _ring(cls, v: Tensor) -> Tensor:
        if v.dtype not in ("uint32", "uint64") or len(v.shape) != 1:
            raise ValueError("a masked input is a 1-D vector of ring words (uint32 or uint64)")
        return v


class SurvivorList(Frozen):
    """The sites whose masked input arrived, signed by the coordinator."""

    survivors: tuple[Name, ...]
    signature: B64


class ConsistencyAck(Frozen):
    """A site's confirmation of the survivor list it was shown.

    ``signature`` (Ed25519, identity key) is for the coordinator; ``tags``
    holds, per surviving neighbour, an HMAC of the list under the key this
    site shares with that neighbour alone (``ack_statement``), which is what
    the neighbour checks before unmasking.
    """

    signature: B64
    tags: dict[Name, B64]


class UnmaskRequest(Frozen):
    """To one site: the survivors, the dropped sites, and the acknowledgement tags its neighbours addressed to it."""

    survivors: tuple[Name, ...]
    dropped: tuple[Name, ...]
    acks: dict[Name, B64]


class UnmaskReply(Frozen):
    """Per neighbour, the share of its self-mask seed (alive) or of its mask key (dropped)."""

    seed_shares: dict[Name, B64]
    key_shares: dict[Name, B64]


@lru_cache(maxsize=256)
def _prefix(tag: bytes, session_id: str) -> bytes:
    return b"consortium/secagg/v1/" + tag + b"\x00" + bytes.fromhex(session_id)


def _statement(tag: bytes, session_id: str, *parts: bytes) -> bytes:
    """The domain tag, the session id, then each part prefixed by its length, joined by NUL bytes."""
    return b"\x00".join([_prefix(tag, session_id), *[len(p).to_bytes(4, "big") + p for p in parts]])


def advert_statement(session_id: str, site: str, c_pk: bytes, s_pk: bytes) -> bytes:
    return _statement(b"advert", session_id, site.encode(), c_pk, s_pk)


def survivors_statement(session_id: str, survivors: tuple[str, ...]) -> bytes:
    return _statement(b"survivors", session_id, *(s.encode() for s in sorted(survivors)))


def ack_statement(session_id: str, sender: str, recipient: str, listed_sha256: bytes) -> bytes:
    """What a site's acknowledgement tag for one neighbour covers: the direction and the survivor list.

    ``listed_sha256`` is the SHA-256 of ``survivors_statement`` of the list, hashed once and tagged for
    every neighbour: k short MACs, not k passes over a list of every survivor. Naming the direction
    matters because both ends hold the same key: a coordinator reflecting a site's own tag back at it
    must not pass for the neighbour's.
    """
    return _statement(b"ack-sha256", session_id, sender.encode(), recipient.encode(), listed_sha256)


def share_context(session_id: str, sender: str, recipient: str) -> bytes:
    """Associated data and key-derivation context of one share ciphertext."""
    return _statement(b"share", session_id, sender.encode(), recipient.encode())


def mask_context(session_id: str, a: str, b: str) -> bytes:
    lo, hi = sorted((a, b))
    return _statement(b"pairwise-mask", session_id, lo.encode(), hi.encode())


def share_key_context(session_id: str, a: str, b: str) -> bytes:
    """Key-derivation context of the AES-GCM key two sites share (the same from either side)."""
    lo, hi = sorted((a, b))
    return _statement(b"share-key", session_id, lo.encode(), hi.encode())


def ack_key_context(session_id: str, a: str, b: str) -> bytes:
    """Key-derivation context of the HMAC key two sites share for acknowledgements (the same from either side)."""
    lo, hi = sorted((a, b))
    return _statement(b"ack-key", session_id, lo.encode(), hi.encode())
