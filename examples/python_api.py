"""Run a consortium from Python, print what it measured, and verify it: the notebook path.

    .venv/bin/python examples/python_api.py [RUN_DIR]

Three simulated hospitals on the breast-cancer data, with secure aggregation
and record-level differential privacy on (the defaults), then the same
checks ``consortium verify`` makes. ``make test`` runs this file.
"""

from __future__ import annotations

import sys

import consortium


def main(out: str | None = None) -> None:
    result = consortium.simulate(
        rounds=3,
        data={"dataset": "breast-cancer", "sites": 3},
        privacy={"epsilon": 8.0},
        baselines={"local_only": False, "pooled": False},
        out=out,
    )
    print(f"run folder: {result.run_dir}")
    for name, value in result.metrics.items():
        print(f"  {name}: {value:.4f}" if value is not None else f"  {name}: not finite")
    print("epsilon per site: " + ", ".join(f"{site} {eps:.3f}" for site, eps in result.epsilon.items()))
    report = consortium.verify(result.run_dir)
    print(f"verified: {report.entries} signed entries, {report.heads} co-signed heads, summary {report.summary}")
    if not report.anchored_by:
        print("(consistency only: pass agreement=... or kit=... to check it against what you hold)")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
