"""Benchmark caching to HDF5 against a plain forward: time ratio, write MB/s, peak memory vs length.

Builds a seeded random-init Qwen2 (default: d_model 512, 8 layers, 8 query / 2 KV heads, d_mlp
1408) with a byte-level tokenizer, writes synthetic JSONL traces whose trajectories have exactly T
tokens for each `--lengths` T, and measures in one process, per T (median of `--repeats`):

* `plain`: the same chunked forward through the KV cache that the capture runs, without hooks
  (`probes.measures.capture.activations.forward_plain`, same tokens, same chunk size, same backend);
* `cache`: the whole `probes.pipeline.capture.cache_traces` call on that trace into a fresh HDF5 file
  (reading, tokenizing, labelling, capture, stacking, writing and flushing all included);
* `ratio` = cache / plain (goal <= 1.3), with the outputs held in RAM and (`spooled`) written
  through a temporary file (`max_ram_mib=0`), and the write speed inside the HDF5 writer (MB/s,
  MB = 1e6 bytes of site data; RAM run).

With `--samples N` (default 200) it also times the built-in `tiny-reasoner` on its first N sample
traces (short traces: per-trace fixed costs dominate there): `cache` as it runs by default (short
traces several per right-padded forward, one commit per group: `probes.measures.capture.batching`) and
with `--batch-tokens 0` (one forward and one commit per trace), against one plain forward per
trace (the goal: cache <= 1.3x that) and against plain forwards of the same padded batches.

Then, in a separate process per cell (one trace of length T after a warm-up), the peak memory
beyond the process's baseline of: the plain forward, caching with outputs in RAM, and caching
with outputs spooled to a temporary file (`max_ram_mib=0`), each under glibc's default malloc and
with a fixed mmap threshold (`ALLOCATORS`). Memory is sampled every 2 ms from
/proc/self/status: VmRSS (all resident pages) and RssAnon (anonymous memory; spooled outputs are
file-backed page cache, reclaimable, and appear in VmRSS only while mapped).

Usage:
    nice -n 19 python bench/cache_bench.py
    nice -n 19 python bench/cache_bench.py --lengths 512 2048 --d-model 256 --layers 4 --json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hooks.model import LoadedModel
from probes.measures.capture.activations import forward_plain
from probes.measures.capture.batching import BATCH_TOKENS
from probes.models.load import boot_model
from probes.models.tiny import byte_tokenizer as _byte_tokenizer
from probes.pipeline.capture import CacheConfig, cache_traces
from probes.traces.read import read_traces
from probes.traces.tokenize import tokenize_traces


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096],
                   help="trajectory lengths T (tokens)")
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--d-mlp", type=int, default=1408)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--sites", nargs="+", default=["resid_post", "delta"])
    p.add_argument("--dtype", default="float16", help="storage dtype")
    p.add_argument("--chunk-size", type=int, default=512)
    p.add_argument("--backend", default="auto", choices=["auto", "hf", "bridge"])
    p.add_argument("--batch-tokens", type=int, default=BATCH_TOKENS,
                   help="cache's padded tokens per batched forward (0: one trace per forward)")
    p.add_argument("--repeats", type=int, default=3, help="timing repeats per length (median)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads on CPU")
    p.add_argument("--no-memory", action="store_true", help="skip the per-cell memory runs")
    p.add_argument("--samples", type=int, default=200,
                   help="also time tiny-reasoner on its first N sample traces (0: skip)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--cell", nargs=2, metavar=("MODE", "T"), help=argparse.SUPPRESS)
    return p.parse_args(argv)




def build_model(args: argparse.Namespace) -> LoadedModel:
    """The seeded random-init Qwen2 of the requested shape, booted as a bridge."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    torch.manual_seed(args.seed)
    cfg = Qwen2Config(
        vocab_size=args.vocab, hidden_size=args.d_model, intermediate_size=args.d_mlp,
        num_hidden_layers=args.layers, num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads, max_position_embeddings=max(args.lengths) + 256,
        bos_token_id=0, eos_token_id=0,
    )
    hf = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    return boot_model(hf, _byte_tokenizer(), spec="bench-qwen2", device=args.device)


def write_traces(path: Path, lengths: list[int], seed: int) -> Path:
    """One JSONL line per length: a trajectory of exactly T byte tokens (with a few reflections)."""
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz0123456789 +=.\n"))
    with path.open("w") as fh:
        for i, n in enumerate(lengths):
            text = "".join(rng.choice(letters, size=n))
            text = "Wait," + text[5:] if n > 5 else text
            fh.write(json.dumps({"id": f"T{n}-{i}", "question": "What is 2 + 2?",
                                 "trajectory": text, "answer": "4"}) + "\n")
    return path


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


@contextmanager
def peak_memory(out: dict[str, float]) -> Iterator[None]:
    """Record the peak VmRSS and RssAnon (MiB) beyond their values at entry."""
    base = {f: _status_kib(f) for f in ("VmRSS", "RssAnon")}
    peak = dict(base)
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.002):
            for f in peak:
                peak[f] = max(peak[f], _status_kib(f))

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        for f in peak:
            peak[f] = max(peak[f], _status_kib(f))
            out[f"extra_{f}_mib"] = (peak[f] - base[f]) / 1024


def _config(args: argparse.Namespace, **kw: Any) -> CacheConfig:
    return CacheConfig(sites=tuple(args.sites), dtype=args.dtype, chunk_size=args.chunk_size,
                       backend=args.backend, **kw)


def _sync(loaded: LoadedModel) -> None:
    if loaded.device.type == "cuda":
        torch.cuda.synchronize(loaded.device)


def time_lengths(args: argparse.Namespace, loaded: LoadedModel, workdir: Path) -> list[dict]:
    """Plain forward vs cache_traces per length, median of `args.repeats`."""
    rows = []
    warm = write_traces(workdir / "warm.jsonl", [64], args.seed)
    cache_traces(loaded, warm, workdir / "warm.h5", _config(args), overwrite=True)
    for n in args.lengths:
        traces = write_traces(workdir / f"T{n}.jsonl", [n], args.seed + n)
        (tt,), _ = tokenize_traces(read_traces(traces), loaded.tokenizer)
        end = tt.spans["trajectory"][1]
        ids = torch.as_tensor(tt.ids[:end]).unsqueeze(0)
        backend = None
        plain_s, cache_s, spool_s, write_s, mb = [], [], [], [], 0.0
        for _ in range(args.repeats):
            out = workdir / f"T{n}.h5"
            _sync(loaded)
            t0 = time.perf_counter()
            cache_traces(loaded, traces, out, _config(args, max_ram_mib=0), overwrite=True)
            _sync(loaded)
            spool_s.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            result = cache_traces(loaded, traces, out, _config(args, max_ram_mib=1e9),
                                  overwrite=True)
            _sync(loaded)
            cache_s.append(time.perf_counter() - t0)
            write_s.append(result.seconds_write)
            mb = result.bytes_sites / 1e6
            backend = result.backend
            t0 = time.perf_counter()
            forward_plain(loaded, ids, chunk_size=args.chunk_size, backend=backend)
            plain_s.append(time.perf_counter() - t0)
        plain, cached = statistics.median(plain_s), statistics.median(cache_s)
        rows.append({
            "T": n, "tokens_run": int(ids.shape[1]), "backend": backend,
            "plain_s": round(plain, 3), "cache_s": round(cached, 3),
            "ratio": round(cached / plain, 3),
            "cache_spooled_s": round(statistics.median(spool_s), 3),
            "ratio_spooled": round(statistics.median(spool_s) / plain, 3),
            "mb_written": round(mb, 1),
            "write_s": round(statistics.median(write_s), 4),
            "write_mb_s": round(mb / statistics.median(write_s), 0),
            "cache_mb_s": round(mb / cached, 1),
        })
    return rows


def time_samples(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """tiny-reasoner on its sample traces (median of repeats, in one process):

    * `plain_s`: one plain forward per trace (`forward_plain`: the baseline of the goal);
    * `plain_batched_s`: plain forwards of exactly the padded batches the capture runs (no hooks,
      no writing): what batching alone saves;
    * `cache_s`: `cache_traces` as it runs by default (short traces batched, commits grouped);
    * `cache_one_s`: `cache_traces` with `batch_tokens=0` (one forward and one commit per trace).
    """
    from hooks.hf_fast import plain_view
    from probes.demo.run import SAMPLE_TRACES
    from probes.measures.capture.activations import resolve_cache_sites, selection
    from probes.measures.capture.batching import forwards, plan_batches, row_bytes
    from probes.models.load import load_model

    loaded = load_model("tiny-reasoner", device=args.device)
    traces = workdir / "samples.jsonl"
    lines = SAMPLE_TRACES.read_text().splitlines(keepends=True)[:args.samples]
    traces.write_text("".join(lines))
    tokenized, _ = tokenize_traces(read_traces(traces), loaded.tokenizer)
    ends = [selection(tt, "trajectory")[1] for tt in tokenized]
    ids = [torch.as_tensor(tt.ids[:end]).unsqueeze(0) for tt, end in zip(tokenized, ends)]
    cfg = CacheConfig(sites=tuple(args.sites), dtype=args.dtype, chunk_size=args.chunk_size,
                      backend=args.backend, batch_tokens=args.batch_tokens)
    one = CacheConfig(sites=tuple(args.sites), dtype=args.dtype, chunk_size=args.chunk_size,
                      backend=args.backend, batch_tokens=0)
    site_map = resolve_cache_sites(cfg.sites, loaded.arch)
    groups = plan_batches(tokenized, positions="trajectory", batch_tokens=cfg.batch_tokens,
                          max_tokens=cfg.chunk_size,
                          bytes_per_row=row_bytes(site_map, loaded.arch.d_model, cfg.dtype),
                          max_bytes=cfg.max_ram_mib * 2**20)
    padded = []
    for group in groups:
        for part in forwards([ends[i] for i in group], cfg.batch_tokens):
            members = [group[k] for k in part]
            longest = max(ends[i] for i in members)
            batch = torch.zeros((len(members), longest), dtype=torch.long)
            for b, i in enumerate(members):
                batch[b, :ends[i]] = ids[i][0]
            padded.append(batch)
    view = plain_view(loaded.hf_model)

    def plain_batched() -> None:
        with torch.no_grad():
            for batch in padded:
                view.base_model(input_ids=batch.to(loaded.device), use_cache=False)

    cache_traces(loaded, traces, workdir / "warm.h5", CacheConfig(limit=3), overwrite=True)
    plain_s, batched_s, cache_s, one_s, write_s, mb = [], [], [], [], [], 0.0
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        result = cache_traces(loaded, traces, workdir / "samples.h5", cfg, overwrite=True)
        _sync(loaded)
        cache_s.append(time.perf_counter() - t0)
        write_s.append(result.seconds_write)
        mb = result.bytes_sites / 1e6
        t0 = time.perf_counter()
        cache_traces(loaded, traces, workdir / "one.h5", one, overwrite=True)
        _sync(loaded)
        one_s.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        for x in ids:
            forward_plain(loaded, x, chunk_size=args.chunk_size, backend=result.backend)
        plain_s.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        plain_batched()
        _sync(loaded)
        batched_s.append(time.perf_counter() - t0)
    med = statistics.median
    plain, cached = med(plain_s), med(cache_s)
    return {
        "n_traces": len(ids), "tokens_run": int(sum(ends)), "n_commits": len(groups),
        "n_forwards": len(padded), "padded_tokens": int(sum(b.numel() for b in padded)),
        "plain_s": round(plain, 3), "plain_batched_s": round(med(batched_s), 3),
        "cache_s": round(cached, 3), "cache_one_s": round(med(one_s), 3),
        "ratio": round(cached / plain, 3), "ratio_batched": round(cached / med(batched_s), 3),
        "ratio_one": round(med(one_s) / plain, 3),
        "write_s": round(med(write_s), 3), "mb_written": round(mb, 1),
        "write_mb_s": round(mb / med(write_s), 0), "cache_mb_s": round(mb / cached, 1),
    }


def run_cell(args: argparse.Namespace, mode: str, n: int) -> dict[str, Any]:
    """One memory cell (own process): warm up on a short trace, then one trace of length n."""
    loaded = build_model(args)
    with tempfile.TemporaryDirectory(dir=ROOT / "bench") as tmp:
        workdir = Path(tmp)
        warm = write_traces(workdir / "warm.jsonl", [64], args.seed)
        traces = write_traces(workdir / "t.jsonl", [n], args.seed + n)
        (tt,), _ = tokenize_traces(read_traces(traces), loaded.tokenizer)
        ids = torch.as_tensor(tt.ids[:tt.spans["trajectory"][1]]).unsqueeze(0)
        spool = 0.0 if mode == "cache_spool" else 1e9
        cache_traces(loaded, warm, workdir / "warm.h5", _config(args, max_ram_mib=spool))
        forward_plain(loaded, ids[:, :64], chunk_size=args.chunk_size)
        out: dict[str, Any] = {"mode": mode, "T": n}
        with peak_memory(out):
            if mode == "plain":
                backend = "bridge" if args.backend == "bridge" else "hf"
                forward_plain(loaded, ids, chunk_size=args.chunk_size, backend=backend)
            else:
                res = cache_traces(loaded, traces, workdir / "run.h5",
                                   _config(args, max_ram_mib=spool))
                out["output_mib"] = res.bytes_sites / 2**20
    return out


ALLOCATORS = {"default": {}, "fixed": {"MALLOC_MMAP_THRESHOLD_": "131072"}}
"""glibc settings per memory run: its default (the mmap threshold grows after large frees, so
freed chunk-sized blocks stay in the heap and RSS creeps with the number of chunks), and a fixed
128 KiB mmap threshold (large blocks go back to the OS when freed: RSS shows what is really held)."""


def memory_cells(args: argparse.Namespace, argv: list[str]) -> list[dict[str, Any]]:
    """Each (allocator, mode, T) cell in its own process, like docs/tooling.md#eager-attention."""
    cells = []
    for alloc, env in ALLOCATORS.items():
        for n in args.lengths:
            for mode in ("plain", "cache_ram", "cache_spool"):
                cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--cell", mode,
                       str(n)]
                res = subprocess.run(cmd, capture_output=True, text=True, check=True,
                                     env={**os.environ, **env})
                cell = json.loads(res.stdout.strip().splitlines()[-1])
                cells.append({**cell, "allocator": alloc})
    return cells


def _table(report: dict[str, Any]) -> str:
    lines = [
        f"model: random-init Qwen2, d_model {report['d_model']}, {report['layers']} layers, "
        f"sites {report['sites']} ({report['dtype']}), chunk {report['chunk_size']}, "
        f"{report['device']}, {report['threads']} thread(s)",
        "",
        "| T | backend | plain forward s | capture→HDF5 s | ratio | spooled s | ratio | "
        "MB written | write MB/s (in writer) | end-to-end MB/s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["timing"]:
        lines.append(f"| {r['T']} | {r['backend']} | {r['plain_s']:.3f} | {r['cache_s']:.3f} | "
                     f"{r['ratio']:.2f}× | {r['cache_spooled_s']:.3f} | "
                     f"{r['ratio_spooled']:.2f}× | {r['mb_written']:.1f} | "
                     f"{r['write_mb_s']:.0f} | {r['cache_mb_s']:.1f} |")
    if report.get("samples"):
        r = report["samples"]
        lines.append(
            f"| tiny-reasoner, {r['n_traces']} sample traces ({r['tokens_run']} tokens) | hf | "
            f"{r['plain_s']:.3f} | {r['cache_s']:.3f} | {r['ratio']:.2f}× | | | "
            f"{r['mb_written']:.1f} | {r['write_mb_s']:.0f} | {r['cache_mb_s']:.1f} |"
        )
        lines += [
            "",
            f"Short traces (tiny-reasoner, {r['n_traces']} sample traces, {r['tokens_run']} "
            f"tokens run): {r['n_forwards']} padded forwards ({r['padded_tokens']} tokens), "
            f"{r['n_commits']} commits",
            "",
            "| | seconds | cache / this |",
            "|---|---|---|",
            f"| plain forward, one per trace (baseline) | {r['plain_s']:.3f} | "
            f"{r['ratio']:.2f}× |",
            f"| plain forward of the same padded batches | {r['plain_batched_s']:.3f} | "
            f"{r['ratio_batched']:.2f}× |",
            f"| cache, batched (default) | {r['cache_s']:.3f} | 1.00× |",
            f"| cache, one trace per forward and commit (--batch-tokens 0) | "
            f"{r['cache_one_s']:.3f} | {r['cache_s'] / r['cache_one_s']:.2f}× "
            f"({r['ratio_one']:.2f}× the baseline) |",
        ]
    if report.get("memory"):
        by = {(c["allocator"], c["mode"], c["T"]): c for c in report["memory"]}
        for alloc in ALLOCATORS:
            lines += [
                "",
                f"Peak memory beyond the process baseline (MiB), one process per cell, glibc "
                f"{'default malloc' if alloc == 'default' else 'MALLOC_MMAP_THRESHOLD_=131072'}: "
                "VmRSS / RssAnon",
                "",
                "| T | output MiB | plain forward | cache, output in RAM | cache, output spooled |",
                "|---|---|---|---|---|",
            ]
            for n in report["lengths"]:
                cells = [by[(alloc, m, n)] for m in ("plain", "cache_ram", "cache_spool")]
                text = [f"{c['extra_VmRSS_mib']:.0f} / {c['extra_RssAnon_mib']:.0f}"
                        for c in cells]
                lines.append(f"| {n} | {cells[1].get('output_mib', 0):.1f} | "
                             + " | ".join(text) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark (or one memory cell with the hidden `--cell`)."""
    raw = list(sys.argv[1:] if argv is None else argv)
    args = _parse(raw)
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    if args.cell:
        print(json.dumps(run_cell(args, args.cell[0], int(args.cell[1]))))
        return 0
    loaded = build_model(args)
    with tempfile.TemporaryDirectory(dir=ROOT / "bench") as tmp:
        timing = time_lengths(args, loaded, Path(tmp))
        samples = time_samples(args, Path(tmp)) if args.samples > 0 else None
    passthrough = [a for a in raw if a != "--json"]
    report = {
        "d_model": args.d_model, "layers": args.layers, "sites": args.sites, "dtype": args.dtype,
        "chunk_size": args.chunk_size, "device": str(loaded.device), "threads": args.threads,
        "lengths": args.lengths, "timing": timing, "samples": samples,
        "memory": [] if args.no_memory else memory_cells(args, passthrough),
    }
    print(json.dumps(report) if args.json else _table(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
