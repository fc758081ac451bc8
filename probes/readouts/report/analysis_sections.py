"""The report's sections of the analyses beyond `compare` (landscape, anchors, effects,
efficiency, model comparison, generation), each from the stores and outputs that hold it
(`probes.readouts.report.stores.Found`), with its controls beside it where there are any, a link to
its method note, and a "not computed" section for each one that is absent (never silently
missing).
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from analyses.effects import scatter_figure, v7_table
from analyses.landscape_plots import landscape_figure, path_loss_figure
from analyses.report_data import Block, Plot, Section, Table, fmt
from analyses.report_text import plain_text
from analyses.token_sets import CATEGORY_NAMES
from probes.arrays import METHODS
from probes.pipeline.anchors import draw_plots, summarize_anchors
from probes.pipeline.generate.grade import record_statistics
from probes.readouts.compare_updates import PLOT_DPI
from probes.readouts.effects import read_effects
from probes.readouts.efficiency import efficiency_report
from probes.readouts.loader import load_traces
from probes.readouts.report.stores import Found, Store
from probes.safe_output import figure_png

TITLES: dict[str, str] = {
    "lhat": "L̂: the answer loss along the trajectory",
    "updates": "Implicit updates per token",
    "landscape": "Loss landscape and the implicit-update path",
    "anchors": "Anchors: sentence chunks, receiver heads, suppression",
    "effects": "Causal edits: real ΔL vs the first-order prediction (V7)",
    "efficiency": "Trajectory efficiency",
    "models": "Models compared on the same traces",
    "generation": "Own samples: accuracy, Pass@k, mG-Pass@k",
}
"""Section title of every analysis (`stores.REPORT_ANALYSES`)."""

HOW_TO_COMPUTE: dict[str, str] = {
    "lhat": "trajectory-probes study --analyses lhat",
    "updates": "trajectory-probes study --analyses updates",
    "landscape": "trajectory-probes landscape",
    "anchors": "trajectory-probes study --analyses receiver,suppression",
    "effects": "trajectory-probes study --analyses effects",
    "efficiency": "trajectory-probes efficiency",
    "models": "trajectory-probes compare-models",
    "generation": "trajectory-probes generate, then grade",
}
"""The command that computes each analysis (the study's own analyses through `study`)."""

METHOD_ANCHORS: dict[str, str] = {
    "lhat": "m8", "updates": "controls", "landscape": "landscape", "anchors": "chunks",
    "effects": "effects", "efficiency": "efficiency", "models": "stability", "generation": "controls",
}
"""The method note of each analysis: an anchor in `docs/methods.md`."""

N_FIGURE_TRACES = 2
"""Traces drawn per per-trace figure (landscape)."""
N_TOP_CHUNKS = 10
"""Anchor chunks listed with their text."""
_CHUNK_CHARS = 160


def method_link(analysis: str) -> tuple[str, str]:
    """(text, href) of an analysis's method note."""
    href = f"{METHODS}#{METHOD_ANCHORS[analysis]}"
    return (f"method: {href}", href)


def not_computed(analysis: str) -> Section:
    """The section of an analysis the input does not hold."""
    return Section(analysis, TITLES[analysis],
                   [f"not computed (run `{HOW_TO_COMPUTE[analysis]}`)"],
                   links=[method_link(analysis)], computed=False)


def _png(fig: Any) -> bytes:
    return figure_png(fig, dpi=PLOT_DPI)


def _rel(found: Found, store: Store) -> str:
    try:
        return str(store.path.relative_to(found.root))
    except ValueError:
        return str(store.path)


def _source(found: Found, store: Store, control: Store | None) -> str:
    ctrl = f"; control: {_rel(found, control)} ({control.meta.get('model')})" if control else \
        "; no random-init control in the input"
    return f"from {_rel(found, store)} ({store.n_traces} traces){ctrl}."


# --------------------------------------------------------------------------------------------------
# Landscape


def _landscape_panels(store: Store, label: str) -> tuple[list[Block], list[list[Any]]]:
    blocks: list[Block] = []
    rows: list[list[Any]] = []
    for k, tr in enumerate(load_traces(store.path, ["land_grid", "land_path"],
                                       optional=["land_path_nll", "land_pca_axes", "land_pca_path",
                                                 "land_pca_grid"])):
        a, b = tr.trajectory
        cats = tr.category[a:b]
        at = tr.attrs
        rows.append([label, tr.id, fmt(at.get("land_nll_no_trajectory")), fmt(at.get("land_nll_full")),
                     fmt(at.get("land_nll_endpoint")), fmt(at.get("land_captured_random_plane")),
                     fmt(at.get("land_captured_path_plane"))])
        if k >= N_FIGURE_TRACES:
            continue
        grid = np.asarray(tr["land_grid"], np.float64)
        half = float(at.get("land_range", 1.0))
        xs = np.linspace(-half, half, grid.shape[1])
        ys = np.linspace(-half, half, grid.shape[0])
        blocks.append(Plot(f"{label}: trace {tr.id}, the random plane with the implicit-update path",
                           _png(landscape_figure(grid, xs, ys, tr["land_path"], cats,
                                                 title=f"{label} · {tr.id}"))))
        if "land_pca_grid" in tr.arrays:
            ax = np.asarray(tr["land_pca_axes"], np.float64)
            blocks.append(Plot(f"{label}: trace {tr.id}, the path's own plane (top-2 directions)",
                               _png(landscape_figure(np.asarray(tr["land_pca_grid"], np.float64),
                                                     ax[0], ax[1], tr["land_pca_path"], cats,
                                                     title=f"{label} · {tr.id} (path plane)",
                                                     axis_labels=("PC1", "PC2")))))
        if "land_path_nll" in tr.arrays:
            blocks.append(Plot(f"{label}: trace {tr.id}, answer NLL along the path",
                               _png(path_loss_figure(tr["land_path_nll"], cats))))
    return blocks, rows


def landscape_section(found: Found) -> Section:
    stores = found.holding("landscape")
    if not stores:
        return not_computed("landscape")
    blocks: list[Block] = []
    rows: list[list[Any]] = []
    for store in stores:
        control = found.control_of(store, "landscape")
        blocks.append(_source(found, store, control))
        for s, label in ((store, "trained"), (control, "random-init control")):
            if s is None:
                continue
            b, r = _landscape_panels(s, label)
            blocks += b
            rows += r
    blocks.insert(1, Table(["model", "trace", "NLL no trajectory", "NLL full", "NLL path end",
                            "captured (random plane)", "captured (path plane)"], rows,
                           caption="per trace"))
    return Section("landscape", TITLES["landscape"], blocks, links=[method_link("landscape")])


# --------------------------------------------------------------------------------------------------
# Anchors


def _anchor_plots(store: Store, summary: dict[str, Any], label: str) -> list[Block]:
    with tempfile.TemporaryDirectory(prefix="probes-report-") as tmp:
        files = draw_plots(store.path, summary, Path(tmp))
        return [Plot(f"{label}: {Path(f).stem.replace('_', ' ')}", Path(f).read_bytes())
                for f in files]


def _by_category_table(summaries: list[tuple[str, dict[str, Any]]]) -> Table:
    rows = []
    for label, s in summaries:
        for key, row in s.get("by_category", {}).items():
            cells = [label, key]
            for c in ("reflection", "delimiter", "ordinary"):
                got = row.get(c) or {}
                cells.append(f"{fmt(got.get('mean'))} (n {got.get('n', 0)})")
            rows.append(cells)
    return Table(["model", "measure", "reflection chunks", "delimiter chunks", "ordinary chunks"],
                 rows, caption="chunk measures: mean per chunk category")


def _top_chunks(store: Store, decode: Callable[[list[int]], list[str]] | None) -> Table:
    found: list[tuple[float, list[Any]]] = []
    measure = "anc_supp_dl"
    for tr in load_traces(store.path, ["chunk_spans", "chunk_category"],
                          optional=["anc_supp_dl", "anc_forced"]):
        if measure not in tr.arrays:
            measure = "anc_forced" if "anc_forced" in tr.arrays else measure
        if measure not in tr.arrays:
            continue
        x = np.asarray(tr[measure], np.float64)
        a = tr.trajectory[0]
        for c in np.argsort(-np.nan_to_num(np.abs(x), nan=-1.0))[:3]:
            s, e = (int(v) for v in tr["chunk_spans"][c])
            ids = tr.tokens[a + s:a + e].tolist()
            text = "".join(decode(ids)) if decode is not None else " ".join(f"[{i}]" for i in ids)
            text = plain_text(text).strip().replace("\n", " ")
            if len(text) > _CHUNK_CHARS:
                text = text[:_CHUNK_CHARS - 1] + "…"
            found.append((float(abs(x[c])) if np.isfinite(x[c]) else -1.0,
                          [tr.id, int(c), CATEGORY_NAMES.get(int(tr["chunk_category"][c]), "?"),
                           fmt(float(x[c])), text]))
    found.sort(key=lambda t: -t[0])
    return Table(["trace", "chunk", "category", measure, "text"], [r for _, r in found[:N_TOP_CHUNKS]],
                 caption=f"top anchor chunks by |{measure}| (up to 3 per trace)")


def anchors_section(found: Found, decode: Callable[[list[int]], list[str]] | None) -> Section:
    stores = found.holding("anchors")
    if not stores:
        return not_computed("anchors")
    blocks: list[Block] = []
    for store in stores:
        control = found.control_of(store, "anchors")
        blocks.append(_source(found, store, control))
        summaries = [("trained", summarize_anchors(store.path))]
        if control is not None:
            summaries.append(("random-init control", summarize_anchors(control.path)))
        for label, s in summaries:
            heads = ", ".join(f"L{h[0]}H{h[1]} ({fmt(h[2])})" for h in s.get("receiver_heads", []))
            blocks.append(f"{label}: {s['n_traces']} traces, {s['n_chunks']} chunks; receiver heads "
                          f"(layer, head, mean kurtosis): {heads or 'n/a'}.")
        blocks.append(_by_category_table(summaries))
        blocks.append(_top_chunks(store, decode))
        for (label, s), st in zip(summaries, (store, control)):
            if st is not None:
                blocks += _anchor_plots(st, s, label)
    return Section("anchors", TITLES["anchors"], blocks,
                   links=[method_link("anchors"), ("receiver heads", f"{METHODS}#receiver-heads"),
                          ("suppression", f"{METHODS}#suppression"),
                          ("resampling", f"{METHODS}#resampling")])


# --------------------------------------------------------------------------------------------------
# Effects


def _v7_rows(label: str, v7: dict[str, dict[str, dict[str, float]]]) -> list[list[Any]]:
    return [[label, edit, cat, fmt(r["n"]), fmt(r["pearson"]), fmt(r["spearman"]),
             fmt(r["sign_agree"], ".2f"), fmt(r["median_rel_err"])]
            for edit, by in v7.items() for cat, r in by.items() if r["n"]]


def effects_section(found: Found) -> Section:
    stores = found.holding("effects")
    if not stores:
        return not_computed("effects")
    blocks: list[Block] = []
    for store in stores:
        control = found.control_of(store, "effects")
        blocks.append(_source(found, store, control))
        rows: list[list[Any]] = []
        plots: list[Block] = []
        for s, label in ((store, "trained"), (control, "random-init control")):
            if s is None:
                continue
            traces = read_effects(s.path)
            rows += _v7_rows(label, v7_table(traces))
            plots.append(Plot(f"{label}: real ΔL vs first-order prediction, by category",
                              _png(scatter_figure(traces, title=f"{label} · {_rel(found, s)}"))))
        blocks.append(Table(["model", "edit", "tokens", "n", "Pearson r", "Spearman ρ", "sign agrees",
                             "median |rel. err|"], rows,
                            caption="V7: real ΔL against the first-order prediction"))
        blocks += plots
    return Section("effects", TITLES["effects"], blocks,
                   links=[method_link("effects"), ("directions", f"{METHODS}#directions")])


# --------------------------------------------------------------------------------------------------
# Efficiency


def efficiency_section(found: Found, n_boot: int, seed: int) -> Section:
    stores = found.holding("lhat")
    demo = ((found.jsons.get("summary.json") or {}).get("efficiency") or {})
    if not stores and not demo:
        return not_computed("efficiency")
    blocks: list[Block] = []
    for store in stores:
        rep = efficiency_report(store.path, n_boot=n_boot, seed=seed)
        rows = [[_rel(found, store), m, fmt(r.get("n")), fmt(r.get("median")),
                 f"[{fmt((r.get('ci') or [None, None])[0])}, {fmt((r.get('ci') or [None, None])[1])}]"]
                for m, r in rep["summary"].items()]
        blocks.append(Table(["store", "measure", "traces", "median", "95% CI"], rows,
                            caption=f"per-trace efficiency of the L̂ curves ({rep['n_traces']} traces)"))
    if demo.get("comparisons"):
        rows = [[r["a"], r["b"], r["metric"], fmt(r["n_pairs"]), fmt(r["median_diff"]),
                 f"[{fmt(r['ci_median_diff'][0])}, {fmt(r['ci_median_diff'][1])}]",
                 fmt(r["p_holm"], ".2g"), r["verdict"]] for r in demo["comparisons"]]
        blocks.append(Table(["variant", "vs", "metric", "pairs", "median diff", "95% CI", "Holm p",
                             "verdict"], rows, caption="paired variants of the same problems "
                                                       "(summary.json)"))
    return Section("efficiency", TITLES["efficiency"], blocks, links=[method_link("efficiency")])


# --------------------------------------------------------------------------------------------------
# Model comparison


def _models_json(found: Found) -> list[tuple[str, dict[str, Any]]]:
    return [(name, j) for name, j in found.jsons.items()
            if isinstance(j, dict) and isinstance(j.get("models"), list) and isinstance(j.get("rows"), list)]


def models_section(found: Found) -> Section:
    outs = _models_json(found)
    if not outs:
        return not_computed("models")
    blocks: list[Block] = []
    for name, j in outs:
        rows = j["rows"]
        cols = [c for c in rows[0] if not isinstance(rows[0][c], (list, dict))] if rows else []
        blocks.append(f"{name}: models {', '.join(map(str, j['models']))}; {j.get('n_traces')} paired "
                      "traces.")
        blocks.append(Table(cols, [[fmt(r.get(c)) if not isinstance(r.get(c), str) else r.get(c)
                                    for c in cols] for r in rows], caption="compare-models rows"))
    return Section("models", TITLES["models"], blocks, links=[method_link("models")])


# --------------------------------------------------------------------------------------------------
# Generation


def _ci(v: dict[str, Any] | None, spec: str = ".3f") -> str:
    if not v:
        return "n/a"
    lo, hi = (v.get("ci") or [None, None])[:2]
    return f"{fmt(v.get('value'), spec)} [{fmt(lo, spec)}, {fmt(hi, spec)}]"


def _stats_rows(label: str, s: dict[str, Any]) -> list[list[Any]]:
    rows = [[label, "accuracy (pass@1)", _ci(s.get("accuracy") if isinstance(s.get("accuracy"), dict)
                                             else {"value": s.get("accuracy")})]]
    rows += [[label, f"pass@{k}", _ci(v)] for k, v in (s.get("pass_at_k") or {}).items()]
    rows += [[label, f"mG-pass@{k}", _ci(v)] for k, v in (s.get("mg_pass_at_k") or {}).items()]
    if s.get("truncated"):
        rows.append([label, "truncated", _ci(s["truncated"])])
    return rows


def generation_section(found: Found) -> Section:
    rows: list[list[Any]] = []
    for file in found.graded:
        with file.open(encoding="utf-8") as f:
            records = [json.loads(line) for line in f if line.strip()]
        stats = record_statistics(records)
        if stats:
            rows += _stats_rows(str(file.relative_to(found.root)), stats)
    own = (found.jsons.get("summary.json") or {}).get("own_samples")
    if not rows and own:
        rows += _stats_rows("summary.json", own)
    if not rows:
        return not_computed("generation")
    blocks: list[Block] = [Table(["samples", "statistic", "value [95% CI]"], rows,
                                 caption="graded samples")]
    if own and own.get("lhat"):
        lh = own["lhat"]
        blocks.append(f"L̂ of the own samples: falls in {fmt(lh.get('share_falling'), '.0%')} of "
                      f"{lh.get('n_traces')} traces; median final L̂ "
                      f"{fmt(lh.get('median_final_lhat_correct'))} (correct) vs "
                      f"{fmt(lh.get('median_final_lhat_incorrect'))} (incorrect).")
    return Section("generation", TITLES["generation"], blocks, links=[method_link("generation")])


def extra_sections(found: Found, decode: Callable[[list[int]], list[str]] | None, *, n_boot: int,
                   seed: int) -> list[Section]:
    """The sections after `compare`'s, one per analysis, in `stores.REPORT_ANALYSES` order."""
    return [landscape_section(found), anchors_section(found, decode), effects_section(found),
            efficiency_section(found, n_boot, seed), models_section(found), generation_section(found)]
