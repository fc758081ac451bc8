"""The GPU path, exercised: every command end to end on CUDA, and CUDA vs float32 CPU results.

Without CUDA it prints one `skip:` line and exits 0. With CUDA, in one process (< 5 minutes on one
80 GB-class GPU):

1. Parity on a short trace (`--short` trajectory tokens): a random-init Qwen2 with the 1.5B
   published widths but `--parity-layers` layers is built once in float32 on the CPU; the `cache`,
   `lhat` and `updates` commands run end to end (JSONL in, HDF5 out) on the CPU (float32) and on
   CUDA in float32 (TF32 off) and in bfloat16 with the same weights; the stored arrays are compared
   with stated tolerances:
   * CUDA float32 vs CPU float32: every array within `FP32_REL` relative (Frobenius) error, except
     the answer-loss gradient arrays of `updates` (`upd_align_cos`, `upd_dl_pred`, `upd_m7`) whose
     float32 values are themselves only ~1e-3 accurate on a random model's tiny gradients:
     `FP32_GRAD_REL`;
   * CUDA bfloat16 vs CPU float32 (bf16 keeps 8 bits of mantissa): activations and L̂ within
     `BF16_REL` (the L̂ differences `LHAT_DIFFS` are reported, not limited); the `updates`
     arrays by Pearson correlation over all entries ≥ `BF16_MIN_CORR` (the gradient arrays:
     ≥ `BF16_GRAD_MIN_CORR`).
2. Scale: a random-init model of the full 1.5B shape (DeepSeek-R1-Distill-Qwen-1.5B = Qwen2.5-1.5B
   widths: 28 layers, d_model 1536, 12 / 2 heads, d_mlp 8960, vocab 151936) in bfloat16 on CUDA,
   one synthetic trace of `--tokens` trajectory tokens (8192 by default): `cache`, `lhat` (at
   `--lhat-points` truncation points; the command evaluates all T + 1, same memory, more time)
   and `updates` (the linear-memory pass) end to end, each with its seconds and peak CUDA memory
   beyond the weights (`torch.cuda.max_memory_allocated`), next to a plain forward.
3. Peers: `bench/peers.py --device cuda --dtype bfloat16` at `--peer-tokens` trajectory tokens
   (8192) on the same 1.5B shape (random init, on the GPU), in its own process after this one has
   freed the GPU, jobs `PEER_JOBS` (the Thought Anchors peer of `anchors` keeps every layer's eager
   pattern, [28, 12, N, N]: 45 GB in bf16 at 8k plus a float32 host copy, not a 5-minute check),
   one repeat; its table is printed as peers.py prints it. Its equal? column is reported, not
   limited (peers.py's tolerances are float32 ones); the check fails if peers.py does not finish
   with its report (`--smoke`: CPU float32, where every output must be equal).

Prints every figure and a final `gpu_check: PASS` / `FAIL` line (exit 1 on a failed tolerance).

Usage:
    python bench/gpu_check.py                      # skips cleanly without CUDA
    python bench/gpu_check.py --tokens 8192 --json
    python bench/gpu_check.py --smoke               # the same code path on the CPU (tests)
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPE_1P5B = {"d_model": 1536, "layers": 28, "heads": 12, "kv_heads": 2, "d_mlp": 8960,
              "vocab": 151936}
FP32_REL = 1e-4
FP32_GRAD_REL = 1e-2
BF16_REL = 5e-2
BF16_MIN_CORR = 0.98
BF16_GRAD_MIN_CORR = 0.5
GRAD_ARRAYS = ("upd_align_cos", "upd_dl_pred", "upd_m7")
LHAT_DIFFS = ("lhat_delta", "lhat_rho", "lhat_log_ratio")
"""Differences of neighbouring L̂ values (nearly equal numbers): FP32_GRAD_REL in float32, reported
without a limit in bfloat16 (8 mantissa bits cannot resolve them)."""


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=8192, help="trajectory tokens of the scale trace")
    p.add_argument("--short", type=int, default=96, help="trajectory tokens of the parity trace")
    p.add_argument("--parity-layers", type=int, default=2)
    p.add_argument("--lhat-points", type=int, default=64)
    p.add_argument("--device", default="cuda")
    p.add_argument("--skip-scale", action="store_true", help="parity only")
    p.add_argument("--peer-tokens", type=int, default=8192,
                   help="trajectory tokens of the peers.py run")
    p.add_argument("--skip-peers", action="store_true", help="no peers.py run")
    p.add_argument("--peers-timeout", type=float, default=None,
                   help="seconds the peers.py run may take (default 180; 900 with --smoke, whose "
                        "CPU run takes minutes on a shared machine)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--smoke", action="store_true",
                   help="no GPU needed: a tiny shape, CPU vs CPU, short traces (tests this script)")
    args = p.parse_args(argv)
    args.shape = SMOKE_SHAPE if args.smoke else SHAPE_1P5B
    if args.smoke:
        args.device, args.tokens, args.short, args.lhat_points = "cpu", 256, 48, 8
    if args.peers_timeout is None:
        args.peers_timeout = 900.0 if args.smoke else 180.0
    return args


SMOKE_SHAPE = {"d_model": 64, "layers": 2, "heads": 4, "kv_heads": 2, "d_mlp": 128, "vocab": 300}
"""`--smoke`: a tiny shape, CPU against CPU (checks this script's code path without a GPU)."""
PEER_JOBS = ("cache", "lhat", "updates")
"""The peers.py jobs of step 3."""
PEERS = ROOT / "bench" / "peers.py"


def peers_argv(args: argparse.Namespace) -> list[str]:
    """peers.py's arguments: the 1.5B shape in bfloat16 on `args.device` at `--peer-tokens`
    (one repeat), or with `--smoke` peers.py's own smoke run on the CPU in float32."""
    jobs = ["--jobs", *PEER_JOBS, "--json"]
    if args.smoke:
        return ["--smoke", "--device", "cpu", "--dtype", "float32", *jobs]
    s = args.shape
    return ["--device", str(args.device), "--dtype", "bfloat16", "--lengths", str(args.peer_tokens),
            "--d-model", str(s["d_model"]), "--layers", str(s["layers"]), "--heads", str(s["heads"]),
            "--kv-heads", str(s["kv_heads"]), "--d-mlp", str(s["d_mlp"]), "--vocab", str(s["vocab"]),
            "--repeats", "1", *jobs]


def peers(args: argparse.Namespace) -> tuple[dict[str, Any], bool]:
    """Run peers.py in its own process (this one holds no model then) and return its table lines,
    its JSON report (None if it printed none) and whether the check passed: peers.py finished with
    its report (exit 0, or 1 = some output unequal, which fails only `--smoke`'s float32 run), or
    printed its one `skip:` line (the shared data is absent)."""
    gc.collect()                                     # the scale model's cycles, then its blocks
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    cmd = [sys.executable, str(PEERS), *peers_argv(args)]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=args.peers_timeout)
    except subprocess.TimeoutExpired:
        return {"command": cmd, "table": [], "report": None,
                "error": f"peers.py took more than {args.peers_timeout:g} s"}, False
    lines = res.stdout.strip().splitlines()
    report = json.loads(lines[-1]) if lines and lines[-1].startswith("{") else None
    table = lines[:-1] if report is not None else lines
    out = {"command": cmd, "returncode": res.returncode, "table": table, "report": report}
    skipped = res.returncode == 0 and len(table) == 1 and table[0].startswith("skip:")
    ok = skipped or (report is not None and res.returncode in ((0,) if args.smoke else (0, 1)))
    if not ok:
        out["error"] = (res.stderr.strip().splitlines() or ["no output"])[-1]
    return out, ok


def _model(shape: dict[str, int], layers: int, n_ctx: int, device: str, dtype: str, *,
           init_device: str = "cpu", seed: int = 0):
    """A seeded random-init Qwen2 (initialised on `init_device`: the same weights for every
    `device` / `dtype` when that is the CPU), booted on `device` in `dtype`."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    from probes.models.load import boot_model
    from probes.models.tiny import byte_tokenizer

    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=shape["vocab"], hidden_size=shape["d_model"],
                      intermediate_size=shape["d_mlp"], num_hidden_layers=layers,
                      num_attention_heads=shape["heads"], num_key_value_heads=shape["kv_heads"],
                      max_position_embeddings=n_ctx, tie_word_embeddings=False, bos_token_id=0,
                      eos_token_id=0)
    with torch.device(init_device):
        hf = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    return boot_model(hf, byte_tokenizer(), spec="gpu-check-qwen2", device=device, dtype=dtype)


def _commands(loaded, traces: Path, work: Path, tag: str, lhat_points: int | None = None
              ) -> dict[str, Any]:
    """cache, lhat, updates end to end; returns {command: (seconds, peak extra bytes, out path)}."""
    from probes.pipeline.capture import CacheConfig, cache_traces
    from probes.pipeline.lhat import LhatConfig, lhat_traces
    from probes.pipeline.updates import UpdatesConfig, updates_traces

    runs = {
        "cache": lambda out: cache_traces(loaded, traces, out, CacheConfig(dtype="float32"),
                                          progress=False),
        "lhat": lambda out: lhat_traces(loaded, traces, out, LhatConfig(), progress=False),
        "updates": lambda out: updates_traces(loaded, traces, out, UpdatesConfig(),
                                              progress=False),
    }
    if lhat_points is not None:
        runs["lhat"] = lambda out: _lhat_points(loaded, traces, lhat_points)
    res = {}
    for name, fn in runs.items():
        out = work / f"{tag}-{name}.h5"
        res[name] = _measured(loaded.device, lambda fn=fn, out=out: fn(out)) + (out,)
    return res


def _lhat_points(loaded, traces: Path, points: int) -> None:
    from probes.measures.lhat.fast import lhat_fast
    from probes.traces.read import read_traces
    from probes.traces.tokenize import tokenize_traces

    (tt,), _ = tokenize_traces(read_traces(traces), loaded.tokenizer)
    n = tt.spans["trajectory"][1] - tt.spans["trajectory"][0]
    lhat_fast(loaded, tt, ts=np.unique(np.linspace(0, n, points).round().astype(int)))


def _measured(device: torch.device, fn) -> tuple[float, int]:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return time.perf_counter() - t0, torch.cuda.max_memory_allocated(device) - base
    return time.perf_counter() - t0, 0


def _arrays(path: Path) -> dict[str, np.ndarray]:
    from cache import open_cache

    out = {}
    with open_cache(path) as reader:
        for tr in reader:
            for name in tr.names():
                raw = np.asarray(tr[name])
                if np.issubdtype(raw.dtype, np.floating):         # labels/tokens are not compared
                    out[name] = raw.astype(np.float64)
    return out


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    ok = np.isfinite(a) & np.isfinite(b)
    return float(np.linalg.norm((a - b)[ok]) / max(np.linalg.norm(b[ok]), 1e-30))


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    ok = np.isfinite(a) & np.isfinite(b)
    return float(np.corrcoef(a[ok].ravel(), b[ok].ravel())[0, 1]) if ok.sum() > 1 else float("nan")


def parity(args: argparse.Namespace, work: Path) -> tuple[list[dict[str, Any]], bool]:
    """CPU float32 vs CUDA float32 / bfloat16 on a short trace (same weights)."""
    from cache_bench import write_traces

    traces = write_traces(work / "short.jsonl", [args.short], 1)
    cpu = _model(args.shape, args.parity_layers, args.short + 512, "cpu", "float32")
    ref = {k: _arrays(v[2]) for k, v in _commands(cpu, traces, work, "cpu").items()}
    del cpu
    rows, ok = [], True
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    for dtype in ("float32", "bfloat16"):
        dev = _model(args.shape, args.parity_layers, args.short + 512, args.device, dtype)
        got = {k: _arrays(v[2]) for k, v in _commands(dev, traces, work, f"dev-{dtype}").items()}
        del dev
        for cmd, arrays in ref.items():
            for name, want in arrays.items():
                have = got[cmd][name]
                key = name
                grad = key in GRAD_ARRAYS or key in LHAT_DIFFS
                row = {"dtype": dtype, "command": cmd, "array": key, "rel": _rel(have, want),
                       "corr": _corr(have, want)}
                if dtype == "bfloat16" and key in LHAT_DIFFS:
                    row["limit"], row["ok"] = "reported only", True
                elif dtype == "float32":
                    row["limit"] = f"rel <= {FP32_GRAD_REL if grad else FP32_REL:g}"
                    row["ok"] = row["rel"] <= (FP32_GRAD_REL if grad else FP32_REL)
                elif cmd == "updates":
                    lim = BF16_GRAD_MIN_CORR if grad else BF16_MIN_CORR
                    row["limit"], row["ok"] = f"corr >= {lim:g}", row["corr"] >= lim
                else:
                    row["limit"], row["ok"] = f"rel <= {BF16_REL:g}", row["rel"] <= BF16_REL
                ok &= bool(row["ok"])
                rows.append(row)
    return rows, ok


def scale(args: argparse.Namespace, work: Path) -> list[dict[str, Any]]:
    """Every command on the 1.5B shape in bf16 on CUDA with one long trace."""
    from cache_bench import write_traces

    from probes.measures.capture.activations import forward_plain
    from probes.traces.read import read_traces
    from probes.traces.tokenize import tokenize_traces

    traces = write_traces(work / "long.jsonl", [args.tokens], 2)
    loaded = _model(args.shape, args.shape["layers"], args.tokens + 512, args.device, "bfloat16",
                    init_device=args.device)
    (tt,), _ = tokenize_traces(read_traces(traces), loaded.tokenizer)
    ids = torch.as_tensor(tt.ids).reshape(1, -1)
    forward_plain(loaded, ids[:, :64], chunk_size=64)                   # warm-up
    rows = [{"command": "forward", "tokens": len(tt.ids)}]
    rows[0]["seconds"], rows[0]["peak_extra_bytes"] = _measured(
        loaded.device, lambda: forward_plain(loaded, ids, chunk_size=int(ids.shape[1])))
    for name, (sec, peak, _) in _commands(loaded, traces, work, "scale",
                                          lhat_points=args.lhat_points).items():
        rows.append({"command": name, "tokens": len(tt.ids), "seconds": sec,
                     "peak_extra_bytes": peak})
    for r in rows:
        r["x_forward_time"] = r["seconds"] / rows[0]["seconds"]
    return rows


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if not args.smoke and (not torch.cuda.is_available() or not str(args.device).startswith("cuda")):
        print(f"skip: no CUDA device (torch {torch.__version__}, cuda build "
              f"{torch.version.cuda or 'none'}); bench/gpu_check.py runs only on a GPU machine "
              "with the CUDA build of torch (README: 'GPU').")
        return 0
    t0 = time.perf_counter()
    report: dict[str, Any] = {"device": "cpu (smoke)" if args.smoke
                              else torch.cuda.get_device_name(args.device)}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        rows, ok = parity(args, work)
        report["parity"] = rows
        for r in rows:
            print(f"parity {r['dtype']:>8} {r['command']:>7} {r['array']:>22}: rel {r['rel']:.2e} "
                  f"corr {r['corr']:.4f} ({r['limit']}) {'ok' if r['ok'] else 'FAIL'}")
        if not args.skip_scale:
            report["scale"] = scale(args, work)
            for r in report["scale"]:
                tag = "smoke" if args.smoke else "1.5B"
                print(f"{tag} bf16 {r['command']:>8} {r['tokens']} tokens: {r['seconds']:7.2f} s "
                      f"({r['x_forward_time']:.2f}x forward), peak beyond weights "
                      f"{r['peak_extra_bytes'] / 2**30:.2f} GiB")
    if not args.skip_peers:
        report["peers"], peers_ok = peers(args)
        ok &= peers_ok
        print(f"peers ({' '.join(report['peers']['command'][2:])}):")
        print("\n".join(report["peers"]["table"]))
        if "error" in report["peers"]:
            print(f"peers: FAIL: {report['peers']['error']}")
    report["seconds"] = time.perf_counter() - t0
    report["pass"] = ok
    if args.json:
        print(json.dumps(report, sort_keys=True, default=str))
    print(f"gpu_check: {'PASS' if ok else 'FAIL'} in {report['seconds']:.0f} s on {report['device']}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
