"""`python -m probes.run compare run.h5`: category comparison of L̂ effects from the cache alone.

Reads every complete trace that has an L̂ curve (written by `lhat`), builds the per-token and
per-phrase effects with their controls (`analyses.lhat_effects`), aggregates per trace, compares
reflection / delimiter / ordinary tokens, the controls and each phrase across traces (bootstrap CIs,
Wilcoxon, Cliff's δ, Holm), tests whether L̂ falls along the trajectory, scores RePro magnitude and
stability per "\\n\\n" segment, and optionally draws the plots. No model is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from probes.errors import ProbesError

COMPARE_METRICS = ("abs_delta", "delta", "rho", "lam", "abs_lam")


@dataclass(frozen=True, kw_only=True)
class CompareConfig:
    """Settings of a `compare` run.

    Attributes:
        metric: Per-token quantity compared (|ΔL̂| by default; RaML's ρ is `rho`).
        unit: How a phrase counts: "phrase" (change across the whole phrase), "first_token", "token".
        statistic: Per-trace aggregate ("mean" or "median").
        raml_notebook: Reproduce RaML's notebook: its ten reflection words matched by their ids
            without a leading space up to `</think>`, and its window (one token past the word).
        n_boot: Bootstrap resamples.
        seed: Seed of the controls (position matching, label shuffling) and the bootstrap.
        plots: Folder for PNG plots, or None.
        versus: A second cache of the same traces (e.g. `lhat --no-thinking`): its curves are
            compared with this one's, paired by trace id (final L̂, area under the normalised
            curve, half-change time).
    """

    metric: str = "abs_delta"
    unit: str = "phrase"
    statistic: str = "mean"
    raml_notebook: bool = False
    n_boot: int = 2000
    seed: int = 0
    plots: Path | None = None
    versus: Path | None = None

    def __post_init__(self) -> None:
        if self.metric not in COMPARE_METRICS:
            raise ProbesError(f"--metric {self.metric!r} is not one of {list(COMPARE_METRICS)}")
        if self.unit not in ("phrase", "first_token", "token"):
            raise ProbesError(f"--unit {self.unit!r} is not one of ['phrase', 'first_token', 'token']")
        if self.statistic not in ("mean", "median"):
            raise ProbesError(f"--statistic {self.statistic!r} is not one of ['mean', 'median']")


def _phrase_names(reader) -> list[str] | None:
    """Phrase texts by id, if the cache's lexicon is the built-in one (fingerprints equal)."""
    from probes.categories import load_lexicon

    lexicon = load_lexicon()
    if reader.metadata.get("lexicon_fingerprint") == lexicon.fingerprint():
        return [p.phrase for p in lexicon.phrases]
    return None


def load_curves(path: Path) -> tuple[list[dict[str, Any]], Any]:
    """Per trace with `lhat`: the curve, labels and trajectory span, read from the cache."""
    from cache import open_cache

    rows = []
    with open_cache(path) as reader:
        names = _phrase_names(reader)
        for tr in reader:
            if "lhat" not in tr.names():
                continue
            missing = [k for k in ("phrase_id", "phrase_first", "paragraph_start") if k not in tr.names()]
            if missing:
                raise ProbesError(
                    f"trace {tr.id!r} in {path} has an L̂ curve but no {missing}; re-run "
                    "`python -m probes.run lhat` on it with this version"
                )
            rows.append({
                "id": tr.id,
                "lhat": np.asarray(tr["lhat"][:], np.float64),
                "category": np.asarray(tr.category),
                "phrase_id": np.asarray(tr["phrase_id"][:]),
                "is_first": np.asarray(tr["phrase_first"][:]).astype(bool),
                "paragraph_start": np.asarray(tr["paragraph_start"][:]).astype(bool),
                "traj_span": tuple(tr.spans["trajectory"]),
                "raml_occ": (np.asarray(tr["raml_notebook_occurrences"][:], np.int64)
                             if "raml_notebook_occurrences" in tr.names() else None),
            })
    if not rows:
        raise ProbesError(
            f"{path} has no trace with an L̂ curve; run `python -m probes.run lhat --model M "
            f"--traces F --out {path}` first"
        )
    return rows, names


def compare_cache(path: Path, cfg: CompareConfig) -> dict[str, Any]:
    """Run the comparison; returns a JSON-able report (`table`, `trend`, `repro`, `plots`)."""
    from analyses.lhat_effects import (
        RAML_NOTEBOOK_WORDS,
        Occurrence,
        category_comparison,
        format_comparison_table,
        lhat_trend,
        per_trace_aggregates,
        pooled_values,
        token_effects,
    )
    from analyses.repro import repro_scores

    rows, names = load_curves(path)
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
        )
        for r in rows
    ]
    per_trace = per_trace_aggregates(
        effects, cfg.metric, cfg.statistic, unit=cfg.unit, phrase_names=names
    )
    table = category_comparison(
        per_trace, n_boot=cfg.n_boot, seed=cfg.seed,
        meta={"metric": cfg.metric, "unit": cfg.unit, "statistic": cfg.statistic,
              "raml_notebook": cfg.raml_notebook, "n_traces": len(rows)},
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
        "cache": str(path),
        "n_traces": len(rows),
        "table": table.to_dict(),
        "table_text": format_comparison_table(table),
        "trend": trend,
        "repro": {
            "n_traces": len(repro),
            "median_final_score": float(np.median([x["final_score"] for x in repro])) if repro else None,
            "formula": "S = (1-w) S_magn + w S_stab, w = 0.5, S_magn = 1 - tanh(J/J_b) (reconstructed; "
                       "see MEASUREMENTS §5: the printed forms are unverified)",
        },
        "plots": [],
    }
    if cfg.versus is not None:
        report["versus"] = _versus(rows, cfg)
    if cfg.plots is not None:
        report["plots"] = _plots(cfg.plots, rows, effects, pooled_values(effects, cfg.metric, unit=cfg.unit),
                                 cfg.metric)
    return report


def _versus(rows, cfg: CompareConfig) -> dict[str, Any]:
    from analyses.lhat_effects import compare_curves

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


def _plots(folder: Path, rows, effects, pooled, metric) -> list[str]:
    from analyses.plots import plot_category_distributions, plot_lhat_curve

    folder.mkdir(parents=True, exist_ok=True)
    paths = [str(plot_category_distributions(pooled, folder / f"categories_{metric}.png", metric=metric))]
    # the curves of the first traces that contain a reflection, else the first traces
    order = sorted(range(len(rows)), key=lambda i: not any(o.category == 1 for o in effects[i].occurrences))
    for i in order[:3]:
        r = rows[i]
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in r["id"])
        paths.append(str(plot_lhat_curve(
            r["lhat"], effects[i].occurrences, folder / f"lhat_{safe}.png", title=f"L̂ along trace {r['id']}"
        )))
    return paths


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, float) and not np.isfinite(x):
        return None
    return x


def report_json(report: dict[str, Any]) -> dict[str, Any]:
    """The report with numpy values turned into plain JSON (NaN → null)."""
    out = {k: v for k, v in report.items() if k != "table_text"}
    return _jsonable(out)


def format_report(report: dict[str, Any]) -> str:
    """Human form: the table, the trend line and the RePro summary."""
    t = report["trend"]
    lines = [f"{report['n_traces']} traces from {report['cache']}", report["table_text"]]
    lines.append("L̂ along the trajectory: " + ", ".join(
        f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in t.items()
        if not isinstance(v, (list, tuple, dict, np.ndarray))
    ))
    rp = report["repro"]
    if rp["median_final_score"] is not None:
        lines.append(f"RePro final score (median over {rp['n_traces']} traces): "
                     f"{rp['median_final_score']:.3f}  [{rp['formula']}]")
    if "versus" in report:
        vs = report["versus"]
        lines.append(f"versus {vs['versus']} ({vs['n_pairs']} paired traces):")
        for name, m in vs["metrics"].items():
            lines.append(f"  {name:<10} median {m['median_a']:.3g} vs {m['median_b']:.3g}, "
                         f"diff {m['median_diff']:.3g}, Cliff's delta {m['cliffs_delta']:.2f}, "
                         f"p_holm {m['p_holm']:.2g}")
    for p in report["plots"]:
        lines.append(f"plot: {p}")
    return "\n".join(lines)
