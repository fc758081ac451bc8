"""The pseudo-gradient map (M12), fitted with scikit-learn on exact per-token quantities.

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

R² conventions and ridge penalties: `probes.measures.fits.fitting`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from jaxtyping import Float64, Int
from sklearn.model_selection import GroupKFold
from torch import Tensor

from hooks.model import LoadedModel
from probes.jsonable import jsonable
from probes.measures.fits.fitting import (
    DEFAULT_ALPHAS,
    FitError,
    _answer,
    _eta,
    _ids,
    _layers,
    _PooledR2,
    _r2_in,
    _ridge_cv,
    _rng,
    _trace_id,
    _trajectory,
)
from probes.measures.updates.attention import capture_query, layer_terms, o_proj_weights
from probes.traces.tokenize import TokenizedTrace


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

    layers: Int[np.ndarray, " l"]
    trace_ids: list[str]
    n_tokens: Int[np.ndarray, " n_traces"]
    n_splits: int
    fold_traces: list[list[int]]
    alphas: list[float]
    eta: Float64[np.ndarray, " l"]
    eta_folds: Float64[np.ndarray, "l n_splits"]
    eta_value: Float64[np.ndarray, " l"]
    r2_scalar: Float64[np.ndarray, " l"]
    r2_scalar_in: Float64[np.ndarray, " l"]
    r2_map: Float64[np.ndarray, " l"]
    r2_map_in: Float64[np.ndarray, " l"]
    r2_value_map: Float64[np.ndarray, " l"]
    r2_value_map_in: Float64[np.ndarray, " l"]
    r2_value_scalar: Float64[np.ndarray, " l"]
    r2_value_scalar_in: Float64[np.ndarray, " l"]
    alpha_map: Float64[np.ndarray, " l"]
    alpha_value_map: Float64[np.ndarray, " l"]
    cos_xy: Float64[np.ndarray, " l"]

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
