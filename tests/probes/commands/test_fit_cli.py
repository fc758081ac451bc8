"""`fit` end to end on tiny-reasoner: the report equals direct library calls; errors are one line."""

from __future__ import annotations

import json

import numpy as np
import pytest

from probes.measures.fits.pseudo_gradient import fit_pseudo_gradient, pseudo_gradient_samples
from probes.measures.fits.thought_patch import thought_patch_fit
from probes.models.load import load_model
from probes.reasoner.train import SAMPLES_PATH
from probes.run import main
from probes.traces.read import read_traces
from probes.traces.tokenize import tokenize_traces


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    path = tmp_path_factory.mktemp("fit") / "t.jsonl"
    path.write_text("".join(SAMPLES_PATH.read_text().splitlines(keepends=True)[:4]))
    return path


@pytest.mark.slow  # fit of the trained and the random-init model, then the library fits again
def test_report_matches_the_library(samples, tmp_path, capsys):
    out = tmp_path / "fit.json"
    assert main(["fit", "--model", "tiny-reasoner", "--traces", str(samples), "--device", "cpu",
                 "--layers", "1", "3", "--random-init-control", "--n-boot", "100", "--json",
                 "--out", str(out)]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert json.loads(out.read_text()) == rep
    assert rep["n_traces"] == 4 and set(rep) >= {"trained", "random_init"}
    loaded = load_model("tiny-reasoner", device="cpu")
    tts, _ = tokenize_traces(read_traces(samples).traces, loaded.tokenizer)
    rng = np.random.default_rng(0)
    direct = fit_pseudo_gradient([pseudo_gradient_samples(loaded, tt, layers=[1, 3], rng=rng)
                                  for tt in tts])
    pg = rep["trained"]["pseudo_gradient"]
    assert pg["layers"] == [1, 3]
    np.testing.assert_allclose(pg["eta"], direct.eta, rtol=1e-6)
    np.testing.assert_allclose(pg["r2_map"], direct.r2_map, rtol=1e-6)
    np.testing.assert_allclose(pg["r2_value_map"], direct.r2_value_map, rtol=1e-6)
    tp = [thought_patch_fit(loaded, tt, which="gate", layers=[1, 3]) for tt in tts]
    gate = rep["trained"]["thought_patch"]["gate"]["layers"]
    assert [r["layer"] for r in gate] == [1, 3]
    np.testing.assert_allclose([r["median_r2_heldout"] for r in gate],
                               np.median(np.stack([f.r2_heldout for f in tp]), axis=0), rtol=1e-6)
    nll = rep["trained"]["thought_patch_nll"]
    assert nll["nll_exact"]["median"] == pytest.approx(nll["nll_clean"]["median"], abs=1e-3)
    assert nll["nll_masked"]["median"] > nll["nll_clean"]["median"] + 1.0
    assert nll["max_logit_err_exact"] < 1e-4
    # the random-init fits are of another model: different numbers, same layout
    assert rep["random_init"]["pseudo_gradient"]["layers"] == [1, 3]
    assert rep["random_init"]["pseudo_gradient"]["eta"] != pg["eta"]


@pytest.mark.parametrize("argv, expected", [
    (["--limit", "1"], "--limit must be at least 2"),
    (["--layers", "7"], "--layers [7] out of range"),
    (["--out", "/nonexistent-dir/x.json"], "does not exist"),
])
def test_bad_input_is_one_line_error(samples, capsys, argv, expected):
    capsys.readouterr()
    assert main(["fit", "--model", "tiny-reasoner", "--traces", str(samples), "--device", "cpu",
                 *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected in err[0]
