"""Merkle tree hashes and proofs exactly as RFC 6962 / RFC 9162 (section 2.1) specify.

Pure functions over the list of leaf hashes, so that anyone can recompute
what a log claims:

- ``leaf_hash(d) = SHA-256(0x00 || d)``, ``node_hash(l, r) = SHA-256(0x01 || l || r)``;
  the domain separation keeps a leaf from posing as an interior node;
- ``root`` is MTH: the empty tree hashes to SHA-256(""), a tree of n > 1
  leaves splits at k, the largest power of two below n;
- ``inclusion_proof`` / ``verify_inclusion``: that a leaf is entry i of the
  tree of a given size and root;
- ``consistency_proof`` / ``verify_consistency``: that the tree of size m is
  a prefix of the tree of size n, so nothing logged was rewritten.

The verifiers raise ``VerificationError`` on any mismatch; they return
nothing, so a failed check cannot be ignored by forgetting to test a bool.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from consortium.errors import VerificationError

HASH_SIZE = 32
EMPTY_ROOT = hashlib.sha256(b"").digest()


def leaf_hash(data: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def _split(n: int) -> int:
    """The largest power of two strictly below ``n`` (n >= 2)."""
    return 1 << ((n - 1).bit_length() - 1)


def root(leaves: Sequence[bytes]) -> bytes:
    """MTH(D[n]) of the leaf hashes ``leaves``."""
    n = len(leaves)
    if n == 0:
        return EMPTY_ROOT
    if n == 1:
        return leaves[0]
    k = _split(n)
    return node_hash(root(leaves[:k]), root(leaves[k:]))


def inclusion_proof(leaves: Sequence[bytes], index: int) -> list[bytes]:
    """PATH(index, D[n]): the audit path of leaf ``index`` in the tree of ``leaves``."""
    if not 0 <= index < len(leaves):
        raise ValueError(f"leaf {index} is not in a tree of {len(leaves)}")
    if len(leaves) == 1:
        return []
    k = _split(len(leaves))
    if index < k:
        return [*inclusion_proof(leaves[:k], index), root(leaves[k:])]
    return [*inclusion_proof(leaves[k:], index - k), root(leaves[:k])]


def consistency_proof(leaves: Sequence[bytes], first_size: int) -> list[bytes]:
    """PROOF(m, D[n]): that the tree of the first ``first_size`` leaves is a prefix of the tree of ``leaves``."""
    if not 0 < first_size <= len(leaves):
        raise ValueError(f"no consistency proof from size {first_size} to {len(leaves)}")
    return _subproof(leaves, first_size, True)


def _subproof(leaves: Sequence[bytes], m: int, complete: bool) -> list[bytes]:
    n = len(leaves)
    if m == n:
        return [] if complete else [root(leaves)]
    k = _split(n)
    if m <= k:
        return [*_subproof(leaves[:k], m, complete), root(leaves[k:])]
    return [*_subproof(leaves[k:], m - k, False), root(leaves[:k])]


def _check_hashes(*hashes: bytes) -> None:
    for h in hashes:
        if not isinstance(h, bytes) or len(h) != HASH_SIZE:
            raise VerificationError("a Merkle hash must be 32 bytes")


def verify_inclusion(leaf: bytes, index: int, size: int, proof: Sequence[bytes], expected_root: bytes) -> None:
    """Check that ``leaf`` (a leaf hash) is entry ``index`` of the tree of ``size`` with ``expected_root``.

    RFC 9162, section 2.1.3.2.
    """
    _check_hashes(leaf, expected_root, *proof)
    if not 0 <= index < size:
        raise VerificationError(f"inclusion proof: entry {index} cannot be in a tree of {size}")
    fn, sn, r = index, size - 1, leaf
    for p in proof:
        if sn == 0:
            raise VerificationError("inclusion proof: longer than the tree is deep")
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            if not fn & 1:
                while fn and not fn & 1:
                    fn, sn = fn >> 1, sn >> 1
        else:
            r = node_hash(r, p)
        fn, sn = fn >> 1, sn >> 1
    if sn != 0:
        raise VerificationError("inclusion proof: shorter than the tree is deep")
    if r != expected_root:
        raise VerificationError(f"inclusion proof: entry {index} does not lead to the tree head of size {size}")


def verify_consistency(
    first_size: int, second_size: int, first_root: bytes, second_root: bytes, proof: Sequence[bytes]
) -> None:
    """Check that the tree of ``first_size`` (``first_root``) is a prefix of the one of ``second_size``.

    RFC 9162, section 2.1.4.2; equal sizes need an empty proof and equal roots.
    """
    _check_hashes(first_root, second_root, *proof)
    if not 0 < first_size <= second_size:
        raise VerificationError(f"consistency proof: no proof goes from size {first_size} to {second_size}")
    if first_size == second_size:
        if proof or first_root != second_root:
            raise VerificationError(f"consistency proof: two different trees of size {first_size}")
        return
    if not proof:
        raise VerificationError("consistency proof: empty")
    path = list(proof)
    if first_size & (first_size - 1) == 0:  # an exact power of two: the old root is a node of the new tree
        path.insert(0, first_root)
    fn, sn = first_size - 1, second_size - 1
    while fn & 1:
        fn, sn = fn >> 1, sn >> 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            raise VerificationError("consistency proof: longer than the tree is deep")
        if fn & 1 or fn == sn:
            fr, sr = node_hash(c, fr), node_hash(c, sr)
            if not fn & 1:
                while fn and not fn & 1:
                    fn, sn = fn >> 1, sn >> 1
        else:
            sr = node_hash(sr, c)
        fn, sn = fn >> 1, sn >> 1
    if sn != 0:
        raise VerificationError("consistency proof: shorter than the tree is deep")
    if fr != first_root:
        raise VerificationError(f"consistency proof: does not reproduce the tree head of size {first_size}")
    if sr != second_root:
        raise VerificationError(f"consistency proof: does not reproduce the tree head of size {second_size}")
