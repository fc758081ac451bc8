"""`effects` end to end on tiny-reasoner: stored arrays (declared shapes, predictions equal to the
`updates` arrays), the summary (V7, headline, probes), resume, the plot, and clear refusals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cache import open_cache
from probes.measures.effects.directions import DIRECTION_CATEGORIES, projections, trajectory_residuals
from probes.measures.updates.shared_pass import trace_update_arrays
from probes.models.load import load_model
from probes.pipeline.effects import DONE_KEY, EFFECT_ARRAYS, directions_path
from probes.reasoner.train import SAMPLES_PATH
from probes.run import main
from probes.traces.read import read_traces
from probes.traces.tokenize import tokenize_traces

BASE = ["--model", "tiny-reasoner", "--device", "cpu", "--no-progress", "--pairs-per-category",
        "3", "--batch-size", "4"]


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    path = tmp_path_factory.mktemp("traces") / "samples.jsonl"
    path.write_text("".join(SAMPLES_PATH.read_text().splitlines(keepends=True)[:5]))
    return path


@pytest.fixture(scope="module")
def run(samples, tmp_path_factory):
    """(cache path, the JSON summary) of `effects` on the 5 traces."""
    tmp = tmp_path_factory.mktemp("eff")
    out = tmp / "run.h5"
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["effects", *BASE, "--traces", str(samples), "--out", str(out), "--json",
                     "--plots", str(tmp / "plots")]) == 0
    return out, json.loads(buf.getvalue().strip().splitlines()[-1])


def test_stored_arrays_and_predictions_equal_the_update_arrays(run, samples):
    out, _ = run
    loaded = load_model("tiny-reasoner", device="cpu")
    tts, _ = tokenize_traces(read_traces(samples).traces, loaded.tokenizer)
    with open_cache(out) as reader:
        assert len(reader) == 5
        for tr, tt in zip(reader, tts):
            got = {n: np.asarray(tr[n][...]) for n in EFFECT_ARRAYS}
            n = len(got["eff_pairs"])
            assert got["eff_pairs"].shape == (n, 2) and 3 <= n <= 9
            T = tr.spans["trajectory"][1] - tr.spans["trajectory"][0]
            assert got["dir_proj"].shape == got["dir_cos"].shape == (2, 4, T)
            for name in ("eff_dl_attn", "eff_dl_mlp", "eff_pred_m7", "eff_pred_m6"):
                assert got[name].shape == (n,) and np.isfinite(got[name]).all()
            if tr.id != tts[0].trace.id:
                continue
            upd, _ = trace_update_arrays(loaded, tt)
            layer, tok = got["eff_pairs"][:, 0], got["eff_pairs"][:, 1]
            np.testing.assert_allclose(got["eff_pred_m7"], upd["upd_m7"][layer, tok], rtol=1e-4,
                                       atol=1e-9)
            np.testing.assert_allclose(got["eff_pred_m6"], -upd["upd_dl_pred"][layer, tok],
                                       rtol=1e-4, atol=1e-9)
    assert directions_path(out).is_file()


def test_summary_reports_v7_headline_and_probes(run):
    out, s = run
    assert s["n_traces"] == 5 and s["n_pairs"] >= 15
    for edit in ("attn", "mlp"):
        assert set(s["v7"][edit]) == {"all", "reflection", "delimiter", "ordinary"}
        assert s["v7"][edit]["all"]["n"] == s["n_pairs"]
        assert set(s["headline"]["this"][edit]) == {"reflection", "delimiter", "ordinary"}
    assert s["run"]["n_written"] == 5
    assert set(s["directions"]["probe"]) == {"reflection", "delimiter"}
    assert (out.parent / "plots" / "effects_scatter.png").is_file()
    saved = json.loads(Path(str(out) + ".effects.json").read_text())
    assert saved["n_pairs"] == s["n_pairs"]


def test_resume_skips_done_traces_and_refuses_other_settings(run, samples, capsys):
    out, _ = run
    assert main(["effects", *BASE, "--traces", str(samples), "--out", str(out), "--resume"]) == 0
    assert "0 traces written, 5 already done" in capsys.readouterr().out
    assert main(["effects", *BASE[:-4], "--pairs-per-category", "5", "--traces", str(samples),
                 "--out", str(out), "--resume"]) == 2
    assert "eff_pairs_per_category: stored 3, given 5" in capsys.readouterr().err


def test_bad_flags_are_one_error_line(samples, tmp_path, capsys):
    assert main(["effects", *BASE, "--traces", str(samples), "--out", str(tmp_path / "x.h5"),
                 "--scale", "2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "argument --scale: must be a number in (0, 1], got 2" in err
    assert main(["effects", *BASE, "--traces", str(samples), "--out", str(tmp_path / "y.h5"),
                 "--versus", str(tmp_path / "missing.h5")]) == 2
    assert "--versus" in capsys.readouterr().err
    assert DONE_KEY == "eff_dl_mlp"


def test_demo_section_trained_vs_random_init(tmp_path):
    from probes.demo.effects import demo_section, format_demo_line

    d = demo_section(load_model("tiny-reasoner", device="cpu"), tmp_path, limit=4)
    assert d["n_traces"] == 4 and d["n_pairs"] == d["v7"]["attn"]["n"] >= 12
    assert set(d["headline"]) == {"trained", "random_init"}
    assert all(Path(p).is_file() for p in d["files"].values())
    text = format_demo_line(d)
    assert "attention knockout vs M7 Spearman" in text and "random-init" in text


def test_an_updates_cache_gains_the_effects_and_they_match_its_arrays(samples, tmp_path):
    out = tmp_path / "upd.h5"
    assert main(["updates", "--model", "tiny-reasoner", "--device", "cpu", "--no-progress",
                 "--traces", str(samples), "--out", str(out), "--limit", "2"]) == 0
    assert main(["effects", *BASE, "--traces", str(samples), "--out", str(out), "--limit", "2",
                 "--resume"]) == 0
    with open_cache(out) as reader:
        for tr in reader:
            pairs = np.asarray(tr["eff_pairs"][...])
            m7, dl = np.asarray(tr["upd_m7"][...]), np.asarray(tr["upd_dl_pred"][...])
            np.testing.assert_allclose(tr["eff_pred_m7"][...], m7[pairs[:, 0], pairs[:, 1]],
                                       rtol=1e-4, atol=1e-9)
            np.testing.assert_allclose(tr["eff_pred_m6"][...], -dl[pairs[:, 0], pairs[:, 1]],
                                       rtol=1e-4, atol=1e-9)
            assert tr.attrs["eff_pairs_per_category"] == 3


def _directions(out):
    with np.load(directions_path(out)) as z:
        return {k: z[k] for k in z.files if k in DIRECTION_CATEGORIES}


def test_resume_with_a_larger_limit_projects_on_the_first_runs_directions(samples, tmp_path):
    """The directions are fixed at the first run: a resumed run over more traces projects its new
    traces on them (as one run with those directions would), and leaves them as they are."""
    out = tmp_path / "grow.h5"
    assert main(["effects", *BASE, "--traces", str(samples), "--out", str(out), "--limit", "2"]) == 0
    first = _directions(out)
    assert main(["effects", *BASE, "--traces", str(samples), "--out", str(out), "--limit", "4",
                 "--resume"]) == 0
    again = _directions(out)
    assert first.keys() == again.keys() and first
    for c in first:
        np.testing.assert_array_equal(again[c], first[c])
    loaded = load_model("tiny-reasoner", device="cpu")
    tts, _ = tokenize_traces(read_traces(samples).traces[:4], loaded.tokenizer)
    with open_cache(out) as reader:
        assert sorted(reader.trace_ids()) == sorted(tt.trace.id for tt in tts)
        for tt in tts:
            stored = np.asarray(reader.trace(tt.trace.id)["dir_proj"][...])
            resid = trajectory_residuals(loaded, tt.ids, tt.spans["trajectory"])
            for k, c in enumerate(DIRECTION_CATEGORIES):
                want = projections(resid, first[c]).astype(np.float32)
                np.testing.assert_array_equal(stored[k], want, err_msg=f"{tt.trace.id} {c}")


def test_resume_refuses_other_directions_and_another_model_before_the_work(samples, tmp_path,
                                                                           monkeypatch, capsys):
    import shutil

    import probes.pipeline.effects as effects
    from probes.reasoner.train import CHECKPOINT_DIR

    out = tmp_path / "fixed.h5"
    args = ["effects", *BASE, "--traces", str(samples), "--out", str(out), "--limit", "2",
            "--resume"]
    assert main(args) == 0
    capsys.readouterr()
    passes = []
    monkeypatch.setattr(effects, "_directions_pass", lambda *a: passes.append(a))
    other = tmp_path / "other-model"
    shutil.copytree(CHECKPOINT_DIR, other)
    assert main([*args, "--model", str(other)]) == 2  # the last --model wins
    err = capsys.readouterr().err
    assert err.startswith("error:") and "its model differ" in err and str(out) in err
    assert passes == []  # refused before the pass over the traces
    assert main(args) == 0  # the directions are reused: no pass either
    assert passes == [] and "0 traces written, 2 already done" in capsys.readouterr().out

    path = directions_path(out)
    dirs = _directions(out)
    np.savez(path, **{c: v * np.float32(1.5) for c, v in dirs.items()})
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "holds behaviour directions" in err and path.name in err
    path.unlink()
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and f"{path} is missing" in err


def test_versus_is_checked_before_the_work(samples, tmp_path, capsys):
    versus = tmp_path / "not-effects.h5"
    versus.write_bytes(b"not a cache")
    out = tmp_path / "v.h5"
    assert main(["effects", *BASE, "--traces", str(samples), "--out", str(out),
                 "--versus", str(versus)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and str(versus) in err[0]
    assert not out.exists() and not directions_path(out).exists()
