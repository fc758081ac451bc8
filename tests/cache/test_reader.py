"""CacheReader: metadata, lazy slicing, category selection, summaries and file errors."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import h5py
import numpy as np
import pytest

from cache import (
    SCHEMA_VERSION,
    CacheCorruptError,
    CacheError,
    CacheVersionError,
    NotACacheError,
    TraceNotFoundError,
    bf16_bits_to_float32,
    float32_to_bf16_bits,
    open_cache,
    open_writer,
    pack_cache,
    summarize,
)
from cache.reader import _split_key


def test_metadata_and_listing(small_cache, metadata):
    with open_cache(small_cache) as reader:
        assert reader.metadata["schema_version"] == SCHEMA_VERSION
        assert reader.metadata["toolkit_version"]
        assert reader.metadata["created"].endswith("+00:00")
        for key in ("model", "model_dtype", "weight_convention", "tokenizer_fingerprint",
                    "lexicon_fingerprint", "category_codes", "config", "info"):
            assert reader.metadata[key] == metadata[key], key
        assert reader.metadata["versions"]["transformer_lens"] == "4.3.0"
        assert "h5py" in reader.metadata["versions"]
        assert reader.architecture == metadata["architecture"]
        assert reader.config == metadata["config"]
        assert reader.trace_ids() == ["t0", "t1", "t2"] and len(reader) == 3
        assert [t.id for t in reader] == ["t0", "t1", "t2"]
        site = reader.sites["resid_bf16"]
        assert (site.dtype, site.row_shape, site.layers) == ("bfloat16", (3, 16), (0, 1, 2))
        assert reader.sites["resid_post"].dtype == "float32"


def test_trace_fields(small_cache, trace_kwargs):
    expected = trace_kwargs(1)
    with open_cache(small_cache) as reader:
        trace = reader.trace("t1")
        assert trace.n_tokens == 40 and trace.complete
        np.testing.assert_array_equal(trace.tokens, expected["tokens"])
        np.testing.assert_array_equal(trace.category, expected["category"])
        np.testing.assert_array_equal(trace.positions, np.arange(40))
        assert trace.spans == expected["spans"]
        assert trace.text == expected["text"]
        assert trace.source == "traces.jsonl:2"
        assert trace.attrs == {"correct": True}
        assert "resid_post" in trace and "tokens" not in trace


_KEYS = [
    (slice(None), 1), (slice(3, 17), slice(None), slice(2, 9)), 5, -1, (7, 2, 3), ...,
    (Ellipsis, 4), (slice(None, None, -3), 0), (slice(30, 5, -2),),
    [3, 1, 1, 39], (np.array([10, 2, 33]), 2), (slice(0, 8), [2, 0]),
    (np.arange(40) % 7 == 0,), (slice(None), np.array([True, False, True])), ([-1, -40], -2),
    (np.array([], dtype=np.int64), 0), (slice(50, 60),),
]


@pytest.mark.parametrize("key", _KEYS, ids=[repr(k)[:40] for k in _KEYS])
def test_lazy_slicing_matches_numpy(small_cache, trace_kwargs, key):
    full = trace_kwargs(2)["sites"]["resid_post"]
    with open_cache(small_cache) as reader:
        trace = reader.trace("t2")
        got = trace["resid_post"][key]
        np.testing.assert_array_equal(got, full[key])
        bits = float32_to_bf16_bits(full)
        np.testing.assert_array_equal(trace["resid_bf16"][key], bf16_bits_to_float32(bits)[key])
        np.testing.assert_array_equal(trace.array("resid_bf16", raw=True)[key], bits[key])


def test_index_arrays_are_read_as_one_covering_range():
    h5_key, post = _split_key((np.array([30, 12, 12, 20]), 1), (40, 3, 16))
    assert h5_key == (slice(12, 31), 1, slice(0, 16, 1))
    np.testing.assert_array_equal(post[0], [18, 0, 0, 8])
    assert _split_key((slice(0, 8), 2), (40, 3, 16))[1] is None  # plain slices: no numpy pass


def test_ints_apply_before_index_arrays_like_h5py(small_cache, trace_kwargs):
    full = trace_kwargs(0)["sites"]["resid_post"]
    with open_cache(small_cache) as reader:
        got = reader.trace("t0")["resid_post"][0, :, [1, 2]]
    assert got.shape == (3, 2)
    np.testing.assert_array_equal(got, full[0][:, [1, 2]])


def test_lazy_array_properties(small_cache):
    with open_cache(small_cache) as reader:
        lazy = reader.trace("t0")["resid_post"]
        assert lazy.shape == (40, 3, 16) and lazy.ndim == 3 and len(lazy) == 40
        assert lazy.kind == "site" and lazy.layers == (0, 1, 2) and lazy.chunks == (40, 1, 16)
        assert np.asarray(lazy).shape == (40, 3, 16)
        with pytest.raises(IndexError, match="out of bounds"):
            lazy[40]
        with pytest.raises(IndexError, match="too many indices"):
            lazy[0, 0, 0, 0]
        with pytest.raises(CacheError, match="has no dataset 'nope'.*resid_post"):
            reader.trace("t0")["nope"]
    with pytest.raises(CacheError, match="is closed"):
        lazy[0]


def test_select_by_category(small_cache, trace_kwargs):
    category = trace_kwargs(0)["category"]
    with open_cache(small_cache) as reader:
        trace = reader.trace("t0")
        refl = trace.select("reflection")
        np.testing.assert_array_equal(refl, np.flatnonzero(category == 1))
        both = trace.select(["prompt", "answer"])
        np.testing.assert_array_equal(both, np.r_[0:4, 36:40])
        assert trace.select("answer", span="trajectory").size == 0
        np.testing.assert_array_equal(trace.select_rows("reflection"), refl)
        rows = trace["resid_post"][trace.select_rows("reflection")]
        np.testing.assert_array_equal(rows, trace_kwargs(0)["sites"]["resid_post"][refl])
        with pytest.raises(CacheError, match=r"unknown categories \['wait'\].*'reflection'"):
            trace.select("wait")
        with pytest.raises(CacheError, match="no span 'think'"):
            trace.select("reflection", span="think")


def test_select_rows_with_a_subset_of_positions(tmp_path, metadata):
    path = tmp_path / "pos.h5"
    category = np.zeros(10, np.uint8)
    category[[2, 5, 7]] = 1
    with open_writer(path, metadata=metadata) as writer:
        writer.write_trace("t", tokens=np.arange(10), category=category,
                           positions=np.array([1, 2, 3, 7]),
                           sites={"resid_post": np.arange(4, dtype=np.float32)[:, None]})
    with open_cache(path) as reader:
        trace = reader.trace("t")
        np.testing.assert_array_equal(trace.select("reflection"), [2, 5, 7])
        np.testing.assert_array_equal(trace.select_rows("reflection"), [1, 3])
        np.testing.assert_array_equal(trace["resid_post"][trace.select_rows("reflection"), 0],
                                      [1.0, 3.0])


def test_incomplete_traces_are_hidden_unless_asked(small_cache):
    with h5py.File(small_cache, "r+") as f:
        group = f["traces"].create_group("half%2Fdone")
        group.attrs["complete"] = np.bool_(False)
    with open_cache(small_cache) as reader:
        assert "half/done" not in reader.trace_ids()
        assert reader.trace_ids(include_incomplete=True)[-1] == "half/done"
        assert "half/done" not in reader
        with pytest.raises(TraceNotFoundError, match="only incompletely"):
            reader.trace("half/done")
        with pytest.raises(TraceNotFoundError, match="no trace 'zz'.*3 complete traces"):
            reader.trace("zz")
    assert summarize(small_cache)["incomplete_ids"] == ["half/done"]


def test_summarize(small_cache):
    info = summarize(small_cache)
    json.dumps(info)
    assert info["schema_version"] == SCHEMA_VERSION and info["model"] == "tests/tiny-qwen2"
    assert (info["n_traces_complete"], info["n_traces_incomplete"], info["complete"]) == (3, 0,
                                                                                          True)
    assert info["n_tokens"] == 120
    site = info["sites"]["resid_post"]
    assert site["n_rows"] == 120 and site["row_shape"] == [3, 16]
    assert site["bytes_on_disk"] == site["bytes_logical"] == 120 * 3 * 16 * 4
    assert info["sites"]["resid_bf16"]["bytes_on_disk"] == 120 * 3 * 16 * 2
    assert info["file_bytes"] > 120 * 3 * 16 * 6


def test_truncated_single_file_is_reported_as_corrupt(small_cache, tmp_path):
    packed = tmp_path / "packed.h5"
    pack_cache(small_cache, packed)
    size = packed.stat().st_size
    with open(packed, "r+b") as f:
        f.truncate(size // 2)
    with pytest.raises(CacheCorruptError, match=r"packed\.h5 is truncated or corrupt: .*truncated "
                                                r"file.*re-create it \(--resume cannot"):
        open_cache(packed)


def test_damaged_index_is_rebuilt_from_the_segments(small_cache):
    with open_cache(small_cache) as reader:
        before = {tid: reader.trace(tid)["resid_post"][...] for tid in reader.trace_ids()}
    size = small_cache.stat().st_size
    with open(small_cache, "r+b") as f:
        f.truncate(size // 2)
    with open_cache(small_cache) as reader:
        assert reader.trace_ids() == ["t0", "t1", "t2"]
        for tid, values in before.items():
            assert reader.trace(tid)["resid_post"][...].tobytes() == values.tobytes()
    small_cache.unlink()  # even without any index
    with open_cache(small_cache) as reader:
        assert reader.trace_ids() == ["t0", "t1", "t2"]


def test_text_file_is_not_hdf5(tmp_path):
    path = tmp_path / "notes.h5"
    path.write_text("not a cache\n")
    with pytest.raises(NotACacheError, match=r"notes\.h5 is not an HDF5 file"):
        open_cache(path)


def test_foreign_hdf5_is_not_a_cache(tmp_path, metadata):
    path = tmp_path / "foreign.h5"
    with h5py.File(path, "w") as f:
        f["x"] = np.arange(3)
    for action in (lambda: open_cache(path), lambda: open_writer(path, metadata=metadata)):
        with pytest.raises(NotACacheError, match=r"foreign\.h5 .*not a trajectory-probes cache "
                                                 r"\(no schema_version"):
            action()


def test_newer_schema_is_refused(small_cache, metadata):
    with h5py.File(small_cache, "r+") as f:
        f.attrs["schema_version"] = SCHEMA_VERSION + 1
    with pytest.raises(CacheVersionError, match=f"schema_version {SCHEMA_VERSION + 1}.*upgrade"):
        open_cache(small_cache)
    with pytest.raises(CacheVersionError):
        open_writer(small_cache, metadata=metadata)


def test_missing_path(tmp_path):
    with pytest.raises(CacheError, match=r"nothing\.h5 does not exist"):
        open_cache(tmp_path / "nothing.h5")
    with pytest.raises(CacheError, match="is a directory"):
        open_cache(tmp_path)


def test_reading_needs_no_torch(small_cache):
    code = ("import sys; from cache import open_cache\n"
            f"with open_cache({str(small_cache)!r}) as r: r.trace('t0')['resid_bf16'][:, 1]\n"
            "bad = [m for m in ('torch', 'transformers', 'transformer_lens') if m in sys.modules]\n"
            "sys.exit(f'imported {bad}' if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_an_index_copied_away_reads_its_segments_where_they_are(small_cache, tmp_path, metadata):
    copy = tmp_path / "elsewhere" / "copy.h5"
    copy.parent.mkdir()
    shutil.copy(small_cache, copy)
    with open_cache(copy) as reader:
        assert reader.trace_ids() == ["t0", "t1", "t2"]
        assert reader.trace("t1")["resid_post"].shape == (40, 3, 16)
    with pytest.raises(CacheError, match="segments folder is not next to it.*move or copy"):
        open_writer(copy, metadata=metadata)
    shutil.rmtree(small_cache.with_name(small_cache.name + ".segments"))
    with pytest.raises(CacheError, match="segments folder is neither next to it.*pack"):
        open_cache(copy)
