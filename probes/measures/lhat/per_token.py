"""Per-token quantities of an L̂ curve (docs/methods.md#m8, §1.4), pure numpy.

`delta_lhat`, `relative_change` and `log_ratio` turn an L̂ curve [..., T+1] into one value per
trajectory token [..., T]; `lhat_arrays` gives the curve and the three as stored by the `lhat`
command (`LHAT_ARRAYS`, as `probes.arrays` declares them).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from jaxtyping import Float32, Float64, Real

from probes import arrays
from probes.errors import ProbesError

__all__ = ["LHAT_ARRAYS", "delta_lhat", "lhat_arrays", "log_ratio", "relative_change"]


# --------------------------------------------------------------------------------------------------
# Per-token quantities (docs/methods.md#m8)


_Curve = Real[np.ndarray, "*batch t1"] | Sequence[float] | float
"""An L̂ curve [..., T+1] (array or list); a bare float is taken so that `_curve` can refuse it."""


def _curve(lhat: _Curve) -> np.ndarray:
    arr = np.asarray(lhat, dtype=np.float64)
    if arr.ndim < 1 or arr.shape[-1] < 1:
        raise ProbesError(f"An L̂ curve needs shape [..., T+1] with T+1 >= 1, got {arr.shape}.")
    return arr


def delta_lhat(lhat: _Curve) -> Float64[np.ndarray, "*batch t"]:
    """Signed change ΔL̂_t = L̂_t − L̂_{t−1} for t = 1..T.

    Index i of the result (0-based) belongs to trajectory token τ_{i+1}, i.e. to the token at
    trajectory position i: the change caused by appending it. Negative = the answer got likelier.

    Args:
        lhat: [..., T+1] L̂ curve(s), t = 0..T on the last axis.

    Returns:
        float64 [..., T].

    Example:
        >>> delta_lhat([2.0, 1.5, 1.75])
        array([-0.5 ,  0.25])
    """
    return np.diff(_curve(lhat), axis=-1)


def relative_change(lhat: _Curve) -> Float64[np.ndarray, "*batch t"]:
    """RaML's relative change ρ_t = |L̂_t − L̂_{t−1}| / L̂_{t−1} for t = 1..T.

    Aligned like `delta_lhat`. Where L̂_{t−1} = 0 the notebook skips the token; here it is NaN.

    Args:
        lhat: [..., T+1] L̂ curve(s).

    Returns:
        float64 [..., T]; NaN where L̂_{t−1} = 0.
    """
    arr = _curve(lhat)
    prev = arr[..., :-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.abs(np.diff(arr, axis=-1)) / prev
    return np.where(prev == 0, np.nan, out)


def log_ratio(lhat: _Curve) -> Float64[np.ndarray, "*batch t"]:
    """Log-ratio λ_t = log L̂_t − log L̂_{t−1} for t = 1..T (less heavy-tailed than ρ_t).

    Aligned like `delta_lhat`.

    Args:
        lhat: [..., T+1] L̂ curve(s).

    Returns:
        float64 [..., T]; NaN where L̂_t or L̂_{t−1} is not positive.
    """
    arr = _curve(lhat)
    with np.errstate(divide="ignore", invalid="ignore"):
        logs = np.where(arr > 0, np.log(np.where(arr > 0, arr, 1.0)), np.nan)
    return np.diff(logs, axis=-1)


LHAT_ARRAYS: tuple[str, ...] = arrays.names(arrays.LHAT)
"""The stored L̂ arrays, as the registry declares them."""


def lhat_arrays(lhat: Real[np.ndarray, " t1"] | Sequence[float]
                ) -> dict[str, Float32[np.ndarray, " _"]]:
    """L̂ and its per-token derivatives as stored: `lhat` float32 [T+1]; `lhat_delta`,
    `lhat_rho`, `lhat_log_ratio` float32 [T] (index i = trajectory token i)."""
    curve = np.asarray(lhat, np.float64)
    return {
        "lhat": curve.astype(np.float32),
        "lhat_delta": delta_lhat(curve).astype(np.float32),
        "lhat_rho": relative_change(curve).astype(np.float32),
        "lhat_log_ratio": log_ratio(curve).astype(np.float32),
    }
