"""`python -m probes.run anchors` on tiny-reasoner: stored arrays, resume with another analysis,
bad settings as one error line."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cache import open_cache
from probes import DATA_DIR
from probes.run import main


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    path = tmp_path_factory.mktemp("anchors") / "t.jsonl"
    lines = (DATA_DIR / "tiny_reasoner_traces.jsonl").read_text().splitlines()[:2]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_anchors_writes_and_resumes(samples, tmp_path, capsys):
    out = tmp_path / "a.h5"
    base = ["anchors", "--model", "tiny-reasoner", "--device", "cpu", "--traces", str(samples),
            "--out", str(out), "-q"]
    assert main([*base, "--json", "--plots", str(tmp_path / "plots")]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["n_written"] == 2 and res["supp_rows"] == res["n_chunks"] + 2
    assert res["cache_summary"]["receiver_heads"]
    assert sorted(p.rsplit("/", 1)[1] for p in res["cache_summary"]["plots"]) == [
        "chunk_importance.png", "receiver_kurtosis.png", "suppression_matrix.png"]
    with open_cache(out) as reader:
        for tr in reader:
            spans = np.asarray(tr["chunk_spans"][...])
            c = len(spans)
            assert np.asarray(tr["anc_vertical"][...]).shape == (4, 4, c)
            assert np.asarray(tr["anc_kurtosis"][...]).shape == (4, 4)
            assert np.asarray(tr["anc_supp_kl"][...]).shape == (c, c)
            assert np.asarray(tr["chunk_category"][...]).shape == (c,)
            assert "anc_rs_acc" not in tr.names()
    # resume with resampling: the white-box arrays are kept, resampling is added
    assert main([*base, "--resume", "--analyses", "resampling", "--k", "2"]) == 0
    text = capsys.readouterr().out
    assert "2 traces written" in text and "resampling:" in text
    with open_cache(out) as reader:
        for tr in reader:
            c = len(np.asarray(tr["chunk_spans"][...]))
            acc = np.asarray(tr["anc_rs_acc"][...])
            assert acc.shape == (c + 1,) and acc[-1] == 1.0  # after the full trajectory
            np.testing.assert_allclose(np.asarray(tr["anc_rs_importance"][...]), np.diff(acc),
                                       atol=1e-6)
            assert np.asarray(tr["anc_forced"][...]).shape == (c,)
            assert np.asarray(tr["anc_supp_dl"][...]).shape == (c,)  # kept from the first run
    # again: everything done
    assert main([*base, "--resume", "--analyses", "resampling", "--k", "2"]) == 0
    assert "0 traces written, 2 already done" in capsys.readouterr().out
    # other settings are refused
    assert main([*base, "--resume", "--analyses", "resampling", "--k", "3"]) == 2
    assert "made with other settings" in capsys.readouterr().err
    # forced-answer importance = the chunk sums of the L-hat changes (`lhat` on the same file)
    from probes.traces.chunks import AGGREGATION, aggregate

    assert main(["lhat", "--model", "tiny-reasoner", "--device", "cpu", "--traces", str(samples),
                 "--out", str(out), "--resume", "-q"]) == 0
    with open_cache(out) as reader:
        for tr in reader:
            spans = np.asarray(tr["chunk_spans"][...])
            summed = aggregate(np.asarray(tr["lhat_delta"][...]), spans, AGGREGATION["lhat_delta"])
            np.testing.assert_allclose(np.asarray(tr["anc_forced"][...]), summed, atol=2e-5)


def test_bad_settings_are_one_line(samples, tmp_path, capsys):
    base = ["anchors", "--model", "tiny-reasoner", "--traces", str(samples), "--out",
            str(tmp_path / "b.h5"), "-q"]
    assert main([*base, "--analyses", "receiver,nope"]) == 2
    assert "choose from receiver, suppression, resampling" in capsys.readouterr().err
    assert main([*base, "--analyses", "resampling", "--similarity", "embedding"]) == 2
    assert "needs --embedding-model" in capsys.readouterr().err
    assert not (tmp_path / "b.h5").exists()


def test_demo_section(tmp_path):
    from probes.demo.anchors import anchors_demo, format_anchors_demo
    from probes.models.load import load_model

    loaded = load_model("tiny-reasoner", device="cpu")
    a = anchors_demo(loaded, tmp_path, limit=3)
    assert a["n_traces"] == 3 and a["resampling"]["n_traces"] == 2
    assert a["suppression"]["anchor_category_share"] == {"delimiter": 1.0}  # the conclusion
    assert a["suppression"]["median_anchor_value"] > 1.0
    assert a["suppression_random_init"]["median_anchor_value"] < 0.5
    assert all(p.endswith(".h5") for p in a["files"])
    lines = format_anchors_demo(a)
    assert lines[0].startswith("sentence anchors (3 traces") and len(lines) == 5


def test_stored_arrays_match_the_registry(samples, tmp_path):
    import h5py

    from probes import arrays
    from probes.measures.anchors.resampling import ResampleSettings
    from probes.pipeline.anchors import ARRAYS, AnchorsConfig, anchors_traces

    out = tmp_path / "r.h5"
    cfg = AnchorsConfig(analyses=("receiver", "suppression", "resampling"), limit=1,
                        resample=ResampleSettings(k=1))
    anchors_traces("tiny-reasoner", samples, out, cfg, device="cpu", progress=False)
    declared = {a.name for a in arrays.ANCHORS}
    assert {n for names in ARRAYS.values() for n in names} == declared
    with h5py.File(out, "r") as f:
        group = next(iter(f["traces"].values()))
        for name in declared:
            decl = arrays.BY_NAME[name]
            assert group[name].attrs["dtype"] == decl.dtype, name
            assert group[name].ndim == decl.axes.count(",") + 1, name
