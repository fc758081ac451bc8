"""Settings of the readouts (`compare`, `report`).

A light module: the command line builds its flags from it without importing the readouts."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from analyses.metrics import METRICS
from probes.errors import ProbesError

COMPARE_METRICS: tuple[str, ...] = ("abs_delta", *(m for m in METRICS if m != "abs_delta"))
"""`--metric` choices (`analyses.lhat_effects.METRICS`, the default first)."""


UNITS: tuple[str, ...] = ("phrase", "first_token", "token")
"""`--unit`: a phrase counts as a whole, by its first token, or per token."""


STATISTICS: tuple[str, ...] = ("mean", "median")
"""`--statistic`: the per-trace aggregate."""


PAIRINGS: tuple[str, ...] = ("consecutive", "first", "all")
"""`compare-models --pairs`: each model against the one before it, every model against the first, or
all pairs."""

PlotSave = Callable[[Any, str], str]
"""Keeps one plot: (Matplotlib Figure, file name) -> what the report lists for it (`folder_saver`:
the PNG's path; `report` keeps the PNGs in memory instead)."""


UPDATE_UNITS: tuple[str, ...] = ("token", "first_token")
"""`--update-unit`: every token of a phrase, or its first token."""


LAYER_VIEWS: tuple[str, ...] = ("pooled", "all")
"""`--layers`: update rows pooled over layers, or every layer."""


@dataclass(frozen=True, kw_only=True)
class CompareConfig:
    """Settings of a `compare` run.

    Attributes:
        metric: Per-token quantity compared (|ΔL̂| by default; RaML's ρ is `rho`).
        unit: How a phrase counts: "phrase" (change across the whole phrase), "first_token", "token".
        statistic: Per-trace aggregate ("mean" or "median").
        raml_notebook: Reproduce RaML's notebook: its ten reflection words matched by their ids
            without a leading space up to `</think>`, and its window (one token past the word).
        n_boot: Bootstrap resamples.
        seed: Seed of the controls (position matching, label shuffling) and the bootstrap.
        plots: Folder for PNG plots, or None.
        plot_save: Where the plots go instead of `plots` (`report` keeps them in memory), or None.
        versus: A second cache of the same traces (e.g. `lhat --no-thinking`): its curves are
            compared with this one's, paired by trace id (final L̂, area under the normalised
            curve, half-change time).
        control: A cache of the same traces written by `updates --control random-init`: every
            per-token update comparison is repeated on it with the same token sets, and effects
            it reproduces are flagged.
        update_metrics: The `upd_*` arrays to compare (None: all in the cache).
        update_unit: Phrase-set unit of the update comparison: "token" or "first_token".
        layers: Rows printed for the update comparison: "pooled" or "all" (the JSON always has
            every layer).
        fit: Fit ΔL̂_t on the per-token mechanistic features (traces with both L̂ and updates).
        matched: Compare reflection / delimiter tokens with confound-matched ordinary windows
            (`analyses.matching`: same trace, position, corpus frequency, paragraph status); False
            (`--unmatched`): with all ordinary tokens.
    """

    metric: str = "abs_delta"
    unit: str = "phrase"
    statistic: str = "mean"
    raml_notebook: bool = False
    n_boot: int = 2000
    seed: int = 0
    plots: Path | None = None
    plot_save: PlotSave | None = None
    versus: Path | None = None
    control: Path | None = None
    update_metrics: tuple[str, ...] | None = None
    update_unit: str = "token"
    layers: str = "pooled"
    fit: bool = True
    matched: bool = True

    def __post_init__(self) -> None:
        if self.update_unit not in UPDATE_UNITS:
            raise ProbesError(f"--update-unit {self.update_unit!r} is not one of ['token', 'first_token']")
        if self.layers not in LAYER_VIEWS:
            raise ProbesError(f"--layers {self.layers!r} is not one of ['pooled', 'all']")
        if self.metric not in COMPARE_METRICS:
            raise ProbesError(f"--metric {self.metric!r} is not one of {list(COMPARE_METRICS)}")
        if self.unit not in UNITS:
            raise ProbesError(f"--unit {self.unit!r} is not one of {list(UNITS)}")
        if self.statistic not in STATISTICS:
            raise ProbesError(f"--statistic {self.statistic!r} is not one of {list(STATISTICS)}")


FORMATS: tuple[str, ...] = ("html", "md")
"""`--format`: one self-contained HTML page, or its tables as Markdown."""


DEFAULT_VIEWS = 6
"""Traces shown as token heat maps unless `--traces` says otherwise."""


@dataclass(frozen=True, kw_only=True)
class ReportConfig:
    """Settings of a `report` run.

    Attributes:
        control: A cache of the same traces from `updates --control random-init` (passed to
            `compare` as its `control`).
        n_views: Traces shown as token heat maps (the first ones with a reflection, then the
            others, in cache order), unless `trace_ids` names them.
        trace_ids: Traces to show as heat maps.
        colour_by: The per-token array coloured when the page opens (e.g. "lhat_delta",
            "upd_m7" = its mean over layers, "upd_m7@2" = layer 2); None: ΔL̂ if present.
        n_boot: Bootstrap resamples of `compare`.
        seed: Seed of `compare`.
        format: "html" or "md".
        compare_json: A saved `compare --json` output of this cache to use instead of running
            `compare` (its plots are embedded from the paths it lists).
    """

    control: Path | None = None
    n_views: int = DEFAULT_VIEWS
    trace_ids: tuple[str, ...] = ()
    colour_by: str | None = None
    n_boot: int = 2000
    seed: int = 0
    format: str = "html"
    compare_json: Path | None = None

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ProbesError(f"--format {self.format!r} is not one of {list(FORMATS)}")
        if self.n_views < 0:
            raise ProbesError(f"--traces must be at least 0, got {self.n_views}")
