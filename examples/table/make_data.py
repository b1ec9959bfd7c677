"""Write the table example's data: three hospitals' CSV files with categorical columns and missing values.

Generated records (nothing is downloaded): age, sex, BMI (missing for some
patients), smoking status (missing for others), admission type, prior visits
and creatinine, and whether the patient was readmitted. The hospitals differ
in size, case mix and how often they record BMI and smoking; each is too
small to learn the outcome well alone.

    python examples/table/make_data.py [--out examples/table/data]
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np

#: Per hospital: records, share of emergency admissions, share of BMI and smoking status left unrecorded.
HOSPITALS = {"hospital-a": (220, 0.3, 0.10, 0.05), "hospital-b": (140, 0.6, 0.25, 0.30), "hospital-c": (90, 0.45, 0.05, 0.15)}


def records(n: int, emergency: float, no_bmi: float, no_smoking: float, rng: np.random.Generator) -> list[list[str]]:
    age = rng.uniform(18, 95, n)
    male = rng.random(n) < 0.5
    bmi = rng.normal(27, 5, n).clip(12, 60)
    smoker = rng.choice(3, n, p=[0.5, 0.3, 0.2])
    admission = rng.choice(3, n, p=[1 - emergency - 0.1, emergency, 0.1])
    visits = rng.poisson(1.5, n)
    creatinine = rng.lognormal(0.0, 0.35, n)
    logit = (-2.2 + 0.035 * (age - 60) + 0.08 * (bmi - 27) + 0.7 * (smoker == 2) + 0.3 * (smoker == 1)
             + 1.0 * (admission == 1) + 0.35 * visits + 1.2 * (creatinine - 1.0) + 0.2 * male)
    readmitted = rng.random(n) < 1 / (1 + np.exp(-logit))
    rows = []
    for i in range(n):
        rows.append([
            f"{age[i]:.1f}", "M" if male[i] else "F",
            "" if rng.random() < no_bmi else f"{bmi[i]:.1f}",
            "" if rng.random() < no_smoking else ("never", "former", "current")[smoker[i]],
            ("elective", "emergency", "transfer")[admission[i]], str(visits[i]), f"{creatinine[i]:.2f}",
            "yes" if readmitted[i] else "no",
        ])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "data")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(args.seed)
    for name, spec in HOSPITALS.items():
        path = args.out / f"{name}.csv"
        with open(path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["age", "sex", "bmi", "smoker", "admission", "prior_visits", "creatinine", "readmitted"])
            writer.writerows(records(*spec, rng))
        print(f"{name}: {spec[0]} records in {path}")


if __name__ == "__main__":
    main()
