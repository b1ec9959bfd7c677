"""Tests of consortium.crypto: known answers from the RFCs and NIST, independent oracles, and every failure path."""

import hashlib
import hmac
import math
import os
import random
import stat

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from hypothesis import given, settings
from hypothesis import strategies as st

from consortium.crypto import (
    CryptoError,
    DecryptionError,
    InvalidSignatureError,
    ShamirError,
    aead,
    keys,
    prg,
    shamir,
)
from consortium.crypto.keyfile import load_identity_key, save_identity_key
from consortium.errors import ConfigError, ConsortiumError, ProtocolError

H = bytes.fromhex


def _deterministic_bytes(seed: int):
    """A reproducible stand-in for os.urandom, for known-answer tests only."""
    gen = random.Random(seed)
    return lambda n: gen.randbytes(n)


def _hkdf_sha256_stdlib(ikm: bytes, info: bytes, length: int = 32) -> bytes:
    """RFC 5869 with no salt (HashLen zero bytes), written with the stdlib only: an independent oracle."""
    prk = hmac.new(bytes(32), ikm, hashlib.sha256).digest()
    okm, block, counter = b"", b"", 1
    while len(okm) < length:
        block = hmac.new(prk, block + info + bytes([counter]), hashlib.sha256).digest()
        okm += block
        counter += 1
    return okm[:length]


# --- errors -----------------------------------------------------------------


def test_error_classes_sit_under_protocol_error():
    for cls in (CryptoError, DecryptionError, InvalidSignatureError, ShamirError):
        assert issubclass(cls, ProtocolError) and issubclass(cls, ConsortiumError)
    assert issubclass(DecryptionError, CryptoError) and issubclass(ShamirError, CryptoError)


# --- keys: X25519 -----------------------------------------------------------

# RFC 7748, Sec. 6.1
ALICE_PRIVATE = H("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
ALICE_PUBLIC = H("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a")
BOB_PRIVATE = H("5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb")
BOB_PUBLIC = H("de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f")
SHARED = H("4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742")


def test_x25519_rfc7748_known_answer():
    alice = keys.load_x25519_private(ALICE_PRIVATE)
    bob = keys.load_x25519_private(BOB_PRIVATE)
    assert keys.x25519_public_bytes(alice.public_key()) == ALICE_PUBLIC
    assert keys.x25519_public_bytes(bob.public_key()) == BOB_PUBLIC
    assert keys.exchange(alice, BOB_PUBLIC) == SHARED
    assert keys.exchange(bob, ALICE_PUBLIC) == SHARED


def test_x25519_round_trips_through_raw_bytes():
    private, public = keys.generate_x25519()
    raw_public = keys.x25519_public_bytes(public)
    raw_private = keys.x25519_private_bytes(private)
    assert len(raw_public) == 32 and len(raw_private) == 32
    assert keys.x25519_public_bytes(keys.load_x25519_public(raw_public)) == raw_public
    restored = keys.load_x25519_private(raw_private)
    assert keys.x25519_public_bytes(restored.public_key()) == raw_public
    other, other_public = keys.generate_x25519()
    peer = keys.x25519_public_bytes(other_public)
    assert keys.exchange(restored, peer) == keys.exchange(other, raw_public)


@pytest.mark.parametrize("bad", [b"", bytes(31), bytes(33), "0" * 32, None])
def test_x25519_bad_lengths_raise(bad):
    with pytest.raises(CryptoError, match="32"):
        keys.load_x25519_public(bad)
    with pytest.raises(CryptoError, match="32"):
        keys.load_x25519_private(bad)


def test_low_order_peer_key_is_refused():
    private, _ = keys.generate_x25519()
    with pytest.raises(CryptoError, match="low-order"):
        keys.exchange(private, bytes(32))


# --- keys: Ed25519 ----------------------------------------------------------

# RFC 8032, Sec. 7.1, TEST 1 (empty message)
ED_SECRET = H("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")
ED_PUBLIC = H("d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a")
ED_SIGNATURE = H(
    "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065"
    "224901555fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b"
)


def test_ed25519_rfc8032_known_answer():
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    private = Ed25519PrivateKey.from_private_bytes(ED_SECRET)
    assert keys.ed25519_public_bytes(private.public_key()) == ED_PUBLIC
    assert keys.sign(private, b"") == ED_SIGNATURE
    assert keys.verify(ED_PUBLIC, ED_SIGNATURE, b"") is None
    with pytest.raises(InvalidSignatureError):
        keys.verify(ED_PUBLIC, ED_SIGNATURE, b"\x00")


def test_sign_and_verify():
    private, public = keys.generate_ed25519()
    raw = keys.ed25519_public_bytes(public)
    signature = keys.sign(private, b"round 3 plan")
    assert len(signature) == 64
    assert keys.verify(raw, signature, b"round 3 plan") is None


def test_signature_over_other_data_raises():
    private, public = keys.generate_ed25519()
    signature = keys.sign(private, b"accept round 3")
    with pytest.raises(InvalidSignatureError, match="does not verify"):
        keys.verify(keys.ed25519_public_bytes(public), signature, b"accept round 4")


def test_signature_by_another_key_raises():
    private, _ = keys.generate_ed25519()
    _, other_public = keys.generate_ed25519()
    signature = keys.sign(private, b"data")
    with pytest.raises(InvalidSignatureError):
        keys.verify(keys.ed25519_public_bytes(other_public), signature, b"data")


def test_tampered_or_malformed_signature_raises():
    private, public = keys.generate_ed25519()
    raw = keys.ed25519_public_bytes(public)
    signature = bytearray(keys.sign(private, b"data"))
    signature[10] ^= 1
    with pytest.raises(InvalidSignatureError):
        keys.verify(raw, bytes(signature), b"data")
    for bad in (b"", bytes(63), bytes(65)):
        with pytest.raises(InvalidSignatureError, match="64"):
            keys.verify(raw, bad, b"data")


def test_malformed_ed25519_public_key_raises():
    private, _ = keys.generate_ed25519()
    with pytest.raises(CryptoError, match="32"):
        keys.verify(bytes(31), keys.sign(private, b"x"), b"x")


# --- AEAD -------------------------------------------------------------------

INFO = b"consortium/secagg/share-key/v1|round=3|alice|bob"
AD = b"from=alice|to=bob|round=3"


def _pair_key() -> bytes:
    alice, alice_public = keys.generate_x25519()
    bob, bob_public = keys.generate_x25519()
    k_ab = aead.derive_key(alice, keys.x25519_public_bytes(bob_public), info=INFO)
    k_ba = aead.derive_key(bob, keys.x25519_public_bytes(alice_public), info=INFO)
    assert k_ab == k_ba and len(k_ab) == 32
    return k_ab


def test_derive_key_is_hkdf_sha256_over_x25519():
    alice = keys.load_x25519_private(ALICE_PRIVATE)
    assert aead.derive_key(alice, BOB_PUBLIC, info=INFO) == _hkdf_sha256_stdlib(SHARED, INFO)


def test_derive_key_binds_context():
    alice = keys.load_x25519_private(ALICE_PRIVATE)
    assert aead.derive_key(alice, BOB_PUBLIC, info=INFO) != aead.derive_key(alice, BOB_PUBLIC, info=INFO + b"x")
    with pytest.raises(CryptoError, match="info"):
        aead.derive_key(alice, BOB_PUBLIC, info=b"")


def test_derive_keys_gives_one_independent_key_per_context_from_one_agreement():
    alice = keys.load_x25519_private(ALICE_PRIVATE)
    share, ack = aead.derive_keys(alice, BOB_PUBLIC, infos=(INFO, INFO + b"|ack"))
    assert share == _hkdf_sha256_stdlib(SHARED, INFO) and ack == _hkdf_sha256_stdlib(SHARED, INFO + b"|ack")
    with pytest.raises(CryptoError, match="distinct"):
        aead.derive_keys(alice, BOB_PUBLIC, infos=(INFO, INFO))


def test_mac_is_hmac_sha256_and_check_mac_refuses_any_change():
    import hashlib
    import hmac as std_hmac

    key, other = _pair_key(), _pair_key()
    statement = b"consortium/secagg/v1/ack|s1|s0|s0,s1,s2"
    tag = aead.mac(key, statement)
    assert tag == std_hmac.new(key, statement, hashlib.sha256).digest()  # an independent implementation agrees
    aead.check_mac(key, tag, statement)
    flipped = bytes([tag[0] ^ 1]) + tag[1:]
    for bad_key, bad_tag, bad_statement in ((key, flipped, statement), (key, tag, statement + b"x"), (other, tag, statement)):
        with pytest.raises(aead.MacError):
            aead.check_mac(bad_key, bad_tag, bad_statement)
    with pytest.raises(aead.MacError):
        aead.check_mac(key, tag[:16], statement)  # a truncated tag is not a shorter valid one
    with pytest.raises(CryptoError, match="32 bytes"):
        aead.mac(b"short", statement)


def test_seal_open_round_trip():
    key = _pair_key()
    plaintext = os.urandom(2 * 48 + 7)
    sealed = aead.seal(key, plaintext, associated_data=AD)
    assert len(sealed) == 12 + len(plaintext) + 16
    assert aead.open_(key, sealed, associated_data=AD) == plaintext
    assert aead.seal(key, plaintext, associated_data=AD) != sealed  # fresh nonce every time
    assert aead.open_(key, aead.seal(key, b"", associated_data=b""), associated_data=b"") == b""


def test_sealed_format_is_nonce_then_aes_gcm():
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    key = _pair_key()
    sealed = aead.seal(key, b"share bytes", associated_data=AD)
    assert AESGCM(key).decrypt(sealed[:12], sealed[12:], AD) == b"share bytes"


@pytest.mark.parametrize("where", ["nonce", "ciphertext", "tag"])
def test_flipped_bit_raises(where):
    key = _pair_key()
    plaintext = b"a Shamir share of the self-mask seed, 48 bytes..."
    sealed = bytearray(aead.seal(key, plaintext, associated_data=AD))
    index = {"nonce": 3, "ciphertext": 12 + 5, "tag": len(sealed) - 2}[where]
    sealed[index] ^= 0x01
    with pytest.raises(DecryptionError, match="tampered with or sent to the wrong recipient"):
        aead.open_(key, bytes(sealed), associated_data=AD)


def test_wrong_associated_data_or_key_raises():
    key = _pair_key()
    sealed = aead.seal(key, os.urandom(48), associated_data=AD)
    with pytest.raises(DecryptionError):
        aead.open_(key, sealed, associated_data=b"from=alice|to=carol|round=3")
    with pytest.raises(DecryptionError):
        aead.open_(_pair_key(), sealed, associated_data=AD)


@pytest.mark.parametrize("length", [0, 1, 12, 27])
def test_too_short_input_raises(length):
    key = _pair_key()
    with pytest.raises(DecryptionError, match="failed authentication"):
        aead.open_(key, bytes(length), associated_data=AD)


def test_truncated_ciphertext_raises():
    key = _pair_key()
    sealed = aead.seal(key, os.urandom(48), associated_data=AD)
    for cut in (sealed[:-1], sealed[:-16], sealed[1:]):
        with pytest.raises(DecryptionError):
            aead.open_(key, cut, associated_data=AD)


def test_bad_key_length_raises():
    with pytest.raises(CryptoError, match="32 bytes"):
        aead.seal(bytes(16), b"x", associated_data=b"")


# --- PRG --------------------------------------------------------------------

# NIST SP 800-38A, F.5.5 CTR-AES256.Encrypt
SP800_KEY = H("603deb1015ca71be2b73aef0857d77811f352c073b6108d72d9810a30914dff4")
SP800_COUNTER = H("f0f1f2f3f4f5f6f7f8f9fafbfcfdfeff")
SP800_PLAIN = H(
    "6bc1bee22e409f96e93d7e117393172aae2d8a571e03ac9c9eb76fac45af8e51"
    "30c81c46a35ce411e5fbc1191a0a52eff69f2445df4f9b17ad2b417be66c3710"
)
SP800_CIPHER = H(
    "601ec313775789a5b7a7f504bbf3d228f443e3ca4d62b59aca84e990cacaf5c5"
    "2b0930daa23de94ce87017ba2d84988ddfc9c58db67aada613c2dd08457941a6"
)
SEED = bytes(range(32))


def test_keystream_matches_sp800_38a():
    stream = prg._aes_ctr_keystream(SP800_KEY, len(SP800_PLAIN), counter_block=SP800_COUNTER).tobytes()
    assert bytes(a ^ b for a, b in zip(SP800_PLAIN, stream)) == SP800_CIPHER


def test_expand_mask_matches_aes_ecb_of_counters():
    """Independent path: block i of the stream is AES_seed(i as a 128-bit big-endian counter)."""
    ecb = Cipher(algorithms.AES(SEED), modes.ECB()).encryptor()
    blocks = b"".join(ecb.update(i.to_bytes(16, "big")) for i in range(4))
    words64 = [int.from_bytes(blocks[j : j + 8], "little") for j in range(0, 64, 8)]
    words32 = [int.from_bytes(blocks[j : j + 4], "little") for j in range(0, 64, 4)]
    assert prg.expand_mask(SEED, 8, bits=64).tolist() == words64
    assert prg.expand_mask(SEED, 16, bits=32).tolist() == words32
    assert prg.expand_mask(SEED, 8, bits=40).tolist() == [w % 2**40 for w in words64]
    assert prg.expand_mask(SEED, 16, bits=12).tolist() == [w % 2**12 for w in words32]


def test_expand_mask_pinned_outputs():
    """Pinned once from this implementation: any change to the stream breaks interoperability between sites."""
    assert prg.expand_mask(SEED, 3, bits=64).tolist() == [15032814528976949490, 9256919087594533801, 16546147286388202992]
    assert prg.expand_mask(SEED, 4, bits=32).tolist() == [3053490418, 3500099882, 1788539817, 2155294429]
    assert prg.expand_mask(SEED, 4, bits=20).tolist() == [37106, 1001770, 717737, 470749]


def test_expand_mask_is_deterministic_and_seed_dependent():
    a = prg.expand_mask(SEED, 1000, bits=32)
    assert np.array_equal(a, prg.expand_mask(SEED, 1000, bits=32))
    assert np.array_equal(prg.expand_mask(SEED, 300_000, bits=32)[:1000], a)  # a prefix, across chunk boundaries
    other = prg.expand_mask(bytes(31) + b"\x01", 1000, bits=32)
    assert np.mean(a == other) < 0.01


@pytest.mark.parametrize("bits", [1, 7, 8, 16, 31, 32, 33, 40, 62, 63, 64])
def test_expand_mask_range_and_dtype(bits):
    mask = prg.expand_mask(os.urandom(32), 10_000, bits=bits)
    assert mask.dtype == np.uint64 and mask.shape == (10_000,) and mask.flags.writeable
    assert int(mask.max()) < 2**bits
    assert int(mask.max()) >= (2**bits - 1) * 0.99  # the top of the range is reached, nothing is truncated


def test_expand_mask_empty():
    assert prg.expand_mask(SEED, 0, bits=32).shape == (0,)


@pytest.mark.parametrize("bits", [8, 33, 64])
def test_expand_mask_is_roughly_uniform(bits):
    """Chi-square on the top 8 bits of 256k values: df = 255, sd = sqrt(510) ~ 22.6."""
    mask = prg.expand_mask(H("aa" * 32), 256 * 1024, bits=bits)
    top = (mask >> np.uint64(bits - 8)).astype(np.int64)
    counts = np.bincount(top, minlength=256)
    expected = len(mask) / 256
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert 255 - 6 * 22.6 < chi2 < 255 + 6 * 22.6
    low_bit = (mask & np.uint64(1)).astype(np.int64)
    assert abs(low_bit.mean() - 0.5) < 6 * 0.5 / np.sqrt(len(mask))


@pytest.mark.parametrize(
    "seed,length,bits",
    [(bytes(31), 4, 32), (bytes(33), 4, 32), ("x" * 32, 4, 32), (SEED, -1, 32), (SEED, 4, 0), (SEED, 4, 65), (SEED, 4, True), (SEED, 2.0, 32)],
)
def test_expand_mask_bad_arguments_raise(seed, length, bits):
    with pytest.raises(CryptoError):
        prg.expand_mask(seed, length, bits=bits)


def test_derive_seed_is_hkdf_sha256():
    info = b"consortium/secagg/pair-mask/v1|round=3|alice|bob"
    assert prg.derive_seed(SHARED, info=info) == _hkdf_sha256_stdlib(SHARED, info)
    assert prg.derive_seed(SHARED, info=info + b"x") != prg.derive_seed(SHARED, info=info)
    with pytest.raises(CryptoError):
        prg.derive_seed(SHARED, info=b"")
    with pytest.raises(CryptoError):
        prg.derive_seed(bytes(8), info=info)


def test_pairwise_masks_cancel_in_the_ring():
    """The SecAgg use: site a adds PRG(s_ab), site b subtracts it; the sum mod 2^bits is unchanged."""
    bits = 32
    ring = np.uint64(2**bits - 1)
    alice, alice_public = keys.generate_x25519()
    bob, bob_public = keys.generate_x25519()
    info = b"consortium/secagg/pair-mask/v1|round=1|alice|bob"
    seed_a = prg.derive_seed(keys.exchange(alice, keys.x25519_public_bytes(bob_public)), info=info)
    seed_b = prg.derive_seed(keys.exchange(bob, keys.x25519_public_bytes(alice_public)), info=info)
    assert seed_a == seed_b
    x_a = np.arange(1000, dtype=np.uint64)
    x_b = np.arange(1000, dtype=np.uint64) * np.uint64(7)
    y_a = (x_a + prg.expand_mask(seed_a, 1000, bits=bits)) & ring
    y_b = (x_b - prg.expand_mask(seed_b, 1000, bits=bits)) & ring
    assert np.array_equal((y_a + y_b) & ring, x_a + x_b)
    assert not np.array_equal(y_a, x_a)


# --- Shamir -----------------------------------------------------------------

SEC2_P384 = int(
    "FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFE"
    "FFFFFFFF0000000000000000FFFFFFFF",
    16,
)
FIRST_PRIMES = [2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41, 43, 47, 53, 59, 61, 67, 71, 73, 79, 83, 89, 97]


def _miller_rabin(n: int, bases=FIRST_PRIMES) -> bool:
    if n < 2:
        return False
    for p in bases:
        if n % p == 0:
            return n == p
    d, s = n - 1, 0
    while d % 2 == 0:
        d, s = d // 2, s + 1
    for a in bases:
        x = pow(a, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(s - 1):
            x = x * x % n
            if x == n - 1:
                break
        else:
            return False
    return True


def test_prime_is_the_p384_field_prime_and_prime():
    assert shamir.PRIME == SEC2_P384  # SEC 2 v2, Sec. 2.5.1 (secp384r1), FIPS 186-4 D.1.2.4
    assert _miller_rabin(shamir.PRIME)
    assert not _miller_rabin(shamir.PRIME - 2) and not _miller_rabin(561) and not _miller_rabin(3215031751)
    assert shamir.PRIME > 2 ** (8 * shamir.MAX_SECRET_BYTES) and shamir.PRIME < 2 ** (8 * shamir.SHARE_BYTES)


def _coefficient_bytes(*coefficients: int):
    """rng_bytes that yields the given polynomial coefficients a_1, a_2, ... in order."""
    chunks = [c.to_bytes(48, "big") for c in coefficients]

    def draw(n: int) -> bytes:
        assert n == 48
        return chunks.pop(0)

    return draw


def test_known_answer_small_polynomial():
    # f(x) = 7 + 2x + 3x^2: f(1) = 12, f(2) = 23, f(3) = 40, f(4) = 63
    shares = shamir.split((7).to_bytes(32, "big"), threshold=3, xs=[1, 2, 3, 4], rng_bytes=_coefficient_bytes(2, 3))
    assert {x: int.from_bytes(s, "big") for x, s in shares.items()} == {1: 12, 2: 23, 3: 40, 4: 63}
    assert all(len(s) == 48 for s in shares.values())
    assert shamir.combine({1: shares[1], 3: shares[3], 4: shares[4]}, threshold=3) == (7).to_bytes(32, "big")
    hand = {x: (7 + 2 * x + 3 * x * x).to_bytes(48, "big") for x in (2, 5, 9)}
    assert shamir.combine(hand, threshold=3) == (7).to_bytes(32, "big")


def test_known_answer_wraps_modulo_p():
    p = shamir.PRIME
    # f(x) = 5 + (p - 1) x: f(1) = 4, f(2) = 3 (mod p)
    shares = shamir.split((5).to_bytes(32, "big"), threshold=2, xs=[1, 2], rng_bytes=_coefficient_bytes(p - 1))
    assert shares == {1: (4).to_bytes(48, "big"), 2: (3).to_bytes(48, "big")}


def test_coefficients_are_rejection_sampled():
    draws = [b"\xff" * 48, (9).to_bytes(48, "big")]  # the first is >= p and must be skipped
    shares = shamir.split((1).to_bytes(32, "big"), threshold=2, xs=[1, 2], rng_bytes=lambda n: draws.pop(0))
    assert shares == {1: (10).to_bytes(48, "big"), 2: (19).to_bytes(48, "big")}


@settings(max_examples=60, deadline=None)
@given(
    secret=st.binary(min_size=32, max_size=32),
    threshold=st.integers(1, 8),
    extra=st.integers(0, 6),
    data=st.data(),
)
def test_any_threshold_subset_recovers(secret, threshold, extra, data):
    xs = data.draw(st.lists(st.integers(1, 10**6), min_size=threshold + extra, max_size=threshold + extra, unique=True))
    shares = shamir.split(secret, threshold=threshold, xs=xs)
    assert list(shares) == xs
    subset = data.draw(st.lists(st.sampled_from(xs), min_size=threshold, max_size=len(xs), unique=True))
    assert shamir.combine({x: shares[x] for x in subset}, threshold=threshold) == secret


@settings(max_examples=60, deadline=None)
@given(xs=st.one_of(
    st.lists(st.integers(1, 1000), min_size=1, max_size=110, unique=True),  # site positions, as SecAgg+ uses them
    st.lists(st.integers(1, 2**40), min_size=1, max_size=20, unique=True),  # wide points: numpy groups of 1
    st.lists(st.integers(2**31, 2**70), min_size=1, max_size=8, unique=True),  # past 31 bits: the plain loop
))
def test_lagrange_difference_products_are_exact(xs):
    """The grouped numpy products equal prod_{j != i} (x_j - x_i) as Python's integers compute it, sign and all,
    so an overflowing group (a factor of 2 too many, say) fails here rather than shifting a recovered seed."""
    points = tuple(xs)
    assert shamir._difference_products(points) == [math.prod(xj - xi for xj in points if xj != xi) for xi in points]


def test_combine_at_secagg_scale_recovers_the_secret():
    """73 of 106 shares at positions among 1,000 sites (the planner's 1,000-site session), both interpolations."""
    rnd = random.Random(5)
    secret = rnd.randbytes(32)
    xs = rnd.sample(range(1, 1001), 106)
    shares = shamir.split(secret, threshold=73, xs=xs, rng_bytes=_deterministic_bytes(3))
    assert shamir.combine(shares, threshold=73) == secret
    forged = {**shares, xs[0]: ((int.from_bytes(shares[xs[0]], "big") + 1) % shamir.PRIME).to_bytes(48, "big")}
    with pytest.raises(shamir.ShamirError):
        shamir.combine(forged, threshold=73)


def _interpolate_at(points: dict[int, int], x: int) -> int:
    """Lagrange evaluation of the polynomial through ``points`` at ``x``, written independently of shamir.py."""
    p = shamir.PRIME
    total = 0
    for xi, yi in points.items():
        num, den = 1, 1
        for xj in points:
            if xj != xi:
                num = num * (x - xj) % p
                den = den * (xi - xj) % p
        total = (total + yi * num * pow(den, p - 2, p)) % p
    return total


def test_fewer_than_threshold_shares_fit_any_secret():
    """t - 1 shares of A lie on a degree < t polynomial through B too: they say nothing about the secret."""
    t = 4
    secret_a, secret_b = b"\x11" * 32, b"\x22" * 32
    shares = shamir.split(secret_a, threshold=t, xs=range(1, 8), rng_bytes=_deterministic_bytes(1))
    known = {x: int.from_bytes(shares[x], "big") for x in (2, 3, 6)}  # t - 1 shares
    through_b = {0: int.from_bytes(secret_b, "big"), **known}
    forged = {x: s for x, s in shares.items() if x in known}
    forged[7] = _interpolate_at(through_b, 7).to_bytes(48, "big")
    assert shamir.combine(forged, threshold=t) == secret_b
    assert shamir.combine({x: shares[x] for x in (2, 3, 6, 7)}, threshold=t) == secret_a


def test_forged_share_changes_or_breaks_the_secret():
    secret = b"\x33" * 32
    shares = shamir.split(secret, threshold=3, xs=[1, 2, 3], rng_bytes=_deterministic_bytes(2))
    nudged = dict(shares)
    nudged[3] = (int.from_bytes(shares[3], "big") ^ 1).to_bytes(48, "big")
    # A small change goes undetected with exactly t shares: authenticity comes from the AEAD, not from Shamir.
    assert shamir.combine(nudged, threshold=3) != secret
    replaced = dict(shares)
    replaced[3] = (int.from_bytes(random.Random(4).randbytes(48), "big") % shamir.PRIME).to_bytes(48, "big")
    with pytest.raises(ShamirError, match="32-byte secret"):
        shamir.combine(replaced, threshold=3)


def test_corrupted_share_among_extra_shares_is_detected():
    shares = shamir.split(b"\x44" * 32, threshold=3, xs=range(1, 6), rng_bytes=_deterministic_bytes(3))
    corrupted = dict(shares)
    corrupted[2] = (int.from_bytes(shares[2], "big") + 1).to_bytes(48, "big")
    with pytest.raises(ShamirError, match="inconsistent"):
        shamir.combine(corrupted, threshold=3)


def test_combine_refuses_bad_inputs():
    shares = shamir.split(b"\x55" * 32, threshold=3, xs=[1, 2, 3, 4])
    with pytest.raises(ShamirError, match="2 shares cannot recover"):
        shamir.combine({1: shares[1], 2: shares[2]}, threshold=3)
    for bad_x in (0, -1, shamir.PRIME, True, 1.0):
        with pytest.raises(ShamirError):
            shamir.combine({bad_x: shares[1], 2: shares[2], 3: shares[3]}, threshold=3)
    for bad_share in (shares[3][:-1], shares[3] + b"\x00", b"\xff" * 48, "x" * 48):
        with pytest.raises(ShamirError, match="malformed"):
            shamir.combine({1: shares[1], 2: shares[2], 3: bad_share}, threshold=3)
    for bad_threshold in (0, -2, True, 2.5):
        with pytest.raises(ShamirError):
            shamir.combine(shares, threshold=bad_threshold)
    with pytest.raises(ShamirError):
        shamir.combine(shares, threshold=3, length=48)


def test_split_refuses_bad_inputs():
    with pytest.raises(ShamirError, match="distinct"):
        shamir.split(b"\x01" * 32, threshold=2, xs=[1, 2, 2])
    with pytest.raises(ShamirError, match="cannot meet threshold"):
        shamir.split(b"\x01" * 32, threshold=4, xs=[1, 2, 3])
    with pytest.raises(ShamirError):
        shamir.split(b"\x01" * 32, threshold=2, xs=[0, 1, 2])
    with pytest.raises(ShamirError):
        shamir.split(b"\x01" * 32, threshold=0, xs=[1, 2])
    with pytest.raises(ShamirError):
        shamir.split(b"", threshold=1, xs=[1])
    with pytest.raises(ShamirError):
        shamir.split(b"\x01" * 48, threshold=1, xs=[1])


def test_split_and_combine_x25519_private_key():
    """The real use: share a mask private key, recover it, get the same public key."""
    private, public = keys.generate_x25519()
    shares = shamir.split(keys.x25519_private_bytes(private), threshold=5, xs=range(1, 11))
    survivors = {x: shares[x] for x in (1, 4, 5, 8, 10)}
    restored = keys.load_x25519_private(shamir.combine(survivors, threshold=5))
    assert keys.x25519_public_bytes(restored.public_key()) == keys.x25519_public_bytes(public)


@pytest.mark.parametrize("bits,length", [(32, 1), (32, 70_001), (20, 65_536), (64, 40_000)])
def test_mask_sum_in_place_adds_exactly_the_expanded_mask(bits, length):
    seed = bytes(range(32))
    mask = prg.mask_words(seed, length, bits=bits)
    start = np.arange(length, dtype=mask.dtype)
    acc = start.copy()
    prg.mask_sum(acc, [seed], bits=bits, subtract=[False], inputs=[acc])
    assert np.array_equal(acc, start + mask)  # numpy wraps at the word size, as the ring needs
    prg.mask_sum(acc, [seed], bits=bits, subtract=[True], inputs=[acc])
    assert np.array_equal(acc, start)


# --- many masks in one pass (mask_sum, iter_mask_sum, iter_mask_words) ---------------


def _mask_sum_oracle(length, seeds, signs, inputs, bits, reduce):
    """The same sum the slow way: Python integers, one whole mask at a time, exact."""
    word = 64 if bits > 32 else 32
    total = [0] * length
    for x in inputs:
        total = [a + int(b) for a, b in zip(total, x)]
    for seed, sign in zip(seeds, signs):
        mask = prg.expand_mask(seed, length, bits=64 if bits > 32 else 32)  # the unreduced words
        total = [a - int(m) if sign else a + int(m) for a, m in zip(total, mask)]
    modulus = 2**bits if reduce else 2**word
    return [t % modulus for t in total]


@pytest.mark.parametrize("bits", [20, 32, 40, 64])
@pytest.mark.parametrize("length", [0, 1, 32_767, 32_769, 70_001])  # 128 KiB blocks: 32k words of 32 bits, 16k of 64
def test_mask_sum_matches_the_whole_vector_oracle(bits, length):
    rng = np.random.default_rng(length + bits)
    seeds = [bytes([i]) * 32 for i in range(1, 5)]
    signs = [False, True, True, False]
    inputs = [rng.integers(0, 2**bits, length, dtype=np.uint64) for _ in range(3)]
    want_dtype = prg.ring_dtype(bits)
    for reduce in (False, True):
        out = np.empty(length, dtype=want_dtype)
        assert prg.mask_sum(out, seeds, bits=bits, subtract=signs, inputs=inputs, reduce=reduce) is out
        if length <= 32_769:  # the oracle is slow; the longest case is covered by the streaming check below
            assert out.tolist() == _mask_sum_oracle(length, seeds, signs, inputs, bits, reduce)
        streamed = [block.copy() for block in prg.iter_mask_sum(length, seeds, bits=bits, subtract=signs, inputs=inputs, reduce=reduce)]
        assert all(block.dtype == want_dtype and len(block) <= prg._SUM_CHUNK // want_dtype.itemsize for block in streamed)
        assert np.array_equal(np.concatenate(streamed) if streamed else np.empty(0, want_dtype), out)
        wide = np.empty(length, dtype=np.uint64)  # a uint64 output widens 32-bit ring words
        prg.mask_sum(wide, seeds, bits=bits, subtract=signs, inputs=inputs, reduce=reduce)
        assert np.array_equal(wide, out.astype(np.uint64))


def test_mask_sum_equals_mask_by_mask_arithmetic_and_works_in_place():
    rng = np.random.default_rng(5)
    seeds = [os.urandom(32) for _ in range(6)]
    signs = [bool(s) for s in rng.integers(0, 2, 6)]
    start = rng.integers(0, 2**32, 100_000, dtype=np.uint64).astype(np.uint32)
    one_by_one = start.copy()  # the oracle: whole masks, plain numpy arithmetic
    for seed, sign in zip(seeds, signs):
        mask = prg.mask_words(seed, len(start), bits=32)
        if sign:
            one_by_one -= mask
        else:
            one_by_one += mask
    in_place = start.copy()
    prg.mask_sum(in_place, seeds, bits=32, subtract=signs, inputs=[in_place])
    assert np.array_equal(in_place, one_by_one)
    fresh = np.empty_like(start)
    prg.mask_sum(fresh, seeds, bits=32, subtract=signs, inputs=[start])
    assert np.array_equal(fresh, one_by_one)
    # masks and their negations cancel, leaving the inputs (the SecAgg identity)
    back = np.empty_like(start)
    prg.mask_sum(back, seeds + seeds, bits=32, subtract=signs + [not s for s in signs], inputs=[start])
    assert np.array_equal(back, start)


def test_mask_sum_without_inputs_or_masks():
    seed = bytes(range(32))
    out = np.full(10, 7, dtype=np.uint32)
    prg.mask_sum(out, [seed], bits=32, subtract=[True])
    assert np.array_equal(out, (-prg.mask_words(seed, 10, bits=32)).astype(np.uint32))
    prg.mask_sum(out, [], bits=32)
    assert not out.any()
    x = np.arange(10, dtype=np.uint64)
    prg.mask_sum(out, [], bits=32, inputs=[x, x])
    assert np.array_equal(out, 2 * x)


def test_mask_sum_refuses_bad_arguments():
    seed = bytes(32)
    ok = np.zeros(8, dtype=np.uint32)
    for bad_out in (np.zeros(8, np.int64), np.zeros((2, 4), np.uint32), np.zeros(16, np.uint32)[::2], ok.copy().astype(np.float32)):
        with pytest.raises(CryptoError):
            prg.mask_sum(bad_out, [seed], bits=32)
    read_only = np.zeros(8, np.uint32)
    read_only.flags.writeable = False
    with pytest.raises(CryptoError):
        prg.mask_sum(read_only, [seed], bits=32)
    with pytest.raises(CryptoError, match="cannot hold"):
        prg.mask_sum(ok, [seed], bits=40)  # 40-bit words do not fit uint32
    with pytest.raises(CryptoError, match="subtract flags"):
        prg.mask_sum(ok, [seed, seed], bits=32, subtract=[True])
    with pytest.raises(CryptoError):
        prg.mask_sum(ok, [bytes(31)], bits=32)
    with pytest.raises(CryptoError, match="inputs"):
        prg.mask_sum(ok, [seed], bits=32, inputs=[np.zeros(8, np.int32)])
    with pytest.raises(CryptoError, match="inputs"):
        prg.mask_sum(ok, [seed], bits=32, inputs=[np.zeros(9, np.uint32)])
    for bits in (0, 65, True):
        with pytest.raises(CryptoError):
            prg.mask_sum(ok, [seed], bits=bits)
    with pytest.raises(CryptoError):
        next(prg.iter_mask_sum(-1, [seed], bits=32))


@pytest.mark.parametrize("bits,chunk", [(32, 1), (32, 1000), (64, 4096), (12, 65_536)])
def test_iter_mask_words_streams_mask_words(bits, chunk):
    seed = bytes(range(32))
    want = prg.mask_words(seed, 100_001, bits=bits)
    got = [w.copy() for w in prg.iter_mask_words(seed, 100_001, bits=bits, chunk=chunk)]
    assert all(len(w) <= chunk for w in got)
    assert np.array_equal(np.concatenate(got), want)
    assert list(prg.iter_mask_words(seed, 0, bits=bits, chunk=chunk)) == []
    with pytest.raises(CryptoError):
        next(prg.iter_mask_words(seed, 10, bits=bits, chunk=0))
    with pytest.raises(CryptoError):
        next(prg.iter_mask_words(bytes(3), 10, bits=bits, chunk=8))


# --- tensor integrity hash (consortium.wire.Tensor) --------------------------------


def test_tensor_hash_is_computed_once_and_still_guards_other_bytes(monkeypatch):
    from consortium.secagg.messages import MaskedInput
    from consortium.wire import Tensor, decode_frame, encode_frame

    raw = np.arange(1000, dtype="<u4").tobytes()
    view = np.frombuffer(raw, dtype=np.uint32)
    t = Tensor.from_numpy(view)
    assert t.raw is raw  # a view of a whole bytes object is shared, not copied
    assert t.sha256 == hashlib.sha256(raw).hexdigest()
    assert Tensor.from_numpy(view[1:]).raw == raw[4:]  # a partial view is copied
    assert Tensor.from_numpy(np.arange(1000, dtype=np.uint32)) == t  # equality ignores how it was made

    calls = []
    real = hashlib.sha256
    monkeypatch.setattr(hashlib, "sha256", lambda data=b"": calls.append(len(data)) or real(data))
    message = MaskedInput(vector=t)  # the digest from_numpy just computed is not recomputed
    assert message.vector is t and calls == []
    decoded = decode_frame(MaskedInput, encode_frame(message))  # but every arrival is hashed
    assert decoded == message and calls == [len(raw)]

    forged = t.model_copy(update={"raw": bytes(len(raw))})  # other bytes under the old digest
    with pytest.raises(ValueError, match="SHA-256"):
        MaskedInput(vector=forged)
    relabelled = t.model_copy(update={"sha256": "0" * 64})
    with pytest.raises(ValueError, match="SHA-256"):
        MaskedInput(vector=relabelled)
    unchecked = Tensor.model_construct(dtype="uint32", shape=(1000,), sha256="0" * 64, raw=raw)
    with pytest.raises(ValueError, match="SHA-256"):
        MaskedInput(vector=unchecked)


# -- identity key files -------------------------------------------------------------------


def test_an_identity_key_is_written_for_its_owner_only_and_read_back(tmp_path):
    key = keys.generate_ed25519()[0]
    path = tmp_path / "site-1.key"
    save_identity_key(path, key)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    loaded = load_identity_key(path)
    assert keys.ed25519_public_bytes(loaded.public_key()) == keys.ed25519_public_bytes(key.public_key())
    with pytest.raises(ConfigError, match="never overwritten"):
        save_identity_key(path, keys.generate_ed25519()[0])
    assert load_identity_key(path).private_bytes_raw() == key.private_bytes_raw()


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o620, 0o644, 0o666])
def test_a_key_file_others_can_reach_is_refused(tmp_path, mode):
    path = tmp_path / "k.key"
    save_identity_key(path, keys.generate_ed25519()[0])
    os.chmod(path, mode)
    with pytest.raises(ConfigError, match=f"accessible to others \\(mode {mode:04o}\\).*chmod 600"):
        load_identity_key(path)


def test_a_key_file_that_is_not_an_ed25519_key_is_refused(tmp_path):
    path = tmp_path / "k.key"
    path.write_bytes(b"not a key")
    os.chmod(path, 0o600)
    with pytest.raises(ConfigError, match="PEM"):
        load_identity_key(path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_identity_key(tmp_path / "missing.key")


def test_a_simulated_members_key_is_hkdf_of_the_run_secret_and_its_name():
    # Known answer, recomputed from RFC 5869 with hashlib's HMAC (not cryptography's HKDF): extract with the
    # zero salt, expand one block under info = domain, NUL, the member's name.
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    secret = bytes(range(32))
    prk = hmac.new(bytes(32), secret, hashlib.sha256).digest()
    seed = hmac.new(prk, b"consortium/simulated-member-key/v1\x00hospital-1" + b"\x01", hashlib.sha256).digest()
    expected = keys.ed25519_public_bytes(Ed25519PrivateKey.from_private_bytes(seed).public_key())
    assert expected.hex() == "104576ac1398e16f93532713f6d70b05f55f8a2e0b988b6cc677a282982a0a68"
    assert keys.ed25519_public_bytes(keys.derive_ed25519(secret, "hospital-1").public_key()) == expected
    others = {keys.ed25519_public_bytes(keys.derive_ed25519(secret, n).public_key()) for n in ("hospital-2", "coordinator")}
    assert expected not in others and len(others) == 2
    with pytest.raises(keys.CryptoError, match="at least 32 bytes"):
        keys.derive_ed25519(secret[:31], "hospital-1")
