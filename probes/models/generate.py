"""Sampling trajectories from a model: Hugging Face `generate` (batched) or vLLM.

Entry points: `build_prompt` (the generation prompt with the thinking switch), `HFGenerator` (the
default backend: batched `generate` with left padding and the KV cache, on CPU or GPU) and
`VllmGenerator` (`vllm_available()` says whether it can run), both with
`.generate(requests, sampling) -> list[Completion]`, and `split_trajectory`.

Reproducibility: every request carries its own seed (`sample_seed(seed, key)`, from the run's
seed and the (question, sample) key), so a sample does not depend on which other requests share its
batch: a resumed run draws what an uninterrupted one would have (on the same device and backend).
The HF backend samples with a per-row `torch.Generator` (temperature, then top-p, then one uniform
draw per token, inverse-CDF); vLLM gets the same per-request seed. Temperature 0 is greedy.
"""

from __future__ import annotations

import hashlib
import importlib.util
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from hooks.hf_fast import plain_view
from hooks.model import ArchInfo
from probes.errors import ProbesError
from probes.models.choices import GENERATION_BACKENDS
from probes.models.load import BUILTIN_MODELS, load_tokenizer, resolve_spec
from probes.traces.grading import THINK_CLOSE
from probes.traces.tokenize import render_prompt

if TYPE_CHECKING:
    from hooks.model import LoadedModel

BACKENDS = GENERATION_BACKENDS

EMPTY_THINK = "<think>\n\n</think>\n\n"
"""What `--no-thinking` appends to the prompt of a chat template without a thinking switch (the
block Qwen3's template writes itself with `enable_thinking=False`)."""

_THINK_TAIL = re.compile(r"<think>\s*\Z")


@dataclass(frozen=True, kw_only=True)
class Sampling:
    """How tokens are drawn.

    Attributes:
        temperature: Softmax temperature; 0 = greedy (argmax).
        top_p: Nucleus: keep the most probable tokens whose mass reaches `top_p` (1 = all).
        max_new_tokens: Most tokens generated per request (a request that reaches it is
            truncated, `finish_reason` "length").
        seed: The run's seed (each request derives its own, `sample_seed`).
    """

    temperature: float
    top_p: float
    max_new_tokens: int
    seed: int

    @property
    def greedy(self) -> bool:
        """Temperature 0: argmax decoding."""
        return self.temperature == 0


@dataclass(frozen=True)
class Request:
    """One generation to run.

    Attributes:
        key: Its identity (the output record's id).
        prompt_ids: Token ids of the prompt.
        seed: Its own sampling seed.
    """

    key: str
    prompt_ids: tuple[int, ...]
    seed: int


@dataclass(frozen=True)
class Completion:
    """What a model generated for one request.

    Attributes:
        token_ids: The generated ids, the stopping token included when `finish_reason` is "stop".
        text: The decoded text without the stopping token (special tokens such as `</think>` kept).
        finish_reason: "stop" (a stop token) or "length" (`max_new_tokens` reached).
    """

    token_ids: tuple[int, ...]
    text: str
    finish_reason: str

    @property
    def n_tokens(self) -> int:
        """Tokens generated."""
        return len(self.token_ids)


@dataclass(frozen=True)
class Prompt:
    """A generation prompt.

    Attributes:
        text: What the model is given.
        trajectory_prefix: Text the trajectory record starts with so that the toolkit's default
            prompt (`render_prompt`, thinking on) + the trajectory re-creates the generation
            context: a `<think>` the template opens, and the empty think block of `--no-thinking`.
    """

    text: str
    trajectory_prefix: str


def sample_seed(seed: int, key: str) -> int:
    """The seed of one request: a 63-bit hash of the run's seed and the request's key."""
    digest = hashlib.sha256(f"{seed}\x00{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & (2**63 - 1)


def has_thinking_switch(tokenizer: Any) -> bool:
    """Whether the chat template reads `enable_thinking` (Qwen3-style thinking switch)."""
    return "enable_thinking" in (getattr(tokenizer, "chat_template", None) or "")


def build_prompt(question: str, tokenizer: Any, *, thinking: bool = True) -> Prompt:
    """The generation prompt of `question`.

    Thinking on: the toolkit's prompt (`render_prompt`: the chat template, else
    `"Question: ...\\nAnswer: "`). Thinking off: the chat template with `enable_thinking=False`
    where it has that switch, else the thinking prompt followed by an empty think block
    (`EMPTY_THINK`, or only its closing part when the prompt already opens `<think>`).
    """
    base = render_prompt(question, tokenizer)
    if thinking:
        text = base
    elif has_thinking_switch(tokenizer):
        text = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                             add_generation_prompt=True, enable_thinking=False)
    elif _THINK_TAIL.search(base):
        text = base + "\n</think>\n\n"
    else:
        text = base + EMPTY_THINK
    tail = _THINK_TAIL.search(base)
    prefix = tail.group(0) if tail else ""
    if text.startswith(base):
        prefix += text[len(base):]
    return Prompt(text=text, trajectory_prefix=prefix)


def prompt_ids(text: str, tokenizer: Any) -> tuple[int, ...]:
    """Token ids of a prompt text, with the BOS the tokenizer adds itself prepended once (as
    `probes.traces.tokenize` does)."""
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    bos = getattr(tokenizer, "bos_token_id", None)
    adds_bos = bos is not None and tokenizer("a", add_special_tokens=True)["input_ids"][:1] == [bos]
    if adds_bos and ids[:1] != [bos]:
        ids.insert(0, bos)
    return tuple(ids)


def split_trajectory(text: str) -> tuple[str, str]:
    """(trajectory, response): the text up to and including the first `</think>`, and the rest.

    Without `</think>` (no thinking, or truncated) the whole text is the trajectory.
    """
    head, sep, tail = text.partition(THINK_CLOSE)
    return (head + sep, tail) if sep else (text, "")


def stop_token_ids(tokenizer: Any, generation_config: Any = None) -> tuple[int, ...]:
    """The ids that end a generation: the tokenizer's EOS and the generation config's EOS ids."""
    ids: list[int] = []
    configured = getattr(generation_config, "eos_token_id", None)
    for value in (tokenizer.eos_token_id, *(configured if isinstance(configured, list) else [configured])):
        if value is not None and value not in ids:
            ids.append(int(value))
    if not ids:
        raise ProbesError("the model's tokenizer and generation config name no EOS token, so a "
                          "generation could never stop; set eos_token_id in its generation_config.json")
    return tuple(ids)


def finish(token_ids: Sequence[int], stops: Sequence[int], tokenizer: Any) -> Completion:
    """A completion from generated ids: cut after the first stop token, decode the rest."""
    ids = [int(t) for t in token_ids]
    end = next((i for i, t in enumerate(ids) if t in stops), None)
    kept = ids if end is None else ids[: end + 1]
    body = kept if end is None else kept[:-1]
    text = tokenizer.decode(body, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    return Completion(tuple(kept), text, "length" if end is None else "stop")


# --------------------------------------------------------------------------------------------------
# Hugging Face generate


class SeededSampler:
    """A logits processor that draws each row's next token with that row's own generator.

    It returns scores that are 0 at the drawn token and -inf elsewhere, so `generate` run greedy
    (`do_sample=False`) emits exactly the drawn tokens.
    """

    def __init__(self, seeds: Sequence[int], *, temperature: float, top_p: float,
                 device: torch.device) -> None:
        self.generators = [torch.Generator(device=device).manual_seed(s) for s in seeds]
        self.temperature = temperature
        self.top_p = top_p

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """Draw one token per row (`input_ids` unused: the state is in the generators)."""
        probs = torch.softmax(scores.float() / self.temperature, dim=-1)
        sorted_p, order = probs.sort(dim=-1, descending=True)
        if self.top_p < 1:
            sorted_p = sorted_p * ((sorted_p.cumsum(-1) - sorted_p) < self.top_p)
        cdf = sorted_p.cumsum(-1)
        draws = torch.stack([torch.rand((), generator=g, device=scores.device)
                             for g in self.generators])
        pick = torch.searchsorted(cdf, (draws * cdf[:, -1])[:, None].contiguous(), right=True)
        token = order.gather(-1, pick.clamp(max=order.shape[-1] - 1))
        out = torch.full_like(scores, float("-inf"))
        return out.scatter_(-1, token, 0.0)


class HFGenerator:
    """Batched Hugging Face `generate` on a loaded model (left padding, KV cache).

    Attributes:
        backend: "hf".
        tokenizer: The model's tokenizer.
        n_ctx: The model's context length.
        device: Where it runs.
    """

    backend = "hf"

    def __init__(self, loaded: LoadedModel, *, plain: bool = False) -> None:
        """`plain`: generate with a plain-HF view of the model (`hooks.hf_fast.plain_view`, sdpa,
        no bridge hooks; same weights, same samples, about twice as fast on CPU)."""
        self.loaded = loaded
        self.model = loaded.hf_model
        if plain:
            self.model = plain_view(loaded.hf_model)
        self.tokenizer = loaded.tokenizer
        self.n_ctx = loaded.arch.n_ctx
        self.device = loaded.device
        self.stops = stop_token_ids(loaded.tokenizer, loaded.hf_model.generation_config)

    @torch.inference_mode()
    def generate(self, requests: Sequence[Request], sampling: Sampling) -> list[Completion]:
        """Generate all `requests` in one batch (left-padded to the longest prompt)."""
        from transformers import GenerationConfig, LogitsProcessorList

        pad = self.tokenizer.pad_token_id
        pad = self.stops[0] if pad is None else pad
        width = max(len(r.prompt_ids) for r in requests)
        ids = torch.full((len(requests), width), pad, dtype=torch.long)
        mask = torch.zeros((len(requests), width), dtype=torch.long)
        for row, r in enumerate(requests):
            ids[row, width - len(r.prompt_ids):] = torch.as_tensor(r.prompt_ids)
            mask[row, width - len(r.prompt_ids):] = 1
        # Every setting that changes the scores is given, so none comes from the model's own
        # generation_config (which fills the ones left unset; e.g. a repetition penalty).
        config = GenerationConfig(max_new_tokens=sampling.max_new_tokens, min_new_tokens=0, do_sample=False,
                                  num_beams=1, temperature=1.0, top_p=1.0, top_k=0, repetition_penalty=1.0,
                                  no_repeat_ngram_size=0, eos_token_id=list(self.stops), pad_token_id=pad,
                                  use_cache=True)
        processors = LogitsProcessorList()
        if not sampling.greedy:
            processors.append(SeededSampler([r.seed for r in requests], temperature=sampling.temperature,
                                            top_p=sampling.top_p, device=self.device))
        out = self.model.generate(input_ids=ids.to(self.device),
                                            attention_mask=mask.to(self.device),
                                            generation_config=config, logits_processor=processors)
        new = out[:, width:].tolist()
        return [finish(row, self.stops, self.tokenizer) for row in new]


# --------------------------------------------------------------------------------------------------
# vLLM


def vllm_available() -> bool:
    """Whether vLLM is installed (it is an optional extra)."""
    return importlib.util.find_spec("vllm") is not None


def require_vllm() -> None:
    """Refuse `--backend vllm` where vLLM is absent, in one line.

    Raises:
        ProbesError: vLLM is not installed.
    """
    if not vllm_available():
        raise ProbesError("--backend vllm needs vLLM, which is not installed here: on a GPU machine "
                          "pip install 'trajectory-probes[vllm]', or use --backend hf")


class VllmGenerator:
    """vLLM's offline `LLM.generate` with a per-request seed (GPU; vLLM batches internally).

    Attributes:
        backend: "vllm".
        tokenizer: The model's Hugging Face tokenizer (prompts are given to vLLM as token ids).
        n_ctx: The model's context length (from its config, as for the HF backend).
        device: "cuda".
        label: The model as recorded (built-in name, absolute folder or hub id).
    """

    backend = "vllm"

    def __init__(self, spec: str, *, dtype: str, seed: int) -> None:
        require_vllm()
        from transformers import AutoConfig, GenerationConfig
        from vllm import LLM


        folder = resolve_spec(spec)
        self.tokenizer = load_tokenizer(spec)
        self.label = spec if spec in BUILTIN_MODELS or not Path(spec).is_dir() else str(folder.resolve())
        self.n_ctx = ArchInfo.from_hf_config(AutoConfig.from_pretrained(folder, local_files_only=True),
                                             dtype=dtype).n_ctx
        self.device = "cuda"
        try:
            configured = GenerationConfig.from_pretrained(folder, local_files_only=True)
        except OSError:
            configured = None
        self.stops = stop_token_ids(self.tokenizer, configured)
        self.llm = LLM(model=str(folder), tokenizer=str(folder), dtype=dtype, seed=seed)

    def generate(self, requests: Sequence[Request], sampling: Sampling) -> list[Completion]:
        """Generate all `requests` in one `LLM.generate` call."""
        from vllm import SamplingParams

        params = [SamplingParams(temperature=sampling.temperature,
                                 top_p=1.0 if sampling.greedy else sampling.top_p,
                                 max_tokens=sampling.max_new_tokens, seed=r.seed,
                                 stop_token_ids=list(self.stops), skip_special_tokens=False)
                  for r in requests]
        prompts = [{"prompt_token_ids": list(r.prompt_ids)} for r in requests]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        # vLLM's own finish reason decides: its token ids may leave the stop token out.
        return [replace(finish(o.outputs[0].token_ids, self.stops, self.tokenizer),
                        finish_reason="length" if o.outputs[0].finish_reason == "length" else "stop")
                for o in outputs]
