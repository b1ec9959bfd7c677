"""Record-level DP (epsilon 8): the default DP-SGD recipe's log-loss against the constant predictor's.

Each row runs the default config of one tabular study twice per seed, with
record-level DP at epsilon 8 and everything else at its default, except:

- ``recipe``: the defaults as they stand (clip 3, plain SGD at step 0.05);
- ``old recipe``: the defaults before (clip 1, momentum 0.9): the baseline.

and reports the federated model's mean test log-loss over the seeds, the
constant predictor's (the pooled label frequencies), and in how many runs the
model ended worse than that constant. Secure aggregation is off here to halve
the time: it changes how the sum is computed, not the DP noise or the model.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

import consortium

SEEDS = (0, 1)
ROOT = Path(__file__).resolve().parent.parent
OLD = {"training": {"momentum": 0.9}, "privacy": {"level": "record", "epsilon": 8.0, "clip": 1.0}}


def _studies(tmp: Path) -> dict[str, dict]:
    subprocess.run(
        [sys.executable, str(ROOT / "examples/table/make_data.py"), "--out", str(tmp / "table")],
        check=True, capture_output=True,
    )
    schema = str(ROOT / "examples/table/schema.yaml")
    return {
        "synthetic-hospitals, 5 sites of 400 rows": {"data": {"dataset": "synthetic-hospitals", "sites": 5}},
        "synthetic-hospitals, 5 sites of 100 rows": {
            "data": {"dataset": "synthetic-hospitals", "sites": 5, "synthetic": {"rows_per_site": 100}},
        },
        "the table example (3 CSVs, 450 rows, MLP)": {
            "rounds": 15,
            "data": {"dataset": "csv", "csv_sites": [
                {"name": f"hospital-{c}", "csv": str(tmp / "table" / f"hospital-{c}.csv"), "schema": schema}
                for c in "abc"
            ]},
        },
        "breast-cancer, 3 sites": {"data": {"dataset": "breast-cancer", "sites": 3}},
    }


def _losses(study: dict, extra: dict, out: Path) -> list[tuple[float, float]]:
    runs = []
    for seed in SEEDS:
        config = {
            "seed": seed, "baselines": {"local_only": False, "pooled": False},
            "secure_aggregation": {"enabled": False}, "privacy": {"level": "record", "epsilon": 8.0},
            **study, **extra,
        }
        result = consortium.simulate(config, out=out / f"run-{len(list(out.iterdir()))}")
        runs.append((result.metrics["loss"], result.metrics["constant_loss"]))
    return runs


def main() -> list[tuple[str, object, str]]:
    rows: list[tuple[str, object, str]] = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        (tmp / "runs").mkdir()
        for name, study in _studies(tmp).items():
            old = np.array(_losses(study, OLD, tmp / "runs"))
            new = np.array(_losses(study, {}, tmp / "runs"))
            constant = float(new[:, 1].mean())
            for label, runs in (("recipe", new), ("old recipe", old)):
                loss, worse = float(runs[:, 0].mean()), int((runs[:, 0] > runs[:, 1]).sum())
                rows.append((f"{name}: log-loss, {label}", loss,
                             f"{loss / constant:.2f}x; {worse}/{len(runs)} runs worse than constant"))
            rows.append((f"{name}: constant predictor's log-loss", constant, "baseline"))
    return rows


if __name__ == "__main__":
    for row in main():
        print(*row, sep="\t")
