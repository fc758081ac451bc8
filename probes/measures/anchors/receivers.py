"""Thought-Anchors white-box quantities on chunks (docs/methods.md#receiver-heads, #suppression).

* `chunk_attention(loaded, ids, spans)`: the sentence-averaged attention pattern
  `Ā^{ℓ,h}[a, b] = mean_{i∈S_a, j∈S_b} p^{ℓ,h}_{i,j}` of every layer and head, computed chunk-wise
  from the captured (rotated) queries and keys inside the forward's hooks: one layer's q and k are
  held at a time, and one query chunk's score rows `[H, |S_a|, N]` at a time, never an `[N, N]`
  pattern per layer for the whole trace.
* `vertical_scores`, `head_kurtosis`, `receiver_heads`, `receiver_scores`: the paper's vertical
  score (ignoring the nearest `proximity_ignore` chunks), per-head kurtosis, top-k receiver heads
  and each chunk's receiver score (pure numpy).
* `suppression(loaded, tt, spans)`: for each chunk, its keys masked in all heads of all layers
  (`hooks.edit.mask_keys_per_row`, several chunks per forward as a batch, each row with its own
  mask); returns the chunk × chunk matrix of the mean KL(P_base ‖ P_supp) at the later chunks'
  tokens and the change of the answer NLL.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from jaxtyping import Float, Int

from hooks.edit import edit, mask_keys, mask_keys_per_row
from hooks.model import LoadedModel
from probes.errors import ProbesError
from probes.measures.anchors import PROXIMITY_IGNORE as PROXIMITY_IGNORE
from probes.measures.anchors import TOP_K_HEADS as TOP_K_HEADS
from probes.measures.lhat.fast import _keeps_logits
from probes.traces.tokenize import TokenizedTrace

DEFAULT_MAX_ATTN_BYTES = 1 << 30
"""Budget of one layer's attention buffers of one batched suppression forward."""


def _qk_sites(loaded: LoadedModel, layer: int) -> tuple[str, str]:
    if loaded.arch.positional == "rope":
        return f"L{layer}.attn.rot_q", f"L{layer}.attn.rot_k"
    return f"L{layer}.attn.q", f"L{layer}.attn.k"


def _scaling(loaded: LoadedModel, layer: int) -> float:
    """The attention scale of a layer (the HF module's `scaling`, else 1/√d_head)."""
    try:
        attn = loaded.hf_model.model.layers[layer].self_attn
        value = getattr(attn, "scaling", None)
    except AttributeError:
        value = None
    return float(value) if value is not None else loaded.arch.d_head ** -0.5


def _check_spans(spans: np.ndarray, n_tokens: int) -> np.ndarray:
    spans = np.asarray(spans, dtype=np.int64).reshape(-1, 2)
    if spans.size == 0:
        raise ProbesError("no chunks: a trace needs at least one chunk")
    if (spans[:, 1] <= spans[:, 0]).any() or (spans[1:, 0] != spans[:-1, 1]).any():
        raise ProbesError(f"chunk spans must be non-empty and contiguous, got {spans.tolist()[:5]}...")
    if spans[0, 0] < 1 or spans[-1, 1] > n_tokens:
        raise ProbesError(f"chunk spans {spans[0, 0]}..{spans[-1, 1]} must lie in 1..{n_tokens} "
                          f"(position 0 must stay visible to every row)")
    return spans


def chunk_pattern_rows(q: Float[torch.Tensor, "n h d"], k: Float[torch.Tensor, "n hk d"],
                       spans: np.ndarray, scale: float) -> Float[torch.Tensor, "h c c"]:
    """Ā[h, a, b] of one layer from its queries and keys (float32; NaN above the diagonal).

    Row block by row block: the scores of the rows of chunk a against keys 0..end_a, causal
    softmax over all of them (prompt keys included), then the probability mass of each key chunk
    from a cumulative sum along the keys.
    """
    n_heads, group = q.shape[1], q.shape[1] // k.shape[1]
    k = k.float().repeat_interleave(group, dim=1)  # query head h uses kv head h // group
    c = spans.shape[0]
    out = torch.full((n_heads, c, c), float("nan"), dtype=torch.float32)
    starts = torch.as_tensor(spans[:, 0])
    for a in range(c):
        r0, r1 = int(spans[a, 0]), int(spans[a, 1])
        s = torch.einsum("rhd,khd->hrk", q[r0:r1].float(), k[:r1]) * scale
        rows = torch.arange(r0, r1)[:, None]
        s = s.masked_fill(torch.arange(r1)[None, :] > rows, float("-inf"))
        p = torch.softmax(s, dim=-1)  # [H, R, K]
        cum = torch.nn.functional.pad(p.sum(1).cumsum(-1), (1, 0))  # [H, K+1], summed over rows
        ends = torch.as_tensor(spans[: a + 1, 1])
        mass = cum[:, ends] - cum[:, starts[: a + 1]]  # [H, a+1]
        sizes = torch.as_tensor((spans[: a + 1, 1] - spans[: a + 1, 0]) * (r1 - r0),
                                dtype=torch.float32)
        out[:, a, : a + 1] = mass / sizes
    return out


@torch.inference_mode()
def chunk_attention(loaded: LoadedModel, ids: Int[torch.Tensor, " n"] | np.ndarray,
                    spans: np.ndarray) -> Float[np.ndarray, "l h c c"]:
    """The sentence-averaged attention pattern of every layer and head, from one forward.

    Args:
        loaded: The model.
        ids: int [N] token ids of the whole trace.
        spans: int [C, 2] chunk spans in absolute token positions (contiguous, not at 0).

    Returns:
        float32 [L, H, C, C]: Ā[ℓ, h, a, b] for b ≤ a (the query chunk a, key chunk b); NaN above.
    """
    ids = torch.as_tensor(np.asarray(ids), dtype=torch.long).reshape(1, -1)
    spans = _check_spans(spans, int(ids.shape[1]))
    n_layers = loaded.arch.n_layers
    held: dict[tuple[int, str], torch.Tensor] = {}
    result: list[torch.Tensor | None] = [None] * n_layers

    def grab(layer: int, which: str):
        def fn(x: torch.Tensor, hook: object) -> None:
            held[(layer, which)] = x[0].detach()
            if (layer, "q") in held and (layer, "k") in held:
                q, k = held.pop((layer, "q")), held.pop((layer, "k"))
                result[layer] = chunk_pattern_rows(q, k, spans, _scaling(loaded, layer))
        return fn

    edits = []
    for layer in range(n_layers):
        q_site, k_site = _qk_sites(loaded, layer)
        edits += [(q_site, grab(layer, "q")), (k_site, grab(layer, "k"))]
    with edit(loaded, edits):
        loaded.bridge(ids.to(loaded.device), **_one_logit(loaded))
    if any(r is None for r in result):
        raise ProbesError("the forward did not reach every layer's query and key hooks")
    return torch.stack(result).numpy()  # type: ignore[arg-type]


def _one_logit(loaded: LoadedModel) -> dict:
    return {"logits_to_keep": 1} if _keeps_logits(loaded) else {}


# --------------------------------------------------------------------------------------------------
# Receiver heads (numpy)


def vertical_scores(pattern: np.ndarray, proximity_ignore: int = PROXIMITY_IGNORE) -> np.ndarray:
    """vs[..., b] = mean over query chunks a ≥ b + proximity_ignore of Ā[..., a, b] (NaN: none).

    Args:
        pattern: [..., C, C] sentence-averaged patterns (query chunk, key chunk).
        proximity_ignore: Nearest chunks left out.

    Returns:
        float64 [..., C].
    """
    x = np.asarray(pattern, dtype=np.float64)
    c = x.shape[-1]
    a = np.arange(c)[:, None]
    b = np.arange(c)[None, :]
    keep = a >= b + proximity_ignore
    vals = np.where(keep, x, 0.0)
    count = keep.sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, vals.sum(-2) / count, np.nan)


def head_kurtosis(vertical: np.ndarray) -> np.ndarray:
    """Fisher kurtosis (bias=True, NaNs left out) of each head's vertical scores over chunks.

    Args:
        vertical: [..., C].

    Returns:
        float64 [...]; NaN where fewer than 4 chunks have a score.
    """
    x = np.asarray(vertical, dtype=np.float64)
    ok = ~np.isnan(x)
    n = ok.sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(ok, x, 0.0).sum(-1) / n
        d = np.where(ok, x - mean[..., None], 0.0)
        m2 = (d ** 2).sum(-1) / n
        m4 = (d ** 4).sum(-1) / n
        k = m4 / m2 ** 2 - 3.0
    return np.where(n >= 4, k, np.nan)


def receiver_heads(kurtoses: Sequence[np.ndarray], k: int = TOP_K_HEADS
                   ) -> tuple[np.ndarray, np.ndarray]:
    """The top-k heads by kurtosis averaged over traces.

    Args:
        kurtoses: Per trace, [L, H] kurtosis.
        k: Heads kept.

    Returns:
        (int64 [k', 2] (layer, head) best first, float64 [L, H] mean kurtosis); k' = min(k, heads
        with a finite mean).
    """
    if not kurtoses:
        return np.zeros((0, 2), dtype=np.int64), np.zeros((0, 0))
    stack = np.stack([np.asarray(x, dtype=np.float64) for x in kurtoses])
    ok = ~np.isnan(stack)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(ok, stack, 0.0).sum(0) / ok.sum(0)
    flat = np.where(np.isnan(mean), -np.inf, mean).ravel()
    order = np.argsort(-flat, kind="stable")
    order = order[np.isfinite(flat[order])][:k]
    return np.stack(np.unravel_index(order, mean.shape), axis=1).astype(np.int64), mean


def receiver_scores(vertical: np.ndarray, heads: np.ndarray) -> np.ndarray:
    """Each chunk's receiver score: the mean over the receiver heads of their vertical scores.

    Args:
        vertical: [L, H, C] one trace's vertical scores.
        heads: int [k, 2] (layer, head).

    Returns:
        float64 [C] (NaN where no receiver head has a score).
    """
    v = np.asarray(vertical, dtype=np.float64)
    if not len(heads):
        return np.full(v.shape[-1], np.nan)
    v = v[heads[:, 0], heads[:, 1]]
    ok = ~np.isnan(v)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(ok, v, 0.0).sum(0) / ok.sum(0)


# --------------------------------------------------------------------------------------------------
# Attention suppression


@dataclass(frozen=True)
class SuppressionResult:
    """Attention suppression of one trace.

    Attributes:
        kl: float32 [C, C] `kl[j, i]` = mean over the tokens t of chunk j > i of
            KL(P_base(·|≤t) ‖ P_supp_i(·|≤t)) (nats; NaN for j ≤ i).
        dl: float32 [C] answer NLL (mean over answer tokens) with chunk i suppressed minus without.
        n_forwards: Forward calls (1 unmasked + the batched masked ones).
        n_rows: Sequences run (1 + C).
        seconds: Wall time of all of them.
        seconds_base: Wall time of the unmasked forward.
    """

    kl: np.ndarray
    dl: np.ndarray
    n_forwards: int
    n_rows: int
    seconds: float
    seconds_base: float

    @property
    def cost_ratio(self) -> float:
        """Wall time in units of one unmasked forward, per chunk (≤ 2 is the target)."""
        c = len(self.dl)
        return self.seconds / max(self.seconds_base, 1e-9) / max(c, 1)


def plan_batch(loaded: LoadedModel, n_tokens: int, max_attn_bytes: int = DEFAULT_MAX_ATTN_BYTES
               ) -> int:
    """Masked variants per forward so that one layer's scores + pattern fit `max_attn_bytes`."""
    per_row = 3 * loaded.arch.n_heads * n_tokens * n_tokens * 4
    return max(1, int(max_attn_bytes // max(per_row, 1)))


def _logprobs_rows(loaded: LoadedModel, hidden: torch.Tensor, temperature: float
                   ) -> torch.Tensor:
    logits = loaded.hf_model.get_output_embeddings()(hidden).float()
    return torch.log_softmax(logits / temperature, dim=-1)


@torch.inference_mode()
def suppression(loaded: LoadedModel, tt: TokenizedTrace, spans: np.ndarray, *,
                batch_size: int | None = None, temperature: float = 1.0,
                row_block: int = 256) -> SuppressionResult:
    """Suppress each chunk's keys in all heads of all layers and measure what changes.

    One unmasked forward gives P_base at every trajectory row and the answer NLL; then the chunks
    go through in batches: batch row r is the same sequence with chunk i_r's keys masked
    (pre-softmax score `finfo.min`) for every query, through `hooks.edit.mask_keys_per_row` at
    every layer's `attn.scores`. Only the final-norm hidden states are kept; the logits are made
    `row_block` rows at a time.

    Args:
        loaded: The model.
        tt: The tokenized trace (prompt, trajectory, scaffold, answer).
        spans: int [C, 2] chunk spans in trajectory token coordinates.
        batch_size: Masked variants per forward (None: `plan_batch`).
        temperature: Temperature of both next-token distributions in the KL.
        row_block: Most rows per logits block (fewer for a large batch × vocabulary).

    Returns:
        The `SuppressionResult`.
    """
    if not temperature > 0:
        raise ProbesError(f"temperature must be > 0, got {temperature}")
    n = tt.n_tokens
    t0_, t1_ = tt.spans["trajectory"]
    a0, a1 = tt.spans["answer"]
    if a1 <= a0:
        raise ProbesError(f"trace {tt.trace.id!r} has an empty answer; the answer NLL is undefined")
    spans_abs = _check_spans(np.asarray(spans, dtype=np.int64) + t0_, n)
    c = spans_abs.shape[0]
    bs = batch_size or plan_batch(loaded, n)
    dev = loaded.device
    ids = torch.as_tensor(tt.ids, dtype=torch.long, device=dev)[None]
    answer = ids[0, a0:a1]
    hidden: list[torch.Tensor] = []

    def keep_hidden(x: torch.Tensor, hook: object) -> None:
        hidden.append(x.detach())

    def run(batch: int, masks: torch.Tensor | None) -> torch.Tensor:
        hidden.clear()
        edits = [("ln_final", keep_hidden)]
        if masks is not None:
            fn = mask_keys_per_row(masks)
            edits = [(f"L{layer}.attn.scores", fn) for layer in range(loaded.arch.n_layers)] + edits
        with edit(loaded, edits):
            loaded.bridge(ids.expand(batch, -1), **_one_logit(loaded))
        return hidden[0]

    def answer_nll(h: torch.Tensor) -> torch.Tensor:  # h [B, N, d] -> [B]
        lp = _logprobs_rows(loaded, h[:, a0 - 1:a1 - 1], 1.0)
        return -lp.gather(-1, answer.expand(h.shape[0], -1)[..., None])[..., 0].double().mean(-1)

    clock = time.perf_counter()
    h_base = run(1, None)
    seconds_base = time.perf_counter() - clock
    nll_base = answer_nll(h_base)[0]
    rows = torch.arange(t0_, t1_, device=dev)  # trajectory rows (each predicts the next token)
    kl = np.full((c, c), np.nan, dtype=np.float32)
    dl = np.zeros(c, dtype=np.float32)
    n_forwards = 1
    tok_chunk = torch.as_tensor(np.repeat(np.arange(c), spans_abs[:, 1] - spans_abs[:, 0]),
                                device=dev)
    for lo in range(0, c, bs):
        idx = list(range(lo, min(c, lo + bs)))
        masks = torch.zeros(len(idx), n, dtype=torch.bool, device=dev)
        for r, i in enumerate(idx):
            masks[r, spans_abs[i, 0]:spans_abs[i, 1]] = True
        h = run(len(idx), masks)
        n_forwards += 1
        dl[idx] = (answer_nll(h) - nll_base).float().cpu().numpy()
        kl_rows = torch.empty(len(idx), len(rows), dtype=torch.float64, device=dev)
        # rows per logits block: at most `row_block`, and ~256 MiB of float32 logits per block
        step = max(1, min(row_block, (1 << 28) // (4 * len(idx) * loaded.arch.vocab_size)))
        for b0 in range(0, len(rows), step):
            r = rows[b0:b0 + step]
            lp_base = _logprobs_rows(loaded, h_base[:, r], temperature)  # [1, R, V]
            lp_supp = _logprobs_rows(loaded, h[:, r], temperature)  # [B, R, V]
            kl_rows[:, b0:b0 + len(r)] = (lp_base.exp() * (lp_base - lp_supp)).sum(-1).double()
        sums = torch.zeros(len(idx), c, dtype=torch.float64, device=dev)
        sums.index_add_(1, tok_chunk, kl_rows)
        sizes = torch.as_tensor(spans_abs[:, 1] - spans_abs[:, 0], dtype=torch.float64, device=dev)
        mean = (sums / sizes).float().cpu().numpy()
        for r_, i in enumerate(idx):
            kl[i + 1:, i] = mean[r_, i + 1:]
    seconds = time.perf_counter() - clock
    return SuppressionResult(kl=kl, dl=dl, n_forwards=n_forwards, n_rows=1 + c, seconds=seconds,
                             seconds_base=seconds_base)


def masked_forward_reference(loaded: LoadedModel, tt: TokenizedTrace, keys: Sequence[int]
                             ) -> torch.Tensor:
    """Log-probabilities [N, V] of one real forward with `keys` masked for every query row
    (`hooks.edit.mask_keys` at every layer), for tests and checks."""

    n = tt.n_tokens
    keys = list(keys)
    fn = mask_keys(range(n), keys, loaded.device)
    edits = [(f"L{layer}.attn.scores", fn) for layer in range(loaded.arch.n_layers)] if keys else []
    ids = torch.as_tensor(tt.ids, dtype=torch.long, device=loaded.device)[None]
    with torch.inference_mode(), edit(loaded, edits):
        logits = loaded.bridge(ids)
    return torch.log_softmax(logits[0].float(), dim=-1)


__all__ = [
    "PROXIMITY_IGNORE",
    "TOP_K_HEADS",
    "SuppressionResult",
    "chunk_attention",
    "chunk_pattern_rows",
    "head_kurtosis",
    "masked_forward_reference",
    "receiver_heads",
    "receiver_scores",
    "suppression",
    "vertical_scores",
]
