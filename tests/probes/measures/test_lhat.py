"""Tests for probes.lhat: the packed-suffix L̂ curve equals one forward per prefix, for every t.

Tiny random-init Qwen2 / Llama / Qwen3 / GPT-2 models are built from configs in memory (byte-level
tokenizer, `initializer_range=0.2` so that L̂ moves by nats across prefixes and a wrong mask or
position offset cannot hide under the tolerance). The real trained stories260K Llama comes from
../shared/data and is skipped when absent. Nothing here touches the network.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    LlamaConfig,
    PretrainedConfig,
    Qwen2Config,
    Qwen3Config,
)

from hooks.model import LoadedModel
from probes.errors import ProbesError
from probes.measures.answers import answer_scores, without_trajectory
from probes.measures.lhat import fast as lhat_mod
from probes.measures.lhat.fast import (
    delta_lhat,
    lhat_fast,
    lhat_naive,
    log_ratio,
    plan_pack_size,
    relative_change,
)
from probes.models.load import boot_model, load_model
from probes.models.tiny import byte_tokenizer as _byte_tokenizer
from probes.traces.read import Trace
from probes.traces.tokenize import SPAN_NAMES, TokenizedTrace, tokenize_trace

VOCAB = 320
FP32_TOL = 1e-4  # nats; measured ~1e-6
MIN_SPREAD = 0.1  # L̂ must move this much across t, or exactness would be vacuous


@pytest.fixture(scope="module", autouse=True)
def _single_thread() -> Iterator[None]:
    """One intra-op thread: 2 shared cores; tiny models run far faster without contention."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# --------------------------------------------------------------------------------------------------
# Tiny models and synthetic traces




_COMMON = dict(vocab_size=VOCAB, initializer_range=0.2)
CONFIGS: dict[str, PretrainedConfig] = {
    "qwen2": Qwen2Config(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, **_COMMON,
    ),
    "llama": LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, **_COMMON,
    ),
    "qwen3": Qwen3Config(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, max_position_embeddings=256, **_COMMON,
    ),
    "gpt2": GPT2Config(
        n_embd=64, n_layer=2, n_head=4, n_positions=256, bos_token_id=0, eos_token_id=0, **_COMMON
    ),
}


def _boot(name: str, dtype: torch.dtype = torch.float32) -> LoadedModel:
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(copy.deepcopy(CONFIGS[name]), attn_implementation="eager")
    return boot_model(hf, _byte_tokenizer(), spec=f"tiny-{name}", device="cpu", dtype=dtype)


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def tiny(request: pytest.FixtureRequest) -> LoadedModel:
    return _boot(request.param)


@pytest.fixture(scope="module")
def qwen2() -> LoadedModel:
    return _boot("qwen2")


def _trace(n_prompt: int, n_traj: int, n_scaffold: int, n_answer: int, seed: int) -> TokenizedTrace:
    """A synthetic trace of random byte ids with the four spans in order."""
    rng = np.random.default_rng(seed)
    lengths = (n_prompt, n_traj, n_scaffold, n_answer)
    ids = rng.integers(1, VOCAB, size=sum(lengths)).astype(np.int64)
    spans, start = {}, 0
    for name, n in zip(SPAN_NAMES, lengths):
        spans[name] = (start, start + n)
        start += n
    return TokenizedTrace(
        trace=Trace(f"synthetic-{seed}", "q", "t", "a", {}, 1),
        ids=ids,
        spans=spans,
        trajectory_offsets=np.zeros((n_traj, 2), dtype=np.int64),
        trajectory_text="",
        prompt_text="",
    )


# (n_prompt, T, |S|, |A|, chunk_size, max_pack_tokens): chunks smaller than T, a chunk larger than
# the prefix, one copy per pack, pack sizes that do not divide T+1.
CASES = [
    pytest.param(5, 40, 3, 1, 7, 2 * 3, id="T40-A1-chunk7-k3"),
    pytest.param(4, 97, 4, 3, 32, 5 * 6, id="T97-A3-chunk32-k5"),
    pytest.param(9, 120, 2, 2, 500, 3, id="T120-A2-chunk500-k1"),
    pytest.param(1, 63, 5, 2, 16, 64, id="T63-A2-chunk16-k10"),
]


# --------------------------------------------------------------------------------------------------
# Exactness: fast == naive for every t


@pytest.mark.parametrize(("n_prompt", "n_traj", "n_scaffold", "n_answer", "chunk", "pack"), CASES)
def test_fast_equals_naive_every_prefix(
    tiny: LoadedModel,
    n_prompt: int,
    n_traj: int,
    n_scaffold: int,
    n_answer: int,
    chunk: int,
    pack: int,
) -> None:
    tt = _trace(n_prompt, n_traj, n_scaffold, n_answer, seed=n_traj)
    naive = lhat_naive(tiny, tt)
    res = lhat_fast(tiny, tt, chunk_size=chunk, max_pack_tokens=pack)
    m = n_scaffold + n_answer - 1
    k = max(1, pack // m)

    assert naive.shape == (n_traj + 1,) and naive.dtype == np.float64
    assert res.lhat.shape == (n_traj + 1,) and res.lhat.dtype == np.float32
    np.testing.assert_array_equal(res.ts, np.arange(n_traj + 1))
    assert (res.copy_len, res.copies_per_pack) == (m, k)
    assert res.n_packs == -(-(n_traj + 1) // k)
    assert res.n_prefill_chunks == -(-(n_prompt + n_traj) // chunk)
    assert np.ptp(naive) > MIN_SPREAD
    err = np.abs(res.lhat.astype(np.float64) - naive)
    assert err.max() <= FP32_TOL, f"max |fast - naive| = {err.max():.3g} at t={err.argmax()}"


def test_naive_matches_answer_scores_at_both_ends(tiny: LoadedModel) -> None:
    """Independent check of the reference: t=T is the full trace, t=0 the no-trajectory control."""
    tt = _trace(6, 50, 3, 3, seed=5)
    naive = lhat_naive(tiny, tt, ts=[0, 50])
    full, bare = answer_scores(tiny, [tt, without_trajectory(tt)])
    assert abs(naive[1] - full.nll) <= 1e-5
    assert abs(naive[0] - bare.nll) <= 1e-5


def test_subset_of_prefixes_in_any_order(qwen2: LoadedModel) -> None:
    tt = _trace(4, 80, 3, 2, seed=11)
    ts = [80, 0, 41, 41, 7, 79]
    res = lhat_fast(qwen2, tt, ts=ts, chunk_size=25, max_pack_tokens=3 * 4)
    np.testing.assert_array_equal(res.ts, ts)
    naive = lhat_naive(qwen2, tt, ts=ts)
    assert np.abs(res.lhat - naive).max() <= FP32_TOL
    assert res.lhat[2] == res.lhat[3]  # the same prefix twice gives the same number


def test_empty_scaffold_uses_last_context_token(qwen2: LoadedModel) -> None:
    """|S| = 0: the row predicting A_1 is the last context token, re-fed at each copy's head."""
    tt = _trace(3, 45, 0, 2, seed=3)
    res = lhat_fast(qwen2, tt, chunk_size=10, max_pack_tokens=8)
    assert res.copy_len == 2
    assert np.abs(res.lhat - lhat_naive(qwen2, tt)).max() <= FP32_TOL


def test_empty_trajectory_and_empty_prompt(qwen2: LoadedModel) -> None:
    no_traj = _trace(5, 0, 3, 2, seed=1)
    res = lhat_fast(qwen2, no_traj)
    assert res.lhat.shape == (1,)
    assert abs(res.lhat[0] - lhat_naive(qwen2, no_traj)[0]) <= FP32_TOL
    no_prompt = _trace(0, 30, 3, 2, seed=2)  # t=0 sees no cached position at all
    res = lhat_fast(qwen2, no_prompt, chunk_size=8, max_pack_tokens=8)
    assert np.abs(res.lhat - lhat_naive(qwen2, no_prompt)).max() <= FP32_TOL


def test_attention_budget_shrinks_pack_and_stays_exact(qwen2: LoadedModel) -> None:
    tt = _trace(4, 60, 3, 2, seed=4)
    res = lhat_fast(qwen2, tt, max_pack_tokens=512, max_attn_bytes=1)
    assert res.copies_per_pack == 1 and res.n_packs == 61
    assert np.abs(res.lhat - lhat_naive(qwen2, tt)).max() <= FP32_TOL


def test_hidden_states_equal_truncated_run(tiny: LoadedModel) -> None:
    tt = _trace(4, 40, 3, 2, seed=8)
    res = lhat_fast(tiny, tt, chunk_size=9, max_pack_tokens=12, return_hidden=True)
    n_layers, d_model = tiny.arch.n_layers, tiny.arch.d_model
    assert res.hidden_hook == f"blocks.{n_layers - 1}.hook_resid_post"
    assert res.hidden.shape == (41, 2, d_model) and res.hidden.dtype == np.float32
    ids = torch.as_tensor(tt.ids)
    for t in (0, 17, 40):
        x = torch.cat([ids[: 4 + t], ids[44:]])[None]
        with torch.no_grad():
            _, cache = tiny.bridge.run_with_cache(x, names_filter=[res.hidden_hook])
        ref = cache[res.hidden_hook][0, -3:-1].float().numpy()  # rows predicting A_1, A_2
        assert np.abs(res.hidden[t] - ref).max() <= 1e-4
    first = lhat_fast(tiny, tt, ts=[5], return_hidden=True, hidden_layer=0)
    assert first.hidden_hook == "blocks.0.hook_resid_post"


def test_bridge_attention_pattern_honours_packed_mask(tiny: LoadedModel) -> None:
    """The bridge's own attention (hook_pattern) puts exactly zero weight where the mask hides."""
    tt = _trace(4, 30, 3, 2, seed=12)
    lay = lhat_mod._layout(tt, tiny.device)
    ends = np.array([4, 15, 34])
    ids, mask, pos, rows, n_vis = lhat_mod._pack_inputs(lay, ends, torch.float32)
    patterns: list[torch.Tensor] = []
    hook = ("blocks.1.attn.hook_pattern", lambda act, hook: patterns.append(act.detach().clone()))
    with tiny.bridge.hooks(fwd_hooks=[hook]):
        res = lhat_fast(tiny, tt, ts=ends - 4, max_pack_tokens=64)
    assert res.n_packs == 1 and len(patterns) == 2  # prefill (one chunk) + one pack
    pattern = patterns[1][0]  # [heads, k*m, n_vis + k*m]
    assert pattern.shape == (tiny.arch.n_heads, 3 * 4, n_vis + 3 * 4) and n_vis == 34
    hidden = mask[0, 0] < 0
    assert pattern[:, hidden].abs().max().item() == 0.0
    assert (pattern[:, ~hidden] > 0).all()
    np.testing.assert_allclose(pattern.sum(-1).numpy(), 1.0, atol=1e-5)


# --------------------------------------------------------------------------------------------------
# The test is sensitive: a wrong position offset or a leaky mask is caught


PackBuilder = Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int]]


def _wrong_positions(real: PackBuilder) -> PackBuilder:
    """Every copy placed at position |P| (as if t = 0), whatever its truncation point."""

    def build(lay: Any, ends: np.ndarray, dtype: torch.dtype) -> tuple:
        ids, mask, pos, rows, n_vis = real(lay, ends, dtype)
        return ids, mask, pos - pos[:, :1] + int(lay.n_prompt), rows, n_vis

    return build


def _leaky_mask(real: PackBuilder) -> PackBuilder:
    """Every copy sees the whole cached prefix."""

    def build(lay: Any, ends: np.ndarray, dtype: torch.dtype) -> tuple:
        ids, mask, pos, rows, n_vis = real(lay, ends, dtype)
        mask = mask.clone()
        mask[..., :n_vis] = 0
        return ids, mask, pos, rows, n_vis

    return build


@pytest.mark.parametrize("corrupt", [_wrong_positions, _leaky_mask], ids=["positions", "mask"])
def test_wrong_positions_or_mask_are_detected(
    qwen2: LoadedModel,
    monkeypatch: pytest.MonkeyPatch,
    corrupt: Callable[[PackBuilder], PackBuilder],
) -> None:
    tt = _trace(4, 40, 3, 2, seed=9)
    monkeypatch.setattr(lhat_mod, "_pack_inputs", corrupt(lhat_mod._pack_inputs))
    res = lhat_fast(qwen2, tt, max_pack_tokens=20)
    assert np.abs(res.lhat - lhat_naive(qwen2, tt)).max() > 100 * FP32_TOL


# --------------------------------------------------------------------------------------------------
# bf16 and the real trained model


def test_bf16_runs_and_stays_close_to_fp32(qwen2: LoadedModel) -> None:
    bf16 = _boot("qwen2", dtype=torch.bfloat16)
    tt = _trace(5, 60, 3, 2, seed=6)
    fast16 = lhat_fast(bf16, tt, chunk_size=16, max_pack_tokens=16).lhat
    naive16 = lhat_naive(bf16, tt, ts=[0, 30, 60])
    fp32 = lhat_naive(qwen2, tt)
    assert np.isfinite(fast16).all()
    err_fp32 = np.abs(fast16 - fp32).max()
    err_same = np.abs(fast16[[0, 30, 60]] - naive16).max()
    print(f"bf16 fast vs fp32 naive: {err_fp32:.3g} nats; vs bf16 naive: {err_same:.3g}")
    assert 0 < err_fp32 < 0.5
    assert err_same < 0.5


@pytest.fixture(scope="module")
def stories(stories260k_dir: Path) -> LoadedModel:
    return load_model(str(stories260k_dir), device="cpu")


def test_real_stories260k_fast_equals_naive(stories: LoadedModel) -> None:
    trace = Trace(
        id="lily-ball",
        question="Lily had a red ball. She gave it to her friend Tom. Who has the ball now?",
        trajectory=(
            "Lily had a red ball and she liked to play with it in the park. One day she saw Tom. "
            "Tom was sad because he had no toy. Lily was kind, so she gave the ball to Tom. "
            "Tom smiled and said thank you. So now Tom has the ball."
        ),
        answer="Tom",
        meta={},
        line_no=1,
    )
    tt = tokenize_trace(trace, stories.tokenizer)
    n_traj = tt.spans["trajectory"][1] - tt.spans["trajectory"][0]
    n_answer = tt.spans["answer"][1] - tt.spans["answer"][0]
    assert 40 <= n_traj <= 120 and 1 <= n_answer <= 4
    naive = lhat_naive(stories, tt)
    res = lhat_fast(stories, tt, chunk_size=32, max_pack_tokens=100)
    assert res.copies_per_pack == 100 // res.copy_len and res.n_prefill_chunks > 1
    assert np.ptp(naive) > MIN_SPREAD
    assert np.abs(res.lhat - naive).max() <= FP32_TOL
    assert abs(naive[-1] - answer_scores(stories, [tt])[0].nll) <= 1e-5


# --------------------------------------------------------------------------------------------------
# Errors


def test_errors_are_probes_errors(qwen2: LoadedModel) -> None:
    tt = _trace(4, 10, 3, 2, seed=0)
    with pytest.raises(ProbesError, match="outside 0..10"):
        lhat_fast(qwen2, tt, ts=[11])
    with pytest.raises(ProbesError, match="outside 0..10"):
        lhat_naive(qwen2, tt, ts=[-1])
    with pytest.raises(ProbesError, match="hidden_layer"):
        lhat_fast(qwen2, tt, return_hidden=True, hidden_layer=2)
    with pytest.raises(ProbesError, match="positive"):
        lhat_fast(qwen2, tt, chunk_size=0)
    no_answer = _trace(4, 10, 3, 0, seed=0)
    with pytest.raises(ProbesError, match="empty answer"):
        lhat_fast(qwen2, no_answer)
    nothing_before = _trace(0, 5, 0, 2, seed=0)
    with pytest.raises(ProbesError, match="nothing predicts"):
        lhat_naive(qwen2, nothing_before)
    shuffled = replace(tt, spans={**tt.spans, "answer": (15, 17)})
    with pytest.raises(ProbesError, match="contiguous"):
        lhat_fast(qwen2, shuffled)


# --------------------------------------------------------------------------------------------------
# Derived per-token quantities


def test_delta_relative_and_log_ratio() -> None:
    curve = np.array([2.0, 1.0, 1.5, 0.0, 0.5])
    np.testing.assert_allclose(delta_lhat(curve), [-1.0, 0.5, -1.5, 0.5])
    rho = relative_change(curve)
    np.testing.assert_allclose(rho[:3], [0.5, 0.5, 1.0])
    assert np.isnan(rho[3])  # L̂_{t-1} = 0: skipped, as in the RaML notebook
    lam = log_ratio(curve)
    np.testing.assert_allclose(lam[:2], [np.log(0.5), np.log(1.5)])
    assert np.isnan(lam[2:]).all()
    batch = np.stack([curve, curve[::-1]])  # [B, T+1] on the last axis
    for fn in (delta_lhat, relative_change, log_ratio):
        assert fn(batch).shape == (2, 4)
    np.testing.assert_allclose(delta_lhat(batch)[1], -delta_lhat(curve)[::-1])
    assert delta_lhat([3.0]).shape == (0,)
    with pytest.raises(ProbesError):
        delta_lhat(np.float64(1.0))


def test_plan_pack_size() -> None:
    assert plan_pack_size(4, 100, 8, max_pack_tokens=512, max_attn_bytes=None) == 128
    assert plan_pack_size(600, 100, 8, max_pack_tokens=512) == 1
    small = plan_pack_size(4, 10_000, 8, max_pack_tokens=512, max_attn_bytes=64 << 20)
    rows = small * 4
    assert 1 <= small < 128 and 8 * rows * (10_000 + rows) * 16 <= 64 << 20
    with pytest.raises(ProbesError):
        plan_pack_size(0, 10, 8)
