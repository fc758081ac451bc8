"""One coordinate system: every registered per-token array read at a token's sequence position
gives the value the writer stored for that token, through `cache` and through the typed loader."""

from __future__ import annotations

import numpy as np
import pytest

from cache import CacheError, open_cache, open_writer
from cache.reader import PREFIX, SEQUENCE, TRAJECTORY, Positions, parse_axes
from probes.arrays import REGISTRY
from probes.errors import ProbesError
from probes.readouts import loader

N, A, B = 30, 6, 24          # tokens, trajectory [A, B)
T = B - A
CODES = {"ordinary": 0, "reflection": 1, "prompt": 3, "answer": 5}
TOKEN_AXIS_DECLS = [d for d in REGISTRY if any(parse_axes(d.axes))]


def _meta():
    return {"model": "m", "architecture": {"family": "qwen2", "n_layers": 2, "d_model": 4,
                                           "n_heads": 1, "n_kv_heads": 1, "d_head": 4},
            "model_dtype": "float32", "weight_convention": "hf", "tokenizer_fingerprint": "t",
            "lexicon_fingerprint": "l", "category_codes": CODES, "config": {}}


def _encoded(axes: str) -> np.ndarray:
    """An array of the declared shape whose entries along the token axis are the sequence
    position of the token they belong to (NaN/-1 where none: the prefix before any token)."""
    kinds = parse_axes(axes)
    sizes = {SEQUENCE: N, TRAJECTORY: T, PREFIX: T + 1, "": 3}
    shape = tuple(sizes[k] for k in kinds)
    axis = next(i for i, k in enumerate(kinds) if k)
    kind = kinds[axis]
    along = {SEQUENCE: np.arange(N), TRAJECTORY: A + np.arange(T),
             PREFIX: A - 1 + np.arange(T + 1)}[kind].astype(np.float32)
    view = [1] * len(shape)
    view[axis] = shape[axis]
    return np.broadcast_to(along.reshape(view), shape).copy()


@pytest.fixture
def store(tmp_path):
    category = np.zeros(N, np.uint8)
    category[:A] = CODES["prompt"]
    category[B:] = CODES["answer"]
    category[[A + 2, A + 7, A + 11]] = CODES["reflection"]
    captured = np.arange(0, N, 2)  # a site that kept every second token
    path = tmp_path / "s.h5"
    with open_writer(path, metadata=_meta()) as writer:
        writer.write_trace(
            "t", tokens=np.arange(N), category=category, positions=captured,
            spans={"prompt": (0, A), "trajectory": (A, B), "answer": (B, N)},
            sites={"resid_post": np.repeat(captured.astype(np.float32)[:, None, None], 4, axis=2)
                   .repeat(2, axis=1)},
            arrays={d.name: _encoded(d.axes) for d in TOKEN_AXIS_DECLS})
    return path


@pytest.mark.parametrize("decl", TOKEN_AXIS_DECLS, ids=lambda d: d.name)
def test_every_registered_array_reads_its_tokens(store, decl):
    with loader.open_cache(store) as reader:
        tr = reader.trace("t")
        p = tr.select("reflection")
        got = tr.array(decl.name, at=p)
        axis = next(i for i, k in enumerate(parse_axes(decl.axes)) if k)
        np.testing.assert_array_equal(np.moveaxis(got, axis, -1)[(0,) * (got.ndim - 1)], p)
        if got.ndim == 1:  # indexing the lazy array with positions is the same read
            np.testing.assert_array_equal(tr[decl.name][p], p)
    (loaded,) = loader.load_traces(store, [decl.name])
    got = loaded.at(decl.name, loaded.select("reflection"))
    np.testing.assert_array_equal(np.moveaxis(got, axis, -1)[(0,) * (got.ndim - 1)],
                                  [A + 2, A + 7, A + 11])


def test_plain_cache_reader_infers_the_same_axes(store):
    """Without the registry, the shape tells the token axis of [n_tokens], [T], [T+1], [L, T]."""
    with open_cache(store) as reader:
        tr = reader.trace("t")
        p = tr.select("reflection")
        for name in ("phrase_id", "lhat", "lhat_delta", "upd_m7", "paragraph_start"):
            got = tr.array(name, at=p)
            np.testing.assert_array_equal(got if got.ndim == 1 else got[0], p)


def test_sites_are_read_at_positions_and_uncaptured_ones_are_refused(store):
    with open_cache(store) as reader:
        tr = reader.trace("t")
        p = Positions([A + 2, A + 8])  # both captured (even)
        np.testing.assert_array_equal(tr["resid_post"][p][:, 0, 0], p)
        with pytest.raises(CacheError, match=r"positions \[13, 17\] were not captured"):
            tr["resid_post"][tr.select("reflection")]


def test_positions_outside_an_arrays_tokens_are_errors(store):
    with open_cache(store) as reader:
        tr = reader.trace("t")
        prompt = tr.select("prompt")
        with pytest.raises(CacheError, match=r"outside the trajectory \[6, 24\)"):
            tr["lhat_delta"][prompt]
        with pytest.raises(CacheError, match="does not run over tokens"):
            tr["upd_m7"][tr.select("reflection")]  # axis 0 is layers: must be [:, p]
        np.testing.assert_array_equal(tr["upd_m7"][:, tr.select("reflection")][1], [8, 13, 17])


def test_arithmetic_on_positions_gives_plain_indices(store):
    """`select(...) - start` (the manual conversion) is a plain array and indexes as given."""
    with open_cache(store) as reader:
        tr = reader.trace("t")
        p = tr.select("reflection")
        shifted = p - A
        assert type(shifted) is np.ndarray and type(p[:2]) is Positions
        np.testing.assert_array_equal(tr["lhat_delta"][shifted], p)


def test_loader_table_aligns_every_array_on_tokens(store):
    pytest.importorskip("pandas")
    (tr,) = loader.load_traces(store, ["lhat", "lhat_delta", "upd_m7", "phrase_id"])
    table = tr.table()
    assert len(table) == N
    traj = table[table.span == "trajectory"]
    np.testing.assert_array_equal(traj.lhat_delta, traj.position)
    np.testing.assert_array_equal(traj.lhat, traj.position)  # the value after each token
    np.testing.assert_array_equal(traj["upd_m7_L1"], traj.position)
    np.testing.assert_array_equal(table.phrase_id, table.position)
    assert table[table.span == "prompt"].lhat_delta.isna().all()
    assert list(table[table.category == "reflection"].position) == [A + 2, A + 7, A + 11]


def test_loader_missing_arrays(store):
    assert loader.load_traces(store, ["nope"]) == []
    with pytest.raises(ProbesError, match=r"has no \['nope'\]"):
        loader.load_traces(store, ["nope"], missing="raise")
    (tr,) = loader.load_traces(store, ["lhat", "nope"], missing="partial")
    assert list(tr.arrays) == ["lhat"]
