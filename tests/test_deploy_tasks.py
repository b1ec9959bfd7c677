"""Deployed studies: a task's own code, accepted by the agreement and approved by each site, run by real
processes over mutual TLS on loopback (the coordinator's ``serve`` and each site's ``join``).

Apart from ``test_deploy.py`` so that the two files run on both cores side by side.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import yaml

from consortium.audit.verify import read_entries
from consortium.config import SimulationConfig
from consortium.data import load_builtin, partition_iid
from consortium.deploy.local import launch, provision_local
from consortium.learning.identity import task_code
from consortium.protocol.coordinator import COORDINATOR
from consortium.run.simulation import run_simulation
from tests.conftest import cli_side_by_side
from tests.test_deploy import SITES, _cli, _config, _model, _one_line_error, _summary_line
from tests import forkserver

STUDY = '''
import torch
from torch.nn import functional as F
from consortium import ClassificationTask


class Weighted(ClassificationTask):
    """A study's own model and class-weighted loss."""

    def model(self, shape):
        return torch.nn.Sequential(shape.standardize(), torch.nn.Linear(shape.n_features, 6), torch.nn.Tanh(),
                                   torch.nn.Linear(6, shape.n_classes))

    def loss(self, outputs, targets):
        return F.cross_entropy(outputs, targets, weight=torch.tensor([1.5, 1.0]), reduction="none")
'''


def _accepting(folder, ref: str):
    """A consortium whose signed agreement accepts the task ``ref`` by the hash of its code here."""
    code = task_code(ref)
    table = load_builtin("breast-cancer")
    parts = partition_iid(table.n_rows, len(SITES), np.random.default_rng(3))
    return provision_local(folder, {s: table.take(idx) for s, idx in zip(SITES, parts)}, consortium="study",
                           terms={"min_cohort": 2, "tasks": [{"name": ref, "sha256": code.sha256}]})


def _approve(local, site: str, ref: str) -> None:
    """``site`` reviews the task's code and approves it in its kit's policy, from the command line."""
    done = _cli("task", "approve", ref, "--site", site, "--key", str(local.kit(site) / "identity.key"))
    assert done.returncode == 0 and f"{site} approved task" in done.stdout, done.stderr


def test_a_deployed_run_trains_the_studys_task_from_each_sites_own_copy_once_every_site_approved_it(tmp_path):
    """The agreement accepts the study's task by its code's hash; a site that has not approved it refuses to
    join (default-deny), in one line, before running any of it. Once each site approved it (``consortium
    task approve``), the coordinator and every site process load their own copy (``join --task``), the
    manifest names its hash, and the run ends with the model of its simulated twin."""
    (tmp_path / "study.py").write_text(STUDY)
    ref = f"{tmp_path / 'study.py'}:Weighted"
    local = _accepting(tmp_path / "consortium", ref)
    unapproved = _cli("join", str(local.kit("site-1")), "--data", str(local.data("site-1")), "--schema", str(local.schema),
                      "--task", ref)
    _one_line_error(unapproved, "site-1 has not approved task", "consortium task approve")
    for site in SITES:
        _approve(local, site, ref)
    policies = tmp_path / "policies"  # the twin plays every site, each with its own policy
    policies.mkdir()
    for site in SITES:
        shutil.copy2(local.kit(site) / "policy.yaml", policies / f"{site}.yaml")
    raw, config_file = _config(local, tmp_path, task=ref, rounds=2)
    raw["agreement"]["policies"] = str(policies)
    run_dir = tmp_path / "served"
    with open(tmp_path / "coordinator.err", "wb") as coordinator_err:
        procs = launch(local, config_file, run_dir, seed=0, test_seed=7, serve_args=("--json",),
                       join_args={s: ("--task", ref) for s in SITES}, stdout=subprocess.PIPE, stderr=coordinator_err,
                       logs=tmp_path / "logs", state=tmp_path / "state")
    try:
        out = _summary_line(procs.coordinator)
        twin = run_simulation(SimulationConfig.model_validate(raw), out=tmp_path / "twin")
    finally:
        procs.stop()
    summary = json.loads(out)
    assert summary["status"] == "completed", (tmp_path / "coordinator.err").read_text()[-2000:]
    assert summary["task"]["name"] == ref and summary["model"]["kind"] == "Weighted"
    assert read_entries(run_dir)[0].body["task"]["sha256"] == task_code(ref).sha256  # what every site endorsed
    served, simulated = _model(run_dir), _model(tmp_path / "twin")
    assert all(np.array_equal(served[k], simulated[k]) for k in served)  # the same model as the simulated twin


def test_a_deployed_image_study_plans_from_a_sample_and_each_site_reads_its_own_folder_and_its_lifecycle_too(tmp_path):
    """The image example deployed: the coordinator plans from a sample of generated images in the sites'
    layout (--sample, read by the task's load: it keeps no record), each site process reads its own PNG
    folder through its own copy of the task, and the run completes under secure aggregation and DP."""
    from consortium.data import synthetic_images, write_image_folder

    repo = __import__("pathlib").Path(__file__).resolve().parents[1]
    ref = f"{repo / 'examples' / 'images' / 'task.py'}:Shapes"
    pool = synthetic_images(120, size=32, n_classes=2, seed=1)
    folders = {}
    for i, site in enumerate(SITES):  # each site's own images, in its own folder
        folders[site] = tmp_path / "images" / site
        write_image_folder(pool.take(np.arange(i * 30, (i + 1) * 30)), folders[site])
    write_image_folder(pool.take(np.arange(90, 100)), tmp_path / "sample")  # the coordinator's layout sample
    # Kits and a signed agreement accepting the task (provision_local also writes CSVs, which this study does
    # not read), and each site's approval of its code.
    local = _accepting(tmp_path / "c", ref)
    for site in SITES:
        _approve(local, site, ref)
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "task": ref, "rounds": 1, "seed": 0, "data": {"dataset": "task"}, "participation": {"min_sites": 3},
        "training": {"epochs": 1, "batch_size": 32, "optimizer": "sgd", "lr": 0.5, "momentum": 0.0},
        "privacy": {"test_seed": 7, "epsilon": 8.0, "sampling_rate": 0.5},
    }))
    cli = [sys.executable, "-m", "consortium.cli"]
    with open(tmp_path / "coordinator.err", "wb") as err:
        coordinator = forkserver.popen(
            [*cli, "serve", str(local.kit(COORDINATOR)), "--config", str(config), "--sample", str(tmp_path / "sample"),
             "--out", str(tmp_path / "served"), "--port", str(local.port), "--json"], stdout=subprocess.PIPE, stderr=err)
    sites = [forkserver.popen([*cli, "join", str(local.kit(s)), "--data", str(folders[s]), "--task", ref, "--test-seed", "7",
                               "--state", str(tmp_path / "state" / s)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
             for s in SITES]
    try:
        line = _summary_line(coordinator)
    finally:
        for proc in [coordinator, *sites]:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
    assert line, (tmp_path / "coordinator.err").read_text()[-2000:]
    summary = json.loads(line)
    assert summary["status"] == "completed" and summary["transcript"]["verified"]
    assert summary["task"]["name"] == ref and summary["secure_aggregation"]["enabled"] and summary["privacy"]["level"] == "record"
    # The model lifecycle reopens the deployed run from the same layout sample (no CSV schema exists here):
    # it reads the sample through the run's task and then waits for the sites' agents.
    served, kit = str(tmp_path / "served"), str(local.kit(COORDINATOR))
    waited, no_layout = cli_side_by_side(
        ("models", "monitor", served, "--kit", kit, "--sample", str(tmp_path / "sample"), "--wait-for-sites", "1"),
        ("models", "monitor", served, "--kit", kit), timeout=120,
    )
    _one_line_error(waited, "site-1, site-2, site-3 did not connect within 1 s")
    _one_line_error(no_layout, "give the data's layout: --schema", "--sample PATH")
