"""CLI-wide guard: every subcommand, fed a table of bad arguments, answers with one `error:` line
and exit code 2 — never a traceback."""

import argparse

import pytest

from probes.commands import flags
from probes.reasoner.train import SAMPLES_PATH
from probes.run import build_parser, main

MODEL = ["--model", "tiny-reasoner", "--device", "cpu", "--no-progress"]


def _cases(tmp):
    traces = str(SAMPLES_PATH)
    a_file = tmp / "a-file.txt"
    a_file.write_text("not a cache\n")
    a_dir = tmp / "a-dir"
    a_dir.mkdir()
    out = str(tmp / "out.h5")
    return [
        ("demo", ["--device", "tpu"], "tpu"),
        ("demo", ["--limit", "0"], "--limit"),
        ("demo", ["--out", str(a_file)], "a-file.txt"),
        ("categories", ["--traces", str(tmp / "none.jsonl"), "--tokenizer", "tiny-reasoner"],
         "none.jsonl"),
        ("categories", ["--traces", traces, "--tokenizer", str(tmp / "no-model")], "no-model"),
        ("categories", ["--traces", str(a_dir), "--tokenizer", "tiny-reasoner"], "directory"),
        ("cache", [*MODEL, "--traces", traces, "--out", out, "--sites", "bogus"], "bogus"),
        ("cache", [*MODEL, "--traces", traces, "--out", out, "--dtype", "int8"], "--dtype"),
        ("cache", [*MODEL, "--traces", traces, "--out", out, "--chunk-size", "0"], "--chunk-size"),
        ("cache", [*MODEL, "--traces", traces, "--out", out, "--max-ram-mib", "-1"],
         "--max-ram-mib"),
        ("cache", [*MODEL, "--traces", traces, "--out", str(a_dir)], "is a directory"),
        ("cache", [*MODEL, "--traces", traces, "--out", str(tmp / "no" / "x.h5")], "does not exist"),
        ("cache", ["--model", str(tmp / "no-model"), "--traces", traces, "--out", out], "no-model"),
        ("inspect", [str(tmp / "missing.h5")], "missing.h5"),
        ("inspect", [str(a_file)], "a-file.txt"),
        ("inspect", [str(a_dir)], "a-dir"),
        ("lhat", [*MODEL, "--traces", traces, "--out", out, "--check-naive", "-1"], "--check-naive"),
        ("lhat", [*MODEL, "--traces", traces, "--out", out, "--max-pack-tokens", "0"],
         "--max-pack-tokens"),
        ("lhat", [*MODEL, "--traces", str(a_file), "--out", out], "no usable trace"),
        ("updates", [*MODEL, "--traces", traces, "--out", out, "--layers", "99", "--limit", "1"],
         "out of range"),
        ("updates", [*MODEL, "--traces", traces, "--out", out, "--answer-rows", "all"],
         "--answer-rows"),
        ("updates", [*MODEL, "--traces", traces, "--out", out, "--control", "shuffled"],
         "--control"),
        ("fit", [*MODEL[:4], "--traces", traces, "--n-boot", "0"], "--n-boot"),
        ("fit", [*MODEL[:4], "--traces", traces, "--out", str(tmp / "no" / "r.json")],
         "does not exist"),
        ("compare", [str(tmp / "missing.h5")], "missing.h5"),
        ("compare", [str(a_file)], "a-file.txt"),
        ("compare", [str(a_file), "--n-boot", "0"], "--n-boot"),
        ("compare", [str(a_file), "--metric", "bogus"], "--metric"),
        ("nosuchcommand", [], "invalid choice"),
    ]


def test_no_bad_argument_ends_in_a_traceback(tmp_path, capsys):
    failures = []
    for command, args, needle in _cases(tmp_path):
        try:
            code = main([command, *args])
        except BaseException as exc:  # a traceback: what this test exists to catch
            failures.append(f"{command} {args}: {type(exc).__name__}: {exc}")
            continue
        err = capsys.readouterr().err.strip().splitlines()
        last = err[-1] if err else ""
        if code != 2 or not last.startswith("error: ") or needle not in last:
            failures.append(f"{command} {args}: exit {code}, stderr {err[-3:]}")
    assert failures == []


BAD_NUMBERS = {
    flags.positive_int: ["0", "-1", str(2**63), str(10**30), "1.5", "nan", "x"],
    flags.nonnegative_int: ["-1", str(2**63), str(10**30), "1.5", "inf", "x"],
    flags.seed: ["-1", str(2**63), str(10**30), "1.5", "nan", "x"],
    flags.nonnegative_float: ["-1", "-0.5", "nan", "inf", "-inf", "1e400", "x"],
    flags.positive_float: ["0", "-1", "nan", "inf", "1e400", "x"],
    flags.unit_interval: ["0", "-0.1", "1.5", "nan", "inf", "x"],
    flags.probability: ["-0.1", "1.5", "nan", "inf", "x"],
}
"""Per typed validator of `probes.commands.flags`: values that must be refused."""


def _numeric_options():
    """(command, flag, validator) of every option whose value is a number, found from the parser:
    any typed option whose type turns "1" into an int or a float."""
    top = build_parser()
    sub = next(a for a in top._actions if isinstance(a, argparse._SubParsersAction))
    out = []
    for name, parser in sub.choices.items():
        for action in parser._actions:
            if not action.option_strings or action.type is None or action.choices:
                continue
            try:
                sample = action.type("1")
            except (argparse.ArgumentTypeError, ValueError, TypeError):
                continue
            if isinstance(sample, (int, float)) and not isinstance(sample, bool):
                out.append((name, action.option_strings[-1], action.type))
    return out


NUMERIC_OPTIONS = _numeric_options()


def test_every_numeric_option_has_a_typed_validator():
    """A bare `int`/`float` lets -1, NaN, inf or 10**30 through to numpy/torch (a traceback, an
    all-NaN grid): each numeric option takes one of the validators in `flags`."""
    untyped = [(c, f, getattr(t, "__name__", t)) for c, f, t in NUMERIC_OPTIONS if t not in BAD_NUMBERS]
    assert untyped == []
    assert len(NUMERIC_OPTIONS) >= 40  # the parser walk sees the options (guards the guard)


@pytest.mark.parametrize(("command", "flag", "kind"), NUMERIC_OPTIONS,
                         ids=[f"{c}{f}" for c, f, _ in NUMERIC_OPTIONS])
def test_a_bad_number_is_one_error_line(command, flag, kind, capsys):
    for bad in BAD_NUMBERS.get(kind, ["-1", "nan", str(10**30)]):
        assert main([command, f"{flag}={bad}"]) == 2, (flag, bad)
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and f"argument {flag}" in err[0], err
        if bad == str(10**30):  # once `ValueError: Overflow when unpacking long long` deep in torch
            assert "must be at most 2**63-1" in err[0], err


@pytest.mark.parametrize(("kind", "good", "value"), [
    (flags.positive_int, "1", 1), (flags.positive_int, str(2**63 - 1), 2**63 - 1),
    (flags.nonnegative_int, "0", 0), (flags.seed, "0", 0), (flags.seed, str(2**63 - 1), 2**63 - 1),
    (flags.nonnegative_float, "0", 0.0), (flags.positive_float, "1e-3", 1e-3),
    (flags.unit_interval, "1", 1.0), (flags.probability, "0", 0.0), (flags.probability, "1", 1.0),
])
def test_the_validators_take_the_edges_of_their_range(kind, good, value):
    assert kind(good) == value


def _broken_model(folder, name):
    """A copy of tiny-reasoner's checkpoint with one file broken as `name` says."""
    import json
    import shutil

    from probes.models.load import BUILTIN_MODELS

    target = folder / name
    shutil.copytree(BUILTIN_MODELS["tiny-reasoner"], target)
    config = json.loads((target / "config.json").read_text())
    weights = target / "model.safetensors"
    if name in ("layers-minus-one", "layers-not-layer-types"):
        config["num_hidden_layers"] = -1 if name == "layers-minus-one" else 3
    elif name == "heads-zero":
        config["num_attention_heads"] = 0
    elif name == "truncated-weights":
        weights.write_bytes(weights.read_bytes()[:weights.stat().st_size // 2])
    elif name == "empty-tokenizer":
        tok = json.loads((target / "tokenizer.json").read_text())
        tok["model"]["vocab"], tok["model"]["merges"], tok["added_tokens"] = {}, [], []
        (target / "tokenizer.json").write_text(json.dumps(tok))
    elif name == "no-tokenizer-json":
        (target / "tokenizer.json").unlink()
    (target / "config.json").write_text(json.dumps(config))
    return target


@pytest.mark.parametrize(("name", "file", "needles"), [
    ("layers-minus-one", "config.json", ["num_hidden_layers` (-1)", "layer_types", "fix the file"]),
    ("layers-not-layer-types", "config.json", ["num_hidden_layers` (3)", "layer_types"]),
    ("heads-zero", "config.json", ["num_attention_heads = 0", "positive integer", "fix the file"]),
    ("truncated-weights", "model.safetensors", ["incomplete metadata", "truncated", "copy it again"]),
    ("empty-tokenizer", "tokenizer.json", ["turns text into no tokens", "holds no tokens",
                                           "tokenizer files"]),
    ("no-tokenizer-json", "", ["turns text into no tokens", "none of the tokenizer files",
                               "tokenizer.json"]),
])
def test_a_broken_model_folder_is_one_line_before_any_output(name, file, needles, tmp_path,
                                                             capsys):
    """Each once ended in a traceback (ValueError, SafetensorError, IndexError mid-run, which also
    left an empty store that blocked the rerun)."""
    folder = _broken_model(tmp_path, name)
    out = tmp_path / "run.h5"
    code = main(["cache", "--model", str(folder), "--device", "cpu", "--no-progress", "--traces",
                 str(SAMPLES_PATH), "--limit", "2", "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: "), err
    assert str(folder / file) in err[0], err
    for needle in needles:
        assert needle in err[0], (needle, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]  # no store, no segments
