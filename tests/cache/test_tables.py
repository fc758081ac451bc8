"""`cache.tables`: a cache as pandas tables, every array placed at the right tokens."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from cache import CacheError, open_cache, open_writer
from cache.tables import PANDAS_HINT, token_table, trace_table

pd = pytest.importorskip("pandas", reason="cache.tables needs pandas (the `tables` extra)")


@pytest.fixture
def cache_with_arrays(tmp_path, metadata, trace_kwargs):
    """Two traces with arrays of every per-token shape ([n_tokens], [T], [T+1], [L, T]), one
    [n, 3] array that is not per-token, and a site."""
    path = tmp_path / "arrays.h5"
    with open_writer(path, metadata=metadata) as writer:
        for i, n in enumerate((40, 30)):
            kw = trace_kwargs(i, n=n)
            a, b = kw["spans"]["trajectory"]
            T = b - a
            rng = np.random.default_rng(i)
            arrays = {
                "phrase_id": np.where(np.arange(n) % 7 == 5, 1, -1).astype(np.int16),
                "lhat": rng.random(T + 1).astype(np.float32),
                "lhat_delta": rng.normal(size=T).astype(np.float32),
                "paragraph_start": (np.arange(T) % 4 == 0).astype(np.uint8),
                "upd_m7": rng.normal(size=(2, T)).astype(np.float32),
                "raml_notebook_occurrences": np.zeros((1, 3), np.int32),
            }
            kw["attrs"] = {**kw["attrs"], "upd_layers": "[1, 3]"}
            writer.write_trace(f"t/{i}", arrays=arrays, **kw)
    return path


def test_token_table_places_every_array(cache_with_arrays):
    df = token_table(cache_with_arrays, phrase_names=["none", "wait"],
                     decode=lambda ids: [f"<{i}>" for i in ids])
    assert list(df.columns[:8]) == ["trace_id", "position", "token", "text", "category", "phrase",
                                    "span", "traj_index"]
    assert {"lhat", "lhat_delta", "paragraph_start", "upd_m7_L1", "upd_m7_L3"} <= set(df.columns)
    assert "raml_notebook_occurrences" not in df.columns and "resid_post" not in df.columns
    assert len(df) == 70
    with open_cache(cache_with_arrays) as reader:
        for tr in reader:
            rows = df[df.trace_id == tr.id]
            a, b = tr.spans["trajectory"]
            traj = rows[rows.span == "trajectory"]
            assert list(rows.position) == list(range(tr.n_tokens))
            assert np.array_equal(rows.token.to_numpy(), tr.tokens)
            assert list(rows.text) == [f"<{i}>" for i in tr.tokens]
            codes = {v: k for k, v in reader.category_codes.items()}
            assert list(rows.category.astype(str)) == [codes[c] for c in tr.category]
            assert list(traj.traj_index) == list(range(b - a))
            assert rows.traj_index.iloc[:a].isna().all()
            assert np.array_equal(traj.lhat_delta.to_numpy(), tr["lhat_delta"][:])
            assert np.array_equal(traj.lhat.to_numpy(), tr["lhat"][1:])  # L̂ after each token
            assert np.array_equal(traj.upd_m7_L1.to_numpy(), tr["upd_m7"][0])
            assert np.array_equal(traj.upd_m7_L3.to_numpy(), tr["upd_m7"][1])
            assert np.array_equal(traj.paragraph_start.to_numpy(int), tr["paragraph_start"][:])
            assert rows.lhat_delta.iloc[:a].isna().all() and rows.paragraph_start.iloc[:a].isna().all()
            pid = tr["phrase_id"][:]
            assert list(rows.phrase.astype(object).where(rows.phrase.notna(), None)) == [
                "wait" if p == 1 else None for p in pid]
    # one line from a cache to a groupby
    means = df.groupby("category", observed=True)["lhat_delta"].mean()
    assert np.isnan(means["prompt"]) and np.isfinite(means["ordinary"])


def test_token_table_choices_and_errors(cache_with_arrays):
    df = token_table(cache_with_arrays, ["lhat_delta"], traces=["t/1"])
    assert set(df.trace_id) == {"t/1"} and "upd_m7_L1" not in df.columns and "text" not in df.columns
    assert str(df.phrase.dtype) == "Int64" and df.phrase.isna().sum() > 0  # ids without names
    with pytest.raises(CacheError, match="no array 'nope'"):
        token_table(cache_with_arrays, ["nope"])
    with pytest.raises(CacheError, match="is not per-token"):
        token_table(cache_with_arrays, ["raml_notebook_occurrences"])
    with open_cache(cache_with_arrays) as reader:  # an open reader works too
        assert len(token_table(reader, ["lhat"])) == 70


def test_trace_table(cache_with_arrays):
    df = trace_table(cache_with_arrays)
    assert list(df.trace_id) == ["t/0", "t/1"]
    with open_cache(cache_with_arrays) as reader:
        for row, tr in zip(df.itertuples(), reader):
            a, b = tr.spans["trajectory"]
            got = (row.n_tokens, row.traj_start, row.traj_end, row.n_trajectory)
            assert got == (tr.n_tokens, a, b, b - a)
            assert row.n_reflection == int((tr.category == reader.category_codes["reflection"]).sum())
            assert row.lhat_start == pytest.approx(float(tr["lhat"][0]))
            assert row.lhat_end == pytest.approx(float(tr["lhat"][-1]))
            assert row.question == tr.text["question"] and row.upd_layers == "[1, 3]"
            assert "upd_m7" in row.arrays.split(",") and "resid_post" not in row.arrays


def test_without_pandas_the_error_says_what_to_install(cache_with_arrays, monkeypatch):
    monkeypatch.setitem(sys.modules, "pandas", None)
    with pytest.raises(ImportError) as err:
        token_table(cache_with_arrays)
    assert str(err.value) == PANDAS_HINT and "trajectory-probes[tables]" in PANDAS_HINT
