"""The registry of stored arrays: the schema doc agrees with it, and nothing undeclared is stored."""

import re
from pathlib import Path

import h5py
import pytest

from probes import arrays
from probes.errors import ProbesError
from probes.measures.anchors.resampling import ResampleSettings
from probes.pipeline.anchors import AnchorsConfig, anchors_traces
from probes.pipeline.capture import CacheConfig, cache_traces
from probes.pipeline.effects import EffectsConfig, effects_traces
from probes.pipeline.landscape import LandscapeConfig, landscape_traces
from probes.pipeline.lhat import LhatConfig, lhat_traces
from probes.pipeline.updates import UpdatesConfig, updates_traces

ROOT = Path(__file__).resolve().parents[2]


def test_schema_doc_table_equals_the_registry():
    text = (ROOT / "cache" / "SCHEMA.md").read_text()
    table = re.search(r"<!-- arrays:begin -->\n(.*?)\n<!-- arrays:end -->", text, re.S).group(1)
    assert table == arrays.markdown_table()


def test_every_declaration_links_to_an_anchor_of_the_method_notes():
    notes = (ROOT / arrays.METHODS).read_text()
    anchors = set(re.findall(r'<a id="([\w-]+)"></a>', notes))
    assert {a.doc for a in arrays.REGISTRY} <= anchors
    assert len(arrays.BY_NAME) == len(arrays.REGISTRY)  # names are unique


def test_undeclared_or_foreign_arrays_are_refused():
    arrays.check_declared(["lhat", "phrase_id"], "lhat")
    with pytest.raises(ProbesError, match="'upd_new'.*does not declare"):
        arrays.check_declared(["upd_new"], "updates")
    with pytest.raises(ProbesError, match="'lhat'"):
        arrays.check_declared(["lhat"], "updates")


def test_the_writing_commands_store_only_declared_arrays(tmp_path):
    from probes import DATA_DIR
    from probes.models import load_model

    loaded = load_model("tiny-reasoner", device="cpu")
    traces = DATA_DIR / "tiny_reasoner_traces.jsonl"
    out = tmp_path / "run.h5"
    cache_traces(loaded, traces, out, CacheConfig(limit=2))
    lhat_traces(loaded, traces, out, LhatConfig(limit=2), resume=True, progress=False)
    updates_traces(loaded, traces, out, UpdatesConfig(limit=2), resume=True, progress=False)
    landscape_traces(loaded, traces, out, LandscapeConfig(limit=2, grid=3), resume=True,
                     progress=False)
    effects_traces(loaded, traces, out, EffectsConfig(limit=2, pairs_per_category=2), resume=True,
                   progress=False)
    anchors_traces(loaded, traces, out,
                   AnchorsConfig(analyses=("receiver", "suppression", "resampling"), limit=2,
                                 resample=ResampleSettings(k=2, max_new_tokens=8)),
                   resume=True, progress=False)
    seen = set()
    with h5py.File(out, "r") as f:
        for group in f["traces"].values():
            seen |= {name for name, ds in group.items()
                     if isinstance(ds, h5py.Dataset) and ds.attrs.get("kind") == "array"}
    assert seen == set(arrays.BY_NAME)
    for name in seen:
        decl = arrays.BY_NAME[name]
        with h5py.File(out, "r") as f:
            ds = next(iter(f["traces"].values()))[name]
            assert ds.attrs["dtype"] == decl.dtype, name
            assert ds.ndim == decl.axes.count(",") + 1, name


def test_inspect_explains_each_array_from_the_registry(tmp_path, capsys):
    from probes import DATA_DIR
    from probes.run import main

    out = tmp_path / "run.h5"
    assert main(["lhat", "--model", "tiny-reasoner", "--device", "cpu", "--no-progress",
                 "--traces", str(DATA_DIR / "tiny_reasoner_traces.jsonl"), "--limit", "2",
                 "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["inspect", str(out)]) == 0
    table = capsys.readouterr().out
    for decl in (*arrays.LABELS, *arrays.LHAT):
        assert f"array:    {decl.name} " in table and decl.meaning in table, decl.name
