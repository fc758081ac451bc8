"""`python -m probes.run updates`: per-token implicit updates of every trace, into an HDF5 cache.

The answer rows are 𝒬 = answer start − 1 .. answer end − 2 (the positions that predict the answer
tokens). `--answer-rows first` (the default) measures M1–M6 at q = `spans["answer"][0] - 1`, the
first row of 𝒬; `--answer-rows mean` measures every per-row quantity at each row of 𝒬 and stores
its average over the rows (per layer and trajectory token). ONE forward and ONE backward pass of
the model per trace either way (plus one forward without grad for the bridge captures on the eager
pass of a family outside the Llama layout) (`probes.measures.updates.shared_pass.trace_update_arrays`:
`probes.measures.updates.alignment.answer_alignment`, with the bridge captures of
`probes.measures.updates.attention.query_capture` / `query_rows_capture` and, for "first",
`probes.measures.updates.mlp.row_capture` riding on its forward) give the attention quantities M1–M4
(`probes.measures.updates.attention`), the MLP steps M5 (`probes.measures.updates.mlp`, trajectory = the
trajectory
span's positions) and the gradient alignment M6 / M7 (`probes.measures.updates.alignment`); the values
equal separate
`token_updates`, `mlp_updates` and `answer_alignment` calls (for "mean": those calls at each row
of 𝒬, averaged; there M5's σ and cosine come from the step norms / cosines `answer_alignment` forms
for M6 at every row, the same frozen-upstream prefixes and Grams, instead of a second pass). Only
the trajectory keys a..b-1 are kept, so every array is float32 [n_layers, T] with index i =
trajectory token i (the per-row definitions below; "at q" = at each row for "mean"):
* `upd_contrib`: M2 ‖Σ_h p W_O^h v_t‖ (`contrib_sum_norm`).
* `upd_loo`: M4 ‖Σ_h W_O^h δz_{h,t}‖ (`loo_sum_norm`).
* `upd_mass`: M1 attention mass p_{h,t} AVERAGED over the query heads (mean, so it is in [0, 1]).
* `upd_dai_fro`: M3 ‖v_t‖‖k̃_t‖ SUMMED over the KV heads.
* `upd_sigma_gate`, `upd_sigma_up`: M5 σ_i = ‖step_i‖_F for W_gate / W_up.
* `upd_cos_gate`: M5 cos(step_i, step_{i−1}) for W_gate (NaN at i = 0).
* `upd_align_cos`: M6 descent cosine −⟨G, step_i⟩/(‖G‖_F ‖step_i‖_F) of token i's joint
  (gate ⊕ up) MLP step at q, G = ∂L/∂(W_gate, W_up) of the answer loss L (mean NLL of the answer
  tokens, full context); > 0 = a descent direction; NaN where the step is zero
  (`answer_alignment(...).cos[2][:, 0, :]`).
* `upd_dl_pred`: M6 first-order ΔL^pred = ⟨G, step_i⟩ of that joint step at q, in nats
  (`.inner[2][:, 0, :]`; < 0 = applying the step as a weight edit lowers L).
* `upd_m7`: M7 first-order effect on L of removing token i from layer ℓ's attention at every
  answer row 𝒬 (summed over rows and heads; frozen upstream, direct edges only), in nats
  (`.m7`; > 0 = removing the token would raise L, i.e. the token helps). The same sum over 𝒬 in
  both `--answer-rows` modes.

`--answer-rows mean`: `upd_contrib`, `upd_loo`, `upd_mass`, `upd_sigma_gate`, `upd_sigma_up`,
`upd_dl_pred` are plain means over the Q rows; `upd_cos_gate` and `upd_align_cos` NaN-skipping
means (NaN only where the cosine is NaN at every row, e.g. `upd_cos_gate[:, 0]`); `upd_dai_fro`
(‖v_t‖‖k̃_t‖ does not depend on the query) is the single-row value.

Attrs: `upd_query` (q, the first answer row in both modes), `upd_control` ("none" or
"random-init"), `upd_layers` (JSON list of the layers stored as the array rows; `--layers` picks a
subset, all by default), `upd_rows` ("first" or "mean") and `upd_n_rows` (the number of rows the
per-row quantities are averaged over: 1 for "first", Q for "mean"). An existing cache (e.g. from
`lhat` or `cache`) gains these arrays in its trace groups; a new file gets trace groups with
tokens, categories and the arrays. Resumable: a trace that already has `upd_m7` (`DONE_KEY`, the
last of `UPDATE_ARRAYS`) is skipped, so a cache written before the M6/M7 arrays existed gets all
`upd_*` arrays (re)computed for its traces. A cache whose update arrays were written with other
`--layers` or another `--answer-rows` (`upd_rows`; absent = "first") is refused with one error:
write to another --out.

The families of `probes.measures.updates.families.UPDATE_FAMILIES`: the Llama layout (Qwen2 / Qwen2.5 /
DeepSeek-R1-Distill-Qwen, Qwen3, Llama, Mistral), GPT-2 (no up projection: `upd_sigma_gate` /
`upd_cos_gate` are those of its one MLP input matrix W_in = `c_fc`, `upd_sigma_up` is NaN) and
Phi-3 (fused projections; the linear-memory pass only: `--attention eager` is refused, `auto`
picks `sdpa`). Any other family (Gemma-2/3, OLMo-2, …) is refused with one line naming what is
missing, before the cache is touched.

`--control random-init` runs a randomly initialised model of the same architecture (seeded) instead
of the trained weights; its metadata model label is `"<model>+random-init(<seed>)"`, so it must go
to another --out file (appending it to a trained-model cache is refused by the identity check).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from os import PathLike
from pathlib import Path

import numpy as np

from cache import open_cache
from hooks.model import LoadedModel
from probes.errors import ProbesError
from probes.measures.updates.shared_pass import (
    UPDATE_ARRAYS,
    RunConstants,
    check_updates,
    stored_layers,
    trace_update_arrays,
)
from probes.models.controls import random_init_model
from probes.models.spec import ModelSpec
from probes.pipeline.configs import TraceSource, UpdatesConfig, trace_source
from probes.pipeline.loop import Log, Plan, TraceOutput, WriteJob, WriteResult, loader, write_traces

NAME = "updates"


DONE_KEY = UPDATE_ARRAYS[-1]
"""A trace that has this array is skipped on resume."""


@dataclass
class UpdatesRunResult(WriteResult):
    """What an `updates` run did: the write loop's counts and the control used."""

    control: str = "none"


def updates_traces(
    model: ModelSpec | LoadedModel | str,
    traces: TraceSource | str | PathLike[str],
    out: Path,
    cfg: UpdatesConfig,
    *,
    resume: bool = False,
    device: str | None = None,
    dtype: str | None = None,
    progress: bool = True,
    log: Log | None = None,
) -> UpdatesRunResult:
    """Compute and store the per-token implicit updates (M1–M7) of every trace.

    Args:
        model: A `ModelSpec` (or its name), or a loaded model.
        traces: A `TraceSource`, or the JSONL path (then the trace settings given to `cfg` in
            the older calling convention apply: `probes.pipeline.configs.trace_source`).
        out: The HDF5 cache (created; an existing one is extended only with `resume`).
        cfg: Run settings.
        resume: Extend an existing `out` (`probes.pipeline.loop.RESUME_HELP`).
        device, dtype: Replace the spec's device / dtype (the older calling convention).
        progress: Show a progress bar on stderr.
        log: Receives one-line messages.

    Returns:
        Counts and timing.

    Raises:
        ProbesError, CacheError: Bad input, a model `updates` does not support (`UpdatesError`,
            raised before the cache is opened for writing), a cache made with another model (a
            random-init control into a trained-model cache included) / tokenizer / scaffold, or
            with other `layers` / `answer_rows`, or a trace whose stored tokens differ from this
            tokenization.
    """
    out = Path(out)
    source = trace_source(traces, cfg)
    job = WriteJob(command=NAME, out=out, resume=resume, done_key=DONE_KEY, progress=progress,
                   log=log)

    def load() -> LoadedModel:
        loaded = loader(model, device=device, dtype=dtype)()
        check_updates(loaded, cfg.attention)
        return random_init_model(loaded, cfg.seed) if cfg.control == "random-init" else loaded

    def plan(loaded: LoadedModel) -> Plan:
        layers = _check_cache(out, cfg.layers, loaded.arch.n_layers, cfg.answer_rows)
        consts: list[RunConstants] = []  # built on the first trace that needs them

        def compute(tt) -> TraceOutput | str:
            a, b = tt.spans["trajectory"]
            if b <= a or tt.spans["answer"][1] <= tt.spans["answer"][0]:
                return "no trajectory or no answer token: nothing to measure"
            if not consts:
                consts.append(RunConstants(loaded))
            arrays, query = trace_update_arrays(loaded, tt, consts[0], answer_rows=cfg.answer_rows,
                                                 attention=cfg.attention)
            if layers != list(range(loaded.arch.n_layers)):
                arrays = {k: np.ascontiguousarray(v[layers]) for k, v in arrays.items()}
            answer = tt.spans["answer"]
            n_rows = 1 if cfg.answer_rows == "first" else int(answer[1] - answer[0])
            return TraceOutput(arrays=arrays, attrs={
                "upd_query": query, "upd_control": cfg.control, "upd_layers": json.dumps(layers),
                "upd_rows": cfg.answer_rows, "upd_n_rows": n_rows})

        return Plan(compute)

    return write_traces(job, source, load=load, plan=plan,
                        result=UpdatesRunResult(control=cfg.control))


def _check_cache(out: Path, layers: tuple[int, ...] | None, n_layers: int,
                 answer_rows: str = "first") -> list[int]:
    """The layers to store; refuses layers out of range, or an existing `out` whose update arrays
    were written with other layers (`upd_layers`) or other answer rows (`upd_rows`; a trace
    without the attribute counts as "first")."""
    chosen = list(range(n_layers)) if layers is None else list(layers)
    bad = [x for x in chosen if not 0 <= x < n_layers]
    if bad:
        raise ProbesError(f"--layers {bad} out of range: the model has {n_layers} layers")
    if out.exists():
        with open_cache(out) as reader:
            for tr in reader:
                if "upd_contrib" in tr.names():
                    have = stored_layers(tr)
                    if have != chosen:
                        raise ProbesError(
                            f"{out} holds update arrays of layers {have}; this run asks for "
                            f"{chosen}: pass the same --layers or write to another --out"
                        )
                    rows = str(tr.attrs.get("upd_rows", "first"))
                    if rows != answer_rows:
                        raise ProbesError(
                            f"{out} holds update arrays measured with --answer-rows {rows}; this "
                            f"run asks for --answer-rows {answer_rows}: pass --answer-rows {rows} "
                            f"or write to another --out"
                        )
                    break
    return chosen
