"""Appending to a single-file cache (`pack`'s) moves it into segments without ever losing a trace.

The single file stays intact until every trace is in a segment; one index rewrite then replaces it.
Killed (SIGKILL) at seeded points of the move, each resumed by the next trial, the cache always
reads all its traces bit-exact; a full disk gives one error and a resume finishes; a segments
folder of another store beside a single file is refused, never adopted.

The same file is the test and (run as `python test_migrate.py PATH POINT PHASE`) the writer
subprocess: it opens a writer in append mode on PATH and kills itself with SIGKILL at POINT (the
number of segments written, or "index") while writing the next file ("during": half its bytes are
in the temporary file) or right after it ("after").
"""

from __future__ import annotations

import errno
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

if __name__ == "__main__":  # the writer subprocess
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import cache._store as store
from cache import (
    CacheError,
    CacheWriteError,
    open_cache,
    open_writer,
    pack_cache,
    segments_dir,
    summarize,
)
from tests.probes.commands._store_snapshot import snapshot

ROOT = Path(__file__).resolve().parents[2]
N_TRACES = 40
N_KILLS = 10
META = {
    "model": "synthetic", "architecture": {"family": "toy", "n_layers": 2, "d_model": 8},
    "model_dtype": "float32", "weight_convention": "hf", "tokenizer_fingerprint": "tok-0",
    "lexicon_fingerprint": "lex-0", "category_codes": {"ordinary": 0, "reflection": 1},
    "config": {"sites": ["resid_post"]},
}


def _trace(i: int) -> dict:
    rng = np.random.default_rng(500 + i)
    n = 6 + i % 5
    return {"tokens": rng.integers(0, 1000, n), "category": rng.integers(0, 2, n).astype(np.uint8),
            "sites": {"resid_post": rng.standard_normal((n, 2, 8)).astype(np.float16)},
            "arrays": {"lhat": rng.standard_normal(n + 1).astype(np.float32)},
            "text": {"answer": str(i)}}


def _packed(tmp_path: Path, n: int = N_TRACES) -> tuple[Path, bytes, dict]:
    """A `pack`ed cache of `n` tiny traces: its path, bytes and full snapshot (created included)."""
    source = tmp_path / "store.h5"
    with open_writer(source, metadata=META) as writer:
        for i in range(n):
            writer.write_trace(f"q/{i:02d}", **_trace(i))
    packed = tmp_path / "packed.h5"
    assert pack_cache(source, packed) == n
    return packed, packed.read_bytes(), snapshot(packed, skip_attrs=())


def _h5py_traces(path: Path) -> dict[str, bytes]:
    """What plain h5py sees: trace group -> the bytes of its site (external links followed)."""
    with h5py.File(path, "r") as f:
        return {name: f["traces"][name]["resid_post"][()].tobytes() for name in f["traces"]}


# -- the writer subprocess ---------------------------------------------------------------------------
def _child_main(path: Path, point: str, phase: str) -> None:
    folder = segments_dir(path)
    real = store.write_file

    def hooked(image: bytes, final: Path, tmp: Path, *, fsync: bool) -> None:
        n = len(store.list_segments(folder))
        is_index = final == path
        here = is_index if point == "index" else (store._NAME.match(final.name) is not None
                                                  and not is_index)
        if here and phase == "during" and (point == "index" or n == int(point)):
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.write(fd, image[:len(image) // 2])
            os.kill(os.getpid(), signal.SIGKILL)
        real(image, final, tmp, fsync=fsync)
        if here and phase == "after" and (point == "index" or n + 1 == int(point)):
            os.kill(os.getpid(), signal.SIGKILL)

    store.write_file = hooked
    with open_writer(path, metadata=META, mode="append"):
        pass


def _kill_points(seed: str) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    counts = sorted(rng.sample(range(1, N_TRACES), N_KILLS - 3))
    points = [("0", "during")]  # the marker is written, the first segment half
    points += [(str(k), rng.choice(("during", "after"))) for k in counts]
    return [*points, ("index", "during"), ("index", "after")]


def test_killed_move_into_segments_loses_nothing_and_resumes(tmp_path):
    packed, packed_bytes, expected = _packed(tmp_path)
    folder = segments_dir(packed)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for point, phase in _kill_points("migrate-kill"):
        res = subprocess.run([sys.executable, __file__, str(packed), point, phase],
                             capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
        assert res.returncode == -signal.SIGKILL, (point, phase, res.stderr[-2000:])
        assert (folder / store.MIGRATION_MARKER).exists()
        if point != "index" or phase == "during":  # the single file is untouched until the end
            assert packed.read_bytes() == packed_bytes, (point, phase)
            n_moved = len(store.list_segments(folder))
            assert n_moved == (int(point) if point != "index" else N_TRACES)
        assert snapshot(packed, skip_attrs=()) == expected, (point, phase)
        assert len(_h5py_traces(packed)) == N_TRACES
    with open_writer(packed, metadata=META) as writer:  # the last resume finishes the move
        assert writer.removed_incomplete == ()
        assert writer.complete_ids() == [f"q/{i:02d}" for i in range(N_TRACES)]
    assert not (folder / store.MIGRATION_MARKER).exists()
    assert store.list_segments(folder) == [f"s-{i:06d}.h5" for i in range(1, N_TRACES + 1)]
    assert not list(folder.glob("*.tmp")) and not list(tmp_path.glob("packed.h5.*.tmp"))
    assert snapshot(packed, skip_attrs=()) == expected
    with open_cache(packed) as reader:  # plain h5py sees what the reader sees
        assert _h5py_traces(packed) == {
            store.schema.escape_trace_id(t.id): t["resid_post"][...].tobytes() for t in reader}


@pytest.mark.parametrize("fail_at", ["marker", "segment", "index"])
def test_full_disk_while_moving_keeps_the_single_file(fail_at, tmp_path, monkeypatch):
    packed, packed_bytes, expected = _packed(tmp_path, n=6)
    folder = segments_dir(packed)
    nth = {"marker": 1, "segment": 4, "index": 8}[fail_at]  # marker, 6 segments, index
    calls = []
    real = store._write

    def failing(fd, data):
        calls.append(1)
        if len(calls) == nth:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, data)

    monkeypatch.setattr(store, "_write", failing)
    with pytest.raises(CacheWriteError) as info:
        open_writer(packed, metadata=META)
    monkeypatch.setattr(store, "_write", real)
    message = str(info.value)
    assert message.startswith(f"moving the single-file cache {packed} into segments failed ("), \
        message
    assert "No space left on device (ENOSPC)" in message
    assert f"{packed} is unchanged and keeps every trace" in message
    assert "free space (or choose another --out folder), then rerun with --resume" in message
    assert packed.read_bytes() == packed_bytes
    assert snapshot(packed, skip_attrs=()) == expected
    assert not list(folder.glob("*.tmp")) and not list(tmp_path.glob("packed.h5.*.tmp"))
    assert len(store.list_segments(folder)) == {"marker": 0, "segment": 2, "index": 6}[fail_at]
    with open_writer(packed, metadata=META) as writer:
        assert writer.removed_incomplete == ()
        writer.write_trace("new", **_trace(99))
    assert not (folder / store.MIGRATION_MARKER).exists()
    got = snapshot(packed, skip_attrs=())
    assert got.pop("new")["resid_post"][4] == _trace(99)["sites"]["resid_post"].tobytes()
    assert got["order"].pop() == "new"
    assert got == expected


def test_segments_of_another_store_beside_a_single_file_are_refused(tmp_path):
    """An older `pack --overwrite` replaced a store's file and left its segments folder: the
    file is what readers read, and appending is refused (adopting the folder would mix them)."""
    packed, packed_bytes, expected = _packed(tmp_path, n=3)
    other = tmp_path / "other.h5"
    with open_writer(other, metadata=META) as writer:
        writer.write_trace("x", **_trace(7))
    os.replace(other, packed.with_name("old.h5"))
    segments_dir(other).rename(segments_dir(packed))  # the old store's folder, beside the file
    listing = sorted(os.listdir(segments_dir(packed)))
    assert snapshot(packed, skip_attrs=()) == expected
    assert summarize(packed)["segments_beside"] == "other"
    with pytest.raises(CacheError) as info:
        open_writer(packed, metadata=META)
    assert str(info.value) == (
        f"{packed} is a single-file cache, but the folder {segments_dir(packed)} beside it holds "
        f"segments of another store (e.g. left when the file was replaced by `pack --overwrite` of "
        f"an older toolkit); nothing was written: remove that folder or move it away (readers "
        f"already ignore it), then rerun")
    assert packed.read_bytes() == packed_bytes
    assert sorted(os.listdir(segments_dir(packed))) == listing


def test_a_damaged_single_file_mid_move_is_never_replaced(tmp_path):
    """While a move is marked, an unreadable file at the path is the single file, damaged: the
    writer refuses in one line and the reader does not rebuild an index from the partial move."""
    packed, _, _ = _packed(tmp_path, n=4)
    folder = segments_dir(packed)
    folder.mkdir()
    store.write_migration_marker(packed, fsync=False)
    (folder / "s-000001.h5").write_bytes(b"")  # (a moved trace; its content does not matter)
    packed.write_bytes(packed.read_bytes()[:2000])  # truncated
    damaged = packed.read_bytes()
    with pytest.raises(CacheError, match="truncated|corrupt|damaged"):
        open_writer(packed, metadata=META)
    with pytest.raises(CacheError, match="truncated|corrupt|damaged"):
        open_cache(packed)
    assert packed.read_bytes() == damaged


if __name__ == "__main__":
    _child_main(Path(sys.argv[1]), sys.argv[2], sys.argv[3])
