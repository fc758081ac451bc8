"""Fault injection for every file written outside a cache store (`probes.safe_output`).

Per writer (`grade --out`, `report --out`, `fit --out`, the directions and summary files and the
`--plots` of `effects`, the `--plots` of `compare` and `anchors`, the `--plot-dir` of `landscape`):
a write error injected at a seeded write (ENOSPC, EIO, EACCES from the one call that writes output
bytes), a file-size limit (RLIMIT_FSIZE) below the output's size, and a full tmpfs (where this
machine lets the test mount one). Each time: exit 2 and one `error:` line naming the file, the
cause and the fix, never a traceback; an output that existed keeps its content or is replaced by a
complete one; no temporary file is left. `report` under `ulimit -f` 50/200/500 KiB (child
process) and on a tmpfs of 100/300/600 KiB: one line where the page does not fit, a complete page
where it does. `generate`'s JSONL append, filled up at 8/16/24 KiB
(`ulimit -f` in a child process, and a tmpfs): every complete record stays, the partial one is cut
off, and `--resume` finishes to the uninterrupted run's records. Outputs this user may not write
(dropped CAP_DAC_OVERRIDE, as root runs these tests) are refused before any work.
"""

from __future__ import annotations

import errno
import json
import os
import random
import resource
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

import probes.safe_output as safe_output
from cache import segments_dir
from probes.demo.run import SAMPLE_TRACES
from probes.reasoner.task import generate_problems, write_jsonl
from probes.run import main

ROOT = Path(__file__).resolve().parents[3]
CHILD_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
             "PYTHONPATH": str(ROOT)}
BASE = ("--model", "tiny-reasoner", "--device", "cpu")
PREVIOUS = b"what an earlier run wrote\n"
PAGE = 4096

_LIMITED = """
import resource, sys
limit = int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
from probes.run import main
sys.exit(main(sys.argv[2:]))
"""
"""`python -m probes.run` under a hard file-size limit (as after `ulimit -f` in a shell)."""


def _one_error_line(err: str, *needles: str) -> str:
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def _no_tmp_left(folder: Path) -> None:
    left = list(folder.rglob(".*.tmp"))
    assert not left, left


def _complete(path: Path) -> bool:
    """Whether `path` holds a whole output of its kind."""
    data = path.read_bytes()
    if path.suffix == ".png":
        return data.startswith(b"\x89PNG\r\n\x1a\n") and data.endswith(b"IEND\xaeB`\x82")
    if path.suffix == ".html":
        return data.rstrip().endswith(b"</html>")
    if path.suffix == ".npz":
        with np.load(path) as z:
            return len(z.files) > 0
    if path.suffix == ".jsonl":
        return data.endswith(b"\n") and all(json.loads(x) for x in data.splitlines())
    json.loads(data)
    return True


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    """Traces, an L̂ cache (report, compare) and complete effects / anchors stores."""
    folder = tmp_path_factory.mktemp("outputs")
    traces = folder / "three.jsonl"
    traces.write_text("".join(SAMPLE_TRACES.read_text().splitlines(keepends=True)[:3]))
    out = {"traces": traces, "lhat": folder / "lhat.h5", "effects": folder / "eff.h5",
           "anchors": folder / "anc.h5"}
    common = [*BASE, "--traces", str(traces), "-q"]
    assert main(["lhat", *common, "--out", str(out["lhat"])]) == 0
    assert main(["effects", *common, "--limit", "2", "--pairs-per-category", "2", "--out",
                 str(out["effects"])]) == 0
    assert main(["anchors", *common, "--limit", "1", "--out", str(out["anchors"])]) == 0
    return out


def _copy_store(source: Path, target: Path) -> None:
    shutil.copy(source, target)
    shutil.copytree(segments_dir(source), segments_dir(target))


def _grade(d, f):
    return ["grade", str(d["traces"]), "--out", str(f / "graded.jsonl")], [f / "graded.jsonl"]


def _report(d, f):
    return ["report", str(d["lhat"]), "--out", str(f / "r.html"), "-q", "--n-boot", "20"], \
        [f / "r.html"]


def _fit(d, f):
    # one layer: what is under test is the write of the report, not the size of the fits
    return ["fit", *BASE, "--traces", str(d["traces"]), "--limit", "2", "--layers", "0", "--no-nll",
            "--n-boot", "20", "-q", "--out", str(f / "fit.json")], [f / "fit.json"]


def _effects(d, f):
    out = f / "e.h5"
    if not out.exists():
        _copy_store(d["effects"], out)  # complete: the run writes only the files below
        # the behaviour directions are fixed at the first run and reused on resume
        shutil.copy(Path(f"{d['effects']}.directions.npz"), f / "e.h5.directions.npz")
    return ["effects", *BASE, "--traces", str(d["traces"]), "--limit", "2", "--pairs-per-category",
            "2", "--out", str(out), "--resume", "--plots", str(f / "plots"), "-q"], \
        [f / "e.h5.effects.json", f / "plots" / "effects_scatter.png"]


def _compare(d, f):
    names = ["categories_abs_delta.png", "lhat_tr-2-0.png", "lhat_tr-2-1.png", "lhat_tr-2-2.png"]
    return ["compare", str(d["lhat"]), "--plots", str(f / "plots"), "--n-boot", "20"], \
        [f / "plots" / n for n in names]


def _anchors(d, f):
    out = f / "a.h5"
    if not out.exists():
        _copy_store(d["anchors"], out)
    names = ["chunk_importance.png", "receiver_kurtosis.png", "suppression_matrix.png"]
    return ["anchors", *BASE, "--traces", str(d["traces"]), "--limit", "1", "--out", str(out),
            "--resume", "--plots", str(f / "plots"), "-q"], [f / "plots" / n for n in names]


def _landscape(d, f):
    stem = f / "plots" / "landscape_tr-2-0"
    return ["landscape", *BASE, "--traces", str(d["traces"]), "--limit", "1", "--grid", "3",
            "--out", str(f / "l.h5"), "--resume", "--plot-dir", str(f / "plots"), "-q"], \
        [Path(f"{stem}_{k}.png") for k in ("random", "path_plane", "path_loss")]


WRITERS: dict[str, Callable] = {"grade": _grade, "report": _report, "fit": _fit,
                                "effects": _effects, "compare": _compare, "anchors": _anchors,
                                "landscape": _landscape}
REPLACES = {"report", "fit", "effects", "compare", "anchors", "landscape"}
"""Writers whose outputs may already exist (they are replaced); `grade` refuses an existing one."""


def _seed(targets: list[Path], name: str) -> None:
    """What an earlier run left (kept if this run fails before replacing it)."""
    if name in REPLACES:
        for t in targets:
            t.parent.mkdir(parents=True, exist_ok=True)
            t.write_bytes(PREVIOUS)


def _kept_or_complete(targets: list[Path], name: str) -> None:
    for t in targets:
        if name in REPLACES:
            assert t.read_bytes() == PREVIOUS or _complete(t), t
        else:
            assert not t.exists(), t


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory) -> dict[str, tuple[int, list[int], Path]]:
    """Per writer, an uninterrupted run: its number of output writes, its output sizes and its
    folder."""
    out = {}
    real = safe_output._write
    for name, make in WRITERS.items():
        folder = tmp_path_factory.mktemp(f"ref-{name}")
        argv, targets = make(data, folder)
        calls = []

        def counting(fd, view, calls=calls):
            calls.append(1)
            return real(fd, view)

        safe_output._write = counting
        try:
            assert main(argv) == 0, name
        finally:
            safe_output._write = real
        assert all(_complete(t) for t in targets), name
        out[name] = (len(calls), [t.stat().st_size for t in targets], folder)
    return out


@pytest.mark.parametrize("name", list(WRITERS))
def test_injected_write_errors(name, data, reference, tmp_path, capsys, monkeypatch):
    """ENOSPC at the first output write, EIO at the last, EACCES at a seeded one."""
    n_calls, _, _ = reference[name]
    rng = random.Random(f"outputs-{name}")
    for trial, (code, at) in enumerate(((errno.ENOSPC, 1), (errno.EIO, n_calls),
                                        (errno.EACCES, rng.randint(1, n_calls)))):
        folder = tmp_path / f"t{trial}"
        folder.mkdir()
        argv, targets = WRITERS[name](data, folder)
        _seed(targets, name)
        calls = []
        real = safe_output._write

        def failing(fd, view, code=code, at=at, calls=calls, real=real):
            calls.append(1)
            if len(calls) == at:
                raise OSError(code, os.strerror(code))
            return real(fd, view)

        monkeypatch.setattr(safe_output, "_write", failing)
        capsys.readouterr()
        assert main(argv) == 2, (name, trial)
        monkeypatch.setattr(safe_output, "_write", real)
        line = _one_error_line(capsys.readouterr().err, os.strerror(code), "then rerun")
        assert any(f"cannot write {t}:" in line for t in targets), line
        assert ("free space" in line) == (code == errno.ENOSPC), line
        assert ("make the folder writable" in line) == (code == errno.EACCES), line
        _kept_or_complete(targets, name)
        _no_tmp_left(folder)
    assert main(argv) == 0  # the fix: rerun
    assert all(_complete(t) for t in targets)


@pytest.mark.parametrize("name", list(WRITERS))
def test_file_size_limit(name, data, reference, tmp_path, capsys):
    """`ulimit -f` (soft RLIMIT_FSIZE, in this process) above every store file the run writes and
    below the size of one of its outputs: EFBIG, named for that output."""
    _, sizes, ref = reference[name]
    stores = [p.stat().st_size for p in ref.rglob("*") if p.is_file() and ".h5" in p.name]
    low = max(stores, default=0) + 1
    high = min(s for s in sizes if s > low)
    limit = random.Random(f"fsize-{name}").randint(max(low, high // 4), high - 1)
    argv, targets = WRITERS[name](data, tmp_path)
    _seed(targets, name)
    capsys.readouterr()
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        code = main(argv)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert code == 2, (limit, sizes)
    line = _one_error_line(capsys.readouterr().err, "File too large", "ulimit -f")
    assert any(f"cannot write {t}:" in line for t, s in zip(targets, sizes) if s > limit), line
    _kept_or_complete(targets, name)
    _no_tmp_left(tmp_path)


def _mount_tmpfs(where: Path, size: int) -> str | None:
    where.mkdir()
    if not shutil.which("mount") or os.geteuid() != 0:
        return "mounting a tmpfs needs root and mount(8)"
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                         capture_output=True, text=True)
    return None if res.returncode == 0 else (res.stderr.strip() or "mount failed")


def _umount(where: Path) -> None:
    subprocess.run(["umount", "-l", str(where)], capture_output=True)


@pytest.mark.parametrize("name", list(WRITERS))
def test_full_tmpfs(name, data, reference, tmp_path, capsys):
    """The outputs' folder on a tmpfs that has less room than the smallest output (grade, report,
    fit: the output file; the others: the plot folder)."""
    _, sizes, _ = reference[name]
    disk = tmp_path / "disk"
    problem = _mount_tmpfs(disk, 64 * 1024)
    if problem:
        pytest.skip(f"this machine does not let the test mount a tmpfs: {problem}")
    try:
        (disk / "filler").write_bytes(b"\0" * (64 * 1024 - (PAGE if min(sizes) > PAGE else 0)))
        on_disk = name in ("grade", "report", "fit")
        argv, targets = WRITERS[name](data, disk if on_disk else tmp_path)
        if not on_disk:
            (tmp_path / "plots").symlink_to(disk)
        capsys.readouterr()
        assert main(argv) == 2
        line = _one_error_line(capsys.readouterr().err, "No space left on device", "free space")
        assert any(f"cannot write {t}:" in line for t in targets), line
        assert all(not t.exists() or _complete(t) for t in targets)
        _no_tmp_left(disk)
    finally:
        _umount(disk)


@pytest.mark.slow  # six child processes, each loading the toolkit and writing the page
@pytest.mark.parametrize(("kind", "kib"), [("ulimit", 50), ("ulimit", 200), ("ulimit", 500),
                                         ("tmpfs", 100), ("tmpfs", 300), ("tmpfs", 600)])
def test_report_room(kind, kib, data, reference, tmp_path):
    """`report` (about 400 KiB here) under `ulimit -f` in a child process and on a tmpfs of `kib`
    KiB: exit 2 with one line where the page does not fit (not SIGXFSZ), a complete page where it
    does; never a partial page or a temporary file."""
    size = reference["report"][1][0]
    folder = tmp_path / "disk"
    if kind == "tmpfs":
        problem = _mount_tmpfs(folder, kib * 1024)
        if problem:
            pytest.skip(f"this machine does not let the test mount a tmpfs: {problem}")
        prefix = [sys.executable, "-m", "probes.run"]
    else:
        folder.mkdir()
        prefix = [sys.executable, "-c", _LIMITED, str(kib * 1024)]
    try:
        argv, (page,) = _report(data, folder)
        res = subprocess.run([*prefix, *argv], capture_output=True, text=True, env=CHILD_ENV,
                             cwd=ROOT, timeout=300)
        if size <= kib * 1024:
            assert res.returncode == 0 and _complete(page), res.stderr[-2000:]
        else:
            assert res.returncode == 2, (res.returncode, res.stderr[-2000:])
            cause = "File too large" if kind == "ulimit" else "No space left on device"
            _one_error_line(res.stderr, f"cannot write {page}:", cause)
            assert not page.exists()
        _no_tmp_left(folder)
    finally:
        if kind == "tmpfs":
            _umount(folder)


# -- generate: the JSONL append --------------------------------------------------------------------
def _generate_args(questions: Path, out: Path) -> list[str]:
    return ["generate", *BASE, "--questions", str(questions), "--out", str(out), "--temperature",
            "0.8", "--no-progress", "--resume"]


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> tuple[Path, list[bytes]]:
    """Three questions and the records (lines) an uninterrupted `generate` writes for them."""
    folder = tmp_path_factory.mktemp("generate")
    questions = folder / "q.jsonl"
    write_jsonl(generate_problems(3, seed=31), questions)
    out = folder / "ref.jsonl"
    assert main(_generate_args(questions, out)) == 0
    lines = out.read_bytes().splitlines(keepends=True)
    assert len(lines) == 3
    return questions, lines


def _prefill(path: Path, lines: list[bytes], limit: int) -> bytes:
    """Records of an earlier run of the same settings (one, padded), so that the first new record
    still fits under `limit` bytes and the second does not."""
    size = limit - len(lines[0]) - len(lines[1]) // 2
    record = json.loads(lines[0])
    record["id"], record["trajectory"] = "earlier-s0", ""
    pad = size - len(json.dumps(record, ensure_ascii=False)) - 1
    record["trajectory"] = "x" * pad
    data = (json.dumps(record, ensure_ascii=False) + "\n").encode()
    assert len(data) == size and size + len(lines[0]) < limit < size + len(lines[0]) + len(lines[1])
    path.write_bytes(data)
    return data


def _check_cut(path: Path, before: bytes, lines: list[bytes], err: str, cause: str) -> None:
    _one_error_line(err, str(path), cause, "after 1 new records", "--resume")
    assert path.read_bytes() == before + lines[0]  # every complete record, no partial line


@pytest.mark.slow  # a child process that loads the model and generates (in-process: full tmpfs)
@pytest.mark.parametrize("kib", [8, 16, 24])
def test_generate_file_size_limit_in_a_child_process(kib, generated, tmp_path):
    """`ulimit -f` in a child process: exit 2 (not SIGXFSZ), the file ends with its last complete
    record."""
    questions, lines = generated
    out = tmp_path / "s.jsonl"
    before = _prefill(out, lines, kib * 1024)
    res = subprocess.run([sys.executable, "-c", _LIMITED, str(kib * 1024),
                          *_generate_args(questions, out)],
                         capture_output=True, text=True, env=CHILD_ENV, cwd=ROOT, timeout=300)
    assert res.returncode == 2, (res.returncode, res.stderr[-2000:])
    _check_cut(out, before, lines, res.stderr, "File too large")


@pytest.mark.parametrize("kib", [8, 16, 24])
def test_generate_full_tmpfs(kib, generated, tmp_path, capsys):
    questions, lines = generated
    disk = tmp_path / "disk"
    problem = _mount_tmpfs(disk, kib * 1024)
    if problem:
        pytest.skip(f"this machine does not let the test mount a tmpfs: {problem}")
    try:
        out = disk / "s.jsonl"
        before = _prefill(out, lines, kib * 1024)
        capsys.readouterr()
        assert main(_generate_args(questions, out)) == 2
        _check_cut(out, before, lines, capsys.readouterr().err, "No space left on device")
    finally:
        _umount(disk)


def test_generate_injected_error_then_resume(generated, tmp_path, capsys, monkeypatch):
    """EIO on the second record's write: the first stays, --resume ends with the uninterrupted
    run's records."""
    questions, lines = generated
    out = tmp_path / "s.jsonl"
    before = _prefill(out, lines, 8 * 1024)
    calls = []
    real = safe_output._write

    def failing(fd, view):
        calls.append(1)
        if len(calls) == 2:
            real(fd, bytes(view)[:10])  # part of the line reached the disk
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return real(fd, view)

    monkeypatch.setattr(safe_output, "_write", failing)
    capsys.readouterr()
    assert main(_generate_args(questions, out)) == 2
    monkeypatch.setattr(safe_output, "_write", real)
    _check_cut(out, before, lines, capsys.readouterr().err, "Input/output error")
    assert main(_generate_args(questions, out)) == 0
    assert out.read_bytes() == before + b"".join(lines)


# -- outputs this user may not write ----------------------------------------------------------------
def _without_dac_override(argv: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(["setpriv", "--bounding-set=-dac_override,-dac_read_search",
                           sys.executable, "-m", "probes.run", *argv],
                          capture_output=True, text=True, env=CHILD_ENV, cwd=ROOT, timeout=300)


@pytest.fixture(scope="module")
def updates_store(data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("upd") / "u.h5"
    assert main(["updates", *BASE, "--traces", str(data["traces"]), "--limit", "1", "-q",
                 "--out", str(out)]) == 0
    return out


@pytest.mark.slow  # five child processes without CAP_DAC_OVERRIDE, each loading the toolkit
def test_unwritable_outputs_are_refused_before_any_work(data, generated, updates_store, tmp_path):
    """A read-only folder (generate, report, grade), a read-only JSONL to resume, a read-only
    store lock file (updates --resume): one line each, exit 2, nothing written."""
    if os.geteuid() != 0 or not shutil.which("setpriv"):
        pytest.skip("needs root and setpriv(1) to drop CAP_DAC_OVERRIDE")
    locked = tmp_path / "locked"
    locked.mkdir()
    resumed = tmp_path / "resumed.jsonl"
    resumed.write_bytes(generated[1][0])
    resumed.chmod(0o444)
    lock = segments_dir(updates_store) / ".lock-s"
    lock.chmod(0o444)
    cases = {
        "generate": (_generate_args(generated[0], locked / "s.jsonl"), locked, "not writable"),
        "generate --resume": (_generate_args(generated[0], resumed), resumed, "not writable"),
        "report": (["report", str(data["lhat"]), "--out", str(locked / "r.html")], locked,
                   "not writable"),
        "grade": (["grade", str(data["traces"]), "--out", str(locked / "g.jsonl")], locked,
                   "not writable"),
        "updates --resume": (["updates", *BASE, "--traces", str(data["traces"]), "--limit", "1",
                              "-q", "--out", str(updates_store), "--resume"], lock,
                             "Permission denied"),
    }
    locked.chmod(0o555)
    try:
        for what, (argv, named, cause) in cases.items():
            res = _without_dac_override(argv)
            assert res.returncode == 2, (what, res.stderr[-2000:])
            _one_error_line(res.stderr, str(named), cause)
        assert list(locked.iterdir()) == [] and resumed.read_bytes() == generated[1][0]
    finally:
        locked.chmod(0o755)
        lock.chmod(0o644)
