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

from cache import open_cache
from probes.commands.demo import SAMPLE_TRACES
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


@pytest.mark.parametrize("command", ["lhat", "updates"])
def test_kill_9_at_20_seeded_moments_then_resume_equals_one_run(command, tmp_path):
    traces = tmp_path / "traces.jsonl"
    traces.write_text("".join(SAMPLE_TRACES.read_text().splitlines(keepends=True)[:N_TRACES]))
    ref, work, err = tmp_path / "ref.h5", tmp_path / "work.h5", tmp_path / "stderr.txt"

    proc = _start(command, traces, ref, err, "--json")
    stdout, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, err.read_text()
    per_trace = json.loads(stdout.strip().splitlines()[-1])["seconds_loop"] / N_TRACES
    expected = snapshot(ref)
    assert len(expected["order"]) == N_TRACES

    rng = random.Random(20261203)
    n_committed, n_killed = 0, 0
    for _ in range(N_KILLS):
        proc = _start(command, traces, work, err)
        _wait_for_writing(proc, err)
        time.sleep(rng.uniform(0.0, 2 * per_trace))
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
