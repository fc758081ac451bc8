"""Category comparisons of the per-token implicit updates, per layer and pooled, with controls.

Input: per trace, the `upd_*` arrays of `python -m probes.run updates` (float [n_layers, T], index
i = trajectory token i; docs/methods.md#m1 .. #m7) and the trace's `TokenSets`
(`analyses.lhat_effects.token_sets`: labels, occurrences, paragraph-initial and position-matched
ordinary tokens, shuffled labels). Pure numpy/scipy; no model, no I/O.

Statistics as for the L̂ effects (docs/methods.md#controls): per trace and layer, one aggregate per set
(mean or median over the set's tokens), then comparisons with traces as units
(`analyses.stats.compare_paired`: bootstrap CIs resampling traces, the sign-flip p-value, Cliff's
δ). Holm's correction runs over EVERY comparison of a table: all metrics × (layers + pooled) ×
pairs. "Pooled" is the per-token mean over layers (NaN-ignoring), so a token's pooled value is its
average magnitude through the network.

Two controls, reported per row:

* shuffled labels: the `("shuffled_reflection", "shuffled_ordinary")` row is a null (two
  exchangeable random token sets of one trace); it should not be significant;
* random-init model: the same comparisons on the arrays of a randomly initialised model of the
  same architecture (`updates --control random-init`), with the SAME token sets. A trained-model
  effect that the random-init model shows too (significant, same sign) is flagged
  `reproduced_by_random_init`: it is a property of the architecture and the token statistics
  (e.g. position, token identity), not of what training put in the weights.

Entry points: `update_comparison`, `format_update_table`, `heatmap_values`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from analyses.inference import NOT_TESTABLE
from analyses.lhat_effects import DEFAULT_PAIRS
from analyses.stats import PairedComparison, compare_paired
from analyses.token_sets import MATCHED_SETS, TokenSets

__all__ = [
    "POOLED",
    "SET_NAMES",
    "UpdateComparison",
    "UpdateRow",
    "effect_direction",
    "format_update_table",
    "heatmap_values",
    "per_trace_layer_aggregates",
    "summary_rows",
    "update_comparison",
]

POOLED = "pooled"
"""Layer label of the pooled rows (per-token mean over layers)."""

SET_NAMES = ("reflection", "delimiter", "ordinary", "paragraph_initial", "position_matched",
             "shuffled_reflection", "shuffled_ordinary", *MATCHED_SETS)
"""The token sets aggregated per trace (see `analyses.lhat_effects.TokenSets.indices`)."""

ALPHA = 0.05
"""Family-wise level used for the effect verdicts (`effect_direction`)."""


def _reduce_rows(vals: np.ndarray, statistic: str) -> np.ndarray:
    """Mean/median over axis 1 ignoring NaN; NaN for rows without any finite value."""
    if vals.shape[1] == 0:
        return np.full(vals.shape[0], np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(vals, axis=1) if statistic == "mean" else np.nanmedian(vals, axis=1)


def per_trace_layer_aggregates(
    values: Sequence[np.ndarray],
    sets: Sequence[TokenSets],
    *,
    statistic: str = "mean",
    unit: str = "token",
    absolute: bool = False,
    names: Sequence[str] = SET_NAMES,
) -> dict[str, np.ndarray]:
    """One number per trace, layer and set.

    Args:
        values: Per trace, float [n_layers, T] (all traces with the same n_layers).
        sets: Per trace, its `TokenSets` (T must match).
        statistic: "mean" or "median" over a set's tokens (NaN ignored).
        unit: Phrase-set unit: "token" (every token of an occurrence) or "first_token".
        absolute: Aggregate |value| (for signed quantities such as ΔL^pred).
        names: Sets to aggregate.

    Returns:
        {set name: float64 [n_traces, n_layers + 1]}; the last column is the pooled value (the
        per-token mean over layers, then aggregated). NaN where a trace has no token of the set.

    Raises:
        ValueError: On mismatched shapes or an unknown statistic.
    """
    if statistic not in ("mean", "median"):
        raise ValueError(f"statistic must be 'mean' or 'median', got {statistic!r}.")
    if len(values) != len(sets):
        raise ValueError(f"{len(values)} value arrays but {len(sets)} token sets.")
    if not values:
        return {name: np.zeros((0, 0)) for name in names}
    n_layers = np.asarray(values[0]).shape[0]
    out = {name: np.full((len(values), n_layers + 1), np.nan) for name in names}
    for i, (arr, ts) in enumerate(zip(values, sets, strict=True)):
        arr = np.asarray(arr, np.float64)
        if arr.ndim != 2 or arr.shape[0] != n_layers or arr.shape[1] != ts.n_tokens:
            raise ValueError(
                f"trace {i}: values have shape {arr.shape}, expected ({n_layers}, {ts.n_tokens})."
            )
        if absolute:
            arr = np.abs(arr)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            pooled = np.nanmean(arr, axis=0)
        full = np.vstack([arr, pooled[None]])                   # [L+1, T]
        for name in names:
            idx = ts.indices(name, unit)
            out[name][i] = _reduce_rows(full[:, idx], statistic)
    return out


def effect_direction(row: PairedComparison | Mapping[str, Any], alpha: float = ALPHA) -> str:
    """"more", "less" (A vs B, Holm-significant with the CI of the difference on one side of 0),
    "n.s.", "not testable" (below the floor, `analyses.inference.MIN_TRACES`) or "n/a" (no test,
    e.g. all differences 0)."""
    r = row.to_dict() if isinstance(row, PairedComparison) else dict(row)
    if r.get("testable", True) is False:
        return NOT_TESTABLE
    p = r["p_holm"]
    lo, hi = r["ci_median_diff"]
    if p is None or lo is None or hi is None or any(
            isinstance(x, float) and math.isnan(x) for x in (p, lo, hi)):
        return "n/a"
    if p < alpha and lo > 0:
        return "more"
    if p < alpha and hi < 0:
        return "less"
    return "n.s."


@dataclass(frozen=True)
class UpdateRow:
    """One comparison: a metric at one layer (or pooled), set A against set B.

    Attributes:
        metric: Array name (e.g. `upd_sigma_gate`).
        layer: Layer index, or `POOLED`.
        comparison: The trained model's comparison (Holm over the whole table).
        effect: `effect_direction(comparison)`.
        control: The random-init model's comparison on the same traces and token sets (Holm over
            the control's table), or None.
        control_effect: `effect_direction(control)`, or None.
        reproduced_by_random_init: True when the trained effect is significant and the random-init
            model shows a significant effect in the same direction; None without a control.
    """

    metric: str
    layer: int | str
    comparison: PairedComparison
    effect: str
    control: PairedComparison | None = None
    control_effect: str | None = None
    reproduced_by_random_init: bool | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (comparison fields flattened; control under `control`)."""
        d = {"metric": self.metric, "layer": self.layer, **self.comparison.to_dict(),
             "effect": self.effect, "control": None, "control_effect": self.control_effect,
             "reproduced_by_random_init": self.reproduced_by_random_init}
        if self.control is not None:
            d["control"] = self.control.to_dict()
        return d


@dataclass(frozen=True)
class UpdateComparison:
    """All rows of one comparison table plus the per-layer medians for heatmaps.

    Attributes:
        rows: One `UpdateRow` per metric × layer (then pooled) × pair.
        medians: {metric: {set: float [n_layers + 1]}}: median over traces of the per-trace
            aggregates (last entry pooled), for `heatmap_values`.
        control_medians: The same for the random-init model, or None.
        meta: Labels (statistic, unit, n_traces, n_tests, metrics, ...).
    """

    rows: tuple[UpdateRow, ...]
    medians: dict[str, dict[str, np.ndarray]]
    control_medians: dict[str, dict[str, np.ndarray]] | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def row(self, metric: str, layer: int | str, a: str, b: str) -> UpdateRow:
        """The row of `metric` at `layer` comparing `a` with `b`."""
        for r in self.rows:
            if (r.metric, r.layer, r.comparison.a, r.comparison.b) == (metric, layer, a, b):
                return r
        raise KeyError(f"No row {metric!r} layer {layer!r} {a!r} vs {b!r}.")

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        def med(m):
            return None if m is None else {
                k: {s: v.tolist() for s, v in d.items()} for k, d in m.items()}
        return {"meta": dict(self.meta), "rows": [r.to_dict() for r in self.rows],
                "medians": med(self.medians), "control_medians": med(self.control_medians)}


def _table(per_metric: Mapping[str, Mapping[str, np.ndarray]], pairs, n_boot: int, seed: int,
           layer_ids: Sequence[int] | None = None, ci_method: str = "BCa"):
    """compare_paired over metrics × layers × pairs with ONE Holm family."""
    flat: dict[str, np.ndarray] = {}
    flat_pairs: list[tuple[str, str]] = []
    index: list[tuple[str, int | str, str, str]] = []
    for metric, agg in per_metric.items():
        n_cols = next(iter(agg.values())).shape[1]
        for col in range(n_cols):
            layer: int | str = (POOLED if col == n_cols - 1
                                else col if layer_ids is None else int(layer_ids[col]))
            for name, arr in agg.items():
                flat[f"{metric}|{col}|{name}"] = arr[:, col]
            for a, b in pairs:
                flat_pairs.append((f"{metric}|{col}|{a}", f"{metric}|{col}|{b}"))
                index.append((metric, layer, a, b))
    results = (compare_paired(flat, flat_pairs, n_boot=n_boot, seed=seed, ci_method=ci_method)
               if flat_pairs else [])
    out = {}
    for (metric, layer, a, b), r in zip(index, results, strict=True):
        out[(metric, layer, a, b)] = PairedComparison(**{**r.to_dict(), "a": a, "b": b})
    return out


def _medians(per_metric: Mapping[str, Mapping[str, np.ndarray]]) -> dict[str, dict[str, np.ndarray]]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return {m: {s: np.nanmedian(v, axis=0) for s, v in agg.items()}
                for m, agg in per_metric.items()}


def update_comparison(
    values: Mapping[str, Sequence[np.ndarray]],
    sets: Sequence[TokenSets],
    *,
    control_values: Mapping[str, Sequence[np.ndarray]] | None = None,
    pairs: Sequence[tuple[str, str]] = DEFAULT_PAIRS,
    statistic: str = "mean",
    unit: str = "token",
    signed: Sequence[str] = (),
    layer_ids: Sequence[int] | None = None,
    n_boot: int = 2000,
    seed: int = 0,
    meta: Mapping[str, Any] | None = None,
    ci_method: str = "BCa",
) -> UpdateComparison:
    """Compare token sets on every metric, per layer and pooled, with the random-init control.

    Example:
        >>> cmp = update_comparison({"upd_sigma_gate": sigmas}, sets, control_values={...})
        >>> cmp.row("upd_sigma_gate", "pooled", "reflection", "ordinary").effect

    Args:
        values: {metric: per trace float [n_layers, T]} of the trained model.
        sets: Per trace, its `TokenSets` (shared by the model and the control).
        control_values: The same metrics of the random-init model for the same traces (same
            order, same shapes), or None.
        pairs: (A, B) set comparisons.
        statistic: Per-trace aggregate: "mean" or "median".
        unit: Phrase-set unit: "token" or "first_token".
        signed: Metrics compared by magnitude |value| (signed quantities such as ΔL^pred or
            M7, where "large" means either sign); the others are compared as they are.
        layer_ids: The model layer of each array row (rows' `layer` labels); None: 0..L−1.
        n_boot: Bootstrap resamples per CI.
        seed: Base seed.
        meta: Extra labels for the table.
        ci_method: Interval method of `analyses.stats.compare_paired` ("none": tests only).

    Returns:
        The `UpdateComparison`.

    Raises:
        ValueError: When the control lacks a metric or its shapes differ.
    """
    def aggregate(vals):
        return {m: per_trace_layer_aggregates(vals[m], sets, statistic=statistic, unit=unit,
                                              absolute=m in signed)
                for m in values}

    trained = aggregate(values)
    rows_t = _table(trained, pairs, n_boot, seed, layer_ids, ci_method)
    rows_c = None
    control = None
    if control_values is not None:
        missing = [m for m in values if m not in control_values]
        if missing:
            raise ValueError(f"the random-init control has no {missing}.")
        control = aggregate(control_values)
        rows_c = _table(control, pairs, n_boot, seed, layer_ids, ci_method)
    rows = []
    for key, comp in rows_t.items():
        metric, layer, _, _ = key
        eff = effect_direction(comp)
        ctrl = rows_c[key] if rows_c is not None else None
        ctrl_eff = effect_direction(ctrl) if ctrl is not None else None
        reproduced = None
        if ctrl is not None:
            reproduced = eff in ("more", "less") and ctrl_eff == eff
        rows.append(UpdateRow(metric=metric, layer=layer, comparison=comp, effect=eff,
                              control=ctrl, control_effect=ctrl_eff,
                              reproduced_by_random_init=reproduced))
    info = {"statistic": statistic, "unit": unit, "n_traces": len(sets),
            "n_tests": len(rows), "metrics": list(values), "signed_as_magnitude": list(signed),
            "holm_family": "all metrics x layers (+pooled) x pairs", **dict(meta or {})}
    return UpdateComparison(rows=tuple(rows), medians=_medians(trained),
                            control_medians=_medians(control) if control is not None else None,
                            meta=info)


def heatmap_values(cmp: UpdateComparison, metric: str, *, control: bool = False,
                   names: Sequence[str] = ("reflection", "delimiter", "ordinary",
                                           "paragraph_initial", "position_matched")
                   ) -> dict[str, np.ndarray]:
    """{set: float [n_layers]} medians over traces for one metric (pooled column dropped)."""
    med = cmp.control_medians if control else cmp.medians
    if med is None:
        raise ValueError("this comparison has no random-init control.")
    return {n: np.asarray(med[metric][n][:-1]) for n in names if n in med[metric]}


def _f(x: Any, spec: str = ".3g") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "nan"
    return format(x, spec)


def format_update_table(cmp: UpdateComparison, *, layers: str = "pooled",
                        pairs: Sequence[tuple[str, str]] | None = None) -> str:
    """Aligned text table of the comparison.

    Args:
        cmp: The comparison.
        layers: "pooled" (pooled rows only), "all" (every layer and pooled).
        pairs: Restrict to these (A, B) pairs; None for all.

    Returns:
        One line per row: metric, layer, comparison, n, median A, median B, median diff [95% CI],
        Cliff's δ, Holm p, effect, and with a control its median difference (the random-init
        baseline of the row), its effect and whether it reproduces the trained one. Below the floor
        the diff column holds `n = k: too few traces for inference` and no CI or p.
    """
    has_ctrl = any(r.control is not None for r in cmp.rows)
    header = ["metric", "layer", "comparison", "n", "median A", "median B", "diff [95% CI]",
              "cliff δ", "p_holm", "effect"]
    if has_ctrl:
        header += ["random-init diff", "random-init", "reproduced"]
    body = []
    for r in cmp.rows:
        c = r.comparison
        if layers == "pooled" and r.layer != POOLED:
            continue
        if pairs is not None and (c.a, c.b) not in pairs:
            continue
        lo, hi = c.ci_median_diff
        line = [r.metric, str(r.layer), f"{c.a} vs {c.b}", str(c.n_traces), _f(c.median_a),
                _f(c.median_b), f"{_f(c.median_diff)} [{_f(lo)}, {_f(hi)}]",
                _f(c.cliffs_delta, ".2f"), _f(c.p_holm, ".2g"), r.effect]
        if not c.testable:
            line[6:9] = [f"{_f(c.median_diff)} ({c.note})", "-", "-"]
        if has_ctrl:
            line += [_f(r.control.median_diff) if r.control is not None else "",
                     r.control_effect or "", {True: "yes", False: "no", None: ""}[
                r.reproduced_by_random_init] if r.effect in ("more", "less") else ""]
        body.append(line)
    widths = [max(len(x[i]) for x in [header, *body]) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    meta = cmp.meta
    lines = [f"per-token implicit updates: per-trace {meta.get('statistic')} over tokens "
             f"(unit {meta.get('unit')}), {meta.get('n_traces')} traces, Holm over "
             f"{meta.get('n_tests')} tests"]
    lines += [fmt.format(*header).rstrip(), "  ".join("-" * w for w in widths)]
    lines += [fmt.format(*x).rstrip() for x in body]
    return "\n".join(lines)


def summary_rows(cmp: UpdateComparison) -> list[dict[str, Any]]:
    """Compact JSON rows of the significant trained effects (for reports)."""
    out = []
    for r in cmp.rows:
        if r.effect not in ("more", "less"):
            continue
        c = r.comparison
        out.append({"metric": r.metric, "layer": r.layer, "a": c.a, "b": c.b, "effect": r.effect,
                    "median_diff": c.median_diff, "ci": list(c.ci_median_diff),
                    "cliffs_delta": c.cliffs_delta, "p_holm": c.p_holm, "n_traces": c.n_traces,
                    "reproduced_by_random_init": r.reproduced_by_random_init})
    return out

