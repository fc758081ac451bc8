"""`python -m probes.run compare-models A.h5 B.h5 [C.h5 ...]`: the same traces through several
checkpoints that share a tokenizer (e.g. along training: early SFT → SFT → RL), compared trace by
trace from their caches alone (no model).

Each cache holds one model's `lhat` arrays (and optionally its `upd_*` arrays from `updates`).
Traces are paired by id and must have the same tokens in every cache (else one `error:` line).
Per model and trace: the L̂ curve summary (start, final, drop, tokens to 90% of the drop, area under
the remaining-drop curve; `analyses.efficiency`), the stability measures (variance of ΔL̂, share of
non-monotone steps, oscillation energy after smoothing; `analyses.stability`,
docs/methods.md#stability), the mean |ΔL̂| per token category and the mean update magnitudes per
category (pooled over layers). Per model the medians with bootstrap CIs; between models (in the
given order, later − earlier) paired differences per trace with Wilcoxon signed-rank tests,
bootstrap CIs, Cliff's δ and Holm. The table's rows are flat records (`--json`: `rows`, one
`pandas.DataFrame(rows)` away); `--plots` draws the median curves and the stability measures.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np

from analyses.efficiency import efficiency_measures
from analyses.efficiency_plots import model_curves_figure
from analyses.stability import STABILITY, compare_models, model_summary, stability_measures
from probes import arrays
from probes.errors import ProbesError
from probes.jsonable import jsonable
from probes.readouts.configs import PAIRINGS
from probes.readouts.loader import load_traces, open_cache
from probes.safe_output import save_figure

NAME = "compare-models"


CATEGORIES = ("all", "reflection", "delimiter", "ordinary")
"""Token sets of the per-category |ΔL̂| and update magnitudes."""


DEFAULT_UPDATE_METRICS = ("upd_sigma_gate", "upd_loo", "upd_contrib")
"""Update magnitudes compared when every cache has them (M5 step size, M4 leave-one-out, M2)."""


CURVE_MEASURES = ("start", "final", "drop", "tokens_to_90", "auc_remaining")
"""L̂ curve summary per trace (`start` = L̂ with no trajectory)."""


def _load(path: Path, update_metrics: tuple[str, ...] | None) -> dict[str, Any]:
    """One cache: model label, tokenizer fingerprint, and per trace with `lhat` its tokens,
    trajectory span, trajectory categories, curve and update arrays."""

    wanted = update_metrics if update_metrics is not None else DEFAULT_UPDATE_METRICS
    with open_cache(path) as reader:
        codes = reader.category_codes
        meta = {"model": str(reader.metadata.get("model", path.stem)),
                "tokenizer": str(reader.metadata.get("tokenizer_fingerprint", ""))}
        loaded = load_traces(reader, ["lhat"], optional=wanted)
    traces: dict[str, dict[str, Any]] = {}
    for tr in loaded:
        a, b = tr.trajectory
        lhat = np.asarray(tr["lhat"], np.float64)
        if lhat.size != b - a + 1:
            raise ProbesError(f"{path}: trace {tr.id!r} has {lhat.size} L̂ values for a "
                              f"{b - a}-token trajectory; re-run `lhat` on it")
        traces[tr.id] = {
            "tokens": tr.tokens, "span": (a, b), "category": tr.category[a:b], "lhat": lhat,
            "upd": {m: np.asarray(tr[m], np.float64) for m in wanted if m in tr.arrays},
        }
    return {"path": path, **meta, "codes": codes, "traces": traces}


def _paired_ids(caches: list[dict[str, Any]]) -> list[str]:
    """The ids every cache has, in the first cache's order; refuses differing tokens."""
    first = caches[0]
    ids = [i for i in first["traces"] if all(i in c["traces"] for c in caches[1:])]
    for i in ids:
        ref = first["traces"][i]
        for c in caches[1:]:
            other = c["traces"][i]
            if not np.array_equal(ref["tokens"], other["tokens"]):
                n = min(ref["tokens"].size, other["tokens"].size)
                diff = np.flatnonzero(ref["tokens"][:n] != other["tokens"][:n])
                at = int(diff[0]) if diff.size else n
                raise ProbesError(
                    f"trace {i!r}: its tokens differ between {first['path']} and {c['path']} (first "
                    f"at token {at}); compare-models needs the same traces tokenized by one shared "
                    "tokenizer: make every cache from the same JSONL with models that share it")
            if ref["span"] != other["span"]:
                raise ProbesError(
                    f"trace {i!r}: its trajectory span differs between {first['path']} and "
                    f"{c['path']} ({ref['span']} vs {other['span']}); make the caches with the same "
                    "prompt format and scaffold")
    if len(ids) < 2:
        raise ProbesError(
            f"the caches share {len(ids)} trace(s) with an L̂ curve; compare-models needs at least 2: "
            "run `lhat` with every model on the same --traces file")
    return ids


def _names(caches: list[dict[str, Any]], names: list[str] | None) -> list[str]:
    if names is not None:
        if len(names) != len(caches) or len(set(names)) != len(names):
            raise ProbesError(f"--names needs {len(caches)} different names, one per cache, got "
                              f"{names}")
        return names
    out = [c["model"] for c in caches]
    if len(set(out)) < len(out):
        out = [c["path"].stem for c in caches]
    if len(set(out)) < len(out):
        out = [f"{c['path'].stem}#{k}" for k, c in enumerate(caches)]
    return out


def _per_trace(cache: dict[str, Any], ids: list[str], window: int,
               update_metrics: list[str]) -> tuple[dict[tuple[str, str], np.ndarray], list[np.ndarray]]:
    """(measure, category) → per-trace values, and the curves, of one model."""

    cols: dict[tuple[str, str], list[float]] = {}
    curves = []
    codes = cache["codes"]
    signed = {a.name for a in arrays.REGISTRY if a.by_magnitude}

    def put(key: tuple[str, str], v: float) -> None:
        cols.setdefault(key, []).append(v)

    for i in ids:
        t = cache["traces"][i]
        y = t["lhat"]
        curves.append(y)
        eff = efficiency_measures(y)
        put(("start", "all"), float(y[0]))
        for m in CURVE_MEASURES[1:]:
            put((m, "all"), eff[m])
        stab = stability_measures(y, window=window)
        for m in STABILITY:
            put((m, "all"), stab[m])
        masks = {c: (np.ones(t["category"].size, bool) if c == "all" else t["category"] == codes[c])
                 for c in CATEGORIES}
        absd = np.abs(np.diff(y))
        for c, mask in masks.items():
            put(("abs_dlhat", c), float(absd[mask].mean()) if mask.any() else float("nan"))
        for m in update_metrics:
            x = t["upd"][m]
            x = np.abs(x) if m in signed else x
            with warnings.catch_warnings():  # an all-NaN column (e.g. upd_cos_gate at i = 0)
                warnings.simplefilter("ignore", RuntimeWarning)
                per_token = np.nanmean(x, axis=0)  # pooled over layers
            for c, mask in masks.items():
                vals = per_token[mask]
                vals = vals[~np.isnan(vals)]
                put((m, c), float(vals.mean()) if vals.size else float("nan"))
    return {k: np.asarray(v, np.float64) for k, v in cols.items()}, curves


def model_pairs(names: list[str], how: str) -> list[tuple[str, str]]:
    """(later, earlier) pairs: consecutive, each against the first, or all."""
    if how == "consecutive":
        return [(names[k + 1], names[k]) for k in range(len(names) - 1)]
    if how == "first":
        return [(n, names[0]) for n in names[1:]]
    return [(names[j], names[k]) for k in range(len(names)) for j in range(k + 1, len(names))]


def compare_models_report(paths: list[Path], *, names: list[str] | None = None, pairs: str = "consecutive",
                          window: int = 9, update_metrics: list[str] | None = None, n_boot: int = 2000,
                          seed: int = 0, plots: Path | None = None) -> dict[str, Any]:
    """The comparison (JSON-able except NaN; see `report_json`).

    Args:
        paths: Two or more caches of the same traces, one per model, in training order.
        names: Model names (default: the caches' model labels, else their file names).
        pairs: One of `PAIRINGS`.
        window: Smoothing window (tokens) of the oscillation energy.
        update_metrics: `upd_*` arrays compared (default: `DEFAULT_UPDATE_METRICS` that every
            cache has); each must be in every cache.
        n_boot: Bootstrap resamples.
        seed: Seed.
        plots: Folder for the PNG, or None.

    Returns:
        `caches`, `models`, `n_traces` (paired), `n_unpaired` (per model: traces left out),
        `same_tokenizer_fingerprint`, `update_metrics`, `window`, `pairs`, `rows` (flat records:
        `kind` "model" rows from `analyses.stability.model_summary`, `kind` "paired" rows from
        `analyses.stability.compare_models`), `plots`.

    Raises:
        ProbesError: Fewer than two caches, a pairing or window out of range, too few shared traces,
            different tokens, or an update metric missing from a cache.
    """

    if len(paths) < 2:
        raise ProbesError(f"compare-models needs two or more caches, got {len(paths)}")
    if pairs not in PAIRINGS:
        raise ProbesError(f"--pairs {pairs!r} is not one of {list(PAIRINGS)}")
    if window < 1:
        raise ProbesError(f"--window {window} must be >= 1 token")
    explicit = tuple(update_metrics) if update_metrics else None
    if explicit:
        unknown = [m for m in explicit if m not in arrays.BY_NAME or not m.startswith("upd_")]
        if unknown:
            raise ProbesError(f"--update-metrics {unknown}: not update arrays; choose from "
                              f"{list(arrays.names(arrays.UPDATES))}")
    caches = [_load(Path(p), explicit) for p in paths]
    model_names = _names(caches, names)
    ids = _paired_ids(caches)
    have = [set.intersection(*(set(c["traces"][i]["upd"]) for i in ids)) for c in caches]
    if explicit:
        for c, h in zip(caches, have, strict=True):
            missing = [m for m in explicit if m not in h]
            if missing:
                raise ProbesError(f"{c['path']} lacks {missing} on some paired traces; run "
                                  f"`python -m probes.run updates ... --out {c['path']} --resume` first")
        metrics = list(explicit)
    else:
        common = set.intersection(*have)
        metrics = [m for m in DEFAULT_UPDATE_METRICS if m in common]
    per_model, curves = {}, {}
    for name, c in zip(model_names, caches, strict=True):
        per_model[name], curves[name] = _per_trace(c, ids, window, metrics)
    summary = model_summary(per_model, n_boot=n_boot, seed=seed)
    paired = compare_models(per_model, model_pairs(model_names, pairs), n_boot=n_boot, seed=seed)
    report: dict[str, Any] = {
        "caches": [str(p) for p in paths], "models": model_names, "n_traces": len(ids),
        "n_unpaired": {n: len(c["traces"]) - len(ids) for n, c in zip(model_names, caches, strict=True)},
        "same_tokenizer_fingerprint": len({c["tokenizer"] for c in caches}) == 1,
        "update_metrics": metrics, "window": window, "pairs": pairs,
        "rows": summary + paired, "plots": [],
    }
    if plots is not None:
        stab: dict[str, dict[str, Any]] = {r["model"]: {} for r in summary}
        for r in summary:
            if r["category"] == "all" and r["measure"] in ("var_delta", "frac_nonmonotone", "osc_energy"):
                stab[r["model"]][r["measure"]] = (r["median"], r["ci_low"], r["ci_high"])
        report["plots"].append(str(save_figure(model_curves_figure(curves, stab),
                                               plots / "compare_models.png")))
    return report


def report_json(report: dict[str, Any]) -> dict[str, Any]:
    """The report as plain JSON (NaN → null)."""
    return jsonable(report)
