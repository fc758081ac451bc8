"""Scoped write hooks: edit activations during a forward (masks, patches, ablations), removed on exit.

Next to scoped capture (`hooks.capture`), the same site names write instead of read:

- `edit(model, [(site, fn), ...])`: a bridge forward inside the block runs `fn(activation, hook)`
  at each site; a returned tensor replaces the activation. Sites are canonical strings such as
  `"L3.mlp.pre"` or `HookSite`s; nobody outside `hooks/` types a bridge hook name.
- `mask_keys(rows, keys)`: an `attn.scores` edit that removes `keys` from the softmax of `rows`
  (score −inf), position ids untouched.
- `mask_keys_per_row(key_masks)`: the same with its own key set per batch row (several masked
  variants of one sequence in one batched forward).
- `module_hooks([(module, kind, fn), ...])`: plain PyTorch forward / pre-forward hooks on Hugging
  Face modules (for passes that run the HF model directly), removed on exit even on error.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Literal

import torch
from jaxtyping import Float
from torch import Tensor, nn

from hooks.errors import HooksError
from hooks.model import LoadedModel
from hooks.sites import DELTA, HookSite, bridge_hook_names, parse_site

EditFn = Callable[[Tensor, Any], "Tensor | None"]
"""`fn(activation, hook)`: return a tensor to replace the activation, or None to keep it."""

ModuleHookKind = Literal["forward", "forward_pre"]


def hook_name(site: HookSite | str) -> str:
    """The bridge hook name of a site (`"L3.mlp.pre"` → `"blocks.3.mlp.hook_pre"`).

    Raises:
        HooksError: For `delta` (derived, not a hook) or an unknown site.
    """
    site = parse_site(site) if isinstance(site, str) else site
    if site.component == DELTA:
        raise HooksError("delta is derived (resid_post - resid_pre) and cannot be edited; edit "
                         "resid_pre or resid_post")
    return bridge_hook_names(site)[0]


@contextmanager
def edit(model: LoadedModel, edits: Sequence[tuple[HookSite | str, EditFn]]) -> Iterator[None]:
    """Run the bridge forwards inside the block with `edits` applied; removed on exit.

    Args:
        model: The booted model (its bridge runs the edits).
        edits: (site, fn) pairs, applied in order at each site.

    Raises:
        HooksError: A site the bridge has no hook for.
    """
    bridge = model.bridge
    fwd = [(hook_name(site), fn) for site, fn in edits]
    missing = sorted({name for name, _ in fwd if name not in bridge.hook_dict})
    if missing:
        raise HooksError(f"the bridge of {model.spec!r} has no hook {missing[0]!r} "
                         f"({len(missing)} missing); check the site against hooks.SITE_TABLE")
    with bridge.hooks(fwd_hooks=fwd):
        yield


def mask_keys(rows: Sequence[int], keys: Sequence[int], device: torch.device | str) -> EditFn:
    """An `attn.scores` edit that masks `keys` (score −inf) for the query `rows` only.

    Position ids are untouched, so the other rows and keys see exactly the full-context run.
    """
    r_idx = torch.as_tensor(list(rows), device=device)
    k_idx = torch.as_tensor(list(keys), device=device)

    def mask(
        scores: Float[Tensor, "batch head query key"], hook: object
    ) -> Float[Tensor, "batch head query key"]:
        scores = scores.clone()
        sub = scores[:, :, r_idx]
        sub[..., k_idx] = float("-inf")
        scores[:, :, r_idx] = sub
        return scores

    return mask


def mask_keys_per_row(key_masks: Tensor) -> EditFn:
    """An `attn.scores` edit that masks, for batch row b, the keys where `key_masks[b]` is True
    (score −inf for every query row and head), so one batched forward runs several masked variants
    of the same sequence. Position ids are untouched.

    Args:
        key_masks: bool [batch, n_keys]; the forward's batch must equal `key_masks.shape[0]`.
    """
    masks = key_masks.to(torch.bool)

    def mask(
        scores: Float[Tensor, "batch head query key"], hook: object
    ) -> Float[Tensor, "batch head query key"]:
        if scores.shape[0] != masks.shape[0] or scores.shape[-1] != masks.shape[1]:
            raise HooksError(f"mask_keys_per_row: masks {tuple(masks.shape)} do not fit scores "
                             f"{tuple(scores.shape)} (batch and key axes must match)")
        return scores.masked_fill(masks[:, None, None, :].to(scores.device), float("-inf"))

    return mask


@contextmanager
def module_hooks(
    hooks: Sequence[tuple[nn.Module, ModuleHookKind, Callable[..., Any]]],
) -> Iterator[None]:
    """Register plain PyTorch hooks on modules for the duration of the block.

    Args:
        hooks: (module, "forward" | "forward_pre", fn) triples; `fn` has PyTorch's signature for
            that kind (`fn(module, args, output)` / `fn(module, args)`).
    """
    handles = []
    try:
        for module, kind, fn in hooks:
            if kind == "forward":
                handles.append(module.register_forward_hook(fn))
            elif kind == "forward_pre":
                handles.append(module.register_forward_pre_hook(fn))
            else:
                raise HooksError(f"hook kind must be 'forward' or 'forward_pre', got {kind!r}")
        yield
    finally:
        for handle in handles:
            handle.remove()
