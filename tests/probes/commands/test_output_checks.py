"""Issue-11 defects, one test each, asserting exit code and message: plot names from long ids,
output paths checked before work, a config.json that is not JSON, a --control cache without update
arrays, and the creation-race hint."""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import pytest

from cache._h5 import translate_os_error
from probes.demo.run import SAMPLE_TRACES
from probes.models.load import BUILTIN_MODELS
from probes.pipeline.outputs import plot_file_name
from probes.run import main

LONG_ID = "trace/" + "é" * 60 + "x" * 124  # 250 bytes in UTF-8, with a slash and accents
BASE = ["--model", "tiny-reasoner", "--device", "cpu", "--no-progress"]


def _error(capsys, *needles: str) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    for needle in needles:
        assert needle in err[0], (needle, err[0])
    return err[0]


@pytest.fixture(scope="module")
def long_id_traces(tmp_path_factory) -> Path:
    """Three sample traces, the first with a 250-byte id."""
    lines = SAMPLE_TRACES.read_text().splitlines()[:3]
    first = json.loads(lines[0])
    first["id"] = LONG_ID
    path = tmp_path_factory.mktemp("long") / "long.jsonl"
    path.write_text("\n".join([json.dumps(first, ensure_ascii=False), *lines[1:]]) + "\n")
    return path


def test_plot_file_names_are_escaped_short_and_unique():
    assert len(LONG_ID.encode()) == 250
    assert plot_file_name("lhat", "gsm8k-12") == "lhat_gsm8k-12.png"
    name = plot_file_name("lhat", LONG_ID)
    assert len(name.encode()) <= 100 and "/" not in name and name.isascii()
    assert plot_file_name("lhat", LONG_ID + "y") != name  # same 60-char stem, other hash
    assert plot_file_name("lhat", "a/b") != plot_file_name("lhat", "a_b")
    dots = plot_file_name("x", "..")
    assert Path(dots).name == dots and dots != plot_file_name("x", "__")


def test_compare_plots_with_a_250_byte_id(long_id_traces, tmp_path, capsys):
    out = tmp_path / "run.h5"
    assert main(["lhat", *BASE, "--traces", str(long_id_traces), "--out", str(out)]) == 0
    capsys.readouterr()
    plots = tmp_path / "plots"
    assert main(["compare", str(out), "--plots", str(plots), "--n-boot", "50", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    names = [Path(p).name for p in report["plots"]]
    assert any(n.startswith("lhat_trace_") and len(n.encode()) <= 100 for n in names), names
    assert all(Path(p).is_file() for p in report["plots"])

    existing = tmp_path / "file.png"
    existing.write_text("not a folder")
    assert main(["compare", str(out), "--plots", str(existing)]) == 2
    _error(capsys, "--plots", str(existing), "is an existing file")
    assert main(["compare", str(out), "--plots", str(existing / "sub")]) == 2
    _error(capsys, "--plots", "is a file")


def test_fit_out_is_checked_before_the_model_loads(tmp_path, capsys):
    traces = tmp_path / "t.jsonl"
    traces.write_text("".join(SAMPLE_TRACES.read_text().splitlines(keepends=True)[:2]))
    fit = ["fit", "--model", str(tmp_path / "no-such-model"), "--traces", str(traces)]
    assert main([*fit, "--out", str(tmp_path)]) == 2
    _error(capsys, "--out", "is a directory")
    assert main([*fit, "--out", str(tmp_path / "missing" / "r.json")]) == 2
    _error(capsys, "--out", "does not exist", "mkdir -p")
    if os.geteuid() != 0:  # root may write anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o555)
        assert main([*fit, "--out", str(locked / "r.json")]) == 2
        _error(capsys, "--out", "not writable")


def test_config_json_that_is_not_json_is_a_config_problem(tmp_path, capsys):
    folder = tmp_path / "model"
    shutil.copytree(BUILTIN_MODELS["tiny-reasoner"], folder)
    (folder / "config.json").write_text('{"model_type": "llama",')  # cut off
    traces = tmp_path / "t.jsonl"
    traces.write_text("".join(SAMPLE_TRACES.read_text().splitlines(keepends=True)[:2]))
    assert main(["cache", "--model", str(folder), "--traces", str(traces), "--out",
                 str(tmp_path / "x.h5"), "--device", "cpu", "--no-progress"]) == 2
    line = _error(capsys, "config.json", "is not valid JSON", "configuration")
    assert "tokenizer" not in line


def test_control_without_update_arrays_says_so(long_id_traces, tmp_path, capsys):
    trained, other = tmp_path / "trained.h5", tmp_path / "lhat_only.h5"
    assert main(["updates", *BASE, "--traces", str(long_id_traces), "--out", str(trained)]) == 0
    assert main(["lhat", *BASE, "--traces", str(long_id_traces), "--out", str(other)]) == 0
    capsys.readouterr()
    assert main(["compare", str(trained), "--control", str(other), "--n-boot", "50"]) == 2
    _error(capsys, f"--control {other} holds 3 of these traces", "no update arrays",
           "updates --control random-init --resume")


def test_creation_race_hint_names_resume(tmp_path):
    exc = translate_os_error(tmp_path / "x.h5", FileExistsError(errno.EEXIST, "File exists"),
                             writing=True)
    assert "--resume" in str(exc) and "mode=" not in str(exc)
