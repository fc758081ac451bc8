"""Support-set sweep: train the reasoner with k trajectories per question, at a fixed number of questions.

`python -m probes.reasoner.sweep --out runs/sweep [--reduced] [--ks 1 2 4 8] [--seeds 0 1]`

RaML reads the trajectories of one question as its support set and argues that more of them help.
Here every setting trains on the same `--questions` questions (seed `SWEEP_SEED`); setting k gives
each question k different trajectories of the task's generator (other openings, planted mistakes
and reflections, conclusions; the sets are nested: k = 2 holds k = 1's trajectory, and so on).
Every setting runs the same optimizer steps and batch size (equal compute: k = 1 sees each of its
trajectories k_max times as often as k = k_max does) with the shipped model's tokenizer, so the only
difference is the support set. Per setting and seed it reports, on fresh problems (seed
`EVAL_SEED`, which training never used): greedy answer accuracy after the reference trajectory and
after the model's own trajectory, with Wilson 95% CIs; and, over the L̂ curves of `--lhat-n` fresh
reference traces, the stability measures of `analyses.stability` (variance of ΔL̂ along a trace,
share of non-monotone steps, oscillation energy after smoothing), medians with bootstrap CIs over
traces. Writes `sweep.json`, `sweep.png` and the trained models (`k<k>-s<seed>/`).

An experiment, not part of the test suite. The full run (`--ks 1 2 4 8`, 3 seeds, the shipped
model's size and steps) takes hours on 2 CPU cores; `--reduced` is a smaller model and shorter
training that runs in minutes (see `REDUCED`).
"""

from __future__ import annotations

import argparse
import json
import random
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

from analyses.sampling import wilson_ci
from analyses.stability import STABILITY, stability_measures
from analyses.stats import bootstrap_ci
from probes.measures.answers import answer_scores
from probes.measures.lhat.fast import lhat_fast
from probes.models.load import load_model, load_tokenizer
from probes.reasoner.evaluate import own_answers
from probes.reasoner.task import Problem, generate_problems, write_trajectory
from probes.reasoner.train import EVAL_SEED, TrainConfig, problem_trace, train
from probes.reasoner.variants import parse_steps
from probes.safe_output import save_figure, write_text
from probes.traces.tokenize import tokenize_trace

SWEEP_SEED = 5
"""Seed of the sweep's training questions (training 1, samples 2, evaluation 3, GRPO 4)."""

FULL = {"questions": 2500, "steps": 1200, "batch_size": 32, "eval_n": 500, "lhat_n": 100,
        "d_model": 128, "n_layers": 4, "n_heads": 4, "n_kv_heads": 2, "d_mlp": 384, "warmup": 100,
        "threads": 2}
"""The full setting: the shipped model's architecture and schedule."""

REDUCED = {"questions": 1000, "steps": 250, "batch_size": 16, "eval_n": 200, "lhat_n": 30,
           "d_model": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "d_mlp": 192, "warmup": 25,
           "threads": 1}
"""`--reduced`: a 2-layer d_model-64 model, 250 steps of 16 sequences, one thread (minutes)."""


def support_set(questions: list[Problem], k: int) -> list[Problem]:
    """k trajectories per question: the question's own (j = 0), then j = 1..k−1 written by
    `write_trajectory` with `random.Random(f"support-{id}-{j}")`, so the sets are nested in k."""
    out = []
    for q in questions:
        start, steps = parse_steps(q.question)
        out.append(replace(q, id=f"{q.id}/0"))
        for j in range(1, k):
            traj, value, n_m, n_c = write_trajectory(random.Random(f"support-{q.id}-{j}"), start, steps)
            if str(value) != q.answer:
                raise AssertionError(f"{q.id}: trajectory {j} ends on {value}, not {q.answer}")
            out.append(Problem(id=f"{q.id}/{j}", question=q.question, trajectory=traj, answer=q.answer,
                               n_mistakes=n_m, n_confirmations=n_c))
    return out


def _median_ci(values: np.ndarray, seed: int) -> dict:
    v = values[np.isfinite(values)]
    lo, hi = bootstrap_ci(v, seed=seed)
    return {"median": float(np.median(v)) if v.size else float("nan"), "ci": [lo, hi], "n": int(v.size)}


def evaluate_setting(folder: Path, *, eval_n: int, lhat_n: int) -> dict:
    """Accuracy (reference and own trajectory) and L̂ stability of one trained model."""
    loaded = load_model(str(folder), device="cpu")
    problems = generate_problems(eval_n, seed=EVAL_SEED)
    tokenized = [tokenize_trace(problem_trace(p), loaded.tokenizer) for p in problems]
    ref = sum(s.correct for s in answer_scores(loaded, tokenized))
    own = sum(a == p.answer for a, p in zip(own_answers(loaded, tokenized), problems))
    per_trace = [stability_measures(lhat_fast(loaded, tt).lhat) for tt in tokenized[:lhat_n]]
    out = {
        "accuracy_reference_trajectory": ref / eval_n,
        "accuracy_reference_trajectory_ci": list(wilson_ci(ref, eval_n)),
        "accuracy_own_trajectory": own / eval_n,
        "accuracy_own_trajectory_ci": list(wilson_ci(own, eval_n)),
    }
    for i, m in enumerate(STABILITY):
        out[m] = _median_ci(np.array([t[m] for t in per_trace]), seed=i)
    return out


def run_sweep(args: argparse.Namespace, *, log=print) -> dict:
    """Train and evaluate every (k, seed); returns the record written to `sweep.json`."""
    settings = dict(REDUCED if args.reduced else FULL)
    for name in ("questions", "steps", "batch_size", "eval_n", "lhat_n"):
        if getattr(args, name) is not None:
            settings[name] = getattr(args, name)
    tokenizer = load_tokenizer("tiny-reasoner")
    questions = generate_problems(settings["questions"], seed=SWEEP_SEED)
    arch_keys = ("d_model", "n_layers", "n_heads", "n_kv_heads", "d_mlp", "warmup", "threads")
    arch = {k: settings[k] for k in arch_keys}
    rows = []
    for seed in args.seeds:
        for k in args.ks:
            t0 = time.time()
            data = support_set(questions, k)
            cfg = TrainConfig(n_train=len(data), steps=settings["steps"], batch_size=settings["batch_size"],
                              seed=seed, **arch)
            folder = args.out / f"k{k}-s{seed}"
            train(cfg, folder, problems=data, tokenizer=tokenizer, log=lambda _line: None)
            t_train = time.time() - t0
            row = {"k": k, "seed": seed, "n_sequences": len(data), "train_seconds": round(t_train, 1)}
            row |= evaluate_setting(folder, eval_n=settings["eval_n"], lhat_n=settings["lhat_n"])
            row["seconds"] = round(time.time() - t0, 1)
            rows.append(row)
            log(f"k={k} seed={seed}: own-trajectory accuracy {row['accuracy_own_trajectory']:.3f} "
                f"{_fmt(row['accuracy_own_trajectory_ci'])}, "
                f"reference {row['accuracy_reference_trajectory']:.3f}; "
                f"var ΔL̂ {row['var_delta']['median']:.3g}, "
                f"non-monotone {row['frac_nonmonotone']['median']:.3f} ({row['seconds']:.0f}s)")
    record = {"settings": settings, "ks": list(args.ks), "seeds": list(args.seeds),
              "question_seed": SWEEP_SEED, "eval_seed": EVAL_SEED, "config": asdict(cfg), "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    write_text(args.out / "sweep.json", json.dumps(record, indent=1) + "\n")
    plot_sweep(rows, args.out / "sweep.png")
    return record


def _fmt(ci) -> str:
    return f"[{ci[0]:.3f}, {ci[1]:.3f}]"


def _yerr(value: float, ci) -> list[list[float]]:
    """Error-bar lengths below and above `value` (never negative: a CI may end a hair past it)."""
    return [[max(0.0, value - ci[0])], [max(0.0, ci[1] - value)]]


def plot_sweep(rows: list[dict], path: Path) -> Path:
    """Accuracy and the three stability measures against k (one point per seed, CI bars)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    panels = [("accuracy_own_trajectory", "own-trajectory accuracy"),
              ("accuracy_reference_trajectory", "reference-trajectory accuracy")]
    for ax, (key, title) in zip(axes[:2], panels):
        for r in rows:
            ax.errorbar(r["k"], r[key], yerr=_yerr(r[key], r[f"{key}_ci"]), fmt="o", capsize=3,
                        label=f"seed {r['seed']}")
        ax.set_title(title)
    for ax, m in zip(axes[2:], ("var_delta", "frac_nonmonotone")):
        for r in rows:
            ax.errorbar(r["k"], r[m]["median"], yerr=_yerr(r[m]["median"], r[m]["ci"]), fmt="o", capsize=3)
        ax.set_title({"var_delta": "var ΔL̂ (median over traces)",
                      "frac_nonmonotone": "non-monotone steps (median)"}[m])
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("trajectories per question k")
    fig.tight_layout()
    return save_figure(fig, path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    parser = argparse.ArgumentParser(prog="python -m probes.reasoner.sweep", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--reduced", action="store_true", help="the small setting (REDUCED)")
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 2, 4, 8], help="trajectories per question")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0],
                        help="initialisation / batch-order seeds")
    parser.add_argument("--questions", type=int, default=None, help="training questions (override)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (override)")
    parser.add_argument("--batch-size", type=int, default=None, help="sequences per step (override)")
    parser.add_argument("--eval-n", type=int, default=None, help="fresh problems for accuracy (override)")
    parser.add_argument("--lhat-n", type=int, default=None, help="fresh traces for L̂ stability (override)")
    args = parser.parse_args(argv)
    run_sweep(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
