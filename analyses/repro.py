"""RePro process scores on the L̂ curve: magnitude and stability per "\\n\\n" segment (§5, M9).

RePro (Liu, Liu, Zhang, Chen 2025, arXiv 2512.01925) scores how a reasoning trajectory optimises
the surrogate objective

    J̃_t = −L̂_t          (mean answer log-likelihood after t trajectory tokens; §1.3, §5.1)
    J_b  = −L̂_0          (baseline: no reasoning at all)

Baseline choice (recorded in `ReproScores.config`): `L̂_0` is the answer NLL with *no trajectory
token at all*. When the trajectory starts with `<think>` (the template did not add it), the
baseline therefore has no `<think>` either; when the chat template opens `<think>` in the prompt,
the baseline includes it. RePro's own baseline has no thinking at all.

The trajectory is split into segments on "\\n\\n" (`segment_boundaries`); at the end `b_j` of
segment j (a token count, so the point is `J̃_{b_j}`):

* Magnitude (§5.2). Default, the reconstruction `S_magn = 1 − tanh(J̃ / J_b)` [U]: 1 when J̃ = 0
  (answer certain), `1 − tanh 1 ≈ 0.238` when J̃ = J_b (no progress), → 0 as J̃ → −∞.
  `magnitude_form="printed"`: the formula as printed by the secondary sources,
  `tanh(Δ + 1) + 1` with `Δ = (J̃ − J_b) / J_b` [S, UNVERIFIED: its range is [1, 2) and it
  decreases as J̃ improves, contradicting the stated (0, 1]].
* Stability (§5.3). `S_stab = (τ + 1) / 2` with Kendall's τ between the J̃ points up to the
  segment end and their index. τ is **τ-a** as written in §5.3,
  `τ = 2/(n(n−1)) Σ_{i<j} sign(J̃_j − J̃_i) sign(j − i)`: ties in J̃ count 0 and the denominator is
  all pairs. `scipy.stats.kendalltau` returns τ-b (ties shrink the denominator); it is converted
  exactly, `τ_a = τ_b · sqrt(1 − n_ties / n_pairs)` (the index has no ties). `tau_variant="b"`
  keeps scipy's τ-b. Points [U]: `stability_points="tokens"` (default; every prefix t = 0..b_j)
  or `"segments"` (the baseline and the segment ends); `include_baseline` decides whether t = 0
  is a point; `ema_alpha` smooths the token-level J̃ first (EMA, `analyses.lhat_effects.ema`).
* Composite (§5.4): `S = (1 − w) S_magn + w S_stab` (the ablation "smaller w is better" supports
  this form; `weight_form="swapped"` gives the other source's `w S_magn + (1 − w) S_stab`
  [S, UNVERIFIED]). The paper's value of w is not known here; the default w = 0.5 is neutral.
* Segment rewards: `r̃_1 = S_1`, `r̃_j = S_j − S_{j−1}`.

RePro scores only the top-k segments by first-token entropy; pass those segments' ends (e.g.
`ends[top_entropy_segments(h, k)]`) to score just them.

Pure numpy/scipy; no I/O.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from scipy import stats

from analyses.lhat_effects import ema
from analyses.token_sets import paragraph_starts

__all__ = [
    "ReproScores",
    "kendall_tau",
    "magnitude_score",
    "repro_scores",
    "segment_boundaries",
    "stability_score",
    "top_entropy_segments",
]

_MAGNITUDE_FORMS = ("reconstructed", "printed")
_POINTS = ("tokens", "segments")
_WEIGHT_FORMS = ("magn_first", "swapped")


def segment_boundaries(token_strings: Sequence[str]) -> list[int]:
    """Segment ends of a trajectory split on "\\n\\n", as token counts.

    A new segment starts at every token whose first non-whitespace character follows a whitespace
    run with at least two newlines (`analyses.lhat_effects.paragraph_starts`), provided some
    non-whitespace text came before (leading blank lines do not make an empty segment). The "\\n\\n"
    tokens themselves end the previous segment; trailing whitespace stays in the last one. So
    segments tile the trajectory and none is empty.

    Args:
        token_strings: Decoded text of every trajectory token.

    Returns:
        Increasing segment ends `[b_1, ..., b_J]` with `b_J = T` (segment j covers tokens
        `[b_{j−1}, b_j)`, `b_0 = 0`; the L̂ point after segment j is `lhat[b_j]`); `[]` for T = 0.
    """
    n = len(token_strings)
    if n == 0:
        return []
    content = [i for i, s in enumerate(token_strings) if s.strip()]
    first_content = content[0] if content else n
    starts = np.flatnonzero(paragraph_starts(token_strings))
    return [int(i) for i in starts if i > first_content] + [n]


def top_entropy_segments(first_token_entropy: np.ndarray | Sequence[float], k: int) -> np.ndarray:
    """Indices of the k segments with the highest first-token entropy, in trajectory order.

    Args:
        first_token_entropy: float [J] entropy of the next-token distribution at the position
            that predicts each segment's first token (docs/methods.md#not-yet).
        k: How many to keep (RePro: 10, 20 or 30).

    Returns:
        int64 [min(k, J)] sorted segment indices (NaN entropies rank last).
    """
    h = np.asarray(first_token_entropy, dtype=np.float64)
    order = np.argsort(np.where(np.isnan(h), np.inf, -h), kind="stable")
    return np.sort(order[: max(0, min(k, h.size))])


def kendall_tau(values: np.ndarray | Sequence[float], variant: str = "a") -> float:
    """Kendall's τ between `values` and their index 0..n−1.

    Args:
        values: float [n].
        variant: `"a"` (§5.3: ties count 0, denominator n(n−1)/2) or `"b"` (scipy's default).

    Returns:
        τ in [−1, 1]; NaN for n < 2 or NaN values; τ-a = 0 (τ-b NaN) when all values tie.
    """
    y = np.asarray(values, dtype=np.float64)
    n = y.size
    if n < 2 or np.any(np.isnan(y)):
        return float("nan")
    n_pairs = n * (n - 1) / 2
    _, counts = np.unique(y, return_counts=True)
    n_ties = float(np.sum(counts * (counts - 1) / 2))
    if n_ties == n_pairs:
        return 0.0 if variant == "a" else float("nan")
    tau_b = float(stats.kendalltau(np.arange(n), y).statistic)
    if variant == "b":
        return tau_b
    if variant != "a":
        raise ValueError(f"variant must be 'a' or 'b', got {variant!r}.")
    return tau_b * float(np.sqrt(1.0 - n_ties / n_pairs))


def magnitude_score(
    j_tilde: np.ndarray | float, j_b: float, form: str = "reconstructed"
) -> np.ndarray:
    """RePro magnitude score (§5.2).

    Args:
        j_tilde: J̃ value(s) (= −L̂).
        j_b: Baseline J_b (= −L̂_0).
        form: `"reconstructed"` `1 − tanh(J̃/J_b)` [U, default] or `"printed"`
            `tanh(Δ+1) + 1`, `Δ = (J̃ − J_b)/J_b` [S, UNVERIFIED; range [1, 2)].

    Returns:
        float64 array shaped like `j_tilde`; NaN where J_b = 0.
    """
    if form not in _MAGNITUDE_FORMS:
        raise ValueError(f"form must be one of {_MAGNITUDE_FORMS}, got {form!r}.")
    j = np.asarray(j_tilde, dtype=np.float64)
    if j_b == 0 or np.isnan(j_b):
        return np.full(j.shape, np.nan)
    if form == "reconstructed":
        return 1.0 - np.tanh(j / j_b)
    delta = (j - j_b) / j_b
    return np.tanh(delta + 1.0) + 1.0


def stability_score(values: np.ndarray | Sequence[float], variant: str = "a") -> float:
    """RePro stability score `(τ + 1) / 2` of a J̃ sequence against its index (§5.3).

    Args:
        values: J̃ points in order.
        variant: Kendall τ variant (`kendall_tau`).

    Returns:
        In [0, 1]: 1 for a strictly increasing (improving) J̃, 0 for a strictly decreasing one;
        NaN for fewer than two points.
    """
    return (kendall_tau(values, variant) + 1.0) / 2.0


@dataclass(frozen=True)
class ReproScores:
    """RePro scores of one trace at its segment ends.

    Attributes:
        segment_ends: int64 [J] token counts b_j (the point after segment j is `lhat[b_j]`).
        j_tilde: float64 [J] J̃ = −L̂ at the segment ends (unsmoothed).
        j_b: Baseline J_b = −L̂_0.
        s_magn: float64 [J] magnitude scores.
        s_stab: float64 [J] stability scores (NaN where fewer than two points).
        score: float64 [J] composite S_j.
        reward: float64 [J] segment rewards r̃_j = S_j − S_{j−1} (r̃_1 = S_1).
        config: The options used (forms, points, w, EMA, τ variant, baseline).
        unverified: Human-readable labels of the [S]/[U] choices in effect.
    """

    segment_ends: np.ndarray
    j_tilde: np.ndarray
    j_b: float
    s_magn: np.ndarray
    s_stab: np.ndarray
    score: np.ndarray
    reward: np.ndarray
    config: dict[str, Any] = field(default_factory=dict)
    unverified: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (arrays as lists)."""
        d = asdict(self)
        for k, v in d.items():
            if isinstance(v, np.ndarray):
                d[k] = v.tolist()
        d["unverified"] = list(self.unverified)
        return d


def repro_scores(
    lhat: np.ndarray | Sequence[float],
    segment_ends: Sequence[int] | np.ndarray,
    *,
    w: float = 0.5,
    magnitude_form: str = "reconstructed",
    stability_points: str = "tokens",
    include_baseline: bool = True,
    ema_alpha: float | None = None,
    weight_form: str = "magn_first",
    tau_variant: str = "a",
) -> ReproScores:
    """RePro magnitude, stability, composite scores and segment rewards of one trace (M9).

    Args:
        lhat: float [T+1] L̂ curve (`lhat[0]`: no trajectory; see the module docstring for the
            baseline and `<think>`).
        segment_ends: Increasing token counts in 1..T (`segment_boundaries`, or a subset such as the
            top-entropy segments).
        w: Stability weight in [0, 1].
        magnitude_form: `"reconstructed"` (default) or `"printed"` [UNVERIFIED].
        stability_points: `"tokens"`: τ over every prefix point up to the segment end;
            `"segments"`: over the segment-end points only. [U]
        include_baseline: Whether the t = 0 point (J_b) is one of the stability points.
        ema_alpha: EMA-smooth the token-level J̃ before taking stability points (None: no
            smoothing). Magnitude always uses the raw J̃.
        weight_form: `"magn_first"`: `S = (1 − w) S_magn + w S_stab` (default);
            `"swapped"`: `S = w S_magn + (1 − w) S_stab` [S, UNVERIFIED].
        tau_variant: `"a"` (§5.3, default) or `"b"`.

    Returns:
        The `ReproScores`.

    Raises:
        ValueError: Bad options or segment ends outside 1..T / not increasing.
    """
    curve = np.asarray(lhat, dtype=np.float64)
    if curve.ndim != 1 or curve.size < 1:
        raise ValueError(f"lhat must be 1-D [T+1], got shape {curve.shape}.")
    n_tok = curve.size - 1
    ends = np.asarray(segment_ends, dtype=np.int64).reshape(-1)
    if ends.size and (ends[0] < 1 or ends[-1] > n_tok or np.any(np.diff(ends) <= 0)):
        raise ValueError(f"segment_ends must increase within 1..T = {n_tok}; got {ends[:8]}...")
    if magnitude_form not in _MAGNITUDE_FORMS:
        raise ValueError(f"magnitude_form must be one of {_MAGNITUDE_FORMS}.")
    if stability_points not in _POINTS:
        raise ValueError(f"stability_points must be one of {_POINTS}.")
    if weight_form not in _WEIGHT_FORMS:
        raise ValueError(f"weight_form must be one of {_WEIGHT_FORMS}.")
    if not 0.0 <= w <= 1.0:
        raise ValueError(f"w must be in [0, 1], got {w}.")

    j_all = -curve  # J̃_t, t = 0..T
    j_b = float(j_all[0])
    j_seg = j_all[ends]
    s_magn = magnitude_score(j_seg, j_b, magnitude_form)

    smooth = ema(j_all, ema_alpha) if ema_alpha is not None else j_all
    first = 0 if include_baseline else 1
    s_stab = np.empty(ends.size)
    for k, b in enumerate(ends):
        if stability_points == "tokens":
            pts = smooth[first : b + 1]
        else:
            pts = smooth[ends[: k + 1]]
            if include_baseline:
                pts = np.concatenate([smooth[:1], pts])
        s_stab[k] = stability_score(pts, tau_variant)

    if weight_form == "magn_first":
        score = (1.0 - w) * s_magn + w * s_stab
    else:
        score = w * s_magn + (1.0 - w) * s_stab
    reward = np.diff(score, prepend=0.0) if score.size else score.copy()

    unverified = ["stability points and baseline inclusion [U]",
                  "S_magn reconstruction 1 - tanh(J/J_b) [U]" if magnitude_form == "reconstructed"
                  else "S_magn printed form tanh(delta+1)+1 [S, UNVERIFIED: range [1, 2)]",
                  "composite w (paper value unknown) [S]"]
    if weight_form == "swapped":
        unverified.append("composite swapped form w*S_magn + (1-w)*S_stab [S, UNVERIFIED]")
    return ReproScores(
        segment_ends=ends,
        j_tilde=j_seg,
        j_b=j_b,
        s_magn=s_magn,
        s_stab=s_stab,
        score=score,
        reward=reward,
        config={
            "w": w, "magnitude_form": magnitude_form, "stability_points": stability_points,
            "include_baseline": include_baseline, "ema_alpha": ema_alpha,
            "weight_form": weight_form, "tau_variant": tau_variant,
            "baseline": "L̂ with no trajectory token (t = 0)",
        },
        unverified=tuple(unverified),
    )
