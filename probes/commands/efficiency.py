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

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from probes.commands import SUMMARIES, flags
from probes.errors import ProbesError
from probes.jsonable import jsonable
from probes.pipeline.outputs import check_plot_folder
from probes.pipeline.progress import Stages, progress_on
from probes.readouts.text import num as _num

NAME = "efficiency"


def load_lhat(path: Path) -> dict[str, np.ndarray]:
    """Trace id → L̂ curve (float64 [T+1]) of every complete trace that has one.

    Raises:
        ProbesError: The cache has no L̂ curve.
    """
    from cache import open_cache

    with open_cache(path) as reader:
        curves = {tr.id: np.asarray(tr["lhat"][:], np.float64) for tr in reader if "lhat" in tr.names()}
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
    from analyses.efficiency import MEASURES, compare_variants, length_relation, measure_table
    from analyses.stats import bootstrap_ci

    curves = load_lhat(path)
    ids = list(curves)
    groups: list[str | None] = [None] * len(ids)
    variants: list[str | None] = [None] * len(ids)
    if traces is not None:
        from probes.traces.read import read_traces

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
            from analyses.efficiency_plots import variant_curves_figure
            from probes.safe_output import save_figure

            by = {v: [curves[i] for i, x in zip(ids, variants, strict=True) if x == v] for v in names}
            marks = {v: x["stay_to_90"] for v, x in per_variant.items()}
            report["plots"].append(str(save_figure(variant_curves_figure(by, marks=marks),
                                                   plots / "efficiency_variants.png")))
    return report


def report_json(report: dict[str, Any]) -> dict[str, Any]:
    """The report as plain JSON (NaN → null)."""
    return jsonable(report)


def format_report(report: dict[str, Any]) -> str:
    """Human form: the measures' medians, their relation to length, the variant comparison."""
    from analyses.efficiency import verdict

    lines = [f"{report['n_traces']} traces from {report['cache']}",
             "per-trace measures (median [95% CI], n):"]
    for m, s in report["summary"].items():
        lines.append(f"  {m:<14} {_num(s['median'], '.4g'):>9} [{_num(s['ci'][0], '.4g')}, "
                     f"{_num(s['ci'][1], '.4g')}]  n={s['n']}")
    lines.append("Spearman correlation with trajectory length [95% CI], Holm p:")
    for r in report["length_relation"]:
        lines.append(f"  {r['measure']:<14} {_num(r['spearman'], '.3f'):>7} [{_num(r['ci'][0], '.3f')}, "
                     f"{_num(r['ci'][1], '.3f')}]  p_holm {_num(r['p_holm'], '.2g')}  n={r['n']}")
    if "variants" in report:
        v = report["variants"]
        lines.append("variants (median final L̂, tokens to 90%, tokens until it stays within 90%, "
                     "length): " + "; ".join(
                         f"{k} {_num(x['final'], '.3g')}, {_num(x['tokens_to_90'], '.3g')}, "
                         f"{_num(x['stay_to_90'], '.3g')}, {_num(x['length'], '.3g')} (n={x['n']})"
                         for k, x in v["per_variant"].items()))
        lines.append("paired by group (A − B: median difference [95% CI], Cliff's delta, Holm p):")
        for r in v["rows"]:
            lo, hi = r["ci_median_diff"]
            lines.append(f"  {r['a']} vs {r['b']} {r['metric']:<13} {_num(r['median_diff'], '.3g')} "
                         f"[{_num(lo, '.3g')}, {_num(hi, '.3g')}], delta {_num(r['cliffs_delta'], '.2f')}, "
                         f"p_holm {_num(r['p_holm'], '.2g')} ({r['n_pairs']} pairs): {r['a']} "
                         f"{verdict(r)}")
    for p in report["plots"]:
        lines.append(f"plot: {p}")
    return "\n".join(lines)


def add_parser(sub: Any) -> None:
    """Register `efficiency` and its flags."""
    p = sub.add_parser(
        NAME, formatter_class=flags.HelpFormatter,
        help=SUMMARIES[NAME],
        description=(
            "From a cache with L-hat curves (from `lhat`), no model: per trace the final drop of "
            "L-hat, the tokens needed to reach 50% and 90% of it, the area under the normalised "
            "remaining-drop curve and the drop per 100 tokens, with medians (bootstrap 95% CIs) "
            "and their Spearman correlation with trajectory length (bootstrap CIs, Holm). With "
            "--traces (the JSONL the cache was made from, records with `group` and `variant`), "
            "variants of the same question (e.g. summary or direct against original) compared "
            "pair by pair on final L-hat and tokens-to-90%: Wilcoxon signed-rank, bootstrap CI of "
            "the median within-group difference, Cliff's delta, Holm. See docs/methods.md#efficiency."
        ),
    )
    p.add_argument("path", type=Path, help="the .h5 cache with L-hat curves (from `lhat`)")
    p.add_argument("--traces", type=Path, default=None,
                   help="the JSONL the cache was made from; its `group` / `variant` fields pair "
                        "the variants")
    p.add_argument("--pairs", nargs="+", default=None, metavar="A:B",
                   help="variant pairs compared as A - B (default: every variant against "
                        "`original`, else against the first variant seen)")
    p.add_argument("--n-boot", type=flags.positive_int, default=2000, help="bootstrap resamples")
    p.add_argument("--seed", type=flags.seed, default=0, help="bootstrap seed")
    p.add_argument("--plots", type=Path, default=None, help="folder for a PNG of the variants' curves")
    flags.report_flags(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """`efficiency` from parsed flags."""
    if args.plots is not None:
        check_plot_folder(args.plots)
    pairs = parse_pairs(args.pairs)
    if pairs is not None and args.traces is None:
        raise ProbesError("--pairs compares variants, which come from the traces' `group` / "
                          "`variant` fields: add --traces F.jsonl")
    with Stages(total=1, desc=NAME, enabled=progress_on(args.quiet)) as stages, \
            stages.working("statistics from the cache"):
        report = efficiency_report(args.path, args.traces, pairs=pairs, n_boot=args.n_boot,
                                   seed=args.seed, plots=args.plots)
    if args.json:
        print(json.dumps(report_json(report), ensure_ascii=False, sort_keys=True))
    else:
        print(format_report(report))
    return 0


# --------------------------------------------------------------------------------------------------
# The demo's section


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

    from analyses.efficiency import verdict
    from probes.commands.lhat import LhatConfig, lhat_traces
    from probes.reasoner.variants import VARIANTS, VARIANTS_PATH

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
