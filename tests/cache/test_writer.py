"""CacheWriter: round trips, chunking, resume, identity checks, locking, ids and input errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import h5py
import numpy as np
import pytest

from cache import (
    CacheError,
    CacheInputError,
    CacheLockedError,
    CacheMismatchError,
    DuplicateTraceError,
    SiteArray,
    TraceNotFoundError,
    bf16_bits_to_float32,
    float32_to_bf16_bits,
    open_cache,
    open_writer,
    segments_dir,
)
from cache.schema import escape_trace_id, unescape_trace_id


def _write_one(path, metadata, trace_id="t", **kwargs):
    with open_writer(path, metadata=metadata) as writer:
        writer.write_trace(trace_id, **kwargs)


@pytest.mark.parametrize("dtype", ["float16", "float32", "bfloat16"])
def test_site_round_trip_is_bit_exact(tmp_path, metadata, dtype):
    rng = np.random.default_rng(0)
    values = rng.standard_normal((37, 3, 16)).astype(np.float32) * 100
    values[0, 0, :4] = [np.inf, -0.0, 1e-30, np.nan]
    if dtype == "bfloat16":
        stored = float32_to_bf16_bits(values)
        site = SiteArray(stored, dtype="bfloat16")
    else:
        stored = values.astype(dtype)
        site = stored
    path = tmp_path / "rt.h5"
    _write_one(path, metadata, tokens=np.arange(37), category=np.zeros(37, np.uint8),
               sites={"resid_post": site})
    with open_cache(path) as reader:
        lazy = reader.trace("t")["resid_post"]
        assert lazy.dtype == dtype
        raw = reader.trace("t").array("resid_post", raw=True)[...]
        assert raw.dtype == stored.dtype and raw.tobytes() == stored.tobytes()
        decoded = lazy[...]
        if dtype == "bfloat16":
            assert decoded.dtype == np.float32
            assert decoded.tobytes() == bf16_bits_to_float32(stored).tobytes()
        assert reader.trace("t").tokens.dtype == np.int32
        assert reader.trace("t").category.dtype == np.uint8


def test_bf16_helpers_match_round_to_nearest_even():
    values = np.array([1.0, 1.00390625, 1.01171875, -2.5, 3.4e38, 0.0], np.float32)
    bits = float32_to_bf16_bits(values)
    # 1 + 2^-8 is a tie -> even (1.0); 1 + 3*2^-8 -> 1 + 2^-6; 3.4e38 overflows to inf
    np.testing.assert_array_equal(bf16_bits_to_float32(bits),
                                  np.array([1.0, 1.0, 1.015625, -2.5, np.inf, 0.0], np.float32))
    assert np.isnan(bf16_bits_to_float32(float32_to_bf16_bits(np.array([np.nan]))))[0]


def test_bf16_helpers_agree_with_torch():
    torch = pytest.importorskip("torch")
    values = np.random.default_rng(0).standard_normal(10_000).astype(np.float32)
    values *= np.float32(10.0) ** np.random.default_rng(1).integers(-40, 38, 10_000)
    expected = torch.from_numpy(values).to(torch.bfloat16).view(torch.int16).numpy()
    assert float32_to_bf16_bits(values).tobytes() == expected.view(np.uint16).tobytes()
    as_float = torch.from_numpy(expected).view(torch.bfloat16).float().numpy()
    assert bf16_bits_to_float32(expected).tobytes() == as_float.tobytes()


@pytest.mark.parametrize(("n", "chunk_rows"), [(64, 64), (512, 512), (700, 350), (1100, 367)])
def test_site_chunks_are_token_rows_by_one_layer_by_d(tmp_path, metadata, n, chunk_rows):
    path = tmp_path / "chunks.h5"
    _write_one(path, metadata, tokens=np.arange(n), category=np.zeros(n, np.uint8),
               sites={"resid_post": np.zeros((n, 3, 16), np.float16),
                      "pooled": np.zeros((n, 16), np.float32)},
               arrays={"lhat": np.zeros(n + 1, np.float32)})
    with h5py.File(path, "r") as f:
        group = f[f"traces/{escape_trace_id('t')}"]
        assert group["resid_post"].chunks == (chunk_rows, 1, 16)
        assert group["pooled"].chunks == (chunk_rows, 16)
        assert group["lhat"].chunks is None
        assert group["resid_post"].compression is None


def test_gzip_is_opt_in_and_lossless(tmp_path, metadata, trace_kwargs):
    path = tmp_path / "gz.h5"
    kwargs = trace_kwargs(0)
    with open_writer(path, metadata=metadata, compression="gzip") as writer:
        writer.write_trace("t", **kwargs)
    with h5py.File(path, "r") as f:
        assert f["traces/t/resid_post"].compression == "gzip"
    with open_cache(path) as reader:
        np.testing.assert_array_equal(reader.trace("t")["resid_post"][...],
                                      kwargs["sites"]["resid_post"])
    with pytest.raises(CacheInputError, match="Blosc2"):
        open_writer(tmp_path / "b.h5", metadata=metadata, compression="blosc2")


def test_resume_skips_complete_traces(small_cache, metadata, trace_kwargs):
    with open_writer(small_cache, metadata=metadata) as writer:
        assert writer.removed_incomplete == ()
        assert writer.complete_ids() == ["t0", "t1", "t2"]
        assert writer.has_complete("t1") and not writer.has_complete("t3")
        assert writer.write_trace("t1", **trace_kwargs(1)) is False
        assert writer.write_trace("t3", **trace_kwargs(3)) is True
        with pytest.raises(DuplicateTraceError, match="t1"):
            writer.write_trace("t1", **trace_kwargs(1))
    with open_cache(small_cache) as reader:
        assert reader.trace_ids() == ["t0", "t1", "t2", "t3"]


def test_interrupted_trace_is_deleted_and_redone_on_resume(small_cache, metadata, trace_kwargs):
    # what a writer killed (or stopped by a full disk) mid-trace leaves behind: a partial segment
    segments = small_cache.with_name(small_cache.name + ".segments")
    (segments / "s-000099.h5.t9.tmp").write_bytes(small_cache.read_bytes()[:700])
    with open_cache(small_cache) as reader:
        assert reader.trace_ids() == ["t0", "t1", "t2"]
        assert reader.incomplete_ids() == ["t9"]
    with open_writer(small_cache, metadata=metadata) as writer:
        assert writer.removed_incomplete == ("t9",)
        assert not writer.has_complete("t9")
        assert writer.write_trace("t9", **trace_kwargs(9))
    with open_cache(small_cache) as reader:
        assert reader.trace_ids() == ["t0", "t1", "t2", "t9"]
        assert reader.trace("t9").n_tokens == 40


@pytest.mark.parametrize(("key", "value", "pattern"), [
    ("tokenizer_fingerprint", "tokenizer-sha-2", "tokenizer_fingerprint: stored"),
    ("model", "other/model", r"model: stored \"tests/tiny-qwen2\", given \"other/model\""),
    ("model_dtype", "bfloat16", "model_dtype"),
    ("lexicon_fingerprint", "x", "lexicon_fingerprint"),
])
def test_append_with_different_identity_is_refused(small_cache, metadata, key, value, pattern):
    metadata[key] = value
    with pytest.raises(CacheMismatchError, match=pattern) as info:
        open_writer(small_cache, metadata=metadata)
    assert "--out" in str(info.value) and str(small_cache) in str(info.value)


def test_mismatch_names_the_nested_field(small_cache, metadata):
    metadata["config"]["sites"] = ["resid_post", "attn_out"]
    metadata["architecture"]["n_layers"] = 4
    with pytest.raises(CacheMismatchError, match=r"architecture\.n_layers: stored 3, given 4") as e:
        open_writer(small_cache, metadata=metadata)
    assert "config.sites" in str(e.value)
    # the file stays usable: nothing was written and the lock was released
    with open_cache(small_cache) as reader:
        assert len(reader) == 3


def test_informational_metadata_may_change(small_cache, metadata):
    metadata["versions"] = {"transformers": "5.11.0"}
    metadata["info"] = {"host": "elsewhere"}
    with open_writer(small_cache, metadata=metadata) as writer:
        assert writer.has_complete("t0")
    with open_cache(small_cache) as reader:  # recorded at creation, not overwritten
        assert reader.metadata["versions"]["transformers"] == "5.10.0"


def test_sites_must_agree_across_traces(small_cache, metadata, trace_kwargs):
    kwargs = trace_kwargs(5, layers=2)
    with open_writer(small_cache, metadata=metadata) as writer, pytest.raises(
            CacheMismatchError, match=r"resid_post: stored float32 rows \[3, 16\]"):
        writer.write_trace("t5", **kwargs)


def test_duplicate_id_in_one_run(tmp_path, metadata, trace_kwargs):
    with open_writer(tmp_path / "d.h5", metadata=metadata) as writer:
        writer.write_trace("same", **trace_kwargs(0))
        with pytest.raises(DuplicateTraceError, match="'same' was already written"):
            writer.write_trace("same", **trace_kwargs(1))


def test_bad_paths(tmp_path, metadata):
    missing = tmp_path / "no" / "such" / "folder" / "x.h5"
    with pytest.raises(CacheError, match=f"folder {tmp_path / 'no' / 'such' / 'folder'} does not"):
        open_writer(missing, metadata=metadata)
    with pytest.raises(CacheError, match="is a directory"):
        open_writer(tmp_path, metadata=metadata)


def test_create_and_overwrite_modes(small_cache, metadata, trace_kwargs):
    with pytest.raises(CacheError, match="already exists; rerun with --resume"):
        open_writer(small_cache, metadata=metadata, mode="create")
    with open_writer(small_cache, metadata=metadata, mode="overwrite") as writer:
        assert writer.complete_ids() == []
        writer.write_trace("new", **trace_kwargs(0))
    with open_cache(small_cache) as reader:
        assert reader.trace_ids() == ["new"]
    with pytest.raises(CacheInputError, match="mode must be one of"):
        open_writer(small_cache, metadata=metadata, mode="truncate")
    assert not list(small_cache.parent.glob("*.tmp"))


def test_create_checks_again_under_the_lock(tmp_path, metadata, trace_kwargs, monkeypatch):
    """A store another writer creates between the first check and the lock is refused untouched
    (two runs on one new --out); so is a new store another shard's live writer holds."""
    import cache.writer as writer_module

    path = tmp_path / "race.h5"
    real, raced = writer_module._lock, []

    def lock_after_another_writer(folder, shard, p):
        if not raced:
            raced.append(True)
            monkeypatch.setattr(writer_module, "_lock", real)
            # the first writer checked the path before this one did, and opens it now
            with open_writer(path, metadata=metadata, mode="append") as first:
                first.write_trace("first", **trace_kwargs(0))
        return real(folder, shard, p)

    monkeypatch.setattr(writer_module, "_lock", lock_after_another_writer)
    with pytest.raises(CacheError, match="already exists; rerun with --resume.*nothing of it was "
                                         "changed"):
        open_writer(path, metadata=metadata, mode="create")
    assert raced
    with open_cache(path) as reader:
        assert reader.trace_ids() == ["first"]

    other, held = tmp_path / "sharded.h5", []

    def lock_after_another_shard(folder, shard, p):
        if not held:  # another shard's writer (rank 0 of a torchrun) opens the new store first
            held.append(writer_module.try_lock(folder / ".lock-r0"))
        return real(folder, shard, p)

    monkeypatch.setattr(writer_module, "_lock", lock_after_another_shard)
    try:
        with pytest.raises(CacheError, match="already exists"):
            open_writer(other, metadata=metadata, mode="create")
    finally:
        os.close(held[0])
    assert segments_dir(other).is_dir()  # the other writer's folder is left to it
    with open_writer(other, metadata=metadata, mode="overwrite") as writer:  # once it is gone
        writer.write_trace("t", **trace_kwargs(0))

_HOLDER = textwrap.dedent("""
    import json, sys
    from cache import open_writer
    with open_writer(sys.argv[1], metadata=json.loads(sys.argv[2])):
        print("holding", flush=True)
        sys.stdin.read()
""")


def test_second_writer_gets_a_lock_error(tmp_path, metadata):
    path = tmp_path / "locked.h5"
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(path), json.dumps(metadata)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "holding", holder.stderr.read()
        with pytest.raises(CacheLockedError, match="is open by another writer.*write to another"):
            open_writer(path, metadata=metadata)
        with open_cache(path) as reader:  # readers read a store while it is written
            assert reader.trace_ids() == []
        with pytest.raises(CacheLockedError):
            open_writer(path, metadata=metadata, mode="overwrite")
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    assert holder.returncode == 0
    with open_writer(path, metadata=metadata) as writer:  # released on close
        assert writer.complete_ids() == []


@pytest.mark.parametrize("trace_id", ["gsm8k/12", "a/b/c", "50%", ".hidden", "..", "tab\there",
                                      "問題 7", "x%2Fy"])
def test_trace_ids_are_escaped_and_kept(tmp_path, metadata, trace_kwargs, trace_id):
    name = escape_trace_id(trace_id)
    assert "/" not in name and not name.startswith(".") and unescape_trace_id(name) == trace_id
    path = tmp_path / "ids.h5"
    with open_writer(path, metadata=metadata) as writer:
        writer.write_trace(trace_id, **trace_kwargs(0))
        writer.write_trace("x/y", **trace_kwargs(1))
        assert writer.has_complete(trace_id)
    with open_cache(path) as reader:
        assert reader.trace_ids() == [trace_id, "x/y"]
        assert reader.trace(trace_id).id == trace_id
        assert trace_id in reader


def test_escape_is_injective_on_lookalikes():
    ids = ["a/b", "a%2Fb", "a%252Fb", "a_b", "a.b"]
    assert len({escape_trace_id(i) for i in ids}) == len(ids)


def test_metadata_must_be_complete(tmp_path, metadata):
    del metadata["tokenizer_fingerprint"]
    metadata["extra"] = 1
    with pytest.raises(CacheInputError,
                       match=r"unknown keys \['extra'\].*\['tokenizer_fingerprint'\]"):
        open_writer(tmp_path / "m.h5", metadata=metadata)
    assert not (tmp_path / "m.h5").exists()


@pytest.mark.parametrize(("change", "pattern"), [
    ({"sites": {"resid_post": np.zeros((39, 3, 16), np.float32)}}, "first axis must be the 40"),
    ({"sites": {"resid_post": np.zeros((40, 3, 16), np.uint16)}}, "dtype='bfloat16'"),
    ({"sites": {"resid_post": [[0.0]] * 40}}, "must be a numpy array.*torch"),
    ({"sites": {"tokens": np.zeros((40, 3, 16), np.float32)}}, "reserved"),
    ({"sites": {"a/b": np.zeros((40, 3, 16), np.float32)}}, "cannot contain '/'"),
    ({"category": np.full(40, 9, np.uint8)}, r"category codes \[9\]"),
    ({"positions": np.array([3, 2])}, "strictly increasing"),
    ({"spans": {"prompt": (0, 99)}}, "n_tokens = 40"),
    ({"attrs": {"complete": True}}, "reserved"),
    ({"attrs": {"big": np.arange(3)}}, "str/int/float/bool"),
])
def test_bad_trace_inputs_are_refused_before_writing(tmp_path, metadata, trace_kwargs, change,
                                                    pattern):
    kwargs = {**trace_kwargs(0), **change}
    path = tmp_path / "bad.h5"
    with open_writer(path, metadata=metadata) as writer:
        with pytest.raises(CacheInputError, match=pattern):
            writer.write_trace("t", **kwargs)
        assert writer.complete_ids() == []
        writer.write_trace("t", **trace_kwargs(0))  # not a duplicate: nothing was written
    with h5py.File(path, "r") as f:
        assert list(f["traces"]) == ["t"]


def test_positions_select_site_rows(tmp_path, metadata):
    positions = np.array([1, 5, 6, 30])
    path = tmp_path / "pos.h5"
    _write_one(path, metadata, tokens=np.arange(40), category=np.zeros(40, np.uint8),
               positions=positions, sites={"resid_post": np.ones((4, 3, 16), np.float32)})
    with open_cache(path) as reader:
        np.testing.assert_array_equal(reader.trace("t").positions, positions)
        assert reader.trace("t").positions.dtype == np.int32


def test_add_to_trace_replaces_arrays(small_cache, metadata):
    with open_writer(small_cache, metadata=metadata) as writer:
        writer.add_to_trace("t1", {"lhat": np.arange(41, dtype=np.float32)}, attrs={"ok": 1})
        writer.add_to_trace("t1", {"lhat": np.full(41, 2.0, np.float32),
                                   "updates": np.ones((3, 40), np.float32)})
        with pytest.raises(CacheInputError, match="is a site"):
            writer.add_to_trace("t1", {"resid_post": np.zeros(3, np.float32)})
        with pytest.raises(TraceNotFoundError, match="no complete trace 'nope'"):
            writer.add_to_trace("nope", {"lhat": np.zeros(3, np.float32)})
    with h5py.File(small_cache, "r+") as f:  # leftover of an interrupted replacement
        f["traces/t1"].create_dataset(".tmp.lhat", data=np.zeros(2))
    with open_cache(small_cache) as reader:
        trace = reader.trace("t1")
        assert sorted(trace.names()) == ["lhat", "resid_bf16", "resid_post", "updates"]
        np.testing.assert_array_equal(trace["lhat"][...], np.full(41, 2.0, np.float32))
        assert trace["lhat"].kind == "array" and trace.attrs["ok"] == 1
        assert set(trace.sites) == {"resid_post", "resid_bf16"}
    with open_writer(small_cache, metadata=metadata) as writer:
        writer.add_to_trace("t1", {"lhat": np.zeros(41, np.float32)})
    with h5py.File(small_cache, "r") as f:
        assert ".tmp.lhat" not in f["traces/t1"]


def test_closed_writer_refuses(tmp_path, metadata, trace_kwargs):
    writer = open_writer(tmp_path / "c.h5", metadata=metadata)
    writer.close()
    writer.close()
    with pytest.raises(CacheError, match="writer of .* is closed"):
        writer.write_trace("t", **trace_kwargs(0))


def test_fsync_option_writes_the_same(tmp_path, metadata, trace_kwargs):
    with open_writer(tmp_path / "s.h5", metadata=metadata, fsync=True) as writer:
        writer.write_trace("t", **trace_kwargs(0))
    with open_cache(tmp_path / "s.h5") as reader:
        assert reader.trace_ids() == ["t"]


def test_write_traces_commits_a_group_as_one_segment(tmp_path, metadata, trace_kwargs):
    """Several traces in one commit read back exactly as written one by one."""
    from cache import segments_dir

    one, group = tmp_path / "one.h5", tmp_path / "group.h5"
    with open_writer(one, metadata=metadata) as writer:
        for i in range(4):
            writer.write_trace(f"t{i}", **trace_kwargs(i))
    with open_writer(group, metadata=metadata) as writer:
        assert writer.write_traces([{"trace_id": f"t{i}", **trace_kwargs(i)}
                                    for i in range(3)]) == [True] * 3
        # A repeated id refuses the whole group before anything is written.
        with pytest.raises(DuplicateTraceError, match="'t3'"):
            writer.write_traces([{"trace_id": "t3", **trace_kwargs(3)},
                                 {"trace_id": "t3", **trace_kwargs(3)}])
        assert writer.write_traces([{"trace_id": "t3", **trace_kwargs(3)}]) == [True]
    assert len(list(segments_dir(group).glob("*.h5"))) == 2
    with open_writer(group, metadata=metadata) as writer:  # resumed: what is there is skipped
        assert writer.write_traces([{"trace_id": f"t{i}", **trace_kwargs(i)}
                                    for i in (2, 4)]) == [False, True]
    with open_cache(one) as a, open_cache(group) as b:
        assert b.trace_ids() == ["t0", "t1", "t2", "t3", "t4"]
        for tid in a.trace_ids():
            ta, tb = a.trace(tid), b.trace(tid)
            assert dict(ta.attrs) == dict(tb.attrs) and ta.spans == tb.spans
            assert sorted(ta.names()) == sorted(tb.names())
            for name in ta.names():
                assert ta.array(name, raw=True)[...].tobytes() == \
                    tb.array(name, raw=True)[...].tobytes()


def test_set_attrs_writes_what_h5py_writes(tmp_path):
    """The fast attribute writer stores the same type, shape and value as `obj.attrs[k] = v`."""
    from cache import _h5

    values = {"text": "résumé ✓ </think>", "empty": "", "n": 3, "x": 0.5, "flag": np.bool_(True)}
    path = tmp_path / "attrs.h5"
    with h5py.File(path, "w") as f:
        ref = f.create_group("ref")
        for key, value in values.items():
            ref.attrs[key] = value
        _h5.set_attrs(f.create_group("fast"), values)
    with h5py.File(path, "r") as f:
        for key, value in values.items():
            a, b = f["ref"].attrs.get_id(key), f["fast"].attrs.get_id(key)
            assert a.get_type() == b.get_type() and a.shape == b.shape, key
            assert f["fast"].attrs[key] == value == f["ref"].attrs[key], key
