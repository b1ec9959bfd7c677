"""The Ray backend: the same run as in process, a lost worker as a dropout, and only bytes across Ray.

Ray runs locally here (real worker processes on this machine, two CPUs), started once for the module.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import yaml
from safetensors.numpy import load_file

ray = pytest.importorskip("ray")

from consortium.audit.verify import verify_run  # noqa: E402
from consortium.config import SimulationConfig  # noqa: E402
from consortium.errors import ConfigError  # noqa: E402
from consortium.privacy.ledger import BudgetLedger  # noqa: E402
from consortium.protocol import messages as m  # noqa: E402
from consortium.run import ray_backend  # noqa: E402
from consortium.run.simulation import Simulation  # noqa: E402
from consortium.run.sites import LEDGER_FILE, site_state  # noqa: E402
from ray._private.serialization import SerializationContext  # noqa: E402
from tests import forkserver  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield
    ray.shutdown()


def _config(sites: int, **over) -> SimulationConfig:
    return SimulationConfig.model_validate({
        "rounds": 2, "seed": 3, "data": {"dataset": "synthetic-hospitals", "sites": sites},
        "privacy": {"test_seed": 5}, "baselines": {"local_only": False, "pooled": False}, **over,
    })


def test_ray_and_in_process_train_the_same_model(tmp_path):
    # Test mode (seeded noise), SecAgg+ and record-level DP on, and dropout: the dropout draws, the sites'
    # randomness and the sums are the same whoever plays the sites, so the model is bit for bit the same,
    # and so are the baselines.
    # The Ray side is the real command line in its own process, on a local Ray of its own.
    config = _config(6, participation={"dropout": 0.5}, baselines={"local_only": True, "pooled": True})
    local = Simulation(config, out=tmp_path / "local").run()
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config.model_dump(mode="json", exclude_defaults=True)))
    proc = forkserver.run(
        [sys.executable, "-m", "consortium.cli", "simulate", str(tmp_path / "run.yaml"), "--backend", "ray",
         "--out", str(tmp_path / "ray"), "--json"], capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("\n") == 1  # one JSON line; on the console, only the run's own warning, nothing from Ray
    assert proc.stderr.split() == "WARNING: privacy noise is in TEST MODE (fixed seed): reproducible, and NOT private".split()
    remote = json.loads(proc.stdout)
    assert remote["backend"] == {"kind": "ray", "workers": 2, "nodes": 1, "cluster": "local", "auth": "token"}
    assert local.summary["backend"] == {"kind": "in-process"}
    assert remote["federated"] == local.summary["federated"]
    # The local-only baselines trained on the workers (each its own sites'), the pooled one in the coordinator.
    assert remote["local_only"] == local.summary["local_only"] and remote["pooled"] == local.summary["pooled"]
    assert remote["privacy"]["epsilon_per_site"] == local.summary["privacy"]["epsilon_per_site"]
    model, twin = load_file(str(tmp_path / "ray" / "model.safetensors")), load_file(str(tmp_path / "local" / "model.safetensors"))
    assert model.keys() == twin.keys() and all(np.array_equal(model[k], twin[k]) for k in model)
    dropped = [json.loads(line)["dropped"] for line in (tmp_path / "ray" / "metrics.jsonl").read_text().splitlines()]
    assert dropped == [r.dropped for r in local.history] and any(dropped)  # the dropout was exercised, alike
    verify_run(tmp_path / "ray")


# Two Ray nodes on this machine, each its own raylet and object store with one CPU, in a process of their
# own (apart from this module's local Ray); the cluster stops when its stdin closes.
TWO_NODES = """
import shutil, sys, tempfile
from ray.cluster_utils import Cluster
own = tempfile.mkdtemp(prefix="ray-")  # its session files apart: a local Ray started meanwhile does not find it
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "object_store_memory": 80 * 2**20, "temp_dir": own})
cluster.add_node(num_cpus=1, object_store_memory=80 * 2**20)
cluster.wait_for_nodes()
print(cluster.address, flush=True)
sys.stdin.read()
cluster.shutdown()
shutil.rmtree(own, ignore_errors=True)
"""


# A run on the Ray backend, in a process of its own that starts its own local Ray: says where that Ray's
# GCS listens and what the run warns before training, waits for a line on stdin, then runs (one round).
OWN_RAY = """
import json, sys
from pathlib import Path
import ray
from consortium.config import SimulationConfig
from consortium.run.simulation import Simulation
sim = Simulation(SimulationConfig.model_validate_json(sys.argv[1]), out=Path(sys.argv[2]))
print(json.dumps({"gcs": ray.get_runtime_context().gcs_address, "before": list(sim.warnings)}), flush=True)
sys.stdin.readline()
summary = sim.run().summary
print(json.dumps({"warnings": summary["warnings"], "backend": summary["backend"]}), flush=True)
"""

# Someone else on the network, with this package and Ray but not the Ray's token: asks the GCS for its nodes.
INTRUDER = """
import sys
from ray._raylet import GcsClient
try:
    print("JOINED", len(GcsClient(address=sys.argv[1], cluster_id=None).get_all_node_info(timeout=10)))
except Exception as exc:
    print("REFUSED", type(exc).__name__)
"""


@pytest.mark.parametrize("auth_mode", [None, "disabled"])
def test_the_local_ray_a_run_starts_refuses_a_client_without_its_token_and_a_run_without_it_says_so(tmp_path, auth_mode):
    # Ray's GCS and raylets listen on the machine's address, not loopback: without Ray's token authentication
    # (on by default in Ray 2.60 for a cluster ray.init starts) anyone who reaches the ports runs code in the
    # workers, which hold every simulated site's data and the secret their keys derive from.
    clean = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}  # this module's Ray set RAY_AUTH_MODE
    env = {**clean, **({"RAY_AUTH_MODE": auth_mode} if auth_mode else {})}
    config = _config(3, rounds=1, backend="ray").model_dump_json()
    run = subprocess.Popen([sys.executable, "-c", OWN_RAY, config, str(tmp_path / "run")], env=env, text=True,
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        started = json.loads(run.stdout.readline() or "null")
        assert started is not None, run.stderr.read()[-2000:] if run.poll() is not None else "the run said nothing"
        home = tmp_path / "elsewhere"  # no ~/.ray/auth_token there
        home.mkdir()
        probe = subprocess.run([sys.executable, "-c", INTRUDER, started["gcs"]], env={**clean, "HOME": str(home)},
                               capture_output=True, text=True, timeout=120)
        run.stdin.write("go\n")
        run.stdin.flush()
        ended = json.loads(run.stdout.readline() or "null")
        assert ended is not None, run.stderr.read()[-2000:]
        run.communicate(timeout=120)  # it ends by itself: its pool stops the Ray it started
    finally:
        if run.poll() is None:
            run.kill()
            run.communicate()
    loud = [w for w in started["before"] if "WITHOUT token authentication" in w]
    if auth_mode is None:
        assert probe.stdout.startswith("REFUSED AuthenticationError"), probe.stdout + probe.stderr[-1000:]
        assert not loud and ended["backend"]["auth"] == "token"
        assert not any("WITHOUT token authentication" in w for w in ended["warnings"])
    else:  # the same probe gets in once the defence is off: the refusal above is the token's doing
        assert probe.stdout.startswith("JOINED"), probe.stdout + probe.stderr[-1000:]
        assert len(loud) == 1 and "unset RAY_AUTH_MODE" in loud[0] and ended["backend"]["auth"] == "none"
        assert loud[0] in ended["warnings"]  # and the summary repeats it


def test_a_run_joins_a_ray_cluster_by_address_uses_both_nodes_and_trains_the_same_model(tmp_path):
    # ray.address: the run joins an existing cluster, as on machines that share the run folder. One worker per
    # CPU, so one on each node; the model is the one the in-process backend trains.
    config = _config(4)
    local = Simulation(config, out=tmp_path / "local").run()
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config.model_dump(mode="json", exclude_defaults=True)))
    cluster = subprocess.Popen([sys.executable, "-c", TWO_NODES], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        address = cluster.stdout.readline().strip()
        assert address, "the two-node Ray cluster did not start"
        proc = forkserver.cli("simulate", tmp_path / "run.yaml", "--backend", "ray", "--ray-address", address,
                              "--out", tmp_path / "ray", "--json", capture_output=True, text=True, timeout=600)
    finally:
        cluster.stdin.close()
        cluster.wait(timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    remote = json.loads(proc.stdout)
    assert remote["backend"] == {"kind": "ray", "workers": 2, "nodes": 2, "cluster": address, "auth": "token"}
    assert remote["federated"] == local.summary["federated"]
    model, twin = load_file(str(tmp_path / "ray" / "model.safetensors")), load_file(str(tmp_path / "local" / "model.safetensors"))
    assert all(np.array_equal(model[k], twin[k]) for k in twin)
    verify_run(tmp_path / "ray")


def test_the_sites_are_dealt_to_the_workers_by_training_rows_so_no_worker_carries_the_round_alone():
    # The four digits sites of a Dirichlet split (387, 374, 337, 159 rows): dealt in name order, one worker
    # would train 761 rows while the other trained 496; dealt largest first in a snake, 711 and 546, the best
    # two-way split there is. Every worker gets as many sites as another (one fewer at most), whatever the rows.
    rows = {"site-1": 337, "site-2": 387, "site-3": 159, "site-4": 374}
    home = ray_backend.deal(rows, 2)
    load = [sum(r for name, r in rows.items() if home[name] == w) for w in (0, 1)]
    assert sorted(load) == [546, 711]
    many = ray_backend.deal({f"s{i}": (i * 37) % 101 for i in range(1000)}, 3)
    counts = [list(many.values()).count(w) for w in range(3)]
    assert max(counts) - min(counts) <= 1 and sorted(many) == sorted(f"s{i}" for i in range(1000))
    assert ray_backend.deal(rows, 2) == home  # the same sites, the same workers
    assert set(ray_backend.deal(rows, 8).values()) == {0, 1, 2, 3}  # more workers than sites: one site each


def _restarted(host, timeout: float = 120.0) -> None:
    """Wait until Ray has restarted ``host``: a call made while it restarts fails (the pool retries none), so ask again."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            ray.get(host.ready.remote())
            return
        except (ray.exceptions.ActorUnavailableError, ray.exceptions.RayActorError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def test_a_killed_worker_is_a_dropout_its_sites_pay_once_and_nothing_is_pickled(tmp_path, monkeypatch):
    # 6 sites on 3 workers; the process of the worker playing hospital-1 (and hospital-6) is killed (SIGKILL, as
    # the kernel's OOM killer would) in round 1, after its sites trained, paid and shared their keys, and before
    # they send their masked inputs. Ray restarts it; its sites rebuild from the run folder.
    sim = Simulation(_config(6, backend="ray", ray={"workers": 3, "num_cpus": 0.5}), out=tmp_path / "run")
    pool = sim._pool
    host = pool.hosts[pool.channel.home["hospital-1"]]
    victims = sorted(n for n, h in pool.channel.home.items() if h == pool.channel.home["hospital-1"])
    assert victims == ["hospital-1", "hospital-6"]  # dealt by training rows (289 and 278: the middle two)
    pid = ray.get(host.__ray_call__.remote(lambda worker: os.getpid()))
    killed = []
    stage = ray_backend.RayTransport.exchange_many

    def kill_before_masking(self, requests):
        if not killed and requests and requests[0].round == 1 and isinstance(requests[0].message, m.SecAggDeliver):
            os.kill(pid, signal.SIGKILL)
            killed.append(requests[0].round)
        return stage(self, requests)

    monkeypatch.setattr(ray_backend.RayTransport, "exchange_many", kill_before_masking)
    # What crosses Ray in a stage is [member, sealed bytes] pairs: Ray frames them with msgpack. A pickled
    # argument or reply, a lost worker's included, would go through these two functions of Ray's serializer.
    pickled = []
    for name in ("_serialize_to_pickle5", "_deserialize_pickle5_data"):
        original = getattr(SerializationContext, name)
        monkeypatch.setattr(SerializationContext, name, lambda self, *a, _o=original, _n=name, **k: pickled.append(_n) or _o(self, *a, **k))
    # Round 2 starts once Ray has restarted the worker (a busy machine may take longer than round 1's end):
    # a site still away when round 2's plan is co-signed would sit that round out, and this test is about the next.
    result = sim.run(on_round=lambda record: record.round == 1 and _restarted(host))
    assert pickled == [] and sim.transport.bytes_sent > 0
    assert killed == [1]
    assert result.summary["status"] == "completed", result.summary.get("halt")
    first = result.history[0]
    # The round went on with the four survivors; the victims' batch was lost with the worker, or their rebuilt
    # sites refused a stage of a session they no longer hold: either way, not in the sum.
    assert first.status == "ok" and first.secure["fit_included"] == 4
    assert set(victims) <= set(first.dropped) | set(first.refused)
    assert pool.channel.lost >= 1 or set(victims) <= set(first.refused)
    assert set(victims) <= set(result.history[1].answered)  # the restarted worker's sites take part again
    verify_run(tmp_path / "run")  # every ledger agrees with the events its site signed
    for name in victims:
        ledger = BudgetLedger(site_state(tmp_path / "run", name) / LEDGER_FILE, site=name, epsilon_cap=1e9, delta=1e-5)
        paid = [row["round"] for row in ledger.history()]
        assert paid == [1, 2], paid  # round 1 paid once, though its input never arrived


def test_the_ray_backend_refuses_what_it_cannot_build_from_the_config(tmp_path, monkeypatch):
    from consortium.learning.task import load_task
    from consortium.protocol.trainer import PlainTrainer

    with pytest.raises(ConfigError, match="trainer object.*backend: in-process"):
        Simulation(_config(3, backend="ray"), out=tmp_path / "a", trainer=PlainTrainer(load_task("classification")))
    with pytest.raises(ConfigError, match="needs 3 CPUs and the Ray cluster has 2"):  # not a wait for ever
        Simulation(_config(3, backend="ray", ray={"workers": 3}), out=tmp_path / "d")
    # A worker that cannot build its sites says why (kept for ready(), not raised into a restart loop).
    run = {"cwd": str(tmp_path), "run_dir": str(tmp_path / "b"), "key_secret": "00" * 32,
           "config": _config(3, task="no/such/file.py:Task").model_dump(mode="json")}
    assert "no/such/file.py" in ray_backend.SiteHost([json.dumps(run).encode(), b'{"sites": []}']).ready()
    monkeypatch.setitem(__import__("sys").modules, "ray", None)  # Ray not installed: one line with the fix
    with pytest.raises(ConfigError, match=r"pip install 'consortium\[ray\]'"):
        Simulation(_config(3, backend="ray"), out=tmp_path / "c")
