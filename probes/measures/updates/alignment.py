"""Gradient alignment of per-token implicit updates with the answer loss (docs/methods.md#m6, #m7).

For one tokenized trace `x = [P | 𝒯 | 𝒮 | 𝒜]` and the answer loss
`L = −(1/m) Σ_j log p(a_j | x_{<pos(a_j)})` (mean NLL of the answer span, as `probes.answers`),
ONE forward pass of the underlying HF model (eager attention; the unembedding only at the rows
a_1−1 .. N−1, `logits_to_keep`) plus ONE backward pass (`torch.autograd.grad`) gives:
* the true gradients `G_gate = ∂L/∂W_gate`, `G_up = ∂L/∂W_up` of every layer (d_ff × d, HF weight
  layout `out = W u`, so the parameter gradient IS `G = Σ_p g_p u_pᵀ`; materialised once per layer as
  §7.3 M6 says);
* `∂L/∂z_ℓ` at the answer-predicting rows 𝒬 (the input of `o_proj`, i.e. `w_{q,h} = W_O^{hᵀ} ∂L/∂m_q`).

M6 (descent alignment of the M5 token-by-token MLP steps). Per layer ℓ and answer row q ∈ 𝒬 the
"local / frozen-upstream" prefix trajectory of §7.3 M5 is rebuilt exactly from the pattern row and the
values by `probes.measures.updates.mlp.restricted_prefix` (the same code as M5): `z^{(i)}` = attention
restricted
to `K_i = (keys ≤ q outside 𝒯) ∪ {τ_0..τ_i}` (cumulative sums of the already-normalised p),
`m^{(i)} = x_q + W_O z^{(i)} + b_O`, `u^{(i)} = RMSNorm_2(m^{(i)})` (HF convention: γ NOT folded, so `u`
is exactly the input of gate_proj/up_proj). Token i's step on `W ∈ {W_gate, W_up}` is the rank-1
matrix

    step_i = W (u^{(i)} − u^{(i−1)}) u^{(−1)ᵀ} / ‖u^{(−1)}‖²   (never materialised)

and, with §0.4's rank-1 algebra (`⟨a bᵀ, G⟩ = aᵀ G b = δuᵀ Wᵀ (G b)`, `‖a bᵀ‖ = ‖a‖‖b‖`, the
d-vector `Wᵀ(G u^{(−1)})` per row and the d × d Gram `WᵀW` per layer, which a caller may pass in once
per run):
* `inner` = ⟨G, step_i⟩ = first-order ΔL if step_i were applied as a weight edit (ΔL^pred);
* `cos` = −⟨G, step_i⟩ / (‖G‖_F ‖step_i‖_F) (descent alignment; > 0 means a descent direction);
* `eta` = η*_i = −⟨G, step_i⟩ / ‖G‖_F² (the doc's per-token fitted implicit learning rate: the least
  squares solution of step_i ≈ −η G), and `eta_pooled` = the least-squares η of ALL steps of a row
  at once (`argmin_η Σ_i ‖step_i + η G‖²` = mean over i of η*_i).

Each is reported for gate, up and the joint parameter (gate ⊕ up: inner products add, squared norms
add), shape [L, Q, T] (`which` axis first: [3, L, Q, T] in the order `MLP_WEIGHTS`). From the same
Gram products, `step_norm` = ‖step_i‖_F (M5's σ_i) and `step_cos` = cos(step_i, step_{i−1}) (M5's
consecutive-step cosine), so M5's σ and cosine at the M6 rows need no second pass. `m6_rows` limits
M6 to some rows of 𝒬 (e.g. only the first answer row: O(T·d) instead of O(Q·T·d) per layer and
weight). The gradient is the full-context one (`G_full`; M6b's reduced-context gradient is not
computed).

M7 (attribution patching of the leave-one-out context vector, §7.3 M4/M7): removing key t ∈ 𝒯 from
head h's softmax at row q changes z by −δz_{q,h,t}, δz = p (v_t − z_q)/(1 − p), so

    ΔL^ℓ_t ≈ −Σ_{q∈𝒬, h} (∂L/∂z_{q,h})ᵀ δz_{q,h,t}            shape [L, T] (and per head [L, H, T])

(direct edges t → 𝒬 through layer ℓ's attention only; frozen upstream, see §7.7).

Every family of `probes.measures.updates.families.UPDATE_FAMILIES`, through its weight view
(`hooks.weights.LayerView`: v from the view's v source, z at the o_proj input, x at the decoder
layer input, u at the MLP input, the gradient taken with respect to the MLP input parameters and
split into W_gate / W_up, or W_in for GPT-2's plain MLP, whose M6 arrays have NaN in the up slot
and W_in alone as "joint"). The restricted prefixes apply the family's norms (after attention for
OLMo-2 / Gemma: m = x + N_ao(W_O z + b_O)). The eager pass of a family outside the Llama layout
runs on a plain-HF view with eager attention (`probes.measures.updates.families.eager_model`). Everything
downstream of the captures is computed in float64, on the model's device.

Memory: with `attention="eager"` (the reference), until the backward autograd holds one eager
attention pattern [H, N, N] per layer, i.e. ≈ L·H·N²·(bytes per element) on top of a forward (the
hooks keep only the rows 𝒬 of it): 0.75 GB extra measured for 4 layers × 8 heads at N ≈ 2.1k in fp32
(`bench/updates_bench.py`), ≈ 35 GB estimated for DeepSeek-R1-Distill-Qwen-1.5B (28 × 12) at N = 5k
in fp32. With `attention="sdpa"` (`probes.measures.updates.sdpa_pass`) the forward and backward run through
`scaled_dot_product_attention` on a plain-HF view of the model and only the pattern rows 𝒬
[H, Q, N] per layer are formed (exactly, from the captured q̃ and k̃): extra memory O(N·d·L + L·H·Q·N)
(`bench/long_trace.py`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from jaxtyping import Float, Float64, Int
from torch import Tensor

from hooks.edit import module_hooks
from hooks.model import LoadedModel
from hooks.weights import LayerView
from probes.errors import ProbesError
from probes.measures.updates import PRECISIONS
from probes.measures.updates.families import eager_model, norm_functions, views
from probes.measures.updates.mlp import restricted_prefix
from probes.measures.updates.sdpa_pass import ATTENTION_PATHS, record_attention, sdpa_view
from probes.traces.tokenize import TokenizedTrace

__all__ = [
    "MLP_WEIGHTS",
    "AlignmentError",
    "AnswerAlignment",
    "answer_alignment",
    "gradient_pass",
    "answer_loss",
    "trace_alignment",
]

MLP_WEIGHTS = ("gate", "up", "joint")
"""Order of the `which` axis of the M6 arrays."""

_F64 = torch.float64

_Ids = Int[Tensor, " n"] | Int[Tensor, "1 n"] | Int[np.ndarray, " n"] | Int[np.ndarray, "1 n"]
"""Token ids of one sequence, [N] or [1, N] (torch or numpy)."""


class AlignmentError(ProbesError, ValueError):
    """Unsupported model, or spans that do not allow the measurement."""


def _hf(model: LoadedModel | torch.nn.Module) -> torch.nn.Module:
    return model.hf_model if isinstance(model, LoadedModel) else model


def _layers(hf: torch.nn.Module) -> list[LayerView]:
    return views(hf, what="alignment", error=AlignmentError)


def _ids(ids: Tensor | np.ndarray, hf: torch.nn.Module) -> Tensor:
    ids = torch.as_tensor(ids, dtype=torch.long)
    ids = ids.reshape(1, -1) if ids.dim() == 1 else ids
    if ids.shape[0] != 1:
        raise AlignmentError(f"batch 1 only; got ids of shape {tuple(ids.shape)}.")
    return ids.to(next(hf.parameters()).device)


def _answer_logits(hf: torch.nn.Module, ids: Tensor, answer: tuple[int, int]) -> Tensor:
    """Logits of rows answer[0]−1 .. N−1 only (`logits_to_keep`): the unembedding and its backward
    skip every earlier row ([N, vocab] is the largest activation of a long trace)."""
    return hf(ids, logits_to_keep=int(ids.shape[1]) - (answer[0] - 1)).logits


def _nll(logits: Tensor, ids: Tensor, answer: tuple[int, int]) -> Tensor:
    """Mean answer NLL from `_answer_logits` (row 0 = position answer[0] − 1)."""
    a, b = answer
    pred = logits[0, : b - a]
    logp = torch.log_softmax(pred.to(torch.promote_types(pred.dtype, torch.float32)), dim=-1)
    return -logp.gather(-1, ids[0, a:b, None])[:, 0].mean()


def _check_spans(n: int, trajectory: tuple[int, int], answer: tuple[int, int]) -> None:
    ta, tb = trajectory
    a, b = answer
    if not (0 <= ta <= tb <= a - 1 and a < b <= n and a >= 1):
        raise AlignmentError(
            f"need 0 <= trajectory start <= end < answer start < answer end <= {n}; got "
            f"trajectory={trajectory}, answer={answer}."
        )


@contextmanager
def _z_edit(layers: list[LayerView], z_delta: dict[int, Tensor], rows: Tensor
            ) -> Iterator[None]:
    """Add `z_delta[ℓ]` [Q, H·d_h] to the o_proj input of layer ℓ at `rows`."""
    def pre(delta: Tensor):
        def hook(mod, args):
            z = args[0].clone()
            z[0, rows] = z[0, rows] + delta.to(z.dtype).reshape(len(rows), -1)
            return (z, *args[1:])
        return hook

    with module_hooks([(layers[l].o_proj, "forward_pre", pre(delta))
                       for l, delta in z_delta.items()]):
        yield


@torch.no_grad()
def answer_loss(model: LoadedModel | torch.nn.Module, ids: _Ids, answer: tuple[int, int], *,
                z_delta: dict[int, Float[Tensor, "q h d_h"] | Float[Tensor, "q hd"]] | None = None,
                ) -> float:
    """The answer loss L (mean NLL of `ids[a:b]`), optionally with z edited at the answer rows.

    Args:
        model: A LoadedModel or its HF model.
        ids: Token ids [N] or [1, N].
        answer: Half-open answer span (a, b); rows 𝒬 = a−1 .. b−2 predict it.
        z_delta: Optional `{layer: Δz}` with Δz [Q, H, d_h] (or [Q, H·d_h]) added to the attention
            z (o_proj input) of that layer at the rows 𝒬 (e.g. `−δz` for a single-layer knockout of
            one key at the answer rows, see `AnswerAlignment.loo_dz`).

    Returns:
        L in nats per token (float).
    """
    hf = _hf(model)
    layers = _layers(hf)
    ids = _ids(ids, hf)
    rows = torch.arange(answer[0] - 1, answer[1] - 1, device=ids.device)
    with _z_edit(layers, z_delta or {}, rows):
        logits = _answer_logits(hf, ids, answer)
    return float(_nll(logits, ids, answer))


@dataclass
class AnswerAlignment:
    """M6 and M7 for one trace (numpy float64 arrays).

    Shapes: W = 3 (`MLP_WEIGHTS`: gate, up, joint), L layers, Q = answer length (rows 𝒬), T = number
    of trajectory tokens, H query heads; the M6 arrays (`inner`, `step_norm`, `cos`, `eta`,
    `eta_pooled`, `full_inner`, `telescope_err`, factors `du` / `u_base`) have Q' = len(`m6_rows`)
    rows (all of 𝒬 by default), M7 and `mass` always all of 𝒬.

    Attributes:
        loss: The answer loss L of the full context.
        trajectory: Trajectory span (start, end).
        answer: Answer span (start, end); row k of 𝒬 is position `answer[0] − 1 + k`.
        grad_norm: ‖G‖_F per weight and layer [W, L] (full-context gradient, HF γ-unfolded convention).
        inner: M6 ⟨G, step_i⟩ = first-order ΔL^pred of token i's step [W, L, Q, T].
        step_norm: ‖step_i‖_F [W, L, Q, T].
        cos: −⟨G, step_i⟩/(‖G‖‖step_i‖) [W, L, Q, T] (NaN where the step is zero).
        eta: η*_i = −⟨G, step_i⟩/‖G‖² [W, L, Q, T].
        eta_pooled: least-squares η of all steps of a row, `argmin_η Σ_i ‖step_i + ηG‖²` [W, L, Q].
        full_inner: ⟨G, ΔW_{T−1}⟩ of the whole-trajectory patch (telescoping endpoint) [W, L, Q].
        step_cos: cos(step_i, step_{i−1}) of consecutive steps [W, L, Q, T] (M5's consecutive
            cosine, = `probes.measures.updates.mlp.mlp_updates(...).cos_gate / cos_up` at that row; NaN at
            i = 0 or a zero step).
        telescope_err: Relative error of `u^{(T−1)}` vs the captured gate_proj input u_q [L, Q]
            (V9: the restricted-attention rebuild ends at the full context).
        m7: M7 ΔL^ℓ_t ≈ −Σ_{q,h} ∂L/∂z_{q,h}·δz_{q,h,t} [L, T].
        m7_head: The same per head [L, H, T].
        mass: Attention mass p of trajectory tokens at the rows 𝒬 [L, H, Q, T].
        factors: Per layer, float64 torch tensors for checks (only with `keep_factors=True`):
            `du` [Q', T, d] (u^{(i)} − u^{(i−1)}), `u_base` [Q', d] (u^{(−1)}), `dz` [Q, T, H, d_h]
            (leave-one-out δz), `grad_z` [Q, H, d_h].
        m6_rows: Indices into 𝒬 of the M6 rows [Q'].
    """

    loss: float
    trajectory: tuple[int, int]
    answer: tuple[int, int]
    grad_norm: Float64[np.ndarray, "w l"]
    inner: Float64[np.ndarray, "w l q t"]
    step_norm: Float64[np.ndarray, "w l q t"]
    cos: Float64[np.ndarray, "w l q t"]
    eta: Float64[np.ndarray, "w l q t"]
    eta_pooled: Float64[np.ndarray, "w l q"]
    full_inner: Float64[np.ndarray, "w l q"]
    telescope_err: Float64[np.ndarray, "l q"]
    m7: Float64[np.ndarray, "l t"]
    m7_head: Float64[np.ndarray, "l h t"]
    mass: Float64[np.ndarray, "l h q_all t"]
    factors: list[dict[str, Tensor]] = field(default_factory=list, repr=False)
    m6_rows: Int[np.ndarray, " q"] | None = None
    step_cos: Float64[np.ndarray, "w l q t"] | None = None

    def step_factors(self, layer: int, row: int, token: int
                     ) -> tuple[Float[Tensor, " d"], Float[Tensor, " d"]]:
        """Rank-1 factors of token `token`'s step at (layer, row): step = W @ du ⊗ b.

        Args:
            layer: Layer index.
            row: Index into the M6 rows (into 𝒬, 0 .. Q−1, with the default `m6_rows`).
            token: Index into the trajectory (0 .. T−1).

        Returns:
            `(du, b)` with du = u^{(i)} − u^{(i−1)} [d] and b = u^{(−1)}/‖u^{(−1)}‖² [d]; the step on
            weight W is `(W @ du)[:, None] * b[None, :]`.

        Raises:
            AlignmentError: If the result was computed without `keep_factors=True`.
        """
        f = self._factors(layer)
        u0 = f["u_base"][row]
        return f["du"][row, token], u0 / u0.dot(u0)

    def loo_dz(self, layer: int, token: int) -> Float[Tensor, "q h d_h"]:
        """Leave-one-out δz of trajectory token `token` at layer `layer` for all rows 𝒬 [Q, H, d_h].

        `answer_loss(..., z_delta={layer: -loo_dz})` is the exact single-layer knockout of the key
        at the answer rows (frozen upstream, §7.3 M4/V4).
        """
        return self._factors(layer)["dz"][:, token]

    def _factors(self, layer: int) -> dict[str, Tensor]:
        if not self.factors:
            raise AlignmentError("factors were not kept; call with keep_factors=True.")
        return self.factors[layer]


def gradient_pass(hf: torch.nn.Module, layers: list[LayerView], ids: Tensor,
                  answer: tuple[int, int], *, hooks: Sequence = (),
                  store: dict[tuple[int, str], Tensor] | None = None,
                  ) -> tuple[Tensor, list[Tensor]]:
    """The one forward + backward of `answer_alignment`: the answer loss and its gradients with
    respect to every layer's z (o_proj input) and MLP input parameters, nothing else measured
    (what `bench/long_trace.py --timing` times as the floor of `updates`).

    Only W_gate / W_up (and the embedding, so that every z is on the graph) require grad during
    the pass: autograd then saves no Linear input for a weight gradient nobody asked for
    (q/k/v/o/down projections, norms, unembedding); restored afterwards.

    Args:
        hf: The HF model (an eager or `sdpa_view` one) and `layers` its layer views.
        ids: Token ids [1, N] on the model's device.
        answer: Half-open answer span.
        hooks: Extra `module_hooks` entries active during the forward.
        store: Filled with `(layer, "z")` -> the o_proj input (with grad), as the hooks' store.

    Returns:
        (loss, [∂L/∂z_ℓ for each layer] + [∂L/∂θ for each layer's `mlp_params`, in order]).
    """
    store = {} if store is None else store
    mlp_params = [p for view in layers for p in view.mlp_params]
    z_hooks = [(view.o_proj, "forward_pre",
                lambda mod, args, l=l: store.__setitem__((l, "z"), args[0]))
               for l, view in enumerate(layers)]
    keep = {id(p) for p in mlp_params} | {id(p) for p in hf.get_input_embeddings().parameters()}
    params = list(dict.fromkeys([*hf.parameters(), *mlp_params]))
    saved_flags = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(id(p) in keep)
        with torch.enable_grad(), module_hooks([*z_hooks, *hooks]):
            loss = _nll(_answer_logits(hf, ids, answer), ids, answer)
            zs = [store[(l, "z")] for l in range(len(layers))]
            grads = list(torch.autograd.grad(loss, zs + mlp_params))
    finally:
        for p, flag in zip(params, saved_flags):
            p.requires_grad_(flag)
    return loss, grads


def answer_alignment(model: LoadedModel | torch.nn.Module, ids: _Ids,
                     trajectory: tuple[int, int], answer: tuple[int, int], *,
                     keep_factors: bool = False, m6_rows: Sequence[int] | None = None,
                     grams: Sequence[tuple[Float[Tensor, "d d"], ...]] | None = None,
                     attention: str = "eager", precision: str = "float64",
                     ) -> AnswerAlignment:
    """Compute M6 and M7 from one forward and one backward pass.

    Example:
        >>> al = answer_alignment(loaded, tt.ids, tt.spans["trajectory"], tt.spans["answer"])
        >>> al.cos[2].shape        # joint gate⊕up descent cosine [L, Q, T]

    Args:
        model: A LoadedModel (its HF model is used) or a Llama-style HF causal LM; it must use
            eager attention (the attention module must return its pattern).
        ids: Token ids [N] or [1, N].
        trajectory: Half-open trajectory span (start, end) (may be empty).
        answer: Half-open answer span (a, b), after the trajectory; rows 𝒬 = a−1 .. b−2.
        keep_factors: Keep the per-layer factor tensors (for checks; O(L·Q·T·d) memory).
        m6_rows: Indices into 𝒬 (0 = the row predicting the first answer token) at which M6 is
            computed; default all Q rows. M7 and `mass` always cover all of 𝒬.
        grams: Optional per-layer `(W_gateᵀW_gate, W_upᵀW_up)` [d, d] (`(W_inᵀW_in,)` for a
            plain MLP; float64, or float32 for `precision="float32"`; any device), e.g.
            `LayerWeights.grams` from `probes.measures.updates.mlp.layer_weights(..., with_mlp=False)`,
            computed once per run instead of once per call.
        attention: "eager" (the reference: the model's eager attention returns its pattern, and
            autograd keeps every layer's [H, N, N] until the backward) or "sdpa" (linear memory:
            the forward and backward run on `probes.measures.updates.sdpa_pass.sdpa_view(model)`, a fused
            `scaled_dot_product_attention`, and the pattern rows 𝒬 [H, Q, N] are recomputed
            exactly from the captured rotated q and k; `model` may already be that view).
        precision: "float64" (the reference: everything after the pass in float64) or
            "float32": the Gram products `du WᵀW` of `step_norm` / `step_cos` (the largest
            products, O(Q'·T·d²)) in float32 from the float64 `du`; the restricted prefixes (their
            consecutive differences `du` cancel), M7 and the inner products stay float64
            (docs/methods.md#precision).

    Returns:
        The per-token quantities.

    Raises:
        AlignmentError: For an unsupported model, bad spans, an unknown `attention`, or a
            non-eager attention with `attention="eager"`.
    """

    if attention not in ATTENTION_PATHS:
        raise AlignmentError(f"attention must be one of {', '.join(ATTENTION_PATHS)}; got "
                             f"{attention!r}.")
    if precision not in PRECISIONS:
        raise AlignmentError(f"precision must be one of {', '.join(PRECISIONS)}; got "
                             f"{precision!r}.")
    gram_dtype = _F64 if precision == "float64" else torch.float32
    hf = eager_model(_hf(model)) if attention == "eager" else sdpa_view(model)
    layers = _layers(hf)
    ids = _ids(ids, hf)
    n = int(ids.shape[1])
    _check_spans(n, trajectory, answer)
    ta, tb = trajectory
    a, b = answer
    rows = torch.arange(a - 1, b - 1, device=ids.device)
    traj = torch.arange(ta, tb, device=ids.device)
    Q = b - a
    sel = list(range(Q)) if m6_rows is None else [int(r) for r in m6_rows]
    if not sel or sel != sorted(set(sel)) or sel[0] < 0 or sel[-1] >= Q:
        raise AlignmentError(f"m6_rows must be strictly increasing indices into the {Q} answer "
                             f"rows; got {list(m6_rows or [])}.")
    sel_t = torch.as_tensor(sel, device=ids.device)
    if grams is not None and len(grams) != len(layers):
        raise AlignmentError(f"grams has {len(grams)} layers, the model {len(layers)}.")
    store: dict[tuple[int, str], Tensor] = {}

    def save(key: tuple[int, str], cols: slice):
        def hook(mod, args, out):
            store[key] = (out[0] if isinstance(out, tuple) else out)[..., cols]
        return hook

    def save_input(key: tuple[int, str]):
        return lambda mod, args: store.__setitem__(key, args[0])

    def save_pattern(l: int):
        def hook(mod, args, out):  # rows 𝒬 only: the full [H, N, N] stays with autograd alone
            weights = out[1] if isinstance(out, tuple) and len(out) > 1 else None
            store[(l, "pattern")] = None if weights is None else weights[0][:, rows].detach()
        return hook

    hooks: list = []
    for l, view in enumerate(layers):
        hooks += [(view.attn, "forward", save_pattern(l))] if attention == "eager" else []
        v_module, v_cols = view.outputs["v"]
        hooks += [
            (v_module, "forward", save((l, "v"), v_cols)),
            (view.module, "forward_pre", save_input((l, "x"))),           # resid_pre
            (view.mlp, "forward_pre", save_input((l, "u"))),              # the MLP input
        ]
    recording = (record_attention(rows.tolist(), keys=n) if attention == "sdpa"
                 else nullcontext(None))
    with recording as rec:
        loss, grads = gradient_pass(hf, layers, ids, answer, hooks=hooks, store=store)
    if rec is not None:            # the exact pattern rows 𝒬 [H, Q, N], recomputed from q̃, k̃
        store.update({(l, "pattern"): rec.pattern[l] for l in range(len(layers))})
    L = len(layers)
    grad_z, grad_w = grads[:L], list(grads[L:])

    out: dict[str, list] = {k: [] for k in (
        "grad_norm", "inner", "step_norm", "step_prev", "full_inner", "telescope_err", "m7_head",
        "mass")}
    factors: list[dict[str, Tensor]] = []
    for l, view in enumerate(layers):
        pattern = store.get((l, "pattern"))
        if pattern is None:
            raise AlignmentError("the attention returned no pattern; load the model with "
                                 "attn_implementation='eager'.")
        w_o = view.w_o.detach().to(_F64)                            # [d, H·d_h]
        b_o = None if view.b_o is None else view.b_o.detach().to(_F64)
        H = pattern.shape[0]
        p = pattern.to(_F64)                                        # [H, Q, N]
        v = store[(l, "v")][0].detach().to(_F64)                   # [N, H_kv·d_h]
        d_h = w_o.shape[1] // H
        v = v.reshape(n, -1, d_h)
        v_h = v.repeat_interleave(H // v.shape[1], dim=1).transpose(0, 1)  # [H, N, d_h]
        z = store[(l, "z")][0, rows].detach().to(_F64).reshape(len(rows), H, d_h)  # [Q, H, d_h]
        gz = grad_z[l][0, rows].detach().to(_F64).reshape(len(rows), H, d_h)

        # M7: −Σ_{q,h} g·δz, δz = p (v_t − z)/(1 − p)
        p_t = p[:, :, traj]                                         # [H, Q, T]
        v_t = v_h[:, traj]                                          # [H, T, d_h]
        coef = p_t / (1.0 - p_t)
        gv = torch.einsum("qhe,hte->hqt", gz, v_t)
        gzz = torch.einsum("qhe,qhe->hq", gz, z)[..., None]
        out["m7_head"].append(-(coef * (gv - gzz)).sum(1))        # [H, T]
        out["mass"].append(p_t)

        # M6 at the rows `sel`: M5 restricted attention u^{(i)}, i = −1 .. T−1 (shared code)
        qrows = rows[sel_t]
        x_q = store[(l, "x")][0, qrows].detach().to(_F64)         # [Q', d]
        u_q = store[(l, "u")][0, qrows].detach().to(_F64)
        norm2, attn_out_norm = norm_functions(view, w_o.device)
        _, u_i = restricted_prefix(p[:, sel_t], v_h, traj, x_q, w_o, b_o, None, 0.0,
                                   norm=norm2, attn_out_norm=attn_out_norm)  # [Q', T+1, d]
        out["telescope_err"].append((u_i[:, -1] - u_q).norm(dim=-1)
                                    / u_q.norm(dim=-1).clamp_min(1e-300))
        u0 = u_i[:, 0]                                                      # [Q', d]
        du = u_i[:, 1:] - u_i[:, :-1]                                       # [Q', T, d]
        u0_sq = (u0 * u0).sum(-1)                                           # [Q']
        inner, sq, prev, gsq, full = [], [], [], [], []
        n_params = len(view.mlp_params)
        grad_in = view.mlp_split(*grad_w[:n_params])              # {name: [d_mlp, d]}
        del grad_w[:n_params]
        du_g = du.to(gram_dtype)                                            # (no copy in f64)
        for k, name in enumerate(view.mlp_in):
            W = view.mlp_in[name].detach().to(_F64)
            Gm = grad_in[name].detach().to(_F64)
            Au0 = (u0 @ Gm.T) @ W                                           # [Q', d] = Wᵀ G u0
            C = W.T @ W if grams is None else grams[l][k].to(W.device)
            del W
            inner.append(torch.einsum("qtd,qd->qt", du, Au0) / u0_sq[:, None])
            duC = du_g @ C.to(gram_dtype)                                   # [Q', T, d]
            sq.append((duC * du_g).sum(-1).to(_F64) / u0_sq[:, None])
            prev.append((duC[:, 1:] * du_g[:, :-1]).sum(-1).to(_F64)
                        / u0_sq[:, None])                                   # ⟨step_i, step_{i−1}⟩
            gsq.append((Gm * Gm).sum())
            full.append(((u_i[:, -1] - u0) * Au0).sum(-1) / u0_sq)
        for terms in (inner, sq, prev, gsq, full):
            _joint(terms)
        out["inner"].append(torch.stack(inner))
        out["step_norm"].append(torch.stack(sq).clamp_min(0).sqrt())
        out["step_prev"].append(torch.stack(prev))
        out["grad_norm"].append(torch.stack(gsq).sqrt())
        out["full_inner"].append(torch.stack(full))
        if keep_factors:
            dz_loo = coef.permute(1, 2, 0)[..., None] * (
                v_t.permute(1, 0, 2)[None] - z[:, None])                   # [Q, T, H, d_h]
            factors.append({"du": du, "u_base": u0, "dz": dz_loo, "grad_z": gz})

    inner = torch.stack(out["inner"], 1).cpu()                     # [W, L, Q, T]
    step_norm = torch.stack(out["step_norm"], 1).cpu()
    grad_norm = torch.stack(out["grad_norm"], 1).cpu()             # [W, L]
    gn = grad_norm[:, :, None, None]
    eta = -inner / (gn * gn)
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = (-inner / (gn * step_norm)).numpy()
    T = tb - ta
    eta_pooled = eta.sum(-1) / max(T, 1)
    step_cos = torch.full_like(step_norm, float("nan"))
    if T > 1:
        step_cos[..., 1:] = (torch.stack(out["step_prev"], 1).cpu()
                             / (step_norm[..., 1:] * step_norm[..., :-1]))
    return AnswerAlignment(
        loss=float(loss.detach()), trajectory=(ta, tb), answer=(a, b),
        grad_norm=grad_norm.numpy(), inner=inner.numpy(), step_norm=step_norm.numpy(),
        cos=cos, eta=eta.numpy(), eta_pooled=eta_pooled.numpy(),
        full_inner=torch.stack(out["full_inner"], 1).cpu().numpy(),
        telescope_err=torch.stack(out["telescope_err"]).cpu().numpy(),
        m7=torch.stack(out["m7_head"]).sum(1).cpu().numpy(),
        m7_head=torch.stack(out["m7_head"]).cpu().numpy(),
        mass=torch.stack(out["mass"]).cpu().numpy(),
        factors=factors, m6_rows=np.asarray(sel), step_cos=step_cos.numpy(),
    )


def _joint(terms: list[Tensor]) -> None:
    """Complete per-matrix terms to the `MLP_WEIGHTS` slots (gate, up, joint), in place: a gated
    MLP's two terms gain their sum; a plain MLP's one term (W_in, in the gate slot) gains a NaN up
    slot (there is no up projection) and itself as the joint one."""
    if len(terms) == 2:
        terms.append(terms[0] + terms[1])
    else:
        terms[1:] = [torch.full_like(terms[0], float("nan")), terms[0]]


def trace_alignment(model: LoadedModel | torch.nn.Module, tt: TokenizedTrace | Any, *,
                    keep_factors: bool = False) -> AnswerAlignment:
    """`answer_alignment` on a tokenized trace (its trajectory and answer spans).

    Args:
        model: A LoadedModel or a Llama-style HF causal LM with eager attention.
        tt: The tokenized trace (prompt + trajectory + scaffold + answer), or any object with
            its `ids` and `spans`.
        keep_factors: See `answer_alignment`.

    Returns:
        M6 and M7 for the trace.
    """
    return answer_alignment(model, tt.ids, tt.spans["trajectory"], tt.spans["answer"],
                            keep_factors=keep_factors)
