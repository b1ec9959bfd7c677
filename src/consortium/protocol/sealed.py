"""Signed envelopes: every protocol message sealed by its sender's identity key.

A sealed message is ``b"CSS1" | u32 header length | header | signature (64) |
payload``. The header is canonical JSON (RFC 8785) naming the sender, the
recipient, the round, the message kind, the schema version, a fresh random
nonce, the time, and the SHA-256 of the payload's frame header (the
message's ordinary frame, whose header carries the SHA-256 of every tensor
and which the decoder checks byte for byte, so hashing the tensors a second
time would add nothing); the sender's Ed25519 key signs the header under a
domain tag. ``EnvelopeGuard.open`` checks all of it and raises
``MessageRejected`` on the first problem: it returns a parsed envelope or
nothing. A nonce seen before is a replay; a message stamped too far from
the receiver's clock is refused, which bounds how long nonces are kept; a
message for a round other than the one expected is refused.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydantic import Field, ValidationError

from consortium.crypto import keys
from consortium.errors import MessageRejected
from consortium.protocol import messages as m
from consortium.transcript.log import canonical
from consortium.wire import Frozen

MAGIC = b"CSS1"
DOMAIN = b"consortium/envelope/v1\x00"
MAX_SKEW_MS = 10 * 60 * 1000
MAX_HEADER = 4096


class SealHeader(Frozen):
    sender: m.Name
    recipient: m.Name
    round: int = Field(ge=0)
    kind: str = Field(min_length=1, max_length=64)
    schema_version: int
    nonce: str = Field(pattern=r"^[0-9a-f]{32}$")
    timestamp_ms: int = Field(ge=0)
    payload_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _frame_digest(payload: bytes) -> str:
    """SHA-256 of a frame up to the end of its JSON header: the header commits to every tensor's hash."""
    if len(payload) < 8:
        raise MessageRejected("a sealed message without a payload frame")
    end = 8 + int.from_bytes(payload[4:8], "big")
    if end > len(payload):
        raise MessageRejected("a payload frame shorter than its header length")
    return hashlib.sha256(payload[:end]).hexdigest()


def seal(envelope: m.Envelope, key: Ed25519PrivateKey, *, now_ms: int | None = None) -> bytes:
    payload = m.encode(envelope)
    header = canonical(SealHeader(
        sender=envelope.sender, recipient=envelope.recipient, round=envelope.round, kind=envelope.message.kind,
        schema_version=envelope.schema_version, nonce=os.urandom(16).hex(),
        timestamp_ms=_now_ms() if now_ms is None else now_ms, payload_sha256=_frame_digest(payload),
    ).model_dump())
    return MAGIC + len(header).to_bytes(4, "big") + header + keys.sign(key, DOMAIN + header) + payload


def is_sealed(raw: bytes) -> bool:
    return raw[:4] == MAGIC


class EnvelopeGuard:
    """What one member accepts: sealed by a known member, addressed to it, fresh, never seen, for the right round."""

    def __init__(self, me: str, directory: Mapping[str, bytes], *, clock: Callable[[], int] = _now_ms) -> None:
        self.me = me
        self._directory = dict(directory)
        self._clock = clock
        self._seen: dict[tuple[str, str], int] = {}  # (sender, nonce) -> timestamp, kept while it could be fresh
        # The same keys in the order they arrived, to forget the expired ones from the front: each nonce is
        # added and dropped once, so opening N messages costs O(N), not O(N^2) as rebuilding the dict did.
        # One stamped earlier than those before it waits behind them: kept longer, never forgotten too soon.
        self._arrivals: deque[tuple[int, tuple[str, str]]] = deque()
        self._lock = threading.Lock()  # replies are opened as they arrive, on the service's threads

    def open(self, raw: bytes, *, sender: str | None = None, rnd: int | None = None) -> m.Envelope:
        """The envelope inside ``raw``, every check passed; ``sender``/``rnd``: what this reply must come from / be for."""
        if not is_sealed(raw) or len(raw) < 8:
            raise MessageRejected("an unsealed message: every message must be signed by its sender")
        size = int.from_bytes(raw[4:8], "big")
        if size > MAX_HEADER or len(raw) < 8 + size + keys.SIGNATURE_BYTES:
            raise MessageRejected("a sealed message with a malformed header length")
        header_bytes = raw[8 : 8 + size]
        signature = raw[8 + size : 8 + size + keys.SIGNATURE_BYTES]
        payload = raw[8 + size + keys.SIGNATURE_BYTES :]
        try:
            header = SealHeader.model_validate_json(header_bytes)
        except ValidationError as exc:
            raise MessageRejected(f"a sealed message's header does not parse ({exc.errors()[0]['msg']})") from None
        if canonical(header.model_dump()) != header_bytes:
            raise MessageRejected("a sealed message's header is not in canonical form")
        public = self._directory.get(header.sender)
        if public is None:
            raise MessageRejected(f"a message from '{header.sender}', who is not a member")
        keys.verify(public, signature, DOMAIN + header_bytes)  # raises InvalidSignatureError (a ProtocolError)
        if header.recipient != self.me:
            raise MessageRejected(f"a message for '{header.recipient}' reached '{self.me}'")
        if sender is not None and header.sender != sender:
            raise MessageRejected(f"a reply from '{header.sender}' where '{sender}' was asked")
        if _frame_digest(payload) != header.payload_sha256:
            raise MessageRejected("the payload does not match the hash its sender signed")
        now = self._clock()
        if abs(now - header.timestamp_ms) > MAX_SKEW_MS:
            raise MessageRejected(f"a message stamped {(now - header.timestamp_ms) / 1000:.0f} s from now: stale or replayed")
        if rnd is not None and header.round != rnd:
            raise MessageRejected(f"a message for round {header.round} where round {rnd} was expected")
        key = (header.sender, header.nonce)
        with self._lock:
            if key in self._seen:
                raise MessageRejected(f"a replayed message from '{header.sender}' (nonce seen before)")
            self._seen[key] = header.timestamp_ms  # taken now: a copy racing this one is a replay
            self._arrivals.append((header.timestamp_ms, key))
        try:
            envelope = m.decode(payload)
            stated = (envelope.sender, envelope.recipient, envelope.round, envelope.message.kind, envelope.schema_version)
            if stated != (header.sender, header.recipient, header.round, header.kind, header.schema_version):
                raise MessageRejected("the envelope inside does not match its signed header")
        except BaseException:
            with self._lock:  # not a message after all: its nonce was never used
                self._seen.pop(key, None)
            raise
        with self._lock:  # a nonce stamped more than twice the skew ago can no longer pass the freshness check
            while self._arrivals and now - self._arrivals[0][0] > 2 * MAX_SKEW_MS:
                stamped, old = self._arrivals.popleft()
                if self._seen.get(old) == stamped:
                    del self._seen[old]
        return envelope

