"""The one shared pass that produces every stored per-token update array (`upd_*`) of a trace.

One forward and one backward of the model per trace (`probes.measures.updates.alignment.answer_alignment`),
with the M1–M4 capture (`probes.measures.updates.attention`) and, for `answer_rows="first"`, the M5 capture
(`probes.measures.updates.mlp`) riding on its forward. The arrays and their meaning are declared in
`probes.arrays` (the registry); the method notes are in docs/methods.md.
"""

from __future__ import annotations

import json
import time
from typing import Any

import numpy as np
from jaxtyping import Float32

from hooks.model import LoadedModel
from hooks.weights import LLAMA_FAMILIES, llama_layers
from probes import arrays
from probes.errors import ProbesError
from probes.measures.updates import ANSWER_ROWS as ANSWER_ROWS
from probes.measures.updates import PRECISIONS
from probes.measures.updates.alignment import answer_alignment
from probes.measures.updates.attention import (
    UpdatesError,
    check_query,
    check_query_rows,
    o_proj_weights,
    query_rows_capture,
    token_updates_from,
)
from probes.measures.updates.attention_rows import key_summary_from
from probes.measures.updates.families import EAGER_MISSING, SDPA_MISSING, check_family
from probes.measures.updates.mlp import check_positions, layer_weights, mlp_updates_from, row_capture
from probes.measures.updates.sdpa_pass import (
    ATTENTION_PATHS,
    sdpa_query_rows_capture,
    sdpa_row_capture,
    sdpa_view,
)


def check_supported(loaded: LoadedModel) -> None:
    """Refuse, with one clear error, a model that is not Llama-style (what `effects` needs: it
    edits the Llama modules by name; `updates` itself checks with `check_updates`).

    Raises:
        UpdatesError: Unless the model is Llama-style (`hooks.weights.llama_layers`: RoPE, GQA
            attention with o_proj, RMSNorm, a gated MLP).
    """

    llama_layers(loaded, what="updates", error=UpdatesError, require_rope=True)


def check_updates(loaded: LoadedModel, attention: str = "auto") -> None:
    """Refuse, with one clear line, a model (or an attention pass) `updates` cannot measure.

    Args:
        loaded: The model.
        attention: The pass asked for ("auto", "sdpa" or "eager").

    Raises:
        UpdatesError: For a family outside `probes.measures.updates.families.UPDATE_FAMILIES` (naming
            what is missing), "eager" for a family measured on the linear-memory pass only
            (Phi-3) or "sdpa" for one measured on the eager pass only (Gemma-2).
    """

    check_family(loaded, what="updates", error=UpdatesError, attention=attention)


EAGER_PATTERN_BUDGET = 64 * 2**20
"""`attention="auto"`: the eager reference pass is used while the patterns autograd would keep
(n_layers · n_heads · N² elements of the model dtype) fit in this many bytes; longer traces take the
linear-memory pass. The two agree to float32 rounding (tests/probes/measures/test_sdpa_pass.py)."""


def choose_attention(loaded: LoadedModel, n_tokens: int, attention: str = "auto") -> str:
    """The pass `trace_update_arrays(attention=...)` runs: "eager" or "sdpa" ("auto": see
    `EAGER_PATTERN_BUDGET`; a family with one pass only, `probes.measures.updates.families.EAGER_MISSING`
    / `SDPA_MISSING`, gets that one).

    Raises:
        ProbesError: For an attention that is not "auto", "sdpa" or "eager".
    """

    if attention == "auto":
        if loaded.arch.family in EAGER_MISSING:        # the one pass such a family has
            return "sdpa"
        if loaded.arch.family in SDPA_MISSING:
            return "eager"
        arch = loaded.arch
        itemsize = torch_itemsize(loaded)
        need = arch.n_layers * arch.n_heads * n_tokens * n_tokens * itemsize
        return "eager" if need <= EAGER_PATTERN_BUDGET else "sdpa"
    if attention not in ATTENTION_PATHS:
        raise ProbesError(f"attention must be one of auto, {', '.join(ATTENTION_PATHS)}, got "
                          f"{attention!r}")
    return attention


def torch_itemsize(loaded: LoadedModel) -> int:
    """Bytes per element of the model's floating-point parameters."""
    param = next(p for p in loaded.hf_model.parameters() if p.is_floating_point())
    return int(param.element_size())


UPDATE_ARRAYS: tuple[str, ...] = arrays.names(arrays.UPDATES)
"""The stored arrays, in the order they are written (each float32 [n_layers, T]; the registry
declares them)."""


def stored_layers(trace) -> list[int]:
    """The layers of a trace's `upd_*` arrays (attribute `upd_layers`; all rows when absent)."""
    raw = trace.attrs.get("upd_layers")
    if raw is None:
        return list(range(int(trace["upd_contrib"].shape[0])))
    return [int(x) for x in json.loads(raw)]


class RunConstants:
    """Per-model constants of an `updates` run, computed once and reused for every trace.

    Attributes:
        o_proj: `probes.measures.updates.attention.o_proj_weights(loaded)`.
        m5: `probes.measures.updates.mlp.layer_weights(loaded, with_mlp=False, any_layout=True)` (W_O,
            the norms and the Grams WᵀW of gate/up, or of W_in for a plain MLP, float64 on the
            model's device).
        grams: The same Grams, as `answer_alignment(grams=...)` takes them.
        view: The linear-memory view of the model (`probes.measures.updates.sdpa_pass.sdpa_view`), made
            on first use.
    """

    view = None

    def __init__(self, loaded: LoadedModel) -> None:
        check_updates(loaded)
        self.o_proj = o_proj_weights(loaded)
        self.m5 = layer_weights(loaded, with_mlp=False, device=loaded.device, any_layout=True)
        self.grams = [w.grams for w in self.m5]
        self._grams32: Any = None

    def grams_for(self, precision: str) -> Any:
        """The Grams in the dtype of `precision`'s products (float32 copies made once)."""
        if precision == "float64":
            return self.grams
        if self._grams32 is None:
            import torch

            self._grams32 = [None if gs is None else tuple(g.to(torch.float32) for g in gs)
                             for gs in self.grams]
        return self._grams32


def trace_update_arrays(loaded: LoadedModel, tt, consts: RunConstants | None = None, *,
                        answer_rows: str = "first", timings: dict[str, float] | None = None,
                        attention: str = "auto", precision: str = "float32",
                        ) -> tuple[dict[str, Float32[np.ndarray, "l t"]], int]:
    """The stored `upd_*` arrays of one tokenized trace (float32 [n_layers, T]).

    One forward + one backward: `answer_alignment` (M7 at all answer rows 𝒬; M6 at the first row
    or at all of them) with the M1–M4 bridge capture (and, for "first", the M5 one) hooked into
    its forward. On the eager pass of a family outside the Llama layout the gradient pass runs on
    a plain-HF view, so the bridge captures get one extra forward without grad (`_bridge_forward`).

    Args:
        loaded: A booted model of a family in `probes.measures.updates.families.UPDATE_FAMILIES`.
        tt: A `TokenizedTrace` with a non-empty trajectory and answer.
        consts: `RunConstants(loaded)`, reused across traces; None computes them now.
        answer_rows: "first": M1–M6 at q = answer start − 1 (`token_updates`, `mlp_updates`,
            M6 row 0; on the "sdpa" path the same values from `key_summary_from` and M6's
            step norms / cosines, as "mean" does over one row). "mean": each of them at every
            row of 𝒬 = answer start − 1 .. answer end − 2 (`key_summary_from`; M5 σ / cosine
            and M6 from `answer_alignment` at all rows), then averaged over the rows per layer
            and token (the two cosines with a NaN-skipping mean: NaN only where every row is
            NaN). `upd_dai_fro` does not depend on the row; `upd_m7`
            is the sum over 𝒬 in both modes.
        timings: If given, filled with the seconds of each stage (device-synchronised):
            `alignment` (the shared forward + backward and M6/M7; for "mean" also M5), `m1_m4`,
            `m5` (≈ 0 for "mean" and for the "sdpa" path, where M5 comes from `alignment`).
        attention: "sdpa" (linear memory: `probes.measures.updates.sdpa_pass`; the forward and backward
            through `scaled_dot_product_attention` on a plain-HF view, the pattern rows 𝒬
            recomputed exactly from the captured q̃, k̃; extra memory O(N·d·L)), "eager" (the
            reference: the bridge captures on an eager forward, O(L·H·N²) until the backward) or
            "auto" (the default: "eager" while its patterns fit `EAGER_PATTERN_BUDGET`, else
            "sdpa"; `choose_attention`). Equal to float32 rounding
            (tests/probes/measures/test_sdpa_pass.py).
        precision: "float32" (the default) or "float64" (the reference) for the algebra after the
            pass (`answer_alignment(precision=...)`, `key_summary_from(precision=...)`); the
            stored arrays agree within the bounds of docs/methods.md#precision
            (tests/probes/measures/test_precision.py).

    Returns:
        (arrays in `UPDATE_ARRAYS` order, query position = the first answer row).

    Raises:
        UpdatesError: For an unsupported model.
        ProbesError: For an unknown `answer_rows` or `attention`.
    """
    import torch


    if answer_rows not in ANSWER_ROWS:
        raise ProbesError(f"answer_rows must be one of {', '.join(ANSWER_ROWS)}, got "
                          f"{answer_rows!r}")
    if precision not in PRECISIONS:
        raise ProbesError(f"precision must be one of {', '.join(PRECISIONS)}, got "
                          f"{precision!r}")
    attention = choose_attention(loaded, len(tt.ids), attention)
    check_updates(loaded, attention)
    consts = RunConstants(loaded) if consts is None else consts
    model, query_caps, row_caps = _passes(loaded, consts, attention)
    a, b = (int(x) for x in tt.spans["trajectory"])
    answer = (int(tt.spans["answer"][0]), int(tt.spans["answer"][1]))
    query = answer[0] - 1
    ids = torch.as_tensor(np.asarray(tt.ids, dtype=np.int64)).reshape(1, -1).to(loaded.device)
    if answer_rows == "mean":
        rows = list(range(answer[0] - 1, answer[1] - 1))
        return _rows_arrays(loaded, ids, (a, b), answer, consts, timings, attention, rows,
                            None, precision), query
    if attention == "sdpa":   # the same values from `al` and the stored keys only (no M5 pass)
        return _rows_arrays(loaded, ids, (a, b), answer, consts, timings, attention, [query],
                            [0], precision), query
    check_query(loaded, int(ids.shape[1]), query)
    _, _, traj = check_positions(loaded, ids, [query], range(a, b))
    clock = _Clock(loaded.device, timings)
    # captures stay on the model's device: M1–M5 are computed there (float64), like M6/M7
    with (query_caps(model, [query], device=None) as get_query,
          row_caps(model, [query], device=None) as get_rows):
        _bridge_forward(loaded, ids, attention)
        al = answer_alignment(model, ids, (a, b), answer, m6_rows=[0],
                              grams=consts.grams_for(precision), attention=attention,
                              precision=precision)
    clock.lap("alignment")
    upd = token_updates_from(loaded, get_query().row(0), consts.o_proj)
    clock.lap("m1_m4")
    mlp = mlp_updates_from(get_rows(), consts.m5, traj, keep_du=False)
    clock.lap("m5")
    first, gated = consts.m5[0].names[0], "up" in consts.m5[0].names
    arrays = {
        "upd_contrib": _f32(upd.contrib_sum_norm[:, a:b]),
        "upd_loo": _f32(upd.loo_sum_norm[:, a:b]),
        "upd_mass": _f32(upd.mass[:, :, a:b].mean(axis=1)),
        "upd_dai_fro": _f32(upd.dai_fro[:, :, a:b].sum(axis=1)),
        "upd_sigma_gate": _f32(mlp.get(f"sigma_{first}")),        # plain MLP: W_in
        "upd_sigma_up": _f32(mlp.sigma_up if gated else np.full_like(mlp.get("sigma_in"), np.nan)),
        "upd_cos_gate": _f32(mlp.get(f"cos_{first}")),
        "upd_align_cos": _f32(al.cos[2][:, 0, :]),
        "upd_dl_pred": _f32(al.inner[2][:, 0, :]),
        "upd_m7": _f32(al.m7),
    }
    return arrays, query


def _bridge_forward(loaded: LoadedModel, ids, attention: str) -> None:
    """The eager pass of a family outside the Llama layout: its gradient forward runs on a
    plain-HF view (`probes.measures.updates.families.eager_model`), where the bridge captures do not fire,
    so they get one bridge forward of their own (no grad). A no-op otherwise."""
    import torch


    if attention == "eager" and loaded.arch.family not in LLAMA_FAMILIES:
        with torch.no_grad():
            loaded.bridge(ids)


def _passes(loaded: LoadedModel, consts: RunConstants, attention: str):
    """(model to run, query-rows capture, M5 row capture) of one `attention` path."""
    if attention == "eager":
        return loaded, query_rows_capture, row_capture

    if consts.view is None:
        consts.view = sdpa_view(loaded)
    return consts.view, sdpa_query_rows_capture, sdpa_row_capture


def _rows_arrays(loaded: LoadedModel, ids, trajectory: tuple[int, int],
                 answer: tuple[int, int], consts: RunConstants,
                 timings: dict[str, float] | None, attention: str, rows: list[int],
                 m6_rows: list[int] | None, precision: str) -> dict[str, np.ndarray]:
    """Every per-row quantity at `rows`, averaged over them (`answer_rows="mean"`: rows = 𝒬,
    M6 at every row; the "first" mode of the linear-memory path: rows = [q], M6 at row 0, where
    the "mean" over one row is that row).

    M1–M4 from the query-rows capture + `key_summary_from` (keys/values once, the trajectory keys
    only, head-aggregated: what is stored). M5's σ and consecutive cosine at every row are the
    `step_norm` / `step_cos` that `answer_alignment` forms anyway for M6 (the same
    restricted-attention prefixes and Gram products as `mlp_updates_rows_from`, which would repeat
    that O(Q·T·d²) work).
    """

    a, b = trajectory
    check_query_rows(loaded, int(ids.shape[1]), rows)
    _, _, traj = check_positions(loaded, ids, rows, range(a, b))
    clock = _Clock(loaded.device, timings)
    model, query_caps, _ = _passes(loaded, consts, attention)
    with query_caps(model, rows, device=None) as get_query:
        _bridge_forward(loaded, ids, attention)
        al = answer_alignment(model, ids, (a, b), answer, m6_rows=m6_rows,
                              grams=consts.grams_for(precision), attention=attention,
                              precision=precision)
    clock.lap("alignment")
    summ = key_summary_from(loaded, get_query(), traj, consts.o_proj,      # [L, Q, T]
                            precision=precision)
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
