"""The run folder is written atomically: a crash mid-write leaves the last complete file."""

import json
import os

import numpy as np
import pytest
from safetensors.numpy import load_file

from consortium.runs import RunFolder, new_run_dir, write_atomic


def test_a_crash_during_a_write_keeps_the_previous_file_and_no_debris(tmp_path, monkeypatch):
    target = tmp_path / "summary.json"
    write_atomic(target, b'{"round": 1}')

    def crash(*_):
        raise OSError("power cut")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="power cut"):
        write_atomic(target, b'{"round": 2, "half')
    assert target.read_bytes() == b'{"round": 1}'
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]  # the temporary file is gone


def test_metrics_are_always_whole_lines(tmp_path, monkeypatch):
    run = RunFolder(tmp_path / "run")
    run.append_metrics({"round": 1, "accuracy": 0.5})
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda *_: (_ for _ in ()).throw(OSError("crash")))
    with pytest.raises(OSError):
        run.append_metrics({"round": 2, "accuracy": 0.6})
    monkeypatch.setattr(os, "replace", real_replace)
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["round"] for line in lines] == [1]


def test_model_and_new_run_dirs(tmp_path):
    run = RunFolder(tmp_path / "run")
    run.write_model({"w": np.arange(4, dtype=np.float32)}, {"layout_hash": "ab"})
    assert np.array_equal(load_file(str(tmp_path / "run" / "model.safetensors"))["w"], np.arange(4, dtype=np.float32))
    a, b = new_run_dir(tmp_path, "x"), new_run_dir(tmp_path, "x")
    assert a != b and a.is_dir() and b.is_dir()  # never reuses a folder


def test_a_failed_append_is_not_written_later(tmp_path, monkeypatch):
    run = RunFolder(tmp_path / "run")
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda *_: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        run.append_metrics({"round": 1})
    monkeypatch.setattr(os, "replace", real_replace)
    run.append_metrics({"round": 2})
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["round"] for line in lines] == [2]
