"""Hook sites: typed values with one canonical string form, mapped to hook names by data tables.

A `HookSite` is `(layer, component)`; `str(site)` is its only string form (`"L12.resid_post"`,
`"L3.attn.rot_k"`, `"embed"`, `"ln_final"`) and `parse_site` its only parser. `SITE_TABLE` maps
each component to the TransformerLens-bridge hook that produces it (the fast path's HF module table
is `hooks.hf_fast.HF_SITE_PATHS`). `sites_for` / `all_sites` expand "every layer" for an `ArchInfo`.
Caveat: `delta` is derived (resid_post - resid_pre), not a hook of its own.
"""

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

from hooks.errors import HooksError
from hooks.families import model_types
from hooks.model import ArchInfo

__all__ = [
    "DELTA",
    "SITE_TABLE",
    "HookSite",
    "Layout",
    "SiteSpec",
    "UnknownSiteError",
    "all_sites",
    "available_components",
    "bridge_hook_names",
    "check_site",
    "parse_site",
    "sites_for",
]


class UnknownSiteError(HooksError, LookupError):
    """A hook site, component or layer that does not exist (for this architecture)."""


Layout = Literal["pos d", "pos head d_head", "head pos d_head", "head pos key", "pos 1"]
"""Axis order of the bridge's activation at a hook, batch axis dropped (see `SiteSpec.layout`)."""


@dataclass(frozen=True)
class SiteSpec:
    """How to obtain one component from a TransformerLens bridge.

    Attributes:
        hook: Bridge hook name; per-layer templates contain `{layer}`. None for derived components.
        per_layer: True for `blocks.{layer}.*` components (site string `L{layer}.<component>`).
        layout: Axes of the hooked tensor after dropping batch. Captured tensors are stored as
            `[pos, d]`, `[pos, head, d_head]` (from both head layouts), `[head, pos, key]` or
            `[pos]`.
        requires: ArchInfo field -> allowed values; the component exists only where all match.
        doc: What the tensor is.
    """

    hook: str | None
    per_layer: bool
    layout: Layout
    doc: str
    requires: Mapping[str, tuple[str, ...]] = field(default_factory=dict)


DELTA = "delta"
"""The derived component: resid_post - resid_pre at the same layer (what the whole block writes)."""

_ROPE = {"positional": ("rope",)}
_QK_NORMED = {"family": model_types(lambda f: f.bridge_qk_normed)}   # Qwen3 (`hooks.families`)

SITE_TABLE: dict[str, SiteSpec] = {
    # Global sites (no layer).
    "embed": SiteSpec("hook_embed", False, "pos d", "token embedding (GPT-2: without positions)"),
    "pos_embed": SiteSpec("hook_pos_embed", False, "pos d", "learned position embedding",
                          {"positional": ("learned",)}),
    "ln_final": SiteSpec("ln_final.hook_out", False, "pos d", "final norm output (unembed input)"),
    "ln_final.scale": SiteSpec("ln_final.hook_scale", False, "pos 1", "final norm 1/rms (fp32)"),
    # Residual stream and what each block writes into it.
    "resid_pre": SiteSpec("blocks.{layer}.hook_resid_pre", True, "pos d", "block input"),
    "resid_mid": SiteSpec("blocks.{layer}.hook_resid_mid", True, "pos d",
                          "resid_pre + attn_out (input of ln2)"),
    "resid_post": SiteSpec("blocks.{layer}.hook_resid_post", True, "pos d", "block output"),
    DELTA: SiteSpec(None, True, "pos d", "resid_post - resid_pre (derived, computed in fp32)"),
    "attn_out": SiteSpec("blocks.{layer}.hook_attn_out", True, "pos d", "attention output"),
    "mlp_out": SiteSpec("blocks.{layer}.hook_mlp_out", True, "pos d", "MLP output"),
    # Norms (scale stays float32 even in bf16 models).
    "ln1.out": SiteSpec("blocks.{layer}.ln1.hook_out", True, "pos d", "attention input (normed)"),
    "ln1.scale": SiteSpec("blocks.{layer}.ln1.hook_scale", True, "pos 1", "ln1 1/rms (fp32)"),
    "ln2.out": SiteSpec("blocks.{layer}.ln2.hook_out", True, "pos d", "MLP input (normed)"),
    "ln2.scale": SiteSpec("blocks.{layer}.ln2.hook_scale", True, "pos 1", "ln2 1/rms (fp32)"),
    # Attention internals. k/v/rot_k/k_normed keep n_kv_heads under GQA (not expanded).
    "attn.q": SiteSpec("blocks.{layer}.attn.hook_q", True, "pos head d_head", "query, pre-RoPE"),
    "attn.k": SiteSpec("blocks.{layer}.attn.hook_k", True, "pos head d_head", "key, pre-RoPE"),
    "attn.v": SiteSpec("blocks.{layer}.attn.hook_v", True, "pos head d_head", "value"),
    "attn.rot_q": SiteSpec("blocks.{layer}.attn.hook_rot_q", True, "pos head d_head",
                           "query after RoPE", _ROPE),
    "attn.rot_k": SiteSpec("blocks.{layer}.attn.hook_rot_k", True, "pos head d_head",
                           "key after RoPE", _ROPE),
    "attn.q_normed": SiteSpec("blocks.{layer}.attn.hook_q_normed", True, "head pos d_head",
                              "query after QK-norm, pre-RoPE", _QK_NORMED),
    "attn.k_normed": SiteSpec("blocks.{layer}.attn.hook_k_normed", True, "head pos d_head",
                              "key after QK-norm, pre-RoPE", _QK_NORMED),
    "attn.z": SiteSpec("blocks.{layer}.attn.hook_z", True, "pos head d_head",
                       "per-head attention output before o_proj"),
    "attn.scores": SiteSpec("blocks.{layer}.attn.hook_attn_scores", True, "head pos key",
                            "pre-softmax scores, causal mask applied (finfo.min)"),
    "attn.pattern": SiteSpec("blocks.{layer}.attn.hook_pattern", True, "head pos key",
                             "attention probabilities"),
    # MLP internals.
    "mlp.pre": SiteSpec("blocks.{layer}.mlp.hook_pre", True, "pos d",
                        "pre-activation (gated: gate projection; plain: W_in x)"),
    "mlp.pre_linear": SiteSpec("blocks.{layer}.mlp.hook_pre_linear", True, "pos d",
                               "up projection of a gated MLP", {"mlp": ("gated",)}),
    "mlp.post": SiteSpec("blocks.{layer}.mlp.hook_post", True, "pos d",
                         "post-activation (gated: act(gate) * up)"),
}
"""Component -> how the bridge produces it (the one table of bridge hook sites)."""

_SITE_RE = re.compile(r"L(0|[1-9]\d*)\.(.+)")


@dataclass(frozen=True)
class HookSite:
    """One place in the model: a component, at a layer for per-layer components.

    `str(site)` is the canonical form used for HDF5 keys and the CLI: `"L{layer}.{component}"` for
    per-layer components, the bare component for global ones. Whether the layer exists and the
    component is available depends on the model; see `check_site`.

    Attributes:
        layer: Block index (>= 0) for per-layer components, None for global ones.
        component: A key of `SITE_TABLE`.

    Raises:
        UnknownSiteError: For an unknown component or a layer that does not fit the component.
    """

    layer: int | None
    component: str

    def __post_init__(self) -> None:
        spec = SITE_TABLE.get(self.component)
        if spec is None:
            raise UnknownSiteError(
                f"Unknown hook-site component {self.component!r}. Known components: "
                f"{sorted(SITE_TABLE)}. Add a row to hooks/sites.py:SITE_TABLE for a new one."
            )
        if spec.per_layer:
            if isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < 0:
                raise UnknownSiteError(
                    f"Component {self.component!r} is per-layer and needs a layer index >= 0, "
                    f"got layer={self.layer!r}; e.g. HookSite(0, {self.component!r}) "
                    f"(string form 'L0.{self.component}')."
                )
        elif self.layer is not None:
            raise UnknownSiteError(
                f"Component {self.component!r} is global (one per model) and takes layer=None, "
                f"got layer={self.layer!r}; its string form is {self.component!r}."
            )

    def __str__(self) -> str:
        return self.component if self.layer is None else f"L{self.layer}.{self.component}"

    @property
    def spec(self) -> SiteSpec:
        """This site's row of `SITE_TABLE`."""
        return SITE_TABLE[self.component]


def parse_site(text: str) -> HookSite:
    """Parse the canonical string form of a hook site (the only parser).

    Example:
        >>> parse_site("L12.resid_post")
        HookSite(layer=12, component='resid_post')
        >>> parse_site("ln_final")
        HookSite(layer=None, component='ln_final')

    Args:
        text: `"L{layer}.{component}"` (layer without leading zeros) or a global component.

    Returns:
        The site; `str(parse_site(text)) == text`.

    Raises:
        UnknownSiteError: If the text is not a canonical site string.
    """
    if not isinstance(text, str):
        raise UnknownSiteError(f"A hook site string is expected, got {text!r}.")
    match = _SITE_RE.fullmatch(text)
    if match:
        site = HookSite(int(match.group(1)), match.group(2))
    elif text in SITE_TABLE:
        site = HookSite(None, text)
    else:
        per_layer = sorted(c for c, s in SITE_TABLE.items() if s.per_layer)
        global_ = sorted(c for c, s in SITE_TABLE.items() if not s.per_layer)
        raise UnknownSiteError(
            f"Cannot parse hook site {text!r}. Write 'L<layer>.<component>' (e.g. 'L3.resid_post', "
            f"layer without leading zeros) with a per-layer component {per_layer}, or one of the "
            f"global components {global_}."
        )
    return site


def as_site(site: HookSite | str) -> HookSite:
    """Return `site` itself, or parse it when given as a string."""
    return site if isinstance(site, HookSite) else parse_site(site)


def _missing_requirement(component: str, arch: ArchInfo) -> str | None:
    for attr, allowed in SITE_TABLE[component].requires.items():
        value = getattr(arch, attr)
        if value not in allowed:
            return f"needs {attr} in {list(allowed)}; this model has {attr}={value!r}"
    return None


def available_components(arch: ArchInfo) -> tuple[str, ...]:
    """Components of `SITE_TABLE` that exist for this architecture, in table order."""
    return tuple(c for c in SITE_TABLE if _missing_requirement(c, arch) is None)


def check_site(site: HookSite | str, arch: ArchInfo) -> HookSite:
    """Check that a site exists for this architecture.

    Args:
        site: A site or its string form.
        arch: The model's architecture summary.

    Returns:
        The site (parsed if given as a string).

    Raises:
        UnknownSiteError: If the layer is out of range or the architecture lacks the component.
    """
    site = as_site(site)
    if site.layer is not None and site.layer >= arch.n_layers:
        raise UnknownSiteError(
            f"Layer {site.layer} of site {str(site)!r} is out of range: the {arch.family!r} model "
            f"has {arch.n_layers} layers, valid layers are 0..{arch.n_layers - 1}."
        )
    missing = _missing_requirement(site.component, arch)
    if missing is not None:
        raise UnknownSiteError(
            f"Component {site.component!r} is not available for architecture {arch.family!r} "
            f"({missing}). Components available for {arch.family!r}: "
            f"{list(available_components(arch))}."
        )
    return site


def bridge_hook_names(site: HookSite) -> tuple[str, ...]:
    """The bridge hook name(s) a site reads: one, or resid_pre and resid_post for `delta`."""
    if site.component == DELTA:
        return tuple(
            SITE_TABLE[c].hook.format(layer=site.layer)  # type: ignore[union-attr]
            for c in ("resid_pre", "resid_post")
        )
    return (site.spec.hook.format(layer=site.layer),)  # type: ignore[union-attr]


def sites_for(
    arch: ArchInfo, component: str, *, layers: Iterable[int] | None = None
) -> tuple[HookSite, ...]:
    """Expand a component into its sites: every layer (or `layers`), or the one global site.

    Example:
        >>> [str(s) for s in sites_for(arch, "resid_post")]        # a 2-layer model
        ['L0.resid_post', 'L1.resid_post']

    Args:
        arch: The model's architecture summary.
        component: A key of `SITE_TABLE`.
        layers: Layer subset for per-layer components (default: all); must be None for global ones.

    Returns:
        The sites, in layer order.

    Raises:
        UnknownSiteError: For an unknown or unavailable component or an out-of-range layer.
    """
    if component not in SITE_TABLE:
        HookSite(None, component)  # raises the unknown-component error
    if not SITE_TABLE[component].per_layer:
        if layers is not None:
            raise UnknownSiteError(f"Component {component!r} is global; pass layers=None.")
        return (check_site(HookSite(None, component), arch),)
    chosen = range(arch.n_layers) if layers is None else layers
    return tuple(check_site(HookSite(layer, component), arch) for layer in chosen)


def all_sites(arch: ArchInfo, components: Iterable[str]) -> tuple[HookSite, ...]:
    """Expand several components over all layers, component-major (all layers of the first, ...).

    Args:
        arch: The model's architecture summary.
        components: Keys of `SITE_TABLE`.

    Returns:
        The sites, without duplicates.

    Raises:
        UnknownSiteError: For an unknown or unavailable component.
    """
    out: dict[HookSite, None] = {}
    for component in components:
        out.update(dict.fromkeys(sites_for(arch, component)))
    return tuple(out)
