"""Benchmark `anchors` on tiny-reasoner: suppression cost against one unmasked forward, and the
resampling time per trace, extrapolated to the demo's 200 traces.

Per trace of the first `--traces` sample traces, in one process:

* `suppression`: the batched masked forwards (`probes.measures.anchors.receivers.suppression`), with its
  cost ratio = wall time / (one unmasked forward of the same trace) / C (goal <= 2), and the
  number of forward calls and sequences run;
* `receiver`: the chunk-wise sentence-averaged patterns of one forward;
* `resampling`: K samples from every chunk prefix and their grading (`--k`, default 16),
  wall and CPU time; the extrapolation to all 200 sample traces is
  `mean CPU seconds per trace × 200 / cores` (the run is single-threaded: `torch.set_num_threads(1)`;
  two worker processes on 2 cores halve it) and is printed next to the measured wall time.

Usage:
    nice -n 10 python bench/anchors_bench.py --traces 6 --k 16
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from probes import DATA_DIR
from probes.measures.anchors import receivers as anc
from probes.measures.anchors import resampling as rs
from probes.models.load import load_model
from probes.traces.chunks import token_chunks
from probes.traces.read import read_traces
from probes.traces.tokenize import tokenize_trace

N_DEMO_TRACES = 200


def main() -> None:
    """Run the benchmark and print one line per figure (or JSON)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--traces", type=int, default=6)
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--cores", type=int, default=2, help="cores the extrapolation assumes")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(1)
    loaded = load_model("tiny-reasoner", device="cpu")
    traces = read_traces(DATA_DIR / "tiny_reasoner_traces.jsonl").traces[: args.traces]
    rows = []
    for trace in traces:
        tt = tokenize_trace(trace, loaded.tokenizer)
        ch = token_chunks(tt)
        t0 = tt.spans["trajectory"][0]
        clock = time.perf_counter()
        anc.chunk_attention(loaded, tt.ids, ch.spans + t0)
        receiver_s = time.perf_counter() - clock
        sup = anc.suppression(loaded, tt, ch.spans)
        wall, cpu = time.perf_counter(), time.process_time()
        samples = rs.resample(loaded, tt, ch.spans, rs.ResampleSettings(k=args.k))
        rows.append({"id": trace.id, "chunks": len(ch), "receiver_s": receiver_s,
                     "supp_s": sup.seconds, "supp_ratio": sup.cost_ratio,
                     "supp_forwards": sup.n_forwards, "supp_rows": sup.n_rows,
                     "resample_wall_s": time.perf_counter() - wall,
                     "resample_cpu_s": time.process_time() - cpu, "samples": len(samples),
                     "tokens": sum(s.n_tokens for s in samples)})
    cpu = float(np.mean([r["resample_cpu_s"] for r in rows]))
    out = {
        "k": args.k, "n_traces": len(rows), "mean_chunks": float(np.mean([r["chunks"] for r in rows])),
        "supp_cost_ratio_mean": float(np.mean([r["supp_ratio"] for r in rows])),
        "supp_cost_ratio_max": float(np.max([r["supp_ratio"] for r in rows])),
        "receiver_s_mean": float(np.mean([r["receiver_s"] for r in rows])),
        "resample_cpu_s_per_trace": cpu,
        "resample_wall_s_per_trace": float(np.mean([r["resample_wall_s"] for r in rows])),
        "extrapolated_200_traces_s": cpu * N_DEMO_TRACES / args.cores,
        "rows": rows,
    }
    if args.json:
        print(json.dumps(out))
        return
    print(f"{len(rows)} traces, {out['mean_chunks']:.1f} chunks each")
    print(f"suppression cost: {out['supp_cost_ratio_mean']:.2f}x (max {out['supp_cost_ratio_max']:.2f}x) "
          f"one unmasked forward per chunk (goal <= 2); forwards {[r['supp_forwards'] for r in rows]} "
          f"for sequences {[r['supp_rows'] for r in rows]}")
    print(f"receiver patterns: {out['receiver_s_mean'] * 1e3:.0f} ms per trace")
    print(f"resampling K={args.k}: {cpu:.2f} s CPU per trace ({out['resample_wall_s_per_trace']:.2f} s "
          f"wall on this machine now); 200 demo traces on {args.cores} cores: "
          f"~{out['extrapolated_200_traces_s']:.0f} s (goal <= 600)")


if __name__ == "__main__":
    main()
