"""The run folder, written atomically: a crash never leaves a half-written file.

Each file is written to a temporary name in the same folder, flushed to disk,
then renamed over the target (rename is atomic on POSIX), and the folder
entry itself is flushed.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load as safetensors_load
from safetensors.numpy import save as safetensors_save

from consortium.errors import ConfigError

CHECKPOINT = "checkpoint"  # checkpoint.json (state, and the hash of) checkpoint.safetensors (arrays)


def write_atomic(path: Path, data: bytes) -> None:
    with _atomic(path) as f:
        f.write(data)


@contextmanager
def _atomic(path: Path) -> Iterator[BinaryIO]:
    """A file to write ``path``'s new bytes to: on leaving, flushed to disk, renamed over ``path``, the folder flushed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
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


SPOOL_SUFFIX = ".spool"
_SAFETENSORS_DTYPES = {np.dtype("<u4"): "U32", np.dtype("<u8"): "U64"}


class MaskedSpool:
    """Vectors appended to a file as they arrive, then written out as one safetensors file, never all in memory.

    The coordinator of a secure session keeps the running sum of the masked inputs and nothing else per
    site (O(M), not O(N x M)); each input goes here, for the evidence archive from which ``verify``
    recomputes the sum. ``safetensors`` writes only from tensors held in memory, so its format (the header's
    length as 8 little-endian bytes, a JSON header of each tensor's dtype, shape and byte offsets, padded
    with spaces to 8 bytes, then the tensors' bytes) is written here; ``tests/test_runs.py`` holds the
    result byte-equal to ``safetensors.numpy.save`` of the same vectors. Unsigned ring words only.
    """

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._file: BinaryIO | None = open(path, "wb")
        self._index: dict[str, tuple[str, int, int, int]] = {}  # name -> (dtype, length, offset, bytes) in the spool
        self._size = 0

    def add(self, name: str, vector: np.ndarray) -> None:
        """Append ``vector`` (1-D uint32 or uint64) under ``name``. ``ValueError`` for a name twice or another dtype."""
        if self._file is None:
            raise ValueError(f"the spool {self.path.name} is already written out")
        if name in self._index:
            raise ValueError(f"'{name}' is in the spool already")
        little = vector.dtype.newbyteorder("<")
        if vector.ndim != 1 or little not in _SAFETENSORS_DTYPES:
            raise ValueError(f"a spool holds 1-D unsigned ring words, not {vector.dtype} {vector.shape}")
        raw = np.ascontiguousarray(vector, dtype=little)
        self._file.write(raw.data)
        self._index[name] = (_SAFETENSORS_DTYPES[little], raw.size, self._size, raw.nbytes)
        self._size += raw.nbytes

    def write_safetensors(self, dest: Path) -> None:
        """Write every vector, by name, into the safetensors file ``dest`` (atomically), and remove the spool."""
        if self._file is None:
            raise ValueError(f"the spool {self.path.name} is already written out")
        self._file.close()
        self._file = None
        header, at = {}, 0
        for name in sorted(self._index):
            dtype, length, _, nbytes = self._index[name]
            header[name] = {"dtype": dtype, "shape": [length], "data_offsets": [at, at + nbytes]}
            at += nbytes
        head = json.dumps(header, separators=(",", ":")).encode()
        head += b" " * (-len(head) % 8)
        with _atomic(dest) as out, open(self.path, "rb") as spool:
            out.write(len(head).to_bytes(8, "little") + head)
            for name in sorted(self._index):
                _, _, offset, nbytes = self._index[name]
                spool.seek(offset)
                while nbytes:
                    chunk = spool.read(min(nbytes, 1 << 20))
                    out.write(chunk)
                    nbytes -= len(chunk)
        self.discard()

    def discard(self) -> None:
        """Close and remove the spool file (a session that aborted keeps no evidence)."""
        if self._file is not None:
            self._file.close()
            self._file = None
        self.path.unlink(missing_ok=True)


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

    def __init__(self, path: Path, *, resume: bool = False) -> None:
        self.path = path
        path.mkdir(parents=True, exist_ok=True)
        metrics = path / "metrics.jsonl"
        self._metric_lines: list[str] = metrics.read_text().splitlines() if resume and metrics.exists() else []

    def write_config(self, text: str) -> None:
        write_atomic(self.path / "config.yaml", text.encode())

    def append_metrics(self, record: dict[str, Any]) -> None:
        # Rewritten whole each time (the file is small), so it is always a set of complete lines.
        lines = [*self._metric_lines, json.dumps(record, allow_nan=False, default=_json_default)]
        write_atomic(self.path / "metrics.jsonl", ("\n".join(lines) + "\n").encode())
        self._metric_lines = lines  # only once it is on disk

    def reset_metrics(self, records: list[dict[str, Any]]) -> None:
        """Rewrite metrics.jsonl as exactly ``records``: after a restart, the rounds its checkpoint holds."""
        lines = [json.dumps(r, allow_nan=False, default=_json_default) for r in records]
        write_atomic(self.path / "metrics.jsonl", "".join(line + "\n" for line in lines).encode())
        self._metric_lines = lines

    def write_model(self, tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> None:
        write_atomic(self.path / "model.safetensors", safetensors_save(tensors, metadata=metadata))

    def write_summary(self, summary: dict[str, Any]) -> None:
        write_atomic(self.path / "summary.json", (dumps(summary) + "\n").encode())

    def write_checkpoint(self, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        """The coordinator's state at a halt: arrays first, then the JSON that names their hash."""
        blob = safetensors_save({k: np.ascontiguousarray(v) for k, v in arrays.items()})
        write_atomic(self.path / f"{CHECKPOINT}.safetensors", blob)
        body = {"arrays_sha256": hashlib.sha256(blob).hexdigest(), "state": meta}
        write_atomic(self.path / f"{CHECKPOINT}.json", (dumps(body) + "\n").encode())

    def read_checkpoint(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        meta_path, blob_path = self.path / f"{CHECKPOINT}.json", self.path / f"{CHECKPOINT}.safetensors"
        if not meta_path.exists() or not blob_path.exists():
            raise ConfigError(f"{self.path} holds no checkpoint: the run halted before its setup completed, start a new run")
        blob = blob_path.read_bytes()
        try:
            body = json.loads(meta_path.read_text())
            if body["arrays_sha256"] != hashlib.sha256(blob).hexdigest():
                raise ValueError("the arrays are not the ones the checkpoint names")
            return body["state"], safetensors_load(blob)
        except (ValueError, KeyError, TypeError, SafetensorError) as exc:
            raise ConfigError(f"{meta_path}: the checkpoint is damaged ({exc}): the run cannot continue from it") from None


def require_run_folder(run_dir: Path) -> Path:
    """``run_dir`` if it is a run's folder (it holds ``transcript.jsonl``); else a ``ConfigError`` saying what
    it is instead: missing, a file, or a folder that holds no run."""
    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise ConfigError(f"run folder '{run_dir}' does not exist: pass the folder a run printed")
    if not run_dir.is_dir():
        raise ConfigError(f"'{run_dir}' is a file, not a run folder: pass the folder a run printed (it holds transcript.jsonl)")
    if not (run_dir / "transcript.jsonl").is_file():
        raise ConfigError(f"'{run_dir}' is a folder but not a run's: it holds no transcript.jsonl; pass the folder a run printed")
    return run_dir

