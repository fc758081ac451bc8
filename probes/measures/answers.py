"""Answer scores of a trace under a model: NLL of the gold answer and whether greedy decoding gives it.

One forward pass over prompt + trajectory + scaffold + answer gives both: greedy decoding produces the
gold answer exactly when the argmax at every answer position, conditioned on the gold prefix, is
the next gold token (teacher forcing and greedy decoding agree as long as they agree). Entry point:
`answer_scores`; `without_trajectory` builds the no-trajectory control from the same tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

from hooks.model import LoadedModel
from probes.traces.tokenize import TokenizedTrace


@dataclass(frozen=True)
class AnswerScore:
    """How well the model predicts the gold answer after the context.

    Attributes:
        trace_id: The trace's id.
        nll: Mean negative log-likelihood (nats per token) of the answer span.
        correct: Whether greedy decoding after the scaffold reproduces the whole answer span.
        n_answer_tokens: Length of the answer span.
    """

    trace_id: str
    nll: float
    correct: bool
    n_answer_tokens: int


def without_trajectory(tt: TokenizedTrace) -> TokenizedTrace:
    """The same trace with the trajectory span removed (prompt + scaffold + answer).

    The remaining spans keep their tokens; offsets shift left by the trajectory's length.
    """
    a, b = tt.spans["trajectory"]
    n = b - a
    spans = {
        name: (s if s <= a else s - n, e if e <= a else e - n)
        for name, (s, e) in tt.spans.items()
    }
    spans["trajectory"] = (a, a)
    ids = np.concatenate([tt.ids[:a], tt.ids[b:]])
    return replace(
        tt,
        ids=ids,
        spans=spans,
        trajectory_offsets=tt.trajectory_offsets[:0],
        trajectory_text="",
    )


@torch.inference_mode()
def answer_scores(loaded: LoadedModel, traces: list[TokenizedTrace]) -> list[AnswerScore]:
    """Score the gold answer of each trace with one bridge forward per trace.

    Args:
        loaded: The model (its bridge is run; logits equal the HF model's).
        traces: Tokenized traces with prompt/trajectory/scaffold/answer spans.

    Returns:
        One `AnswerScore` per trace, in order.
    """
    scores = []
    for tt in traces:
        ids = torch.as_tensor(tt.ids, dtype=torch.long, device=loaded.device)[None]
        logits = loaded.bridge(ids, return_type="logits")[0].float()  # [pos, vocab]
        a, b = tt.spans["answer"]
        pred = logits[a - 1 : b - 1]  # position i predicts token i + 1
        target = ids[0, a:b]
        logp = torch.log_softmax(pred, dim=-1).gather(-1, target[:, None])[:, 0]
        scores.append(
            AnswerScore(
                trace_id=tt.trace.id,
                nll=float(-logp.mean()),
                correct=bool((pred.argmax(-1) == target).all()),
                n_answer_tokens=b - a,
            )
        )
    return scores
