"""Token categories: ordinary, reflection, delimiter (trajectory) and prompt, scaffold, answer.

Phrases come from a JSON lexicon (`probes/data/lexicon.json`, extendable with `load_lexicon(extra=
...)`). They are matched on the trajectory *text* (`find_phrases`) and mapped to tokens through the
tokenizer's character offsets (`categorize`), so "Wait", " Wait" and multi-token phrases all count.
`count_categories` / `format_category_table` summarise a corpus.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from analyses.token_sets import CATEGORY_CODES, CATEGORY_NAMES
from probes import DATA_DIR
from probes.errors import LexiconError
from probes.traces.tokenize import TokenizedTrace

__all__ = [
    "CATEGORY_CODES",
    "CATEGORY_NAMES",
    "DEFAULT_LEXICON_PATH",
    "LEXICON_CATEGORIES",
    "LEXICON_VERSION",
    "Lexicon",
    "Phrase",
    "PhraseHit",
    "PhraseMatch",
    "TokenCategories",
    "categorize",
    "count_categories",
    "find_phrases",
    "format_category_table",
    "load_lexicon",
]

LEXICON_CATEGORIES = ("reflection", "delimiter")
"""Categories a lexicon phrase can have (the JSON keys holding phrase lists)."""

LEXICON_VERSION = 1
DEFAULT_LEXICON_PATH = DATA_DIR / "lexicon.json"

_ENTRY_KEYS = {"phrase", "case_sensitive", "word_boundary"}
_FILE_KEYS = {"version", "description", *LEXICON_CATEGORIES}
# Scripts written without spaces between words: no word boundary is required next to these.
_NO_SPACE_SCRIPTS = "\u0e00-\u0e7f\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
# A word character of a script that separates words with spaces (so "\b" makes sense there).
_SPACED_WORD_CHAR = f"[^\\W{_NO_SPACE_SCRIPTS}]"


# --------------------------------------------------------------------------------------------------
# Lexicon


@dataclass(frozen=True)
class Phrase:
    """One lexicon phrase.

    Attributes:
        id: Index in `Lexicon.phrases` (stored in `TokenCategories.phrase_id`).
        phrase: The text to match.
        category: `"reflection"` or `"delimiter"`.
        case_sensitive: Match case exactly (default False).
        word_boundary: Require a word boundary at each end of the phrase whose character is a
            letter, digit or underscore of a space-separated script (default True). Ends that are
            punctuation (`</think>`, `\\boxed`'s backslash) or Chinese/Japanese/Thai characters
            never need one.
    """

    id: int
    phrase: str
    category: str
    case_sensitive: bool = False
    word_boundary: bool = True

    @property
    def key(self) -> str:
        """Identity for duplicate detection (case-folded unless case-sensitive)."""
        return self.phrase if self.case_sensitive else self.phrase.casefold()

    def alternatives(self) -> list[str]:
        """Regex alternatives for this phrase, one per spelling of its first character.

        Each alternative starts with a literal character and names its group `p{id}_{k}`: a
        branch of literal-led alternatives lets Python's `re` skip non-candidate positions in C
        (about 25x faster than lookbehind-led alternatives on real trajectories).
        """
        first, rest = self.phrase[0], self.phrase[1:]
        body = ""
        if self.word_boundary and re.match(_SPACED_WORD_CHAR, first):
            body += f"(?<!{_SPACED_WORD_CHAR}.)"  # checked after consuming the first character
        if rest:
            body += re.escape(rest) if self.case_sensitive else f"(?i:{re.escape(rest)})"
        if self.word_boundary and re.match(_SPACED_WORD_CHAR, self.phrase[-1]):
            body += f"(?!{_SPACED_WORD_CHAR})"
        spellings = [first]
        if not self.case_sensitive:
            for v in (first.lower(), first.upper(), first.swapcase()):
                if len(v) == 1 and v not in spellings:
                    spellings.append(v)
        return [f"{re.escape(c)}(?P<p{self.id}_{k}>{body})" for k, c in enumerate(spellings)]


@dataclass(frozen=True)
class Lexicon:
    """An ordered list of phrases, each with a category, compiled into one regex.

    Phrase ids are positions in `phrases`: the order of the files and lists they came from.

    Attributes:
        phrases: The phrases, `phrases[i].id == i`.
        sources: The files merged into this lexicon (not part of the fingerprint).
    """

    phrases: tuple[Phrase, ...]
    sources: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for i, p in enumerate(self.phrases):
            if p.id != i:
                raise LexiconError(f"Phrase {p.phrase!r} has id {p.id}, expected its position {i}.")
            if p.category not in LEXICON_CATEGORIES:
                raise LexiconError(
                    f"Phrase {p.phrase!r} has category {p.category!r}; valid: {LEXICON_CATEGORIES}."
                )
        texts = [p.phrase for p in self.phrases]
        if len(set(texts)) != len(texts):
            dupes = sorted({t for t in texts if texts.count(t) > 1})
            raise LexiconError(f"Phrases {dupes} appear more than once; keep one entry each.")

    @cached_property
    def regex(self) -> re.Pattern[str]:
        """One alternation, longest phrase first, so the longest phrase at a position wins."""
        ordered = sorted(self.phrases, key=lambda p: (-len(p.phrase), p.id))
        return re.compile("|".join(alt for p in ordered for alt in p.alternatives()))

    @cached_property
    def phrase_ids(self) -> dict[str, int]:
        """Phrase text → id."""
        return {p.phrase: p.id for p in self.phrases}

    def to_json(self) -> dict[str, Any]:
        """The lexicon in its file format, every entry spelled out.

        `load_lexicon` reads it back to an equal lexicon when the phrases are grouped by category
        (as in any single file); merged lexicons come back renumbered category by category.
        """
        out: dict[str, Any] = {"version": LEXICON_VERSION}
        for category in LEXICON_CATEGORIES:
            out[category] = [
                {"phrase": p.phrase, "case_sensitive": p.case_sensitive,
                 "word_boundary": p.word_boundary}
                for p in self.phrases
                if p.category == category
            ]
        return out

    def fingerprint(self) -> str:
        """sha256 (hex) of the canonical JSON of the phrases, ids and options; for cache keys."""
        canonical = {
            "version": LEXICON_VERSION,
            "phrases": [
                [p.id, p.phrase, p.category, p.case_sensitive, p.word_boundary]
                for p in self.phrases
            ],
        }
        text = json.dumps(canonical, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode("utf-8")).hexdigest()


def load_lexicon(path: str | Path | None = None, *, extra: Sequence[str | Path] = ()) -> Lexicon:
    """Load a lexicon file and merge extra ones into it.

    File format (JSON): `{"version": 1, "description"?: str, "reflection": [...], "delimiter":
    [...]}` where each entry is a phrase string or `{"phrase": str, "case_sensitive"?: bool,
    "word_boundary"?: bool}`. Strings match case-insensitively with word boundaries (see `Phrase`).
    A phrase repeated with the same category and options is kept once; the same phrase under two
    categories, or with different options, is an error.

    Args:
        path: The base lexicon; None for the packaged `probes/data/lexicon.json`.
        extra: More lexicon files, merged in order after the base (their phrases get later ids).

    Returns:
        The merged `Lexicon`.

    Raises:
        LexiconError: A file is missing, not valid JSON, or malformed; the message names the file
            and the entry.
    """
    files = [Path(path) if path is not None else DEFAULT_LEXICON_PATH, *map(Path, extra)]
    phrases: list[Phrase] = []
    seen: dict[str, tuple[Phrase, Path]] = {}  # by key and by exact text
    for file in files:
        for category, entry, where in _read_lexicon_file(file):
            phrase = _parse_entry(entry, category, len(phrases), file, where)
            clash = seen.get(phrase.key) or seen.get(phrase.phrase)
            if clash is not None:
                other, other_file = clash
                same = (other.category, other.case_sensitive, other.word_boundary) == (
                    phrase.category, phrase.case_sensitive, phrase.word_boundary)
                if same:
                    continue
                raise LexiconError(
                    f"{file}: {where}: phrase {phrase.phrase!r} is already in {other_file} as "
                    f"{other.category} {other.phrase!r} (case_sensitive={other.case_sensitive}, "
                    f"word_boundary={other.word_boundary}). Keep one entry per phrase."
                )
            seen[phrase.key] = seen[phrase.phrase] = (phrase, file)
            phrases.append(phrase)
    if not phrases:
        raise LexiconError(f"{', '.join(map(str, files))}: the lexicon has no phrases; add some.")
    if len(phrases) > np.iinfo(np.int16).max:
        raise LexiconError(f"{files[-1]}: {len(phrases)} phrases; at most 32767 are supported.")
    return Lexicon(phrases=tuple(phrases), sources=tuple(str(f) for f in files))


def _read_lexicon_file(file: Path) -> list[tuple[str, Any, str]]:
    """(category, raw entry, location string) for every entry of one lexicon file."""
    if not file.is_file():
        raise LexiconError(
            f"Lexicon file {str(file)!r} does not exist; pass an existing JSON file."
        )
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise LexiconError(f"{file}: not valid UTF-8 JSON ({exc}).") from None
    if not isinstance(data, dict):
        raise LexiconError(f"{file}: expected a JSON object, got {type(data).__name__}.")
    if data.get("version") != LEXICON_VERSION:
        raise LexiconError(
            f"{file}: 'version' is {data.get('version')!r}; this toolkit reads version "
            f"{LEXICON_VERSION}. Add \"version\": {LEXICON_VERSION}."
        )
    unknown = sorted(set(data) - _FILE_KEYS)
    if unknown:
        raise LexiconError(
            f"{file}: unknown key(s) {unknown}; valid keys are {sorted(_FILE_KEYS)}."
        )
    entries = []
    for category in LEXICON_CATEGORIES:
        items = data.get(category, [])
        if not isinstance(items, list):
            raise LexiconError(f"{file}: {category!r} must be a list of phrases.")
        entries += [(category, item, f"{category}[{i}]") for i, item in enumerate(items)]
    return entries


def _parse_entry(entry: Any, category: str, phrase_id: int, file: Path, where: str) -> Phrase:
    """One lexicon entry (string or object) as a `Phrase`."""
    if isinstance(entry, str):
        entry = {"phrase": entry}
    if not isinstance(entry, dict):
        raise LexiconError(
            f"{file}: {where}: expected a string or an object {{\"phrase\": ...}}, got "
            f"{type(entry).__name__}."
        )
    unknown = sorted(set(entry) - _ENTRY_KEYS)
    if unknown:
        raise LexiconError(
            f"{file}: {where}: unknown key(s) {unknown}; valid keys are {sorted(_ENTRY_KEYS)}."
        )
    text = entry.get("phrase")
    if not isinstance(text, str) or not text.strip():
        raise LexiconError(f"{file}: {where}: 'phrase' must be a non-empty string, got {text!r}.")
    if text != text.strip():
        raise LexiconError(
            f"{file}: {where}: phrase {text!r} starts or ends with whitespace; remove it (tokens "
            "carrying a leading space are matched anyway)."
        )
    flags = {}
    for key, default in (("case_sensitive", False), ("word_boundary", True)):
        value = entry.get(key, default)
        if not isinstance(value, bool):
            raise LexiconError(f"{file}: {where}: {key!r} must be true or false, got {value!r}.")
        flags[key] = value
    return Phrase(id=phrase_id, phrase=text, category=category, **flags)


# --------------------------------------------------------------------------------------------------
# Matching


class PhraseHit(NamedTuple):
    """A phrase occurrence in a text: `[start, end)` character range."""

    phrase: str
    category: str
    start: int
    end: int


def find_phrases(text: str, lexicon: Lexicon) -> list[PhraseHit]:
    """Find lexicon phrases in `text`, left to right, without overlaps.

    Leftmost match first; at one position the longest phrase wins whatever its category (so
    "Therefore, after all this, I believe the answer is" beats "therefore", and "let me recheck"
    beats "recheck"); equal lengths go to the lower phrase id.

    Args:
        text: Any text.
        lexicon: The phrases.

    Returns:
        The hits in text order.
    """
    phrases = lexicon.phrases
    hits = []
    for m in lexicon.regex.finditer(text):
        p = phrases[int(m.lastgroup[1:].partition("_")[0])]
        hits.append(PhraseHit(p.phrase, p.category, m.start(), m.end()))
    return hits


@dataclass(frozen=True)
class PhraseMatch:
    """A phrase occurrence in a trajectory and the tokens it covers.

    Attributes:
        phrase: The lexicon phrase (not the matched spelling).
        category: `"reflection"` or `"delimiter"`.
        char_start: Start in `TokenizedTrace.trajectory_text`.
        char_end: End (exclusive) in `trajectory_text`.
        token_start: First covered token, as an index into `TokenizedTrace.ids`.
        token_end: One past the last covered token.
    """

    phrase: str
    category: str
    char_start: int
    char_end: int
    token_start: int
    token_end: int


@dataclass(frozen=True)
class TokenCategories:
    """Per-token categories of one `TokenizedTrace`.

    Attributes:
        category: uint8 [n_tokens], codes from `CATEGORY_CODES`.
        phrase_id: int16 [n_tokens], `Lexicon.phrases` id of the covering phrase, -1 for none.
        is_first: bool [n_tokens], True on the first token of each phrase occurrence.
        matches: The phrase occurrences, in text order.
    """

    category: np.ndarray
    phrase_id: np.ndarray
    is_first: np.ndarray
    matches: list[PhraseMatch]


def categorize(tt: TokenizedTrace, lexicon: Lexicon) -> TokenCategories:
    """Give every token of a tokenized trace a category.

    Prompt, scaffold and answer tokens get those codes. A trajectory token is reflection/delimiter
    when its character range overlaps a phrase occurrence (so " Wait", "Wait," and byte-level
    tokens holding part of a Chinese character count), else ordinary. A token overlapping two
    adjacent occurrences belongs to the later one, so that every occurrence's first token is the
    one holding its first character; the earlier occurrence keeps it only if it has no other token.

    Args:
        tt: The tokenized trace.
        lexicon: The phrases.

    Returns:
        The `TokenCategories`.

    Example:
        >>> cats = categorize(tt, load_lexicon())
        >>> cats.category[tt.span("trajectory")]   # uint8 [n_trajectory_tokens]
    """
    n = tt.n_tokens
    category = np.full(n, CATEGORY_CODES["ordinary"], dtype=np.uint8)
    for name in ("prompt", "scaffold", "answer"):
        category[tt.span(name)] = CATEGORY_CODES[name]
    phrase_id = np.full(n, -1, dtype=np.int16)
    is_first = np.zeros(n, dtype=bool)

    offset0 = tt.spans["trajectory"][0]
    starts = tt.trajectory_offsets[:, 0]
    ends = tt.trajectory_offsets[:, 1]
    ranges: list[list[int]] = []
    hits = find_phrases(tt.trajectory_text, lexicon)
    for hit in hits:
        covered = np.flatnonzero((starts < hit.end) & (ends > hit.start))
        if covered.size == 0:  # cannot happen with a consistent offset mapping; keep it visible
            ranges.append([0, 0])
            continue
        lo, hi = int(covered[0]), int(covered[-1]) + 1
        if ranges and lo < ranges[-1][1]:
            prev = ranges[-1]
            if lo > prev[0]:
                prev[1] = lo  # the shared token goes to this (later) occurrence
            else:
                lo = prev[1]  # the earlier occurrence has no other token: it keeps it
        ranges.append([lo, max(lo, hi)])

    matches = []
    for hit, (lo, hi) in zip(hits, ranges):
        ts, te = offset0 + lo, offset0 + hi
        if te > ts:
            category[ts:te] = CATEGORY_CODES[hit.category]
            phrase_id[ts:te] = lexicon.phrase_ids[hit.phrase]
            is_first[ts] = True
        matches.append(PhraseMatch(hit.phrase, hit.category, hit.start, hit.end, ts, te))
    return TokenCategories(category=category, phrase_id=phrase_id, is_first=is_first,
                           matches=matches)


# --------------------------------------------------------------------------------------------------
# Corpus summaries


def count_categories(tokenized_traces: Iterable[TokenizedTrace], lexicon: Lexicon) -> dict:
    """Phrase occurrence counts and token totals per category over many traces.

    Args:
        tokenized_traces: The traces.
        lexicon: The phrases.

    Returns:
        JSON-ready `{"phrases": {phrase: n_occurrences} (every phrase, lexicon order),
        "tokens_per_category": {name: n_tokens} (every category, code order), "n_traces": n,
        "lexicon_fingerprint": sha256}`.
    """
    phrase_counts = np.zeros(len(lexicon.phrases), dtype=np.int64)
    token_counts = np.zeros(len(CATEGORY_CODES), dtype=np.int64)
    n_traces = 0
    for tt in tokenized_traces:
        cats = categorize(tt, lexicon)
        for m in cats.matches:
            phrase_counts[lexicon.phrase_ids[m.phrase]] += 1
        token_counts += np.bincount(cats.category, minlength=len(CATEGORY_CODES))
        n_traces += 1
    return {
        "phrases": {p.phrase: int(c) for p, c in zip(lexicon.phrases, phrase_counts)},
        "tokens_per_category": {name: int(token_counts[code])
                                for name, code in CATEGORY_CODES.items()},
        "n_traces": n_traces,
        "lexicon_fingerprint": lexicon.fingerprint(),
    }


def format_category_table(counts: dict) -> str:
    """Human-readable table of a `count_categories` result.

    Args:
        counts: The dict from `count_categories`.

    Returns:
        Tokens per category (with shares), then the phrases that occur, most frequent first.
    """
    tokens = counts["tokens_per_category"]
    total = sum(tokens.values()) or 1
    width = max([len(p) for p in counts["phrases"]] + [len("category"), 10])
    lines = [f"{counts['n_traces']} traces, {sum(tokens.values())} tokens", "",
             f"{'category':<{width}}  {'tokens':>9}  {'share':>6}"]
    lines += [f"{name:<{width}}  {n:>9}  {100 * n / total:>5.1f}%" for name, n in tokens.items()]
    found = sorted(((n, p) for p, n in counts["phrases"].items() if n), key=lambda x: (-x[0], x[1]))
    lines += ["", f"{'phrase':<{width}}  {'count':>9}"]
    lines += [f"{p:<{width}}  {n:>9}" for n, p in found]
    n_absent = sum(1 for n in counts["phrases"].values() if not n)
    if n_absent:
        lines.append(f"({n_absent} lexicon phrases do not occur)")
    return "\n".join(lines)
