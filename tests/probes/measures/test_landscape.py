"""Identity tests for `probes.measures.landscape.plane` / `landscape_path` (docs/methods.md#landscape).

Seeded random-init Qwen2 / Llama / Qwen3 models (2 layers, GQA, random biases and RMSNorm γ) with
the byte tokenizer: the batched plane evaluator against one HF forward per point with the weights
really moved; the grid origin against the no-trajectory NLL; the path's end point against the
full-context NLL (V5b machinery); rank-1 projections and Grams against materialised matrices.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config

from hooks.model import LoadedModel
from hooks.weights import llama_layers
from probes.measures.answers import answer_scores, without_trajectory
from probes.measures.landscape.path import (
    endpoint_row_patches,
    implicit_path,
    materialised_path,
    path_gram,
    path_nll,
    path_plane,
    plane_coords,
    project,
)
from probes.measures.landscape.plane import (
    LandscapeError,
    PlaneModel,
    grid_axis,
    inner,
    plane_params,
    random_directions,
)
from probes.measures.updates.mlp_patch import masked_patched_logits
from probes.models.load import boot_model
from probes.models.tiny import TINY_FAMILIES, byte_tokenizer, tiny_config
from probes.traces.read import Trace
from probes.traces.tokenize import tokenize_trace

TOL = 1e-4


def _build(family: str, seed: int = 0) -> LoadedModel:
    torch.manual_seed(seed)
    hf = AutoModelForCausalLM.from_config(tiny_config(family), attn_implementation="eager")
    with torch.no_grad():
        for name, param in hf.named_parameters():
            if name.endswith("proj.bias"):
                param.normal_(0.0, 0.2)
            elif name.endswith("norm.weight"):
                param.normal_(1.0, 0.3)
    return boot_model(hf, byte_tokenizer(), spec=f"tiny-landscape-{family}", device="cpu",
                      dtype="float32")


def _trace(tok) -> object:
    tr = Trace(id="t0", question="2+3?", trajectory="add: 2+3=5. wait, check 5.", answer="5",
               meta={}, line_no=1)
    return tokenize_trace(tr, tok, prompt_format="Q: {question}\nA:")


@pytest.fixture(scope="module", params=TINY_FAMILIES)
def setup(request):
    loaded = _build(request.param)
    tt = _trace(loaded.tokenizer)
    return loaded, tt, implicit_path(loaded, tt)


def _nll_from_logits(logits: torch.Tensor, tt, rows: list[int]) -> float:
    a, b = tt.spans["answer"]
    idx = [rows.index(r) for r in range(a - 1, b - 1)]
    logp = torch.log_softmax(logits[idx].double(), -1)
    target = torch.as_tensor(tt.ids[a:b])
    return float(-logp.gather(-1, target[:, None]).mean())


def test_origin_is_the_no_trajectory_nll(setup):
    loaded, tt, path = setup
    shifted = PlaneModel(loaded, tt, positions="shifted")
    d1, d2 = random_directions(shifted.params, 0)
    ref = answer_scores(loaded, [without_trajectory(tt)])[0].nll
    assert abs(shifted.grid(grid_axis(3, 1.0), grid_axis(3, 1.0), d1, d2)[1, 1] - ref) <= 1e-5
    assert shifted.check_origin(loaded) <= 1e-5
    kept = PlaneModel(loaded, tt, positions="kept")
    assert kept.check_origin(loaded) <= 1e-5
    masked, _ = masked_patched_logits(loaded, torch.as_tensor(tt.ids), range(*tt.spans["trajectory"]),
                                      path.rows, patch=False)
    assert abs(kept.nll(np.zeros((1, 2)), d1, d2)[0] - _nll_from_logits(masked, tt, path.rows)) <= 1e-5


@pytest.mark.parametrize("style", ["raml", "filter"])
def test_batched_grid_equals_one_forward_per_point(setup, style):
    loaded, tt, _ = setup
    pm = PlaneModel(loaded, tt, positions="shifted")
    d1, d2 = random_directions(pm.params, 3, style)
    pts = np.array([[0.3, -0.2], [-0.5, 0.1], [0.05, 0.4]])
    fast = pm.nll(pts, d1, d2, batch=2)
    names = _hf_names(loaded)
    original = {n: t.detach().clone() for n, t in names.items()}
    try:
        for (x, y), got in zip(pts, fast):
            with torch.no_grad():
                for n, t in names.items():
                    t.copy_(original[n] + x * d1[n] + y * d2[n])
            ref = answer_scores(loaded, [without_trajectory(tt)])[0].nll
            assert abs(got - ref) <= TOL * max(1.0, abs(ref)), (x, y, got, ref)
    finally:
        with torch.no_grad():
            for n, t in names.items():
                t.copy_(original[n])


def _hf_names(loaded) -> dict[str, torch.Tensor]:
    """Canonical plane names → the live HF parameters (the slow reference moves these)."""
    out = {}
    for l, view in enumerate(llama_layers(loaded, what="test")):
        mods = {r: getattr(view, r) for r in ("attn_norm", "q_proj", "k_proj", "v_proj", "o_proj",
                                               "mlp_norm", "gate_proj", "up_proj", "down_proj")}
        for extra in ("q_norm", "k_norm"):
            if getattr(view.module.self_attn, extra, None) is not None:
                mods[extra] = getattr(view.module.self_attn, extra)
        for role, mod in mods.items():
            for kind in ("weight", "bias"):
                if getattr(mod, kind, None) is not None:
                    out[f"L{l}.{role}.{kind}"] = getattr(mod, kind)
    out["final_norm.weight"] = loaded.hf_model.model.norm.weight
    return out


def test_path_end_point_is_the_full_context_nll(setup):
    loaded, tt, path = setup
    full = answer_scores(loaded, [tt])[0].nll
    pm = PlaneModel(loaded, tt, positions="kept")
    rows = pm.remap_rows(path.rows)
    zero = np.zeros((1, 2))
    end = float(pm.forward_nll(zero, row_patches=endpoint_row_patches(path, rows))[0])
    start = float(pm.forward_nll(zero, row_patches=endpoint_row_patches(path, rows, index=0))[0])
    base = float(pm.nll(np.zeros((1, 2)), None, None)[0])
    assert abs(end - full) <= TOL
    assert abs(start - base) <= 1e-5
    assert abs(base - full) > 10 * TOL                  # the identity is not trivially satisfied
    along = path_nll(pm, path, batch=3)
    assert along[0] == pytest.approx(base, abs=1e-5) and abs(along[-1] - full) <= TOL
    mid = path.n_points // 2
    one = float(pm.forward_nll(zero, row_patches=endpoint_row_patches(path, rows, index=mid))[0])
    assert along[mid] == pytest.approx(one, abs=1e-5)
    v5b, _ = masked_patched_logits(loaded, torch.as_tensor(tt.ids), range(*tt.spans["trajectory"]),
                                   path.rows)
    assert abs(_nll_from_logits(v5b, tt, path.rows) - full) <= TOL


def test_rank1_projection_and_gram_equal_materialised(setup):
    loaded, tt, path = setup
    params = plane_params(loaded)
    mats = materialised_path(path)
    K, per_row = path_gram(path)
    dense_K = np.array([[inner(a, b) for b in mats] for a in mats])
    np.testing.assert_allclose(K, dense_K, rtol=1e-9, atol=1e-12 * np.abs(dense_K).max())
    assert np.all(np.abs(K[0]) <= 1e-12) and per_row[0] <= 1e-20      # index 0: no trajectory
    for style in ("raml", "filter"):
        d1, d2 = random_directions(params, 1, style)
        dense = np.array([inner(m, d1) for m in mats])
        np.testing.assert_allclose(project(path, d1), dense, rtol=1e-9,
                                   atol=1e-12 * np.abs(dense).max())
        coords, captured = plane_coords(path, d1, d2, K)
        g = np.array([[inner(d1, d1), inner(d1, d2)], [inner(d2, d1), inner(d2, d2)]])
        c = np.array([[inner(m, d1), inner(m, d2)] for m in mats])
        np.testing.assert_allclose(coords, np.linalg.solve(g, c.T).T, rtol=1e-8, atol=1e-14)
        assert 0.0 <= captured < 0.05                    # random planes miss the path


def test_path_plane_is_the_top2_pca_of_the_path(setup):
    _, _, path = setup
    mats = materialised_path(path)
    pp = path_plane(path, dtype=torch.float64)
    p1, p2 = pp.directions
    assert abs(inner(p1, p1) - 1) < 1e-9 and abs(inner(p2, p2) - 1) < 1e-9
    assert abs(inner(p1, p2)) < 1e-9
    coords = np.array([[inner(m, p1), inner(m, p2)] for m in mats])
    np.testing.assert_allclose(pp.coords, coords, rtol=1e-7, atol=1e-10)
    total = sum(inner(m, m) for m in mats)
    assert pp.captured == pytest.approx((coords**2).sum() / total, rel=1e-8)
    flat = np.stack([np.concatenate([m[k].reshape(-1).numpy() for k in sorted(m)]) for m in mats])
    s = np.linalg.svd(flat, compute_uv=False)
    assert pp.captured == pytest.approx((s[0]**2 + s[1]**2) / (s**2).sum(), rel=1e-8)
    assert 0 < pp.shared_fraction <= 1 + 1e-12


def test_directions_are_seeded_and_normalised(setup):
    loaded, _, _ = setup
    params = plane_params(loaded)
    assert not any("embed" in n or "lm_head" in n for n in params)
    a1, _ = random_directions(params, 7, "raml")
    b1, _ = random_directions(params, 7, "raml")
    c1, _ = random_directions(params, 8, "raml")
    assert all(torch.equal(a1[n], b1[n]) for n in params)
    assert not torch.equal(a1["L0.q_proj.weight"], c1["L0.q_proj.weight"])
    for n, p in params.items():
        assert float(a1[n].norm()) == pytest.approx(float(p.norm()), rel=1e-5)
    f1, f2 = random_directions(params, 7, "filter")
    for n, p in params.items():
        if p.dim() == 1:
            assert not f1[n].any() and not f2[n].any()
        else:
            np.testing.assert_allclose(f1[n].norm(dim=1).numpy(), p.norm(dim=1).numpy(), rtol=1e-5)


def test_origin_guard_refuses_a_forward_that_does_not_match(setup):
    loaded, tt, _ = setup
    pm = PlaneModel(loaded, tt)
    pm.params["final_norm.weight"] = pm.params["final_norm.weight"] * 3.0   # a wrong "architecture"
    with pytest.raises(LandscapeError, match="differs from .* own forward"):
        pm.check_origin(loaded)


def test_errors_are_clear():
    with pytest.raises(LandscapeError, match="unknown direction style 'li'"):
        random_directions({"a": torch.ones(2)}, 0, "li")
    with pytest.raises(LandscapeError, match="at least 2 points"):
        grid_axis(1, 1.0)
    gpt2 = GPT2Config(vocab_size=300, n_embd=32, n_layer=1, n_head=2, n_positions=64)
    loaded = boot_model(AutoModelForCausalLM.from_config(gpt2), byte_tokenizer(), spec="gpt2-tiny",
                        device="cpu", dtype="float32")
    with pytest.raises(LandscapeError, match="landscape needs a Llama-style model"):
        plane_params(loaded)
