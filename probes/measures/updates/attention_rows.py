"""M1–M4 at every answer row at once, head-aggregated (`--answer-rows mean`; docs/methods.md#m1).

`key_summary_from` computes, from one `QueryRowsCapture`, only what `updates` stores for chosen
keys: per layer, row and key the mean attention mass, the summed-head contribution and
leave-one-out norms, and the Dai norm (`KeySummary`, [L, R, T]); keys and values are processed
once for all rows, in blocks bounded by `_SUMMARY_BUDGET`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from jaxtyping import Float, Float64, Int, Shaped
from torch import Tensor

from hooks.model import LoadedModel
from probes.measures.updates import PRECISIONS
from probes.measures.updates.attention import QueryRowsCapture, UpdatesError, o_proj_weights

_SUMMARY_BUDGET = 2**26
"""Elements (float64) of one [T, rows, d] product in `key_summary_from` (512 MiB): rows are
processed in chunks of at most this size."""


@dataclass
class KeySummary:
    """The head-aggregated M1–M4 quantities at several query rows for a set of keys (float64).

    What `python -m probes.run updates` stores, per row; shapes: L layers, R rows, T keys.

    Attributes:
        rows: The query rows [R].
        keys: The key positions [T] (all <= rows[0]; int, float64 when empty).
        mass: M1 attention mass p averaged over the query heads [L, R, T].
        contrib_sum_norm: M2 ‖Σ_h p W_O^h v_t‖ [L, R, T].
        loo_sum_norm: M4 ‖Σ_h W_O^h δz_{h,t}‖ [L, R, T].
        dai_fro: M3 ‖v_t‖‖k̃_t‖ summed over the KV heads [L, T] (does not depend on the row).
    """

    rows: Int[np.ndarray, " r"]
    keys: Shaped[np.ndarray, " t"]
    mass: Float64[np.ndarray, "l r t"]
    contrib_sum_norm: Float64[np.ndarray, "l r t"]
    loo_sum_norm: Float64[np.ndarray, "l r t"]
    dai_fro: Float64[np.ndarray, "l t"]


def key_summary_from(loaded: LoadedModel, cap: QueryRowsCapture, keys: Sequence[int],
                     weights: list[tuple[Float[Tensor, "d_model hd"],
                                         Float[Tensor, " d_model"] | None]] | None = None,
                     precision: str = "float64") -> KeySummary:
    """The head-aggregated M1–M4 quantities of `keys` at every row of a capture (no forward).

    Equal (to float rounding) to the same keys of `token_updates_from` at each row:
    `mass.mean(heads)`, `contrib_sum_norm`, `loo_sum_norm`, `dai_fro.sum(kv heads)`, but only the
    requested keys are touched and no per-head [H, T, d] norm is formed: per layer W_O^h v_t is
    computed once for the keys, then for all rows at once (batched matrix products, in chunks of
    rows) Σ_h p W_O^h v_t and Σ_h W_O^h δz = Σ_h p/(1−p) (W_O^h v_t − W_O^h z_h).

    Args:
        loaded: The model the capture came from.
        cap: A `capture_query_rows` / `query_rows_capture` capture (computed on its device).
        keys: Key positions, strictly increasing, all <= the first row (e.g. the trajectory).
        weights: `o_proj_weights(loaded)`, or None to read them now.
        precision: "float64" (the reference) or "float32": with at most `_FEW_ROWS` rows every
            product in float32 (the captures are float32 already and no difference of rounded
            sums is formed: M2 / M4 are norms of W_O times p ⊙ v_t, resp. coef ⊙ (v_t − z) with
            both operands captured values; M1 a mean of probabilities; M3 products of norms),
            within the bounds of docs/methods.md#precision; with more rows float64 (see there).

    Returns:
        The per-row, per-key quantities.

    Raises:
        UpdatesError: For keys that are not strictly increasing or come after the first row.
    """
    weights = o_proj_weights(loaded) if weights is None else weights
    key_list = [int(t) for t in keys]
    if key_list != sorted(set(key_list)) or (key_list and (key_list[0] < 0
                                                          or key_list[-1] > cap.rows[0])):
        raise UpdatesError(f"keys must be strictly increasing positions in [0, {cap.rows[0]}]; "
                           f"got {key_list[:5]}{'...' if len(key_list) > 5 else ''}")
    if precision not in PRECISIONS:
        raise UpdatesError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    R, T, d = len(cap.rows), len(key_list), int(weights[0][0].shape[0])
    # float32 only on the few-rows path: `_many_rows` forms M4 as Σ coef W_O v − Σ coef W_O z,
    # a difference of sums that cancels where p → 1
    work = torch.float32 if precision == "float32" and R <= _FEW_ROWS else torch.float64
    dev = cap.pattern[0].device
    idx = torch.as_tensor(key_list, dtype=torch.long, device=dev)
    chunk = max(1, _SUMMARY_BUDGET // max(T * d, 1))        # rows per [T, rows, d] product
    out: dict[str, list[Tensor]] = {k: [] for k in ("mass", "contrib_sum_norm", "loo_sum_norm",
                                                    "dai_fro")}
    for l in range(loaded.arch.n_layers):
        k_t = cap.rot_k[l][idx].to(work)                                  # [T, H_kv, d_h]
        v_t = cap.v[l][idx].to(work)
        H = cap.rot_q[l].shape[1]
        w = weights[l][0].detach().to(dev, work).reshape(d, H, -1)        # [d, H, d_h]
        v_h = v_t.repeat_interleave(H // v_t.shape[1], dim=1)             # [T, H, d_h]
        p = cap.pattern[l][:, :, idx].to(work)                            # [H, R, T]
        z = cap.z[l].to(work)                                             # [R, H, d_h]
        coef = p / (1.0 - p)                                              # δz = coef (v_t − z)
        if R <= _FEW_ROWS:
            contrib, loo = _few_rows(w, v_h, p, coef, z)
        else:
            contrib, loo = _many_rows(w, v_h, p, coef, z, chunk)
        out["mass"].append(p.mean(0))
        out["contrib_sum_norm"].append(contrib)
        out["loo_sum_norm"].append(loo)
        out["dai_fro"].append((v_t.norm(dim=-1) * k_t.norm(dim=-1)).sum(-1))
    arrays = {k: torch.stack(v).to(torch.float64).cpu().numpy() for k, v in out.items()}
    return KeySummary(rows=np.asarray(cap.rows), keys=np.asarray(key_list), **arrays)


_FEW_ROWS = 2
"""Up to this many rows, M2 / M4 are one matrix product per row (`_few_rows`); above it W_O^h v_t
is formed once for all rows (`_many_rows`)."""


def _few_rows(w: Float[Tensor, "d h e"], v_h: Float[Tensor, "t h e"],
              p: Float[Tensor, "h r t"], coef: Float[Tensor, "h r t"],
              z: Float[Tensor, "r h e"]) -> tuple[Tensor, Tensor]:
    """M2 and M4 [R, T] row by row: Σ_h p W_O^h v_t = W_O (p ⊙ v_t) over the concatenated heads,
    one [T, H·d_h] × [H·d_h, d] product (and the same for δz = coef (v_t − z)); no [T, H, d]."""
    T, H, e = v_h.shape
    w_o = w.reshape(w.shape[0], H * e)                                # [d, H·d_h]
    contrib, loo = [], []
    for r in range(p.shape[1]):
        both = torch.empty(2, T, H, e, dtype=v_h.dtype, device=v_h.device)
        torch.mul(p[:, r].T[:, :, None], v_h, out=both[0])            # p_{h,t} v_{h,t}
        torch.sub(v_h, z[r][None], out=both[1])
        both[1].mul_(coef[:, r].T[:, :, None])                        # δz = coef (v_t − z)
        norms = (both.reshape(2 * T, H * e) @ w_o.T).norm(dim=-1)     # one product for both
        contrib.append(norms[:T])
        loo.append(norms[T:])
    return torch.stack(contrib), torch.stack(loo)


def _many_rows(w: Float64[Tensor, "d h e"], v_h: Float64[Tensor, "t h e"],
               p: Float64[Tensor, "h r t"], coef: Float64[Tensor, "h r t"],
               z: Float64[Tensor, "r h e"], chunk: int) -> tuple[Tensor, Tensor]:
    """M2 and M4 [R, T] for many rows: W_O^h v_t [T, H, d] once, then batched products over
    chunks of rows."""
    wv = torch.einsum("dhe,the->thd", w, v_h)                         # W_O^h v_t  [T, H, d]
    wz = torch.einsum("dhe,rhe->rhd", w, z)                           # W_O^h z_h  [R, H, d]
    contrib, loo = [], []
    for r0 in range(0, p.shape[1], chunk):
        pr, cr = p[:, r0:r0 + chunk], coef[:, r0:r0 + chunk]          # [H, r, T]
        contrib.append(torch.bmm(pr.permute(2, 1, 0), wv).norm(dim=-1).T)           # [r, T]
        loo_vec = torch.bmm(cr.permute(2, 1, 0), wv).transpose(0, 1)                # [r, T, d]
        loo_vec -= torch.bmm(cr.permute(1, 2, 0), wz[r0:r0 + chunk])  # − Σ_h coef W_O^h z
        loo.append(loo_vec.norm(dim=-1))
        del loo_vec
    return torch.cat(contrib), torch.cat(loo)
