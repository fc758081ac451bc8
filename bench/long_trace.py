"""Long traces on CPU: time and peak memory of every command against a plain forward, per T.

Builds a seeded random-init Qwen2 (default: d_model 256, 4 layers, 8 query / 2 KV heads, d_mlp
1024, vocab 8192) with the byte-level tokenizer and, per `--lengths` T, one synthetic JSONL trace
whose trajectory has exactly T tokens (`cache_bench.write_traces`). Every (part, T) point runs in
its own process (glibc's mmap threshold fixed at 128 KiB so freed blocks leave RSS), after a
warm-up of the same part on a 64-token trace; the peak memory of the one timed run is the process's
VmHWM (reset just before the run by writing 5 to /proc/self/clear_refs) − VmRSS before it, i.e.
what the part holds beyond the model and the inputs. Parts:

* `forward`: the plain forward of the whole sequence (the HF model with sdpa, no grad, no hooks,
  no logits; `probes.measures.capture.activations.forward_plain` in one chunk): the baseline;
* `cache`: the whole `cache` command on the trace (`probes.pipeline.capture.cache_traces`: default
  sites, float16, chunks of 512, HDF5 written), outputs O(T·d·L) included;
* `lhat`: `probes.measures.lhat.fast.lhat_fast` (the `lhat` command's per-trace computation: chunked
  prefill + packed suffixes) at `--lhat-points` truncation points evenly spread over 0..T (the
  command evaluates all T + 1; its memory does not depend on how many, its time grows with them);
* `updates`: the whole `updates` command on the trace (`probes.pipeline.updates.updates_traces`,
  default `--answer-rows first`, the linear-memory pass: `probes.measures.updates.sdpa_pass`);
* `updates-eager` (T ≤ `--eager-max`): the reference eager pass (`trace_update_arrays(...,
  attention="eager")`), for contrast.

Printed: seconds and peak extra MiB per part and T, their ratios to `forward` at the same T, the
exponent b of a least-squares fit extra ≈ a·T^b over the lengths ≥ `--fit-from` (goal ≤ 1.1), and
`updates` time / `forward` time (goal ≤ 3×). Then the projection: the per-token constant of
`updates` (bytes per token per layer, measured as the slope of extra memory vs T, split over
d_model and d_mlp with a second model shape of 3× d_mlp at two lengths) applied to the published
1.5B / 7B / 14B / 32B shapes in bf16 at 8k and 32k tokens, plus the weights (bf16), the gate/up
gradients (bf16) and the per-run float64 Gram matrices WᵀW that `updates` keeps (2·L·d² · 8 B).

`--timing` measures only times, alternating in one process per T `--repeats` times (best of each;
on a shared machine the single-run times of the table above vary by ±50%): the plain forward, the
floor of `updates` (the same forward + backward on the same linear-memory view without the
pattern-row recording and the measurement algebra: `alignment.gradient_pass`) and `updates` (the
one-trace computation `trace_update_arrays`) at each `precision` (float32 = the default, float64 =
the reference algebra), printed as updates / floor (goal ≤ 1.15) and updates / forward.

No assertions. Usage (the shared machine: be nice):
    nice -n 10 .venv/bin/python bench/long_trace.py                         # 1k .. 32k
    nice -n 10 .venv/bin/python bench/long_trace.py --max-t 8192 --json     # a quicker run
    nice -n 10 .venv/bin/python bench/long_trace.py --timing --lengths 2048 4096 8192
"""

from __future__ import annotations

import argparse
import json
import os
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

PARTS = ("forward", "cache", "lhat", "updates", "updates-eager")
DEFAULT_LENGTHS = [1024, 2048, 4096, 8192, 16384, 32768]

PUBLISHED: dict[str, dict[str, int]] = {
    # Qwen2.5 / DeepSeek-R1-Distill-Qwen config.json values (no download).
    "1.5B": {"d_model": 1536, "layers": 28, "heads": 12, "kv_heads": 2, "d_mlp": 8960,
             "vocab": 151936, "tied": 0},
    "7B": {"d_model": 3584, "layers": 28, "heads": 28, "kv_heads": 4, "d_mlp": 18944,
           "vocab": 152064, "tied": 0},
    "14B": {"d_model": 5120, "layers": 48, "heads": 40, "kv_heads": 8, "d_mlp": 13824,
            "vocab": 152064, "tied": 0},
    "32B": {"d_model": 5120, "layers": 64, "heads": 40, "kv_heads": 8, "d_mlp": 27648,
            "vocab": 152064, "tied": 0},
}
GPU_BYTES = 80e9


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", type=int, nargs="+", default=DEFAULT_LENGTHS,
                   help="trajectory lengths T (tokens)")
    p.add_argument("--max-t", type=int, default=None, help="drop lengths above this (quick runs)")
    p.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    p.add_argument("--eager-max", type=int, default=2048,
                   help="largest T for the quadratic updates-eager reference")
    p.add_argument("--lhat-points", type=int, default=32, help="truncation points for lhat")
    p.add_argument("--fit-from", type=int, default=2048, help="smallest T in the exponent fit")
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--d-mlp", type=int, default=1024)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--no-projection", action="store_true",
                   help="skip the second-shape points used to split the per-token constant")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads per point")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="also print one JSON object")
    p.add_argument("--timing", action="store_true",
                   help="only the time ratio updates / forward: per T one process alternating the "
                        "two --repeats times (best of each), less exposed to a busy machine")
    p.add_argument("--repeats", type=int, default=3, help="runs of each part with --timing")
    p.add_argument("--cpu-time", action="store_true",
                   help="--timing: CPU seconds of the process (time.process_time) instead of wall "
                        "seconds: on a machine shared by more runs than cores, wall time is mostly "
                        "waiting for a core (with one thread, CPU time ≈ the run's own work)")
    p.add_argument("--point", nargs=2, metavar=("PART", "T"), help=argparse.SUPPRESS)
    p.add_argument("--time-point", type=int, metavar="T", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.max_t is not None:
        args.lengths = [n for n in args.lengths if n <= args.max_t]
    return args


def build_model(args: argparse.Namespace):
    """The seeded random-init Qwen2 of the requested shape, booted as a bridge."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    from probes.models.load import boot_model
    from probes.models.tiny import byte_tokenizer

    torch.manual_seed(args.seed)
    cfg = Qwen2Config(
        vocab_size=args.vocab, hidden_size=args.d_model, intermediate_size=args.d_mlp,
        num_hidden_layers=args.layers, num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads, max_position_embeddings=max(args.lengths) + 512,
        tie_word_embeddings=False, bos_token_id=0, eos_token_id=0)
    hf = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    return boot_model(hf, byte_tokenizer(), spec="bench-long-qwen2", device="cpu")


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def run_point(args: argparse.Namespace, part: str, n: int) -> dict[str, Any]:
    """One (part, T) point in this process: warm-up at 64 tokens, then one measured run."""
    from cache_bench import write_traces

    from probes.measures.capture.activations import forward_plain
    from probes.measures.lhat.fast import lhat_fast
    from probes.measures.updates.shared_pass import RunConstants, trace_update_arrays
    from probes.pipeline.capture import CacheConfig, cache_traces
    from probes.pipeline.updates import UpdatesConfig, updates_traces
    from probes.traces.read import read_traces
    from probes.traces.tokenize import tokenize_traces

    torch.set_num_threads(args.threads)
    loaded = build_model(args)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)

        def make(t: int, name: str):
            path = write_traces(work / f"{name}.jsonl", [t], args.seed + t)
            (tt,), _ = tokenize_traces(read_traces(path), loaded.tokenizer)
            return path, tt

        def runner(path: Path, tt, tag: str):
            ids = torch.as_tensor(tt.ids).reshape(1, -1)
            n_traj = tt.spans["trajectory"][1] - tt.spans["trajectory"][0]
            if part == "forward":
                return lambda: forward_plain(loaded, ids, chunk_size=int(ids.shape[1]))
            if part == "cache":
                return lambda: cache_traces(loaded, path, work / f"{tag}.h5",
                                            CacheConfig(), progress=False)
            if part == "lhat":
                ts = np.unique(np.linspace(0, n_traj, min(args.lhat_points, n_traj + 1))
                               .round().astype(int))
                return lambda: lhat_fast(loaded, tt, ts=ts)
            if part == "updates":
                return lambda: updates_traces(loaded, path, work / f"{tag}.h5", UpdatesConfig(),
                                              progress=False)
            consts = RunConstants(loaded)
            return lambda: trace_update_arrays(loaded, tt, consts, attention="eager")

        warm = runner(*make(64, "warm"), "warm")
        warm()
        fn = runner(*make(n, "run"), "run")
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        before = _status_kib("VmRSS")
        t0 = time.perf_counter()
        fn()
        sec = time.perf_counter() - t0
        peak = _status_kib("VmHWM")
    return {"part": part, "T": n, "seconds": sec, "extra_mib": (peak - before) / 1024,
            "shape": {k: getattr(args, k) for k in ("d_model", "layers", "d_mlp")}}


def floor_fn(loaded, ids, answer: tuple[int, int]):
    """The floor of `updates`: the same forward + backward on the same linear-memory view
    (`probes.measures.updates.alignment.gradient_pass`: the answer loss, its gradients to every
    z and MLP input weight), without the pattern-row recording and the measurement algebra."""
    from probes.measures.updates.alignment import AlignmentError, gradient_pass
    from probes.measures.updates.families import views
    from probes.measures.updates.sdpa_pass import sdpa_view

    view = sdpa_view(loaded)
    layers = views(view, what="the floor", error=AlignmentError)
    return lambda: gradient_pass(view, layers, ids, answer)


def time_point(args: argparse.Namespace, n: int) -> dict[str, Any]:
    """Best-of-`repeats` seconds of the plain forward, of the floor (`floor_fn`) and of
    `trace_update_arrays` (the updates computation of one trace, linear-memory pass) at each
    precision of `PRECISIONS` (float64 = the reference algebra), alternated in this process."""
    from cache_bench import write_traces

    from probes.measures.capture.activations import forward_plain
    from probes.measures.updates import PRECISIONS
    from probes.measures.updates.shared_pass import RunConstants, trace_update_arrays
    from probes.traces.read import read_traces
    from probes.traces.tokenize import tokenize_traces

    torch.set_num_threads(args.threads)
    loaded = build_model(args)
    with tempfile.TemporaryDirectory() as tmp:
        (tt,), _ = tokenize_traces(read_traces(write_traces(Path(tmp) / "t.jsonl", [n],
                                                            args.seed + n)), loaded.tokenizer)
    ids = torch.as_tensor(tt.ids).reshape(1, -1)
    consts = RunConstants(loaded)
    answer = (int(tt.spans["answer"][0]), int(tt.spans["answer"][1]))
    calls = {"forward": lambda: forward_plain(loaded, ids, chunk_size=int(ids.shape[1])),
             "floor": floor_fn(loaded, ids, answer)}
    for prec in PRECISIONS:
        calls[f"updates_{prec}"] = (lambda prec=prec: trace_update_arrays(
            loaded, tt, consts, attention="sdpa", precision=prec))
    best = {k: float("inf") for k in calls}
    for fn in calls.values():                        # warm-up on the same trace
        fn()
    clock = time.process_time if args.cpu_time else time.perf_counter
    for _ in range(args.repeats):
        for k, fn in calls.items():
            t0 = clock()
            fn()
            best[k] = min(best[k], clock() - t0)
    out: dict[str, Any] = {"T": n, "forward_s": best["forward"], "floor_s": best["floor"],
                           "clock": "process CPU" if args.cpu_time else "wall"}
    for prec in PRECISIONS:
        out[f"updates_{prec}_s"] = best[f"updates_{prec}"]
        out[f"floor_ratio_{prec}"] = best[f"updates_{prec}"] / best["floor"]
    out["updates_s"] = best[f"updates_{PRECISIONS[0]}"]
    out["ratio"] = out["updates_s"] / best["forward"]
    return out


def _child(argv: list[str], part: str, n: int, extra: list[str] = ()) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), *argv, *extra, "--point", part, str(n)]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode != 0:
        return {"part": part, "T": n, "error": res.stderr.strip().splitlines()[-1:]}
    return json.loads(res.stdout.strip().splitlines()[-1])


def fit_exponent(ts: list[int], ys: list[float]) -> float:
    """b of the least-squares fit log y = log a + b log T."""
    return float(np.polyfit(np.log(ts), np.log(ys), 1)[0])


def slope(ts: list[int], ys: list[float]) -> float:
    """Least-squares slope dy/dT (MiB per token)."""
    return float(np.polyfit(np.asarray(ts, float), np.asarray(ys, float), 1)[0])


def project(per_token: dict[str, float], seq: int) -> dict[str, dict[str, float]]:
    """GB of `updates` at `seq` tokens in bf16 for each published shape.

    `per_token` = bytes per token per layer per unit of d_model (`a`) and of d_mlp (`b`), measured
    in float32 on CPU; bf16 halves the activations (the float64 post-processing of one layer at a
    time is counted in `a`, `b` as measured, also halved: an approximation, stated).
    """
    out = {}
    for name, s in PUBLISHED.items():
        d, L, f, V = s["d_model"], s["layers"], s["d_mlp"], s["vocab"]
        kv = s["kv_heads"] * d // s["heads"]
        params = L * (d * (d + 2 * kv) + (d + 2 * kv) + d * d + 3 * d * f + 2 * d) + 2 * V * d + d
        weights = 2 * params
        grads = 2 * L * 2 * d * f                      # G_gate, G_up in bf16
        grams = 2 * L * d * d * 8                      # W_gateᵀW_gate, W_upᵀW_up in float64
        act = seq * L * (per_token["a"] * d + per_token["b"] * f) / 2
        total = weights + grads + grams + act
        out[name] = {"params_B": params / 1e9, "weights_GB": weights / 1e9, "grads_GB": grads / 1e9,
                     "grams_GB": grams / 1e9, "activations_GB": act / 1e9, "total_GB": total / 1e9,
                     "fits_80GB": bool(total <= GPU_BYTES)}
    return out


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parse(argv)
    if args.point:
        print(json.dumps(run_point(args, args.point[0], int(args.point[1]))))
        return 0
    if args.time_point:
        print(json.dumps(time_point(args, args.time_point)))
        return 0
    if args.timing:
        base = [a for a in argv if a not in ("--json", "--timing")]
        rows = []
        for n in args.lengths:
            cmd = [sys.executable, str(Path(__file__).resolve()), *base, "--time-point", str(n)]
            res = subprocess.run(cmd, capture_output=True, text=True,
                                 env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
            rows.append(json.loads(res.stdout.strip().splitlines()[-1]) if res.returncode == 0
                        else {"T": n, "error": res.stderr.strip().splitlines()[-1:]})
            print(f"# {rows[-1]}", file=sys.stderr, flush=True)
        from probes.measures.updates import PRECISIONS

        print(f"{'T':>6} {'forward s':>10} {'floor s':>8} "
              + " ".join(f"{'upd ' + p[5:] + ' s':>11} {'/floor':>7}" for p in PRECISIONS)
              + f" {'upd/fwd':>8}")
        for r in rows:
            if "error" not in r:
                print(f"{r['T']:>6} {r['forward_s']:10.2f} {r['floor_s']:8.2f} "
                      + " ".join(f"{r[f'updates_{p}_s']:11.2f} {r[f'floor_ratio_{p}']:6.2f}x"
                                 for p in PRECISIONS)
                      + f" {r['ratio']:7.2f}x")
        print(f"(updates/floor goal <= 1.15 with the default precision, {PRECISIONS[0]}; "
              f"{PRECISIONS[-1]} is the reference algebra)")
        if args.json:
            print(json.dumps({"timing": rows}, sort_keys=True))
        return 0
    base = [a for a in argv if a != "--json"]
    points: dict[tuple[str, int], dict[str, Any]] = {}
    for n in args.lengths:
        for part in args.parts:
            if part == "updates-eager" and n > args.eager_max:
                continue
            pt = points[(part, n)] = _child(base, part, n)
            print(f"# {part:>13} T={n:>6}: {pt.get('seconds', float('nan')):8.2f} s "
                  f"{pt.get('extra_mib', float('nan')):9.1f} MiB {pt.get('error', '')}",
                  file=sys.stderr, flush=True)
    report: dict[str, Any] = {"shape": {k: getattr(args, k) for k in (
        "d_model", "layers", "heads", "kv_heads", "d_mlp", "vocab")}, "points": list(points.values())}
    lines = [f"{'part':>13} {'T':>6} {'seconds':>9} {'x fwd':>7} {'extra MiB':>10} {'x fwd':>7}"]
    for (part, n), pt in points.items():
        f = points.get(("forward", n), {})
        if "error" in pt:
            lines.append(f"{part:>13} {n:>6}   error: {pt['error']}")
            continue
        rt = pt["seconds"] / f["seconds"] if "seconds" in f else float("nan")
        rm = pt["extra_mib"] / f["extra_mib"] if f.get("extra_mib") else float("nan")
        lines.append(f"{part:>13} {n:>6} {pt['seconds']:9.2f} {rt:7.2f} {pt['extra_mib']:10.1f} "
                     f"{rm:7.2f}")
    exps = {}
    for part in args.parts:
        pts = [(n, points[(part, n)]["extra_mib"]) for n in args.lengths
               if (part, n) in points and "extra_mib" in points[(part, n)] and n >= args.fit_from]
        if len(pts) >= 2 and all(y > 0 for _, y in pts):
            exps[part] = fit_exponent([n for n, _ in pts], [y for _, y in pts])
    report["memory_exponent"] = exps
    lines.append(f"memory exponent b (extra ≈ a·T^b, T ≥ {args.fit_from}): "
                 + ", ".join(f"{k} {v:.2f}" for k, v in exps.items()))
    ratios = {n: points[("updates", n)]["seconds"] / points[("forward", n)]["seconds"]
              for n in args.lengths if ("updates", n) in points and ("forward", n) in points
              and "seconds" in points[("updates", n)] and "seconds" in points[("forward", n)]}
    report["updates_time_ratio"] = ratios
    lines.append("updates time / forward time: " + ", ".join(f"T={n}: {r:.2f}x"
                                                            for n, r in ratios.items()))
    if not args.no_projection and "updates" in args.parts:
        upd = [(n, points[("updates", n)]["extra_mib"]) for n in args.lengths
               if ("updates", n) in points and "extra_mib" in points[("updates", n)]]
        big = [n for n, _ in upd][-2:]
        if len(big) == 2:
            s1 = slope(big, [y for n, y in upd if n in big]) * 2**20 / args.layers   # B/token/layer
            wide = ["--d-mlp", str(3 * args.d_mlp)]
            w = [_child(base, "updates", n, wide) for n in big]
            s2 = slope(big, [p["extra_mib"] for p in w]) * 2**20 / args.layers
            # s = a·d + b·f at (d, f) and (d, 3f)
            b = (s2 - s1) / (2 * args.d_mlp)
            a = (s1 - b * args.d_mlp) / args.d_model
            report["per_token"] = {"a": a, "b": b, "slope_B_per_token_layer": [s1, s2],
                                   "from_T": big}
            lines.append(f"per token per layer (fp32, CPU): {s1:.0f} B at d_mlp={args.d_mlp}, "
                         f"{s2:.0f} B at d_mlp={3 * args.d_mlp} -> {a:.1f} B x d_model + {b:.1f} B "
                         "x d_mlp")
            report["projection"] = {}
            for seq in (8192, 32768):
                proj = report["projection"][seq] = project({"a": a, "b": b}, seq)
                for name, v in proj.items():
                    lines.append(f"  {name:>4} @ {seq // 1024}k bf16: weights {v['weights_GB']:.1f}"
                                 f" + grads {v['grads_GB']:.1f} + grams {v['grams_GB']:.1f} + "
                                 f"activations {v['activations_GB']:.1f} = {v['total_GB']:.1f} GB "
                                 f"-> {'fits' if v['fits_80GB'] else 'does NOT fit'} one 80 GB GPU")
    print("\n".join(lines))
    if args.json:
        print(json.dumps(report, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
