"""`python -m probes.run compare run.h5`: category comparisons from the cache alone (no model).

L̂ part (traces with an L̂ curve from `lhat`): per-token and per-phrase effects with their controls
(`analyses.lhat_effects`), aggregated per trace; reflection / delimiter / ordinary tokens, the
controls and each phrase compared across traces (bootstrap CIs, Wilcoxon, Cliff's δ, Holm); whether
L̂ falls along the trajectory; RePro magnitude and stability per "\\n\\n" segment.

Update part (traces with `upd_*` arrays from `updates`): the same statistics per layer and pooled
for every stored implicit-update metric (`analyses.update_effects`, one Holm family over metrics ×
layers × pairs), with the shuffled-label null and, given `--control` (a cache from `updates
--control random-init`), the same comparisons on a random-init model, flagging effects it
reproduces.

Both parts present: ΔL̂_t regressed on the per-token mechanistic features with category indicators
(`analyses.behaviour_fit`, GroupKFold by trace, partial R² of the categories). Optional PNG plots.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from analyses.curves import compare_curves, lhat_trend
from analyses.lhat_effects import (
    DEFAULT_PAIRS,
    MATCHED_PAIRS,
    category_comparison,
    format_comparison_table,
    per_trace_aggregates,
    pooled_values,
    token_effects,
)
from analyses.plots import category_distributions_figure, lhat_curve_figure
from analyses.repro import repro_scores
from analyses.token_sets import RAML_NOTEBOOK_WORDS, Occurrence
from probes.errors import ProbesError
from probes.jsonable import jsonable
from probes.pipeline.outputs import plot_file_name
from probes.readouts.compare_updates import _fit_part, _update_plots, _updates_part, folder_saver
from probes.readouts.configs import LAYER_VIEWS as LAYER_VIEWS
from probes.readouts.configs import UPDATE_UNITS as UPDATE_UNITS
from probes.readouts.configs import (
    CompareConfig,
    PlotSave,
)
from probes.readouts.loader import load_traces, open_cache
from probes.readouts.matched import matching_summary, trajectory_log_frequency
from probes.traces.categories import load_lexicon

NAME = "compare"






def _phrase_names(reader) -> list[str] | None:
    """Phrase texts by id, if the cache's lexicon is the built-in one (fingerprints equal)."""

    lexicon = load_lexicon()
    if reader.metadata.get("lexicon_fingerprint") == lexicon.fingerprint():
        return [p.phrase for p in lexicon.phrases]
    return None


_LABELS = ("phrase_id", "phrase_first", "paragraph_start")
"""The token labels every L̂ trace must carry (written with the curve)."""


def load_curves(path: Path) -> tuple[list[dict[str, Any]], Any]:
    """Per trace with `lhat`: the curve, labels and trajectory span, read from the cache."""

    rows = []
    with open_cache(path) as reader:
        names = _phrase_names(reader)
        traces = load_traces(reader, ["lhat"], optional=(*_LABELS, "raml_notebook_occurrences"))
    for tr in traces:
        missing = [k for k in _LABELS if k not in tr.arrays]
        if missing:
            raise ProbesError(
                f"trace {tr.id!r} in {path} has an L̂ curve but no {missing}; re-run "
                "`python -m probes.run lhat` on it with this version"
            )
        occ = tr.arrays.get("raml_notebook_occurrences")
        rows.append({
            "id": tr.id,
            "lhat": np.asarray(tr["lhat"], np.float64),
            "category": tr.category,
            "phrase_id": tr["phrase_id"],
            "is_first": tr["phrase_first"].astype(bool),
            "paragraph_start": tr["paragraph_start"].astype(bool),
            "traj_span": tr.trajectory,
            "raml_occ": None if occ is None else np.asarray(occ, np.int64),
        })
    if not rows:
        raise ProbesError(
            f"{path} has no trace with an L̂ curve; run `python -m probes.run lhat --model M "
            f"--traces F --out {path}` first"
        )
    return rows, names


def _cache_parts(path: Path) -> dict[str, int]:
    """How many complete traces have an L̂ curve / update arrays."""

    traces = load_traces(path, [])
    return {"lhat": sum("lhat" in tr.stored for tr in traces),
            "updates": sum("upd_contrib" in tr.stored for tr in traces)}


def compare_cache(path: Path, cfg: CompareConfig) -> dict[str, Any]:
    """Run the comparison; returns a JSON-able report.

    With L̂ curves (from `lhat`): `table`, `table_text`, `trend`, `repro` (and `versus`). With
    update arrays (from `updates`): `updates` (per layer and pooled, with the random-init control
    when `cfg.control` is given). With both: `fit` (ΔL̂ explained by the mechanistic features).
    Always `cache`, `n_traces`, `plots`.

    Raises:
        ProbesError: A cache with neither, or a control that does not match.
    """
    parts = _cache_parts(path)
    if not parts["lhat"] and not parts["updates"]:
        raise ProbesError(
            f"{path} has no trace with an L̂ curve or update arrays; run `python -m probes.run lhat "
            f"--model M --traces F --out {path}` and/or `python -m probes.run updates ...` first"
        )
    if cfg.versus is not None and not parts["lhat"]:
        raise ProbesError(f"--versus compares L̂ curves, but {path} has none; run `lhat` first")
    report: dict[str, Any] = {"cache": str(path), "n_traces": max(parts.values()), "plots": []}
    if parts["lhat"]:
        report.update(_lhat_part(path, cfg))
    if parts["updates"]:
        upd, rows, sets = _updates_part(path, cfg)
        report["updates"] = upd
        if cfg.fit and parts["lhat"]:
            report["fit"] = _fit_part(rows, sets, upd, cfg)
        save = _saver(cfg)
        if save is not None:
            report["plots"] += _update_plots(save, rows, sets, upd)
    elif cfg.control is not None:
        raise ProbesError(f"--control compares update arrays, but {path} has none; run `updates` first")
    return report


def _lhat_part(path: Path, cfg: CompareConfig) -> dict[str, Any]:
    """The L̂ comparison (`table`, `table_text`, `trend`, `repro`, `plots`, `versus`)."""

    rows, names = load_curves(path)
    log_freq = trajectory_log_frequency(path) if cfg.matched else {}
    rng = np.random.default_rng(cfg.seed)
    if cfg.raml_notebook:
        # the notebook's own matching (no-space word ids, up to </think>) and its window
        if any(r["raml_occ"] is None for r in rows):
            raise ProbesError(
                f"{path} has no RaML-notebook matches; re-run `python -m probes.run lhat` with "
                "this version to store them"
            )
        names = list(RAML_NOTEBOOK_WORDS)
    effects = [
        token_effects(
            r["lhat"], r["category"], r["phrase_id"], r["is_first"], traj_span=r["traj_span"],
            occurrences=(
                [Occurrence(int(a), int(b), 1, int(w)) for a, b, w in r["raml_occ"]]
                if cfg.raml_notebook else None
            ),
            raml_notebook=cfg.raml_notebook, paragraph_start=r["paragraph_start"], rng=rng,
            log_freq=log_freq.get(r["id"]), matched=cfg.matched,
        )
        for r in rows
    ]
    every_sets = [fx.sets for fx in effects if fx.sets is not None]  # token_effects sets them all
    matching = matching_summary(every_sets, [log_freq.get(r["id"]) for r in rows],
                                [r["paragraph_start"] for r in rows], matched=cfg.matched)
    per_trace = per_trace_aggregates(
        effects, cfg.metric, cfg.statistic, unit=cfg.unit, phrase_names=names
    )
    table = category_comparison(
        per_trace, pairs=MATCHED_PAIRS if cfg.matched else DEFAULT_PAIRS, n_boot=cfg.n_boot,
        seed=cfg.seed,
        meta={"metric": cfg.metric, "unit": cfg.unit, "statistic": cfg.statistic,
              "raml_notebook": cfg.raml_notebook, "n_traces": len(rows),
              "matched": cfg.matched},
    )
    trend = lhat_trend([r["lhat"] for r in rows])
    repro = []
    for r in rows:
        T = len(r["lhat"]) - 1
        if T == 0:
            continue
        # segments split on "\n\n": each paragraph start ends the previous segment
        ends = sorted({int(i) for i in np.flatnonzero(r["paragraph_start"]) if i > 0} | {T})
        sc = repro_scores(r["lhat"], ends)
        repro.append({"id": r["id"], "n_segments": len(sc.segment_ends),
                      "final_score": float(sc.score[-1]), "mean_reward": float(np.mean(sc.reward))})
    report: dict[str, Any] = {
        "n_traces": len(rows),
        "table": table.to_dict(),
        "table_text": format_comparison_table(table),
        "matching": matching,
        "trend": trend,
        "repro": {
            "n_traces": len(repro),
            "median_final_score": float(np.median([x["final_score"] for x in repro])) if repro else None,
            "formula": "S = (1-w) S_magn + w S_stab, w = 0.5, S_magn = 1 - tanh(J/J_b) (reconstructed; "
                       "see docs/methods.md#not-yet: the printed forms are unverified)",
        },
        "plots": [],
    }
    if cfg.versus is not None:
        report["versus"] = _versus(rows, cfg)
    save = _saver(cfg)
    if save is not None:
        report["plots"] = _plots(save, rows, effects,
                                 pooled_values(effects, cfg.metric, unit=cfg.unit), cfg.metric)
    return report


def _versus(rows, cfg: CompareConfig) -> dict[str, Any]:
    assert cfg.versus is not None, "called with --versus only"
    other, _ = load_curves(cfg.versus)
    by_id = {r["id"]: r["lhat"] for r in other}
    common = [r for r in rows if r["id"] in by_id]
    if len(common) < 2:
        raise ProbesError(
            f"{cfg.versus} shares {len(common)} trace ids with the compared cache; --versus needs "
            "the L̂ curves of the same traces (e.g. `lhat --no-thinking` on the same file)"
        )
    result = compare_curves([r["lhat"] for r in common], [by_id[r["id"]] for r in common],
                            names=("this", "versus"), n_boot=cfg.n_boot, seed=cfg.seed)
    return {"versus": str(cfg.versus), "n_pairs": len(common),
            "metrics": {k: v.to_dict() for k, v in result.items()}}


def _saver(cfg: CompareConfig) -> PlotSave | None:
    """Where `cfg`'s plots go (None: no plots)."""
    if cfg.plot_save is not None:
        return cfg.plot_save
    return folder_saver(cfg.plots) if cfg.plots is not None else None


def _plots(save: PlotSave, rows, effects, pooled, metric) -> list[str]:
    paths = [save(category_distributions_figure(pooled, metric), f"categories_{metric}.png")]
    # the curves of the first traces that contain a reflection, else the first traces
    order = sorted(range(len(rows)), key=lambda i: not any(o.category == 1 for o in effects[i].occurrences))
    for i in order[:3]:
        r = rows[i]
        fig = lhat_curve_figure(r["lhat"], effects[i].occurrences, title=f"L̂ along trace {r['id']}")
        paths.append(save(fig, plot_file_name("lhat", r["id"])))
    return paths


def report_json(report: dict[str, Any]) -> dict[str, Any]:
    """The report with numpy values turned into plain JSON (NaN → null)."""
    out = {k: v for k, v in report.items() if k != "table_text"}
    if "updates" in out:
        out["updates"] = {k: v for k, v in out["updates"].items() if k not in ("_cmp", "table_text")}
    if "fit" in out:
        out["fit"] = {k: v for k, v in out["fit"].items() if k != "text"}
    return jsonable(out)


def _trend_line(t: dict[str, Any]) -> str:
    """"L̂ falls ..." with its n and noise floor; no CI or p below the floor on inference."""
    head = (f"L̂ along the trajectory (n = {t['n_traces']} traces): falls beyond its noise floor "
            f"(≥ {t['tolerance']:.3g} nats and {t['relative_tolerance']:.0%} of L̂_0) in "
            f"{t['share_falling']:.0%} of traces ({t['share_falling_raw']:.0%} with any drop), "
            f"median change {t['median_change']:.3g} nats")
    if t.get("note"):
        return f"{head}; {t['note']}: changes {[round(x, 4) for x in t['per_trace']['change']]}"
    lo, hi = t["share_falling_ci"]
    clo, chi = t["median_change_ci"]
    return (f"{head} [95% CI {clo:.3g}, {chi:.3g}], share falling CI [{lo:.0%}, {hi:.0%}], "
            f"Wilcoxon p {t['wilcoxon_p']:.2g}, median Spearman {t['median_spearman']:.3g}")
