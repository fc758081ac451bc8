"""Behavioural per-token effects on the L̂ curve, category comparisons with controls, L̂ trends.

Everything here works on one trace's L̂ curve (docs/methods.md#m8) and its per-token category
arrays (`probes.traces.categories.categorize`), all as numpy arrays. Pure functions; no model, no I/O.

Conventions (as in `probes.lhat`):

* `lhat` is float [T+1]; index t = number of trajectory tokens in the prefix (`lhat[0]`: no
  trajectory, `lhat[T]`: the full trajectory).
* Trajectory tokens are indexed 0..T−1. The change caused by token i is `lhat[i+1] − lhat[i]`.
* A phrase occurrence covers trajectory tokens `[a, b)` (an `Occurrence`).

Per token i (docs/methods.md#m8):

    Δ_i = lhat[i+1] − lhat[i],  |Δ_i|,  ρ_i = |Δ_i| / lhat[i],  λ_i = log lhat[i+1] − log lhat[i]

Per occurrence [a, b) (the change across the whole phrase; for b = a + 1 it is the token's):

    Δ = lhat[b] − lhat[a],  ρ = |Δ| / lhat[a],  λ = log lhat[b] − log lhat[a]

so the phrase Δ is the sum of its tokens' Δs. With `raml_notebook=True` the window is RaML's
notebook's `[a, b+1]` (one token past the word; the off-by-one is reproduced on purpose, §1.4),
and `raml_notebook_occurrences` reproduces the notebook's word matching (no-space ids only, up to
the first `</think>`).

Statistics treat traces as units (docs/methods.md#controls): `token_effects` builds one trace's table
(including the controls), `per_trace_aggregates` reduces each category / control / phrase to one
number per trace, `category_comparison` compares them with `analyses.stats.compare_paired`
(bootstrap CIs over traces, the sign-flip p-value of the mean difference, Cliff's δ, Holm over
every comparison made).

Controls (reflection words are mostly paragraph-initial, §7.1):

* *paragraph-initial ordinary* tokens (`paragraph_starts` from the token strings);
* *position-matched ordinary* tokens: the ordinary token(s) nearest to each reflection
  occurrence (`position_matched_ordinary`);
* *shuffled labels*: the trajectory's labels permuted within the trace (`shuffled_labels`); the
  null compares the tokens that got the "reflection" label with an equally large random sample of
  the tokens that got the "ordinary" label (two exchangeable random token sets, so the within-trace
  difference is symmetric about 0 and the sign-flip test is exact under the null).

Also: `lhat_trend` (does L̂ fall along the trajectory?) and `compare_curves` (e.g. thinking vs
no-thinking curves: final L̂, area under the normalised curve, half-change time).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import signal

from analyses.inference import MIN_TRACES, raw_values_text
from analyses.metrics import METRICS as METRICS
from analyses.stats import PairedComparison, compare_paired
from analyses.token_sets import (
    _SET_NAMES,
    _UNITS,
    DELIMITER,
    MATCHED_SETS,
    ORDINARY,
    REFLECTION,
    Occurrence,
    TokenSets,
    _trajectory_length,
    token_sets,
)

DEFAULT_PAIRS: tuple[tuple[str, str], ...] = (
    ("reflection", "ordinary"),
    ("delimiter", "ordinary"),
    ("reflection", "delimiter"),
    ("reflection", "paragraph_initial"),
    ("shuffled_reflection", "shuffled_ordinary"),
)
"""Comparisons made by `category_comparison` (per-phrase ones are added to these).

`position_matched` (the nearest ordinary token of each occurrence) is no control and no row: a
single token against a whole phrase was anti-conservative under the label-shift null (FPR 0.10 -
0.27, docs/statistics.md); the set stays available for description (`pooled_values`, heat maps),
and `matched_to_reflection` is the position-matched control.

The shuffled-label null pairs shuffled "reflection" tokens with an equally large random sample of
shuffled "ordinary" tokens: two exchangeable random token sets of one trace, so they differ by
chance only. Two alternatives are *not* nulls: shuffled reflection against the real ordinary
tokens (the shuffled set contains real reflection tokens, so a real effect leaks into it), and
shuffled reflection against *all* shuffled-ordinary tokens (the mean of a few tokens against the
mean of hundreds: with heavy-tailed |ΔL̂| the small set's mean is usually below the large set's,
so the signed-rank test can reject without any effect)."""


MATCHED_PAIRS: tuple[tuple[str, str], ...] = (
    ("reflection", "matched_to_reflection"),
    ("delimiter", "matched_to_delimiter"),
    *DEFAULT_PAIRS[2:],
)
"""`compare`'s default: the category rows against their confound-matched ordinary controls
(`analyses.matching`: same trace, position, corpus frequency, paragraph status) instead of all
ordinary tokens; the controls and the null as in `DEFAULT_PAIRS` (the unmatched comparison)."""


def _as_curve(lhat: np.ndarray | Sequence[float]) -> np.ndarray:
    arr = np.asarray(lhat, dtype=np.float64)
    if arr.ndim != 1 or arr.size < 1:
        raise ValueError(f"An L̂ curve must be 1-D with T+1 >= 1 points, got shape {arr.shape}.")
    return arr


def _safe_log(x: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(x > 0, np.log(np.where(x > 0, x, 1.0)), np.nan)


def _window_metrics(lhat: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> dict[str, np.ndarray]:
    """Metrics of the change lhat[lo] → lhat[hi] (NaN where hi is past the curve)."""
    lo = np.asarray(lo, dtype=np.int64)
    hi = np.asarray(hi, dtype=np.int64)
    ok = (hi < lhat.size) & (lo >= 0)
    before = np.where(ok, lhat[np.clip(lo, 0, lhat.size - 1)], np.nan)
    after = np.where(ok, lhat[np.clip(hi, 0, lhat.size - 1)], np.nan)
    delta = after - before
    with np.errstate(divide="ignore", invalid="ignore"):
        rho = np.where(before == 0, np.nan, np.abs(delta) / before)
    lam = _safe_log(after) - _safe_log(before)
    return {
        "delta": delta,
        "abs_delta": np.abs(delta),
        "rho": rho,
        "lam": lam,
        "abs_lam": np.abs(lam),
    }


def token_metrics(lhat: np.ndarray | Sequence[float]) -> dict[str, np.ndarray]:
    """Per-token Δ, |Δ|, ρ, λ, |λ| of one curve.

    Index i belongs to trajectory token i (the change `lhat[i] → lhat[i+1]`); equal to
    `probes.measures.lhat.fast.delta_lhat`, `relative_change` and `log_ratio`.

    Args:
        lhat: float [T+1] L̂ curve.

    Returns:
        {metric: float64 [T]} for the names in `METRICS`; ρ is NaN where `lhat[i] = 0` (RaML's
        notebook skips those), λ where either point is not positive.
    """
    arr = _as_curve(lhat)
    t = np.arange(arr.size - 1)
    return _window_metrics(arr, t, t + 1)


def occurrence_effects(
    lhat: np.ndarray | Sequence[float],
    occurrences: Sequence[Occurrence] | Sequence[tuple[int, int, int, int]],
    *,
    raml_notebook: bool = False,
) -> dict[str, np.ndarray]:
    """Metrics of the change across each phrase occurrence.

    Default window: `lhat[a] → lhat[b]` for an occurrence `[a, b)`, i.e. from the prefix just
    before the phrase to the prefix that ends with its last token (docs/methods.md#m8, toolkit
    definition `ρ(w) = |L̂_{e(w)} − L̂_{s(w)−1}| / L̂_{s(w)−1}`). Its Δ equals the sum of the
    token Δs of the phrase.

    `raml_notebook=True`: RaML notebook window `lhat[a] → lhat[b+1]`, one token *past* the word
    (the notebook's `|L̂_{i+|w|} − L̂_{i−1}| / L̂_{i−1}`; the off-by-one is kept on purpose to
    reproduce its numbers). Applied to Δ and λ too. NaN when `b + 1 > T` (no such prefix).

    Args:
        lhat: float [T+1] L̂ curve.
        occurrences: `(start, end, ...)` tuples in trajectory token coordinates.
        raml_notebook: Use the notebook's window.

    Returns:
        {metric: float64 [n_occurrences]} for the names in `METRICS`.
    """
    arr = _as_curve(lhat)
    starts = np.array([int(o[0]) for o in occurrences], dtype=np.int64)
    ends = np.array([int(o[1]) for o in occurrences], dtype=np.int64)
    bad = np.any(starts < 0) or np.any(ends <= starts) or np.any(ends > arr.size - 1)
    if starts.size and bad:
        raise ValueError(
            f"Occurrences must satisfy 0 <= start < end <= T = {arr.size - 1}; got "
            f"{list(zip(starts.tolist(), ends.tolist()))[:5]}..."
        )
    return _window_metrics(arr, starts, ends + 1 if raml_notebook else ends)


def ema(values: np.ndarray | Sequence[float], alpha: float) -> np.ndarray:
    """Exponential moving average `s_0 = x_0, s_t = α x_t + (1 − α) s_{t−1}` (RaML plots: α=0.01).

    Args:
        values: float [n].
        alpha: Smoothing factor in (0, 1]; 1 returns the input.

    Returns:
        float64 [n].
    """
    x = np.asarray(values, dtype=np.float64)
    if not 0 < alpha <= 1:
        raise ValueError(f"alpha must be in (0, 1], got {alpha}.")
    if x.size == 0:
        return x.copy()
    out, _ = signal.lfilter([alpha], [1.0, alpha - 1.0], x, zi=[(1.0 - alpha) * x[0]])
    return out


@dataclass(frozen=True)
class TraceEffects:
    """Per-token and per-occurrence effects of one trace, with its control sets.

    Attributes:
        lhat: float64 [T+1] the curve.
        token: {metric: float64 [T]} per-token Δ, |Δ|, ρ, λ, |λ| (`token_metrics`).
        labels: uint8 [T] labels used for the sets: 1/2 on tokens inside a reflection/delimiter
            occurrence, 0 on ordinary tokens (other codes passed in are kept and excluded).
        occurrences: The occurrences (trajectory coordinates).
        occ: {metric: float64 [n_occ]} across each occurrence (`occurrence_effects`).
        paragraph_initial: bool [T] ordinary tokens that start a paragraph, or None when no
            paragraph starts were given.
        position_matched: int64 [n_reflection_occ, k] matched ordinary tokens (-1 none).
        shuffled: [T] `labels` permuted within the trace.
        shuffled_ordinary: int64 [n] a random sample, as large as the shuffled reflection set, of
            the tokens whose shuffled label is ordinary (the null's comparison set).
        raml_notebook: Whether `occ` uses the notebook window.
    """

    lhat: np.ndarray
    token: dict[str, np.ndarray]
    labels: np.ndarray
    occurrences: tuple[Occurrence, ...]
    occ: dict[str, np.ndarray]
    paragraph_initial: np.ndarray | None
    position_matched: np.ndarray
    shuffled: np.ndarray
    shuffled_ordinary: np.ndarray
    raml_notebook: bool = False
    sets: TokenSets | None = None

    @property
    def n_tokens(self) -> int:
        """T, the number of trajectory tokens."""
        return int(self.labels.size)

    @property
    def ordinary_mask(self) -> np.ndarray:
        """bool [T] ordinary tokens (inside no occurrence)."""
        return self.labels == ORDINARY

    def unit_values(self, name: str, metric: str = "abs_delta", unit: str = "phrase") -> np.ndarray:
        """The metric values of one set's units in this trace.

        Args:
            name: A set name (`reflection`, `delimiter`, `ordinary`, `paragraph_initial`,
                `position_matched`, `shuffled_reflection`, `shuffled_ordinary`) or `phrase:<id>`
                (by numeric phrase id).
            metric: One of `METRICS`.
            unit: How phrase sets count (`reflection`, `delimiter`, `phrase:*`): `"phrase"` one
                value per occurrence across the whole phrase; `"first_token"` the token value of
                each occurrence's first token; `"token"` every token inside the occurrences.
                Control sets are always single tokens.

        Returns:
            float64 [n_units] (NaN entries kept; e.g. ρ at L̂ = 0).
        """
        _check_metric(metric)
        if unit not in _UNITS:
            raise ValueError(f"unit must be one of {_UNITS}, got {unit!r}.")
        tok = self.token[metric]
        if name == "ordinary":
            return tok[self.ordinary_mask]
        if name == "paragraph_initial":
            return tok[self.paragraph_initial] if self.paragraph_initial is not None else tok[:0]
        if name == "position_matched":
            idx = self.position_matched.reshape(-1)
            return tok[idx[idx >= 0]]
        if name == "shuffled_reflection":
            return tok[self.shuffled == REFLECTION]
        if name == "shuffled_ordinary":
            return tok[self.shuffled_ordinary]
        if name in MATCHED_SETS:
            # the control window of each matched occurrence, counted as the phrase would be
            wins = self.sets.matched_windows(name) if self.sets is not None else []
            if unit == "token":
                return tok[self.sets.indices(name, "token")] if wins else tok[:0]
            m = np.asarray([w[1] for w in wins], np.int64)
            if unit == "first_token":
                return tok[m]
            ln = np.asarray([w[2] for w in wins], np.int64)
            return _window_metrics(self.lhat, m, m + ln + (1 if self.raml_notebook else 0))[metric]
        if name in ("reflection", "delimiter"):
            code = REFLECTION if name == "reflection" else DELIMITER
            sel = [i for i, o in enumerate(self.occurrences) if o.category == code]
        elif name.startswith("phrase:"):
            pid = int(name.split(":", 1)[1])
            sel = [i for i, o in enumerate(self.occurrences) if o.phrase_id == pid]
        else:
            raise ValueError(f"Unknown set name {name!r}.")
        if unit == "phrase":
            return self.occ[metric][np.asarray(sel, dtype=np.int64)]
        if unit == "first_token":
            return tok[np.asarray([self.occurrences[i].start for i in sel], dtype=np.int64)]
        idx = [t for i in sel for t in range(self.occurrences[i].start, self.occurrences[i].end)]
        return tok[np.asarray(sorted(set(idx)), dtype=np.int64)]


def _check_metric(metric: str) -> None:
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}.")


def token_effects(
    lhat: np.ndarray | Sequence[float],
    category: np.ndarray,
    phrase_id: np.ndarray | None = None,
    is_first: np.ndarray | None = None,
    *,
    traj_span: tuple[int, int] | None = None,
    occurrences: Sequence[Occurrence] | None = None,
    raml_notebook: bool = False,
    paragraph_start: np.ndarray | None = None,
    n_matched: int = 1,
    match_window: int | None = None,
    rng: np.random.Generator | int | None = None,
    log_freq: np.ndarray | None = None,
    matched: bool = False,
) -> TraceEffects:
    """Build one trace's effect table: per-token and per-phrase metrics plus the control sets.

    Example:
        >>> cats = categorize(tt, lexicon)
        >>> fx = token_effects(lhat, cats.category, cats.phrase_id, cats.is_first,
        ...                    traj_span=tt.spans["trajectory"],
        ...                    paragraph_start=paragraph_starts(traj_token_strings), rng=gen)

    Args:
        lhat: float [T+1] the trace's L̂ curve.
        category: uint8 category codes, over the whole sequence with `traj_span`, else [T].
        phrase_id: Phrase ids aligned with `category` (-1 none), or None.
        is_first: First-token flags aligned with `category`, or None.
        traj_span: The trajectory's `(start, end)` in the arrays, or None if they are [T] already.
        occurrences: Occurrences to use instead of those in the arrays (e.g. from
            `raml_notebook_occurrences`). Tokens they cover become reflection/delimiter; the rest
            keep `category` except that lexicon phrases they do not cover become ordinary.
        raml_notebook: Use the notebook's `[a, b+1]` window for the occurrence metrics.
        paragraph_start: bool [T] "token starts a paragraph" (`paragraph_starts`), or None to
            skip that control.
        n_matched: Position-matched controls per reflection occurrence.
        match_window: If set, sample the matched controls within ±window instead of nearest.
        rng: Generator (pass one shared generator over all traces) or seed; None: seed 0.
        log_freq: float [T] log2 corpus frequency of the trajectory tokens (matching covariate).
        matched: Add the confound-matched controls (`analyses.matching`).

    Returns:
        The `TraceEffects`.

    Raises:
        ValueError: If `lhat` does not have T+1 points or arrays disagree in length.
    """
    curve = _as_curve(lhat)
    n = _trajectory_length(category, traj_span)
    if curve.size != n + 1:
        raise ValueError(f"lhat has {curve.size} points but the trajectory has {n} tokens "
                         f"(expected T+1 = {n + 1}).")
    sets = token_sets(
        category, phrase_id, is_first, traj_span=traj_span, occurrences=occurrences,
        paragraph_start=paragraph_start, n_matched=n_matched, match_window=match_window, rng=rng,
        log_freq=log_freq, matched=matched,
    )
    return TraceEffects(
        lhat=curve,
        token=token_metrics(curve),
        labels=sets.labels,
        occurrences=sets.occurrences,
        occ=occurrence_effects(curve, sets.occurrences, raml_notebook=raml_notebook),
        paragraph_initial=sets.paragraph_initial,
        position_matched=sets.position_matched,
        shuffled=sets.shuffled,
        shuffled_ordinary=sets.shuffled_ordinary,
        raml_notebook=raml_notebook,
        sets=sets,
    )


def _phrase_label(pid: int, phrase_names: Mapping[int, str] | Sequence[str] | None) -> str:
    if phrase_names is None:
        return f"phrase:{pid}"
    try:
        return f"phrase:{phrase_names[pid]}"
    except (KeyError, IndexError):
        return f"phrase:{pid}"


def _reduce(values: np.ndarray, statistic: str) -> float:
    v = values[~np.isnan(values)]
    if v.size == 0:
        return float("nan")
    return float(np.mean(v) if statistic == "mean" else np.median(v))


def per_trace_aggregates(
    effects: Sequence[TraceEffects],
    metric: str = "abs_delta",
    statistic: str = "mean",
    *,
    unit: str = "phrase",
    phrase_names: Mapping[int, str] | Sequence[str] | None = None,
    phrases: bool = True,
) -> dict[str, np.ndarray]:
    """One number per trace for every category, control and phrase.

    Args:
        effects: One `TraceEffects` per trace (the traces are the units).
        metric: One of `METRICS`.
        statistic: `"mean"` or `"median"` over a trace's units (NaNs ignored).
        unit: Phrase-set unit (see `TraceEffects.unit_values`): `"phrase"` (whole occurrence,
            default), `"first_token"` or `"token"`.
        phrase_names: Phrase id → name (e.g. `[p.phrase for p in lexicon.phrases]`, or
            `RAML_NOTEBOOK_WORDS` for notebook occurrences); ids without a name keep the number.
        phrases: Also return the per-phrase sets.

    Returns:
        {name: float64 [n_traces]} (NaN where a trace has no unit of that set) for `reflection`,
        `delimiter`, `ordinary`, `paragraph_initial`, `position_matched`, `shuffled_reflection`,
        `shuffled_ordinary` (the size-matched null sample, see `DEFAULT_PAIRS`) and, with `phrases`,
        `phrase:<name>` for every phrase seen.
    """
    _check_metric(metric)
    if statistic not in ("mean", "median"):
        raise ValueError(f"statistic must be 'mean' or 'median', got {statistic!r}.")
    n = len(effects)
    out = {name: np.full(n, np.nan) for name in _SET_NAMES}
    pids = sorted({o.phrase_id for fx in effects for o in fx.occurrences if o.phrase_id >= 0})
    for i, fx in enumerate(effects):
        for name in _SET_NAMES:
            out[name][i] = _reduce(fx.unit_values(name, metric, unit), statistic)
    if phrases:
        for pid in pids:
            label = _phrase_label(pid, phrase_names)
            vals = np.full(n, np.nan)
            for i, fx in enumerate(effects):
                vals[i] = _reduce(fx.unit_values(f"phrase:{pid}", metric, unit), statistic)
            out[label] = vals
    return out


def pooled_values(
    effects: Sequence[TraceEffects],
    metric: str = "abs_delta",
    *,
    unit: str = "phrase",
    names: Sequence[str] = ("reflection", "delimiter", "ordinary", "paragraph_initial",
                            "position_matched"),
) -> dict[str, np.ndarray]:
    """All units of each set pooled over traces (for distribution plots; not for tests).

    Args:
        effects: Per-trace tables.
        metric: One of `METRICS`.
        unit: Phrase-set unit (see `TraceEffects.unit_values`).
        names: Sets to pool.

    Returns:
        {name: float64 [n_units]} with NaNs dropped.
    """
    out = {}
    for name in names:
        parts = [fx.unit_values(name, metric, unit) for fx in effects]
        v = np.concatenate(parts) if parts else np.zeros(0)
        out[name] = v[~np.isnan(v)]
    return out


@dataclass(frozen=True)
class ComparisonTable:
    """Category comparisons with traces as units, Holm-corrected over all rows.

    Attributes:
        rows: One `PairedComparison` per comparison (defaults first, then phrase vs baseline).
        meta: Free-form labels (metric, statistic, unit, matching mode, ...).
    """

    rows: tuple[PairedComparison, ...]
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form: `{"meta": {...}, "rows": [PairedComparison.to_dict(), ...]}`."""
        return {"meta": dict(self.meta), "rows": [r.to_dict() for r in self.rows]}

    def row(self, a: str, b: str) -> PairedComparison:
        """The comparison of `a` against `b`."""
        for r in self.rows:
            if r.a == a and r.b == b:
                return r
        raise KeyError(f"No comparison {a!r} vs {b!r}.")


def category_comparison(
    per_trace: Mapping[str, np.ndarray],
    *,
    pairs: Sequence[tuple[str, str]] = DEFAULT_PAIRS,
    phrases: bool = True,
    phrase_baseline: str = "ordinary",
    min_phrase_traces: int = MIN_TRACES,
    n_boot: int = 2000,
    seed: int = 0,
    meta: Mapping[str, Any] | None = None,
    ci_method: str = "BCa",
) -> ComparisonTable:
    """Compare categories, controls and phrases across traces (docs/methods.md#controls).

    Each comparison pairs two per-trace aggregates within traces (`analyses.stats.compare_paired`):
    medians and means with bootstrap 95% CIs resampling traces, the median within-trace difference
    with its CI, Cliff's δ, the two-sided sign-flip p-value (`analyses.inference.signflip_p`; the
    Wilcoxon signed-rank p is kept as `wilcoxon_p`, descriptive), and Holm's adjustment of it over
    *all* comparisons made here (default pairs plus phrase comparisons).

    Args:
        per_trace: From `per_trace_aggregates`.
        pairs: (A, B) comparisons; names must be keys of `per_trace`.
        phrases: Add `phrase:<name>` vs `phrase_baseline` for every phrase present in at least
            `min_phrase_traces` traces together with the baseline (rarer phrases would only
            enlarge the Holm family without any power).
        phrase_baseline: The set phrases are compared with.
        min_phrase_traces: See `phrases`.
        n_boot: Bootstrap resamples per CI.
        seed: Base seed.
        meta: Labels stored in the table (e.g. `{"metric": "abs_delta", "unit": "phrase"}`).
        ci_method: Interval method of `analyses.stats.compare_paired`.

    Returns:
        The `ComparisonTable`.

    Raises:
        KeyError: If a pair names a set missing from `per_trace`.
    """
    all_pairs = list(pairs)
    for a, b in all_pairs:
        for name in (a, b):
            if name not in per_trace:
                raise KeyError(f"{name!r} is not in per_trace (keys: {sorted(per_trace)}).")
    if phrases:
        if phrase_baseline not in per_trace:
            raise KeyError(f"{phrase_baseline!r} is not in per_trace.")
        base = np.asarray(per_trace[phrase_baseline], float)
        for name in per_trace:
            if not name.startswith("phrase:"):
                continue
            vals = np.asarray(per_trace[name], float)
            if int(np.sum(~np.isnan(vals) & ~np.isnan(base))) >= min_phrase_traces:
                all_pairs.append((name, phrase_baseline))
    rows = compare_paired({k: np.asarray(v, float) for k, v in per_trace.items()}, all_pairs,
                          n_boot=n_boot, seed=seed, ci_method=ci_method) if all_pairs else []
    return ComparisonTable(rows=tuple(rows), meta=dict(meta or {}))


def _fmt(x: float) -> str:
    return "nan" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.4g}"


def _fmt_ci(x: float, ci: tuple[float, float]) -> str:
    return f"{_fmt(x)} [{_fmt(ci[0])}, {_fmt(ci[1])}]"


def _fmt_p(p: float) -> str:
    if p is None or math.isnan(p):
        return "nan"
    return f"{p:.2e}" if p < 1e-3 else f"{p:.4f}"


def format_comparison_table(table: ComparisonTable | Sequence[PairedComparison]) -> str:
    """Aligned text table of a `ComparisonTable`.

    Columns: comparison, n traces, median A [95% CI], median B [CI], median within-trace difference
    [CI], Cliff's δ, the sign-flip p, its Holm-adjusted p. A row below the floor shows its medians without
    CI or p, and a line under it with `n = k: too few traces for inference` and the raw values.

    Args:
        table: The table (or a list of `PairedComparison`).

    Returns:
        The table as text (header, rule, one line per comparison; the meta line first, if any).
    """
    rows = table.rows if isinstance(table, ComparisonTable) else tuple(table)
    header = ["comparison", "n", "median A [CI]", "median B [CI]", "median diff [CI]",
              "cliff δ", "p", "p_holm"]
    body = [_table_cells(r) for r in rows]
    widths = [max(len(line[c]) for line in [header, *body]) for c in range(len(header))]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    lines = []
    if isinstance(table, ComparisonTable) and table.meta:
        lines.append(", ".join(f"{k}={v}" for k, v in table.meta.items()))
    lines += [line(header), "  ".join("-" * w for w in widths)]
    for r, b in zip(rows, body):
        lines.append(line(b))
        if not r.testable:
            lines.append(f"    {r.note}: {raw_values_text(r.values_a, r.values_b)}")
    return "\n".join(lines)


def _table_cells(r: PairedComparison) -> list[str]:
    """One row of `format_comparison_table`; below the floor the medians only (no CI, no p)."""
    if not r.testable:
        return [f"{r.a} vs {r.b}", str(r.n_traces), _fmt(r.median_a), _fmt(r.median_b),
                _fmt(r.median_diff), "-", "-", "-"]
    return [f"{r.a} vs {r.b}", str(r.n_traces), _fmt_ci(r.median_a, r.ci_median_a),
            _fmt_ci(r.median_b, r.ci_median_b), _fmt_ci(r.median_diff, r.ci_median_diff),
            _fmt(r.cliffs_delta), _fmt_p(r.p), _fmt_p(r.p_holm)]

