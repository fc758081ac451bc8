"""Measured calibration and power of `compare`'s statistics on a real cache.

    python -m probes.readouts.calibration RUN.h5 --control RAND.h5 --reps 200 --seed 0
    python -m probes.readouts.calibration RUN.h5 --power --effects 0.1 0.2 0.4 --sizes 10 20 50

Calibration: the comparison pipeline that `compare` runs (token sets with the confound-matched
controls, per-trace aggregates, the sign-flip permutation p-value, Holm over the whole table) is
rerun `--reps`
times on null label sets: every trace's labels shifted circularly by a random offset
(`analyses.calibration.shift_labels`), on the trained model's arrays and (with `--control`) on the
random-init model's. Printed: the false-positive rate at α of every test with its exact binomial
CI, and the family-wise error rate after Holm; next to them the same rates of the Wilcoxon
signed-rank p-value on the same runs (the test used before, kept as `wilcoxon_p`). The random-init
model with the REAL labels is run once, matched and unmatched: its Holm-significant rows are
token properties (position, identity, frequency), the confound the matching is meant to remove.

Power (`--power`): the same pipeline on shifted labels with a planted effect (the reflection
tokens' `--planted-metric` multiplied by 1 + effect, `analyses.calibration.plant`) on random
subsets of `--sizes` traces; power = share of runs where the planted row (reflection vs its
matched control, pooled layers) is Holm-significant in the planted direction; the minimum
detectable effect at 80% power per size.

CIs are not computed in these runs (`ci_method="none"`): a verdict needs p_holm < α AND a CI on
one side of 0, so the rates of p_holm < α measured here bound the verdicts' rates from above
(calibration) and the verdicts' power is at most the power measured here.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from analyses.calibration import (
    family_rate,
    mde_at,
    min_detectable_effect,
    plant,
    rate_rows,
    shift_labels,
)
from analyses.lhat_effects import (
    DEFAULT_PAIRS,
    MATCHED_PAIRS,
    category_comparison,
    per_trace_aggregates,
    token_effects,
)
from analyses.stats import holm
from analyses.token_sets import token_sets
from analyses.update_effects import POOLED, update_comparison
from probes import DATA_DIR
from probes.errors import ProbesError
from probes.readouts.compare_updates import SIGNED_UPDATES
from probes.readouts.loader import load_traces
from probes.readouts.matched import trajectory_log_frequency

ALPHA = 0.05

POWER_TABLE = DATA_DIR / "power_upd_sigma_gate.json"
"""The measured power grid the headlines read their MDE from (written from this module's `--power
--json` output; the commands and the cache are in its `source` and in docs/statistics.md)."""


def power_table(path: Path = POWER_TABLE) -> dict[str, Any]:
    """The stored power grid: `test`, `alpha`, `effect_unit`, `grid` (n_traces, effect, power, ci,
    runs), `source`."""
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def mde_text(n: int, *, table: dict[str, Any] | None = None) -> str:
    """The power clause of a headline finding of a run over `n` traces (all traces of the run, as
    the power grid draws them; not only those holding the category), e.g. `MDE at 80% power: +48%
    at 200 traces (planted-effect power of upd_sigma_gate, docs/statistics.md)`, computed from
    the stored grid (`analyses.calibration.mde_at`)."""
    t = power_table() if table is None else table
    m = mde_at(t["grid"], n)
    metric = t["test"].split()[0]
    src = f"(planted-effect power of {metric}, docs/statistics.md)"
    if m["n_measured"] is None:
        smallest = min(int(g["n_traces"]) for g in t["grid"])
        return f"power not measured below {smallest} traces {src}"
    at = f"{m['n_measured']} traces" + ("" if m["n_measured"] == n else
                                        f" (the largest measured size ≤ {n})")
    if m["mde"] != m["mde"]:
        return f"MDE at 80% power: more than +{m['max_effect']:.0%} at {at} {src}"
    return f"MDE at 80% power: +{m['mde']:.0%} at {at} {src}"


def _traces(path, *, control: bool = False) -> list[dict[str, Any]]:
    """Per trace: trajectory labels, L̂ curve, upd_* arrays (the one loader)."""
    out = []
    for t in load_traces(path, missing="partial"):
        a, b = t.trajectory
        if "phrase_id" not in t.arrays:
            continue
        kind = str(t.attrs.get("upd_control", "none"))
        if control != (kind == "random-init") and any(n.startswith("upd_") for n in t.arrays):
            raise ProbesError(f"{path}: trace {t.id!r} has upd_control={kind!r}; pass the trained "
                              "model's cache first and the `updates --control random-init` one "
                              "as --control")
        out.append({
            "id": t.id,
            "category": np.asarray(t.category[a:b]),
            "phrase_id": np.asarray(t.arrays["phrase_id"][a:b]),
            "is_first": np.asarray(t.arrays["phrase_first"][a:b]).astype(bool),
            "paragraph_start": np.asarray(t.arrays["paragraph_start"]).astype(bool),
            "lhat": np.asarray(t.arrays["lhat"], np.float64) if "lhat" in t.arrays else None,
            "upd": {n: np.asarray(v, np.float64) for n, v in t.arrays.items() if n.startswith("upd_")},
        })
    if not out:
        raise ProbesError(f"{path} has no trace with labels (phrase_id); run `lhat` or `updates` "
                          "with this version first")
    return out


def _labels(tr, rng, shuffle: bool):
    if not shuffle:
        return tr["category"], tr["phrase_id"], tr["is_first"]
    return shift_labels(tr["category"], tr["phrase_id"], tr["is_first"], rng)


NOT_NULL = ("paragraph_initial",)
"""Rows that are no null under shifted labels: the paragraph-initial control stays on its tokens
(a token class of its own), so shifted reflection tokens against it compare random tokens with
paragraph starts. They stay in the Holm family (as in `compare`) but out of the FPR / FWER."""


def _is_null(name: str) -> bool:
    return not any(x in name for x in NOT_NULL)


def run_once(traces, log_freq, rng, *, matched: bool = True, shuffle: bool = True,
             lhat: bool = True, values_key: str = "upd", planted: tuple[str, float] | None = None,
             metrics: list[str] | None = None) -> dict[str, tuple[float, float, float, float]]:
    """One pass of compare's tests: {test name: (p, p_holm, median diff, Wilcoxon p)} (untestable
    rows left out)."""
    pairs = MATCHED_PAIRS if matched else DEFAULT_PAIRS
    labels = [_labels(tr, rng, shuffle) for tr in traces]
    out: dict[str, tuple[float, float, float, float]] = {}
    if lhat and all(tr["lhat"] is not None for tr in traces):
        effects = [token_effects(tr["lhat"], c, p, f, paragraph_start=tr["paragraph_start"], rng=rng,
                                 log_freq=log_freq.get(tr["id"]), matched=matched)
                   for tr, (c, p, f) in zip(traces, labels)]
        table = category_comparison(per_trace_aggregates(effects), pairs=pairs, n_boot=1,
                                    ci_method="none")
        for r in table.rows:
            if r.testable:
                out[f"L̂ |Δ| {r.a} vs {r.b}"] = (r.p, r.p_holm, r.median_diff, r.wilcoxon_p)
    have = set.intersection(*(set(tr[values_key]) for tr in traces))
    metrics = sorted(have if metrics is None else have & set(metrics))
    if metrics:
        sets = [token_sets(c, p, f, paragraph_start=tr["paragraph_start"], rng=rng,
                           log_freq=log_freq.get(tr["id"]), matched=matched)
                for tr, (c, p, f) in zip(traces, labels)]
        values = {m: [tr[values_key][m] for tr in traces] for m in metrics}
        if planted is not None:
            m, eff = planted
            values[m] = [plant(v, s.labels, eff) for v, s in zip(values[m], sets)]
        cmp = update_comparison(values, sets, pairs=pairs, n_boot=1, ci_method="none",
                                signed=[m for m in metrics if m in SIGNED_UPDATES])
        for row in cmp.rows:
            c = row.comparison
            if c.testable:
                out[f"{row.metric} {row.layer} {c.a} vs {c.b}"] = (c.p, c.p_holm, c.median_diff,
                                                                   c.wilcoxon_p)
    return out


def calibrate(traces, log_freq, *, reps: int, seed: int, matched: bool = True,
              values_key: str = "upd", lhat: bool = True, alpha: float = ALPHA,
              metrics: list[str] | None = None) -> dict[str, Any]:
    """FPR per test and family-wise error after Holm over `reps` shifted-label nulls (the rows of
    `NOT_NULL` are tested as in `compare` but not counted)."""
    rng = np.random.default_rng(seed)
    hits: dict[str, list[bool]] = {}
    hits_w: dict[str, list[bool]] = {}
    fam: dict[str, list[bool]] = {"lhat": [], "upd": [], "lhat_w": [], "upd_w": []}
    for _ in range(reps):
        res = run_once(traces, log_freq, rng, matched=matched, values_key=values_key, lhat=lhat,
                       metrics=metrics)
        for part, is_part in (("lhat", lambda n: n.startswith("L̂")),
                              ("upd", lambda n: not n.startswith("L̂"))):
            mine = {n: v for n, v in res.items() if is_part(n)}
            # the Wilcoxon p-values Holm-adjusted over the same family as compare's p
            w_holm = dict(zip(mine, holm([v[3] for v in mine.values()]), strict=True))
            fam[part].append(any(v[1] < alpha for n, v in mine.items() if _is_null(n)))
            fam[part + "_w"].append(any(w_holm[n] < alpha for n in mine if _is_null(n)))
        for name, (p, _, _, wp) in res.items():
            if _is_null(name):
                hits.setdefault(name, []).append(bool(p < alpha))
                hits_w.setdefault(name, []).append(bool(wp < alpha))
    rows = rate_rows(hits)
    for row, w in zip(rows, rate_rows(hits_w), strict=True):
        row["wilcoxon"] = {k: w[k] for k in ("n_hits", "rate", "ci")}
    return {"reps": reps, "alpha": alpha, "rows": rows,
            "fwer_lhat": family_rate(fam["lhat"]) if lhat else None,
            "fwer_updates": family_rate(fam["upd"]),
            "wilcoxon_fwer_lhat": family_rate(fam["lhat_w"]) if lhat else None,
            "wilcoxon_fwer_updates": family_rate(fam["upd_w"])}


def power(traces, log_freq, *, metric: str, effects, sizes, reps: int, seed: int,
          alpha: float = ALPHA, metrics: list[str] | None = None) -> dict[str, Any]:
    """Power of the planted row at every (effect, size), and the MDE at 80% per size."""
    rng = np.random.default_rng(seed)
    name = f"{metric} {POOLED} reflection vs matched_to_reflection"
    grid = []
    for n in sizes:
        if n > len(traces):
            raise ProbesError(f"--sizes {n} is more than the {len(traces)} traces of the cache")
        for eff in effects:
            det = []
            for _ in range(reps):
                sub = [traces[i] for i in rng.choice(len(traces), size=n, replace=False)]
                res = run_once(sub, log_freq, rng, lhat=False, planted=(metric, eff),
                               metrics=metrics)
                p, ph, d, _ = res.get(name, (np.nan, np.nan, np.nan, np.nan))
                det.append(bool(ph < alpha and d * np.sign(eff) > 0) if eff else bool(ph < alpha))
            (row,) = rate_rows({name: det})
            grid.append({"n_traces": n, "effect": eff, "power": row["rate"], "ci": row["ci"],
                         "runs": reps})
    mde = {n: min_detectable_effect([g["effect"] for g in grid if g["n_traces"] == n and g["effect"] > 0],
                                    [g["power"] for g in grid if g["n_traces"] == n and g["effect"] > 0])
           for n in sizes}
    return {"test": name, "alpha": alpha, "grid": grid, "mde_80": mde,
            "effect_unit": f"relative increase of {metric} at reflection tokens"}


def format_calibration(cal: dict[str, Any], title: str) -> list[str]:
    """The FPR table of one null: L̂ rows and pooled update rows one by one, the other update
    rows summarised (mean FPR, how many CIs lie above α), and the family-wise error rates."""
    a = cal["alpha"]
    lines = [f"{title}: {cal['reps']} runs, α = {a}"]
    shown = [r for r in cal["rows"] if r["test"].startswith("L̂") or f" {POOLED} " in r["test"]]
    w = max(len(r["test"]) for r in shown) if shown else 10
    lines.append(f"  {'test':<{w}}  runs  FPR     95% CI          (Wilcoxon, before)")
    for r in shown:
        flag = "  ABOVE α" if r["ci"][0] > a else ""
        wx = r.get("wilcoxon")
        old = "" if wx is None else f"  ({wx['rate']:.3f} [{wx['ci'][0]:.3f}, {wx['ci'][1]:.3f}])"
        lines.append(f"  {r['test']:<{w}}  {r['n_runs']:>4}  {r['rate']:.3f}  "
                     f"[{r['ci'][0]:.3f}, {r['ci'][1]:.3f}]{old}{flag}")
    every = cal["rows"]
    above = [r["test"] for r in every if r["ci"][0] > a]
    lines.append(f"  all {len(every)} tests: mean FPR {np.mean([r['rate'] for r in every]):.3f}, "
                 f"max {max(r['rate'] for r in every):.3f}; CI above α: {len(above)}"
                 + (f" ({', '.join(above[:8])}{', ...' if len(above) > 8 else ''})" if above else ""))
    if every and "wilcoxon" in every[0]:
        w_above = sum(r["wilcoxon"]["ci"][0] > a for r in every)
        lines.append(f"  (Wilcoxon on the same runs: mean FPR "
                     f"{np.mean([r['wilcoxon']['rate'] for r in every]):.3f}, max "
                     f"{max(r['wilcoxon']['rate'] for r in every):.3f}; CI above α: {w_above})")
    for key, label in (("fwer_lhat", "L̂ table"), ("fwer_updates", "update table")):
        f = cal.get(key)
        if f is not None:
            lines.append(f"  family-wise error after Holm, {label}: {f['rate']:.3f} "
                         f"[{f['ci'][0]:.3f}, {f['ci'][1]:.3f}] ({f['n_hits']}/{f['n_runs']})")
        f = cal.get("wilcoxon_" + key)
        if f is not None:
            lines.append(f"    (Wilcoxon, before: {f['rate']:.3f} [{f['ci'][0]:.3f}, "
                         f"{f['ci'][1]:.3f}])")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m probes.readouts.calibration",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("path", help="cache with L-hat and update arrays of the trained model")
    p.add_argument("--control", default=None, help="the `updates --control random-init` cache")
    p.add_argument("--reps", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--unmatched", action="store_true", help="calibrate the unmatched comparison")
    p.add_argument("--power", action="store_true", help="measure power on planted effects instead")
    p.add_argument("--planted-metric", default="upd_sigma_gate")
    p.add_argument("--effects", type=float, nargs="+", default=[0.0, 0.1, 0.2, 0.4, 0.8])
    p.add_argument("--sizes", type=int, nargs="+", default=[10, 20, 50, 100, 200])
    p.add_argument("--metrics", nargs="+", default=None,
                   help="upd_* arrays in the update table (default: all; fewer = a smaller Holm "
                        "family and a faster run)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = p.parse_args(argv)
    try:
        t0 = time.perf_counter()
        traces = _traces(args.path)
        log_freq = trajectory_log_frequency(args.path)
        result: dict[str, Any] = {"cache": args.path, "n_traces": len(traces),
                                  "matched": not args.unmatched, "metrics": args.metrics}
        if args.power:
            pw = power(traces, log_freq, metric=args.planted_metric, effects=args.effects,
                       sizes=args.sizes, reps=args.reps, seed=args.seed,
                       metrics=args.metrics or [args.planted_metric])
            result["power"] = pw
            fam = args.metrics or [args.planted_metric]
            print(f"power of '{pw['test']}' (Holm over the update table of {', '.join(fam)}, "
                  f"α = {pw['alpha']}), "
                  f"planted effect = {pw['effect_unit']}, {args.reps} runs per cell, "
                  f"{len(traces)} traces to draw from:")
            print("  n traces  effect  power   95% CI")
            for g in pw["grid"]:
                print(f"  {g['n_traces']:>8}  {g['effect']:>6.2f}  {g['power']:.3f}  "
                      f"[{g['ci'][0]:.3f}, {g['ci'][1]:.3f}]")
            print("  minimum detectable effect at 80% power: " + ", ".join(
                f"n = {n}: {v:.3g}" if v == v else f"n = {n}: > {max(args.effects):g}"
                for n, v in pw["mde_80"].items()))
        else:
            cal = calibrate(traces, log_freq, reps=args.reps, seed=args.seed,
                            matched=not args.unmatched, metrics=args.metrics)
            result["trained_shifted"] = cal
            lines = format_calibration(cal, f"null 1, trained model ({len(traces)} traces), labels "
                                            "shifted within traces")
            if args.control is not None:
                ctrl = _traces(args.control, control=True)
                by_id = {t["id"]: t for t in ctrl}
                for t in traces:
                    t["ctrl"] = by_id[t["id"]]["upd"] if t["id"] in by_id else {}
                both = [t for t in traces if t["ctrl"]]
                cal_c = calibrate(both, log_freq, reps=args.reps, seed=args.seed + 1,
                                  matched=not args.unmatched, values_key="ctrl", lhat=False,
                                  metrics=args.metrics)
                result["random_init_shifted"] = cal_c
                lines += format_calibration(cal_c, f"null 2, random-init model ({len(both)} traces), "
                                                   "labels shifted within traces")
                rng = np.random.default_rng(args.seed)
                real = {}
                for matched in (True, False):
                    res = run_once(both, log_freq, rng, matched=matched, shuffle=False,
                                   values_key="ctrl", lhat=False, metrics=args.metrics)
                    real["matched" if matched else "unmatched"] = {
                        "n_tests": len(res),
                        "n_holm_significant": sum(v[1] < ALPHA for v in res.values()),
                        "category_rows_significant": sorted(
                            n for n, v in res.items() if v[1] < ALPHA and "shuffled" not in n)}
                result["random_init_real_labels"] = real
                lines.append("random-init model with the REAL labels (token properties, not learning):")
                for k, v in real.items():
                    lines.append(f"  {k}: {v['n_holm_significant']} of {v['n_tests']} update tests "
                                 "Holm-significant")
            print("\n".join(lines))
        result["seconds"] = round(time.perf_counter() - t0, 1)
        print(f"({result['seconds']} s)")
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=1, default=float)
    except ProbesError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
