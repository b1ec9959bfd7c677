"""RFC 6962 / RFC 9162 Merkle trees: the reference hashes, and proofs that verify exactly when they should."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from consortium.errors import VerificationError
from consortium.transcript import merkle

# Certificate Transparency's reference data (RFC 6962 test vectors): eight leaves and the tree
# head of every prefix, the empty tree first.
LEAF_DATA = [bytes.fromhex(h) for h in (
    "", "00", "10", "2021", "3031", "40414243", "5051525354555657", "606162636465666768696a6b6c6d6e6f",
)]
ROOTS = [bytes.fromhex(h) for h in (
    "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
)]
H = {k: bytes.fromhex(v) for k, v in {
    "96a2": "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
    "5f08": "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
    "6b47": "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
    "bc1a": "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
    "ca85": "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
    "d37e": "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "0ebc": "0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
}.items()}
LEAVES = [merkle.leaf_hash(d) for d in LEAF_DATA]


def test_reference_tree_heads():
    assert merkle.root([]) == merkle.EMPTY_ROOT == ROOTS[0]
    for n in range(1, 9):
        assert merkle.root(LEAVES[:n]) == ROOTS[n], f"size {n}"
    assert merkle.leaf_hash(b"") == ROOTS[1]  # the empty leaf


@pytest.mark.parametrize("index,path", [(0, ["96a2", "5f08", "6b47"]), (5, ["bc1a", "ca85", "d37e"])])
def test_reference_inclusion_proofs(index, path):
    proof = merkle.inclusion_proof(LEAVES, index)
    assert proof == [H[p] for p in path]
    merkle.verify_inclusion(LEAVES[index], index, 8, proof, ROOTS[8])


@pytest.mark.parametrize("first,second,path", [(2, 8, ["5f08", "6b47"]), (6, 8, ["0ebc", "ca85", "d37e"]), (2, 5, ["5f08", "bc1a"])])
def test_reference_consistency_proofs(first, second, path):
    proof = merkle.consistency_proof(LEAVES[:second], first)
    assert proof == [H[p] for p in path]
    merkle.verify_consistency(first, second, ROOTS[first], ROOTS[second], proof)


def _flip(h: bytes, bit: int) -> bytes:
    return h[: bit // 8] + bytes([h[bit // 8] ^ (1 << bit % 8)]) + h[bit // 8 + 1 :]


def _tree(n: int) -> list[bytes]:
    return [merkle.leaf_hash(i.to_bytes(4, "big")) for i in range(n)]


@given(st.integers(1, 70), st.data())
def test_every_inclusion_proof_verifies_and_every_mutation_fails(n, data):
    leaves = _tree(n)
    head = merkle.root(leaves)
    i = data.draw(st.integers(0, n - 1))
    proof = merkle.inclusion_proof(leaves, i)
    merkle.verify_inclusion(leaves[i], i, n, proof, head)
    mutations = [
        (leaves[i], i + 1, n, proof, head),  # index off by one
        (leaves[i], i - 1, n, proof, head),
        # A wrong size, with that size's head (heads are signed as (size, root) pairs: a size alone
        # cannot change, and some sizes share a proof's shape, so the pair is what is mutated).
        (leaves[i], i, n + 1, proof, merkle.root(_tree(n + 1))),
        (leaves[i], i, n - 1, proof, merkle.root(leaves[:-1])) if i < n - 1 else (leaves[i], i, n, proof, ROOTS[3]),
        (leaves[(i + 1) % n], i, n, proof, head) if n > 1 else (merkle.leaf_hash(b"x"), i, n, proof, head),
        (leaves[i], i, n, proof, merkle.root(leaves[:-1]) if n > 1 else merkle.EMPTY_ROOT),  # another root
        (leaves[i], i, n, [*proof, head], head),  # one hash too many
    ]
    if proof:
        k = data.draw(st.integers(0, len(proof) - 1))
        bit = data.draw(st.integers(0, 255))
        mutations.append((leaves[i], i, n, [*proof[:k], _flip(proof[k], bit), *proof[k + 1 :]], head))
        mutations.append((leaves[i], i, n, proof[:-1], head))  # one too few
    for leaf, index, size, path, root in mutations:
        with pytest.raises(VerificationError):
            merkle.verify_inclusion(leaf, index, size, path, root)


@given(st.integers(2, 70), st.data())
def test_every_consistency_proof_verifies_and_every_mutation_fails(n, data):
    leaves = _tree(n)
    m = data.draw(st.integers(1, n - 1))
    old, new = merkle.root(leaves[:m]), merkle.root(leaves)
    proof = merkle.consistency_proof(leaves, m)
    merkle.verify_consistency(m, n, old, new, proof)
    k = data.draw(st.integers(0, len(proof) - 1))
    bit = data.draw(st.integers(0, 255))
    mutations = [
        (m, n, new, old, proof),  # swapped roots
        (m + 1, n, merkle.root(leaves[: m + 1]), new, proof),  # wrong sizes, with their heads
        (m, n + 1, old, merkle.root(_tree(n + 1)), proof),
        (m - 1, n, merkle.root(leaves[: m - 1]), new, proof) if m > 1 else (m, n, old, ROOTS[8], proof),
        (m, n, old, new, [*proof[:k], _flip(proof[k], bit), *proof[k + 1 :]]),  # flipped bit
        (m, n, old, new, proof[:-1]),  # truncated
        (m, n, old, new, [*proof, new]),  # extended
        (m, n, _flip(old, bit), new, proof),  # a forked history: another tree of size m
    ]
    for first, second, r1, r2, path in mutations:
        if (first, second, r1, r2, path) == (m, n, old, new, proof):
            continue
        with pytest.raises(VerificationError):
            merkle.verify_consistency(first, second, r1, r2, path)


def test_equal_sizes_need_equal_roots_and_an_empty_proof():
    merkle.verify_consistency(3, 3, ROOTS[3], ROOTS[3], [])
    with pytest.raises(VerificationError):
        merkle.verify_consistency(3, 3, ROOTS[3], ROOTS[4], [])
    with pytest.raises(VerificationError):
        merkle.verify_consistency(0, 3, ROOTS[0], ROOTS[3], [])
    with pytest.raises(VerificationError, match="32 bytes"):
        merkle.verify_inclusion(b"short", 0, 1, [], ROOTS[1])


def test_a_subtree_head_cannot_pose_as_the_whole_tree():
    # Leaf 0's path cut short ends at the head of the first four leaves: a real hash, of the wrong tree.
    proof = merkle.inclusion_proof(LEAVES, 0)
    merkle.verify_inclusion(LEAVES[0], 0, 4, proof[:2], ROOTS[4])
    with pytest.raises(VerificationError, match="shorter"):
        merkle.verify_inclusion(LEAVES[0], 0, 8, proof[:2], ROOTS[4])
