"""Causal edits of single tokens' implicit updates, run to the answer loss (docs/methods.md#effects).

For sampled (layer ℓ, trajectory token t) pairs of one trace, two real interventions, each in a
forward pass of its own (batched: one batch element per pair), and the answer loss L after it:

* **attention knockout** (M4 made real): key t is removed from the softmax of every head of layer ℓ
  for the answer rows 𝒬 only; every other layer, row and key is untouched. Because the rows above ℓ
  are unchanged, the z of layer ℓ at 𝒬 becomes exactly `z − δz_t` with the leave-one-out
  `δz = p (v_t − z)/(1 − p)` of the clean pass, so the edit is applied as that change of the
  `o_proj` input at 𝒬 (`tests/probes/measures/test_effects.py` checks it equals a bridge forward
  with `hooks.edit.mask_keys` on `L{ℓ}.attn.scores`). Its first-order prediction is M7
  (`upd_m7[ℓ, t]`; > 0 = removing the token raises L).
* **MLP-step removal** (M5/M6 made real): token t's rank-1 Dherin step at the first answer row,
  `step_t = W (u^{(t)} − u^{(t−1)}) u^{(−1)ᵀ}/‖u^{(−1)}‖²` for W ∈ {W_gate, W_up} of layer ℓ, is
  SUBTRACTED from the weights (a real weight edit: every position of the sequence sees
  `W − step_t`). It is applied as `−(W δu)(b·u_live)` on the gate/up outputs, which is the forward
  with the edited weights exactly (tested against one). Its first-order prediction is
  `−⟨G, step_t⟩ = −upd_dl_pred[ℓ, t]` (M6 defines ΔL^pred for ADDING the step).

Both predictions come from the same `probes.measures.updates.alignment.answer_alignment` call that
`updates` runs (one forward + backward), so they equal the stored `upd_m7` / `upd_dl_pred`
(`answer_rows="first"`). `scale` multiplies both edits (ε·δz, ε·step): as ε → 0 the real ΔL/ε tends
to the prediction, the first-order check of V7.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from jaxtyping import Float64, Int, Integer
from torch import Tensor

from hooks.edit import module_hooks
from hooks.model import LoadedModel
from hooks.weights import llama_layers
from probes.errors import ProbesError
from probes.measures.updates.alignment import AnswerAlignment, answer_alignment

__all__ = ["CATEGORIES", "CausalEffects", "EffectsError", "causal_effects", "edited_deltas",
           "pairs_by_category", "sample_pairs"]

CATEGORIES = ("reflection", "delimiter", "ordinary")
"""The trajectory-token categories pairs are sampled from (codes of `analyses.token_sets`)."""

EDITS = ("attn", "mlp")
"""The two interventions: attention knockout at 𝒬, MLP-step removal from the weights."""


class EffectsError(ProbesError, ValueError):
    """Bad pairs, spans or settings for a causal edit."""


def sample_pairs(category: Integer[np.ndarray, " t"], n_layers: int, per_category: int,
                 rng: np.random.Generator, codes: dict[str, int]) -> Int[np.ndarray, "n 2"]:
    """Sample (layer, trajectory index) pairs, stratified by token category.

    For each category in `CATEGORIES`, up to `per_category` distinct pairs (token uniform among the
    trajectory tokens of that category, layer uniform), without replacement over (layer, token).

    Args:
        category: uint8 category code of each trajectory token [T].
        n_layers: Number of layers.
        per_category: Pairs per category (fewer when the category has fewer (layer, token) pairs).
        rng: The generator (seeded by the caller).
        codes: Category name → code (`analyses.token_sets.CATEGORY_CODES`).

    Returns:
        int32 [n, 2] rows (layer, token), sorted by layer then token.
    """
    rows = []
    for name in CATEGORIES:
        tokens = np.flatnonzero(np.asarray(category) == codes[name])
        n_all = tokens.size * n_layers
        if n_all == 0:
            continue
        flat = rng.choice(n_all, size=min(per_category, n_all), replace=False)
        rows.append(np.stack([flat % n_layers, tokens[flat // n_layers]], axis=1))
    if not rows:
        return np.zeros((0, 2), dtype=np.int32)
    out = np.concatenate(rows).astype(np.int32)
    return out[np.lexsort((out[:, 1], out[:, 0]))]


@dataclass
class CausalEffects:
    """Real and predicted effects of removing single tokens' updates (one trace; float64 [n]).

    Attributes:
        pairs: (layer, trajectory index) per row [n, 2].
        loss: The clean answer loss L (nats per answer token).
        dl_attn: Real ΔL = L(key t masked at 𝒬 in layer ℓ) − L.
        dl_mlp: Real ΔL = L(W_gate, W_up of layer ℓ minus token t's step) − L.
        pred_m7: M7's first-order prediction of `dl_attn` (`upd_m7[ℓ, t]`).
        pred_m6: M6's first-order prediction of `dl_mlp` (`−upd_dl_pred[ℓ, t]`).
        scale: The edit scale ε used (real and predicted values are both for ε·edit).
    """

    pairs: Int[np.ndarray, "n 2"]
    loss: float
    dl_attn: Float64[np.ndarray, " n"]
    dl_mlp: Float64[np.ndarray, " n"]
    pred_m7: Float64[np.ndarray, " n"]
    pred_m6: Float64[np.ndarray, " n"]
    scale: float = 1.0


def _layers(hf: torch.nn.Module):
    return llama_layers(hf, what="effects", error=EffectsError)


@contextmanager
def _batched_edits(hf: torch.nn.Module, rows: Tensor, attn: dict[int, Tensor],
                   mlp: dict[int, tuple[Tensor, Tensor, Tensor]]):
    """Per-batch-element edits: `attn[ℓ]` [B, Q, H·d_h] added to layer ℓ's o_proj input at `rows`;
    `mlp[ℓ] = (a_gate [B, d_ff], a_up [B, d_ff], b [B, d])` subtracts `a (b·u)` from the gate / up
    outputs of layer ℓ at every position (= the forward with `W − a bᵀ` per element)."""
    layers = _layers(hf)

    def pre(delta: Tensor):
        def hook(mod, args):
            z = args[0].clone()
            z[:, rows] = z[:, rows] + delta.to(z.dtype)
            return (z, *args[1:])
        return hook

    def post(a: Tensor, b: Tensor):
        def hook(mod, args, out):
            coef = torch.einsum("bnd,bd->bn", args[0], b.to(args[0].dtype))
            return out - coef[..., None] * a.to(out.dtype)[:, None, :]
        return hook

    hooks = [(layers[l].o_proj, "forward_pre", pre(d)) for l, d in attn.items()]
    for l, (a_gate, a_up, b) in mlp.items():
        hooks += [(layers[l].gate_proj, "forward", post(a_gate, b)),
                  (layers[l].up_proj, "forward", post(a_up, b))]
    with module_hooks(hooks):
        yield


def _batch_nll(hf: torch.nn.Module, ids: Tensor, answer: tuple[int, int]) -> Tensor:
    """Answer NLL (mean over the answer tokens) of every batch element [B] (float64)."""
    a, b = answer
    logits = hf(ids, logits_to_keep=int(ids.shape[1]) - (a - 1)).logits[:, : b - a]
    # float64 log-softmax: a confident model's L is ~1e-4 and float32 would round ΔL at ~1e-6
    logp = torch.log_softmax(logits.to(torch.float64), dim=-1)
    return -logp.gather(-1, ids[:, a:b, None])[..., 0].mean(-1)


@torch.no_grad()
def edited_deltas(model: LoadedModel | torch.nn.Module, ids: Tensor | np.ndarray,
                  answer: tuple[int, int], al: AnswerAlignment, pairs: Int[np.ndarray, "n 2"],
                  edit: str, *, scale: float = 1.0, batch_size: int = 8) -> Float64[np.ndarray, " n"]:
    """The real change of the answer loss after each single-pair edit.

    One batch element per pair plus one unedited element per batch, whose loss is the baseline
    of that batch (so batched-kernel rounding cancels in the difference).

    Args:
        model: A LoadedModel or its Llama-style HF model (eager attention).
        ids: Token ids [N] or [1, N].
        answer: Half-open answer span.
        al: `answer_alignment(..., keep_factors=True)` of the same ids (its δz and M5 factors; M6
            factors at the first answer row, `m6_rows` must start with 0).
        pairs: (layer, trajectory index) rows.
        edit: "attn" (key knockout at 𝒬 in one layer) or "mlp" (step removal from gate/up).
        scale: ε: the edit applied is ε·(the removal).
        batch_size: Edited forwards per batch (each batch has one more, unedited, element).

    Returns:
        ΔL = L(edited) − L(clean) per pair [n] (float64; nats per answer token).
    """
    if edit not in EDITS:
        raise EffectsError(f"edit must be one of {EDITS}, got {edit!r}")
    if batch_size < 1:
        raise EffectsError(f"batch_size must be at least 1, got {batch_size}")
    hf = model.hf_model if isinstance(model, LoadedModel) else model
    layers = _layers(hf)
    device = next(hf.parameters()).device
    ids = torch.as_tensor(np.asarray(ids), dtype=torch.long).reshape(1, -1).to(device)
    rows = torch.arange(answer[0] - 1, answer[1] - 1, device=device)
    pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    out = np.empty(len(pairs))
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        B = len(chunk) + 1                                              # last element: clean
        attn: dict[int, Tensor] = {}
        mlp: dict[int, tuple[Tensor, Tensor, Tensor]] = {}
        for l in sorted({int(x) for x in chunk[:, 0]}):
            sel = [i for i in range(len(chunk)) if chunk[i, 0] == l]
            f = al.factors[l]
            if edit == "attn":
                dz = f["dz"]                                            # [Q, T, H, d_h]
                delta = torch.zeros((B, dz.shape[0], dz.shape[2] * dz.shape[3]), dtype=dz.dtype,
                                    device=dz.device)
                for i in sel:
                    delta[i] = -scale * dz[:, int(chunk[i, 1])].reshape(dz.shape[0], -1)
                attn[l] = delta.to(device)
            else:
                du, u0 = f["du"][0], f["u_base"][0]                     # [T, d], [d]
                w_g = layers[l].gate_proj.weight.detach().to(du.dtype)
                w_u = layers[l].up_proj.weight.detach().to(du.dtype)
                a_g = torch.zeros((B, w_g.shape[0]), dtype=du.dtype, device=du.device)
                a_u = torch.zeros_like(a_g)
                b = torch.zeros((B, du.shape[1]), dtype=du.dtype, device=du.device)
                for i in sel:
                    d = du[int(chunk[i, 1])]
                    a_g[i], a_u[i], b[i] = scale * (w_g @ d), scale * (w_u @ d), u0 / u0.dot(u0)
                mlp[l] = (a_g.to(device), a_u.to(device), b.to(device))
        with _batched_edits(hf, rows, attn, mlp):
            nll = _batch_nll(hf, ids.expand(B, -1), answer).double().cpu().numpy()
        out[start:start + B - 1] = nll[:-1] - nll[-1]
    return out


def causal_effects(model: LoadedModel | torch.nn.Module, ids: Tensor | np.ndarray,
                   trajectory: tuple[int, int], answer: tuple[int, int],
                   pairs: Int[np.ndarray, "n 2"], *, scale: float = 1.0, batch_size: int = 8,
                   al: AnswerAlignment | None = None) -> CausalEffects:
    """Real ΔL of both edits for every pair, with M7's and M6's first-order predictions.

    Example:
        >>> eff = causal_effects(loaded, tt.ids, tt.spans["trajectory"], tt.spans["answer"],
        ...                      np.array([[0, 3], [2, 7]]))
        >>> eff.dl_attn, eff.pred_m7

    Args:
        model: A LoadedModel or a Llama-style HF model with eager attention.
        ids: Token ids [N] or [1, N].
        trajectory: Half-open trajectory span; pair tokens index into it.
        answer: Half-open answer span.
        pairs: (layer, trajectory index) rows [n, 2].
        scale: ε of both edits (1 = remove the whole update).
        batch_size: Edited forwards per batch.
        al: A precomputed `answer_alignment(..., keep_factors=True, m6_rows=[0])` of these ids.

    Returns:
        The effects, in the order of `pairs`.

    Raises:
        EffectsError: A pair outside the layers or the trajectory.
    """
    pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    hf = model.hf_model if isinstance(model, LoadedModel) else model
    n_layers, T = len(_layers(hf)), trajectory[1] - trajectory[0]
    bad = [tuple(p) for p in pairs if not (0 <= p[0] < n_layers and 0 <= p[1] < T)]
    if bad:
        raise EffectsError(f"pair (layer, token) {bad[0]} outside {n_layers} layers x {T} "
                           f"trajectory tokens")
    if al is None:
        al = answer_alignment(model, ids, trajectory, answer, keep_factors=True, m6_rows=[0])
    if al.m6_rows is None or int(al.m6_rows[0]) != 0 or not al.factors:
        raise EffectsError("al must come from answer_alignment(keep_factors=True) with m6_rows "
                           "starting at 0 (the first answer row)")
    l_idx, t_idx = pairs[:, 0], pairs[:, 1]
    kw = {"scale": scale, "batch_size": batch_size}
    return CausalEffects(
        pairs=pairs.astype(np.int32), loss=al.loss,
        dl_attn=edited_deltas(model, ids, answer, al, pairs, "attn", **kw),
        dl_mlp=edited_deltas(model, ids, answer, al, pairs, "mlp", **kw),
        pred_m7=scale * al.m7[l_idx, t_idx],
        pred_m6=-scale * al.inner[2][l_idx, 0, t_idx],
        scale=scale,
    )


def pairs_by_category(pairs: Int[np.ndarray, "n 2"], category: np.ndarray,
                      codes: dict[str, int]) -> dict[str, np.ndarray]:
    """Boolean row masks of `pairs` per category of their token (`CATEGORIES`)."""
    pairs = np.asarray(pairs).reshape(-1, 2)
    cat = np.asarray(category)[pairs[:, 1]] if len(pairs) else np.zeros(0, np.uint8)
    return {name: cat == codes[name] for name in CATEGORIES}
