"""The run folder, written atomically: a crash never leaves a half-written file.

Each file is written to a temporary name in the same folder, flushed to disk,
then renamed over the target (rename is atomic on POSIX), and the folder
entry itself is flushed.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import save as safetensors_save


def write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def dumps(obj: Any) -> str:
    return json.dumps(obj, indent=2, sort_keys=False, allow_nan=False, default=_json_default)


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"cannot write {type(o).__name__} as JSON")


def new_run_dir(base: Path, label: str) -> Path:
    """A fresh folder under ``base`` named by time and label; never reuses one."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for i in range(1000):
        candidate = base / (f"{stamp}-{label}" + (f"-{i}" if i else ""))
        try:
            candidate.mkdir(parents=True, exist_ok=False)
            return candidate
        except FileExistsError:
            continue
    raise FileExistsError(f"could not create a new run folder under {base}")


class RunFolder:
    """config.yaml, metrics.jsonl (one line per round), model.safetensors, summary.json."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.mkdir(parents=True, exist_ok=True)
        self._metric_lines: list[str] = []

    def write_config(self, text: str) -> None:
        write_atomic(self.path / "config.yaml", text.encode())

    def append_metrics(self, record: dict[str, Any]) -> None:
        # Rewritten whole each time (the file is small), so it is always a set of complete lines.
        lines = [*self._metric_lines, json.dumps(record, allow_nan=False, default=_json_default)]
        write_atomic(self.path / "metrics.jsonl", ("\n".join(lines) + "\n").encode())
        self._metric_lines = lines  # only once it is on disk

    def write_model(self, tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> None:
        write_atomic(self.path / "model.safetensors", safetensors_save(tensors, metadata=metadata))

    def write_summary(self, summary: dict[str, Any]) -> None:
        write_atomic(self.path / "summary.json", (dumps(summary) + "\n").encode())
