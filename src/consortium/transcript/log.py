"""The transcript: signed entries, appended to a file, as the leaves of an RFC 9162 Merkle tree.

``transcript.jsonl`` holds one entry per line: its index, kind, round,
author, body and the author's Ed25519 signature over the canonical JSON
(RFC 8785) of its kind, round, author and body (a site signs its decision
before it knows where it will land). The leaf of entry i is the canonical
JSON of the whole entry, index and signature included, so changing,
dropping or moving any entry changes every later tree head.

``heads.jsonl`` holds the signed tree heads: the coordinator signs (size,
root, time) and each site co-signs a head only after checking, with a
consistency proof, that it extends the last head that site signed (so two
sites cannot be shown two histories, and no history can be rewritten,
without the signatures proving it).

Appends are one ``write`` of a complete line on a file opened for
appending, then ``fsync``: a crash leaves at worst a partial last line,
which the next writer cuts off, so the last complete entry is intact.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np
import rfc8785
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydantic import Field, ValidationError

from consortium.crypto import keys
from consortium.errors import VerificationError
from consortium.transcript import merkle
from consortium.wire import B64, Frozen

TRANSCRIPT_FILE = "transcript.jsonl"
HEADS_FILE = "heads.jsonl"
ENTRY_DOMAIN = "consortium/transcript-entry/v1"
HEAD_DOMAIN = "consortium/tree-head/v1"

Kind = Literal[
    "manifest", "round_plan", "site_decision", "masked_inputs", "aggregate", "evaluation", "final_model", "halt", "resume",
    # the model lifecycle (consortium.lifecycle): a version registered, its state changed, its canary or stage
    # evaluated, a site running it (or refusing to), a site's drift report and its end
    "model_version", "model_state", "model_evaluation", "deployment", "drift_incident", "drift_resolved",
]


def canonical(obj: Any) -> bytes:
    """RFC 8785 canonical JSON: one byte string per value, whoever serialises it.

    A value of strings, integers within +-2^53, booleans, nulls, lists, and objects with ASCII keys (every seal
    header, most transcript bodies) is written by the standard library's C encoder with sorted keys and no
    spaces, which for exactly these values writes RFC 8785's bytes (same escapes, and ASCII keys sort alike
    by code point and by UTF-16 unit); anything else (a float, a wider integer, a non-ASCII key, a lone
    surrogate) goes through ``rfc8785`` itself. ``tests/test_transcript.py`` holds the two equal.
    """
    if _plain(obj):
        try:
            return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate: rfc8785 says what to do with it
            pass
    return rfc8785.dumps(obj)


def _plain(obj: Any) -> bool:
    """Whether ``obj`` holds only what ``json.dumps`` writes exactly as RFC 8785 does (see ``canonical``)."""
    stack = [obj]
    while stack:
        value = stack.pop()
        kind = type(value)
        if kind is str or kind is bool or value is None:
            continue
        if kind is int:
            if -_SAFE_INTEGER <= value <= _SAFE_INTEGER:
                continue
            return False
        if kind is list:
            stack.extend(value)
        elif kind is dict:
            if not all(type(key) is str and key.isascii() for key in value):
                return False
            stack.extend(value.values())
        else:
            return False
    return True


_SAFE_INTEGER = 2**53 - 1  # I-JSON's exact integers (RFC 7493); rfc8785 refuses wider ones


MANIFEST_DOMAIN = "consortium/manifest/v1"


def manifest_bytes(body: dict[str, Any]) -> bytes:
    """What every member endorses: the manifest without the endorsements themselves."""
    return canonical({"domain": MANIFEST_DOMAIN, **{k: v for k, v in body.items() if k != "endorsements"}})


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def vector_sha256(vector: np.ndarray) -> str:
    """The hash a model (or a sum) is known by: SHA-256 of its float32 little-endian bytes."""
    return sha256_hex(np.ascontiguousarray(vector, dtype="<f4").tobytes())


class Entry(Frozen):
    index: int = Field(ge=0)
    kind: Kind
    round: int = Field(ge=0)
    author: str
    body: dict[str, Any]
    signature: B64

    def signed_bytes(self) -> bytes:
        return signed_entry_bytes(self.kind, self.round, self.author, self.body)

    def leaf(self) -> bytes:
        return merkle.leaf_hash(canonical(self.model_dump(mode="json")))


def signed_entry_bytes(kind: str, rnd: int, author: str, body: Mapping[str, Any]) -> bytes:
    return canonical({"domain": ENTRY_DOMAIN, "kind": kind, "round": rnd, "author": author, "body": body})


class TreeHead(Frozen):
    """A signed statement of the transcript's size and Merkle root.

    ``seq`` numbers the heads of a run from 0, under the signature: a heads
    file with a head deleted from the middle, or all but the last deleted,
    no longer counts 0, 1, 2, ... and ``verify`` says so.
    """

    seq: int = Field(ge=0)
    size: int = Field(ge=0)
    root: str = Field(pattern=r"^[0-9a-f]{64}$")
    timestamp_ms: int = Field(ge=0)
    signer: str
    signature: B64
    cosignatures: dict[str, B64] = {}

    def signed_bytes(self) -> bytes:
        return head_bytes(self.size, self.root, self.timestamp_ms, self.seq)

    def bare(self) -> TreeHead:
        """This head without the co-signatures: what a site compares with the head it co-signed itself.
        A proof sent to every site carries it bare; with all N co-signatures each request would grow with N."""
        return self.model_copy(update={"cosignatures": {}}) if self.cosignatures else self


def head_bytes(size: int, root: str, timestamp_ms: int, seq: int) -> bytes:
    """What the coordinator signs and the sites co-sign: the head's number in the run, size, root and time."""
    return canonical({"domain": HEAD_DOMAIN, "seq": seq, "size": size, "root": root, "timestamp_ms": timestamp_ms})


def _append_line(path: Path, line: bytes, expected_size: int | None = None) -> int:
    """Append one line; with ``expected_size``, only if the file still has that size (under a lock), so two
    writers that opened the same transcript cannot interleave. Returns the new size."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        size = os.fstat(fd).st_size
        if expected_size is not None and size != expected_size:
            raise VerificationError(
                f"{path.name} changed since it was opened here (another writer appended to it): "
                "open the run again, one writer at a time"
            )
        os.write(fd, line)
        os.fsync(fd)
        return size + len(line)
    finally:
        os.close(fd)


def _complete_lines(path: Path, *, repair: bool) -> list[bytes]:
    """The file's complete lines; a partial last line (a crash mid-append) is cut off when ``repair``."""
    if not path.exists():
        return []
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data) and repair:
        with open(path, "r+b") as f:
            f.truncate(end)
            f.flush()
            os.fsync(f.fileno())
    return [line for line in data[:end].split(b"\n") if line]


def parse_entry(line: bytes, number: int) -> Entry:
    try:
        return Entry.model_validate_json(line)
    except ValidationError as exc:
        raise VerificationError(f"transcript entry {number} does not parse ({exc.errors()[0]['msg']})") from None


def parse_head(line: bytes, number: int) -> TreeHead:
    try:
        return TreeHead.model_validate_json(line)
    except ValidationError as exc:
        raise VerificationError(f"tree head {number} does not parse ({exc.errors()[0]['msg']})") from None


class TranscriptWriter:
    """Appends signed entries and signed heads to a run's transcript; reopening continues it."""

    def __init__(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / TRANSCRIPT_FILE
        self.heads_path = folder / HEADS_FILE
        self.entries = [parse_entry(line, i) for i, line in enumerate(_complete_lines(self.path, repair=True))]
        self._size = self.path.stat().st_size if self.path.exists() else 0
        self.leaves = [e.leaf() for e in self.entries]
        # Proofs between two sizes never change in an append-only log: every site that co-signed the same
        # head is sent the same proof, computed once (O(n) each, so not once per site).
        self._proofs: dict[tuple[int, int], list[bytes]] = {}
        self.heads = [parse_head(line, i) for i, line in enumerate(_complete_lines(self.heads_path, repair=True))]

    @property
    def size(self) -> int:
        return len(self.entries)

    def append(
        self, kind: Kind, rnd: int, author: str, body: Mapping[str, Any], *, key: Ed25519PrivateKey | None = None,
        signature: bytes | None = None,
    ) -> Entry:
        """Append one entry, signed here with ``key`` or carrying the author's own ``signature``."""
        return self.append_entry(self.make_entry(kind, rnd, author, body, index=self.size, key=key, signature=signature))

    @staticmethod
    def make_entry(
        kind: Kind, rnd: int, author: str, body: Mapping[str, Any], *, index: int, key: Ed25519PrivateKey | None = None,
        signature: bytes | None = None,
    ) -> Entry:
        """Entry ``index``, signed, not yet written (a driver's write-ahead record holds it first)."""
        body = json.loads(canonical(body))  # JSON values only, as they will be read back
        message = signed_entry_bytes(kind, rnd, author, body)
        if signature is None:
            if key is None:
                raise ValueError("an entry needs its author's key or signature")
            signature = keys.sign(key, message)
        return Entry(index=index, kind=kind, round=rnd, author=author, body=body, signature=signature)

    def append_entry(self, entry: Entry) -> Entry:
        """Append an entry made by ``make_entry``; it must be the next one."""
        if entry.index != self.size:
            raise VerificationError(f"entry {entry.index} cannot be appended as entry {self.size} of {self.path.name}")
        self._size = _append_line(self.path, canonical(entry.model_dump(mode="json")) + b"\n", self._size)
        self.entries.append(entry)
        self.leaves.append(entry.leaf())
        return entry

    def root(self, size: int | None = None) -> bytes:
        return merkle.root(self.leaves[: self.size if size is None else size])

    def sign_head(self, signer: str, key: Ed25519PrivateKey, timestamp_ms: int) -> TreeHead:
        """A head over everything appended so far, signed by ``signer`` (not yet written: co-signatures first)."""
        root, seq = self.root().hex(), len(self.heads)
        return TreeHead(
            seq=seq, size=self.size, root=root, timestamp_ms=timestamp_ms, signer=signer,
            signature=keys.sign(key, head_bytes(self.size, root, timestamp_ms, seq)),
        )

    def inclusion(self, index: int, size: int) -> list[bytes]:
        return merkle.inclusion_proof(self.leaves[:size], index)

    def consistency(self, first_size: int, second_size: int) -> list[bytes]:
        if not 0 < first_size < second_size:
            return []
        if (first_size, second_size) not in self._proofs:
            self._proofs[first_size, second_size] = merkle.consistency_proof(self.leaves[:second_size], first_size)
        return list(self._proofs[first_size, second_size])

    def publish_head(self, head: TreeHead) -> None:
        _append_line(self.heads_path, canonical(head.model_dump(mode="json")) + b"\n")
        self.heads.append(head)


def cosign_quorum(min_sites: int, n_sites: int) -> int:
    """How many sites must co-sign every head of a run: its minimum cohort (all sites, if fewer)."""
    return max(1, min(min_sites, n_sites))


def last_cosigned(heads: list[TreeHead], member: str) -> TreeHead | None:
    """The latest of ``heads`` that ``member`` co-signed (a site that was away misses some)."""
    return next((h for h in reversed(heads) if member in h.cosignatures), None)


class HeadWitness:
    """A member's memory of the last head it signed; it co-signs only heads that extend it."""

    def __init__(self, name: str, key: Ed25519PrivateKey, signer_public_key: bytes) -> None:
        self.name = name
        self._key = key
        self._signer = signer_public_key
        self.last: TreeHead | None = None

    def resume_from(self, head: TreeHead) -> None:
        """After a restart: remember ``head`` as the last one signed, once this member's own co-signature is on it."""
        keys.verify(self._signer, head.signature, head.signed_bytes())
        own = head.cosignatures.get(self.name)
        if own is None:
            raise VerificationError(f"'{self.name}' did not co-sign tree head {head.size}: it cannot resume from it")
        keys.verify(keys.ed25519_public_bytes(self._key.public_key()), own, head.signed_bytes())
        self.last = head.bare()

    def remember(self, head: TreeHead) -> None:
        """After a restart: ``head`` is the last one this member co-signed, as it noted down at the time."""
        keys.verify(self._signer, head.signature, head.signed_bytes())
        self.last = head.bare()

    def cosign(self, head: TreeHead, proof: list[bytes]) -> bytes:
        """Check the coordinator's signature and the consistency proof from the last head signed; sign."""
        keys.verify(self._signer, head.signature, head.signed_bytes())
        if self.last is not None and self.last.size > 0:
            if head.size < self.last.size:
                raise VerificationError(f"a tree head of size {head.size} after one of {self.last.size}: history shrank")
            old, new = bytes.fromhex(self.last.root), bytes.fromhex(head.root)
            merkle.verify_consistency(self.last.size, head.size, old, new, proof)
        signature = keys.sign(self._key, head.signed_bytes())
        self.last = head
        return signature
