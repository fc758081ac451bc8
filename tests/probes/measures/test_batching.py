"""Several short traces per forward (`probes.measures.capture.batching`): the plan, and the captured
arrays equal to one forward per trace (`capture_trace`, the reference it replaces)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from hooks.hf_fast import HF_SITE_PATHS
from probes.demo.run import SAMPLE_TRACES
from probes.measures.capture.activations import capture_trace, resolve_cache_sites, selection
from probes.measures.capture.batching import (
    GROUP_FORWARDS,
    _nonfinite_rows,
    capture_batch,
    forwards,
    plan_batches,
    row_bytes,
)
from probes.models.load import boot_model
from probes.models.tiny import byte_tokenizer, tiny_config
from probes.pipeline.capture import CacheConfig
from probes.traces.read import read_traces
from probes.traces.tokenize import tokenize_traces


def _fake(n_tokens: int, first: int = 3) -> SimpleNamespace:
    """A stand-in for a tokenized trace: only what the plan reads."""
    return SimpleNamespace(n_tokens=n_tokens, spans={"trajectory": (first, n_tokens - 2)})


def test_plan_keeps_order_and_limits():
    rng = np.random.default_rng(0)
    lengths = rng.integers(10, 300, 200).tolist()
    tts = [_fake(n) for n in lengths]
    ends = [selection(t, "trajectory")[1] for t in tts]
    groups = plan_batches(tts, positions="trajectory", batch_tokens=256, max_tokens=200,
                          bytes_per_row=1000, max_bytes=150_000)
    assert [i for g in groups for i in g] == list(range(len(tts)))  # every trace once, in order
    for g in groups:
        if len(g) > 1:
            assert all(ends[i] <= 200 for i in g)  # only traces the prefill chunk holds
            assert sum(ends[i] for i in g) <= GROUP_FORWARDS * 256
            assert sum(ends[i] - 3 for i in g) * 1000 <= 150_000
    assert any(len(g) > 3 for g in groups)
    alone = [i for i, e in enumerate(ends) if e > 200]
    assert alone and all([i] in groups for i in alone)
    # Below 2 padded tokens per forward there is no batching.
    assert plan_batches(tts, positions="all", batch_tokens=0, max_tokens=512, bytes_per_row=1,
                        max_bytes=1e9) == [[i] for i in range(len(tts))]


def test_forwards_are_sorted_and_within_the_budget():
    ends = [120, 7, 64, 300, 65, 64, 1, 128]
    parts = forwards(ends, 256)
    assert sorted(i for p in parts for i in p) == list(range(len(ends)))
    flat = [ends[i] for p in parts for i in p]
    assert flat == sorted(ends)
    for p in parts:
        assert len(p) == 1 or len(p) * max(ends[i] for i in p) <= 256


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_nonfinite_rows_from_bits_equal_isfinite(dtype):
    rng = np.random.default_rng(1)
    x = torch.from_numpy(rng.standard_normal((9, 3, 8)).astype(np.float32))
    x[2, 1, 3], x[2, 0, 0], x[5, 2, 7], x[8, 0, 1] = float("inf"), float("nan"), -float("inf"), 1e6
    t = x.to(getattr(torch, dtype))
    bits = t.view(torch.int16).numpy().view(np.uint16)
    got = _nonfinite_rows([bits, bits[:, 0]], dtype, 9)
    want = (~torch.isfinite(t)).reshape(9, -1).sum(1) + (~torch.isfinite(t[:, 0])).sum(1)
    assert got.tolist() == want.tolist()
    assert _nonfinite_rows([bits], "float32", 9).tolist() == [0] * 9


@pytest.fixture(scope="module", params=sorted(HF_SITE_PATHS))
def family_model(request):
    """A random-init model of every family the HF fast path (and so batching) serves."""
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(tiny_config(request.param), attn_implementation="eager")
    return boot_model(hf, byte_tokenizer(), spec=f"tiny-{request.param}", device="cpu",
                      dtype="float32")


@pytest.fixture(scope="module")
def short_traces(family_model, tmp_path_factory):
    """Seven sample traces with trajectories cut to 15..130 characters (byte tokens: they fit
    GPT-2's 256 positions), of unequal lengths."""
    path = tmp_path_factory.mktemp("batch") / "seven.jsonl"
    rows = [json.loads(line) for line in SAMPLE_TRACES.read_text().splitlines()[:7]]
    for i, row in enumerate(rows):
        row["trajectory"] = row["trajectory"][:15 + 19 * i]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    tts, too_long = tokenize_traces(read_traces(path), family_model.tokenizer,
                                    max_tokens=family_model.arch.n_ctx)
    assert not too_long and len({tt.n_tokens for tt in tts}) == 7
    return tts


@pytest.mark.parametrize("positions", ["trajectory", "all"])
def test_batched_capture_equals_one_forward_per_trace(family_model, short_traces, positions):
    cfg = CacheConfig(sites=("resid_post", "delta", "L0.resid_pre", "embed", "ln_final"),
                      dtype="float32", positions=positions, batch_tokens=400)
    site_map = resolve_cache_sites(cfg.sites, family_model.arch)
    assert len(forwards([selection(t, positions)[1] for t in short_traces], 400)) > 1
    got = capture_batch(family_model, short_traces, site_map, cfg)
    assert len(got) == len(short_traces)
    for tt, arrays in zip(short_traces, got, strict=True):
        with capture_trace(family_model, tt, site_map, cfg, backend="hf") as ref:
            assert np.array_equal(arrays.positions, ref.positions)
            assert arrays.n_tokens == ref.n_tokens and arrays.n_nonfinite == 0
            for comp in site_map:
                a, b = arrays.sites[comp], ref.sites[comp]
                assert a.layers == b.layers and a.data.shape == b.data.shape
                scale = float(np.abs(b.data).max())
                assert np.abs(a.data - b.data).max() <= 1e-5 * scale, comp


def test_batched_float16_is_within_one_step_of_one_forward(family_model, short_traces):
    cfg = CacheConfig(dtype="float16", batch_tokens=400)
    site_map = resolve_cache_sites(cfg.sites, family_model.arch)
    got = capture_batch(family_model, short_traces, site_map, cfg)
    for tt, arrays in zip(short_traces, got, strict=True):
        with capture_trace(family_model, tt, site_map, cfg, backend="hf") as ref:
            for comp in site_map:
                a = arrays.sites[comp].data.astype(np.float32)
                b = ref.sites[comp].data.astype(np.float32)
                # one float16 step of the value, plus the fp32 difference (matters near zero)
                step = np.spacing(np.abs(b).astype(np.float16)).astype(np.float32)
                assert np.all(np.abs(a - b) <= step + 1e-5 * float(np.abs(b).max())), comp
                assert np.mean(a == b) > 0.95  # almost every value is the same float16


def test_row_bytes():
    assert row_bytes({"resid_post": (0, 1, 2), "embed": None}, 8, "float16") == 4 * 8 * 2
    assert row_bytes({"delta": (0,)}, 8, "float32") == 8 * 4
