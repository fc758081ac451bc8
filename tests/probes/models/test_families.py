"""The reasoning-model families beyond Qwen2 / Llama / Qwen3: loading, KV parity, L̂ exactness, the
weight views, and one-line refusals where a measurement still needs the Llama layout.

Mistral, Gemma-2 (soft-capping, a sliding-window layer), Gemma-3, Phi-3 (fused projections), OLMo-2
(norms after the sublayers) and GPT-2 (Conv1D, LayerNorm): tiny random-init configs from
`probes.models.tiny.tiny_config`, saved with `save_pretrained` and read back through
`probes.models.load_model` (as a user's folder would be). The M5 identities on these families are
in tests/probes/measures/test_mlp.py. No files outside tmp, no network.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from hooks import capture
from hooks.errors import UnsupportedModelError
from hooks.model import LoadedModel
from hooks.weights import FAMILIES, LLAMA_FAMILIES, layer_views, llama_layers
from probes.errors import ProbesError
from probes.measures.lhat.fast import lhat_fast, lhat_naive
from probes.models.kv import kv_parity
from probes.models.load import boot_model, load_model
from probes.models.tiny import MORE_FAMILIES, byte_tokenizer, tiny_config
from probes.traces.read import Trace
from probes.traces.tokenize import SPAN_NAMES, TokenizedTrace

SEQ_LEN, SPLIT = 24, 15
MODEL_TYPE = {"gemma3": "gemma3_text"}


@pytest.fixture(scope="module", autouse=True)
def _single_thread() -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@dataclass
class Saved:
    family: str
    folder: Path
    loaded: LoadedModel


def _randomise(hf: torch.nn.Module) -> None:
    """Non-trivial norm weights and biases (Gemma's γ starts at 0, GPT-2's biases at 0)."""
    gemma = hf.config.model_type.startswith("gemma")
    with torch.no_grad():
        for name, param in hf.named_parameters():
            if "norm" in name or ".ln_" in name:
                param.normal_(0.0 if gemma or name.endswith("bias") else 1.0, 0.3)
            elif name.endswith("bias"):
                param.normal_(0.0, 0.2)


@pytest.fixture(scope="module", params=MORE_FAMILIES)
def saved(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Saved:
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(tiny_config(request.param), attn_implementation="eager")
    _randomise(hf)
    folder = tmp_path_factory.mktemp(f"tiny-{request.param}")
    hf.save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return Saved(request.param, folder, load_model(str(folder), device="cpu"))


def _ids(n: int = SEQ_LEN, batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randint(1, 257, (batch, n), generator=torch.Generator().manual_seed(seed))


def test_loads_and_bridge_equals_hf_eager(saved: Saved) -> None:
    arch = saved.loaded.arch
    assert arch.family == MODEL_TYPE.get(saved.family, saved.family)
    assert (arch.n_layers, arch.d_model, arch.vocab_size) == (2, 32, 300)
    assert arch.norm == ("layernorm" if saved.family == "gpt2" else "rmsnorm")
    assert arch.positional == ("learned" if saved.family == "gpt2" else "rope")
    assert arch.mlp == ("plain" if saved.family == "gpt2" else "gated")
    assert arch.norm_layout == {"gemma2": "sandwich", "gemma3": "sandwich",
                                "olmo2": "post"}.get(saved.family, "pre")
    assert (arch.attn_softcap, arch.final_softcap) == (
        (3.0, 5.0) if saved.family == "gemma2" else (None, None))
    ref = AutoModelForCausalLM.from_pretrained(saved.folder, local_files_only=True,
                                               attn_implementation="eager").eval()
    ids = _ids()
    with torch.no_grad():
        got = saved.loaded.bridge(ids, return_type="logits")
        want = ref(ids).logits
    assert float((got - want).abs().max()) <= 1e-5    # measured 0 to 2e-6 (GPT-2)


def test_boot_in_memory_config_without_architectures() -> None:
    """A config built in code has no `architectures`; TransformerLens needs it for Gemma-3 and
    OLMo-2 (it refused them before `boot_model` filled it in)."""
    for family in ("gemma3", "olmo2"):
        torch.manual_seed(0)
        config = tiny_config(family)
        assert not getattr(config, "architectures", None)
        hf = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
        loaded = boot_model(hf, byte_tokenizer(), spec=f"tiny-{family}", device="cpu")
        assert loaded.hf_model.config.architectures == [type(hf).__name__]


def test_kv_parity(saved: Saved) -> None:
    """Prefix through the KV cache + suffix = the full sequence (Gemma: across its window)."""
    assert kv_parity(saved.loaded, _ids(), SPLIT) <= 1e-4


def _trace(lengths: tuple[int, int, int, int], seed: int) -> TokenizedTrace:
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, 257, size=sum(lengths)).astype(np.int64)
    spans, start = {}, 0
    for name, n in zip(SPAN_NAMES, lengths):
        spans[name] = (start, start + n)
        start += n
    return TokenizedTrace(trace=Trace(f"synthetic-{seed}", "q", "t", "a", {}, 1), ids=ids,
                          spans=spans, trajectory_offsets=np.zeros((lengths[1], 2), dtype=np.int64),
                          trajectory_text="", prompt_text="")


def _global_gemma(saved: Saved) -> LoadedModel:
    """The same Gemma with every layer global (soft-capping, 1 + γ norms, scaled embeddings kept)."""
    config = tiny_config(saved.family)
    config.layer_types = ["full_attention"] * config.num_hidden_layers
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    _randomise(hf)
    return boot_model(hf, byte_tokenizer(), spec=f"tiny-{saved.family}-global", device="cpu")


def test_lhat_fast_equals_naive(saved: Saved) -> None:
    """The packed-suffix L̂ (custom 4D masks, explicit positions) = one forward per prefix.

    `lhat_fast` refuses a sliding-window cache in one line (Gemma-2/3's local layers: its packed
    masks do not encode the window); those run with every layer global here, and the refusal is
    checked on the real layout."""
    tt = _trace((4, 30, 3, 2), seed=3)
    loaded = saved.loaded
    if saved.family.startswith("gemma"):
        with pytest.raises(ProbesError, match=r"^lhat_fast needs a plain full-attention "
                                              r"DynamicCache.*Use lhat_naive for this model\.$"):
            lhat_fast(loaded, tt, chunk_size=7, max_pack_tokens=12)
        loaded = _global_gemma(saved)
    naive = lhat_naive(loaded, tt)
    fast = lhat_fast(loaded, tt, chunk_size=7, max_pack_tokens=12)
    assert np.ptp(naive) > 0.05
    err = np.abs(fast.lhat.astype(np.float64) - naive)
    assert err.max() <= 1e-4, f"max |fast - naive| = {err.max():.3g} at t={err.argmax()}"


def test_views_reproduce_the_model(saved: Saved) -> None:
    """Each view's q/k/v (slices of Phi-3's qkv_proj, transposes of GPT-2's Conv1D), attention
    scale and soft-cap, norms and MLP matrices recompute the bridge's own activations."""
    loaded = saved.loaded
    views = layer_views(loaded, what="test")
    rope = loaded.arch.positional == "rope"
    # TL 4.3's joint-QKV bridge (Phi-3) declares hook_rot_q/rot_k but never fires them: its
    # scores are checked through the pre-RoPE q/k below only (M1–M4 need rot_q/rot_k: see
    # test_updates_command_refuses_other_layouts_in_one_line).
    rot = rope and saved.family != "phi3"
    qk = ("attn.rot_q", "attn.rot_k") if rot else ("attn.q", "attn.k")
    sites = [f"L{l}.{c}" for l in range(2) for c in dict.fromkeys((
        "resid_pre", "resid_mid", "attn.v", "attn.q", "attn.k", "attn.scores", "attn.z",
        "attn_out", "mlp.pre", "mlp.post", "mlp_out", *qk))]
    ids = _ids(batch=1)
    with torch.no_grad(), capture(loaded, sites, positions=slice(0, SEQ_LEN),
                                  dtype="float32") as st:
        loaded.bridge(ids)
    for l, v in enumerate(views):
        x, m = st[f"L{l}.resid_pre"], st[f"L{l}.resid_mid"]
        h = x if v.attn_in_norm is None else v.attn_in_norm.apply(x)
        val = h @ v.w_v.T + (0 if v.b_v is None else v.b_v)
        torch.testing.assert_close(val.reshape(SEQ_LEN, -1, loaded.arch.d_head),
                                   st[f"L{l}.attn.v"], rtol=1e-5, atol=1e-5)
        if not v.qk_norm:   # hook_q / hook_k are the projections (before RoPE)
            for w, b, site in ((v.w_q, v.b_q, "attn.q"), (v.w_k, v.b_k, "attn.k")):
                qk_proj = h @ w.T + (0 if b is None else b)
                torch.testing.assert_close(qk_proj.reshape(SEQ_LEN, -1, loaded.arch.d_head),
                                           st[f"L{l}.{site}"], rtol=1e-5, atol=1e-5)
        if rope and not rot:
            continue
        q, k = st[f"L{l}.{qk[0]}"], st[f"L{l}.{qk[1]}"]                    # [N, H(_kv), d_h]
        k = k.repeat_interleave(loaded.arch.gqa_group, dim=1)
        raw = torch.einsum("qhe,khe->hqk", q, k) * v.attn_scale
        s = raw if v.attn_softcap is None else torch.tanh(raw / v.attn_softcap) * v.attn_softcap
        scores = st[f"L{l}.attn.scores"]
        seen = scores > torch.finfo(torch.float32).min / 2                   # causal / window
        torch.testing.assert_close(s[seen], scores[seen], rtol=1e-4, atol=1e-4)
        if v.attn_softcap is not None:                                       # the cap matters
            assert float((raw[seen] - scores[seen]).abs().max()) > 1e-2
        a = st[f"L{l}.attn.z"].reshape(SEQ_LEN, -1) @ v.w_o.T + (0 if v.b_o is None else v.b_o)
        a = a if v.attn_out_norm is None else v.attn_out_norm.apply(a)
        torch.testing.assert_close(a, st[f"L{l}.attn_out"], rtol=1e-5, atol=1e-5)
        u = m if v.mlp_in_norm is None else v.mlp_in_norm.apply(m)
        first = "gate" if v.gated else "in"
        b = v.mlp_in_bias[first]
        torch.testing.assert_close(u @ v.mlp_in[first].T + (0 if b is None else b),
                                   st[f"L{l}.mlp.pre"], rtol=1e-5, atol=1e-5)
        out = st[f"L{l}.mlp.post"] @ v.w_down.T + (0 if v.b_down is None else v.b_down)
        out = out if v.mlp_out_norm is None else v.mlp_out_norm.apply(out)
        torch.testing.assert_close(out, st[f"L{l}.mlp_out"], rtol=1e-5, atol=1e-5)


def test_views_share_storage_with_the_model(saved: Saved) -> None:
    """An in-place edit of a view edits the model (fused slices and transposes included)."""
    view = layer_views(saved.loaded, what="test")[0]
    first = next(iter(view.mlp_in))
    for w in (view.w_q, view.w_v, view.mlp_in[first], view.w_down):
        params = {p.data_ptr() for p in saved.loaded.hf_model.parameters()}
        base = w._base if w._base is not None else w
        assert base.data_ptr() in params


def test_llama_layout_check_refuses_by_name(saved: Saved) -> None:
    """Measurements that hook the Llama modules by name refuse every other layout in one line
    naming what is missing (Gemma and OLMo-2 have the names but not the computation)."""
    family = saved.loaded.arch.family
    if family in LLAMA_FAMILIES:
        assert len(llama_layers(saved.loaded, what="test")) == 2
        return
    missing = {"phi3": "separate q/k/v and gate/up projections", "gemma2": "the Llama norm layout",
               "gemma3_text": "the Llama norm layout", "olmo2": "RMSNorm before attention and MLP",
               "gpt2": "RoPE, RMSNorm and a gated MLP"}[family]
    with pytest.raises(UnsupportedModelError) as err:
        llama_layers(saved.loaded, what="updates")
    message = str(err.value)
    assert message.startswith("updates needs a Llama-style model") and missing in message
    assert "\n" not in message


def test_updates_command_refuses_other_layouts_in_one_line(saved: Saved) -> None:
    """`updates` (M1–M7 in one pass) runs on the families of `UPDATE_FAMILIES`; other families are
    refused before any work, in one line naming the family and what it lacks."""
    from probes.measures.updates.attention import UpdatesError
    from probes.measures.updates.families import UPDATE_FAMILIES
    from probes.measures.updates.shared_pass import check_updates

    if saved.loaded.arch.family in UPDATE_FAMILIES:
        check_updates(saved.loaded)
        return
    with pytest.raises(UpdatesError, match=r"^updates does not measure .* models yet: it needs "
                                           r"") as err:
        check_updates(saved.loaded)
    assert "\n" not in str(err.value) and repr(saved.loaded.arch.family) in str(err.value)


def test_unknown_family_is_refused_by_name() -> None:
    from transformers import GPTNeoXConfig

    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(GPTNeoXConfig(
        vocab_size=300, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=64))
    with pytest.raises(UnsupportedModelError,
                       match=r"^test has no weight view for model_type 'gpt_neox'; supported: "):
        layer_views(hf, what="test")
    assert set(MORE_FAMILIES) - {"gemma3"} <= set(FAMILIES)
