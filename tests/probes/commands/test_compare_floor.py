"""`compare` on two traces: n stated, no CI, no p-value, no verdict; matched controls by default."""

from __future__ import annotations

import json
import math

import pytest

from probes.reasoner.train import SAMPLES_PATH
from probes.run import main

MODEL = ["--model", "tiny-reasoner", "--device", "cpu", "--no-progress"]


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    root = tmp_path_factory.mktemp("floor")
    traces = root / "t.jsonl"
    traces.write_text("".join(SAMPLES_PATH.read_text().splitlines(keepends=True)[:2]))
    out = root / "two.h5"
    for cmd in ("lhat", "updates"):
        assert main([cmd, *MODEL, "--traces", str(traces), "--resume", "--out", str(out)]) == 0
    return out


def _nan(x) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x))


def test_two_traces_print_no_ci_and_no_p(two, capsys):
    capsys.readouterr()
    assert main(["compare", str(two), "--n-boot", "100", "--no-progress", "--no-fit"]) == 0
    text = capsys.readouterr().out
    assert "n = 2: too few traces for inference" in text
    assert "p_holm" in text  # the header is there, the values are not
    lhat_rows = [line for line in text.splitlines() if " vs " in line and "  " in line]
    assert lhat_rows
    for line in lhat_rows:
        assert "[" not in line.split(" vs ", 1)[1].split("(n =")[0]  # no CI on the row
        assert " more " not in f" {line} " and " less " not in f" {line} "
    assert "[95% CI " not in text and "Wilcoxon p" not in text  # the trend line has neither
    assert "significant per-layer effects" not in text

    assert main(["compare", str(two), "--n-boot", "100", "--no-progress", "--no-fit",
                 "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    rows = rep["table"]["rows"] + rep["updates"]["comparison"]["rows"]
    for r in rows:
        assert r["n_traces"] <= 2 and r["testable"] is False
        assert _nan(r["wilcoxon_p"]) and _nan(r["p_holm"])
        assert all(_nan(x) for x in (*r["ci_median_a"], *r["ci_median_b"], *r["ci_median_diff"]))
    assert all(r["effect"] == "not testable" for r in rep["updates"]["comparison"]["rows"])
    assert rep["updates"]["significant"] == []
    trend = rep["trend"]
    assert trend["note"] == "n = 2: too few traces for inference"
    assert _nan(trend["wilcoxon_p"]) and all(_nan(x) for x in trend["share_falling_ci"])
    # the raw values are shown in place of the statistics
    r = rep["table"]["rows"][1]
    assert r["a"] == "delimiter" and r["b"] == "matched_to_delimiter"
    assert len(r["values_a"]) == r["n_traces"] == 2


def test_matched_by_default_unmatched_on_request(two, capsys):
    capsys.readouterr()
    assert main(["compare", str(two), "--n-boot", "100", "--no-progress", "--no-fit",
                 "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    pairs = [(r["a"], r["b"]) for r in rep["table"]["rows"]][:2]
    assert pairs == [("reflection", "matched_to_reflection"), ("delimiter", "matched_to_delimiter")]
    assert rep["matching"]["applied"] is True
    bal = rep["matching"]["balance"]["matched_to_delimiter"]
    assert bal["n_matched"] == bal["n_occurrences"] > 0
    assert main(["compare", str(two), "--n-boot", "100", "--no-progress", "--no-fit",
                 "--json", "--unmatched"]) == 0
    rep = json.loads(capsys.readouterr().out)
    pairs = [(r["a"], r["b"]) for r in rep["table"]["rows"]][:2]
    assert pairs == [("reflection", "ordinary"), ("delimiter", "ordinary")]
    assert rep["matching"]["applied"] is False
    upd_pairs = {(r["a"], r["b"]) for r in rep["updates"]["comparison"]["rows"]}
    assert ("delimiter", "ordinary") in upd_pairs
