"""The red team against a study's own task and against a regression: the membership replay trains with the
task's code, inversion attacks the task's model, the one-run canary audit runs on the run's own (CSV) data.

A study task defined in a file (its own model, which does not start with a ``Standardize`` layer, and a
class-weighted loss that counts its calls) trains on three CSV sites under record-level DP; the audit's
shadows must be that model (the run's layout hash) trained by that loss, and the canary audit must run on
the CSV rows rather than be skipped for want of a built-in dataset. A regression run (diabetes) is audited
and its report rendered.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open

import consortium
from consortium.data import load_builtin, schema_of, write_csv, write_schema
from consortium.learning.adapter import ModelAdapter
from consortium.redteam.audit import AuditOptions, run_audit
from consortium.redteam.membership import load_target, loss_attack, replay_training
from consortium.redteam.report import write_report

pytestmark = pytest.mark.usefixtures("one_torch_thread")

STUDY = '''
import torch
from torch.nn import functional as F

from consortium import ClassificationTask

CALLS = {"model": 0, "loss": 0}


class Net(torch.nn.Module):
    """Its own standardisation inside (no Standardize layer first), then a small MLP."""

    def __init__(self, shape):
        super().__init__()
        self.register_buffer("centre", torch.as_tensor(shape.mean, dtype=torch.float32))
        self.register_buffer("spread", torch.as_tensor(shape.scale, dtype=torch.float32))
        self.hidden = torch.nn.Linear(shape.n_features, 6)
        self.out = torch.nn.Linear(6, shape.n_classes)

    def forward(self, x):
        return self.out(torch.tanh(self.hidden(torch.nan_to_num((x - self.centre) / self.spread))))


class Study(ClassificationTask):
    def model(self, shape):
        CALLS["model"] += 1
        return Net(shape)

    def loss(self, outputs, targets):
        CALLS["loss"] += 1
        return F.cross_entropy(outputs, targets, weight=torch.tensor([2.0, 1.0]), reduction="none")
'''

CHROMIUM = shutil.which("chromium")
OPTIONS = AuditOptions(shadows=2, canaries=100, batch_sizes=(1,), seed=0)


def _calls(ref: str) -> dict[str, int]:
    """The study module's call counters (the module ``load_task`` imported from the file)."""
    task = consortium.load_task(ref)
    return sys.modules[type(task).__module__].CALLS


@pytest.fixture(scope="module")
def study_run(tmp_path_factory) -> tuple[Path, str]:
    root = tmp_path_factory.mktemp("study")
    (root / "study.py").write_text(textwrap.dedent(STUDY))
    table = load_builtin("breast-cancer")
    sites = []
    for i, idx in enumerate(np.array_split(np.random.default_rng(0).permutation(table.n_rows), 3)):
        part = table.take(idx)
        write_csv(part, root / f"s{i}.csv")
        write_schema(schema_of(part), root / f"s{i}.yaml")
        sites.append({"name": f"site-{i + 1}", "csv": str(root / f"s{i}.csv"), "schema": str(root / f"s{i}.yaml")})
    ref = f"{root / 'study.py'}:Study"
    result = consortium.simulate(
        {"task": ref, "rounds": 2, "data": {"dataset": "csv", "csv_sites": sites}, "privacy": {"test_seed": 1},
         "baselines": {"local_only": False, "pooled": False}},
        out=root / "run",
    )
    assert result.summary["privacy"]["level"] == "record" and result.summary["task"]["name"] == ref
    return root / "run", ref


def test_the_membership_replay_trains_the_studys_own_model_with_its_own_loss(study_run):
    run, ref = study_run
    target = load_target(run)
    assert target.run_task.name == ref and target.config.data.dataset == "csv"
    with safe_open(run / "model.safetensors", framework="np") as f:
        recorded = f.metadata()["layout_hash"]
    assert ModelAdapter(target.model).layout_hash == target.spec.layout_hash == recorded  # the run's own model
    calls = _calls(ref)
    before = dict(calls)
    shadow = replay_training(target, {site: s.train for site, s in target.splits.items()}, seed=0)
    assert ModelAdapter(shadow).layout_hash == recorded  # the study's model, not a built-in architecture
    assert calls["model"] > before["model"] and calls["loss"] > before["loss"]  # its code ran: DP-SGD on its loss
    assert type(shadow).__name__ == "Net"
    # The loss attack scores with the study's (class-weighted) loss, per record
    scores = loss_attack(target)
    assert set(scores) == {"site-1", "site-2", "site-3"} and all(np.isfinite(s.members).all() for s in scores.values())


def test_the_audit_of_a_study_on_csv_data_replays_it_and_runs_the_canary_audit_on_its_rows(study_run):
    run, ref = study_run
    calls = _calls(ref)
    before = dict(calls)
    run_audit(run, ["canary"], OPTIONS)
    assert calls["loss"] > before["loss"] and calls["model"] > before["model"]  # the canary audit ran the study's code
    audit = run_audit(run, ["mia", "inversion"], OPTIONS)  # audit.json keeps the canary section beside these
    assert audit["task"] == {"name": ref, "target": "classification"}
    mia = audit["attacks"]["mia"]
    assert mia["task"] == ref and "lira" in mia and [v["site"] for v in mia["lira"]["sites"]][-1] == "all"
    assert all(v["within_dp_bound"] is not None for v in mia["lira"]["sites"])
    canary = audit["attacks"]["canary"]
    assert "skipped" not in canary, canary  # the CSV data is audited, not skipped for want of a built-in dataset
    target = load_target(run)
    assert canary["data"] == "csv" and canary["rows"] == sum(s.train.n_rows for s in target.splits.values())
    assert canary["as_run"]["canaries"] == 100 and not canary["as_run"]["caught"]
    inversion = audit["attacks"]["inversion"]
    assert inversion["task"] == ref and inversion["metric"] == "feature_error"
    assert {r["observer"] for r in inversion["rows"]} >= {"one site", "one site, run's DP"}
    one_site = next(r for r in inversion["rows"] if r["observer"] == "one site")
    assert one_site["labels_exact"] is True  # the label, read from the study's model without a Standardize layer
    page = write_report([run]).read_text()
    assert f"task <b>{ref}</b>" in page and "Accuracy per round" in page


@pytest.fixture(scope="module")
def regression_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("regression") / "run"
    result = consortium.simulate(
        {"rounds": 2, "data": {"dataset": "diabetes", "sites": 3}, "privacy": {"test_seed": 1},
         "baselines": {"local_only": False, "pooled": False}},
        out=out,
    )
    assert result.summary["task"]["target"] == "regression"
    return out


def test_a_regression_run_is_audited_and_its_report_renders(regression_run):
    audit = run_audit(regression_run, ["mia", "canary", "inversion", "poisoning"], OPTIONS)
    assert audit["task"] == {"name": "regression", "target": "regression"}
    mia = audit["attacks"]["mia"]
    assert mia["statistic"] == "signed residual"
    for attack in ("loss", "lira"):
        pooled = mia[attack]["sites"][-1]
        assert pooled["site"] == "all" and 0 <= pooled["auc"] <= 1 and pooled["within_dp_bound"] is not None
    canary = audit["attacks"]["canary"]
    assert "skipped" not in canary and canary["data"] == "diabetes"  # gradient canaries need no label
    assert canary["as_run"]["guesses"] == 20 and not canary["as_run"]["caught"]
    inversion = audit["attacks"]["inversion"]
    assert "labels_skipped" in inversion and all(r["labels_exact"] is None for r in inversion["rows"])
    page = write_report([regression_run]).read_text()
    assert "task <b>regression</b>" in page and "MSE per round" in page
    assert 'data-plot="accuracy"' in page and 'data-plot="roc"' in page
    assert "labels not recovered" in page
    assert "a regression has neither" in audit["attacks"]["poisoning"]["skipped"] and "not run: the poisoning" in page


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (.ci/run installs it: apt-get install chromium)")
def test_a_regression_report_renders_every_plot_in_headless_chromium(regression_run, tmp_path):
    run_audit(regression_run, ["mia"], OPTIONS)
    page = write_report([regression_run], tmp_path / "report.html")
    flags = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([*flags, "--dump-dom", page.as_uri()], check=False, capture_output=True, text=True, timeout=120).stdout
    plots, rendered = re.search(r'data-plots="(\d+)"', dom), re.search(r'data-rendered="(\d+)"', dom)
    assert plots and rendered, dom[:500]
    # the MSE per round, epsilon per site and the ROC curves, each laid out with a real size
    assert int(plots.group(1)) == 3 and int(rendered.group(1)) == 3


def test_inversion_scores_a_record_with_missing_values_against_what_the_model_read():
    from consortium.data import Table
    from consortium.redteam.inversion import InversionSettings, run_inversion

    table = load_builtin("breast-cancer")
    X = table.X.copy()
    X[np.random.default_rng(0).random(len(X)) < 0.3, 0] = np.nan  # a third of the records miss their first feature
    X[:, 1] = np.nan  # and every record its second: the model reads the consortium's mean there
    holey = Table(X, table.y, table.feature_names, table.classes, imputed=tuple(table.feature_names[:2]))
    r = run_inversion(holey, consortium.load_task("classification"), batch_size=1, seed=0,
                      settings=InversionSettings(steps=50, restarts=1))
    assert np.isfinite(r.mean_quality) and np.isfinite(r.baseline) and r.labels_exact is True
