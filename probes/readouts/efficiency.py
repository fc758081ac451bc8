"""`python -m probes.run efficiency run.h5 [--traces F.jsonl]`: trajectory efficiency from the
L̂ curves of a cache (no model).

Per trace (`analyses.efficiency`, docs/methods.md#efficiency): the final drop of L̂, the tokens
needed to reach 50% / 90% of it, the area under the normalised remaining-drop curve, the drop per
100 tokens; their medians (bootstrap CIs) and their Spearman correlation with trajectory length
across traces (bootstrap CIs). With `--traces` (the JSONL the cache was made from, whose records
carry `group` and `variant`): paired variants of the same question, e.g. summary or direct against
original, compared on final L̂ and tokens-to-90% (Wilcoxon signed-rank, bootstrap CI of the median
within-group difference, Cliff's δ, Holm).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from analyses.efficiency import MEASURES, compare_variants, length_relation, measure_table, verdict
from analyses.efficiency_plots import variant_curves_figure
from analyses.stats import bootstrap_ci
from probes.errors import ProbesError
from probes.jsonable import jsonable
from probes.pipeline.lhat import LhatConfig, lhat_traces
from probes.readouts.loader import load_traces
from probes.readouts.text import num as _num
from probes.reasoner.variants import VARIANTS, VARIANTS_PATH
from probes.safe_output import save_figure
from probes.traces.read import read_traces

NAME = "efficiency"


def load_lhat(path: Path) -> dict[str, np.ndarray]:
    """Trace id → L̂ curve (float64 [T+1]) of every complete trace that has one.

    Raises:
        ProbesError: The cache has no L̂ curve.
    """

    curves = {tr.id: np.asarray(tr["lhat"], np.float64) for tr in load_traces(path, ["lhat"])}
    if not curves:
        raise ProbesError(f"{path} has no trace with an L̂ curve; run `python -m probes.run lhat "
                          f"--model M --traces F --out {path}` first")
    return curves


def parse_pairs(texts: list[str] | None) -> list[tuple[str, str]] | None:
    """`["summary:original", ...]` → [("summary", "original"), ...]."""
    if texts is None:
        return None
    out = []
    for text in texts:
        a, sep, b = text.partition(":")
        if not sep or not a or not b or a == b:
            raise ProbesError(f"--pairs {text!r} is not A:B with two different variant names, "
                              "e.g. --pairs summary:original direct:original")
        out.append((a, b))
    return out


def default_pairs(variants: list[str]) -> list[tuple[str, str]]:
    """Every other variant against `original` if present, else against the first seen."""
    if len(variants) < 2:
        return []
    ref = "original" if "original" in variants else variants[0]
    return [(v, ref) for v in variants if v != ref]


def efficiency_report(path: Path, traces: Path | None = None, *,
                      pairs: list[tuple[str, str]] | None = None, n_boot: int = 2000, seed: int = 0,
                      plots: Path | None = None) -> dict[str, Any]:
    """The efficiency report of a cache (JSON-able except NaN; see `report_json`).

    Args:
        path: The cache with `lhat` arrays.
        traces: The JSONL the cache was made from, for `group` / `variant` (None: no variants).
        pairs: Variant pairs (A, B) compared as A − B; None = `default_pairs`.
        n_boot: Bootstrap resamples.
        seed: Seed.
        plots: Folder for PNG plots, or None.

    Returns:
        `cache`, `n_traces`, `per_trace` (flat rows: id, group, variant and every measure),
        `summary` (per measure: n, median, CI, mean), `length_relation`, and with variants
        `variants` (`pairs`, `per_variant` medians, `rows` of the paired comparison); `plots`.

    Raises:
        ProbesError: No L̂ curves; `--traces` shares no id with the cache; a pair names a variant
            the traces do not have.
    """

    curves = load_lhat(path)
    ids = list(curves)
    groups: list[str | None] = [None] * len(ids)
    variants: list[str | None] = [None] * len(ids)
    if traces is not None:
        meta = {t.id: (t.group, t.variant) for t in read_traces(traces)}
        shared = [i for i in ids if i in meta]
        if not shared:
            raise ProbesError(f"--traces {traces} shares no trace id with {path}; pass the JSONL the "
                              "cache was made from")
        groups = [meta.get(i, (None, None))[0] for i in ids]
        variants = [meta.get(i, (None, None))[1] for i in ids]
    table = measure_table([curves[i] for i in ids])
    summary = {}
    for k, m in enumerate(MEASURES):
        v = table[m][~np.isnan(table[m])]
        lo, hi = bootstrap_ci(v, n_boot=n_boot, seed=seed + k)
        summary[m] = {"n": int(v.size), "median": float(np.median(v)) if v.size else float("nan"),
                      "ci": [lo, hi], "mean": float(v.mean()) if v.size else float("nan")}
    report: dict[str, Any] = {
        "cache": str(path), "n_traces": len(ids),
        "per_trace": [{"id": i, "group": g, "variant": v, **{m: float(table[m][j]) for m in MEASURES}}
                      for j, (i, g, v) in enumerate(zip(ids, groups, variants, strict=True))],
        "summary": summary,
        "length_relation": length_relation(table, n_boot=n_boot, seed=seed),
        "plots": [],
    }
    names = list(dict.fromkeys(v for g, v in zip(groups, variants, strict=True) if g and v))
    if pairs is not None or len(names) >= 2:
        pairs = default_pairs(names) if pairs is None else pairs
        unknown = sorted({x for p in pairs for x in p} - set(names))
        if unknown:
            raise ProbesError(f"--pairs names variant(s) {unknown} that no trace with a group has; "
                              f"the traces have {names or 'none'}")
        per_variant = {}
        for v in names:
            sel = np.array([x == v for x in variants])
            per_variant[v] = {m: float(np.nanmedian(table[m][sel])) if np.any(~np.isnan(table[m][sel]))
                              else float("nan") for m in ("final", "tokens_to_90", "stay_to_90", "length")}
            per_variant[v]["n"] = int(sel.sum())
        report["variants"] = {"pairs": [list(p) for p in pairs], "per_variant": per_variant,
                              "rows": compare_variants(table, groups, variants, pairs, n_boot=n_boot,
                                                       seed=seed)}
        if plots is not None:
            by = {v: [curves[i] for i, x in zip(ids, variants, strict=True) if x == v] for v in names}
            marks = {v: x["stay_to_90"] for v, x in per_variant.items()}
            report["plots"].append(str(save_figure(variant_curves_figure(by, marks=marks),
                                                   plots / "efficiency_variants.png")))
    return report


def report_json(report: dict[str, Any]) -> dict[str, Any]:
    """The report as plain JSON (NaN → null)."""
    return jsonable(report)


def demo_section(loaded: Any, folder: Path, *, keep: bool, limit: int | None = None) -> dict[str, Any]:
    """The demo's efficiency part: L̂ of tiny-reasoner's paired variants (original / direct /
    summary of the same problems, `probes.reasoner.variants`) into `folder/variants.h5`
    (replaced), then the variant comparison.

    Args:
        loaded: The loaded tiny-reasoner.
        folder: Where the cache (and with `keep` the plot) goes.
        keep: The folder is the user's (`--out`): report the cache path and draw the plot.
        limit: The demo's `--limit`: use that many variant traces, rounded up to whole groups of
            three (at least two groups).

    Returns:
        `n_traces`, `n_groups`, `seconds`, `per_variant` (medians), `comparisons` (flat rows with
        the verdict), `drop_per_100_vs_length` (Spearman with CI) and, with `keep`, `cache`.
    """
    import time


    t0 = time.perf_counter()
    n = None if limit is None else max(2 * len(VARIANTS), -(-limit // len(VARIANTS)) * len(VARIANTS))
    path = folder / "variants.h5"
    path.unlink(missing_ok=True)
    written = lhat_traces(loaded, VARIANTS_PATH, path, LhatConfig(limit=n), progress=False)
    rep = efficiency_report(path, VARIANTS_PATH, n_boot=1000, plots=folder / "plots" if keep else None)
    var = rep["variants"]
    keys = ("a", "b", "metric", "n_pairs", "median_a", "median_b", "median_diff", "ci_median_diff",
            "cliffs_delta", "p_holm")
    rel = next(r for r in rep["length_relation"] if r["measure"] == "drop_per_100")
    part: dict[str, Any] = {
        "n_traces": written.n_written,
        "n_groups": len({r["group"] for r in rep["per_trace"]}),
        "seconds": round(time.perf_counter() - t0, 2),
        "per_variant": var["per_variant"],
        "comparisons": [{**{k: r[k] for k in keys}, "verdict": verdict(r)} for r in var["rows"]],
        "drop_per_100_vs_length": {k: rel[k] for k in ("n", "spearman", "ci", "p_holm")},
        "plots": rep["plots"],
    }
    if keep:
        part["cache"] = str(path)
    return jsonable(part)


def format_demo_line(e: dict[str, Any]) -> str:
    """One line of the demo summary: each variant against the original on the three metrics."""
    names = {"stay_to_90": "tokens until L̂ stays within 90% of its drop",
             "tokens_to_90": "tokens to first reach 90%", "final": "final L̂"}
    parts = []
    for r in e["comparisons"]:
        lo, hi = r["ci_median_diff"]
        parts.append(f"{r['a']} - {r['b']} {names.get(r['metric'], r['metric'])} "
                     f"{_num(r['median_diff'], '.3g')} [{_num(lo, '.3g')}, {_num(hi, '.3g')}] "
                     f"(Holm p {_num(r['p_holm'], '.2g')}, {r['verdict']})")
    return (f"trajectory variants ({e['n_groups']} problems x original / direct / summary, "
            f"{e['seconds']:.1f}s; median paired difference [95% CI]): " + "; ".join(parts))
