"""Benchmark the landscape grid: batched weight copies (`PlaneModel.grid`) vs one forward per point.

On tiny-reasoner and its sample traces (`--traces`, default 2), with torch limited to `--threads`
(default 2) CPU threads, for each trace:

* the batched grid: `--grid`² points (default 21 × 21, RaML-style directions), `--batch` points per
  forward;
* the baseline: the same points one at a time, moving the model's weights in place and running the
  model's own forward on the trajectory-free input (`answer_scores`, the RaML method), on a random
  subset of `--baseline-points` points (all with `--full`) extrapolated by the mean time per point
  (marked "~");
* the path: `implicit_path` + Gram + top-2 plane + random-plane projection, and the path-plane grid;

and prints the seconds, the ratio baseline / batched, max |batched − baseline| over the points the
baseline evaluated, the captured fractions and the endpoint identity's |difference|.

Usage:
    nice -n 10 python bench/landscape_bench.py
    nice -n 10 python bench/landscape_bench.py --grid 21 --traces 3 --full --json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from probes.measures.answers import answer_scores, without_trajectory
from probes.measures.landscape.path import (
    endpoint_row_patches,
    implicit_path,
    path_gram,
    path_plane,
    plane_coords,
)
from probes.measures.landscape.plane import PlaneModel, grid_axis, random_directions
from probes.models.load import load_model
from probes.reasoner.train import SAMPLES_PATH
from probes.traces.read import read_traces
from probes.traces.tokenize import tokenize_traces


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--grid", type=int, default=21, help="points per axis")
    p.add_argument("--traces", type=int, default=2, help="sample traces to time")
    p.add_argument("--batch", type=int, default=128, help="points per batched forward")
    p.add_argument("--baseline-points", type=int, default=60,
                   help="grid points the one-forward-per-point baseline runs (extrapolated)")
    p.add_argument("--full", action="store_true", help="run the baseline on every grid point")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--style", default="raml", choices=("raml", "filter"))
    p.add_argument("--json", action="store_true", help="print one JSON object per trace")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    torch.set_num_threads(args.threads)
    loaded = load_model("tiny-reasoner", device="cpu", dtype="float32")
    traces = read_traces(SAMPLES_PATH).traces[: args.traces]
    tokenized, _ = tokenize_traces(traces, loaded.tokenizer)
    rng = np.random.default_rng(0)
    live = _live_params(loaded)
    for tt in tokenized:
        pm = PlaneModel(loaded, tt, positions="shifted")
        d1, d2 = random_directions(pm.params, 0, args.style)
        xs = grid_axis(args.grid, 1.0)
        gx, gy = np.meshgrid(xs, xs)
        pts = np.stack([gx.ravel(), gy.ravel()], -1)
        t = time.perf_counter()
        fast = pm.nll(pts, d1, d2, batch=args.batch)
        t_fast = time.perf_counter() - t
        idx = (np.arange(len(pts)) if args.full else
               np.sort(rng.choice(len(pts), min(args.baseline_points, len(pts)), replace=False)))
        original = {n: p.detach().clone() for n, p in live.items()}
        slow = []
        t = time.perf_counter()
        try:
            for x, y in pts[idx]:
                with torch.no_grad():
                    for n, p in live.items():
                        p.copy_(original[n] + float(x) * d1[n] + float(y) * d2[n])
                slow.append(answer_scores(loaded, [without_trajectory(tt)])[0].nll)
        finally:
            with torch.no_grad():
                for n, p in live.items():
                    p.copy_(original[n])
        t_slow_per = (time.perf_counter() - t) / len(idx)
        t_slow = t_slow_per * len(pts)
        t = time.perf_counter()
        path = implicit_path(loaded, tt)
        K, _ = path_gram(path)
        pp = path_plane(path)
        _, cap_rand = plane_coords(path, d1, d2, K)
        t_path = time.perf_counter() - t
        ext = 1.5 * float(np.abs(pp.coords).max())
        t = time.perf_counter()
        pm.grid(np.linspace(-ext, ext, args.grid), np.linspace(-ext, ext, args.grid), *pp.directions,
                batch=args.batch)
        t_pgrid = time.perf_counter() - t
        kept = PlaneModel(loaded, tt, positions="kept", params=pm.params)
        end = float(kept.forward_nll(np.zeros((1, 2)), row_patches=endpoint_row_patches(
            path, kept.remap_rows(path.rows)))[0])
        full = answer_scores(loaded, [tt])[0].nll
        row = {
            "trace": tt.trace.id, "n_tokens": tt.n_tokens, "trajectory": path.n_points - 1,
            "grid": f"{args.grid}x{args.grid}", "threads": args.threads,
            "batched_s": round(t_fast, 3),
            "baseline_s": round(t_slow, 3), "baseline_extrapolated": not args.full,
            "ratio": round(t_slow / t_fast, 2),
            "max_abs_diff": float(np.max(np.abs(fast[idx] - np.asarray(slow)))),
            "path_s": round(t_path, 3), "path_plane_grid_s": round(t_pgrid, 3),
            "captured_path_plane": pp.captured, "captured_random_plane": cap_rand,
            "shared_fraction": pp.shared_fraction, "endpoint_abs_diff": abs(end - full),
        }
        if args.json:
            print(json.dumps(row))
        else:
            mark = "~" if not args.full else ""
            print(f"{row['trace']} (T={row['trajectory']}, {row['n_tokens']} tokens, "
                  f"{args.threads} threads): {row['grid']} grid batched {t_fast:.2f}s vs one "
                  f"forward per point {mark}{t_slow:.2f}s -> ratio {mark}{row['ratio']:.1f}x "
                  f"(max |diff| {row['max_abs_diff']:.1e}); path {t_path:.2f}s, path-plane grid "
                  f"{t_pgrid:.2f}s; captured: path plane {pp.captured:.3f}, random "
                  f"{cap_rand:.1e}; shared fraction {pp.shared_fraction:.3f}; endpoint "
                  f"|patched - full| {row['endpoint_abs_diff']:.1e}")
    return 0


def _live_params(loaded) -> dict[str, torch.Tensor]:
    """Canonical plane names → the live model parameters (what the baseline moves)."""
    from hooks.weights import llama_layers
    from probes.measures.landscape.plane import ROLES

    out = {}
    for l, view in enumerate(llama_layers(loaded, what="landscape bench")):
        for role in ROLES:
            mod = getattr(view, role)
            for kind in ("weight", "bias"):
                if getattr(mod, kind, None) is not None:
                    out[f"L{l}.{role}.{kind}"] = getattr(mod, kind)
    out["final_norm.weight"] = loaded.hf_model.model.norm.weight
    return out


if __name__ == "__main__":
    raise SystemExit(main())
