"""Table builders for `compare`'s JSON (`lhat_comparison_table`, `update_comparison_table`,
`fit_table`, `trend_lines`) (numbers formatted by `analyses.report_data.fmt`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from analyses.report_data import Table, fmt


def _ci(value: Any, ci: Sequence[Any] | None) -> str:
    lo, hi = (ci or (None, None))[:2]
    return f"{fmt(value)} [{fmt(lo)}, {fmt(hi)}]"


def is_empty_row(row: Mapping[str, Any]) -> bool:
    """A comparison row with nothing in it: no trace (n = 0) or no difference measured (n/a)."""
    n = row.get("n_traces")
    diff = row.get("median_diff")
    return (not n) or diff is None or (isinstance(diff, float) and math.isnan(diff))


def _dropped_note(n_dropped: int) -> str:
    return (f"; {n_dropped} empty row{'s' if n_dropped != 1 else ''} (n = 0 or no difference "
            "measurable) left out" if n_dropped else "")


def _effect_cell(effect: str | None) -> tuple[str, str]:
    text = effect or "n/a"
    return (text, {"more": "more", "less": "less"}.get(text, "ns"))


def lhat_comparison_table(table: Mapping[str, Any], *, caption: str = "") -> Table:
    """`compare`'s L̂ comparison (`report["table"]`) as a table with 95% CIs.

    Columns: comparison, traces, median a [CI], median b [CI], median difference [CI], Cliff's δ,
    p (the sign-flip permutation test of the mean per-trace difference), its Holm adjustment, and
    the verdict at Holm p < 0.05 with a CI excluding 0. Empty rows
    (`is_empty_row`) are left out; the note says how many.
    """
    rows = []
    kept = [r for r in table.get("rows", []) if not is_empty_row(r)]
    n_dropped = len(table.get("rows", [])) - len(kept)
    for r in kept:
        lo, hi = (r.get("ci_median_diff") or (None, None))[:2]
        p = r.get("p_holm")
        if p is None or lo is None or hi is None or (isinstance(p, float) and math.isnan(p)):
            verdict = "n/a"
        elif p < 0.05 and lo > 0:
            verdict = "more"
        elif p < 0.05 and hi < 0:
            verdict = "less"
        else:
            verdict = "n.s."
        rows.append([f"{r['a']} vs {r['b']}", fmt(r.get("n_traces")),
                     _ci(r.get("median_a"), r.get("ci_median_a")),
                     _ci(r.get("median_b"), r.get("ci_median_b")),
                     _ci(r.get("median_diff"), r.get("ci_median_diff")),
                     fmt(r.get("cliffs_delta"), ".2f"), fmt(r.get("p"), ".2g"),
                     fmt(p, ".2g"), _effect_cell(verdict)])
    meta = table.get("meta", {})
    note = (f"per-trace {meta.get('statistic', 'mean')} of {meta.get('metric', '?')} "
            f"(unit: {meta.get('unit', '?')}); medians over traces with bootstrap 95% CIs; "
            "p: sign-flip permutation test of the mean per-trace difference, Holm over every row"
            + _dropped_note(n_dropped))
    return Table(["comparison", "traces", "median a [95% CI]", "median b [95% CI]",
                  "difference [95% CI]", "Cliff's δ", "p", "Holm p", "a vs b"],
                 rows, caption=caption, note=note)


def update_comparison_table(comparison: Mapping[str, Any], *, layers: str = "pooled",
                            caption: str = "") -> Table:
    """`compare`'s update comparison (`report["updates"]["comparison"]`) as a table.

    Args:
        comparison: `{"meta": ..., "rows": [...]}`.
        layers: "pooled" (the pooled rows only) or "all" (every layer, then pooled).
        caption: Table caption.

    Returns:
        Columns: metric, layer, comparison, traces, median a, median b, difference [CI], Cliff's δ,
        Holm p, effect, and with a control: its effect and whether it reproduces the effect.
        Empty rows (`is_empty_row`) are left out; the note says how many.
    """
    chosen = [r for r in comparison.get("rows", []) if layers == "all" or r.get("layer") == "pooled"]
    rows_in = [r for r in chosen if not is_empty_row(r)]
    n_dropped = len(chosen) - len(rows_in)
    magnitude = set(comparison.get("meta", {}).get("signed_as_magnitude", []))
    has_control = any(r.get("control") is not None for r in rows_in)
    rows = []
    for r in rows_in:
        name = f"|{r['metric']}|" if r["metric"] in magnitude else r["metric"]
        row = [name, str(r.get("layer")), f"{r['a']} vs {r['b']}", fmt(r.get("n_traces")),
               fmt(r.get("median_a")), fmt(r.get("median_b")),
               _ci(r.get("median_diff"), r.get("ci_median_diff")),
               fmt(r.get("cliffs_delta"), ".2f"), fmt(r.get("p_holm"), ".2g"),
               _effect_cell(r.get("effect"))]
        if has_control:
            rep = r.get("reproduced_by_random_init")
            row += [_effect_cell(r.get("control_effect")),
                    "—" if rep is None else ("yes" if rep else "no")]
        rows.append(row)
    columns = ["metric", "layer", "comparison", "traces", "median a", "median b",
               "difference [95% CI]", "Cliff's δ", "Holm p", "effect"]
    if has_control:
        columns += ["random-init effect", "reproduced by random-init"]
    meta = comparison.get("meta", {})
    note = (f"per-trace {meta.get('statistic', 'mean')} over tokens (unit: {meta.get('unit', '?')})"
            f"; one Holm family of {meta.get('n_tests', len(comparison.get('rows', [])))} tests "
            f"({meta.get('holm_family', 'metrics x layers x pairs')}); |x|: signed values "
            "compared by magnitude" + _dropped_note(n_dropped))
    return Table(columns, rows, caption=caption, note=note)


def fit_table(fit: Mapping[str, Any], *, caption: str = "") -> Table:
    """`compare`'s behaviour fit (`report["fit"]`) as a table: one row per target (ΔL̂, |ΔL̂|).

    Columns: target, tokens, traces, out-of-fold R² with mechanism + categories [CI], mechanism
    only, random-init mechanism, partial R² of the categories [CI] and of the mechanism [CI].
    """
    rows = []
    for target, f in fit.get("fits", {}).items():
        r2, part, ci = f.get("r2", {}), f.get("partial_r2", {}), f.get("ci", {})
        rows.append([{"delta": "ΔL̂", "abs_delta": "|ΔL̂|"}.get(target, target),
                     fmt(f.get("n_tokens")), fmt(f.get("n_traces")),
                     _ci(r2.get("full"), ci.get("full")), fmt(r2.get("controls+mechanism")),
                     fmt(r2.get("controls+mechanism_random")),
                     _ci(part.get("categories"), ci.get("categories")),
                     _ci(part.get("mechanism"), ci.get("mechanism"))])
    return Table(["target", "tokens", "traces", "R² full [95% CI]", "R² mechanism only",
                  "R² random-init mechanism", "partial R² categories [95% CI]",
                  "partial R² mechanism [95% CI]"], rows, caption=caption,
                 note="ridge regression per token, out of fold (GroupKFold by trace); CIs resample "
                      "traces")


def trend_lines(trend: Mapping[str, Any]) -> list[str]:
    """Plain lines on whether L̂ falls along the trajectory (`report["trend"]`)."""
    lo, hi = (trend.get("share_falling_ci") or (None, None))[:2]
    change = _ci(trend.get("median_change"), trend.get("median_change_ci"))
    lines = [
        f"L̂ falls along the trajectory in {fmt(trend.get('share_falling'), '.0%')} of "
        f"{fmt(trend.get('n_traces'))} traces [95% CI {fmt(lo, '.0%')}, {fmt(hi, '.0%')}].",
        f"Median change from no trajectory to the full trajectory: {change} nats "
        f"(Wilcoxon p {fmt(trend.get('wilcoxon_p'), '.2g')}).",
    ]
    if "median_spearman" in trend:
        lines.append(f"Median Spearman correlation of L̂ with the position: "
                     f"{_ci(trend.get('median_spearman'), trend.get('median_spearman_ci'))}.")
    return lines
