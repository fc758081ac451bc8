"""The RaML L̂ curve: answer NLL after every trajectory prefix, exact and fast (docs/methods.md#m8).

For a trace `x = [P | τ_1..τ_T | S | A]` (prompt, trajectory, scaffold, answer; `probes.traces`)

    L̂_t = −(1/|A|) Σ_j log p(A_j | P, τ_1..τ_t, S, A_<j),      t = 0..T

(t = 0: no trajectory; t = T: the full trace). This is the answer NLL that RaML re-runs per prefix.

Where it lives (this module is the entry point and re-exports the others' public names):

* `lhat_naive(loaded, tt, ts=None)` (`probes.measures.lhat.reference`): the reference, one bridge
  forward over `P + τ_≤t + S + A` per prefix t.
* `lhat_fast(loaded, tt, ...)` (this module): one chunked prefill of `P + τ` into a KV cache, then
  the suffix `S + A` for many truncation points at once ("packed suffixes", M8): k copies of the
  suffix are concatenated into one sequence evaluated over the cached prefix, with a custom 4-D
  additive mask (copy i sees cached positions `[0, |P| + t_i)` and itself causally, never another
  copy) and explicit `position_ids` (copy i starts at `|P| + t_i`, so RoPE distances, or GPT-2's
  learned positions, equal those of a truly truncated run). Equal to `lhat_naive` to float32
  rounding.
* `delta_lhat`, `relative_change`, `log_ratio`, `lhat_arrays` (`probes.measures.lhat.per_token`):
  per-token quantities of §1.4, pure numpy.
* The trace layout and helpers both paths share (`probes.measures.lhat.layout`).

How the packed suffix reaches the model (checked on TransformerLens 4.3.0 + transformers 5.23.0):
the bridge forward passes `attention_mask`, `position_ids`, `past_key_values` and `logits_to_keep`
on to the HF `*ForCausalLM.forward`. A 4-D mask is returned as-is by
`masking_utils.create_causal_mask` (`_preprocess_mask_arguments`: "If the mask is already 4D,
simply return as-is"); explicit `position_ids` replace the cache-length default of the HF model
(RoPE cos/sin, GPT-2 `wpe`); the bridge's attention reimplementation treats a mask with
`ndim >= 4` as authoritative (no synthesized causal mask;
`AttentionBridge._apply_reconstruct_attention_mask`) and adds it to the scores. The mask is an
additive float mask in the model dtype (`0` = visible, `finfo(dtype).min` = hidden), the form both
the bridge and HF eager attention add to the scores (HF eager would add a bool mask as 0/1, so a
bool mask is never used). So no fallback to the raw HF model is needed: the bridge itself runs
every forward, its `hook_*` points fire (prefill chunks and packs alike), and GPT-2 works through
the same path. A copy is `S + A[:-1]` (the last answer token predicts nothing); with an empty
scaffold it is `[x_{|P|+t−1}] + A[:-1]`, the last context token re-fed so that a row predicts A_1.

The KV cache never grows across packs: after the prefill the per-layer prefix key/value tensors
are kept, each pack runs on a `DynamicCache` whose layers are set to views of the first
`max_i(|P| + t_i)` prefix positions (a pack of early truncation points does not even attend to
later prefix keys), and the full prefix tensors are put back afterwards (`DynamicLayer.update`
concatenates into a new tensor, so the kept ones are never written to).

Memory: the prefix cache is O(|P| + T); a pack's attention scores are
`[heads, k·m, max(|P| + t_i) + k·m]` per layer (m = copy length), so k is chosen from
`max_pack_tokens` and `max_attn_bytes`; the prefill runs in `chunk_size`-token chunks; logits are
only computed at the rows that predict answer tokens (`logits_to_keep`), in float32 for the
log-softmax.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from jaxtyping import Float32, Int64, Integer

from hooks.edit import hook_name as edit_hook_name
from hooks.model import LoadedModel
from probes.errors import ProbesError
from probes.measures.lhat import DEFAULT_CHUNK_SIZE as DEFAULT_CHUNK_SIZE
from probes.measures.lhat import DEFAULT_MAX_PACK_TOKENS as DEFAULT_MAX_PACK_TOKENS
from probes.measures.lhat.layout import (
    _answer_nll,
    _check_ts,
    _keeps_logits,
    _Layout,
    _layout,
    _model_dtype,
)
from probes.measures.lhat.per_token import LHAT_ARRAYS as LHAT_ARRAYS
from probes.measures.lhat.per_token import delta_lhat, log_ratio, relative_change
from probes.measures.lhat.per_token import lhat_arrays as lhat_arrays
from probes.measures.lhat.reference import lhat_naive
from probes.traces.tokenize import TokenizedTrace

__all__ = [
    "LhatResult",
    "delta_lhat",
    "lhat_fast",
    "lhat_naive",
    "log_ratio",
    "plan_pack_size",
    "relative_change",
]



DEFAULT_MAX_ATTN_BYTES = 1 << 30
"""Budget for one layer's attention buffers of one pack (scores, masked scores, fp32 softmax)."""


# --------------------------------------------------------------------------------------------------
# Fast path


@dataclass(frozen=True)
class LhatResult:
    """The L̂ curve of one trace from `lhat_fast`.

    Attributes:
        lhat: float32 [len(ts)] mean answer NLL (nats) per prefix; [T+1] for t = 0..T by default.
        ts: int64 [len(ts)] the trajectory prefix lengths `lhat` is aligned with.
        hidden: float32 [len(ts), |A|, d_model] the residual stream `hidden_hook` at the rows that
            predict the answer tokens (the answer rows 𝒬 of docs/methods.md#conventions) for each prefix, or
            None unless `return_hidden=True`.
        hidden_hook: The bridge hook `hidden` was read from, or None.
        copy_len: m, tokens per suffix copy (|S| + |A| − 1, plus 1 when the scaffold is empty).
        copies_per_pack: k, suffix copies per packed forward.
        n_packs: Packed forwards run.
        n_prefill_chunks: Forwards run to fill the prefix KV cache.
    """

    lhat: Float32[np.ndarray, " n_ts"]
    ts: Int64[np.ndarray, " n_ts"]
    hidden: Float32[np.ndarray, "n_ts n_answer d_model"] | None
    hidden_hook: str | None
    copy_len: int
    copies_per_pack: int
    n_packs: int
    n_prefill_chunks: int


def plan_pack_size(
    copy_len: int,
    n_prefix: int,
    n_heads: int,
    *,
    max_pack_tokens: int = DEFAULT_MAX_PACK_TOKENS,
    max_attn_bytes: int | None = DEFAULT_MAX_ATTN_BYTES,
    dtype_bytes: int = 4,
) -> int:
    """Number k of suffix copies per packed forward.

    k is the largest value with `k · copy_len <= max_pack_tokens` whose per-layer attention buffers
    fit `max_attn_bytes`, estimated as `n_heads · (k·m) · (n_prefix + k·m) · (8 + 2·dtype_bytes)`
    bytes (scores and masked scores in the model dtype, the float32 softmax and its input); at
    least 1.

    Args:
        copy_len: m, tokens per copy.
        n_prefix: Cached prefix positions a pack can attend to (|P| + T at most).
        n_heads: Query heads per layer.
        max_pack_tokens: Longest packed sequence.
        max_attn_bytes: Budget for one layer's attention buffers; None for no limit.
        dtype_bytes: Bytes per element of the model dtype.

    Returns:
        k >= 1.

    Raises:
        ProbesError: If `max_pack_tokens` or `copy_len` is not positive.
    """
    if copy_len < 1 or max_pack_tokens < 1:
        raise ProbesError(
            f"copy_len ({copy_len}) and max_pack_tokens ({max_pack_tokens}) must be positive."
        )
    k = max(1, max_pack_tokens // copy_len)
    if max_attn_bytes is not None:
        per_elem = 8 + 2 * dtype_bytes
        while k > 1:
            rows = k * copy_len
            if n_heads * rows * (n_prefix + rows) * per_elem <= max_attn_bytes:
                break
            k -= 1
    return k


def _pack_inputs(
    lay: _Layout, ends: np.ndarray, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Token ids, 4-D additive mask, position ids and logit rows of one pack.

    Copy i is `context[e_i − lead : e_i] + S + A[:-1]` for context length `e_i = |P| + t_i`; it
    sees cached positions `[0, e_i − lead)` and causally its own block; its positions start at
    `e_i − lead`.

    Args:
        lay: The trace layout.
        ends: int64 [k] context lengths e_i.
        dtype: Mask dtype (the model's).

    Returns:
        `(ids [1, k·m], mask [1, 1, k·m, n_vis + k·m], position_ids [1, k·m], rows [k·|A|],
        n_vis)`, where `n_vis = max_i(e_i − lead)` is the number of cached positions used and
        `rows` are the pack rows predicting A_1..A_|A| of each copy, copy-major.
    """
    device = lay.context.device
    m, k = lay.copy_len, len(ends)
    starts = torch.as_tensor(ends - lay.lead, dtype=torch.long, device=device)  # [k] first position
    n_vis = int(starts.max())
    body = torch.cat([lay.scaffold, lay.answer[:-1]])
    copies = [torch.cat([lay.context[int(s) : int(s) + lay.lead], body]) for s in starts.tolist()]
    ids = torch.cat(copies)[None]  # [1, k*m]

    offset = torch.arange(m, device=device)
    position_ids = (starts[:, None] + offset[None, :]).reshape(1, k * m)  # [1, k*m]

    copy_of_row = torch.arange(k, device=device).repeat_interleave(m)  # [k*m]
    offset_of_row = offset.repeat(k)  # [k*m]
    sees_prefix = torch.arange(n_vis, device=device)[None, :] < starts[copy_of_row][:, None]
    same_copy = copy_of_row[:, None] == copy_of_row[None, :]
    causal = offset_of_row[None, :] <= offset_of_row[:, None]
    visible = torch.cat([sees_prefix, same_copy & causal], dim=1)  # [k*m, n_vis + k*m]
    zero = torch.zeros((), dtype=dtype, device=device)
    hidden = torch.full((), torch.finfo(dtype).min, dtype=dtype, device=device)
    mask = torch.where(visible, zero, hidden)[None, None]

    n_ans = len(lay.answer)
    rows = (
        torch.arange(k, device=device)[:, None] * m
        + lay.first_row
        + torch.arange(n_ans, device=device)[None, :]
    ).reshape(-1)
    return ids, mask, position_ids, rows, n_vis


def _prefix_layers(cache: Any) -> list[tuple[Any, torch.Tensor, torch.Tensor]]:
    """(layer, keys, values) of every cache layer after the prefill; checks the layer type."""
    from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

    kept = []
    for layer in cache.layers:
        if type(layer) is not DynamicLayer or isinstance(layer, DynamicSlidingWindowLayer):
            raise ProbesError(
                "lhat_fast needs a plain full-attention DynamicCache, but this model's cache has "
                f"a {type(layer).__name__} layer (sliding-window or other special attention). Use "
                "lhat_naive for this model."
            )
        kept.append((layer, layer.keys, layer.values))
    return kept


@contextmanager
def _prefix_view(kept: list[tuple[Any, torch.Tensor, torch.Tensor]], n_vis: int) -> Iterator[None]:
    """Set every cache layer to the first `n_vis` prefix positions; restore the full prefix after.

    `DynamicLayer.update` concatenates the new keys/values into a new tensor, so the kept prefix
    tensors are never modified and restoring them undoes the pack exactly.
    """
    try:
        for layer, keys, values in kept:
            layer.keys, layer.values = keys[..., :n_vis, :], values[..., :n_vis, :]
        yield
    finally:
        for layer, keys, values in kept:
            layer.keys, layer.values = keys, values


@torch.inference_mode()
def lhat_fast(
    loaded: LoadedModel,
    tt: TokenizedTrace,
    *,
    ts: Sequence[int] | Integer[np.ndarray, " n_ts"] | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    max_pack_tokens: int = DEFAULT_MAX_PACK_TOKENS,
    max_attn_bytes: int | None = DEFAULT_MAX_ATTN_BYTES,
    return_hidden: bool = False,
    hidden_layer: int = -1,
) -> LhatResult:
    """L̂_t for every prefix t by one chunked prefill plus packed suffixes (docs/methods.md#m8).

    Equals `lhat_naive` up to float32 rounding (measured ≤ 1e-5 nats on the tiny test models); see
    the module docstring for how the mask and position ids are passed. All forwards go through the
    bridge (raw mode: its logits equal HF eager).

    Example:
        >>> res = lhat_fast(loaded, tt)            # res.lhat: float32 [T+1]
        >>> d = delta_lhat(res.lhat)               # float64 [T], aligned to trajectory tokens

    Args:
        loaded: The model (batch 1; Qwen2/2.5, Qwen3, Llama, GPT-2 and other full-attention
            causal LMs the bridge wraps).
        tt: The tokenized trace.
        ts: Trajectory prefix lengths to evaluate (each in 0..T, any order); None for 0..T.
        chunk_size: Prefill chunk length; bounds the prefill's attention memory.
        max_pack_tokens: Longest packed-suffix sequence per forward (k · m tokens).
        max_attn_bytes: Budget for one layer's attention buffers per pack; see `plan_pack_size`.
            None for no limit beyond `max_pack_tokens`.
        return_hidden: Also return the residual stream at the answer-predicting rows.
        hidden_layer: Block whose `hook_resid_post` is returned (negative counts from the end).

    Returns:
        The `LhatResult`.

    Raises:
        ProbesError: Bad spans, empty answer, t outside 0..T, non-positive sizes, a bad
            `hidden_layer`, or a model whose KV cache is not a plain full-attention cache.
    """
    if chunk_size < 1 or max_pack_tokens < 1:
        raise ProbesError(
            f"chunk_size ({chunk_size}) and max_pack_tokens ({max_pack_tokens}) must be positive."
        )
    lay = _layout(tt, loaded.device)
    t_values = _check_ts(ts, lay.n_traj)
    bridge, arch = loaded.bridge, loaded.arch
    dtype = _model_dtype(loaded)
    n_ans, m = len(lay.answer), lay.copy_len
    keep = _keeps_logits(loaded)

    hook_name = None
    if return_hidden:
        layer = hidden_layer + arch.n_layers if hidden_layer < 0 else hidden_layer
        if not 0 <= layer < arch.n_layers:
            raise ProbesError(
                f"hidden_layer={hidden_layer} is out of range for {arch.n_layers} layers; use "
                f"0..{arch.n_layers - 1} or a negative index."
            )
        hook_name = edit_hook_name(f"L{layer}.resid_post")

    # Only the prefix positions that some requested truncation point can see are prefilled.
    ends = lay.n_prompt + t_values  # [n] context lengths e = |P| + t
    n_prefix = int(ends.max()) - lay.lead if len(ends) else 0

    from transformers import DynamicCache

    cache = DynamicCache(config=loaded.hf_model.config)
    n_chunks = 0
    for start in range(0, n_prefix, chunk_size):
        stop = min(start + chunk_size, n_prefix)
        bridge(
            lay.context[start:stop][None],
            return_type="logits",
            past_key_values=cache,
            position_ids=torch.arange(start, stop, device=loaded.device)[None],
            **({"logits_to_keep": 1} if keep else {}),
        )
        n_chunks += 1
    kept = _prefix_layers(cache) if n_prefix else []
    if n_prefix and cache.get_seq_length() != n_prefix:
        raise ProbesError(
            f"The KV cache holds {cache.get_seq_length()} positions after prefilling {n_prefix}: "
            "the bridge is not filling it (transformers >= 5.24 without the shim?). Load the model "
            "with probes.models.load.load_model/boot_model, which install it."
        )

    k = plan_pack_size(
        m,
        n_prefix,
        arch.n_heads,
        max_pack_tokens=max_pack_tokens,
        max_attn_bytes=max_attn_bytes,
        dtype_bytes=torch.finfo(dtype).bits // 8,
    )
    lhat = np.empty(len(t_values), dtype=np.float64)
    hidden = (
        np.empty((len(t_values), n_ans, arch.d_model), dtype=np.float32) if return_hidden else None
    )
    order = np.argsort(ends, kind="stable")  # packs of neighbouring t see similar prefix lengths
    n_packs = 0
    for p0 in range(0, len(order), k):
        idx = order[p0 : p0 + k]
        ids, mask, position_ids, rows, n_vis = _pack_inputs(lay, ends[idx], dtype)
        captured: list[torch.Tensor] = []

        def grab(act: torch.Tensor, hook: Any, rows: torch.Tensor = rows) -> None:
            captured.append(act[0, rows].float())  # [k*|A|, d_model]  # noqa: B023 (called within the iteration)

        kwargs: dict[str, Any] = {
            "return_type": "logits",
            "attention_mask": mask,
            "position_ids": position_ids,
        }
        if keep:
            kwargs["logits_to_keep"] = rows
        if n_vis:
            kwargs["past_key_values"] = cache
        hooks = [(hook_name, grab)] if hook_name else []
        with _prefix_view(kept, n_vis), bridge.hooks(fwd_hooks=hooks):
            logits = bridge(ids, **kwargs)[0]  # [k*|A|, vocab] (or [k*m, vocab])
        if not keep:
            logits = logits[rows]
        nll = _answer_nll(logits.reshape(len(idx), n_ans, -1), lay.answer.expand(len(idx), -1))
        lhat[idx] = nll.mean(dim=1).cpu().numpy()
        if hidden is not None:
            hidden[idx] = captured[-1].reshape(len(idx), n_ans, -1).cpu().numpy()
        n_packs += 1

    return LhatResult(
        lhat=lhat.astype(np.float32),
        ts=t_values,
        hidden=hidden,
        hidden_hook=hook_name,
        copy_len=m,
        copies_per_pack=k,
        n_packs=n_packs,
        n_prefill_chunks=n_chunks,
    )
