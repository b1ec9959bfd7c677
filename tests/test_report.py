"""``consortium report``: one self-contained HTML page, opened in a real headless browser."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from consortium.config import SimulationConfig
from consortium.redteam.audit import AuditOptions, run_audit
from consortium.run.simulation import Simulation
from tests import forkserver

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]
CHROMIUM = shutil.which("chromium")


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, one_torch_thread: None) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("report")
    out = {}
    for name, dp in (("private", True), ("open", False)):
        config = SimulationConfig.model_validate({
            "rounds": 4, "data": {"dataset": "breast-cancer", "sites": 3},
            "privacy": {"enabled": dp, "epsilon": 1.0, "test_seed": 3}, "baselines": {"local_only": dp, "pooled": dp},
            "evaluation": {"sensitive_feature": "mean radius", "shift_noise": 1.0} if dp else {},
        })
        Simulation(config, out=root / name).run()
        out[name] = root / name
    run_audit(out["private"], ["mia", "inversion", "canary"], AuditOptions(shadows=2, batch_sizes=(1,), canaries=200))
    run_audit(out["open"], ["mia", "poisoning"], AuditOptions(shadows=2))
    return out


def consortium(*args: str) -> subprocess.CompletedProcess[str]:
    return forkserver.run([sys.executable, "-m", "consortium.cli", *args], check=False, capture_output=True, text=True, timeout=300)


def test_the_report_is_one_self_contained_file_with_every_section(runs: dict[str, Path]) -> None:
    done = consortium("report", str(runs["private"]), "--compare", str(runs["open"]))
    assert done.returncode == 0, done.stderr
    page = (runs["private"] / "report.html").read_text()
    # Nothing is fetched from anywhere: no external scripts, styles, images or fonts.
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//)""", page)
    assert "<link" not in page and "@import" not in page
    for heading in ("Transcript", "Accuracy per round", "Calibration", "Fairness", "Epsilon spent per site",
                    "Membership inference", "Gradient inversion", "One-run DP audit", "Poisoning and robust aggregation"):
        assert f"<h2>{heading}</h2>" in page
    assert page.count("data-verified=true") == 2  # both transcripts verify
    assert "no differential privacy" in page  # the open run says so
    assert page.count('data-plot="roc"') == 2 and page.count('data-plot="reliability"') == 2
    assert page.count('data-plot="fairness"') == 1 and "Groups of <b>mean radius</b>" in page
    assert 'data-plot="epsilon"' in page and "standard deviation" in page  # the spread across sites, from sums
    assert "site-1 (its own record)" in page  # each site's own accuracy, from the journal it kept
    audit = json.loads((runs["private"] / "audit.json").read_text())
    assert audit["attacks"]["canary"]["noise_divided_by_10"]["caught"] is True  # the control fails, as it must
    assert audit["attacks"]["canary"]["as_run"]["caught"] is False
    poisoning = json.loads((runs["open"] / "audit.json").read_text())["attacks"]["poisoning"]["attacks"]
    assert set(poisoning) == {"scale x100", "sign flip x10", "backdoor"}
    by_label = {r["label"]: r for r in poisoning["sign flip x10"]}
    assert by_label["attacked + krum"]["status"] == "refused"  # 3 sites: Krum needs n > 2f + 2 = 4
    assert by_label["attacked + median"]["status"] == "completed"
    assert "attacked + krum" in page and "refused" in page


def test_a_tampered_transcript_shows_as_failed_and_no_epsilon_is_drawn_from_it(runs: dict[str, Path], tmp_path: Path) -> None:
    copy = tmp_path / "tampered"
    shutil.copytree(runs["private"], copy)
    transcript = copy / "transcript.jsonl"
    lines = transcript.read_text().splitlines()
    entry = json.loads(lines[3])
    entry["body"]["note"] = "edited after signing"
    lines[3] = json.dumps(entry)
    transcript.write_text("\n".join(lines) + "\n")
    done = consortium("report", str(copy))
    assert done.returncode == 0, done.stderr
    page = (copy / "report.html").read_text()
    assert "data-verified=false" in page and "verification FAILED" in page
    assert 'data-plot="epsilon"' not in page and "does not verify" in page


def test_report_errors_are_one_line(tmp_path: Path) -> None:
    done = consortium("report", str(tmp_path / "nowhere"))
    assert done.returncode == 2 and "does not exist" in done.stderr and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (.ci/run installs it: apt-get install chromium)")
def test_every_plot_renders_in_headless_chromium(runs: dict[str, Path], tmp_path: Path) -> None:
    page = tmp_path / "report.html"
    done = consortium("report", str(runs["private"]), "--compare", str(runs["open"]), "--out", str(page))
    assert done.returncode == 0, done.stderr
    flags = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([*flags, "--dump-dom", page.as_uri()], check=False, capture_output=True, text=True, timeout=120).stdout
    plots = re.search(r'data-plots="(\d+)"', dom)
    rendered = re.search(r'data-rendered="(\d+)"', dom)
    assert plots and rendered, dom[:500]
    # private: accuracy, reliability, fairness, epsilon, ROC; open: accuracy, reliability, ROC. Each laid out
    # by the browser with a real size.
    assert int(plots.group(1)) == 8 and int(rendered.group(1)) == 8
    # What a privacy officer reads, as the browser laid it out: the results beside the constant predictor,
    # what DP does not cover, the ceiling in words, inversion rows the run was not exposed to, one line per
    # group of sites whose epsilon coincides, and the same axes for both runs.
    text = re.sub(r"\s+", " ", dom)
    assert "constant: predicting the majority class" in text and "local-only, mean of the sites" in text
    assert re.search(r"the majority class is \d+\.\d\d% of the records", text) and "pooled, all records" in text
    assert "What the epsilon does <b>not</b> cover" in text and "are exact sums, released without noise" in text
    assert "data-informative=\"true\"" in text and "no attack, however strong, can flag more than" in text
    assert "hypothetical: a coordinator without secure aggregation; this run had it" in text
    assert "3 sites alike: site-1, site-2, site-3" in text
    ticks = [re.findall(r"<!-- ([0-9.]+) -->", block) for block in re.findall(r'data-plot="accuracy">(.*?)</figure>', dom, re.S)]
    assert len(ticks) == 2 and ticks[0] == ticks[1] and "1.0" in ticks[0]  # the compared runs share their axes
    shot = tmp_path / "report.png"
    subprocess.run([*flags, "--window-size=1400,2400", f"--screenshot={shot}", page.as_uri()], check=False,
                   capture_output=True, timeout=120)
    pixels = np.asarray(Image.open(shot).convert("L"))
    assert pixels.shape == (2400, 1400)
    assert (pixels < 128).mean() > 0.01  # text, axes and curves: a blank or failed page is near-white


def test_the_dp_ceiling_is_explained_and_called_uninformative_where_it_rules_nothing_out() -> None:
    from consortium.redteam.report_attacks import ceiling_in_words

    words, informative = ceiling_in_words(8.0, 1e-5)
    assert not informative and "99.97% of the members while wrongly flagging 0.1%" in words and "uninformative" in words
    words, informative = ceiling_in_words(1.0, 1e-5)
    assert informative and "0.27% of the members" in words and "refutes the claim" in words
    assert ceiling_in_words(None, None)[1] is False


def test_audit_prints_every_attack_on_the_console(runs: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    from consortium.cli.audit import _print_audit
    from consortium.cli.common import out_console

    monkeypatch.setattr(out_console, "width", 240)
    seen = {}
    for name, attacks in (("private", ["mia", "inversion", "canary"]), ("open", ["mia", "poisoning"])):
        with out_console.capture() as captured:
            _print_audit(json.loads((runs[name] / "audit.json").read_text()), attacks)
        seen[name] = captured.get()
    assert "membership inference: loss threshold" in seen["private"] and "The DP ceiling: at epsilon 1" in seen["private"]
    assert "gradient inversion" in seen["private"] and "one site (hypothetical: no secure aggregation)" in seen["private"]
    assert "one-run DP audit" in seen["private"] and "control: noise divided by 10" in seen["private"]
    assert "caught: less private than claimed" in seen["private"]  # the control, as it must be
    assert "poisoning: sign flip x10" in seen["open"] and "attacked + krum" in seen["open"]
    assert "No DP: nothing bounds what a membership attack may find" in seen["open"]
