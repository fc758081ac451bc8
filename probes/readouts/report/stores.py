"""What `report` reads: one store, or a folder of them (the demo's or `study`'s output DIR), sorted
by what each store holds (the array registry, `probes.arrays`), not by its file name.

A folder holds per-stage stores (e.g. `run.h5` with sites, L̂ and updates; `anchors.h5`,
`effects.h5`, `landscape.h5`, `variants.h5`, random-init controls beside them or under
`control/`) and JSON / JSONL outputs (`summary.json`, `compare.json`, a `compare-models --json`
output, graded samples). `find_stores` opens each store once and records its analyses; a store
whose model label names a random-init model is a control.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cache import CacheError, store_bytes
from probes import arrays
from probes.errors import ProbesError
from probes.readouts.loader import open_cache

ANALYSES: dict[str, tuple[str, ...]] = {
    "lhat": arrays.names(arrays.LHAT),
    "updates": arrays.names(arrays.UPDATES),
    "landscape": arrays.names(arrays.LANDSCAPE),
    "anchors": arrays.names(arrays.ANCHORS),
    "effects": arrays.names(arrays.EFFECTS),
}
"""Analysis -> the registry arrays that say a store holds it."""

REPORT_ANALYSES: tuple[str, ...] = ("lhat", "updates", "landscape", "anchors", "effects",
                                    "efficiency", "models", "generation")
"""Every analysis the report has a section for, in page order."""

_SEGMENTS = ".segments"
_PEEK = 3
"""Traces whose array names are read to tell what a store holds."""


@dataclass
class Store:
    """One store of the input.

    Attributes:
        path: The store (index file of a segmented store).
        meta: Its metadata.
        analyses: The analyses it holds (keys of `ANALYSES`, plus "sites" for activations).
        n_traces: Complete traces.
        bytes: Size on disk (index + segments).
        control: A random-init control (its model label says so).
    """

    path: Path
    meta: dict[str, Any]
    analyses: set[str]
    n_traces: int
    bytes: int
    control: bool = False


@dataclass
class Found:
    """The stores and outputs of a report's input.

    Attributes:
        root: The file or folder given.
        stores: Every readable store, in path order.
        jsons: File name (relative to root) -> parsed JSON object, for the `*.json` files.
        graded: JSONL files whose records carry a boolean `correct` (graded samples).
        problems: Files that could not be read (shown in the report, never silently dropped).
    """

    root: Path
    stores: list[Store] = field(default_factory=list)
    jsons: dict[str, Any] = field(default_factory=dict)
    graded: list[Path] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def holding(self, analysis: str, *, control: bool = False) -> list[Store]:
        """The stores that hold `analysis` (controls or not)."""
        return [s for s in self.stores if analysis in s.analyses and s.control == control]

    def primary(self) -> Store | None:
        """The store the token views and `compare` read: the trained-model store holding the
        most of L̂, updates and sites (the demo's `run.h5`); the first store if none does."""
        core = [s for s in self.stores if not s.control]
        if not core:
            return None

        def score(s: Store) -> tuple[int, int]:
            return (len(s.analyses & {"lhat", "updates", "sites"}), s.n_traces)

        return max(core, key=score)

    def control_of(self, store: Store, analysis: str) -> Store | None:
        """The random-init control holding `analysis` next to `store` (same folder first)."""
        cands = self.holding(analysis, control=True)
        same = [c for c in cands if c.path.parent == store.path.parent]
        pick = same or cands
        return pick[0] if pick else None


def _is_control(meta: dict[str, Any]) -> bool:
    return "random-init" in str(meta.get("model", ""))


def read_store(path: Path) -> Store:
    """What one store holds.

    Raises:
        CacheError: It cannot be read.
    """

    with open_cache(path) as reader:
        meta = dict(reader.metadata)
        ids = reader.trace_ids()
        names: set[str] = set()
        for tid in ids[:_PEEK]:
            names |= set(reader.trace(tid).names())
        has_sites = bool(reader.sites)
    held = {a for a, wanted in ANALYSES.items() if names & set(wanted)}
    if has_sites:
        held.add("sites")
    return Store(path=path, meta=meta, analyses=held, n_traces=len(ids), bytes=store_bytes(path),
                 control=_is_control(meta))


def _store_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*.h5")
                  if not any(part.endswith(_SEGMENTS) for part in p.relative_to(folder).parts[:-1]))


def _graded(path: Path) -> bool:
    try:
        with path.open(encoding="utf-8") as f:
            first = f.readline()
        return isinstance(json.loads(first).get("correct"), bool)
    except (OSError, ValueError, AttributeError):
        return False


def find_stores(path: Path) -> Found:
    """The stores (and JSON outputs) of a store or a folder.

    Raises:
        ProbesError: `path` does not exist, or a folder holds no store.
        CacheError: A single store given cannot be read.
    """

    path = Path(path)
    if path.is_file() or (not path.exists() and Path(str(path) + _SEGMENTS).is_dir()):
        return Found(root=path, stores=[read_store(path)])
    if not path.is_dir():
        raise ProbesError(f"{path}: no such store or folder; give a cache (.h5) or the output "
                          "folder of `demo` / `study`")
    found = Found(root=path)
    for file in _store_files(path):
        try:
            found.stores.append(read_store(file))
        except CacheError as err:
            found.problems.append(f"{file.relative_to(path)}: {err}")
    for file in sorted(path.rglob("*.json")):
        try:
            found.jsons[str(file.relative_to(path))] = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            found.problems.append(f"{file.relative_to(path)}: not JSON ({err})")
    found.graded = [f for f in sorted(path.rglob("*.jsonl")) if _graded(f)]
    if not found.stores:
        raise ProbesError(f"{path} holds no readable cache (*.h5); give a cache or the output "
                          "folder of `demo` / `study`"
                          + (f" ({'; '.join(found.problems)})" if found.problems else ""))
    return found
