"""Fault injection for every writing command: a failed write loses no committed trace.

For `cache`, `lhat` (new file, and adding L̂ to an activation cache) and `updates`: a write error
injected at a seeded point (ENOSPC / EIO from the one call that writes store bytes), a file-size
limit (RLIMIT_FSIZE in a child process, between the smallest and the largest segment), a full tmpfs
(where this machine lets the test mount one), and one SIGINT. Each time: the process ends with
exit 2 (130 for SIGINT) and one `error:` line naming the file, the cause and the fix, never a
signal or a traceback; every trace the store lists is bit-exact with an uninterrupted run; and
`--resume` afterwards finishes to a store equal to that run, dataset by dataset.
"""

from __future__ import annotations

import errno
import json
import os
import random
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import pytest

import cache._store as store
from cache import open_cache, pack_cache, segments_dir, store_exists
from probes.demo.run import SAMPLE_TRACES
from probes.measures.capture.activations import DEFAULT_COMPONENTS
from probes.run import main
from tests.probes.commands._store_snapshot import snapshot

ROOT = Path(__file__).resolve().parents[3]
CHILD_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
             "PYTHONPATH": str(ROOT)}
N_TRACES = 3
COMMANDS = ("cache", "lhat", "updates", "lhat+cache")
"""`lhat+cache`: `lhat --resume` adding arrays to an activation cache (add segments)."""
LATER = ("landscape", "anchors", "effects")
"""The writing commands of the later analyses (same loop): injected write errors only."""
EXTRA = {"landscape": ("--grid", "3"), "effects": ("--pairs-per-category", "2"),
         "cache": ("--batch-tokens", "0")}
"""Small settings, so that the references stay fast; `cache` commits each trace on its own here
(a commit per trace, as the other commands; grouped commits: `test_grouped_commit_refused`)."""


def _args(command: str, traces: Path, out: Path, *extra: str) -> list[str]:
    name = command.split("+")[0]
    return [name, "--model", "tiny-reasoner", "--traces", str(traces), "--out", str(out),
            "--device", "cpu", "--no-progress", "--resume", *EXTRA.get(name, ()), *extra]


@pytest.fixture(scope="module")
def traces(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("faults") / "three.jsonl"
    path.write_text("".join(SAMPLE_TRACES.read_text().splitlines(keepends=True)[:N_TRACES]))
    return path


@pytest.fixture(scope="module")
def references(traces, tmp_path_factory) -> dict[str, tuple[Path, dict]]:
    """An uninterrupted run of every command (and the activation cache `lhat+cache` starts from)."""
    folder = tmp_path_factory.mktemp("refs")
    out = {}
    for command in ("cache", "lhat", "updates", *LATER):
        path = folder / f"{command}.h5"
        assert main(_args(command, traces, path)) == 0
        out[command] = (path, snapshot(path))
    both = folder / "lhat+cache.h5"
    _copy_store(out["cache"][0], both)
    assert main(_args("lhat", traces, both)) == 0
    out["lhat+cache"] = (both, snapshot(both))
    return out


def _copy_store(source: Path, target: Path) -> None:
    shutil.copy(source, target)
    shutil.copytree(segments_dir(source), segments_dir(target))


def _start_state(command: str, references: dict, out: Path) -> dict | None:
    """What the command runs on: nothing, or (lhat+cache) a copy of the activation cache, whose
    snapshot is returned."""
    if command == "lhat+cache":
        _copy_store(references["cache"][0], out)
        return references["cache"][1]
    return None


def _check_kept(out: Path, expected: dict, before: dict | None = None) -> int:
    """Every trace the damaged store lists is bit-exact with the uninterrupted run (or, when the
    run adds arrays to an existing store, with the trace as it was `before`: all or nothing).

    Returns:
        The number of traces the run completed.
    """
    if not store_exists(out):  # creating the store failed: nothing was left behind
        return 0
    got = snapshot(out)
    assert got["/"] == expected["/"] and got["/meta"] == expected["/meta"]
    n_done = 0
    for trace_id in got["order"]:
        if got[trace_id] != expected[trace_id]:
            assert before is not None and got[trace_id] == before[trace_id], trace_id
        else:
            n_done += 1
    return n_done


def _one_error_line(err: str, *needles: str) -> str:
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


@pytest.mark.parametrize("command", COMMANDS + LATER)
def test_injected_write_error_keeps_committed_traces_and_resumes(command, traces, references,
                                                                 tmp_path, capsys, monkeypatch):
    expected = references[command][1]
    rng = random.Random(f"inject-{command}")
    for trial, code in enumerate((errno.ENOSPC, errno.EIO)):
        out = tmp_path / f"run{trial}.h5"
        before = _start_state(command, references, out)
        fail_at = rng.randint(1, N_TRACES)  # the n-th write of the run fails (index or segment)
        calls = []
        real = store._write

        def failing(fd, data, code=code, fail_at=fail_at, calls=calls, real=real):
            calls.append(len(data))
            if len(calls) == fail_at:
                raise OSError(code, os.strerror(code))
            return real(fd, data)

        monkeypatch.setattr(store, "_write", failing)
        assert main(_args(command, traces, out)) == 2
        monkeypatch.setattr(store, "_write", real)
        line = _one_error_line(capsys.readouterr().err, str(out), os.strerror(code), "--resume")
        assert ("free space" in line) == (code == errno.ENOSPC)
        assert not list(segments_dir(out).glob("*.tmp"))  # the failed file was removed
        _check_kept(out, expected, before)
        assert main(_args(command, traces, out)) == 0
        capsys.readouterr()
        assert snapshot(out) == expected


def test_grouped_commit_refused(tmp_path, capsys, monkeypatch):
    """`cache` commits short traces in groups (one segment each): a refused group write keeps
    every earlier group bit-exact and nothing of its own group; --resume equals one run."""
    nine = tmp_path / "nine.jsonl"
    nine.write_text("".join(SAMPLE_TRACES.read_text().splitlines(keepends=True)[:9]))
    grouped = ("--batch-tokens", "250")
    reference = tmp_path / "ref.h5"
    assert main(_args("cache", nine, reference, *grouped)) == 0
    capsys.readouterr()
    expected = snapshot(reference)
    groups = [sorted(json.loads(s)) for s in _segment_traces(reference)]
    assert len(groups) >= 2 and all(len(g) >= 2 for g in groups[:-1])
    out = tmp_path / "run.h5"
    calls = []
    real = store._write

    def failing(fd, data):
        calls.append(1)
        if len(calls) == 3:  # the index of the new store, the first group, then the second group
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, data)

    monkeypatch.setattr(store, "_write", failing)
    assert main(_args("cache", nine, out, *grouped)) == 2
    monkeypatch.setattr(store, "_write", real)
    line = _one_error_line(capsys.readouterr().err, str(out), f"writing {len(groups[1])} traces")
    assert "free space" in line and "--resume" in line
    assert _check_kept(out, expected) == len(groups[0])
    assert main(_args("cache", nine, out, *grouped)) == 0
    assert f"{9 - len(groups[0])} traces written, {len(groups[0])} already done" in \
        capsys.readouterr().out
    assert snapshot(out) == expected


@pytest.mark.parametrize("fail_at", [1, 3, N_TRACES + 2])
def test_full_disk_while_moving_a_packed_cache_into_segments(fail_at, traces, references, tmp_path,
                                                             capsys, monkeypatch):
    """`lhat --resume` onto a packed activation cache first moves it into segments; ENOSPC at the
    marker, at a moved trace or at the index that replaces the file: one line, exit 2, the packed
    file unchanged; --resume then finishes to the store of an uninterrupted run."""
    out = tmp_path / "packed.h5"
    pack_cache(references["cache"][0], out)
    packed = out.read_bytes()
    calls = []
    real = store._write

    def failing(fd, data):
        calls.append(1)
        if len(calls) == fail_at:  # 1: the marker, 2..N+1: the traces, N+2: the index
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, data)

    monkeypatch.setattr(store, "_write", failing)
    assert main(_args("lhat", traces, out)) == 2
    monkeypatch.setattr(store, "_write", real)
    _one_error_line(capsys.readouterr().err, f"moving the single-file cache {out} into segments",
                    "No space left on device", f"{out} is unchanged", "free space", "--resume")
    assert out.read_bytes() == packed
    assert snapshot(out) == references["cache"][1]
    assert main(_args("lhat", traces, out)) == 0
    capsys.readouterr()
    assert snapshot(out) == references["lhat+cache"][1]


def _segment_traces(path: Path) -> list[str]:
    """Per segment of the store (in order), the JSON list of the trace groups it holds."""
    folder = segments_dir(path)
    out = []
    for seg in store.list_segments(folder):
        with h5py.File(folder / seg, "r") as f:
            out.append(json.dumps(list(f["traces"])))
    return out


def _store_files(path: Path, command: str) -> list[int]:
    """Sizes of the files the run of `command` writes (its segments, in order, and the index)."""
    folder = segments_dir(path)
    sizes = [(folder / seg).stat().st_size for seg in store.list_segments(folder)]
    if command == "lhat+cache":  # this run writes only the add segments
        sizes = sizes[N_TRACES:]
    return sorted([*sizes, path.stat().st_size])


@pytest.mark.parametrize("command", COMMANDS)
def test_file_size_limit(command, traces, references, tmp_path, capsys):
    """`ulimit -f` (soft RLIMIT_FSIZE, in this process) between the smallest and the largest file
    the uninterrupted run wrote: the run stops at a segment or at the index, with EFBIG."""
    path, expected = references[command]
    sizes = _store_files(path, command)
    limit = random.Random(f"fsize-{command}").randint(sizes[0], sizes[-1] - 1)
    out = tmp_path / "run.h5"
    before = _start_state(command, references, out)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        code = main(_args(command, traces, out))
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert code == 2, (limit, sizes)
    _one_error_line(capsys.readouterr().err, str(out), "File too large", "ulimit -f", "--resume")
    _check_kept(out, expected, before)
    assert main(_args(command, traces, out)) == 0
    capsys.readouterr()
    assert snapshot(out) == expected


_LIMITED = """
import resource, sys
limit = int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
from probes.run import main
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.slow
def test_file_size_limit_in_a_child_process_is_no_signal(traces, references, tmp_path):
    """The same with a hard limit in a child process (as `ulimit -f` in a shell): exit 2."""
    path, expected = references["cache"]
    sizes = _store_files(path, "cache")
    limit = random.Random("fsize-child").randint(sizes[0], sizes[-1] - 1)
    out = tmp_path / "run.h5"
    res = subprocess.run([sys.executable, "-c", _LIMITED, str(limit), *_args("cache", traces, out)],
                         capture_output=True, text=True, env=CHILD_ENV, cwd=ROOT, timeout=300)
    assert res.returncode == 2, (res.returncode, res.stderr[-2000:])  # not a signal
    _one_error_line(res.stderr, str(out), "File too large", "ulimit -f", "--resume")
    _check_kept(out, expected)


def _mount_tmpfs(where: Path, size: int) -> str | None:
    where.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                         capture_output=True, text=True)
    return None if res.returncode == 0 else (res.stderr.strip() or "mount failed")


def test_full_tmpfs_then_free_space_and_resume(traces, references, tmp_path, capsys):
    """A small tmpfs fills up during `cache`; after it grows, --resume completes the store."""
    if not shutil.which("mount") or os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root and mount(8); skipped")
    path, expected = references["cache"]
    folder = segments_dir(path)
    sizes = [(folder / s).stat().st_size for s in store.list_segments(folder)]
    disk = tmp_path / "disk"
    room = path.stat().st_size * 2 + sizes[0] + sizes[1] // 2  # index copies + 1.5 segments
    problem = _mount_tmpfs(disk, room)
    if problem:
        pytest.skip(f"this machine does not let the test mount a tmpfs: {problem}")
    try:
        out = disk / "run.h5"
        assert main(_args("cache", traces, out)) == 2
        _one_error_line(capsys.readouterr().err, str(out), "No space left on device", "free space",
                        "--resume")
        assert 0 < _check_kept(out, expected) < N_TRACES
        subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)
        assert main(_args("cache", traces, out)) == 0
        capsys.readouterr()
        assert snapshot(out) == expected
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


SPOOL = ("--max-ram-mib", "0.01")
"""Every trace's output spooled to a memory-mapped temporary file beside --out."""


def test_spool_without_room_is_one_error(traces, references, tmp_path, capsys, monkeypatch):
    """The spool file cannot get its size (posix_fallocate: ENOSPC) at a seeded trace: one line
    naming the spool folder, the cause and the fix, exit 2; --resume equals one run."""
    expected = references["cache"][1]
    out = tmp_path / "run.h5"
    at = random.Random("spool-enospc").randint(1, N_TRACES)
    calls = []
    real = os.posix_fallocate

    def full(fd, offset, length):  # called once per component of each trace
        calls.append(length)
        if len(calls) == (at - 1) * len(DEFAULT_COMPONENTS) + 1:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, offset, length)

    monkeypatch.setattr(os, "posix_fallocate", full)
    assert main(_args("cache", traces, out, *SPOOL)) == 2
    monkeypatch.undo()
    line = _one_error_line(capsys.readouterr().err, f"temporary file in {tmp_path}:",
                           "No space left on device (ENOSPC)", "free space there",
                           "or more to keep such outputs in RAM", "--resume")
    assert re.match(r"error: cannot spool a trace's output \((\d+\.\d) MiB, over --max-ram-mib\)",
                    line) and "--max-ram-mib {} or more".format(line.split("(")[1].split()[0]) in line
    assert _check_kept(out, expected) == at - 1
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".probes-spool-")]
    assert main(_args("cache", traces, out, *SPOOL)) == 0
    capsys.readouterr()
    assert snapshot(out) == expected


@pytest.mark.slow  # two `cache` runs in child processes (in-process: the spool tests above)
def test_spool_on_a_full_tmpfs_is_no_sigbus(traces, references, tmp_path):
    """Writes into a memory-mapped spool on a full disk ended the process with SIGBUS (exit -7,
    no message); the space is reserved first, so the run ends with one error line, exit 2."""
    if not shutil.which("mount") or os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root and mount(8); skipped")
    path, expected = references["cache"]
    folder = segments_dir(path)
    first = (folder / store.list_segments(folder)[0]).stat().st_size
    disk = tmp_path / "disk"
    # Room for the index but not for the first trace's spool (about its segment's size): the map
    # was written into pages the tmpfs did not have.
    problem = _mount_tmpfs(disk, path.stat().st_size * 2 + first // 3)
    if problem:
        pytest.skip(f"this machine does not let the test mount a tmpfs: {problem}")
    try:
        out = disk / "run.h5"
        res = subprocess.run([sys.executable, "-m", "probes.run", *_args("cache", traces, out, *SPOOL)],
                             capture_output=True, text=True, env=CHILD_ENV, cwd=ROOT, timeout=300)
        assert res.returncode == 2, (res.returncode, res.stderr[-2000:])  # not a signal
        _one_error_line(res.stderr, f"temporary file in {disk}:", "No space left on device",
                        "free space there", "--max-ram-mib", "--resume")
        assert _check_kept(out, expected) == 0
        assert not [p for p in disk.iterdir() if p.name.startswith(".probes-spool-")]
        subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)
        res = subprocess.run([sys.executable, "-m", "probes.run", *_args("cache", traces, out, *SPOOL)],
                             capture_output=True, text=True, env=CHILD_ENV, cwd=ROOT, timeout=300)
        assert res.returncode == 0, res.stderr[-2000:]
        assert snapshot(out) == expected
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


@pytest.mark.parametrize("command", COMMANDS)
def test_sigint_once(command, traces, references, tmp_path, capsys, monkeypatch):
    """Ctrl-C (a real SIGINT to this process) at a seeded write: one line, exit 130, the store
    consistent and resumable."""
    expected = references[command][1]
    out = tmp_path / "run.h5"
    before = _start_state(command, references, out)
    at = random.Random(f"sigint-{command}").randint(1, N_TRACES)
    calls = []
    real = store._write

    def interrupted(fd, data):
        calls.append(1)
        if len(calls) == at:
            os.kill(os.getpid(), signal.SIGINT)  # delivered within this write (between bytecodes)
        return real(fd, data)

    monkeypatch.setattr(store, "_write", interrupted)
    assert main(_args(command, traces, out)) == 130
    monkeypatch.setattr(store, "_write", real)
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("interrupted"), err
    assert not list(segments_dir(out).glob("*.tmp"))
    _check_kept(out, expected, before)
    assert main(_args(command, traces, out)) == 0
    capsys.readouterr()
    assert snapshot(out) == expected


@pytest.mark.slow
def test_sigint_to_the_cli_process(traces, references, tmp_path):
    """Ctrl-C to a real `cache` process once it writes: one line, exit 130, store consistent."""
    expected = references["cache"][1]
    out = tmp_path / "run.h5"
    err_path = tmp_path / "stderr.txt"
    with err_path.open("w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "probes.run", *_args("cache", traces, out)],
                                stdout=subprocess.PIPE, stderr=err, env=CHILD_ENV, cwd=ROOT,
                                text=True)
    deadline = time.monotonic() + 120
    while "writing" not in err_path.read_text() and proc.poll() is None:
        assert time.monotonic() < deadline, "the run did not start writing"
        time.sleep(0.002)
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=120)
    text = err_path.read_text()
    if proc.returncode == 0:
        pytest.skip(f"cache finished its {N_TRACES} traces before the signal arrived")
    assert proc.returncode == 130, text
    assert "Traceback" not in text and text.strip().splitlines()[-1].startswith("interrupted"), text
    _check_kept(out, expected)
    with open_cache(out) if store_exists(out) else _nothing():
        pass


def test_sigint_swallowed_by_a_finalizer(traces, references, tmp_path, capsys, monkeypatch):
    """A Ctrl-C that lands in a `__del__` is swallowed by Python ("Exception ignored in ..."); it
    once let the run finish with exit code 0. It stops the run at the next trace: one line, 130."""
    expected = references["cache"][1]
    out = tmp_path / "run.h5"
    calls = []
    real = store._write

    class Finalizer:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGINT)
            calls.append("del")  # the KeyboardInterrupt is raised here, inside __del__

    def interrupted(fd, data):
        calls.append(1)
        if len(calls) == 1:
            Finalizer()  # collected at once: its __del__ runs within this write
        return real(fd, data)

    monkeypatch.setattr(store, "_write", interrupted)
    assert main(_args("cache", traces, out)) == 130
    monkeypatch.setattr(store, "_write", real)
    err = capsys.readouterr().err
    assert "Traceback" not in err and "Exception ignored" not in err, err
    assert err.strip().splitlines()[-1].startswith("interrupted; the complete traces"), err
    assert _check_kept(out, expected) < N_TRACES
    assert main(_args("cache", traces, out)) == 0
    capsys.readouterr()
    assert snapshot(out) == expected


def test_sigint_while_parsing_is_one_line(monkeypatch, capsys):
    import probes.run

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(probes.run, "build_parser", interrupted)
    assert main(["cache", "--help"]) == 130
    assert capsys.readouterr().err == "interrupted\n"


def test_sigint_while_the_imports_load(tmp_path):
    """Ctrl-C in the seconds `python -m probes.run` spends importing (torch): one line, 130,
    not a traceback and a death by signal."""
    starter = tmp_path / "start.py"
    starter.write_text(
        "import os, runpy, signal, sys\n"
        "class Finder:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'probes.commands':\n"
        "            sys.meta_path.remove(self)\n"
        "            os.kill(os.getpid(), signal.SIGINT)\n"
        "        return None\n"
        "sys.meta_path.insert(0, Finder())\n"
        "sys.argv = ['probes.run', 'inspect', 'x.h5']\n"
        "runpy.run_module('probes.run', run_name='__main__', alter_sys=True)\n"
    )
    proc = subprocess.run([sys.executable, str(starter)], capture_output=True, text=True,
                          env=CHILD_ENV, cwd=ROOT, timeout=120)
    assert (proc.returncode, proc.stderr, proc.stdout) == (130, "interrupted\n", "")


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def test_deleting_the_file_deletes_the_cache(traces, references, tmp_path, capsys):
    """Segments whose index file is gone: resumed with --resume, replaced without it."""
    path, expected = references["cache"]
    out = tmp_path / "run.h5"
    _copy_store(path, out)
    out.unlink()
    assert main(_args("cache", traces, out)) == 0
    assert "0 traces written, 3 already done" in capsys.readouterr().out
    assert snapshot(out) == expected
    out.unlink()
    assert main([a for a in _args("cache", traces, out) if a != "--resume"]) == 0
    assert "3 traces written, 0 already done" in capsys.readouterr().out
    assert snapshot(out) == expected
