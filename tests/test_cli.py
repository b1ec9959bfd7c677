"""The real command line, in a subprocess, as a user runs it."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from consortium.config import SimulationConfig
from tests import forkserver

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "200"}
    return forkserver.run(
        [sys.executable, "-m", "consortium.cli", *args],
        capture_output=True, text=True, cwd=cwd or REPO, env=env, timeout=600,
    )


def run_json(*args: str) -> dict:
    proc = run_cli(*args, "--json")
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    assert len(lines) == 1, f"stdout must hold exactly one JSON object, got: {proc.stdout[:500]}"
    return json.loads(lines[0])


def test_a_forked_cli_process_answers_as_a_cold_started_one(tmp_path):
    """The suite starts its CLI processes from a fork server (tests/forkserver.py): the same output, exit
    code and environment as ``python -m consortium.cli`` started afresh, and a process of its own."""
    (tmp_path / "bad.yaml").write_text("rounds: [\n")
    env = {**os.environ, "COLUMNS": "91"}
    for args in (["--help"], ["simulate", "bad.yaml"], ["simulate", "missing.yaml"], ["verify", "nowhere"]):
        cold = subprocess.run([*forkserver.CLI, *args], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
        forked = forkserver.cli(*args, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
        assert (forked.returncode, forked.stdout, forked.stderr) == (cold.returncode, cold.stdout, cold.stderr), args
    probe = forkserver.popen([*forkserver.CLI, "serve", "nowhere"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert probe.pid != os.getpid() and probe.wait(timeout=120) == 2


@pytest.mark.slow
@pytest.mark.parametrize("dataset,sites", [("breast-cancer", 3), ("digits", 5)])
def test_demo_without_dp_is_near_pooled_and_beats_local_only(tmp_path, dataset, sites):
    s = run_json("demo", "--dataset", dataset, "--sites", str(sites), "--no-differential-privacy", "--out", str(tmp_path / "run"))
    for key in ("run_dir", "dataset", "sites", "rounds", "federated", "local_only", "pooled"):
        assert key in s
    assert s["dataset"] == dataset and s["sites"] == sites
    fed, pooled, local = s["federated"]["accuracy"], s["pooled"]["accuracy"], s["local_only"]["accuracy_mean"]
    assert len(s["local_only"]["accuracy_per_site"]) == sites
    assert fed >= pooled - 0.02, (fed, pooled)
    assert fed > local, (fed, local)
    assert ("auc" in s["federated"]) == (dataset == "breast-cancer")
    sa = s["secure_aggregation"]
    assert sa["enabled"] is True and sa["graph"] == "complete" and sa["threshold"] >= 2
    assert sa["survivors_per_round"] == [sites] * s["rounds"]
    assert s["privacy"] == {"enabled": False}
    run = Path(s["run_dir"])
    assert {p.name for p in run.iterdir()} >= {"config.yaml", "metrics.jsonl", "model.safetensors", "summary.json"}
    assert json.loads((run / "summary.json").read_text()) == s
    rounds = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == list(range(1, s["rounds"] + 1))


@pytest.mark.slow
@pytest.mark.parametrize("dataset,sites", [("breast-cancer", 3), ("digits", 5)])
def test_demo_with_dp_by_default_still_beats_local_only_within_budget(tmp_path, dataset, sites):
    s = run_json("demo", "--dataset", dataset, "--sites", str(sites), "--out", str(tmp_path / "run"))
    pv = s["privacy"]
    assert pv["enabled"] and pv["level"] == "record" and pv["accountant"] == "pld" and not pv["test_mode"]
    assert pv["noise_multiplier"] > 0.5 and pv["delta"] == 1e-5
    assert set(pv["epsilon_per_site"]) == set(s["site_names"])
    assert all(7.0 < e <= pv["target_epsilon"] for e in pv["epsilon_per_site"].values())
    assert pv["refusals"] == {}
    # Joining pays even with privacy (local-only is not private, so this is the conservative comparison).
    assert s["federated"]["accuracy"] > s["local_only"]["accuracy_mean"] + 0.02
    budget = json.loads(run_cli("budget", s["run_dir"], "--json").stdout)
    assert budget["sites"][s["site_names"][0]]["epsilon_spent"] == pytest.approx(pv["epsilon_per_site"][s["site_names"][0]])
    assert budget["sites"][s["site_names"][0]]["rounds_paid"] == list(range(1, s["rounds"] + 1))


def test_privacy_epsilon_matches_dp_accounting():
    import dp_accounting
    from dp_accounting import pld, rdp

    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(0.01, dp_accounting.GaussianDpEvent(1.1)), 10000
    )
    for name, acc, about in (("pld", pld.PLDAccountant(), 5.19), ("rdp", rdp.RdpAccountant(), 5.63)):
        out = run_cli(
            "privacy", "epsilon", "--noise-multiplier", "1.1", "--sampling-rate", "0.01", "--steps", "10000",
            "--delta", "1e-5", "--accountant", name, "--json",
        )
        assert out.returncode == 0, out.stderr
        got = json.loads(out.stdout)
        assert got["epsilon"] == pytest.approx(acc.compose(event).get_epsilon(1e-5), rel=1e-9)
        assert got["epsilon"] == pytest.approx(about, abs=0.01)
        assert got["noise_multiplier"] == 1.1 and got["steps"] == 10000


def test_privacy_calibrate_round_trips():
    out = run_cli("privacy", "calibrate", "--epsilon", "3", "--delta", "1e-5", "--steps", "1000", "--sampling-rate", "0.02", "--json")
    assert out.returncode == 0, out.stderr
    sigma = json.loads(out.stdout)["noise_multiplier"]
    back = run_cli("privacy", "epsilon", "--noise-multiplier", str(sigma), "--sampling-rate", "0.02", "--steps", "1000", "--delta", "1e-5", "--json")
    eps = json.loads(back.stdout)["epsilon"]
    assert eps <= 3.0 and eps == pytest.approx(3.0, abs=0.01)  # pessimistic: never above the target


def test_demo_table_and_warnings(tmp_path):
    proc = run_cli("demo", "--rounds", "2", "--out", str(tmp_path / "r"))
    assert proc.returncode == 0, proc.stderr
    assert "federated" in proc.stdout and "pooled" in proc.stdout and "alone" in proc.stdout
    assert "secure aggregation is OFF" not in proc.stderr
    assert "differential privacy is OFF" not in proc.stderr
    assert "differential privacy: record level" in proc.stdout.replace("\n", " ")
    assert "beyond accuracy: expected calibration error" in proc.stdout.replace("\n", " ")
    assert "accuracy across sites" in proc.stdout.replace("\n", " ")
    proc = run_cli(
        "demo", "--rounds", "2", "--no-secure-aggregation", "--no-differential-privacy", "--out", str(tmp_path / "r2")
    )
    assert proc.returncode == 0, proc.stderr
    assert "WARNING: secure aggregation is OFF" in proc.stderr.replace("\n", " ")
    assert "WARNING: differential privacy is OFF" in proc.stderr.replace("\n", " ")


def test_simulate_example_config(tmp_path):
    s = run_json("simulate", str(REPO / "examples" / "simulate.yaml"), "--out", str(tmp_path / "run"))
    assert s["dataset"] == "breast-cancer" and s["sites"] == 3
    assert s["federated"]["accuracy"] > 0.9 and s["warnings"] == []


def _leaves(tree: dict, path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], object]]:
    out = []
    for key, value in tree.items():
        out += _leaves(value, (*path, key)) if isinstance(value, dict) else [((*path, key), value)]
    return out


def test_the_documented_config_shows_the_defaults():
    """``examples/simulate.yaml`` says that omitted keys take the values it shows: every value it sets is the
    value a config without that key gets."""
    documented = yaml.safe_load((REPO / "examples" / "simulate.yaml").read_text())
    defaults = SimulationConfig().resolved().model_dump(mode="json")
    defaults["data"]["sites"] = SimulationConfig().data.n_sites  # omitted: 3
    differ = []
    for path, value in _leaves(documented):
        default = defaults
        for key in path:
            default = default[key]
        if (list(value) if isinstance(value, (list, tuple)) else value) != default:
            differ.append(f"{'.'.join(path)}: shows {value!r}, default {default!r}")
    assert not differ, differ


def test_simulate_csv_sites(tmp_path):
    schema = tmp_path / "schema.yaml"
    schema.write_text(
        "label: outcome\ncolumns:\n"
        "  - {name: age, type: float}\n  - {name: sex, type: category, values: [F, M]}\n"
        "  - {name: outcome, type: category, values: [no, yes]}\n"
    )
    for site, offset in (("a", 0), ("b", 7)):
        rows = ["age,sex,outcome"] + [
            f"{20 + (i * 7 + offset) % 60},{'FM'[i % 2]},{'yes' if (i * 7 + offset) % 60 > 30 else 'no'}" for i in range(60)
        ]
        (tmp_path / f"{site}.csv").write_text("\n".join(rows) + "\n")
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(
        "rounds: 3\ndata:\n  dataset: csv\n  csv_sites:\n"
        f"    - {{name: hospital-a, csv: {tmp_path / 'a.csv'}, schema: {schema}}}\n"
        f"    - {{name: hospital-b, csv: {tmp_path / 'b.csv'}, schema: {schema}}}\n"
    )
    s = run_json("simulate", str(cfg), "--out", str(tmp_path / "run"))
    assert s["site_names"] == ["hospital-a", "hospital-b"]


def _one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])
    assert proc.stdout == ""


def test_unknown_dataset():
    _one_line_error(run_cli("demo", "--dataset", "mnist"), "mnist", "breast-cancer")


def test_more_sites_than_rows():
    _one_line_error(run_cli("demo", "--sites", "500"), "500 sites")


@pytest.mark.parametrize("args,needle", [(["--sites", "-3"], "--sites"), (["--rounds", "abc"], "--rounds"), (["--seed", "-1"], "--seed")])
def test_bad_numbers(args, needle):
    _one_line_error(run_cli("demo", *args), needle)


@pytest.mark.parametrize(
    "text,needles",
    [
        ("rounds: 3\ndata:\n  dataset: [unclosed\n", ["line", "malformed YAML"]),
        ("rounds: 3\ndata:\n  dataset: mnist\n", ["line 3", "unknown dataset 'mnist'"]),
        ("rounds: 3\ntraining:\n  lr: -1\n", ["line 3", "training.lr", "-1"]),
        ("rounds: 3\ntraining:\n  lr: fast\n", ["line 3", "training.lr", "fast"]),
        ("rounds: 3\nroundz: 4\n", ["line 2", "roundz"]),
        ("- just\n- a list\n", ["mapping"]),
    ],
)
def test_bad_config(tmp_path, text, needles):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(text)
    _one_line_error(run_cli("simulate", str(cfg)), str(cfg), *needles)


@pytest.mark.parametrize(
    "args,needle",
    [
        (["privacy", "epsilon", "--noise-multiplier", "1", "--sampling-rate", "0", "--steps", "5", "--delta", "1e-5"], "sampling rate"),
        (["privacy", "epsilon", "--noise-multiplier", "1", "--sampling-rate", "0.1", "--steps", "5", "--delta", "0"], "delta"),
        (["privacy", "epsilon", "--noise-multiplier", "1", "--sampling-rate", "0.1", "--steps", "5", "--delta", "1e-5", "--accountant", "moments"], "--accountant"),
        (["privacy", "calibrate", "--epsilon", "0", "--delta", "1e-5", "--steps", "5", "--sampling-rate", "0.1"], "epsilon"),
        (["budget", "/nonexistent/run"], "does not exist"),
    ],
)
def test_bad_privacy_inputs(args, needle):
    _one_line_error(run_cli(*args), needle)


def test_missing_config_file(tmp_path):
    _one_line_error(run_cli("simulate", str(tmp_path / "nope.yaml")), "does not exist")


def test_schema_mismatch_names_site_and_column(tmp_path):
    for name, values in (("s1", "[F, M]"), ("s2", "[F, M, X]")):
        (tmp_path / f"{name}.yaml").write_text(
            f"label: y\ncolumns:\n  - {{name: sex, type: category, values: {values}}}\n"
            "  - {name: y, type: category, values: [no, yes]}\n"
        )
        (tmp_path / f"{name}.csv").write_text("sex,y\n" + "F,no\nM,yes\n" * 20)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(
        "data:\n  dataset: csv\n  csv_sites:\n"
        f"    - {{name: s1, csv: {tmp_path / 's1.csv'}, schema: {tmp_path / 's1.yaml'}}}\n"
        f"    - {{name: s2, csv: {tmp_path / 's2.csv'}, schema: {tmp_path / 's2.yaml'}}}\n"
    )
    _one_line_error(run_cli("simulate", str(cfg)), "s2", "sex")


def test_reading_configs_agreements_and_transcripts_does_not_load_torch():
    """`consortium --help`, `verify`, `show`, `halt`, the agreement and policy commands and every config error
    answer in half a second rather than the two that importing torch takes: nothing they import pulls it in."""
    light = (
        "consortium.cli",
        "consortium.config",
        "consortium.protocol.messages",
        "consortium.audit.verify",
        "consortium.governance.agreement",
        "consortium.governance.policy",
        "consortium.run.control",
        "consortium.privacy.accountant",
    )
    code = f"import sys\nfor m in {light!r}: __import__(m)\nprint('torch' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"


def test_verify_and_budget_say_what_a_path_is_when_it_is_not_a_run(tmp_path):
    (tmp_path / "summary.json").write_text("{}")
    (tmp_path / "empty").mkdir()
    for command in ("verify", "budget"):
        for path, says in ((tmp_path / "summary.json", "is a file, not a run folder"),
                           (tmp_path / "empty", "is a folder but not a run's: it holds no transcript.jsonl"),
                           (tmp_path / "nowhere", "does not exist")):
            done = run_cli(command, str(path))
            assert done.returncode == 2 and says in done.stderr and "Traceback" not in done.stderr, (command, done.stderr)
