"""Attacks on a run folder that only an anchor outside it can catch, and the summary and heads bound to it.

The attacker here can write the whole run folder: it re-signs every entry,
head and co-signature with fresh keys of its own. Consistency checks cannot
see that; the agreement the verifier holds, its kit, and a site's own
record of the heads it co-signed can. Each test fails when its check is
removed from ``transcript.anchor``, ``transcript.summary`` or ``verify``.
"""

from __future__ import annotations

import base64
import json
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from consortium.config import SimulationConfig
from consortium.crypto import keys
from consortium.crypto.keyfile import load_identity_key, save_identity_key
from consortium.deploy.provision import provision
from consortium.errors import ConfigError, VerificationError
from consortium.governance.agreement import load_agreement, sign_agreement, signatures_path, template
from consortium.privacy.events import RecordLevelEvent
from consortium.privacy.ledger import BudgetLedger
from consortium.protocol.coordinator import COORDINATOR
from consortium.protocol.site import Site
from consortium.run.simulation import Simulation
from consortium.transcript import merkle
from consortium.audit.anchor import agreement_anchor, kit_anchor, state_anchor
from consortium.transcript.log import canonical, head_bytes, manifest_bytes, signed_entry_bytes
from consortium.transcript.site_record import RECORD_FILE, SignedRecord
from consortium.audit.verify import signed_epsilon, verify_run
from tests.conftest import signed_agreement
from tests import forkserver

SITES = ["site-1", "site-2", "site-3"]


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _config(folder: Path, agreement: Path, keys_dir: Path, **over: object) -> SimulationConfig:
    raw = {
        "rounds": 2, "data": {"dataset": "breast-cancer", "sites": 3}, "participation": {"min_sites": 3},
        "privacy": {"test_seed": 5}, "baselines": {"local_only": False, "pooled": False},
        "agreement": {"file": str(agreement), "keys": str(keys_dir)},
    }
    raw.update(over)
    return SimulationConfig.model_validate(raw)


@pytest.fixture(scope="module")
def consortium(tmp_path_factory):
    """A run under a signed agreement, with each site's state (ledger and signed record) kept apart from it,
    as a site keeps it on its own machine; and a second run of the same consortium."""
    root = tmp_path_factory.mktemp("anchored")
    agreement = signed_agreement(root, template("hospitals", SITES), [COORDINATOR, *SITES])
    runs = []
    for name in ("run", "other"):
        Simulation(_config(root, agreement, root / "keys"), out=root / name).run()
        runs.append(root / name)
    states = root / "states"
    for site in SITES:
        shutil.copytree(runs[0] / "sites" / site, states / site)
    return {"agreement": agreement, "run": runs[0], "other": runs[1], "states": states, "root": root}


@pytest.fixture
def run(consortium, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(consortium["run"], copy)
    return copy


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _write(path: Path, rows: list[dict]) -> None:
    path.write_bytes(b"".join(canonical(r) + b"\n" for r in rows))


def _forge_with_fresh_keys(run: Path, *, own_agreement: bool = False) -> None:
    """Everything an attacker who can write the folder can do: new keys for every member, every noise
    multiplier set to 50, every entry, endorsement, head and co-signature re-signed, the summary made to
    match. With ``own_agreement`` it also writes an agreement of its own, signed by its fresh keys."""
    entries = _lines(run / "transcript.jsonl")
    manifest = entries[0]["body"]
    fresh = {name: keys.generate_ed25519()[0] for name in manifest["members"]}
    for name, key in fresh.items():
        manifest["members"][name]["public_key"] = keys.ed25519_public_bytes(key.public_key()).hex()
    if own_agreement:
        text = template("hospitals", SITES)
        for name, key in fresh.items():
            text = text.replace(f"{{name: {name},", f"{{name: {name}, public_key: {keys.ed25519_public_bytes(key.public_key()).hex()},")
        (run / "agreement.yaml").write_text(text)
        forged = load_agreement(run / "agreement.yaml")
        signatures_path(run / "agreement.yaml").write_text(json.dumps({n: sign_agreement(forged, n, k) for n, k in fresh.items()}))
        from consortium.governance.agreement import agreement_hash

        manifest["agreement_sha256"] = agreement_hash(forged)
    for e in entries:
        event = e["body"].get("privacy_event")
        if isinstance(event, dict):
            event["noise_multiplier"] = 50.0
    manifest["endorsements"] = {n: keys.sign(k, manifest_bytes(manifest)).hex() for n, k in fresh.items()}
    for e in entries:
        e["signature"] = _b64(keys.sign(fresh[e["author"]], signed_entry_bytes(e["kind"], e["round"], e["author"], e["body"])))
    _write(run / "transcript.jsonl", entries)
    leaves = [merkle.leaf_hash(canonical(e)) for e in entries]
    heads = _lines(run / "heads.jsonl")
    for h in heads:
        h["root"] = merkle.root(leaves[: h["size"]]).hex()
        signed = head_bytes(h["size"], h["root"], h["timestamp_ms"], h["seq"])
        h["signature"] = _b64(keys.sign(fresh[COORDINATOR], signed))
        h["cosignatures"] = {s: _b64(keys.sign(fresh[s], signed)) for s in h["cosignatures"]}
    _write(run / "heads.jsonl", heads)
    summary = json.loads((run / "summary.json").read_text())
    from consortium.audit.verify import read_entries

    summary["privacy"]["epsilon_per_site"] = signed_epsilon(read_entries(run), manifest)
    summary["privacy"]["epsilon_bound_per_site"] = summary["privacy"]["epsilon_per_site"]
    summary["privacy"]["noise_multiplier"] = 50.0
    summary["transcript"]["tree_head"]["root"] = heads[-1]["root"]
    (run / "summary.json").write_text(json.dumps(summary))


def _cli(*args: str) -> subprocess.CompletedProcess:
    return forkserver.run([sys.executable, "-m", "consortium.cli", *args], capture_output=True, text=True, timeout=300)


# -- a history forged end to end with fresh keys -----------------------------------------------------


def test_a_folder_re_signed_with_fresh_keys_is_consistent_and_says_it_proves_only_that(run):
    _forge_with_fresh_keys(run)
    report = verify_run(run)  # the attack: every consistency check passes
    assert report.anchored_by == [] and max(report.epsilon_per_site.values()) < 0.1
    out = _cli("verify", str(run))
    assert out.returncode == 0 and "consistency only" in out.stderr and "fresh keys" in out.stderr


def test_the_fresh_key_forgery_is_caught_by_the_agreement_the_verifier_holds(run, consortium):
    _forge_with_fresh_keys(run)
    with pytest.raises(VerificationError, match="key for 'coordinator' is not the one the agreement"):
        verify_run(run, anchors=[agreement_anchor(consortium["agreement"])])
    out = _cli("verify", str(run), "--agreement", str(consortium["agreement"]))
    assert out.returncode == 1 and "forged" in out.stderr and "Traceback" not in out.stderr


def test_a_forgery_under_an_agreement_of_its_own_is_caught_by_the_agreements_hash(run, consortium):
    _forge_with_fresh_keys(run, own_agreement=True)
    verify_run(run)  # its own agreement, signed by its own keys: consistent
    with pytest.raises(VerificationError, match="not a run of your consortium"):
        verify_run(run, anchors=[agreement_anchor(consortium["agreement"])])


def test_the_fresh_key_forgery_is_caught_by_a_sites_own_record_of_the_heads_it_cosigned(run, consortium):
    _forge_with_fresh_keys(run)
    state = consortium["states"] / "site-2"
    with pytest.raises(VerificationError, match="does not extend it"):
        verify_run(run, anchors=[state_anchor(state)])
    out = _cli("verify", str(run), "--state", str(state))
    assert out.returncode == 1 and "co-signed tree head" in out.stderr


def test_the_genuine_run_verifies_against_every_anchor(consortium):
    anchors = [agreement_anchor(consortium["agreement"]), *(state_anchor(consortium["states"] / s) for s in SITES)]
    report = verify_run(consortium["run"], anchors=anchors)
    assert len(report.anchored_by) == 3 + len(SITES)  # the agreement, its task, the keys, each site's record
    assert "the task is the built-in classification" in report.anchored_by[1]
    assert all("extends all" in line for line in report.anchored_by[3:])


def test_another_runs_heads_do_not_anchor_this_run(consortium):
    with pytest.raises(VerificationError, match="never co-signed this run"):
        verify_run(consortium["other"], anchors=[state_anchor(consortium["states"] / "site-1")])


def test_an_agreement_missing_an_approval_anchors_nothing(run, consortium, tmp_path):
    held = tmp_path / "agreement.yaml"
    shutil.copy(consortium["agreement"], held)
    sigs = json.loads(signatures_path(consortium["agreement"]).read_text())
    sigs.pop("site-3")
    signatures_path(held).write_text(json.dumps(sigs))
    for f in (run / "agreement.yaml.signatures.json",):
        f.write_text(json.dumps(sigs))
    with pytest.raises(VerificationError, match="site-3 did not sign it"):
        verify_run(run, anchors=[agreement_anchor(held)])


def test_an_edited_line_of_a_sites_record_is_refused(consortium, tmp_path):
    state = tmp_path / "state"
    shutil.copytree(consortium["states"] / "site-1", state)
    lines = (state / RECORD_FILE).read_text().splitlines()
    head = json.loads(lines[0])
    head["head"]["root"] = "0" * 64
    (state / RECORD_FILE).write_text("\n".join([json.dumps(head), *lines[1:]]) + "\n")
    with pytest.raises(ConfigError, match="coordinator's signature"):
        verify_run(consortium["run"], anchors=[agreement_anchor(consortium["agreement"]), state_anchor(state)])


def test_a_kit_anchors_the_check_and_a_tampered_kit_is_refused(tmp_path):
    """A deployed consortium's kits: the run's keys are the kits' own; another consortium's run is refused."""
    prov = provision(tmp_path / "c", sites=SITES, coordinator_address="127.0.0.1:9999")
    agreement_file = tmp_path / "c" / "agreement.yaml"
    agreement = load_agreement(agreement_file)
    keys_dir = tmp_path / "keys"
    sigs = {}
    for member in [COORDINATOR, *SITES]:
        key = load_identity_key(prov.folder / "kits" / member / "identity.key")
        save_identity_key(keys_dir / f"{member}.key", key)
        sigs[member] = sign_agreement(agreement, member, key)
    for path in [agreement_file, *(prov.folder / "kits" / m / "agreement.yaml" for m in [COORDINATOR, *SITES])]:
        signatures_path(path).write_text(json.dumps(sigs))
    Simulation(_config(tmp_path, agreement_file, keys_dir), out=tmp_path / "run").run()
    kit = prov.folder / "kits" / "site-2"
    report = verify_run(tmp_path / "run", anchors=[kit_anchor(kit)])
    assert any("the kit of site-2" in line for line in report.anchored_by)
    out = _cli("verify", str(tmp_path / "run"), "--kit", str(kit))
    assert out.returncode == 0 and "anchored" in out.stdout

    manifest = json.loads((kit / "consortium.json").read_text())
    manifest["members"]["site-1"]["public_key"] = "ab" * 32
    (kit / "consortium.json").write_text(json.dumps(manifest))
    with pytest.raises(ConfigError, match="disagree on the key of 'site-1'"):
        kit_anchor(kit)


# -- the summary, bound to the transcript -------------------------------------------------------------


def test_another_runs_summary_beside_this_transcript_is_caught(run, consortium):
    shutil.copy(consortium["other"] / "summary.json", run / "summary.json")
    with pytest.raises(VerificationError, match="different runs"):
        verify_run(run)


@pytest.mark.parametrize(("edit", "message"), [
    (lambda s: s["privacy"].update(target_epsilon=1.0), "target epsilon"),
    (lambda s: s["federated"].update(accuracy=0.99), "reports accuracy 0.99"),
    (lambda s: s["transcript"]["tree_head"].update(root="ab" * 32), "not among the heads"),
    (lambda s: s["privacy"]["epsilon_per_site"].update({"site-1": 0.5}), "site 'site-1'"),
    (lambda s: s["privacy"]["epsilon_bound_per_site"].update({"site-2": 0.5}), "reported a bound of 0.5"),
])
def test_a_summary_claim_the_signed_record_contradicts_is_caught(run, edit, message):
    summary = json.loads((run / "summary.json").read_text())
    edit(summary)
    (run / "summary.json").write_text(json.dumps(summary))
    with pytest.raises(VerificationError, match=message):
        verify_run(run)


def test_a_missing_summary_is_reported_missing_never_matching(run):
    (run / "summary.json").unlink()
    assert verify_run(run).summary == "missing"
    out = _cli("verify", str(run))
    assert out.returncode == 0 and "no summary.json" in out.stderr and "matching" not in out.stdout


@pytest.mark.parametrize(("text", "message"), [
    ("{not json", "is not JSON"),
    ("[1, 2]", "JSON list"),
    ('{"run_id": null, "transcript": null}', "different runs|'transcript' section"),
])
def test_a_malformed_summary_is_one_line(run, text, message):
    (run / "summary.json").write_text(text)
    with pytest.raises(VerificationError, match=message):
        verify_run(run)


def test_a_malformed_summary_section_is_one_line_on_the_command_line(run):
    summary = json.loads((run / "summary.json").read_text())
    summary["privacy"] = None
    (run / "summary.json").write_text(json.dumps(summary))
    out = _cli("verify", str(run))
    assert out.returncode == 1 and "'privacy' section" in out.stderr and "Traceback" not in out.stderr


# -- the heads file, whole ---------------------------------------------------------------------------


def test_a_head_deleted_from_the_middle_is_caught(run):
    lines = (run / "heads.jsonl").read_text().splitlines()
    (run / "heads.jsonl").write_text("\n".join(lines[:2] + lines[3:]) + "\n")
    with pytest.raises(VerificationError, match="deleted"):
        verify_run(run)


def test_all_heads_but_the_last_deleted_is_caught(run):
    lines = (run / "heads.jsonl").read_text().splitlines()
    (run / "heads.jsonl").write_text(lines[-1] + "\n")
    with pytest.raises(VerificationError, match="deleted"):
        verify_run(run)


# -- the ledger, reconciled with what the site signed ---------------------------------------------------


def _edit_ledger(path: Path, sql: str) -> None:
    db = sqlite3.connect(path)
    db.execute(sql)
    db.commit()
    db.close()


def test_budget_names_a_deleted_and_an_edited_ledger_row(run):
    _edit_ledger(run / "sites" / "site-1" / "budget.sqlite", "DELETE FROM spent WHERE round = 1")
    _edit_ledger(run / "sites" / "site-2" / "budget.sqlite",
                 "UPDATE spent SET event = replace(event, '\"steps\":', '\"steps\":1') WHERE round = 2")
    out = _cli("budget", str(run))
    assert out.returncode == 1
    assert "site-1" in out.stderr and "round 1" in out.stderr and "(deleted)" in out.stderr
    assert "site-2" in out.stderr and "round 2" in out.stderr and "(edited)" in out.stderr
    out = _cli("verify", str(run), "--state", str(run / "sites" / "site-1"))
    assert out.returncode == 1 and "deleted" in out.stderr


def test_a_site_whose_ledger_lost_rows_cannot_spend_its_cap_a_second_time(tmp_path):
    """Run A paid the whole cap; the ledger rows go; the site restarts for run B and must still refuse."""
    from consortium.data import load_builtin, split_table
    import numpy as np

    splits = split_table(load_builtin("breast-cancer"), np.random.default_rng(0), validation=0.1, test=0.2)
    identity, _ = keys.generate_ed25519()
    state = tmp_path / "state"
    event = RecordLevelEvent(noise_multiplier=0.7, clip=1.0, sampling_rate=0.1, steps=10)  # 2 rounds: 7.5; 3: 8.7
    ledger = BudgetLedger(state / "budget.sqlite", site="site-1", epsilon_cap=8.0, delta=1e-5)
    record = SignedRecord(state / RECORD_FILE)
    for rnd in (1, 2):  # what Site does in each round of run A: pay, then sign the decision and note it
        ledger.spend(event, rnd=rnd, run="run-a")
        body = json.loads(canonical({"accepted": True, "model_sha256": "00" * 32, "reason": "", "rule": "",
                                     "privacy_event": event.model_dump(mode="json")}))
        record.note_decision("run-a", rnd, "site-1", body, identity.sign(signed_entry_bytes("site_decision", rnd, "site-1", body)))
    assert not ledger.check(event).accepted  # the cap is spent
    _edit_ledger(state / "budget.sqlite", "DELETE FROM spent")
    assert ledger.check(event).accepted  # the ledger alone has forgotten: the attack

    site = Site("site-1", splits, seed=0, identity=identity,
                ledger=BudgetLedger(state / "budget.sqlite", site="site-1", epsilon_cap=8.0, delta=1e-5),
                record=state / RECORD_FILE)
    assert [(d.kind, d.round) for d in site.restored] == [("deleted", 1), ("deleted", 2)]
    assert not site.ledger.check(event).accepted
    assert site.ledger.spent() > 7.5
    assert [row["epsilon_after"] for row in site.ledger.history()] == [site.ledger.spent()] * 2  # restored rows say so
