"""`landscape` end to end on tiny-reasoner: stored arrays and attributes, identities, resume, plots,
errors, help, and the demo section."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cache import open_cache
from probes.arrays import LANDSCAPE, names
from probes.reasoner.train import SAMPLES_PATH
from probes.run import main


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    path = tmp_path_factory.mktemp("traces") / "samples.jsonl"
    path.write_text("".join(SAMPLES_PATH.read_text().splitlines(keepends=True)[:2]))
    return path


@pytest.fixture(scope="module")
def run(samples, tmp_path_factory):
    folder = tmp_path_factory.mktemp("landscape")
    out = folder / "run.h5"
    args = ["landscape", "--model", "tiny-reasoner", "--traces", str(samples), "--out", str(out),
            "--grid", "5", "--device", "cpu", "--json", "--no-progress", "--plot-dir",
            str(folder / "plots")]
    return out, folder, args


def test_arrays_identities_and_plots(run, capsys):
    out, folder, args = run
    assert main(args) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["n_written"] == 2 and result["endpoint_max_abs_diff"] <= 1e-4
    assert 0.5 < result["captured_path_plane_median"] <= 1.0
    assert result["captured_random_plane_median"] < 1e-3
    assert len(result["plots"]) == 6 and all((folder / "plots").glob("*.png"))
    with open_cache(out) as reader:
        for tr in reader:
            assert tr.attrs["land_seed"] == 0 and tr.attrs["land_style"] == "raml"
            t0, t1 = (int(x) for x in tr.spans["trajectory"])
            for name in names(LANDSCAPE):
                assert name in tr.names()
            grid = np.asarray(tr["land_grid"])
            assert grid.shape == (5, 5)
            assert grid[2, 2] == pytest.approx(tr.attrs["land_nll_no_trajectory"], abs=1e-5)
            assert np.asarray(tr["land_path"]).shape == (t1 - t0 + 1, 2)
            assert np.all(np.asarray(tr["land_path"])[0] == 0)
            assert abs(tr.attrs["land_nll_endpoint"] - tr.attrs["land_nll_full"]) <= 1e-4
            assert tr.attrs["land_origin_abs_diff"] <= 1e-4
            along = np.asarray(tr["land_path_nll"])
            assert along[0] == pytest.approx(tr.attrs["land_nll_no_trajectory"], abs=1e-5)
            assert along[-1] == pytest.approx(tr.attrs["land_nll_full"], abs=1e-4)


def test_resume_skips_and_other_settings_are_refused(run, capsys):
    out, _, args = run
    if not out.exists():
        assert main(args) == 0
    capsys.readouterr()
    assert main([*args, "--resume"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["n_written"] == 0 and result["n_skipped"] == 2
    assert main([*args, "--resume", "--seed", "1"]) == 2
    assert "land_seed" in capsys.readouterr().err


def test_adds_to_a_cache_from_another_command(samples, tmp_path):
    out = tmp_path / "run.h5"
    assert main(["lhat", "--model", "tiny-reasoner", "--traces", str(samples), "--out", str(out),
                 "--limit", "1", "--device", "cpu", "--no-progress"]) == 0
    assert main(["landscape", "--resume", "--model", "tiny-reasoner", "--traces", str(samples),
                 "--out", str(out), "--limit", "1", "--grid", "3", "--device", "cpu",
                 "--no-progress"]) == 0
    with open_cache(out) as reader:
        tr = next(iter(reader))
        assert "lhat" in tr.names() and "land_grid" in tr.names()


def test_step_markers_index_the_path():
    from analyses.landscape_plots import step_markers
    from analyses.token_sets import DELIMITER, ORDINARY, REFLECTION

    marks = step_markers(np.array([ORDINARY, REFLECTION, ORDINARY, DELIMITER, REFLECTION]))
    assert marks["reflection"].tolist() == [2, 5] and marks["delimiter"].tolist() == [4]


def test_plot_names_of_ids_that_escape_alike_stay_apart(tmp_path, capsys):
    """Ids `a/b`, `a_b` and `a\\b` once escaped to one name: 9 plots reported, 3 written."""
    lines = SAMPLES_PATH.read_text().splitlines()[:3]
    traces = tmp_path / "ids.jsonl"
    traces.write_text("".join(json.dumps({**json.loads(line), "id": new}) + "\n"
                              for line, new in zip(lines, ["a/b", "a_b", "a\\b"], strict=True)))
    plots = tmp_path / "plots"
    assert main(["landscape", "--model", "tiny-reasoner", "--traces", str(traces), "--out",
                 str(tmp_path / "run.h5"), "--grid", "3", "--device", "cpu", "--json",
                 "--no-progress", "--plot-dir", str(plots)]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert len(result["plots"]) == len(set(result["plots"])) == 9
    assert sorted(p.name for p in plots.iterdir()) == sorted(Path(p).name for p in result["plots"])


def test_bad_settings_and_help(samples, tmp_path, capsys):
    base = ["landscape", "--model", "tiny-reasoner", "--traces", str(samples), "--out",
            str(tmp_path / "x.h5"), "--no-progress"]
    assert main([*base, "--grid", "1"]) == 2
    assert "error: --grid must be ≥ 2 and --range, --margin > 0" in capsys.readouterr().err
    assert main([*base, "--range", "nan"]) == 2  # once accepted: an all-NaN grid was stored
    assert "argument --range: must be a finite number > 0, got nan" in capsys.readouterr().err
    assert not (tmp_path / "x.h5").exists()
    assert main(["landscape", "--help"]) == 0
    text = capsys.readouterr().out
    assert "filter" in text and "implicit-update path" in text and "--positions" in text


def test_demo_section(tmp_path):
    from probes.models.load import load_model
    from probes.pipeline.landscape import demo_section, format_demo_line

    loaded = load_model("tiny-reasoner", device="cpu")
    part = demo_section(loaded, tmp_path, keep=False, n_traces=1, grid=3)
    assert part["n_traces"] == 1 and part["endpoint_max_abs_diff"] <= 1e-4
    assert "landscape (1 trace, 3x3" in format_demo_line(part)
