"""A site runs only the task code it approved, pinned by hash (default-deny).

Each test plays one way a site could be made to run other code: a byte changed after approval, another
version of a dependency, a dependency missing, a task the agreement accepts but the site never approved,
an approval forged in the policy file, a coordinator asking for other code, and a transcript claiming a
task the agreement never accepted. Each fails when its check is removed.
"""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import consortium
from consortium.config import SimulationConfig
from consortium.crypto.keyfile import load_identity_key
from consortium.errors import ConfigError, VerificationError
from consortium.governance.agreement import load_agreement, template
from consortium.governance.approval import approve, require_reference_approved
from consortium.governance.guard import Refused
from consortium.governance.policy import add_approval, load_policy
from consortium.learning import identity
from consortium.learning.identity import task_code
from consortium.learning.task import load_task
from consortium.privacy.ledger import BudgetLedger
from consortium.protocol.site import Site
from consortium.redteam.report import write_report
from consortium.run.simulation import run_simulation
from tests.conftest import make_splits, signed_agreement
from tests import forkserver

SITES = ["site-1", "site-2", "site-3"]
TASKS = '''
import torch
from consortium import ClassificationTask
from layers import WIDTH


class Study(ClassificationTask):
    def model(self, shape):
        return torch.nn.Sequential(shape.standardize(), torch.nn.Linear(shape.n_features, WIDTH), torch.nn.Tanh(),
                                   torch.nn.Linear(WIDTH, shape.n_classes))
'''


def _study(folder: Path, tasks: str = TASKS) -> str:
    """A study's task in a folder of its own: tasks.py, the module beside it it imports, and data beside them."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tasks.py").write_text(tasks)
    (folder / "layers.py").write_text("WIDTH = 4\n")
    (folder / "notes.csv").write_text("not code\n")
    return f"{folder / 'tasks.py'}:Study"


def _consortium(folder: Path, accepted: list[str]) -> Path:
    """A signed agreement for a coordinator and three sites that accepts the tasks ``accepted`` (refs)."""
    entries = ", ".join(f"{{name: x{i}, sha256: {task_code(ref).sha256}}}" for i, ref in enumerate(accepted))
    text = template("study", SITES).replace("tasks: []", f"tasks: [{entries}]")
    return signed_agreement(folder, text, ["coordinator", *SITES])


def _approve(folder: Path, agreement: Path, site: str, ref: str) -> Path:
    policy = folder / "policies" / f"{site}.yaml"
    policy.parent.mkdir(exist_ok=True)
    add_approval(policy, approve(task_code(ref), site, load_identity_key(folder / "keys" / f"{site}.key")),
                 load_agreement(agreement))
    return policy


def _site(rng, folder: Path, agreement: Path, ref: str, site: str = "site-1") -> Site:
    """The site, built where its code runs: its own copy of the task, under the agreement and its policy."""
    ag = load_agreement(agreement)
    policy_file = folder / "policies" / f"{site}.yaml"
    policy = load_policy(policy_file, ag) if policy_file.exists() else None
    ledger = BudgetLedger(folder / f"{site}-budget.sqlite", site=site, epsilon_cap=8.0, delta=1e-5)
    return Site(site, make_splits(rng), seed=0, task=load_task(ref), agreement=ag, policy=policy, ledger=ledger)


# -- what the hash covers ---------------------------------------------------------------------


def test_a_tasks_hash_covers_its_files_and_the_distributions_it_imports_and_nothing_else(tmp_path):
    ref = _study(tmp_path / "study")
    code = task_code(ref)
    assert sorted(code.files) == ["layers.py", "tasks.py"]  # the module it imports, not the data beside it
    assert "torch" in code.dependencies and "consortium" not in code.dependencies  # the manifest pins the framework
    (tmp_path / "study" / "__pycache__").mkdir()
    (tmp_path / "study" / "__pycache__" / "layers.pyc").write_bytes(b"compiled")
    (tmp_path / "study" / "notes.csv").write_text("other data\n")
    assert task_code(ref).sha256 == code.sha256  # what the interpreter or the data writes is not the code
    (tmp_path / "study" / "layers.py").write_text("WIDTH = 4 \n")  # one byte
    assert task_code(ref).sha256 != code.sha256


def test_a_sibling_package_is_hashed_whole_with_what_its_own_modules_import_beside_it(tmp_path):
    ref = _study(tmp_path / "study", TASKS.replace("from layers import WIDTH", "from nets.widths import WIDTH"))
    (tmp_path / "study" / "nets").mkdir()
    (tmp_path / "study" / "nets" / "__init__.py").write_text("")
    (tmp_path / "study" / "nets" / "widths.py").write_text("from layers import WIDTH\n")
    assert sorted(task_code(ref).files) == ["layers.py", "nets/__init__.py", "nets/widths.py", "tasks.py"]


def test_a_package_is_hashed_whole_and_a_module_outside_any_distribution_is_refused(tmp_path, monkeypatch):
    package = tmp_path / "pkg" / "mystudy"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "tasks.py").write_text(TASKS.replace("from layers import WIDTH", "WIDTH = 3"))
    (package / "weights.json").write_text("[1, 2]")
    monkeypatch.syspath_prepend(str(tmp_path / "pkg"))
    by_module, by_file = task_code("mystudy.tasks:Study"), task_code(f"{package / 'tasks.py'}:Study")
    assert sorted(by_module.files) == ["mystudy/__init__.py", "mystudy/tasks.py", "mystudy/weights.json"]
    assert by_module.sha256 == by_file.sha256  # the same package however it is named
    (tmp_path / "loose.py").write_text("X = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    (package / "tasks.py").write_text(TASKS.replace("from layers import WIDTH", "from loose import X as WIDTH"))
    with pytest.raises(ConfigError, match="imports loose, which is neither in its package nor an installed distribution"):
        task_code("mystudy.tasks:Study")


# -- where the code runs: the site --------------------------------------------------------------


def test_a_site_runs_a_task_the_agreement_accepts_and_it_approved(rng, tmp_path):
    ref = _study(tmp_path / "study")
    agreement = _consortium(tmp_path, [ref])
    _approve(tmp_path, agreement, "site-1", ref)
    site = _site(rng, tmp_path, agreement, ref)
    assert site.task_identity == {"name": ref, "sha256": task_code(ref).sha256, "code": "package"}


def test_a_site_with_no_approval_runs_nothing_even_a_task_the_agreement_accepts(rng, tmp_path):
    ref = _study(tmp_path / "study")
    agreement = _consortium(tmp_path, [ref])
    with pytest.raises(ConfigError, match="site-1 has not approved task .* consortium task approve"):
        _site(rng, tmp_path, agreement, ref)
    with pytest.raises(ConfigError, match="site-1 has not approved task"):  # checked before the code is imported too
        require_reference_approved(ref, "site-1", load_agreement(agreement), None)


def test_one_byte_changed_after_approval_is_refused_naming_the_file(rng, tmp_path):
    ref = _study(tmp_path / "study")
    agreement = _consortium(tmp_path, [ref])
    _approve(tmp_path, agreement, "site-1", ref)
    (tmp_path / "study" / "layers.py").write_text("WIDTH = 40\n")
    with pytest.raises(ConfigError, match=r"not the code site-1 approved on .*study/layers.py differs"):
        _site(rng, tmp_path, agreement, ref)


def _fake_distribution(root: Path, version: str) -> None:
    """An installed distribution ``fakedep`` (its module, METADATA and RECORD) at ``root``."""
    for old in root.glob("fakedep-*.dist-info"):
        for f in old.iterdir():
            f.unlink()
        old.rmdir()
    (root / "fakedep").mkdir(exist_ok=True)
    (root / "fakedep" / "__init__.py").write_text(f"VERSION = {version!r}\n")
    info = root / f"fakedep-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: fakedep\nVersion: {version}\n")
    (info / "top_level.txt").write_text("fakedep\n")
    (info / "RECORD").write_text(f"fakedep/__init__.py,sha256=v{version},20\nfakedep-{version}.dist-info/RECORD,,\n")


@pytest.fixture
def fakedep(tmp_path, monkeypatch):
    root = tmp_path / "site-packages"
    root.mkdir()
    _fake_distribution(root, "1.0")
    monkeypatch.syspath_prepend(str(root))
    identity._providers.cache_clear()
    yield root
    identity._providers.cache_clear()
    importlib.invalidate_caches()


def test_a_dependency_at_another_version_is_refused_naming_it(rng, tmp_path, fakedep):
    ref = _study(tmp_path / "study", TASKS.replace("import torch\n", "import torch\nimport fakedep\n"))
    assert task_code(ref).dependencies["fakedep"]["version"] == "1.0"
    agreement = _consortium(tmp_path, [ref])
    _approve(tmp_path, agreement, "site-1", ref)
    _fake_distribution(fakedep, "1.1")
    importlib.invalidate_caches()
    with pytest.raises(ConfigError, match="fakedep is 1.1, approved at 1.0"):
        require_reference_approved(ref, "site-1", load_agreement(agreement), load_policy(
            tmp_path / "policies" / "site-1.yaml", load_agreement(agreement)))


def test_a_missing_dependency_is_refused_with_the_list_and_nothing_is_installed(tmp_path):
    ref = _study(tmp_path / "study", TASKS.replace("import torch\n", "import torch\nimport nosuchlib_a\nimport nosuchlib_b.x\n"))
    with pytest.raises(ConfigError, match="imports nosuchlib_a, nosuchlib_b, not installed here.*never installs"):
        task_code(ref)


def test_a_policy_may_approve_only_tasks_the_agreement_accepts_and_only_with_the_sites_own_signature(tmp_path):
    accepted, other = _study(tmp_path / "a"), _study(tmp_path / "b", TASKS.replace("Tanh", "ReLU"))
    agreement = _consortium(tmp_path, [accepted])
    ag = load_agreement(agreement)
    key = load_identity_key(tmp_path / "keys" / "site-1.key")
    with pytest.raises(ConfigError, match="is not among the agreement's tasks: a site may approve only tasks the consortium accepts"):
        add_approval(tmp_path / "p1.yaml", approve(task_code(other), "site-1", key), ag)
    policy = _approve(tmp_path, agreement, "site-1", accepted)
    text = policy.read_text()
    policy.write_text(text.replace(task_code(accepted).files["layers.py"], "f" * 64))  # edited to cover other bytes
    with pytest.raises(ConfigError, match="approved_tasks: the approval of .*not the hash of its files"):
        load_policy(policy, ag)
    ours = yaml.safe_load(text)["approved_tasks"][0]["signature"]
    theirs = approve(task_code(accepted), "site-1", load_identity_key(tmp_path / "keys" / "site-2.key")).signature
    policy.write_text(text.replace(ours, theirs))  # an approval signed with another member's key
    with pytest.raises(ConfigError, match="its signature is not site-1's"):
        load_policy(policy, ag)


def test_a_site_refuses_a_request_for_other_code_than_it_runs(rng, tmp_path):
    from tests.test_tasks import _params, _spec

    ref = _study(tmp_path / "study")
    agreement = _consortium(tmp_path, [ref])
    _approve(tmp_path, agreement, "site-1", ref)
    site = _site(rng, tmp_path, agreement, ref)
    spec = _spec(load_task(ref), 6).model_copy(update={"task_sha256": task_code(ref).sha256})
    site._training.model_for(spec, _params(spec))  # the code it runs: built
    elsewhere = spec.model_copy(update={"task": "/srv/other-machine/study/tasks.py:Study"})
    site._training.model_for(elsewhere, _params(spec))  # the same code, named by the coordinator's own path
    other = spec.model_copy(update={"task_sha256": "0" * 64})
    with pytest.raises(Refused, match="the request is for task code 0000000000000000...") as err:
        site._training.model_for(other, _params(other))
    assert err.value.rule == "task"


# -- the transcript: verify against the agreement ----------------------------------------------------


def _simulate(tmp_path: Path, agreement: Path, ref: str, out: str):
    config = SimulationConfig.model_validate({
        "rounds": 1, "task": ref, "data": {"dataset": "breast-cancer", "sites": 3}, "participation": {"min_sites": 3},
        "privacy": {"test_seed": 1}, "baselines": {"local_only": False, "pooled": False},
        "agreement": {"file": str(agreement), "keys": str(tmp_path / "keys"), "policies": str(tmp_path / "policies")},
    })
    return run_simulation(config, out=tmp_path / out)


def test_a_coordinator_plans_no_run_of_a_task_the_agreement_does_not_accept(tmp_path):
    ref, other = _study(tmp_path / "study"), _study(tmp_path / "other", TASKS.replace("Tanh", "ReLU"))
    agreement = _consortium(tmp_path, [other])
    with pytest.raises(ConfigError, match="the agreement does not accept task .*tasks.py:Study .*signed again"):
        _simulate(tmp_path, agreement, ref, "run")
    assert not (tmp_path / "run" / "transcript.jsonl").exists()


def test_verify_against_the_agreement_proves_the_task_was_one_it_accepts_and_fails_on_one_it_did_not(tmp_path, monkeypatch):
    ref = _study(tmp_path / "study")
    agreement = _consortium(tmp_path, [ref])
    for site in SITES:
        _approve(tmp_path, agreement, site, ref)
    _simulate(tmp_path, agreement, ref, "run")
    proved = consortium.verify(tmp_path / "run", agreement=agreement).anchored_by
    assert any("is one the agreement" in line and task_code(ref).sha256[:16] in line for line in proved)
    page = write_report([tmp_path / "run"], tmp_path / "run.html").read_text()
    assert f"a study's code <code>{task_code(ref).sha256[:16]}...</code>" in page and "accepted by the run's agreement" in page

    # A run of code the consortium never accepted: a coordinator that skips its own check, sites made to run
    # anything. The sites endorse the manifest (it names the code they ran), so the folder is consistent...
    import consortium.protocol.site as site_module
    import consortium.run.plan as plan

    real = plan.check_run
    monkeypatch.setattr(plan, "check_run", lambda agreement, config, names, layout, task=None: real(agreement, config, names, layout))
    monkeypatch.setattr(site_module, "require_task_approval", lambda *args: None)
    (tmp_path / "study" / "layers.py").write_text("WIDTH = 5\n")
    _simulate(tmp_path, agreement, ref, "rogue")
    assert consortium.verify(tmp_path / "rogue").status == "completed"  # consistent, unanchored
    with pytest.raises(VerificationError, match="names task .* with code .* which the agreement at .* does not accept"):
        consortium.verify(tmp_path / "rogue", agreement=agreement)  # ...and the agreement you hold refuses it
    assert "not among the run's agreement's tasks" in write_report([tmp_path / "rogue"], tmp_path / "rogue.html").read_text()


# -- the command line ---------------------------------------------------------------------------


def _cli(*args: str) -> subprocess.CompletedProcess:
    return forkserver.run([sys.executable, "-m", "consortium.cli", *args], capture_output=True, text=True, timeout=120)


def test_task_hash_approve_and_list_from_the_command_line(tmp_path):
    ref = _study(tmp_path / "study")
    hashed = _cli("task", "hash", ref, "--json")
    assert hashed.returncode == 0 and json.loads(hashed.stdout)["sha256"] == task_code(ref).sha256
    agreement = _consortium(tmp_path, [ref])
    explained = _cli("agreement", "explain", str(agreement)).stdout
    assert "Only 1 study task(s) may run" in explained and task_code(ref).sha256[:16] in explained
    policy = tmp_path / "policies" / "site-1.yaml"
    approve_args = ("task", "approve", ref, "--site", "site-1", "--key", str(tmp_path / "keys" / "site-1.key"),
                    "--policy", str(policy), "--agreement", str(agreement))
    approved = _cli(*approve_args)
    assert approved.returncode == 0 and "site-1 approved task" in approved.stdout, approved.stderr
    listed = _cli("task", "list", "--policy", str(policy), "--agreement", str(agreement), "--json")
    assert json.loads(listed.stdout)["tasks"][0]["on_disk"] == "unchanged"
    (tmp_path / "study" / "tasks.py").write_text(TASKS + "\n")
    listed = _cli("task", "list", "--policy", str(policy), "--agreement", str(agreement))
    assert "tasks.py differs" in listed.stdout
    refused = _cli(*approve_args)  # the changed code is not the one the agreement accepts
    assert refused.returncode == 2 and "the agreement does not accept task" in refused.stderr and "Traceback" not in refused.stderr
