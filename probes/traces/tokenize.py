"""Tokenize traces into named spans: prompt + trajectory + answer scaffold + answer.

Entry points: `tokenize_trace` / `tokenize_traces`. Each piece is tokenized separately and the ids
concatenated. Needs a Hugging Face *fast* tokenizer: trajectory character offsets come from its
offset mapping.
"""

from __future__ import annotations

import contextlib
import json
import re
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from probes.errors import ProbesError
from probes.traces.read import THINK_OPEN, Trace, TraceSet

# A Hugging Face fast tokenizer (`transformers.PreTrainedTokenizerFast` / `TokenizersBackend`).
# Typed loosely so that this module does not import transformers.
Tokenizer = Any


DEFAULT_PROMPT_TEMPLATE = "Question: {question}\nAnswer: "
"""Prompt used when the tokenizer has no chat template and no `prompt_format` is given."""


DEFAULT_SCAFFOLD = "\n\n**Final Answer**\n\\boxed{"
"""RaML's answer scaffold (arXiv 2505.19815), appended after the trajectory."""


ANSWER_SUFFIX = "}"
"""Closes the scaffold's `\\boxed{`; its tokens count as part of the answer span."""


SPAN_NAMES = ("prompt", "trajectory", "scaffold", "answer")
"""Span names of a `TokenizedTrace`, in sequence order."""


class TraceTooLongError(ProbesError):
    """A tokenized trace longer than the `max_tokens` limit."""

    def __init__(self, trace_id: str, n_tokens: int | None, limit: int,
                 n_chars: int | None = None, max_chars: int | None = None) -> None:
        size = (f"{n_tokens} tokens" if n_tokens is not None else
                f"{n_chars:,} characters (more than {max_chars:,}, the most {limit} tokens of this "
                f"tokenizer can stand for; not tokenized)")
        super().__init__(
            f"Trace {trace_id!r} has {size} (prompt + trajectory + scaffold + answer), "
            f"over max_tokens={limit}. Raise max_tokens, or skip long traces with tokenize_traces, "
            "which reports them instead of raising."
        )
        self.trace_id = trace_id
        self.n_tokens = n_tokens
        self.limit = limit


@dataclass(frozen=True)
class TooLongTrace:
    """A trace that `tokenize_traces` left out because it exceeds `max_tokens`.

    Attributes:
        n_tokens: Its tokens; None when it was left out untokenized because its characters alone
            exceed what `limit` tokens can stand for (`n_chars` > `max_chars`).
    """

    trace_id: str
    line_no: int
    n_tokens: int | None
    limit: int
    n_chars: int | None = None
    max_chars: int | None = None

    @property
    def reason(self) -> str:
        """One-line explanation, like `BadLine.reason`."""
        if self.n_tokens is None:
            return (f"trace {self.trace_id!r} has {self.n_chars:,} characters, more than "
                    f"{self.max_chars:,} (the most {self.limit} tokens of this tokenizer can "
                    f"stand for): over max_tokens={self.limit}, not tokenized")
        return f"trace {self.trace_id!r} has {self.n_tokens} tokens, over max_tokens={self.limit}"


@dataclass(frozen=True)
class TokenizedTrace:
    """Token ids of prompt + trajectory + scaffold + answer, with named spans.

    Attributes:
        trace: The source trace.
        ids: int64 [n_tokens] token ids.
        spans: Half-open `(start, end)` token ranges for `SPAN_NAMES`; contiguous, in that order,
            covering all of `ids` (a span may be empty).
        trajectory_offsets: int64 [n_trajectory_tokens, 2] character offsets of each trajectory
            token into `trajectory_text`, as the fast tokenizer reports them (byte-level BPE tokens
            that split a multi-byte character share/overlap that character's range).
        trajectory_text: The trajectory string actually tokenized (after removing a `<think>` that
            the chat template's generation prompt already contains).
        prompt_text: The rendered prompt string (without any BOS token).
    """

    trace: Trace
    ids: np.ndarray
    spans: dict[str, tuple[int, int]]
    trajectory_offsets: np.ndarray
    trajectory_text: str
    prompt_text: str

    @property
    def n_tokens(self) -> int:
        """Total number of tokens."""
        return int(self.ids.shape[0])

    def span(self, name: str) -> slice:
        """The token slice of span `name` (one of `SPAN_NAMES`)."""
        if name not in self.spans:
            raise ProbesError(f"Unknown span {name!r}; spans are {list(self.spans)}.")
        start, end = self.spans[name]
        return slice(start, end)


def render_prompt(question: str, tokenizer: Tokenizer, *, prompt_format: str | None = None) -> str:
    """Render the prompt text for `question`.

    Args:
        question: The question.
        tokenizer: A Hugging Face tokenizer.
        prompt_format: A `str.format` template with a `{question}` field (write other literal braces
            as `{{` / `}}`). None: the tokenizer's chat template when it has one (a single user
            message, `add_generation_prompt=True`, `enable_thinking=True`), else
            `DEFAULT_PROMPT_TEMPLATE` = `"Question: {question}\\nAnswer: "`.

    Returns:
        The prompt string (special tokens as text, no BOS added).

    Raises:
        ProbesError: `prompt_format` lacks `{question}` or has other fields.
    """
    if prompt_format is None:
        if getattr(tokenizer, "chat_template", None):
            return tokenizer.apply_chat_template(
                [{"role": "user", "content": question}],
                tokenize=False,
                add_generation_prompt=True,
                enable_thinking=True,
            )
        prompt_format = DEFAULT_PROMPT_TEMPLATE
    if "{question}" not in prompt_format:
        raise ProbesError(
            f"prompt_format {prompt_format!r} has no '{{question}}' field; add it where the "
            "question goes."
        )
    try:
        return prompt_format.format(question=question)
    except (KeyError, IndexError, ValueError) as exc:
        raise ProbesError(
            f"prompt_format {prompt_format!r} cannot be filled with only a question ({exc!r}); "
            "write literal braces as '{{' and '}}'."
        ) from None


def _strip_duplicated_think(prompt: str, trajectory: str) -> str:
    """Drop the `<think>` (and the whitespace after it) that the prompt already ends with.

    Chat templates such as DeepSeek-R1-Distill's end the generation prompt with `<think>\\n`, and
    traces usually store the trajectory from `<think>\\n` on. Keeping both would show the model the
    tag twice; the whitespace is dropped only when it repeats the prompt's own exactly.
    """
    m = re.search(r"<think>(\s*)\Z", prompt)
    if m is None or not trajectory.startswith(THINK_OPEN):
        return trajectory
    rest = trajectory[len(THINK_OPEN) :]
    ws = m.group(1)
    if ws and rest.startswith(ws):
        rest = rest[len(ws) :]
    return rest


def tokenize_trace(
    trace: Trace,
    tokenizer: Tokenizer,
    *,
    prompt_format: str | None = None,
    scaffold: str = DEFAULT_SCAFFOLD,
    max_tokens: int | None = None,
) -> TokenizedTrace:
    """Tokenize a trace into prompt, trajectory, scaffold and answer spans.

    The pieces are tokenized separately with `add_special_tokens=False` and their ids concatenated,
    so the scaffold + answer ids are identical whatever precedes them (needed to score the answer
    after every trajectory prefix). The answer tokens are `trace.answer + ANSWER_SUFFIX`, i.e. the
    closing `"}"` of the scaffold's `\\boxed{` counts as part of the answer span. Special-token text
    in the trajectory (`</think>`) becomes the special token id. A BOS token is prepended once when
    the tokenizer would add one itself (Llama/SentencePiece) and the prompt does not already start
    with it. Tokenizers that prepend a space to every encoded text (SentencePiece `Metaspace`)
    encode the trajectory, scaffold and answer without it, so no space is invented between pieces.

    Args:
        trace: The trace.
        tokenizer: A Hugging Face fast tokenizer.
        prompt_format: See `render_prompt` (None: chat template, else `DEFAULT_PROMPT_TEMPLATE`).
            When the rendered prompt ends with `<think>` and the trajectory starts with one, the
            trajectory's copy is dropped.
        scaffold: Text between trajectory and answer; `DEFAULT_SCAFFOLD` is RaML's.
        max_tokens: Longest allowed total; never truncates.

    Returns:
        The `TokenizedTrace`.

    Raises:
        TraceTooLongError: The total length exceeds `max_tokens`.
        ProbesError: The tokenizer is not a fast tokenizer, or `prompt_format` is invalid.
    """
    (tokenized,), (too_long,) = _tokenize_all([trace], tokenizer, prompt_format, scaffold,
                                              max_tokens)
    if too_long is not None:
        raise TraceTooLongError(trace.id, too_long.n_tokens, too_long.limit, too_long.n_chars,
                                too_long.max_chars)
    assert tokenized is not None
    return tokenized


def tokenize_traces(
    traces: TraceSet | Iterable[Trace],
    tokenizer: Tokenizer,
    *,
    prompt_format: str | None = None,
    scaffold: str = DEFAULT_SCAFFOLD,
    max_tokens: int | None = None,
) -> tuple[list[TokenizedTrace], list[TooLongTrace]]:
    """Tokenize many traces (batched); report the ones over `max_tokens` instead of raising.

    Same result per trace as `tokenize_trace`. A trace whose characters alone exceed what
    `max_tokens` tokens can stand for (`max_chars_per_token`) is left out before it is tokenized,
    so a runaway line (megabytes of text) costs no tokenizer time.

    Args:
        traces: A `TraceSet` or an iterable of `Trace`s.
        tokenizer: A Hugging Face fast tokenizer.
        prompt_format: See `render_prompt`.
        scaffold: Text between trajectory and answer.
        max_tokens: Longest allowed total; longer traces are left out and reported.

    Returns:
        `(tokenized, too_long)`: the kept traces in input order, and one `TooLongTrace` per trace
        left out.

    Raises:
        ProbesError: The tokenizer is not a fast tokenizer, or `prompt_format` is invalid.
    """
    tokenized, too_long = _tokenize_all(list(traces), tokenizer, prompt_format, scaffold,
                                        max_tokens)
    return ([t for t, bad in zip(tokenized, too_long) if bad is None and t is not None],
            [bad for bad in too_long if bad is not None])


def _tokenize_all(
    traces: Sequence[Trace],
    tokenizer: Tokenizer,
    prompt_format: str | None,
    scaffold: str,
    max_tokens: int | None,
) -> tuple[list[TokenizedTrace | None], list[TooLongTrace | None]]:
    """Tokenize every trace; per trace its `TokenizedTrace` (None: not tokenized, too many
    characters) and its `TooLongTrace` when it is over `max_tokens` (else None)."""
    if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < 1):
        raise ProbesError(f"max_tokens must be a positive integer or None, got {max_tokens!r}.")
    first, rest = _encoders(tokenizer)
    bos = _bos_to_prepend(tokenizer)
    prompts = [render_prompt(t.question, tokenizer, prompt_format=prompt_format) for t in traces]
    trajectories = [_strip_duplicated_think(p, t.trajectory) for p, t in zip(prompts, traces)]

    out: list[TokenizedTrace | None] = [None] * len(traces)
    too_long: list[TooLongTrace | None] = [None] * len(traces)
    if max_tokens is not None:  # never tokenize a text that cannot fit (a 50 MB line took minutes)
        max_chars = max_tokens * max_chars_per_token(tokenizer)
        for i, trace in enumerate(traces):
            n_chars = (len(prompts[i]) + len(trajectories[i]) + len(scaffold) + len(trace.answer)
                       + len(ANSWER_SUFFIX))
            if n_chars > max_chars:
                too_long[i] = TooLongTrace(trace.id, trace.line_no, None, max_tokens, n_chars,
                                           max_chars)
    todo = [i for i, bad in enumerate(too_long) if bad is None]

    prompt_enc = first.encode_batch([prompts[i] for i in todo], add_special_tokens=False)
    traj_enc = rest.encode_batch([trajectories[i] for i in todo], add_special_tokens=False)
    scaffold_ids = rest.encode(scaffold, add_special_tokens=False).ids
    answer_enc = rest.encode_batch(
        [traces[i].answer + ANSWER_SUFFIX for i in todo], add_special_tokens=False
    )

    for j, i in enumerate(todo):
        trace = traces[i]
        prompt_ids = list(prompt_enc[j].ids)
        if bos is not None and (not prompt_ids or prompt_ids[0] != bos):
            prompt_ids.insert(0, bos)
        pieces = (prompt_ids, traj_enc[j].ids, scaffold_ids, answer_enc[j].ids)
        spans: dict[str, tuple[int, int]] = {}
        start = 0
        for name, piece in zip(SPAN_NAMES, pieces):
            spans[name] = (start, start + len(piece))
            start += len(piece)
        ids = np.fromiter((x for piece in pieces for x in piece), dtype=np.int64, count=start)
        offsets = np.asarray(traj_enc[j].offsets, dtype=np.int64).reshape(-1, 2)
        out[i] = TokenizedTrace(
            trace=trace,
            ids=ids,
            spans=spans,
            trajectory_offsets=offsets,
            trajectory_text=trajectories[i],
            prompt_text=prompts[i],
        )
        if max_tokens is not None and start > max_tokens:
            too_long[i] = TooLongTrace(trace.id, trace.line_no, start, max_tokens)
    return out, too_long


# The longest vocabulary entry per tokenizer object and vocabulary size (get_vocab takes ~0.2 s
# for a 150k vocabulary).
_MAX_CHARS_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def max_chars_per_token(tokenizer: Tokenizer) -> int:
    """The most characters of text one token can stand for: the longest vocabulary entry, added
    tokens included (at least 1).

    A byte-level entry spells one character per byte, a SentencePiece entry one per character
    (`▁` for a space) and a byte-fallback entry (`<0x41>`) six for one byte, so for these
    vocabularies a text of more than `n * max_chars_per_token` characters has more than `n`
    tokens. (A tokenizer that drops characters, e.g. whitespace in a BERT-style pre-tokenizer,
    could fit more; the bound is meant for a text of ordinary words, not for runs of whitespace.)
    """
    backend = tokenizer.backend_tokenizer
    size = backend.get_vocab_size(with_added_tokens=True)
    with contextlib.suppress(KeyError, TypeError):
        cached_size, longest = _MAX_CHARS_CACHE[tokenizer]
        if cached_size == size:
            return longest
    longest = max(1, max((len(t) for t in backend.get_vocab(with_added_tokens=True)), default=1))
    with contextlib.suppress(TypeError):
        _MAX_CHARS_CACHE[tokenizer] = (size, longest)
    return longest


def _bos_to_prepend(tokenizer: Tokenizer) -> int | None:
    """The BOS id when the tokenizer adds one itself with `add_special_tokens=True`, else None."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bos if ids and ids[0] == bos else None


# Continuation encoders derived from a tokenizer, built once per tokenizer object and vocabulary
# size (tokens added to the tokenizer later invalidate the copy).
_CONTINUATION_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _encoders(tokenizer: Tokenizer) -> tuple[Any, Any]:
    """Backend (`tokenizers.Tokenizer`) encoders for the first piece and for later pieces.

    The later-piece encoder is the same object unless the tokenizer prepends a space to every text
    it encodes (SentencePiece `Metaspace` with `prepend_scheme="always"`, a `Prepend` normalizer,
    or byte-level `add_prefix_space=True`); then it is a copy with that prefix switched off.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if not getattr(tokenizer, "is_fast", False) or backend is None:
        raise ProbesError(
            f"{type(tokenizer).__name__} is a slow (Python) tokenizer, which gives no character "
            "offsets; trajectories need a fast tokenizer. Load it with "
            "AutoTokenizer.from_pretrained(path) (use_fast=True is the default) from a folder "
            "with tokenizer.json or files it can be converted from."
        )
    vocab_size = backend.get_vocab_size(with_added_tokens=True)
    try:
        cached_size, cached = _CONTINUATION_CACHE[tokenizer]
        if cached_size == vocab_size:
            return backend, cached
    except (KeyError, TypeError):
        pass
    rest = backend
    if _adds_prefix_space(backend):
        from tokenizers import Tokenizer as BackendTokenizer

        spec = json.loads(backend.to_str())
        for key in ("normalizer", "pre_tokenizer"):
            spec[key] = _without_prefix_space(spec.get(key))
        rest = BackendTokenizer.from_str(json.dumps(spec))
        if _adds_prefix_space(rest):
            raise ProbesError(
                f"{type(tokenizer).__name__} prepends a space to every encoded text and this "
                "toolkit could not switch that off, so trajectory, scaffold and answer cannot be "
                "tokenized separately without inventing spaces. Use a tokenizer whose "
                "tokenizer.json uses Metaspace, a Prepend normalizer or ByteLevel for the prefix."
            )
    with contextlib.suppress(TypeError):  # not weak-referenceable: just rebuild next time
        _CONTINUATION_CACHE[tokenizer] = (vocab_size, rest)
    return backend, rest


def _adds_prefix_space(backend: Any) -> bool:
    """Whether encoding "a" alone yields a token that starts with a space marker."""
    tokens = backend.encode("a", add_special_tokens=False).tokens
    # "▁" marks a space in SentencePiece vocabularies, "Ġ" in GPT-2 byte-level ones.
    return bool(tokens) and tokens[0][0] in ("\u2581", "\u0120")


def _without_prefix_space(node: Any) -> Any:
    """A normalizer/pre-tokenizer JSON spec with its prefix-space step switched off."""
    if not isinstance(node, dict):
        return node
    kind = node.get("type")
    if kind == "Prepend":
        return None
    if kind == "Metaspace":
        node = dict(node, prepend_scheme="never")
        if "add_prefix_space" in node:
            node["add_prefix_space"] = False
        return node
    if kind == "ByteLevel":
        return dict(node, add_prefix_space=False)
    if kind == "Sequence":
        key = "normalizers" if "normalizers" in node else "pretokenizers"
        parts = [_without_prefix_space(p) for p in node.get(key, [])]
        return dict(node, **{key: [p for p in parts if p is not None]})
    return node
