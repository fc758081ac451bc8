"""Progress feedback: a bar on stderr only for a terminal and without --quiet, with tokens/s, and a
clock that moves through a long step."""

from __future__ import annotations

import io
import time

from probes.pipeline.progress import Stages, progress_on


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_bar_only_on_a_terminal_and_without_quiet():
    assert progress_on(False, Terminal())
    assert not progress_on(True, Terminal())
    assert not progress_on(False, io.StringIO())
    closed = io.StringIO()
    closed.close()  # isatty() of a closed stream raises
    assert not progress_on(False, closed)


def test_stages_show_steps_tokens_per_second_and_a_moving_clock(capsys):
    with Stages(total=3, desc="job", enabled=True) as stages:
        stages.step("reading")
        stages.advance(tokens=5000)
        with stages.working("slow step"):
            time.sleep(1.2)
        stages.advance()
        stages.set_total(2)
    err = capsys.readouterr().err
    assert "job: reading" in err and "tok/s" in err and "job: slow step" in err
    assert "[00:01<" in err  # redrawn while the slow step ran
    assert "2/2" in err


def test_disabled_stages_write_nothing(capsys):
    with Stages(total=2, desc="job", enabled=False) as stages:
        stages.step("x")
        with stages.working("y"):
            pass
        stages.advance(tokens=10)
    assert capsys.readouterr().err == ""
