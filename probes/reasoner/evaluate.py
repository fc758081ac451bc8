"""Measure `tiny-reasoner`: `python -m probes.reasoner.evaluate [--model M] [--n 500] [--json]`.

On `n` fresh problems (a seed the training never saw) it reports
- greedy answer accuracy after the reference trajectory (prompt + trajectory + scaffold → answer),
- greedy answer accuracy after the model's own greedy trajectory (it reasons from the prompt alone),
- greedy answer accuracy with the trajectory removed (prompt + scaffold → answer), beside the
  chance level (the most frequent answer's share, i.e. the best constant guess),
- mean answer NLL with the full trajectory and with none, and their ratio.
These are the figures quoted in docs/models.md ("The built-in reasoner").
"""

from __future__ import annotations

import argparse
import json
from collections import Counter

import numpy as np
import torch

from hooks.model import LoadedModel
from probes.measures.answers import answer_scores, without_trajectory
from probes.models.load import load_model
from probes.reasoner.train import EVAL_SEED, TASKS, problem_trace
from probes.traces.tokenize import DEFAULT_SCAFFOLD, tokenize_trace


@torch.inference_mode()
def self_generated_accuracy(
    loaded: LoadedModel, tokenized: list, answers: list[str], *, max_new_tokens: int = 400
) -> float:
    """Share of problems the model solves reasoning on its own (greedy, from the prompt).

    The model generates until `</think>` (or eos); the scaffold is then appended and the answer
    decoded greedily up to the closing brace.
    """
    hf, tok = loaded.hf_model, loaded.tokenizer
    think_end = tok.convert_tokens_to_ids("</think>")
    scaffold = tok(DEFAULT_SCAFFOLD, add_special_tokens=False)["input_ids"]
    n_ok = 0
    for tt, answer in zip(tokenized, answers, strict=True):
        prompt = torch.as_tensor(tt.ids[: tt.spans["prompt"][1]], device=loaded.device)[None]
        out = hf.generate(
            prompt,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=[think_end, tok.eos_token_id],
            pad_token_id=tok.pad_token_id,
        )
        ctx = torch.cat([out, torch.as_tensor(scaffold, device=loaded.device)[None]], dim=1)
        ans = hf.generate(
            ctx, max_new_tokens=8, do_sample=False, eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
        text = tok.decode(ans[0, ctx.shape[1]:], skip_special_tokens=True)
        n_ok += text.split("}")[0] == answer
    return n_ok / len(answers)


def _left_padded(rows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    n = max(len(r) for r in rows)
    ids = torch.full((len(rows), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), n), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, n - len(r) :] = torch.as_tensor(r)
        mask[i, n - len(r) :] = 1
    return ids.to(device), mask.to(device)


@torch.inference_mode()
def own_answers(
    loaded: LoadedModel,
    tokenized: list,
    *,
    batch_size: int = 64,
    max_new_tokens: int = 400,
    temperature: float | None = None,
    seed: int = 0,
) -> list[str]:
    """The answers the model gives after reasoning on its own, in left-padded batches.

    The same two stages as `self_generated_accuracy` (trajectory from the prompt until `</think>` or
    eos, then the scaffold appended and the answer decoded up to the closing brace), run on
    `batch_size` problems at once: the figure for hundreds of problems in seconds instead of minutes.

    Args:
        loaded: The model.
        tokenized: Tokenized problems (only their prompt spans are used).
        batch_size: Problems per batch.
        max_new_tokens: Longest own trajectory.
        temperature: None for greedy decoding; else sampling at this temperature (both stages),
            seeded with `seed`.
        seed: Seed of the sampling (`torch.manual_seed`, once, before the first batch).

    Returns:
        The decoded answer text (before `}`) per problem, in order.
    """
    hf, tok = loaded.hf_model, loaded.tokenizer
    stops = [tok.convert_tokens_to_ids("</think>"), tok.eos_token_id]
    scaffold = tok(DEFAULT_SCAFFOLD, add_special_tokens=False)["input_ids"]
    sample = {"do_sample": False} if temperature is None else {
        "do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0}
    if temperature is not None:
        torch.manual_seed(seed)
    out: list[str] = []
    for lo in range(0, len(tokenized), batch_size):
        prompts = [tt.ids[: tt.spans["prompt"][1]].tolist() for tt in tokenized[lo : lo + batch_size]]
        ids, mask = _left_padded(prompts, tok.pad_token_id, loaded.device)
        gen = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                          eos_token_id=stops, pad_token_id=tok.pad_token_id, **sample)
        ctxs = []
        for prompt, row in zip(prompts, gen[:, ids.shape[1] :].tolist()):
            cut = next((i + 1 for i, t in enumerate(row) if t in stops), len(row))
            ctxs.append(prompt + row[:cut] + scaffold)
        ids, mask = _left_padded(ctxs, tok.pad_token_id, loaded.device)
        ans = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8,
                          eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **sample)
        out += [t.split("}")[0] for t in tok.batch_decode(ans[:, ids.shape[1] :], skip_special_tokens=True)]
    return out


def evaluate(
    model: str = "tiny-reasoner", *, n: int = 500, device: str = "auto", batch_size: int = 1,
    task: str = "sums",
) -> dict:
    """Compute the docs/models.md figures on `n` fresh problems (seed `EVAL_SEED`) of `task`
    (`probes.reasoner.train.TASKS`: "planted" for `tiny-reasoner-planted`).

    `batch_size` > 1 runs the own-trajectory figure through `own_answers` (left-padded batches).
    """
    loaded = load_model(model, device=device)
    problems = TASKS[task](n, seed=EVAL_SEED)
    tokenized = [tokenize_trace(problem_trace(p), loaded.tokenizer) for p in problems]
    answers = [p.answer for p in problems]
    full = answer_scores(loaded, tokenized)
    bare = answer_scores(loaded, [without_trajectory(tt) for tt in tokenized])
    nll_full = float(np.mean([s.nll for s in full]))
    nll_bare = float(np.mean([s.nll for s in bare]))
    return {
        "model": model,
        "n_problems": n,
        "eval_seed": EVAL_SEED,
        "accuracy_reference_trajectory": float(np.mean([s.correct for s in full])),
        "accuracy_own_trajectory": (
            self_generated_accuracy(loaded, tokenized, answers) if batch_size <= 1 else float(np.mean(
                [a == b for a, b in zip(own_answers(loaded, tokenized, batch_size=batch_size), answers)]))
        ),
        "accuracy_no_trajectory": float(np.mean([s.correct for s in bare])),
        "chance_best_constant_guess": Counter(answers).most_common(1)[0][1] / n,
        "n_distinct_answers": len(set(answers)),
        "mean_answer_nll_full": nll_full,
        "mean_answer_nll_no_trajectory": nll_bare,
        "nll_ratio_full_over_none": nll_full / nll_bare,
        "share_with_planted_mistake": float(np.mean([p.n_mistakes > 0 for p in problems])),
    }


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    parser = argparse.ArgumentParser(prog="python -m probes.reasoner.evaluate", description=__doc__)
    parser.add_argument("--model", default="tiny-reasoner", help="model spec (default built-in)")
    parser.add_argument("--n", type=int, default=500, help="fresh problems (default 500)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--task", choices=sorted(TASKS), default="sums",
                        help="the problems: sums (tiny-reasoner's) or planted (tiny-reasoner-planted's)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--batch-size", type=int, default=1,
                        help="problems per batch for the own-trajectory figure (default 1: one at a time)")
    args = parser.parse_args(argv)
    result = evaluate(args.model, n=args.n, device=args.device, batch_size=args.batch_size,
                      task=args.task)
    if args.json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            print(f"{k:<34} {v:.4f}" if isinstance(v, float) else f"{k:<34} {v}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
