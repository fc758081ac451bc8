"""The end-to-end demo on the built-in `tiny-reasoner` and its 200 sample traces.

`run_demo` loads the model, reads and tokenizes the sample traces, labels every token, runs the
model and returns a JSON-able summary; `format_summary` renders it as a short report. With an
output folder it also writes `summary.json`, an HDF5 cache `run.h5` of the traces (resid_post
and delta of every layer on the trajectory tokens, float16; see `probes.commands.cache`) to which the L̂
curves (`lhat`) and the per-token implicit updates (`updates`) are added, the random-init
control's updates in `random_init.h5`, and PNG plots in `plots/`. The report compares reflection,
delimiter and ordinary tokens on L̂ and on every update metric (per layer and pooled, with the
shuffled-label and random-init controls) and fits ΔL̂ on the mechanistic features.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import numpy as np

from cache import remove_cache, store_bytes
from probes.demo import SAMPLE_TRACES
from probes.demo.anchors import anchors_demo, format_anchors_demo
from probes.demo.effects import demo_section as effects_demo
from probes.demo.effects import format_demo_line as format_effects_demo
from probes.demo.generation import DEMO_QUESTIONS, format_generation_demo, generation_demo
from probes.measures.answers import answer_scores, without_trajectory
from probes.models.load import load_model
from probes.pipeline.capture import CacheConfig, cache_traces
from probes.pipeline.landscape import demo_section as landscape_demo
from probes.pipeline.landscape import format_demo_line as format_landscape_demo
from probes.pipeline.lhat import LhatConfig, lhat_traces
from probes.pipeline.updates import UpdatesConfig, updates_traces
from probes.readouts.calibration import mde_text
from probes.readouts.compare import compare_cache, report_json
from probes.readouts.configs import CompareConfig
from probes.readouts.efficiency import demo_section as efficiency_demo
from probes.readouts.efficiency import format_demo_line as format_efficiency_demo
from probes.readouts.text import num as _num
from probes.safe_output import write_text
from probes.traces.categories import CATEGORY_CODES, categorize, count_categories, load_lexicon
from probes.traces.read import read_traces
from probes.traces.tokenize import tokenize_traces

NAME = "demo"




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
        summary["own_samples"] = generation_demo(
            loaded, folder / "generation",
            n_questions=DEMO_QUESTIONS if limit is None else min(limit, DEMO_QUESTIONS))
        # Later commands' demo sections: each adds one key to `summary` here.
        summary["anchors"] = anchors_demo(loaded, folder, limit=limit, keep=out is not None)
        summary["landscape"] = landscape_demo(loaded, folder, keep=out is not None)
        summary["effects"] = effects_demo(loaded, folder, limit=limit)
        summary["efficiency"] = efficiency_demo(loaded, folder, keep=out is not None, limit=limit)
        if out is None:
            summary["own_samples"].pop("files")  # they were in the scratch folder
    summary["seconds"] = round(time.perf_counter() - t0, 2)
    if out is not None:
        write_text(out / "summary.json", json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    return summary


def _headline_lines(lh: dict, rv: dict, table: dict | None = None,
                    updates: dict | None = None) -> list[str]:
    """The L̂, reflection and update headline lines. Each finding states n, its matched baseline,
    its random-init baseline, the calibrated p-value (sign-flip permutation,
    `analyses.inference.signflip_p`; Holm over its table) and the MDE at 80% power at its n (from
    the stored power grid, `probes.readouts.calibration.mde_text`); below the floor on inference
    (`analyses.inference.MIN_TRACES`) it is "not testable at this n" with no CI or p."""

    if lh["wilcoxon_p"] is None:
        stats = (f"median change {_num(lh['median_change'], '.3g')} nats; n = {lh['n_traces']}: too "
                 "few traces for inference")
    else:
        lo, hi = lh["median_change_ci"]
        stats = (f"median change {_num(lh['median_change'], '.3g')} [95% CI {_num(lo, '.3g')}, "
                 f"{_num(hi, '.3g')}] nats (Wilcoxon p {_num(lh['wilcoxon_p'], '.2g')})")
    lines = [
        f"L̂ (answer NLL after each trajectory prefix, n = {lh['n_traces']} traces): falls beyond "
        f"its noise floor in {_num(lh['share_falling'], '.0%')} of traces, {stats}; fast = "
        f"per-prefix re-run within {_num(lh['naive_max_abs_diff'], '.1e')} nats"
    ]
    row: dict = next((r for r in (table or {}).get("rows", [])
                if (r["a"], r["b"]) == ("reflection", "matched_to_reflection")), {})
    head = (f"reflections vs matched ordinary tokens ({rv['metric']}, n = {rv['n_traces']} traces): "
            f"{_num(rv['median_reflection'], '.3g')} vs {_num(rv['median_ordinary'], '.3g')} "
            f"(matched baseline), difference {_num(rv['median_diff'], '.3g')}")
    verdict = rv["reflections_move_lhat"]
    if verdict.startswith(("not testable", "not measurable")):
        lines.append(f"{head}: {verdict}")
    else:
        lo, hi = rv["median_diff_ci"]
        lines.append(f"{head} [95% CI {_num(lo, '.3g')}, {_num(hi, '.3g')}], Cliff's delta "
                     f"{_num(rv['cliffs_delta'], '.2f')}, p {_num(row.get('p'), '.2g')} "
                     f"(sign-flip permutation; Holm {_num(rv['p_holm'], '.2g')}): reflections move "
                     f"L̂ {verdict} than ordinary tokens; random-init baseline: not measured for L̂; "
                     f"{mde_text(int(lh['n_traces']))}")
    upd = next((h for h in (updates or {}).get("headline", [])
                if (h["metric"], h["a"], h["b"]) == ("upd_sigma_gate", "reflection",
                                                     "matched_to_reflection")), None)
    if upd is not None:
        head = (f"upd_sigma_gate at reflections vs matched ordinary tokens (pooled layers, n = "
                f"{upd['n_traces']} traces): {_num(upd['median_a'], '.3g')} vs "
                f"{_num(upd['median_b'], '.3g')} (matched baseline)")
        if upd["effect"] == "not testable":
            lines.append(f"{head}: not testable at this n (n = {upd['n_traces']}: too few traces "
                         "for inference)")
        else:
            lo, hi = upd["ci_median_diff"]
            ctrl = upd.get("control_effect")
            base = ("not measured" if ctrl is None else
                    f"random-init model {ctrl}" + (" (reproduced)" if upd.get(
                        "reproduced_by_random_init") else ""))
            lines.append(f"{head}, difference {_num(upd['median_diff'], '.3g')} [95% CI "
                         f"{_num(lo, '.3g')}, {_num(hi, '.3g')}], Holm p "
                         f"{_num(upd['p_holm'], '.2g')} (sign-flip permutation): {upd['effect']}; "
                         f"random-init baseline: {base}; {mde_text(int((updates or {})['n_traces']))}")
    return lines


def _verdict(row: dict) -> str:
    lo, hi = row["ci_median_diff"]
    if row.get("testable") is False:
        return f"not testable at this n ({row['note']})"
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

    cfg = CacheConfig(limit=limit)
    path = folder / "run.h5"
    control = folder / "random_init.h5"
    remove_cache(control)
    run = cache_traces(loaded, SAMPLE_TRACES, path, cfg, overwrite=True, progress=False)
    lhat = lhat_traces(loaded, SAMPLE_TRACES, path, LhatConfig(limit=limit, check_naive=2),
                       resume=True, progress=False)
    upd = updates_traces(loaded, SAMPLE_TRACES, path, UpdatesConfig(limit=limit), resume=True,
                         progress=False)
    upd_ctrl = updates_traces(loaded, SAMPLE_TRACES, control,
                              UpdatesConfig(limit=limit, control="random-init"), progress=False)
    report = report_json(compare_cache(
        path, CompareConfig(n_boot=1000, plots=folder / "plots" if keep else None, control=control)
    ))
    if keep:  # the HTML report (probes.readouts.report.build.report_demo) reuses these numbers and plots
        write_text(folder / "compare.json", json.dumps(report, ensure_ascii=False) + "\n")
    trend = report["trend"]
    rows = {(r["a"], r["b"]): r for r in report["table"]["rows"]}
    refl = rows[("reflection", "matched_to_reflection")]  # compare's default: confound-matched
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
            "metric": "mean |dL| per trace (a phrase counts as a whole), against ordinary windows "
                      "matched on position, frequency and paragraph status",
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
        "implicit_updates": _updates_summary(report, upd.seconds, upd_ctrl.seconds,
                                             control if keep else None),
        "plots": report["plots"],
    }
    if keep:
        part["cache"] = {
            "path": str(path),
            "bytes": store_bytes(path),  # activations and the L̂ arrays
            "n_traces": run.n_written,
            "sites": list(cfg.sites),
            "positions": cfg.positions,
            "dtype": cfg.dtype,
            "seconds": round(run.seconds, 2),
        }
    return part


HEADLINE_METRICS = ("upd_sigma_gate", "upd_loo", "upd_contrib", "upd_mass", "upd_m7",
                    "upd_align_cos")
"""Update metrics whose pooled rows the demo reports."""


HEADLINE_PAIRS = (("reflection", "matched_to_reflection"), ("reflection", "position_matched"),
                  ("delimiter", "matched_to_delimiter"))
"""The comparisons the demo reports (against the confound-matched ordinary windows, the default of
`compare`; position-matched ordinary tokens: the older control for position alone)."""


def _updates_summary(report: dict, seconds: float, seconds_control: float,
                     control: Path | None) -> dict:
    """The demo's view of the update comparison: headline pooled rows, per-layer counts, fit."""
    upd = report["updates"]
    rows = upd["comparison"]["rows"]
    headline = []
    for r in rows:
        if (r["metric"] in HEADLINE_METRICS and r["layer"] == "pooled"
                and (r["a"], r["b"]) in HEADLINE_PAIRS):
            headline.append({k: r[k] for k in (
                "metric", "a", "b", "n_traces", "median_a", "median_b", "median_diff",
                "ci_median_diff", "cliffs_delta", "p_holm", "effect", "control_effect",
                "reproduced_by_random_init")})
    sig = [r for r in rows if r["effect"] in ("more", "less")]
    null = [r for r in rows if (r["a"], r["b"]) == ("shuffled_reflection", "shuffled_ordinary")]
    out = {
        "n_traces": upd["n_traces"],
        "n_layers": upd["n_layers"],
        "metrics": upd["metrics"],
        "seconds": seconds,
        "seconds_random_init": seconds_control,
        "n_tests": len(rows),
        "n_significant": len(sig),
        "n_significant_reproduced_by_random_init": sum(bool(r["reproduced_by_random_init"])
                                                       for r in sig),
        "n_shuffled_null_significant": sum(r["effect"] in ("more", "less") for r in null),
        "n_shuffled_null_tests": len(null),
        "headline": headline,
        "compared_as_magnitude": upd["comparison"]["meta"]["signed_as_magnitude"],
    }
    if control is not None:
        out["control_cache"] = str(control)
    fit = report.get("fit", {}).get("fits", {})
    if fit:
        out["fit"] = {t: {"r2_full": f["r2"]["full"], "r2_full_ci": f["ci"]["full"],
                          "r2_mechanism": f["r2"]["controls+mechanism"],
                          "r2_mechanism_random_init": f["r2"].get("controls+mechanism_random"),
                          "partial_r2_categories": f["partial_r2"]["categories"],
                          "partial_r2_categories_ci": f["ci"]["categories"],
                          "partial_r2_mechanism": f["partial_r2"]["mechanism"],
                          "partial_r2_mechanism_ci": f["ci"]["mechanism"]}
                      for t, f in fit.items()}
    return out


def _format_updates(u: dict) -> list[str]:
    lines = [
        f"per-token implicit updates ({u['n_traces']} traces x {u['n_layers']} layers, "
        f"{len(u['metrics'])} metrics, {u['seconds']:.1f}s; random-init control "
        f"{u['seconds_random_init']:.1f}s): {u['n_significant']} of {u['n_tests']} comparisons "
        f"significant after Holm, {u['n_significant_reproduced_by_random_init']} of them "
        f"reproduced by the random-init model; shuffled-label null significant in "
        f"{u['n_shuffled_null_significant']} of {u['n_shuffled_null_tests']}",
        "  pooled over layers (per-trace mean over tokens; median over traces; diff [95% CI]):",
    ]
    for h in u["headline"]:
        lo, hi = h["ci_median_diff"]
        rep = ""
        if h["effect"] in ("more", "less"):
            rep = (" - also in random-init" if h["reproduced_by_random_init"]
                   else " - not in random-init")
        name = f"|{h['metric']}|" if h["metric"] in u["compared_as_magnitude"] else h["metric"]
        lines.append(
            f"  {name:<15} {h['a']:<10} vs {h['b']:<16}: {_num(h['median_a'], '.3g')} vs "
            f"{_num(h['median_b'], '.3g')}, diff {_num(h['median_diff'], '.3g')} "
            f"[{_num(lo, '.3g')}, {_num(hi, '.3g')}], Cliff's delta {_num(h['cliffs_delta'], '.2f')}"
            f": {h['effect']}{rep}"
        )
    for target, f in u.get("fit", {}).items():
        lo, hi = f["partial_r2_categories_ci"]
        label = "dL" if target == "delta" else "|dL|"
        lines.append(
            f"  {label} per token explained out of fold: R2 {_num(f['r2_full'], '.3g')} with "
            f"mechanism + categories, {_num(f['r2_mechanism'], '.3g')} mechanism only "
            f"(random-init mechanism {_num(f['r2_mechanism_random_init'], '.3g')}); partial R2 of "
            f"the categories {_num(f['partial_r2_categories'], '.3g')} [{_num(lo, '.3g')}, "
            f"{_num(hi, '.3g')}]"
        )
    return lines


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
    lines += _headline_lines(lh, rv, s.get("comparison_table"), s.get("implicit_updates"))
    lines += _format_updates(s["implicit_updates"])
    if s["plots"]:
        lines.append(f"plots: {', '.join(s['plots'])}")
    ctrl = s["implicit_updates"].get("control_cache")
    lines.append("full tables: `python -m probes.run compare <out>/run.h5"
                 + (" --control <out>/random_init.h5" if ctrl else "") + " --layers all`")
    if "efficiency" in s:
        lines.append(format_efficiency_demo(s["efficiency"]))
    if "landscape" in s:
        lines.append(format_landscape_demo(s["landscape"]))
    if "effects" in s:
        lines.append(format_effects_demo(s["effects"]))
    if "anchors" in s:
        lines += format_anchors_demo(s["anchors"])
    if "own_samples" in s:
        lines.append(format_generation_demo(s["own_samples"]))
    lines.append(f"took {s['seconds']:.1f}s")
    return "\n".join(lines)


def _later_sections(s: dict) -> list[str]:
    """One short line per later demo section (anchors, causal edits, landscape, variants)."""
    num = _num
    lines = []
    if "anchors" in s:
        a = s["anchors"]
        sup, rnd = a["suppression"], a["suppression_random_init"]
        top = ", ".join(f"a {k} chunk in {v:.0%}" for k, v in sup["anchor_category_share"].items())
        refl = next((c for c in sup["comparisons"] if c["a"] == "reflection"), None)
        refl_r = next((c for c in rnd["comparisons"] if c["a"] == "reflection"), None)
        line = (f"sentence anchors ({a['n_traces']} traces, {a['n_chunks']} chunks): masking "
                f"{top} of traces raises the answer NLL most (median +{num(sup['median_anchor_value'])}"
                f" nats)")
        if refl is not None:
            lo, hi = refl["ci_median_diff"]
            line += (f"; reflection vs ordinary chunks {num(refl['median_diff'])} [{num(lo)}, {num(hi)}]"
                     f" nats, Holm p {num(refl['p_holm'], '.2g')}")
            if refl_r is not None:
                line += f" (random-init p {num(refl_r['p_holm'], '.2g')})"
        lines.append(line)
    if "effects" in s:
        e = s["effects"]
        v, vr = e["v7"], e["v7_random_init"]
        lines.append(
            f"causal edits (V7, {e['n_pairs']} (layer, token) pairs): real ΔL vs first-order "
            f"Spearman {num(v['attn']['spearman'], '.2f')} attention knockout vs M7, "
            f"{num(v['mlp']['spearman'], '.2f')} MLP-step removal vs M6 (random-init "
            f"{num(vr['attn']['spearman'], '.2f')}, {num(vr['mlp']['spearman'], '.2f')})")
    if "landscape" in s:
        lines.append(format_landscape_demo(s["landscape"]))
    if "efficiency" in s:
        ef = s["efficiency"]
        parts = []
        for c in ef["comparisons"]:
            if c["metric"] == "stay_to_90":
                lo, hi = c["ci_median_diff"]
                parts.append(f"{c['a']} {num(c['median_diff'])} [{num(lo)}, {num(hi)}]")
        finals = [c for c in ef["comparisons"] if c["metric"] == "final"]
        same = all(c["verdict"] == "no clear difference" for c in finals)
        lines.append(
            f"trajectory variants ({ef['n_groups']} problems x original / direct / summary): "
            f"{'the same' if same else 'a different'} final L̂; tokens until L̂ stays within 90% "
            f"of its drop vs the original: {', '.join(parts)}")
    return lines


def _with_own_samples(short: list[str], own: dict | None) -> list[str]:
    """The report's short summary with one line on the model's own samples, before its last two."""
    if not own:
        return short
    acc, lhat = own["accuracy"], own["lhat"]

    def num(x, spec: str) -> str:
        return "n/a" if x is None else format(x, spec)

    line = (f"own samples: {own['n_samples']} ({own['n_questions']} fresh questions x "
            f"{own['samples_per_question']}, temperature {own['temperature']}), accuracy "
            f"{num(acc['value'], '.3f')} [{num(acc['ci'][0], '.3f')}, {num(acc['ci'][1], '.3f')}]; "
            f"L̂ falls in {num(lhat['share_falling'], '.0%')} of them, final L̂ "
            f"{num(lhat['median_final_lhat_correct'], '.2g')} (correct) vs "
            f"{num(lhat['median_final_lhat_incorrect'], '.3g')} (wrong)")
    return [*short[:-2], line, *short[-2:]]
