"""How a simulated round's cost grows with the number of sites, in-process, protections on and off.

synthetic-hospitals, the default small MLP (482 parameters), SecAgg+ and
record-level DP on (the default), against the same round with both off; the
second round's wall time (the first also pays for setup), for N = 10 and 100
sites, and 1,000 with CONSORTIUM_BENCH_GROWTH_MAX=1000 (several minutes).
Each run is its own fresh interpreter; its peak resident set (VmHWM) holds the
coordinator and every simulated site, since they share the process. The
ratio between successive N is per site per round: 1.0 is linear growth.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

SIZES = [n for n in (10, 100, 1000) if n <= int(os.environ.get("CONSORTIUM_BENCH_GROWTH_MAX", "100"))]

#: Run in a fresh interpreter: argv = sites, "on" or "off". Prints one JSON object.
PROBE = """\
import json, re, sys, tempfile, time
from consortium.config import SimulationConfig
from consortium.run.simulation import Simulation
sites, mode = int(sys.argv[1]), sys.argv[2]
config = SimulationConfig.model_validate({
    "rounds": 2, "seed": 0, "data": {"dataset": "synthetic-hospitals", "sites": sites},
    "privacy": {"enabled": mode == "on", "test_seed": 1}, "secure_aggregation": {"enabled": mode == "on"},
    "baselines": {"local_only": False, "pooled": False},
})
marks = []
with tempfile.TemporaryDirectory() as tmp:
    sim = Simulation(config, out=__import__("pathlib").Path(tmp) / "run")
    start = time.perf_counter()
    sim.run(on_round=lambda record: marks.append(time.perf_counter()))
with open("/proc/self/status") as f:
    peak = int(re.search(r"VmHWM:\\s+(\\d+) kB", f.read()).group(1)) * 1024
print(json.dumps({"second_round": marks[1] - marks[0], "peak": peak}))
"""


def measure(sites: int, mode: str) -> dict[str, float]:
    out = subprocess.run([sys.executable, "-c", PROBE, str(sites), mode], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> list[tuple[str, object, str]]:
    rows: list[tuple[str, object, str]] = []
    previous: dict[str, float] = {}
    for n in SIZES:
        on, off = measure(n, "on"), measure(n, "off")
        per_site = on["second_round"] / n
        growth = f"{per_site / previous['per_site']:.2f}x per site vs {previous['n']}" if previous else ""
        rows += [
            (f"{n} sites, SecAgg+ and DP on: second round (s)", on["second_round"], growth),
            (f"{n} sites: seconds per site per round", per_site, ""),
            (f"{n} sites, both off: second round (s)  [baseline]", off["second_round"],
             f"on costs {on['second_round'] / off['second_round']:.2f}x"),
            (f"{n} sites: process peak, on / off (MB)", f"{on['peak'] / 2**20:.0f} / {off['peak'] / 2**20:.0f}", ""),
        ]
        previous = {"n": n, "per_site": per_site}
    return rows


if __name__ == "__main__":
    for name, value, ratio in main():
        print(f"{name:56s} {value:>12.4g}  {ratio}" if isinstance(value, float) else f"{name:56s} {value!s:>12}  {ratio}")
