"""The write loop's rules, tested once for every command that writes through it.

`cache`, `lhat` and `updates` share one loop (`probes.pipeline.loop`): the same refusal of an
existing --out without --resume, the same identity check, the same duplicate-id rule, the same
token-mismatch error, the same way of naming skipped lines, and the same summary line.
"""

import json
import re
import shutil

import pytest

from probes.reasoner.train import CHECKPOINT_DIR, SAMPLES_PATH
from probes.run import main

WRITERS = ("cache", "lhat", "updates")
SUMMARY = re.compile(
    r"^(cache|lhat|updates): (\d+) traces written, (\d+) already done, (\d+) interrupted redone, "
    r"(\d+) left out, (\d+) too long, (\d+) bad lines -> (\S+) \(.*\)$", re.M)


@pytest.fixture(scope="module")
def traces(tmp_path_factory):
    path = tmp_path_factory.mktemp("rules") / "t.jsonl"
    path.write_text("".join(SAMPLES_PATH.read_text().splitlines(keepends=True)[:3]))
    return path


def _run(command, traces, out, *extra):
    return main([command, "--model", "tiny-reasoner", "--device", "cpu", "--no-progress",
                 "--traces", str(traces), "--out", str(out), *extra])


def _one_error(capsys, *needles):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    for needle in needles:
        assert needle in err[0], (needle, err[0])
    return err[0]


@pytest.mark.parametrize("command", WRITERS)
def test_summary_line_resume_and_existing_out(command, traces, tmp_path, capsys):
    out = tmp_path / "run.h5"
    assert _run(command, traces, out) == 0
    first = SUMMARY.search(capsys.readouterr().out)
    assert first and first.group(1) == command and first.group(2, 3) == ("3", "0")
    before = out.read_bytes()
    assert _run(command, traces, out) == 2  # an existing --out needs --resume
    _one_error(capsys, str(out), "--resume")
    assert out.read_bytes() == before
    assert _run(command, traces, out, "--resume") == 0  # everything is done already
    again = SUMMARY.search(capsys.readouterr().out)
    assert again.group(2, 3) == ("0", "3")


@pytest.mark.parametrize("command", WRITERS)
def test_duplicate_ids_are_refused_before_anything_is_written(command, traces, tmp_path, capsys):
    lines = traces.read_text().splitlines()
    dup = tmp_path / "dup.jsonl"
    dup.write_text("\n".join([lines[0], lines[1], lines[1]]) + "\n")
    out = tmp_path / "run.h5"
    assert _run(command, dup, out) == 2
    tid = json.loads(lines[1])["id"]
    _one_error(capsys, f"{dup}:3", repr(tid), "line 2", "unique")
    assert not out.exists()


@pytest.mark.parametrize("command", WRITERS)
def test_changed_tokens_give_the_same_error_and_write_nothing(command, traces, tmp_path, capsys):
    out = tmp_path / "run.h5"
    assert _run(command, traces, out) == 0
    capsys.readouterr()
    before = out.read_bytes()
    lines = traces.read_text().splitlines()
    record = json.loads(lines[0])
    record["trajectory"] = record["trajectory"].replace("\n", "\n\n", 1)
    edited = tmp_path / "edited.jsonl"
    edited.write_text("\n".join([json.dumps(record), *lines[1:]]) + "\n")
    assert _run(command, edited, out, "--resume") == 2
    _one_error(capsys, f"holds trace {record['id']!r} with other tokens", f"{edited}:1",
               "nothing was written")
    assert out.read_bytes() == before


@pytest.mark.parametrize("command", WRITERS)
def test_another_model_is_refused_naming_it(command, traces, tmp_path, capsys):
    out = tmp_path / "run.h5"
    assert _run(command, traces, out) == 0
    capsys.readouterr()
    other = tmp_path / "copy-of-the-reasoner"
    shutil.copytree(CHECKPOINT_DIR, other)
    assert main([command, "--model", str(other), "--device", "cpu", "--no-progress", "--traces",
                 str(traces), "--out", str(out), "--resume"]) == 2
    _one_error(capsys, "its model differ", "model: stored \"tiny-reasoner\"", "another file")


@pytest.mark.parametrize("command", WRITERS)
def test_bad_lines_are_named_and_strict_stops(command, traces, tmp_path, capsys):
    lines = traces.read_text().splitlines()
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join([lines[0], "{not json", lines[1]]) + "\n")
    assert _run(command, bad, tmp_path / "a.h5") == 0
    captured = capsys.readouterr()
    assert "skipped line 2:" in captured.err
    assert SUMMARY.search(captured.out).group(2, 7) == ("2", "1")
    assert _run(command, bad, tmp_path / "b.h5", "--strict") == 2
    _one_error(capsys, f"{bad}:2")
    assert not (tmp_path / "b.h5").exists()


@pytest.mark.parametrize("command", WRITERS)
def test_flag_errors_are_one_line(command, traces, tmp_path, capsys):
    assert _run(command, traces, tmp_path / "x.h5", "--limit", "0") == 2
    _one_error(capsys, "--limit", "at least 1", f"trajectory-probes {command} --help")


@pytest.mark.parametrize("command", WRITERS)
def test_unusable_input_and_outputs_are_refused_before_the_model_loads(command, traces, tmp_path,
                                                                       capsys, monkeypatch):
    import probes.models.load as load

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(load, "load_model", no_model)
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    assert _run(command, empty, tmp_path / "a.h5") == 2
    _one_error(capsys, str(empty), "no usable trace", "nothing was written")
    garbage = tmp_path / "garbage.jsonl"
    garbage.write_bytes(b"\x00\xff\xfe binary\n{oops\n")
    assert _run(command, garbage, tmp_path / "b.h5") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("skipped line 1: not valid UTF-8") and err[1].startswith("skipped line 2:")
    assert len(err) == 3 and err[2].startswith("error: ") and "no usable trace (2 bad lines)" in err[2]
    long_name = tmp_path / ("x" * 300 + ".h5")
    assert _run(command, traces, long_name) == 2
    _one_error(capsys, "too long", "shorter --out")
    assert not any(tmp_path.glob("*.h5"))


@pytest.mark.parametrize("command", WRITERS)
def test_every_trace_too_long_is_an_error(command, tmp_path, capsys):
    record = json.loads(SAMPLES_PATH.read_text().splitlines()[0])
    long = tmp_path / "long.jsonl"
    long.write_text(json.dumps({**record, "trajectory": "1 + 1 = 2.\n" * 200}) + "\n")
    assert _run(command, long, tmp_path / "run.h5") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("skipped line 1:") and "over max_tokens=512" in err[0]
    assert len(err) == 2 and err[1].startswith("error: ") and "longer than the model's context" in err[1]
    assert not (tmp_path / "run.h5").exists()
