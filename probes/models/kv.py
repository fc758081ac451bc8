"""The KV-cache shim for transformer-lens 4.3 on transformers >= 5.24, and `kv_parity`, the check
that a prefix run through the bridge's KV cache plus the suffix equals the full sequence.
"""

from __future__ import annotations

import functools
import importlib.metadata
from typing import Any

import torch

from hooks.model import LoadedModel
from probes.errors import ProbesError

_KV_SHIM_FROM = (5, 24)


def _kv_shim_needed(transformers_version: str) -> bool:
    """Whether this transformers version passes the KV cache to attention as `cache=`.

    transformers 5.24.0 renamed the keyword (`@deprecate_kwarg("past_key_values", "5.40.0",
    new_name="cache")`); TransformerLens 4.3.0's `AttentionBridge._update_kv_cache` reads only
    `past_key_values` / `layer_past`, so the cache silently stays empty. Compared on the release
    tuple so that a 5.24 dev or rc build counts as 5.24.
    """
    from packaging.version import Version

    return Version(transformers_version).release[:2] >= _KV_SHIM_FROM


def _install_kv_cache_shim() -> None:
    """Patch `AttentionBridge._update_kv_cache` to also read the cache from `cache=`. Idempotent.

    Every attention bridge in TL 4.3.0 (position-embeddings, joint-QKV, ALiBi, Bloom, CodeGen)
    calls `self._update_kv_cache(k, v, **kwargs)` and none overrides it, so patching the base
    class covers them all. The wrapper only acts when `past_key_values` and `layer_past` are both
    absent and `cache` is present, so it is a no-op on transformers < 5.24.
    """
    from transformer_lens.model_bridge.generalized_components.attention import (
        AttentionBridge,
    )

    current = AttentionBridge._update_kv_cache
    if getattr(current, "_probes_kv_shim", False):
        return

    @functools.wraps(current)
    def _update_kv_cache(
        self: Any, k: torch.Tensor, v: torch.Tensor, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if (
            kwargs.get("past_key_values") is None
            and kwargs.get("layer_past") is None
            and kwargs.get("cache") is not None
        ):
            kwargs["past_key_values"] = kwargs["cache"]
        return current(self, k, v, **kwargs)

    _update_kv_cache._probes_kv_shim = True  # type: ignore[attr-defined]
    AttentionBridge._update_kv_cache = _update_kv_cache  # type: ignore[method-assign]


def ensure_kv_cache_shim() -> None:
    """Install the KV-cache shim when the installed transformers needs it (>= 5.24).

    pyproject pins transformers < 5.24, but an environment that ignores the pin (a user upgrade,
    another package's requirement) would otherwise get KV-cached logits off by ~4 with no warning
    (docs/tooling.md#kv-cache). `kv_parity` and the tests detect that failure either way.
    """
    if _kv_shim_needed(importlib.metadata.version("transformers")):
        _install_kv_cache_shim()


@torch.no_grad()
def kv_parity(loaded: LoadedModel, ids: torch.Tensor, split: int) -> float:
    """Max |logits via KV cache - logits of the full sequence| over the suffix positions.

    Runs `ids[:, :split]` into a fresh HF `DynamicCache`, then `ids[:, split:]` with
    `past_key_values=cache`, and compares the suffix logits with one forward over all of `ids`.
    A working cache gives ~1e-6 in float32; a silently ignored cache (TL 4.3.0 with
    transformers >= 5.24 without the shim) gives ~1 or more.

    Args:
        loaded: The model.
        ids: Token ids, [batch, pos] or [pos]; no padding.
        split: Prefix length, 0 < split < pos.

    Returns:
        The largest absolute difference, as a float.

    Raises:
        ProbesError: If `split` is out of range.
    """
    from transformers import DynamicCache

    if ids.ndim == 1:
        ids = ids.unsqueeze(0)  # [pos] -> [1, pos]
    n_pos = ids.shape[1]
    if not 0 < split < n_pos:
        raise ProbesError(
            f"kv_parity split={split} is out of range for {n_pos} tokens; use 0 < split < {n_pos}."
        )
    ids = ids.to(loaded.device)
    bridge = loaded.bridge
    full = bridge(ids, return_type="logits")  # [batch, pos, vocab]
    cache = DynamicCache(config=loaded.hf_model.config)
    bridge(ids[:, :split], return_type="logits", past_key_values=cache)
    suffix = bridge(ids[:, split:], return_type="logits", past_key_values=cache)
    diff = (suffix.float() - full[:, split:].float()).abs().max()
    return float(diff)
