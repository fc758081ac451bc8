"""Linear-memory passes: the plain HF forward with a fused attention kernel, and the pattern rows a
metric needs recomputed exactly from the captured q and k (docs/methods.md#linear-memory).

The reference passes (`probes.measures.updates.attention.query_rows_capture`,
`probes.measures.updates.mlp.row_capture`,
`probes.measures.updates.alignment.answer_alignment(attention="eager")`) run the bridge / HF eager
attention, which materialises every layer's pattern [H, N, N]; for `answer_alignment` autograd
keeps all L of them until the backward, so memory grows as N². Here instead:
* `sdpa_view(model)` is a private plain-HF view of the model (`hooks.hf_fast.plain_view`: the
  bridge components swapped back for the HF modules they wrap, parameters shared) whose attention
  implementation is `RECORDING_ATTENTION`: `torch.nn.functional.scaled_dot_product_attention`
  through transformers' own `sdpa_attention_forward` (the fused CPU kernel / flash or efficient
  kernels on GPU; causal without an explicit mask for one unpadded sequence), plus a recorder.
* `record_attention(rows)` makes that attention function keep, per layer, the rotated keys and the
  values (exactly what the kernel saw: after q/k norms and RoPE, before the GQA repeat), the
  rotated queries of `rows`, and the pattern rows [H, R, K] recomputed from them as
  `softmax(q̃_r k̃ᵀ · scaling)` over the causal keys 0..r (in float64, from the model-dtype q̃ and
  k̃). Extra memory: O(N·d) per layer plus O(R·N) per layer.
* `sdpa_query_rows_capture` / `sdpa_row_capture` give the same `QueryRowsCapture` (M1–M4) and
  `RowCapture` (M5) as the bridge captures, from hooks on that view.

Full causal attention and causal sliding windows (Gemma-3's local layers: the pattern rows keep
keys r − W < t ≤ r, and the kernel gets transformers' [N, N] boolean window mask) are supported;
logit soft-capping (Gemma-2) and any other mask are refused with one error naming the setting.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from hooks.edit import module_hooks
from hooks.hf_fast import plain_view
from hooks.model import LoadedModel
from hooks.weights import LayerView
from probes.errors import ProbesError
from probes.measures.updates import ATTENTION_PATHS as ATTENTION_PATHS
from probes.measures.updates.captures import QueryRowsCapture
from probes.measures.updates.families import views
from probes.measures.updates.mlp import RowCapture

__all__ = [
    "ATTENTION_PATHS",
    "RECORDING_ATTENTION",
    "AttentionRecord",
    "LinearPassError",
    "is_sdpa_view",
    "pattern_rows",
    "record_attention",
    "sdpa_query_rows_capture",
    "sdpa_row_capture",
    "sdpa_view",
]


RECORDING_ATTENTION = "probes_sdpa_record"
"""The transformers attention implementation name of `sdpa_view` models."""


class LinearPassError(ProbesError, ValueError):
    """A model or input the linear-memory pass cannot run exactly."""


@dataclass
class AttentionRecord:
    """What `record_attention` keeps per layer (index = `module.layer_idx`), detached.

    Attributes:
        rows: The query rows R (strictly increasing positions).
        keys: Keep keys/values 0..keys−1 (K; default max(rows) + 1).
        dtype: Storage dtype of q/k/v (None = the model's); the pattern is float32 or float64.
        rot_k: Per layer, rotated keys [K, H_kv, d_h].
        v: Per layer, values [K, H_kv, d_h].
        rot_q: Per layer, rotated queries of the rows [R, H, d_h].
        pattern: Per layer, pattern rows [H, R, K] (zero beyond each row: causal; float64).
        z: Per layer, z at the rows [R, H, d_h] = Σ_t p v_t from these pattern rows (float64
            sums, stored in `dtype`, float64 for None), consistent with the pattern to rounding
            (the kernel's own output differs from it at float32 rounding, which M4's
            p (v_t − z)/(1 − p) amplifies where p → 1).
    """

    rows: list[int]
    keys: int
    dtype: torch.dtype | None = None
    rot_k: dict[int, Tensor] = field(default_factory=dict)
    v: dict[int, Tensor] = field(default_factory=dict)
    rot_q: dict[int, Tensor] = field(default_factory=dict)
    pattern: dict[int, Tensor] = field(default_factory=dict)
    z: dict[int, Tensor] = field(default_factory=dict)

    def per_layer(self, name: str, n_layers: int) -> list[Tensor]:
        """The recorded tensors `name` as a list over layers 0..n_layers−1.

        Raises:
            LinearPassError: If a layer was not recorded (no forward ran through the view).
        """
        got = getattr(self, name)
        missing = [l for l in range(n_layers) if l not in got]
        if missing:
            raise LinearPassError(f"no attention was recorded for layers {missing}; run the forward "
                                  "of the sdpa_view inside record_attention(...).")
        return [got[l] for l in range(n_layers)]


_ACTIVE: contextvars.ContextVar[tuple[AttentionRecord, ...]] = contextvars.ContextVar(
    "probes_attention_records", default=())


def pattern_rows(q_rows: Float[Tensor, "h r d_h"], k: Float[Tensor, "h_kv k d_h"], rows: Tensor,
                 scaling: float, window: int | None = None) -> Float[Tensor, "h r k"]:
    """Exact softmax pattern rows from rotated queries and keys, causal (keys ≤ row).

    Args:
        q_rows: Rotated queries of the rows [H, R, d_h].
        k: Rotated keys [H_kv, K, d_h] (KV head g serves query heads g·G .. g·G + G − 1).
        rows: The row positions [R] (global, keys 0..K−1 are positions 0..K−1).
        scaling: The score scale (HF `module.scaling`, 1/√d_h by default).
        window: A sliding window W (HF `sliding_window`: row r sees keys r − W < t ≤ r), or None.

    Returns:
        softmax(q̃ k̃ᵀ · scaling) over keys ≤ row (and inside the window), [H, R, K], computed in
        float64 (the rows are few: [H, R, K] float64 is O(R·N) per layer), whatever the input
        dtype.
    """
    work = torch.float64
    H, H_kv = q_rows.shape[0], k.shape[0]
    qg = q_rows.to(work).reshape(H_kv, H // H_kv, *q_rows.shape[1:])        # [H_kv, G, R, d_h]
    scores = torch.einsum("gjrd,gkd->gjrk", qg, k.to(work)).reshape(H, q_rows.shape[1], -1)
    scores = scores * scaling
    scores = scores.masked_fill(~_visible(rows, k.shape[1], window, k.device)[None],
                                float("-inf"))
    return torch.softmax(scores, dim=-1)


def _visible(rows: Tensor, n_keys: int, window: int | None, device: torch.device) -> Tensor:
    """[R, K] bool: key t is visible from row r (t ≤ r, and r − W < t with a sliding window W)."""
    key_pos = torch.arange(n_keys, device=device)[None, :]
    rows = rows.to(device)[:, None]
    seen = key_pos <= rows
    return seen if window is None else seen & (key_pos > rows - int(window))


def _recording_attention(module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor,
                         attention_mask: Tensor | None, dropout: float = 0.0,
                         scaling: float | None = None, **kwargs: Any) -> tuple[Tensor, None]:
    """transformers' sdpa attention, recording what the active `record_attention` blocks ask for."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    records = _ACTIVE.get()
    if records:
        if kwargs.get("softcap") is not None:
            raise LinearPassError(
                "the linear-memory pass cannot apply attention logit soft-capping (the fused "
                "kernel has none); this model uses it: pass attention='eager'.")
        window = kwargs.get("sliding_window")
        _check_mask(attention_mask, window, query.shape[2], key.shape[2],
                    sorted({0, int(query.shape[2]) - 1, *(r for rec in records for r in rec.rows)}))
        scale = float(scaling if scaling is not None else query.shape[-1] ** -0.5)
        for rec in records:
            _record(rec, int(module.layer_idx), query, key, value, scale, window)
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                  scaling=scaling, **kwargs)


def _check_mask(mask: Tensor | None, window: int | None, n_queries: int, n_keys: int,
                rows: list[int]) -> None:
    """Refuse any mask but none (full causal) or, on a sliding-window layer, transformers' causal
    sliding-window mask (checked at `rows`: the recorded rows, the first and the last; the kernel
    then gets that [N, N] boolean mask)."""
    if mask is None and (window is None or n_keys <= window):
        return
    idx = torch.as_tensor([r for r in rows if r < n_queries])
    ok = (mask is not None and window is not None and mask.dtype == torch.bool
          and tuple(mask.shape[-2:]) == (n_queries, n_keys) and n_queries == n_keys
          and bool((mask.reshape(-1, n_queries, n_keys)[:, idx.to(mask.device)]
                    == _visible(idx, n_keys, window, mask.device)).all()))
    if not ok:
        raise LinearPassError(
            "the linear-memory pass runs one unpadded sequence from position 0 (no attention "
            "mask but the causal, or causal sliding-window, one; no KV cache); got an explicit "
            "mask: pass attention='eager'.")


def _record(rec: AttentionRecord, layer: int, query: Tensor, key: Tensor, value: Tensor,
            scale: float, window: int | None = None) -> None:
    if query.shape[0] != 1:
        raise LinearPassError(f"batch 1 only; got a batch of {query.shape[0]}.")
    n = int(key.shape[2])
    if rec.rows[-1] >= int(query.shape[2]) or rec.keys > n:
        raise LinearPassError(f"rows up to {rec.rows[-1]} and {rec.keys} keys asked of a forward of "
                              f"{query.shape[2]} queries and {n} keys.")
    rows = torch.as_tensor(rec.rows, device=query.device)
    q = query[0].detach()[:, rows]                                          # [H, R, d_h]
    k = key[0].detach()[:, : rec.keys]                                      # [H_kv, K, d_h]
    v = value[0].detach()[:, : rec.keys]
    p = rec.pattern[layer] = pattern_rows(q, k, rows, scale, window)        # [H, R, K] f64
    H, H_kv = p.shape[0], v.shape[0]
    z = torch.einsum("gjrk,gkd->rgjd", p.reshape(H_kv, H // H_kv, *p.shape[1:]),
                     v.to(p.dtype)).reshape(len(rec.rows), H, -1)          # [R, H, d_h]
    cast = (lambda t: t) if rec.dtype is None else (lambda t: t.to(rec.dtype))
    rec.z[layer] = cast(z)                                                  # f64 if no dtype
    rec.rot_q[layer] = cast(q.transpose(0, 1))                              # [R, H, d_h]
    rec.rot_k[layer] = cast(k.transpose(0, 1))                              # [K, H_kv, d_h]
    rec.v[layer] = cast(v.transpose(0, 1))


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(RECORDING_ATTENTION, _recording_attention)
    AttentionMaskInterface.register(RECORDING_ATTENTION, sdpa_mask)


_register()


@contextmanager
def record_attention(rows: Sequence[int], *, keys: int | None = None,
                     dtype: torch.dtype | None = None) -> Iterator[AttentionRecord]:
    """Record q/k/v and the exact pattern rows of every `sdpa_view` forward inside the block.

    Args:
        rows: Strictly increasing query rows.
        keys: Keep keys/values 0..keys−1 (default max(rows) + 1).
        dtype: Storage dtype of q/k/v (None = the model's).

    Yields:
        The `AttentionRecord`, filled as the forward runs.
    """
    rows = [int(r) for r in rows]
    if not rows or rows != sorted(set(rows)) or rows[0] < 0:
        raise LinearPassError(f"rows must be strictly increasing positions; got {rows}.")
    rec = AttentionRecord(rows=rows, keys=rows[-1] + 1 if keys is None else int(keys), dtype=dtype)
    token = _ACTIVE.set((*_ACTIVE.get(), rec))
    try:
        yield rec
    finally:
        _ACTIVE.reset(token)


def sdpa_view(model: LoadedModel | torch.nn.Module) -> torch.nn.Module:
    """The plain-HF view of a model that runs `RECORDING_ATTENTION` (parameters shared, the model
    itself untouched); a view passed in is returned as is."""
    hf = model.hf_model if isinstance(model, LoadedModel) else model
    if is_sdpa_view(hf):
        return hf
    return plain_view(hf, RECORDING_ATTENTION)


def is_sdpa_view(hf: torch.nn.Module) -> bool:
    """Whether `hf` is a `sdpa_view` (its config names `RECORDING_ATTENTION`)."""
    return getattr(getattr(hf, "config", None), "_attn_implementation", None) == RECORDING_ATTENTION


def _layer_modules(view: torch.nn.Module) -> list[LayerView]:
    return views(view, what="the linear-memory pass", error=LinearPassError)


_Site = Callable[[LayerView], "tuple[torch.nn.Module, str, slice] | None"]
"""Where a captured tensor is, per layer view: (module, "in" | "out", column slice), or None where
the layer has no such tensor."""

_ALL = slice(None)


def _output(view: LayerView, name: str) -> tuple[torch.nn.Module, str, slice]:
    module, cols = view.outputs[name]
    return module, "out", cols


def _attn_out(view: LayerView) -> tuple[torch.nn.Module, str, slice]:
    """What attention adds to the residual: the o_proj output, or N_ao of it where a norm follows
    attention (OLMo-2, Gemma: what the bridge's `hook_attn_out` holds)."""
    norm = view.attn_out_norm
    return (view.o_proj if norm is None else norm.module), "out", _ALL


_ROW_SITES: dict[str, _Site] = {
    "resid_pre": lambda v: (v.module, "in", _ALL),
    "resid_mid": lambda v: ((v.mlp_in_norm.module, "in", _ALL) if v.mlp_in_norm is not None
                            else (v.mlp, "in", _ALL)),
    "ln2_out": lambda v: (v.mlp, "in", _ALL),                  # the MLP input u
    "mlp_pre": lambda v: _output(v, "gate" if v.gated else "in"),   # W_gate u (plain: W_in u)
    "mlp_pre_linear": lambda v: _output(v, "up") if v.gated else None,
    "mlp_post": lambda v: (v.down, "in", _ALL),
}
"""The M5 row capture's tensors (`RowCapture` fields) on a plain-HF view."""


@contextmanager
def _row_hooks(view: torch.nn.Module, rows: list[int], sites: dict[str, _Site],
               dtype: torch.dtype | None) -> Iterator[dict[tuple[int, str], Tensor]]:
    """Forward(-pre) hooks keeping the rows of module inputs/outputs: `sites` maps a name to where
    the tensor is in each layer (`_Site`)."""
    store: dict[tuple[int, str], Tensor] = {}
    idx = torch.as_tensor(rows)

    def keep(l: int, name: str, t: Tensor, cols: slice) -> None:
        x = t[0].detach()[idx.to(t.device)][..., cols]
        store[(l, name)] = x if dtype is None else x.to(dtype)

    hooks = []
    for l, lay in enumerate(_layer_modules(view)):
        for name, site in sites.items():
            found = site(lay)
            if found is None:
                continue
            mod, where, cols = found
            if where == "in":
                hooks.append((mod, "forward_pre",
                              lambda m, args, l=l, name=name, c=cols: keep(l, name, args[0], c)))
            else:
                hooks.append((mod, "forward", lambda m, args, out, l=l, name=name, c=cols: keep(
                    l, name, out[0] if isinstance(out, tuple) else out, c)))
    with module_hooks(hooks):
        yield store


@contextmanager
def sdpa_query_rows_capture(model: LoadedModel | torch.nn.Module, rows: Sequence[int], *,
                            device: str | torch.device | None = "cpu",
                            ) -> Iterator[Callable[[], Any]]:
    """`probes.measures.updates.attention.query_rows_capture` on the linear-memory path.

    Run the forward of `sdpa_view(model)` (the same view object) inside the block; then
    `get() -> QueryRowsCapture` (float32, on `device`; None = the model's device).
    """
    view = sdpa_view(model)
    rows = [int(r) for r in rows]
    n_layers = len(_layer_modules(view))
    sites: dict[str, _Site] = {"attn_out": _attn_out}
    with record_attention(rows, dtype=torch.float32) as rec, \
            _row_hooks(view, rows, sites, torch.float32) as store:
        def get() -> QueryRowsCapture:
            def move(ts: list[Tensor]) -> list[Tensor]:
                return ts if device is None else [t.to(device) for t in ts]

            return QueryRowsCapture(
                rows=rows, rot_k=move(rec.per_layer("rot_k", n_layers)),
                v=move(rec.per_layer("v", n_layers)), rot_q=move(rec.per_layer("rot_q", n_layers)),
                z=move(rec.per_layer("z", n_layers)),
                pattern=move([p.to(torch.float32) for p in rec.per_layer("pattern", n_layers)]),
                attn_out=move([store[(l, "attn_out")] for l in range(n_layers)]))

        yield get


@contextmanager
def sdpa_row_capture(model: LoadedModel | torch.nn.Module, rows: Sequence[int], *,
                     device: str | torch.device | None = "cpu") -> Iterator[Callable[..., Any]]:
    """`probes.measures.updates.mlp.row_capture` on the linear-memory path.

    Run the forward of `sdpa_view(model)` inside the block; then `get(logits=None) -> RowCapture`
    (float32, on `device`; None = the model's device).
    """

    view = sdpa_view(model)
    rows = [int(r) for r in rows]
    layers = _layer_modules(view)
    n_layers, gated = len(layers), layers[0].gated
    with record_attention(rows, dtype=torch.float32) as rec, \
            _row_hooks(view, rows, _ROW_SITES, torch.float32) as store:
        def get(logits: Tensor | None = None) -> RowCapture:
            def move(ts: list[Tensor]) -> list[Tensor]:
                return ts if device is None else [t.to(device) for t in ts]

            def per_layer(name: str) -> list[Tensor]:
                return move([store[(l, name)] for l in range(n_layers)])

            return RowCapture(
                rows=rows, v=move(rec.per_layer("v", n_layers)),
                pattern=move([p.to(torch.float32) for p in rec.per_layer("pattern", n_layers)]),
                resid_pre=per_layer("resid_pre"), resid_mid=per_layer("resid_mid"),
                ln2_out=per_layer("ln2_out"), mlp_pre=per_layer("mlp_pre"),
                mlp_pre_linear=per_layer("mlp_pre_linear") if gated else None,
                mlp_post=per_layer("mlp_post"),
                logits=None if logits is None else logits[0, rows].detach().to("cpu", torch.float32))

        yield get
