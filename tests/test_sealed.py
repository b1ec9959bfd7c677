"""Sealed envelopes: every message signed by its sender; tampering, replays, stale or misrouted messages refused."""

import json

import numpy as np
import pytest

from consortium.crypto import keys
from consortium.errors import MessageRejected, ProtocolError
from consortium.protocol import messages as m
from consortium.protocol.coordinator import COORDINATOR
from consortium.protocol.sealed import MAX_SKEW_MS, EnvelopeGuard, seal
from consortium.protocol.site import Site
from consortium.transcript.log import canonical
from tests.conftest import make_splits

NOW = 1_800_000_000_000


@pytest.fixture
def members():
    ids = {u: keys.generate_ed25519()[0] for u in (COORDINATOR, "a", "b")}
    return ids, {u: keys.ed25519_public_bytes(k.public_key()) for u, k in ids.items()}


def _env(rnd=1, sender=COORDINATOR, recipient="a"):
    return m.make_envelope(sender, recipient, rnd, m.SetupRequest(secure_aggregation=True))


def _guard(directory, me="a", now=NOW):
    return EnvelopeGuard(me, directory, clock=lambda: now)


def test_a_sealed_message_opens_once(members):
    ids, directory = members
    raw = seal(_env(), ids[COORDINATOR], now_ms=NOW)
    guard = _guard(directory)
    assert guard.open(raw, sender=COORDINATOR, rnd=1) == _env()
    with pytest.raises(MessageRejected, match="replayed"):
        guard.open(raw)


def test_any_flipped_byte_is_refused(members):
    ids, directory = members
    raw = seal(_env(), ids[COORDINATOR], now_ms=NOW)
    for pos in range(4, len(raw), max(1, len(raw) // 97)):
        tampered = raw[:pos] + bytes([raw[pos] ^ 0x20]) + raw[pos + 1 :]
        with pytest.raises(ProtocolError):
            _guard(directory).open(tampered)


def test_a_member_cannot_speak_for_another(members):
    ids, directory = members
    forged = seal(_env(), ids["b"], now_ms=NOW)  # b's key, the coordinator's name in the header
    with pytest.raises(ProtocolError, match="signature"):
        _guard(directory).open(forged)
    outsider = seal(_env(sender="mallory"), keys.generate_ed25519()[0], now_ms=NOW)
    with pytest.raises(MessageRejected, match="not a member"):
        _guard(directory).open(outsider)


def test_misrouted_stale_or_wrong_round_messages_are_refused(members):
    ids, directory = members
    with pytest.raises(MessageRejected, match="reached 'a'"):
        _guard(directory).open(seal(_env(recipient="b"), ids[COORDINATOR], now_ms=NOW))
    with pytest.raises(MessageRejected, match="stale"):
        _guard(directory).open(seal(_env(), ids[COORDINATOR], now_ms=NOW - MAX_SKEW_MS - 1))
    with pytest.raises(MessageRejected, match="round 1 where round 2"):
        _guard(directory).open(seal(_env(), ids[COORDINATOR], now_ms=NOW), rnd=2)
    with pytest.raises(MessageRejected, match="where 'b' was asked"):
        _guard(directory).open(seal(_env(), ids[COORDINATOR], now_ms=NOW), sender="b")
    with pytest.raises(MessageRejected, match="unsealed"):
        _guard(directory).open(m.encode(_env()))


def test_a_header_must_be_canonical_and_match_the_envelope(members):
    ids, directory = members
    raw = seal(_env(), ids[COORDINATOR], now_ms=NOW)
    size = int.from_bytes(raw[4:8], "big")
    header = json.loads(raw[8 : 8 + size])
    payload = raw[8 + size + 64 :]

    def resealed(h: bytes, body: bytes = payload) -> bytes:
        return b"CSS1" + len(h).to_bytes(4, "big") + h + ids[COORDINATOR].sign(b"consortium/envelope/v1\x00" + h) + body

    with pytest.raises(MessageRejected, match="canonical"):
        _guard(directory).open(resealed(json.dumps(header, indent=1).encode()))
    lying = canonical({**header, "round": 7})  # signed, but the envelope inside is for round 1
    with pytest.raises(MessageRejected, match="does not match its signed header"):
        _guard(directory).open(resealed(lying))


def test_a_strict_site_refuses_unsealed_replayed_and_out_of_order_requests(members, rng):
    ids, directory = members
    site = Site("a", make_splits(rng), seed=0, identity=ids["a"], directory=directory, strict=True)
    reply_guard = EnvelopeGuard(COORDINATOR, directory)

    def ask(raw):
        return reply_guard.open(site.handle_bytes(raw), sender="a").message

    assert isinstance(ask(m.encode(_env(rnd=0))), m.Refusal)  # unsealed
    fresh = seal(_env(rnd=2), ids[COORDINATOR])
    answer = ask(fresh)
    assert isinstance(answer, m.SetupReply)
    again = ask(fresh)
    assert isinstance(again, m.Refusal) and "replayed" in again.reason
    late = ask(seal(_env(rnd=1), ids[COORDINATOR]))
    assert isinstance(late, m.Refusal) and "round 1 after round 2" in late.reason
    assert isinstance(ask(seal(_env(rnd=2, sender="b"), ids["b"])), m.Refusal)  # only the coordinator asks


def test_a_simulation_runs_sealed_end_to_end(tmp_path):
    from consortium.config import SimulationConfig
    from consortium.run.simulation import Simulation

    cfg = SimulationConfig.model_validate({"rounds": 1, "baselines": {"local_only": False, "pooled": False}})
    s = Simulation(cfg, out=tmp_path / "run")
    result = s.run()
    assert result.summary["federated"]["rounds_completed"] == 1 and s.transport.rejected == []
    assert np.isfinite(result.params).all()


def test_the_nonce_cache_keeps_every_nonce_that_could_be_fresh_and_forgets_the_rest_in_order(members):
    """Each nonce is added once and dropped once (the cache is pruned from the front, never rebuilt: opening
    N replies costs O(N), where rebuilding it on every reply cost O(N^2) at 1,000 sites)."""
    ids, directory = members
    clock = [NOW]
    guard = EnvelopeGuard("a", directory, clock=lambda: clock[0])
    cache = guard._seen
    late = seal(_env(), ids[COORDINATOR], now_ms=NOW + MAX_SKEW_MS - 1)  # stamped ahead, within the skew
    early = seal(_env(), ids[COORDINATOR], now_ms=NOW - MAX_SKEW_MS + 1)  # stamped behind, arriving after it
    guard.open(late)
    guard.open(early)
    clock[0] = NOW + MAX_SKEW_MS // 2
    for raw in (late, early):  # both could still pass the freshness check: both are remembered
        with pytest.raises(MessageRejected, match="replayed"):
            guard.open(raw)
    assert len(cache) == 2 and guard._seen is cache
    clock[0] = NOW + 3 * MAX_SKEW_MS  # far past both: the next reply's opening forgets them
    guard.open(seal(_env(), ids[COORDINATOR], now_ms=clock[0]))
    assert len(cache) == 1 and guard._seen is cache
    with pytest.raises(MessageRejected, match="stale"):  # and freshness alone refuses them now
        guard.open(early)
