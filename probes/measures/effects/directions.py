"""Behaviour directions (Venhoff et al. 2025) and the implicit updates' alignment with them
(docs/methods.md#directions; M11).

* `trajectory_residuals`: `resid_post` of every layer at the trajectory tokens of one trace
  ([L, T, d], one plain HF forward, `hooks.run_residual_hf`).
* `DirectionAccumulator`: running sums over traces. For category c, each occurrence (a maximal run
  of consecutive trajectory tokens of category c, starting at s) contributes the mean of its window
  `[s − 1, s + window)` clipped to the trajectory (the token before the span and up to `window`
  tokens from its start; the paper caps its windows the same way); the "overall" mean is the mean
  of each trace's trajectory tokens, averaged over traces. `directions()` gives
  `u^c_ℓ = (mean_c − mean_overall)` rescaled to `‖mean_overall,ℓ‖` (as the paper rescales).
* `projections`: `π^{ℓ,c}_t = û^c_ℓ · h^ℓ_t` per token (unit direction).
* `loo_residual`: M4's residual-space leave-one-out context vector `δ^ℓ_{q,t} = Σ_h W_O^h δz_{q,h,t}`
  at the first answer row (the M5 bias / steering-vector term of token t), and `cosines` of it with
  a direction: does a reflection's implicit update point along the reflection direction?
* `probe_accuracy`: the logistic-regression alternative (scikit-learn): per layer, category-c tokens
  against ordinary tokens (balanced), trained on some traces and scored on held-out traces, with
  the shuffled-label control (labels permuted within the training traces).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from jaxtyping import Float, Float32

from hooks import run_residual_hf
from hooks.model import LoadedModel
from probes.errors import ProbesError

DIRECTION_CATEGORIES = ("reflection", "delimiter")
"""Categories that get a direction (axis C of the stored `dir_*` arrays, in this order)."""

WINDOW = 10
"""Tokens from the span start in an occurrence's window (plus the token before)."""


class DirectionsError(ProbesError, ValueError):
    """Too little data for a direction or a probe."""


def trajectory_residuals(loaded: LoadedModel, ids: np.ndarray, trajectory: tuple[int, int]
                         ) -> Float32[np.ndarray, "l t d"]:
    """`resid_post` of every layer at the trajectory tokens [L, T, d] (float32, CPU)."""

    a, b = trajectory
    sites = [f"L{layer}.resid_post" for layer in range(loaded.arch.n_layers)]
    ids_t = torch.as_tensor(np.asarray(ids[:b]), dtype=torch.long).reshape(1, -1).to(loaded.device)
    with torch.no_grad():
        got = run_residual_hf(loaded, ids_t, sites, positions=slice(a, b), dtype="float32",
                              device="cpu").by_name()
    return np.stack([got[s].numpy() for s in sites]).astype(np.float32)


def occurrence_windows(is_cat: np.ndarray, window: int = WINDOW) -> list[tuple[int, int]]:
    """Windows `[s − 1, s + window)` (clipped to [0, T)) of each maximal run of True in `is_cat`."""
    is_cat = np.asarray(is_cat, bool)
    T = is_cat.size
    starts = np.flatnonzero(is_cat & ~np.concatenate([[False], is_cat[:-1]]))
    return [(max(int(s) - 1, 0), min(int(s) + window, T)) for s in starts]


@dataclass
class DirectionAccumulator:
    """Running sums for the difference-of-means directions over traces.

    Attributes:
        categories: Category names (axis C).
        window: See `occurrence_windows`.
    """

    categories: Sequence[str] = DIRECTION_CATEGORIES
    window: int = WINDOW
    sums: dict[str, np.ndarray] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    overall_sum: np.ndarray | None = None
    n_traces: int = 0

    def add(self, resid: Float[np.ndarray, "l t d"], category: Sequence[str] | np.ndarray) -> None:
        """Add one trace: its residuals [L, T, d] and its tokens' category names [T]."""
        resid = np.asarray(resid, np.float64)
        category = np.asarray(category)
        if resid.shape[1] == 0:
            return
        overall = resid.mean(axis=1)
        self.overall_sum = overall if self.overall_sum is None else self.overall_sum + overall
        self.n_traces += 1
        for c in self.categories:
            for lo, hi in occurrence_windows(category == c, self.window):
                m = resid[:, lo:hi].mean(axis=1)
                self.sums[c] = self.sums.get(c, 0.0) + m
                self.counts[c] = self.counts.get(c, 0) + 1

    def directions(self) -> dict[str, Float[np.ndarray, "l d"]]:
        """`u^c_ℓ` [L, d] per category with at least one occurrence (scaled to ‖mean_overall,ℓ‖).

        Raises:
            DirectionsError: Without any trace.
        """
        if self.overall_sum is None:
            raise DirectionsError("no trace with trajectory tokens: no direction can be computed")
        overall = self.overall_sum / self.n_traces
        out = {}
        for c in self.categories:
            if not self.counts.get(c):
                continue
            diff = self.sums[c] / self.counts[c] - overall
            norm = np.linalg.norm(diff, axis=-1, keepdims=True)
            out[c] = diff / np.maximum(norm, 1e-30) * np.linalg.norm(overall, axis=-1, keepdims=True)
        return out


def projections(resid: Float[np.ndarray, "l t d"], direction: Float[np.ndarray, "l d"]
                ) -> Float[np.ndarray, "l t"]:
    """`π_t = û_ℓ · h^ℓ_t` per layer and token (û = the unit direction)."""
    unit = direction / np.maximum(np.linalg.norm(direction, axis=-1, keepdims=True), 1e-30)
    return np.einsum("ltd,ld->lt", np.asarray(resid, np.float64), unit)


def loo_residual(dz: Float[torch.Tensor, "t h d_h"], w_o: Float[torch.Tensor, "d hd"]
                 ) -> Float[np.ndarray, "t d"]:
    """M4's residual-space LOO vector `δ_t = W_O δz_t` (b_O cancels) of every token at one row."""
    flat = dz.reshape(dz.shape[0], -1).to(torch.float64)
    return (flat @ w_o.detach().to(torch.float64, copy=False).to(flat.device).T).cpu().numpy()


def cosines(vectors: Float[np.ndarray, "t d"], direction: Float[np.ndarray, " d"]
            ) -> Float[np.ndarray, " t"]:
    """cos(vector_t, direction) (NaN for a zero vector)."""
    v = np.asarray(vectors, np.float64)
    u = np.asarray(direction, np.float64)
    den = np.linalg.norm(v, axis=-1) * np.linalg.norm(u)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, v @ u / den, np.nan)


def probe_accuracy(features: Sequence[np.ndarray], labels: Sequence[np.ndarray], *, test_share: float = 0.25,
                   max_per_class: int = 2000, seed: int = 0) -> dict[str, list[float] | int]:
    """Held-out accuracy of a per-layer logistic-regression probe, with the shuffled-label control.

    Args:
        features: Per trace, residuals of its candidate tokens [L, n_i, d].
        labels: Per trace, 1 = category token, 0 = ordinary [n_i].
        test_share: Share of the traces held out (split by trace, never by token).
        max_per_class: Balance: at most this many tokens of each class in train and in test (the
            larger class is subsampled to the smaller one's size).
        seed: Seed of the split, the subsampling and the shuffle.

    Returns:
        accuracy and shuffled_accuracy per layer (balanced classes, so chance = 0.5), n_train,
        n_test (tokens), n_test_traces.

    Raises:
        DirectionsError: Fewer than 2 traces with both classes on either side of the split.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(seed)
    usable = [i for i, y in enumerate(labels) if len(y)]
    if len(usable) < 4:
        raise DirectionsError(f"the probe needs at least 4 traces with candidate tokens, got "
                              f"{len(usable)}")
    order = rng.permutation(usable)
    n_test = max(1, int(round(test_share * len(order))))
    parts = {"test": order[:n_test], "train": order[n_test:]}

    def stack(idx, shuffle: bool):
        X = np.concatenate([features[i] for i in idx], axis=1)
        y = np.concatenate([labels[i] for i in idx]).astype(int)
        if shuffle:  # within each trace, so the per-trace class balance is kept
            y = np.concatenate([rng.permutation(np.asarray(labels[i], int)) for i in idx])
        pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
        k = min(len(pos), len(neg), max_per_class)
        if k < 2:
            raise DirectionsError("the probe needs at least 2 tokens of each class on both sides "
                                  "of the trace split")
        keep = np.concatenate([rng.choice(pos, k, replace=False), rng.choice(neg, k, replace=False)])
        return X[:, keep], y[keep]

    Xtr, ytr = stack(parts["train"], False)
    Xte, yte = stack(parts["test"], False)
    Xsh, ysh = stack(parts["train"], True)
    acc, sh = [], []
    for layer in range(Xtr.shape[0]):
        clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
        acc.append(float(clf.fit(Xtr[layer], ytr).score(Xte[layer], yte)))
        clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
        sh.append(float(clf.fit(Xsh[layer], ysh).score(Xte[layer], yte)))
    return {"accuracy": acc, "shuffled_accuracy": sh, "n_train": int(len(ytr)),
            "n_test": int(len(yte)), "n_test_traces": int(n_test)}
