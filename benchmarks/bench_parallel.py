"""A training-dominated round: the Ray backend's sites in parallel, against the in-process backend's one at a time.

digits, 4 sites, an MLP of two 512-unit layers (301,066 parameters) trained for 20 local epochs a
round with DP-SGD, SecAgg+ on: the round is mostly local training, not protocol. The baseline is
sequential: the in-process backend, the sites one after another on one core (one torch thread). Then
the same backend as it runs by default (each site's training on torch's threads, one per core), and
the Ray backend's pool, one worker per core, playing the sites two at a time. The second round's wall
time (the first also pays for setup), the median of three runs, each in a fresh interpreter (this
machine's in-process time swings by a third between identical runs), and the accuracy each ends at
(the same in every run: test mode's seeded noise; DP-SGD at this width learns little in two rounds,
which does not matter to the timing). Ray's rows are skipped when Ray is not installed.
"""

from __future__ import annotations

import importlib.util
import os
import statistics
import sys

from bench_growth import last_json

PROBE = """\
import json, sys, tempfile, time
from pathlib import Path
from consortium.config import SimulationConfig
from consortium.run.simulation import Simulation
config = SimulationConfig.model_validate({
    "rounds": 2, "seed": 0, "data": {"dataset": "digits", "sites": 4},
    "model": {"kind": "mlp", "hidden": [512, 512]}, "training": {"epochs": 20, "batch_size": 32},
    "privacy": {"test_seed": 1}, "baselines": {"local_only": False, "pooled": False}, "backend": sys.argv[1],
})
marks = []
with tempfile.TemporaryDirectory() as tmp:
    result = Simulation(config, out=Path(tmp) / "run").run(on_round=lambda record: marks.append(time.perf_counter()))
    assert result.summary["transcript"]["verified"], "the run did not verify"
print(json.dumps({"second_round": marks[1] - marks[0], "accuracy": result.summary["federated"]["accuracy"]}))
"""


RUNS = 3


def measure(backend: str, threads: int | None = None) -> tuple[float, str]:
    """The median second round of ``RUNS`` runs, and a note: their range and the accuracy (the same in each)."""
    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}  # threads: torch's, else its default
    runs = [last_json([sys.executable, "-c", PROBE, backend], backend, env) for _ in range(RUNS)]
    times = sorted(r["second_round"] for r in runs)
    accuracy = {r["accuracy"] for r in runs}
    assert len(accuracy) == 1, f"{backend}: the same seed ended at different accuracies {accuracy}"
    return statistics.median(times), f"runs {times[0]:.2f}-{times[-1]:.2f} s; accuracy {accuracy.pop():.4f}"


def main() -> list[tuple[str, object, str]]:
    base, note = measure("in-process", threads=1)
    rows: list[tuple[str, object, str]] = [("in-process, one core, sites one at a time: second round (s)  [baseline]", base, note)]
    threaded, note = measure("in-process")
    rows.append(("in-process, torch's threads, sites one at a time: second round (s)", threaded, f"{threaded / base:.2f}x; {note}"))
    if importlib.util.find_spec("ray") is None:
        return rows + [("ray", "skipped", "Ray is not installed: pip install 'consortium[ray]'")]
    ray, note = measure("ray")
    return rows + [("ray, 2 workers, sites two at a time: second round (s)", ray, f"{ray / base:.2f}x; {note}")]


if __name__ == "__main__":
    for row in main():
        print(*row, sep="  ")
