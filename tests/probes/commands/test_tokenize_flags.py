"""`--prompt-format` and `--scaffold` on every command that tokenizes traces into a cache: the
store records them, and `--resume` with another one is refused in one line."""

from __future__ import annotations

import argparse

import pytest

from cache import open_cache
from probes import DATA_DIR
from probes.run import build_parser, main

TOKENIZING = ("cache", "lhat", "updates", "anchors", "effects")
TRACES = str(DATA_DIR / "tiny_reasoner_traces.jsonl")


def _sub(name: str) -> argparse.ArgumentParser:
    parser = build_parser(name)
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices[name]


@pytest.mark.parametrize("name", TOKENIZING)
def test_every_tokenizing_command_takes_both_flags(name):
    args = _sub(name).parse_args(["--model", "m", "--traces", "t.jsonl", "--out", "o.h5",
                                  "--prompt-format", "Q: {question}\nA:", "--scaffold", " => "])
    assert (args.prompt_format, args.scaffold) == ("Q: {question}\nA:", " => ")


def test_the_scaffold_is_recorded_and_checked_on_resume(tmp_path, capsys):
    out = tmp_path / "s.h5"
    common = ["lhat", "--model", "tiny-reasoner", "--device", "cpu", "--traces", TRACES,
              "--limit", "1", "--out", str(out), "-q"]
    assert main([*common, "--scaffold", " So the answer is "]) == 0
    with open_cache(out) as reader:
        assert reader.config["scaffold"] == " So the answer is "
        (trace,) = list(reader)
        assert trace.attrs["lhat_scaffold"] == " So the answer is "
    capsys.readouterr()
    assert main([*common, "--resume"]) == 2  # the default scaffold is another one
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "scaffold" in err[0]
