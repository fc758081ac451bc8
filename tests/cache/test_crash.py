"""Crash safety: a writer killed with SIGKILL at random moments loses only its uncommitted trace.

The same file is the test and (run as `python test_crash.py PATH N SLEEP`) the writer subprocess,
which writes deterministic synthetic traces (seeded per trace id), slowed down so that kills land
between and inside traces. Each trial resumes the file left by the previous kill.
"""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from cache import SiteArray, float32_to_bf16_bits, open_cache, open_writer

N_TRACES = 40
N_TRIALS = 12
SLEEP_BETWEEN_TRACES = 0.004
SLOW_DATASET_S = 0.002  # the child sleeps this long in every create_dataset (kills land mid-trace)
META = {
    "model": "synthetic",
    "architecture": {"family": "toy", "n_layers": 2, "d_model": 32},
    "model_dtype": "float16",
    "weight_convention": "hf",
    "tokenizer_fingerprint": "tok-0",
    "lexicon_fingerprint": "lex-0",
    "category_codes": {"ordinary": 0, "reflection": 1, "delimiter": 2},
    "config": {"sites": ["resid_post", "attn_out"], "storage_dtype": "float16"},
    "versions": {"transformers": "test"},
}


def trace_id(i: int) -> str:
    """Id of synthetic trace `i` (with a slash, to exercise escaping)."""
    return f"synthetic/{i:03d}"


def synthetic_trace(i: int) -> dict:
    """Deterministic keyword arguments of `write_trace` for trace `i`."""
    rng = np.random.default_rng(1000 + i)
    n = 64
    resid = rng.standard_normal((n, 2, 32)).astype(np.float16)
    attn = float32_to_bf16_bits(rng.standard_normal((n, 2, 32)).astype(np.float32))
    return {
        "tokens": rng.integers(0, 50_000, n),
        "category": rng.integers(0, 3, n).astype(np.uint8),
        "spans": {"prompt": (0, 8), "trajectory": (8, n)},
        "sites": {"resid_post": resid, "attn_out": SiteArray(attn, dtype="bfloat16")},
        "arrays": {"lhat": rng.standard_normal(n + 1).astype(np.float32)},
        "text": {"question": f"question {i}", "answer": str(i)},
        "source": f"synthetic.jsonl:{i + 1}",
    }


def write_all(path: Path, n_traces: int, sleep_s: float, report=None) -> None:
    """Append traces 0..n_traces-1 (skipping complete ones), reporting progress lines."""
    with open_writer(path, metadata=META, mode="append") as writer:
        if report:
            report("ready")
        for i in range(n_traces):
            if writer.has_complete(trace_id(i)):
                continue
            if report:
                report(f"begin {i}")
            writer.write_trace(trace_id(i), **synthetic_trace(i))
            if report:
                report(f"done {i}")
            time.sleep(sleep_s)
    if report:
        report("finished")


def _child_main(argv: list[str]) -> None:
    real_create = h5py.Group.create_dataset

    def slow_create(self, *args, **kwargs):
        time.sleep(SLOW_DATASET_S)
        return real_create(self, *args, **kwargs)

    h5py.Group.create_dataset = slow_create

    def report(line: str) -> None:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()

    write_all(Path(argv[0]), int(argv[1]), float(argv[2]), report)


def _start_writer(path: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), str(path), str(N_TRACES),
         str(SLEEP_BETWEEN_TRACES)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def _check_committed(path: Path, done: set[int]) -> tuple[int, int]:
    """Assert every listed trace is bit-exact and every reported commit survived."""
    with open_cache(path) as reader:
        ids = reader.trace_ids()
        n_incomplete = len(reader.incomplete_ids())
        expected_ids = {trace_id(i) for i in range(N_TRACES)}
        assert set(ids) <= expected_ids
        assert {trace_id(i) for i in done} <= set(ids), "a flushed, committed trace was lost"
        for tid in ids:
            i = int(tid.split("/")[1])
            expected = synthetic_trace(i)
            trace = reader.trace(tid)
            np.testing.assert_array_equal(trace.tokens, expected["tokens"])
            np.testing.assert_array_equal(trace.category, expected["category"])
            resid = trace["resid_post"][...]
            assert resid.dtype == np.float16
            assert resid.tobytes() == expected["sites"]["resid_post"].tobytes()
            bits = trace.array("attn_out", raw=True)[...]
            assert bits.tobytes() == expected["sites"]["attn_out"].data.tobytes()
            assert trace["lhat"][...].tobytes() == expected["arrays"]["lhat"].tobytes()
            assert trace.text == expected["text"]
    return len(ids), n_incomplete


def _snapshot(path: Path) -> dict:
    """Everything in the store (external links followed) except the creation time and the list
    of segment files, as comparable Python values."""
    out: dict = {}
    with h5py.File(path, "r") as f:
        out["/"] = {k: _value(v) for k, v in f.attrs.items() if k != "created"}

        def visit(prefix: str, group) -> None:
            for key, obj in group.items():
                name = f"{prefix}{key}"
                if name == "meta/segments":
                    continue
                entry = {"attrs": {k: _value(v) for k, v in obj.attrs.items()}}
                if isinstance(obj, h5py.Dataset):
                    entry.update(dtype=str(obj.dtype), shape=obj.shape, chunks=obj.chunks,
                                 data=_value(obj[()]))
                out[name] = entry
                if isinstance(obj, h5py.Group):
                    visit(name + "/", obj)

        visit("", f)
    return out


def _value(v):
    if isinstance(v, np.ndarray):
        return (str(v.dtype), v.shape, v.tobytes())
    if isinstance(v, bytes):
        return v.decode()
    return v.item() if isinstance(v, np.generic) else v


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume_equals_uninterrupted(tmp_path):
    rng = random.Random(20240611)
    path = tmp_path / "crash.h5"
    n_complete_seen, mid_trace_kills = [], 0
    for _ in range(N_TRIALS):
        proc = _start_writer(path)
        done: set[int] = set()
        began: set[int] = set()
        target = rng.randint(0, 3)  # kill after this many traces began, plus a random delay
        try:
            if proc.stdout.readline().strip() != "ready":
                proc.kill()
                raise AssertionError(f"writer failed to open: {proc.communicate()[1]}")
            while len(began) < target:
                line = proc.stdout.readline().strip()
                if not line or line == "finished":
                    break
                kind, _, index = line.partition(" ")
                (began if kind == "begin" else done).add(int(index))
            time.sleep(rng.uniform(0.0, 0.012))
        finally:
            proc.send_signal(signal.SIGKILL)
            rest, _ = proc.communicate(timeout=30)
        for line in rest.splitlines():
            kind, _, index = line.partition(" ")
            if kind in ("begin", "done"):
                (began if kind == "begin" else done).add(int(index))
        mid_trace_kills += bool(began - done)
        n_complete_seen.append(_check_committed(path, done)[0])

    assert n_complete_seen[-1] < N_TRACES, "the kills came too late to test anything"
    assert mid_trace_kills > 0
    proc = _start_writer(path)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert out.splitlines()[-1] == "finished"
    assert _check_committed(path, set(range(N_TRACES))) == (N_TRACES, 0)

    reference = tmp_path / "reference.h5"
    write_all(reference, N_TRACES, 0.0)
    resumed, uninterrupted = _snapshot(path), _snapshot(reference)
    assert resumed.keys() == uninterrupted.keys()
    for name, entry in uninterrupted.items():
        assert resumed[name] == entry, name
    with open_cache(path) as a, open_cache(reference) as b:
        assert sorted(a.trace_ids()) == sorted(b.trace_ids())


if __name__ == "__main__":
    _child_main(sys.argv[1:])
