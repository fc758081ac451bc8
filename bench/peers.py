"""The project against the tools researchers use today: time, peak memory and equal outputs, per T.

Builds a seeded random-init Qwen2 (default: d_model 128, 4 layers, 4 query / 2 KV heads, d_mlp
512, the published 151,936-row vocabulary, untied) with the REAL Qwen tokenizer
(`../shared/data/tokenizers/qwen`) and, per `--lengths` T, one real DeepSeek-R1-Distill-Qwen-1.5B
trace (`../shared/data/traces/r1-distill-qwen-1.5b-math.jsonl`, the first one; its trajectory cut,
or extended with the next traces' trajectories, to T tokens). Per T and job, in this one process,
the project and each peer run interleaved (project first on odd repeats, peers first on even ones;
best of `--repeats` where one round took under `--cheap-s`, else one run), each timed and its peak
memory sampled (CPU: the process's VmRSS from /proc/self/status every 2 ms, minus VmRSS at the
start of the run; CUDA: `torch.cuda.max_memory_allocated` minus the allocated memory at the start),
and their outputs compared. Jobs:

* `cache` (per-token activations to disk): the project's `cache_traces` (resid_post of every layer
  at the trajectory rows, float16 HDF5, `probes.pipeline.capture`) vs TransformerLens
  `TransformerBridge.run_with_cache(ids, names_filter=<resid_post of every layer>,
  logits_to_keep=1)` + an `h5py` write of the same rows in float16 (the careful form: the plain
  call would also build [N, vocab] float32 logits); equal: max |diff| ≤ 2 float16 ulps of the
  largest value. nnsight: one `skip:` line unless `--nnsight-python` names an interpreter where
  `import nnsight` works (then `model.trace` + `.save()` runs there, not in this process).
* `lhat` (L̂ over all T + 1 prefixes): the project's `lhat_fast` vs (a) a careful HF user: one
  prefill with `use_cache=True`, then for t = T..0 `cache.crop(|P| + t)` and a forward of scaffold
  + answer (the plain HF model with sdpa), and (b) RaML's per-prefix re-run (`lhat_naive`: one
  forward of P + τ_≤t + S + A per prefix). Peers run on `--prefixes` K random prefixes when
  T + 1 > K and are extrapolated (prefill + mean time per prefix × (T + 1)), marked `~`; equal:
  max |ΔL̂| ≤ 1e-5 nats over the prefixes the peer ran.
* `anchors` (attention to sentences, receiver heads): the project's chunk-wise sentence-averaged
  patterns (`probes.measures.anchors.receivers.chunk_attention`) + vertical scores + kurtosis vs
  what Thought Anchors' code does: the bridge's full eager patterns of every layer
  (`run_with_cache`, `attn.hook_pattern`, [L, H, N, N], `output_attentions`-style) averaged block
  by block over sentence pairs in numpy, then the same vertical scores + kurtosis; equal: max
  |ΔĀ| ≤ 1e-5.
* `updates` (per-token gradient alignment, M6 `upd_dl_pred`): the project's whole `updates` pass
  (`updates_traces`: M1–M7 of the trace, HDF5 written) vs one autograd forward + backward per
  trajectory token (d/dε_ℓ L(W_gate,up + ε_ℓ·step_{ℓ,i}) at ε = 0 for every layer ℓ at once, the
  plain HF model with sdpa, logits at the answer rows only) on `--m6-tokens` random tokens,
  extrapolated × T (marked `~`). The step factors come from the project (`answer_alignment(...,
  keep_factors=True)`) and are NOT counted in the peer's time (the peer is favoured); equal:
  max |Δ| ≤ 1e-3 × max |upd_dl_pred| of the layer.

A warm-up of every job at 48 tokens runs first. Printed: a table (job, T, peer, project s, peer
s, ratio = peer / project, project peak MiB, peer peak MiB, equal?) and with `--json` one JSON
object. `--smoke`: T = 64, d_model 32, one layer, one repeat (seconds; tests/bench/test_peers.py).

Usage (the shared machine: be nice):
    nice -n 10 .venv/bin/python bench/peers.py                  # T = 512, 1k, 2k, 4k on CPU
    nice -n 10 .venv/bin/python bench/peers.py --long --json    # and 8k
    .venv/bin/python bench/peers.py --smoke
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHARED = ROOT.parent / "shared" / "data"
TOKENIZER = SHARED / "tokenizers" / "qwen"
TRACES = SHARED / "traces" / "r1-distill-qwen-1.5b-math.jsonl"
DEFAULT_LENGTHS = [512, 1024, 2048, 4096]
JOBS = ("cache", "lhat", "anchors", "updates")
LHAT_TOL = 1e-5
PATTERN_TOL = 1e-5
M6_RTOL = 1e-3
WARM_T = 48
"""Trajectory tokens of the warm-up trace (every job runs once on it first, not reported)."""


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", type=int, nargs="+", default=None,
                   help=f"trajectory lengths T (default {DEFAULT_LENGTHS})")
    p.add_argument("--long", action="store_true", help="add T = 8192 to the default lengths")
    p.add_argument("--jobs", nargs="+", choices=JOBS, default=list(JOBS))
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--d-mlp", type=int, default=512)
    p.add_argument("--vocab", type=int, default=151936, help="rows of the (random) embedding")
    p.add_argument("--prefixes", type=int, default=24,
                   help="K random prefixes the L̂ peers run when T + 1 > K (extrapolated)")
    p.add_argument("--m6-tokens", type=int, default=4,
                   help="trajectory tokens the per-token backward peer runs (extrapolated)")
    p.add_argument("--repeats", type=int, default=3, help="best of N where a round is cheap")
    p.add_argument("--cheap-s", type=float, default=6.0,
                   help="repeat a job only while one round (project + peers) took less than this")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads on CPU")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="model dtype (the tolerances above are for float32)")
    p.add_argument("--tokenizer", type=Path, default=TOKENIZER)
    p.add_argument("--traces", type=Path, default=TRACES)
    p.add_argument("--nnsight-python", default=None,
                   help="an interpreter with nnsight installed (its own venv); default: skip")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true",
                   help="T = 64, d_model 32, one layer, one repeat: checks the equality checks")
    p.add_argument("--json", action="store_true", help="also print one JSON object")
    p.add_argument("--nnsight-child", nargs=2, metavar=("T", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.smoke:
        args.lengths = args.lengths or [64]
        args.d_model, args.layers, args.d_mlp, args.repeats = 32, 1, 64, 1
        args.prefixes, args.m6_tokens = 8, 2
    if args.lengths is None:
        args.lengths = DEFAULT_LENGTHS + ([8192] if args.long else [])
    return args


# ------------------------------------------------------------------------------------------------
# Model, trace, memory


def build_model(args: argparse.Namespace, tokenizer: Any, n_ctx: int) -> Any:
    """The seeded random-init Qwen2 of the requested shape, booted as a bridge."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    from probes.models.load import boot_model

    torch.manual_seed(args.seed)
    cfg = Qwen2Config(
        vocab_size=args.vocab, hidden_size=args.d_model, intermediate_size=args.d_mlp,
        num_hidden_layers=args.layers, num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads, max_position_embeddings=n_ctx,
        tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id or 0,
        eos_token_id=tokenizer.eos_token_id or 0)
    device = torch.device(args.device)
    # initialised where it runs: a random init of the 1.5B shape on the CPU takes minutes
    with torch.device(device) if device.type == "cuda" else contextlib.nullcontext():
        hf = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    return boot_model(hf, tokenizer, spec="bench-peers-qwen2", device=args.device,
                      dtype=args.dtype)


def write_trace(tokenizer: Any, traces: Path, n: int, path: Path) -> Any:
    """A JSONL file of one real trace whose trajectory tokenizes to n tokens (the first trace's,
    cut at a token boundary or extended with the next traces' trajectories); its TokenizedTrace."""
    from probes.traces.read import read_traces
    from probes.traces.tokenize import tokenize_traces

    real = read_traces(traces).traces
    first, text, k = real[0], real[0].trajectory, 1
    while len(tokenizer(text, add_special_tokens=False)["input_ids"]) < n + 8 and k < len(real):
        text += "\n\n" + real[k].trajectory.replace("<think>", "").replace("</think>", "")
        k += 1
    tt = None
    for _ in range(6):
        path.write_text(json.dumps({"id": f"{first.id}-T{n}", "question": first.question,
                                    "trajectory": text, "answer": first.answer}) + "\n")
        (tt,), _ = tokenize_traces(read_traces(path), tokenizer)
        s, e = tt.spans["trajectory"]
        if e - s == n:
            return tt
        cut = int(tt.trajectory_offsets[min(n, e - s) - 1, 1])
        # trajectory_text may have lost a leading <think>; cut the written text at the same place
        lead = len(text) - len(tt.trajectory_text)
        text = text[:lead + cut] if e - s > n else text + " step"
    return tt


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


@contextmanager
def peak_mib(device: torch.device, out: dict[str, float]) -> Iterator[None]:
    """`out["mib"]`: peak memory of the block beyond its start (VmRSS on CPU, allocated on CUDA)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        yield
        torch.cuda.synchronize(device)
        out["mib"] = (torch.cuda.max_memory_allocated(device) - base) / 2**20
        return
    base = _status_kib("VmRSS")
    peak = [base]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.002):
            peak[0] = max(peak[0], _status_kib("VmRSS"))

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        out["mib"] = (max(peak[0], _status_kib("VmRSS")) - base) / 1024


@dataclass
class Run:
    """One side of a job: how to run it, and what its seconds stand for."""

    name: str
    fn: Callable[[], Any]
    scale: Callable[[float], float] = lambda s: s   # measured seconds -> reported seconds
    extrapolated: bool = False


def measure(runs: list[Run], device: torch.device, repeats: int, cheap_s: float
            ) -> dict[str, dict[str, Any]]:
    """Interleaved runs, best of `repeats` (while a round is cheap): seconds, peak MiB, output."""
    best: dict[str, dict[str, Any]] = {}
    for r in range(repeats):
        order = runs if r % 2 == 0 else runs[::-1]
        round_s = 0.0
        for run in order:
            mem: dict[str, float] = {}
            with peak_mib(device, mem):
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                t0 = time.perf_counter()
                out = run.fn()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                sec = time.perf_counter() - t0
            round_s += sec
            b = best.setdefault(run.name, {"seconds": float("inf"), "peak_mib": float("inf")})
            b["runs"] = r + 1
            if sec < b["seconds"]:
                b["seconds"], b["raw_seconds"], b["output"] = run.scale(sec), sec, out
            b["peak_mib"] = min(b["peak_mib"], mem["mib"])
            b["extrapolated"] = run.extrapolated
            del out
        if round_s >= cheap_s:
            break
    return best


# ------------------------------------------------------------------------------------------------
# The jobs: each returns (project run, peer runs, equality check)


def job_cache(loaded: Any, tt: Any, path: Path, work: Path) -> tuple[list[Run], Callable]:
    import h5py

    from cache.reader import open_cache
    from probes.pipeline.capture import CacheConfig, cache_traces

    n_layers = loaded.arch.n_layers
    s, e = tt.spans["trajectory"]
    names = [f"blocks.{layer}.hook_resid_post" for layer in range(n_layers)]
    ids = torch.as_tensor(tt.ids[:e]).reshape(1, -1).to(loaded.device)

    def project() -> Path:
        out = work / "project_cache.h5"
        cache_traces(loaded, path, out, CacheConfig(sites=("resid_post",), dtype="float16"),
                     overwrite=True)
        return out

    def transformer_lens() -> Path:
        out = work / "tl_cache.h5"
        with torch.no_grad():
            _, cache = loaded.bridge.run_with_cache(ids, names_filter=names, logits_to_keep=1)
        rows = torch.stack([cache[n][0, s:e] for n in names], dim=1)    # [T, L, d]
        with h5py.File(out, "w") as fh:
            fh.create_dataset("resid_post", data=rows.to(torch.float16).cpu().numpy())
        return out

    def check(project_out: Path, peer_out: Path) -> tuple[bool, float]:
        with open_cache(project_out) as rd:
            ours = np.asarray(rd.trace(rd.trace_ids()[0]).array("resid_post")[:], np.float32)
        with h5py.File(peer_out) as fh:
            theirs = np.asarray(fh["resid_post"][:], np.float32)
        if ours.shape != theirs.shape:
            return False, float("inf")
        diff = float(np.abs(ours - theirs).max())
        ulp = float(np.spacing(np.float16(np.abs(ours).max())))
        return diff <= 2 * ulp, diff

    return [Run("project", project), Run("TransformerLens run_with_cache + h5py",
                                         transformer_lens)], check


def job_lhat(loaded: Any, tt: Any, k: int, rng: np.random.Generator
             ) -> tuple[list[Run], Callable]:
    from hooks.hf_fast import plain_view
    from probes.measures.lhat.fast import lhat_fast
    from probes.measures.lhat.layout import _answer_nll, _layout
    from probes.measures.lhat.reference import lhat_naive

    lay = _layout(tt, loaded.device)
    n_traj, n_ans = lay.n_traj, len(lay.answer)
    ts = (np.arange(n_traj + 1) if n_traj + 1 <= k
          else np.sort(rng.choice(n_traj + 1, size=k, replace=False)))
    total = n_traj + 1
    view = plain_view(loaded.hf_model, "sdpa")
    suffix = torch.cat([lay.scaffold, lay.answer])[None]
    prefill_s = [0.0]

    def project() -> np.ndarray:
        return lhat_fast(loaded, tt).lhat

    @torch.no_grad()
    def hf_kv() -> np.ndarray:
        t0 = time.perf_counter()
        cache = view(lay.context[None], use_cache=True, logits_to_keep=1).past_key_values
        prefill_s[0] = time.perf_counter() - t0
        out = np.empty(len(ts))
        for i in range(len(ts) - 1, -1, -1):                      # t = T..0
            drop = cache.get_seq_length() - (lay.n_prompt + int(ts[i]))
            if drop:
                cache.crop(-drop)          # transformers 5: crop(-k) removes k tokens
            logits = view(suffix, past_key_values=cache, use_cache=True,
                          logits_to_keep=n_ans + 1).logits[0]
            out[i] = float(_answer_nll(logits[:-1], lay.answer).mean())
        return out

    def scale_kv(sec: float) -> float:
        return prefill_s[0] + (sec - prefill_s[0]) / len(ts) * total

    def check(ours: np.ndarray, theirs: np.ndarray) -> tuple[bool, float]:
        diff = float(np.abs(ours[ts].astype(np.float64) - theirs).max())
        return diff <= LHAT_TOL, diff

    sampled = len(ts) < total
    return [Run("project", project),
            Run("HF KV-cache reuse (crop per prefix)", hf_kv, scale_kv, sampled),
            Run("RaML per-prefix re-run", lambda: lhat_naive(loaded, tt, ts=ts),
                lambda sec: sec / len(ts) * total, sampled)], check


def job_anchors(loaded: Any, tt: Any) -> tuple[list[Run], Callable]:
    from probes.measures.anchors import receivers as anc
    from probes.traces.chunks import token_chunks

    spans = token_chunks(tt).spans + tt.spans["trajectory"][0]
    n_layers = loaded.arch.n_layers
    names = [f"blocks.{layer}.attn.hook_pattern" for layer in range(n_layers)]
    ids = torch.as_tensor(tt.ids).reshape(1, -1).to(loaded.device)

    def project() -> tuple[np.ndarray, np.ndarray]:
        pattern = anc.chunk_attention(loaded, tt.ids, spans)
        return pattern, anc.head_kurtosis(anc.vertical_scores(pattern))

    def thought_anchors() -> tuple[np.ndarray, np.ndarray]:
        with torch.no_grad():
            _, cache = loaded.bridge.run_with_cache(ids, names_filter=names, logits_to_keep=1)
        full = np.stack([cache[n][0].float().cpu().numpy() for n in names])   # [L, H, N, N]
        del cache
        c = len(spans)
        avg = np.full(full.shape[:2] + (c, c), np.nan, dtype=np.float32)
        for a in range(c):
            rows = full[:, :, spans[a, 0]:spans[a, 1]]
            for b in range(a + 1):
                avg[:, :, a, b] = rows[..., spans[b, 0]:spans[b, 1]].mean(axis=(-2, -1))
        return avg, anc.head_kurtosis(anc.vertical_scores(avg))

    def check(ours: tuple, theirs: tuple) -> tuple[bool, float]:
        diff = float(np.nanmax(np.abs(ours[0] - theirs[0])))
        same_nan = bool((np.isnan(ours[0]) == np.isnan(theirs[0])).all())
        return same_nan and diff <= PATTERN_TOL, diff

    return [Run("project", project),
            Run("Thought Anchors (full eager patterns)", thought_anchors)], check


def job_updates(loaded: Any, tt: Any, path: Path, work: Path, k: int,
                rng: np.random.Generator) -> tuple[list[Run], Callable]:
    from cache.reader import open_cache
    from hooks.hf_fast import plain_view
    from probes.measures.updates.alignment import answer_alignment
    from probes.pipeline.updates import UpdatesConfig, updates_traces

    s, e = tt.spans["trajectory"]
    a0, a1 = tt.spans["answer"]
    n_traj = e - s
    tokens = np.sort(rng.choice(n_traj, size=min(k, n_traj), replace=False))
    # the steps (not timed), on the linear-memory pass and at the first answer row only (all the
    # peer uses): the eager pass would keep [L, H, N, N] for the backward (45 GB at 8k on 1.5B)
    al = answer_alignment(loaded, tt.ids, tuple(tt.spans["trajectory"]), tuple(tt.spans["answer"]),
                          keep_factors=True, m6_rows=[0], attention="sdpa")
    view = plain_view(loaded.hf_model, "sdpa")
    mlps = [layer.mlp for layer in view.model.layers]
    factors = [[al.step_factors(layer, 0, int(i)) for layer in range(len(mlps))] for i in tokens]
    del al
    ids = torch.as_tensor(tt.ids).reshape(1, -1).to(loaded.device)
    answer = ids[0, a0:a1]

    def project() -> Path:
        out = work / "project_updates.h5"
        out.unlink(missing_ok=True)
        updates_traces(loaded, path, out, UpdatesConfig(), progress=False)
        return out

    def per_token_backward() -> np.ndarray:
        from torch.func import functional_call

        out = np.empty((len(mlps), len(tokens)))
        weights = {f"model.layers.{li}.mlp.{w}.weight": getattr(m, w).weight
                   for li, m in enumerate(mlps) for w in ("gate_proj", "up_proj")}
        for j in range(len(tokens)):
            eps = torch.zeros(len(mlps), requires_grad=True, device=loaded.device,
                              dtype=next(iter(weights.values())).dtype)
            params = {}
            for li, m in enumerate(mlps):
                du, b = (x.to(eps.dtype) for x in factors[j][li])
                for w in ("gate_proj", "up_proj"):
                    W = getattr(m, w).weight.detach()
                    params[f"model.layers.{li}.mlp.{w}.weight"] = W + eps[li] * torch.outer(W @ du, b)
            h = functional_call(view.model, {k.removeprefix("model."): v
                                             for k, v in params.items()}, (ids,)
                                ).last_hidden_state[0, a0 - 1:a1 - 1]
            logits = view.lm_head(h).float()
            loss = -torch.log_softmax(logits, -1).gather(-1, answer[:, None]).mean()
            (g,) = torch.autograd.grad(loss, eps)
            out[:, j] = g.double().cpu().numpy()
        return out

    def check(project_out: Path, theirs: np.ndarray) -> tuple[bool, float]:
        with open_cache(project_out) as rd:
            ours = np.asarray(rd.trace(rd.trace_ids()[0]).array("upd_dl_pred")[:], np.float64)
        scale = np.abs(ours).max(axis=1, keepdims=True)
        rel = float((np.abs(ours[:, tokens] - theirs) / scale).max())
        return rel <= M6_RTOL, rel

    return [Run("project", project),
            Run("autograd backward per token", per_token_backward,
                lambda sec: sec / len(tokens) * n_traj, len(tokens) < n_traj)], check


def nnsight_child(args: argparse.Namespace) -> dict[str, Any]:
    """(In the nnsight interpreter.) `NNsight(model).trace(ids)` + `.save()` of every decoder
    layer's output (= resid_post) at the trajectory rows, written with h5py; seconds, peak MiB."""
    import h5py
    from nnsight import NNsight
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config

    torch.set_num_threads(args.threads)
    n, out = int(args.nnsight_child[0]), Path(args.nnsight_child[1])
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    with tempfile.TemporaryDirectory() as tmp:
        tt = write_trace(tokenizer, args.traces, n, Path(tmp) / "t.jsonl")
    s, e = tt.spans["trajectory"]
    torch.manual_seed(args.seed)   # the same weights as build_model (same config, same order)
    cfg = Qwen2Config(
        vocab_size=args.vocab, hidden_size=args.d_model, intermediate_size=args.d_mlp,
        num_hidden_layers=args.layers, num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads, max_position_embeddings=tt.n_tokens + 64,
        tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id or 0,
        eos_token_id=tokenizer.eos_token_id or 0)
    hf = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval()
    model = NNsight(hf)
    ids = torch.as_tensor(tt.ids[:e]).reshape(1, -1)

    def run() -> None:
        saved: list[Any] = []          # filled inside the traced block (nnsight runs its body)
        with torch.no_grad(), model.trace(ids, logits_to_keep=1):
            for layer in model.model.layers:
                saved.append(layer.output.save())
        rows = torch.stack([(x[0] if isinstance(x, tuple) else x)[0, s:e] for x in saved], 1)
        with h5py.File(out, "w") as fh:
            fh.create_dataset("resid_post", data=rows.to(torch.float16).numpy())

    run()                                  # warm-up (the same trace)
    best: dict[str, float] = {"seconds": float("inf"), "peak_mib": float("inf")}
    for _ in range(args.repeats):
        mem: dict[str, float] = {}
        with peak_mib(torch.device("cpu"), mem):
            t0 = time.perf_counter()
            run()
            sec = time.perf_counter() - t0
        best = {"seconds": min(best["seconds"], sec), "peak_mib": min(best["peak_mib"], mem["mib"])}
    return best


def nnsight_run(args: argparse.Namespace, argv: list[str], n: int, work: Path
                ) -> Callable[[], Path]:
    """The nnsight peer as a Run function: its own interpreter (its own venv), timed inside."""
    report: dict[str, Any] = {}

    def fn() -> Path:
        out = work / "nnsight_cache.h5"
        base = [a for a in argv if a not in ("--json", "--smoke")]
        cmd = [args.nnsight_python, str(Path(__file__).resolve()), *base,
               *(["--smoke"] if args.smoke else []), "--nnsight-child", str(n), str(out)]
        res = subprocess.run(cmd, capture_output=True, text=True,
                             env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
        if res.returncode != 0:
            raise RuntimeError(f"nnsight run failed: {res.stderr.strip().splitlines()[-1:]}")
        report.update(json.loads(res.stdout.strip().splitlines()[-1]))
        return out

    fn.report = report  # type: ignore[attr-defined]
    return fn


def nnsight_skip(args: argparse.Namespace) -> str | None:
    """Why the nnsight peer does not run (None: it runs)."""
    if not args.nnsight_python:
        return ("skip: nnsight: no --nnsight-python given (install it in its own venv: "
                "python -m venv V && V/bin/pip install nnsight, then --nnsight-python V/bin/python)")
    res = subprocess.run([args.nnsight_python, "-c", "import nnsight, torch, transformers"],
                         capture_output=True, text=True)
    if res.returncode != 0:
        return (f"skip: nnsight: {args.nnsight_python} cannot import nnsight/torch/transformers: "
                f"{(res.stderr.strip().splitlines() or ['?'])[-1]}")
    return None


# ------------------------------------------------------------------------------------------------
# Driver


def run(args: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
    from transformers import AutoTokenizer

    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    skip_nn = nnsight_skip(args) if "cache" in args.jobs else None
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        points = [(True, WARM_T), *((False, n) for n in args.lengths)]
        traces = {(w, n): write_trace(tokenizer, args.traces, n, work / f"T{n}-{w}.jsonl")
                  for w, n in points}
        loaded = build_model(args, tokenizer, max(t.n_tokens for t in traces.values()) + 64)
        device = loaded.device
        for warm, n in points:                   # the warm-up is not reported
            tt, path = traces[(warm, n)], work / f"T{n}-{warm}.jsonl"
            rng = np.random.default_rng(args.seed + n)
            for job in args.jobs:
                if job == "cache":
                    runs, check = job_cache(loaded, tt, path, work)
                    if skip_nn is None and not warm:
                        runs.append(Run("nnsight trace + save + h5py",
                                        nnsight_run(args, argv, n, work)))
                elif job == "lhat":
                    runs, check = job_lhat(loaded, tt, args.prefixes, rng)
                elif job == "anchors":
                    runs, check = job_anchors(loaded, tt)
                else:
                    runs, check = job_updates(loaded, tt, path, work, args.m6_tokens, rng)
                res = measure(runs, device, 1 if warm else args.repeats, args.cheap_s)
                if warm:
                    continue
                ours = res["project"]
                for r in runs[1:]:
                    peer = res[r.name]
                    if hasattr(r.fn, "report"):          # nnsight: timed in its own process
                        peer["seconds"] = r.fn.report["seconds"]
                        peer["peak_mib"] = r.fn.report["peak_mib"]
                    equal, diff = check(ours["output"], peer["output"])
                    rows.append({
                        "job": job, "T": tt.spans["trajectory"][1] - tt.spans["trajectory"][0],
                        "n_tokens": tt.n_tokens, "peer": r.name,
                        "project_s": ours["seconds"], "peer_s": peer["seconds"],
                        "ratio": peer["seconds"] / ours["seconds"],
                        "project_peak_mib": ours["peak_mib"], "peer_peak_mib": peer["peak_mib"],
                        "peer_extrapolated": peer["extrapolated"], "runs": ours["runs"],
                        "equal": bool(equal), "max_diff": diff})
                    print(f"# {format_row(rows[-1])}", file=sys.stderr, flush=True)
                del runs, res, ours
    arch = loaded.arch
    return {
        "model": {"family": arch.family, "d_model": arch.d_model, "n_layers": arch.n_layers,
                  "n_heads": arch.n_heads, "n_kv_heads": arch.n_kv_heads, "d_mlp": arch.d_mlp,
                  "vocab": arch.vocab_size, "dtype": arch.dtype, "init": "random"},
        "tokenizer": str(args.tokenizer), "trace": str(args.traces),
        "device": str(device), "threads": torch.get_num_threads() if device.type == "cpu" else None,
        "memory": ("peak CUDA allocated beyond the start" if device.type == "cuda"
                   else "peak VmRSS beyond the start, sampled every 2 ms"),
        "skips": [skip_nn] if skip_nn else [], "rows": rows}


HEADER = (f"{'job':<8} {'T':>5} {'peer':<40} {'project s':>9} {'peer s':>9} {'ratio':>7} "
          f"{'proj MiB':>8} {'peer MiB':>8} equal?")


def format_row(r: dict[str, Any]) -> str:
    peer_s = f"{'~' if r['peer_extrapolated'] else ''}{r['peer_s']:.2f}"
    return (f"{r['job']:<8} {r['T']:>5} {r['peer']:<40} {r['project_s']:>9.2f} {peer_s:>9} "
            f"{r['ratio']:>6.1f}x {r['project_peak_mib']:>8.0f} {r['peer_peak_mib']:>8.0f} "
            f"{'yes' if r['equal'] else 'NO'} ({r['max_diff']:.1e})")


def format_table(report: dict[str, Any]) -> str:
    m = report["model"]
    lines = [f"# {m['family']} d_model={m['d_model']} layers={m['n_layers']} heads={m['n_heads']}/"
             f"{m['n_kv_heads']} d_mlp={m['d_mlp']} vocab={m['vocab']} {m['dtype']} (random init),"
             f" real Qwen tokenizer + R1 trace; {report['device']}, threads={report['threads']};"
             f" memory = {report['memory']} (MiB)", HEADER]
    lines += [format_row(r) for r in report["rows"]]
    lines.append("ratio = peer s / project s; ~ = extrapolated from sampled prefixes / tokens; "
                 "equal? = the outputs agree (max diff in brackets)")
    lines += report["skips"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") is None:
        # large freed blocks go back to the OS, so each run's RSS peak is its own
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
        os.execve(sys.executable, [sys.executable, str(Path(__file__).resolve()), *argv], env)
    args = _parse(argv)
    if args.nnsight_child:
        print(json.dumps(nnsight_child(args)))
        return 0
    for need in (args.tokenizer / "vocab.json", args.traces):
        if not need.exists():
            print(f"skip: {need} not found (the shared test data: ../shared/data beside the "
                  "repository)")
            return 0
    report = run(args, argv)
    print(format_table(report))
    if args.json:
        print(json.dumps(report, sort_keys=True))
    return 0 if all(r["equal"] for r in report["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())
