"""`effects`' readout: the `eff_*` and `dir_cos` arrays of a cache read back (through the one
loader, `probes.readouts.loader`) into V7 (real ΔL vs the first-order predictions), the headline
table and the direction cosines; `summarize` is what `python -m probes.run effects` prints after its
run (`probes.pipeline.effects` writes the arrays).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from analyses.effects import TraceEffects, format_headline, format_v7, headline, scatter_figure, v7_table
from analyses.token_sets import CATEGORY_CODES, CATEGORY_NAMES
from probes.errors import ProbesError
from probes.measures.effects.directions import DIRECTION_CATEGORIES
from probes.pipeline.effects import DONE_KEY, EFFECT_ARRAYS
from probes.readouts.loader import load_traces
from probes.safe_output import save_figure


def read_effects(path: Path):
    """Every trace's `eff_*` arrays with each pair's category name (`analyses.effects.TraceEffects`).

    Raises:
        ProbesError: When the cache holds no effects arrays.
    """

    out = []
    for tr in load_traces(path, [DONE_KEY], optional=EFFECT_ARRAYS):
        got = {n: tr[n] for n in EFFECT_ARRAYS if n.startswith("eff_")}
        # eff_pairs[:, 1] is a trajectory index: its token is at trajectory start + index
        codes = tr.category[tr.trajectory[0] + got["eff_pairs"][:, 1]] if len(got["eff_pairs"]) \
            else np.zeros(0, np.uint8)
        out.append(TraceEffects(tr.id, got, np.array([CATEGORY_NAMES[int(c)] for c in codes],
                                                     dtype=object)))
    if not out:
        raise ProbesError(f"{path} holds no effects arrays; run `effects --out {path}` first")
    return out


def direction_summary(path: Path) -> dict[str, Any]:
    """Mean `dir_cos` per category of the token, per direction and layer (reflection tokens vs
    ordinary ones: does a reflection's implicit update point along the reflection direction?)."""

    sums: dict[tuple[str, str], list[np.ndarray]] = {}
    for tr in load_traces(path, ["dir_cos"]):
        a, b = tr.trajectory
        cat = tr.category[a:b]
        cos = np.asarray(tr["dir_cos"], np.float64)          # [C, L, T]
        for k, d in enumerate(DIRECTION_CATEGORIES):
            for c in ("reflection", "delimiter", "ordinary"):
                m = cat == CATEGORY_CODES[c]
                if m.any():  # per-trace mean first
                    sums.setdefault((d, c), []).append(np.nanmean(cos[k][:, m], axis=1))
    return {f"{d}|{c}": {"mean_per_layer": np.nanmean(np.stack(v), axis=0).round(4).tolist(),
                         "n_traces": len(v)} for (d, c), v in sums.items()}


def summarize(path: Path, versus: Path | None = None, plots: Path | None = None) -> dict[str, Any]:
    """V7 and the headline table of a cache (and of `versus`), the direction cosines, a plot."""

    traces = read_effects(path)
    summary: dict[str, Any] = {"cache": str(path), "n_traces": len(traces),
                               "n_pairs": int(sum(len(t.category) for t in traces)),
                               "v7": v7_table(traces), "headline": {"this": headline(traces)},
                               "direction_cos": direction_summary(path)}
    if versus is not None:
        other = read_effects(versus)
        summary["v7_versus"] = v7_table(other)
        summary["headline"]["versus"] = headline(other)
    if plots is not None:
        p = save_figure(scatter_figure(traces, title=str(path)), Path(plots) / "effects_scatter.png")
        summary["plots"] = [str(p)]
        if versus is not None:
            summary["plots"].append(str(save_figure(scatter_figure(other, title=str(versus)),
                                                    Path(plots) / "effects_scatter_versus.png")))
    return summary


def format_summary(s: dict[str, Any], directions: dict[str, Any] | None = None) -> str:
    lines = [f"{s['n_pairs']} (layer, token) pairs in {s['n_traces']} traces of {s['cache']}"]
    lines += format_v7(s["v7"], "(real ΔL vs first-order prediction):")
    if "v7_versus" in s:
        lines += format_v7(s["v7_versus"], "of --versus:")
    labels = {"this": "this", "versus": "versus"}
    lines += format_headline({labels[k]: v for k, v in s["headline"].items()})
    if directions:
        for c, r in directions.get("probe", {}).items():
            if "accuracy" in r:
                lines.append(f"  {c} probe, held-out accuracy per layer "
                             f"{[round(x, 3) for x in r['accuracy']]} (shuffled labels "
                             f"{[round(x, 3) for x in r['shuffled_accuracy']]}; chance 0.5)")
    for key in ("reflection|reflection", "reflection|ordinary"):
        r = s["direction_cos"].get(key)
        if r:
            d, c = key.split("|")
            lines.append(f"  cos(M4 δ, {d} direction) of {c} tokens per layer: "
                         f"{r['mean_per_layer']}")
    return "\n".join(lines)
