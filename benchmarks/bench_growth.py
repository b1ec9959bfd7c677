"""How a simulated round's cost grows with the number of sites: in-process and Ray backends, protections on and off.

synthetic-hospitals, the default small MLP (482 parameters), SecAgg+ and
record-level DP on (the default), against the same round with both off; the
second round's wall time (the first also pays for setup), for N = 10 and 100
sites, and 1,000 with CONSORTIUM_BENCH_GROWTH_MAX=1000 (about a quarter of an
hour). Each run is its own fresh interpreter. In process, its peak resident
set (VmHWM) holds the coordinator and every simulated site; with Ray it is the
coordinator's alone (the sites live in the workers). The Ray backend runs
with its default pool (one worker per CPU) on a local Ray, and is skipped
when Ray is not installed.

The peer: Flower 1.42's simulation of the same run (benchmarks/flower_peer.py:
plain FedAvg, the same data partitions, model, local training and evaluation,
through this project's own code; its sites in Ray actors, one per CPU), timed
the same way, for each N, when a Flower interpreter is there:
CONSORTIUM_FLOWER_PYTHON, else .venv-flower/bin/python (`make flower-peer`
builds it; flwr's pins cannot share .venv). Otherwise one row says it was
skipped. Its peak is its driver's (the ServerApp and the simulation engine;
the sites live in the actors), like our Ray coordinator's.

The floor: this machine's cost of one Ed25519 check and one X25519 agreement (pyca/cryptography, as
the protocol calls them), measured in the same run, and from them the public-key work SecAgg+ cannot
skip per site and round: two sessions (fit and evaluate), each with k neighbours, one Ed25519 check of
each neighbour's signed keys and two X25519 agreements with it. Set against the in-process round with
both protections off (one process, so its wall time per site is its CPU per site), it says how far
above the plain round any protected round must stay.

Ratios: per site between successive N (1.0 is linear growth of the round);
per site and neighbour (SecAgg+'s degree k comes from the planner and grows
with N: a site's work is proportional to it, so this one should stay flat);
on against off in the same backend; Ray against in-process, protections on;
our Ray backend, protections on and off, against Flower at the same N.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

SIZES = [n for n in (10, 100, 1000) if n <= int(os.environ.get("CONSORTIUM_BENCH_GROWTH_MAX", "100"))]
BACKENDS = ["in-process"] + (["ray"] if importlib.util.find_spec("ray") is not None else [])
ROOT = Path(__file__).resolve().parent.parent
#: The interpreter that has Flower (its own environment): the peer runs only when it is there.
FLOWER_PYTHON = Path(os.environ.get("CONSORTIUM_FLOWER_PYTHON") or ROOT / ".venv-flower" / "bin" / "python")

#: Run in a fresh interpreter: argv = sites, "on" or "off", backend. Prints one JSON object.
PROBE = """\
import json, re, sys, tempfile, time
from pathlib import Path
from consortium.config import SimulationConfig
from consortium.run.simulation import Simulation
from consortium.secagg.graph import plan_graph
sites, mode, backend = int(sys.argv[1]), sys.argv[2], sys.argv[3]
config = SimulationConfig.model_validate({
    "rounds": 2, "seed": 0, "data": {"dataset": "synthetic-hospitals", "sites": sites},
    "privacy": {"enabled": mode == "on", "test_seed": 1}, "secure_aggregation": {"enabled": mode == "on"},
    "baselines": {"local_only": False, "pooled": False}, "backend": backend,
})
marks = []
with tempfile.TemporaryDirectory() as tmp:
    sim = Simulation(config, out=Path(tmp) / "run")
    result = sim.run(on_round=lambda record: marks.append(time.perf_counter()))
    assert result.summary["transcript"]["verified"], "the run did not verify"
with open("/proc/self/status") as f:
    peak = int(re.search(r"VmHWM:\\s+(\\d+) kB", f.read()).group(1)) * 1024
sa = config.secure_aggregation
print(json.dumps({"second_round": marks[1] - marks[0], "peak": peak,
                  "degree": plan_graph(sites, dropout_rate=sa.dropout_rate, corruption_rate=sa.corruption_rate).degree}))
"""


#: SecAgg+ sessions per round: one for each phase that sums (fit, evaluate).
SESSIONS_PER_ROUND = 2


def key_costs(repeat: int = 2000) -> tuple[float, float]:
    """Seconds per Ed25519 check and per X25519 agreement on this machine (the best of five batches)."""
    import timeit

    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    signer, message = Ed25519PrivateKey.generate(), b"consortium/secagg/v1/advert" + bytes(96)
    public, signature = signer.public_key(), signer.sign(message)
    own, peer = X25519PrivateKey.generate(), X25519PrivateKey.generate().public_key()
    check = min(timeit.repeat(lambda: public.verify(signature, message), number=repeat, repeat=5)) / repeat
    agree = min(timeit.repeat(lambda: own.exchange(peer), number=repeat, repeat=5)) / repeat
    return check, agree


def last_json(argv: list[str], what: str, env: dict[str, str] | None = None) -> dict:
    """Run ``argv`` (in ``env``, default this process's environment) and read the JSON object on the last line it prints."""
    out = subprocess.run(argv, capture_output=True, text=True, env=env)
    if out.returncode:
        raise RuntimeError(f"{what} failed: {out.stderr.strip().splitlines()[-1:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure(sites: int, mode: str, backend: str) -> dict[str, float]:
    return last_json([sys.executable, "-c", PROBE, str(sites), mode, backend], f"{backend} {sites} sites {mode}")


def measure_flower(sites: int) -> dict:
    """The Flower peer's run over ``sites`` sites (benchmarks/flower_peer.py, in Flower's interpreter)."""
    script = str(ROOT / "benchmarks" / "flower_peer.py")
    return last_json([str(FLOWER_PYTHON), script, str(sites)], f"flower {sites} sites")


def flower_rows(ray: dict[int, tuple[dict, dict]]) -> list[tuple[str, object, str]]:
    """The peer's rows for each N, with our Ray backend's (``ray[n]``: on, off) against it where it ran."""
    if not os.access(FLOWER_PYTHON, os.X_OK):
        return [("flower peer", "skipped", f"no Flower interpreter at {FLOWER_PYTHON}: make flower-peer "
                 "(or set CONSORTIUM_FLOWER_PYTHON)")]
    rows: list[tuple[str, object, str]] = []
    previous: dict[str, float] = {}
    for n in SIZES:
        try:
            peer = measure_flower(n)
        except RuntimeError as exc:  # the peer is optional: say so, and keep our rows
            return rows + [("flower peer", "failed", str(exc))]
        name = f"flower {'.'.join(peer['flower'].split('.')[:2])} FedAvg, {n} sites"
        per_site = peer["second_round"] / n
        notes = [f"{per_site / previous['per_site']:.2f}x per site vs {previous['n']:.0f}"] if previous else []
        peak_notes = [f"{peer['peak'] / previous['peak']:.2f}x vs {previous['n']:.0f}"] if previous else []
        if n in ray:
            on, off = ray[n]
            notes.append(f"ray on {on['second_round'] / peer['second_round']:.2f}x, "
                         f"off {off['second_round'] / peer['second_round']:.2f}x flower")
            peak_notes.append(f"ray coordinator on {on['peak'] / peer['peak']:.2f}x, off {off['peak'] / peer['peak']:.2f}x")
        rows += [
            (f"{name}, plain: second round (s)", peer["second_round"], "; ".join(notes)),
            (f"{name}: driver peak (MB)", f"{peer['peak'] / 2**20:.0f}", "; ".join(peak_notes)),
        ]
        previous = {"n": n, "per_site": per_site, "peak": peer["peak"]}
    return rows


def main() -> list[tuple[str, object, str]]:
    check, agree = key_costs()
    rows: list[tuple[str, object, str]] = [
        ("this machine: one Ed25519 check (us)", 1e6 * check, ""),
        ("this machine: one X25519 agreement (us)", 1e6 * agree, ""),
    ]
    in_process_on: dict[int, float] = {}
    ray: dict[int, tuple[dict, dict]] = {}  # N -> our Ray backend's runs, on and off: the peer is set against them
    for backend in BACKENDS:
        previous: dict[str, float] = {}
        for n in SIZES:
            on, off = measure(n, "on", backend), measure(n, "off", backend)
            per_site = on["second_round"] / n
            per_link = per_site / on["degree"]
            growth = f"{per_site / previous['per_site']:.2f}x per site vs {previous['n']:.0f}" if previous else ""
            link_growth = f"{per_link / previous['per_link']:.2f}x vs {previous['n']:.0f}" if previous else ""
            peak_growth = f"{on['peak'] / previous['peak']:.2f}x vs {previous['n']:.0f}" if previous else ""
            vs = f"; {on['second_round'] / in_process_on[n]:.2f}x in-process" if backend == "ray" else ""
            rows += [
                (f"{backend}, {n} sites, SecAgg+ and DP on: second round (s)", on["second_round"], growth + vs),
                (f"{backend}, {n} sites: ms per site per round", 1000 * per_site, ""),
                (f"{backend}, {n} sites: ms per site per neighbour (degree {on['degree']:.0f})", 1000 * per_link, link_growth),
                (f"{backend}, {n} sites, both off: second round (s)  [baseline]", off["second_round"],
                 f"on costs {on['second_round'] / off['second_round']:.2f}x"),
                (f"{backend}, {n} sites: {'coordinator' if backend == 'ray' else 'process'} peak, on / off (MB)",
                 f"{on['peak'] / 2**20:.0f} / {off['peak'] / 2**20:.0f}", peak_growth),
            ]
            if backend == "in-process":
                in_process_on[n] = on["second_round"]
                floor = SESSIONS_PER_ROUND * on["degree"] * (check + 2 * agree)
                rows.append((f"{backend}, {n} sites: SecAgg+ public-key floor (ms per site per round)", 1000 * floor,
                             f"{SESSIONS_PER_ROUND} sessions x {on['degree']:.0f} neighbours x (1 Ed25519 check + 2 X25519); "
                             f"{floor / (off['second_round'] / n):.2f}x the both-off round per site"))
            else:
                ray[n] = (on, off)
            previous = {"n": n, "per_site": per_site, "per_link": per_link, "peak": on["peak"]}
    if "ray" not in BACKENDS:
        rows.append(("ray backend", "skipped", "Ray is not installed: pip install 'consortium[ray]'"))
    return rows + flower_rows(ray)


if __name__ == "__main__":
    for name, value, ratio in main():
        print(f"{name:64s} {value:>12.4g}  {ratio}" if isinstance(value, float) else f"{name:64s} {value!s:>12}  {ratio}")
