"""Reading a site's CSV: peak memory of read_csv on a 200 MB file, against the arrays it returns.

A clinical export of 12 columns (8 floats, 2 ints, 2 categories) and a
category label, deterministic (seed 0), grown to 200 MB (set
CONSORTIUM_BENCH_CSV_MB for another size). Each measure runs in a fresh
interpreter that has already imported Consortium; peak memory is that
process's peak resident set (VmHWM, reset after the imports), less its size
after the imports.
Baselines, measured in the same run: the bytes of the arrays read_csv
returns (float32 features, int64 labels: what any reader must hold at the
end), and the time of a bare csv.reader pass over the same file (parsing
rows into strings, converting nothing).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

SIZE_MB = float(os.environ.get("CONSORTIUM_BENCH_CSV_MB", "200"))
MB = 1 << 20

SCHEMA = """\
version: 1
label: outcome
columns:
  - {name: age, type: float, min: 0, max: 120}
  - {name: bmi, type: float, min: 10, max: 80}
  - {name: sbp, type: float}
  - {name: heart_rate, type: int, min: 20, max: 250}
  - {name: glucose, type: float}
  - {name: cholesterol, type: float}
  - {name: creatinine, type: float, min: 0}
  - {name: hemoglobin, type: float}
  - {name: visits, type: int, min: 0}
  - {name: sex, type: category, values: [F, M]}
  - {name: smoker, type: category, values: [never, former, current]}
  - {name: outcome, type: category, values: [no-event, event]}
"""

HEADER = "age,bmi,sbp,heart_rate,glucose,cholesterol,creatinine,hemoglobin,visits,sex,smoker,outcome\n"


def write_site_csv(path: Path, size_bytes: int, seed: int = 0) -> int:
    """Write a deterministic site CSV of at least ``size_bytes`` under :data:`SCHEMA`; return its rows."""
    rng = np.random.default_rng(seed)
    sex, smoker, outcome = ("F", "M"), ("never", "former", "current"), ("no-event", "event")
    rows, written = 0, 0
    with path.open("w", encoding="utf-8", newline="") as f:
        written += f.write(HEADER)
        while written < size_bytes:
            n = 50_000
            num = rng.normal([58, 27.5, 132, 76, 105, 195, 1.0, 13.5], [14, 5, 18, 12, 25, 38, 0.3, 1.6], (n, 8))
            num[:, 0] = num[:, 0].clip(0, 120)
            num[:, 1] = num[:, 1].clip(10, 80)
            num[:, 3] = num[:, 3].clip(20, 250).round()
            num[:, 6] = num[:, 6].clip(0, None)
            visits = rng.poisson(3, n)
            cats = rng.integers(0, [2, 3, 2], (n, 3))
            chunk = "".join(
                f"{a:.1f},{b:.2f},{c:.1f},{int(d)},{e:.2f},{g:.1f},{h:.3f},{i:.2f},{v},{sex[s]},{smoker[k]},{outcome[o]}\n"
                for (a, b, c, d, e, g, h, i), v, (s, k, o) in zip(num.tolist(), visits.tolist(), cats.tolist())
            )
            written += f.write(chunk)
            rows += n
    return rows


#: Run in a fresh interpreter: argv = CSV, schema, what to do. Prints one JSON object. Linux: it reads
#: /proc/self/status (ru_maxrss would count the parent's pages at the fork) and resets the peak first.
PROBE = """\
import csv, json, re, sys, time
from consortium.data.schema import load_schema, read_csv
path, schema, what = sys.argv[1:4]
schema = load_schema(schema)
def status(key):
    with open("/proc/self/status") as f:
        return int(re.search(key + r":\\s+(\\d+) kB", f.read()).group(1)) * 1024
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # the peak so far becomes the current size
before = status("VmRSS")
t0 = time.perf_counter()
if what == "read_csv":
    table = read_csv(path, schema)
    rows, array_bytes = table.n_rows, table.X.nbytes + table.y.nbytes
else:
    with open(path, newline="", encoding="utf-8") as f:
        rows = sum(1 for _ in csv.reader(f)) - 1
    array_bytes = 0
seconds = time.perf_counter() - t0
print(json.dumps({"before": before, "peak": status("VmHWM"), "seconds": seconds, "rows": rows, "array_bytes": array_bytes}))
"""


def measure(csv_path: Path, schema_path: Path, what: str = "read_csv") -> dict[str, float]:
    """One probe in a fresh interpreter: its resident size after imports, its peak, the seconds and rows."""
    out = subprocess.run([sys.executable, "-c", PROBE, str(csv_path), str(schema_path), what],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def main() -> list[tuple[str, object, str]]:
    with tempfile.TemporaryDirectory() as tmp:
        csv_path, schema_path = Path(tmp) / "site.csv", Path(tmp) / "schema.yaml"
        schema_path.write_text(SCHEMA, encoding="utf-8")
        write_site_csv(csv_path, int(SIZE_MB * MB))
        size = csv_path.stat().st_size
        bare = measure(csv_path, schema_path, "csv.reader")
        read = measure(csv_path, schema_path)
    growth = read["peak"] - read["before"]
    arrays = read["array_bytes"]
    return [
        (f"file: {read['rows']:,} rows (MB)", size / MB, ""),
        ("arrays read_csv returns: X float32 + y int64 (MB)  [baseline]", arrays / MB, f"{arrays / size:.2f}x file"),
        ("read_csv: peak growth above the interpreter (MB)", growth / MB, f"{growth / size:.2f}x file, {growth / arrays:.2f}x arrays"),
        ("read_csv: peak resident set, whole process (MB)", read["peak"] / MB, f"{read['peak'] / size:.2f}x file"),
        ("  the interpreter after imports (MB)", read["before"] / MB, ""),
        ("bare csv.reader pass, strings only (s)  [baseline]", bare["seconds"], "1.00x"),
        ("read_csv, every cell checked and converted (s)", read["seconds"], f"{read['seconds'] / bare['seconds']:.1f}x"),
        ("  rows per second", read["rows"] / read["seconds"], ""),
    ]


if __name__ == "__main__":
    for name, value, ratio in main():
        print(f"{name:64s} {value:>12.4g}  {ratio}" if isinstance(value, float) else f"{name:64s} {value!s:>12}  {ratio}")
