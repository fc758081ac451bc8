"""Feedback of commands that run longer than a second: a progress bar on stderr (tqdm) that is
off with `--quiet` or when stderr is not a terminal, with tokens/s where tokens are processed,
and that keeps its clock moving through a long single step (`Stages.working`).

    stages = Stages(total=3, desc="report", enabled=progress_on(args.quiet))
    with stages:
        with stages.working("comparing"):
            slow_step()
        stages.advance()
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TextIO

QUIET_HELP = "no progress bar on stderr (it is also off when stderr is not a terminal)"
"""`--quiet`'s help text."""

_TICK_S = 0.5
"""How often the bar is redrawn during a long step."""


def quiet_flag(p: Any) -> None:
    """`-q/--quiet`: no progress bar."""
    p.add_argument("-q", "--quiet", action="store_true", help=QUIET_HELP)


def progress_on(quiet: bool, stream: TextIO | None = None) -> bool:
    """Whether to draw a progress bar: not `quiet` and the stream (stderr) is a terminal."""
    stream = sys.stderr if stream is None else stream
    try:
        return not quiet and stream.isatty()
    except (AttributeError, ValueError):  # closed or not a real stream
        return False


_interrupted = threading.Event()
"""Set by a Ctrl-C during `catch_interrupts` (whether or not its KeyboardInterrupt got through)."""


def catch_interrupts() -> Callable[[], None]:
    """Make every Ctrl-C count until the returned function is called (which restores the previous
    SIGINT handler and unraisable hook).

    SIGINT still raises `KeyboardInterrupt`, and it is also remembered: Python swallows an
    exception raised inside a finalizer (`__del__`, a weakref callback: "Exception ignored in
    ..."), and a Ctrl-C that landed there once let a run finish with exit code 0.
    `raise_if_interrupted` raises it again at the next safe point (the write loop's next trace,
    the CLI's edge); the swallowed traceback is not printed.
    """
    _interrupted.clear()
    previous_handler = signal.getsignal(signal.SIGINT)
    previous_hook = sys.unraisablehook

    def on_sigint(signum: int, frame: object) -> None:
        _interrupted.set()
        raise KeyboardInterrupt

    def on_unraisable(unraisable: Any) -> None:
        if isinstance(unraisable.exc_value, KeyboardInterrupt):
            _interrupted.set()
            return
        previous_hook(unraisable)

    in_main = threading.current_thread() is threading.main_thread()
    if in_main:
        signal.signal(signal.SIGINT, on_sigint)
    sys.unraisablehook = on_unraisable

    def restore() -> None:
        if in_main:
            signal.signal(signal.SIGINT, previous_handler)
        sys.unraisablehook = previous_hook
        _interrupted.clear()

    return restore


def raise_if_interrupted() -> None:
    """Raise `KeyboardInterrupt` when a Ctrl-C came during `catch_interrupts` (one that a
    finalizer swallowed stops the run here instead of never)."""
    if _interrupted.is_set():
        raise KeyboardInterrupt


class Stages:
    """A progress bar over the steps of a command (tqdm on stderr; nothing when disabled).

    Attributes:
        enabled: Whether a bar is drawn.
    """

    def __init__(self, *, total: int, desc: str, enabled: bool, unit: str = "step") -> None:
        """A bar of `total` steps labelled `desc`."""
        self.enabled = enabled
        self._desc = desc
        self._bar: Any = None
        self._total = total
        self._unit = unit
        self._tokens = 0
        self._token_s = 0.0
        self._t_step = time.perf_counter()
        self._lock = threading.Lock()

    def __enter__(self) -> Stages:
        """Open the bar."""
        if self.enabled:
            from tqdm import tqdm

            self._bar = tqdm(total=self._total, desc=self._desc, unit=self._unit, file=sys.stderr,
                             dynamic_ncols=True, leave=False)
        return self

    def __exit__(self, *exc: object) -> None:
        """Close the bar (it is removed from the terminal; the command prints its summary line)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def set_total(self, total: int) -> None:
        """The number of steps, once it is known."""
        self._total = total
        if self._bar is not None:
            with self._lock:
                self._bar.total = total
                self._bar.refresh()

    def step(self, what: str) -> None:
        """Say what is being done now (the step's clock starts)."""
        self._t_step = time.perf_counter()
        if self._bar is not None:
            with self._lock:
                self._bar.set_description_str(f"{self._desc}: {what}", refresh=True)

    def advance(self, n: int = 1, *, tokens: int = 0) -> None:
        """Count `n` steps done, and `tokens` processed in them (shown as tokens/s over the steps
        that processed tokens)."""
        if tokens:
            self._tokens += tokens
            self._token_s += time.perf_counter() - self._t_step
        if self._bar is None:
            return
        with self._lock:
            if tokens:
                rate = self._tokens / max(self._token_s, 1e-9)
                self._bar.set_postfix_str(f"{rate:,.0f} tok/s", refresh=False)
            self._bar.update(n)

    @contextmanager
    def working(self, what: str) -> Iterator[None]:
        """A long single step: named, with the bar's clock redrawn every half second."""
        self.step(what)
        if self._bar is None:
            yield
            return
        done = threading.Event()

        def tick() -> None:
            while not done.wait(_TICK_S):
                with self._lock:
                    if self._bar is not None:
                        self._bar.refresh()

        thread = threading.Thread(target=tick, name="progress-tick", daemon=True)
        thread.start()
        try:
            yield
        finally:
            done.set()
            thread.join()
