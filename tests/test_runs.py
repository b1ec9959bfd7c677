"""The run folder is written atomically: a crash mid-write leaves the last complete file."""

import json
import os

import numpy as np
import pytest
from safetensors.numpy import load_file, save

from consortium.runs import MaskedSpool, RunFolder, new_run_dir, write_atomic


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


def test_a_spool_writes_what_safetensors_writes_and_leaves_nothing_behind(tmp_path):
    """The hand-written streaming writer is byte-equal to ``safetensors.numpy.save`` (names sorted, uint32 and
    uint64, an odd header length padded), so ``verify`` reads the evidence archive with safetensors itself."""
    rng = np.random.default_rng(0)
    for dtype in (np.uint32, np.uint64):
        vectors = {f"site-{i}": rng.integers(0, np.iinfo(dtype).max, size=37 + i, dtype=dtype) for i in (3, 1, 10, 2)}
        spool = MaskedSpool(tmp_path / "evidence" / ".round-00001-ab.spool")
        for name, vector in vectors.items():  # in arrival order, not by name
            spool.add(name, vector)
        spool.write_safetensors(tmp_path / "evidence" / "round-00001.safetensors")
        assert (tmp_path / "evidence" / "round-00001.safetensors").read_bytes() == save(vectors)
        assert sorted(p.name for p in (tmp_path / "evidence").iterdir()) == ["round-00001.safetensors"]
        with pytest.raises(ValueError, match="already written out"):
            spool.add("site-4", vectors["site-1"])


def test_a_spool_refuses_a_name_twice_and_other_dtypes(tmp_path):
    spool = MaskedSpool(tmp_path / "s.spool")
    spool.add("a", np.arange(3, dtype=np.uint32))
    with pytest.raises(ValueError, match="in the spool already"):
        spool.add("a", np.arange(3, dtype=np.uint32))
    with pytest.raises(ValueError, match="unsigned ring words"):
        spool.add("b", np.arange(3, dtype=np.float32))
    spool.discard()
    assert not (tmp_path / "s.spool").exists()
