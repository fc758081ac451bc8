"""Detection and power of `compare` on the planted-effect organism `tiny-reasoner-planted`.

The organism's correcting reflections lower L̂ by design (docs/models.md, "The planted-effect
organism"), so this measures whether the toolkit's L̂ comparison finds an effect that is known to
be there, and how many traces it needs:

1. `lhat` on the sample traces with the trained model (`run.h5`) and with its seeded random
   initialisation (`random_init.h5`, the unplanted control: same traces, tokenizer and
   architecture, no learned effect), through the library runner `probes.pipeline.lhat.lhat_traces`;
2. detection: `compare`'s L̂ table (`probes.readouts.compare.compare_cache`, its defaults: |ΔL̂|
   per phrase, reflection against its confound-matched ordinary windows, Holm over the table) on
   both caches, and the ground truth per trace (ΔL̂ across the reflection phrase, from the
   traces' `phrase_span` meta);
3. power: for every size in `--sizes`, `--reps` seeded random subsets of that many traces, each
   run through the same tests (`probes.readouts.calibration.run_once` on the real labels); power =
   share of subsets where "reflection vs matched_to_reflection" is Holm-significant (α = 0.05)
   with reflection > matched; on the control, the share significant in either direction.

Usage (the table in docs/statistics.md, "Power on planted effects"):
    nice -n 10 python bench/planted_power.py --out /tmp/planted --reps 40
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from probes.models.controls import random_init_model
from probes.models.load import load_model
from probes.pipeline.lhat import LhatConfig, lhat_traces
from probes.readouts.calibration import ALPHA, _traces, run_once
from probes.readouts.compare import compare_cache, load_curves
from probes.readouts.configs import CompareConfig
from probes.readouts.matched import trajectory_log_frequency
from probes.reasoner.planted import SAMPLES_PATH, phrase_tokens
from probes.traces.read import read_traces
from probes.traces.tokenize import tokenize_trace

MODEL = "tiny-reasoner-planted"
ROW = ("reflection", "matched_to_reflection")
"""The compared row: the planted effect's category against its matched ordinary control."""


def measure(traces: Path, out: Path, *, model: str = MODEL, seed: int = 0,
            limit: int | None = None) -> tuple[Path, Path]:
    """L̂ curves of the trained model and of its random initialisation (`seed`); resumable."""
    loaded = load_model(model, device="cpu")
    run, control = out / "run.h5", out / "random_init.h5"
    cfg = LhatConfig(limit=limit)
    lhat_traces(loaded, traces, run, cfg, resume=run.exists(), progress=False)
    lhat_traces(random_init_model(loaded, seed), traces, control, cfg, resume=control.exists(),
                progress=False)
    return run, control


def detection_row(cache: Path, *, n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """`compare`'s reflection-vs-matched row of `cache` (as `compare_cache` reports it)."""
    report = compare_cache(cache, CompareConfig(n_boot=n_boot, seed=seed))
    (row,) = [r for r in report["table"]["rows"] if (r["a"], r["b"]) == ROW]
    return row


def ground_truth(cache: Path, traces: Path, *, model: str = MODEL) -> dict[str, Any]:
    """ΔL̂ across each correcting reflection phrase (its `phrase_span`), against the trace's other
    tokens: the planted effect as measured, trace by trace."""
    rows, _ = load_curves(cache)
    curves = {r["id"]: r["lhat"] for r in rows}
    loaded = load_model(model, device="cpu")
    at_phrase, biggest = [], []
    for tr in read_traces(traces):
        if tr.id not in curves:
            continue
        toks = phrase_tokens(tokenize_trace(tr, loaded.tokenizer))
        if not toks:
            continue
        lhat = curves[tr.id]
        at_phrase.append(float(lhat[toks[-1] + 1] - lhat[toks[0]]))
        biggest.append(bool(int(np.argmin(np.diff(lhat))) in toks))
    return {"n_reflection_traces": len(at_phrase), "median_delta_at_phrase": float(np.median(at_phrase)),
            "share_phrase_falls": float(np.mean(np.asarray(at_phrase) < 0)),
            "share_phrase_holds_biggest_drop": float(np.mean(biggest))}


def power(cache: Path, sizes: list[int], *, reps: int, seed: int, signed: bool = True) -> list[dict]:
    """Share of `reps` random subsets per size where ROW is Holm-significant (with `signed`: and
    reflection > matched; else in either direction)."""
    traces = _traces(cache)
    log_freq = trajectory_log_frequency(cache)
    rng = np.random.default_rng(seed)
    name = f"L̂ |Δ| {ROW[0]} vs {ROW[1]}"
    out = []
    for n in sizes:
        hits, testable = [], 0
        for _ in range(reps):
            sub = [traces[i] for i in rng.choice(len(traces), size=min(n, len(traces)), replace=False)]
            res = run_once(sub, log_freq, rng, shuffle=False, metrics=[])
            if name in res:
                testable += 1
                _, p_holm, diff = res[name][:3]
                hits.append(bool(p_holm < ALPHA and (diff > 0 or not signed)))
            else:
                hits.append(False)  # too few traces with a reflection: nothing detected
        out.append({"n_traces": n, "runs": reps, "testable": testable, "rate": float(np.mean(hits))})
    return out


def main(argv: list[str] | None = None) -> int:
    """Measure, compare, and print the detection rows and the power table (or JSON)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="folder for run.h5 and random_init.h5")
    p.add_argument("--model", default=MODEL)
    p.add_argument("--traces", type=Path, default=SAMPLES_PATH)
    p.add_argument("--sizes", type=int, nargs="+", default=[10, 20, 50, 100, 200])
    p.add_argument("--reps", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    run, control = measure(args.traces, args.out, model=args.model, seed=args.seed)
    t_lhat = time.time() - t0
    result: dict[str, Any] = {
        "lhat_seconds": round(t_lhat, 1),
        "ground_truth": ground_truth(run, args.traces, model=args.model),
        "detection": {"trained": detection_row(run, seed=args.seed),
                      "random_init": detection_row(control, seed=args.seed)},
        "power": {"trained": power(run, args.sizes, reps=args.reps, seed=args.seed),
                  "random_init_any_direction": power(control, args.sizes, reps=args.reps,
                                                     seed=args.seed, signed=False)},
    }
    result["seconds"] = round(time.time() - t0, 1)
    if args.json:
        print(json.dumps(result, default=float))
        return 0
    gt = result["ground_truth"]
    print(f"L̂ of {args.model} and its random init on {args.traces.name}: {t_lhat:.0f}s")
    print(f"ground truth: {gt['n_reflection_traces']} traces with a correcting reflection; ΔL̂ across "
          f"the phrase median {gt['median_delta_at_phrase']:+.3f}, falls in "
          f"{gt['share_phrase_falls']:.0%}, holds the trace's biggest drop in "
          f"{gt['share_phrase_holds_biggest_drop']:.0%}")
    for who, row in result["detection"].items():
        print(f"compare {who}: {row['a']} vs {row['b']}: n={row['n_traces']} median "
              f"{row['median_a']:.4f} vs {row['median_b']:.4f}, median diff {row['median_diff']:+.4f} "
              f"CI [{row['ci_median_diff'][0]:+.4f}, {row['ci_median_diff'][1]:+.4f}], "
              f"Cliff's δ {row['cliffs_delta']:+.2f}, p_holm {row['p_holm']:.2g}")
    print(f"power (share of {args.reps} seeded subsets Holm-significant at α={ALPHA}):")
    print("  n traces  trained (reflection > matched)  random init (either direction)")
    for a, b in zip(result["power"]["trained"], result["power"]["random_init_any_direction"], strict=True):
        print(f"  {a['n_traces']:>8}  {a['rate']:>30.3f}  {b['rate']:>30.3f}")
    print(f"total {result['seconds']:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
