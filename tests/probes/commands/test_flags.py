"""The command line from one source: shared flag groups, defaults stated once, choices from the
constants the code checks against."""

import argparse

import pytest

from hooks.model import DTYPES
from probes.commands import SUBCOMMANDS
from probes.measures.capture.activations import BACKENDS, POSITIONS, STORAGE_DTYPES
from probes.measures.updates.shared_pass import ANSWER_ROWS
from probes.models.choices import CONTROLS
from probes.pipeline.loop import RESUME_HELP
from probes.run import build_parser

NAMES = [name for name, _, _ in SUBCOMMANDS]


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def _option(parser: argparse.ArgumentParser, flag: str) -> argparse.Action:
    return next(a for a in parser._actions if flag in a.option_strings)


def test_every_command_is_in_the_table():
    assert set(_subparsers()) == set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_defaults_are_stated_once(name):
    parser = _subparsers()[name]
    for action in parser._actions:
        text = parser.formatter_class(prog="x")._get_help_string(action) or ""
        assert text.replace("%(default)s", "").count("default") <= 1, (name, action.option_strings)


def test_shared_groups_are_the_same_everywhere():
    subs = _subparsers()
    writers = ("cache", "lhat", "updates")
    for name in writers:
        assert _option(subs[name], "--resume").help == RESUME_HELP
    for name in (*writers, "fit", "categories"):
        assert _option(subs[name], "--strict").help == _option(subs["cache"], "--strict").help
        assert _option(subs[name], "--limit").type is _option(subs["cache"], "--limit").type
    for name in (*writers, "fit"):
        assert tuple(_option(subs[name], "--model-dtype").choices) == tuple(DTYPES)


def test_choices_come_from_the_constants():
    subs = _subparsers()
    assert tuple(_option(subs["cache"], "--positions").choices) == POSITIONS
    assert tuple(_option(subs["cache"], "--dtype").choices) == STORAGE_DTYPES
    assert tuple(_option(subs["cache"], "--backend").choices) == BACKENDS
    assert tuple(_option(subs["updates"], "--control").choices) == CONTROLS
    assert tuple(_option(subs["updates"], "--answer-rows").choices) == ANSWER_ROWS


@pytest.mark.parametrize("name", [n for n in NAMES if n not in ("inspect", "pack")])
def test_every_long_running_command_has_quiet(name):
    """Each command that can run longer than a second draws a bar on a terminal; -q turns it off."""
    action = _option(_subparsers()[name], "--quiet")
    assert "-q" in action.option_strings and action.dest == "quiet"
