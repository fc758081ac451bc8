"""The end-to-end demo on the built-in `tiny-reasoner` and its 200 sample traces.

`run_demo` loads the model, reads and tokenizes the sample traces, labels every token, runs the
model and returns a JSON-able summary; `format_summary` renders it as a short report. With an
output folder it also writes `summary.json` and an HDF5 cache `run.h5` of the traces (resid_post
and delta of every layer on the trajectory tokens, float16; see `probes.capture`).
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import numpy as np

from probes.answers import answer_scores, without_trajectory
from probes.capture import CacheConfig, cache_traces
from probes.categories import CATEGORY_CODES, categorize, count_categories, load_lexicon
from probes.compare_run import CompareConfig, compare_cache
from probes.lhat_run import LhatConfig, lhat_traces
from probes.models import load_model
from probes.traces import read_traces, tokenize_traces

SAMPLE_TRACES = Path(__file__).resolve().parent / "data" / "tiny_reasoner_traces.jsonl"


def run_demo(*, out: Path | None = None, limit: int | None = None, device: str = "auto") -> dict:
    """Run the pipeline and summarise it.

    Args:
        out: If given, a folder (created) that receives `summary.json` and the cache `run.h5`
            (replaced if present).
        limit: Use only the first `limit` sample traces.
        device: Where the model runs (`cpu`, `cuda`, `auto`).

    Returns:
        The summary: `n_traces`, `tokens_per_category`, `answer_accuracy` (fraction, full
        trajectory), `answer_accuracy_no_trajectory`, `mean_answer_nll`,
        `mean_answer_nll_no_trajectory`, per-phrase counts, model record and timing; with `out`
        also `cache` (path, bytes, n_traces, sites, seconds).
    """
    t0 = time.perf_counter()
    loaded = load_model("tiny-reasoner", device=device)
    traceset = read_traces(SAMPLE_TRACES)
    traces = traceset.traces[:limit] if limit is not None else traceset.traces
    tokenized, too_long = tokenize_traces(traces, loaded.tokenizer, max_tokens=loaded.arch.n_ctx)
    lexicon = load_lexicon()
    counts = count_categories(tokenized, lexicon)
    n_with_reflection = sum(
        bool((categorize(tt, lexicon).category == CATEGORY_CODES["reflection"]).any())
        for tt in tokenized
    )
    full = answer_scores(loaded, tokenized)
    bare = answer_scores(loaded, [without_trajectory(tt) for tt in tokenized])
    summary = {
        "model": loaded.spec,
        "architecture": loaded.arch.to_dict(),
        "traces_file": str(SAMPLE_TRACES),
        "n_traces": len(tokenized),
        "n_bad_lines": len(traceset.problems),
        "n_too_long": len(too_long),
        "n_traces_with_reflection": n_with_reflection,
        "tokens_per_category": counts["tokens_per_category"],
        "phrases": counts["phrases"],
        "answer_accuracy": float(np.mean([s.correct for s in full])),
        "answer_accuracy_no_trajectory": float(np.mean([s.correct for s in bare])),
        "mean_answer_nll": float(np.mean([s.nll for s in full])),
        "mean_answer_nll_no_trajectory": float(np.mean([s.nll for s in bare])),
    }
    with tempfile.TemporaryDirectory(prefix="probes-demo-") as scratch:
        folder = out if out is not None else Path(scratch)
        folder.mkdir(parents=True, exist_ok=True)
        summary.update(_cache_and_lhat(loaded, folder, limit=limit, keep=out is not None))
    summary["seconds"] = round(time.perf_counter() - t0, 2)
    if out is not None:
        (out / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    return summary


def _num(x, spec: str) -> str:
    """Format a number that may be missing (None/NaN when too few traces have the category)."""
    return "n/a" if x is None or x != x else format(x, spec)


def _verdict(row: dict) -> str:
    lo, hi = row["ci_median_diff"]
    if row["p_holm"] is None or lo is None or hi is None:
        return "not measurable (too few traces with reflections)"
    significant = row["p_holm"] < 0.05
    if significant and lo > 0:
        return "more"
    if significant and hi < 0:
        return "less"
    return "not distinguishably more or less"


def _cache_and_lhat(loaded, folder: Path, *, limit: int | None, keep: bool) -> dict:
    """Write the activation cache, add L̂ curves to it, compare categories, draw the plots."""
    from probes.compare_run import report_json

    cfg = CacheConfig(limit=limit)
    path = folder / "run.h5"
    run = cache_traces(loaded, SAMPLE_TRACES, path, cfg, overwrite=True, progress=False)
    lhat = lhat_traces(loaded, SAMPLE_TRACES, path, LhatConfig(limit=limit, check_naive=2),
                       progress=False)
    report = report_json(compare_cache(
        path, CompareConfig(n_boot=1000, plots=folder / "plots" if keep else None)
    ))
    trend = report["trend"]
    rows = {(r["a"], r["b"]): r for r in report["table"]["rows"]}
    refl = rows[("reflection", "ordinary")]
    part: dict = {
        "lhat": {
            "n_traces": lhat.n_written,
            "seconds": lhat.seconds,
            "naive_max_abs_diff": lhat.naive_max_abs_diff,
            "median_lhat_no_trajectory": lhat.lhat_first_median,
            "median_lhat_full_trajectory": lhat.lhat_last_median,
            "share_falling": trend["share_falling"],
            "median_change": trend["median_change"],
            "median_change_ci": trend["median_change_ci"],
            "wilcoxon_p": trend["wilcoxon_p"],
        },
        "reflection_vs_ordinary": {
            "metric": "mean |dL| per trace (a phrase counts as a whole)",
            "n_traces": refl["n_traces"],
            "median_reflection": refl["median_a"],
            "median_ordinary": refl["median_b"],
            "median_diff": refl["median_diff"],
            "median_diff_ci": refl["ci_median_diff"],
            "cliffs_delta": refl["cliffs_delta"],
            "p_holm": refl["p_holm"],
            "reflections_move_lhat": _verdict(refl),
        },
        "comparison_table": report["table"],
        "plots": report["plots"],
    }
    if keep:
        part["cache"] = {
            "path": str(path),
            "bytes": path.stat().st_size,  # activations and the L̂ arrays
            "n_traces": run.n_written,
            "sites": list(cfg.sites),
            "positions": cfg.positions,
            "dtype": cfg.dtype,
            "seconds": round(run.seconds_total, 2),
        }
    return part


def format_summary(s: dict) -> str:
    """A short human-readable report of a demo summary."""
    lines = [
        f"model: {s['model']} ({s['architecture']['family']}, {s['architecture']['n_layers']} layers, "
        f"d_model {s['architecture']['d_model']})",
        f"traces: {s['n_traces']} ({s['n_traces_with_reflection']} with a reflection; "
        f"{s['n_bad_lines']} bad lines, {s['n_too_long']} too long)",
        "tokens per category:",
    ]
    lines += [f"  {name:<11} {n:>7}" for name, n in s["tokens_per_category"].items()]
    top = sorted(s["phrases"].items(), key=lambda kv: -kv[1])[:8]
    lines.append("most frequent phrases: " + ", ".join(f"{p!r} {n}" for p, n in top if n))
    lines += [
        f"greedy answer accuracy: {s['answer_accuracy']:.3f} with the trajectory, "
        f"{s['answer_accuracy_no_trajectory']:.3f} without",
        f"mean answer NLL (nats/token): {s['mean_answer_nll']:.3g} with the trajectory, "
        f"{s['mean_answer_nll_no_trajectory']:.3g} without",
    ]
    if "cache" in s:
        c = s["cache"]
        lines.append(
            f"cache: {c['path']} ({c['bytes'] / 2**20:.1f} MiB; {c['n_traces']} traces, "
            f"{' + '.join(c['sites'])} of every layer on {c['positions']} tokens, {c['dtype']}; "
            f"inspect it with `python -m probes.run inspect {c['path']}`)"
        )
    lh, rv = s["lhat"], s["reflection_vs_ordinary"]
    lo, hi = lh["median_change_ci"]
    lines.append(
        f"L̂ (answer NLL after each trajectory prefix, {lh['n_traces']} traces): falls along the "
        f"trajectory in {_num(lh['share_falling'], '.0%')} of traces, median change "
        f"{_num(lh['median_change'], '.3g')} [95% CI {_num(lo, '.3g')}, {_num(hi, '.3g')}] nats "
        f"(Wilcoxon p {_num(lh['wilcoxon_p'], '.2g')}); fast = per-prefix re-run within "
        f"{_num(lh['naive_max_abs_diff'], '.1e')} nats"
    )
    lo, hi = rv["median_diff_ci"]
    lines.append(
        f"reflections vs ordinary tokens ({rv['metric']}, {rv['n_traces']} traces): "
        f"{_num(rv['median_reflection'], '.3g')} vs {_num(rv['median_ordinary'], '.3g')}, "
        f"difference {_num(rv['median_diff'], '.3g')} [95% CI {_num(lo, '.3g')}, {_num(hi, '.3g')}], "
        f"Cliff's delta {_num(rv['cliffs_delta'], '.2f')}, Holm p {_num(rv['p_holm'], '.2g')}: "
        + (rv["reflections_move_lhat"] if rv["reflections_move_lhat"].startswith("not measurable")
           else f"reflections move L̂ {rv['reflections_move_lhat']} than ordinary tokens")
    )
    if s["plots"]:
        lines.append(f"plots: {', '.join(s['plots'])}")
    lines.append("full table: `python -m probes.run compare <cache>`")
    lines.append(f"took {s['seconds']:.1f}s")
    return "\n".join(lines)
