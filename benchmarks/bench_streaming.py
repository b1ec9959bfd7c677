"""A site's work on records read on demand: peak memory and time against the same records held in memory.

16,000 colour images of 32x32 (set CONSORTIUM_BENCH_STREAM_IMAGES for another
count), uint8 in a ``.npy`` file, read by ``load_image_array``: at once (the
baseline: float32 in memory, 197 MB) or with ``stream=True`` (the file
memory-mapped, each batch of 512 converted when a step reads it). The site's
work, the same in both: the setup sums over every record, 4 DP-SGD steps at
sampling rate 0.05 (about 800 records a step, clipped and summed in chunks of
512 when streamed) on a linear model of the pixels, and the evaluation sums
over every record. Each mode runs in a fresh interpreter that has already
imported Consortium; peak memory is that process's peak resident set (VmHWM,
reset after the imports), less its size after the imports. It counts the
pages of the memory-mapped file that a pass has touched (shown apart: the
kernel drops them under pressure), so the streamed peak grows slowly with the
file while its own allocations stay one batch.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

IMAGES = int(os.environ.get("CONSORTIUM_BENCH_STREAM_IMAGES", "16000"))
MB = 1 << 20

#: Run in a fresh interpreter: argv = images.npy, labels.npy, "stream" or "memory". Prints one JSON object.
PROBE = """\
import json, re, sys, time
import numpy as np, torch
from consortium.data import load_image_array
from consortium.learning.models import Standardize
from consortium.learning.specs import TrainSettings
from consortium.learning.task import DataShape, evaluate_records, load_task
from consortium.learning.training import TrainingData
from consortium.privacy.dpsgd import secure_generator, train_dp_sgd
from consortium.protocol.contributions import read_setup_sum, setup_sums
images, labels, mode = sys.argv[1:4]
def status(key):
    with open("/proc/self/status") as f:
        return int(re.search(key + r":\\s+(\\d+) kB", f.read()).group(1)) * 1024
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
before = status("VmRSS")
t0 = time.perf_counter()
records = load_image_array(images, labels, layout="NCHW", stream=mode == "stream")
s = read_setup_sum(setup_sums(records), records.n_features)
shape = DataShape(records.n_features, records.classes, records.image_shape, s.mean, s.scale)
torch.manual_seed(0)
model = torch.nn.Sequential(Standardize(s.mean, s.scale), torch.nn.Linear(records.n_features, 2))
train_dp_sgd(model, TrainingData(records), TrainSettings(lr=0.05, momentum=0.0), sampling_rate=0.05,
             noise_multiplier=1.0, clip=1.0, steps=4, generator=secure_generator(0))
task = load_task("classification")
metrics = task.summarise(evaluate_records(task, model, records, shape), shape).metrics
seconds = time.perf_counter() - t0
print(json.dumps({"before": before, "peak": status("VmHWM"), "file": status("RssFile"), "seconds": seconds,
                  "accuracy": metrics["accuracy"]}))
"""


def measure(images: Path, labels: Path, mode: str) -> dict[str, float]:
    out = subprocess.run([sys.executable, "-c", PROBE, str(images), str(labels), mode],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def main() -> list[tuple[str, object, str]]:
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        images, labels = Path(tmp) / "images.npy", Path(tmp) / "labels.npy"
        y = rng.integers(0, 2, IMAGES)
        pixels = rng.integers(0, 200, (IMAGES, 3, 32, 32), dtype=np.uint8)
        pixels[y == 1, 0] += 40  # the red channel tells the class
        np.save(images, pixels)
        np.save(labels, y)
        memory = measure(images, labels, "memory")
        stream = measure(images, labels, "stream")
    floats = IMAGES * 3 * 32 * 32 * 4
    grow_m, grow_s = memory["peak"] - memory["before"], stream["peak"] - stream["before"]
    return [
        (f"records: {IMAGES:,} images 3x32x32, as float32 (MB)", floats / MB, ""),
        ("in memory: peak growth above the interpreter (MB)  [baseline]", grow_m / MB, "1.00x"),
        ("streamed, batches of 512: peak growth (MB)", grow_s / MB, f"{grow_s / grow_m:.2f}x"),
        ("  RssFile at the end, in memory / streamed (MB: shared libraries, touched pages of the .npy)",
         f"{memory['file'] / MB:.0f} / {stream['file'] / MB:.0f}", ""),
        ("in memory: seconds for setup, 4 DP-SGD steps, evaluation  [baseline]", memory["seconds"], "1.00x"),
        ("streamed: seconds for the same", stream["seconds"], f"{stream['seconds'] / memory['seconds']:.2f}x"),
        ("accuracy, in memory / streamed (the same model)", f"{memory['accuracy']:.4f} / {stream['accuracy']:.4f}", ""),
    ]


if __name__ == "__main__":
    for name, value, ratio in main():
        print(f"{name:72s} {value:>12.4g}  {ratio}" if isinstance(value, float) else f"{name:72s} {value!s:>12}  {ratio}")
