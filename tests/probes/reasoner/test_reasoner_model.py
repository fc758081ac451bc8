"""The shipped tiny-reasoner: checkpoint size, reproducible samples, deterministic training, answers."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from probes.measures.answers import answer_scores, without_trajectory
from probes.models.load import BUILTIN_MODELS, load_model
from probes.reasoner import train as train_mod
from probes.reasoner.task import generate_problems
from probes.traces.read import read_traces
from probes.traces.tokenize import tokenize_trace

CHECKPOINT = BUILTIN_MODELS["tiny-reasoner"]


@pytest.fixture(scope="module")
def reasoner():
    return load_model("tiny-reasoner", device="cpu")


def test_checkpoint_is_a_small_standard_hf_folder():
    files = {p.name for p in CHECKPOINT.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= files
    total = sum(p.stat().st_size for p in CHECKPOINT.iterdir())
    assert total <= 10 * 2**20
    config = json.loads((CHECKPOINT / "config.json").read_text())
    assert config["model_type"] == "qwen2"
    assert config["num_key_value_heads"] < config["num_attention_heads"]  # GQA
    assert config["hidden_act"] == "silu"  # SwiGLU


def test_architecture_record(reasoner):
    arch = reasoner.arch
    assert (arch.family, arch.norm, arch.positional, arch.mlp) == ("qwen2", "rmsnorm", "rope", "gated")
    assert arch.n_kv_heads == 2 and arch.n_heads == 4


def test_sample_traces_are_the_generators_output():
    shipped = read_traces(train_mod.SAMPLES_PATH, strict=True)
    regenerated = generate_problems(train_mod.N_SAMPLES, seed=train_mod.SAMPLE_SEED)
    assert len(shipped.traces) == 200
    assert [(t.id, t.question, t.trajectory, t.answer) for t in shipped.traces] == [
        (p.id, p.question, p.trajectory, p.answer) for p in regenerated
    ]


def test_answers_need_the_trajectory(reasoner):
    problems = generate_problems(40, seed=train_mod.EVAL_SEED)
    tokenized = [tokenize_trace(train_mod.problem_trace(p), reasoner.tokenizer) for p in problems]
    full = answer_scores(reasoner, tokenized)
    bare = answer_scores(reasoner, [without_trajectory(tt) for tt in tokenized])
    assert np.mean([s.correct for s in full]) >= 0.95
    assert np.mean([s.correct for s in bare]) <= 0.2
    assert np.mean([s.nll for s in full]) * 5 <= np.mean([s.nll for s in bare])


def test_teacher_forced_check_equals_real_greedy_decoding(reasoner):
    """`answer_scores(...).correct` is exactly 'greedy generation reproduces the answer'."""
    problems = generate_problems(12, seed=99)
    tok = reasoner.tokenizer
    for p in problems:
        for tt in (tokenize_trace(train_mod.problem_trace(p), tok),):
            for variant in (tt, without_trajectory(tt)):
                (score,) = answer_scores(reasoner, [variant])
                a, b = variant.spans["answer"]
                ctx = torch.as_tensor(variant.ids[:a])[None]
                out = reasoner.hf_model.generate(
                    ctx, max_new_tokens=b - a, do_sample=False, pad_token_id=tok.pad_token_id
                )
                greedy = out[0, a:].tolist()
                assert score.correct == (greedy == variant.ids[a:b].tolist())


def test_without_trajectory_keeps_other_spans(reasoner):
    p = generate_problems(1, seed=5)[0]
    tt = tokenize_trace(train_mod.problem_trace(p), reasoner.tokenizer)
    bare = without_trajectory(tt)
    assert bare.spans["trajectory"][0] == bare.spans["trajectory"][1] == tt.spans["prompt"][1]
    for name in ("prompt", "scaffold", "answer"):
        assert bare.ids[bare.span(name)].tolist() == tt.ids[tt.span(name)].tolist()
    assert bare.n_tokens == tt.n_tokens - (tt.spans["trajectory"][1] - tt.spans["trajectory"][0])


def test_training_is_deterministic(tmp_path):
    cfg = train_mod.TrainConfig(
        n_train=64, vocab_size=300, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, d_mlp=64,
        steps=3, batch_size=4, warmup=1, threads=1,
    )
    a = train_mod.train(cfg, tmp_path / "a", log=lambda _line: None)
    b = train_mod.train(cfg, tmp_path / "b", log=lambda _line: None)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert (a / "tokenizer.json").read_text() == (b / "tokenizer.json").read_text()
    loaded = load_model(str(a), device="cpu")
    assert loaded.arch.n_layers == 1 and loaded.arch.d_model == 32


def test_builtin_bridge_matches_hf_and_kv_cache_parity(reasoner):
    """The built-in Qwen2 through the bridge: logits equal HF's, prefix + suffix via the KV cache
    equal the full sequence (guards against the transformers >= 5.24 cache bug)."""
    from probes.models.kv import kv_parity

    p = generate_problems(1, seed=21)[0]
    tt = tokenize_trace(train_mod.problem_trace(p), reasoner.tokenizer)
    ids = torch.as_tensor(tt.ids)[None]
    from transformers import AutoModelForCausalLM

    fresh = AutoModelForCausalLM.from_pretrained(CHECKPOINT, attn_implementation="eager").eval()
    with torch.inference_mode():
        bridge_logits = reasoner.bridge(ids, return_type="logits")
        hf_logits = fresh(ids).logits  # a plain HF model, not the one the bridge wraps
    assert torch.equal(bridge_logits, hf_logits)
    assert kv_parity(reasoner, ids, split=tt.spans["trajectory"][0] + 20) <= 1e-4
