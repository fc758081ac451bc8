"""Generation backends: greedy HF batches equal a token-by-token argmax loop, per-request seeds,
the sampler's distribution, prompts with and without thinking, the vLLM refusal."""

from __future__ import annotations

import copy

import pytest
import torch

from probes.errors import ProbesError
from probes.models import generate as gen
from probes.models.generate import (
    EMPTY_THINK,
    HFGenerator,
    Request,
    Sampling,
    SeededSampler,
    build_prompt,
    finish,
    prompt_ids,
    sample_seed,
    split_trajectory,
)
from probes.models.load import load_model
from probes.reasoner.task import generate_problems
from probes.traces.read import Trace
from probes.traces.tokenize import tokenize_trace


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny-reasoner", device="cpu")


def _requests(tokenizer, questions, *, seed=0, thinking=True):
    out = []
    for i, q in enumerate(questions):
        ids = prompt_ids(build_prompt(q, tokenizer, thinking=thinking).text, tokenizer)
        out.append(Request(f"q{i}", ids, sample_seed(seed, f"q{i}")))
    return out


@torch.inference_mode()
def _argmax_loop(hf_model, prompt: tuple[int, ...], max_new_tokens: int, stops) -> tuple[int, ...]:
    """The reference: one full forward per new token (no cache, no padding), argmax, stop."""
    ids = list(prompt)
    new: list[int] = []
    for _ in range(max_new_tokens):
        token = int(hf_model(torch.tensor([ids])).logits[0, -1].argmax())
        ids.append(token)
        new.append(token)
        if token in stops:
            break
    return tuple(new)


def test_greedy_batches_equal_an_argmax_loop(tiny, monkeypatch):
    for name, value in (("do_sample", True), ("temperature", 0.6), ("top_k", 5), ("repetition_penalty", 1.5)):
        monkeypatch.setattr(tiny.hf_model.generation_config, name, value)  # a model's own settings: unused
    questions = [p.question for p in generate_problems(3, seed=21)] + ["What is 10 + 2?"]
    requests = _requests(tiny.tokenizer, questions)
    assert len({len(r.prompt_ids) for r in requests}) > 1  # left padding is exercised
    generator = HFGenerator(tiny)
    completions = generator.generate(requests, Sampling(temperature=0, top_p=1, max_new_tokens=200, seed=0))
    for request, completion in zip(requests, completions):
        assert completion.token_ids == _argmax_loop(tiny.hf_model, request.prompt_ids, 200, generator.stops)
        assert completion.finish_reason == "stop"
    # truncation: a limit below the trajectory length ends with finish_reason "length"
    short = generator.generate(requests[:2], Sampling(temperature=0, top_p=1, max_new_tokens=7, seed=0))
    assert [c.finish_reason for c in short] == ["length", "length"]
    assert [c.token_ids for c in short] == [c.token_ids[:7] for c in completions[:2]]


def test_greedy_parity_on_a_real_llama_with_bos(stories260k_dir):
    loaded = load_model(str(stories260k_dir), device="cpu")
    requests = _requests(loaded.tokenizer, ["Once upon a time", "The cat sat on the mat and"])
    assert all(r.prompt_ids[0] == loaded.tokenizer.bos_token_id for r in requests)
    generator = HFGenerator(loaded)
    completions = generator.generate(requests, Sampling(temperature=0, top_p=1, max_new_tokens=30, seed=0))
    for request, completion in zip(requests, completions):
        assert completion.token_ids == _argmax_loop(loaded.hf_model, request.prompt_ids, 30, generator.stops)


def test_samples_depend_on_their_own_seed_only(tiny):
    questions = [p.question for p in generate_problems(3, seed=22)]
    requests = _requests(tiny.tokenizer, questions)
    sampling = Sampling(temperature=1.0, top_p=0.95, max_new_tokens=60, seed=0)
    generator = HFGenerator(tiny)
    batch = generator.generate(requests, sampling)
    assert generator.generate(requests, sampling) == batch                      # reproducible
    alone = [generator.generate([r], sampling)[0] for r in requests[::-1]][::-1]
    assert alone == batch                                                         # any batching
    reseeded = _requests(tiny.tokenizer, questions, seed=1)
    assert generator.generate(reseeded, sampling) != batch                        # seeds matter
    assert sample_seed(0, "a-s1") != sample_seed(0, "a-s2") != sample_seed(1, "a-s1")


def test_seeded_sampler_draws_from_the_nucleus():
    scores = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(4000, 1)
    seeds = range(4000)
    full = SeededSampler(seeds, temperature=1.0, top_p=1.0, device=torch.device("cpu"))(None, scores)
    drawn = full.argmax(-1)
    assert torch.isinf(full).sum() == 3 * 4000                                   # one token per row
    freq = torch.bincount(drawn, minlength=4).float() / 4000
    assert torch.allclose(freq, torch.tensor([0.5, 0.3, 0.15, 0.05]), atol=0.03)
    nucleus = SeededSampler(seeds, temperature=1.0, top_p=0.7, device=torch.device("cpu"))(None, scores)
    freq = torch.bincount(nucleus.argmax(-1), minlength=4).float() / 4000
    assert freq[2:].sum() == 0 and torch.allclose(freq[:2], torch.tensor([0.625, 0.375]), atol=0.03)
    cold = SeededSampler(seeds, temperature=0.05, top_p=1.0, device=torch.device("cpu"))(None, scores)
    assert (cold.argmax(-1) == 0).float().mean() > 0.99


def test_prompts_with_and_without_thinking(tiny, qwen_tokenizer, qwen_tokenizer_dir):
    # tiny-reasoner: a chat template without a thinking switch -> an empty think block
    on, off = (build_prompt("Q?", tiny.tokenizer, thinking=t) for t in (True, False))
    assert on.trajectory_prefix == "" and off.text == on.text + EMPTY_THINK
    assert off.trajectory_prefix == EMPTY_THINK
    # Qwen3: the template's own switch
    on, off = (build_prompt("Q?", qwen_tokenizer, thinking=t) for t in (True, False))
    assert off.text.startswith(on.text) and off.trajectory_prefix == off.text[len(on.text):]
    assert "</think>" in off.trajectory_prefix and "</think>" not in on.text
    # DeepSeek-R1-Distill: the prompt opens <think> itself, the trajectory repeats it (as real traces)
    r1 = copy.copy(qwen_tokenizer)
    r1.chat_template = (qwen_tokenizer_dir / "deepseek-ai-DeepSeek-R1-Distill-Qwen-32B.jinja").read_text()
    on, off = (build_prompt("Q?", r1, thinking=t) for t in (True, False))
    assert on.text.endswith("<think>\n") and on.trajectory_prefix == "<think>\n"
    assert off.text == on.text + "\n</think>\n\n" and off.trajectory_prefix == "<think>\n\n</think>\n\n"


@pytest.mark.parametrize("thinking", [True, False])
def test_a_record_recreates_the_generation_context(tiny, thinking):
    """Default prompt + trajectory + response, tokenized as `lhat` does, gives back the prompt the
    model saw and the tokens it generated."""
    problem = generate_problems(1, seed=23)[0]
    (request,) = _requests(tiny.tokenizer, [problem.question], thinking=thinking)
    generator = HFGenerator(tiny)
    greedy = Sampling(temperature=0, top_p=1, max_new_tokens=200, seed=0)
    (completion,) = generator.generate([request], greedy)
    prompt = build_prompt(problem.question, tiny.tokenizer, thinking=thinking)
    trajectory, response = split_trajectory(prompt.trajectory_prefix + completion.text)
    trace = Trace("t", problem.question, trajectory + response, "0", {}, 1)
    tt = tokenize_trace(trace, tiny.tokenizer, scaffold="")
    context = tt.ids[: tt.spans["trajectory"][1]].tolist()
    assert context == list(request.prompt_ids) + list(completion.token_ids[:-1])


def test_split_and_finish(tiny):
    assert split_trajectory("<think>a</think> b</think> c") == ("<think>a</think>", " b</think> c")
    assert split_trajectory("no thinking") == ("no thinking", "")
    tok = tiny.tokenizer
    ids = tok("<think>\n1 + 2 = 3.\n</think>", add_special_tokens=False)["input_ids"]
    done = finish([*ids, tok.eos_token_id, tok.eos_token_id], (tok.eos_token_id,), tok)
    assert done.finish_reason == "stop" and done.n_tokens == len(ids) + 1
    assert done.text == "<think>\n1 + 2 = 3.\n</think>"
    cut = finish(ids, (tok.eos_token_id,), tok)
    assert cut.finish_reason == "length" and cut.n_tokens == len(ids)


def test_vllm_is_refused_in_one_line_where_absent(monkeypatch):
    monkeypatch.setattr(gen.importlib.util, "find_spec", lambda name: None)
    assert not gen.vllm_available()
    with pytest.raises(ProbesError, match=r"needs vLLM, which is not installed .*--backend hf") as err:
        gen.require_vllm()
    assert "\n" not in str(err.value)
