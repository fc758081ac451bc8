"""The demo's own-sample run: tiny-reasoner samples 4 trajectories for 20 fresh questions
(temperature 0.7) through `generate`, grades them, and runs L̂ on its own generations.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from probes.jsonable import jsonable
from probes.pipeline.generate.sampling import generate_samples
from probes.pipeline.generate.settings import GenerateConfig
from probes.pipeline.lhat import LhatConfig, lhat_traces
from probes.readouts.loader import load_traces
from probes.reasoner.task import generate_problems, write_jsonl
from probes.traces.jsonl import open_out

if TYPE_CHECKING:
    from hooks.model import LoadedModel


DEMO_PROBLEM_SEED = 4
"""Seed of the demo's fresh problems (tiny-reasoner's training, samples and evaluation use 1, 2, 3)."""


DEMO_QUESTIONS, DEMO_SAMPLES, DEMO_TEMPERATURE = 20, 4, 0.7


def generation_demo(loaded: LoadedModel, out_dir: Path, *, n_questions: int = DEMO_QUESTIONS,
                    n_samples: int = DEMO_SAMPLES) -> dict[str, Any]:
    """tiny-reasoner's own samples: `n_samples` trajectories (temperature `DEMO_TEMPERATURE`) for
    `n_questions` fresh problems, graded, then the L̂ curve of each (`lhat`).

    Writes `generation_questions.jsonl`, `generated.jsonl` and `generated_lhat.h5` into `out_dir`
    (created; earlier ones replaced).

    Args:
        loaded: tiny-reasoner (any model that solves `probes.reasoner.task` problems).
        out_dir: Folder for the files.
        n_questions: Fresh problems (seed `DEMO_PROBLEM_SEED`).
        n_samples: Trajectories per problem.

    Returns:
        JSON-able figures: the samples' statistics (accuracy, Pass@k, mG-Pass@k, lengths,
        truncation), tokens/s, and the L̂ figures: median L̂ with no trajectory and after it, the
        share of traces where it falls, and the median final L̂ of correct and incorrect samples.
    """
    import numpy as np


    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    questions, samples, curves = (out_dir / "generation_questions.jsonl", out_dir / "generated.jsonl",
                                  out_dir / "generated_lhat.h5")
    write_jsonl(generate_problems(n_questions, seed=DEMO_PROBLEM_SEED), questions)
    samples.unlink(missing_ok=True)
    curves.unlink(missing_ok=True)
    gen = generate_samples(loaded, questions, samples,
                           GenerateConfig(n=n_samples, temperature=DEMO_TEMPERATURE, batch_size=16),
                           progress=False)
    lhat = lhat_traces(loaded, samples, curves, LhatConfig(), progress=False)
    correct = {r["id"]: r["correct"] for r in open_out(samples, resume=True).records}
    ends: dict[bool, list[float]] = {True: [], False: []}
    falling = []
    for tr in load_traces(curves, ["lhat"]):
        curve = tr["lhat"]
        ends[correct[tr.id]].append(float(curve[-1]))
        falling.append(bool(curve[-1] < curve[0]))
    s = gen.statistics or {}
    return jsonable({
        "n_questions": gen.n_inputs, "samples_per_question": n_samples,
        "temperature": DEMO_TEMPERATURE, "n_samples": gen.n_written,
        "accuracy": s.get("accuracy"), "pass_at_k": s.get("pass_at_k"),
        "mg_pass_at_k": s.get("mg_pass_at_k"), "length": s.get("length"),
        "truncated": s.get("truncated"), "tokens_per_s": round(gen.tokens_per_s, 1),
        "seconds_generate": round(gen.seconds_generate, 2),
        "lhat": {"n_traces": lhat.n_written, "median_lhat_no_trajectory": lhat.lhat_first_median,
                 "median_lhat_full_trajectory": lhat.lhat_last_median,
                 "share_falling": float(np.mean(falling)) if falling else None,
                 "median_final_lhat_correct": float(np.median(ends[True])) if ends[True] else None,
                 "median_final_lhat_incorrect": float(np.median(ends[False])) if ends[False] else None,
                 "seconds": round(lhat.seconds, 2)},
        "files": {"questions": str(questions), "samples": str(samples), "lhat_cache": str(curves)},
    })


def format_generation_demo(d: dict[str, Any]) -> str:
    """One paragraph of the demo report for `generation_demo`'s figures."""
    def num(x: Any, spec: str) -> str:
        return "n/a" if x is None else format(x, spec)

    acc, lh = d["accuracy"], d["lhat"]
    passes = ", ".join(f"pass@{k} {v['value']:.2f}" for k, v in (d["pass_at_k"] or {}).items())
    mg = ", ".join(f"mG-pass@{k} {v['value']:.2f}" for k, v in (d["mg_pass_at_k"] or {}).items())
    return (
        f"own samples: {d['n_questions']} fresh questions x {d['samples_per_question']} trajectories "
        f"(temperature {d['temperature']}, {d['tokens_per_s']:,.0f} tok/s): accuracy "
        f"{acc['value']:.3f} [{num(acc['ci'][0], '.3f')}, {num(acc['ci'][1], '.3f')}], {passes}, {mg}; "
        f"mean {d['length']['value']:.0f} tokens, {d['truncated']['value']:.0%} truncated; L̂ falls in "
        f"{num(lh['share_falling'], '.0%')} of them (median {num(lh['median_lhat_no_trajectory'], '.3g')}"
        f" -> {num(lh['median_lhat_full_trajectory'], '.3g')} nats), final L̂ median "
        f"{num(lh['median_final_lhat_correct'], '.3g')} correct vs "
        f"{num(lh['median_final_lhat_incorrect'], '.3g')} incorrect"
    )
