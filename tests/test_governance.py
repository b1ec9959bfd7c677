"""Governance at run time: site policies, the guard's rules, least privilege, halts and quorum resumes.

Every rule has a case where it allows and one where it refuses; refusals are
signed site decisions, so they must show in the transcript and in verify's
summary. Halts must carry their cause, and nothing may happen after a halt
until a quorum of approvers has signed the resume.
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from consortium.config import SimulationConfig
from consortium.errors import ConfigError, VerificationError
from consortium.governance.agreement import (
    load_member_key,
    parse_agreement,
    template,
)
from consortium.run.control import approve_resume, open_run
from consortium.governance.guard import Refused, SiteGuard
from consortium.governance.policy import parse_policy
from consortium.governance.roles import PermissionDenied, Roles
from consortium.privacy.events import RecordLevelEvent, SiteLevelEvent
from consortium.privacy.ledger import BudgetLedger
from consortium.protocol import messages as m
from consortium.protocol.coordinator import COORDINATOR
from consortium.transcript.records import LogRecord
from consortium.protocol.site import Site
from consortium.run.simulation import Simulation, run_simulation
from consortium.audit.verify import verify_run
from tests.conftest import signed_agreement
from tests import forkserver

SITES = ["site-1", "site-2", "site-3", "site-4"]
LAYOUT = "ab" * 32
EVENT = RecordLevelEvent(noise_multiplier=1.0, clip=1.0, sampling_rate=0.1, steps=10)


def _agreement_text(**replace: str) -> str:
    text = template("hospitals", SITES)
    text = text.replace("  - {name: site-4, role: site}", "  - {name: site-4, role: site}\n  - {name: watcher, role: observer, approver: false}")
    for old, new in replace.items():
        assert old in text, old
        text = text.replace(old, new)
    return text


AGREEMENT = parse_agreement(_agreement_text())  # min_cohort 3, max_epsilon 8, record level, secure aggregation


# -- the site policy ------------------------------------------------------------------------


def _policy(**fields: object) -> str:
    body = {"site": "site-1", **fields}
    return "\n".join(f"{k}: {json.dumps(v)}" for k, v in body.items()) + "\n"


def test_a_policy_may_tighten_every_term():
    p = parse_policy(_policy(max_epsilon=2.0, min_cohort=4, refused_layouts=[LAYOUT], quiet_hours=["22:00-06:00"]), AGREEMENT)
    assert (p.max_epsilon, p.min_cohort, p.refused_layouts) == (2.0, 4, [LAYOUT])


@pytest.mark.parametrize("text,line,message", [
    (_policy(max_epsilon=9.0), 2, "looser than the agreement's 8"),
    (_policy(min_cohort=2), 2, "looser than the agreement's minimum cohort of 3"),
    (_policy(min_cohort=5), 2, "exceeds the agreement's 4 sites"),
    (_policy(max_epsilon=-1), 2, "greater than 0"),
    ("site: site-9\n", 1, "not a site of the hospitals agreement"),
    (_policy(quiet_hours=["25:00-06:00"]), 2, "quiet_hours.0"),
    (_policy(timezone="Mars/Olympus"), 2, "not a known time zone"),
    (_policy(surprise=True), 2, "surprise"),
    ("site: site-1\nmax_epsilon: 2: 3\n", 2, "malformed YAML"),
])
def test_a_malformed_or_looser_policy_names_file_line_and_fix(text, line, message):
    with pytest.raises(ConfigError) as exc:
        parse_policy(text, AGREEMENT, source="p.yaml")
    assert str(exc.value).startswith(f"p.yaml line {line}:") and message in str(exc.value)


def test_policy_commands_write_check_and_refuse_with_exit_2(tmp_path):
    ag = tmp_path / "ag.yaml"
    ag.write_text(_agreement_text())

    def cli(*args):
        return forkserver.run([sys.executable, "-m", "consortium.cli", *args], capture_output=True, text=True, timeout=120)

    out = tmp_path / "site-1.yaml"
    assert cli("policy", "init", str(out), "--site", "site-1", "--agreement", str(ag)).returncode == 0
    assert cli("policy", "check", str(out), "--agreement", str(ag)).returncode == 0
    out.write_text(out.read_text().replace("max_epsilon: 8.0", "max_epsilon: 12.0"))
    bad = cli("policy", "check", str(out), "--agreement", str(ag))
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1 and "site-1.yaml line 9: max_epsilon: 12 is looser" in bad.stderr


# -- the guard: each rule allows and refuses --------------------------------------------------


def _guard(tmp_path=None, *, policy=None, agreement=AGREEMENT, now=dt.datetime(2026, 11, 29, 12, 0, tzinfo=dt.UTC), cap=8.0):
    folder = Path(tmp_path or tempfile.mkdtemp())
    ledger = BudgetLedger(folder / "b.sqlite", site="site-1", epsilon_cap=cap, delta=1e-5)
    return SiteGuard("site-1", agreement=agreement, policy=policy, ledger=ledger, clock=lambda: now)


def _plan(guard, *, cohort=("site-1", "site-2", "site-3"), layout=LAYOUT, secure=True, privacy=EVENT, rnd=1):
    guard.check_plan(rnd, cohort=list(cohort) if cohort is not None else None, layout_hash=layout,
                     secure_aggregation=secure, privacy=privacy)


def _refused(rule, call):
    with pytest.raises(Refused) as exc:
        call()
    assert exc.value.rule == rule
    return str(exc.value)


def test_min_cohort_from_the_agreement_and_from_the_policy():
    _plan(_guard())
    _refused("min_cohort", lambda: _plan(_guard(), cohort=("site-1", "site-2")))
    _refused("min_cohort", lambda: _plan(_guard(), cohort=None))
    strict = parse_policy(_policy(min_cohort=4), AGREEMENT)
    _plan(_guard(policy=strict), cohort=SITES)
    _refused("min_cohort", lambda: _plan(_guard(policy=strict)))
    # Under secure aggregation the guard unmasks no sum over fewer sites, whatever the plan said.
    _guard(policy=strict).check_survivors(4)
    assert "unmasks none of fewer than 4" in _refused("min_cohort", lambda: _guard(policy=strict).check_survivors(3))


def test_secure_aggregation_and_privacy_level_required_by_the_agreement():
    _refused("secure_aggregation", lambda: _plan(_guard(), secure=False))
    _plan(_guard(agreement=parse_agreement(_agreement_text(**{"secure_aggregation_required: true": "secure_aggregation_required: false"}))), secure=False)
    _refused("privacy_level", lambda: _plan(_guard(), privacy=None))
    site_level = SiteLevelEvent(mechanism="dp-fedavg-gaussian", noise_multiplier=1.0, clip=1.0, cohort=3)
    assert "requires record-level" in _refused("privacy_level", lambda: _plan(_guard(), privacy=site_level))


def test_allowed_and_refused_layouts():
    allowing = parse_agreement(_agreement_text(**{"allowed_layouts: []": f"allowed_layouts: ['{LAYOUT}']"}))
    _plan(_guard(agreement=allowing))
    _refused("allowed_layouts", lambda: _plan(_guard(agreement=allowing), layout="cd" * 32))
    refusing = parse_policy(_policy(refused_layouts=[LAYOUT]), AGREEMENT)
    _plan(_guard(policy=refusing), layout="cd" * 32)
    _refused("refused_layouts", lambda: _plan(_guard(policy=refusing)))


def test_quiet_hours_in_the_sites_own_time_zone():
    night = parse_policy(_policy(quiet_hours=["22:00-06:00"], timezone="Europe/Zurich"), AGREEMENT)
    noon = dt.datetime(2026, 11, 29, 12, 0, tzinfo=dt.UTC)
    _plan(_guard(policy=night, now=noon))
    late = dt.datetime(2026, 11, 29, 21, 30, tzinfo=dt.UTC)  # 22:30 in Zurich (UTC+1 in November)
    assert "22:00-06:00 (Europe/Zurich)" in _refused("quiet_hours", lambda: _plan(_guard(policy=night, now=late)))
    _plan(_guard(policy=night, now=dt.datetime(2026, 11, 29, 5, 0, tzinfo=dt.UTC)))  # 06:00 local: open again


def test_a_site_keeps_the_budget_it_agreed_to(tmp_path):
    with pytest.raises(ConfigError, match="needs its budget ledger"):
        SiteGuard("site-1", agreement=AGREEMENT)
    loose = BudgetLedger(tmp_path / "b.sqlite", site="site-1", epsilon_cap=9.0, delta=1e-5)
    with pytest.raises(ConfigError, match="allows epsilon 9 at delta 1e-05; its agreement and policy allow at most 8"):
        SiteGuard("site-1", agreement=AGREEMENT, ledger=loose)
    strict = parse_policy(_policy(max_epsilon=2.0), AGREEMENT)
    ledger = BudgetLedger(tmp_path / "c.sqlite", site="site-1", epsilon_cap=8.0, delta=1e-5)
    with pytest.raises(ConfigError, match="at most 2 at delta"):
        SiteGuard("site-1", agreement=AGREEMENT, policy=strict, ledger=ledger)


def test_the_budget_is_paid_last_and_only_for_plans_accepted(tmp_path):
    guard = _guard(tmp_path, cap=1.0)
    _refused("min_cohort", lambda: _plan(guard, cohort=("site-1",)))
    assert guard.ledger.events() == []  # a plan refused for another rule costs nothing
    _plan(guard, privacy=EVENT.model_copy(update={"noise_multiplier": 5.0}))
    assert len(guard.ledger.events()) == 1
    _refused("budget", lambda: _plan(guard, rnd=2, privacy=EVENT.model_copy(update={"noise_multiplier": 0.5})))


# -- least privilege ----------------------------------------------------------------------------


def test_each_role_may_do_only_its_own_operations():
    roles = Roles.of_agreement(AGREEMENT)
    roles.authorize(COORDINATOR, "plan_round")
    roles.authorize("site-2", "halt")
    with pytest.raises(PermissionDenied, match="'site-2' is a site: only a coordinator may plan round"):
        roles.authorize("site-2", "plan_round")
    with pytest.raises(PermissionDenied, match="'watcher' is a observer"):
        roles.authorize("watcher", "halt")
    with pytest.raises(PermissionDenied, match="not a member"):
        roles.authorize("mallory", "verify")
    assert roles.may_see("watcher", "aggregate_metrics") and not roles.may_see("watcher", "global_model")
    assert not roles.may_see("watcher", "privacy_events") and roles.may_see("site-1", "global_model")


def test_a_site_answers_only_the_coordinator(sim_splits, tmp_path):
    ledger = BudgetLedger(tmp_path / "b.sqlite", site="site-1", epsilon_cap=8.0, delta=1e-5)
    site = Site("site-1", sim_splits, seed=0, agreement=AGREEMENT, ledger=ledger)
    reply = site.handle(m.make_envelope("site-2", "site-1", 1, m.SetupRequest(secure_aggregation=False))).message
    assert isinstance(reply, m.Refusal) and reply.rule == "role" and "only a coordinator may plan round" in reply.reason
    ok = site.handle(m.make_envelope(COORDINATOR, "site-1", 1, m.SetupRequest(secure_aggregation=False))).message
    assert isinstance(ok, m.SetupReply)


@pytest.fixture
def sim_splits():
    from consortium.data import load_builtin, split_table
    import numpy as np

    return split_table(load_builtin("breast-cancer"), np.random.default_rng(0), validation=0.1, test=0.2)


# -- a consortium under an agreement, with policies ----------------------------------------------


def _consortium(tmp_path: Path, **replace: str) -> Path:
    """Keys for every member, and an agreement they have all signed."""
    return signed_agreement(tmp_path, _agreement_text(**replace), [COORDINATOR, *SITES, "watcher"])


def _config(tmp_path: Path, agreement: Path, **over: object) -> SimulationConfig:
    raw = {
        "rounds": 3, "data": {"dataset": "breast-cancer", "sites": 4}, "participation": {"min_sites": 3},
        "baselines": {"local_only": False, "pooled": False},
        "agreement": {"file": str(agreement), "keys": str(tmp_path / "keys"), "policies": str(tmp_path / "policies")},
    }
    raw.update(over)
    return SimulationConfig.model_validate(raw)


def _entries(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "transcript.jsonl").read_text().splitlines()]


def _run_with_policy(tmp_path: Path, site: str, **policy: object):
    agreement = _consortium(tmp_path)
    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / f"{site}.yaml").write_text(_policy(site=site, **policy))
    return run_simulation(_config(tmp_path, agreement), out=tmp_path / "run")


def _layout_of_the_configured_model(tmp_path: Path) -> str:
    (tmp_path / "probe" / "policies").mkdir(parents=True)
    probe = Simulation(_config(tmp_path / "probe", _consortium(tmp_path / "probe")), out=tmp_path / "probe" / "run")
    return probe.plan.layout_hash


def test_a_policy_refusal_is_signed_recorded_and_reported_by_verify(tmp_path):
    layout = _layout_of_the_configured_model(tmp_path)
    result = _run_with_policy(tmp_path, "site-4", refused_layouts=[layout])
    # site-4 refused every round by its policy; the other three trained (the allowing case).
    assert [sorted(r.refused) for r in result.history] == [["site-4"]] * 3
    assert all(r.status == "ok" and r.answered == ["site-1", "site-2", "site-3"] for r in result.history)
    decisions = [e for e in _entries(tmp_path / "run") if e["kind"] == "site_decision"]
    refusals = [d for d in decisions if not d["body"]["accepted"]]
    assert {d["author"] for d in refusals} == {"site-4"} and {d["body"]["rule"] for d in refusals} == {"refused_layouts"}
    assert len([d for d in decisions if d["body"]["accepted"]]) == 3 * 3
    report = verify_run(tmp_path / "run")
    assert [(r["round"], r["site"], r["rule"]) for r in report.refusals] == [(i, "site-4", "refused_layouts") for i in (1, 2, 3)]
    cli = forkserver.run([sys.executable, "-m", "consortium.cli", "verify", str(tmp_path / "run"), "--json"],
                         capture_output=True, text=True, timeout=120)
    assert cli.returncode == 0 and json.loads(cli.stdout)["refusals"][0]["rule"] == "refused_layouts"


def test_a_sites_own_epsilon_cap_is_the_one_its_ledger_enforces(tmp_path):
    result = _run_with_policy(tmp_path, "site-1", max_epsilon=3.0)  # the run plans for epsilon 8 over 3 rounds
    privacy = result.summary["privacy"]
    assert privacy["epsilon_cap_per_site"]["site-1"] == 3.0 and privacy["epsilon_cap_per_site"]["site-2"] == 8.0
    assert privacy["epsilon_per_site"]["site-1"] == 0.0  # its first round alone would cost more than 3
    report = verify_run(tmp_path / "run")
    assert {(r["site"], r["rule"]) for r in report.refusals} == {("site-1", "budget")}
    assert all(r.answered == ["site-2", "site-3", "site-4"] for r in result.history)


@pytest.mark.parametrize("policy,rule", [
    ({"quiet_hours": ["00:00-23:59"]}, "quiet_hours"),  # and the clock says 12:00
    ({"min_cohort": 4}, "min_cohort"),  # and 3 of the 4 sites are asked each round
])
def test_each_policy_rule_refuses_on_the_record(tmp_path, policy, rule):
    agreement = _consortium(tmp_path)
    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "site-4.yaml").write_text(_policy(site="site-4", **policy))
    sim = Simulation(_config(tmp_path, agreement, participation={"min_sites": 3, "fraction": 0.75}), out=tmp_path / "run")
    sim._sites["site-4"].guard._clock = lambda: dt.datetime(2026, 11, 29, 12, 0, tzinfo=dt.UTC)
    sim.run()
    asked = [r.selected for r in sim.coordinator.history]
    report = verify_run(tmp_path / "run")
    assert {(r["site"], r["rule"]) for r in report.refusals} == {("site-4", rule)}
    assert [r["round"] for r in report.refusals] == [i + 1 for i, cohort in enumerate(asked) if "site-4" in cohort]
    assert report.refusals  # site-4 was asked at least once


def test_a_run_refuses_a_model_the_agreement_does_not_allow(tmp_path):
    agreement = _consortium(tmp_path, **{"allowed_layouts: []": f"allowed_layouts: ['{LAYOUT}']"})
    with pytest.raises(ConfigError, match="not among the agreement's allowed_layouts"):
        Simulation(_config(tmp_path, agreement), out=tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_a_looser_site_policy_stops_the_run_before_it_starts(tmp_path):
    agreement = _consortium(tmp_path)
    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "site-2.yaml").write_text(_policy(site="site-2", min_cohort=2))
    with pytest.raises(ConfigError, match=r"site-2.yaml line 2: min_cohort: 2 is looser"):
        Simulation(_config(tmp_path, agreement), out=tmp_path / "run")


def test_sites_help_unmask_no_sum_below_the_minimum_cohort(tmp_path):
    agreement = _consortium(tmp_path)
    (tmp_path / "policies").mkdir()
    layout = _layout_of_the_configured_model(tmp_path)
    (tmp_path / "policies" / "site-4.yaml").write_text(_policy(site="site-4", refused_layouts=[layout]))
    (tmp_path / "policies" / "site-1.yaml").write_text(_policy(site="site-1", max_epsilon=3.0))
    result = run_simulation(_config(tmp_path, agreement, rounds=1), out=tmp_path / "run")
    record = result.history[0]
    assert record.status == "skipped" and "aborted at consistency_check" in record.reason
    assert "unmasks none of fewer than 3" in record.refused["site-2"]


# -- incidents: automatic halts, manual halts, quorum resumes ----------------------------------------


class ScalingSite(Site):
    """A site that sends its round-2 update (and later ones) scaled by 100."""

    def _contribute(self, rnd, phase, vector, secure):
        if phase == "fit" and rnd >= 2:
            vector = vector.copy()
            vector[:-2] *= 100
        return super()._contribute(rnd, phase, vector, secure)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return forkserver.run([sys.executable, "-m", "consortium.cli", *args], capture_output=True, text=True, timeout=300)


def test_an_anomalous_update_halts_the_run_and_only_a_quorum_resumes_it(tmp_path):
    agreement = _consortium(tmp_path)
    (tmp_path / "policies").mkdir()
    run = tmp_path / "run"
    sim = Simulation(_config(tmp_path, agreement, rounds=4), out=run)
    sim._sites["site-3"].__class__ = ScalingSite  # the transport holds this very object
    summary = sim.run().summary
    assert summary["status"] == "halted" and summary["halt"]["cause"] == "update_norm" and summary["halt"]["round"] == 2
    assert summary["transcript"]["verified"]  # the halt itself is on a sound record
    entries = _entries(run)
    halt = entries[-1]
    assert halt["kind"] == "halt" and halt["body"]["cause"] == "update_norm" and "times the median" in halt["body"]["detail"]
    aggregate = next(e for e in entries if e["kind"] == "aggregate" and e["round"] == 2)
    assert aggregate["body"]["status"] == "halted"
    assert aggregate["body"]["model_sha256"] == aggregate["body"]["parent_model_sha256"]  # the update was never applied
    report = verify_run(run)
    assert report.status == "halted" and report.halts[0]["cause"] == "update_norm" and report.final_model_sha256 is None

    # Resuming needs the agreement's quorum of 3 approvers' signatures.
    few = _cli("resume", str(run), "--keys", str(tmp_path / "keys"), "--approver", COORDINATOR, "--approver", "site-1")
    assert few.returncode == 2 and "needs the signatures of 3 approvers" in few.stderr and "2 given (coordinator, site-1)" in few.stderr
    outsider = _cli("resume", str(run), "--keys", str(tmp_path / "keys"), "--approver", "site-1", "--approver", "site-2",
                    "--approver", "watcher")
    assert outsider.returncode == 2 and "'watcher' is not an approver" in outsider.stderr
    assert _entries(run)[-1]["kind"] == "halt"  # refused: nothing was written

    # With the quorum, the run resumes from the model it halted at and trains its remaining rounds.
    ok = _cli("resume", str(run), "--keys", str(tmp_path / "keys"), "--json",
              "--approver", "site-1", "--approver", "site-2", "--approver", "site-4")
    assert ok.returncode == 0, ok.stderr
    resumed = json.loads(ok.stdout)
    assert resumed["status"] == "completed" and resumed["transcript"]["verified"]
    report = verify_run(run)
    assert report.status == "completed" and report.resumes == [{"entry": halt["index"] + 1, "halt_entry": halt["index"],
                                                                "approvers": ["site-1", "site-2", "site-4"]}]
    kinds = [(e["kind"], e["round"]) for e in _entries(run)]
    assert kinds.index(("resume", 2)) < kinds.index(("round_plan", 3)) < kinds.index(("final_model", 4))
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["status"] for line in lines] == ["ok", "halted", "ok", "ok"]


def test_a_member_halts_by_hand_an_observer_cannot(tmp_path):
    agreement = _consortium(tmp_path)
    (tmp_path / "policies").mkdir()
    run = tmp_path / "run"
    run_simulation(_config(tmp_path, agreement, rounds=1), out=run)
    keys_dir = str(tmp_path / "keys")
    denied = _cli("halt", str(run), "--member", "watcher", "--keys", keys_dir, "--reason", "curious")
    assert denied.returncode == 2 and "'watcher' is a observer" in denied.stderr
    done = _cli("halt", str(run), "--member", "site-2", "--keys", keys_dir, "--reason", "labels found corrupted")
    assert done.returncode == 0, done.stderr
    report = verify_run(run)
    assert report.status == "halted"
    assert report.halts == [{"entry": report.entries - 1, "round": 1, "cause": "manual", "author": "site-2", "site": None,
                             "detail": "labels found corrupted"}]
    again = _cli("halt", str(run), "--member", "site-1", "--keys", keys_dir, "--reason", "again")
    assert again.returncode == 2 and "already halted" in again.stderr
    # A halted run accepts nothing but a resume that a quorum signed; anything else is caught.
    def tampered(name, records):
        copy = tmp_path / name
        shutil.copytree(run, copy)
        ctl = open_run(copy, tmp_path / "keys")
        ctl.recorder.record(records(ctl))
        ctl.recorder.close_round()
        return copy

    def short_resume(ctl):
        halt = ctl.entries[-1]
        approvals = {n: approve_resume(halt, load_member_key(ctl.agreement, tmp_path / "keys", n)) for n in ("site-1", "site-2")}
        return [LogRecord("resume", 1, COORDINATOR, {"halt_entry": halt.index, "approvals": approvals})]

    def forged_resume(ctl):
        halt = ctl.entries[-1]
        wrong = load_member_key(ctl.agreement, tmp_path / "keys", "site-4")
        approvals = {n: approve_resume(halt, wrong) for n in ("site-1", "site-2", "site-3")}
        return [LogRecord("resume", 1, COORDINATOR, {"halt_entry": halt.index, "approvals": approvals})]

    slipped = tampered("slipped", lambda ctl: [LogRecord("evaluation", 1, COORDINATOR, {"note": "after the halt"})])
    with pytest.raises(VerificationError, match="after the halt in entry .* with no resume between"):
        verify_run(slipped)
    with pytest.raises(VerificationError, match="2 approval.* the agreement's quorum is 3"):
        verify_run(tampered("short", short_resume))
    with pytest.raises(VerificationError, match="approval by site-1"):
        verify_run(tampered("forged", forged_resume))


def test_a_head_that_rewrites_history_is_not_cosigned_and_halts_the_run(tmp_path, monkeypatch):
    from consortium.transcript.log import TranscriptWriter

    honest = TranscriptWriter.consistency
    heads: list[int] = []  # the sizes of the heads proven so far

    def forged(self, first, second):
        proof = honest(self, first, second)
        if proof and second not in heads:
            heads.append(second)
        return [bytes(32)] * len(proof) if proof and heads.index(second) == 2 else proof  # the third head's proofs do not hold

    monkeypatch.setattr(TranscriptWriter, "consistency", forged)
    cfg = SimulationConfig.model_validate({"rounds": 3, "privacy": {"enabled": False}, "baselines": {"local_only": False, "pooled": False}})
    summary = run_simulation(cfg, out=tmp_path / "run").summary
    assert summary["status"] == "halted" and summary["halt"]["cause"] == "consistency_proof"
    assert "will not co-sign tree head" in summary["halt"]["detail"]
    assert _entries(tmp_path / "run")[-1]["kind"] == "halt"
    with pytest.raises(VerificationError, match="did not co-sign"):
        verify_run(tmp_path / "run")  # the dispute stays on record


def test_observers_see_aggregates_only(tmp_path):
    agreement = _consortium(tmp_path)
    (tmp_path / "policies").mkdir()
    run_simulation(_config(tmp_path, agreement, rounds=1, baselines={"local_only": True, "pooled": False}), out=tmp_path / "run")
    watcher = json.loads(_cli("show", str(tmp_path / "run"), "--member", "watcher").stdout)
    assert "accuracy" in watcher["federated"] and watcher["status"] == "completed"
    assert {"privacy", "model", "transcript", "local_only"} <= set(watcher["hidden_from_you"])
    assert not {"privacy", "model", "transcript", "local_only"} & set(watcher)
    site = json.loads(_cli("show", str(tmp_path / "run"), "--member", "site-1").stdout)
    assert "privacy" in site and "model" in site and "local_only" not in site  # per-site baselines stay with the harness
    coordinator = json.loads(_cli("show", str(tmp_path / "run"), "--member", COORDINATOR).stdout)
    assert "local_only" in coordinator and coordinator["hidden_from_you"] == []
    stranger = _cli("show", str(tmp_path / "run"), "--member", "mallory")
    assert stranger.returncode == 2 and "'mallory' is not a member" in stranger.stderr
