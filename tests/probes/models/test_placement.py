"""A model bigger than one device: the placement plan for the published Qwen2.5-14B / -32B shapes
(meta device, nothing allocated or downloaded), the `--device-map` / `--max-memory` flags, and the
device-map load path on the CPU.

What needs several GPUs (the real split forward) cannot run here; see probes/models/placement.py.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from probes.models.kv import kv_parity
from probes.models.load import load_model
from probes.models.placement import (
    PlacementError,
    max_memory_bytes,
    parse_max_memory,
    plan_device_map,
)
from probes.models.spec import ModelSpec
from probes.models.tiny import byte_tokenizer, tiny_config

# The published config.json shapes (Qwen/Qwen2.5-14B and Qwen/Qwen2.5-32B; the DeepSeek-R1-Distill
# 14B / 32B models share them), as dicts: nothing is read from the hub.
QWEN25_14B = {
    "model_type": "qwen2", "hidden_size": 5120, "intermediate_size": 13824,
    "num_hidden_layers": 48, "num_attention_heads": 40, "num_key_value_heads": 8,
    "vocab_size": 152064, "max_position_embeddings": 131072, "rms_norm_eps": 1e-5,
    "rope_theta": 1000000.0, "tie_word_embeddings": False,
}
QWEN25_32B = {**QWEN25_14B, "intermediate_size": 27648, "num_hidden_layers": 64}
SHAPES = {"14B": QWEN25_14B, "32B": QWEN25_32B}
TWO_CARDS = {0: "80GB", 1: "80GB"}
BYTES = {"bfloat16": 2, "float32": 4}


def _params(cfg: dict) -> int:
    """Parameter count of a Qwen2 shape (q/k/v biases, untied embeddings)."""
    d, f, n, v = (cfg[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                   "vocab_size"))
    kv = d // cfg["num_attention_heads"] * cfg["num_key_value_heads"]
    layer = d * d + 2 * d * kv + (d + 2 * kv) + d * d + 3 * d * f + 2 * d
    return n * layer + 2 * v * d + d


def _placement(plan: dict[str, int | str], n_layers: int) -> dict[str, int | str]:
    """Device of every decoder layer and of the embedding / final norm / head (a module is placed
    when it or a parent, the root "" included, is in the plan)."""
    names = [f"model.layers.{i}" for i in range(n_layers)] + [
        "model.embed_tokens", "model.norm", "lm_head"]
    out = {}
    for name in names:
        parts = name.split(".")
        prefixes = [".".join(parts[:i]) for i in range(len(parts), 0, -1)] + [""]
        hit = next((p for p in prefixes if p in plan), None)
        assert hit is not None, f"{name} is not placed"
        out[name] = plan[hit]
    return out


def test_published_shapes_have_the_published_sizes() -> None:
    """14.8e9 and 32.8e9 parameters (the model cards say 14.7B / 32.5B, of which 13.1B / 31.0B
    outside the embeddings)."""
    assert abs(_params(QWEN25_14B) / 1e9 - 14.77) < 0.05
    assert abs(_params(QWEN25_32B) / 1e9 - 32.76) < 0.05


@pytest.mark.parametrize("size", sorted(SHAPES))
@pytest.mark.parametrize("dtype", sorted(BYTES))
def test_two_80gb_cards_place_every_layer(size: str, dtype: str) -> None:
    cfg = SHAPES[size]
    placed = _placement(plan_device_map(cfg, max_memory=TWO_CARDS, dtype=dtype),
                        cfg["num_hidden_layers"])
    assert set(placed.values()) <= {0, 1}, placed        # nothing on the CPU or disk
    weights = _params(cfg) * BYTES[dtype]
    assert (set(placed.values()) == {0, 1}) == (weights > 80e9)   # split only when needed


@pytest.mark.parametrize("size", sorted(SHAPES))
@pytest.mark.parametrize("dtype", sorted(BYTES))
def test_what_fits_one_80gb_card(size: str, dtype: str) -> None:
    """Weights alone: both shapes fit one 80 GB card in bf16 (29.5 / 65.5 GB) and the 14B in fp32
    (59 GB); the 32B in fp32 (131 GB) does not: accelerate sends ~30 layers to the CPU. The
    activations of a long trace come on top (see the memory projection in docs/benchmarks.md)."""
    cfg = SHAPES[size]
    weights = _params(cfg) * BYTES[dtype]
    placed = _placement(plan_device_map(cfg, max_memory={0: "80GB", "cpu": "1000GB"},
                                        dtype=dtype), cfg["num_hidden_layers"])
    fits = set(placed.values()) == {0}
    assert fits == (weights < 80e9), (size, dtype, weights / 1e9)
    assert fits == (not (size == "32B" and dtype == "float32"))


def test_32b_bf16_with_room_for_activations_needs_two_cards() -> None:
    """Leaving 40 GiB per card for activations and the KV cache, the 32B in bf16 (61 GiB of
    weights) no longer fits one card but fits two; "balanced" spreads the layers evenly."""
    n = QWEN25_32B["num_hidden_layers"]
    one = _placement(plan_device_map(QWEN25_32B, max_memory={0: "40GiB", "cpu": "1000GiB"}), n)
    assert "cpu" in one.values()
    two = _placement(plan_device_map(QWEN25_32B, max_memory={0: "40GiB", 1: "40GiB"}), n)
    assert set(two.values()) == {0, 1}
    balanced = _placement(plan_device_map(QWEN25_32B, max_memory=TWO_CARDS,
                                          strategy="balanced"), n)
    per_card = [sum(1 for k, v in balanced.items() if k.startswith("model.layers.") and v == c)
                for c in (0, 1)]
    assert sum(per_card) == n and abs(per_card[0] - per_card[1]) <= 4, per_card


def test_parse_max_memory_and_model_specs() -> None:
    assert parse_max_memory("0=75GiB, 1=75GiB,cpu=200GB") == {0: "75GiB", 1: "75GiB",
                                                              "cpu": "200GB"}
    assert max_memory_bytes({0: "1GiB", "cpu": "2GB"}) == {0: 2**30, "cpu": 2 * 10**9}
    spec = ModelSpec("m", max_memory="0=75GiB,1=75GiB")          # a budget implies a map
    assert (spec.device, spec.device_map, spec.max_memory_map) == (
        "auto", "auto", {0: "75GiB", 1: "75GiB"})
    assert ModelSpec("m", max_memory={0: "1GiB", "cpu": "2GB"}).max_memory == "0=1GiB,cpu=2GB"
    assert (ModelSpec("m", device="cuda:1").device_map, ModelSpec("m").max_memory_map) == (None, None)
    for bad, message in (("0=lots", "cannot read '0=lots'"), ("gpu0=1GiB", "cannot read"),
                         ("0=1GiB,0=2GiB", "device '0' is given twice")):
        with pytest.raises(PlacementError, match=f"^--max-memory: {message}"):
            parse_max_memory(bad)
        with pytest.raises(PlacementError, match=f"^--max-memory: {message}"):
            ModelSpec("m", max_memory=bad)
    with pytest.raises(PlacementError, match=r"^--device cuda:1 and --device-map auto conflict"):
        ModelSpec("m", device="cuda:1", device_map="auto")
    with pytest.raises(PlacementError, match=r"^--device-map 'everywhere' is not one of auto"):
        ModelSpec("m", device_map="everywhere")


def _parser() -> argparse.ArgumentParser:
    from probes.commands.flags import model_flags

    p = argparse.ArgumentParser(prog="probes")
    model_flags(p)
    return p


def test_flags_build_the_model_spec() -> None:
    """--device-map / --max-memory reach `load_model` as fields of the `ModelSpec`, in any order."""
    from probes.commands.flags import model_from_args

    p = _parser()
    assert model_from_args(p.parse_args(["--model", "m"])) == ModelSpec("m")
    a = p.parse_args(["--model", "m", "--max-memory", "0=75GiB,1=75GiB", "--device-map",
                      "balanced"])
    b = p.parse_args(["--model", "m", "--device-map", "balanced", "--max-memory",
                      "0=75GiB,1=75GiB", "--device", "auto", "--model-dtype", "bfloat16"])
    assert model_from_args(a) == ModelSpec("m", device_map="balanced", max_memory="0=75GiB,1=75GiB")
    assert model_from_args(b) == ModelSpec("m", dtype="bfloat16", device_map="balanced",
                                           max_memory="0=75GiB,1=75GiB")
    assert model_from_args(p.parse_args(["--model", "m", "--max-memory", "cpu=1GiB"])).device_map \
        == "auto"


def test_bad_flags_are_one_line_errors(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        _parser().parse_args(["--model", "m", "--max-memory", "0:75GiB"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("probes: error: argument --max-memory: cannot read '0:75GiB'")
    with pytest.raises(SystemExit):
        _parser().parse_args(["--model", "m", "--device-map", "gpu"])
    assert "invalid choice: 'gpu'" in capsys.readouterr().err


def test_device_map_load_path_on_cpu(tmp_path: Path) -> None:
    """`load_model` with a device map goes through accelerate's dispatch; on a CPU-only machine
    everything lands on the CPU (one device, no `hf_device_map`) and the bridge equals HF."""
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(tiny_config("qwen2"), attn_implementation="eager").eval()
    hf.save_pretrained(tmp_path)
    byte_tokenizer().save_pretrained(tmp_path)
    loaded = load_model(ModelSpec(str(tmp_path), max_memory="cpu=1GiB"))
    assert loaded.device == torch.device("cpu")
    ids = torch.randint(1, 257, (1, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (loaded.bridge(ids, return_type="logits") - hf(ids).logits).abs().max()
    assert float(diff) <= 1e-6 and kv_parity(loaded, ids, 9) <= 1e-4
    with pytest.raises(PlacementError, match="conflict"):
        load_model(ModelSpec(str(tmp_path), device_map="auto"), device="cpu")
