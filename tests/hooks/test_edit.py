"""Scoped write hooks (`hooks.edit`) and the Llama-style weight view (`hooks.weights`)."""

import pytest
import torch

from hooks.edit import edit, hook_name, mask_keys, module_hooks
from hooks.errors import HooksError, UnsupportedModelError
from hooks.weights import llama_layers
from tests.hooks._models import build_tiny, token_ids


@pytest.fixture(scope="module")
def qwen2():
    return build_tiny("qwen2")


def test_hook_names_come_from_the_site_table():
    assert hook_name("L3.mlp.pre") == "blocks.3.mlp.hook_pre"
    assert hook_name("L0.attn.scores") == "blocks.0.attn.hook_attn_scores"
    assert hook_name("L1.mlp_out") == "blocks.1.hook_mlp_out"
    with pytest.raises(HooksError, match="delta is derived"):
        hook_name("L0.delta")


def test_edit_applies_inside_the_block_only(qwen2):
    ids = token_ids(12)
    with torch.no_grad():
        clean = qwen2.bridge(ids)
        with edit(qwen2, [("L0.mlp_out", lambda act, hook: torch.zeros_like(act))]):
            ablated = qwen2.bridge(ids)
        again = qwen2.bridge(ids)
    assert not torch.allclose(clean, ablated)
    assert torch.equal(clean, again)  # removed on exit


def test_edit_refuses_a_site_the_bridge_lacks(qwen2):
    with pytest.raises(HooksError, match="no hook"), edit(qwen2, [("L0.attn.q_normed", lambda a, h: a)]):
        pass


def test_mask_keys_equals_dropping_the_keys_from_the_softmax(qwen2):
    ids = token_ids(10)
    rows, keys = [9], [2, 3, 4]
    seen = {}

    def keep(pattern, hook):
        seen["p"] = pattern.detach().clone()

    with torch.no_grad(), edit(qwen2, [("L0.attn.scores", mask_keys(rows, keys, "cpu")),
                                       ("L0.attn.pattern", keep)]):
        qwen2.bridge(ids)
    p = seen["p"][0]                                  # [head, query, key]
    assert torch.all(p[:, 9, keys] == 0)
    torch.testing.assert_close(p[:, 9].sum(-1), torch.ones(p.shape[0]))
    assert torch.all(p[:, 8, 2:5] > 0)               # other rows untouched


def test_module_hooks_are_removed_even_after_an_error(qwen2):
    layer = qwen2.hf_model.model.layers[0].mlp
    calls = []
    with pytest.raises(RuntimeError, match="stop"), \
            module_hooks([(layer, "forward", lambda m, a, o: calls.append(1))]):
        qwen2.hf_model(token_ids(4))
        raise RuntimeError("stop")
    qwen2.hf_model(token_ids(4))
    assert calls == [1]
    assert not layer._forward_hooks


def test_llama_layers_is_the_one_check():
    views = llama_layers(build_tiny("llama"), what="test")
    assert len(views) == 2 and views[0].gate_proj.weight.ndim == 2 and views[0].norm_eps > 0
    gpt2 = build_tiny("gpt2")
    with pytest.raises(UnsupportedModelError, match="test needs a Llama-style model"):
        llama_layers(gpt2, what="test", require_rope=True)
    with pytest.raises(ValueError, match="'GPT2LMHeadModel' does not have them"):
        llama_layers(gpt2.hf_model, what="test", error=ValueError)
