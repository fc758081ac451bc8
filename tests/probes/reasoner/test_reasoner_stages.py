"""The reasoner along training: early SFT and GRPO checkpoints, the GRPO reward, the batched
own-trajectory evaluation, early stopping of the SFT run, and the support-set sweep's data."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from probes.measures.answers import answer_scores
from probes.models.load import BUILTIN_MODELS, load_model, load_tokenizer
from probes.reasoner import train as train_mod
from probes.reasoner.evaluate import own_answers, self_generated_accuracy
from probes.reasoner.grpo import boxed_reward, make_reward_func
from probes.reasoner.sweep import support_set
from probes.reasoner.task import generate_problems, make_problem, write_trajectory
from probes.reasoner.variants import parse_steps
from probes.traces.tokenize import tokenize_trace

STAGES = ("tiny-reasoner-sft-early", "tiny-reasoner-grpo")


@pytest.mark.parametrize("name", STAGES)
def test_stage_checkpoint_loads_shares_the_tokenizer_and_answers_finitely(name):
    folder, final = BUILTIN_MODELS[name], BUILTIN_MODELS["tiny-reasoner"]
    assert sum(p.stat().st_size for p in folder.iterdir()) <= 10 * 2**20
    for f in ("tokenizer.json", "tokenizer_config.json"):
        assert (folder / f).read_bytes() == (final / f).read_bytes()
    loaded = load_model(name, device="cpu")
    assert loaded.arch == load_model("tiny-reasoner", device="cpu").arch
    problems = generate_problems(6, seed=train_mod.EVAL_SEED)
    tokenized = [tokenize_trace(train_mod.problem_trace(p), loaded.tokenizer) for p in problems]
    nll = np.array([s.nll for s in answer_scores(loaded, tokenized)])
    assert np.isfinite(nll).all()
    from safetensors.torch import load_file

    ours, sft = load_file(folder / "model.safetensors"), load_file(final / "model.safetensors")
    assert ours.keys() == sft.keys()
    assert any(not torch.equal(ours[k], sft[k]) for k in ours)


def test_stage_records_say_how_they_were_made():
    early = json.loads((BUILTIN_MODELS["tiny-reasoner-sft-early"] / "training_config.json").read_text())
    final = json.loads((BUILTIN_MODELS["tiny-reasoner"] / "training_config.json").read_text())
    assert early.pop("trained_steps") < final["steps"]
    early.pop("threads"), final.pop("threads")  # the early run used one thread on a shared machine
    assert early == final  # the same settings, seed and schedule, stopped early
    grpo = json.loads((BUILTIN_MODELS["tiny-reasoner-grpo"] / "training_config.json").read_text())
    assert grpo["base"] == "tiny-reasoner" and grpo["trl_version"]
    assert 0 < grpo["wall_seconds"] <= 20 * 60 and grpo["steps_done"] == grpo["steps"]


def _completion(p, answer: str | None = None) -> str:
    return p.trajectory + "\n\n**Final Answer**\n\\boxed{" + (answer or p.answer) + "}<|endoftext|>"


def test_boxed_reward_on_planted_completions():
    p = generate_problems(1, seed=7)[0]
    good = _completion(p)
    assert boxed_reward(good, p.answer) == 1.0
    assert boxed_reward(good.removesuffix("<|endoftext|>"), p.answer) == 1.0  # cut right after "}"
    wrong = str(int(p.answer) + 1)
    assert boxed_reward(_completion(p, wrong), p.answer) == 0.0
    assert boxed_reward(good.replace("</think>", ""), p.answer) == 0.0  # no end of thinking
    assert boxed_reward("Sure. " + good, p.answer) == 0.0  # text before <think>
    assert boxed_reward(good.replace("<|endoftext|>", " ok<|endoftext|>"), p.answer) == 0.0
    assert boxed_reward(good.replace("**Final Answer**", "Answer"), p.answer) == 0.0  # no scaffold
    assert boxed_reward(good.replace("\\boxed{", "\\boxed{ "), p.answer) == 0.0
    assert boxed_reward("<think>\n\n</think>\n\n**Final Answer**\n\\boxed{3}", "3") == 0.0  # empty
    nested = good.replace("<think>\n", "<think>\n<think>\n", 1)
    assert boxed_reward(nested, p.answer) == 0.0


def test_reward_func_decodes_ids_with_special_tokens():
    tok = load_tokenizer("tiny-reasoner")
    p = generate_problems(1, seed=8)[0]
    tt = tokenize_trace(train_mod.problem_trace(p), tok)
    ids = tt.ids[tt.spans["prompt"][1]:].tolist() + [tok.eos_token_id]
    think_end = tok.convert_tokens_to_ids("</think>")
    no_think_end = [t for t in ids if t != think_end]
    reward = make_reward_func(tok)
    texts = tok.batch_decode([ids, no_think_end], skip_special_tokens=True)  # what TRL passes as text
    assert texts[0] == texts[1]  # the text alone cannot tell them apart
    assert reward(texts, [ids, no_think_end], [p.answer, p.answer]) == [1.0, 0.0]


@pytest.fixture(scope="module")
def reasoner():
    return load_model("tiny-reasoner", device="cpu")


def test_batched_own_answers_match_the_one_at_a_time_figure(reasoner):
    problems = generate_problems(6, seed=31)
    tokenized = [tokenize_trace(train_mod.problem_trace(p), reasoner.tokenizer) for p in problems]
    answers = [p.answer for p in problems]
    batched = own_answers(reasoner, tokenized, batch_size=6)
    assert batched == own_answers(reasoner, tokenized, batch_size=1)
    assert np.mean([a == b for a, b in zip(batched, answers)]) == self_generated_accuracy(
        reasoner, tokenized, answers
    )


def _tiny_cfg(**kw):
    return train_mod.TrainConfig(
        n_train=32, vocab_size=300, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, d_mlp=64,
        steps=4, batch_size=4, warmup=1, threads=1, **kw,
    )


def test_stop_after_is_an_early_checkpoint_of_the_same_run(tmp_path):
    quiet = {"log": lambda _line: None}
    full = train_mod.train(_tiny_cfg(), tmp_path / "full", **quiet)
    same = train_mod.train(_tiny_cfg(), tmp_path / "same", stop_after=4, **quiet)
    early = train_mod.train(_tiny_cfg(), tmp_path / "early", stop_after=2, **quiet)
    assert (full / "model.safetensors").read_bytes() == (same / "model.safetensors").read_bytes()
    assert (full / "training_config.json").read_text() == (same / "training_config.json").read_text()
    assert (early / "model.safetensors").read_bytes() != (full / "model.safetensors").read_bytes()
    assert json.loads((early / "training_config.json").read_text())["trained_steps"] == 2


def test_stop_after_refuses_to_overwrite_the_shipped_model(capsys):
    with pytest.raises(SystemExit) as exc:
        train_mod.main(["--stop-after", "5"])
    assert exc.value.code == 2
    assert "--stop-after would overwrite the shipped tiny-reasoner" in capsys.readouterr().err


def test_write_trajectory_is_make_problems_second_half():
    from probes.reasoner.task import QUESTION_FORMS, _steps

    p = make_problem(random.Random(3), problem_id="x")
    start, steps = parse_steps(p.question)
    b2 = random.Random(3)  # replay the question half on a twin generator
    n = b2.randint(4, 7)
    assert _steps(b2, n) == (start, steps)
    b2.choice(QUESTION_FORMS)
    traj, value, n_m, n_c = write_trajectory(b2, start, steps)
    assert (traj, str(value), n_m, n_c) == (p.trajectory, p.answer, p.n_mistakes, p.n_confirmations)


def test_support_sets_are_nested_and_keep_question_and_answer():
    questions = generate_problems(5, seed=12)
    one, four = support_set(questions, 1), support_set(questions, 4)
    assert len(one) == 5 and len(four) == 20
    assert [p.trajectory for p in one] == [q.trajectory for q in questions]
    two = support_set(questions, 2)
    assert {p.id: p.trajectory for p in two}.items() <= {p.id: p.trajectory for p in four}.items()
    for q in questions:
        mine = [p for p in four if p.id.startswith(q.id + "/")]
        assert {(p.question, p.answer) for p in mine} == {(q.question, q.answer)}
    assert len({p.trajectory for p in four}) > 15  # mostly different trajectories


@pytest.mark.slow
def test_one_grpo_step_moves_the_policy_towards_rewarded_completions(tmp_path):
    trl = pytest.importorskip("trl", reason="TRL is the optional `train` extra (not in the test venv)")
    from datasets import Dataset
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tok = load_tokenizer("tiny-reasoner")
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    ))
    prompt = "<|im_start|>user\nCompute 12 + 3.<|im_end|>\n<|im_start|>assistant\n"
    seen: list[tuple[list[int], float]] = []

    def even_first_token(completions, completion_ids, **_kw):
        rewards = [float(ids[0] % 2 == 0) for ids in completion_ids]
        seen.extend(zip(completion_ids, rewards))
        return rewards

    def logp(m, ids):
        p = tok(prompt, add_special_tokens=False)["input_ids"]
        x = torch.tensor([p + ids])
        with torch.no_grad():
            lp = torch.log_softmax(m(x).logits[0, len(p) - 1 : -1], -1)
        return float(lp.gather(-1, torch.tensor(ids)[:, None]).sum())

    before = Qwen2ForCausalLM(model.config)
    before.load_state_dict(model.state_dict())
    args = trl.GRPOConfig(
        output_dir=str(tmp_path), per_device_train_batch_size=8, num_generations=8, max_steps=1,
        learning_rate=1e-2, beta=0.0, max_completion_length=3, use_cpu=True, report_to="none",
        save_strategy="no", logging_steps=1, disable_tqdm=True, seed=0, loss_type="grpo",
    )
    trainer = trl.GRPOTrainer(model=model, reward_funcs=even_first_token, args=args,
                              train_dataset=Dataset.from_dict({"prompt": [prompt] * 8}),
                              processing_class=tok)
    trainer.train()
    rewards = [r for _, r in seen]
    assert 0 < sum(rewards) < len(rewards)  # the group has both kinds, so advantages are non-zero
    gain = [logp(trainer.model, ids) - logp(before, ids) for ids, _ in seen]
    up = np.mean([g for g, (_, r) in zip(gain, seen) if r == 1.0])
    down = np.mean([g for g, (_, r) in zip(gain, seen) if r == 0.0])
    assert up > 0 > down


def test_sweep_plot_from_rows(tmp_path):
    from probes.reasoner.sweep import plot_sweep

    rows = [{"k": k, "seed": 0, "accuracy_own_trajectory": 0.1 * k, "accuracy_own_trajectory_ci": [0.0, 0.9],
             "accuracy_reference_trajectory": 0.0, "accuracy_reference_trajectory_ci": [1e-18, 0.02],
             "var_delta": {"median": 0.01, "ci": [0.0, 0.02]},
             "frac_nonmonotone": {"median": 0.3, "ci": [0.2, 0.4]}} for k in (1, 2, 4, 8)]
    path = plot_sweep(rows, tmp_path / "sweep.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_stages_pairs_models_on_the_same_problems(monkeypatch):
    from probes.reasoner import stages

    calls = []

    def fake(model, *, n, temperature, seed):
        calls.append(model)
        ok = np.arange(n) % (2 if model == "b" else 3) == 0
        return {"reference": ok, "own_greedy": ok, "own_sampled": ~ok, "mean_answer_nll_full": 0.5}

    monkeypatch.setattr(stages, "stage_correctness", fake)
    res = stages.compare_stages(["a", "b"], n=6, baseline="a", log=lambda _line: None)
    (d_ref, d_greedy, d_sampled) = res["paired_differences"]
    assert d_ref["diff"] == pytest.approx(3 / 6 - 2 / 6) and d_sampled["diff"] == pytest.approx(-1 / 6)
    assert res["rows"][1]["accuracy_own_greedy"] == 0.5
    lo, hi = res["rows"][1]["accuracy_own_greedy_ci"]
    assert lo < 0.5 < hi
    again = stages.compare_stages(["a", "b"], n=6, baseline="a", reuse=json.loads(json.dumps(res)),
                                  log=lambda _line: None)
    assert calls == ["a", "b"]  # nothing re-evaluated
    assert again["paired_differences"] == res["paired_differences"]


def test_own_answers_stage_correctness_on_the_final_sft():
    from probes.reasoner.stages import stage_correctness

    got = stage_correctness("tiny-reasoner", n=4, temperature=1.0, seed=0, batch_size=4)
    assert got["reference"].all() and got["own_greedy"].all()
    assert got["own_sampled"].dtype == bool and np.isfinite(got["mean_answer_nll_full"])
