"""The model lifecycle (issue 9): registration, canary, staged rollout, automatic and manual rollback, drift.

One consortium of four breast-cancer sites trains once under an agreement with lifecycle terms (canary
sites site-1 and site-2, accuracy within 0.02 and ECE within 0.05, rollout to 50% then 100%); each test
works on its own copy of that run folder, through the real protocol (sealed messages, secure sums, signed
receipts, co-signed heads), and checks the outcome with ``verify`` the way any member would.
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from consortium.config import SimulationConfig
from consortium.errors import ConfigError, VerificationError
from consortium.governance.agreement import parse_agreement, template
from consortium.run.control import open_run
from consortium.run.lifecycle import Lifecycle, LifecycleError, simulated
from consortium.protocol.coordinator import COORDINATOR
from consortium.transcript.records import LogRecord
from consortium.run.simulation import run_simulation, site_splits
from consortium.data import Table
from consortium.data.schema import write_csv
from consortium.audit.verify import read_entries, verify_run
from tests.conftest import signed_agreement
from tests import forkserver

pytestmark = pytest.mark.usefixtures("one_torch_thread")
SITES = ["site-1", "site-2", "site-3", "site-4"]


def _agreement_text(**replace: str) -> str:
    text = template("hospitals", SITES).replace("min_cohort: 3", "min_cohort: 2")
    text = text.replace("canary_sites: [site-1, site-2, site-3]", "canary_sites: [site-1, site-2]")
    text = text.replace("  - {name: site-4, role: site}", "  - {name: site-4, role: site}\n  - {name: watcher, role: observer, approver: false}")
    for old, new in replace.items():
        assert old in text, old
        text = text.replace(old, new)
    return text


def _consortium(folder: Path, policies: dict[str, str] | None = None, **replace: str) -> Path:
    """A finished 4-site run under a signed agreement with lifecycle terms; returns the run folder."""
    agreement = signed_agreement(folder, _agreement_text(**replace), [COORDINATOR, *SITES, "watcher"])
    (folder / "policies").mkdir()
    for site, text in (policies or {}).items():
        (folder / "policies" / f"{site}.yaml").write_text(text)
    config = SimulationConfig.model_validate({
        "rounds": 5, "data": {"dataset": "breast-cancer", "sites": 4}, "participation": {"min_sites": 2},
        "baselines": {"local_only": False, "pooled": False},
        "agreement": {"file": str(agreement), "keys": str(folder / "keys"), "policies": str(folder / "policies")},
    })
    result = run_simulation(config, out=folder / "run")
    assert result.summary["status"] == "completed"
    return folder / "run"


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, one_torch_thread: None) -> Path:
    return _consortium(tmp_path_factory.mktemp("consortium")).parent


@pytest.fixture
def run(trained: Path, tmp_path: Path) -> Path:
    """This test's own copy of the consortium (run folder, keys, agreement)."""
    shutil.copytree(trained, tmp_path / "c")
    return tmp_path / "c" / "run"


def _keys(run: Path) -> Path:
    return run.parent / "keys"


def _cli(*args: object) -> subprocess.CompletedProcess:
    return forkserver.run([sys.executable, "-m", "consortium.cli", *map(str, args)], capture_output=True, text=True, timeout=300)


def _kinds(run: Path, kind: str) -> list:
    return [e for e in read_entries(run) if e.kind == kind]


def _perturbed(tensors: dict[str, np.ndarray], scale: float, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: v + rng.normal(0, scale, v.shape).astype(v.dtype) if k.endswith("weight") else v for k, v in tensors.items()}


def _blind_spot(run: Path, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """v1 with one hidden unit rewired to call every record benign-side class 0 once one feature exceeds
    anything the canary sites' validation records hold: a defect the canary cannot see, the others can."""
    lc = simulated(run, _keys(run))
    splits = site_splits(lc.config)
    canary = list(lc.terms.canary_sites)
    seen = np.concatenate([splits[s].validation.X for s in canary])
    others = [s for s in splits if s not in canary]

    def hidden_from_canary(j: int) -> int:
        return sum(int(((splits[s].test.X[:, j] > seen[:, j].max()) & (splits[s].test.y == 1)).sum()) for s in others)

    j = max(range(seen.shape[1]), key=hidden_from_canary)
    assert hidden_from_canary(j) >= 5  # enough records at the other sites for the defect to show
    z = (seen[:, j].max() - tensors["0.mean"][j]) / tensors["0.scale"][j]
    W1, b1, W2 = tensors["1.0.weight"].copy(), tensors["1.0.bias"].copy(), tensors["1.2.weight"].copy()
    k = int(np.argmin(np.abs(W2).sum(0)))  # the unit that mattered least
    W1[k] = 0
    W1[k, j], b1[k], W2[:, k] = 100.0, -100.0 * z, [100.0, -100.0]
    return {**tensors, "1.0.weight": W1, "1.0.bias": b1, "1.2.weight": W2}


def _promote_v1(run: Path) -> Lifecycle:
    lc = simulated(run, _keys(run))
    assert lc.promote("v1").outcome == "production"
    return lc


# -- registration -------------------------------------------------------------------------------


def test_the_runs_final_model_is_registered_as_candidate_v1(run):
    report = verify_run(run)
    v1 = report.lineage.registry.get("v1")
    assert (v1.state, v1.parent, v1.round) == ("candidate", None, 5)
    final = _kinds(run, "final_model")[0]
    registered = _kinds(run, "model_version")[0]
    assert registered.index == final.index + 1 and registered.body["model_sha256"] == final.body["model_sha256"]
    assert v1.epsilon == report.epsilon_per_site and v1.sites == SITES
    summary = json.loads((run / "summary.json").read_text())
    assert v1.metrics["accuracy"] == pytest.approx(summary["federated"]["accuracy"])
    assert json.loads((run / "registry" / "registry.json").read_text())["versions"][0]["id"] == "v1"


# -- canary -----------------------------------------------------------------------------------------


def test_a_degraded_candidate_fails_the_canary_and_never_reaches_production(run):
    lc = _promote_v1(run)
    v2 = lc.register(_perturbed(lc.registry.tensors("v1"), 0.5), parent="v1", by="site-3")
    result = _cli("models", "promote", run, v2.id, "--keys", _keys(run))
    assert result.returncode == 1 and "rejected at canary" in result.stderr and "accuracy" in result.stderr
    report = verify_run(run)
    v2 = report.lineage.registry.get("v2")
    assert v2.state == "retired" and "production" not in [c.state for c in v2.history]
    verdict = [e for e in _kinds(run, "model_evaluation") if e.body["version"] == "v2"]
    assert len(verdict) == 1 and verdict[0].body["passed"] is False and verdict[0].body["baseline"] == "v1"
    failed = {f["metric"]: f for f in verdict[0].body["failed"]}
    assert "accuracy" in failed and failed["accuracy"]["worse_by"] > 0.02
    assert failed["accuracy"]["candidate"] == verdict[0].body["candidate_metrics"]["accuracy"]
    assert "rejected at canary: accuracy" in v2.history[-1].reason
    # The canary's figures are secure sums over the canary sites' validation records, in the transcript.
    sums = [e for e in _kinds(run, "evaluation") if e.body.get("purpose") == "canary"]
    assert all(e.body["sites"] == ["site-1", "site-2"] for e in sums)
    assert set(report.lineage.deployed.values()) == {"v1"}  # no site ever ran v2
    assert not [e for e in _kinds(run, "deployment") if e.body["version"] == "v2"]


def test_the_first_version_is_promoted_on_its_canary_alone_and_rolled_out_in_stages(run):
    promotion = simulated(run, _keys(run)).promote("v1")
    assert promotion.outcome == "production" and promotion.baseline is None
    assert [s["running"] for s in promotion.stages] == [["site-1", "site-2"], SITES]
    receipts = _kinds(run, "deployment")
    assert [(e.author, e.body["stage"]) for e in receipts] == [("site-1", 1), ("site-2", 1), ("site-3", 2), ("site-4", 2)]
    assert verify_run(run).lineage.deployed == {s: "v1" for s in SITES}
    assert json.loads((run / "sites" / "site-3" / "lifecycle.json").read_text())["version"] == "v1"  # the site's own record


# -- automatic rollback ---------------------------------------------------------------------------


def test_a_regression_during_the_rollout_is_rolled_back_automatically_and_every_site_ends_on_one_version(run):
    lc = _promote_v1(run)
    v2 = lc.register(_blind_spot(run, lc.registry.tensors("v1")), parent="v1", by=COORDINATOR)
    promotion = simulated(run, _keys(run)).promote(v2.id)
    assert promotion.passed and promotion.outcome == "rolled_back"  # the canary could not see it
    assert promotion.stages[0]["monitoring"]["passed"] is True  # stage 1: the canary sites
    failed = promotion.stages[1]["monitoring"]["failed"]
    accuracy = next(f for f in failed if f["metric"] == "accuracy")  # (calibration may suffer too)
    assert accuracy["worse_by"] > 0.02 and accuracy["candidate"] < accuracy["baseline"]
    report = verify_run(run)
    states = {v.id: v.state for v in report.lineage.registry.versions.values()}
    assert states == {"v1": "production", "v2": "rolled_back"}
    assert report.lineage.deployed == {s: "v1" for s in SITES}
    assert report.lineage.registry.get("v2").history[-1].reason.startswith("automatic: at rollout stage 2")
    shown = _cli("verify", run)
    assert shown.returncode == 0 and "model lineage" in shown.stdout and "(all on one version)" in shown.stdout
    assert "v2 (v1 -> v2) rolled_back: automatic" in shown.stdout.replace("\n", " ")
    # The report a privacy officer reads shows the same lineage, with the verdict that failed.
    from consortium.redteam.report import write_report

    page = write_report([run]).read_text()
    section = page[page.index("<h2>Model versions</h2>"):]
    assert "<td>rolled_back</td>" in section and "monitor stage 2: <span class=bad>failed</span> accuracy" in section


# -- manual rollback --------------------------------------------------------------------------------


def test_a_site_rolls_back_by_hand_with_its_signature_and_an_observer_may_not(run):
    lc = _promote_v1(run)
    v2 = lc.register(lc.registry.tensors("v1"), parent="v1", by=COORDINATOR)  # the same weights: passes everything
    held = simulated(run, _keys(run)).promote(v2.id, stages=1)  # the first stage now, the rest after a while
    assert held.outcome == "production" and held.held_after == 1
    assert verify_run(run).lineage.deployed == {"site-1": "v2", "site-2": "v2", "site-3": "v1", "site-4": "v1"}
    advanced = _cli("models", "advance", run, "--keys", _keys(run))
    assert advanced.returncode == 0 and "stage 2 (100%)" in advanced.stdout and "on every stage" in advanced.stdout
    assert verify_run(run).lineage.deployed == {s: "v2" for s in SITES}
    nothing = _cli("models", "advance", run, "--keys", _keys(run))
    assert nothing.returncode == 2 and "every stage of its rollout" in nothing.stderr
    denied = _cli("rollback", run, "--to", "v1", "--reason", "odd alerts", "--keys", _keys(run), "--member", "watcher")
    assert denied.returncode == 2 and len(denied.stderr.strip().splitlines()) == 1 and "observer" in denied.stderr
    done = _cli("rollback", run, "--to", "v1", "--reason", "odd alerts in the ward", "--keys", _keys(run), "--member", "site-2")
    assert done.returncode == 0, done.stderr
    report = verify_run(run)
    assert report.lineage.registry.get("v2").state == "rolled_back" and report.lineage.production.id == "v1"
    assert report.lineage.deployed == {s: "v1" for s in SITES}
    entry = [e for e in _kinds(run, "model_state") if e.body.get("rollback")][-1]
    assert entry.body["by"] == "site-2" and entry.body["request"]["member"] == "site-2"
    again = _cli("models", "rollback", run, "--to", "v1", "--reason", "x", "--keys", _keys(run))
    assert again.returncode == 2 and "already in production" in again.stderr


# -- staged rollout and a site's own policy ----------------------------------------------------


def test_a_site_pinned_to_a_version_refuses_the_upgrade_on_the_record(tmp_path):
    run = _consortium(tmp_path, policies={"site-3": "site: site-3\npin_model: v1\n"})
    lc = _promote_v1(run)
    v2 = lc.register(lc.registry.tensors("v1"), parent="v1", by=COORDINATOR)
    promotion = simulated(run, _keys(run)).promote(v2.id)
    assert promotion.outcome == "production"
    assert promotion.stages[1]["answers"]["site-3"].startswith("refused: this site's policy pins model v1")
    report = verify_run(run)
    assert report.lineage.deployed == {"site-1": "v2", "site-2": "v2", "site-3": "v1", "site-4": "v2"}
    assert [(r["site"], r["version"], r["rule"]) for r in report.lineage.refusals] == [("site-3", "v2", "pinned_model")]


def test_a_site_runs_no_version_the_transcript_has_not_put_in_production(run):
    from consortium.protocol import messages as m
    from consortium.transport import ask_each
    from consortium.wire import Tensor

    lc = _promote_v1(run)
    v2 = lc.register(_perturbed(lc.registry.tensors("v1"), 0.5), parent="v1", by=COORDINATOR)  # never promoted
    tensor = Tensor.from_numpy(lc.params(v2.id).astype(np.float32))
    registered_v2 = next(e for e in lc.entries if e.kind == "model_version" and e.body["version"] == "v2")
    promoted_v1 = next(e for e in lc.entries if e.kind == "model_state" and e.body["version"] == "v1" and e.body["to"] == "production")

    def ask(**proofs):
        request = m.DeployRequest(version=v2.id, model_sha256=tensor.sha256, task=lc.task, params=tensor,
                                  reason="rollout", stage=1, **proofs)
        return ask_each(lc.transport, lc.round, {"site-3": request}, m.DeployReply)["site-3"]

    for proofs in ({}, {"registered": lc._proof(registered_v2), "promoted": lc._proof(promoted_v1)}):
        answer = ask(**proofs)
        assert isinstance(answer, VerificationError), answer  # a refusal, not a receipt
        assert "not proven against the last tree head" in str(answer) or "does not put version v2 in production" in str(answer)
    assert json.loads((run / "sites" / "site-3" / "lifecycle.json").read_text())["version"] == "v1"


# -- drift ------------------------------------------------------------------------------------------------


def _incoming(run: Path, site: str, shift: dict[int, float], rows: int = 400, seed: int = 1) -> Table:
    """New records at ``site``: drawn from its own training records, with the named features shifted by
    that many of their standard deviations."""
    train = site_splits(simulated(run, _keys(run)).config)[site].train
    rng = np.random.default_rng(seed)
    take = rng.integers(0, train.n_rows, rows)
    X = train.X[take].copy()
    for j, sds in shift.items():
        X[:, j] += np.float32(sds * train.X[:, j].std())
    return Table(X=X, y=train.y[take], feature_names=train.feature_names, classes=train.classes)


def test_drift_at_one_site_raises_a_signed_incident_naming_it_and_the_features_and_pauses_promotion(run, tmp_path):
    lc = _promote_v1(run)
    drifted = _incoming(run, "site-4", {0: 1.5, 3: 1.5})
    names = drifted.feature_names
    write_csv(drifted, tmp_path / "site-4.csv")
    steady = _incoming(run, "site-2", {})
    write_csv(steady, tmp_path / "site-2.csv")
    out = _cli("models", "monitor", run, "--keys", _keys(run), "--incoming", f"site-4={tmp_path / 'site-4.csv'}",
               "--incoming", f"site-2={tmp_path / 'site-2.csv'}")
    assert out.returncode == 0, out.stderr
    incidents = _kinds(run, "drift_incident")
    assert [e.author for e in incidents] == ["site-4"]  # site-2's records did not drift: it says nothing
    assert sorted(incidents[0].body["features"]) == sorted([names[0], names[3]]) and incidents[0].body["site"] == "site-4"
    assert "drift incident filed by site-4" in out.stdout
    with pytest.raises(VerificationError, match="changed since it was opened here"):
        lc.register(lc.registry.tensors("v1"), parent="v1", by=COORDINATOR)  # the command line wrote meanwhile
    v2 = simulated(run, _keys(run)).register(lc.registry.tensors("v1"), parent="v1", by=COORDINATOR)
    with pytest.raises(LifecycleError, match="promotion is paused: site-4 reported drift in"):
        simulated(run, _keys(run)).promote(v2.id)
    assert verify_run(run).lineage.open_incidents.keys() == {"site-4"}
    # The site's next check, on records like its training records, ends the incident; promotion resumes.
    simulated(run, _keys(run), incoming={"site-4": _incoming(run, "site-4", {}, seed=2)}).monitor()
    assert [e.author for e in _kinds(run, "drift_resolved")] == ["site-4"]
    assert simulated(run, _keys(run)).promote(v2.id).outcome == "production"
    assert not verify_run(run).lineage.open_incidents


def test_a_site_keeps_its_drift_to_itself_when_the_agreement_does_not_let_it_out(tmp_path):
    run = _consortium(tmp_path, **{"  - {artefact: drift_incident, to: [coordinator, site, auditor]}\n": ""})
    lc = simulated(run, _keys(run), incoming={"site-4": _incoming(run, "site-4", {0: 3.0})})
    assert lc.monitor() == [] and not _kinds(run, "drift_incident")
    kept = json.loads((run / "sites" / "site-4" / "lifecycle.json").read_text())["drift"]
    assert kept["breached"] is True  # the site knows; the coordinator was told nothing


def test_too_few_incoming_records_are_not_judged(run):
    lc = simulated(run, _keys(run), incoming={"site-4": _incoming(run, "site-4", {0: 3.0}, rows=50)})
    assert lc.monitor() == []


# -- verify catches a coordinator that records what did not happen -------------------------------------


def _forge(run: Path, kind: str, body: dict) -> None:
    """The coordinator appends an entry it signs itself; the sites co-sign the head, as they do any head
    that extends the last (they check history, not meaning): only verify's replay can object."""
    ctl = open_run(run, _keys(run))
    ctl.recorder.record([LogRecord(kind, ctl.entries[-1].round, COORDINATOR, body)])
    ctl.recorder.close_round()


def test_verify_refuses_a_promotion_without_a_passed_canary(run):
    lc = _promote_v1(run)
    v2 = lc.register(_perturbed(lc.registry.tensors("v1"), 0.5), parent="v1", by=COORDINATOR)
    _forge(run, "model_state", {"version": v2.id, "to": "canary", "reason": "x", "by": COORDINATOR, "at": "t", "rollback": False})
    _forge(run, "model_state", {"version": v2.id, "to": "production", "reason": "trust me", "by": COORDINATOR, "at": "t", "rollback": False})
    with pytest.raises(VerificationError, match="enters production without passing its canary"):
        verify_run(run)


def _rejected_v2(run: Path) -> dict:
    """v1 in production, a degraded v2 rejected at its canary: that honest verdict's body."""
    lc = _promote_v1(run)
    v2 = lc.register(_perturbed(lc.registry.tensors("v1"), 0.5), parent="v1", by=COORDINATOR)
    assert simulated(run, _keys(run)).promote(v2.id).outcome == "rejected"
    return [e for e in _kinds(run, "model_evaluation") if e.body["version"] == "v2"][0].body


def test_verify_refuses_canary_figures_no_evaluation_of_that_version_produced(run):
    honest = _rejected_v2(run)
    lc = simulated(run, _keys(run))
    v3 = lc.register(_perturbed(lc.registry.tensors("v1"), 0.5, seed=1), parent="v1", by=COORDINATOR)
    _forge(run, "model_state", {"version": v3.id, "to": "canary", "reason": "x", "by": COORDINATOR, "at": "t", "rollback": False})
    # A verdict consistent with its own figures (the baseline's, quoted as v3's), which no evaluation of v3 produced.
    forged = {**honest, "version": v3.id, "candidate_metrics": honest["baseline_metrics"], "failed": [], "passed": True}
    _forge(run, "model_evaluation", forged)
    with pytest.raises(VerificationError, match="do not come from an evaluation of version v3"):
        verify_run(run)


def test_verify_refuses_a_passing_verdict_the_metrics_contradict(run):
    honest = _rejected_v2(run)
    _forge(run, "model_evaluation", {**honest, "failed": [], "passed": True})  # the real sums, a false verdict
    with pytest.raises(VerificationError, match="does not follow from its metrics"):
        verify_run(run)


def test_verify_refuses_a_promotion_while_a_drift_incident_is_open(run):
    simulated(run, _keys(run), incoming={"site-4": _incoming(run, "site-4", {0: 2.0})}).monitor()
    lc = simulated(run, _keys(run))
    lc._move("v1", "canary", "x", COORDINATOR)
    lc._judge("v1", None, ["site-1", "site-2"], "canary", 0)  # a genuine canary, passed
    lc._close()
    _forge(run, "model_state", {"version": "v1", "to": "production", "reason": "ignore it", "by": COORDINATOR, "at": "t", "rollback": False})
    with pytest.raises(VerificationError, match="promoted while the drift incident of site-4"):
        verify_run(run)


def test_verify_refuses_a_rollback_demanded_by_a_member_whose_role_may_not(run):
    from consortium.crypto.keyfile import load_identity_key
    from consortium.lifecycle.lineage import rollback_statement

    lc = _promote_v1(run)
    v2 = lc.register(lc.registry.tensors("v1"), parent="v1", by=COORDINATOR)
    assert simulated(run, _keys(run)).promote(v2.id).outcome == "production"
    at = len(read_entries(run))
    signature = load_identity_key(_keys(run) / "watcher.key").sign(rollback_statement("v1", "because", at)).hex()
    _forge(run, "model_state", {"version": "v1", "to": "production", "reason": "because", "by": "watcher", "at": "t",
                                "rollback": True, "request": {"member": "watcher", "signature": signature}})
    with pytest.raises(VerificationError, match="'watcher' \\(observer\\) demanded a rollback"):
        verify_run(run)


def test_a_swapped_version_file_fails_verification_and_is_never_served(run):
    lc = simulated(run, _keys(run))
    path = lc.registry.tensor_path("v1")
    shutil.copy(run / "model.safetensors", tmp := path.with_suffix(".bak"))
    from safetensors.numpy import save

    path.write_bytes(save(_perturbed(lc.registry.tensors("v1"), 0.1)))
    with pytest.raises(VerificationError, match="v1.*not the file the transcript registered"):
        verify_run(run)
    with pytest.raises(VerificationError, match="does not match the hash registered"):
        lc.promote("v1")
    tmp.unlink()


def test_a_stale_registry_index_is_reported_and_rebuilt_from_the_transcript(run):
    (run / "registry" / "registry.json").unlink()
    assert verify_run(run).registry_stale
    listed = _cli("models", "list", run, "--json")
    assert listed.returncode == 0 and json.loads(listed.stdout)["versions"][0]["state"] == "candidate"
    assert not verify_run(run).registry_stale


# -- bad input: one line, the fix, exit 2 -------------------------------------------------------------------


def test_lifecycle_commands_refuse_bad_input_in_one_line(run, tmp_path):
    cases = [
        (("models", "promote", run, "v9", "--keys", _keys(run)), "no model version 'v9'"),
        (("models", "register", run, "--model", tmp_path / "none.safetensors", "--parent", "v1", "--keys", _keys(run)), "does not exist"),
        (("models", "monitor", run, "--keys", _keys(run), "--incoming", "site-9=x.csv"), "not a site of this run"),
        (("models", "monitor", run, "--keys", _keys(run), "--incoming", "nonsense"), "write SITE=FILE.csv"),
        (("models", "list", tmp_path / "nowhere"), "does not exist"),
    ]
    for args, message in cases:
        result = _cli(*args)
        assert result.returncode == 2 and "Traceback" not in result.stderr, (args, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1 and message in result.stderr, (args, result.stderr)


@pytest.mark.parametrize("old,new,message", [
    ("canary_sites: [site-1, site-2]", "canary_sites: [site-1, site-9]", "canary site 'site-9' is not a site"),
    ("canary_sites: [site-1, site-2]", "canary_sites: [site-1]", "at least 2 canary sites"),
    ("rollout: [0.5, 1.0]", "rollout: [0.5, 0.9]", "ending at 1.0"),
    ("tolerances: {accuracy: 0.02, ece: 0.05}", "tolerances: {accuracy: 0.02, charm: 0.1}", "tolerances.charm"),
])
def test_malformed_lifecycle_terms_name_the_line_and_the_fix(old, new, message):
    with pytest.raises(ConfigError, match=message):
        parse_agreement(_agreement_text(**{old: new}), source="ag.yaml")


# -- deployed: the coordinator's service and each site's own agent, over mutual TLS -----------------------


def test_a_deployed_consortium_promotes_and_reports_drift_through_the_sites_own_agents(tmp_path):
    """A real deployment on 127.0.0.1: kits, a served run, then lifecycle sessions in which each site's
    agent (consortium join) answers from its own data and its own state folder."""
    import yaml

    from consortium.data import load_builtin, partition_iid
    from consortium.deploy.local import launch, provision_local, start_site

    table = load_builtin("breast-cancer")
    parts = partition_iid(table.n_rows, 3, np.random.default_rng(3))
    sites = ["site-1", "site-2", "site-3"]
    local = provision_local(tmp_path / "c", {s: table.take(i) for s, i in zip(sites, parts)}, consortium="hospitals",
                            terms={"min_cohort": 2, "lifecycle": {"canary_sites": ["site-1", "site-2"]}})
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "rounds": 2, "seed": 0, "participation": {"min_sites": 2}, "privacy": {"test_seed": 7},
        "data": {"dataset": "csv", "csv_sites": [{"name": s, "csv": str(local.data(s)), "schema": str(local.schema)} for s in sites]},
        "baselines": {"local_only": False, "pooled": False},
    }))
    run, state = tmp_path / "served", tmp_path / "state"
    procs = launch(local, config, run, test_seed=7, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, state=state)
    try:
        assert procs.coordinator.wait(timeout=300) == 0, procs.coordinator.stderr.read().decode()[-2000:]
        assert all(p.wait(timeout=60) == 0 for p in procs.sites.values())
    finally:
        procs.stop()
    assert verify_run(run).lineage.registry.get("v1").state == "candidate"  # in the coordinator's own run folder

    def session(command: str, *args: str, incoming: dict[str, Path] | None = None) -> subprocess.CompletedProcess:
        coordinator = forkserver.popen(
            [sys.executable, "-m", "consortium.cli", "models", command, str(run), *args, "--kit", str(local.kit(COORDINATOR)),
             "--schema", str(local.schema), "--wait-for-sites", "60"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        agents = [start_site(local, s, state=state, extra=("--incoming", str(incoming[s])) if incoming and s in incoming else ())
                  for s in sites]
        try:
            out, err = coordinator.communicate(timeout=300)
            assert all(a.wait(timeout=60) == 0 for a in agents)
        finally:
            for a in agents:
                if a.poll() is None:
                    a.kill()
        return subprocess.CompletedProcess(coordinator.args, coordinator.returncode, out, err)

    promoted = session("promote", "v1")
    assert promoted.returncode == 0, promoted.stderr
    assert all(json.loads((state / s / "lifecycle.json").read_text())["version"] == "v1" for s in sites)
    assert verify_run(run).lineage.deployed == {s: "v1" for s in sites}

    train = table.take(parts[2])
    rng = np.random.default_rng(5)
    take = rng.integers(0, train.n_rows, 300)
    X = train.X[take].copy()
    X[:, 1] += np.float32(2 * train.X[:, 1].std())
    write_csv(Table(X=X, y=train.y[take], feature_names=train.feature_names, classes=train.classes), tmp_path / "march.csv")
    monitored = session("monitor", incoming={"site-3": tmp_path / "march.csv"})
    assert monitored.returncode == 0, monitored.stderr
    incidents = _kinds(run, "drift_incident")
    assert [e.author for e in incidents] == ["site-3"] and incidents[0].body["features"] == [train.feature_names[1]]
    assert verify_run(run).lineage.open_incidents.keys() == {"site-3"}


def test_a_regressions_lifecycle_judges_its_own_metrics(tmp_path):
    """A regression run's canary and rollout read the task's metrics (MSE, R^2) from secure sums; tolerances
    that name a classification's metric are refused before anything is evaluated."""
    text = _agreement_text(**{"tolerances: {accuracy: 0.02, ece: 0.05}": "tolerances: {mse: 200.0, r2: 0.05}"})
    agreement = signed_agreement(tmp_path, text, [COORDINATOR, *SITES, "watcher"])
    config = SimulationConfig.model_validate({
        "rounds": 4, "data": {"dataset": "diabetes", "sites": 4}, "participation": {"min_sites": 2},
        "baselines": {"local_only": False, "pooled": False}, "privacy": {"test_seed": 1},
        "agreement": {"file": str(agreement), "keys": str(tmp_path / "keys")},
    })
    run = tmp_path / "run"
    assert run_simulation(config, out=run).summary["status"] == "completed"
    lc = simulated(run, tmp_path / "keys")
    assert lc.promote("v1").outcome == "production"
    v2 = lc.register(_perturbed(lc.registry.tensors("v1"), 0.5), parent="v1", by="site-3")
    promotion = lc.promote(v2.id)
    assert promotion.outcome == "rejected"
    verdict = [e for e in _kinds(run, "model_evaluation") if e.body["version"] == v2.id][-1]
    assert {"mse", "r2"} <= set(verdict.body["candidate_metrics"]) and "mse" in {f["metric"] for f in verdict.body["failed"]}
    assert verify_run(run).status == "completed"
    lc.terms = lc.terms.model_copy(update={"tolerances": {"accuracy": 0.02}})
    with pytest.raises(LifecycleError, match="tolerances name accuracy, which a regression does not measure"):
        lc._check_measured()
