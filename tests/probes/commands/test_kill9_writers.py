"""kill -9 at 20 seeded moments of `lhat` and `updates` (the real CLI in a child process), each
trial resuming what the previous kill left: nothing committed is ever lost or changed, and the
final resume equals one uninterrupted run bit for bit. (`cache` has the same test in
test_cache_cli.py.)"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cache import open_cache, segments_dir
from probes.demo.run import SAMPLE_TRACES
from tests.probes.commands._store_snapshot import snapshot

ROOT = Path(__file__).resolve().parents[3]
CHILD_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
             "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT)}
N_TRACES = 40
N_KILLS = 20


def _start(command: str, traces: Path, out: Path, err: Path, *extra: str) -> subprocess.Popen:
    args = [sys.executable, "-m", "probes.run", command, "--model", "tiny-reasoner", "--traces",
            str(traces), "--out", str(out), "--device", "cpu", "--no-progress", "--resume", *extra]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=err.open("w"), env=CHILD_ENV,
                            cwd=ROOT, text=True)


def _wait_for_writing(proc: subprocess.Popen, err: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if "writing" in err.read_text():
            return
        if proc.poll() is not None:
            raise AssertionError(f"run exited before writing: {err.read_text()}")
        time.sleep(0.002)
    proc.kill()
    raise AssertionError("run did not start writing")


def _n_segments(out: Path) -> int:
    folder = segments_dir(out)
    return len(list(folder.glob("*.h5"))) if folder.is_dir() else 0


def _wait_for_commit(proc: subprocess.Popen, out: Path, timeout: float = 120) -> float:
    """Wait until the run commits a new segment; returns the seconds waited."""
    t0, before = time.monotonic(), _n_segments(out)
    while time.monotonic() - t0 < timeout:
        if _n_segments(out) > before:
            return time.monotonic() - t0
        if proc.poll() is not None:  # it finished the last traces: nothing left to kill
            assert proc.returncode == 0
            return time.monotonic() - t0
        time.sleep(0.001)
    raise AssertionError("run committed nothing")


@pytest.mark.slow
@pytest.mark.parametrize("command", ["lhat", "updates"])
def test_kill_9_at_20_seeded_moments_then_resume_equals_one_run(command, tmp_path):
    traces = tmp_path / "traces.jsonl"
    traces.write_text("".join(SAMPLE_TRACES.read_text().splitlines(keepends=True)[:N_TRACES]))
    ref, work, err = tmp_path / "ref.h5", tmp_path / "work.h5", tmp_path / "stderr.txt"

    proc = _start(command, traces, ref, err, "--json")
    _wait_for_writing(proc, err)
    first = _wait_for_commit(proc, ref)  # from "writing" to the first trace on disk
    stdout, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, err.read_text()
    per_trace = json.loads(stdout.strip().splitlines()[-1])["seconds_loop"] / N_TRACES
    expected = snapshot(ref)
    assert len(expected["order"]) == N_TRACES

    rng = random.Random(20261203)
    n_committed, n_killed = 0, 0
    for trial in range(N_KILLS):  # half within a run's first trace, half within the next ~3
        proc = _start(command, traces, work, err)
        _wait_for_writing(proc, err)
        if trial % 2:
            _wait_for_commit(proc, work)
            time.sleep(rng.uniform(0.0, 3 * per_trace))
        else:
            time.sleep(rng.uniform(0.0, 1.2 * first))
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
        n_killed += proc.returncode == -signal.SIGKILL
        if proc.returncode != -signal.SIGKILL:  # it finished before the kill landed
            assert proc.returncode == 0, err.read_text()
        with open_cache(work) as reader:  # reopens cleanly, lists only complete traces
            ids = reader.trace_ids()
        got = snapshot(work)
        assert got["/"] == expected["/"] and got["/meta"] == expected["/meta"]
        assert len(ids) >= n_committed  # nothing committed was lost
        for trace_id in ids:
            assert got[trace_id] == expected[trace_id], trace_id  # bit-exact
        n_committed = len(ids)
    assert n_killed >= N_KILLS // 2  # the kills landed while the runs were writing
    assert n_committed > 0  # and the killed runs made progress
    proc = _start(command, traces, work, err)
    proc.communicate(timeout=600)
    assert proc.returncode == 0, err.read_text()
    final = snapshot(work)
    assert final == expected
