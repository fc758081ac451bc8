"""The reference L̂ curve: one plain bridge forward over `P + τ_≤t + S + A` per prefix t.

`lhat_naive` is what `probes.measures.lhat.fast.lhat_fast` is tested against (docs/methods.md#m8); see
`probes.measures.lhat.fast` for the definition of L̂_t.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from jaxtyping import Float64, Integer

from hooks.model import LoadedModel
from probes.measures.lhat.layout import _answer_nll, _check_ts, _keeps_logits, _layout
from probes.traces.tokenize import TokenizedTrace

__all__ = ["lhat_naive"]


@torch.inference_mode()
def lhat_naive(
    loaded: LoadedModel,
    tt: TokenizedTrace,
    ts: Sequence[int] | Integer[np.ndarray, " n_ts"] | None = None,
) -> Float64[np.ndarray, " n_ts"]:
    """L̂_t by one bridge forward over `P + τ_≤t + S + A` per prefix t (the reference).

    Each forward is a plain full-sequence run of the bridge (no cache, no mask); only the last
    |A| + 1 rows are projected to logits (`logits_to_keep`, which does not change them). The
    log-softmax is taken in float32 and the mean over answer tokens accumulated in float64.

    Args:
        loaded: The model.
        tt: The tokenized trace (contiguous prompt/trajectory/scaffold/answer spans).
        ts: Trajectory prefix lengths to evaluate, each in 0..T; None for all of 0..T.

    Returns:
        float64 [len(ts)] (or [T+1]) mean answer NLL in nats, aligned with `ts`.

    Raises:
        ProbesError: Empty answer, non-contiguous spans, or a t outside 0..T.
    """
    lay = _layout(tt, loaded.device)
    t_values = _check_ts(ts, lay.n_traj)
    n_ans = len(lay.answer)
    extra: dict[str, Any] = {"logits_to_keep": n_ans + 1} if _keeps_logits(loaded) else {}
    out = np.empty(len(t_values), dtype=np.float64)
    for i, t in enumerate(t_values):
        e = lay.n_prompt + int(t)
        ids = torch.cat([lay.context[:e], lay.scaffold, lay.answer])[None]  # [1, pos]
        logits = loaded.bridge(ids, return_type="logits", **extra)[0]  # [rows, vocab]
        pred = logits[-(n_ans + 1) : -1]  # rows predicting A_1..A_|A|
        out[i] = float(_answer_nll(pred, lay.answer).mean())
    return out
