"""What one hooked forward keeps for M1–M4 at one or several query rows (`QueryCapture`,
`QueryRowsCapture`): the data both capture paths fill, the bridge's
(`probes.measures.updates.attention.query_rows_capture`) and the linear-memory pass's
(`probes.measures.updates.sdpa_pass.sdpa_query_rows_capture`), and the measurements read
(`probes.measures.updates.attention.token_updates_from`). Its own module so that neither path
imports the other for it.
"""

from __future__ import annotations

from dataclasses import dataclass

from jaxtyping import Float
from torch import Tensor

__all__ = ["QueryCapture", "QueryRowsCapture"]


@dataclass
class QueryCapture:
    """The raw tensors one hooked forward yields for one query position (float32, CPU).

    Attributes:
        query: The query position q.
        rot_k: Per layer, rotated keys [T, H_kv, d_h] for keys 0..q.
        v: Per layer, values [T, H_kv, d_h].
        rot_q: Per layer, rotated query of q [H, d_h].
        z: Per layer, z at q [H, d_h].
        pattern: Per layer, pattern row of q [H, T].
        attn_out: Per layer, attention output at q [d_model].
    """

    query: int
    rot_k: list[Float[Tensor, "t h_kv d_h"]]
    v: list[Float[Tensor, "t h_kv d_h"]]
    rot_q: list[Float[Tensor, "h d_h"]]
    z: list[Float[Tensor, "h d_h"]]
    pattern: list[Float[Tensor, "h t"]]
    attn_out: list[Float[Tensor, " d_model"]]


@dataclass
class QueryRowsCapture:
    """What one hooked forward yields for several query rows (float32, CPU by default).

    The keys and values are captured once, for keys 0..max(rows); the query-side tensors once per
    row. `row(i)` is the single-row `QueryCapture` of row i (views, no copy).

    Attributes:
        rows: The query rows R (strictly increasing positions).
        rot_k: Per layer, rotated keys [K, H_kv, d_h] for keys 0..K−1, K = max(rows) + 1.
        v: Per layer, values [K, H_kv, d_h].
        rot_q: Per layer, rotated queries of the rows [R, H, d_h].
        z: Per layer, z at the rows [R, H, d_h].
        pattern: Per layer, pattern rows [H, R, K] (zero beyond each row: causal).
        attn_out: Per layer, attention output at the rows [R, d_model] (what attention adds to
            the residual: after N_ao where a norm follows attention, OLMo-2).
    """

    rows: list[int]
    rot_k: list[Float[Tensor, "k h_kv d_h"]]
    v: list[Float[Tensor, "k h_kv d_h"]]
    rot_q: list[Float[Tensor, "r h d_h"]]
    z: list[Float[Tensor, "r h d_h"]]
    pattern: list[Float[Tensor, "h r k"]]
    attn_out: list[Float[Tensor, "r d_model"]]

    def row(self, i: int) -> QueryCapture:
        """The `QueryCapture` of row `self.rows[i]` (keys 0..rows[i]; views of these tensors)."""
        q = self.rows[i]
        return QueryCapture(
            query=q,
            rot_k=[k[: q + 1] for k in self.rot_k],
            v=[v[: q + 1] for v in self.v],
            rot_q=[x[i] for x in self.rot_q],
            z=[x[i] for x in self.z],
            pattern=[p[:, i, : q + 1] for p in self.pattern],
            attn_out=[x[i] for x in self.attn_out],
        )
