"""The consortium agreement: a template that validates, errors that name file and line, a plain-language explanation."""

import json
import sys

import pytest

from consortium.errors import ConfigError
from consortium.governance.agreement import agreement_hash, explain, parse_agreement, template
from tests import forkserver


def _agreement(**replace):
    text = template("hospitals", ["a", "b", "c"])
    for old, new in replace.items():
        assert old in text, old
        text = text.replace(old, new)
    return text


def test_the_template_is_a_valid_agreement_with_every_protection_on():
    ag = parse_agreement(_agreement())
    assert ag.secure_aggregation_required and ag.privacy.max_epsilon == 8.0 and ag.min_cohort == 3
    assert ag.approvers() == ["coordinator", "a", "b", "c"] and ag.resume_quorum == 3
    assert ag.visible_to("aggregate_metrics", "observer") and not ag.visible_to("global_model", "observer")
    assert not ag.visible_to("masked_update", "site")


def test_the_hash_changes_with_any_change():
    base = agreement_hash(parse_agreement(_agreement()))
    assert base == agreement_hash(parse_agreement(_agreement()))  # canonical: stable
    assert base != agreement_hash(parse_agreement(_agreement(**{"max_epsilon: 8.0": "max_epsilon: 8.5"})))
    # Formatting is not content: the same agreement written differently has the same hash.
    assert base == agreement_hash(parse_agreement(_agreement(**{"rounds: 20": "rounds:   20   # twenty"})))


@pytest.mark.parametrize("old,new,line,message", [
    ("{name: b, role: site}", "{name: b, role: owner}", 10, "members.2.role"),
    ("max_epsilon: 8.0", "max_epsilon: -1", 26, "privacy.max_epsilon"),
    ("min_cohort: 3", "min_cohort: 4", 23, "exceeds the 3 sites"),
    ("{artefact: masked_update, to: [coordinator]}", "{artefact: raw_rows, to: [coordinator]}", 15, "exposure.0.artefact"),
    ("{artefact: masked_update, to: [coordinator]}", "{artefact: masked_update, to: [coordinator, observer]}", 15, "coordinator only"),
    ("{name: a, role: site}", "{name: b, role: site}", 8, "'b' appears twice"),
    ("resume_quorum: 3", "resume_quorum: 9", 32, "exceeds the 4 approvers"),
    ("rounds: 20", "rounds: 20\nsurprise: true", 32, "surprise"),
])
def test_a_malformed_agreement_names_the_file_line_and_problem(old, new, line, message):
    with pytest.raises(ConfigError) as exc:
        parse_agreement(_agreement(**{old: new}), source="ag.yaml")
    text = str(exc.value)
    assert text.startswith(f"ag.yaml line {line}:") and message in text and "fix" in text


def test_bad_yaml_names_its_line():
    with pytest.raises(ConfigError, match=r"ag.yaml line \d+: malformed YAML"):
        parse_agreement(_agreement(**{"rounds: 20": "rounds: [20"}), source="ag.yaml")


def test_explain_tells_a_privacy_officer_what_leaves_and_what_never_does():
    text = explain(parse_agreement(_agreement(**{"  - {artefact: setup_statistics, to: [coordinator]}\n": ""})))
    assert "| masked_update |" in text and "| setup_statistics |" in text and "nobody: it never leaves a site" in text
    assert "raw rows, per-example outputs" in text and "epsilon **8**" in text and "Secure aggregation is required" in text
    # The epsilon is stated for what it bounds, and what it does not bound is named.
    assert "from the model updates released is bounded by epsilon" in text and "What the epsilon does **not** cover" in text
    assert "setup statistics" in text and "evaluation's counts" in text and "exact sums" in text


def test_the_command_line_writes_checks_and_explains(tmp_path):
    def cli(*args):
        return forkserver.run([sys.executable, "-m", "consortium.cli", *args], capture_output=True, text=True)

    path = tmp_path / "agreement.yaml"
    assert cli("agreement", "init", str(path), "--sites", "a,b,c").returncode == 0
    checked = cli("agreement", "check", str(path), "--json")
    assert checked.returncode == 0 and '"valid": true' in checked.stdout
    md = tmp_path / "explained.md"
    assert cli("agreement", "explain", str(path), "--markdown", str(md)).returncode == 0 and md.read_text().startswith("# What")
    again = cli("agreement", "init", str(path), "--sites", "a")
    assert again.returncode == 2 and "never overwritten" in again.stderr
    path.write_text(path.read_text().replace("max_epsilon: 8.0", "max_epsilon: -3"))
    bad = cli("agreement", "check", str(path))
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert f"{path} line" in bad.stderr.replace("\n", "") and "max_epsilon" in bad.stderr


# -- approval by signature -------------------------------------------------------------


def _signed_setup(tmp_path):
    from consortium.crypto import keys
    from consortium.crypto.keyfile import save_identity_key

    text = template("hospitals", ["a", "b"])
    for name in ("coordinator", "a", "b"):
        private, public = keys.generate_ed25519()
        save_identity_key(tmp_path / f"{name}.key", private)
        text = text.replace(f"{{name: {name}, role:", f"{{name: {name}, public_key: {keys.ed25519_public_bytes(public).hex()}, role:")
    path = tmp_path / "agreement.yaml"
    path.write_text(text)
    return path


def test_a_run_needs_every_approvers_signature_on_this_very_version(tmp_path):
    from consortium.crypto.keyfile import load_identity_key
    from consortium.errors import VerificationError
    from consortium.governance.agreement import approval, load_agreement, require_approval, sign_agreement

    path = _signed_setup(tmp_path)
    ag = load_agreement(path)
    sigs = {m: sign_agreement(ag, m, load_identity_key(tmp_path / f"{m}.key")) for m in ("coordinator", "a")}
    assert approval(ag, sigs) == (["coordinator", "a"], ["b"])
    with pytest.raises(ConfigError, match="'b' has not signed it"):
        require_approval(ag, sigs)
    sigs["b"] = sign_agreement(ag, "b", load_identity_key(tmp_path / "b.key"))
    assert require_approval(ag, sigs) == ["coordinator", "a", "b"]
    changed = parse_agreement(path.read_text().replace("max_epsilon: 8.0", "max_epsilon: 20.0"))
    with pytest.raises(VerificationError, match="changed since"):
        approval(changed, sigs)  # any change needs new signatures
    with pytest.raises(ConfigError, match="not the one the agreement names for 'a'"):
        sign_agreement(ag, "a", load_identity_key(tmp_path / "b.key"))


def test_signing_from_the_command_line(tmp_path):
    path = _signed_setup(tmp_path)

    def cli(*args):
        return forkserver.run([sys.executable, "-m", "consortium.cli", *args], capture_output=True, text=True)

    for member in ("coordinator", "a"):
        assert cli("agreement", "sign", str(path), "--member", member, "--key", str(tmp_path / f"{member}.key")).returncode == 0
    status = cli("agreement", "check", str(path), "--json")
    assert '"missing": ["b"]' in status.stdout and '"approved": false' in status.stdout
    (tmp_path / "b.key").chmod(0o644)
    loose = cli("agreement", "sign", str(path), "--member", "b", "--key", str(tmp_path / "b.key"))
    assert loose.returncode == 2 and "accessible to others" in loose.stderr
    (tmp_path / "b.key").chmod(0o600)
    assert cli("agreement", "sign", str(path), "--member", "b", "--key", str(tmp_path / "b.key")).returncode == 0
    assert '"approved": true' in cli("agreement", "check", str(path), "--json").stdout


# -- a run under an agreement -------------------------------------------------------------


def _consortium_agreement(tmp_path, signers):
    from tests.conftest import signed_agreement

    names = ["coordinator", "site-1", "site-2", "site-3"]
    return signed_agreement(tmp_path, template("hospitals", names[1:]), names, signers)


def _config(tmp_path, path, **over):
    from consortium.config import SimulationConfig

    raw = {
        "rounds": 2, "data": {"dataset": "breast-cancer", "sites": 3},
        "participation": {"min_sites": 3}, "baselines": {"local_only": False, "pooled": False},
        "agreement": {"file": str(path), "keys": str(tmp_path / "keys")},
    }
    raw.update(over)
    return SimulationConfig.model_validate(raw)


def test_a_run_does_not_start_until_every_approver_has_signed(tmp_path):
    from consortium.run.simulation import Simulation

    path = _consortium_agreement(tmp_path, ["coordinator", "site-1", "site-2"])
    with pytest.raises(ConfigError, match="'site-3' has not signed it"):
        Simulation(_config(tmp_path, path), out=tmp_path / "run")
    assert not (tmp_path / "run").exists()  # nothing started, nothing written


def test_what_a_config_leaves_unsaid_is_taken_from_the_agreement_and_what_it_says_is_kept(tmp_path):
    from consortium.config import SimulationConfig
    from consortium.governance.agreement import load_agreement, with_agreed_terms
    from consortium.run.simulation import Simulation

    path = _consortium_agreement(tmp_path, ["coordinator", "site-1", "site-2", "site-3"])
    agreement = load_agreement(path)
    raw = {"data": {"dataset": "breast-cancer", "sites": 3}, "agreement": {"file": str(path), "keys": str(tmp_path / "keys")}}
    plan = Simulation(SimulationConfig.model_validate(raw), out=tmp_path / "run").plan  # min_sites 1 was refused
    terms = agreement.privacy
    assert (plan.config.rounds, plan.config.participation.min_sites) == (agreement.rounds, agreement.min_cohort) == (20, 3)
    assert (plan.config.privacy.level, plan.config.privacy.epsilon, plan.config.privacy.delta) == (
        terms.level, terms.max_epsilon, terms.delta)
    own = with_agreed_terms(SimulationConfig.model_validate({"rounds": 2, "privacy": {"epsilon": 2.0}}), agreement)
    assert (own.rounds, own.privacy.epsilon, own.privacy.delta) == (2, 2.0, terms.delta)


def test_a_signed_agreement_is_kept_and_recorded(tmp_path):
    from consortium.governance.agreement import agreement_hash, load_agreement
    from consortium.run.simulation import Simulation, run_simulation

    path = _consortium_agreement(tmp_path, ["coordinator", "site-1", "site-2", "site-3"])
    with pytest.raises(ConfigError, match="at most epsilon 8"):
        Simulation(_config(tmp_path, path, privacy={"epsilon": 20.0}), out=tmp_path / "r1")
    with pytest.raises(ConfigError, match="minimum cohort is 3"):
        Simulation(_config(tmp_path, path, participation={"min_sites": 2}), out=tmp_path / "r2")
    with pytest.raises(ConfigError, match="requires secure aggregation"):
        Simulation(_config(tmp_path, path, secure_aggregation={"enabled": False}), out=tmp_path / "r3")
    result = run_simulation(_config(tmp_path, path), out=tmp_path / "run")
    manifest = json.loads((tmp_path / "run" / "transcript.jsonl").read_text().splitlines()[0])
    assert manifest["body"]["agreement_sha256"] == agreement_hash(load_agreement(path))
    keys_in_manifest = {n: m["public_key"] for n, m in manifest["body"]["members"].items()}
    assert keys_in_manifest == {m.name: m.public_key for m in load_agreement(path).members}
    assert result.summary["transcript"]["verified"]


def test_collect_puts_every_checked_signature_in_every_kit_and_refuses_a_bad_one(tmp_path):
    import shutil

    from consortium.crypto.keyfile import load_identity_key
    from consortium.governance.agreement import (
        collect_signatures,
        load_agreement,
        read_signatures,
        sign_agreement,
        signatures_path,
    )

    path = _consortium_agreement(tmp_path, [])  # nobody has signed the provisioner's copy
    agreement = load_agreement(path)
    kits = []
    for member in ["coordinator", "site-1", "site-2", "site-3"]:  # each signs its own kit's copy
        copy = tmp_path / "kits" / member / "agreement.yaml"
        copy.parent.mkdir(parents=True)
        shutil.copy(path, copy)
        own = sign_agreement(agreement, member, load_identity_key(tmp_path / "keys" / f"{member}.key"))
        signatures_path(copy).write_text(json.dumps({member: own}))
        kits.append(copy)
    signed, missing = collect_signatures(path, kits)
    assert sorted(signed) == ["coordinator", "site-1", "site-2", "site-3"] and missing == []
    assert all(read_signatures(k) == read_signatures(path) and len(read_signatures(k)) == 4 for k in kits)
    forged = tmp_path / "forged.json"
    forged.write_text(json.dumps({"site-1": "00" * 64}))
    with pytest.raises(ConfigError, match=r"forged.json: the signature of 'site-1' does not verify"):
        collect_signatures(path, kits, [forged])
    stranger = tmp_path / "stranger.json"
    stranger.write_text(json.dumps({"mallory": "00" * 64}))
    with pytest.raises(ConfigError, match="'mallory' is not a member"):
        collect_signatures(path, kits, [stranger])
    kits[1].write_text(kits[1].read_text().replace("rounds: 20", "rounds: 21"))  # another version in one kit
    with pytest.raises(ConfigError, match="is not the agreement .* give every member the same version"):
        collect_signatures(path, kits)
