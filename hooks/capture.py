"""Scoped capture of hook sites from a TransformerLens bridge, reduced inside the hooks.

Entry point: `with capture(model, sites, positions=..., reduce=..., dtype=...) as store:`, then
run the bridge (one forward, or chunks through a KV cache) and read `store.result()` or
`store[site]` in or after the block. Hooks go through the bridge's own scoped `hooks()` context and
are removed on exit, also when the block raises; hooks added by others stay. Only the selected
rows, cast to the storage dtype, leave the device. Batch size 1 only.
"""

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from hooks.model import ArchInfo, LoadedModel
from hooks.reduce import (
    CaptureError,
    PositionSpec,
    Reduce,
    check_reducible,
    resolve_positions,
    resolve_storage,
)
from hooks.sites import DELTA, HookSite, UnknownSiteError, bridge_hook_names, check_site
from hooks.store import CHUNK_HOOK, CaptureStore

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge

__all__ = ["capture", "prepare_sites"]


def _bridge_and_arch(model: Any) -> tuple["TransformerBridge", ArchInfo]:
    if isinstance(model, LoadedModel):
        return model.bridge, model.arch
    if hasattr(model, "hook_dict") and hasattr(model, "original_model"):
        hf = model.original_model
        dtype = next((p.dtype for p in hf.parameters() if p.is_floating_point()), torch.float32)
        return model, ArchInfo.from_hf_config(hf.config, dtype=dtype)
    raise CaptureError(
        "capture() needs a LoadedModel (probes.models.load.load_model/boot_model) or a "
        f"TransformerBridge, got {type(model).__name__}. For a plain HF model use "
        "hooks.run_residual_hf."
    )


def prepare_sites(sites: Sequence[HookSite | str], arch: ArchInfo) -> tuple[HookSite, ...]:
    """Parse, check against the architecture and deduplicate (keeping order)."""
    if isinstance(sites, (str, HookSite)):
        sites = [sites]
    return tuple(dict.fromkeys(check_site(s, arch) for s in sites))


@contextmanager
def capture(
    model: "LoadedModel | TransformerBridge",
    sites: Sequence[HookSite | str],
    *,
    positions: PositionSpec = "all",
    spans: Mapping[str, tuple[int, int]] | None = None,
    reduce: Reduce = "none",
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = "cpu",
    position_offset: int = 0,
) -> Iterator[CaptureStore]:
    """Capture hook sites while the bridge runs inside the block; hooks are removed on exit.

    Each forward inside the block is the next chunk of one sequence (batch 1), e.g. a prefill in
    chunks through an HF `DynamicCache`:

        >>> with capture(loaded, ["L0.resid_post", "L1.delta"], positions="trajectory",
        ...              spans=trace.spans) as store:
        ...     cache = DynamicCache(config=loaded.hf_model.config)
        ...     for chunk in ids.split(512, dim=1):                       # [1, <=512]
        ...         loaded.bridge(chunk, past_key_values=cache)
        >>> store["L1.delta"].shape                                       # [n_trajectory, d_model]

    Args:
        model: A `LoadedModel` or its `TransformerBridge` (raw mode).
        sites: Sites or their strings (`"L3.resid_post"`); duplicates are dropped.
        positions: Global token positions to keep: "all", a span name from `spans`, a slice, or
            strictly increasing indices. For attention scores/patterns these are the query rows.
        spans: Named `(start, end)` ranges for `positions` (e.g. `TokenizedTrace.spans`).
        reduce: "none", or "norm" for the per-token fp32 L2 norm over the last axis.
        dtype: Storage dtype ("float32", "float16", "bfloat16"), cast on the device before the
            copy; None keeps each activation's dtype (ln scales are float32 even in bf16 models;
            `delta` takes the residual's dtype) and norms default to float32.
        device: Where stored tensors go ("cpu" default); None keeps them on the model's device.
        position_offset: Global position of the first token of the first forward (e.g. the length
            of a prefix already in the KV cache before the capture began).

    Yields:
        The `CaptureStore`; read `store.result()` / `store[site]` in or after the block.

    Raises:
        UnknownSiteError: For a site the model does not have (message lists the valid ones).
        CaptureError: For bad positions/reduce, batch size > 1, or an incomplete chunk on read.
    """
    bridge, arch = _bridge_and_arch(model)
    checked = prepare_sites(sites, arch)
    check_reducible(checked, reduce)
    store_dtype, store_device = resolve_storage(reduce, dtype, device)
    store = CaptureStore(
        checked,
        resolve_positions(positions, spans),
        reduce=reduce,
        dtype=store_dtype,
        device=store_device,
        position_offset=position_offset,
    )
    fwd_hooks = [(CHUNK_HOOK, _chunk_hook(store))]
    for site in checked:
        names = bridge_hook_names(site)
        absent = [n for n in (CHUNK_HOOK, *names) if n not in bridge.hook_dict]
        if absent:
            raise UnknownSiteError(
                f"The bridge of this {arch.family!r} model has no hook {absent} needed for "
                f"{str(site)!r}; the TransformerLens adapter may have renamed it. Fix the row of "
                f"{site.component!r} in hooks/sites.py:SITE_TABLE."
            )
        if site.component == DELTA:
            fwd_hooks.append((names[0], _site_hook(store.record_pre, site)))
            fwd_hooks.append((names[1], _site_hook(store.record_delta, site)))
        else:
            fwd_hooks.append((names[0], _site_hook(store.record, site)))
    # The bridge's scoped context removes exactly the handles it added, in `finally`.
    with bridge.hooks(fwd_hooks=fwd_hooks):
        yield store


def _chunk_hook(store: CaptureStore) -> Any:
    def hook(act: Tensor, hook: Any) -> None:
        if act.shape[0] != 1:
            raise CaptureError(
                f"capture() supports batch size 1 (one sequence, possibly in chunks); got a batch "
                f"of {act.shape[0]}. Run the sequences one at a time."
            )
        store.begin_chunk(int(act.shape[1]))

    return hook


def _site_hook(method: Any, site: HookSite) -> Any:
    def hook(act: Tensor, hook: Any) -> None:
        method(site, act)

    return hook
