"""Calibration and power of the category comparisons, measured: null label sets, planted effects,
false-positive rates with their binomial CIs, family-wise error after Holm, power and the minimum
detectable effect.

The null: a trace's trajectory labels (category, phrase id, first-token flag) shifted circularly by
a random offset (`shift_labels`). Every run length, gap and phrase survives; only the alignment of
labels with the measured values is broken, so any "reflection differs" verdict on shifted labels is
a false positive. Planted effects (`plant`) multiply a non-negative per-token metric at the shifted
reflection tokens by 1 + effect, so the ground truth of a power run is known.

Pure numpy/scipy; no I/O. Entry points: `shift_labels`, `plant`, `rate_rows`, `family_rate`,
`min_detectable_effect`, `mde_at` (the MDE of a stored power grid at a given n).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from analyses.inference import rate_ci
from analyses.token_sets import REFLECTION

__all__ = ["family_rate", "mde_at", "min_detectable_effect", "plant", "rate_rows", "shift_labels"]


def shift_labels(
    category: np.ndarray,
    phrase_id: np.ndarray | None,
    is_first: np.ndarray | None,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """One trace's trajectory labels rolled by a uniform offset in [1, T − 1] (the null).

    Args:
        category, phrase_id, is_first: Trajectory-only arrays [T] (phrase_id / is_first may be
            None).
        rng: Generator.

    Returns:
        The three arrays rolled by the same offset (None stays None).
    """
    cat = np.asarray(category)
    T = cat.size
    k = int(rng.integers(1, T)) if T > 1 else 0

    def roll(a):
        return None if a is None else np.roll(np.asarray(a), k)

    return roll(cat), roll(phrase_id), roll(is_first)


def plant(values: np.ndarray, labels: np.ndarray, effect: float) -> np.ndarray:
    """`values` [..., T] with the tokens labelled reflection scaled by 1 + effect (ground truth)."""
    out = np.array(values, dtype=np.float64, copy=True)
    out[..., np.asarray(labels) == REFLECTION] *= 1.0 + effect
    return out


def rate_rows(hits: Mapping[str, Sequence[bool]], *, level: float = 0.95) -> list[dict[str, Any]]:
    """Per test: reps, hits, rate and its exact binomial CI (`analyses.inference.rate_ci`).

    Args:
        hits: Test name → one bool per run (e.g. p < α; runs where the test was not testable
            are left out by the caller).
        level: CI coverage.

    Returns:
        One dict per test: `test`, `n_runs`, `n_hits`, `rate`, `ci`.
    """
    rows = []
    for name, h in hits.items():
        hit = np.asarray(h, bool)
        k, n = int(hit.sum()), int(hit.size)
        rows.append({"test": name, "n_runs": n, "n_hits": k,
                     "rate": k / n if n else float("nan"), "ci": list(rate_ci(k, n, level))})
    return rows


def family_rate(any_hit: Sequence[bool], *, level: float = 0.95) -> dict[str, Any]:
    """Share of runs with at least one Holm-significant test (the family-wise error under a null)."""
    (row,) = rate_rows({"family": any_hit}, level=level)
    return row


def min_detectable_effect(effects: Sequence[float], power: Sequence[float],
                          target: float = 0.8) -> float:
    """Smallest planted effect whose measured power reaches `target`, linearly interpolated between
    the grid points (NaN when no grid point reaches it; the first point when it already does)."""
    e = np.asarray(effects, float)
    p = np.asarray(power, float)
    order = np.argsort(e)
    e, p = e[order], p[order]
    above = np.flatnonzero(p >= target)
    if above.size == 0:
        return float("nan")
    i = int(above[0])
    if i == 0:
        return float(e[0])
    return float(e[i - 1] + (target - p[i - 1]) * (e[i] - e[i - 1]) / (p[i] - p[i - 1]))


def mde_at(grid: Sequence[Mapping[str, Any]], n: int, target: float = 0.8) -> dict[str, Any]:
    """The minimum detectable effect for a comparison over `n` traces, read from a measured power
    grid (rows with `n_traces`, `effect`, `power`, as `probes.readouts.calibration --power` writes
    them).

    Power rises with n, so the MDE at `n` is at most the one measured at the largest grid size not
    above `n`; that size's MDE is returned (conservative between grid sizes, never extrapolated
    beyond them).

    Returns:
        `{"n_measured": size used or None (n below every size), "mde": effect or NaN (not reached
        on the grid), "max_effect": the largest effect measured at that size, "target": target}`.
    """
    sizes = sorted({int(g["n_traces"]) for g in grid if int(g["n_traces"]) <= n})
    out: dict[str, Any] = {"n_measured": None, "mde": float("nan"), "max_effect": float("nan"),
                           "target": target}
    if not sizes:
        return out
    m = sizes[-1]
    cells = sorted((float(g["effect"]), float(g["power"])) for g in grid
                   if int(g["n_traces"]) == m and float(g["effect"]) > 0)
    out["n_measured"] = m
    out["max_effect"] = cells[-1][0] if cells else float("nan")
    out["mde"] = min_detectable_effect([e for e, _ in cells], [p for _, p in cells], target)
    return out
