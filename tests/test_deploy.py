"""The real deployment: `consortium serve` and one `consortium join` per site, each a process, over mutual TLS.

Nothing is shared between the processes but the kits, the sites' own CSVs
and the schema: the coordinator holds no data, each site no other's. In the
explicit test mode (every seed fixed, DP noise included) the deployed run
must end with exactly the model of the in-process simulation.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import yaml
from safetensors.numpy import load_file

from consortium.data import load_builtin, partition_iid
from consortium.deploy.local import launch, provision_local, start_site
from consortium.protocol.coordinator import COORDINATOR
from consortium.run.simulation import run_simulation
from consortium.config import SimulationConfig
from tests.conftest import cli_side_by_side
from tests import forkserver

SITES = ["site-1", "site-2", "site-3"]


def _consortium(folder, sites: list[str]):
    table = load_builtin("breast-cancer")
    parts = partition_iid(table.n_rows, len(sites), np.random.default_rng(3))
    # A cohort of 2 may be summed: a run can go on without a site that dies.
    tables = {s: table.take(idx) for s, idx in zip(sites, parts)}
    return provision_local(folder / "consortium", tables, consortium="hospitals", terms={"min_cohort": 2})


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    return _consortium(tmp_path_factory.mktemp("deploy"), SITES)


def _config(local, tmp_path, **over) -> tuple[dict, object]:
    """The run's config: 3 secure, private rounds in test mode. The simulated twin reads the same CSVs."""
    keys = tmp_path / "keys"  # the twin plays every member, so it holds every member's key
    keys.mkdir(exist_ok=True)
    for member in [COORDINATOR, *local.sites]:
        shutil.copy2(local.kit(member) / "identity.key", keys / f"{member}.key")
    raw = {
        "rounds": 3, "seed": 0,
        "data": {"dataset": "csv", "csv_sites": [
            {"name": s, "csv": str(local.data(s)), "schema": str(local.schema)} for s in local.sites
        ]},
        "participation": {"min_sites": 3},
        "privacy": {"test_seed": 7, "epsilon": 8.0},
        "baselines": {"local_only": False, "pooled": False},
        "agreement": {"file": str(local.folder / "agreement.yaml"), "keys": str(keys)},
    }
    raw.update(over)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(raw))
    return raw, path


def _model(run_dir) -> dict[str, np.ndarray]:
    return load_file(str(run_dir / "model.safetensors"))


def _summary_line(coordinator: subprocess.Popen, timeout: float = 420) -> bytes:
    """The coordinator's one line of JSON, read as soon as it is printed (b"" if it ended without one).

    By then the run is over and its folder final; the process itself ends a while later, once every
    site has been told so. Checks that only read the run folder go on meanwhile.
    """
    line: list[bytes] = []
    reader = threading.Thread(target=lambda: line.append(coordinator.stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    assert line, f"the coordinator printed no summary within {timeout} s"
    return line[0]


def test_a_coordinator_and_three_site_processes_equal_the_simulation(local, tmp_path):
    raw, config_file = _config(local, tmp_path)
    run_dir = tmp_path / "served"
    with open(tmp_path / "coordinator.err", "wb") as coordinator_err:
        procs = launch(local, config_file, run_dir, seed=0, test_seed=7, serve_args=("--json",),
                       stdout=subprocess.PIPE, stderr=coordinator_err, logs=tmp_path / "logs", state=tmp_path / "state")
    try:
        out = _summary_line(procs.coordinator)
        # While the coordinator tells the sites that the run is over: its in-process twin, and a member's check.
        twin = run_simulation(SimulationConfig.model_validate(raw), out=tmp_path / "twin")
        verified = _cli("verify", str(run_dir), "--json")
        out += procs.coordinator.communicate(timeout=420)[0]
        site_codes = {s: p.wait(timeout=60) for s, p in procs.sites.items()}
    finally:
        procs.stop()
    err = (tmp_path / "coordinator.err").read_bytes()
    assert procs.coordinator.returncode == 0, err.decode()[-3000:]
    assert site_codes == {s: 0 for s in SITES}, {s: (tmp_path / "logs" / f"{s}.log").read_text()[-2000:] for s in SITES}
    summary = json.loads(out)
    assert summary["status"] == "completed" and summary["transcript"]["verified"]
    assert summary["secure_aggregation"]["enabled"] and summary["secure_aggregation"]["survivors_per_round"] == [3, 3, 3]
    assert summary["privacy"]["test_mode"] and "TEST MODE" in err.decode()
    # Every site process saw the run end (410) and said what it spent, from its own ledger.
    for s in SITES:
        log = (tmp_path / "logs" / f"{s}.log").read_text()
        assert "the run is over" in log and "TEST MODE" in log
    # The same model as the in-process simulation, bit for bit, and the same metrics.
    served, simulated = _model(run_dir), _model(tmp_path / "twin")
    assert served.keys() == simulated.keys()
    assert all(np.array_equal(served[k], simulated[k]) for k in served)
    assert summary["federated"]["accuracy"] == twin.summary["federated"]["accuracy"]
    assert summary["privacy"]["epsilon_per_site"] == pytest.approx(twin.summary["privacy"]["epsilon_per_site"], rel=1e-9)
    # Any member checks the deployed run from its folder alone.
    assert verified.returncode == 0, verified.stderr
    assert json.loads(verified.stdout)["status"] == "completed"


def test_three_sites_lose_one_as_its_masked_input_is_due_and_another_as_it_unmasks(local, tmp_path):
    """Threshold 2 of 3 (no site assumed to collude with the coordinator, so each survivor may count its own
    acknowledgement): site-3 dies as its masked input is due in round 2, and site-2 as the unmasking request
    reaches it in round 3. Both rounds complete with the sites left; each, restarted, rejoins."""
    _, config_file = _config(local, tmp_path, participation={"min_sites": 2}, secure_aggregation={"corruption_rate": 0.0})
    run_dir, state, logs = tmp_path / "served", tmp_path / "state", tmp_path / "logs"
    faults = {"site-3": ("--crash-at", "secagg_deliver:2"), "site-2": ("--crash-at", "secagg_unmask:3")}
    with open(tmp_path / "coordinator.err", "wb") as coordinator_err:
        procs = launch(local, config_file, run_dir, seed=0, test_seed=7, serve_args=("--json", "--pickup-timeout", "8"),
                       join_args=faults, stdout=subprocess.PIPE, stderr=coordinator_err, logs=logs, state=state)
    memory = None
    try:
        for site in ("site-3", "site-2"):  # in the order they die
            assert procs.sites[site].wait(timeout=300) == 137
            if site == "site-3":
                memory = json.loads((state / "site-3" / "transcript-memory.json").read_text())
            # The same site, restarted on its state folder: its ledger, and the last head it co-signed.
            procs.sites[site] = start_site(local, site, seed=0, test_seed=7, logs=logs, state=state)
        out = _summary_line(procs.coordinator)
        verified = _cli("verify", str(run_dir), "--json")  # while the sites are told that the run is over
        out += procs.coordinator.communicate(timeout=420)[0]
        codes = {s: p.wait(timeout=60) for s, p in procs.sites.items()}
    finally:
        procs.stop()
    err = (tmp_path / "coordinator.err").read_bytes()
    assert procs.coordinator.returncode == 0, err.decode()[-3000:]
    assert codes == {s: 0 for s in local.sites}
    summary = json.loads(out)
    assert summary["status"] == "completed" and summary["federated"]["rounds_completed"] == 3
    assert summary["secure_aggregation"]["threshold"] == 2
    # Round 2's sum is over the two masked inputs that arrived (site-3's pairwise masks removed with its
    # neighbours' key shares); round 3's over all three (site-2's self mask rebuilt from the others' shares).
    assert summary["secure_aggregation"]["survivors_per_round"] == [3, 2, 3]
    rounds = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["answered"] for r in rounds][1:] == [["site-1", "site-2"], SITES]
    assert verified.returncode == 0, verified.stderr
    heads = [json.loads(line) for line in (run_dir / "heads.jsonl").read_text().splitlines()]
    remembered = next(i for i, h in enumerate(heads) if h["size"] == memory["head"]["size"] and h["root"] == memory["head"]["root"])
    assert "site-3" in heads[remembered]["cosignatures"]  # what it noted down is what it had co-signed;
    assert "site-3" in heads[-1]["cosignatures"]  # back, it co-signs over a proof from the head it remembered
    for site in SITES:  # nothing paid twice, nothing beyond the cap, nothing the summary does not count
        paid, spent, cap = _ledger(state / site / "budget.sqlite")
        assert len(paid) == len(set(paid)) and spent <= cap + 1e-9, (site, paid, spent, cap)
        assert summary["privacy"]["epsilon_bound_per_site"][site] >= spent - 1e-9, (site, paid, summary["privacy"])


def _published_plan(run_dir, rnd: int) -> bool:
    """Round ``rnd``'s plan is in the transcript, under a head the sites co-signed."""
    def lines(name):
        path = run_dir / name
        out = []
        for line in (path.read_text().splitlines() if path.exists() else []):
            try:
                out.append(json.loads(line))
            except ValueError:  # a line being written
                pass
        return out

    plan = next((e for e in lines("transcript.jsonl") if e["kind"] == "round_plan" and e["round"] == rnd), None)
    return plan is not None and any(h["size"] > plan["index"] for h in lines("heads.jsonl"))


def _recover(local, run_dir, err) -> subprocess.Popen:
    """A new coordinator process taking the run over (``serve --recover``)."""
    return forkserver.popen(
        [sys.executable, "-m", "consortium.cli", "serve", str(local.kit(COORDINATOR)), "--schema", str(local.schema),
         "--recover", str(run_dir), "--port", str(local.port), "--json"],
        stdout=subprocess.PIPE, stderr=err,
    )


def _ledger(path) -> tuple[list[int], float, float]:
    """A site's ledger, read as it is on disk: the rounds it paid, its epsilon and its cap."""
    from sqlalchemy import create_engine, text

    from consortium.privacy.accountant import epsilon
    from consortium.privacy.events import EVENT

    engine = create_engine(f"sqlite:///{path}")
    with engine.connect() as c:
        rows = list(c.execute(text("SELECT round, event FROM spent ORDER BY id")))
        cap, delta, accountant, interval = next(iter(c.execute(text(
            "SELECT epsilon_cap, delta, accountant, pld_interval FROM policy"
        ))))
    engine.dispose()
    events = [EVENT.validate_json(r[1]) for r in rows]
    return [r[0] for r in rows], epsilon(events, delta, accountant, pld_interval=interval), cap


def test_a_coordinator_killed_mid_round_restarts_and_finishes_the_run(local, tmp_path):
    """Killed twice: at a named crash point inside round 1's commit (its entries half appended), then by
    SIGKILL once round 2's plan is out. Round 1 completes from its committed record; round 2 is aborted."""
    from consortium.crashpoints import CRASH_ENV, CRASH_EXIT

    _, config_file = _config(local, tmp_path)
    run_dir, state = tmp_path / "served", tmp_path / "state"
    procs = launch(local, config_file, run_dir, seed=0, test_seed=7, serve_args=("--json",),
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, logs=tmp_path / "logs", state=state,
                   coordinator_env={CRASH_ENV: "round_appending"})
    again = None
    try:
        assert procs.coordinator.wait(timeout=300) == CRASH_EXIT, procs.coordinator.stderr.read().decode()[-3000:]
        # The sites keep polling, backing off, while it is away; a new process takes the run over.
        with open(tmp_path / "again.err", "wb") as again_err:
            again = _recover(local, run_dir, again_err)
        deadline = time.monotonic() + 300
        while not _published_plan(run_dir, 2):  # round 1 completed by the recovery; round 2 is under way
            assert again.poll() is None and time.monotonic() < deadline, (tmp_path / "again.err").read_text()[-3000:]
            time.sleep(0.02)
        again.kill()  # SIGKILL: no cleanup, no goodbye to the sites
        again.wait()
        with open(tmp_path / "again.err", "ab") as again_err:
            again = _recover(local, run_dir, again_err)
        out = _summary_line(again)
        verified = _cli("verify", str(run_dir), "--json")  # while the sites are told that the run is over
        out += again.communicate(timeout=420)[0]
        codes = {s: p.wait(timeout=60) for s, p in procs.sites.items()}
    finally:
        procs.stop()
        if again is not None and again.poll() is None:
            again.kill()
    err = (tmp_path / "again.err").read_bytes()
    assert again.returncode == 0, err.decode()[-3000:]
    assert codes == {s: 0 for s in SITES}
    summary = json.loads(out)
    assert summary["status"] == "completed" and summary["transcript"]["verified"]
    rounds = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1, 2, 3]  # nothing lost, nothing twice
    assert [r["status"] for r in rounds] == ["ok", "skipped", "ok"]
    assert rounds[1]["reason"].startswith("aborted: the coordinator stopped during round 2")
    entries = [json.loads(line) for line in (run_dir / "transcript.jsonl").read_text().splitlines()]
    assert [e["index"] for e in entries] == list(range(len(entries)))
    assert sorted(e["round"] for e in entries if e["kind"] == "aggregate") == [1, 2, 3]  # one outcome per round
    assert sorted(e["round"] for e in entries if e["kind"] == "round_plan") == [1, 2, 3]  # and one plan
    assert verified.returncode == 0, verified.stderr
    # What the sites signed that they paid stays paid: the run reports it, verify recomputes it; and the bound
    # also counts what a site may have paid for round 2 although its decision died with the coordinator.
    privacy = summary["privacy"]
    assert json.loads(verified.stdout)["epsilon_per_site"] == pytest.approx(privacy["epsilon_per_site"])
    for site in SITES:
        paid, spent, cap = _ledger(state / site / "budget.sqlite")
        assert len(paid) == len(set(paid)) and spent <= cap + 1e-9, (site, paid, spent, cap)  # nothing paid twice
        assert privacy["epsilon_bound_per_site"][site] >= spent - 1e-9, (site, paid, privacy)
    # Nor is a crash a way around a halt: only a quorum's resume continues a halted run.
    halted = tmp_path / "halted"
    shutil.copytree(run_dir, halted)
    lines = (halted / "transcript.jsonl").read_text().splitlines()
    lines = lines[: next(i for i, line in enumerate(lines) if json.loads(line)["kind"] == "final_model")]  # no final model
    lines.append(json.dumps({**json.loads(lines[-1]), "kind": "halt", "index": len(lines)}))  # and a halt last
    (halted / "transcript.jsonl").write_text("\n".join(lines) + "\n")
    finished, stopped = _cli_side_by_side(
        ("serve", str(local.kit(COORDINATOR)), "--schema", str(local.schema), "--recover", str(run_dir)),
        ("serve", str(local.kit(COORDINATOR)), "--schema", str(local.schema), "--recover", str(halted)),
    )
    # A finished run is not "recovered" into a second final model.
    _one_line_error(finished, "finished: there is nothing to recover")
    _one_line_error(stopped, "is halted: only a quorum of approvers continues it")


def _cli(*args: str) -> subprocess.CompletedProcess:
    return forkserver.run([sys.executable, "-m", "consortium.cli", *args], capture_output=True, text=True, timeout=120)


def _cli_side_by_side(*commands: tuple[str, ...]) -> list[subprocess.CompletedProcess]:
    return cli_side_by_side(*commands, timeout=120)


def _one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    line = " ".join(proc.stderr.split())
    assert all(n in line for n in needles), proc.stderr


def test_wrong_kits_and_absent_sites_are_one_line_errors(local, tmp_path):
    _, config_file = _config(local, tmp_path)
    schema = str(local.schema)
    site_kit, kit_joins, no_data, absent, no_layout, no_schema = _cli_side_by_side(
        ("serve", str(local.kit("site-1")), "--config", str(config_file), "--schema", schema),
        ("join", str(local.kit(COORDINATOR)), "--data", str(local.data("site-1")), "--schema", schema),
        ("join", str(local.kit("site-1")), "--data", str(tmp_path / "nowhere.csv"), "--schema", schema),
        ("serve", str(local.kit(COORDINATOR)), "--config", str(config_file), "--schema", schema,
         "--port", "0", "--wait-for-sites", "1", "--out", str(tmp_path / "never")),
        ("serve", str(local.kit(COORDINATOR)), "--config", str(config_file), "--out", str(tmp_path / "never-2")),
        ("join", str(local.kit("site-1")), "--data", str(local.data("site-1"))),
    )
    _one_line_error(site_kit, "kit of site 'site-1'", "serve with the coordinator's kit")
    _one_line_error(kit_joins, "kit of coordinator", "only a site's kit joins")
    _one_line_error(no_data, "nowhere.csv' does not exist")
    _one_line_error(absent, "site-1, site-2, site-3 did not connect within 1 s", "consortium join")
    _one_line_error(no_layout, "give the data's layout: --schema", "--sample PATH")
    _one_line_error(no_schema, "give --schema, the agreed schema the CSV follows")


def test_a_site_refuses_to_join_under_an_agreement_not_everyone_signed(local, tmp_path):
    kit = tmp_path / "kit"
    shutil.copytree(local.kit("site-2"), kit)
    signatures = json.loads((kit / "agreement.yaml.signatures.json").read_text())
    del signatures["site-3"]
    (kit / "agreement.yaml.signatures.json").write_text(json.dumps(signatures))
    _one_line_error(_cli("join", str(kit), "--data", str(local.data("site-2")), "--schema", str(local.schema)),
                    "'site-3' has not signed it", "consortium agreement collect DIR puts every signature in every kit")
