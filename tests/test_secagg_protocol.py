"""SecAgg+ end to end: exact sums under dropout, and every refusal a malicious coordinator meets."""

import json
import tracemalloc

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from consortium.crypto import keys
from consortium.crypto.aead import DecryptionError, MacError
from consortium.crypto.keys import InvalidSignatureError
from consortium.runs import MaskedSpool
from consortium.secagg import (
    STAGES,
    SecAggAborted,
    SecAggClient,
    SecAggError,
    SecAggServer,
    make_session,
    secure_sum,
)
from consortium.secagg.graph import plan_graph
from consortium.secagg.messages import (
    ShareDelivery,
    SurvivorList,
    UnmaskRequest,
    survivors_statement,
)
from consortium.secagg.protocol import unmask_total
from consortium.secagg.quantize import QuantizationError


def _predict_abort(n: int, t: int, drop: dict[int, str], self_ack: bool = False) -> bool:
    """On the complete graph: does some stage keep fewer than the threshold?"""

    def alive(stage):
        return {i for i in range(n) if i not in drop or STAGES.index(drop[i]) > STAGES.index(stage)}

    u1 = alive("advertise_keys")
    if len(u1) < t or len(u1) - 1 < t:  # the server, then each site's own roster check
        return True
    u2, u3, u4, u5 = (alive(s) & u1 for s in STAGES[1:])
    if min(len(u2), len(u3), len(u4), len(u5)) < t:
        return True
    # A site unmasks once t others acknowledged the list (itself counting under self_ack); it reveals its own
    # seed share with its neighbours', so every mask needs t of those who answer, a survivor's own included.
    repliers = {u for u in u5 if len(u4 - {u}) + self_ack >= t}
    return len(repliers) < t


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(2, 30),
    length=st.integers(1, 40),
    data=st.data(),
)
def test_secure_sum_is_the_plain_sum_over_included_sites(n, length, data):
    seed = data.draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    updates = [rng.uniform(-2, 2, length) for _ in range(n)]
    drop = data.draw(st.dictionaries(st.integers(0, n - 1), st.sampled_from(STAGES), max_size=n))
    plan = plan_graph(n)
    if _predict_abort(n, plan.threshold, drop, plan.self_ack):
        with pytest.raises(SecAggAborted):
            secure_sum(updates, clip=1.5, drop=drop, seed=seed)
        return
    r = secure_sum(updates, clip=1.5, drop=drop, seed=seed)
    expected_included = [
        i for i in range(n) if i not in drop or STAGES.index(drop[i]) > STAGES.index("collect_masked")
    ]
    assert r.survivors == expected_included
    plain = np.sum([np.clip(updates[i], -1.5, 1.5) for i in r.survivors], axis=0)
    assert np.max(np.abs(r.total - plain)) <= r.error_bound


def test_k_regular_graph_for_a_large_cohort():
    rng = np.random.default_rng(0)
    updates = [rng.uniform(-1, 1, 16) for _ in range(60)]
    r = secure_sum(updates, clip=1.0, drop={3: "collect_masked", 10: "unmask"}, seed=0)
    assert r.graph == "k-regular"
    plain = np.sum([updates[i] for i in r.survivors], axis=0)
    assert 3 not in r.survivors and 10 in r.survivors
    assert np.max(np.abs(r.total - plain)) <= r.error_bound


def test_an_overflowing_configuration_is_refused():
    with pytest.raises(QuantizationError):
        secure_sum([np.zeros(3)] * 3, clip=0.0)
    with pytest.raises(QuantizationError):
        secure_sum([np.zeros(3)] * 3, clip=float("inf"))


# -- driving the state machines by hand, as a malicious coordinator would ----------


class Session:
    """Real clients and a real server, run stage by stage so a test can tamper in between."""

    def __init__(self, n=5, length=8, keep=None):
        self.params = make_session([f"s{i}" for i in range(n)], length, bits=32)
        self.ids = {u: keys.generate_ed25519()[0] for u in self.params.participants}
        self.directory = {u: keys.ed25519_public_bytes(k.public_key()) for u, k in self.ids.items()}
        self.server_key = keys.generate_ed25519()[0]
        pub = keys.ed25519_public_bytes(self.server_key.public_key())
        self.clients = {u: SecAggClient(u, self.ids[u], self.params, self.directory, pub) for u in self.params.participants}
        self.server = SecAggServer(self.params, self.server_key, self.directory, keep=keep)
        self.inputs = {u: np.full(length, i + 1, dtype=np.uint64) for i, u in enumerate(self.params.participants)}

    def to_masked(self, skip=(), traced=None):
        """... up to the survivor list; ``traced``: a list to append the bytes the masked inputs left allocated."""
        for u, c in self.clients.items():
            self.server.add_advert(u, c.advertise_keys())
        rosters = self.server.close_advertise()
        for u, c in self.clients.items():
            self.server.add_shares(u, c.share_keys(rosters[u]))
        self.deliveries = self.server.close_share_keys()
        if traced is not None:
            tracemalloc.start()
        for u, c in self.clients.items():
            if u not in skip:
                self.server.add_masked(u, c.collect_masked(self.deliveries[u], self.inputs[u]))
        if traced is not None:
            traced.append(tracemalloc.get_traced_memory()[0])
            tracemalloc.stop()
        return self.server.close_collect_masked()

    def to_unmask(self, skip=(), traced=None):
        survivors = self.to_masked(skip, traced)
        self.acks = {u: self.clients[u].consistency_check(survivors) for u in survivors.survivors}
        for u, ack in self.acks.items():
            self.server.add_ack(u, ack)
        return self.server.close_consistency()


def test_honest_session_sums_exactly():
    s = Session()
    requests = s.to_unmask(skip=("s2",))
    for u, req in requests.items():
        s.server.add_unmask(u, s.clients[u].unmask(req))
    out = s.server.finish()
    assert out.included == ("s0", "s1", "s3", "s4") and out.dropped == ("s2",)
    assert np.array_equal(out.total, np.full(8, 1 + 2 + 4 + 5, dtype=np.uint64))


def test_a_server_with_a_spool_holds_the_sum_alone_and_archives_every_input(tmp_path):
    """With ``keep`` (the run's spool) the coordinator's memory for masked inputs is one vector, not one per
    site; the sum is the same, and the archive the spool writes reproduces it as ``verify`` does."""
    from safetensors.numpy import load

    n, length = 12, 50_000  # 200 KB per masked input (uint32 ring words)
    held = {}
    for spooled in (False, True):
        spool = MaskedSpool(tmp_path / "session.spool") if spooled else None
        s = Session(n=n, length=length, keep=spool.add if spool else None)
        requests = s.to_unmask(traced=held.setdefault(spooled, []))
        for u, req in requests.items():
            s.server.add_unmask(u, s.clients[u].unmask(req))
        out = s.server.finish()
        assert np.array_equal(out.total, sum(s.inputs.values()) % 2**32)
        if spool:
            with pytest.raises(SecAggError, match="holds only their sum"):
                s.server.masked_inputs()
            spool.write_safetensors(tmp_path / "archive.safetensors")
            archived = load((tmp_path / "archive.safetensors").read_bytes())
            assert sorted(archived) == list(out.included) and not spool.path.exists()
            summed = sum(v.astype(np.uint64) for v in archived.values())  # as verify adds the archive up
            assert np.array_equal(unmask_total(s.server.evidence(), summed), out.total)
    assert held[False][0] > n * length * 4  # every input kept in memory
    assert held[True][0] < length * 8 * 1.25  # their running sum (uint64), whatever n


def test_the_coordinator_sees_only_masked_inputs():
    s = Session(length=4096)
    s.to_masked()
    for u, y in s.server._masked.items():
        assert not np.array_equal(y, s.inputs[u])
        # A masked vector is uniform on the ring: its mean is near 2^31, whatever the input.
        assert abs(float(y.mean()) / 2**32 - 0.5) < 0.02


def test_a_tampered_share_ciphertext_is_rejected():
    s = Session()
    s.to_masked_before = None
    for u, c in s.clients.items():
        s.server.add_advert(u, c.advertise_keys())
    rosters = s.server.close_advertise()
    for u, c in s.clients.items():
        s.server.add_shares(u, c.share_keys(rosters[u]))
    deliveries = s.server.close_share_keys()
    d = deliveries["s0"]
    sender, ciphertext = next(iter(d.shares.items()))
    flipped = bytearray(ciphertext)
    flipped[20] ^= 1
    forged = ShareDelivery(shares={**d.shares, sender: bytes(flipped)})
    with pytest.raises(DecryptionError):
        s.clients["s0"].collect_masked(forged, s.inputs["s0"])
    # Re-addressing an intact ciphertext to another site also fails: the pair is bound into the key and AAD.
    other = next(v for v in deliveries["s1"].shares if v != "s0")
    readdressed = ShareDelivery(shares={other: deliveries["s0"].shares[other]})
    with pytest.raises((DecryptionError, SecAggError)):
        s.clients["s1"].collect_masked(readdressed, s.inputs["s1"])
    # A share said to come from a site that advertised nothing to s2 is refused before any decryption.
    with pytest.raises(SecAggError, match="advertised no keys"):
        s.clients["s2"].collect_masked(ShareDelivery(shares={"s9": ciphertext}), s.inputs["s2"])


def test_a_survivor_list_with_a_bad_signature_is_refused():
    s = Session()
    survivors = s.to_masked()
    forged = SurvivorList(survivors=survivors.survivors, signature=bytes(64))
    with pytest.raises(InvalidSignatureError):
        s.clients["s0"].consistency_check(forged)
    # A list the coordinator signed but then altered fails too.
    altered = SurvivorList(survivors=survivors.survivors[:-1], signature=survivors.signature)
    with pytest.raises(InvalidSignatureError):
        s.clients["s1"].consistency_check(altered)


def _honest_request(s, **changes):
    requests = s.to_unmask(skip=("s4",))
    req = requests["s0"]
    return s, UnmaskRequest(**{**req.model_dump(), **changes})


def test_unmask_refuses_a_peer_both_alive_and_dead():
    s, req = _honest_request(Session())
    evil = UnmaskRequest(survivors=req.survivors, dropped=(*req.dropped, "s1"), acks=req.acks)
    with pytest.raises(SecAggError, match="both alive and dropped"):
        s.clients["s0"].unmask(evil)


def test_unmask_refuses_unknown_sites_and_changed_survivors():
    s, req = _honest_request(Session())
    with pytest.raises(SecAggError, match="not a participant"):
        s.clients["s0"].unmask(UnmaskRequest(survivors=req.survivors, dropped=("mallory",), acks=req.acks))
    s2, req2 = _honest_request(Session())
    # Claiming a survivor dropped (to get its mask key) contradicts the list everyone signed.
    shrunk = tuple(x for x in req2.survivors if x != "s1")
    with pytest.raises(SecAggError, match="differ from the list this site signed"):
        s2.clients["s0"].unmask(UnmaskRequest(survivors=shrunk, dropped=(*req2.dropped, "s1"), acks=req2.acks))


def test_unmask_refuses_too_few_acknowledgements_and_a_second_request():
    s, req = _honest_request(Session())
    few = dict(list(req.acks.items())[: s.params.threshold - 1])
    with pytest.raises(SecAggError, match="fewer than the threshold"):
        s.clients["s0"].unmask(UnmaskRequest(survivors=req.survivors, dropped=req.dropped, acks=few))
    s, req = _honest_request(Session())
    s.clients["s0"].unmask(req)
    with pytest.raises(SecAggError, match="stage"):
        s.clients["s0"].unmask(req)  # never a second chance to reveal the other share


def test_unmask_reveals_seed_shares_for_alive_and_key_shares_for_dropped_never_both():
    s, req = _honest_request(Session())
    reply = s.clients["s0"].unmask(req)
    assert set(reply.seed_shares) == {"s0", "s1", "s2", "s3"}  # its own seed share too, never its own key share
    assert set(reply.key_shares) == {"s4"}
    assert not set(reply.seed_shares) & set(reply.key_shares)


def test_forged_acknowledgements_are_refused():
    s, req = _honest_request(Session())
    acks = dict(req.acks)
    acks["s1"] = bytes(32)  # the coordinator does not hold the key s0 and s1 share
    with pytest.raises(MacError):
        s.clients["s0"].unmask(UnmaskRequest(survivors=req.survivors, dropped=req.dropped, acks=acks))


def test_a_site_own_acknowledgement_reflected_back_is_refused():
    s, req = _honest_request(Session())
    acks = dict(req.acks)
    acks["s1"] = s.acks["s0"].tags["s1"]  # s0's tag for s1, under the key they share, passed off as s1's
    with pytest.raises(MacError):
        s.clients["s0"].unmask(UnmaskRequest(survivors=req.survivors, dropped=req.dropped, acks=acks))
    # Nor may a confirmation from s0 itself count: it is not its own neighbour.
    s, req = _honest_request(Session())
    with pytest.raises(SecAggError, match="not a neighbour"):
        s.clients["s0"].unmask(UnmaskRequest(survivors=req.survivors, dropped=req.dropped, acks={**req.acks, "s0": bytes(32)}))


def test_a_coordinator_showing_two_survivor_lists_is_caught():
    """The attack the consistency check exists for: some sites are told s4 survived, others that it dropped.

    A coordinator that got s4's seed shares from the first group and its mask-key shares from the second
    could strip every mask off s4's input. Each site checks that its neighbours acknowledged the very list it
    saw, so a neighbour's tag over the other list fails.
    """
    s = Session()
    s.to_masked()
    sid = s.params.session_id
    full = tuple(s.params.participants)
    without_s4 = tuple(u for u in full if u != "s4")
    both = {lst: SurvivorList(survivors=lst, signature=keys.sign(s.server_key, survivors_statement(sid, lst))) for lst in (full, without_s4)}
    shown = {"s0": full, "s1": full, "s2": without_s4, "s3": without_s4}
    acks = {u: s.clients[u].consistency_check(both[lst]) for u, lst in shown.items()}
    # s0, told all five survived, gets s1's tag over that list and s2's and s3's over the list without s4.
    request = UnmaskRequest(survivors=full, dropped=(), acks={v: acks[v].tags["s0"] for v in ("s1", "s2", "s3")})
    with pytest.raises(MacError):
        s.clients["s0"].unmask(request)


def test_a_site_checks_the_threshold_itself():
    p = make_session([f"s{i}" for i in range(6)], 4, bits=32)
    weak = p.model_copy(update={"threshold": 2})
    me = keys.generate_ed25519()[0]
    with pytest.raises(SecAggError, match="exceed half"):
        SecAggClient("s0", me, weak, {}, b"")


def test_adverts_with_bad_signatures_are_refused():
    s = Session()
    adv = s.clients["s0"].advertise_keys()
    forged = adv.model_copy(update={"s_pk": s.clients["s1"].advertise_keys().s_pk})
    with pytest.raises(InvalidSignatureError):
        s.server.add_advert("s0", forged)


def test_too_few_survivors_abort_without_revealing():
    s = Session()
    with pytest.raises(SecAggAborted):
        s.to_masked(skip=("s0", "s1", "s2"))


def test_messages_survive_the_wire():
    from consortium.secagg.messages import MaskedInput
    from consortium.wire import decode_frame, encode_frame

    s = Session()
    s.to_masked()
    adv = s.clients["s0"]._peers["s1"]
    again = decode_frame(type(adv), encode_frame(adv))
    assert again == adv
    header = json.loads(encode_frame(adv)[8:].decode())
    assert isinstance(header["c_pk"], str)  # base64 in JSON
    m = MaskedInput(vector=__import__("consortium.wire", fromlist=["Tensor"]).Tensor.from_numpy(np.arange(3, dtype=np.uint64)))
    assert np.array_equal(decode_frame(MaskedInput, encode_frame(m)).vector.to_numpy(), np.arange(3, dtype=np.uint64))


def test_a_share_plaintext_round_trips_its_fixed_layout_and_refuses_any_other():
    from consortium.secagg.messages import SharePlaintext

    plain = SharePlaintext(sender="hospital-1", recipient="hospital-20", seed_share=bytes(range(48)), key_share=b"\x07" * 48)
    raw = plain.to_bytes()
    assert SharePlaintext.from_bytes(raw) == plain
    for bad in (raw[:-1], raw + b"\x00", b"", b"\x05ab", raw.replace(b"hospital-1", b"hospital 1", 1), b"\x02\xff\xfe" + raw[12:]):
        with pytest.raises(ValueError):
            SharePlaintext.from_bytes(bad)
