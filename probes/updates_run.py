"""`python -m probes.run updates`: per-token implicit updates of every trace, into an HDF5 cache.

The answer rows are 𝒬 = answer start − 1 .. answer end − 2 (the positions that predict the answer
tokens). `--answer-rows first` (the default) measures M1–M6 at q = `spans["answer"][0] - 1`, the
first row of 𝒬; `--answer-rows mean` measures every per-row quantity at each row of 𝒬 and stores
its average over the rows (per layer and trajectory token). ONE forward and ONE backward pass of
the model per trace either way (`probes.alignment.answer_alignment`, with the bridge captures of
`probes.updates.query_capture` / `query_rows_capture` and, for "first",
`probes.mlp_update.row_capture` riding on its forward) give the attention quantities M1–M4
(`probes.updates`), the MLP steps M5 (`probes.mlp_update`, trajectory = the trajectory span's
positions) and the gradient alignment M6 / M7 (`probes.alignment`); the values equal separate
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

Only Llama-style RoPE models with a gated MLP (Qwen2 / Qwen2.5 / DeepSeek-R1-Distill-Qwen, Qwen3,
Llama); any other (e.g. GPT-2) is refused with one clear error before the cache is touched. The
model runs with eager attention (what `load_model` / `boot_model` give).

`--control random-init` runs a randomly initialised model of the same architecture (seeded) instead
of the trained weights; its metadata model label is `"<model>+random-init(<seed>)"`, so it must go
to another --out file (appending it to a trained-model cache is refused by the identity check).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from probes.errors import ProbesError
from probes.models import LoadedModel, load_model
from probes.traces import DEFAULT_SCAFFOLD

UPDATE_ARRAYS = ("upd_contrib", "upd_loo", "upd_mass", "upd_dai_fro", "upd_sigma_gate",
                 "upd_sigma_up", "upd_cos_gate", "upd_align_cos", "upd_dl_pred", "upd_m7")
"""The stored arrays, in the order they are written (each float32 [n_layers, T])."""
DONE_KEY = UPDATE_ARRAYS[-1]
"""A trace that has this array is skipped on resume."""
CONTROLS = ("none", "random-init")
ANSWER_ROWS = ("first", "mean")
"""`--answer-rows`: the per-row quantities at the first answer row only, or averaged over 𝒬."""


@dataclass(frozen=True, kw_only=True)
class UpdatesConfig:
    """Settings of an `updates` run.

    Attributes:
        control: "none" (the trained weights) or "random-init" (same architecture, random weights).
        seed: Seed of the random initialisation for `control="random-init"`.
        limit: Use only the first N traces.
        layers: Store only these layers (rows of every array, in this order; recorded in the
            trace attribute `upd_layers`); None: all layers.
        prompt_format: Prompt format string; None = chat template or the documented default.
        scaffold: The answer scaffold between trajectory and answer.
        answer_rows: "first": M1–M6 at the first answer row q = answer start − 1 only; "mean":
            measured at every answer row of 𝒬 and averaged over the rows (recorded in the trace
            attribute `upd_rows`; M7 is the sum over 𝒬 either way).
    """

    control: str = "none"
    seed: int = 0
    limit: int | None = None
    layers: tuple[int, ...] | None = None
    prompt_format: str | None = None
    scaffold: str = DEFAULT_SCAFFOLD
    answer_rows: str = "first"

    def __post_init__(self) -> None:
        if self.control not in CONTROLS:
            raise ProbesError(f"--control must be one of {', '.join(CONTROLS)}, got {self.control!r}")
        if self.answer_rows not in ANSWER_ROWS:
            raise ProbesError(f"--answer-rows must be one of {', '.join(ANSWER_ROWS)}, got "
                              f"{self.answer_rows!r}")
        if self.layers is not None and (not self.layers or len(set(self.layers)) != len(self.layers)
                                        or list(self.layers) != sorted(self.layers)):
            raise ProbesError(f"--layers must be distinct and increasing, got {list(self.layers)}")
        if self.limit is not None and self.limit < 1:
            raise ProbesError(f"--limit must be at least 1, got {self.limit}")


@dataclass
class UpdatesRunResult:
    """What an `updates` run did; `to_dict()` is the CLI's JSON."""

    out: str
    control: str = "none"
    n_traces: int = 0
    n_written: int = 0
    n_skipped: int = 0
    n_empty: int = 0
    n_too_long: int = 0
    n_bad_lines: int = 0
    seconds: float = 0.0
    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        return asdict(self)


def random_init_model(loaded: LoadedModel, seed: int) -> LoadedModel:
    """A randomly initialised model with the same architecture and tokenizer as `loaded`.

    Args:
        loaded: The trained model (its config, tokenizer, device and dtype are reused).
        seed: `torch.manual_seed` before `AutoModelForCausalLM.from_config`.

    Returns:
        The booted random model; its spec is `"<model label>+random-init(<seed>)"`.
    """
    import torch
    from transformers import AutoModelForCausalLM

    from probes.capture import _model_label
    from probes.models import boot_model

    torch.manual_seed(seed)
    hf = AutoModelForCausalLM.from_config(loaded.hf_model.config)
    return boot_model(hf, loaded.tokenizer, spec=f"{_model_label(loaded)}+random-init({seed})",
                      device=loaded.device, dtype=loaded.arch.dtype)


def check_supported(loaded: LoadedModel) -> None:
    """Refuse, with one clear error, a model `updates` cannot measure.

    Raises:
        UpdatesError: Unless the model is Llama-style (Qwen2 / Qwen3 / Llama: RoPE, GQA attention
            with o_proj, RMSNorm, a bias-free gated MLP).
    """
    from probes.updates import UpdatesError

    arch = loaded.arch
    hf = loaded.hf_model
    try:
        layers = list(hf.model.layers)
        ok = arch.positional == "rope" and arch.mlp == "gated" and all(
            hasattr(layer, "input_layernorm") and hasattr(layer, "post_attention_layernorm")
            and hasattr(layer.self_attn, "o_proj") and hasattr(layer.mlp, "gate_proj")
            for layer in layers)
    except AttributeError:
        ok = False
    if not ok:
        raise UpdatesError(
            f"updates needs a Llama-style model with RoPE and a gated MLP (Qwen2/Qwen2.5, "
            f"DeepSeek-R1-Distill-Qwen, Qwen3, Llama); {loaded.spec!r} is a {arch.family!r} model "
            f"(positional={arch.positional!r}). Use one of those architectures."
        )


class RunConstants:
    """Per-model constants of an `updates` run, computed once and reused for every trace.

    Attributes:
        o_proj: `probes.updates.o_proj_weights(loaded)`.
        m5: `probes.mlp_update.layer_weights(loaded, with_mlp=False)` (W_O, γ2 and the Grams
            WᵀW of gate/up, float64 on the model's device).
        grams: The same Grams, as `answer_alignment(grams=...)` takes them.
    """

    def __init__(self, loaded: LoadedModel) -> None:
        from probes.mlp_update import layer_weights
        from probes.updates import o_proj_weights

        check_supported(loaded)
        self.o_proj = o_proj_weights(loaded)
        self.m5 = layer_weights(loaded, with_mlp=False, device=loaded.device)
        self.grams = [w.grams for w in self.m5]


def trace_update_arrays(loaded: LoadedModel, tt, consts: RunConstants | None = None, *,
                        answer_rows: str = "first", timings: dict[str, float] | None = None,
                        ) -> tuple[dict[str, np.ndarray], int]:
    """The stored `upd_*` arrays of one tokenized trace (float32 [n_layers, T]).

    One forward + one backward: `answer_alignment` (M7 at all answer rows 𝒬; M6 at the first row
    or at all of them) with the M1–M4 bridge capture (and, for "first", the M5 one) hooked into
    its forward.

    Args:
        loaded: A booted Llama-style RoPE model with a gated MLP (eager attention).
        tt: A `TokenizedTrace` with a non-empty trajectory and answer.
        consts: `RunConstants(loaded)`, reused across traces; None computes them now.
        answer_rows: "first": M1–M6 at q = answer start − 1 (`token_updates`, `mlp_updates`,
            M6 row 0). "mean": each of them at every row of 𝒬 = answer start − 1 .. answer end − 2
            (`key_summary_from`; M5 σ / cosine and M6 from `answer_alignment` at all rows), then
            averaged over the rows per layer and token (the two cosines with a NaN-skipping mean:
            NaN only where every row is NaN). `upd_dai_fro` does not depend on the row; `upd_m7`
            is the sum over 𝒬 in both modes.
        timings: If given, filled with the seconds of each stage (device-synchronised):
            `alignment` (the shared forward + backward and M6/M7; for "mean" also M5), `m1_m4`,
            `m5` (≈ 0 for "mean").

    Returns:
        (arrays in `UPDATE_ARRAYS` order, query position = the first answer row).

    Raises:
        UpdatesError: For an unsupported model.
        ProbesError: For an unknown `answer_rows`.
    """
    import torch

    from probes.alignment import answer_alignment
    from probes.mlp_update import check_positions, mlp_updates_from, row_capture
    from probes.updates import check_query, query_capture, token_updates_from

    if answer_rows not in ANSWER_ROWS:
        raise ProbesError(f"answer_rows must be one of {', '.join(ANSWER_ROWS)}, got "
                          f"{answer_rows!r}")
    consts = RunConstants(loaded) if consts is None else consts
    a, b = (int(x) for x in tt.spans["trajectory"])
    answer = (int(tt.spans["answer"][0]), int(tt.spans["answer"][1]))
    query = answer[0] - 1
    ids = torch.as_tensor(np.asarray(tt.ids, dtype=np.int64)).reshape(1, -1).to(loaded.device)
    if answer_rows == "mean":
        return _mean_rows_arrays(loaded, ids, (a, b), answer, consts, timings), query
    check_query(loaded, int(ids.shape[1]), query)
    _, _, traj = check_positions(loaded, ids, [query], range(a, b))
    clock = _Clock(loaded.device, timings)
    # captures stay on the model's device: M1–M5 are computed there (float64), like M6/M7
    with (query_capture(loaded, query, device=None) as get_query,
          row_capture(loaded, [query], device=None) as get_rows):
        al = answer_alignment(loaded, ids, (a, b), answer, m6_rows=[0], grams=consts.grams)
    clock.lap("alignment")
    upd = token_updates_from(loaded, get_query(), consts.o_proj)
    clock.lap("m1_m4")
    mlp = mlp_updates_from(get_rows(), consts.m5, traj, keep_du=False)
    clock.lap("m5")
    arrays = {
        "upd_contrib": _f32(upd.contrib_sum_norm[:, a:b]),
        "upd_loo": _f32(upd.loo_sum_norm[:, a:b]),
        "upd_mass": _f32(upd.mass[:, :, a:b].mean(axis=1)),
        "upd_dai_fro": _f32(upd.dai_fro[:, :, a:b].sum(axis=1)),
        "upd_sigma_gate": _f32(mlp.sigma_gate),
        "upd_sigma_up": _f32(mlp.sigma_up),
        "upd_cos_gate": _f32(mlp.cos_gate),
        "upd_align_cos": _f32(al.cos[2][:, 0, :]),
        "upd_dl_pred": _f32(al.inner[2][:, 0, :]),
        "upd_m7": _f32(al.m7),
    }
    return arrays, query


def _mean_rows_arrays(loaded: LoadedModel, ids, trajectory: tuple[int, int],
                      answer: tuple[int, int], consts: RunConstants,
                      timings: dict[str, float] | None) -> dict[str, np.ndarray]:
    """`trace_update_arrays(answer_rows="mean")`: every per-row quantity averaged over 𝒬.

    M1–M4 from `query_rows_capture` + `key_summary_from` (keys/values once, the trajectory keys
    only). M5's σ and consecutive cosine at every row are the `step_norm` / `step_cos` that
    `answer_alignment` forms anyway for M6 at all rows (the same restricted-attention prefixes
    and Gram products as `mlp_updates_rows_from`, which would repeat that O(Q·T·d²) work).
    """
    from probes.alignment import answer_alignment
    from probes.mlp_update import check_positions
    from probes.updates import check_query_rows, key_summary_from, query_rows_capture

    a, b = trajectory
    rows = list(range(answer[0] - 1, answer[1] - 1))
    check_query_rows(loaded, int(ids.shape[1]), rows)
    _, _, traj = check_positions(loaded, ids, rows, range(a, b))
    clock = _Clock(loaded.device, timings)
    with query_rows_capture(loaded, rows, device=None) as get_query:
        al = answer_alignment(loaded, ids, (a, b), answer, m6_rows=None, grams=consts.grams)
    clock.lap("alignment")
    summ = key_summary_from(loaded, get_query(), traj, consts.o_proj)      # [L, Q, T]
    clock.lap("m1_m4")
    clock.lap("m5")                                                        # inside `alignment`
    return {
        "upd_contrib": _f32(summ.contrib_sum_norm.mean(axis=1)),
        "upd_loo": _f32(summ.loo_sum_norm.mean(axis=1)),
        "upd_mass": _f32(summ.mass.mean(axis=1)),
        "upd_dai_fro": _f32(summ.dai_fro),
        "upd_sigma_gate": _f32(al.step_norm[0].mean(axis=1)),              # [L, Q, T] -> [L, T]
        "upd_sigma_up": _f32(al.step_norm[1].mean(axis=1)),
        "upd_cos_gate": _f32(_nanmean(al.step_cos[0], axis=1)),
        "upd_align_cos": _f32(_nanmean(al.cos[2], axis=1)),
        "upd_dl_pred": _f32(al.inner[2].mean(axis=1)),
        "upd_m7": _f32(al.m7),
    }


def _nanmean(x: np.ndarray, axis: int) -> np.ndarray:
    """Mean over `axis` skipping NaN; NaN where every entry is NaN (no warning)."""
    ok = ~np.isnan(x)
    n = ok.sum(axis=axis)
    total = np.where(ok, x, 0.0).sum(axis=axis)
    return np.where(n > 0, total / np.maximum(n, 1), np.nan)


class _Clock:
    """Stage timer for `trace_update_arrays(timings=...)` (a no-op without a dict)."""

    def __init__(self, device, out: dict[str, float] | None) -> None:
        self.device, self.out = device, out
        self.t = self._now() if out is not None else 0.0

    def _now(self) -> float:
        if self.device.type == "cuda":
            import torch

            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def lap(self, name: str) -> None:
        if self.out is not None:
            now = self._now()
            self.out[name] = now - self.t
            self.t = now


def _f32(x) -> np.ndarray:
    """A contiguous float32 copy (the stored dtype)."""
    return np.ascontiguousarray(np.asarray(x)).astype(np.float32)


def updates_traces(
    model: str | LoadedModel,
    traces_path: Path,
    out: Path,
    cfg: UpdatesConfig,
    *,
    device: str = "auto",
    dtype: str = "float32",
    progress: bool = True,
) -> UpdatesRunResult:
    """Compute and store the per-token implicit updates (M1–M7) of every trace.

    Args:
        model: A model spec for `load_model`, or a loaded model.
        traces_path: JSONL traces.
        out: The HDF5 cache (created, or extended when it exists).
        cfg: Run settings.
        device: Where the model runs.
        dtype: Model dtype.
        progress: Show a tqdm bar on stderr.

    Returns:
        Counts and timing.

    Raises:
        ProbesError: Bad input, a model `updates` does not support (`UpdatesError`, raised
            before the cache is opened), a cache made with another model (a random-init control
            into a trained-model cache included) / tokenizer / scaffold, or with other
            `layers` / `answer_rows`, or a trace whose stored tokens differ from this
            tokenization.
    """
    from probes.trace_arrays import add_trace_arrays
    from probes.traces import read_traces

    t0 = time.perf_counter()
    loaded = model if isinstance(model, LoadedModel) else load_model(model, device=device, dtype=dtype)
    check_supported(loaded)
    if cfg.control == "random-init":
        loaded = random_init_model(loaded, cfg.seed)
    layers = _check_cache(out, cfg.layers, loaded.arch.n_layers, cfg.answer_rows)
    consts: list[RunConstants] = []  # built on the first trace that needs them
    traceset = read_traces(traces_path)
    traces = traceset.traces[: cfg.limit] if cfg.limit is not None else list(traceset.traces)

    def compute(tt):
        a, b = tt.spans["trajectory"]
        if b <= a or tt.spans["answer"][1] <= tt.spans["answer"][0]:
            return None  # no trajectory key or no answer token: nothing to measure
        if not consts:
            consts.append(RunConstants(loaded))
        arrays, query = trace_update_arrays(loaded, tt, consts[0], answer_rows=cfg.answer_rows)
        if layers != list(range(loaded.arch.n_layers)):
            arrays = {k: np.ascontiguousarray(v[layers]) for k, v in arrays.items()}
        answer = tt.spans["answer"]
        n_rows = 1 if cfg.answer_rows == "first" else int(answer[1] - answer[0])
        return arrays, {"upd_query": query, "upd_control": cfg.control,
                        "upd_layers": json.dumps(layers), "upd_rows": cfg.answer_rows,
                        "upd_n_rows": n_rows}

    run = add_trace_arrays(
        loaded, traces, out, compute, done_key=DONE_KEY, command="updates",
        traces_path=traces_path, n_bad_lines=len(traceset.problems),
        prompt_format=cfg.prompt_format, scaffold=cfg.scaffold, progress=progress,
    )
    return UpdatesRunResult(
        out=str(out), control=cfg.control, n_traces=run.n_traces, n_written=run.n_written,
        n_skipped=run.n_skipped, n_empty=run.n_left_out, n_too_long=run.n_too_long,
        n_bad_lines=run.n_bad_lines, seconds=round(time.perf_counter() - t0, 3),
    )


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
        from cache import open_cache
        from probes.compare_run import stored_layers

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


def format_updates_run(r: UpdatesRunResult) -> str:
    """Human summary of a run."""
    control = "" if r.control == "none" else f" (control: {r.control})"
    return (
        f"updates{control}: {r.n_written} traces written, {r.n_skipped} skipped, {r.n_empty} "
        f"without trajectory/answer, {r.n_too_long} too long, {r.n_bad_lines} bad lines -> "
        f"{r.out} ({r.seconds:.1f}s)"
    )
