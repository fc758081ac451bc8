"""Tests for probes.categories: lexicon loading, phrase matching, token categories, counts."""

import json
import re

import numpy as np
import pytest

from probes.errors import LexiconError
from probes.traces.categories import (
    CATEGORY_CODES,
    DEFAULT_LEXICON_PATH,
    categorize,
    count_categories,
    find_phrases,
    format_category_table,
    load_lexicon,
)
from probes.traces.read import Trace
from probes.traces.tokenize import TokenizedTrace, tokenize_trace

REFLECTION = CATEGORY_CODES["reflection"]
DELIMITER = CATEGORY_CODES["delimiter"]


@pytest.fixture(scope="module")
def lexicon():
    return load_lexicon()


def phrases_in(text, lexicon):
    return [(h.phrase, text[h.start : h.end]) for h in find_phrases(text, lexicon)]


def write_json(path, data):
    path.write_text(data if isinstance(data, str) else json.dumps(data), encoding="utf-8")
    return path


# --------------------------------------------------------------------------------------------------
# The packaged lexicon


def test_packaged_lexicon_has_required_phrases(lexicon):
    reflection = {p.phrase for p in lexicon.phrases if p.category == "reflection"}
    delimiter = {p.phrase for p in lexicon.phrases if p.category == "delimiter"}
    assert {"wait", "alternatively", "however", "hold on", "let me check", "let me verify",
            "let me double-check", "recheck", "let me recheck", "hmm", "actually", "but",
            "let me think again", "let me reconsider", "等等", "另一种方法", "让我思考一下"} <= reflection
    assert {"</think>", "therefore", "thus", "so the answer is", "**Final Answer**", "\\boxed",
            "Therefore, after all this, I believe the answer is"} <= delimiter
    assert [p.id for p in lexicon.phrases] == list(range(len(lexicon.phrases)))
    assert lexicon.fingerprint() == load_lexicon().fingerprint()
    assert re.fullmatch(r"[0-9a-f]{64}", lexicon.fingerprint())
    assert lexicon.sources == (str(DEFAULT_LEXICON_PATH),)


def test_to_json_round_trips(lexicon, tmp_path):
    path = write_json(tmp_path / "lex.json", lexicon.to_json())
    assert load_lexicon(path).fingerprint() == lexicon.fingerprint()


# --------------------------------------------------------------------------------------------------
# Matching on text


def test_longest_match_wins(lexicon):
    text = ("Therefore, after all this, I believe the answer is 5. therefore 5. "
            "Let me recheck. recheck. Let me double-check.")
    assert phrases_in(text, lexicon) == [
        ("Therefore, after all this, I believe the answer is",
         "Therefore, after all this, I believe the answer is"),
        ("therefore", "therefore"),
        ("let me recheck", "Let me recheck"),
        ("recheck", "recheck"),
        ("let me double-check", "Let me double-check"),
    ]


def test_case_insensitive_and_word_boundaries(lexicon):
    text = "WAIT. wait, Wait! waiter butter await rebut hmmm Hmm BUT"
    assert phrases_in(text, lexicon) == [
        ("wait", "WAIT"), ("wait", "wait"), ("wait", "Wait"), ("hmm", "Hmm"), ("but", "BUT")]


def test_literal_phrases_without_word_boundaries(lexicon):
    text = "done.</think>\n\n**Final Answer**\n\\boxed{3} and x\\boxed{4}"
    assert phrases_in(text, lexicon) == [
        ("</think>", "</think>"), ("**Final Answer**", "**Final Answer**"),
        ("\\boxed", "\\boxed"), ("\\boxed", "\\boxed")]


def test_chinese_phrases_need_no_spaces(lexicon):
    text = "好的等等我算错了。另一种方法是wait一下，让我思考一下。因此答案是5"
    assert phrases_in(text, lexicon) == [
        ("等等", "等等"), ("另一种方法", "另一种方法"), ("wait", "wait"),
        ("让我思考一下", "让我思考一下"), ("因此", "因此")]


# --------------------------------------------------------------------------------------------------
# Lexicon files


def test_extra_lexicon_is_merged(lexicon, tmp_path):
    extra = write_json(tmp_path / "extra.json", {
        "version": 1,
        "reflection": ["let me see", "wait", {"phrase": "OOPS", "case_sensitive": True}],
        "delimiter": [{"phrase": "qed", "word_boundary": False}],
    })
    merged = load_lexicon(extra=[extra])
    n = len(lexicon.phrases)
    assert len(merged.phrases) == n + 3  # "wait" (same category and options) is kept once
    assert [p.phrase for p in merged.phrases[n:]] == ["let me see", "OOPS", "qed"]
    assert merged.phrase_ids["qed"] == n + 2
    assert merged.fingerprint() != lexicon.fingerprint()
    assert merged.sources == (str(DEFAULT_LEXICON_PATH), str(extra))
    assert phrases_in("Let me see: oops, OOPS. QEDs", merged) == [
        ("let me see", "Let me see"), ("OOPS", "OOPS"), ("qed", "QED")]


def test_conflicting_extra_phrase(tmp_path):
    extra = write_json(tmp_path / "extra.json", {"version": 1, "delimiter": ["Wait"]})
    message = r"extra\.json: delimiter\[0\]: phrase 'Wait' is already in .*lexicon\.json"
    with pytest.raises(LexiconError, match=message):
        load_lexicon(extra=[extra])


@pytest.mark.parametrize(("content", "message"), [
    ("{not json", "not valid UTF-8 JSON"),
    ("[1]", "expected a JSON object, got list"),
    ({"reflection": ["x"]}, r"'version' is None; this toolkit reads version 1"),
    ({"version": 1, "reflections": ["x"]}, r"unknown key\(s\) \['reflections'\]"),
    ({"version": 1, "reflection": "wait"}, "'reflection' must be a list"),
    ({"version": 1, "reflection": [3]}, r"reflection\[0\]: expected a string or an object"),
    ({"version": 1, "delimiter": ["ok", ""]}, r"delimiter\[1\]: 'phrase' must be a non-empty"),
    ({"version": 1, "delimiter": [" pad"]}, "starts or ends with whitespace"),
    ({"version": 1, "delimiter": [{"phrase": "x", "case": True}]}, r"unknown key\(s\) \['case'\]"),
    ({"version": 1, "delimiter": [{"phrase": "x", "word_boundary": "no"}]},
     "'word_boundary' must be true or false"),
    ({"version": 1}, "the lexicon has no phrases"),
])
def test_malformed_lexicon(tmp_path, content, message):
    path = write_json(tmp_path / "bad.json", content)
    with pytest.raises(LexiconError, match=message) as info:
        load_lexicon(path)
    assert "bad.json" in str(info.value)


def test_missing_lexicon_file(tmp_path):
    with pytest.raises(LexiconError, match=r"nope\.json' does not exist"):
        load_lexicon(extra=[tmp_path / "nope.json"])


# --------------------------------------------------------------------------------------------------
# Token categories


def covering_tokens(tt, start, end):
    """Global indices of the trajectory tokens whose offsets overlap [start, end)."""
    s, e = tt.trajectory_offsets[:, 0], tt.trajectory_offsets[:, 1]
    return tt.spans["trajectory"][0] + np.flatnonzero((s < end) & (e > start))


def test_categorize_small_trace(qwen_tokenizer, lexicon):
    trace = Trace("t", "What is 2+2?", "<think>\nOkay.\n\nWait, hold on: 2+2=4. Therefore 4.\n"
                  "</think>\n\nThe answer is \\boxed{4}.", "4", {}, 1)
    tt = tokenize_trace(trace, qwen_tokenizer)
    cats = categorize(tt, lexicon)
    assert cats.category.dtype == np.uint8 and cats.phrase_id.dtype == np.int16
    assert cats.is_first.dtype == bool and cats.category.shape == (tt.n_tokens,)
    for name in ("prompt", "scaffold", "answer"):
        assert (cats.category[tt.span(name)] == CATEGORY_CODES[name]).all()
    assert [(m.phrase, m.category) for m in cats.matches] == [
        ("wait", "reflection"), ("hold on", "reflection"), ("therefore", "delimiter"),
        ("</think>", "delimiter"), ("\\boxed", "delimiter")]
    for m in cats.matches:
        assert (cats.category[m.token_start : m.token_end] == CATEGORY_CODES[m.category]).all()
        assert (cats.phrase_id[m.token_start : m.token_end] == lexicon.phrase_ids[m.phrase]).all()
        assert cats.is_first[m.token_start]
        assert not cats.is_first[m.token_start + 1 : m.token_end].any()
        text = qwen_tokenizer.decode(tt.ids[m.token_start : m.token_end])
        assert tt.trajectory_text[m.char_start : m.char_end] in text
    hold_on = cats.matches[1]
    assert hold_on.token_end - hold_on.token_start == 2  # " hold", " on"
    n_phrase_tokens = sum(m.token_end - m.token_start for m in cats.matches)
    traj = cats.category[tt.span("trajectory")]
    assert (traj == 0).sum() == len(traj) - n_phrase_tokens
    assert cats.is_first.sum() == len(cats.matches)


def test_categorize_chinese(qwen_tokenizer, lexicon):
    text = "好的，等等，我算错了。另一种方法：让我思考一下。因此答案是5。"
    tt = tokenize_trace(Trace("zh", "问题", text, "5", {}, 1), qwen_tokenizer)
    cats = categorize(tt, lexicon)
    assert [m.phrase for m in cats.matches] == ["等等", "另一种方法", "让我思考一下", "因此"]
    for m in cats.matches:
        assert m.token_end > m.token_start
        assert list(range(m.token_start, m.token_end)) == list(covering_tokens(tt, m.char_start,
                                                                              m.char_end))
        assert m.phrase in qwen_tokenizer.decode(tt.ids[m.token_start : m.token_end])
        assert cats.is_first[m.token_start]
        assert (cats.category[m.token_start : m.token_end] == CATEGORY_CODES[m.category]).all()


def handmade(text, offsets):
    """A TokenizedTrace whose whole sequence is the trajectory, with given token offsets."""
    n = len(offsets)
    return TokenizedTrace(
        trace=Trace("h", "q", text, "a", {}, 1), ids=np.arange(n, dtype=np.int64),
        spans={"prompt": (0, 0), "trajectory": (0, n), "scaffold": (n, n), "answer": (n, n)},
        trajectory_offsets=np.asarray(offsets, dtype=np.int64), trajectory_text=text,
        prompt_text="")


def test_token_shared_by_two_matches_goes_to_the_later(lexicon):
    # "hmm" = tokens 0-1, "wait" = tokens 1-2: token 1 ("m w") straddles both.
    tt = handmade("hmm wait", [(0, 2), (2, 5), (5, 8)])
    cats = categorize(tt, lexicon)
    assert [(m.phrase, m.token_start, m.token_end) for m in cats.matches] == [
        ("hmm", 0, 1), ("wait", 1, 3)]
    assert cats.is_first.tolist() == [True, True, False]
    # When the earlier match has no other token it keeps the shared one.
    tt = handmade("hmm wait", [(0, 5), (5, 8)])
    cats = categorize(tt, lexicon)
    assert [(m.phrase, m.token_start, m.token_end) for m in cats.matches] == [
        ("hmm", 0, 1), ("wait", 1, 2)]


# --------------------------------------------------------------------------------------------------
# Real traces: every independent regex hit is covered, with the right category and first token

INDEPENDENT = [
    (r"(?i)\bwait\b", REFLECTION),
    (r"(?i)\balternatively\b", REFLECTION),
    (r"(?i)\bhmm\b", REFLECTION),
    (r"(?i)\bhold on\b", REFLECTION),
    (r"(?i)\blet me check\b", REFLECTION),
    (r"(?i)\btherefore\b", DELIMITER),
    (r"</think>", DELIMITER),
    (r"\\boxed", DELIMITER),
]


def test_real_traces_every_occurrence_is_covered(real_tokenized_traces, lexicon, qwen_tokenizer):
    real_tokenized = real_tokenized_traces
    totals = dict.fromkeys((p for p, _ in INDEPENDENT), 0)
    wait_first_tokens = set()
    wait_after_blank_line = 0
    for tt in real_tokenized:
        cats = categorize(tt, lexicon)
        text = tt.trajectory_text
        for pattern, code in INDEPENDENT:
            for m in re.finditer(pattern, text):
                totals[pattern] += 1
                tokens = covering_tokens(tt, m.start(), m.end())
                assert tokens.size, (tt.trace.id, pattern, m.start())
                assert (cats.category[tokens] == code).all(), (tt.trace.id, pattern, m.start())
                assert cats.is_first[tokens[0]], (tt.trace.id, pattern, m.start())
        for m in cats.matches:
            if m.phrase == "wait":
                wait_first_tokens.add(qwen_tokenizer.decode([tt.ids[m.token_start]]))
                wait_after_blank_line += text[m.char_start - 2 : m.char_start] == "\n\n"
    assert {"Wait", " Wait", " wait"} <= wait_first_tokens
    assert wait_after_blank_line > 1000  # "\n\nWait" (the "\n\n" is its own token)
    assert 3200 < totals[r"(?i)\bwait\b"] < 3300  # 2,889 of them spelled "Wait"
    assert 600 < totals[r"(?i)\balternatively\b"] < 700
    assert totals["</think>"] == 365

    counts = count_categories(real_tokenized, lexicon)
    phrases = counts["phrases"]
    assert phrases["wait"] == totals[r"(?i)\bwait\b"]
    assert phrases["alternatively"] == totals[r"(?i)\balternatively\b"]
    assert phrases["hmm"] == totals[r"(?i)\bhmm\b"]
    assert phrases["hold on"] == totals[r"(?i)\bhold on\b"]
    assert phrases["let me check"] == totals[r"(?i)\blet me check\b"]
    assert phrases["</think>"] == totals["</think>"]
    assert phrases["\\boxed"] == totals[r"\\boxed"]
    assert (phrases["therefore"] + phrases["Therefore, after all this, I believe the answer is"]
            == totals[r"(?i)\btherefore\b"])
    assert counts["n_traces"] == 487
    assert sum(counts["tokens_per_category"].values()) == sum(tt.n_tokens for tt in real_tokenized)
    assert counts["tokens_per_category"]["scaffold"] == 487 * 8
    table = format_category_table(counts)
    assert "487 traces" in table and re.search(r"wait\s+32\d\d", table)
    json.dumps(counts)  # JSON-ready
