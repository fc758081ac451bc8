"""Accuracy of the reasoner's training stages on the same fresh problems: `python -m probes.reasoner.stages`.

For each model (default: `tiny-reasoner-sft-early`, `tiny-reasoner` = the final SFT, and
`tiny-reasoner-grpo`) on the same `--n` fresh problems (seed `EVAL_SEED`, never used in training):

- greedy answer accuracy after the reference trajectory (teacher-forced, `answer_scores`);
- greedy answer accuracy after the model's own greedy trajectory (`evaluate.own_answers`);
- answer accuracy after the model's own *sampled* trajectory at `--temperature` (seed `--seed`),
  the quantity GRPO's reward optimises;
- the mean answer NLL after the reference trajectory;

each accuracy with a Wilson 95% CI, and for every model against `--baseline` the paired difference
of each accuracy (same problems) with a bootstrap 95% CI over problems. Prints one line per model
and writes `--json` if given.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from analyses.sampling import wilson_ci
from analyses.stats import bootstrap_ci
from probes.measures.answers import answer_scores
from probes.models.load import load_model
from probes.reasoner.evaluate import own_answers
from probes.reasoner.task import generate_problems
from probes.reasoner.train import EVAL_SEED, problem_trace
from probes.safe_output import write_text
from probes.traces.tokenize import tokenize_trace

STAGES = ("tiny-reasoner-sft-early", "tiny-reasoner", "tiny-reasoner-grpo")
"""The shipped models along training, in training order."""

ACCURACIES = ("reference", "own_greedy", "own_sampled")
"""The per-problem correctness vectors compared between models."""


def stage_correctness(model: str, *, n: int, temperature: float, seed: int, batch_size: int = 64) -> dict:
    """Per-problem correctness (bool [n]) of each of `ACCURACIES`, and the mean answer NLL."""
    loaded = load_model(model, device="cpu")
    problems = generate_problems(n, seed=EVAL_SEED)
    tokenized = [tokenize_trace(problem_trace(p), loaded.tokenizer) for p in problems]
    answers = [p.answer for p in problems]
    scores = answer_scores(loaded, tokenized)
    greedy = own_answers(loaded, tokenized, batch_size=batch_size)
    sampled = own_answers(loaded, tokenized, batch_size=batch_size, temperature=temperature, seed=seed)
    return {
        "reference": np.array([s.correct for s in scores]),
        "own_greedy": np.array([a == b for a, b in zip(greedy, answers)]),
        "own_sampled": np.array([a == b for a, b in zip(sampled, answers)]),
        "mean_answer_nll_full": float(np.mean([s.nll for s in scores])),
    }


def compare_stages(
    models: list[str],
    *,
    n: int = 500,
    temperature: float = 1.0,
    seed: int = 0,
    baseline: str = "tiny-reasoner",
    reuse: dict | None = None,
    log=print,
) -> dict:
    """Evaluate `models` on the same problems; accuracies with CIs, paired differences to `baseline`.

    `reuse`: an earlier result of this function (same `n`, `temperature`, `seed`); models in its
    `per_problem` are not evaluated again.
    """
    per, rows = {}, []
    if reuse is not None:
        same = (reuse["n_problems"], reuse["temperature"], reuse["sampling_seed"]) == (n, temperature, seed)
        if not same:
            raise ValueError("--reuse holds another n, temperature or seed; rerun without it")
    for model in models:
        t0 = time.time()
        if reuse is not None and model in reuse["per_problem"]:
            old = reuse["per_problem"][model]
            per[model] = {k: (np.array(v, bool) if k in ACCURACIES else v) for k, v in old.items()}
        else:
            per[model] = stage_correctness(model, n=n, temperature=temperature, seed=seed)
        row = {"model": model, "mean_answer_nll_full": per[model]["mean_answer_nll_full"]}
        for acc in ACCURACIES:
            k = int(per[model][acc].sum())
            row[f"accuracy_{acc}"] = k / n
            row[f"accuracy_{acc}_ci"] = list(wilson_ci(k, n))
        row["seconds"] = round(time.time() - t0, 1)
        rows.append(row)
        log(f"{model:<24} " + "  ".join(
            f"{acc} {row[f'accuracy_{acc}']:.3f} [{row[f'accuracy_{acc}_ci'][0]:.3f}, "
            f"{row[f'accuracy_{acc}_ci'][1]:.3f}]" for acc in ACCURACIES
        ) + f"  nll {row['mean_answer_nll_full']:.4g}  ({row['seconds']:.0f}s)")
    diffs = []
    if baseline in per:
        for model in models:
            if model == baseline:
                continue
            for i, acc in enumerate(ACCURACIES):
                d = per[model][acc].astype(float) - per[baseline][acc].astype(float)
                lo, hi = bootstrap_ci(d, np.mean, seed=i)
                diffs.append({"model": model, "baseline": baseline, "accuracy": acc,
                              "diff": float(d.mean()), "ci": [lo, hi]})
                log(f"{model} - {baseline}: {acc} {d.mean():+.3f} [{lo:+.3f}, {hi:+.3f}]")
    per_problem = {m: {k: (v.astype(int).tolist() if k in ACCURACIES else v) for k, v in d.items()}
                   for m, d in per.items()}
    return {"n_problems": n, "eval_seed": EVAL_SEED, "temperature": temperature, "sampling_seed": seed,
            "rows": rows, "paired_differences": diffs, "per_problem": per_problem}


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    parser = argparse.ArgumentParser(prog="python -m probes.reasoner.stages", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(STAGES), help="model specs, in training order")
    parser.add_argument("--n", type=int, default=500, help="fresh problems (default 500)")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default 1)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument("--baseline", default="tiny-reasoner", help="model the others are paired with")
    parser.add_argument("--json", default=None, help="write the result here")
    parser.add_argument("--reuse", default=None, help="an earlier --json: its models are not re-evaluated")
    args = parser.parse_args(argv)
    reuse = None
    if args.reuse:
        with open(args.reuse, encoding="utf-8") as f:
            reuse = json.load(f)
    result = compare_stages(args.models, n=args.n, temperature=args.temperature, seed=args.seed,
                            baseline=args.baseline, reuse=reuse)
    if args.json:
        write_text(args.json, json.dumps(result, indent=1), flag="--json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
