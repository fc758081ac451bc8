"""`pack_cache`: one self-contained file, bit-exact; a failed pack changes nothing; appending to a
packed (single-file) cache moves it back into segments."""

from __future__ import annotations

import resource

import h5py
import numpy as np
import pytest

from cache import CacheWriteError, open_cache, open_writer, pack_cache, segments_dir


def _contents(path) -> dict:
    out = {}
    with open_cache(path) as reader:
        out["/"] = {k: v for k, v in reader.metadata.items() if k != "created"}
        for trace in reader:
            entry = {"attrs": (trace.n_tokens, trace.spans, trace.source, trace.attrs),
                     "text": trace.text, "tokens": trace.tokens.tobytes(),
                     "category": trace.category.tobytes()}
            for name in trace.names():
                lazy = trace.array(name, raw=True)
                entry[name] = (lazy.dtype, lazy.shape, lazy.chunks, lazy.layers,
                               lazy[...].tobytes())
            out[trace.id] = entry
    return out


def test_pack_is_one_self_contained_file_equal_to_the_store(small_cache, tmp_path):
    packed = tmp_path / "packed.h5"
    assert pack_cache(small_cache, packed) == 3
    assert not segments_dir(packed).exists()
    assert _contents(packed) == _contents(small_cache)
    links = []
    with h5py.File(packed, "r") as f:
        f.visititems_links(lambda name, link: links.append(type(link).__name__))
        assert f["traces/t1/resid_post"].shape == (40, 3, 16)
    assert links and set(links) == {"HardLink"}  # no external link: the file stands alone


def test_failed_pack_leaves_nothing(small_cache, tmp_path):
    packed = tmp_path / "packed.h5"
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, hard))  # the copy needs ~60 kB
    try:
        with pytest.raises(CacheWriteError, match=r"packing .* failed: .*File too large.*was not "
                                                  r"written.*ulimit -f.*pack again"):
            pack_cache(small_cache, packed)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert not packed.exists() and not list(tmp_path.glob("packed*"))


def test_appending_to_a_packed_file_moves_it_into_segments(small_cache, tmp_path, metadata,
                                                           trace_kwargs):
    packed = tmp_path / "packed.h5"
    pack_cache(small_cache, packed)
    before = _contents(packed)
    with open_writer(packed, metadata=metadata) as writer:
        assert writer.complete_ids() == ["t0", "t1", "t2"]
        writer.write_trace("t3", **trace_kwargs(3))
    assert segments_dir(packed).is_dir()
    after = _contents(packed)
    assert {k: v for k, v in after.items() if k != "t3"} == before
    with open_cache(packed) as reader:
        assert reader.trace_ids() == ["t0", "t1", "t2", "t3"]
        np.testing.assert_array_equal(reader.trace("t3")["resid_post"][...],
                                      trace_kwargs(3)["sites"]["resid_post"])
