"""`lhat` and `compare` end to end on tiny-reasoner: stored curves, naive check, table, plots."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cache import open_cache
from probes.reasoner.train import SAMPLES_PATH
from probes.run import main


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    """The first 24 sample traces (enough reflections for per-trace statistics)."""
    path = tmp_path_factory.mktemp("traces") / "samples.jsonl"
    path.write_text("".join(SAMPLES_PATH.read_text().splitlines(keepends=True)[:24]))
    return path


@pytest.fixture(scope="module")
def lhat_cache(samples, tmp_path_factory):
    out = tmp_path_factory.mktemp("lhat") / "run.h5"
    code = main(["lhat", "--resume", "--model", "tiny-reasoner", "--traces", str(samples), "--out", str(out),
                 "--check-naive", "3", "--device", "cpu", "--json", "--no-progress"])
    assert code == 0
    return out


def test_lhat_json_and_stored_arrays(samples, tmp_path, capsys):
    out = tmp_path / "run.h5"
    assert main(["lhat", "--resume", "--model", "tiny-reasoner", "--traces", str(samples), "--out", str(out),
                 "--check-naive", "2", "--limit", "4", "--device", "cpu", "--json",
                 "--no-progress"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["n_traces"] == 4 and result["n_written"] == 4
    assert result["seconds"] > 0
    assert result["naive_max_abs_diff"] <= 1e-4
    with open_cache(out) as reader:
        assert len(reader) == 4
        tr = next(iter(reader))
        a, b = tr.spans["trajectory"]
        lhat = tr["lhat"][:]
        assert lhat.dtype == np.float32 and lhat.shape == (b - a + 1,)
        np.testing.assert_allclose(tr["lhat_delta"][:], np.diff(lhat.astype(np.float64)), atol=1e-6)
        assert tr["phrase_id"][:].shape == tr.tokens.shape
        assert tr["paragraph_start"][:].shape == (b - a,)
    # resuming skips what is there
    assert main(["lhat", "--resume", "--model", "tiny-reasoner", "--traces", str(samples), "--out", str(out),
                 "--limit", "6", "--device", "cpu", "--json", "--no-progress"]) == 0
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (again["n_written"], again["n_skipped"]) == (2, 4)


def test_lhat_falls_and_reflections_move_it(lhat_cache, tmp_path, capsys):
    plots = tmp_path / "plots"
    assert main(["compare", str(lhat_cache), "--json", "--plots", str(plots), "--n-boot", "300"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["n_traces"] == 24
    rows = {(r["a"], r["b"]): r for r in report["table"]["rows"]}
    refl = rows[("reflection", "matched_to_reflection")]
    assert refl["n_traces"] >= 5
    assert 0 <= refl["p_holm"] <= 1
    assert report["trend"]["share_falling"] >= 0.9  # the answer gets certain along the trajectory
    pngs = sorted(plots.glob("*.png"))
    assert len(pngs) >= 2 and all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    # the human table names the comparisons
    assert main(["compare", str(lhat_cache), "--n-boot", "100"]) == 0
    text = capsys.readouterr().out
    assert "reflection" in text and "ordinary" in text


def test_compare_without_lhat_is_a_one_line_error(tmp_path, capsys):
    missing = tmp_path / "none.h5"
    assert main(["compare", str(missing)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "none.h5" in err[0]


def test_raml_notebook_mode_uses_its_word_matches(lhat_cache, capsys):
    with open_cache(lhat_cache) as reader:
        occ = [reader.trace(i)["raml_notebook_occurrences"][:] for i in reader.trace_ids()]
        traj = [reader.trace(i).tokens[slice(*reader.trace(i).spans["trajectory"])]
                for i in reader.trace_ids()]
    assert sum(len(o) for o in occ) > 0 and all(o.shape[1] == 3 for o in occ)
    for o, ids in zip(occ, traj, strict=True):
        assert all(0 <= a < b <= len(ids) for a, b, _ in o)
    assert main(["compare", str(lhat_cache), "--raml-notebook", "--json", "--n-boot", "100"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["table"]["meta"]["raml_notebook"] is True
    names = {r["a"] for r in report["table"]["rows"]}
    assert not any(n.startswith("phrase:") and n[7:] not in
                   ("wait", "Wait", "retry", "Retry", "recheck", "Recheck", "however", "However",
                    "alternatively", "Alternatively") for n in names)


def test_thinking_versus_no_thinking(samples, lhat_cache, tmp_path, capsys):
    nothink = tmp_path / "nothink.h5"
    assert main(["lhat", "--resume", "--model", "tiny-reasoner", "--traces", str(samples), "--out",
                 str(nothink), "--no-thinking", "--device", "cpu", "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["compare", str(lhat_cache), "--versus", str(nothink), "--json",
                 "--n-boot", "200"]) == 0
    vs = json.loads(capsys.readouterr().out)["versus"]
    assert vs["n_pairs"] == 24
    final = vs["metrics"]["final"]
    # with its reasoning the model is sure of the answer; with only the delimiter it is not
    assert final["median_a"] < 0.01 < 1.0 < final["median_b"]
    assert final["p_holm"] < 0.01
