"""One trace's token pieces for the L̂ curve, and the small helpers both L̂ paths share.

`_layout` splits a tokenized trace into prompt + trajectory context, scaffold and answer on the
model's device (`_Layout`, with the copy geometry of the packed suffixes); `_check_ts` validates
the requested prefix lengths; `_model_dtype`, `_keeps_logits` and `_answer_nll` read the model's
dtype, whether its forward takes `logits_to_keep`, and the per-token answer NLL. Used by
`probes.measures.lhat.reference.lhat_naive` and `probes.measures.lhat.fast.lhat_fast`
(docs/methods.md#m8).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from hooks.model import LoadedModel
from probes.errors import ProbesError
from probes.traces.tokenize import TokenizedTrace

# --------------------------------------------------------------------------------------------------
# Layout of one trace


@dataclass(frozen=True)
class _Layout:
    """Token pieces of one trace on the model's device.

    Attributes:
        context: int64 [|P| + T] prompt + trajectory ids.
        scaffold: int64 [|S|].
        answer: int64 [|A|].
        n_prompt: |P|.
        n_traj: T.
        lead: 1 when the scaffold is empty (the last context token is re-fed at the head of
            each copy so that a row of the copy predicts A_1), else 0.
    """

    context: torch.Tensor
    scaffold: torch.Tensor
    answer: torch.Tensor
    n_prompt: int
    n_traj: int
    lead: int

    @property
    def copy_len(self) -> int:
        """Tokens per suffix copy: lead + |S| + |A| − 1 (the last answer token predicts nothing)."""
        return self.lead + len(self.scaffold) + len(self.answer) - 1

    @property
    def first_row(self) -> int:
        """Offset, inside a copy, of the row that predicts A_1."""
        return self.lead + len(self.scaffold) - 1


def _layout(tt: TokenizedTrace, device: torch.device) -> _Layout:
    spans = tt.spans
    (p0, p1), (t0, t1) = spans["prompt"], spans["trajectory"]
    (s0, s1), (a0, a1) = spans["scaffold"], spans["answer"]
    if not (p0 == 0 and p1 == t0 and t1 == s0 and s1 == a0 and a1 == tt.n_tokens):
        raise ProbesError(
            f"Trace {tt.trace.id!r}: spans {spans} are not contiguous prompt, trajectory, "
            f"scaffold, answer covering all {tt.n_tokens} ids; build it with "
            "probes.traces.tokenize.tokenize_trace."
        )
    if a1 == a0:
        raise ProbesError(
            f"Trace {tt.trace.id!r} has an empty answer span, so L̂ (mean answer NLL) is undefined."
        )
    lead = 1 if s1 == s0 else 0
    if lead and p1 == 0:
        raise ProbesError(
            f"Trace {tt.trace.id!r} has an empty prompt and an empty scaffold: at t=0 no token "
            "precedes the first answer token, so nothing predicts it. Give it a prompt or scaffold."
        )
    ids = torch.as_tensor(tt.ids, dtype=torch.long, device=device)
    return _Layout(
        context=ids[:s0],
        scaffold=ids[s0:s1],
        answer=ids[a0:a1],
        n_prompt=p1,
        n_traj=t1 - t0,
        lead=lead,
    )


def _check_ts(ts: Sequence[int] | np.ndarray | None, n_traj: int) -> np.ndarray:
    if ts is None:
        return np.arange(n_traj + 1, dtype=np.int64)
    arr = np.asarray(ts)
    if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
        raise ProbesError(f"ts must be a 1-D sequence of integers, got {ts!r}.")
    arr = arr.astype(np.int64)
    bad = arr[(arr < 0) | (arr > n_traj)]
    if bad.size:
        raise ProbesError(
            f"ts contains {bad[:5].tolist()}, outside 0..{n_traj} (the trajectory has {n_traj} "
            "tokens; t counts trajectory tokens kept, 0 = none, T = all)."
        )
    return arr


def _model_dtype(loaded: LoadedModel) -> torch.dtype:
    for param in loaded.hf_model.parameters():
        if param.is_floating_point():
            return param.dtype
    return torch.float32


def _keeps_logits(loaded: LoadedModel) -> bool:
    """Whether the HF model's forward takes `logits_to_keep` (all current causal LMs do)."""
    return "logits_to_keep" in inspect.signature(loaded.hf_model.forward).parameters


def _answer_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-token NLL (float32 log-softmax, returned as float64).

    logits [..., n, vocab], targets [..., n] -> [..., n].
    """
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1).double()
