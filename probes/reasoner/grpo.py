"""RL fine-tune of `tiny-reasoner` with GRPO (TRL's `GRPOTrainer`): `python -m probes.reasoner.grpo`.

The policy starts from the final SFT checkpoint (`tiny-reasoner`), samples a group of completions per
fresh question (from the chat prompt alone: it writes its own `<think>…</think>` trajectory, the
scaffold and the boxed answer) and is rewarded 1 when the completion is well formatted and its boxed
answer is right, else 0 (`boxed_reward`). TRL computes the group-relative advantages, the clipped
probability ratio and the KL penalty to the frozen SFT model. Needs the optional `train` extra
(`pip install trajectory-probes[train]`, i.e. TRL); nothing else in the toolkit imports TRL.

Writes a standard HF folder (`model.safetensors`, `config.json`, the SFT model's tokenizer files copied
byte for byte, `training_config.json` with every setting, the seed, the TRL version and the wall time,
and `grpo_log.json`: reward and KL per step). The shipped `tiny-reasoner-grpo` was made with the
defaults below (`--max-minutes 17`; all 60 steps ran, in 474 s):
`python -m probes.reasoner.grpo --out probes/reasoner/checkpoint_grpo --max-minutes 17`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from probes.errors import ProbesError
from probes.models.load import BUILTIN_MODELS
from probes.reasoner.task import generate_problems
from probes.safe_output import write_text
from probes.traces.tokenize import DEFAULT_SCAFFOLD, render_prompt

GRPO_SEED = 4
"""Seed of the RL questions: disjoint from training (1), the samples (2) and the evaluation (3)."""

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
"""Files copied unchanged from the SFT checkpoint, so the RL model shares its tokenizer exactly."""

_WELL_FORMED = re.compile(
    r"<think>\n(?P<body>(?:(?!<think>|</think>).)+)\n</think>"
    + re.escape(DEFAULT_SCAFFOLD)
    + r"(?P<answer>-?\d+)\}",
    re.DOTALL,
)


def boxed_reward(completion: str, answer: str, *, eos: str = "<|endoftext|>") -> float:
    """The RL reward of one completion: 1.0 iff it is well formatted and its boxed answer is right.

    Well formatted means exactly the SFT layout, nothing before or after: `<think>\\n`, a non-empty
    trajectory, `\\n</think>`, RaML's scaffold `\\n\\n**Final Answer**\\n\\boxed{`, an integer, `}`,
    then end of text (`eos`, or nothing: a completion cut right after `}`).

    Args:
        completion: The generated text after the prompt, decoded with special tokens kept.
        answer: The right answer.
        eos: The end-of-text token's text.

    Returns:
        1.0 or 0.0.
    """
    text = completion[: -len(eos)] if completion.endswith(eos) else completion
    m = _WELL_FORMED.fullmatch(text)
    return float(m is not None and m.group("answer") == answer)


def make_reward_func(tokenizer):
    """A TRL reward function (`completion_ids`, `answer` column → rewards) for `boxed_reward`.

    TRL hands reward functions text decoded *without* special tokens, which would hide `<think>`
    and `</think>`; this one decodes the completion ids itself with them kept.
    """
    eos = tokenizer.eos_token

    def boxed_answer_reward(completions, completion_ids, answer, **_kwargs) -> list[float]:
        texts = tokenizer.batch_decode(completion_ids, skip_special_tokens=False)
        return [boxed_reward(t, a, eos=eos) for t, a in zip(texts, answer, strict=True)]

    return boxed_answer_reward


@dataclass(frozen=True, kw_only=True)
class GrpoConfig:
    """What defines the shipped RL model; stored as `training_config.json` (with the TRL version)."""

    base: str = "tiny-reasoner"  # the final SFT checkpoint (a built-in name or a folder)
    n_questions: int = 4000  # fresh RL questions (seed GRPO_SEED); each step draws `prompts_per_step`
    steps: int = 60  # optimizer steps
    prompts_per_step: int = 8
    group_size: int = 8  # completions per question (GRPO's group)
    lr: float = 3e-5
    beta: float = 0.04  # KL coefficient to the frozen SFT model (DeepSeekMath's GRPO value)
    epsilon: float = 0.2  # ratio clip
    num_iterations: int = 2  # μ: optimizer steps per sampled batch (the ratio departs from 1 on the 2nd)
    loss_type: str = "grpo"  # per-sequence length-normalised, as in the GRPO paper
    temperature: float = 1.0
    max_completion_length: int = 256
    seed: int = 0
    threads: int = 2
    max_minutes: float = 20.0  # stop after the optimizer step that passes this wall time (the RL budget)


def rl_dataset(cfg: GrpoConfig, tokenizer):
    """The RL prompts: `prompt` (the chat-template text, as the toolkit renders it) and `answer`."""
    from datasets import Dataset

    problems = generate_problems(cfg.n_questions, seed=GRPO_SEED)
    return Dataset.from_dict(
        {
            "prompt": [render_prompt(p.question, tokenizer) for p in problems],
            "answer": [p.answer for p in problems],
        }
    )


def _require_trl():
    try:
        import trl
    except ImportError:
        raise ProbesError(
            "GRPO training needs TRL, which the toolkit does not install by default. Install the "
            "optional extra into a separate environment: `pip install 'trajectory-probes[train]'`."
        ) from None
    return trl


def _base_folder(base: str) -> Path:
    folder = BUILTIN_MODELS.get(base, Path(base))
    if not (folder / "config.json").is_file():
        raise ProbesError(
            f"GRPO base model {base!r}: no config.json in {folder}; pass a built-in name or a folder."
        )
    return folder


def train_grpo(cfg: GrpoConfig, out: Path, *, log=print) -> Path:
    """Run GRPO from `cfg.base` and save the policy to `out`.

    Args:
        cfg: The settings.
        out: Destination folder (created; model files overwritten).
        log: Where progress lines go.

    Returns:
        `out`.

    Raises:
        ProbesError: TRL is not installed, or the base model folder is missing.
    """
    trl = _require_trl()
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    folder = _base_folder(cfg.base)
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(cfg.threads)
    torch.use_deterministic_algorithms(True)
    t0 = time.time()
    history: list[dict] = []

    class _Log(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if time.time() - t0 > cfg.max_minutes * 60:
                control.should_training_stop = True

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "reward" in logs:
                row = {"step": state.global_step, "seconds": round(time.time() - t0, 1)}
                row |= {k: float(v) for k, v in logs.items() if isinstance(v, (int, float))}
                history.append(row)
                log(
                    f"step {state.global_step:4d}  reward {logs['reward']:.3f}  kl {logs.get('kl', 0.0):.4f}"
                    f"  len {logs.get('completions/mean_length', 0.0):.0f}  {time.time() - t0:.0f}s"
                )

    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype=torch.float32)
        batch = cfg.prompts_per_step * cfg.group_size
        with tempfile.TemporaryDirectory(prefix="grpo-") as tmp:
            args = trl.GRPOConfig(
                output_dir=tmp,
                per_device_train_batch_size=batch,
                gradient_accumulation_steps=1,
                num_generations=cfg.group_size,
                max_steps=cfg.steps,
                learning_rate=cfg.lr,
                lr_scheduler_type="constant",
                warmup_steps=0,
                beta=cfg.beta,
                epsilon=cfg.epsilon,
                num_iterations=cfg.num_iterations,
                loss_type=cfg.loss_type,
                temperature=cfg.temperature,
                max_completion_length=cfg.max_completion_length,
                seed=cfg.seed,
                data_seed=cfg.seed,
                use_cpu=not torch.cuda.is_available(),
                bf16=False,
                fp16=False,
                report_to="none",
                save_strategy="no",
                logging_steps=1,
                disable_tqdm=True,
                dataloader_num_workers=0,
            )
            trainer = trl.GRPOTrainer(
                model=model,
                reward_funcs=make_reward_func(tokenizer),
                args=args,
                train_dataset=rl_dataset(cfg, tokenizer),
                processing_class=tokenizer,
                callbacks=[_Log()],
            )
            trainer.train()
        policy = trainer.model
        policy.eval()
        out.mkdir(parents=True, exist_ok=True)
        policy.config._attn_implementation = "eager"
        policy.config.use_cache = True  # TRL turns the KV cache off for training
        policy.save_pretrained(out, safe_serialization=True)
        for name in TOKENIZER_FILES:
            if (folder / name).is_file():
                shutil.copyfile(folder / name, out / name)
        seconds = time.time() - t0
        record = asdict(cfg) | {
            "trl_version": trl.__version__,
            "rl_question_seed": GRPO_SEED,
            "wall_seconds": round(seconds, 1),
            "steps_done": int(trainer.state.global_step),
            "reward": "probes.reasoner.grpo.boxed_reward: 1 iff well formatted and the boxed answer is right",
        }
        write_text(out / "training_config.json", json.dumps(record, indent=2) + "\n")
        write_text(out / "grpo_log.json", json.dumps(history, indent=1) + "\n")
        log(f"saved to {out} after {seconds:.0f}s")
        return out
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)


def main(argv: list[str] | None = None) -> int:
    """CLI: GRPO from the SFT checkpoint, written to `--out`."""
    parser = argparse.ArgumentParser(prog="python -m probes.reasoner.grpo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="output HF folder")
    defaults = GrpoConfig()
    for name, value in asdict(defaults).items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value,
                            help=f"default {value}")
    args = parser.parse_args(argv)
    cfg = GrpoConfig(**{k: getattr(args, k) for k in asdict(defaults)})
    try:
        train_grpo(cfg, args.out)
    except ProbesError as err:
        parser.exit(2, f"error: {err}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
