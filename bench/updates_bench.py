"""Benchmark the `updates` measurements (M1–M7 per trace) against a plain forward: time and memory.

Builds a seeded random-init Qwen2 (default: d_model 256, 4 layers, 8 query / 2 KV heads, d_mlp
1024, vocab 8192; `--shape r1-distill-1.5b` takes DeepSeek-R1-Distill-Qwen-1.5B's published config
instead: hidden 1536, 28 layers, 12 / 2 heads, intermediate 8960, vocab 151936, random weights,
nothing downloaded; only sensible on a GPU) with the byte-level tokenizer, and a synthetic trace
prompt (32) + trajectory (T) + scaffold (10) + answer (8) of random ids for each `--lengths` T.
Per T, the best of `--repeats` runs after a warm-up on a short trace, all in one process:

* `plain`: one forward of the plain HF model with sdpa under `torch.no_grad()`, no hooks, no
  logits (`probes.measures.capture.activations.forward_plain` in one chunk: the baseline, as in
  `bench/long_trace.py`; `updates` runs the eager reference while its patterns fit 64 MiB and the
  linear-memory sdpa pass above, `probes.measures.updates.shared_pass.choose_attention`);
* `total`: `probes.measures.updates.shared_pass.trace_update_arrays` (everything `updates` stores for a
trace: one
  forward + one backward shared by M1–M7), with its own stage split (`alignment` = the shared
  forward + backward + M6/M7, `m1_m4`, `m5`); the per-model constants (`RunConstants`: Grams of
  W_gate/W_up, o_proj weights) are built once per run, as `updates` does, and timed separately;
* for reference, the public one-call functions, each with its own forward: `token_updates`
  (M1–M4), `mlp_updates` (M5) and `answer_alignment` (M6 at every answer row + M7, forward and
  backward); their sum is what `updates` cost before the shared pass;

and prints each time and its ratio to `plain` (goal: total ≤ 3× at T = 2048).

Then, in a fresh process per (T, part) (same model, same warm-up), the peak memory of one run of
the part beyond the memory in use just before it: on CPU the process's peak RSS (VmHWM, reset just
before the run by writing 5 to /proc/self/clear_refs; `resource.getrusage` ru_maxrss is the
fallback, but it cannot be reset and after exec it includes the parent's RSS) − VmRSS before; on
CUDA `torch.cuda.max_memory_allocated` − `memory_allocated` before; "extra" = part − plain.

No assertions on timings. Usage:
    nice -n 19 python bench/updates_bench.py
    nice -n 19 python bench/updates_bench.py --lengths 256 1024 --no-memory --json
    python bench/updates_bench.py --device cuda --shape r1-distill-1.5b --lengths 1024 2048 4096
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hooks.model import LoadedModel
from probes.measures.updates.alignment import answer_alignment
from probes.measures.updates.attention import token_updates
from probes.measures.updates.mlp import mlp_updates
from probes.measures.updates.shared_pass import RunConstants, trace_update_arrays
from probes.models.load import boot_model
from probes.models.tiny import byte_tokenizer
from probes.traces.tokenize import TokenizedTrace

SHAPES: dict[str, dict[str, int]] = {
    "default": {"d_model": 256, "layers": 4, "heads": 8, "kv_heads": 2, "d_mlp": 1024,
                "vocab": 8192},
    # DeepSeek-R1-Distill-Qwen-1.5B config.json (= Qwen2.5-Math-1.5B): random weights, no download.
    "r1-distill-1.5b": {"d_model": 1536, "layers": 28, "heads": 12, "kv_heads": 2,
                        "d_mlp": 8960, "vocab": 151936},
}
PARTS = ("plain", "total", "token_updates", "mlp_updates", "answer_alignment")
"""Everything timed; `--memory-parts` picks which of them get a memory process."""


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[256, 512, 1024, 2048],
                   help="trajectory lengths T (tokens)")
    p.add_argument("--shape", choices=sorted(SHAPES), default="default",
                   help="model shape preset; the flags below override single fields")
    for name in ("d-model", "layers", "heads", "kv-heads", "d-mlp", "vocab"):
        p.add_argument(f"--{name}", type=int, default=None)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--scaffold-len", type=int, default=10)
    p.add_argument("--answer-len", type=int, default=8)
    p.add_argument("--repeats", type=int, default=2, help="timed runs per part and T (best of)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads on CPU")
    p.add_argument("--no-standalone", action="store_true",
                   help="skip the reference one-call functions (token_updates, mlp_updates, "
                        "answer_alignment)")
    p.add_argument("--no-memory", action="store_true", help="skip the per-cell memory processes")
    p.add_argument("--memory-parts", nargs="+", choices=PARTS, default=["plain", "total"],
                   help="parts that get a memory process per T")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    p.add_argument("--cell", nargs=2, metavar=("PART", "T"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for key, value in SHAPES[args.shape].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def build_model(args: argparse.Namespace) -> LoadedModel:
    """The seeded random-init Qwen2 of the requested shape, booted as a bridge (eager)."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    torch.manual_seed(args.seed)
    n_ctx = args.prompt_len + max(args.lengths) + args.scaffold_len + args.answer_len + 64
    cfg = Qwen2Config(
        vocab_size=args.vocab, hidden_size=args.d_model, intermediate_size=args.d_mlp,
        num_hidden_layers=args.layers, num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads, max_position_embeddings=n_ctx,
        tie_word_embeddings=False, bos_token_id=0, eos_token_id=0,
    )
    device = torch.device(args.device)
    if device.type == "cuda":  # initialise on the GPU (a 1.5B random init is slow on CPU)
        with torch.device(device):
            hf = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    else:
        hf = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    return boot_model(hf, byte_tokenizer(), spec=f"bench-qwen2-{args.shape}", device=args.device,
                      dtype=args.dtype)


def synthetic_trace(args: argparse.Namespace, n_traj: int, seed: int) -> TokenizedTrace:
    """Random ids laid out as prompt / trajectory / scaffold / answer (lhat_bench's layout)."""
    from lhat_bench import synthetic_trace as laid_out

    return laid_out(args, n_traj, np.random.default_rng(seed))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def part_fn(part: str, loaded: LoadedModel, consts: RunConstants, tt: TokenizedTrace,
            stages: dict[str, float] | None = None) -> Callable[[], Any]:
    """A zero-argument call that runs `part` once on `tt`."""
    ids = torch.as_tensor(tt.ids).reshape(1, -1).to(loaded.device)
    a, b = tt.spans["trajectory"]
    answer = tuple(tt.spans["answer"])
    query = answer[0] - 1

    def plain() -> Any:
        from probes.measures.capture.activations import forward_plain

        return forward_plain(loaded, ids, chunk_size=int(ids.shape[1]))

    calls = {
        "plain": plain,
        "total": lambda: trace_update_arrays(loaded, tt, consts, timings=stages),
        "token_updates": lambda: token_updates(loaded, ids, query),
        "mlp_updates": lambda: mlp_updates(loaded, ids, query, range(a, b)),
        "answer_alignment": lambda: answer_alignment(loaded, ids, (a, b), answer),
    }
    return calls[part]


def _timed(fn: Callable[[], Any], device: torch.device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def time_lengths(args: argparse.Namespace, loaded: LoadedModel, consts: RunConstants
                 ) -> list[dict[str, Any]]:
    """Best-of-`repeats` seconds of every part per T (after a warm-up on a short trace)."""
    parts = ["plain", "total"] + ([] if args.no_standalone else list(PARTS[2:]))
    warm = synthetic_trace(args, 16, args.seed)
    for part in parts:
        part_fn(part, loaded, consts, warm)()
    rows = []
    for n in args.lengths:
        tt = synthetic_trace(args, n, args.seed + n)
        row: dict[str, Any] = {"T": n, "tokens": len(tt.ids)}
        best_stages: dict[str, float] = {}
        for part in parts:
            best = float("inf")
            for _ in range(args.repeats):
                stages: dict[str, float] = {}
                sec = _timed(part_fn(part, loaded, consts, tt, stages), loaded.device)
                if sec < best:
                    best = sec
                    if part == "total":
                        best_stages = stages
            row[f"{part}_s"] = best
        row["stages_s"] = best_stages
        row["ratio"] = {p: row[f"{p}_s"] / row["plain_s"] for p in parts if p != "plain"}
        if not args.no_standalone:
            old = sum(row[f"{p}_s"] for p in PARTS[2:])
            row["separate_s"] = old
            row["ratio"]["separate"] = old / row["plain_s"]
        rows.append(row)
    return rows


def _status_mib(field: str) -> float | None:
    """A /proc/self/status memory field (VmRSS, VmHWM) in MiB, None where unavailable."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def run_cell(args: argparse.Namespace, part: str, n: int) -> dict[str, Any]:
    """One memory cell (own process): model, warm-up on a short trace, then one run of `part`."""
    loaded = build_model(args)
    consts = RunConstants(loaded)
    device = loaded.device
    part_fn(part, loaded, consts, synthetic_trace(args, 16, args.seed))()
    fn = part_fn(part, loaded, consts, synthetic_trace(args, n, args.seed + n))
    out: dict[str, Any] = {"part": part, "T": n}
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        _sync(device)
        out["peak_mib"] = (torch.cuda.max_memory_allocated(device) - before) / 2**20
        out["memory"] = "CUDA max_memory_allocated - memory_allocated before"
    else:
        before = _status_mib("VmRSS") or 0.0
        try:  # reset the peak RSS (VmHWM) to the current RSS (Linux >= 4.0)
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")
            reset = _status_mib("VmHWM") is not None
        except OSError:
            reset = False
        fn()
        if reset:
            out["peak_mib"] = _status_mib("VmHWM") - before
            out["memory"] = "process peak RSS (VmHWM, reset just before the run) - RSS before"
        else:  # ru_maxrss: the peak since start (after exec it includes the parent's RSS)
            out["peak_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before
            out["memory"] = "ru_maxrss (peak since process start, NOT reset) - RSS before"
    return out


def memory_cells(args: argparse.Namespace, argv: list[str]) -> list[dict[str, Any]]:
    """Each (T, part) in its own process, so every peak is that part's alone."""
    cells = []
    for n in args.lengths:
        for part in args.memory_parts:
            cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--cell", part, str(n)]
            res = subprocess.run(cmd, capture_output=True, text=True, check=True,
                                 env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
            cells.append(json.loads(res.stdout.strip().splitlines()[-1]))
    return cells


def _table(report: dict[str, Any]) -> str:
    m = report["model"]
    lines = [
        (f"model: random-init Qwen2 ({report['shape']}), d_model {m['d_model']}, {m['layers']} "
         f"layers, heads {m['heads']}/{m['kv_heads']}, d_mlp {m['d_mlp']}, vocab {m['vocab']}, "
         f"{m['dtype']}; trace = prompt {report['trace']['prompt']} + T + scaffold "
         f"{report['trace']['scaffold']} + answer {report['trace']['answer']}; "
         f"{report['device_name']}, {report['threads']} thread(s); best of {report['repeats']}; "
         f"RunConstants once per run: {report['constants_s']:.3f} s"),
        "",
    ]
    rows = report["timing"]
    standalone = "separate_s" in rows[0] if rows else False
    head = ("| T | plain fwd s | updates total s | × plain | shared fwd+bwd+M6/M7 s | M1–M4 s | "
            "M5 s |")
    sep = "|---|---|---|---|---|---|---|"
    if standalone:
        head += (" token_updates s (×) | mlp_updates s (×) | answer_alignment s (×) | "
                 "separate sum s (×) |")
        sep += "---|---|---|---|"
    lines += [head, sep]
    for r in rows:
        st = r["stages_s"]
        line = (f"| {r['T']} | {r['plain_s']:.3f} | {r['total_s']:.3f} | "
                f"**{r['ratio']['total']:.2f}×** | {st.get('alignment', float('nan')):.3f} | "
                f"{st.get('m1_m4', float('nan')):.3f} | {st.get('m5', float('nan')):.3f} |")
        if standalone:
            line += "".join(f" {r[f'{p}_s']:.3f} ({r['ratio'][p]:.2f}×) |"
                            for p in PARTS[2:])
            line += f" {r['separate_s']:.3f} ({r['ratio']['separate']:.2f}×) |"
        lines.append(line)
    if report.get("memory"):
        by = {(c["part"], c["T"]): c for c in report["memory"]}
        parts = [p for p in PARTS if any(c["part"] == p for c in report["memory"])]
        lines += ["", (f"Peak memory of one run beyond the memory in use before it (MiB), one "
                       f"process per cell: {report['memory'][0]['memory']}; (+extra over plain)"),
                  "", "| T | " + " | ".join(parts) + " |", "|---|" + "---|" * len(parts)]
        for n in report["lengths"]:
            plain = by.get(("plain", n), {}).get("peak_mib")
            cells = []
            for p in parts:
                c = by[(p, n)]["peak_mib"]
                extra = "" if p == "plain" or plain is None else f" (+{c - plain:.0f})"
                cells.append(f"{c:.0f}{extra}")
            lines.append(f"| {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark (or one memory cell with the hidden `--cell`)."""
    raw = list(sys.argv[1:] if argv is None else argv)
    args = _parse(raw)
    if torch.device(args.device).type == "cpu":
        torch.set_num_threads(args.threads)
    if args.cell:
        print(json.dumps(run_cell(args, args.cell[0], int(args.cell[1]))))
        return 0
    loaded = build_model(args)
    device = loaded.device
    _sync(device)
    t0 = time.perf_counter()
    consts = RunConstants(loaded)
    _sync(device)
    constants_s = time.perf_counter() - t0
    timing = time_lengths(args, loaded, consts)
    passthrough = [a for a in raw if a != "--json"]
    report = {
        "shape": args.shape,
        "model": {"d_model": args.d_model, "layers": args.layers, "heads": args.heads,
                  "kv_heads": args.kv_heads, "d_mlp": args.d_mlp, "vocab": args.vocab,
                  "dtype": args.dtype, "init": "random"},
        "trace": {"prompt": args.prompt_len, "scaffold": args.scaffold_len,
                  "answer": args.answer_len},
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(), "repeats": args.repeats,
        "lengths": args.lengths, "constants_s": constants_s, "timing": timing,
        "memory": [] if args.no_memory else memory_cells(args, passthrough),
    }
    print(json.dumps(report) if args.json else _table(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
