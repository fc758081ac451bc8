"""`compare`'s part for the per-token implicit updates: the `upd_*` arrays of a cache compared per
layer and pooled across token categories and controls (`analyses.update_effects`), the
random-init control cache, ΔL̂ explained by the mechanistic features (`analyses.behaviour_fit`), and
the heat maps.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from analyses.behaviour_fit import behaviour_design, fit_behaviour, format_fit
from analyses.lhat_effects import DEFAULT_PAIRS, MATCHED_PAIRS
from analyses.plots import step_curve_figure, update_heatmap_figure
from analyses.token_sets import token_sets
from analyses.update_effects import (
    format_update_table,
    heatmap_values,
    summary_rows,
    update_comparison,
)
from probes import arrays
from probes.errors import ProbesError
from probes.measures.updates.shared_pass import stored_layers
from probes.pipeline.outputs import plot_file_name
from probes.readouts.loader import load_traces, open_cache
from probes.readouts.matched import matching_summary, trajectory_log_frequency
from probes.safe_output import save_figure

if TYPE_CHECKING:
    from probes.readouts.configs import CompareConfig, PlotSave

UPDATE_ORDER: tuple[str, ...] = arrays.names(arrays.UPDATES)
"""Known `upd_*` arrays in report order, as the registry declares them (others found in a cache
follow alphabetically)."""


PLOT_DPI = 120
"""Resolution of `compare`'s PNG plots."""



def folder_saver(folder: Path) -> PlotSave:
    """Plots saved as PNG files in `folder` (`probes.safe_output.save_figure`, `--plots`)."""

    def save(fig: Any, name: str) -> str:
        return str(save_figure(fig, folder / name, dpi=PLOT_DPI))

    return save

SIGNED_UPDATES: tuple[str, ...] = tuple(a.name for a in arrays.UPDATES if a.by_magnitude)
"""Signed first-order loss changes: compared by magnitude (large = either sign)."""


def _metric_order(names: set[str]) -> list[str]:
    known = [m for m in UPDATE_ORDER if m in names]
    return known + sorted(names - set(known))


def load_updates(path: Path, *, control: bool = False) -> list[dict[str, Any]]:
    """Per trace with update arrays: its `upd_*` arrays, labels and (if present) L̂ curve.

    Args:
        path: The cache.
        control: The file is meant as the random-init control: every trace must carry
            `upd_control = "random-init"` (else: none of them may).

    Raises:
        ProbesError: A trace whose `upd_control` attribute does not fit the role of the file.
    """

    rows = []
    for tr in load_traces(path, ["upd_contrib"],
                          optional=(*UPDATE_ORDER, "phrase_id", "phrase_first", "paragraph_start",
                                    "lhat")):
        kind = str(tr.attrs.get("upd_control", "none"))
        if control and kind != "random-init":
            raise ProbesError(
                f"--control {path}: trace {tr.id!r} holds updates of the trained model "
                f"(upd_control={kind!r}); pass a cache written by `python -m probes.run updates "
                "--control random-init ... --out OTHER.h5`"
            )
        if not control and kind == "random-init":
            raise ProbesError(
                f"{path} holds random-init control updates (trace {tr.id!r}); compare the "
                "trained model's cache and pass this one as --control"
            )
        got = tr.arrays
        rows.append({
            "id": tr.id,
            "layers": stored_layers(tr),
            "answer_rows": str(tr.attrs.get("upd_rows", "first")),
            "tokens": tr.tokens,
            "category": tr.category,
            "traj_span": tr.trajectory,
            "upd": {n: np.asarray(v, np.float64) for n, v in got.items() if n.startswith("upd_")},
            "phrase_id": got.get("phrase_id"),
            "is_first": got["phrase_first"].astype(bool) if "phrase_first" in got else None,
            "paragraph_start": (got["paragraph_start"].astype(bool) if "paragraph_start" in got
                                else None),
            "lhat": np.asarray(got["lhat"], np.float64) if "lhat" in got else None,
        })
    return rows


def _updates_part(path: Path, cfg: CompareConfig):
    """The per-layer update comparison; returns (report part, rows, token sets)."""

    rows = load_updates(path)
    layer_ids = rows[0]["layers"]
    other = next((r for r in rows if r["layers"] != layer_ids), None)
    if other is not None:
        raise ProbesError(f"{path}: trace {other['id']!r} has update arrays of layers "
                          f"{other['layers']}, trace {rows[0]['id']!r} of {layer_ids}; re-run "
                          "`updates` with one --layers into a new --out")
    available = set.intersection(*(set(r["upd"]) for r in rows))
    if cfg.update_metrics is not None:
        unknown = [m for m in cfg.update_metrics if m not in available]
        if unknown:
            raise ProbesError(f"--update-metrics {unknown} are not in every trace of {path}; "
                              f"available: {_metric_order(available)}")
        metrics = list(cfg.update_metrics)
    else:
        metrics = _metric_order(available)
    control_rows = None
    if cfg.control is not None:
        by_id = {r["id"]: r for r in load_updates(cfg.control, control=True)}
        common = [r for r in rows if r["id"] in by_id]
        if len(common) < 2:
            with open_cache(cfg.control) as reader:
                held = set(reader.trace_ids())
            shared = [r["id"] for r in rows if r["id"] in held and r["id"] not in by_id]
            if shared:
                raise ProbesError(
                    f"--control {cfg.control} holds {len(shared)} of these traces (e.g. "
                    f"{shared[0]!r}) but no update arrays (upd_contrib) for them; add them with "
                    f"`updates --control random-init --resume --out {cfg.control}` on the same "
                    "traces file"
                )
            raise ProbesError(
                f"--control {cfg.control} shares {len(common)} traces with {path}; run `updates "
                "--control random-init` on the same traces file"
            )
        for r in common:
            if not np.array_equal(r["tokens"], by_id[r["id"]]["tokens"]):
                raise ProbesError(f"trace {r['id']!r} has other tokens in --control {cfg.control} "
                                  f"than in {path}; both must come from the same traces and settings")
        missing = [m for m in metrics if any(m not in by_id[r["id"]]["upd"] for r in common)]
        if missing:
            raise ProbesError(f"--control {cfg.control} lacks {missing}; re-run `updates --control "
                              "random-init` with this version")
        rows = common
        control_rows = [by_id[r["id"]] for r in rows]
        if any(c["layers"] != layer_ids for c in control_rows):
            raise ProbesError(f"--control {cfg.control} stores other layers than {path} "
                              f"({layer_ids}); run both `updates` with the same --layers")
        modes = {r["answer_rows"] for r in rows} | {c["answer_rows"] for c in control_rows}
        if len(modes) > 1:
            raise ProbesError(f"--control {cfg.control} and {path} were measured with different "
                              f"--answer-rows ({sorted(modes)}); run both `updates` with the same "
                              "--answer-rows")

    rng = np.random.default_rng(cfg.seed)
    log_freq = trajectory_log_frequency(path) if cfg.matched else {}
    sets = [
        token_sets(r["category"], r["phrase_id"], r["is_first"], traj_span=r["traj_span"],
                   paragraph_start=r["paragraph_start"], rng=rng,
                   log_freq=log_freq.get(r["id"]), matched=cfg.matched)
        for r in rows
    ]
    matching = matching_summary(sets, [log_freq.get(r["id"]) for r in rows],
                                [r["paragraph_start"] for r in rows], matched=cfg.matched)
    cmp = update_comparison(
        {m: [r["upd"][m] for r in rows] for m in metrics}, sets,
        control_values=(None if control_rows is None else
                        {m: [r["upd"][m] for r in control_rows] for m in metrics}),
        pairs=MATCHED_PAIRS if cfg.matched else DEFAULT_PAIRS,
        statistic=cfg.statistic, unit=cfg.update_unit,
        signed=[m for m in metrics if m in SIGNED_UPDATES], layer_ids=layer_ids,
        n_boot=cfg.n_boot, seed=cfg.seed,
        meta={"control": None if cfg.control is None else str(cfg.control)},
    )
    part = {
        "n_traces": len(rows),
        "metrics": metrics,
        "n_layers": len(layer_ids),
        "layers": layer_ids,
        "answer_rows": rows[0]["answer_rows"],
        "control": None if cfg.control is None else str(cfg.control),
        "comparison": cmp.to_dict(),
        "significant": summary_rows(cmp),
        "matching": matching,
        "table_text": format_update_table(cmp, layers=cfg.layers),
        "_cmp": cmp,
    }
    if control_rows is not None:
        for r, c in zip(rows, control_rows, strict=True):
            r["control_upd"] = c["upd"]
    return part, rows, sets


def _fit_part(rows, sets, upd: dict[str, Any], cfg: CompareConfig) -> dict[str, Any]:
    """ΔL̂_t and |ΔL̂_t| explained by the update features (traces with L̂ only)."""

    keep = [i for i, r in enumerate(rows) if r["lhat"] is not None]
    if len(keep) < 2:
        return {"skipped": f"{len(keep)} traces have both L̂ and update arrays (need 2)"}
    metrics = upd["metrics"]
    out: dict[str, Any] = {"n_traces": len(keep), "fits": {}, "text": []}
    for target in ("delta", "abs_delta"):
        def design(key):
            return behaviour_design(
                [rows[i]["lhat"] for i in keep],
                {m: [rows[i][key][m] for i in keep] for m in metrics},
                [sets[i] for i in keep],
                [rows[i]["tokens"][slice(*rows[i]["traj_span"])] for i in keep],
                [rows[i]["paragraph_start"] for i in keep], target=target,  # noqa: B023 (called within the iteration)
            )
        d = design("upd")
        ctrl = design("control_upd").mechanism if "control_upd" in rows[keep[0]] else None
        fit = fit_behaviour(d, control_mechanism=ctrl, n_boot=min(cfg.n_boot, 1000), seed=cfg.seed,
                            target=target)
        out["fits"][target] = fit.to_dict()
        out["text"].append(format_fit(fit))
    return out


def _update_plots(save: PlotSave, rows, sets, upd: dict[str, Any]) -> list[str]:
    """Heatmaps (median magnitude by category x layer; trained, random-init, ratio to ordinary)
    and the step-size curve of the first traces with a reflection."""

    def heatmap(values, name: str, **kwargs: Any) -> str:
        return save(update_heatmap_figure(values, metric=metric, layer_ids=upd["layers"], **kwargs),
                    name)

    cmp = upd["_cmp"]
    paths = []
    names = ("reflection", "delimiter", "ordinary", "paragraph_initial", "position_matched")
    for metric in [m for m in ("upd_sigma_gate", "upd_loo", "upd_contrib", "upd_m7")
                   if m in upd["metrics"]]:
        present = [n for n in names if np.any(np.isfinite(cmp.medians[metric][n][:-1]))]
        vals = heatmap_values(cmp, metric, names=present)
        paths.append(heatmap(vals, f"heatmap_{metric}.png",
                             title=f"median per-trace {cmp.meta['statistic']} of {metric}"))
        paths.append(heatmap(vals, f"heatmap_{metric}_ratio.png", ratio_to="ordinary",
                             title=f"{metric} relative to ordinary tokens"))
        if cmp.control_medians is not None:
            paths.append(heatmap(heatmap_values(cmp, metric, control=True, names=present),
                                 f"heatmap_{metric}_random_init.png",
                                 title=f"{metric}, random-init control"))
    metric = "upd_sigma_gate" if "upd_sigma_gate" in upd["metrics"] else upd["metrics"][0]
    order = sorted(range(len(rows)), key=lambda i: not np.any(sets[i].labels == 1))
    for i in order[:2]:
        r = rows[i]
        vals = r["upd"][metric]
        fig = step_curve_figure(vals, list(sets[i].occurrences),
                                layer_labels=[f"layer {k}" for k in upd["layers"]], metric=metric,
                                title=f"{metric} along trace {r['id']}")
        paths.append(save(fig, plot_file_name(f"steps_{metric}", r["id"])))
    return paths
