"""A training-dominated round: the Ray backend's sites in parallel, against the in-process backend's one at a time.

digits, 4 sites, an MLP of two 512-unit layers (301,066 parameters) trained for 20 local epochs a
round with DP-SGD, SecAgg+ on: the round is mostly local training, not protocol. The baseline is
sequential: the in-process backend, the sites one after another on one core (one torch thread). Then
the same backend as it runs by default (each site's training on torch's threads, one per core), and
the Ray backend's pool, one worker per core, playing the sites two at a time. The second round's wall
time (the first also pays for setup), the median of three runs, each in a fresh interpreter, and the
accuracy each ends at (the same in every run: test mode's seeded noise; DP-SGD at this width learns little in two rounds,
which does not matter to the timing). The three ways take turns (baseline, threads, Ray; then
again), and each ratio is the median of the ratios within a turn: this machine's speed drifts by a
third over minutes, and all runs of one way before those of the next would read that drift as a
difference between them. Ray's rows are skipped when Ray is not installed.
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


def run(backend: str, threads: int | None = None) -> dict:
    """One run in a fresh interpreter; ``threads``: torch's (OMP_NUM_THREADS), else its default."""
    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    return last_json([sys.executable, "-c", PROBE, backend], backend, env)


def main() -> list[tuple[str, object, str]]:
    ways = {"sequential": ("in-process", 1), "threads": ("in-process", None)}
    if importlib.util.find_spec("ray") is not None:
        ways["ray"] = ("ray", None)
    turns = [{way: run(*how) for way, how in ways.items()} for _ in range(RUNS)]  # the ways take turns

    def note(way: str) -> tuple[float, str]:
        times = sorted(t[way]["second_round"] for t in turns)
        accuracy = {t[way]["accuracy"] for t in turns}
        assert len(accuracy) == 1, f"{way}: the same seed ended at different accuracies {accuracy}"
        ratio = statistics.median(t[way]["second_round"] / t["sequential"]["second_round"] for t in turns)
        lead = "" if way == "sequential" else f"{ratio:.2f}x (median of the turns' ratios); "
        return statistics.median(times), f"{lead}runs {times[0]:.2f}-{times[-1]:.2f} s; accuracy {accuracy.pop():.4f}"

    rows: list[tuple[str, object, str]] = [
        ("in-process, one core, sites one at a time: second round (s)  [baseline]", *note("sequential")),
        ("in-process, torch's threads, sites one at a time: second round (s)", *note("threads")),
    ]
    if "ray" not in ways:
        return rows + [("ray", "skipped", "Ray is not installed: pip install 'consortium[ray]'")]
    return rows + [("ray, 2 workers, sites two at a time: second round (s)", *note("ray"))]


if __name__ == "__main__":
    for row in main():
        print(*row, sep="  ")
