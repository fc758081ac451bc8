"""Tests for probes.models: spec resolution, ArchInfo, bridge = HF parity and KV-cache parity.

Every architecture is a tiny random-init model built from a config in code, saved with
save_pretrained and loaded back through `load_model(folder)` (route b). The real trained
stories260K Llama and the real Qwen tokenizer come from ../shared/data and are skipped if absent.
Nothing here touches the network.
"""

from __future__ import annotations

import ast
import inspect
import json
import re
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from transformer_lens.model_bridge.generalized_components.attention import AttentionBridge
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    DynamicCache,
    GPT2Config,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedTokenizerBase,
    Qwen2Config,
    Qwen3Config,
)
from transformers import __version__ as TRANSFORMERS_VERSION

from hooks.errors import HooksError
from hooks.model import ArchInfo, LoadedModel
from probes.errors import ModelNotFoundError, ProbesError
from probes.models import kv as kv_mod
from probes.models import load as models_mod
from probes.models.kv import kv_parity
from probes.models.load import boot_model, load_model
from probes.models.tiny import byte_tokenizer as _byte_tokenizer

SHARED_DATA = Path(__file__).resolve().parents[3].parent / "shared" / "data"
STORIES = SHARED_DATA / "models" / "stories260K"
QWEN_TOKENIZER = SHARED_DATA / "tokenizers" / "qwen"

needs_stories = pytest.mark.skipif(
    not (STORIES / "config.json").is_file(),
    reason=f"real stories260K model not found at {STORIES} (shared test data absent)",
)

BYTE_VOCAB = 320  # byte-level tokenizer has 257 tokens; the model's vocab may be larger
SEQ_LEN, SPLIT = 24, 15
PARITY_TOL = 1e-4  # fp32 prefix+suffix vs full; a working cache measures ~1e-6
HF_TOL = 1e-6  # bridge vs HF eager, fp32; measured 0.0


# ----------------------------------------------------------------------------------------------
# Tiny models built in code
# ----------------------------------------------------------------------------------------------




def _qwen2_config(vocab: int) -> PretrainedConfig:
    # GQA 4/2 with q/k/v biases (Qwen2 default); d_model 32 keeps the 151k-row embedding small.
    return Qwen2Config(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=True,
    )


def _llama_config(vocab: int) -> PretrainedConfig:
    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )


def _qwen3_config(vocab: int) -> PretrainedConfig:
    # head_dim 32 != 64 / 4: the derivation must read head_dim, not divide.
    return Qwen3Config(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=128,
    )


def _gpt2_config(vocab: int) -> PretrainedConfig:
    # n_inner=None means d_mlp = 4 * n_embd.
    return GPT2Config(vocab_size=vocab, n_embd=64, n_layer=2, n_head=4, n_positions=128)


@dataclass(frozen=True)
class ArchCase:
    """One architecture under test and the ArchInfo fields it must produce."""

    make_config: Callable[[int], PretrainedConfig]
    real_qwen_tokenizer: bool
    expected: dict[str, object]  # everything but vocab_size, which depends on the tokenizer


ARCHS: dict[str, ArchCase] = {
    "qwen2": ArchCase(
        _qwen2_config,
        True,
        dict(family="qwen2", n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, d_head=8, d_mlp=64,
             n_ctx=128, norm="rmsnorm", positional="rope", mlp="gated", dtype="float32"),
    ),
    "llama": ArchCase(
        _llama_config,
        False,
        dict(family="llama", n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, d_head=16, d_mlp=128,
             n_ctx=128, norm="rmsnorm", positional="rope", mlp="gated", dtype="float32"),
    ),
    "qwen3": ArchCase(
        _qwen3_config,
        False,
        dict(family="qwen3", n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, d_head=32, d_mlp=128,
             n_ctx=128, norm="rmsnorm", positional="rope", mlp="gated", dtype="float32"),
    ),
    "gpt2": ArchCase(
        _gpt2_config,
        False,
        dict(family="gpt2", n_layers=2, d_model=64, n_heads=4, n_kv_heads=4, d_head=16, d_mlp=256,
             n_ctx=128, norm="layernorm", positional="learned", mlp="plain", dtype="float32"),
    ),
}


@pytest.fixture(scope="module", autouse=True)
def _single_thread() -> Iterator[None]:
    """Run these tiny models on one intra-op thread.

    With 2 cores shared with other jobs, torch's 2-thread pool spends ~0.7 s per tiny forward
    contending for cores; one thread takes ~6 ms.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@dataclass
class Tiny:
    """A tiny model saved to disk and loaded back through `load_model(folder)`."""

    name: str
    folder: Path
    vocab_size: int
    loaded: LoadedModel


@pytest.fixture(scope="module")
def qwen_tokenizer() -> PreTrainedTokenizerBase:
    if not (QWEN_TOKENIZER / "vocab.json").is_file():
        pytest.skip(f"real Qwen tokenizer not found at {QWEN_TOKENIZER} (shared test data absent)")
    return AutoTokenizer.from_pretrained(QWEN_TOKENIZER, local_files_only=True)


@pytest.fixture(scope="module")
def save_tiny(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Callable[[str], tuple[Path, int]]:
    """Build (once per module) a seeded random-init model + tokenizer and save them to a folder."""
    built: dict[str, tuple[Path, int]] = {}

    def build(name: str) -> tuple[Path, int]:
        if name not in built:
            case = ARCHS[name]
            if case.real_qwen_tokenizer:
                tokenizer = request.getfixturevalue("qwen_tokenizer")
                vocab = len(tokenizer)
            else:
                tokenizer, vocab = _byte_tokenizer(), BYTE_VOCAB
            torch.manual_seed(0)
            hf = AutoModelForCausalLM.from_config(case.make_config(vocab), attn_implementation="eager")
            folder = tmp_path_factory.mktemp(f"tiny-{name}")
            hf.save_pretrained(folder)
            tokenizer.save_pretrained(folder)
            built[name] = (folder, vocab)
        return built[name]

    return build


@pytest.fixture(scope="module", params=sorted(ARCHS))
def tiny(request: pytest.FixtureRequest, save_tiny: Callable[[str], tuple[Path, int]]) -> Tiny:
    folder, vocab = save_tiny(request.param)
    return Tiny(request.param, folder, vocab, load_model(str(folder), device="cpu"))


def _ids(vocab: int, batch: int = 2, n: int = SEQ_LEN, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, n), generator=gen)  # [batch, pos]


def _hf_eager(folder: Path, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """An independent plain-HF reference model loaded from the same folder."""
    hf = AutoModelForCausalLM.from_pretrained(
        folder, dtype=dtype, local_files_only=True, attn_implementation="eager"
    )
    return hf.eval()


# ----------------------------------------------------------------------------------------------
# Per-architecture: ArchInfo, bridge = HF, KV parity
# ----------------------------------------------------------------------------------------------


def test_arch_info_matches_config(tiny: Tiny) -> None:
    arch = tiny.loaded.arch
    expected = {**ARCHS[tiny.name].expected, "vocab_size": tiny.vocab_size}
    got = {k: getattr(arch, k) for k in expected}
    assert got == expected
    assert arch.weight_convention.startswith("hf-raw")
    # Cross-check against TransformerLens's own reading of the same config.
    cfg = tiny.loaded.bridge.cfg
    assert (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.d_head, cfg.d_mlp, cfg.d_vocab) == (
        arch.n_layers, arch.d_model, arch.n_heads, arch.d_head, arch.d_mlp, arch.vocab_size
    )
    assert (getattr(cfg, "n_key_value_heads", None) or cfg.n_heads) == arch.n_kv_heads
    assert cfg.normalization_type == {"rmsnorm": "RMS", "layernorm": "LN"}[arch.norm]
    assert cfg.positional_embedding_type == {"rope": "rotary", "learned": "standard"}[arch.positional]
    assert bool(cfg.gated_mlp) == (arch.mlp == "gated")


def test_loaded_model_fields(tiny: Tiny) -> None:
    loaded = tiny.loaded
    assert loaded.spec == str(tiny.folder)
    assert loaded.source == str(tiny.folder)
    assert loaded.device == torch.device("cpu")
    assert loaded.hf_model is loaded.bridge.original_model
    assert not loaded.hf_model.training
    assert loaded.hf_model.config._attn_implementation == "eager"


def test_caller_tokenizer_left_untouched(tiny: Tiny) -> None:
    """TL normalises its tokenizer in place (pad := eos, bos := eos); ours must stay as saved."""
    fresh = AutoTokenizer.from_pretrained(tiny.folder, local_files_only=True)
    ours = tiny.loaded.tokenizer
    assert ours is not tiny.loaded.bridge.tokenizer
    assert (ours.bos_token, ours.eos_token, ours.pad_token, ours.padding_side, len(ours)) == (
        fresh.bos_token, fresh.eos_token, fresh.pad_token, fresh.padding_side, len(fresh)
    )


def test_arch_info_json_round_trip(tiny: Tiny) -> None:
    arch = tiny.loaded.arch
    assert ArchInfo.from_dict(json.loads(json.dumps(arch.to_dict()))) == arch


def test_bridge_logits_equal_hf_eager(tiny: Tiny) -> None:
    ids = _ids(tiny.vocab_size)
    with torch.no_grad():
        bridge_logits = tiny.loaded.bridge(ids, return_type="logits")
        hf_logits = _hf_eager(tiny.folder)(ids).logits
    assert bridge_logits.shape == (2, SEQ_LEN, tiny.vocab_size)
    assert (bridge_logits - hf_logits).abs().max().item() <= HF_TOL


def test_kv_cache_is_used_and_matches_full_sequence(tiny: Tiny) -> None:
    loaded, ids = tiny.loaded, _ids(tiny.vocab_size)
    assert kv_parity(loaded, ids, SPLIT) <= PARITY_TOL
    # The cache must really hold the prefix: transformers >= 5.24 without the shim leaves it at 0.
    cache = DynamicCache(config=loaded.hf_model.config)
    with torch.no_grad():
        loaded.bridge(ids[:, :SPLIT], return_type="logits", past_key_values=cache)
        assert cache.get_seq_length() == SPLIT
        loaded.bridge(ids[:, SPLIT:], return_type="logits", past_key_values=cache)
    assert cache.get_seq_length() == SEQ_LEN


def _rename_cache_kwarg(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """What transformers >= 5.24 hands each attention module: the cache as `cache=`."""
    if kwargs.get("past_key_values") is not None:
        kwargs = {**kwargs, "cache": kwargs["past_key_values"]}
        del kwargs["past_key_values"]
    return args, kwargs


def test_kv_parity_detects_ignored_cache_and_shim_fixes_it(
    tiny: Tiny, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Simulate the transformers >= 5.24 keyword rename: parity breaks, and the shim mends it."""
    # Restore the unpatched method after the test (the shim patches the class).
    monkeypatch.setattr(AttentionBridge, "_update_kv_cache", AttentionBridge._update_kv_cache)
    loaded, ids = tiny.loaded, _ids(tiny.vocab_size)
    handles = [
        block.attn.register_forward_pre_hook(_rename_cache_kwarg, with_kwargs=True)
        for block in loaded.bridge.blocks
    ]
    try:
        cache = DynamicCache(config=loaded.hf_model.config)
        with torch.no_grad():
            loaded.bridge(ids[:, :SPLIT], return_type="logits", past_key_values=cache)
        assert cache.get_seq_length() == 0
        assert kv_parity(loaded, ids, SPLIT) > 100 * PARITY_TOL

        kv_mod._install_kv_cache_shim()
        shimmed = AttentionBridge._update_kv_cache
        assert shimmed._probes_kv_shim
        kv_mod._install_kv_cache_shim()  # idempotent: no second wrapper
        assert AttentionBridge._update_kv_cache is shimmed
        assert kv_parity(loaded, ids, SPLIT) <= PARITY_TOL
    finally:
        for handle in handles:
            handle.remove()


# ----------------------------------------------------------------------------------------------
# KV shim bookkeeping
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("version", "needed"),
    [("5.23.0", False), ("5.9.1", False), ("4.57.6", False), ("5.24.0", True),
     ("5.24.0.dev0", True), ("5.30.1", True), ("6.0.0", True)],
)
def test_kv_shim_needed_from_5_24(version: str, needed: bool) -> None:
    assert kv_mod._kv_shim_needed(version) is needed


def test_shim_target_exists_in_installed_transformer_lens() -> None:
    """The shim patches `AttentionBridge._update_kv_cache(self, k, v, **kwargs)`; guard a TL upgrade."""
    params = inspect.signature(AttentionBridge._update_kv_cache).parameters
    assert list(params)[:3] == ["self", "k", "v"]
    assert params[list(params)[-1]].kind is inspect.Parameter.VAR_KEYWORD


def test_shim_installed_only_when_needed(tiny: Tiny) -> None:
    patched = getattr(AttentionBridge._update_kv_cache, "_probes_kv_shim", False)
    assert patched is kv_mod._kv_shim_needed(TRANSFORMERS_VERSION)


def test_kv_parity_rejects_bad_split(tiny: Tiny) -> None:
    with pytest.raises(ProbesError, match=r"split=24 is out of range for 24 tokens"):
        kv_parity(tiny.loaded, _ids(tiny.vocab_size), SEQ_LEN)


# ----------------------------------------------------------------------------------------------
# dtype, in-memory boot, hub cache
# ----------------------------------------------------------------------------------------------


def test_bfloat16_load(save_tiny: Callable[[str], tuple[Path, int]]) -> None:
    folder, vocab = save_tiny("llama")
    loaded = load_model(str(folder), device="cpu", dtype="bfloat16")
    assert loaded.arch.dtype == "bfloat16"
    assert loaded.bridge.cfg.dtype == torch.bfloat16
    assert {p.dtype for p in loaded.hf_model.parameters()} == {torch.bfloat16}
    ids = _ids(vocab)
    with torch.no_grad():
        logits = loaded.bridge(ids, return_type="logits")
        reference = _hf_eager(folder, torch.bfloat16)(ids).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()
    assert (logits.float() - reference.float()).abs().max().item() == 0.0
    assert kv_parity(loaded, ids, SPLIT) <= 2e-2  # bf16 rounding bound; measured 0.0


def test_torch_dtype_accepted(save_tiny: Callable[[str], tuple[Path, int]]) -> None:
    folder, _ = save_tiny("gpt2")
    assert load_model(str(folder), device="cpu", dtype=torch.float16).arch.dtype == "float16"


def test_boot_model_in_memory_casts_and_records() -> None:
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(_llama_config(BYTE_VOCAB), attn_implementation="eager")
    loaded = boot_model(hf, _byte_tokenizer(), spec="in-code-llama", device="cpu", dtype="bfloat16")
    assert (loaded.spec, loaded.source) == ("in-code-llama", "in-memory")
    assert loaded.hf_model is hf
    assert loaded.arch.dtype == "bfloat16"
    assert hf.model.embed_tokens.weight.dtype == torch.bfloat16
    unchanged = boot_model(hf, _byte_tokenizer(), spec="again", device="cpu")
    assert unchanged.arch.dtype == "bfloat16"  # dtype=None keeps the weights' dtype


def _fake_hub_cache(root: Path, repo_id: str, model_folder: Path) -> Path:
    """Lay out `root` like an HF hub cache holding `repo_id` at revision main; return the snapshot."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo_dir = root / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo_dir / "snapshots" / commit
    shutil.copytree(model_folder, snapshot)
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(commit)
    return snapshot


def test_hub_id_loads_from_local_cache(
    save_tiny: Callable[[str], tuple[Path, int]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder, vocab = save_tiny("llama")
    snapshot = _fake_hub_cache(tmp_path / "hub", "tiny-org/tiny-llama", folder)
    by_arg = load_model("tiny-org/tiny-llama", device="cpu", cache_dir=tmp_path / "hub")
    assert (by_arg.spec, by_arg.source) == ("tiny-org/tiny-llama", str(snapshot))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    by_env = load_model("tiny-org/tiny-llama", device="cpu")
    assert by_env.source == str(snapshot)
    ids = _ids(vocab)
    with torch.no_grad():
        a = by_arg.bridge(ids, return_type="logits")
        b = load_model(str(folder), device="cpu").bridge(ids, return_type="logits")
    assert torch.equal(a, b)


# ----------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------


def test_hub_id_not_in_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    empty_home = tmp_path / "hf-home"
    empty_home.mkdir()
    monkeypatch.setenv("HF_HOME", str(empty_home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    with pytest.raises(ModelNotFoundError) as info:
        load_model("nobody-org/not-a-model", device="cpu")
    message = str(info.value)
    assert "not in the local Hugging Face cache" in message
    assert str(empty_home / "hub") in message
    assert "never downloads" in message
    assert "hf download nobody-org/not-a-model" in message
    assert "local model folder" in message


def test_hub_id_not_in_explicit_cache_dir(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match=re.escape(str(tmp_path / "cache"))):
        load_model("nobody-org/not-a-model", device="cpu", cache_dir=tmp_path / "cache")


def test_nonexistent_path(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match=r"no such folder.*Accepted forms.*'tiny-reasoner'"):
        load_model(str(tmp_path / "missing" / "model"), device="cpu")


def test_folder_without_config(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match=r"has no config\.json.*Accepted forms"):
        load_model(str(tmp_path), device="cpu")


def test_file_instead_of_folder(tmp_path: Path) -> None:
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"")
    with pytest.raises(ModelNotFoundError, match=r"is a file, not a folder"):
        load_model(str(weights), device="cpu")


def test_folder_without_weights(tmp_path: Path) -> None:
    _llama_config(BYTE_VOCAB).save_pretrained(tmp_path)
    _byte_tokenizer().save_pretrained(tmp_path)
    with pytest.raises(ProbesError, match=r"Cannot load a causal LM from .*model\.safetensors"):
        load_model(str(tmp_path), device="cpu")


def test_builtin_missing_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(models_mod.BUILTIN_MODELS, "tiny-reasoner", tmp_path / "no-checkpoint")
    with pytest.raises(
        ModelNotFoundError, match=r"built-in model 'tiny-reasoner'.*python -m probes\.reasoner\.train"
    ):
        load_model("tiny-reasoner", device="cpu")


def test_builtin_resolves_to_package_checkpoint() -> None:
    assert models_mod.BUILTIN_MODELS["tiny-reasoner"] == (
        Path(models_mod.__file__).resolve().parents[1] / "reasoner" / "checkpoint"
    )


@pytest.mark.parametrize("device", ["tpu", "cuda:x", "gpu", ""])
def test_bad_device(device: str) -> None:
    with pytest.raises(HooksError, match=r"Unknown device.*'cpu', 'cuda', 'cuda:N'"):
        load_model("tiny-reasoner", device=device)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_cuda_requested_without_cuda() -> None:
    with pytest.raises(HooksError, match=r"CUDA is not available.*device='cpu'"):
        load_model("tiny-reasoner", device="cuda")


@pytest.mark.parametrize("dtype", ["float64", "fp16", "int8", torch.float64])
def test_bad_dtype(dtype: str | torch.dtype) -> None:
    with pytest.raises(HooksError, match=r"Unsupported dtype.*\['bfloat16', 'float16', 'float32'\]"):
        load_model("tiny-reasoner", device="cpu", dtype=dtype)


def test_arch_info_from_dict_rejects_unknown_keys(tiny: Tiny) -> None:
    data = {**tiny.loaded.arch.to_dict(), "n_experts": 8}
    with pytest.raises(HooksError, match=r"unknown keys \['n_experts'\]"):
        ArchInfo.from_dict(data)


# ----------------------------------------------------------------------------------------------
# Real trained model: stories260K (Llama, SentencePiece tokenizer)
# ----------------------------------------------------------------------------------------------


def _reference_generations() -> list[tuple[str, str]]:
    """(prompt, reference greedy text) pairs from GENERATION_CHECK.txt's `PROMPT 'p' -> 't'` lines."""
    pairs = []
    for line in (STORIES / "GENERATION_CHECK.txt").read_text().splitlines():
        match = re.fullmatch(r"PROMPT (.+) -> (.+)", line)
        if match:
            pairs.append((ast.literal_eval(match[1]), ast.literal_eval(match[2])))
    return pairs


@pytest.fixture(scope="module")
def stories() -> LoadedModel:
    if not (STORIES / "config.json").is_file():
        pytest.skip(f"real stories260K model not found at {STORIES} (shared test data absent)")
    return load_model(str(STORIES), device="cpu")


@needs_stories
def test_stories_arch(stories: LoadedModel) -> None:
    arch = stories.arch
    assert (arch.family, arch.n_layers, arch.d_model, arch.n_heads, arch.n_kv_heads) == (
        "llama", 5, 64, 8, 4
    )
    assert (arch.d_head, arch.d_mlp, arch.vocab_size, arch.n_ctx) == (8, 172, 512, 512)
    assert len(stories.tokenizer) == 512 and stories.tokenizer.is_fast


@needs_stories
def test_stories_greedy_generation_reproduces_reference(stories: LoadedModel) -> None:
    pairs = _reference_generations()
    assert len(pairs) == 2
    n_new = 12
    for prompt, reference in pairs:
        assert reference.startswith(prompt)
        ids = stories.tokenizer(prompt, return_tensors="pt").input_ids  # [1, pos], BOS first
        cache = DynamicCache(config=stories.hf_model.config)
        step_input, generated = ids, ids
        with torch.no_grad():
            for _ in range(n_new):
                logits = stories.bridge(step_input, return_type="logits", past_key_values=cache)
                step_input = logits[:, -1].argmax(-1, keepdim=True)  # [1, 1]
                generated = torch.cat([generated, step_input], dim=1)
            full_logits = stories.bridge(generated[:, :-1], return_type="logits")
        # Greedy with the cache = greedy recomputing everything, token for token.
        assert torch.equal(full_logits[0, ids.shape[1] - 1 :].argmax(-1), generated[0, ids.shape[1] :])
        text = stories.tokenizer.decode(generated[0], skip_special_tokens=True)
        assert len(text) > len(prompt) + 20
        assert reference.startswith(text), (text, reference)


@needs_stories
def test_stories_bridge_and_kv_parity(stories: LoadedModel) -> None:
    prompt, reference = _reference_generations()[0]
    ids = stories.tokenizer(reference, return_tensors="pt").input_ids[:, :48]
    with torch.no_grad():
        bridge_logits = stories.bridge(ids, return_type="logits")
        hf_logits = _hf_eager(STORIES)(ids).logits
    assert (bridge_logits - hf_logits).abs().max().item() <= HF_TOL
    assert kv_parity(stories, ids, 20) <= PARITY_TOL
