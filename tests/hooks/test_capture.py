"""Tests for hooks.capture and hooks.hf_fast: inert, scoped, reduced-in-hook, chunk-exact capture.

Tiny random 2-layer models of Qwen2, Llama, Qwen3 (QK-norm) and GPT-2 built in code. Invariants:
logits are bit-identical with capture on; hooks vanish on exit and on exceptions while a user's
own hook survives; a KV-cached chunked prefill captures what one full pass captures; the HF fast
path equals the bridge; shapes keep n_kv_heads under GQA. Offline, about 10 s on one thread.
"""

from collections.abc import Iterator

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache
from transformers.modeling_utils import AttentionInterface

from hooks import (
    CaptureError,
    HookSite,
    UnknownSiteError,
    all_sites,
    available_components,
    capture,
    run_residual_hf,
    sites_for,
)
from hooks.errors import HooksError
from hooks.hf_fast import HF_FAST_COMPONENTS
from hooks.model import ArchInfo, LoadedModel
from tests.hooks._models import CONFIGS, build_tiny, token_ids

N_TOK = 24
CHUNKS = (5, 7, 12)  # uneven chunk lengths through one DynamicCache
CHUNK_TOL = 1e-5  # chunked vs full, fp32; measured <= 1.5e-8 residual, 1.5e-7 pattern
HF_TOL = 1e-5  # HF sdpa fast path vs bridge eager, fp32; measured <= 7.2e-7
ARCH_NAMES = sorted(CONFIGS)


@pytest.fixture(scope="module", autouse=True)
def _single_thread() -> Iterator[None]:
    """One intra-op thread: the 2 shared cores make torch's pool contend on tiny models."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def models() -> dict[str, LoadedModel]:
    return {name: build_tiny(name) for name in ARCH_NAMES}


@pytest.fixture(params=ARCH_NAMES)
def tiny(request: pytest.FixtureRequest, models: dict[str, LoadedModel]) -> LoadedModel:
    return models[request.param]


@pytest.fixture
def ids() -> torch.Tensor:
    return token_ids(N_TOK)  # [1, N_TOK]


def _all_sites(arch: ArchInfo) -> tuple[HookSite, ...]:
    return all_sites(arch, available_components(arch))


def _expected_shape(site: HookSite, arch: ArchInfo, n: int, n_key: int) -> tuple[int, ...]:
    """The documented storage shape of each component (written out independently of SITE_TABLE)."""
    c = site.component
    if c.endswith(".scale"):
        return (n,)
    if c in ("attn.q", "attn.rot_q", "attn.q_normed", "attn.z"):
        return (n, arch.n_heads, arch.d_head)
    if c in ("attn.k", "attn.v", "attn.rot_k", "attn.k_normed"):
        return (n, arch.n_kv_heads, arch.d_head)  # GQA: not expanded to n_heads
    if c in ("attn.scores", "attn.pattern"):
        return (arch.n_heads, n, n_key)
    if c.startswith("mlp."):
        return (n, arch.d_mlp)
    return (n, arch.d_model)


def _full(loaded: LoadedModel, ids: torch.Tensor, sites, **kwargs):
    with torch.no_grad(), capture(loaded, sites, **kwargs) as store:
        loaded.bridge(ids)
    return store.result()


def _chunked(loaded: LoadedModel, ids: torch.Tensor, sites, sizes=CHUNKS, **kwargs):
    with torch.no_grad(), capture(loaded, sites, **kwargs) as store:
        cache = DynamicCache(config=loaded.hf_model.config)
        for chunk in ids.split(list(sizes), dim=1):
            loaded.bridge(chunk, past_key_values=cache)
    return store.result()


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return float((a.float() - b.float()).abs().max())


# ----------------------------------------------------------------------------------------------
# Inert, complete, right shapes
# ----------------------------------------------------------------------------------------------


def test_capture_is_numerically_inert(tiny: LoadedModel, ids: torch.Tensor) -> None:
    sites = _all_sites(tiny.arch)
    with torch.no_grad():
        plain = tiny.bridge(ids)
        with capture(tiny, sites) as store:
            hooked = tiny.bridge(ids)
        with capture(tiny, [s for s in sites if "attn.pattern" not in str(s)
                            and "attn.scores" not in str(s)],
                     positions=[1, 5, 6], reduce="norm", dtype="float16"):
            reduced = tiny.bridge(ids)
    assert torch.equal(plain, hooked)
    assert torch.equal(plain, reduced)
    result = store.result()
    assert set(result.tensors) == set(sites)
    for site, tensor in result.tensors.items():
        assert tuple(tensor.shape) == _expected_shape(site, tiny.arch, N_TOK, N_TOK), str(site)
        assert tensor.device == torch.device("cpu")
    assert torch.equal(result.positions, torch.arange(N_TOK))


def test_values_match_run_with_cache(tiny: LoadedModel, ids: torch.Tensor) -> None:
    names = {
        "L1.resid_post": "blocks.1.hook_resid_post",
        "L0.attn.k": "blocks.0.attn.hook_k",
        "L1.attn.pattern": "blocks.1.attn.hook_pattern",
        "L0.mlp.post": "blocks.0.mlp.hook_post",
        "L0.ln1.scale": "blocks.0.ln1.hook_scale",
    }
    if tiny.arch.family == "qwen3":
        names["L0.attn.k_normed"] = "blocks.0.attn.hook_k_normed"  # [b, head, pos, d] there
    got = _full(tiny, ids, list(names))
    with torch.no_grad():
        _, cache = tiny.bridge.run_with_cache(ids, names_filter=list(names.values()))
    for site, name in names.items():
        ref = cache[name][0]
        if site.endswith("k_normed"):
            ref = ref.transpose(0, 1)
        if site.endswith("scale"):
            ref = ref[..., 0]
        assert torch.equal(got[site], ref), site


def test_gqa_keys_and_values_keep_kv_heads(models: dict[str, LoadedModel], ids) -> None:
    qwen2 = models["qwen2"]
    assert (qwen2.arch.n_heads, qwen2.arch.n_kv_heads) == (4, 2)
    got = _full(qwen2, ids, ["L0.attn.q", "L0.attn.k", "L0.attn.v", "L0.attn.rot_k", "L0.attn.z"])
    assert got["L0.attn.q"].shape == (N_TOK, 4, 8)
    assert got["L0.attn.k"].shape == got["L0.attn.v"].shape == got["L0.attn.rot_k"].shape
    assert got["L0.attn.k"].shape == (N_TOK, 2, 8)
    assert got["L0.attn.z"].shape == (N_TOK, 4, 8)


def test_delta_is_resid_post_minus_resid_pre(tiny: LoadedModel, ids: torch.Tensor) -> None:
    got = _full(tiny, ids, ["L1.resid_pre", "L1.resid_post", "L1.delta"])
    assert torch.equal(got["L1.delta"], got["L1.resid_post"] - got["L1.resid_pre"])


# ----------------------------------------------------------------------------------------------
# In-hook reductions: positions, norms, dtype
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("positions", "expected"),
    [
        ("trajectory", list(range(6, 17))),
        (slice(3, None, 5), [3, 8, 13, 18, 23]),
        (slice(20, 40), [20, 21, 22, 23]),
        ([0, 4, 5, 11, 12, 23], [0, 4, 5, 11, 12, 23]),
        (torch.tensor([2, 9]), [2, 9]),
    ],
)
def test_position_selection_full_and_chunked(
    models: dict[str, LoadedModel], ids: torch.Tensor, positions: object, expected: list[int]
) -> None:
    loaded = models["llama"]
    spans = {"prompt": (0, 6), "trajectory": (6, 17), "answer": (17, 24)}
    sites = ["L0.resid_post", "L1.delta", "L0.attn.q", "L1.attn.pattern", "L0.ln2.scale"]
    everything = _full(loaded, ids, sites)
    for got in (
        _full(loaded, ids, sites, positions=positions, spans=spans),
        _chunked(loaded, ids, sites, positions=positions, spans=spans),
    ):
        assert got.positions.tolist() == expected
        rows = torch.tensor(expected)
        assert _max_diff(got["L0.resid_post"], everything["L0.resid_post"][rows]) <= CHUNK_TOL
        assert _max_diff(got["L1.delta"], everything["L1.delta"][rows]) <= CHUNK_TOL
        assert _max_diff(got["L0.attn.q"], everything["L0.attn.q"][rows]) <= CHUNK_TOL
        assert _max_diff(got["L0.ln2.scale"], everything["L0.ln2.scale"][rows]) <= CHUNK_TOL
        # Only the selected query rows of the pattern are kept: [head, n_sel, key].
        pattern = got["L1.attn.pattern"]
        assert pattern.shape == (4, len(expected), N_TOK)
        assert _max_diff(pattern, everything["L1.attn.pattern"][:, rows]) <= CHUNK_TOL


def test_norm_reduction(tiny: LoadedModel, ids: torch.Tensor) -> None:
    sites = ["L0.resid_post", "L1.delta", "L0.attn.q", "L0.attn.v", "L0.ln1.scale"]
    full = _full(tiny, ids, sites)
    norms = _full(tiny, ids, sites, reduce="norm", positions=slice(2, 10))
    assert norms.reduce == "norm"
    for site in sites:
        rows = full[site][2:10].float()
        ref = torch.linalg.vector_norm(rows, dim=-1) if rows.ndim > 1 else rows.abs()
        assert norms[site].dtype == torch.float32
        assert norms[site].shape == (8, *full[site].shape[1:-1])
        torch.testing.assert_close(norms[site], ref, rtol=1e-6, atol=1e-6)
    assert norms["L0.attn.v"].shape == (8, tiny.arch.n_kv_heads)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_storage_dtype(models: dict[str, LoadedModel], ids, dtype: torch.dtype) -> None:
    loaded = models["qwen2"]
    sites = ["L0.resid_post", "L1.delta", "L0.attn.pattern", "L0.ln1.scale"]
    full = _full(loaded, ids, sites)
    got = _full(loaded, ids, sites, dtype=str(dtype).removeprefix("torch."))
    for site in sites:
        assert got[site].dtype == dtype
        assert torch.equal(got[site], full[site].to(dtype))


def test_bf16_model_hook_dtypes_and_inertness(ids: torch.Tensor) -> None:
    loaded = build_tiny("qwen2", dtype="bfloat16")
    sites = ["L0.resid_post", "L0.delta", "L0.ln1.scale", "L0.attn.pattern", "ln_final"]
    with torch.no_grad():
        plain = loaded.bridge(ids)
        with capture(loaded, sites) as store:
            hooked = loaded.bridge(ids)
    assert torch.equal(plain, hooked)
    got = store.result()
    assert got["L0.resid_post"].dtype == torch.bfloat16
    assert got["L0.delta"].dtype == torch.bfloat16  # the residual's dtype (computed in fp32)
    assert got["L0.ln1.scale"].dtype == torch.float32  # TransformerLens keeps norm scales fp32
    assert got["L0.attn.pattern"].dtype == torch.bfloat16


def test_captured_rows_do_not_alias_activations(models, ids) -> None:
    loaded = models["qwen2"]
    seen: list[torch.Tensor] = []
    hook_point = loaded.bridge.hook_dict["blocks.0.hook_resid_post"]
    with torch.no_grad(), capture(loaded, ["L0.resid_post", "L0.attn.pattern"],
                                  positions=slice(0, 4)) as store:
        with loaded.bridge.hooks(fwd_hooks=[("blocks.0.hook_resid_post",
                                             lambda t, hook: seen.append(t))]):
            loaded.bridge(ids)
    assert hook_point.fwd_hooks == []
    got = store.result()
    assert got["L0.resid_post"].untyped_storage().data_ptr() != seen[0].untyped_storage().data_ptr()
    assert got["L0.attn.pattern"].untyped_storage().nbytes() == 4 * 4 * N_TOK * 4  # rows only


# ----------------------------------------------------------------------------------------------
# Chunked prefill through the KV cache
# ----------------------------------------------------------------------------------------------


def test_chunked_capture_equals_full_sequence(tiny: LoadedModel, ids: torch.Tensor) -> None:
    sites = ["L0.resid_post", "L1.resid_post", "L0.delta", "L1.delta", "L1.attn.pattern",
             "L0.attn.k", "L1.attn.scores", "ln_final"]
    full = _full(tiny, ids, sites)
    chunked = _chunked(tiny, ids, sites)
    assert torch.equal(chunked.positions, torch.arange(N_TOK))
    for site in sites:
        if site == "L1.attn.scores":  # masked keys: the bridge's finfo.min, as the padding
            assert torch.equal(chunked[site] == torch.finfo(torch.float32).min,
                               full[site] == torch.finfo(torch.float32).min)
            keep = full[site] > torch.finfo(torch.float32).min
            assert _max_diff(chunked[site][keep], full[site][keep]) <= CHUNK_TOL
            continue
        assert _max_diff(chunked[site], full[site]) <= CHUNK_TOL, site


def test_position_offset_after_an_uncaptured_prefix(models, ids) -> None:
    loaded, split = models["qwen3"], 10
    sites = ["L1.resid_post", "L1.delta", "L0.attn.pattern"]
    full = _full(loaded, ids, sites)
    with torch.no_grad():
        cache = DynamicCache(config=loaded.hf_model.config)
        loaded.bridge(ids[:, :split], past_key_values=cache)  # prefix, not captured
        with capture(loaded, sites, position_offset=split, positions=slice(12, 20)) as store:
            loaded.bridge(ids[:, split:], past_key_values=cache)
    got = store.result()
    assert got.positions.tolist() == list(range(12, 20))
    assert store.next_position == N_TOK
    assert _max_diff(got["L1.resid_post"], full["L1.resid_post"][12:20]) <= CHUNK_TOL
    assert _max_diff(got["L1.delta"], full["L1.delta"][12:20]) <= CHUNK_TOL
    assert _max_diff(got["L0.attn.pattern"], full["L0.attn.pattern"][:, 12:20]) <= CHUNK_TOL


def test_drain_streams_chunk_by_chunk(models, ids) -> None:
    loaded = models["gpt2"]
    full = _full(loaded, ids, ["L1.delta"])
    parts = []
    with torch.no_grad(), capture(loaded, ["L1.delta"]) as store:
        cache = DynamicCache(config=loaded.hf_model.config)
        for chunk in ids.split(list(CHUNKS), dim=1):
            loaded.bridge(chunk, past_key_values=cache)
            parts.append(store.drain())
    assert [p.positions.tolist()[:1] for p in parts] == [[0], [5], [12]]
    assert [p["L1.delta"].shape[0] for p in parts] == list(CHUNKS)
    joined = torch.cat([p["L1.delta"] for p in parts])
    assert _max_diff(joined, full["L1.delta"]) <= CHUNK_TOL
    assert store.result().positions.numel() == 0


# ----------------------------------------------------------------------------------------------
# Scoped hooks
# ----------------------------------------------------------------------------------------------


def _hook_state(loaded: LoadedModel) -> dict:
    """Every torch-level hook on every module of bridge and HF model, and every TL hook list."""
    modules = {**dict(loaded.bridge.named_modules(remove_duplicate=False)),
               **{f"hf.{n}": m for n, m in loaded.hf_model.named_modules(remove_duplicate=False)}}
    torch_hooks = {
        name: tuple(
            tuple(getattr(m, attr).keys())
            for attr in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks")
        )
        for name, m in modules.items()
    }
    tl_hooks = {name: list(hp.fwd_hooks) for name, hp in loaded.bridge.hook_dict.items()}
    return {"torch": torch_hooks, "tl": tl_hooks}


@pytest.fixture
def user_hook(models: dict[str, LoadedModel]) -> Iterator[tuple[LoadedModel, list[int]]]:
    """A user's own hook on blocks.0.hook_resid_post, added before any capture, removed after."""
    loaded = models["qwen2"]
    calls: list[int] = []
    point = loaded.bridge.hook_dict["blocks.0.hook_resid_post"]
    handle = point.add_hook(lambda t, hook: calls.append(1))
    try:
        yield loaded, calls
    finally:
        handle.hook.remove()
        point.fwd_hooks[:] = [h for h in point.fwd_hooks if h is not handle]


def test_exception_in_block_removes_exactly_our_hooks(user_hook, ids) -> None:
    loaded, calls = user_hook
    with torch.no_grad():
        loaded.bridge(ids)  # HF installs its own (inert) output-recording hooks on first use
    before = _hook_state(loaded)
    assert len(before["tl"]["blocks.0.hook_resid_post"]) == 1
    with pytest.raises(RuntimeError, match="boom"), torch.no_grad():
        with capture(loaded, _all_sites(loaded.arch)) as store:
            loaded.bridge(ids)
            assert any(before["tl"][n] != hps.fwd_hooks
                       for n, hps in loaded.bridge.hook_dict.items())
            raise RuntimeError("boom")
    assert _hook_state(loaded) == before
    assert all(not hp.fwd_hooks for n, hp in loaded.bridge.hook_dict.items()
               if hp is not loaded.bridge.hook_dict["blocks.0.hook_resid_post"])
    n_calls, n_chunks = len(calls), len(store.result().positions)
    with torch.no_grad():
        loaded.bridge(ids)
    assert len(calls) == n_calls + 1  # the user's hook survived and still fires
    assert len(store.result().positions) == n_chunks  # ours no longer fire


def test_error_raised_inside_the_forward_removes_hooks(user_hook) -> None:
    loaded, _ = user_hook
    before = _hook_state(loaded)
    with pytest.raises(CaptureError, match="batch size 1 .* got a batch of 2"), torch.no_grad():
        with capture(loaded, ["L0.resid_post", "L1.delta"]):
            loaded.bridge(torch.zeros(2, 5, dtype=torch.long))
    assert _hook_state(loaded) == before


def test_normal_exit_removes_hooks(user_hook, ids) -> None:
    loaded, _ = user_hook
    before = _hook_state(loaded)
    with torch.no_grad(), capture(loaded, ["L0.resid_post", "L0.attn.pattern"]):
        loaded.bridge(ids)
    assert _hook_state(loaded) == before


# ----------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------


def _enter(loaded: LoadedModel, sites, **kwargs) -> None:
    with capture(loaded, sites, **kwargs):
        pass


@pytest.fixture
def bad_value_errors(request: pytest.FixtureRequest) -> tuple[type[Exception], ...]:
    """What a value outside a `Literal` raises: our CaptureError, or, when the suite runs with
    `--jaxtyping-packages=hooks,...`, the runtime type checker's error, which comes first."""
    if request.config.getoption("jaxtyping_packages", default=None):
        from jaxtyping import TypeCheckError

        return (CaptureError, TypeCheckError)
    return (CaptureError,)


def test_capture_errors(
    models: dict[str, LoadedModel], bad_value_errors: tuple[type[Exception], ...]
) -> None:
    gpt2, qwen2 = models["gpt2"], models["qwen2"]
    with pytest.raises(UnknownSiteError, match="'attn.rot_k' is not available for .* 'gpt2'"):
        _enter(gpt2, ["L0.attn.rot_k"])
    with pytest.raises(UnknownSiteError, match=r"valid layers are 0\.\.1"):
        _enter(qwen2, [HookSite(2, "resid_post")])
    with pytest.raises(UnknownSiteError, match="Known components"):
        _enter(qwen2, ["L0.resid"])
    with pytest.raises(CaptureError, match=r"Unknown position selection 'answer'.*\['prompt'\]"):
        _enter(qwen2, ["L0.resid_post"], positions="answer", spans={"prompt": (0, 3)})
    with pytest.raises(CaptureError, match="strictly increasing"):
        _enter(qwen2, ["L0.resid_post"], positions=[3, 1])
    with pytest.raises(CaptureError, match="step >= 1"):
        _enter(qwen2, ["L0.resid_post"], positions=slice(-3, None))
    with pytest.raises(CaptureError, match=r"reduce='norm' is not defined .*L0.attn.pattern"):
        _enter(qwen2, ["L0.attn.pattern"], reduce="norm")
    with pytest.raises(bad_value_errors, match="'mean'") as info:
        _enter(qwen2, ["L0.resid_post"], reduce="mean")  # type: ignore[arg-type]
    if isinstance(info.value, CaptureError):
        assert "Unknown reduce='mean'; use one of ['none', 'norm']" in str(info.value)
    with pytest.raises(HooksError, match="Unsupported dtype 'int8'"):
        _enter(qwen2, ["L0.resid_post"], dtype="int8")
    with pytest.raises(CaptureError, match="needs a LoadedModel .* got Linear"):
        _enter(torch.nn.Linear(2, 2), ["L0.resid_post"])  # type: ignore[arg-type]
    with pytest.raises(HooksError, match="Unknown device 'gpu'"):
        _enter(qwen2, ["L0.resid_post"], device="gpu")
    with pytest.raises(CaptureError, match="position_offset must be an int >= 0"):
        _enter(qwen2, ["L0.resid_post"], position_offset=-1)
    assert all(not hp.fwd_hooks for hp in qwen2.bridge.hook_dict.values())


def test_reading_an_unknown_site(models: dict[str, LoadedModel], ids) -> None:
    got = _full(models["llama"], ids, ["L0.resid_post"])
    with pytest.raises(UnknownSiteError, match=r"'L1.resid_post' was not captured.*\['L0.resid"):
        got["L1.resid_post"]
    assert list(got.by_name()) == ["L0.resid_post"]


def test_bare_bridge_is_accepted(models: dict[str, LoadedModel], ids) -> None:
    loaded = models["llama"]
    with torch.no_grad(), capture(loaded.bridge, ["L1.delta", "L0.attn.k"]) as store:
        loaded.bridge(ids)
    ref = _full(loaded, ids, ["L1.delta", "L0.attn.k"])
    assert torch.equal(store["L1.delta"], ref["L1.delta"])
    assert store["L0.attn.k"].shape == (N_TOK, 2, 8)


# ----------------------------------------------------------------------------------------------
# The HF fast path
# ----------------------------------------------------------------------------------------------


def _fast_sites(arch: ArchInfo) -> tuple[HookSite, ...]:
    return all_sites(arch, HF_FAST_COMPONENTS)


def test_hf_fast_path_equals_bridge(tiny: LoadedModel, ids: torch.Tensor) -> None:
    sites = _fast_sites(tiny.arch)
    for kwargs in ({}, {"positions": [0, 3, 17, 23]}, {"reduce": "norm"}):
        bridge = _full(tiny, ids, sites, **kwargs)
        fast = run_residual_hf(tiny, ids, sites, **kwargs)
        assert torch.equal(fast.positions, bridge.positions)
        for site in sites:
            assert _max_diff(fast[site], bridge[site]) <= HF_TOL, (str(site), kwargs)


def test_hf_fast_path_chunked_with_cache(tiny: LoadedModel, ids: torch.Tensor) -> None:
    sites = ["L0.resid_pre", "L1.resid_post", "L1.delta", "L0.attn_out", "ln_final"]
    full = run_residual_hf(tiny, ids, sites, positions=slice(4, 20))
    cache = DynamicCache(config=tiny.hf_model.config)
    parts = [run_residual_hf(tiny, chunk, sites, positions=slice(4, 20), past_key_values=cache)
             for chunk in ids.split(list(CHUNKS), dim=1)]
    assert torch.cat([p.positions for p in parts]).tolist() == list(range(4, 20))
    for site in sites:
        assert _max_diff(torch.cat([p[site] for p in parts]), full[site]) <= CHUNK_TOL


def _counting_sdpa(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    original = AttentionInterface._global_mapping["sdpa"]

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setitem(AttentionInterface._global_mapping, "sdpa", counting)
    return calls


@pytest.mark.parametrize("name", ["qwen2", "llama"])
def test_hf_fast_path_uses_sdpa_and_leaves_the_model_alone(
    name: str, models: dict[str, LoadedModel], ids, monkeypatch: pytest.MonkeyPatch
) -> None:
    loaded = models[name]
    with torch.no_grad():
        loaded.bridge(ids)
    before = _hook_state(loaded)
    types_before = [type(m) for m in loaded.hf_model.modules()]
    sdpa_calls = _counting_sdpa(monkeypatch)
    bridge_calls: list[int] = []
    with loaded.bridge.hooks(fwd_hooks=[("blocks.0.attn.hook_pattern",
                                         lambda t, hook: bridge_calls.append(1))]):
        run_residual_hf(loaded, ids, ["L1.delta"])
        with pytest.raises(IndexError):  # out-of-vocab id: raises inside the forward
            run_residual_hf(loaded, torch.full((1, 4), 10_000), ["L1.delta"])
    assert len(sdpa_calls) == loaded.arch.n_layers  # the failing call stops at the embedding
    assert bridge_calls == []  # the bridge's explicit attention never ran
    assert loaded.hf_model.config._attn_implementation == "eager"
    assert [type(m) for m in loaded.hf_model.modules()] == types_before
    assert _hook_state(loaded) == before


def test_hf_fast_path_on_a_plain_hf_model(models: dict[str, LoadedModel], ids) -> None:
    torch.manual_seed(0)  # the same weights build_tiny("qwen2") drew
    plain = AutoModelForCausalLM.from_config(CONFIGS["qwen2"](), attn_implementation="eager").eval()
    sites = ["L0.resid_post", "L1.delta", "ln_final"]
    got = run_residual_hf(plain, ids[0], sites)
    ref = run_residual_hf(models["qwen2"], ids, sites)
    for site in sites:
        assert torch.equal(got[site], ref[site])
    assert plain.config._attn_implementation == "eager"
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in plain.modules())


def test_hf_fast_path_batch_equals_each_row_alone(tiny: LoadedModel) -> None:
    """Right-padded rows of different lengths in one forward: every real token's activations
    equal those of its row run alone (fp32 rounding), with positions over the flattened batch."""
    lengths = [24, 9, 17]
    rows = [token_ids(n, seed=s)[0] for s, n in enumerate(lengths, start=3)]
    longest = max(lengths)
    batch = torch.stack([torch.cat([r, r[-1:].repeat(longest - len(r))]) for r in rows])
    sites = ["embed", "L0.resid_pre", "L1.resid_mid", "L0.delta", "L1.resid_post", "L0.attn_out",
             "L1.mlp_out", "ln_final"]
    keep = [(b, j) for b, n in enumerate(lengths) for j in range(n) if j % 2 == 0]
    flat = torch.tensor([b * longest + j for b, j in keep])
    got = run_residual_hf(tiny, batch, sites, positions=flat)
    assert torch.equal(got.positions, flat)
    for b, row in enumerate(rows):
        alone = run_residual_hf(tiny, row, sites, positions=slice(0, None, 2))
        mine = torch.tensor([i for i, (bb, _) in enumerate(keep) if bb == b])
        for site in sites:
            torch.testing.assert_close(got[site][mine], alone[site], rtol=1e-5, atol=1e-5)


def test_hf_fast_path_errors(models: dict[str, LoadedModel], ids) -> None:
    loaded = models["qwen2"]
    with pytest.raises(UnknownSiteError, match=r"\['L0.attn.q'\] need the bridge \(hooks.capt"):
        run_residual_hf(loaded, ids, ["L0.resid_post", "L0.attn.q"])
    with pytest.raises(CaptureError, match=r"\[batch, pos\] without a cache; got \(2, 24\) "
                                           r"with past_key_values"):
        run_residual_hf(loaded, ids.repeat(2, 1), ["L0.resid_post"],
                        past_key_values=DynamicCache(config=loaded.hf_model.config))
    with pytest.raises(UnknownSiteError, match=r"valid layers are 0\.\.1"):
        run_residual_hf(loaded, ids, sites_for(loaded.arch, "resid_post") + (HookSite(9, "delta"),))
