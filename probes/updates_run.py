"""`python -m probes.run updates`: per-token implicit updates of every trace, into an HDF5 cache.

For each trace the query is the position that predicts the first answer token
(q = `spans["answer"][0] - 1`). One `probes.updates.token_updates` call (M1–M4) and one
`probes.mlp_update.mlp_updates` call (M5, trajectory = the trajectory span's positions) give the
per-layer quantities; only the trajectory keys a..b-1 are kept, so every array is float32
[n_layers, T] with index i = trajectory token i:

* `upd_contrib`: M2 ‖Σ_h p W_O^h v_t‖ (`contrib_sum_norm`).
* `upd_loo`: M4 ‖Σ_h W_O^h δz_{h,t}‖ (`loo_sum_norm`).
* `upd_mass`: M1 attention mass p_{h,t} AVERAGED over the query heads (mean, so it is in [0, 1]).
* `upd_dai_fro`: M3 ‖v_t‖‖k̃_t‖ SUMMED over the KV heads.
* `upd_sigma_gate`, `upd_sigma_up`: M5 σ_i = ‖step_i‖_F for W_gate / W_up.
* `upd_cos_gate`: M5 cos(step_i, step_{i−1}) for W_gate (NaN at i = 0).

Attrs: `upd_query` (q), `upd_control` ("none" or "random-init"). An existing cache (e.g. from
`lhat` or `cache`) gains these arrays in its trace groups; a new file gets trace groups with
tokens, categories and the arrays. Resumable: a trace that already has `upd_contrib` is skipped.

`--control random-init` runs a randomly initialised model of the same architecture (seeded) instead
of the trained weights; its metadata model label is `"<model>+random-init(<seed>)"`, so it must go
to another --out file (appending it to a trained-model cache is refused by the identity check).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from probes.errors import ProbesError
from probes.models import LoadedModel, load_model
from probes.traces import DEFAULT_SCAFFOLD

UPDATE_ARRAYS = ("upd_contrib", "upd_loo", "upd_mass", "upd_dai_fro", "upd_sigma_gate",
                 "upd_sigma_up", "upd_cos_gate")
CONTROLS = ("none", "random-init")


@dataclass(frozen=True, kw_only=True)
class UpdatesConfig:
    """Settings of an `updates` run.

    Attributes:
        control: "none" (the trained weights) or "random-init" (same architecture, random weights).
        seed: Seed of the random initialisation for `control="random-init"`.
        limit: Use only the first N traces.
        prompt_format: Prompt format string; None = chat template or the documented default.
        scaffold: The answer scaffold between trajectory and answer.
    """

    control: str = "none"
    seed: int = 0
    limit: int | None = None
    prompt_format: str | None = None
    scaffold: str = DEFAULT_SCAFFOLD

    def __post_init__(self) -> None:
        if self.control not in CONTROLS:
            raise ProbesError(f"--control must be one of {', '.join(CONTROLS)}, got {self.control!r}")
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


def trace_update_arrays(loaded: LoadedModel, tt) -> tuple[dict[str, np.ndarray], int]:
    """The stored `upd_*` arrays of one tokenized trace (float32 [n_layers, T]).

    Args:
        loaded: A booted RoPE model with a gated MLP.
        tt: A `TokenizedTrace` with a non-empty trajectory and answer.

    Returns:
        (arrays, query position).
    """
    import torch

    from probes.mlp_update import mlp_updates
    from probes.updates import token_updates

    a, b = tt.spans["trajectory"]
    query = int(tt.spans["answer"][0]) - 1
    ids = torch.as_tensor(np.asarray(tt.ids, dtype=np.int64)).reshape(1, -1).to(loaded.device)
    upd = token_updates(loaded, ids, query)
    mlp = mlp_updates(loaded, ids, query, list(range(a, b)))
    arrays = {
        "upd_contrib": _f32(upd.contrib_sum_norm[:, a:b]),
        "upd_loo": _f32(upd.loo_sum_norm[:, a:b]),
        "upd_mass": _f32(upd.mass[:, :, a:b].mean(axis=1)),
        "upd_dai_fro": _f32(upd.dai_fro[:, :, a:b].sum(axis=1)),
        "upd_sigma_gate": _f32(mlp.sigma_gate),
        "upd_sigma_up": _f32(mlp.sigma_up),
        "upd_cos_gate": _f32(mlp.cos_gate),
    }
    return arrays, query


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
    """Compute and store the per-token implicit updates (M1–M5) of every trace.

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
        ProbesError: Bad input, a cache made with another model (a random-init control into a
            trained-model cache included) / tokenizer / scaffold, or a trace whose stored tokens
            differ from this tokenization.
    """
    from probes.trace_arrays import add_trace_arrays
    from probes.traces import read_traces

    t0 = time.perf_counter()
    loaded = model if isinstance(model, LoadedModel) else load_model(model, device=device, dtype=dtype)
    if cfg.control == "random-init":
        loaded = random_init_model(loaded, cfg.seed)
    traceset = read_traces(traces_path)
    traces = traceset.traces[: cfg.limit] if cfg.limit is not None else list(traceset.traces)

    def compute(tt):
        a, b = tt.spans["trajectory"]
        if b <= a or tt.spans["answer"][1] <= tt.spans["answer"][0]:
            return None  # no trajectory key or no answer token: nothing to measure
        arrays, query = trace_update_arrays(loaded, tt)
        return arrays, {"upd_query": query, "upd_control": cfg.control}

    run = add_trace_arrays(
        loaded, traces, out, compute, done_key="upd_contrib", command="updates",
        traces_path=traces_path, n_bad_lines=len(traceset.problems),
        prompt_format=cfg.prompt_format, scaffold=cfg.scaffold, progress=progress,
    )
    return UpdatesRunResult(
        out=str(out), control=cfg.control, n_traces=run.n_traces, n_written=run.n_written,
        n_skipped=run.n_skipped, n_empty=run.n_left_out, n_too_long=run.n_too_long,
        n_bad_lines=run.n_bad_lines, seconds=round(time.perf_counter() - t0, 3),
    )


def format_updates_run(r: UpdatesRunResult) -> str:
    """Human summary of a run."""
    control = "" if r.control == "none" else f" (control: {r.control})"
    return (
        f"updates{control}: {r.n_written} traces written, {r.n_skipped} skipped, {r.n_empty} "
        f"without trajectory/answer, {r.n_too_long} too long, {r.n_bad_lines} bad lines -> "
        f"{r.out} ({r.seconds:.1f}s)"
    )
