"""Tests for hooks.sites: the canonical site string, its one parser, the site tables and errors.

The tables are checked against real booted bridges (and plain HF models) of the four supported
architectures, built tiny and random in code (tests/hooks/_models.py). Offline, a few seconds.
"""

from collections.abc import Iterator

import pytest
import torch

from hooks import (
    SITE_TABLE,
    HookSite,
    UnknownSiteError,
    all_sites,
    available_components,
    parse_site,
    sites_for,
)
from hooks.errors import HooksError
from hooks.hf_fast import HF_SITE_PATHS
from hooks.model import ArchInfo, LoadedModel
from hooks.sites import bridge_hook_names, check_site
from tests.hooks._models import CONFIGS, build_tiny

ARCH_NAMES = sorted(CONFIGS)


@pytest.fixture(scope="module", autouse=True)
def _single_thread() -> Iterator[None]:
    """One intra-op thread: the 2 shared cores make torch's pool contend on tiny models."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def bridges() -> dict[str, LoadedModel]:
    return {name: build_tiny(name) for name in ARCH_NAMES}


def _arch(name: str) -> ArchInfo:
    return ArchInfo.from_hf_config(CONFIGS[name](), dtype="float32")


# ----------------------------------------------------------------------------------------------
# The string form and its parser
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "layer", "component"),
    [
        ("L12.resid_post", 12, "resid_post"),
        ("L3.attn.rot_k", 3, "attn.rot_k"),
        ("L0.delta", 0, "delta"),
        ("L10.mlp.post", 10, "mlp.post"),
        ("embed", None, "embed"),
        ("ln_final", None, "ln_final"),
        ("ln_final.scale", None, "ln_final.scale"),
    ],
)
def test_string_form_round_trips(text: str, layer: int | None, component: str) -> None:
    site = parse_site(text)
    assert site == HookSite(layer, component)
    assert str(site) == text
    assert hash(site) == hash(HookSite(layer, component))


def test_every_component_round_trips() -> None:
    for component, spec in SITE_TABLE.items():
        site = HookSite(7 if spec.per_layer else None, component)
        assert parse_site(str(site)) == site
        assert str(site) == (f"L7.{component}" if spec.per_layer else component)


def test_sites_are_frozen_values() -> None:
    site = HookSite(1, "resid_post")
    with pytest.raises(AttributeError):
        site.layer = 2  # type: ignore[misc]
    assert {site, HookSite(1, "resid_post")} == {site}


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("L03.resid_post", r"Cannot parse hook site 'L03.resid_post'.*without leading zeros"),
        ("l3.resid_post", r"Cannot parse hook site 'l3.resid_post'"),
        ("resid_post", r"'resid_post' is per-layer .* \(string form 'L0.resid_post'\)"),
        ("", r"Cannot parse hook site ''"),
        ("L3.resid_postt", r"Unknown hook-site component 'resid_postt'. Known components: \["),
        ("L1.embed", r"Component 'embed' is global .* layer=None"),
        ("blocks.0.hook_resid_post", r"Cannot parse hook site"),
    ],
)
def test_parse_rejects_non_canonical_strings(text: str, match: str) -> None:
    with pytest.raises(UnknownSiteError, match=match):
        parse_site(text)


def test_unknown_component_message_lists_every_valid_component() -> None:
    with pytest.raises(UnknownSiteError) as info:
        HookSite(0, "resid")
    for component in SITE_TABLE:
        assert repr(component) in str(info.value)
    assert "hooks/sites.py:SITE_TABLE" in str(info.value)


@pytest.mark.parametrize(
    ("layer", "component", "match"),
    [
        (None, "resid_post", r"per-layer and needs a layer index >= 0, got layer=None"),
        (-1, "resid_post", r"got layer=-1"),
        (True, "resid_post", r"got layer=True"),
        (2, "embed", r"'embed' is global .* got layer=2"),
    ],
)
def test_layer_must_fit_the_component(layer: object, component: str, match: str) -> None:
    with pytest.raises(UnknownSiteError, match=match):
        HookSite(layer, component)  # type: ignore[arg-type]


def test_error_family() -> None:
    assert issubclass(UnknownSiteError, HooksError)
    assert issubclass(UnknownSiteError, LookupError)


# ----------------------------------------------------------------------------------------------
# Expansion over layers and per-architecture availability
# ----------------------------------------------------------------------------------------------


def test_sites_for_expands_all_layers() -> None:
    arch = _arch("qwen2")
    assert [str(s) for s in sites_for(arch, "resid_post")] == ["L0.resid_post", "L1.resid_post"]
    assert sites_for(arch, "delta", layers=[1]) == (HookSite(1, "delta"),)
    assert sites_for(arch, "ln_final") == (HookSite(None, "ln_final"),)
    with pytest.raises(UnknownSiteError, match="'ln_final' is global; pass layers=None"):
        sites_for(arch, "ln_final", layers=[0])
    with pytest.raises(UnknownSiteError, match="Known components"):
        sites_for(arch, "residual")


def test_all_sites_is_component_major_without_duplicates() -> None:
    got = [str(s) for s in all_sites(_arch("llama"), ["resid_pre", "embed", "resid_pre", "delta"])]
    assert got == ["L0.resid_pre", "L1.resid_pre", "embed", "L0.delta", "L1.delta"]


def test_layer_out_of_range_names_the_valid_range() -> None:
    arch = _arch("qwen2")
    with pytest.raises(
        UnknownSiteError, match=r"'qwen2' model has 2 layers, valid layers are 0\.\.1"
    ):
        check_site("L2.resid_post", arch)
    with pytest.raises(UnknownSiteError, match=r"valid layers are 0\.\.1"):
        sites_for(arch, "resid_post", layers=[0, 5])


EXPECTED_MISSING = {
    "qwen2": {"pos_embed", "attn.q_normed", "attn.k_normed"},
    "llama": {"pos_embed", "attn.q_normed", "attn.k_normed"},
    "qwen3": {"pos_embed"},
    "gpt2": {"attn.rot_q", "attn.rot_k", "attn.q_normed", "attn.k_normed", "mlp.pre_linear"},
}


@pytest.mark.parametrize("name", ARCH_NAMES)
def test_available_components_per_architecture(name: str) -> None:
    assert set(SITE_TABLE) - set(available_components(_arch(name))) == EXPECTED_MISSING[name]


def test_missing_component_gives_a_clear_error() -> None:
    gpt2 = _arch("gpt2")
    with pytest.raises(
        UnknownSiteError,
        match=r"'attn.rot_q' is not available for architecture 'gpt2' \(needs positional in "
        r"\['rope'\]; this model has positional='learned'\). Components available for 'gpt2': ",
    ):
        sites_for(gpt2, "attn.rot_q")
    with pytest.raises(UnknownSiteError, match=r"'mlp.pre_linear' is not available .* mlp='plain'"):
        check_site("L0.mlp.pre_linear", gpt2)
    with pytest.raises(UnknownSiteError, match=r"'attn.q_normed' is not available .*'qwen2'"):
        check_site("L0.attn.q_normed", _arch("qwen2"))


# ----------------------------------------------------------------------------------------------
# The tables against real models
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ARCH_NAMES)
def test_every_table_hook_exists_on_the_bridge(name: str, bridges: dict[str, LoadedModel]) -> None:
    loaded = bridges[name]
    hook_dict = loaded.bridge.hook_dict
    for site in all_sites(loaded.arch, available_components(loaded.arch)):
        for hook_name in bridge_hook_names(site):
            assert hook_name in hook_dict, (name, str(site), hook_name)
    if name == "gpt2":  # the components the table marks missing really are missing
        for component in ("attn.rot_q", "attn.rot_k", "mlp.pre_linear"):
            assert SITE_TABLE[component].hook.format(layer=0) not in hook_dict


def test_delta_reads_resid_pre_and_resid_post() -> None:
    assert bridge_hook_names(HookSite(4, "delta")) == (
        "blocks.4.hook_resid_pre",
        "blocks.4.hook_resid_post",
    )
    assert bridge_hook_names(HookSite(None, "ln_final")) == ("ln_final.hook_out",)


@pytest.mark.parametrize("name", ARCH_NAMES)
def test_hf_paths_resolve_on_plain_models(name: str) -> None:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_config(CONFIGS[name]())
    arch = _arch(name)
    for component, (path, where) in HF_SITE_PATHS[name].items():
        assert component in SITE_TABLE and where in ("in", "out")
        for layer in range(arch.n_layers) if "{layer}" in path else [None]:
            hf.get_submodule(path.format(layer=layer))
