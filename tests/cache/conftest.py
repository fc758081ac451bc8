"""Fixtures of the cache tests: run metadata and a small deterministic cache file."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest

from cache import SiteArray, float32_to_bf16_bits, open_writer

CODES = {"ordinary": 0, "reflection": 1, "delimiter": 2, "prompt": 3, "scaffold": 4, "answer": 5}
_METADATA = {
    "model": "tests/tiny-qwen2",
    "architecture": {"family": "qwen2", "n_layers": 3, "d_model": 16, "n_heads": 2,
                     "n_kv_heads": 1, "d_head": 8, "dtype": "float32",
                     "weight_convention": "hf"},
    "model_dtype": "float32",
    "weight_convention": "hf",
    "tokenizer_fingerprint": "tokenizer-sha-1",
    "lexicon_fingerprint": "lexicon-sha-1",
    "category_codes": CODES,
    "config": {"sites": ["resid_post"], "positions": "all", "storage_dtype": "float32",
               "scaffold": "\n\n**Final Answer**\n\\boxed{"},
    "versions": {"transformers": "5.10.0", "transformer_lens": "4.3.0"},
    "info": {"lexicon": {"reflection": ["Wait"]}},
}


@pytest.fixture
def metadata() -> dict:
    """Valid writer metadata (a fresh deep copy per test)."""
    return copy.deepcopy(_METADATA)


def make_trace(i: int, n: int = 40, *, layers: int = 3, d: int = 16) -> dict:
    """Deterministic `write_trace` kwargs: a float32 and a bf16 site, categories, spans, text."""
    rng = np.random.default_rng(i)
    values = rng.standard_normal((n, layers, d)).astype(np.float32)
    category = np.zeros(n, np.uint8)
    category[:4] = CODES["prompt"]
    category[4:n - 4:5] = CODES["reflection"]
    category[n - 4:] = CODES["answer"]
    return {
        "tokens": rng.integers(0, 151_000, n),
        "category": category,
        "spans": {"prompt": (0, 4), "trajectory": (4, n - 4), "answer": (n - 4, n)},
        "sites": {"resid_post": values,
                  "resid_bf16": SiteArray(float32_to_bf16_bits(values), dtype="bfloat16")},
        "text": {"question": f"What is {i} + {i}?", "answer": str(2 * i)},
        "source": f"traces.jsonl:{i + 1}",
        "attrs": {"correct": bool(i % 2)},
    }


@pytest.fixture
def small_cache(tmp_path: Path, metadata: dict) -> Path:
    """A cache with traces "t0", "t1", "t2" from `make_trace`."""
    path = tmp_path / "small.h5"
    with open_writer(path, metadata=metadata) as writer:
        for i in range(3):
            writer.write_trace(f"t{i}", **make_trace(i))
    return path


@pytest.fixture
def trace_kwargs():
    """The `make_trace(i, n=40, *, layers=3, d=16)` factory."""
    return make_trace
