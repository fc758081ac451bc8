"""`probes.run cache` / `inspect`: the happy path, one-line user errors, and kill -9 at random moments."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from cache import open_cache, segments_dir, store_bytes
from cache._store import list_segments
from probes.demo.run import SAMPLE_TRACES
from probes.run import main

ROOT = Path(__file__).resolve().parents[3]
CHILD_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
             "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT)}


def _subset(path: Path, n: int, *, start: int = 0) -> Path:
    path.write_text("".join(SAMPLE_TRACES.read_text().splitlines(keepends=True)[start:start + n]))
    return path


@pytest.fixture
def few(tmp_path) -> Path:
    """Four sample traces."""
    return _subset(tmp_path / "few.jsonl", 4)


def _one_line_error(capsys, *needles: str) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("error: "), err[0]
    for needle in needles:
        assert needle in err[0], (needle, err[0])
    return err[0]


def _cache_args(traces: Path, out: Path, *extra: str) -> list[str]:
    return ["cache", "--model", "tiny-reasoner", "--traces", str(traces), "--out", str(out),
            "--device", "cpu", "--no-progress", *extra]


# -- the happy path ---------------------------------------------------------------------------------


def test_cache_then_inspect(few, tmp_path, capsys):
    out = tmp_path / "run.h5"
    assert main(_cache_args(few, out, "--json")) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    assert result["n_written"] == 4 and result["backend"] == "hf"
    assert result["tokens_per_s"] > 0 and result["file_bytes"] == store_bytes(out)
    assert "writing" in captured.err

    assert main(["inspect", str(out)]) == 0
    table = capsys.readouterr().out
    for needle in ("tiny-reasoner", "schema:   v1", "4 complete", "complete: yes", "resid_post",
                   "delta", "float16", "0..3"):
        assert needle in table, needle
    assert main(["inspect", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["n_traces_complete"] == 4 and summary["complete"]
    assert summary["sites"]["delta"]["row_shape"] == [4, 128]
    assert summary["config"]["storage_dtype"] == "float16"

    # Resume with more traces; sites given comma-separated and as explicit layers.
    more = _subset(tmp_path / "more.jsonl", 6)
    args = _cache_args(more, out, "--resume", "--sites", "resid_post,delta")
    assert main(args) == 0
    assert "2 traces written, 4 already done" in capsys.readouterr().out
    with open_cache(out) as reader:
        assert len(reader) == 6


def test_progress_bar_on_stderr(few, tmp_path, capsys, monkeypatch):
    args = [a for a in _cache_args(few, tmp_path / "run.h5", "--limit", "2") if a != "--no-progress"]
    assert main(args) == 0  # stderr is not a terminal here: no bar
    assert "tok/s" not in capsys.readouterr().err
    import sys

    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    args = [a for a in _cache_args(few, tmp_path / "tty.h5", "--limit", "2") if a != "--no-progress"]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "2/2" in err and "tok/s" in err and "trace" in err


@pytest.mark.slow
def test_demo_writes_a_cache(tmp_path, capsys):
    assert main(["demo", "--limit", "3", "--device", "cpu", "--json", "--out", str(tmp_path)]) == 0
    summary = json.loads(capsys.readouterr().out)
    cache = summary["cache"]
    assert cache["path"] == str(tmp_path / "run.h5") and cache["n_traces"] == 3
    assert cache["bytes"] == store_bytes(tmp_path / "run.h5")
    with open_cache(tmp_path / "run.h5") as reader:
        assert len(reader) == 3
    # A second demo replaces its own cache.
    assert main(["demo", "--limit", "2", "--device", "cpu", "--out", str(tmp_path)]) == 0
    assert "run.h5" in capsys.readouterr().out
    with open_cache(tmp_path / "run.h5") as reader:
        assert len(reader) == 2


@pytest.mark.slow
def test_help_of_the_new_subcommands():
    for sub in (["cache"], ["inspect"]):
        res = subprocess.run([sys.executable, "-m", "probes.run", *sub, "--help"],
                             capture_output=True, text=True, env=CHILD_ENV, cwd=ROOT, check=True)
        assert "usage:" in res.stdout


# -- one-line errors, exit code 2 -------------------------------------------------------------------


_HOLDER = """
import sys
from cache import open_writer
meta = {"model": "holder", "architecture": {}, "model_dtype": "float32", "weight_convention": "x",
        "tokenizer_fingerprint": "t", "lexicon_fingerprint": "l", "category_codes": {"a": 0},
        "config": {}}
with open_writer(sys.argv[1], metadata=meta):
    print("ready", flush=True)
    sys.stdin.readline()
"""


def test_second_writer_on_the_same_file(few, tmp_path, capsys):
    out = tmp_path / "held.h5"
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(out)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env=CHILD_ENV, cwd=ROOT)
    try:
        assert holder.stdout.readline().strip() == "ready"
        assert main(_cache_args(few, out, "--resume")) == 2
        _one_line_error(capsys, str(out), "another process")
        assert main(["inspect", str(out)]) == 0  # a store is readable while it is written
        assert "0 complete" in capsys.readouterr().out
    finally:
        holder.communicate("\n", timeout=30)
    assert holder.returncode == 0


def test_appending_with_another_model(few, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, Qwen2Config

    from tests.hooks._models import byte_tokenizer

    folder = tmp_path / "other-model"
    cfg = Qwen2Config(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)

    out = tmp_path / "run.h5"
    assert main(_cache_args(few, out, "--limit", "1")) == 0
    capsys.readouterr()
    args = _cache_args(few, out, "--resume")
    args[args.index("tiny-reasoner")] = str(folder)
    assert main(args) == 2
    _one_line_error(capsys, str(out), 'model: stored "tiny-reasoner"', "architecture.d_model",
                    "another file")
    # The other model on its own file works.
    assert main(args[:args.index("--out") + 1] + [str(tmp_path / "other.h5"), "--device", "cpu",
                                                   "--no-progress"]) == 0


def _small_cache(few: Path, out: Path, capsys) -> None:
    assert main(_cache_args(few, out)) == 0
    capsys.readouterr()


def test_truncated_index_and_segment(few, tmp_path, capsys):
    """A damaged index is rebuilt from the segments; a damaged segment is listed and redone."""
    out = tmp_path / "run.h5"
    assert main(_cache_args(few, out, "--batch-tokens", "0")) == 0  # a segment per trace
    capsys.readouterr()
    expected = _snapshot(out)
    data = out.read_bytes()
    out.write_bytes(data[: len(data) // 2])
    assert main(["inspect", str(out)]) == 0
    assert "4 complete" in capsys.readouterr().out
    segment = sorted(segments_dir(out).glob("*.h5"))[1]
    segment.write_bytes(segment.read_bytes()[:300])  # e.g. a power loss without --fsync
    assert main(["inspect", str(out)]) == 0
    table = capsys.readouterr().out
    assert "3 complete" in table and f"damaged segment {segment.name}" in table
    assert main(_cache_args(few, out, "--resume", "--batch-tokens", "0")) == 0
    assert "1 traces written, 3 already done, 1 interrupted redone" in capsys.readouterr().out
    assert _snapshot(out) == expected or _same_snapshots(_snapshot(out), expected)


def test_file_that_is_not_hdf5(few, tmp_path, capsys):
    out = tmp_path / "notes.h5"
    out.write_text("these are my notes, not a cache\n" * 20)
    assert main(_cache_args(few, out, "--resume")) == 2
    _one_line_error(capsys, str(out), "not an HDF5 file")
    assert main(["inspect", str(out)]) == 2
    _one_line_error(capsys, str(out), "not an HDF5 file")
    assert out.read_text().startswith("these are my notes")  # untouched
    plain = tmp_path / "plain.h5"
    with h5py.File(plain, "w") as f:
        f["x"] = np.arange(3)
    assert main(_cache_args(few, plain, "--resume")) == 2
    _one_line_error(capsys, str(plain), "not a trajectory-probes cache")


def test_repeated_trace_id(few, tmp_path, capsys):
    lines = few.read_text().splitlines()
    dup = tmp_path / "dup.jsonl"
    dup.write_text("\n".join([lines[0], lines[1], lines[2], lines[1]]) + "\n")
    tid = json.loads(lines[1])["id"]
    out = tmp_path / "run.h5"
    assert main(_cache_args(dup, out)) == 2
    _one_line_error(capsys, f"{dup}:4", repr(tid), "line 2", "unique")
    assert not out.exists()  # refused before writing anything


@pytest.mark.parametrize(
    ("extra", "out_name", "needles"),
    [
        ((), "no/such/folder/run.h5", ("no/such/folder", "does not exist")),
        ((), ".", ("is a directory",)),
        (("--sites", "resid_postt"), "run.h5", ("resid_postt", "resid_post", "mlp_out")),
        (("--sites", "L7.delta"), "run.h5", ("L7.delta", "0..3")),
        (("--limit", "0"), "run.h5", ("limit",)),
        (("--device", "tpu"), "run.h5", ("tpu",)),
    ],
)
def test_bad_arguments(few, tmp_path, capsys, extra, out_name, needles):
    out = tmp_path / out_name
    assert main(_cache_args(few, out, *extra)) == 2
    _one_line_error(capsys, *needles)


def test_existing_file_without_resume_and_missing_inputs(few, tmp_path, capsys):
    out = tmp_path / "run.h5"
    _small_cache(few, out, capsys)
    before = out.read_bytes()
    assert main(_cache_args(few, out)) == 2
    _one_line_error(capsys, str(out), "--resume")
    assert out.read_bytes() == before
    assert main(_cache_args(tmp_path / "none.jsonl", tmp_path / "x.h5")) == 2
    _one_line_error(capsys, "none.jsonl")
    assert main(["inspect", str(tmp_path / "none.h5")]) == 2
    _one_line_error(capsys, "none.h5", "does not exist")
    args = _cache_args(few, tmp_path / "y.h5")
    args[args.index("tiny-reasoner")] = str(tmp_path / "no-model")
    assert main(args) == 2
    _one_line_error(capsys, "no-model")


# -- kill -9 at random moments ----------------------------------------------------------------------

N_KILL_TRACES = 60
N_KILLS = 20
KILL_BATCH = ("--batch-tokens", "128")
"""Traces up to 128 tokens in groups of ~4 (one commit each), longer ones alone: the kills meet
grouped and single commits."""


def _same_snapshots(got: dict, want: dict) -> bool:
    assert sorted(got) == sorted(want)
    assert got["/"] == want["/"]
    for name in want:
        if name != "/":
            _assert_same(got[name], want[name])
    return True


def _snapshot(path: Path) -> dict:
    """Every trace group of a cache as `open_cache` sees it (through the index it reads, rebuilt
    if the index on disk is behind): attrs and raw dataset bytes (the root's `created` aside)."""
    out: dict = {}
    with open_cache(path) as reader:
        f = reader._require_open()
        root = {k: _plain(v) for k, v in f.attrs.items() if k != "created"}
        root["config"] = f["meta/config"][()]
        root["info"] = f["meta/info"][()]
        out["/"] = root
        for name in f["traces"]:
            try:
                group = f["traces"].get(name)
                attrs = {k: _plain(v) for k, v in group.attrs.items()}
            except (AttributeError, KeyError, OSError, RuntimeError):
                out[name] = {"attrs": {"complete": False}}  # a link to a half-written group
                continue
            entry = {"attrs": attrs}

            def visit(prefix, grp, entry=entry):  # follows the external links into segments
                for key, obj in grp.items():
                    if isinstance(obj, h5py.Group):
                        visit(f"{prefix}{key}/", obj)
                        continue
                    value = obj[()]
                    entry[prefix + key] = (
                        obj.dtype.str, obj.shape, obj.chunks,
                        value if isinstance(value, bytes) else np.asarray(value).tobytes(),
                        {k: _plain(v) for k, v in obj.attrs.items()})

            visit("", group)
            out[name] = entry
    return out


def _plain(value):
    return value.tolist() if isinstance(value, np.ndarray) else (
        value.item() if isinstance(value, np.generic) else value)


def _start(traces: Path, out: Path, err_path: Path, *extra: str) -> subprocess.Popen:
    args = [sys.executable, "-m", "probes.run", *_cache_args(traces, out, "--resume", *extra)]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=err_path.open("w"),
                            env=CHILD_ENV, cwd=ROOT, text=True)


def _wait_for_writing(proc: subprocess.Popen, err_path: Path, timeout: float = 120) -> None:
    """Wait until the run has opened the file and starts capturing ("writing ..." on stderr)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if "writing" in err_path.read_text():
            return
        if proc.poll() is not None:
            raise AssertionError(f"cache run exited early: {err_path.read_text()}")
        time.sleep(0.002)
    proc.kill()
    raise AssertionError("cache run did not start writing")


def _n_committed(path: Path) -> int:
    """Committed segments of the store (a temporary file of an interrupted commit is not one)."""
    return len(list_segments(segments_dir(path)))


def _wait_for_growth(proc: subprocess.Popen, path: Path, timeout: float = 60) -> float:
    """Wait until the run commits its first segment (its first trace, or group, reaches the
    store); returns the seconds waited."""
    t0 = time.monotonic()
    known = _n_committed(path)
    while time.monotonic() - t0 < timeout:
        if _n_committed(path) > known:
            return time.monotonic() - t0
        if proc.poll() is not None:
            if _n_committed(path) > known:  # it committed and ended between the two checks
                return time.monotonic() - t0
            raise AssertionError(f"cache run exited (code {proc.returncode}) before writing a "
                                 f"trace: {proc.communicate()[0]}")
        time.sleep(0.001)
    raise AssertionError("cache run wrote nothing")


@pytest.mark.slow
def test_kill_9_at_random_moments_then_resume_equals_one_run(tmp_path):
    """SIGKILL the real CLI at seeded random moments of its writing period, resume, compare.

    Half of the kills land in a run's first trace (uniformly within the reference run's time from
    opening the file to its first trace reaching the disk), half within the next ~3 traces after
    the run's first trace reached the file; each trial resumes the file the previous kill left.
    A reference run is never interrupted; every state must match it bit-exact.
    """
    traces = _subset(tmp_path / "kill.jsonl", N_KILL_TRACES)
    ref, work = tmp_path / "ref.h5", tmp_path / "work.h5"
    err = tmp_path / "stderr.txt"

    proc = _start(traces, ref, err, "--json", *KILL_BATCH)
    _wait_for_writing(proc, err)
    first = _wait_for_growth(proc, ref)
    stdout, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, err.read_text()
    per_trace = json.loads(stdout)["seconds_loop"] / N_KILL_TRACES
    expected = _snapshot(ref)
    assert len(expected) == N_KILL_TRACES + 1

    rng = random.Random(20261125)
    n_complete, progress, n_interrupted_seen = 0, [], 0
    for trial in range(N_KILLS):
        proc = _start(traces, work, err, *KILL_BATCH)
        _wait_for_writing(proc, err)
        if trial % 2:
            _wait_for_growth(proc, work)
            time.sleep(rng.uniform(0.0, 3 * per_trace))
        else:
            time.sleep(rng.uniform(0.0, 1.2 * first))
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
        assert proc.returncode == -signal.SIGKILL  # it was still writing when killed
        with open_cache(work) as reader:  # reopens cleanly and lists only complete traces
            ids = reader.trace_ids()
            n_interrupted_seen += bool(reader.incomplete_ids())
        got = _snapshot(work)
        assert got["/"] == expected["/"]
        committed = [n for n, e in got.items() if n != "/" and e["attrs"].get("complete")]
        assert len(ids) == len(committed) >= n_complete  # nothing committed was lost
        for name in committed:
            _assert_same(got[name], expected[name])  # bit-exact
        progress.append(len(committed) - n_complete)
        n_complete = len(committed)
    assert 0 < n_complete < N_KILL_TRACES  # killed runs made progress; the resume has work left
    proc = _start(traces, work, err, *KILL_BATCH)
    proc.communicate(timeout=300)
    assert proc.returncode == 0, err.read_text()
    final = _snapshot(work)
    assert sorted(final) == sorted(expected)
    for name in expected:
        if name == "/":
            assert final[name] == expected[name]
        else:
            _assert_same(final[name], expected[name])
    print(f"traces committed per killed run: {progress}; {n_interrupted_seen} kills left an "
          f"interrupted trace group on disk; first trace {first * 1000:.0f} ms, then "
          f"{per_trace * 1000:.1f} ms per trace")


def _assert_same(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    for key, value in want.items():
        assert got[key] == value if key == "attrs" else got[key][:4] == value[:4], key
        if key != "attrs":
            assert got[key][4] == value[4], key
