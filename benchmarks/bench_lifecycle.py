"""A model promotion (canary, staged rollout, monitoring) against one secure evaluation, in-process and deployed.

Three breast-cancer sites under an agreement with lifecycle terms (canary
sites site-1 and site-2, rollout 50% then 100%, minimum cohort 2): v1 is the
run's model, v2 the same weights brought in as a new version, so its
promotion takes the full path: the canary (two secure evaluations, v2 and v1
side by side), two rollout stages with signed deployment receipts and a
co-signed head each, and monitoring after each stage (two more secure
evaluations per stage). The baseline, measured in the same run, is one
secure evaluation of a model by the canary sites. Deployed, the same
promotion goes over the coordinator's mailbox to three site agents running as
processes of their own (mutual TLS on loopback), and the coordinator's
shutdown is timed too: it ends once every site has been told.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from consortium.config import SimulationConfig
from consortium.data import load_builtin, partition_iid
from consortium.deploy.local import provision_local, start_site
from consortium.deploy.provision import load_kit
from consortium.deploy.serve import serve_lifecycle
from consortium.run.lifecycle import simulated
from consortium.protocol.coordinator import COORDINATOR
from consortium.run.simulation import run_simulation

SITES = ["site-1", "site-2", "site-3"]


def _consortium(root: Path):
    table = load_builtin("breast-cancer")
    parts = partition_iid(table.n_rows, len(SITES), np.random.default_rng(3))
    local = provision_local(root / "c", {s: table.take(i) for s, i in zip(SITES, parts)}, consortium="bench",
                            terms={"min_cohort": 2, "lifecycle": {"canary_sites": ["site-1", "site-2"]}})
    keys = root / "keys"
    keys.mkdir()
    for member in [COORDINATOR, *SITES]:
        shutil.copy2(local.kit(member) / "identity.key", keys / f"{member}.key")
    config = SimulationConfig.model_validate({
        "rounds": 2, "seed": 0, "participation": {"min_sites": 2}, "privacy": {"test_seed": 7},
        "data": {"dataset": "csv", "csv_sites": [{"name": s, "csv": str(local.data(s)), "schema": str(local.schema)} for s in SITES]},
        "baselines": {"local_only": False, "pooled": False},
        "agreement": {"file": str(local.folder / "agreement.yaml"), "keys": str(keys)},
    })
    run_simulation(config, out=root / "run")
    return local, keys, root / "run"


def main() -> list[tuple[str, object, str]]:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        local, keys, run = _consortium(root)
        lc = simulated(run, keys)
        assert lc.promote("v1").outcome == "production"
        v1 = lc.registry.tensors("v1")
        started = time.perf_counter()
        lc._evaluate("v1", ["site-1", "site-2"], "canary")
        lc._close()
        evaluation = time.perf_counter() - started
        lc = simulated(run, keys)
        v2 = lc.register(v1, parent="v1", by=COORDINATOR)
        started = time.perf_counter()
        assert lc.promote(v2.id).outcome == "production"
        in_process = time.perf_counter() - started

        deployed_run = root / "deployed"
        shutil.copytree(run, deployed_run)
        agents = [start_site(local, s, state=root / "state") for s in SITES]
        with serve_lifecycle(load_kit(local.kit(COORDINATOR)), deployed_run, local.schema, wait_for_sites_s=60) as served:
            v3 = served.register(v1, parent="v2", by=COORDINATOR)
            started = time.perf_counter()
            assert served.promote(v3.id).outcome == "production"
            deployed = time.perf_counter() - started
            closing = time.perf_counter()
        shutdown = time.perf_counter() - closing
        for agent in agents:
            agent.wait(timeout=60)
    return [
        ("one secure evaluation by the 2 canary sites, in-process (baseline), s", evaluation, "1.0x"),
        ("promotion of a new version (canary + 2 stages + monitoring), in-process, s", in_process, f"{in_process / evaluation:.1f}x"),
        ("the same promotion, deployed: 3 site agents as processes, mutual TLS, s", deployed, f"{deployed / evaluation:.1f}x"),
        ("deployed coordinator's shutdown, every site told, s", shutdown, "-"),
    ]


if __name__ == "__main__":
    for row in main():
        print(*row, sep="\t")
