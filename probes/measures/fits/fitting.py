"""Shared pieces of the fitted maps (M12): sample bookkeeping, relative ridge penalties, R².

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

from collections.abc import Sequence

import numpy as np
import torch
from sklearn.linear_model import Ridge, RidgeCV
from torch import Tensor

from hooks.model import LoadedModel
from probes.errors import ProbesError
from probes.traces.tokenize import TokenizedTrace

F64 = torch.float64


DEFAULT_ALPHAS: tuple[float, ...] = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0, 1000.0)
"""Relative ridge penalties searched by `RidgeCV` for the d×d maps of (a)."""


DEFAULT_PATCH_ALPHA = 1e-2
"""Relative ridge penalty of the static thought patch (b)."""


class FitError(ProbesError, ValueError):
    """Bad input to a fit: too few traces / queries, empty spans, inconsistent samples."""


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


def _ridge(x: np.ndarray, y: np.ndarray, alpha: float) -> tuple[Ridge, float]:
    a = alpha * _alpha_scale(x)
    return Ridge(alpha=a, fit_intercept=False).fit(x, y), a
