"""The endpoint patches of the Dherin update (M5; docs/methods.md#m5) and their check (V5b).

`endpoint_patches` turn the full-trajectory step of every layer into exact rank-1 weight patches
from one captured pass; `masked_patched_logits` masks the trajectory for the analysed rows at every
layer, adds the patches and returns the logits, which equal the clean run's (the V5b identity).
Every family of `hooks.weights.layer_views`: a plain MLP (GPT-2) has one input patch (W_in, in the
`gate` slot of `left`); where a norm follows the MLP (Gemma, OLMo-2) the skip term is the bias δ
added after that norm at `hook_mlp_out` (`down_left`·(`down_right`·φ) = δ at the patched rows),
which is not a rank-1 patch of W_down.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Float32, Float64, Int
from torch import Tensor

from hooks.edit import edit, mask_keys
from hooks.model import LoadedModel
from probes.measures.updates.mlp import (
    F64,
    LayerWeights,
    MlpUpdateError,
    RowCapture,
    capture_rows,
    check_positions,
    layer_weights,
    restricted_inputs,
)


@dataclass
class EndpointPatch:
    """Rank-1 factors of the full-trajectory patches of one layer, per row (float64).

    ΔW_gate = gate_left[r] right[r]ᵀ, ΔW_up = up_left[r] right[r]ᵀ, ΔW_down = down_left[r]
    down_right[r]ᵀ. Applied to a live input: ΔW u = left (right·u).

    Attributes:
        left: W (u − u') [R, d_mlp] per MLP input matrix ("gate", "up" or, plain MLP, "in").
        right: u'/‖u'‖² [R, d].
        down_left: δ = m − m' [R, d].
        down_right: φ/‖φ‖² [R, d_mlp].
        u_base: u' = u^{(−1)} [R, d].
    """

    left: dict[str, Float64[Tensor, "r d_mlp"]]
    right: Float64[Tensor, "r d"]
    down_left: Float64[Tensor, "r d"]
    down_right: Float64[Tensor, "r d_mlp"]
    u_base: Float64[Tensor, "r d"]

    @property
    def gate_left(self) -> Float64[Tensor, "r d_mlp"]:
        """W_gate (u − u') [R, d_mlp] (refused for a plain MLP: use `left["in"]`)."""
        return self._left("gate")

    @property
    def up_left(self) -> Float64[Tensor, "r d_mlp"]:
        """W_up (u − u') [R, d_mlp] (refused for a plain MLP)."""
        return self._left("up")

    def _left(self, which: str) -> Tensor:
        if which not in self.left:
            raise MlpUpdateError(
                f"this patch has no {which!r} factor: the model's MLP input matrices are "
                f"{list(self.left)} (a plain MLP act(W_in u) has neither gate nor up).")
        return self.left[which]


def endpoint_patches(cap: RowCapture, weights: Sequence[LayerWeights],
                     trajectory: Sequence[int]) -> list[EndpointPatch]:
    """The cache-derived Dherin endpoint patches (base K_{−1}) of every layer and row.

    Args:
        cap: Output of `capture_rows`.
        weights: Output of `layer_weights`.
        trajectory: Trajectory key positions.

    Returns:
        One `EndpointPatch` per layer.
    """
    out = []
    for layer, w in enumerate(weights):
        m, u = restricted_inputs(cap, w, layer, trajectory)
        du = u[:, -1] - u[:, 0]
        phi = cap.mlp_post[layer].to(u.device, F64)
        out.append(EndpointPatch(
            left={n: du @ w.matrix(n).T for n in w.names},
            right=u[:, 0] / u[:, 0].pow(2).sum(-1, keepdim=True),
            down_left=m[:, -1] - m[:, 0], down_right=phi / phi.pow(2).sum(-1, keepdim=True),
            u_base=u[:, 0]))
    return out


@torch.no_grad()
def masked_patched_logits(loaded: LoadedModel, ids: Int[Tensor, "1 n"] | Int[Tensor, " n"],
                          trajectory: Sequence[int], rows: Sequence[int], *, patch: bool = True,
                          ) -> tuple[Float32[Tensor, "r vocab"], Float32[Tensor, "r vocab"]]:
    """V5b: mask 𝒯 for `rows` at every layer and add the cache-derived endpoint patches.

    Rows must cover every row whose residual feeds the analysed query (normally every row from
    the end of the trajectory to q); the patches are computed from the CLEAN cache, then one
    hooked forward runs with scores[rows, 𝒯] = −inf at all layers, `ΔW u_live` added at
    `mlp.hook_pre` / `mlp.hook_pre_linear` and `ΔW_down φ_live` at `hook_mlp_out` for those rows
    (position ids unchanged).

    Args:
        loaded: A booted model of a `hooks.weights.FAMILIES` family, batch 1.
        ids: Token ids [1, N] (or [N]).
        trajectory: Trajectory key positions (all < min(rows)).
        rows: Rows to mask and patch.
        patch: False runs the masked forward without patches (a control).

    Returns:
        `(logits_masked_patched, logits_clean)` at `rows`, each [R, vocab] float32.
    """
    ids, rows, traj = check_positions(loaded, ids, rows, trajectory)
    weights = layer_weights(loaded, any_layout=True)
    cap = capture_rows(loaded, ids, rows)
    patches = endpoint_patches(cap, weights, traj)
    dev = loaded.device
    r_idx = torch.as_tensor(rows, device=dev)
    mask = mask_keys(rows, traj, dev)
    live: dict[int, Tensor] = {}

    def keep_u(layer: int):
        def hook(act: Tensor, hook: object) -> None:
            live[layer] = act[0, r_idx].to(F64).cpu()
        return hook

    def add_rank1(layer: int, which: str):
        pt = patches[layer]

        def hook(act: Tensor, hook: object) -> Tensor:
            if which == "down":
                add = pt.down_left * (pt.down_right * live[-layer - 1]).sum(-1, keepdim=True)
            else:
                add = pt.left[which] * (pt.right * live[layer]).sum(-1, keepdim=True)
            act = act.clone()
            act[0, r_idx] += add.to(act.dtype).to(act.device)
            return act
        return hook

    def keep_phi(layer: int):
        def hook(act: Tensor, hook: object) -> None:
            live[-layer - 1] = act[0, r_idx].to(F64).cpu()
        return hook

    # Where the MLP input is read (no norm before the MLP: resid_mid) and which hook holds W u.
    u_site = "resid_mid" if weights[0].identity else "ln2.out"
    pre_site = {"gate": "mlp.pre", "up": "mlp.pre_linear", "in": "mlp.pre"}
    fwd = []
    for l in range(loaded.arch.n_layers):
        fwd.append((f"L{l}.attn.scores", mask))
        if patch:
            fwd += [(f"L{l}.{u_site}", keep_u(l)),
                    *((f"L{l}.{pre_site[n]}", add_rank1(l, n)) for n in weights[l].names),
                    (f"L{l}.mlp.post", keep_phi(l)),
                    (f"L{l}.mlp_out", add_rank1(l, "down"))]
    with edit(loaded, fwd):
        logits = loaded.bridge(ids.to(dev))
    return logits[0, rows].detach().to("cpu", torch.float32), cap.logits
