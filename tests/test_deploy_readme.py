"""From three hospitals' CSV files to a deployed, verified run with the README's commands alone.

Every step is a `consortium` command as the README shows it, each in its own process: provision
(`init`), every approver signs its own kit's agreement, `agreement collect` puts every signature in
every kit, `schema infer` drafts the schema from one site's CSV, `serve` and one `join` per site run
over mutual TLS on 127.0.0.1, and a site checks the run from its kit with `verify`. No file is copied
by hand, and the run config names nothing the agreement already says.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import numpy as np

from consortium.data import load_builtin, partition_iid, write_csv

SITES = ["hospital-a", "hospital-b", "hospital-c"]


def _cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "consortium.cli", *args], capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"consortium {' '.join(args)}: {proc.stderr[-2000:]}"
    return proc


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_csv_files_to_a_deployed_verified_run_with_the_readme_commands_only(tmp_path):
    table = load_builtin("breast-cancer")
    for site, rows in zip(SITES, partition_iid(table.n_rows, 3, np.random.default_rng(0))):
        write_csv(table.take(rows), tmp_path / f"{site}.csv", label="diagnosis")  # each hospital's own export

    port, folder = _free_port(), tmp_path / "consortium"
    init = _cli("init", str(folder), "--sites", ",".join(SITES), "--coordinator", f"127.0.0.1:{port}")
    assert "consortium agreement collect" in init.stdout.replace("\n", " ")
    kits = {m: folder / "kits" / m for m in ["coordinator", *SITES]}
    for member, kit in kits.items():  # each approver, on its own machine, signs its own kit's copy
        _cli("agreement", "sign", str(kit / "agreement.yaml"), "--member", member, "--key", str(kit / "identity.key"))
    collected = _cli("agreement", "collect", str(folder))
    assert "every approver has signed" in collected.stdout
    _cli("schema", "infer", str(tmp_path / "hospital-a.csv"), "--label", "diagnosis", "--out", str(tmp_path / "schema.yaml"))
    (tmp_path / "run.yaml").write_text("rounds: 1\n")  # cohort, privacy terms: the agreement's

    run_dir = tmp_path / "run"
    serve = subprocess.Popen(
        [sys.executable, "-m", "consortium.cli", "serve", str(kits["coordinator"]), "--config", str(tmp_path / "run.yaml"),
         "--schema", str(tmp_path / "schema.yaml"), "--port", str(port), "--out", str(run_dir), "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    joins = [
        subprocess.Popen([sys.executable, "-m", "consortium.cli", "join", str(kits[s]), "--data", str(tmp_path / f"{s}.csv"),
                          "--schema", str(tmp_path / "schema.yaml")], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for s in SITES
    ]
    try:
        out, err = serve.communicate(timeout=420)
        logs = [j.communicate(timeout=120)[0] for j in joins]
    finally:
        for proc in [serve, *joins]:
            if proc.poll() is None:
                proc.kill()
    assert serve.returncode == 0, err[-3000:]
    assert all(j.returncode == 0 for j in joins), [log[-1500:] for log in logs]
    summary = json.loads(out.splitlines()[0])
    assert summary["status"] == "completed" and summary["dataset"] == "csv"  # named for the sites' CSVs
    assert summary["secure_aggregation"]["enabled"] and summary["privacy"]["level"] == "record"
    recorded = (run_dir / "config.yaml").read_text()
    assert "breast-cancer" not in recorded and "min_sites: 3" in recorded  # the agreement's cohort
    verified = _cli("verify", str(run_dir), "--kit", str(kits["hospital-b"]), "--json")
    assert json.loads(verified.stdout)["status"] == "completed"
