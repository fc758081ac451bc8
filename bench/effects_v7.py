"""V7 (docs/methods.md#effects): real single-token edits vs the first-order predictions M7 / M6.

Runs `effects` on tiny-reasoner's sample traces for the random-init tiny Qwen2 / Llama / Qwen3
models (`probes.models.tiny`, byte tokenizer), tiny-reasoner and tiny-reasoner's random-init control,
and prints V7 (Pearson, Spearman, median relative error, by category) and the headline table
(trained vs random-init). At least 200 pairs per model.

    .venv/bin/python bench/effects_v7.py [--limit N] [--pairs P] [--out DIR]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from probes import DATA_DIR
from probes.models.load import boot_model
from probes.models.tiny import TINY_FAMILIES, byte_tokenizer, tiny_config
from probes.pipeline.effects import EffectsConfig, effects_traces
from probes.readouts.effects import format_summary, summarize

TRACES = DATA_DIR / "tiny_reasoner_traces.jsonl"


def tiny(family: str):
    cfg = tiny_config(family)
    cfg.max_position_embeddings = 1024    # the byte-level traces are ~300-500 tokens
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    return boot_model(hf, byte_tokenizer(), spec=f"tiny-{family}-random", device="cpu",
                      dtype="float32")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--limit", type=int, default=8)
    ap.add_argument("--pairs", type=int, default=30, help="pairs per category and trace")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--only", nargs="*", default=None)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (1 on a busy machine)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    out = args.out or Path(tempfile.mkdtemp(prefix="effects-v7-"))
    out.mkdir(parents=True, exist_ok=True)
    runs = {f"{f} random-init": (lambda f=f: tiny(f), "none") for f in TINY_FAMILIES}
    runs["tiny-reasoner"] = ("tiny-reasoner", "none")
    runs["tiny-reasoner random-init"] = ("tiny-reasoner", "random-init")
    for name, (model, control) in runs.items():
        if args.only and name not in args.only:
            continue
        path = out / (name.replace(" ", "_") + ".h5")
        path.unlink(missing_ok=True)
        t0 = time.perf_counter()
        cfg = EffectsConfig(pairs_per_category=args.pairs, limit=args.limit, control=control)
        res = effects_traces(model() if callable(model) else model, TRACES, path, cfg,
                             progress=False)
        s = summarize(path)
        print(f"== {name} ({time.perf_counter() - t0:.0f}s)")
        print(format_summary(s, res.directions), flush=True)
    trained, control = out / "tiny-reasoner.h5", out / "tiny-reasoner_random-init.h5"
    if trained.exists() and control.exists():
        s = summarize(trained, control, out / "plots")
        print("== headline: tiny-reasoner (this) vs its random-init control (versus)")
        print(format_summary(s))


if __name__ == "__main__":
    main()
