"""Fast path for residual-level sites: the plain Hugging Face forward with sdpa and PyTorch hooks.

`run_residual_hf(model, ids, sites, ...)` captures resid_pre/mid/post, delta, attn_out, mlp_out,
embed and ln_final with the same reductions and result type as `hooks.capture`, without the bridge's
explicit `[head, q, k]` attention scores. Booting a bridge replaces the HF model's submodules by
bridge components in place (and forces eager attention), so this runs a private *view* of the model:
shallow copies of its modules with each bridge component swapped back for the HF module it wraps and
a config copy set to sdpa. Parameters and buffers are shared (no memory), the caller's model, its
modules, hooks and config are never changed. Caveat: models dispatched with accelerate hooks
(an instance-level `forward`) are refused; use `capture()` on the bridge for those.
"""

import copy
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, cast

import torch
from jaxtyping import Int
from torch import Tensor, nn

from hooks.capture import prepare_sites
from hooks.families import FAMILIES, SitePaths
from hooks.model import ArchInfo, LoadedModel
from hooks.reduce import CaptureError, PositionSpec, Reduce, resolve_positions, resolve_storage
from hooks.sites import DELTA, HookSite, UnknownSiteError
from hooks.store import Captured, CaptureStore

if TYPE_CHECKING:
    from transformers import Cache, PreTrainedModel

__all__ = ["HF_FAST_COMPONENTS", "HF_SITE_PATHS", "plain_view", "run_residual_hf"]

HF_FAST_COMPONENTS: tuple[str, ...] = (
    "embed", "resid_pre", "resid_mid", "resid_post", DELTA, "attn_out", "mlp_out", "ln_final"
)
"""Components the fast path can capture (all other sites need the bridge: `hooks.capture`)."""

HF_SITE_PATHS: dict[str, SitePaths] = {
    f.model_type: f.hf_site_paths for f in FAMILIES if f.hf_site_paths is not None
}
"""HF model_type -> component -> (module path in the CausalLM, first input "in" or output "out"):
the `hf_site_paths` of the `hooks.families` records. `delta` comes from resid_pre and resid_post.
"""

_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_backward_hooks",
    "_backward_pre_hooks",
)


def run_residual_hf(
    model: "LoadedModel | PreTrainedModel",
    ids: Int[Tensor, "batch pos"] | Int[Tensor, " pos"],
    sites: Sequence[HookSite | str],
    *,
    positions: PositionSpec = "all",
    spans: Mapping[str, tuple[int, int]] | None = None,
    reduce: Reduce = "none",
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = "cpu",
    position_offset: int | None = None,
    past_key_values: "Cache | None" = None,
    attn_implementation: str = "sdpa",
) -> Captured:
    """One forward of the plain HF model (sdpa) capturing residual-level sites.

    Equal to `capture()` on the bridge up to the attention kernel (<= 1e-5 in fp32 on the tests'
    models). For a long sequence, call it per chunk with one `DynamicCache` and join the results:

        >>> cache = DynamicCache(config=loaded.hf_model.config)
        >>> parts = [run_residual_hf(loaded, c, ["L5.delta"], past_key_values=cache)
        ...          for c in ids.split(1024, dim=1)]                     # positions are global

    Several short sequences can share one forward: pass them right-padded as `ids` `[batch, pos]`
    (no cache). Each row runs as if alone (causal attention: a token never sees the padding after
    it; positions count from 0 in every row), and the rows are captured as one flat sequence in
    row-major order: token `j` of row `b` is position `b * pos + j`, so `positions` selects rows
    of every sequence at once.

    Args:
        model: A `LoadedModel`, or an HF causal LM (booted into a bridge or not).
        ids: Token ids, `[1, pos]` or `[pos]`; or `[batch, pos]` right-padded (no cache).
        sites: Sites with components in `HF_FAST_COMPONENTS`.
        positions: As in `capture()`: "all", a span name, a slice, or increasing indices
            (of the flattened batch for `batch > 1`).
        spans: Named `(start, end)` ranges for `positions`.
        reduce: "none" or "norm" (fp32 per-token L2 norm).
        dtype: Storage dtype; None keeps the activation's (norms: float32).
        device: Storage device ("cpu" default); None keeps the model's.
        position_offset: Global position of `ids[0, 0]`; None = the cache's length (0 without one).
        past_key_values: An HF cache to continue from and extend (chunked prefill), or None.
        attn_implementation: Attention kernel of the private view ("sdpa" or "eager").

    Returns:
        The captured tensors with their global positions.

    Raises:
        UnknownSiteError: For a site outside `HF_FAST_COMPONENTS` or this model's layers, or an
            unsupported model family.
        CaptureError: For a batch with a cache, bad positions, or an accelerate-dispatched model.
    """
    hf = model.hf_model if isinstance(model, LoadedModel) else model
    family = str(hf.config.model_type)
    paths = HF_SITE_PATHS.get(family)
    if paths is None:
        raise UnknownSiteError(
            f"The HF fast path has no module table for model_type {family!r}; supported: "
            f"{sorted(HF_SITE_PATHS)}. Use hooks.capture on the bridge, or add the module paths "
            "to the family's record in hooks/families.py (hf_site_paths)."
        )
    arch = model.arch if isinstance(model, LoadedModel) else _arch_of(hf)
    checked = prepare_sites(sites, arch)
    slow = [str(s) for s in checked if s.component not in HF_FAST_COMPONENTS]
    if slow:
        raise UnknownSiteError(
            f"Sites {slow} need the bridge (hooks.capture): the HF fast path captures only the "
            f"components {list(HF_FAST_COMPONENTS)}."
        )
    if ids.ndim == 1:
        ids = ids.unsqueeze(0)  # [pos] -> [1, pos]
    if ids.ndim != 2 or (ids.shape[0] != 1 and past_key_values is not None):
        raise CaptureError(
            f"run_residual_hf takes ids of shape [pos], [1, pos], or [batch, pos] without a cache; "
            f"got {tuple(ids.shape)}"
            f"{' with past_key_values' if ids.ndim == 2 else ''}. Run cached sequences one at a "
            f"time."
        )
    if position_offset is None:
        position_offset = 0 if past_key_values is None else int(past_key_values.get_seq_length())
    store_dtype, store_device = resolve_storage(reduce, dtype, device)
    store = CaptureStore(
        checked,
        resolve_positions(positions, spans),
        reduce=reduce,
        dtype=store_dtype,
        device=store_device,
        position_offset=position_offset,
    )
    view = cast("PreTrainedModel", _plain_view(hf, attn_implementation))  # a copy: hf's class
    param = next(hf.parameters())
    store.begin_chunk(int(ids.numel()))
    handles: list[torch.utils.hooks.RemovableHandle] = []
    try:
        for site in checked:
            handles.extend(_register(view, paths, site, store))
        with torch.no_grad():
            view.base_model(
                input_ids=ids.to(param.device),
                past_key_values=past_key_values,
                use_cache=past_key_values is not None,
            )
    finally:
        for handle in handles:
            handle.remove()
    return store.result()


def _arch_of(hf: "PreTrainedModel") -> ArchInfo:
    dtype = next((p.dtype for p in hf.parameters() if p.is_floating_point()), torch.float32)
    return ArchInfo.from_hf_config(hf.config, dtype=dtype)


def _register(
    view: nn.Module,
    paths: Mapping[str, tuple[str, str]],
    site: HookSite,
    store: CaptureStore,
) -> list[torch.utils.hooks.RemovableHandle]:
    """Add the PyTorch hook(s) that feed one site into the store."""
    if site.component == DELTA:
        return [
            _hook(view, paths, "resid_pre", site.layer, lambda t: store.record_pre(site, t)),
            _hook(view, paths, "resid_post", site.layer, lambda t: store.record_delta(site, t)),
        ]
    return [_hook(view, paths, site.component, site.layer, lambda t: store.record(site, t))]


def _hook(
    view: nn.Module,
    paths: Mapping[str, tuple[str, str]],
    component: str,
    layer: int | None,
    sink: Any,
) -> torch.utils.hooks.RemovableHandle:
    path, where = paths[component]
    module = view.get_submodule(path.format(layer=layer))
    if where == "in":

        def pre_hook(mod: nn.Module, args: tuple, kwargs: dict) -> None:
            sink(_one_row(args[0] if args else kwargs["hidden_states"]))

        return module.register_forward_pre_hook(pre_hook, with_kwargs=True)

    def post_hook(mod: nn.Module, args: tuple, output: Any) -> None:
        sink(_one_row(output[0] if isinstance(output, tuple) else output))

    return module.register_forward_hook(post_hook)


def _one_row(t: Tensor) -> Tensor:
    """`[batch, pos, d]` as one row `[1, batch * pos, d]` (row-major; a view; batch 1 unchanged)."""
    return t if t.shape[0] == 1 else t.reshape(1, -1, *t.shape[2:])


def plain_view(hf: nn.Module, attn_implementation: str = "sdpa") -> nn.Module:
    """A plain-HF view of `hf` (booted into a bridge or not) with its own attention implementation.

    Parameters and buffers are shared (no copy; gradients reach the model's own parameters); the
    model, its modules, hooks and config are never changed. Used by `run_residual_hf` and by the
    linear-memory passes (`probes.measures.updates.sdpa_pass`).

    Raises:
        CaptureError: For a model with instance-level forwards (accelerate dispatch).
    """
    return _plain_view(hf, attn_implementation)


def _plain_view(hf: nn.Module, attn_implementation: str) -> nn.Module:
    """A plain-HF copy of `hf`'s module tree sharing its parameters and buffers.

    Bridge components are replaced by the module they wrap (`_original_component`), recursively;
    every module is a shallow copy with its own child/parameter/buffer dicts and empty hook dicts,
    and modules that hold the model config get a copy of it with `attn_implementation`.
    """
    from transformer_lens.model_bridge.generalized_components.base import GeneralizedComponent

    old_config = cast("PreTrainedModel", hf).config  # an HF causal LM (torch types it Tensor | Module)
    new_config = copy.deepcopy(old_config)
    new_config._attn_implementation = attn_implementation
    memo: dict[int, nn.Module] = {}

    def view_of(module: nn.Module) -> nn.Module:
        key = id(module)
        if key in memo:  # shared submodules (e.g. tied) stay shared in the view
            return memo[key]
        inner = module
        while isinstance(inner, GeneralizedComponent):
            original = inner._modules.get("_original_component")
            if original is None:
                break
            inner = original
        if "forward" in inner.__dict__:
            raise CaptureError(
                f"{type(inner).__name__} has an instance-level forward (accelerate dispatch or a "
                "patched model); the HF fast path cannot copy it. Use hooks.capture on the bridge."
            )
        view = copy.copy(inner)
        for name in _HOOK_DICTS:
            if name in inner.__dict__:
                object.__setattr__(view, name, OrderedDict())
        object.__setattr__(view, "_parameters", dict(inner._parameters))
        object.__setattr__(view, "_buffers", dict(inner._buffers))
        memo[key] = memo[id(inner)] = view
        object.__setattr__(
            view,
            "_modules",
            {n: None if c is None else view_of(c) for n, c in inner._modules.items()},
        )
        if inner.__dict__.get("config") is old_config:
            object.__setattr__(view, "config", new_config)
        return view

    return view_of(hf)
