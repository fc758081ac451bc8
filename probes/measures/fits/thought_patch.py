"""The static thought patch (M12), fitted with scikit-learn on exact per-query rank-1 patches.

(b) Static thought patch (§2.6, M12(a)). For one trace and each layer, the calibration queries
    are the K rows of the scaffold + answer block, rows spans["trajectory"][1] .. N−1 (every row
    after the trajectory, i.e. the rows masked in the V5b identity). From the clean pass,
    frozen-upstream (M5): u'_k = RMSNorm_2(m'_k) with the trajectory keys removed from every head's
    softmax at row k, u_k the full-context MLP input. X = u'_k [K, d], Y = W (u_k − u'_k)
    [K, d_ff] for W = W_gate or W_up; Δ (d_ff × d) = `Ridge(fit_intercept=False)` so that
    Δ u'_k ≈ W (u_k − u'_k): the ONE static weight patch replacing the per-query exact rank-1
    patches ΔW_k = W (u_k − u'_k) u'_kᵀ/‖u'_k‖². Held-out R² uses contiguous `KFold` over the K
    queries. `thought_patch_nll` measures the answer NLL when the trajectory is masked for those
    rows at every layer and the static gate/up patches (plus the exact per-row W_down term) act.

R² conventions and ridge penalties: `probes.measures.fits.fitting`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from jaxtyping import Float, Float64, Int
from sklearn.model_selection import KFold
from torch import Tensor

from hooks.edit import edit, mask_keys
from hooks.model import LoadedModel
from probes.jsonable import jsonable
from probes.measures.fits.fitting import (
    DEFAULT_PATCH_ALPHA,
    F64,
    FitError,
    _answer,
    _ids,
    _layers,
    _PooledR2,
    _r2_in,
    _ridge,
    _trace_id,
    _trajectory,
)
from probes.measures.updates.mlp import (
    LayerWeights,
    capture_rows,
    layer_weights,
    rms_norm,
)
from probes.traces.tokenize import TokenizedTrace


def endpoint_inputs(cap: Any, w: LayerWeights, layer: int,
                    trajectory: tuple[int, int]) -> dict[str, Float64[Tensor, "r d"]]:
    """Base (trajectory removed) and full-context MLP inputs at the captured rows (float64).

    Only the two endpoints of `probes.measures.updates.mlp.restricted_inputs` (indices 0 and −1), computed
    without the cumulative sum over the trajectory: O(H·R·N·d_h) time, O(R·d) memory.

    Args:
        cap: Output of `probes.measures.updates.mlp.capture_rows` (rows all after the trajectory).
        w: That layer's weights (`layer_weights`).
        layer: Layer index.
        trajectory: Half-open trajectory span (t0, t1).

    Returns:
        Dict with `m_base`, `u_base` (K_{−1}: trajectory keys removed from every head's softmax)
        and `m`, `u` (full context), each [R, d].
    """
    t0, t1 = trajectory
    p = cap.pattern[layer].to(F64)                                  # [H, R, K]
    v = cap.v[layer].to(F64)                                        # [K, H_kv, d_h]
    H = p.shape[0]
    v_h = v.repeat_interleave(H // v.shape[1], dim=1).transpose(0, 1)   # [H, K, d_h]
    w_o = w.w_o.reshape(w.w_o.shape[0], H, -1)                      # [d, H, d_h]
    x = cap.resid_pre[layer].to(F64)

    def mid(pm: Tensor) -> Tensor:
        z = torch.einsum("hrk,hkd->hrd", pm, v_h) / pm.sum(-1)[..., None]
        attn = torch.einsum("dhe,hre->rd", w_o, z)
        return x + (attn if w.b_o is None else attn + w.b_o)

    pb = p.clone()
    pb[..., t0:t1] = 0.0
    m_base, m = mid(pb), mid(p)
    return {"m_base": m_base, "u_base": rms_norm(m_base, w.gamma, w.eps),
            "m": m, "u": rms_norm(m, w.gamma, w.eps)}


def _patch_rows(tt: TokenizedTrace, fn: str) -> tuple[tuple[int, int], list[int]]:
    traj = _trajectory(tt, fn)
    n = len(np.asarray(tt.ids))
    rows = list(range(traj[1], n))
    if not rows:
        raise FitError(
            f"{fn}: trace {_trace_id(tt)!r} has no rows after its trajectory (N={n}); the "
            f"calibration queries are the scaffold + answer rows. Tokenize with a scaffold/answer.")
    return traj, rows


def _check_which(which: str) -> str:
    if which not in ("gate", "up"):
        raise FitError(f"which must be 'gate' or 'up'; got {which!r}.")
    return which


@dataclass
class ThoughtPatchSamples:
    """Calibration pairs of the static thought patch for one trace (float64 numpy).

    Attributes:
        trace_id: Id of the source trace.
        which: "gate" (W = W_gate) or "up" (W = W_up).
        trajectory: Half-open trajectory span (t0, t1).
        rows: Calibration query rows [K] = t1 .. N−1 (scaffold + answer block).
        layers: Layer indices [L'].
        x: u'_k, MLP input with the trajectory keys removed [L', K, d].
        y: W (u_k − u'_k), the exact per-row pre-activation change [L', K, d_ff].
        u: u_k, full-context MLP input [L', K, d].
    """

    trace_id: str
    which: str
    trajectory: tuple[int, int]
    rows: Int[np.ndarray, " k"]
    layers: Int[np.ndarray, " l"]
    x: Float64[np.ndarray, "l k d"]
    y: Float64[np.ndarray, "l k d_ff"]
    u: Float64[np.ndarray, "l k d"]


@torch.no_grad()
def thought_patch_samples(
    loaded: LoadedModel,
    tt: TokenizedTrace,
    *,
    which: str = "gate",
    layers: Sequence[int] | None = None,
) -> ThoughtPatchSamples:
    """X = u'_k and Y = W (u_k − u'_k) at every scaffold + answer row, from one hooked forward.

    Args:
        loaded: A booted RoPE model with a gated MLP (Qwen2 / Llama / Qwen3), batch 1.
        tt: A tokenized trace with a non-empty trajectory and at least one row after it.
        which: "gate" or "up".
        layers: Layer indices (default all).

    Returns:
        The calibration pairs.

    Raises:
        FitError: Empty trajectory, no rows after it, bad `which` or layers.
        MlpUpdateError: Unsupported model.
    """
    fn = "thought_patch_samples"
    which = _check_which(which)
    traj, rows = _patch_rows(tt, fn)
    layer_list = _layers(loaded, layers)
    weights = layer_weights(loaded)
    cap = capture_rows(loaded, _ids(tt), rows)
    xs, ys, us = [], [], []
    for layer in layer_list:
        w = weights[layer]
        e = endpoint_inputs(cap, w, layer, traj)
        wm = w.w_gate if which == "gate" else w.w_up
        xs.append(e["u_base"])
        ys.append((e["u"] - e["u_base"]) @ wm.T)
        us.append(e["u"])
    return ThoughtPatchSamples(
        trace_id=_trace_id(tt), which=which, trajectory=traj, rows=np.asarray(rows),
        layers=np.asarray(layer_list), x=torch.stack(xs).numpy(), y=torch.stack(ys).numpy(),
        u=torch.stack(us).numpy())


@dataclass
class StaticPatch:
    """One ridge fit Δ u'_k ≈ W (u_k − u'_k) (or any Y ≈ Δ X, no intercept).

    Attributes:
        delta: Δ = Ridge.coef_ [d_out, d] (float64).
        alpha: Relative penalty α.
        alpha_abs: α ‖X‖_F²/d used for the all-sample fit.
        k: Number of samples (queries) K.
        n_splits: KFold folds used (min(requested, K)).
        r2_heldout: Out-of-sample R² pooled over contiguous KFold folds (module docstring).
        r2_in: In-sample R² of the all-sample fit.
        fro: ‖Δ‖_F.
    """

    delta: Float64[np.ndarray, "d_out d"]
    alpha: float
    alpha_abs: float
    k: int
    n_splits: int
    r2_heldout: float
    r2_in: float
    fro: float


def fit_static_patch(
    x: Float[np.ndarray, "k d"],
    y: Float[np.ndarray, "k d_out"],
    *,
    alpha: float = DEFAULT_PATCH_ALPHA,
    n_splits: int = 5,
) -> StaticPatch:
    """Ridge(fit_intercept=False) of Y [K, d_out] on X [K, d] with contiguous-KFold held-out R².

    Args:
        x: Inputs [K, d] (u'_k).
        y: Targets [K, d_out] (W (u_k − u'_k)).
        alpha: Relative penalty (> 0): α_abs = α ‖X_train‖_F²/d per fit.
        n_splits: KFold folds over the K samples (not shuffled), capped at K.

    Returns:
        The fit.

    Raises:
        FitError: K < 2, mismatched shapes, α ≤ 0 or n_splits < 2.
    """
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0]:
        raise FitError(f"fit_static_patch: need X [K, d] and Y [K, d_out]; got {x.shape}, "
                       f"{y.shape}.")
    k = x.shape[0]
    if k < 2:
        raise FitError(
            f"fit_static_patch needs at least 2 calibration queries for a held-out R²; got K={k}. "
            f"Use traces with ≥ 2 rows after the trajectory (scaffold + answer).")
    if not alpha > 0:
        raise FitError(f"fit_static_patch: alpha must be > 0; got {alpha}.")
    if int(n_splits) < 2:
        raise FitError(f"fit_static_patch: n_splits must be ≥ 2; got {n_splits}.")
    n_splits = min(int(n_splits), k)
    held = _PooledR2()
    for tr, te in KFold(n_splits=n_splits).split(x):
        model, _ = _ridge(x[tr], y[tr], alpha)
        held.add(y[te], model.predict(x[te]), y[tr].mean(0))
    model, a_abs = _ridge(x, y, alpha)
    delta = np.asarray(model.coef_, np.float64).reshape(y.shape[1], x.shape[1])
    return StaticPatch(delta=delta, alpha=float(alpha), alpha_abs=a_abs, k=k, n_splits=n_splits,
                       r2_heldout=held.value, r2_in=_r2_in(y, x @ delta.T),
                       fro=float(np.linalg.norm(delta)))


@dataclass
class ThoughtPatchFit:
    """Static thought patch per layer for one trace (arrays [L']).

    Attributes:
        trace_id: Id of the source trace.
        which: "gate" or "up".
        rows: Calibration query rows [K].
        layers: Layer indices [L'].
        k: Number of calibration queries K.
        alpha: Relative ridge penalty.
        n_splits: KFold folds used.
        r2_heldout: Out-of-sample R² of Δ u'_k ≈ W (u_k − u'_k) (contiguous KFold over rows).
        r2_in: In-sample R².
        delta_fro: ‖Δ‖_F.
        exact_fro_mean: Mean over rows of the exact patch norm ‖ΔW_k‖_F = ‖W(u_k−u'_k)‖/‖u'_k‖.
        deltas: The Δ matrices [d_ff, d] per layer when `keep_delta=True`, else None (not in
            `to_dict`).
    """

    trace_id: str
    which: str
    rows: Int[np.ndarray, " k"]
    layers: Int[np.ndarray, " l"]
    k: int
    alpha: float
    n_splits: int
    r2_heldout: Float64[np.ndarray, " l"]
    r2_in: Float64[np.ndarray, " l"]
    delta_fro: Float64[np.ndarray, " l"]
    exact_fro_mean: Float64[np.ndarray, " l"]
    deltas: list[Float64[np.ndarray, "d_ff d"]] | None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (arrays as lists, NaN as None; without `deltas`)."""
        return jsonable({k: v for k, v in asdict(self).items() if k != "deltas"})


def thought_patch_fit(
    loaded: LoadedModel,
    tt: TokenizedTrace,
    *,
    which: str = "gate",
    alpha: float = DEFAULT_PATCH_ALPHA,
    n_splits: int = 5,
    layers: Sequence[int] | None = None,
    keep_delta: bool = False,
) -> ThoughtPatchFit:
    """Fit the static thought patch of one trace at every layer (M12(a), §2.6).

    Example:
        >>> fit = thought_patch_fit(loaded, tt, which="gate")
        >>> fit.r2_heldout                        # [n_layers]

    Args:
        loaded: A booted RoPE model with a gated MLP (Qwen2 / Llama / Qwen3), batch 1.
        tt: A tokenized trace (non-empty trajectory, ≥ 2 rows after it).
        which: "gate" (W_gate) or "up" (W_up).
        alpha: Relative ridge penalty (module docstring).
        n_splits: KFold folds over the K queries (capped at K).
        layers: Layer indices (default all).
        keep_delta: Keep the fitted Δ matrices in `deltas`.

    Returns:
        The per-layer fits.

    Raises:
        FitError: Empty trajectory, fewer than 2 calibration rows, bad `which`/alpha/layers.
    """
    s = thought_patch_samples(loaded, tt, which=which, layers=layers)
    fits = [fit_static_patch(s.x[i], s.y[i], alpha=alpha, n_splits=n_splits)
            for i in range(len(s.layers))]
    exact = np.linalg.norm(s.y, axis=-1) / np.linalg.norm(s.x, axis=-1)     # [L', K]
    return ThoughtPatchFit(
        trace_id=s.trace_id, which=s.which, rows=s.rows, layers=s.layers, k=len(s.rows),
        alpha=float(alpha), n_splits=fits[0].n_splits,
        r2_heldout=np.asarray([f.r2_heldout for f in fits]),
        r2_in=np.asarray([f.r2_in for f in fits]),
        delta_fro=np.asarray([f.fro for f in fits]), exact_fro_mean=exact.mean(-1),
        deltas=[f.delta for f in fits] if keep_delta else None)


@dataclass
class ThoughtPatchNll:
    """Answer NLL (mean over answer tokens, nats) with the trajectory masked for the patch rows.

    Attributes:
        trace_id: Id of the source trace.
        rows: Masked / patched rows (t1 .. N−1).
        fit_rows: Rows whose (X, Y) pairs fitted the static patches (⊆ rows).
        alpha: Relative ridge penalty of the static patches.
        down: "rank1" (ΔW_down = δ_k φ_kᵀ/‖φ_k‖², applied to the live φ) or "bias" (δ_k).
        nll_clean: Full context, no masking.
        nll_masked: Trajectory keys masked for `rows` at every layer, no patch.
        nll_exact: Masked + the exact per-row rank-1 gate/up patches + W_down term (= clean, V5b).
        nll_static: Masked + ONE static Δ_gate, Δ_up per layer (Ridge on `fit_rows`) + the exact
            per-row W_down term.
        max_logit_err_exact: max |logits_exact − logits_clean| at the answer-predicting rows.
        r2_rows_gate / r2_rows_up: R² of the static gate / up fits over ALL rows R per layer [L]
            (in-sample when fit_rows = rows; otherwise it mixes fitted and unseen rows).
    """

    trace_id: str
    rows: list[int]
    fit_rows: list[int]
    alpha: float
    down: str
    nll_clean: float
    nll_masked: float
    nll_exact: float
    nll_static: float
    max_logit_err_exact: float
    r2_rows_gate: Float64[np.ndarray, " l"]
    r2_rows_up: Float64[np.ndarray, " l"]

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (arrays as lists, NaN as None)."""
        return jsonable(asdict(self))


@torch.no_grad()
def thought_patch_nll(
    loaded: LoadedModel,
    tt: TokenizedTrace,
    *,
    alpha: float = DEFAULT_PATCH_ALPHA,
    fit_rows: Sequence[int] | None = None,
    down: str = "rank1",
) -> ThoughtPatchNll:
    """Answer NLL when ONE static gate/up patch per layer replaces the trajectory.

    All rows R = t1 .. N−1 get the trajectory keys masked (scores = −inf) at every layer, position
    ids unchanged. The "static" run adds Δ_gate u_live / Δ_up u_live (Ridge fits on the clean-cache
    pairs of `fit_rows`, relative penalty `alpha`) to `mlp.hook_pre` / `mlp.hook_pre_linear` of
    every row in R, plus the exact per-row residual term of `probes.mlp_update` (the W_down
    rank-1 patch δ_k φ_kᵀ/‖φ_k‖² applied to the live φ, or the bias δ_k). The "exact" run uses the
    per-row rank-1 gate/up patches instead and must reproduce the clean logits (V5b).

    With `fit_rows=None` the static patches are fitted on all of R (in-sample: with K ≤ d and a
    small α they interpolate, so nll_static ≈ nll_clean is then expected, not a finding); pass a
    subset (e.g. the scaffold rows) to evaluate the patch on rows it was not fitted on.

    Args:
        loaded: A booted RoPE model with a gated MLP (Qwen2 / Llama / Qwen3), batch 1.
        tt: A tokenized trace with non-empty trajectory, scaffold and answer.
        alpha: Relative ridge penalty of the static patches.
        fit_rows: Calibration rows (⊆ t1 .. N−1, ≥ 1), default all of them.
        down: "rank1" or "bias" (the exact per-row W_down / residual term).

    Returns:
        The NLLs.

    Raises:
        FitError: Empty trajectory/scaffold/answer, bad fit_rows, alpha or down.
    """
    fn = "thought_patch_nll"
    traj, rows = _patch_rows(tt, fn)
    a0, a1 = _answer(tt, fn)
    if a0 - 1 < traj[1]:
        raise FitError(
            f"{fn}: trace {_trace_id(tt)!r} has an empty scaffold, so the row predicting the "
            f"first answer token is a trajectory row and cannot be masked; tokenize with a "
            f"non-empty scaffold.")
    if down not in ("rank1", "bias"):
        raise FitError(f"{fn}: down must be 'rank1' or 'bias'; got {down!r}.")
    if not alpha > 0:
        raise FitError(f"{fn}: alpha must be > 0; got {alpha}.")
    fit_rows = rows if fit_rows is None else sorted({int(r) for r in fit_rows})
    if not fit_rows or not set(fit_rows) <= set(rows):
        raise FitError(f"{fn}: fit_rows must be a non-empty subset of rows {rows[0]}..{rows[-1]}; "
                       f"got {fit_rows}.")
    fit_idx = [rows.index(r) for r in fit_rows]
    ids = _ids(tt)
    weights = layer_weights(loaded)
    cap = capture_rows(loaded, ids, rows)
    exact, static, r2g, r2u = [], [], [], []
    for layer, w in enumerate(weights):
        e = endpoint_inputs(cap, w, layer, traj)
        du = e["u"] - e["u_base"]
        yg, yu = du @ w.w_gate.T, du @ w.w_up.T
        phi = cap.mlp_post[layer].to(F64)
        dl = e["m"] - e["m_base"]
        right = e["u_base"] / e["u_base"].pow(2).sum(-1, keepdim=True)
        dr = phi / phi.pow(2).sum(-1, keepdim=True)
        exact.append({"gate": (yg, right), "up": (yu, right), "down": (dl, dr)})
        xb = e["u_base"].numpy()[fit_idx]
        mg, _ = _ridge(xb, yg.numpy()[fit_idx], alpha)
        mu, _ = _ridge(xb, yu.numpy()[fit_idx], alpha)
        dg = torch.from_numpy(np.asarray(mg.coef_, np.float64).reshape(yg.shape[1], -1))
        dup = torch.from_numpy(np.asarray(mu.coef_, np.float64).reshape(yu.shape[1], -1))
        r2g.append(_r2_in(yg.numpy(), e["u_base"].numpy() @ dg.numpy().T))
        r2u.append(_r2_in(yu.numpy(), e["u_base"].numpy() @ dup.numpy().T))
        static.append({"gate": dg, "up": dup})

    dev = loaded.device
    r_idx = torch.as_tensor(rows, device=dev)
    mask = mask_keys(rows, range(traj[0], traj[1]), dev)

    def run(mode: str) -> Tensor:
        live: dict[str, Tensor] = {}

        def keep(key: str):
            def hook(act: Tensor, hook: object) -> None:
                live[key] = act[0, r_idx].to("cpu", F64)
            return hook

        def add(layer: int, which: str):
            def hook(act: Tensor, hook: object) -> Tensor:
                if which == "down":
                    left, right = exact[layer]["down"]
                    inc = left if down == "bias" else left * (
                        right * live[f"phi{layer}"]).sum(-1, keepdim=True)
                elif mode == "exact":
                    left, right = exact[layer][which]
                    inc = left * (right * live[f"u{layer}"]).sum(-1, keepdim=True)
                else:
                    inc = live[f"u{layer}"] @ static[layer][which].T
                act = act.clone()
                act[0, r_idx] += inc.to(act.dtype).to(act.device)
                return act
            return hook

        fwd = []
        for l in range(loaded.arch.n_layers):
            fwd.append((f"L{l}.attn.scores", mask))
            if mode != "masked":
                fwd += [(f"L{l}.ln2.out", keep(f"u{l}")),
                        (f"L{l}.mlp.pre", add(l, "gate")),
                        (f"L{l}.mlp.pre_linear", add(l, "up")),
                        (f"L{l}.mlp.post", keep(f"phi{l}")),
                        (f"L{l}.mlp_out", add(l, "down"))]
        with edit(loaded, fwd):
            logits = loaded.bridge(ids.to(dev))
        return logits[0].detach().to("cpu", F64)

    pred_rows = list(range(a0 - 1, a1 - 1))
    targets = ids[0, a0:a1]
    sel = [rows.index(r) for r in pred_rows]

    def nll(lg: Tensor) -> float:
        lp = torch.log_softmax(lg.to(F64), dim=-1)
        return float(-lp[torch.arange(len(targets)), targets].mean())

    clean = cap.logits.to(F64)[sel]
    lg_exact = run("exact")[pred_rows]
    return ThoughtPatchNll(
        trace_id=_trace_id(tt), rows=rows, fit_rows=list(fit_rows), alpha=float(alpha),
        down=down, nll_clean=nll(clean), nll_masked=nll(run("masked")[pred_rows]),
        nll_exact=nll(lg_exact), nll_static=nll(run("static")[pred_rows]),
        max_logit_err_exact=float((lg_exact - clean).abs().max()),
        r2_rows_gate=np.asarray(r2g), r2_rows_up=np.asarray(r2u))
