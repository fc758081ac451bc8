"""CLI-wide guard: every subcommand, fed a table of bad arguments, answers with one `error:` line
and exit code 2 — never a traceback."""


from probes.reasoner.train import SAMPLES_PATH
from probes.run import main

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
