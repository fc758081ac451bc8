"""Behaviour explained by mechanism: ΔL̂_t regressed on per-token implicit updates (docs/methods.md#m12).

Per trajectory token t of every trace with both an L̂ curve (`lhat`) and the `upd_*` arrays
(`updates`), the target is the behavioural change `ΔL̂_t = L̂_{t+1} − L̂_t` (or |ΔL̂_t|) and the
features are grouped in three blocks:

* controls: normalised position t/T, log T, log frequency of the token id among all trajectory
  tokens of the data set, paragraph start;
* mechanism: every `upd_*` metric at every layer (M1–M7 as stored; NaN imputed with the median);
* categories: reflection and delimiter indicators (occurrence-based labels of `TokenSets`).

Models are `RidgeCV` on standardised features (scikit-learn pipeline), evaluated out of fold with
`GroupKFold` by trace, so no trace is in both the training and the test folds. Reported: held-out
R² of each nested model (pooled over folds: 1 − Σ(y − ŷ)² / Σ(y − ȳ)²), and

* partial R² of the categories after controls + mechanism: (SSE_without − SSE_with) / SSE_without,
  i.e. the share of the remaining error that the category indicators remove (≈ 0 or negative when
  the categories add nothing the mechanism does not already carry);
* partial R² of the mechanism after controls + categories.

Bootstrap CIs resample traces (their out-of-fold squared errors), so they are CIs of the held-out
numbers given the fitted folds. Controls run by the same call: shuffled category labels (within
trace; the partial R² of the categories should vanish) and the mechanism features of a random-init
model of the same architecture (does an untrained network's "mechanism" explain behaviour as well?).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from analyses.token_sets import DELIMITER, REFLECTION, TokenSets

__all__ = ["BehaviourFit", "DesignMatrix", "behaviour_design", "fit_behaviour", "format_fit"]

ALPHAS = tuple(np.logspace(-3, 4, 15))
"""RidgeCV's alpha grid (standardised features)."""


@dataclass(frozen=True)
class DesignMatrix:
    """Per-token design of one data set.

    Attributes:
        y: float64 [n_tokens] target.
        controls, mechanism, categories, categories_shuffled: float64 [n_tokens, k] blocks.
        groups: int64 [n_tokens] trace index (GroupKFold groups).
        names: {block: column names}.
    """

    y: np.ndarray
    controls: np.ndarray
    mechanism: np.ndarray
    categories: np.ndarray
    categories_shuffled: np.ndarray
    groups: np.ndarray
    names: dict[str, list[str]]


def behaviour_design(
    lhat: Sequence[np.ndarray],
    values: Mapping[str, Sequence[np.ndarray]],
    sets: Sequence[TokenSets],
    traj_tokens: Sequence[np.ndarray],
    paragraph_start: Sequence[np.ndarray | None],
    *,
    target: str = "delta",
) -> DesignMatrix:
    """Build the per-token design matrix.

    Args:
        lhat: Per trace, float [T+1] L̂ curve.
        values: {metric: per trace float [n_layers, T]}.
        sets: Per trace, its `TokenSets`.
        traj_tokens: Per trace, int [T] trajectory token ids (for the frequency control).
        paragraph_start: Per trace, bool [T] or None.
        target: "delta" (ΔL̂_t) or "abs_delta" (|ΔL̂_t|).

    Returns:
        The `DesignMatrix`.

    Raises:
        ValueError: On shape mismatches or an unknown target.
    """
    if target not in ("delta", "abs_delta"):
        raise ValueError(f"target must be 'delta' or 'abs_delta', got {target!r}.")
    metrics = list(values)
    ids_all = np.concatenate([np.asarray(t, np.int64) for t in traj_tokens]) if traj_tokens else \
        np.zeros(0, np.int64)
    uniq, counts = np.unique(ids_all, return_counts=True)
    freq = dict(zip(uniq.tolist(), np.log(counts).tolist(), strict=True))
    ys, ctrl, mech, cat, cat_sh, groups = [], [], [], [], [], []
    for i, (curve, ts) in enumerate(zip(lhat, sets, strict=True)):
        curve = np.asarray(curve, np.float64)
        T = ts.n_tokens
        if curve.size != T + 1 or len(traj_tokens[i]) != T:
            raise ValueError(f"trace {i}: L̂ has {curve.size} points and {len(traj_tokens[i])} "
                             f"token ids for T = {T} trajectory tokens.")
        if T == 0:
            continue
        d = np.diff(curve)
        ys.append(np.abs(d) if target == "abs_delta" else d)
        pos = (np.arange(T) + 0.5) / T
        ps = paragraph_start[i]
        ps = np.zeros(T) if ps is None else np.asarray(ps, np.float64)
        f = np.array([freq[int(t)] for t in traj_tokens[i]], np.float64)
        ctrl.append(np.column_stack([pos, np.full(T, math.log(T)), f, ps]))
        cols = []
        for m in metrics:
            arr = np.asarray(values[m][i], np.float64)
            if arr.ndim != 2 or arr.shape[1] != T:
                raise ValueError(f"trace {i}: {m} has shape {arr.shape}, expected (L, {T}).")
            cols.append(arr.T)
        mech.append(np.hstack(cols))
        cat.append(np.column_stack([ts.labels == REFLECTION, ts.labels == DELIMITER]).astype(float))
        cat_sh.append(np.column_stack([ts.shuffled == REFLECTION,
                                       ts.shuffled == DELIMITER]).astype(float))
        groups.append(np.full(T, i))
    n_layers = [np.asarray(values[m][0]).shape[0] for m in metrics] if values and lhat else []
    names = {
        "controls": ["position", "log_T", "log_token_frequency", "paragraph_start"],
        "mechanism": [f"{m}[L{layer}]" for m, n in zip(metrics, n_layers, strict=True)
                      for layer in range(n)],
        "categories": ["reflection", "delimiter"],
    }
    if not ys:
        raise ValueError("no trajectory tokens to fit.")
    return DesignMatrix(
        y=np.concatenate(ys), controls=np.vstack(ctrl), mechanism=np.vstack(mech),
        categories=np.vstack(cat), categories_shuffled=np.vstack(cat_sh),
        groups=np.concatenate(groups), names=names,
    )


def _oof(X: np.ndarray, y: np.ndarray, groups: np.ndarray, n_splits: int) -> np.ndarray:
    """Out-of-fold predictions of RidgeCV on standardised, median-imputed features."""
    from sklearn.impute import SimpleImputer
    from sklearn.linear_model import RidgeCV
    from sklearn.model_selection import GroupKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    pred = np.empty_like(y)
    for train, test in GroupKFold(n_splits=n_splits).split(X, y, groups):
        model = make_pipeline(SimpleImputer(strategy="median", keep_empty_features=True),
                               StandardScaler(), RidgeCV(alphas=ALPHAS))
        model.fit(X[train], y[train])
        pred[test] = model.predict(X[test])
    return pred


def _per_group(err: np.ndarray, groups: np.ndarray, n: int) -> np.ndarray:
    return np.bincount(groups, weights=err, minlength=n)


@dataclass(frozen=True)
class BehaviourFit:
    """Held-out fits of one target.

    Attributes:
        target: "delta" or "abs_delta".
        n_tokens, n_traces, n_splits: Data size and folds.
        r2: {model name: held-out R²} for `controls`, `controls+categories`,
            `controls+mechanism`, `full` (controls + mechanism + categories), `full_shuffled`
            (categories shuffled within trace) and, with a control, `controls+mechanism_random`
            and `full_random` (random-init mechanism).
        partial_r2: {name: value} `categories` (after controls + mechanism), `mechanism` (after
            controls + categories), `categories_shuffled` (the null), and with a control
            `categories_random` (categories after controls + random-init mechanism).
        ci: {name: (low, high)} bootstrap 95% CIs (traces resampled) of `r2["full"]`,
            `r2["controls+mechanism"]` and every partial R².
        features: Column names per block.
    """

    target: str
    n_tokens: int
    n_traces: int
    n_splits: int
    r2: dict[str, float]
    partial_r2: dict[str, float]
    ci: dict[str, tuple[float, float]]
    features: dict[str, list[str]]

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        return {"target": self.target, "n_tokens": self.n_tokens, "n_traces": self.n_traces,
                "n_splits": self.n_splits, "r2": dict(self.r2), "partial_r2": dict(self.partial_r2),
                "ci": {k: list(v) for k, v in self.ci.items()}, "features": self.features}


def fit_behaviour(
    design: DesignMatrix,
    *,
    control_mechanism: np.ndarray | None = None,
    n_splits: int = 5,
    n_boot: int = 1000,
    seed: int = 0,
    target: str = "delta",
) -> BehaviourFit:
    """Fit the nested models out of fold and compute R², partial R² and bootstrap CIs.

    Args:
        design: From `behaviour_design`.
        control_mechanism: The mechanism block of a random-init model, rows aligned with
            `design` (same traces and tokens), or None.
        n_splits: GroupKFold folds (capped at the number of traces).
        n_boot: Bootstrap resamples of traces.
        seed: Bootstrap seed.
        target: Label stored with the result.

    Returns:
        The `BehaviourFit`.

    Raises:
        ValueError: With fewer than 2 traces, or a control block of the wrong shape.
    """
    g = design.groups
    uniq = np.unique(g)
    if uniq.size < 2:
        raise ValueError("the behaviour fit needs at least 2 traces with L̂ and update arrays "
                         "(GroupKFold by trace).")
    k = min(n_splits, uniq.size)
    _, g = np.unique(g, return_inverse=True)
    y = design.y
    C, M, K, Ks = design.controls, design.mechanism, design.categories, design.categories_shuffled
    models = {
        "controls": C,
        "controls+categories": np.hstack([C, K]),
        "controls+mechanism": np.hstack([C, M]),
        "full": np.hstack([C, M, K]),
        "full_shuffled": np.hstack([C, M, Ks]),
    }
    if control_mechanism is not None:
        if control_mechanism.shape != M.shape:
            raise ValueError(f"random-init mechanism block has shape {control_mechanism.shape}, "
                             f"the model's {M.shape}.")
        models["controls+mechanism_random"] = np.hstack([C, control_mechanism])
        models["full_random"] = np.hstack([C, control_mechanism, K])
    n_g = uniq.size
    sse = {name: _per_group((y - _oof(X, y, g, k)) ** 2, g, n_g) for name, X in models.items()}
    sst = _per_group((y - y.mean()) ** 2, g, n_g)

    def r2(s, t):
        return float(1.0 - s.sum() / t.sum()) if t.sum() > 0 else float("nan")

    def partial(with_, without):
        return float((without.sum() - with_.sum()) / without.sum()) if without.sum() > 0 \
            else float("nan")

    partial_defs = {
        "categories": ("full", "controls+mechanism"),
        "mechanism": ("full", "controls+categories"),
        "categories_shuffled": ("full_shuffled", "controls+mechanism"),
    }
    if control_mechanism is not None:
        partial_defs["categories_random"] = ("full_random", "controls+mechanism_random")
    r2s = {name: r2(s, sst) for name, s in sse.items()}
    partials = {name: partial(sse[a], sse[b]) for name, (a, b) in partial_defs.items()}

    rng = np.random.default_rng(seed)
    boots: dict[str, list[float]] = {n: [] for n in ["full", "controls+mechanism", *partial_defs]}
    for _ in range(n_boot):
        idx = rng.integers(0, n_g, n_g)
        t = sst[idx].sum()
        boots["full"].append(1 - sse["full"][idx].sum() / t if t > 0 else np.nan)
        boots["controls+mechanism"].append(
            1 - sse["controls+mechanism"][idx].sum() / t if t > 0 else np.nan)
        for name, (a, b) in partial_defs.items():
            den = sse[b][idx].sum()
            boots[name].append((den - sse[a][idx].sum()) / den if den > 0 else np.nan)
    ci = {}
    for name, vals in boots.items():
        v = np.asarray(vals, float)
        v = v[~np.isnan(v)]
        ci[name] = ((float(np.quantile(v, 0.025)), float(np.quantile(v, 0.975))) if v.size
                    else (float("nan"), float("nan")))
    return BehaviourFit(target=target, n_tokens=int(y.size), n_traces=int(n_g), n_splits=k,
                        r2=r2s, partial_r2=partials, ci=ci, features=design.names)


def format_fit(fit: BehaviourFit) -> str:
    """Human summary of one fit."""
    def ci(name):
        lo, hi = fit.ci.get(name, (float("nan"), float("nan")))
        return f"[{lo:.3g}, {hi:.3g}]"

    label = "ΔL̂_t" if fit.target == "delta" else "|ΔL̂_t|"
    lines = [f"{label} explained by per-token features ({fit.n_tokens} tokens, {fit.n_traces} "
             f"traces, {fit.n_splits}-fold GroupKFold by trace, held-out R²):"]
    lines.append("  " + ", ".join(f"{k} {v:.3g}" for k, v in fit.r2.items()))
    lines.append(f"  R² full {fit.r2['full']:.3g} {ci('full')}, controls+mechanism "
                 f"{fit.r2['controls+mechanism']:.3g} {ci('controls+mechanism')}")
    for name, v in fit.partial_r2.items():
        lines.append(f"  partial R² of {name}: {v:.3g} {ci(name)}")
    return "\n".join(lines)
