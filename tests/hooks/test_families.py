"""The family records (`hooks.families`): each one is consistent, and every per-family table of
the toolkit is derived from them, so removing a record removes its family everywhere."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import transformers

from hooks.families import FAMILIES, WEIGHT_LAYOUTS, Family, family_named, family_of_model_type

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_record_is_consistent(family: Family) -> None:
    """Its tiny config is of its causal LM's model_type, its names are its own, and an updates
    family has at least one pass."""
    config = getattr(transformers, family.tiny_config)(**family.tiny_kwargs)
    assert config.model_type == family.model_type
    assert family_named(family.name) is family
    assert family_of_model_type(family.model_type) is family
    assert family.weight_layout in WEIGHT_LAYOUTS
    assert family.update_passes if family.updates else family.update_passes == ()


def test_names_and_model_types_are_unique() -> None:
    names = [f.name for f in FAMILIES]
    types = [t for f in FAMILIES for t in f.hf_model_types]
    assert len(set(names)) == len(names) and len(set(types)) == len(types)


def test_a_bad_weight_layout_is_refused() -> None:
    with pytest.raises(ValueError, match=r"^Family 'x': weight_layout 'mamba' is not one of "):
        Family(name="x", hf_model_types=("x",), label="X", weight_layout="mamba",
               tiny_config="LlamaConfig", tiny_kwargs={})


# Run in a fresh interpreter: drop one record, import every module that keeps a per-family table,
# and list each module-level table entry (element, key or value) that names the dropped family.
_WITHOUT = r"""
import dataclasses, importlib, json, sys
import hooks.families as hf

CONSUMERS = ("hooks.model", "hooks.sites", "hooks.hf_fast", "hooks.weights",
             "probes.measures.updates.families", "probes.measures.updates.sdpa_pass",
             "probes.models.tiny")
LAYOUTS = "hooks.weights._LAYOUT_BUILDERS"   # code per weight layout (named after a family)
ALL, result = hf.FAMILIES, {}
for record in ALL:
    for name in CONSUMERS:
        sys.modules.pop(name, None)
    hf.FAMILIES = tuple(f for f in ALL if f is not record)
    gone = {record.name, *record.hf_model_types}

    def named(value, seen):
        if id(value) in seen:
            return
        seen.add(id(value))
        if isinstance(value, str):
            yield value
        elif isinstance(value, dict):
            for k, v in value.items():
                yield from named(k, seen)
                yield from named(v, seen)
        elif isinstance(value, (tuple, list, set, frozenset)):
            for v in value:
                yield from named(v, seen)
        elif isinstance(value, hf.Family):     # a record (its weight_layout "llama" is no family)
            yield from (value.name, *value.hf_model_types)
        elif dataclasses.is_dataclass(value) and not isinstance(value, type):
            for f in dataclasses.fields(value):
                yield from named(getattr(value, f.name), seen)

    found = []
    for name in CONSUMERS:
        module = importlib.import_module(name)
        for attr, value in vars(module).items():
            if attr.startswith("__") or isinstance(value, str) or f"{name}.{attr}" == LAYOUTS:
                continue
            found += [f"{name}.{attr}: {s}" for s in named(value, set()) if s in gone]
    weights = sys.modules["hooks.weights"]
    if record.label in weights.LLAMA_STYLE:
        found.append(f"hooks.weights.LLAMA_STYLE: {weights.LLAMA_STYLE}")
    try:
        sys.modules["probes.models.tiny"].tiny_config(record.name)
        found.append(f"tiny_config({record.name!r}) still builds")
    except ValueError:
        pass
    result[record.name] = found
print(json.dumps(result))
"""


def test_removing_a_record_removes_the_family_from_every_table() -> None:
    """Every table in hooks.model, hooks.sites, hooks.hf_fast, hooks.weights,
    probes.measures.updates.{families,sdpa_pass} and probes.models.tiny comes from the records:
    with one record dropped, none of them names that family (and tiny_config refuses it)."""
    out = subprocess.run([sys.executable, "-c", _WITHOUT], capture_output=True, text=True,
                         cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    left = json.loads(out.stdout.splitlines()[-1])
    assert set(left) == {f.name for f in FAMILIES}
    assert left == {f.name: [] for f in FAMILIES}
