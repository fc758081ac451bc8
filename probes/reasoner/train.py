"""Train `tiny-reasoner` from scratch: `python -m probes.reasoner.train [--out DIR]`.

Generates the task's traces (`probes.reasoner.task`), trains the byte-level BPE tokenizer, then a
small Qwen2-architecture causal LM (RMSNorm, RoPE, GQA, SwiGLU) on prompt + trajectory + RaML
scaffold + answer, with the loss on everything after the prompt. Deterministic: fixed seeds, a
private `torch.Generator`, deterministic algorithms and a fixed thread count. Writes a standard HF
folder (config.json, model.safetensors, tokenizer files) that `probes.models.load.load_model` reads.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from probes import DATA_DIR
from probes.models.load import resolve_spec
from probes.reasoner import planted
from probes.reasoner.task import Problem, generate_problems, write_jsonl
from probes.reasoner.tokenizer import build_tokenizer
from probes.safe_output import write_text
from probes.traces.read import Trace
from probes.traces.tokenize import DEFAULT_SCAFFOLD, tokenize_trace

CHECKPOINT_DIR = Path(__file__).resolve().parent / "checkpoint"
PLANTED_CHECKPOINT_DIR = Path(__file__).resolve().parent / "checkpoint_planted"
SAMPLES_PATH = DATA_DIR / "tiny_reasoner_traces.jsonl"
N_SAMPLES = 200
# Disjoint seeds: training problems, the shipped sample traces, the evaluation (docs/models.md).
TRAIN_SEED, SAMPLE_SEED, EVAL_SEED = 1, 2, 3


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """What defines the shipped model; stored in the checkpoint as `training_config.json`."""

    n_train: int = 20_000  # generated training problems (seed TRAIN_SEED)
    vocab_size: int = 400  # BPE vocabulary incl. bytes and special tokens
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 2  # GQA: two query heads share each k/v head
    d_mlp: int = 384
    max_positions: int = 512
    steps: int = 1200
    batch_size: int = 32
    lr: float = 3e-3
    warmup: int = 100
    weight_decay: float = 0.01
    seed: int = 0  # initialisation and batch order
    threads: int = 2  # fixed so float reductions are the same on every run
    task: str = "sums"  # the generator of TASKS: "sums" (tiny-reasoner) or "planted"
    prefix_share: float = 0.0  # share of training sequences cut after a random trajectory prefix
    init_from: str | None = None  # start from this model's weights and tokenizer (a built-in name)

    def __post_init__(self) -> None:
        if self.d_model % self.n_heads or self.n_heads % self.n_kv_heads:
            raise ValueError("d_model must divide by n_heads and n_heads by n_kv_heads")
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {sorted(TASKS)}, not {self.task!r}")
        if not 0.0 <= self.prefix_share <= 1.0:
            raise ValueError("prefix_share must be in [0, 1]")


TASKS = {"sums": generate_problems, "planted": planted.generate_problems}
"""Problem generators by `TrainConfig.task` (each `(n, *, seed) -> list[Problem]`)."""

PLANTED_CONFIG = TrainConfig(task="planted", prefix_share=0.75, init_from="tiny-reasoner",
                             n_train=4_000, steps=1000, batch_size=16, lr=1e-3, warmup=30, threads=2)
"""`tiny-reasoner-planted` (docs/models.md): tiny-reasoner (its weights and tokenizer) fine-tuned on
the planted task, three quarters of the sequences cut after a random trajectory prefix (so the
answer loss after a prefix, L̂, is what the model is trained to predict); 1000 steps (300 left the
reflection's effect too weak to detect), about 3.5 min on 2 idle cores."""


def problem_trace(p: Problem) -> Trace:
    """A generated problem as the `Trace` the rest of the toolkit reads."""
    return Trace(
        id=p.id, question=p.question, trajectory=p.trajectory, answer=p.answer, meta={}, line_no=0
    )


def encode_for_training(
    problems: list[Problem], tokenizer, *, prefix_share: float = 0.0, seed: int = 0
) -> list[tuple[np.ndarray, int]]:
    """Token ids (prompt, trajectory, scaffold, answer, eos) and the prompt length, per problem.

    Uses `probes.traces.tokenize.tokenize_trace`, so the model is trained on exactly the token layout that
    the toolkit later feeds it. With `prefix_share` > 0 that share of the sequences (drawn with
    `seed`) keep only the first t trajectory tokens (t uniform on 0..T) before the scaffold and the
    full answer: the layout L̂ feeds the model after a prefix (`probes.measures.lhat`).
    """
    rng = np.random.default_rng(seed)
    out = []
    for p in problems:
        tt = tokenize_trace(problem_trace(p), tokenizer)
        ids = np.concatenate([tt.ids, [tokenizer.eos_token_id]]).astype(np.int64)
        if prefix_share and rng.random() < prefix_share:
            a, b = tt.spans["trajectory"]
            ids = np.concatenate([ids[: a + int(rng.integers(0, b - a + 1))], ids[b:]])
        out.append((ids, tt.spans["prompt"][1]))
    return out


def _batch(
    seqs: list[tuple[np.ndarray, int]], idx: np.ndarray, pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n = max(len(seqs[i][0]) for i in idx)
    ids = torch.full((len(idx), n), pad_id, dtype=torch.long)
    labels = torch.full((len(idx), n), -100, dtype=torch.long)
    mask = torch.zeros((len(idx), n), dtype=torch.long)
    for row, i in enumerate(idx):
        seq, n_prompt = seqs[i]
        ids[row, : len(seq)] = torch.from_numpy(seq)
        labels[row, n_prompt : len(seq)] = torch.from_numpy(seq[n_prompt:])
        mask[row, : len(seq)] = 1
    return ids, labels, mask


def model_config(cfg: TrainConfig, tokenizer) -> Qwen2Config:
    """The Qwen2 config of the shipped model."""
    return Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=cfg.d_model,
        intermediate_size=cfg.d_mlp,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads,
        max_position_embeddings=cfg.max_positions,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        architectures=["Qwen2ForCausalLM"],
    )


def _log(line: str) -> None:
    print(line, flush=True)


def train(
    cfg: TrainConfig,
    out: Path,
    *,
    log=_log,
    problems: list[Problem] | None = None,
    tokenizer=None,
    stop_after: int | None = None,
) -> Path:
    """Build the tokenizer and model, train, and save an HF folder to `out`.

    Args:
        cfg: The training configuration.
        out: Destination folder (created; existing model files are overwritten).
        log: Where progress lines go.
        problems: Training problems; None generates `cfg.n_train` of `cfg.task` with seed
            `TRAIN_SEED` (the shipped model). Given, `cfg.n_train` is ignored (the support-set
            sweep passes its own).
        tokenizer: A tokenizer to reuse; None trains the BPE on the problems' text.
        stop_after: Save after this many optimizer steps of the same `cfg.steps` schedule (the
            learning rate follows the full run's warm-up and cosine), i.e. an early checkpoint of the
            same deterministic run; None trains all `cfg.steps`. Recorded as `trained_steps` in
            `training_config.json`.

    Returns:
        `out`.
    """
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(cfg.threads)
    torch.use_deterministic_algorithms(True)
    try:
        return _train(cfg, out, log, problems, tokenizer, stop_after)
    finally:  # leave the process as we found it
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)


def _train(cfg: TrainConfig, out: Path, log, problems, tokenizer, stop_after) -> Path:
    t0 = time.time()
    if problems is None:
        problems = TASKS[cfg.task](cfg.n_train, seed=TRAIN_SEED)
    if cfg.init_from is not None and tokenizer is None:
        from transformers import AutoTokenizer


        tokenizer = AutoTokenizer.from_pretrained(resolve_spec(cfg.init_from), local_files_only=True)
    if tokenizer is None:
        corpus = [p.question for p in problems] + [p.trajectory for p in problems]
        corpus += [DEFAULT_SCAFFOLD + p.answer + "}" for p in problems]
        tokenizer = build_tokenizer(corpus, vocab_size=cfg.vocab_size)
    n_steps = cfg.steps if stop_after is None else min(stop_after, cfg.steps)
    seqs = encode_for_training(problems, tokenizer, prefix_share=cfg.prefix_share,
                               seed=cfg.seed)
    log(f"data: {len(seqs)} sequences, mean {np.mean([len(s) for s, _ in seqs]):.0f} tokens "
        f"({time.time() - t0:.1f}s)")

    torch.manual_seed(cfg.seed)
    if cfg.init_from is not None:  # fine-tune a built-in checkpoint (its architecture and weights)

        model = Qwen2ForCausalLM.from_pretrained(resolve_spec(cfg.init_from), local_files_only=True)
    else:
        model = Qwen2ForCausalLM(model_config(cfg, tokenizer))
    model.config._attn_implementation = "sdpa"
    n_params = sum(p.numel() for p in model.parameters())
    log(f"model: {n_params / 1e6:.2f}M parameters")
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0}],
        lr=cfg.lr,
        betas=(0.9, 0.98),
    )

    def lr_at(step: int) -> float:
        if step < cfg.warmup:
            return cfg.lr * (step + 1) / cfg.warmup
        frac = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * frac))

    gen = torch.Generator().manual_seed(cfg.seed)
    order = torch.randperm(len(seqs), generator=gen).numpy()
    cursor = 0
    model.train()
    for step in range(n_steps):
        if cursor + cfg.batch_size > len(order):
            order, cursor = torch.randperm(len(seqs), generator=gen).numpy(), 0
        idx = order[cursor : cursor + cfg.batch_size]
        cursor += cfg.batch_size
        ids, labels, mask = _batch(seqs, idx, tokenizer.pad_token_id)
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 100 == 0 or step == n_steps - 1:
            log(f"step {step:5d}  loss {loss.item():.4f}  lr {lr_at(step):.2e}  {time.time() - t0:.0f}s")

    model.eval()
    out.mkdir(parents=True, exist_ok=True)
    model.config._attn_implementation = "eager"
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    record = asdict(cfg) | ({} if n_steps == cfg.steps else {"trained_steps": n_steps})
    if cfg.task == "sums" and not cfg.prefix_share and cfg.init_from is None:
        del record["task"], record["prefix_share"], record["init_from"]  # as tiny-reasoner shipped
    write_text(out / "training_config.json", json.dumps(record, indent=2) + "\n")
    log(f"saved to {out} after {time.time() - t0:.0f}s")
    return out


def main(argv: list[str] | None = None) -> int:
    """CLI: train and write the checkpoint."""
    parser = argparse.ArgumentParser(prog="python -m probes.reasoner.train", description=__doc__)
    parser.add_argument(
        "--task", choices=sorted(TASKS), default="sums",
        help="sums: tiny-reasoner (default); planted: tiny-reasoner-planted (its own defaults: "
             "PLANTED_CONFIG, --out probes/reasoner/checkpoint_planted, its samples file)",
    )
    parser.add_argument("--out", type=Path, default=None, help="output HF folder")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps")
    parser.add_argument(
        "--samples", type=Path, default=None, help="where the 200 demo traces are written"
    )
    parser.add_argument(
        "--stop-after", type=int, default=None, metavar="N",
        help="save after N steps of the --steps schedule (an early checkpoint; needs --out)",
    )
    parser.add_argument(
        "--threads", type=int, default=None,
        help="torch threads (default 2, the shipped runs'; results are "
             "reproducible for a fixed value)",
    )
    args = parser.parse_args(argv)
    base = PLANTED_CONFIG if args.task == "planted" else TrainConfig()
    shipped = PLANTED_CHECKPOINT_DIR if args.task == "planted" else CHECKPOINT_DIR
    out = args.out if args.out is not None else shipped
    if args.stop_after is not None and out.resolve() == shipped:
        name = "tiny-reasoner-planted" if args.task == "planted" else "tiny-reasoner"
        parser.error(f"--stop-after would overwrite the shipped {name}; pass --out DIR")
    samples = args.samples or (planted.SAMPLES_PATH if args.task == "planted" else SAMPLES_PATH)
    write_jsonl(TASKS[args.task](N_SAMPLES, seed=SAMPLE_SEED), samples)
    cfg = replace(base, steps=args.steps if args.steps is not None else base.steps,
                  threads=args.threads if args.threads is not None else base.threads)
    train(cfg, out, stop_after=args.stop_after)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
