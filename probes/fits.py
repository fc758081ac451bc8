"""Linear maps fitted with scikit-learn for the per-token implicit updates (MEASUREMENTS.md M12).

Two fits, both on quantities that are exact functions of ONE hooked forward per trace:

(a) Pseudo-gradient map (§3.2 Dai dual form / RaML "pseudo-gradient", §7.3 M3 vs M4). For one
    tokenized trace, the query q = spans["answer"][0] − 1 (the row predicting the first answer
    token), per layer ℓ and trajectory key t (HF convention, RoPE-rotated k̃, q̃ as the softmax
    sees them, g(h) = h // G):

    * target    y_t  = Σ_h W_O^h δz_{h,t},  δz = p_t (v_t − z)/(1 − p_t)  — the exact leave-one-out
      change of row q's attention output caused by key t (M4; ‖y_t‖ = `loo_sum_norm`);
    * regressor x_t  = Σ_h W_O^h v_{g(h),t} (k̃_t·q̃_h)/√d_h  — the action on the answer query of
      token t's Dai update ΔW_t = v_t k̃_tᵀ (relaxed linear attention, M3), in the residual;
    * baseline  xv_t = Σ_h W_O^h v_{g(h),t}  — value direction only (no query dependence).

    `fit_pseudo_gradient` pools tokens over traces and, per layer, fits (1) a scalar implicit
    learning rate y ≈ η x (least squares without intercept over all vector entries), (2) a full
    map y ≈ A x (A ∈ R^{d×d}, `Ridge(fit_intercept=False)`), and the value-only baselines
    (3) y ≈ A' xv and (4) y ≈ η' xv. Held-out R² uses `GroupKFold` by trace (a trace's tokens are
    never split between train and test). (1) vs (4) and (2) vs (3) say whether the
    query-dependent pseudo-gradient term explains the real per-token effect better than the value
    vector alone.

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

R² conventions (the same in (a) and (b); all sums run over samples AND output coordinates, i.e.
sklearn's `r2_score(multioutput="variance_weighted")` = 1 − ΣSSE/ΣSST):

* in-sample:  1 − Σ‖y − ŷ‖² / Σ‖y − ȳ‖², ȳ the per-coordinate mean of all samples, ŷ from the
  fit on all samples;
* held-out (out-of-sample R²): 1 − Σ_f Σ_{i∈test_f} ‖y_i − ŷ_i‖² / Σ_f Σ_{i∈test_f} ‖y_i − ȳ_f‖²,
  ŷ from the fit on the training folds and ȳ_f the per-coordinate mean of the TRAINING folds: the
  constant predictor learned from the same data. SSE and SST are pooled over folds before the
  ratio. (The test-fold mean is not used: with the 2-row test folds of (b) it would shrink SST
  by ≈ half and bias R² down; with the training mean, 0 means "no better than a constant".)

Ridge penalties are RELATIVE: α_abs = α · ‖X_train‖_F² / d (α times the mean eigenvalue of XᵀX
over the d input dimensions), so one grid works for every layer and model scale. (a) picks α from
`alphas` with `RidgeCV` (efficient leave-one-sample-out GCV) inside each training fold, so the test
traces never influence α; (b) uses one fixed α (default `DEFAULT_PATCH_ALPHA`).

Norm convention: unfolded γ2 (HF weights; the bridge runs in raw mode), as in `probes.mlp_update`.
Only Llama-style RoPE models with a gated MLP (Qwen2 / Llama / Qwen3) are supported.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from sklearn.linear_model import Ridge, RidgeCV
from sklearn.model_selection import GroupKFold, KFold
from torch import Tensor

from probes.errors import ProbesError
from probes.jsonable import jsonable
from probes.mlp_update import (
    LayerWeights,
    capture_rows,
    layer_weights,
    rms_norm,
    trajectory_mask_hook,
)
from probes.models import LoadedModel
from probes.traces import TokenizedTrace
from probes.updates import capture_query, layer_terms, o_proj_weights

__all__ = [
    "DEFAULT_ALPHAS",
    "DEFAULT_PATCH_ALPHA",
    "FitError",
    "PseudoGradientFit",
    "PseudoGradientSamples",
    "StaticPatch",
    "ThoughtPatchFit",
    "ThoughtPatchNll",
    "ThoughtPatchSamples",
    "endpoint_inputs",
    "fit_pseudo_gradient",
    "fit_static_patch",
    "pseudo_gradient_samples",
    "thought_patch_fit",
    "thought_patch_nll",
    "thought_patch_samples",
]

F64 = torch.float64

DEFAULT_ALPHAS: tuple[float, ...] = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0, 1000.0)
"""Relative ridge penalties searched by `RidgeCV` for the d×d maps of (a)."""

DEFAULT_PATCH_ALPHA = 1e-2
"""Relative ridge penalty of the static thought patch (b)."""


class FitError(ProbesError, ValueError):
    """Bad input to a fit: too few traces / queries, empty spans, inconsistent samples."""


# --------------------------------------------------------------------------------------------------
# Helpers


def _trace_id(tt: TokenizedTrace) -> str:
    trace = getattr(tt, "trace", None)
    return str(getattr(trace, "id", "?"))


def _ids(tt: TokenizedTrace) -> Tensor:
    return torch.as_tensor(np.asarray(tt.ids), dtype=torch.long).reshape(1, -1)


def _trajectory(tt: TokenizedTrace, fn: str) -> tuple[int, int]:
    t0, t1 = (int(v) for v in tt.spans["trajectory"])
    if t1 <= t0:
        raise FitError(
            f"{fn}: trace {_trace_id(tt)!r} has an empty trajectory span ({t0}, {t1}); there are "
            f"no trajectory tokens to fit. Drop such traces first (keep those with "
            f"spans['trajectory'][1] > spans['trajectory'][0]).")
    return t0, t1


def _answer(tt: TokenizedTrace, fn: str) -> tuple[int, int]:
    a0, a1 = (int(v) for v in tt.spans["answer"])
    if a1 <= a0 or a0 < 1:
        raise FitError(
            f"{fn}: trace {_trace_id(tt)!r} has answer span ({a0}, {a1}); it needs at least one "
            f"answer token after a non-empty prefix. Tokenize traces with a non-empty answer.")
    return a0, a1


def _layers(loaded: LoadedModel, layers: Sequence[int] | None) -> list[int]:
    n = loaded.arch.n_layers
    if layers is None:
        return list(range(n))
    out = [int(l) for l in layers]
    if not out or any(not 0 <= l < n for l in out) or len(set(out)) != len(out):
        raise FitError(f"layers must be distinct indices in [0, {n}); got {list(layers)}.")
    return out


def _rng(rng: np.random.Generator | int | None) -> np.random.Generator:
    return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(
        0 if rng is None else rng)


class _PooledR2:
    """Accumulates SSE and SST over folds (sums over samples and coordinates)."""

    def __init__(self) -> None:
        self.sse = 0.0
        self.sst = 0.0

    def add(self, y: np.ndarray, pred: np.ndarray, ref: np.ndarray) -> None:
        self.sse += float(((y - pred) ** 2).sum())
        self.sst += float(((y - ref) ** 2).sum())

    @property
    def value(self) -> float:
        return 1.0 - self.sse / self.sst if self.sst > 0 else float("nan")


def _r2_in(y: np.ndarray, pred: np.ndarray) -> float:
    r = _PooledR2()
    r.add(y, pred, y.mean(0))
    return r.value


def _eta(x: np.ndarray, y: np.ndarray) -> float:
    """Least-squares scalar y ≈ η x over all entries (no intercept)."""
    den = float((x * x).sum())
    return float((x * y).sum()) / den if den > 0 else float("nan")


def _alpha_scale(x: np.ndarray) -> float:
    """‖X‖_F²/d (mean eigenvalue of XᵀX); 1 for an all-zero X so the penalty stays positive."""
    s = float((x * x).sum()) / x.shape[1]
    return s if s > 0 else 1.0


def _ridge_cv(x: np.ndarray, y: np.ndarray, alphas: Sequence[float]) -> tuple[RidgeCV, float]:
    scale = _alpha_scale(x)
    model = RidgeCV(alphas=np.asarray(alphas, dtype=np.float64) * scale, fit_intercept=False)
    model.fit(x, y)
    return model, float(model.alpha_) / scale


# --------------------------------------------------------------------------------------------------
# (a) Pseudo-gradient map


@dataclass
class PseudoGradientSamples:
    """Per-token (target, regressor) vectors of one trace at the answer query (float32).

    Shapes: L' = len(layers), T = number of (possibly subsampled) trajectory tokens, d = d_model.

    Attributes:
        trace_id: Id of the source trace.
        query: The query row q = spans["answer"][0] − 1.
        positions: Absolute positions of the sampled trajectory tokens [T] (increasing).
        layers: Layer indices [L'].
        y: Σ_h W_O^h δz_{h,t}, exact leave-one-out change of attn_out at q [L', T, d].
        x: Σ_h W_O^h v_{g(h),t} (k̃_t·q̃_h)/√d_h, Dai pseudo-gradient action [L', T, d].
        xv: Σ_h W_O^h v_{g(h),t}, value-only baseline [L', T, d].
        n_trajectory: Number of trajectory tokens before subsampling.
    """

    trace_id: str
    query: int
    positions: np.ndarray
    layers: np.ndarray
    y: np.ndarray
    x: np.ndarray
    xv: np.ndarray
    n_trajectory: int = -1

    def __post_init__(self) -> None:
        shape = np.shape(self.y)
        if len(shape) != 3 or np.shape(self.x) != shape or np.shape(self.xv) != shape:
            raise FitError(
                f"PseudoGradientSamples: y, x, xv must share one [L, T, d] shape; got "
                f"{np.shape(self.y)}, {np.shape(self.x)}, {np.shape(self.xv)}.")
        if shape[0] != len(self.layers) or shape[1] != len(self.positions):
            raise FitError(
                f"PseudoGradientSamples: y is {shape} but there are {len(self.layers)} layers and "
                f"{len(self.positions)} positions.")
        if self.n_trajectory < 0:
            self.n_trajectory = shape[1]


@torch.no_grad()
def pseudo_gradient_samples(
    loaded: LoadedModel,
    tt: TokenizedTrace,
    *,
    layers: Sequence[int] | None = None,
    max_tokens: int | None = None,
    rng: np.random.Generator | int | None = None,
) -> PseudoGradientSamples:
    """(target y, pseudo-gradient x, value-only xv) per trajectory token, from one hooked forward.

    Example:
        >>> s = pseudo_gradient_samples(loaded, tt, max_tokens=256)
        >>> s.y.shape                             # [n_layers, min(T, 256), d_model]

    Args:
        loaded: A booted RoPE model (Qwen2 / Llama / Qwen3), batch 1.
        tt: A tokenized trace with non-empty trajectory and answer spans.
        layers: Layer indices to keep (default all).
        max_tokens: Keep at most this many trajectory tokens, drawn uniformly without replacement
            (positions stay sorted); None keeps all.
        rng: Generator or seed for the subsample (None: seed 0, reproducible).

    Returns:
        The samples (float32; computed in float64 from the fp32 captures).

    Raises:
        FitError: Empty trajectory/answer span, bad layers or max_tokens < 1.
        UpdatesError: Model without RoPE / o_proj.
    """
    fn = "pseudo_gradient_samples"
    t0, t1 = _trajectory(tt, fn)
    a0, _ = _answer(tt, fn)
    query = a0 - 1
    if t1 - 1 > query:
        raise FitError(f"{fn}: trajectory span ({t0}, {t1}) ends after the query row {query}.")
    layer_list = _layers(loaded, layers)
    pos = np.arange(t0, t1)
    if max_tokens is not None:
        if int(max_tokens) < 1:
            raise FitError(f"{fn}: max_tokens must be ≥ 1 (or None for all); got {max_tokens}.")
        if len(pos) > max_tokens:
            pos = np.sort(_rng(rng).choice(pos, size=int(max_tokens), replace=False))
    weights = o_proj_weights(loaded)
    cap = capture_query(loaded, _ids(tt), query)
    idx = torch.as_tensor(pos, dtype=torch.long)
    ys, xs, xvs = [], [], []
    for layer in layer_list:
        t = layer_terms(cap, layer, weights[layer][0])
        d_h = t["q"].shape[-1]
        wv = t["wv"][:, idx]                                          # [H, T, d]
        ys.append(t["dz_out"][:, idx].sum(0))
        xs.append((wv * (t["dots"][:, idx] / math.sqrt(d_h))[..., None]).sum(0))
        xvs.append(wv.sum(0))

    def f32(v: list[Tensor]) -> np.ndarray:
        return torch.stack(v).to(torch.float32).numpy()

    return PseudoGradientSamples(
        trace_id=_trace_id(tt), query=query, positions=pos, layers=np.asarray(layer_list),
        y=f32(ys), x=f32(xs), xv=f32(xvs), n_trajectory=t1 - t0)


@dataclass
class PseudoGradientFit:
    """Per-layer fits of the per-token implicit update (arrays [L'] unless stated).

    Held-out R² are GroupKFold-by-trace out-of-sample R² (module docstring); `*_in` are
    in-sample R² of the fit on all tokens.

    Attributes:
        layers: Layer indices [L'].
        trace_ids: Ids of the traces, in input order (group i = trace i).
        n_tokens: Tokens per trace [n_traces].
        n_splits: Number of GroupKFold folds used (min(requested, n_traces)).
        fold_traces: Test-trace indices of each fold (each trace in exactly one fold).
        alphas: The relative ridge grid searched by RidgeCV.
        eta: Scalar implicit learning rate y ≈ η x, fitted on all tokens.
        eta_folds: η fitted on each fold's training traces [L', n_splits].
        eta_value: Scalar y ≈ η' xv (value-only), fitted on all tokens.
        r2_scalar / r2_scalar_in: y ≈ η x.
        r2_map / r2_map_in: y ≈ A x, A d×d Ridge.
        r2_value_map / r2_value_map_in: y ≈ A' xv, A' d×d Ridge (value-only baseline).
        r2_value_scalar / r2_value_scalar_in: y ≈ η' xv (value-only scalar baseline).
        alpha_map / alpha_value_map: Relative α chosen by RidgeCV on all tokens.
        cos_xy: Σ_t x_t·y_t / sqrt(Σ‖x_t‖² Σ‖y_t‖²) (pooled uncentred cosine, sign of η).
    """

    layers: np.ndarray
    trace_ids: list[str]
    n_tokens: np.ndarray
    n_splits: int
    fold_traces: list[list[int]]
    alphas: list[float]
    eta: np.ndarray
    eta_folds: np.ndarray
    eta_value: np.ndarray
    r2_scalar: np.ndarray
    r2_scalar_in: np.ndarray
    r2_map: np.ndarray
    r2_map_in: np.ndarray
    r2_value_map: np.ndarray
    r2_value_map_in: np.ndarray
    r2_value_scalar: np.ndarray
    r2_value_scalar_in: np.ndarray
    alpha_map: np.ndarray
    alpha_value_map: np.ndarray
    cos_xy: np.ndarray

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (arrays as lists, NaN as None)."""
        return jsonable(asdict(self))


def fit_pseudo_gradient(
    samples: Sequence[PseudoGradientSamples],
    *,
    n_splits: int = 5,
    alphas: Sequence[float] = DEFAULT_ALPHAS,
) -> PseudoGradientFit:
    """Fit η, the d×d map and the value-only baselines per layer, cross-validated by trace.

    Example:
        >>> samples = [pseudo_gradient_samples(loaded, tt, max_tokens=256) for tt in tts]
        >>> fit = fit_pseudo_gradient(samples)
        >>> fit.r2_scalar, fit.r2_value_map       # [n_layers] held-out R²

    Args:
        samples: One `PseudoGradientSamples` per trace (≥ 2), all with the same layers and d.
        n_splits: GroupKFold folds; capped at the number of traces.
        alphas: Relative ridge penalties for RidgeCV (α_abs = α ‖X_train‖_F²/d), all > 0.

    Returns:
        The per-layer fits.

    Raises:
        FitError: Fewer than 2 traces, n_splits < 2, inconsistent layers/d, a trace without
            tokens, or a non-positive α.
    """
    samples = list(samples)
    if len(samples) < 2:
        raise FitError(
            f"fit_pseudo_gradient needs samples from at least 2 traces (held-out R² uses "
            f"GroupKFold by trace); got {len(samples)}. Pass one pseudo_gradient_samples(...) per "
            f"trace for more traces.")
    if int(n_splits) < 2:
        raise FitError(f"fit_pseudo_gradient: n_splits must be ≥ 2; got {n_splits}.")
    alphas = [float(a) for a in alphas]
    if not alphas or min(alphas) <= 0:
        raise FitError(f"fit_pseudo_gradient: alphas must be positive; got {alphas}.")
    layers = np.asarray(samples[0].layers)
    d = samples[0].y.shape[2]
    for i, s in enumerate(samples):
        if not np.array_equal(np.asarray(s.layers), layers) or s.y.shape[2] != d:
            raise FitError(
                f"fit_pseudo_gradient: sample {i} ({s.trace_id!r}) has layers "
                f"{list(s.layers)} / d={s.y.shape[2]}, sample 0 has {list(layers)} / d={d}; "
                f"compute all samples with the same model and layers.")
        if s.y.shape[1] == 0:
            raise FitError(f"fit_pseudo_gradient: sample {i} ({s.trace_id!r}) has no tokens.")
    n_splits = min(int(n_splits), len(samples))
    groups = np.concatenate([np.full(s.y.shape[1], i) for i, s in enumerate(samples)])
    folds = list(GroupKFold(n_splits=n_splits).split(np.zeros((len(groups), 1)), groups=groups))
    fold_traces = [sorted({int(g) for g in groups[te]}) for _, te in folds]

    out: dict[str, list] = {k: [] for k in (
        "eta", "eta_folds", "eta_value", "r2_scalar", "r2_scalar_in", "r2_map", "r2_map_in",
        "r2_value_map", "r2_value_map_in", "r2_value_scalar", "r2_value_scalar_in", "alpha_map",
        "alpha_value_map", "cos_xy")}
    for li in range(len(layers)):
        y = np.concatenate([np.asarray(s.y[li], np.float64) for s in samples])
        x = np.concatenate([np.asarray(s.x[li], np.float64) for s in samples])
        xv = np.concatenate([np.asarray(s.xv[li], np.float64) for s in samples])
        held = {k: _PooledR2() for k in ("scalar", "map", "value_map", "value_scalar")}
        etas = []
        for tr, te in folds:
            ref = y[tr].mean(0)
            eta_f = _eta(x[tr], y[tr])
            etas.append(eta_f)
            held["scalar"].add(y[te], eta_f * x[te], ref)
            held["value_scalar"].add(y[te], _eta(xv[tr], y[tr]) * xv[te], ref)
            held["map"].add(y[te], _ridge_cv(x[tr], y[tr], alphas)[0].predict(x[te]), ref)
            held["value_map"].add(y[te], _ridge_cv(xv[tr], y[tr], alphas)[0].predict(xv[te]), ref)
        eta, eta_v = _eta(x, y), _eta(xv, y)
        m_map, a_map = _ridge_cv(x, y, alphas)
        m_val, a_val = _ridge_cv(xv, y, alphas)
        out["eta"].append(eta)
        out["eta_folds"].append(etas)
        out["eta_value"].append(eta_v)
        out["r2_scalar_in"].append(_r2_in(y, eta * x))
        out["r2_value_scalar_in"].append(_r2_in(y, eta_v * xv))
        out["r2_map_in"].append(_r2_in(y, m_map.predict(x)))
        out["r2_value_map_in"].append(_r2_in(y, m_val.predict(xv)))
        for k, r in held.items():
            out[f"r2_{k}"].append(r.value)
        out["alpha_map"].append(a_map)
        out["alpha_value_map"].append(a_val)
        den = math.sqrt(float((x * x).sum()) * float((y * y).sum()))
        out["cos_xy"].append(float((x * y).sum()) / den if den > 0 else float("nan"))
    arrays = {k: np.asarray(v, dtype=np.float64) for k, v in out.items()}
    return PseudoGradientFit(
        layers=layers, trace_ids=[s.trace_id for s in samples],
        n_tokens=np.asarray([s.y.shape[1] for s in samples]), n_splits=n_splits,
        fold_traces=fold_traces, alphas=alphas, **arrays)


# --------------------------------------------------------------------------------------------------
# (b) Static thought patch


def endpoint_inputs(cap: Any, w: LayerWeights, layer: int,
                    trajectory: tuple[int, int]) -> dict[str, Tensor]:
    """Base (trajectory removed) and full-context MLP inputs at the captured rows (float64).

    Only the two endpoints of `probes.mlp_update.restricted_inputs` (indices 0 and −1), computed
    without the cumulative sum over the trajectory: O(H·R·N·d_h) time, O(R·d) memory.

    Args:
        cap: Output of `probes.mlp_update.capture_rows` (rows all after the trajectory).
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
    rows: np.ndarray
    layers: np.ndarray
    x: np.ndarray
    y: np.ndarray
    u: np.ndarray


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

    delta: np.ndarray
    alpha: float
    alpha_abs: float
    k: int
    n_splits: int
    r2_heldout: float
    r2_in: float
    fro: float


def _ridge(x: np.ndarray, y: np.ndarray, alpha: float) -> tuple[Ridge, float]:
    a = alpha * _alpha_scale(x)
    return Ridge(alpha=a, fit_intercept=False).fit(x, y), a


def fit_static_patch(
    x: np.ndarray,
    y: np.ndarray,
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
    rows: np.ndarray
    layers: np.ndarray
    k: int
    alpha: float
    n_splits: int
    r2_heldout: np.ndarray
    r2_in: np.ndarray
    delta_fro: np.ndarray
    exact_fro_mean: np.ndarray
    deltas: list[np.ndarray] | None = field(default=None, repr=False)

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
    r2_rows_gate: np.ndarray
    r2_rows_up: np.ndarray

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
    mask = trajectory_mask_hook(rows, range(traj[0], traj[1]), dev)

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
            fwd.append((f"blocks.{l}.attn.hook_attn_scores", mask))
            if mode != "masked":
                fwd += [(f"blocks.{l}.ln2.hook_out", keep(f"u{l}")),
                        (f"blocks.{l}.mlp.hook_pre", add(l, "gate")),
                        (f"blocks.{l}.mlp.hook_pre_linear", add(l, "up")),
                        (f"blocks.{l}.mlp.hook_post", keep(f"phi{l}")),
                        (f"blocks.{l}.hook_mlp_out", add(l, "down"))]
        with loaded.bridge.hooks(fwd_hooks=fwd):
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
