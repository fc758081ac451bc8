"""`python -m probes.run pack`: one self-contained file; bad --out refused before any work."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from cache import open_cache, open_writer, segments_dir
from probes.reasoner.train import SAMPLES_PATH
from probes.run import main

ROOT = Path(__file__).resolve().parents[3]

META = {"model": "m", "architecture": {"family": "toy"}, "model_dtype": "float32",
        "weight_convention": "hf", "tokenizer_fingerprint": "t", "lexicon_fingerprint": "l",
        "category_codes": {"ordinary": 0}, "config": {}}


def _store(path):
    with open_writer(path, metadata=META) as writer:
        for i in range(2):
            writer.write_trace(f"q/{i}", tokens=np.arange(5) + i, category=np.zeros(5, np.uint8),
                               sites={"resid_post": np.full((5, 2, 4), i, np.float32)})
    return path


def _error(capsys, *needles):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    for needle in needles:
        assert needle in err[0], (needle, err[0])


def test_pack_command(tmp_path, capsys):
    store = _store(tmp_path / "run.h5")
    packed = tmp_path / "one.h5"
    assert main(["pack", str(store), "--out", str(packed)]) == 0
    assert "pack: 2 traces" in capsys.readouterr().out
    assert not segments_dir(packed).exists()
    with open_cache(packed) as reader:
        assert reader.trace_ids() == ["q/0", "q/1"]
        assert reader.trace("q/1")["resid_post"][...].tobytes() == np.full(
            (5, 2, 4), 1, np.float32).tobytes()
    assert main(["inspect", str(store)]) == 0
    assert "segment files" in capsys.readouterr().out

    assert main(["pack", str(store), "--out", str(packed)]) == 2
    _error(capsys, str(packed), "already exists", "--overwrite")
    assert main(["pack", str(store), "--out", str(packed), "--overwrite", "--json"]) == 0
    capsys.readouterr()
    assert main(["pack", str(store), "--out", str(tmp_path)]) == 2
    _error(capsys, "is a directory")
    assert main(["pack", str(store), "--out", str(tmp_path / "no" / "x.h5")]) == 2
    _error(capsys, "does not exist")
    assert main(["pack", str(tmp_path / "none.h5"), "--out", str(tmp_path / "x.h5")]) == 2
    _error(capsys, "none.h5", "does not exist")
    assert main(["pack", str(store), "--out", str(store)]) == 2
    _error(capsys, "the cache itself")


def _h5py_ids(path):
    with h5py.File(path, "r") as f:
        return sorted(f["traces"][name].attrs["trace_id"] for name in f["traces"])


def test_pack_overwrite_onto_a_store_replaces_it_whole(tmp_path, capsys):
    """The old store's segments go with its file: plain h5py and open_cache read the same."""
    source = tmp_path / "run.h5"
    with open_writer(source, metadata=META) as writer:
        writer.write_trace("new/0", tokens=np.arange(3), category=np.zeros(3, np.uint8),
                           sites={"resid_post": np.ones((3, 2, 4), np.float32)})
    target = _store(tmp_path / "old.h5")
    assert main(["pack", str(source), "--out", str(target), "--overwrite"]) == 0
    capsys.readouterr()
    assert not segments_dir(target).exists()
    with open_cache(target) as reader:
        assert reader.trace_ids() == ["new/0"] == _h5py_ids(target)


def test_pack_overwrite_refuses_a_store_being_written(tmp_path, capsys):
    target = _store(tmp_path / "old.h5")
    before = target.read_bytes()
    with open_writer(target, metadata=META):
        assert main(["pack", str(_store(tmp_path / "run.h5")), "--out", str(target),
                     "--overwrite"]) == 2
    _error(capsys, str(target), "open by another writer")
    assert target.read_bytes() == before and segments_dir(target).is_dir()
    assert not list(tmp_path.glob("old.h5.*.tmp"))


_KILLED_PACK = """
import os, sys, time
import cache._pack as pack

def slow(source, tmp, ids):
    tmp.write_bytes(b"partial")
    with open(sys.argv[3] + ".part", "w") as f:
        f.write(str(os.getpid()))
    os.rename(sys.argv[3] + ".part", sys.argv[3])
    time.sleep(300)

pack._pack_into = slow
pack.pack_cache(sys.argv[1], sys.argv[2])
"""


def _gone(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_killed_pack_leaves_no_writer_and_its_copy_is_removed_by_the_next(tmp_path, capsys):
    store = _store(tmp_path / "run.h5")
    packed = tmp_path / "one.h5"
    pid_file = tmp_path / "child.pid"
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_PACK, str(store), str(packed),
                             str(pid_file)], env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=ROOT)
    child = None
    try:
        while not pid_file.exists():
            assert proc.poll() is None, "pack ended before its child wrote"
            time.sleep(0.01)
        child = int(pid_file.read_text())
        proc.kill()  # SIGKILL: pack cannot clean up
        proc.wait()
        deadline = time.monotonic() + 60
        while not _gone(child) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert _gone(child), "the copying child outlived the killed pack"
    finally:
        if child is not None and not _gone(child):
            os.kill(child, signal.SIGKILL)
    orphan = tmp_path / f"one.h5.{proc.pid}.tmp"
    assert orphan.read_bytes() == b"partial"
    (tmp_path / "one.h5.1.tmp").write_bytes(b"x")  # pid 1 is alive: its file is kept
    assert main(["pack", str(store), "--out", str(packed)]) == 0
    capsys.readouterr()
    assert sorted(p.name for p in tmp_path.glob("one.h5*")) == ["one.h5", "one.h5.1.tmp"]


def test_resume_onto_a_packed_file_beside_another_stores_segments_is_refused(tmp_path, capsys):
    """Before the model loads: one line naming the folder and the fix; nothing is changed."""
    packed = tmp_path / "one.h5"
    assert main(["pack", str(_store(tmp_path / "run.h5")), "--out", str(packed)]) == 0
    capsys.readouterr()
    _store(tmp_path / "old.h5")
    segments_dir(tmp_path / "old.h5").rename(segments_dir(packed))  # left by another store
    before = packed.read_bytes()
    listing = sorted(os.listdir(segments_dir(packed)))
    assert main(["lhat", "--model", "tiny-reasoner", "--traces", str(SAMPLES_PATH), "--limit", "1",
                 "--out", str(packed), "--resume", "--device", "cpu", "--no-progress"]) == 2
    _error(capsys, f"the folder {segments_dir(packed)} beside it holds segments of another store",
           "remove that folder or move it away")
    assert packed.read_bytes() == before
    assert sorted(os.listdir(segments_dir(packed))) == listing
    assert main(["inspect", str(packed)]) == 0
    assert "is another store's and is ignored" in capsys.readouterr().out
