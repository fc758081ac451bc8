"""Benchmark the L̂ curve: `lhat_naive` (a forward per prefix) vs `lhat_fast` (packed suffixes).

Builds a random-init Qwen2 of a given shape (default: d_model 256, 4 layers, 8 query / 2 KV heads),
a synthetic trace of T trajectory tokens per `--lengths`, and times

* `lhat_naive` on a random subset of `--naive-prefixes` prefixes, extrapolated to all T+1 prefixes
  by the mean time per prefix (marked "~", "extrapolated" in JSON), or on all of them with `--full`;
* `lhat_fast` on all T+1 prefixes;

then prints T, the naive seconds, the fast seconds, the speed-up, max |fast − naive| over the
prefixes the naive run evaluated, and the peak memory of each phase (RSS sampled every 5 ms from
/proc on CPU; `torch.cuda.max_memory_allocated` on CUDA).

Usage:
    nice -n 19 python bench/lhat_bench.py --lengths 512
    python bench/lhat_bench.py --device cuda --dtype bfloat16 --lengths 2048 8192 --json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hooks.model import LoadedModel
from probes.measures.lhat.fast import lhat_fast, lhat_naive
from probes.models.load import boot_model
from probes.models.tiny import byte_tokenizer as _byte_tokenizer
from probes.traces.read import Trace
from probes.traces.tokenize import SPAN_NAMES, TokenizedTrace


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--lengths", type=int, nargs="+", default=[512, 2048], help="trajectory lengths T"
    )
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--d-mlp", type=int, default=1024)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--prompt-len", type=int, default=48)
    p.add_argument("--scaffold-len", type=int, default=10, help="RaML's scaffold is ~10 tokens")
    p.add_argument("--answer-len", type=int, default=3)
    p.add_argument("--naive-prefixes", type=int, default=16, help="K prefixes timed for naive")
    p.add_argument("--full", action="store_true", help="run naive on all T+1 prefixes")
    p.add_argument("--chunk-size", type=int, default=512)
    p.add_argument("--max-pack-tokens", type=int, default=512)
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads on CPU")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    return p.parse_args(argv)




def build_model(args: argparse.Namespace, n_ctx: int) -> LoadedModel:
    """Random-init Qwen2 of the requested shape, booted as a bridge."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    torch.manual_seed(args.seed)
    cfg = Qwen2Config(
        vocab_size=args.vocab,
        hidden_size=args.d_model,
        intermediate_size=args.d_mlp,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=n_ctx,
        bos_token_id=0,
        eos_token_id=0,
    )
    hf = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    return boot_model(
        hf, _byte_tokenizer(), spec="bench-qwen2", device=args.device, dtype=args.dtype
    )


def synthetic_trace(
    args: argparse.Namespace, n_traj: int, rng: np.random.Generator
) -> TokenizedTrace:
    """Random ids with prompt / trajectory / scaffold / answer spans."""
    lengths = (args.prompt_len, n_traj, args.scaffold_len, args.answer_len)
    ids = rng.integers(1, args.vocab, size=sum(lengths)).astype(np.int64)
    spans, start = {}, 0
    for name, n in zip(SPAN_NAMES, lengths):
        spans[name] = (start, start + n)
        start += n
    return TokenizedTrace(
        trace=Trace(f"bench-T{n_traj}", "q", "t", "a", {}, 1),
        ids=ids,
        spans=spans,
        trajectory_offsets=np.zeros((n_traj, 2), dtype=np.int64),
        trajectory_text="",
        prompt_text="",
    )


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@contextmanager
def peak_memory(device: torch.device, out: dict[str, float]) -> Iterator[None]:
    """Record a phase's peak memory (MiB) in `out["peak_mib"]`: RSS on CPU, allocated on CUDA."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        yield
        torch.cuda.synchronize(device)
        out["peak_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
        return
    peak = [_rss_bytes()]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.005):
            peak[0] = max(peak[0], _rss_bytes())

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        out["peak_mib"] = max(peak[0], _rss_bytes()) / 2**20


def _timed(fn: Callable[[], Any], device: torch.device) -> tuple[Any, float]:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return result, time.perf_counter() - t0


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the benchmark; returns the JSON-able report."""
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)
    n_ctx = max(args.lengths) + args.prompt_len + args.scaffold_len + args.answer_len
    loaded = build_model(args, n_ctx)
    device = loaded.device
    lhat_fast(loaded, synthetic_trace(args, 8, rng))  # warm-up
    rows = []
    for n_traj in args.lengths:
        tt = synthetic_trace(args, n_traj, rng)
        mem_fast: dict[str, float] = {}
        with peak_memory(device, mem_fast):
            res, fast_s = _timed(
                lambda: lhat_fast(
                    loaded, tt, chunk_size=args.chunk_size, max_pack_tokens=args.max_pack_tokens  # noqa: B023 (called within the iteration)
                ),
                device,
            )
        if args.full or args.naive_prefixes >= n_traj + 1:
            ts = np.arange(n_traj + 1)
        else:
            ts = np.sort(rng.choice(n_traj + 1, size=args.naive_prefixes, replace=False))
        mem_naive: dict[str, float] = {}
        with peak_memory(device, mem_naive):
            naive, naive_run_s = _timed(lambda: lhat_naive(loaded, tt, ts=ts), device)  # noqa: B023 (called within the iteration)
        extrapolated = len(ts) < n_traj + 1
        naive_s = naive_run_s / len(ts) * (n_traj + 1)
        rows.append(
            {
                "T": n_traj,
                "n_tokens": tt.n_tokens,
                "naive_s": naive_s,
                "naive_extrapolated": extrapolated,
                "naive_prefixes_run": int(len(ts)),
                "naive_run_s": naive_run_s,
                "fast_s": fast_s,
                "speedup": naive_s / fast_s,
                "max_abs_dnll": float(np.abs(res.lhat[ts].astype(np.float64) - naive).max()),
                "copies_per_pack": res.copies_per_pack,
                "n_packs": res.n_packs,
                "n_prefill_chunks": res.n_prefill_chunks,
                "peak_mib_fast": mem_fast["peak_mib"],
                "peak_mib_naive": mem_naive["peak_mib"],
            }
        )
    arch = loaded.arch
    return {
        "model": {
            "family": arch.family, "d_model": arch.d_model, "n_layers": arch.n_layers,
            "n_heads": arch.n_heads, "n_kv_heads": arch.n_kv_heads, "d_mlp": arch.d_mlp,
            "vocab": arch.vocab_size, "dtype": arch.dtype, "init": "random",
        },
        "trace": {
            "prompt_len": args.prompt_len, "scaffold_len": args.scaffold_len,
            "answer_len": args.answer_len,
        },
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(),
        "chunk_size": args.chunk_size,
        "max_pack_tokens": args.max_pack_tokens,
        "memory": "peak CUDA allocated" if device.type == "cuda" else "peak process RSS",
        "rows": rows,
    }


def format_table(report: dict[str, Any]) -> str:
    """The report as a plain-text table."""
    m = report["model"]
    head = (
        f"# {m['family']} d_model={m['d_model']} layers={m['n_layers']} heads={m['n_heads']}/"
        f"{m['n_kv_heads']} d_mlp={m['d_mlp']} vocab={m['vocab']} {m['dtype']} (random init); "
        f"device={report['device_name']} threads={report['threads']} "
        f"chunk={report['chunk_size']} max_pack_tokens={report['max_pack_tokens']}; "
        f"memory = {report['memory']} per phase (MiB)"
    )
    cols = f"{'T':>6} {'naive s':>12} {'fast s':>8} {'speed-up':>9} {'max|dNLL|':>10} "
    cols += f"{'k x packs':>11} {'mem naive':>10} {'mem fast':>9}"
    lines = [head, cols]
    for r in report["rows"]:
        naive = f"{'~' if r['naive_extrapolated'] else ''}{r['naive_s']:.2f}"
        lines.append(
            f"{r['T']:>6} {naive:>12} {r['fast_s']:>8.2f} {r['speedup']:>8.1f}x "
            f"{r['max_abs_dnll']:>10.2e} {str(r['copies_per_pack']) + 'x' + str(r['n_packs']):>11} "
            f"{r['peak_mib_naive']:>10.0f} {r['peak_mib_fast']:>9.0f}"
        )
    if any(r["naive_extrapolated"] for r in report["rows"]):
        lines.append(
            "~ = extrapolated: mean time per prefix over "
            + ", ".join(f"{r['naive_prefixes_run']} (T={r['T']})" for r in report["rows"])
            + " random prefixes x (T+1); max|dNLL| is over those prefixes only"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    args = _parse(argv)
    report = run(args)
    print(json.dumps(report) if args.json else format_table(report))


if __name__ == "__main__":
    main()
