"""`probes.capture`: site resolution, fingerprints, and caches that hold exactly what the model computes."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cache import CacheError, CacheMismatchError, open_cache, segments_dir
from hooks import UnknownSiteError, run_residual_hf
from probes.commands.inspect import format_inspect
from probes.demo.run import SAMPLE_TRACES
from probes.errors import ProbesError
from probes.measures.capture.activations import choose_backend, resolve_cache_sites
from probes.models.identity import tokenizer_fingerprint
from probes.models.load import load_model, load_tokenizer
from probes.pipeline.capture import CacheConfig, cache_traces
from probes.readouts.inspect import inspect_cache
from probes.traces.categories import categorize, load_lexicon
from probes.traces.read import read_traces
from probes.traces.tokenize import tokenize_traces


@pytest.fixture(scope="module")
def reasoner():
    """The built-in tiny-reasoner on the CPU, loaded once."""
    return load_model("tiny-reasoner", device="cpu")


@pytest.fixture
def samples(tmp_path) -> Path:
    """The first 6 sample traces."""
    path = tmp_path / "six.jsonl"
    path.write_text("".join(SAMPLE_TRACES.read_text().splitlines(keepends=True)[:6]))
    return path


def _datasets(path: Path) -> dict:
    """trace id -> {dataset name: raw array} for every complete trace."""
    out = {}
    with open_cache(path) as reader:
        for tr in reader:
            data = {"tokens": tr.tokens, "category": tr.category, "positions": tr.positions}
            data.update({name: tr.array(name, raw=True)[...] for name in tr.names()})
            out[tr.id] = data
    return out


def _assert_bit_exact(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    for tid in a:
        assert sorted(a[tid]) == sorted(b[tid])
        for name, value in a[tid].items():
            assert value.dtype == b[tid][name].dtype, (tid, name)
            assert value.tobytes() == b[tid][name].tobytes(), (tid, name)


# -- sites ------------------------------------------------------------------------------------------


def test_resolve_sites_expands_merges_and_sorts(reasoner):
    arch = reasoner.arch
    assert resolve_cache_sites(["resid_post", "delta"], arch) == {
        "resid_post": (0, 1, 2, 3), "delta": (0, 1, 2, 3)}
    assert resolve_cache_sites(["L3.attn_out", "L1.attn_out", "L3.attn_out", "embed"], arch) == {
        "attn_out": (1, 3), "embed": None}
    assert resolve_cache_sites(["L2.resid_post", "resid_post"], arch) == {
        "resid_post": (0, 1, 2, 3)}


@pytest.mark.parametrize(
    ("site", "needle"),
    [
        ("resid_postt", "resid_post"),           # unknown: lists the valid components
        ("L9.resid_post", "0..3"),               # layer out of range
        ("attn.pattern", "cannot be cached"),    # not one row per token
        ("attn.q_normed", "qwen3"),              # not in this architecture
    ],
)
def test_resolve_sites_errors_name_the_valid_ones(reasoner, site, needle):
    with pytest.raises(UnknownSiteError) as err:
        resolve_cache_sites([site], reasoner.arch)
    assert needle in str(err.value)


def test_backend_choice(reasoner):
    residual = resolve_cache_sites(["resid_post", "delta", "mlp_out", "embed"], reasoner.arch)
    assert choose_backend(reasoner, residual) == "hf"
    assert choose_backend(reasoner, residual, "bridge") == "bridge"
    internals = resolve_cache_sites(["resid_post", "L1.attn.q"], reasoner.arch)
    assert choose_backend(reasoner, internals) == "bridge"
    with pytest.raises(ProbesError, match="attn.q"):
        choose_backend(reasoner, internals, "hf")
    # A model split over devices (--device-map): accelerate's dispatched modules need the bridge.
    split = dataclasses.replace(reasoner, device_map={"model.layers.0": 0, "model.layers.1": 1})
    assert choose_backend(split, residual) == "bridge"
    with pytest.raises(ProbesError, match="split over devices"):
        choose_backend(split, residual, "hf")


def test_config_validation():
    for bad in ({"positions": "prompt"}, {"dtype": "int8"}, {"chunk_size": 0}, {"limit": 0},
                {"backend": "fast"}, {"sites": ()}, {"max_ram_mib": -1}):
        with pytest.raises(ProbesError):
            CacheConfig(**bad)
    assert CacheConfig(sites="resid_post").sites == ("resid_post",)


def test_tokenizer_fingerprint_is_stable_and_discriminating(reasoner):
    again = load_tokenizer("tiny-reasoner")
    assert tokenizer_fingerprint(again) == tokenizer_fingerprint(reasoner.tokenizer)
    from tests.hooks._models import byte_tokenizer

    assert tokenizer_fingerprint(byte_tokenizer()) != tokenizer_fingerprint(reasoner.tokenizer)
    changed = load_tokenizer("tiny-reasoner")
    changed.chat_template = "{{ messages[0]['content'] }}"
    assert tokenizer_fingerprint(changed) != tokenizer_fingerprint(reasoner.tokenizer)


# -- what a cache holds -----------------------------------------------------------------------------


def test_cache_holds_the_model_activations(reasoner, samples, tmp_path):
    out = tmp_path / "run.h5"
    cfg = CacheConfig(sites=("resid_post", "delta", "L0.resid_pre"), dtype="float32")
    result = cache_traces(reasoner, samples, out, cfg)
    assert (result.n_written, result.n_skipped, result.backend) == (6, 0, "hf")
    assert result.n_tokens > 0 and result.bytes_sites > 0 and result.file_bytes > 0

    lexicon = load_lexicon()
    tokenized, _ = tokenize_traces(read_traces(samples), reasoner.tokenizer)
    sites = [f"L{i}.{c}" for c in ("resid_post", "delta") for i in range(4)] + ["L0.resid_pre"]
    with open_cache(out) as reader:
        assert reader.trace_ids() == [tt.trace.id for tt in tokenized]
        meta = reader.metadata
        assert meta["model"] == "tiny-reasoner"
        assert meta["config"]["sites"] == {"resid_post": [0, 1, 2, 3], "delta": [0, 1, 2, 3],
                                           "resid_pre": [0]}
        assert meta["config"]["positions"] == "trajectory"
        assert meta["config"]["storage_dtype"] == "float32"
        assert meta["info"]["backend"] == "hf" and meta["info"]["chunk_size"] == 512
        assert meta["tokenizer_fingerprint"] == tokenizer_fingerprint(reasoner.tokenizer)
        assert meta["lexicon_fingerprint"] == lexicon.fingerprint()
        for tt in tokenized:
            tr = reader.trace(tt.trace.id)
            start, end = tt.spans["trajectory"]
            np.testing.assert_array_equal(tr.tokens, tt.ids)
            np.testing.assert_array_equal(tr.category, categorize(tt, lexicon).category)
            np.testing.assert_array_equal(tr.positions, np.arange(start, end))
            assert tr.spans == tt.spans
            assert tr.text == {"question": tt.trace.question, "answer": tt.trace.answer}
            assert tr.source == f"{samples.name}:{tt.trace.line_no}"
            assert tr["resid_post"].shape == (end - start, 4, 128)
            assert tr["resid_post"].layers == (0, 1, 2, 3)
            assert tr["resid_pre"].shape == (end - start, 1, 128)
            assert tr["resid_pre"].layers == (0,)
            # One unchunked forward of the whole trace gives the same numbers.
            ref = run_residual_hf(reasoner, torch.as_tensor(tt.ids), sites,
                                  positions="trajectory", spans=tt.spans)
            for layer in range(4):
                for comp in ("resid_post", "delta"):
                    np.testing.assert_allclose(tr[comp][:, layer],
                                               ref[f"L{layer}.{comp}"].numpy(), atol=2e-5)
            np.testing.assert_allclose(tr["resid_pre"][:, 0], ref["L0.resid_pre"].numpy(),
                                       atol=2e-5)
            # delta is what each block adds: resid_post[l] - resid_post[l - 1].
            post = tr["resid_post"][...]
            np.testing.assert_allclose(tr["delta"][:, 1:], post[:, 1:] - post[:, :-1], atol=2e-5)

    summary = inspect_cache(out)
    assert summary["n_traces_complete"] == 6 and summary["complete"]
    assert summary["sites"]["resid_post"]["row_shape"] == [4, 128]
    assert summary["config"]["positions"] == "trajectory"
    table = format_inspect(summary)
    assert "complete: yes" in table and "resid_post" in table and "0..3" in table


def test_backends_chunks_and_spooling_agree(reasoner, samples, tmp_path):
    base = dict(sites=("resid_post", "delta", "mlp_out"), dtype="float32", limit=3,
                batch_tokens=0)
    cache_traces(reasoner, samples, tmp_path / "hf.h5", CacheConfig(**base, backend="hf"))
    cache_traces(reasoner, samples, tmp_path / "br.h5", CacheConfig(**base, backend="bridge"))
    cache_traces(reasoner, samples, tmp_path / "small.h5", CacheConfig(**base, chunk_size=17))
    spool = cache_traces(reasoner, samples, tmp_path / "spool.h5",
                         CacheConfig(**base, max_ram_mib=0))
    batched = cache_traces(reasoner, samples, tmp_path / "batched.h5",
                           CacheConfig(**{**base, "batch_tokens": 400}))
    assert len(list(segments_dir(tmp_path / "batched.h5").glob("*.h5"))) == 1  # one commit
    assert batched.n_written == 3 and batched.n_rows == spool.n_rows
    hf, br = _datasets(tmp_path / "hf.h5"), _datasets(tmp_path / "br.h5")
    small = _datasets(tmp_path / "small.h5")
    for other in (br, small, _datasets(tmp_path / "batched.h5")):
        for tid, data in hf.items():
            for name in ("resid_post", "delta", "mlp_out"):
                np.testing.assert_allclose(other[tid][name], data[name], atol=2e-5)
    # Spooled outputs go through a memory-mapped temporary file: same bytes as in RAM.
    _assert_bit_exact(_datasets(tmp_path / "spool.h5"), hf)
    assert spool.n_written == 3
    assert not list(tmp_path.glob(".probes-spool-*"))


def test_spool_space_is_reserved_also_without_fallocate(reasoner, samples, tmp_path, monkeypatch):
    """The spool's blocks are reserved before the map is written (a full disk is then an error,
    not a SIGBUS); where the filesystem has no fallocate they are written with zeros."""
    import errno
    import os

    from probes.measures.capture.activations import reserve

    def unsupported(fd, offset, length):
        raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))

    monkeypatch.setattr(os, "posix_fallocate", unsupported)
    with (tmp_path / "f.bin").open("w+b") as fh:
        reserve(fh.fileno(), 3 * 2**20 + 5)
        stat = os.fstat(fh.fileno())
        assert stat.st_size == 3 * 2**20 + 5 and stat.st_blocks * 512 >= stat.st_size
        assert fh.read() == bytes(3 * 2**20 + 5)
    base = dict(sites=("resid_post",), dtype="float32", limit=2, batch_tokens=0)
    cache_traces(reasoner, samples, tmp_path / "spool.h5", CacheConfig(**base, max_ram_mib=0))
    monkeypatch.undo()
    cache_traces(reasoner, samples, tmp_path / "ram.h5", CacheConfig(**base))
    _assert_bit_exact(_datasets(tmp_path / "spool.h5"), _datasets(tmp_path / "ram.h5"))


def test_storage_dtypes_and_all_positions(reasoner, samples, tmp_path):
    cfg32 = CacheConfig(sites=("resid_post",), dtype="float32", positions="all", limit=2)
    cache_traces(reasoner, samples, tmp_path / "f32.h5", cfg32)
    for dtype in ("float16", "bfloat16"):
        cfg = CacheConfig(sites=("resid_post",), dtype=dtype, positions="all", limit=2)
        cache_traces(reasoner, samples, tmp_path / f"{dtype}.h5", cfg)
    with open_cache(tmp_path / "f32.h5") as a, open_cache(tmp_path / "float16.h5") as b, \
            open_cache(tmp_path / "bfloat16.h5") as c:
        for tid in a.trace_ids():
            ref = a.trace(tid)["resid_post"][...]
            assert a.trace(tid).positions.tolist() == list(range(a.trace(tid).n_tokens))
            half = b.trace(tid)["resid_post"]
            assert half.dtype == "float16"
            assert half[...].tobytes() == ref.astype(np.float16).tobytes()
            bf = c.trace(tid)["resid_post"]
            assert bf.dtype == "bfloat16"
            expected = torch.from_numpy(ref).to(torch.bfloat16).float().numpy()
            assert bf[...].tobytes() == expected.tobytes()  # decoded exactly (RNE as torch)
            assert b.trace(tid).attrs["n_nonfinite"] == 0


def test_bridge_only_components(reasoner, samples, tmp_path):
    out = tmp_path / "q.h5"
    result = cache_traces(reasoner, samples, out,
                          CacheConfig(sites=("L1.attn.q", "ln2.scale", "resid_post"), limit=2))
    assert result.backend == "bridge"
    with open_cache(out) as reader:
        tr = next(iter(reader))
        n = tr.positions.shape[0]
        assert tr["attn.q"].shape == (n, 1, 4, 32)
        assert tr["ln2.scale"].shape == (n, 4)
        assert tr["resid_post"].shape == (n, 4, 128)


@pytest.mark.parametrize("batch_tokens", [0, 300])
def test_resume_adds_only_missing_traces_and_equals_one_run(reasoner, samples, tmp_path,
                                                             batch_tokens):
    cfg = CacheConfig(limit=3, batch_tokens=batch_tokens)
    cache_traces(reasoner, samples, tmp_path / "part.h5", cfg)
    with pytest.raises(CacheError, match="--resume"):
        cache_traces(reasoner, samples, tmp_path / "part.h5", cfg)
    full = CacheConfig(batch_tokens=batch_tokens)
    more = cache_traces(reasoner, samples, tmp_path / "part.h5", full, resume=True)
    assert (more.n_skipped, more.n_written) == (3, 3)
    cache_traces(reasoner, samples, tmp_path / "one.h5", full)
    part, one = _datasets(tmp_path / "part.h5"), _datasets(tmp_path / "one.h5")
    if batch_tokens == 0:
        _assert_bit_exact(part, one)
    else:  # --limit changed which traces share a forward: equal up to one float16 step
        assert list(part) == list(one)
        for tid in one:
            for name in ("resid_post", "delta"):
                np.testing.assert_allclose(part[tid][name].astype(np.float32),
                                           one[tid][name].astype(np.float32), rtol=2**-10,
                                           atol=2**-14)
    again = cache_traces(reasoner, samples, tmp_path / "one.h5", CacheConfig(), resume=True)
    assert (again.n_skipped, again.n_written) == (6, 0)
    replaced = cache_traces(reasoner, samples, tmp_path / "one.h5", CacheConfig(limit=1),
                            overwrite=True)
    assert replaced.n_written == 1 and len(_datasets(tmp_path / "one.h5")) == 1


def test_resume_refuses_other_settings_and_changed_traces(reasoner, samples, tmp_path):
    out = tmp_path / "run.h5"
    cache_traces(reasoner, samples, out, CacheConfig(limit=2))
    with pytest.raises(CacheMismatchError, match="config"):
        cache_traces(reasoner, samples, out, CacheConfig(dtype="float32"), resume=True)
    with pytest.raises(CacheMismatchError, match="config"):
        cache_traces(reasoner, samples, out, CacheConfig(sites=("resid_post",)), resume=True)
    lines = samples.read_text().splitlines()
    record = json.loads(lines[0])
    record["trajectory"] = record["trajectory"].replace("Start", "Begin")
    edited = tmp_path / "edited.jsonl"
    edited.write_text("\n".join([json.dumps(record), *lines[1:]]) + "\n")
    with pytest.raises(CacheMismatchError, match=record["id"]):
        cache_traces(reasoner, edited, out, CacheConfig(), resume=True)


def test_too_long_and_bad_lines_are_reported(reasoner, samples, tmp_path):
    lines = samples.read_text().splitlines()[:2]
    long = json.loads(lines[0]) | {"id": "long", "trajectory": "1 + 1 = 2.\n" * 80}
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join([lines[0], "{oops", json.dumps(long), lines[1]]) + "\n")
    messages: list[str] = []
    result = cache_traces(reasoner, path, tmp_path / "run.h5", CacheConfig(), log=messages.append)
    assert (result.n_written, result.n_too_long, result.n_bad_lines) == (2, 1, 1)
    assert result.too_long[0][0] == "long" and result.too_long[0][3] == 512
    assert any("line 2" in m for m in messages) and any("'long'" in m for m in messages)
    with pytest.raises(ProbesError, match="mixed.jsonl:2"):
        cache_traces(reasoner, path, tmp_path / "strict.h5", CacheConfig(strict=True))
    assert not (tmp_path / "strict.h5").exists()
