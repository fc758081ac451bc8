"""`efficiency` end to end on tiny-reasoner's paired variants: the measures equal the analysis of
the stored curves, variants are paired by group, and bad input gives one `error:` line."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from analyses.efficiency import efficiency_measures
from cache import open_cache
from probes.reasoner.variants import VARIANTS_PATH
from probes.run import main

MODEL = ["--model", "tiny-reasoner", "--device", "cpu", "--no-progress"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """L̂ of the first 4 groups (12 traces: original, direct, summary of each)."""
    root = tmp_path_factory.mktemp("eff")
    traces = root / "v.jsonl"
    traces.write_text("".join(VARIANTS_PATH.read_text().splitlines(keepends=True)[:12]))
    out = root / "run.h5"
    assert main(["lhat", *MODEL, "--traces", str(traces), "--out", str(out)]) == 0
    return {"traces": traces, "cache": out, "root": root}


def _json(capsys, *argv) -> dict:
    capsys.readouterr()
    assert main(["efficiency", *argv, "--json", "--n-boot", "200", "-q"]) == 0
    return json.loads(capsys.readouterr().out)


def test_measures_and_variant_pairs(run, capsys):
    rep = _json(capsys, str(run["cache"]), "--traces", str(run["traces"]), "--plots", str(run["root"]))
    assert rep["n_traces"] == 12
    with open_cache(run["cache"]) as reader:
        curves = {tr.id: np.asarray(tr["lhat"][:], np.float64) for tr in reader}
    for row in rep["per_trace"]:
        want = efficiency_measures(curves[row["id"]])
        group, variant = row["id"].split("/")
        assert (row["group"], row["variant"]) == (group, variant)
        for k, v in want.items():
            assert (row[k] is None and math.isnan(v)) or row[k] == pytest.approx(v)
    var = rep["variants"]
    assert var["pairs"] == [["direct", "original"], ["summary", "original"]]
    assert {r["metric"] for r in var["rows"]} == {"final", "tokens_to_90", "stay_to_90"}
    by = {(r["a"], r["metric"]): r for r in var["rows"]}
    assert all(r["n_groups"] == 4 for r in var["rows"])
    # paired differences recomputed by hand from the per-trace rows
    per = {(r["group"], r["variant"]): r for r in rep["per_trace"]}
    d = [per[(g, "summary")]["length"] - per[(g, "original")]["length"] for g, _ in per if _ == "original"]
    assert all(x < 0 for x in d)  # a summary is shorter than its original
    s90 = [per[(g, "summary")]["stay_to_90"] - per[(g, "original")]["stay_to_90"]
           for g, v in per if v == "original"]
    assert by[("summary", "stay_to_90")]["median_diff"] == pytest.approx(float(np.median(s90)))
    assert {r["measure"] for r in rep["length_relation"]} >= {"drop_per_100", "tokens_to_90"}
    assert rep["plots"] and rep["plots"][0].endswith("efficiency_variants.png")
    # the text form names each pair and metric
    capsys.readouterr()
    assert main(["efficiency", str(run["cache"]), "--traces", str(run["traces"]), "--pairs",
                 "summary:direct", "--n-boot", "100", "-q"]) == 0
    text = capsys.readouterr().out
    assert "summary vs direct tokens_to_90" in text and "direct vs original" not in text


def test_without_traces_no_variants(run, capsys):
    rep = _json(capsys, str(run["cache"]))
    assert "variants" not in rep and rep["n_traces"] == 12
    assert all(r["group"] is None for r in rep["per_trace"])


@pytest.mark.parametrize(("args", "needle"), [
    (["--pairs", "summary"], "A:B"),
    (["--pairs", "a:a"], "A:B"),
    (["--pairs", "summary:original"], "--traces"),
    (["--traces", "TRACES", "--pairs", "summary:nothink"], "nothink"),
    (["--traces", "OTHER"], "shares no trace id"),
])
def test_bad_input_is_one_error_line(run, capsys, args, needle):
    other = run["root"] / "other.jsonl"
    other.write_text('{"id": "x", "question": "q", "trajectory": "t", "answer": "1"}\n')
    args = [str(run["traces"]) if a == "TRACES" else str(other) if a == "OTHER" else a for a in args]
    capsys.readouterr()
    assert main(["efficiency", str(run["cache"]), *args, "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and needle in err[-1]


def test_demo_section(tmp_path):
    from probes.models.load import load_model
    from probes.readouts.efficiency import demo_section, format_demo_line

    part = demo_section(load_model("tiny-reasoner", device="cpu"), tmp_path, keep=True, limit=4)
    assert part["n_traces"] == 6 and part["n_groups"] == 2  # rounded up to whole groups, >= 2
    assert (tmp_path / "variants.h5").is_file() and part["cache"] == str(tmp_path / "variants.h5")
    assert {(r["a"], r["metric"]) for r in part["comparisons"]} == {
        (v, m) for v in ("direct", "summary") for m in ("final", "tokens_to_90", "stay_to_90")}
    assert all(r["b"] == "original" and r["n_pairs"] == 2 for r in part["comparisons"])
    json.dumps(part, allow_nan=False)  # plain JSON
    line = format_demo_line(part)
    assert line.startswith("trajectory variants (2 problems") and "summary - original" in line
