"""Dherin rank-1 MLP patches and the token-by-token implicit-update trajectory (docs/methods.md#m5).

For one answer query row q, per layer ℓ, with a gated (SwiGLU) MLP behind RMSNorm_2 (Qwen2 /
Llama / Qwen3; HF convention, column vectors, UNFOLDED γ2 — the bridge runs in raw mode):

Other layouts, through `hooks.weights.layer_views` (`layer_weights(..., any_layout=True)`, which
`mlp_updates*`, `capture_rows` and `probes.measures.updates.mlp_patch` use): Phi-3 (the gate/up halves of
the fused `gate_up_proj`), Gemma-2/3 (m^{(i)} = x + N_post(W_O z^{(i)} + b_O), u = N_pre-ff(m), both
(1 + γ) RMSNorms; GeGLU), OLMo-2 (m^{(i)} = x + N_post(W_O z^{(i)}), u = m: no norm before the MLP),
GPT-2 (u = LayerNorm_2(m); the one input matrix W_in = `c_fc.weightᵀ` takes the place of W_gate:
the same patch makes (W_in + ΔW) u' + b_in = W_in u_q + b_in, so φ is unchanged; its quantities
are the `*_in` fields, the gate/up ones are None). Where a norm follows the MLP (Gemma, OLMo-2) the
skip term δ is a bias added after that norm (`hook_mlp_out`), not a rank-1 patch of W_down.

* Trajectory = a set of key positions 𝒯 = (τ_0 < … < τ_{T−1}) < q. The key set of step i is
  K_i = (keys ≤ q not in 𝒯) ∪ {τ_0..τ_i}; K_{−1} has no trajectory ("the context" of Dherin's
  contextual block is the trajectory; the rest of the sequence is the query side).
* Restricted attention from the CLEAN pass ("local / frozen-upstream", §7.3 M5): with the already
  normalised pattern row p and values v of every head,
  z^{(i)}_h = (Σ_{j∈K_{−1}} p_j v_j + cumsum_{s≤i} p_{τ_s} v_{τ_s}) / (Σ_{K_{−1}} p + cumsum p_τ),
  m^{(i)} = x_q + Σ_h W_O^h z^{(i)}_h + b_O, u^{(i)} = RMSNorm_2(m^{(i)}) (own r(·) per i, so the
  RMSNorm nonlinearity is exact). u^{(T−1)} = u_q (V9). `restricted_prefix` is the one
  implementation (also used by `probes.alignment` for M6).
* Endpoint patch (§2.2 / M5): for W ∈ {W_gate, W_up} (HF `mlp.gate_proj/up_proj.weight`,
  [d_mlp, d_model]) ΔW = W (u_q − u') u'ᵀ/‖u'‖², u' = u^{(−1)}, so (W+ΔW) u' = W u_q and the MLP
  hidden φ is unchanged; the residual/skip term is the second rank-1 patch
  ΔW_down = δ φ_qᵀ/‖φ_q‖² with δ = m_q − m' (bias form: Δb = δ).
* Token steps (§2.3a, fixed base u^{(−1)}): step_i = W (u^{(i)} − u^{(i−1)}) u^{(−1)ᵀ}/‖u^{(−1)}‖²,
  σ_i = ‖step_i‖_F = ‖W δu_i‖/‖u^{(−1)}‖ (rank-1 product of norms; ‖W δu‖² = δuᵀ (WᵀW) δu from
  the d×d Gram), implicit learning rate h = 1/‖u^{(−1)}‖², implicit-loss gradient
  Δ_i = −step_i/h (norm σ_i ‖u^{(−1)}‖), consecutive cosine
  cos(step_i, step_{i−1}) = ⟨W δu_i, W δu_{i−1}⟩/(‖W δu_i‖‖W δu_{i−1}‖) (the common right factor
  cancels; ⟨a bᵀ, c dᵀ⟩ = (a·c)(b·d)). Nothing of size d_mlp × d_model is built per token.

Cost: ONE hooked bridge forward (no per-prefix re-runs: the intermediate prefixes are the doc's
frozen-upstream decomposition, not truncated-prefix runs — that is M8), then per layer
O(R·H·T·d_h) cumsums, O(R·T·H·d_h·d) for the W_O projection, O(R·T·d²) Gram products, plus one
d×d Gram per weight and layer (O(d_mlp·d²)). Memory per layer O(R·T·d). The endpoints are globally
exact: masking 𝒯 for every row of the answer block at all layers and adding these cache-derived
patches reproduces the clean logits (`masked_patched_logits`, V5b).

Several rows: `mlp_updates_rows` / `mlp_updates_rows_from` give one `MlpUpdates` per captured row
(one `restricted_prefix` per layer for all rows; `keep_du=False` drops the [L, T, d] factors).

Norm convention: unfolded γ2 (HF weights). Under TL `fold_ln`, h ≈ 1/d instead; report which.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from jaxtyping import Float, Float64, Int
from torch import Tensor

from hooks import capture
from hooks.model import LoadedModel
from hooks.weights import layer_views
from probes.errors import ProbesError

__all__ = [
    "LayerWeights",
    "MlpUpdateError",
    "MlpUpdates",
    "RowCapture",
    "capture_rows",
    "check_positions",
    "layer_weights",
    "mlp_updates",
    "mlp_updates_from",
    "mlp_updates_rows",
    "mlp_updates_rows_from",
    "restricted_inputs",
    "restricted_prefix",
    "rms_norm",
    "row_capture",
]

F64 = torch.float64


class MlpUpdateError(ProbesError, ValueError):
    """Unsupported model, or bad query / trajectory positions."""


@dataclass
class NormWeights:
    """A norm's parameters in float64, callable on float64 inputs (see `hooks.weights.Norm`).

    Attributes:
        kind: "rms", "rms_1p" (Gemma: (1 + γ) ⊙ x/rms(x)) or "layer" (LayerNorm).
        weight: γ [d].
        bias: β [d] (LayerNorm) or None.
        eps: ε.
    """

    kind: str
    weight: Float64[Tensor, " d"]
    bias: Float64[Tensor, " d"] | None
    eps: float

    def __call__(self, m: Float[Tensor, "*batch d"]) -> Float[Tensor, "*batch d"]:
        if self.kind == "rms":
            return rms_norm(m, self.weight, self.eps)
        if self.kind == "rms_1p":
            return rms_norm(m, 1.0 + self.weight, self.eps)
        mc = m - m.mean(-1, keepdim=True)
        out = self.weight * mc * torch.rsqrt(mc.pow(2).mean(-1, keepdim=True) + self.eps)
        return out if self.bias is None else out + self.bias


@dataclass
class LayerWeights:
    """One layer's weights needed by M5 (float64, CPU; HF column convention).

    Attributes:
        w_o: `o_proj.weight` [d, H·d_h].
        b_o: `o_proj.bias` [d] or None.
        gamma: `post_attention_layernorm.weight` [d] (γ2).
        eps: RMSNorm ε of that norm.
        w_gate: `mlp.gate_proj.weight` [d_mlp, d] (None from `layer_weights(..., with_mlp=False)`).
        w_up: `mlp.up_proj.weight` [d_mlp, d] (idem).
        w_down: `mlp.down_proj.weight` [d, d_mlp] (idem).
        grams: Precomputed (W_gateᵀW_gate, W_upᵀW_up) [d, d] each, or None (computed on demand).
            For a plain MLP (GPT-2) `w_gate` holds W_in, `w_up` is None and `grams` = (W_inᵀW_in,).
        names: The MLP input matrices, ("gate", "up") or ("in",) (W_in stored in `w_gate`).
        mlp_norm: The norm before the MLP (float64), or None for the Llama RMSNorm(γ2, ε) of
            `gamma` / `eps`; `identity` for OLMo-2 (no norm: u = m).
        attn_out_norm: The norm applied to the attention output before the residual add (Gemma,
            OLMo-2), or None.
        down_bias_only: A norm follows the MLP: the skip term δ is a bias after it, not ΔW_down.
        act: The HF name of the MLP activation.
    """

    w_o: Float64[Tensor, "d hd"]
    b_o: Float64[Tensor, " d"] | None
    gamma: Float64[Tensor, " d"]
    eps: float
    w_gate: Float64[Tensor, "d_mlp d"] | None
    w_up: Float64[Tensor, "d_mlp d"] | None
    w_down: Float64[Tensor, "d d_mlp"] | None
    grams: tuple[Float64[Tensor, "d d"], ...] | None = None
    names: tuple[str, ...] = ("gate", "up")
    mlp_norm: NormWeights | None = None
    identity: bool = False
    attn_out_norm: NormWeights | None = None
    down_bias_only: bool = False
    act: str = "silu"

    def matrix(self, which: str) -> Float64[Tensor, "d_mlp d"] | None:
        """The MLP input matrix `which` (one of `names`), or None without MLP copies."""
        self._check(which)
        return self.w_up if which == "up" else self.w_gate

    def _check(self, which: str) -> None:
        if which not in self.names:
            raise MlpUpdateError(
                f"this layer's MLP has no {which!r} matrix: its input matrices are "
                f"{list(self.names)} (a plain MLP act(W_in u) has no gate and no up projection).")

    def gram(self, which: str) -> Float64[Tensor, "d d"]:
        """WᵀW [d, d] for `which` in `names` (the stored one, else computed now)."""
        self._check(which)
        if self.grams is not None:
            return self.grams[self.names.index(which)]
        w = self.matrix(which)
        if w is None:
            raise MlpUpdateError("these LayerWeights hold neither the MLP weights nor their Grams.")
        return w.T @ w

    def norm2(self, m: Float[Tensor, "*batch d"]) -> Float[Tensor, "*batch d"]:
        """The MLP input u from the residual m (float64): the norm before the MLP."""
        if self.identity:
            return m
        if self.mlp_norm is not None:
            return self.mlp_norm(m)
        return rms_norm(m, self.gamma, self.eps)


def layer_weights(loaded: LoadedModel | torch.nn.Module, *, with_mlp: bool = True,
                  device: str | torch.device = "cpu", any_layout: bool = False
                  ) -> list[LayerWeights]:
    """Read every layer's o_proj, pre-MLP norm and MLP input/output weights (`hooks.weights`).

    Args:
        loaded: A booted model of a family `hooks.weights.layer_views` describes, or its HF model.
        with_mlp: True: float64 copies of W_gate, W_up, W_down (what the endpoint patches and
            the identity checks use). False: no MLP copies; the two d×d Grams WᵀW (all that
            `mlp_updates` needs) are computed on the model's device in float64 and stored in
            `grams` (per-run constants: compute them once and reuse them for every trace).
        device: Where the float64 copies live (default CPU; the model's device for computing
            M5 next to a `row_capture(..., device=None)`).
        any_layout: False (default): only the Llama computation (RMSNorm before the MLP, nothing
            after the sublayers, a gated MLP: Qwen2 / Llama / Qwen3 / Mistral / Phi-3), so that
            callers which apply `rms_norm(m, gamma, eps)` themselves stay exact. True: every
            family of `hooks.weights.FAMILIES`; use `LayerWeights.norm2` / `restricted_inputs`.

    Returns:
        One `LayerWeights` per layer (float64 copies).

    Raises:
        MlpUpdateError: For a model without a weight view (or, without `any_layout`, without the
            Llama computation), naming what is missing.
    """
    def f(t: Tensor | None) -> Tensor | None:
        return None if t is None else t.detach().to(device, F64)

    def nw(norm) -> NormWeights | None:
        return None if norm is None else NormWeights(norm.kind, f(norm.weight), f(norm.bias),
                                                     norm.eps)

    views = layer_views(loaded, what="mlp_update", error=MlpUpdateError)
    if not any_layout and views and not views[0].llama_like:
        raise MlpUpdateError(
            f"this caller of layer_weights needs the Llama computation (RMSNorm before the MLP, "
            f"no norm after the sublayers, a gated MLP); {views[0].family!r} differs. M5 "
            f"(probes.measures.updates.mlp / mlp_patch) handles it through layer_weights(any_layout=True).")
    out = []
    for view in views:
        names = tuple(view.mlp_in)
        norm = view.mlp_in_norm
        d = view.w_o.shape[0]
        common = {"w_o": f(view.w_o), "b_o": f(view.b_o),
                  "gamma": f(norm.weight) if norm is not None else torch.ones(d, dtype=F64,
                                                                              device=device),
                  "eps": norm.eps if norm is not None else 0.0,
                  "names": names, "mlp_norm": nw(norm) if norm is not None and norm.kind != "rms"
                  else None, "identity": norm is None, "attn_out_norm": nw(view.attn_out_norm),
                  "down_bias_only": view.mlp_out_norm is not None, "act": view.act}
        mats = [view.mlp_in[n] for n in names]
        if with_mlp:
            out.append(LayerWeights(**common, w_gate=f(mats[0]),
                                    w_up=f(mats[1]) if len(mats) > 1 else None,
                                    w_down=f(view.w_down)))
        else:
            grams = []
            for w in mats:
                w64 = w.detach().to(F64)
                grams.append((w64.T @ w64).to(device))
                del w64
            out.append(LayerWeights(**common, w_gate=None, w_up=None, w_down=None,
                                    grams=tuple(grams)))
    return out


def rms_norm(m: Float[Tensor, "*batch d"], gamma: Float[Tensor, " d"], eps: float
             ) -> Float[Tensor, "*batch d"]:
    """HF RMSNorm γ ⊙ m / sqrt(mean(m²) + ε) over the last axis (float64)."""
    return gamma * m * torch.rsqrt(m.pow(2).mean(-1, keepdim=True) + eps)


@dataclass
class RowCapture:
    """What one hooked forward yields for the analysed rows (float32, CPU).

    Attributes:
        rows: Query rows R (strictly increasing positions).
        v: Per layer, values of keys 0..max(R) [K, H_kv, d_h].
        pattern: Per layer, pattern rows [H, R, K] (keys 0..max(R)).
        resid_pre: Per layer, x at the rows [R, d].
        resid_mid: Per layer, m at the rows [R, d].
        ln2_out: Per layer, u = RMSNorm_2(m) at the rows [R, d].
        mlp_pre: Per layer, W_gate u [R, d_mlp].
        mlp_pre_linear: Per layer, W_up u [R, d_mlp] (None for a plain MLP).
        mlp_post: Per layer, φ = SiLU(W_gate u) ⊙ W_up u [R, d_mlp].
        logits: Final logits at the rows [R, vocab] (None from `row_capture` without logits).
    """

    rows: list[int]
    v: list[Float[Tensor, "k h_kv d_h"]]
    pattern: list[Float[Tensor, "h r k"]]
    resid_pre: list[Float[Tensor, "r d"]]
    resid_mid: list[Float[Tensor, "r d"]]
    ln2_out: list[Float[Tensor, "r d"]]
    mlp_pre: list[Float[Tensor, "r d_mlp"]]
    mlp_pre_linear: list[Float[Tensor, "r d_mlp"]] | None
    mlp_post: list[Float[Tensor, "r d_mlp"]]
    logits: Float[Tensor, "r vocab"] | None


def check_positions(loaded: LoadedModel, ids: Int[Tensor, "1 n"] | Int[Tensor, " n"],
                    rows: Sequence[int], trajectory: Sequence[int],
                    ) -> tuple[Int[Tensor, "1 n"], list[int], list[int]]:
    """Validate the model and the positions for M5; returns (ids [1, N], rows, trajectory).

    Raises:
        MlpUpdateError: For a model without a weight view (`hooks.weights.layer_views`), or bad
            positions.
    """
    layer_views(loaded, what="mlp_update", error=MlpUpdateError)
    ids = ids.reshape(1, -1) if ids.dim() == 1 else ids
    n = int(ids.shape[1])
    rows, traj = [int(r) for r in rows], [int(t) for t in trajectory]
    if not rows or rows != sorted(set(rows)) or not 0 <= rows[0] <= rows[-1] < n:
        raise MlpUpdateError(f"rows must be strictly increasing positions in [0, {n}); got {rows}")
    if not traj or traj != sorted(set(traj)) or traj[0] < 0 or traj[-1] >= rows[0]:
        raise MlpUpdateError(
            f"trajectory must be strictly increasing, non-empty positions before the first "
            f"query row {rows[0]}; got {traj}")
    return ids, rows, traj


@contextmanager
def row_capture(loaded: LoadedModel, rows: Sequence[int], *,
                device: str | torch.device | None = "cpu") -> Iterator[Callable[..., RowCapture]]:
    """Hook the bridge for what M5 needs at `rows`; the forward runs inside the block.

    For sharing one forward with other measurements (e.g. `probes.updates_run`): every bridge
    forward inside the block (also one started through `loaded.hf_model`, with or without grad) is
    recorded; after it, call the yielded function (optionally with the logits [1, N, vocab]).

        >>> with row_capture(loaded, [q]) as get:
        ...     loaded.bridge(ids)
        >>> cap = get()

    Args:
        loaded: A booted model of a `hooks.weights.FAMILIES` family, batch 1.
        rows: Strictly increasing query rows.
        device: Where the captured tensors go ("cpu"; None = the model's device, so that
            `mlp_updates_from` computes there, with `layer_weights(..., device=...)` there too).

    Yields:
        `get(logits=None) -> RowCapture`.
    """
    rows = [int(r) for r in rows]
    L, last = loaded.arch.n_layers, rows[-1]
    view = layer_views(loaded, what="mlp_update", error=MlpUpdateError)[0]
    kv_sites = [f"L{l}.attn.v" for l in range(L)]
    # No norm before the MLP (OLMo-2): its input is resid_mid; a plain MLP has no up projection.
    u_site = "ln2.out" if view.mlp_in_norm is not None else "resid_mid"
    comps = tuple(dict.fromkeys(("attn.pattern", "resid_pre", "resid_mid", u_site, "mlp.pre",
                                 *(("mlp.pre_linear",) if view.gated else ()), "mlp.post")))
    row_sites = [f"L{l}.{c}" for l in range(L) for c in comps]
    with (
        capture(loaded, kv_sites, positions=slice(0, last + 1), dtype="float32",
                device=device) as kv_store,
        capture(loaded, row_sites, positions=rows, dtype="float32", device=device) as row_store,
    ):
        def get(logits: Tensor | None = None) -> RowCapture:
            kv, rs = kv_store.result(), row_store.result()

            def per_layer(c: str) -> list[Tensor]:
                return [rs[f"L{l}.{c}"] for l in range(L)]

            return RowCapture(
                rows=rows, v=[kv[f"L{l}.attn.v"] for l in range(L)],
                pattern=[p[:, :, : last + 1] for p in per_layer("attn.pattern")],
                resid_pre=per_layer("resid_pre"), resid_mid=per_layer("resid_mid"),
                ln2_out=per_layer(u_site), mlp_pre=per_layer("mlp.pre"),
                mlp_pre_linear=per_layer("mlp.pre_linear") if view.gated else None,
                mlp_post=per_layer("mlp.post"),
                logits=None if logits is None else logits[0, rows].detach().to("cpu", torch.float32))

        yield get


@torch.no_grad()
def capture_rows(loaded: LoadedModel, ids: Int[Tensor, "1 n"] | Int[Tensor, " n"],
                 rows: Sequence[int]) -> RowCapture:
    """Run the bridge once with hooks and keep what M5 needs at the query rows.

    Args:
        loaded: A booted model of a `hooks.weights.FAMILIES` family, batch 1.
        ids: Token ids [1, N] (or [N]).
        rows: Strictly increasing query rows (e.g. [q], or every row of the answer block).

    Returns:
        The captured tensors.
    """
    ids = ids.reshape(1, -1) if ids.dim() == 1 else ids
    with row_capture(loaded, rows) as get:
        logits = loaded.bridge(ids.to(loaded.device))
    return get(logits)


def restricted_prefix(p: Float[Tensor, "h r k"], v_h: Float[Tensor, "h k d_h"],
                      trajectory: Int[Tensor, " t"], resid_pre: Float[Tensor, "r d"],
                      w_o: Float[Tensor, "d h*d_h"], b_o: Float[Tensor, " d"] | None,
                      gamma: Float[Tensor, " d"] | None, eps: float, *,
                      norm: Callable[[Tensor], Tensor] | None = None,
                      attn_out_norm: Callable[[Tensor], Tensor] | None = None,
                      ) -> tuple[Float[Tensor, "r t+1 d"], Float[Tensor, "r t+1 d"]]:
    """Frozen-upstream MLP inputs for the trajectory prefixes K_{−1}, K_0, …, K_{T−1} (§7.3 M5).

    The one implementation of the restricted attention, shared by `mlp_updates` /
    `endpoint_patches` (bridge captures) and `probes.measures.updates.alignment.answer_alignment` (HF
    hooks). With
    the already-normalised pattern rows p (no re-exponentiation), per head h:

        z^{(i)}_h = (Σ_{j∈K_{−1}} p_j v_j + cumsum_{s≤i} p_{τ_s} v_{τ_s}) / (Σ_{K_{−1}} p + cumsum p_τ)
        m^{(i)}   = x + Σ_h W_O^h z^{(i)}_h + b_O,      u^{(i)} = RMSNorm_2(m^{(i)})

    so index T (all of 𝒯) is the full context: m^{(T−1)} = resid_mid, u^{(T−1)} = the gate/up input.

    Args:
        p: Pattern rows [H, R, K] over keys 0..K−1 (any float dtype; float64 recommended).
        v_h: Values per query head [H, K, d_h] (KV heads expanded with g(h) = h // G).
        trajectory: Trajectory key positions [T] (long, < K, on p's device); may be empty.
        resid_pre: x = resid_pre at the rows [R, d].
        w_o: `o_proj.weight` [d, H·d_h].
        b_o: `o_proj.bias` [d] or None.
        gamma: γ2 of the post-attention RMSNorm [d] (None with `norm`).
        eps: Its ε.
        norm: The norm before the MLP, if not RMSNorm(γ2, ε) (`LayerWeights.norm2`).
        attn_out_norm: A norm on the attention output before the residual add (Gemma, OLMo-2):
            m = x + N(W_O z + b_O).

    Returns:
        `(m, u)`, each [R, T+1, d]: index 0 is the base i = −1 (no trajectory), index i+1 the
        prefix τ_0..τ_i.
    """
    H, R, K = p.shape
    T = int(trajectory.shape[0])
    base = torch.ones(K, dtype=torch.bool, device=p.device)
    base[trajectory] = False
    p_base = p[:, :, base]
    num0 = torch.einsum("hrk,hke->rhe", p_base, v_h[:, base])           # [R, H, d_h]
    den0 = p_base.sum(-1).T                                             # [R, H]
    p_t = p[:, :, trajectory].permute(1, 2, 0)                          # [R, T, H]
    # laid out [R, T+1, H, d_h] from the start: z is then a view, no permute copy
    num = torch.empty((R, T + 1, H, v_h.shape[-1]), dtype=num0.dtype, device=p.device)
    num[:, 0] = num0
    torch.mul(p_t[..., None], v_h[:, trajectory].transpose(0, 1)[None], out=num[:, 1:])
    num[:, 1:] = num[:, 1:].cumsum(1)
    num[:, 1:] += num0[:, None]
    den = torch.empty((R, T + 1, H), dtype=den0.dtype, device=p.device)     # [R, T+1, H]
    den[:, 0] = den0
    torch.cumsum(p_t, 1, out=den[:, 1:])
    den[:, 1:] += den0[:, None]
    z = num.div_(den[..., None]).reshape(R, T + 1, -1)                  # [R, T+1, H·d_h]
    if attn_out_norm is None:
        m = (z @ w_o.T).add_(resid_pre[:, None, :])                     # [R, T+1, d]
        if b_o is not None:
            m = m + b_o
    else:                                                               # m = x + N(W_O z + b_O)
        a = z @ w_o.T if b_o is None else z @ w_o.T + b_o
        m = resid_pre[:, None, :] + attn_out_norm(a)
    return m, (rms_norm(m, gamma, eps) if norm is None else norm(m))


def restricted_inputs(cap: RowCapture, w: LayerWeights, layer: int, trajectory: Sequence[int],
                      ) -> tuple[Float64[Tensor, "r t1 d"], Float64[Tensor, "r t1 d"]]:
    """`restricted_prefix` on a `capture_rows` capture (float64).

    Args:
        cap: Output of `capture_rows`.
        w: That layer's weights.
        layer: Layer index.
        trajectory: Trajectory key positions (strictly increasing, all < min(cap.rows)).

    Returns:
        `(m, u)`, each [R, T+1, d]: index 0 is the base i = −1 (no trajectory), index i+1 the
        prefix τ_0..τ_i; index T is the full context (equals the captured resid_mid / ln2.out).
    """
    dev = w.w_o.device      # the weights' device (a layer of a split model may be elsewhere)
    p = cap.pattern[layer].to(dev, F64)                             # [H, R, K]
    v = cap.v[layer].to(dev, F64)                                   # [K, H_kv, d_h]
    H = p.shape[0]
    v_h = v.repeat_interleave(H // v.shape[1], dim=1).transpose(0, 1)   # [H, K, d_h]
    traj = torch.as_tensor(list(trajectory), dtype=torch.long, device=dev)
    return restricted_prefix(p, v_h, traj, cap.resid_pre[layer].to(dev, F64), w.w_o, w.b_o,
                             w.gamma, w.eps, norm=w.norm2, attn_out_norm=w.attn_out_norm)


@dataclass
class MlpUpdates:
    """M5 at one query row: per layer L, per trajectory token T (float64 numpy arrays).

    Attributes:
        query: The query row q.
        trajectory: Trajectory positions [T].
        lr: Implicit learning rate h = 1/‖u^{(−1)}‖² [L] (unfolded γ2).
        u_base_norm: ‖u^{(−1)}‖ [L].
        sigma_gate / sigma_up: σ_i = ‖step_i‖_F [L, T].
        grad_norm_gate / grad_norm_up: ‖Δ_i‖_F = σ_i/h [L, T] (implicit-loss gradient).
        cos_gate / cos_up: cos(step_i, step_{i−1}) [L, T] (NaN at i = 0 or a zero step).
        cum_fro_gate / cum_fro_up: ‖ΔW_i‖_F = ‖Σ_{s≤i} step_s‖_F [L, T].
        total_fro_gate / total_fro_up: ‖ΔW_{T−1}‖_F (full-trajectory patch) [L].
        down_fro: ‖ΔW_down‖_F = ‖δ‖/‖φ_q‖ [L].
        delta_norm: ‖δ‖ = ‖m_q − m'‖ (bias-patch / steering-vector size) [L].
        du: u^{(i)} − u^{(i−1)} [L, T, d] (rank-1 left factor source: step_i = W du_i ⊗ right);
            None from `mlp_updates_rows_from(..., keep_du=False)`.
        u_base: u^{(−1)} [L, d].
        sigma_in, grad_norm_in, cos_in, cum_fro_in, total_fro_in: The same for the one input
            matrix W_in of a plain MLP (GPT-2); None for a gated MLP, whose gate/up fields are
            None for a plain one (`get` refuses them with one line).
    """

    query: int
    trajectory: Int[np.ndarray, " t"]
    lr: Float64[np.ndarray, " l"]
    u_base_norm: Float64[np.ndarray, " l"]
    sigma_gate: Float64[np.ndarray, "l t"] | None
    sigma_up: Float64[np.ndarray, "l t"] | None
    grad_norm_gate: Float64[np.ndarray, "l t"] | None
    grad_norm_up: Float64[np.ndarray, "l t"] | None
    cos_gate: Float64[np.ndarray, "l t"] | None
    cos_up: Float64[np.ndarray, "l t"] | None
    cum_fro_gate: Float64[np.ndarray, "l t"] | None
    cum_fro_up: Float64[np.ndarray, "l t"] | None
    total_fro_gate: Float64[np.ndarray, " l"] | None
    total_fro_up: Float64[np.ndarray, " l"] | None
    down_fro: Float64[np.ndarray, " l"]
    delta_norm: Float64[np.ndarray, " l"]
    du: Float64[np.ndarray, "l t d"] | None
    u_base: Float64[np.ndarray, "l d"]
    sigma_in: Float64[np.ndarray, "l t"] | None = None
    grad_norm_in: Float64[np.ndarray, "l t"] | None = None
    cos_in: Float64[np.ndarray, "l t"] | None = None
    cum_fro_in: Float64[np.ndarray, "l t"] | None = None
    total_fro_in: Float64[np.ndarray, " l"] | None = None

    def get(self, name: str) -> np.ndarray:
        """The array `name`, or one clear refusal where the model's MLP has no such matrix."""
        value = getattr(self, name)
        if value is None:
            have = "gate, up" if self.sigma_gate is not None else "in (plain MLP: act(W_in u))"
            raise MlpUpdateError(
                f"{name} does not apply to this model: its MLP input matrices are {have}.")
        return value


def _step_stats(du: Tensor, dcum: Tensor, gram: Tensor, base_norm: Tensor) -> dict[str, Tensor]:
    """σ, consecutive cosine and cumulative norm from the d×d Gram (no d_mlp × d per token)."""
    g_du = du @ gram                                                # [T, d]
    wnorm = (g_du * du).sum(-1).clamp_min(0).sqrt()                 # ‖W du_i‖
    inner = (g_du[1:] * du[:-1]).sum(-1)                            # ⟨W du_i, W du_{i−1}⟩
    cos = torch.full_like(wnorm, float("nan"))
    cos[1:] = inner / (wnorm[1:] * wnorm[:-1])
    cum = ((dcum @ gram) * dcum).sum(-1).clamp_min(0).sqrt() / base_norm
    return {"sigma": wnorm / base_norm, "cos": cos, "cum": cum}


def mlp_updates(loaded: LoadedModel, ids: Int[Tensor, "1 n"] | Int[Tensor, " n"], query: int,
                trajectory: Sequence[int]) -> MlpUpdates:
    """M5 per layer at one query row, from one hooked bridge forward.

    Example:
        >>> upd = mlp_updates(loaded, ids, query=q, trajectory=range(t0, t1))
        >>> upd.sigma_gate.shape                # [n_layers, t1 - t0]

    Args:
        loaded: A booted model of a `hooks.weights.FAMILIES` family, batch 1.
        ids: Token ids [1, N] (or [N]).
        query: Query row q.
        trajectory: Trajectory key positions, strictly increasing, all < q.

    Returns:
        The per-layer, per-token quantities (computed in float64 from fp32 captures).

    Raises:
        MlpUpdateError: For an unsupported model or bad positions.
    """
    ids, rows, traj = check_positions(loaded, ids, [query], trajectory)
    weights = layer_weights(loaded, with_mlp=False, any_layout=True)
    cap = capture_rows(loaded, ids, rows)
    return mlp_updates_from(cap, weights, traj)


def mlp_updates_rows(loaded: LoadedModel, ids: Int[Tensor, "1 n"] | Int[Tensor, " n"],
                     rows: Sequence[int], trajectory: Sequence[int]) -> list[MlpUpdates]:
    """M5 per layer at several query rows, from ONE hooked bridge forward.

    Example:
        >>> ups = mlp_updates_rows(loaded, ids, rows=[q0, q0 + 1], trajectory=range(t0, t1))
        >>> ups[1].sigma_gate.shape             # [n_layers, t1 - t0]

    Args:
        loaded: A booted model of a `hooks.weights.FAMILIES` family, batch 1.
        ids: Token ids [1, N] (or [N]).
        rows: Strictly increasing query rows.
        trajectory: Trajectory key positions, strictly increasing, all < rows[0].

    Returns:
        One `MlpUpdates` per row, equal (to float rounding) to `mlp_updates(loaded, ids, q,
        trajectory)` for each row q.

    Raises:
        MlpUpdateError: For an unsupported model or bad positions.
    """
    ids, rows, traj = check_positions(loaded, ids, rows, trajectory)
    weights = layer_weights(loaded, with_mlp=False, any_layout=True)
    cap = capture_rows(loaded, ids, rows)
    return mlp_updates_rows_from(cap, weights, traj)


_MLP_KEYS = tuple(f"{q}_{w}" for w in ("gate", "up", "in")
                  for q in ("sigma", "grad_norm", "cos", "cum_fro", "total_fro")) + (
    "down_fro", "delta_norm", "lr", "u_base_norm", "du", "u_base")


def _row_step_stats(m: Tensor, u: Tensor, w: LayerWeights, phi: Tensor,
                    out: dict[str, list[Tensor]], keep_du: bool = True) -> None:
    """Append one layer's M5 quantities at one row (m, u [T+1, d] from `restricted_inputs`)."""
    base = u[0]
    bn = base.norm()
    du = u[1:] - u[:-1]
    dcum = u[1:] - base
    for which in w.names:
        s = _step_stats(du, dcum, w.gram(which), bn)
        out[f"sigma_{which}"].append(s["sigma"])
        out[f"grad_norm_{which}"].append(s["sigma"] * bn**2)
        out[f"cos_{which}"].append(s["cos"])
        out[f"cum_fro_{which}"].append(s["cum"])
        out[f"total_fro_{which}"].append(s["cum"][-1])
    delta = m[-1] - m[0]
    out["delta_norm"].append(delta.norm())
    out["down_fro"].append(delta.norm() / phi.to(delta.device, F64).norm())
    out["lr"].append(1.0 / bn**2)
    out["u_base_norm"].append(bn)
    if keep_du:
        out["du"].append(du)
    out["u_base"].append(base)


def _mlp_result(out: dict[str, list[Tensor]], query: int, traj: list[int]) -> MlpUpdates:
    arrays = {k: torch.stack(v).cpu().numpy() if v else None for k, v in out.items()}
    return MlpUpdates(query=query, trajectory=np.asarray(traj), **arrays)


def mlp_updates_from(cap: RowCapture, weights: Sequence[LayerWeights],
                     trajectory: Sequence[int], *, keep_du: bool = True) -> MlpUpdates:
    """M5 at the first captured row from an existing capture (no forward).

    Args:
        cap: A `capture_rows` / `row_capture` capture; its first row is the query q (computed
            on its device).
        weights: `layer_weights(loaded)` (either form, on the capture's device; reuse one per
            run).
        trajectory: Trajectory key positions, strictly increasing, all < q (checked by the caller,
            e.g. with `check_positions`).
        keep_du: Keep the [L, T, d] step factors `du` (False: `du` is None; the `updates`
            command stores only the statistics).

    Returns:
        The per-layer, per-token quantities (float64).
    """
    traj = [int(t) for t in trajectory]
    out: dict[str, list[Tensor]] = {k: [] for k in _MLP_KEYS}
    for layer, w in enumerate(weights):
        m, u = restricted_inputs(cap, w, layer, traj)
        _row_step_stats(m[0], u[0], w, cap.mlp_post[layer][0], out, keep_du)  # [T+1, d]
    return _mlp_result(out, cap.rows[0], traj)


def mlp_updates_rows_from(cap: RowCapture, weights: Sequence[LayerWeights],
                          trajectory: Sequence[int], *, keep_du: bool = True
                          ) -> list[MlpUpdates]:
    """M5 at every captured row from an existing capture (no forward).

    The restricted-attention prefixes of all rows come from one `restricted_prefix` per layer;
    the per-row step statistics are those of `mlp_updates_from` (equal to it at the first row
    and to separate single-row captures to float rounding).

    Args:
        cap: A `capture_rows` / `row_capture` capture (computed on its device).
        weights: `layer_weights(loaded)` (either form, on the capture's device).
        trajectory: Trajectory key positions, strictly increasing, all < the first row.
        keep_du: False: leave `du` None in the results (it is [L, T, d] float64 per row, the
            largest part; the run does not store it).

    Returns:
        One `MlpUpdates` per captured row, in `cap.rows` order.
    """
    traj = [int(t) for t in trajectory]
    outs: list[dict[str, list[Tensor]]] = [{k: [] for k in _MLP_KEYS} for _ in cap.rows]
    for layer, w in enumerate(weights):
        m, u = restricted_inputs(cap, w, layer, traj)               # [R, T+1, d]
        for i, out in enumerate(outs):
            _row_step_stats(m[i], u[i], w, cap.mlp_post[layer][i], out, keep_du)
        del m, u
    return [_mlp_result(out, q, traj) for q, out in zip(cap.rows, outs)]

