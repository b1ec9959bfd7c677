"""The transcript of a run: it verifies as written, and every tampering is caught and named."""

import base64
import dataclasses
import json
import random
import re
import shutil
import sys

import numpy as np
import pytest

from consortium.config import SimulationConfig
from consortium.crypto import keys
from consortium.errors import VerificationError
from consortium.protocol import messages as m
from consortium.protocol.coordinator import COORDINATOR
from consortium.run.simulation import Simulation
from consortium.transcript import merkle
from consortium.transcript.log import (
    HEADS_FILE,
    TRANSCRIPT_FILE,
    HeadWitness,
    manifest_bytes,
    TranscriptWriter,
    canonical,
    head_bytes,
    signed_entry_bytes,
)
from consortium.audit.verify import verify_run
from consortium.transport import InProcessTransport
from tests import forkserver


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    cfg = SimulationConfig.model_validate({
        "rounds": 2,
        "data": {"dataset": "breast-cancer", "sites": 3},
        "privacy": {"test_seed": 3},
        "baselines": {"local_only": False, "pooled": False},
    })
    s = Simulation(cfg, out=tmp_path_factory.mktemp("runs") / "run")
    s.result = s.run()
    return s


@pytest.fixture
def run(sim, tmp_path):
    """A private copy of the run folder to tamper with."""
    copy = tmp_path / "run"
    shutil.copytree(sim.run_dir, copy)
    return copy


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _lines(run, name=TRANSCRIPT_FILE):
    return (run / name).read_bytes().split(b"\n")[:-1]


def _write(run, lines, name=TRANSCRIPT_FILE):
    (run / name).write_bytes(b"".join(line + b"\n" for line in lines))


def test_a_run_verifies_and_says_so(sim, run):
    assert sim.result.summary["transcript"]["verified"] is True
    report = verify_run(run)
    kinds = [json.loads(line)["kind"] for line in _lines(run)]
    assert kinds[0] == "manifest" and kinds[-1] == "final_model"
    assert kinds.count("round_plan") == 2 and kinds.count("site_decision") == 6 and kinds.count("aggregate") == 2
    assert report.entries == len(kinds) == sim.result.summary["transcript"]["entries"]
    assert report.tree_head["cosigned_by"] == ["site-1", "site-2", "site-3"]
    assert report.epsilon_per_site == sim.result.summary["privacy"]["epsilon_per_site"]


def test_the_command_line_verifies_and_fails_with_exit_1(run):
    cmd = [sys.executable, "-m", "consortium.cli", "verify", str(run), "--json"]
    ok = forkserver.run(cmd, capture_output=True, text=True)
    assert ok.returncode == 0 and json.loads(ok.stdout)["verified"] is True
    lines = _lines(run)
    del lines[3]
    _write(run, lines)
    bad = forkserver.run(cmd[:-1], capture_output=True, text=True)
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
    assert "verification failed" in bad.stderr and "entry 3" in bad.stderr


def test_flipping_any_single_byte_of_any_entry_is_caught(run):
    lines = _lines(run)
    rng = random.Random(0)
    for i, line in enumerate(lines):
        spread = {1, len(line) // 3, len(line) // 2, 2 * len(line) // 3, len(line) - 2}
        for pos in sorted(spread | {rng.randrange(len(line)) for _ in range(20)}):
            tampered = list(lines)
            tampered[i] = line[:pos] + bytes([line[pos] ^ 0x01]) + line[pos + 1 :]
            _write(run, tampered)
            with pytest.raises(VerificationError):
                verify_run(run)


@pytest.mark.parametrize("how", ["delete", "reorder", "append-unsigned-head", "truncate"])
def test_removing_reordering_or_adding_entries_is_caught(run, sim, how):
    lines = _lines(run)
    if how == "delete":
        del lines[4]
    elif how == "reorder":
        lines[3], lines[4] = lines[4], lines[3]
    elif how == "truncate":  # the last entries dropped: the signed heads still count them
        lines = lines[:-2]
    else:  # an entry added after the last head, properly signed by the coordinator
        key = sim._identities[COORDINATOR]
        body = {"model_sha256": "0" * 64, "evaluated_sites": 3, "note": "", "metrics": {}}
        sig = keys.sign(key, signed_entry_bytes("evaluation", 2, COORDINATOR, body))
        extra = {"index": len(lines), "kind": "evaluation", "round": 2, "author": COORDINATOR, "body": body, "signature": _b64(sig)}
        lines.append(canonical(extra))
    _write(run, lines)
    with pytest.raises(VerificationError, match="entry|head"):
        verify_run(run)


def test_swapping_the_final_model_file_is_caught(run):
    model = run / "model.safetensors"
    data = bytearray(model.read_bytes())
    data[-1] ^= 0xFF
    model.write_bytes(bytes(data))
    with pytest.raises(VerificationError, match="model.safetensors"):
        verify_run(run)


def _rewrite_as_coordinator(run, sim, edit):
    """A coordinator with its key rewrites history: edits entries, re-signs them, re-signs every head."""
    key = sim._identities[COORDINATOR]
    entries = [json.loads(line) for line in _lines(run)]
    for e in entries:
        if edit(e):
            e["signature"] = _b64(keys.sign(key, signed_entry_bytes(e["kind"], e["round"], e["author"], e["body"])))
    _write(run, [canonical(e) for e in entries])
    leaves = [merkle.leaf_hash(canonical(e)) for e in entries]
    heads = []
    for line in _lines(run, HEADS_FILE):
        h = json.loads(line)
        h["root"] = merkle.root(leaves[: h["size"]]).hex()
        h["signature"] = _b64(keys.sign(key, head_bytes(h["size"], h["root"], h["timestamp_ms"], h["seq"])))
        heads.append(canonical(h))
    _write(run, heads, HEADS_FILE)


def test_a_changed_noise_multiplier_is_caught_even_when_the_coordinator_re_signs(run, sim):
    def lower_the_noise(e):
        if e["kind"] == "round_plan" and e["round"] == 1:
            e["body"]["privacy_event"]["noise_multiplier"] /= 10
            return True
        return False

    _rewrite_as_coordinator(run, sim, lower_the_noise)
    with pytest.raises(VerificationError, match="co-signature"):
        verify_run(run)


def test_a_forged_site_acceptance_is_caught(run, sim):
    def forge(e):  # the coordinator signs a decision in site-2's name
        return e["kind"] == "site_decision" and e["author"] == "site-2" and e["round"] == 2

    _rewrite_as_coordinator(run, sim, forge)
    with pytest.raises(VerificationError, match="site_decision by site-2"):
        verify_run(run)


def _rewrite_with_everyone(run, sim, edit):
    """Every member colludes: ``edit`` changes the list of entries, which is re-indexed and put under one
    head that the coordinator signs and every site co-signs. Only the transcript's own rules remain."""
    entries = edit([json.loads(line) for line in _lines(run)])
    for i, e in enumerate(entries):
        e["index"] = i
    _write(run, [canonical(e) for e in entries])
    root = merkle.root([merkle.leaf_hash(canonical(e)) for e in entries]).hex()
    signed = head_bytes(len(entries), root, 1, 0)
    cosignatures = {n: _b64(keys.sign(k, signed)) for n, k in sim._identities.items() if n != COORDINATOR}
    head = {"seq": 0, "size": len(entries), "root": root, "timestamp_ms": 1, "signer": COORDINATOR,
            "signature": _b64(keys.sign(sim._identities[COORDINATOR], signed)), "cosignatures": cosignatures}
    _write(run, [canonical(head)], HEADS_FILE)


def test_a_round_that_lost_its_outcome_or_gained_a_second_is_caught(run, sim):
    original = _lines_json(run)
    _rewrite_with_everyone(run, sim, lambda entries: entries)
    verify_run(run)  # the rewrite alone (one head, co-signed by all) passes...
    # ...but a planned round without its aggregate, or with two, does not.
    _rewrite_with_everyone(run, sim, lambda _: [e for e in original if not (e["kind"] == "aggregate" and e["round"] == 2)])
    with pytest.raises(VerificationError, match="round 2 was planned, and has neither an aggregate nor a halt"):
        verify_run(run)
    again = dict(next(e for e in original if e["kind"] == "aggregate" and e["round"] == 1))
    _rewrite_with_everyone(run, sim, lambda _: [dict(e) for e in original] + [again])
    with pytest.raises(VerificationError, match="round 1 has a second aggregate"):
        verify_run(run)


def test_a_misreported_epsilon_is_caught(run):
    summary = json.loads((run / "summary.json").read_text())
    summary["privacy"]["epsilon_per_site"]["site-3"] /= 2
    (run / "summary.json").write_text(json.dumps(summary))
    with pytest.raises(VerificationError, match="site 'site-3'.*reported"):
        verify_run(run)


def test_a_site_refuses_to_cosign_a_forked_history(tmp_path):
    coordinator, site = keys.generate_ed25519()[0], keys.generate_ed25519()[0]
    witness = HeadWitness("a", site, keys.ed25519_public_bytes(coordinator.public_key()))
    log = TranscriptWriter(tmp_path / "main")
    for i in range(5):
        log.append("evaluation", i, COORDINATOR, {"i": i}, key=coordinator)
    first = log.sign_head(COORDINATOR, coordinator, 1)
    witness.cosign(first, [])
    fork = TranscriptWriter(tmp_path / "fork")  # the same history, but entry 2 differs
    for i in range(8):
        fork.append("evaluation", i, COORDINATOR, {"i": i if i != 2 else 99}, key=coordinator)
    forked = fork.sign_head(COORDINATOR, coordinator, 2)
    with pytest.raises(VerificationError, match="consistency"):
        witness.cosign(forked, fork.consistency(5, 8))
    for i in range(5, 8):
        log.append("evaluation", i, COORDINATOR, {"i": i}, key=coordinator)
    honest = log.sign_head(COORDINATOR, coordinator, 3)
    witness.cosign(honest, log.consistency(5, 8))  # the true extension is signed
    with pytest.raises(VerificationError, match="shrank"):
        witness.cosign(first, [])


def test_a_restarted_site_still_refuses_a_fork_of_what_it_cosigned_before(tmp_path):
    from consortium.protocol.site import Site
    from tests.conftest import make_splits

    coordinator, identity = keys.generate_ed25519()[0], keys.generate_ed25519()[0]
    directory = {COORDINATOR: keys.ed25519_public_bytes(coordinator.public_key()),
                 "site-1": keys.ed25519_public_bytes(identity.public_key())}
    memory = tmp_path / "state" / "memory.json"

    def site(remembers: bool) -> Site:  # a fresh process of the same site, on its state folder or not
        return Site("site-1", make_splits(np.random.default_rng(0)), seed=0, identity=identity, directory=directory,
                    strict=True, memory=memory if remembers else None)

    log, fork = TranscriptWriter(tmp_path / "main"), TranscriptWriter(tmp_path / "fork")
    for i in range(10):
        log.append("evaluation", i, COORDINATOR, {"i": i}, key=coordinator)
        fork.append("evaluation", i, COORDINATOR, {"i": i if i != 2 else 99}, key=coordinator)  # entry 2 rewritten
    site(remembers=True).cosign_head(log.sign_head(COORDINATOR, coordinator, 1), [])  # all 10 true entries; then killed
    forked = fork.sign_head(COORDINATOR, coordinator, 2)
    with pytest.raises(VerificationError, match="consistency"):  # restarted, it checks the fork against what it signed
        site(remembers=True).cosign_head(forked, fork.consistency(10, 10))
    site(remembers=False).cosign_head(forked, [])  # what a site that forgot would sign


def test_a_crash_mid_append_leaves_the_complete_entries_intact(tmp_path):
    key = keys.generate_ed25519()[0]
    log = TranscriptWriter(tmp_path)
    for i in range(3):
        log.append("evaluation", i, COORDINATOR, {"i": i}, key=key)
    with open(tmp_path / TRANSCRIPT_FILE, "ab") as f:
        f.write(b'{"author":"coordinator","body":{"i":3')  # the crash
    with pytest.raises(VerificationError, match="partial line"):
        verify_run(tmp_path)
    reopened = TranscriptWriter(tmp_path)
    assert [e.body for e in reopened.entries] == [{"i": 0}, {"i": 1}, {"i": 2}]
    assert reopened.root() == log.root()
    reopened.append("evaluation", 3, COORDINATOR, {"i": 3}, key=key)
    assert (tmp_path / TRANSCRIPT_FILE).read_bytes().count(b"\n") == 4


def _halts_on_verification(s, pattern):
    """The run's self-check fails: it halts with that cause, recorded, and anyone's verify names it too."""
    summary = s.run().summary
    assert summary["status"] == "halted" and summary["halt"]["cause"] == "verification"
    assert re.search(pattern, summary["halt"]["detail"]) and not summary["transcript"]["verified"]
    entries = [json.loads(line) for line in _lines(s.run_dir)]
    assert entries[-1]["kind"] == "halt" and entries[-1]["body"]["cause"] == "verification"
    with pytest.raises(VerificationError, match=pattern):
        verify_run(s.run_dir)


class CraftingTransport(InProcessTransport):
    """A coordinator that sends one site a model of its own making in round 2 (Pasquini et al. 2022)."""

    def exchange(self, request):
        msg = request.message
        if isinstance(msg, m.EvaluateRequest):
            self.model = msg.params  # the model it will plan for the next round
        if isinstance(msg, m.FitRequest) and request.recipient == "site-2" and request.round == 2:
            crafted = m.Tensor.from_numpy(self.model.to_numpy() + np.float32(0.5))  # and it names what it sends
            request = request.model_copy(update={"message": msg.model_copy(update={"params": crafted, "model_sha256": crafted.sha256})})
        return super().exchange(request)


def test_a_site_refuses_a_crafted_model_the_run_halts_and_the_transcript_proves_it(tmp_path):
    cfg = SimulationConfig.model_validate({
        "rounds": 2, "data": {"dataset": "breast-cancer", "sites": 3}, "privacy": {"enabled": False},
        "baselines": {"local_only": False, "pooled": False},
    })
    s = Simulation(cfg, out=tmp_path / "run")
    s.transport = CraftingTransport(s._sites, identity=s._identities[COORDINATOR], directory=s._directory)
    summary = s.run().summary
    # The site's integrity check halts the run before anyone trains on round 2's plan.
    assert summary["status"] == "halted"
    assert summary["halt"]["cause"] == "model_hash" and summary["halt"]["site"] == "site-2"
    assert "is not the one the transcript plans for round 2" in s.coordinator.history[1].refused["site-2"]
    entries = [json.loads(line) for line in (tmp_path / "run" / "transcript.jsonl").read_text().splitlines()]
    assert [e["kind"] for e in entries if e["round"] == 2][-1] == "halt"
    assert not any(e["kind"] in ("aggregate", "final_model") and e["round"] == 2 for e in entries)
    assert not (tmp_path / "run" / "model.safetensors").exists()
    # The run checked itself: the transcript names the attack, and anyone's verify does too.
    assert "site 'site-2' was sent model" in summary["transcript"]["violation"]
    with pytest.raises(VerificationError, match="entry .*site 'site-2' was sent model"):
        verify_run(tmp_path / "run")


def test_a_fit_request_without_its_plan_is_refused(sim):
    site = sim._sites["site-1"]
    request = m.FitRequest(
        task=sim.coordinator.task, params=m.Tensor.from_numpy(sim.coordinator.params), train=sim.config.training,
        secure_aggregation=False,
    )
    reply = site.handle(m.make_envelope(COORDINATOR, "site-1", 3, request)).message
    assert isinstance(reply, m.Refusal) and "carries none" in reply.reason
    assert reply.decision is not None and reply.decision.body["accepted"] is False  # signed, for the transcript


def test_a_model_that_is_not_the_one_the_request_names_is_refused(sim):
    site = sim._sites["site-1"]
    params = m.Tensor.from_numpy(sim.coordinator.params)
    request = m.FitRequest(
        task=sim.coordinator.task, params=params, model_sha256="0" * 64, train=sim.config.training, secure_aggregation=False,
    )
    reply = site.handle(m.make_envelope(COORDINATOR, "site-1", 3, request)).message
    assert isinstance(reply, m.Refusal) and reply.rule == "model_hash" and "is not the one the request names" in reply.reason
    assert reply.decision.body["model_sha256"] == params.sha256  # the decision names the bytes it was sent


class DroppingTransport(InProcessTransport):
    """Round 2's fit requests reach site-1 only."""

    def exchange(self, request):
        if isinstance(request.message, m.FitRequest) and request.round == 2 and request.recipient != "site-1":
            return None
        return super().exchange(request)


def test_a_round_below_the_manifests_minimum_cohort_is_caught(tmp_path):
    cfg = SimulationConfig.model_validate({
        "rounds": 2, "data": {"dataset": "breast-cancer", "sites": 3}, "privacy": {"enabled": False},
        "participation": {"min_sites": 2}, "secure_aggregation": {"enabled": False},
        "baselines": {"local_only": False, "pooled": False},
    })
    s = Simulation(cfg, out=tmp_path / "run")
    s.transport = DroppingTransport(s._sites, identity=s._identities[COORDINATOR], directory=s._directory)
    s.strategy.min_sites = 1  # a coordinator that goes ahead below the agreed minimum, and logs it honestly
    _halts_on_verification(s, "round 2 aggregated 1 site.*minimum is 2")


def test_masked_inputs_are_committed_and_the_sum_must_be_over_the_committed_survivors(sim, tmp_path):
    entries = [json.loads(line) for line in _lines(sim.run_dir)]
    committed = [e for e in entries if e["kind"] == "masked_inputs"]
    assert [(e["round"], e["body"]["phase"]) for e in committed] == [(0, "setup"), (1, "fit"), (1, "evaluate"), (2, "fit"), (2, "evaluate")]
    assert all(sorted(e["body"]["commitments"]) == e["body"]["survivors"] for e in committed)

    cfg = SimulationConfig.model_validate({"rounds": 2, "privacy": {"enabled": False}, "baselines": {"local_only": False, "pooled": False}})
    s = Simulation(cfg, out=tmp_path / "run")
    drain = s.coordinator.drain_log

    def hide_a_survivor(**taken):  # a coordinator that sums one more site than it committed masked inputs for
        out = []
        for r in drain(**taken):
            if r.kind == "masked_inputs" and r.body["phase"] == "fit" and r.round == 2:
                r = dataclasses.replace(r, body={**r.body, "survivors": r.body["survivors"][:-1]})
            out.append(r)
        return out

    s.coordinator.drain_log = hide_a_survivor
    _halts_on_verification(s, "round 2 summed .* not the survivors")


def test_each_rounds_sum_is_recomputed_from_the_archived_masked_inputs(run):
    from safetensors.numpy import load, save

    verify_run(run)  # the archive reproduces every recorded sum
    assert not list((run / "evidence").glob("*.spool"))  # each session's spool was written out, none left behind
    stem = run / "evidence" / "round-00002"
    masked = load((stem.with_suffix(".safetensors")).read_bytes())
    site = sorted(masked)[0]
    altered = dict(masked)
    altered[site] = masked[site].copy()
    altered[site][0] += 1
    stem.with_suffix(".safetensors").write_bytes(save(altered))
    with pytest.raises(VerificationError, match=f"{site}'s masked input is not the one committed"):
        verify_run(run)
    stem.with_suffix(".safetensors").write_bytes(save(masked))
    meta = json.loads(stem.with_suffix(".json").read_text())
    replies = meta["evidence"]["replies"]
    holder = sorted(replies)[0]
    owner = sorted(replies[holder]["seed_shares"])[0]
    share = bytearray(base64.b64decode(replies[holder]["seed_shares"][owner]))
    share[-1] ^= 1  # one revealed share altered: the masks no longer cancel
    replies[holder]["seed_shares"][owner] = base64.b64encode(bytes(share)).decode()
    stem.with_suffix(".json").write_text(json.dumps(meta))
    with pytest.raises(VerificationError, match="round-00002: unmasking fails|round 2's sum recomputed"):
        verify_run(run)
    stem.with_suffix(".json").unlink()
    with pytest.raises(VerificationError, match="archive of round 2's masked inputs is missing"):
        verify_run(run)


def test_a_recorded_sum_that_the_archive_does_not_reproduce_is_caught(tmp_path):
    cfg = SimulationConfig.model_validate({"rounds": 2, "privacy": {"enabled": False}, "baselines": {"local_only": False, "pooled": False}})
    s = Simulation(cfg, out=tmp_path / "run")
    drain = s.coordinator.drain_log

    def misreport_the_sum(**taken):  # a coordinator that records another aggregate than the one it unmasked
        return [
            dataclasses.replace(r, body={**r.body, "sum_sha256": "0" * 64})
            if r.kind == "aggregate" and r.round == 2 else r
            for r in drain(**taken)
        ]

    s.coordinator.drain_log = misreport_the_sum
    _halts_on_verification(s, "round 2's sum recomputed from the archive is not the one recorded")


def _lines_json(run):
    return [json.loads(line) for line in _lines(run)]


class FitRequestLog(InProcessTransport):
    """Records, per round and site, whether the fit request carried the model."""

    def __init__(self, *args, forget=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.carried = {}
        self.forget = forget  # (round, site): that site loses its model just before that round's fit request

    def exchange(self, request):
        msg = request.message
        if isinstance(msg, m.FitRequest):
            self.carried[(request.round, request.recipient)] = msg.params is not None
            if self.forget == (request.round, request.recipient):
                self._sites[request.recipient]._held = None  # as after a restart
        return super().exchange(request)


def test_the_model_goes_to_each_site_once_per_version(tmp_path):
    cfg = SimulationConfig.model_validate({
        "rounds": 3, "data": {"dataset": "breast-cancer", "sites": 3}, "privacy": {"enabled": False},
        "participation": {"min_sites": 2}, "baselines": {"local_only": False, "pooled": False},
    })
    s = Simulation(cfg, out=tmp_path / "run")
    s.transport = FitRequestLog(s._sites, identity=s._identities[COORDINATOR], directory=s._directory, forget=(3, "site-2"))
    summary = s.run().summary
    assert summary["status"] == "completed" and summary["transcript"]["verified"]
    # Round 1 carries the model; later rounds name by hash the model each site evaluated.
    assert [s.transport.carried[(r, "site-1")] for r in (1, 2, 3)] == [True, False, False]
    # A site that lost it says so (not an integrity failure: the run goes on without it this round)...
    history = s.coordinator.history
    assert "does not hold model" in history[2].refused["site-2"] and history[2].status == "ok"
    assert history[2].evaluated_sites == 3  # ...and evaluates the new model, which every evaluate request carries
    refusal = next(e for e in _lines_json(s.run_dir) if e["kind"] == "site_decision" and not e["body"]["accepted"])
    assert refusal["body"]["rule"] == "protocol" and refusal["round"] == 3


class AwayAtOneCosign(InProcessTransport):
    """One site does not answer the co-signature request ``away(request)`` picks (it was away), and answers the rest."""

    def __init__(self, *args, away=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.away = away

    def exchange(self, request):
        if isinstance(request.message, m.CosignRequest) and self.away is not None and self.away(request):
            self.away = None
            return None
        return super().exchange(request)


def test_a_site_away_when_the_plan_is_co_signed_sits_the_round_out_and_pays_nothing(tmp_path):
    # Round 2's plan is co-signed without site-2, which then holds an older head than the one proving the plan:
    # it could not check the plan, so it is not asked to train. Asked, it would refuse the proof as a breach and
    # halt the run. It pays nothing for the round, is not counted as one that may have paid, and is back next round.
    cfg = SimulationConfig.model_validate({
        "rounds": 3, "seed": 2, "data": {"dataset": "breast-cancer", "sites": 3}, "privacy": {"test_seed": 7},
        "participation": {"min_sites": 2}, "baselines": {"local_only": False, "pooled": False},
    })
    s = Simulation(cfg, out=tmp_path / "run")

    def plan_of_round_2(request):  # the head over round 2's plan (the one before it is over round 1's records)
        return (request.recipient, request.round, s.recorder.writer.entries[-1].kind) == ("site-2", 2, "round_plan")

    s.transport = AwayAtOneCosign(s._sites, identity=s._identities[COORDINATOR], directory=s._directory, away=plan_of_round_2)
    summary = s.run().summary
    assert summary["status"] == "completed", summary.get("halt")
    assert s.transport.away is None  # it missed that head
    history = s.coordinator.history
    assert history[1].dropped == ["site-2"] and history[1].refused == {} and history[1].status == "ok"
    assert "site-2" in history[2].answered
    entries = _lines_json(s.run_dir)
    aggregate = next(e for e in entries if e["kind"] == "aggregate" and e["round"] == 2)
    assert aggregate["body"]["dropped"] == ["site-2"] and "unaccounted" not in aggregate["body"]
    assert [e["round"] for e in entries if e["kind"] == "site_decision" and e["author"] == "site-2"] == [1, 3]
    assert [row["round"] for row in s._ledgers["site-2"].history()] == [1, 3]
    verify_run(s.run_dir)


@pytest.mark.parametrize("tamper,why", [
    (lambda b: b["provenance"]["datasets"]["site-1"].update(rows=b["provenance"]["datasets"]["site-1"]["rows"] + 1),
     "misstates this site's data"),
    (lambda b: b["members"]["site-2"].update(public_key="ab" * 32), "key for 'site-2' is not the one this site knows"),
    (lambda b: b["members"]["site-1"].update(role="auditor"), "does not list this site, as a site"),
    (lambda b: b["members"].update(mallory={"role": "site", "public_key": "cd" * 32}), "key for 'mallory'"),
])
def test_a_site_endorses_only_a_manifest_that_states_it_truly(sim, tamper, why):
    """Entry 0 is endorsed by every site over the protocol; a site refuses a manifest that misstates it."""
    body = {k: v for k, v in json.loads(_lines(sim.run_dir)[0])["body"].items() if k != "endorsements"}
    site = sim._sites["site-1"]
    honest = site.handle(m.make_envelope(COORDINATOR, "site-1", 9, m.EndorseRequest(manifest=body))).message
    assert isinstance(honest, m.Endorsement)
    keys.verify(sim._directory["site-1"], honest.signature, manifest_bytes(body))
    forged = json.loads(json.dumps(body))
    tamper(forged)
    reply = site.handle(m.make_envelope(COORDINATOR, "site-1", 9, m.EndorseRequest(manifest=forged))).message
    assert isinstance(reply, m.Refusal) and reply.rule == "manifest" and why in reply.reason


def test_canonical_fast_path_writes_rfc8785_bytes():
    # canonical() writes plain values with the standard library's encoder: byte for byte what rfc8785 writes,
    # for any text (controls, quotes, astral characters), safe integers, booleans and nulls, at any depth.
    import rfc8785
    from hypothesis import given
    from hypothesis import strategies as st

    from consortium.transcript.log import canonical

    leaves = st.text() | st.integers(-(2**53) + 1, 2**53 - 1) | st.booleans() | st.none()
    values = st.recursive(leaves, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.text(alphabet=st.characters(max_codepoint=127), max_size=8), inner, max_size=4), max_leaves=20)

    @given(values)
    def same(value):
        assert canonical(value) == rfc8785.dumps(value)

    same()
    for other in (1.5, 2**53, {"é": 1}, "\ud800", (1, 2)):  # a float, a wide integer, a non-ASCII key, a lone surrogate
        try:
            expected = rfc8785.dumps(other)
        except Exception as exc:  # noqa: BLE001 - whatever rfc8785 raises, canonical raises too
            with pytest.raises(type(exc)):
                canonical(other)
        else:
            assert canonical(other) == expected
