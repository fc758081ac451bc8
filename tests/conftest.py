"""Shared fixtures: the real third-party data under `../shared/data` (skipped when absent)."""

from pathlib import Path

import pytest
import torch

_ROOT = Path(__file__).resolve().parents[1]
_SHARED_DATA_CANDIDATES = (_ROOT.parent / "shared" / "data", _ROOT / "shared" / "data")


def _shared_data(relative: str) -> Path:
    """Path of `relative` inside the shared data folder; skips the test when it is absent."""
    for base in _SHARED_DATA_CANDIDATES:
        if (base / relative).exists():
            return base / relative
    pytest.skip(
        f"shared test data {relative!r} not found under "
        f"{[str(b) for b in _SHARED_DATA_CANDIDATES]}"
    )


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """Tiny test models run fastest on one thread (and CI machines have two shared cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def qwen_tokenizer_dir() -> Path:
    """Folder with the real Qwen3 tokenizer files and two extra chat templates (.jinja)."""
    return _shared_data("tokenizers/qwen")


@pytest.fixture(scope="session")
def qwen_tokenizer(qwen_tokenizer_dir):
    """The real Qwen3 fast tokenizer (`<think>`=151667, `</think>`=151668), loaded once."""
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(qwen_tokenizer_dir)


@pytest.fixture(scope="session")
def stories260k_dir() -> Path:
    """Folder of the real stories260K Llama checkpoint (SentencePiece, no chat template)."""
    return _shared_data("models/stories260K")


@pytest.fixture(scope="session")
def real_traces_path() -> Path:
    """The 487 real DeepSeek-R1-Distill-Qwen-1.5B MATH traces (JSONL)."""
    return _shared_data("traces/r1-distill-qwen-1.5b-math.jsonl")


@pytest.fixture(scope="session")
def real_tokenized_traces(qwen_tokenizer, real_traces_path):
    """The real traces tokenized with the Qwen3 tokenizer (default prompt and scaffold), once."""
    from probes.traces.read import read_traces
    from probes.traces.tokenize import tokenize_traces

    tokenized, too_long = tokenize_traces(read_traces(real_traces_path, strict=True),
                                          qwen_tokenizer)
    assert not too_long
    return tokenized
