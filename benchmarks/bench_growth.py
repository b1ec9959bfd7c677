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

Ratios: per site between successive N (1.0 is linear growth of the round);
per site and neighbour (SecAgg+'s degree k comes from the planner and grows
with N: a site's work is proportional to it, so this one should stay flat);
on against off in the same backend; Ray against in-process, protections on.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

SIZES = [n for n in (10, 100, 1000) if n <= int(os.environ.get("CONSORTIUM_BENCH_GROWTH_MAX", "100"))]
BACKENDS = ["in-process"] + (["ray"] if importlib.util.find_spec("ray") is not None else [])

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


def measure(sites: int, mode: str, backend: str) -> dict[str, float]:
    out = subprocess.run([sys.executable, "-c", PROBE, str(sites), mode, backend], capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"{backend} {sites} sites {mode} failed: {out.stderr.strip().splitlines()[-1:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> list[tuple[str, object, str]]:
    rows: list[tuple[str, object, str]] = []
    in_process_on: dict[int, float] = {}
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
            previous = {"n": n, "per_site": per_site, "per_link": per_link, "peak": on["peak"]}
    if "ray" not in BACKENDS:
        rows.append(("ray backend", "skipped", "Ray is not installed: pip install 'consortium[ray]'"))
    return rows


if __name__ == "__main__":
    for name, value, ratio in main():
        print(f"{name:64s} {value:>12.4g}  {ratio}" if isinstance(value, float) else f"{name:64s} {value!s:>12}  {ratio}")
