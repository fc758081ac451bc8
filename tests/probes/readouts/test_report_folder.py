"""The report of a folder: every store found by what it holds, absent analyses listed with the
command that computes them, store sizes as index plus segments."""

from __future__ import annotations

import shutil

import pytest

from analyses.report_data import Table
from cache import store_bytes
from probes import DATA_DIR
from probes.pipeline.lhat import LhatConfig, lhat_traces
from probes.readouts.configs import ReportConfig
from probes.readouts.report.analysis_sections import HOW_TO_COMPUTE, TITLES
from probes.readouts.report.build import build_report
from probes.traces.read import read_traces


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    traces = root / "t.jsonl"
    traces.write_text("".join((DATA_DIR / "tiny_reasoner_traces.jsonl").read_text()
                              .splitlines(keepends=True)[:2]))
    lhat_traces("tiny-reasoner", traces, root / "run.h5", LhatConfig(), device="cpu",
                progress=False)
    return root


def test_a_folder_with_one_store_lists_every_other_analysis_as_not_computed(folder):
    report, facts = build_report(folder, ReportConfig(n_boot=50))
    by_id = {s.id: s for s in report.sections}
    assert by_id["lhat"].computed
    assert by_id["efficiency"].computed  # the efficiency of any L̂ curves
    absent = [a for a in TITLES if a not in ("lhat", "efficiency")]
    assert facts["absent"] == absent
    for a in absent:
        assert not by_id[a].computed
        assert by_id[a].blocks == [f"not computed (run `{HOW_TO_COMPUTE[a]}`)"]
    assert report.headline[-1] == "not computed: " + "; ".join(
        f"{a} (`{HOW_TO_COMPUTE[a]}`)" for a in absent)
    assert len(read_traces(folder / "t.jsonl").traces) == facts["n_traces"] == 2


def test_the_stated_store_size_is_the_index_plus_its_segments(folder, tmp_path):
    copy = tmp_path / "f"
    shutil.copytree(folder, copy)
    report, _ = build_report(copy, ReportConfig(n_boot=50))
    whole = store_bytes(copy / "run.h5")
    assert whole > (copy / "run.h5").stat().st_size  # the segments hold the traces
    (stores,) = [t for t in report.identity if isinstance(t, Table) and "store" in t.columns]
    (row,) = [r for r in stores.rows if r[0] == "run.h5"]
    from probes.pipeline.loop import human_size

    assert row[-1] == human_size(whole)
