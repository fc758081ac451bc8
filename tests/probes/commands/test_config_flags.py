"""The command line is derived from the config dataclasses: every field of a command's configs has
exactly one flag, every flag (beyond the output and report groups) is a field, and the parsed
defaults build the dataclasses' own defaults."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from probes.commands import flags
from probes.measures.anchors import ResampleSettings
from probes.models.spec import ModelSpec
from probes.pipeline.configs import (
    AnchorsConfig,
    CacheConfig,
    EffectsConfig,
    FitConfig,
    LandscapeConfig,
    LhatConfig,
    TraceSource,
    UpdatesConfig,
)
from probes.run import build_parser

CONFIGS: dict[str, tuple[type, ...]] = {
    "cache": (ModelSpec, TraceSource, CacheConfig),
    "lhat": (ModelSpec, TraceSource, LhatConfig),
    "updates": (ModelSpec, TraceSource, UpdatesConfig),
    "anchors": (ModelSpec, TraceSource, AnchorsConfig, ResampleSettings),
    "effects": (ModelSpec, TraceSource, EffectsConfig),
    "landscape": (ModelSpec, TraceSource, LandscapeConfig),
    "fit": (ModelSpec, TraceSource, FitConfig),
}
"""Each writing command and the dataclasses its flags build."""

NOT_FIELDS: dict[str, set[str]] = {
    "effects": {"versus", "plots"},   # the summary's, not the run's
    "fit": {"lexicon", "out"},        # fit labels no tokens; --out is its JSON report
    "anchors": {"max_answer_tokens", "grade_method", "batch_rows"},
}
"""Per command: flags that are no config field, or fields that are no flag (both named by dest)."""

SHARED = {"help", "out", "resume", "json", "quiet"}


def _sub(name: str) -> argparse.ArgumentParser:
    parser = build_parser(name)
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices[name]


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_every_field_has_one_flag_and_every_flag_is_a_field(name):
    dests = [a.dest for a in _sub(name)._actions if a.dest not in SHARED]
    assert len(dests) == len(set(dests)), dests
    fields = [flags.field_dest(f) for cls in CONFIGS[name] for f in flags.flag_fields(cls)]
    assert len(fields) == len(set(fields)), fields
    assert set(dests) ^ set(fields) <= NOT_FIELDS.get(name, set()), (
        sorted(set(dests) - set(fields)), sorted(set(fields) - set(dests)))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_the_parsed_defaults_are_the_dataclass_defaults(name):
    args = _sub(name).parse_args(["--model", "m", "--traces", "t.jsonl", "--out", "o.h5"])
    assert flags.model_from_args(args) == ModelSpec("m")
    if name != "fit":
        assert flags.source_from_args(args) == TraceSource(Path("t.jsonl"))
    cls = CONFIGS[name][2]
    extra = {"resample": flags.config_from_args(ResampleSettings, args)} if name == "anchors" else {}
    assert flags.config_from_args(cls, args, **extra) == cls()


def test_flags_reach_their_fields():
    """A flag with its own name, type or conversion lands in its field."""
    args = _sub("cache").parse_args([
        "--model", "m", "--device", "cpu", "--model-dtype", "bfloat16", "--traces", "t.jsonl",
        "--out", "o.h5", "--limit", "3", "--strict", "--lexicon", "a.json", "--lexicon", "b.json",
        "--sites", "resid_post,delta", "L3.attn_out", "--chunk-size", "64", "--max-ram-mib", "0"])
    assert flags.model_from_args(args) == ModelSpec("m", device="cpu", dtype="bfloat16")
    assert flags.source_from_args(args) == TraceSource(Path("t.jsonl"), limit=3, strict=True,
                                                       lexicon=("a.json", "b.json"))
    assert flags.config_from_args(CacheConfig, args) == CacheConfig(
        sites=("resid_post", "delta", "L3.attn_out"), chunk_size=64, max_ram_mib=0.0)
    land = _sub("landscape").parse_args(["--model", "m", "--traces", "t", "--out", "o",
                                         "--range", "2.5", "--plot-dir", "p"])
    assert flags.config_from_args(LandscapeConfig, land) == LandscapeConfig(span=2.5,
                                                                            plot_dir=Path("p"))
    fit = _sub("fit").parse_args(["--model", "m", "--traces", "t", "--no-nll", "--layers", "0",
                                  "2"])
    assert flags.config_from_args(FitConfig, fit) == FitConfig(nll=False, layers=(0, 2))
    anc = _sub("anchors").parse_args(["--model", "m", "--traces", "t", "--out", "o", "--analyses",
                                      "receiver,resampling", "--k", "4", "--plots", "d"])
    cfg = flags.config_from_args(AnchorsConfig, anc,
                                 resample=flags.config_from_args(ResampleSettings, anc))
    assert cfg == AnchorsConfig(analyses=("receiver", "resampling"), plots="d",
                                resample=ResampleSettings(k=4))


def test_help_comes_from_the_field_docs():
    """A field without a help of its own takes its line of the class docstring."""
    assert flags.field_help(ModelSpec, "device") == "cpu, cuda, cuda:N or auto."
    assert flags.field_help(TraceSource, "scaffold").startswith(
        "Text between the trajectory and the answer (RaML's answer scaffold); part of what a cache")


@pytest.mark.parametrize(("name", "model"), [("landscape", "--model"), ("fit", "--model"),
                                             ("categories", "--tokenizer")])
def test_the_other_tokenizing_commands_take_the_tokenization_flags(name, model):
    args = _sub(name).parse_args([model, "m", "--traces", "t.jsonl", "--out", "o",
                                  "--prompt-format", "Q: {question}\nA:", "--scaffold", " => "]
                                 if name == "landscape" else
                                 [model, "m", "--traces", "t.jsonl", "--prompt-format",
                                  "Q: {question}\nA:", "--scaffold", " => "])
    source = flags.source_from_args(args)
    assert (source.prompt_format, source.scaffold) == ("Q: {question}\nA:", " => ")
