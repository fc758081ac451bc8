"""`python -m probes.run landscape`: the answer-loss landscape of every trace on two planes through the
weights, with the exact implicit-update path (docs/methods.md#landscape).

Per trace (through the write loop, so `--resume` skips traces that already have `land_grid`):
* `land_grid` [n, n]: the answer NLL with the trajectory removed, on a seeded random plane
  (`--style raml`: tensor-wise normalised, 1-D tensors kept; `--style filter`: Li et al.'s
  filter-wise normalisation, 1-D tensors zeroed; embeddings and unembedding never moved), axes
  `linspace(−range, range, n)`. The directions are regenerated from `--seed` (stored in the config),
  so the cache holds the seed, not the directions.
* `land_path` [T+1, 2], `land_path_norm` [T+1]: the Dherin path (row-mean MLP patches) projected
  onto that plane by rank-1 algebra; `land_path_nll` [T+1]: the loss along the exact per-row path
  (its last value is the full-context NLL: the endpoint identity, checked per trace).
* `land_pca_axes`, `land_pca_path`, `land_pca_grid`: the plane spanned by the top-2 principal
  directions of the path, with the path on it and the NLL grid over it.
* attributes: the captured fractions of both planes, the shared fraction, the no-trajectory NLL
  (both position conventions), the full-context NLL and the endpoint identity's |difference|.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np
import torch

from analyses.landscape_plots import landscape_figure, path_loss_figure
from hooks.model import LoadedModel
from probes import DATA_DIR
from probes.measures.answers import answer_scores, without_trajectory
from probes.measures.landscape.path import (
    implicit_path,
    path_gram,
    path_nll,
    path_plane,
    plane_coords,
)
from probes.measures.landscape.plane import (
    POSITIONS,
    STYLES,
    LandscapeError,
    PlaneModel,
    grid_axis,
    inner,
    plane_params,
    random_directions,
)
from probes.models.spec import ModelSpec
from probes.pipeline.configs import (
    LandscapeConfig,
    TraceSource,
    trace_source,
)
from probes.pipeline.loop import (
    Log,
    Plan,
    TraceOutput,
    WriteJob,
    WriteResult,
    loader,
    same_settings,
    write_traces,
)
from probes.pipeline.outputs import plot_file_name
from probes.safe_output import save_figure
from probes.traces.categories import categorize, load_lexicon

NAME = "landscape"


DONE_KEY = "land_grid"
"""A trace that has this array is skipped on resume."""


@dataclass
class LandscapeRunResult(WriteResult):
    """The write loop's counts plus the landscape figures (medians over the written traces)."""

    captured_path_plane_median: float | None = None
    captured_random_plane_median: float | None = None
    shared_fraction_median: float | None = None
    endpoint_max_abs_diff: float | None = None
    nll_full_median: float | None = None
    nll_no_trajectory_median: float | None = None
    seconds_per_grid_median: float | None = None
    plots: list[str] | None = None


def landscape_traces(model: ModelSpec | LoadedModel | str, traces: TraceSource | str | PathLike[str],
                     out: Path, cfg: LandscapeConfig, *, resume: bool = False,
                     device: str | None = None, dtype: str | None = None, progress: bool = True,
                     log: Log | None = None) -> LandscapeRunResult:
    """Compute and store every trace's landscape through the write loop (`traces`: a
    `TraceSource` or its path, as for every runner: `probes.pipeline.configs.trace_source`).

    Raises:
        ProbesError, CacheError: Bad input or settings, a cache made with other settings.
    """
    if cfg.style not in STYLES or cfg.positions not in POSITIONS:
        raise LandscapeError(f"--style must be one of {STYLES} and --positions one of {POSITIONS}")
    if cfg.grid < 2 or cfg.span <= 0 or cfg.margin <= 0:
        raise LandscapeError(f"--grid must be ≥ 2 and --range, --margin > 0; got {cfg.grid}, "
                             f"{cfg.span}, {cfg.margin}")
    source = trace_source(traces, cfg)
    lexicon = load_lexicon(extra=source.lexicon)
    xs = grid_axis(cfg.grid, cfg.span)
    figs: dict[str, list[float]] = {k: [] for k in ("pca", "rand", "shared", "diff", "full", "base",
                                                     "secs")}
    plots: list[str] = []
    own = cfg.own()

    job = WriteJob(command=NAME, out=Path(out), resume=resume, done_key=DONE_KEY,
                   check_stored=same_settings(out, DONE_KEY, own, "landscape arrays", LandscapeError),
                   progress=progress, log=log)

    def plan(loaded: LoadedModel) -> Plan:
        params = plane_params(loaded)
        d1, d2 = random_directions(params, cfg.seed, cfg.style)
        plane_g = np.array([[inner(d1, d1), inner(d1, d2)], [inner(d2, d1), inner(d2, d2)]])

        def compute(tt) -> TraceOutput | str:
            t0, t1 = tt.spans["trajectory"]
            if t1 - t0 < 2:
                return "the trajectory has fewer than 2 tokens (no path plane)"
            t_start = time.perf_counter()
            pm = PlaneModel(loaded, tt, positions=cfg.positions, params=params)
            with torch.no_grad():
                grid = pm.grid(xs, xs, d1, d2, batch=cfg.batch)
            figs["secs"].append(time.perf_counter() - t_start)
            path = implicit_path(loaded, tt)
            K, _ = path_gram(path)
            coords, captured = plane_coords(path, d1, d2, K, plane_gram=plane_g)
            try:
                pp = path_plane(path)
            except LandscapeError as err:
                return str(err)
            extent = cfg.margin * float(np.abs(pp.coords).max())
            axes = np.linspace(-extent, extent, cfg.grid)
            pgrid = pm.grid(axes, axes, *pp.directions, batch=cfg.batch)
            kept = pm if cfg.positions == "kept" else PlaneModel(loaded, tt, params=params)
            along = path_nll(kept, path, batch=cfg.batch)
            endpoint = float(along[-1])
            full = answer_scores(loaded, [tt])[0].nll
            base = float(pm.nll(np.zeros((1, 2)), None, None)[0])
            origin_diff = pm.check_origin(loaded)
            shifted = answer_scores(loaded, [without_trajectory(tt)])[0].nll
            figs["pca"].append(pp.captured)
            figs["rand"].append(captured)
            figs["shared"].append(pp.shared_fraction)
            figs["diff"].append(abs(endpoint - full))
            figs["full"].append(full)
            figs["base"].append(base)
            if cfg.plot_dir is not None:
                cats = categorize(tt, lexicon).category[t0:t1]
                plots.extend(_plots(cfg, tt.trace.id, grid, xs, coords, pgrid, axes, pp.coords,
                                    cats, pp.captured, captured, along))
            attrs = {**own, "land_nll_no_trajectory": base, "land_nll_no_trajectory_shifted": shifted,
                     "land_nll_full": full, "land_nll_endpoint": endpoint,
                     "land_endpoint_abs_diff": abs(endpoint - full),
                     "land_origin_abs_diff": origin_diff,
                     "land_captured_path_plane": pp.captured,
                     "land_captured_random_plane": captured,
                     "land_shared_fraction": pp.shared_fraction,
                     "land_pca_eig1_fraction": float(pp.eigenvalues[0] / pp.eigenvalues.sum())}
            arrays = {"land_grid": grid.astype(np.float32),
                      "land_path": coords.astype(np.float32),
                      "land_path_nll": along.astype(np.float32),
                      "land_path_norm": np.sqrt(np.clip(np.diag(K), 0, None)).astype(np.float32),
                      "land_pca_axes": np.stack([axes, axes]).astype(np.float32),
                      "land_pca_path": pp.coords.astype(np.float32),
                      "land_pca_grid": pgrid.astype(np.float32)}
            return TraceOutput(arrays=arrays, attrs=attrs,
                               n_tokens=tt.n_tokens + cfg.grid**2 * 2 * (tt.n_tokens - t1 + t0))

        return Plan(compute, info={"land_directions": f"torch.Generator seed {cfg.seed}, "
                                                      f"{cfg.style} normalisation"})

    result = write_traces(job, source, load=loader(model, device=device, dtype=dtype),
                          plan=plan, result=LandscapeRunResult())

    def med(key: str) -> float | None:
        return float(np.median(figs[key])) if figs[key] else None

    result.captured_path_plane_median = med("pca")
    result.captured_random_plane_median = med("rand")
    result.shared_fraction_median = med("shared")
    result.endpoint_max_abs_diff = max(figs["diff"]) if figs["diff"] else None
    result.nll_full_median = med("full")
    result.nll_no_trajectory_median = med("base")
    result.seconds_per_grid_median = med("secs")
    result.plots = plots or None
    return result


def _plots(cfg: LandscapeConfig, trace_id: str, grid, xs, coords, pgrid, axes, pcoords, cats,
           cap_pca: float, cap_rand: float, along) -> list[str]:
    def name(kind: str) -> str:
        return str(Path(cfg.plot_dir) / plot_file_name("landscape", trace_id, f"_{kind}.png"))

    a = save_figure(landscape_figure(
        grid, xs, xs, coords, cats,
        title=f"{trace_id}: {cfg.style} random plane (path captured {cap_rand:.1e})"),
        name("random"), flag="--plot-dir")
    b = save_figure(landscape_figure(pgrid, axes, axes, pcoords, cats,
                                     title=f"{trace_id}: path plane (captured {cap_pca:.3f})",
                                     axis_labels=("PC1 of the path", "PC2 of the path")),
                    name("path_plane"), flag="--plot-dir")
    c = save_figure(path_loss_figure(
        along, cats, title=f"{trace_id}: answer NLL along the exact implicit-update path"),
        name("path_loss"), flag="--plot-dir")
    return [str(a), str(b), str(c)]


def demo_section(loaded: LoadedModel, folder: Path, *, keep: bool, n_traces: int = 1,
                 grid: int = 11) -> dict[str, Any]:
    """The demo's landscape part: a `grid`×`grid` landscape of the first `n_traces` sample traces
    into `folder/landscape.h5` (replaced), plots in `folder/plots` with `keep`.

    Returns:
        `n_traces`, `grid`, `seconds`, the captured fractions, the endpoint identity's largest
        |difference|, the median NLLs and (with `keep`) `cache` and `plots`.
    """

    t0 = time.perf_counter()
    path = folder / "landscape.h5"
    path.unlink(missing_ok=True)
    cfg = LandscapeConfig(grid=grid, limit=n_traces, plot_dir=folder / "plots" if keep else None)
    r = landscape_traces(loaded, DATA_DIR / "tiny_reasoner_traces.jsonl", path, cfg, progress=False)
    part: dict[str, Any] = {
        "n_traces": r.n_written, "grid": grid, "style": cfg.style,
        "seconds": round(time.perf_counter() - t0, 2),
        "captured_path_plane": r.captured_path_plane_median,
        "captured_random_plane": r.captured_random_plane_median,
        "shared_fraction": r.shared_fraction_median,
        "endpoint_max_abs_diff": r.endpoint_max_abs_diff,
        "nll_full": r.nll_full_median, "nll_no_trajectory": r.nll_no_trajectory_median,
    }
    if keep:
        part["cache"] = str(path)
        part["plots"] = r.plots or []
    return part


def format_demo_line(part: Mapping[str, Any]) -> str:
    """One line of the demo report for `demo_section`'s summary."""
    if not part.get("n_traces"):
        return "landscape: no trace measured"
    n = part["n_traces"]
    return (f"landscape ({n} trace{'s' * (n != 1)}, {part['grid']}x{part['grid']}, {part['style']} "
            f"directions, {part['seconds']:.1f}s): the exact implicit-update path reaches the "
            f"full-context NLL within {part['endpoint_max_abs_diff']:.1e} nats; its top-2 plane holds "
            f"{part['captured_path_plane']:.1%} of it, the random plane "
            f"{part['captured_random_plane']:.1e}")
