"""Resampling importance with the local model (docs/methods.md#resampling).

For a trace with chunks S_0..S_{C−1}, prefix i (i = 0..C) is the prompt and the trajectory tokens
before chunk i (prefix C: the whole trajectory). From each prefix, K continuations are sampled with
the model itself (`probes.models.generate.HFGenerator` on a plain-HF view of the weights: batched
HF `generate`, temperature / top-p, one seed per sample from the run's seed and `trace/i/k`, so a
sample does not depend on its batch).
Each continuation's final answer is extracted and graded (`probes.traces.grading`); a continuation
that is cut at `max_new_tokens` or stops without an answer (no `\\boxed{}` and nothing after
`</think>`) gets the scaffold appended and its answer decoded greedily (a forced answer).

From the graded samples (`importance`):
* `acc[i]`: accuracy of the samples from prefix i, [C+1].
* resampling importance `acc[i+1] − acc[i]` (what keeping S_i adds).
* counterfactual importance: the samples at i whose first chunk T_i differs from S_i (the
  similarity filter: `exact` = the whitespace-normalised strings differ, or `embedding` = cosine of
  a user-provided embedding below a threshold) against `next_i` = the samples at i+1:
  `CI_acc(i) = Acc(dissimilar_i) − Acc(next_i)` and
  `CI_KL(i) = KL(p_dissimilar ‖ p_ref)` over the normalised answer strings, p_ref from `next_i` ∪
  the similar samples at i, additive smoothing α = 1e−9, clipped at ≥ 0; with `prob_true` the
  binary KL of P(correct) instead.

Forced-answer importance needs no sampling: it is L̂ at the chunk boundaries
(`probes.measures.lhat.fast.lhat_fast` at `ts` = the boundaries), and a chunk's value is
L̂(after it) − L̂(before it).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from probes.errors import ProbesError
from probes.measures.anchors import DEFAULT_THRESHOLD as DEFAULT_THRESHOLD
from probes.measures.anchors import SIMILARITY as SIMILARITY
from probes.measures.anchors import ResampleSettings as ResampleSettings
from probes.models.generate import HFGenerator, Request, Sampling, sample_seed
from probes.traces.chunks import split_text
from probes.traces.grading import answers_match, extract_answer, normalize
from probes.traces.read import extract_boxed
from probes.traces.tokenize import DEFAULT_SCAFFOLD

SMOOTHING = 1e-9
"""Additive smoothing α of the answer distributions in CI_KL (as in the paper's code)."""


Embed = Callable[[Sequence[str]], np.ndarray]
"""`embed(texts) -> float [n, d]`: a user-provided sentence embedding."""


@dataclass(frozen=True)
class Sample:
    """One graded continuation.

    Attributes:
        prefix: The prefix index i (0..C).
        first_chunk: The first chunk of the continuation (T_i), stripped.
        answer: The extracted answer (None: none even after forcing).
        correct: It matches the gold answer.
        forced: The answer was decoded after appending the scaffold.
        n_tokens: Tokens generated (forced answer included).
    """

    prefix: int
    first_chunk: str
    answer: str | None
    correct: bool
    forced: bool
    n_tokens: int


def first_chunk(text: str) -> str:
    """The first non-blank chunk of a continuation text (`split_text` rules), stripped."""
    for a, b in split_text(text):
        if text[a:b].strip():
            return text[a:b].strip()
    return ""


def _squash(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def _kl_counts(p: Counter, q: Counter, alpha: float = SMOOTHING) -> float:
    """KL(p ‖ q) of two count tables with additive smoothing over their union, clipped ≥ 0."""
    vocab = set(p) | set(q)
    n_p, n_q, v = sum(p.values()), sum(q.values()), len(vocab)
    if n_p == 0 or n_q == 0:
        return float("nan")
    total = 0.0
    for a in vocab:
        pa = (p[a] + alpha) / (n_p + alpha * v)
        qa = (q[a] + alpha) / (n_q + alpha * v)
        total += pa * math.log(pa / qa)
    return max(total, 0.0)


def _binary_kl(p: float, q: float, alpha: float = SMOOTHING) -> float:
    p = (p + alpha) / (1 + 2 * alpha)
    q = (q + alpha) / (1 + 2 * alpha)
    return max(p * math.log(p / q) + (1 - p) * math.log((1 - p) / (1 - q)), 0.0)


@dataclass(frozen=True)
class Importance:
    """Resampling importances of one trace (float32; NaN where undefined).

    Attributes:
        acc: [C+1] accuracy of the samples from each prefix.
        resampling: [C] acc[i+1] − acc[i].
        ci_acc: [C] counterfactual importance, accuracy form.
        ci_kl: [C] counterfactual importance, KL form.
        n_dissimilar: int16 [C] samples at i that the similarity filter kept.
    """

    acc: np.ndarray
    resampling: np.ndarray
    ci_acc: np.ndarray
    ci_kl: np.ndarray
    n_dissimilar: np.ndarray


def importance(samples: Sequence[Sample], originals: Sequence[str], *, similarity: str = "exact",
               embed: Embed | None = None, threshold: float = DEFAULT_THRESHOLD,
               prob_true: bool = False) -> Importance:
    """The importances of the chunks from graded samples (formulas in the module docstring).

    Args:
        samples: Samples of prefixes 0..C (C = len(originals)).
        originals: The original chunk texts S_0..S_{C−1}.
        similarity: "exact" or "embedding" (`SIMILARITY`).
        embed: The embedding for "embedding".
        threshold: Cosine below which a resample is dissimilar ("embedding").
        prob_true: CI_KL as the binary KL of P(correct) instead of the answer distributions.

    Raises:
        ProbesError: An unknown similarity, or "embedding" without `embed`.
    """
    if similarity not in SIMILARITY:
        raise ProbesError(f"unknown similarity {similarity!r}; choose one of {', '.join(SIMILARITY)}")
    if similarity == "embedding" and embed is None:
        raise ProbesError("similarity 'embedding' needs an embedding model: pass --embedding-model "
                          "(a local sentence-embedding folder) or use --similarity exact")
    c = len(originals)
    by_prefix: list[list[Sample]] = [[] for _ in range(c + 1)]
    for s in samples:
        by_prefix[s.prefix].append(s)
    acc = np.array([np.mean([s.correct for s in g]) if g else np.nan for g in by_prefix])
    similar = _similar_flags(by_prefix, originals, similarity, embed, threshold)
    ci_acc = np.full(c, np.nan)
    ci_kl = np.full(c, np.nan)
    n_dis = np.zeros(c, dtype=np.int16)
    for i in range(c):
        dis = [s for s, sim in zip(by_prefix[i], similar[i]) if not sim]
        ref = by_prefix[i + 1] + [s for s, sim in zip(by_prefix[i], similar[i]) if sim]
        n_dis[i] = len(dis)
        if not dis or not by_prefix[i + 1]:
            continue
        ci_acc[i] = np.mean([s.correct for s in dis]) - acc[i + 1]
        if prob_true:
            ci_kl[i] = _binary_kl(float(np.mean([s.correct for s in dis])),
                                  float(np.mean([s.correct for s in ref])))
        else:
            ci_kl[i] = _kl_counts(Counter(_key(s) for s in dis), Counter(_key(s) for s in ref))
    return Importance(acc=acc.astype(np.float32), resampling=np.diff(acc).astype(np.float32),
                      ci_acc=ci_acc.astype(np.float32), ci_kl=ci_kl.astype(np.float32),
                      n_dissimilar=n_dis)


def _key(s: Sample) -> str:
    return "<none>" if s.answer is None else normalize(s.answer)


def _similar_flags(by_prefix: list[list[Sample]], originals: Sequence[str], similarity: str,
                   embed: Embed | None, threshold: float) -> list[list[bool]]:
    c = len(originals)
    if similarity == "exact":
        return [[_squash(s.first_chunk) == _squash(originals[i]) for s in by_prefix[i]]
                for i in range(c)]
    texts = [o.strip() for o in originals]
    for i in range(c):
        texts += [s.first_chunk for s in by_prefix[i]]
    vecs = np.asarray(embed(texts), dtype=np.float64)  # type: ignore[misc]
    vecs = vecs / np.maximum(np.linalg.norm(vecs, axis=1, keepdims=True), 1e-12)
    out, pos = [], c
    for i in range(c):
        n = len(by_prefix[i])
        cos = vecs[pos:pos + n] @ vecs[i]
        out.append([bool(x >= threshold) for x in cos])
        pos += n
    return out


# --------------------------------------------------------------------------------------------------
# Sampling with the model




def resample(loaded, tt, spans: np.ndarray, settings: ResampleSettings, *,
             on_batch: Callable[[int], None] | None = None) -> list[Sample]:
    """Sample K continuations from every chunk prefix of one trace and grade them.

    Args:
        loaded: The model.
        tt: The tokenized trace.
        spans: int [C, 2] chunk spans (trajectory token coordinates).
        settings: How to sample.
        on_batch: Called with the number of sequences of each finished `generate` call.

    Returns:
        (C+1)·K samples, prefix-major.
    """

    settings.check()
    gen = HFGenerator(loaded, plain=True)
    t0, t1 = tt.spans["trajectory"]
    n_traj = t1 - t0
    starts = [int(a) for a in np.asarray(spans)[:, 0]] + [n_traj]
    longest = t0 + n_traj
    budget = settings.max_new_tokens or 2 * n_traj + 64
    budget = max(1, min(budget, loaded.arch.n_ctx - longest - settings.max_answer_tokens - 8))
    sampling = Sampling(temperature=settings.temperature, top_p=settings.top_p,
                        max_new_tokens=budget, seed=settings.seed)
    requests = []
    for i, s in enumerate(starts):
        prefix = tuple(int(x) for x in tt.ids[: t0 + s])
        for j in range(settings.k):
            key = f"{tt.trace.id}/{i}/{j}"
            requests.append((i, Request(key, prefix, sample_seed(settings.seed, key))))
    completions = []
    for lo in range(0, len(requests), settings.batch_rows):
        part = [r for _, r in requests[lo:lo + settings.batch_rows]]
        completions += gen.generate(part, sampling)
        if on_batch is not None:
            on_batch(len(part))
    # the answer comes from the continuation alone (a boxed answer in the kept prefix never counts)
    answers = [extract_answer(c.text) for c in completions]
    forced = [k for k, (a, c) in enumerate(zip(answers, completions))
              if a is None or c.finish_reason == "length"]
    extra = [0] * len(requests)
    if forced:
        answers, extra = _force_answers(loaded, gen, requests, completions, answers, forced, settings)
    gold = tt.trace.answer
    was_forced = set(forced)
    samples = []
    for k, ((i, _), c) in enumerate(zip(requests, completions)):
        a = answers[k]
        samples.append(Sample(prefix=i, first_chunk=first_chunk(c.text), answer=a,
                              correct=answers_match(a, gold, method=settings.grade_method),
                              forced=k in was_forced, n_tokens=c.n_tokens + extra[k]))
    return samples


def _force_answers(loaded, gen, requests, completions, answers, forced, settings):
    """Append the scaffold to the completions without an answer and decode one greedily."""

    tok = loaded.tokenizer
    scaffold = tuple(tok(DEFAULT_SCAFFOLD, add_special_tokens=False)["input_ids"])
    greedy = Sampling(temperature=0.0, top_p=1.0, max_new_tokens=settings.max_answer_tokens,
                      seed=settings.seed)
    answers = list(answers)
    extra = [0] * len(requests)
    reqs = []
    for k in forced:
        body = tuple(t for t in completions[k].token_ids if t not in gen.stops)
        reqs.append(Request(requests[k][1].key, requests[k][1].prompt_ids + body + scaffold, 0))
    outs = []
    for lo in range(0, len(reqs), settings.batch_rows):
        outs += gen.generate(reqs[lo:lo + settings.batch_rows], greedy)
    for k, out in zip(forced, outs):
        answers[k] = extract_boxed("\\boxed{" + out.text)
        answers[k] = answers[k].strip() if answers[k] is not None else None
        extra[k] = out.n_tokens
    return answers, extra
