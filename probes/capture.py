"""Cache the activations of reasoning traces in an HDF5 file: `cache_traces`.

Entry point: `cache_traces(model, traces_path, out, CacheConfig(...), resume=...)` reads a JSONL of
traces, tokenizes and labels every token, runs the model over each trace in chunks through a KV
cache and writes one committed group per trace with `cache.open_writer` (schema v1,
`cache/SCHEMA.md`). Per trace and component the rows are stacked over layers to
`[n_sel, n_layers, d]` (`n_sel` = trajectory tokens, or all tokens). `inspect_cache` /
`format_inspect` summarise a written file.

Backends. Residual-stream components (`resid_pre/mid/post`, `delta`, `attn_out`, `mlp_out`,
`embed`, `ln_final`) go through `hooks.run_residual_hf`: the plain Hugging Face forward with sdpa
and PyTorch hooks, which `tests/hooks` proves equal to the bridge up to the attention kernel
(<= 1e-5 in float32) and which runs and uses memory like a plain forward (TOOLING-NOTES §1.6: the
bridge's eager attention is 2-6x slower and materialises [head, chunk, key] scores). Every other
component (q/k/v, MLP internals, norms) needs the bridge: `hooks.capture`. `backend="auto"` picks
the fast path whenever all requested components allow it; the choice is recorded in `/meta/info`.

Memory. Only one chunk's activations live at a time: each chunk's selected rows are cast to the
storage dtype on the device and copied into one preallocated output array per component (on an
accelerator they are stacked over layers first, so each component crosses to the host in one
transfer). Outputs larger than `CacheConfig.max_ram_mib` are spooled to an unlinked temporary
file beside the cache (memory-mapped), so anonymous memory does not grow with trace length; the
HDF5 writer then reads them from the page cache.

Caveats: batch size 1 (one trace at a time); traces longer than the model's context are skipped and
reported, never cut; attention scores/patterns cannot be cached (their rows are not tokens).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import math
import os
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from probes.errors import ProbesError
from probes.traces import DEFAULT_SCAFFOLD

if TYPE_CHECKING:
    from cache import CacheWriter
    from hooks import HookSite
    from probes.categories import Lexicon
    from probes.models import LoadedModel
    from probes.traces import TokenizedTrace

__all__ = [
    "BACKENDS",
    "DEFAULT_COMPONENTS",
    "POSITIONS",
    "STORAGE_DTYPES",
    "CacheConfig",
    "CacheRunResult",
    "TraceArrays",
    "cache_metadata",
    "cache_traces",
    "capture_trace",
    "choose_backend",
    "format_inspect",
    "format_run",
    "forward_plain",
    "inspect_cache",
    "resolve_cache_sites",
    "tokenizer_fingerprint",
]

DEFAULT_COMPONENTS: tuple[str, ...] = ("resid_post", "delta")
"""Components cached when no sites are given: every layer of each."""

POSITIONS: tuple[str, ...] = ("trajectory", "all")
"""Which tokens get site rows: the trajectory span, or every token."""

STORAGE_DTYPES: tuple[str, ...] = ("float16", "float32", "bfloat16")
"""Storage dtypes of site datasets (bfloat16 is stored as raw bits, `cache/SCHEMA.md`)."""

BACKENDS: tuple[str, ...] = ("auto", "hf", "bridge")
"""Capture backends: "hf" = `hooks.run_residual_hf`, "bridge" = `hooks.capture`."""

Log = Callable[[str], None]


# --------------------------------------------------------------------------------------------------
# Configuration and result


@dataclass(frozen=True)
class CacheConfig:
    """What to cache and how.

    Attributes:
        sites: Components for every layer ("resid_post", "delta", "attn_out", "mlp_out", ...),
            explicit sites ("L3.resid_post") or global components ("embed", "ln_final"). Each
            component becomes one dataset `[n_sel, n_layers, d]` (global ones `[n_sel, d]`).
        positions: "trajectory" (rows for trajectory tokens) or "all" (every token).
        dtype: Storage dtype: "float16" (default), "float32" or "bfloat16".
        chunk_size: Tokens per forward through the KV cache (prefill chunk); bounds memory.
        limit: Use only the first `limit` traces of the file (None: all).
        prompt_format: Prompt template with `{question}` (None: the chat template, else
            `probes.traces.DEFAULT_PROMPT_TEMPLATE`).
        scaffold: Text between trajectory and answer (RaML's by default).
        lexicon: Extra lexicon JSON files merged into the built-in one.
        backend: "auto", "hf" (plain HF forward, residual-level components only) or "bridge".
        max_ram_mib: Per-trace output up to this size is held in RAM; larger outputs are spooled
            to a temporary file beside the cache (0: always spool).
        strict: Fail on the first bad JSONL line instead of skipping it.

    Raises:
        ProbesError: For a value outside the allowed ones.
    """

    sites: tuple[str, ...] = DEFAULT_COMPONENTS
    positions: str = "trajectory"
    dtype: str = "float16"
    chunk_size: int = 512
    limit: int | None = None
    prompt_format: str | None = None
    scaffold: str = DEFAULT_SCAFFOLD
    lexicon: tuple[str, ...] = ()
    backend: str = "auto"
    max_ram_mib: float = 64.0
    strict: bool = False

    def __post_init__(self) -> None:
        sites = (self.sites,) if isinstance(self.sites, str) else tuple(self.sites)
        object.__setattr__(self, "sites", sites)
        object.__setattr__(self, "lexicon", tuple(str(p) for p in self.lexicon))
        if not sites or not all(isinstance(s, str) and s for s in sites):
            raise ProbesError(f"sites must be a non-empty list of site strings, got {self.sites!r}; "
                              f"e.g. {list(DEFAULT_COMPONENTS)} or ['L3.resid_post']")
        _check_choice("positions", self.positions, POSITIONS)
        _check_choice("dtype", self.dtype, STORAGE_DTYPES)
        _check_choice("backend", self.backend, BACKENDS)
        if isinstance(self.chunk_size, bool) or not isinstance(self.chunk_size, int) or (
                self.chunk_size < 1):
            raise ProbesError(f"chunk_size must be a positive integer, got {self.chunk_size!r}")
        if self.limit is not None and (
                isinstance(self.limit, bool) or not isinstance(self.limit, int) or self.limit < 1):
            raise ProbesError(f"limit must be a positive integer or None, got {self.limit!r}")
        if not isinstance(self.max_ram_mib, (int, float)) or self.max_ram_mib < 0:
            raise ProbesError(f"max_ram_mib must be a number >= 0, got {self.max_ram_mib!r}")


def _check_choice(name: str, value: Any, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ProbesError(f"{name} must be one of {list(allowed)}, got {value!r}")


@dataclass
class CacheRunResult:
    """What one `cache_traces` run did.

    Attributes:
        out: The cache file.
        n_selected: Traces read (after `limit`), before dropping too-long ones.
        n_written: Traces captured and committed in this run.
        n_skipped: Traces already complete in the file (resume).
        n_redone: Interrupted traces found in the file, deleted and (if selected) written again.
        n_too_long: Traces longer than the model's context, skipped.
        n_bad_lines: JSONL lines skipped as unreadable.
        n_tokens: Tokens run through the model in this run.
        n_rows: Site rows written (selected tokens).
        bytes_sites: Bytes of site data written (logical).
        seconds: Wall time of the capture loop (capture + write).
        seconds_total: Wall time of the whole call (model load, reading, tokenizing included).
        seconds_write: Time inside the HDF5 writer.
        backend: The capture backend used ("hf" or "bridge").
        file_bytes: Size of the cache file at the end.
        too_long: (id, line, n_tokens, limit) of each too-long trace.
        bad_lines: (line, reason) of each skipped line.
        nonfinite: Trace id -> number of non-finite stored values (float16 overflow), if any.
    """

    out: Path
    n_selected: int = 0
    n_written: int = 0
    n_skipped: int = 0
    n_redone: int = 0
    n_too_long: int = 0
    n_bad_lines: int = 0
    n_tokens: int = 0
    n_rows: int = 0
    bytes_sites: int = 0
    seconds: float = 0.0
    seconds_total: float = 0.0
    seconds_write: float = 0.0
    backend: str = ""
    file_bytes: int = 0
    too_long: list[tuple[str, int, int, int]] = field(default_factory=list)
    bad_lines: list[tuple[int, str]] = field(default_factory=list)
    nonfinite: dict[str, int] = field(default_factory=dict)

    @property
    def tokens_per_s(self) -> float:
        """Tokens per second of the capture loop."""
        return self.n_tokens / self.seconds if self.seconds > 0 else 0.0

    @property
    def write_mb_per_s(self) -> float:
        """Site data written per second inside the HDF5 writer (MB = 1e6 bytes)."""
        return self.bytes_sites / 1e6 / self.seconds_write if self.seconds_write > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict of every field plus `tokens_per_s` and `write_mb_per_s`."""
        out = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(self).items()}
        out["tokens_per_s"] = round(self.tokens_per_s, 1)
        out["write_mb_per_s"] = round(self.write_mb_per_s, 1)
        for key in ("seconds", "seconds_total", "seconds_write"):
            out[key] = round(out[key], 3)
        return out


# --------------------------------------------------------------------------------------------------
# Sites, backend, fingerprints, metadata


def resolve_cache_sites(
    sites: Sequence[str], arch: Any
) -> dict[str, tuple[int, ...] | None]:
    """Turn site strings into component -> layers (sorted), or None for a global component.

    A bare per-layer component ("resid_post") means every layer; "L3.resid_post" adds layer 3;
    a global component ("embed") stands for itself. Duplicates merge.

    Args:
        sites: Site strings.
        arch: The model's `ArchInfo`.

    Returns:
        Component -> sorted layer tuple (None for global components), in first-seen order.

    Raises:
        UnknownSiteError: For an unknown component or layer (the message lists the valid ones), or
            a component that is unavailable for this architecture or cannot be cached.
    """
    from hooks.sites import (
        SITE_TABLE,
        UnknownSiteError,
        available_components,
        check_site,
        parse_site,
    )

    cacheable = [c for c in available_components(arch) if SITE_TABLE[c].layout != "head pos key"]
    per_layer = [c for c in cacheable if SITE_TABLE[c].per_layer]
    global_ = [c for c in cacheable if not SITE_TABLE[c].per_layer]
    out: dict[str, set[int] | None] = {}
    for text in sites:
        if text in SITE_TABLE:
            spec = SITE_TABLE[text]
            site_list = (
                [parse_site(f"L{layer}.{text}") for layer in range(arch.n_layers)]
                if spec.per_layer else [parse_site(text)]
            )
        else:
            try:
                site_list = [parse_site(text)]
            except UnknownSiteError:
                raise UnknownSiteError(
                    f"Unknown site {text!r}. Give a component for every layer ({per_layer}), "
                    f"'L<layer>.<component>' for one layer (layers 0..{arch.n_layers - 1}), or a "
                    f"global component ({global_})."
                ) from None
        for site in site_list:
            check_site(site, arch)
            if site.spec.layout == "head pos key":
                raise UnknownSiteError(
                    f"Site {text!r} ({site.component}) cannot be cached: attention scores/patterns "
                    f"are [head, query, key], not one row per token. Cacheable components: "
                    f"{cacheable}."
                )
            if site.layer is None:
                out.setdefault(site.component, None)
            else:
                layers = out.setdefault(site.component, set())
                assert layers is not None  # a component is either per-layer or global
                layers.add(site.layer)
    return {c: (None if ls is None else tuple(sorted(ls))) for c, ls in out.items()}


def _hook_sites(site_map: Mapping[str, tuple[int, ...] | None]) -> list[HookSite]:
    from hooks.sites import HookSite

    return [HookSite(None, c) if ls is None else HookSite(layer, c)
            for c, ls in site_map.items() for layer in (ls if ls is not None else (None,))]


def choose_backend(
    loaded: LoadedModel, site_map: Mapping[str, tuple[int, ...] | None], backend: str = "auto"
) -> str:
    """The capture backend for these components: "hf" (fast path) or "bridge".

    Args:
        loaded: The model.
        site_map: From `resolve_cache_sites`.
        backend: "auto" (hf when every component and the model family allow it), "hf" or
            "bridge".

    Returns:
        "hf" or "bridge". (A model dispatched with accelerate hooks needs "bridge"; the fast
        path refuses it with a `CaptureError`.)

    Raises:
        ProbesError: `backend="hf"` for components or a family the fast path does not cover.
    """
    from hooks.hf_fast import HF_FAST_COMPONENTS, HF_SITE_PATHS

    _check_choice("backend", backend, BACKENDS)
    slow = [c for c in site_map if c not in HF_FAST_COMPONENTS]
    family_ok = loaded.arch.family in HF_SITE_PATHS
    if backend == "bridge":
        return "bridge"
    if backend == "hf":
        if slow or not family_ok:
            why = (f"components {slow} need the bridge" if slow else
                   f"model family {loaded.arch.family!r} has no fast-path table")
            raise ProbesError(f"backend 'hf' cannot capture this run: {why}; use backend 'auto' "
                              f"or 'bridge'")
        return "hf"
    return "hf" if not slow and family_ok else "bridge"


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 (hex) of what decides token ids: the backend tokenizer, chat template, special ids.

    Hashes `tokenizer.backend_tokenizer.to_str()` (without its transient truncation/padding state),
    the chat template, the special-token ids and the ids the tokenizer gives "a" with special
    tokens (whether it adds BOS). Two loads of the same files give the same fingerprint.

    Args:
        tokenizer: A Hugging Face fast tokenizer.

    Returns:
        64 hex characters.

    Raises:
        ProbesError: For a slow tokenizer (no backend to hash).
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ProbesError(f"{type(tokenizer).__name__} has no backend tokenizer to fingerprint; "
                          "load a fast tokenizer (tokenizer.json)")
    spec = json.loads(backend.to_str())
    spec.pop("truncation", None)
    spec.pop("padding", None)
    special = {
        name: getattr(tokenizer, f"{name}_token_id", None)
        for name in ("bos", "eos", "pad", "unk")
    }
    canonical = {
        "backend": spec,
        "chat_template": getattr(tokenizer, "chat_template", None),
        "special": special,
        "all_special_ids": sorted(int(i) for i in getattr(tokenizer, "all_special_ids", []) or []),
        "encode_a": list(tokenizer("a", add_special_tokens=True)["input_ids"]),
    }
    text = json.dumps(canonical, sort_keys=True, ensure_ascii=False, separators=(",", ":"),
                      default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _model_label(loaded: LoadedModel) -> str:
    """The model spec as stored: built-in names and hub ids verbatim, folders as absolute paths."""
    from probes.models import BUILTIN_MODELS

    spec = loaded.spec
    if spec in BUILTIN_MODELS or loaded.source == "in-memory":
        return spec
    path = Path(spec).expanduser()
    return str(path.resolve()) if path.is_dir() else spec


def _versions() -> dict[str, str]:
    out = {}
    for package in ("torch", "transformers", "transformer-lens", "tokenizers"):
        try:
            out[package.replace("-", "_")] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            out[package.replace("-", "_")] = "not installed"
    from probes import __version__

    out["trajectory_probes"] = __version__
    return out


def cache_metadata(
    loaded: LoadedModel,
    cfg: CacheConfig,
    site_map: Mapping[str, tuple[int, ...] | None],
    lexicon: Lexicon,
    *,
    backend: str,
    info: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The `open_writer` metadata of a run: identity keys, versions and info.

    `config` holds only what changes the cached numbers or their meaning (sites with layers,
    positions, storage dtype, prompt format, scaffold); device, chunk size and backend (which
    change values only within floating-point tolerance) go to `info`.

    Args:
        loaded: The model.
        cfg: The run config.
        site_map: From `resolve_cache_sites`.
        lexicon: The lexicon that labels tokens.
        backend: "hf" or "bridge".
        info: More informational entries (e.g. the traces file).

    Returns:
        The metadata dict.
    """
    from probes.traces import ANSWER_SUFFIX

    config = {
        "sites": {c: (None if ls is None else list(ls)) for c, ls in site_map.items()},
        "positions": cfg.positions,
        "storage_dtype": cfg.dtype,
        "prompt_format": cfg.prompt_format,
        "scaffold": cfg.scaffold,
        "answer_suffix": ANSWER_SUFFIX,
    }
    return run_metadata(
        loaded, lexicon, config=config,
        info={"chunk_size": cfg.chunk_size, "backend": backend, **dict(info or {})},
    )


def run_metadata(
    loaded: LoadedModel,
    lexicon: Lexicon,
    *,
    config: Mapping[str, Any],
    info: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """`open_writer` metadata shared by every command that writes a cache (`cache`, `lhat`).

    Identity keys (model, architecture, dtype, weight convention, tokenizer and lexicon
    fingerprints, category codes, `config`) must match to append; `versions` and `info` are
    recorded at creation only.

    Args:
        loaded: The model.
        lexicon: The lexicon that labels tokens.
        config: Settings that change the stored numbers or their meaning.
        info: Informational entries (device, traces file, ...).

    Returns:
        The metadata dict.
    """
    from probes.categories import CATEGORY_CODES

    arch = loaded.arch
    return {
        "model": _model_label(loaded),
        "architecture": arch.to_dict(),
        "model_dtype": arch.dtype,
        "weight_convention": arch.weight_convention,
        "tokenizer_fingerprint": tokenizer_fingerprint(loaded.tokenizer),
        "lexicon_fingerprint": lexicon.fingerprint(),
        "category_codes": dict(CATEGORY_CODES),
        "config": dict(config),
        "versions": _versions(),
        "info": {
            "device": str(loaded.device),
            "source": loaded.source,
            "lexicon_files": list(lexicon.sources),
            **dict(info or {}),
        },
    }


# --------------------------------------------------------------------------------------------------
# One trace


@dataclass
class TraceArrays:
    """The captured arrays of one trace, ready for `CacheWriter.write_trace`.

    Attributes:
        positions: int64 [n_sel] token index of each row.
        sites: Component -> `cache.SiteArray` ([n_sel, n_layers, ...] or [n_sel, ...] for global
            components); may be memory-mapped from a temporary file.
        n_nonfinite: Stored values that are inf/NaN (float16 overflow).
        n_tokens: Tokens run through the model.
    """

    positions: np.ndarray
    sites: dict[str, Any]
    n_nonfinite: int
    n_tokens: int

    @property
    def nbytes(self) -> int:
        """Bytes of site data."""
        return sum(int(s.data.nbytes) for s in self.sites.values())


def _selection(tt: TokenizedTrace, positions: str) -> tuple[int, int]:
    """(first, end) of the selected rows; every position in the range is selected."""
    if positions == "all":
        return 0, tt.n_tokens
    return tt.spans["trajectory"]


class _Outputs:
    """One preallocated output array per component, in RAM or spooled to an unlinked temp file."""

    def __init__(
        self,
        site_map: Mapping[str, tuple[int, ...] | None],
        n_rows: int,
        dtype: str,
        *,
        max_ram_bytes: float,
        spool_dir: Path | None,
    ) -> None:
        self.site_map = site_map
        self.n_rows = n_rows
        self.dtype = dtype
        self.np_dtype = np.dtype(np.uint16 if dtype == "bfloat16" else dtype)
        self.max_ram_bytes = max_ram_bytes
        self.spool_dir = spool_dir
        self.arrays: dict[str, np.ndarray] = {}
        self.cursor = 0
        self.spooled = False
        self._files: list[Any] = []

    def allocate(self, row_shapes: Mapping[str, tuple[int, ...]]) -> None:
        total = sum(self.n_rows * math.prod(shape) * self.np_dtype.itemsize
                    for shape in row_shapes.values())
        self.spooled = total > self.max_ram_bytes and total > 0
        for comp, shape in row_shapes.items():
            full = (self.n_rows, *shape)
            if self.spooled and math.prod(full) > 0:
                handle = tempfile.TemporaryFile(
                    dir=self.spool_dir, prefix=".probes-spool-", suffix=".bin"
                )
                self._files.append(handle)
                self.arrays[comp] = np.memmap(handle, dtype=self.np_dtype, mode="w+", shape=full)
            else:
                self.arrays[comp] = np.empty(full, dtype=self.np_dtype)

    def close(self) -> None:
        self.arrays.clear()
        for handle in self._files:
            handle.close()
        self._files.clear()


def _to_numpy(t: torch.Tensor, dtype: str) -> np.ndarray:
    """A CPU numpy copy of `t` (bfloat16 as raw uint16 bits)."""
    if dtype == "bfloat16":
        return t.view(torch.int16).cpu().numpy().view(np.uint16)
    return t.cpu().numpy()


@contextmanager
def capture_trace(
    loaded: LoadedModel,
    tt: TokenizedTrace,
    site_map: Mapping[str, tuple[int, ...] | None],
    cfg: CacheConfig,
    *,
    backend: str,
    spool_dir: Path | None = None,
) -> Iterator[TraceArrays]:
    """Capture one trace in chunks through a KV cache; yields its arrays (freed on exit).

    The forward stops after the last selected token (activations of earlier tokens do not depend
    on later ones). Each chunk's rows are cast to the storage dtype on the device and copied into
    the output arrays (stacked over layers on an accelerator first: one transfer per component),
    so at most one chunk of activations is alive at a time.

    Args:
        loaded: The model.
        tt: The tokenized trace.
        site_map: From `resolve_cache_sites`.
        cfg: The run config (positions, dtype, chunk_size, max_ram_mib).
        backend: "hf" or "bridge" (`choose_backend`).
        spool_dir: Folder for spooled outputs (default: the system temp folder).

    Yields:
        The `TraceArrays`; memory-mapped arrays are valid only inside the block.
    """
    from cache import SiteArray

    first, end = _selection(tt, cfg.positions)
    n_rows = end - first
    outputs = _Outputs(site_map, n_rows, cfg.dtype, max_ram_bytes=cfg.max_ram_mib * 2**20,
                       spool_dir=spool_dir)
    sites = _hook_sites(site_map)
    nonfinite: list[torch.Tensor] = []

    on_cpu = loaded.device.type == "cpu"

    def sink(tensors: Mapping[str, torch.Tensor]) -> None:
        # Per component: [rows, ...] per layer -> output[cursor:cursor + rows, i_layer]. On the CPU
        # each piece is copied straight into its slot (no stacked temporary); on an accelerator the
        # pieces are stacked there first so that one transfer (one sync) moves each component.
        pieces = {comp: [tensors[comp]] if layers is None else
                  [tensors[f"L{layer}.{comp}"] for layer in layers]
                  for comp, layers in site_map.items()}
        if not outputs.arrays:
            outputs.allocate({
                comp: tuple(ts[0].shape[1:]) if site_map[comp] is None
                else (len(ts), *ts[0].shape[1:])
                for comp, ts in pieces.items()
            })
        rows = int(next(iter(pieces.values()))[0].shape[0])
        window = slice(outputs.cursor, outputs.cursor + rows)
        for comp, ts in pieces.items():
            if cfg.dtype != "float32" and rows:
                nonfinite.extend((~torch.isfinite(t)).sum() for t in ts)
            target = outputs.arrays[comp]
            if site_map[comp] is None:
                target[window] = _to_numpy(ts[0], cfg.dtype)
            elif on_cpu:
                for i, t in enumerate(ts):
                    target[window, i] = _to_numpy(t, cfg.dtype)
            else:
                target[window] = _to_numpy(torch.stack(ts, dim=1), cfg.dtype)
        outputs.cursor += rows

    if end < 1:
        raise ProbesError(f"trace {tt.trace.id!r} has no tokens to run")
    ids = torch.as_tensor(tt.ids[:end], dtype=torch.long).unsqueeze(0)  # [1, end]
    try:
        _run_chunks(loaded, ids, sites, cfg, backend, (first, end), sink)
        if outputs.cursor != n_rows:  # a bug, not a user error: keep the traceback
            raise RuntimeError(
                f"trace {tt.trace.id!r}: captured {outputs.cursor} rows, expected {n_rows}"
            )
        n_bad = int(torch.stack(nonfinite).sum().item()) if nonfinite else 0
        yield TraceArrays(
            positions=np.arange(first, end, dtype=np.int64),
            sites={
                comp: SiteArray(
                    outputs.arrays[comp],
                    dtype="bfloat16" if cfg.dtype == "bfloat16" else None,
                    layers=None if layers is None else list(layers),
                )
                for comp, layers in site_map.items()
            },
            n_nonfinite=n_bad,
            n_tokens=int(ids.shape[1]),
        )
    finally:
        outputs.close()


def _run_chunks(
    loaded: LoadedModel,
    ids: torch.Tensor,
    sites: Sequence[HookSite],
    cfg: CacheConfig,
    backend: str,
    selection: tuple[int, int],
    sink: Callable[[Mapping[str, torch.Tensor]], None],
) -> None:
    """Run `ids` [1, n] chunk by chunk through one KV cache, feeding each chunk's rows to `sink`."""
    from transformers import DynamicCache

    positions = slice(*selection)
    n = int(ids.shape[1])
    device = loaded.device
    ids = ids.to(device)
    kv = DynamicCache(config=loaded.hf_model.config)
    with torch.no_grad():
        if backend == "hf":
            from hooks import run_residual_hf

            for start in range(0, n, cfg.chunk_size):
                part = run_residual_hf(
                    loaded, ids[:, start:start + cfg.chunk_size], sites, positions=positions,
                    dtype=cfg.dtype, device=None, past_key_values=kv,
                )
                sink(part.by_name())
            return
        from hooks import capture

        with capture(loaded, sites, positions=positions, dtype=cfg.dtype, device=None) as store:
            for start in range(0, n, cfg.chunk_size):
                loaded.bridge(ids[:, start:start + cfg.chunk_size], past_key_values=kv)
                sink(store.drain().by_name())


def forward_plain(
    loaded: LoadedModel, ids: torch.Tensor, *, chunk_size: int = 512, backend: str = "hf"
) -> None:
    """The same chunked forward as `capture_trace` without any hook (the benchmark's baseline).

    Args:
        loaded: The model.
        ids: Token ids [1, n].
        chunk_size: Tokens per forward through the KV cache.
        backend: "hf" (the plain HF model with sdpa, exactly as the fast path runs it, with no
            site) or "bridge" (the bridge forward, logits included).
    """
    from transformers import DynamicCache

    from hooks import run_residual_hf

    ids = ids.to(loaded.device)
    kv = DynamicCache(config=loaded.hf_model.config)
    with torch.no_grad():
        if backend == "hf":
            for start in range(0, int(ids.shape[1]), chunk_size):
                run_residual_hf(loaded, ids[:, start:start + chunk_size], [], past_key_values=kv)
        else:
            for start in range(0, int(ids.shape[1]), chunk_size):
                loaded.bridge(ids[:, start:start + chunk_size], past_key_values=kv)
    if loaded.device.type == "cuda":
        torch.cuda.synchronize(loaded.device)


# --------------------------------------------------------------------------------------------------
# The run


def _check_out(out: Path, *, resume: bool, overwrite: bool) -> None:
    from cache import CacheError

    if out.is_dir():
        raise CacheError(f"--out {out} is a directory; give a file path such as {out / 'run.h5'}")
    if not out.parent.is_dir():
        raise CacheError(f"cannot create {out}: folder {out.parent} does not exist; create it "
                         f"first (mkdir -p {out.parent}) or choose another --out")
    if out.exists() and not (resume or overwrite):
        raise CacheError(f"{out} already exists; pass --resume to add the missing traces to it, "
                         f"or choose another --out")


def _check_duplicates(traceset: Any) -> None:
    dupes = [bad for bad in traceset.problems if bad.reason.startswith("duplicate id")]
    if dupes:
        first = dupes[0]
        more = f" ({len(dupes) - 1} more repeated ids)" if len(dupes) > 1 else ""
        raise ProbesError(
            f"{traceset.path}:{first.line_no}: {first.reason}{more}; a cache needs unique trace "
            f"ids: fix the input (nothing was written)"
        )


def _stored_tokens(out: Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Metadata and token ids of every complete trace of an existing cache (read before resuming).

    Opening it also reports a locked, truncated, foreign or other-version file before the model
    is loaded.
    """
    from cache import CacheLockedError, open_cache

    try:
        with open_cache(out) as reader:
            return reader.metadata, {trace.id: trace.tokens for trace in reader}
    except CacheLockedError:
        raise CacheLockedError(
            f"{out} is open by another process (HDF5 file lock, errno 11), e.g. another cache run "
            f"writing it; wait for it to finish, or choose another --out"
        ) from None


def _same_identity(stored: Mapping[str, Any], given: Mapping[str, Any]) -> bool:
    """Whether the identity metadata of a file and of this run agree (as `open_writer` checks)."""
    from cache.schema import IDENTITY_KEYS

    def norm(value: Any) -> str:
        return json.dumps(value, sort_keys=True, default=str)

    return all(norm(stored.get(k)) == norm(given.get(k)) for k in IDENTITY_KEYS)


def cache_traces(
    model: str | LoadedModel,
    traces_path: str | os.PathLike[str],
    out: str | os.PathLike[str],
    cfg: CacheConfig | None = None,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = False,
    device: str = "auto",
    model_dtype: str = "float32",
    log: Log | None = None,
) -> CacheRunResult:
    """Capture the activations of every trace of a JSONL file into an HDF5 cache.

    Per trace: tokenize (prompt / trajectory / scaffold / answer spans), label every token,
    capture the configured sites in chunks and write one committed group (`write_trace`). A run
    killed at any moment leaves only complete traces; `resume=True` skips them and redoes the
    interrupted one, giving the same file as an uninterrupted run.

    Args:
        model: A model spec for `probes.models.load_model`, or an already loaded model.
        traces_path: JSONL traces (`probes.traces.read_traces` shapes).
        out: The .h5 file; its folder must exist.
        cfg: What to cache (default `CacheConfig()`: resid_post and delta of every layer, trajectory
            tokens, float16).
        resume: Append to an existing file (complete traces are skipped). Without it (and without
            `overwrite`) an existing file is an error.
        overwrite: Replace an existing file.
        progress: Show a tqdm progress bar on stderr (traces, tokens/s).
        device: Where to load `model` when given as a spec.
        model_dtype: Parameter dtype when loading `model` from a spec.
        log: Called with one-line status messages (bad lines, too-long traces, what is to do).

    Returns:
        The `CacheRunResult`.

    Raises:
        ProbesError: Bad config, missing traces file, repeated trace ids, unknown sites, an
            existing `out` without `resume`, or a missing folder.
        CacheLockedError: Another process has `out` open.
        CacheMismatchError: `out` holds another model / tokenizer / config, or different tokens
            for a trace id.
        NotACacheError, CacheCorruptError, CacheVersionError: `out` cannot be appended to.
    """
    from cache import CacheMismatchError, open_writer
    from probes.categories import load_lexicon
    from probes.models import LoadedModel, load_model
    from probes.traces import read_traces, tokenize_traces

    t_start = time.perf_counter()
    cfg = cfg if cfg is not None else CacheConfig()
    say = log if log is not None else (lambda _msg: None)
    out = Path(out)
    traces_path = Path(traces_path)
    _check_out(out, resume=resume, overwrite=overwrite)
    traceset = read_traces(traces_path, strict=cfg.strict)
    _check_duplicates(traceset)
    result = CacheRunResult(out=out, n_bad_lines=len(traceset.problems),
                            bad_lines=[(b.line_no, b.reason) for b in traceset.problems])
    for bad in traceset.problems[:10]:
        say(f"skipped line {bad.line_no}: {bad.reason}")
    if len(traceset.problems) > 10:
        say(f"... and {len(traceset.problems) - 10} more bad lines")
    lexicon = load_lexicon(extra=cfg.lexicon)
    stored_meta, stored = (_stored_tokens(out) if resume and out.exists() and not overwrite
                           else ({}, {}))

    loaded = model if isinstance(model, LoadedModel) else load_model(
        model, device=device, dtype=model_dtype)
    site_map = resolve_cache_sites(cfg.sites, loaded.arch)
    backend = choose_backend(loaded, site_map, cfg.backend)
    result.backend = backend
    traces = traceset.traces[:cfg.limit] if cfg.limit is not None else traceset.traces
    result.n_selected = len(traces)
    tokenized, too_long = tokenize_traces(
        traces, loaded.tokenizer, prompt_format=cfg.prompt_format, scaffold=cfg.scaffold,
        max_tokens=loaded.arch.n_ctx,
    )
    result.n_too_long = len(too_long)
    result.too_long = [(t.trace_id, t.line_no, t.n_tokens, t.limit) for t in too_long]
    for t in too_long[:10]:
        say(f"skipped line {t.line_no}: {t.reason}")
    metadata = cache_metadata(loaded, cfg, site_map, lexicon, backend=backend,
                              info={"traces_file": str(traces_path)})
    if stored and _same_identity(stored_meta, metadata):  # else open_writer names the difference
        for tt in tokenized:
            old = stored.get(tt.trace.id)
            if old is not None and not np.array_equal(old, tt.ids):
                raise CacheMismatchError(
                    f"{out} holds trace {tt.trace.id!r} with other tokens ({len(old)}) than "
                    f"{traces_path}:{tt.trace.line_no} gives now ({tt.n_tokens}); the traces "
                    f"file changed since the cache was written: choose another --out"
                )
    mode = "overwrite" if overwrite else ("append" if resume else "create")
    with open_writer(out, metadata=metadata, mode=mode) as writer:
        result.n_redone = len(writer.removed_incomplete)
        todo = [tt for tt in tokenized if not writer.has_complete(tt.trace.id)]
        result.n_skipped = len(tokenized) - len(todo)
        say(f"writing {out}: {len(todo)} traces to capture ({result.n_skipped} already complete, "
            f"{result.n_redone} interrupted redone, {result.n_too_long} too long), backend "
            f"{backend}, {loaded.device}")
        t_loop = time.perf_counter()
        _capture_all(loaded, writer, todo, site_map, cfg, backend, lexicon, traces_path, result,
                     progress=progress, t_loop=t_loop)
        result.seconds = time.perf_counter() - t_loop
    result.file_bytes = out.stat().st_size
    result.seconds_total = time.perf_counter() - t_start
    return result


def _capture_all(
    loaded: LoadedModel,
    writer: CacheWriter,
    todo: Sequence[TokenizedTrace],
    site_map: Mapping[str, tuple[int, ...] | None],
    cfg: CacheConfig,
    backend: str,
    lexicon: Lexicon,
    traces_path: Path,
    result: CacheRunResult,
    *,
    progress: bool,
    t_loop: float,
) -> None:
    from tqdm import tqdm

    from probes.categories import categorize

    spool_dir = writer.path.resolve().parent
    bar = tqdm(total=len(todo), unit="trace", disable=not progress, dynamic_ncols=True,
               file=None, leave=True, desc="cache")
    try:
        for tt in todo:
            category = categorize(tt, lexicon).category
            with capture_trace(loaded, tt, site_map, cfg, backend=backend,
                               spool_dir=spool_dir) as arrays:
                t_write = time.perf_counter()
                writer.write_trace(
                    tt.trace.id,
                    tokens=tt.ids,
                    category=category,
                    positions=arrays.positions,
                    spans=tt.spans,
                    sites=arrays.sites,
                    text={"question": tt.trace.question, "answer": tt.trace.answer},
                    source=f"{traces_path.name}:{tt.trace.line_no}",
                    attrs={"n_nonfinite": arrays.n_nonfinite},
                )
                result.seconds_write += time.perf_counter() - t_write
                result.bytes_sites += arrays.nbytes
                result.n_rows += int(arrays.positions.shape[0])
                result.n_tokens += arrays.n_tokens
                if arrays.n_nonfinite:
                    result.nonfinite[tt.trace.id] = arrays.n_nonfinite
                del arrays  # unmap spooled outputs now, not at the next trace
            result.n_written += 1
            elapsed = time.perf_counter() - t_loop
            bar.set_postfix_str(f"{result.n_tokens / max(elapsed, 1e-9):,.0f} tok/s", refresh=False)
            bar.update(1)
    finally:
        bar.close()


# --------------------------------------------------------------------------------------------------
# Inspecting


def inspect_cache(path: str | os.PathLike[str]) -> dict[str, Any]:
    """`cache.summarize(path)` plus the run config and info (for `probes.run inspect`).

    Raises:
        CacheError: Missing, locked, truncated, foreign or other-version file (one-line message).
    """
    from cache import open_cache, summarize

    summary = summarize(path)
    with open_cache(path) as reader:
        summary["config"] = reader.config
        summary["info"] = reader.metadata.get("info", {})
        summary["weight_convention"] = reader.metadata.get("weight_convention")
    return summary


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def format_inspect(s: Mapping[str, Any]) -> str:
    """A human-readable table of an `inspect_cache` summary."""
    arch = s.get("architecture", {})
    cfg = s.get("config", {})
    lines = [
        f"file:     {s['path']} ({_size(s['file_bytes'])})",
        f"schema:   v{s['schema_version']} (toolkit {s['toolkit_version']}, created {s['created']})",
        f"model:    {s['model']} ({arch.get('family')}, {arch.get('n_layers')} layers, d_model "
        f"{arch.get('d_model')}, {s['model_dtype']})",
        f"config:   positions {cfg.get('positions')}, storage {cfg.get('storage_dtype')}, "
        f"backend {s.get('info', {}).get('backend', '?')}, chunk "
        f"{s.get('info', {}).get('chunk_size', '?')}",
        f"traces:   {s['n_traces_complete']} complete, {s['n_tokens']:,} tokens",
    ]
    if s["complete"]:
        lines.append("complete: yes (no interrupted trace)")
    else:
        shown = ", ".join(repr(i) for i in s["incomplete_ids"][:5])
        lines.append(f"complete: no, {s['n_traces_incomplete']} interrupted trace(s) ({shown}); "
                     f"finish with `cache ... --resume`")
    if s["sites"]:
        lines.append("sites:")
        header = f"  {'name':<14} {'dtype':<9} {'shape':<22} {'layers':<14} {'on disk':>10}"
        lines.append(header)
        for name, info in s["sites"].items():
            shape = "[" + ", ".join(str(x) for x in [info["n_rows"], *info["row_shape"]]) + "]"
            layers = info["layers"]
            layer_text = (f"{layers[0]}..{layers[-1]}" if layers and
                          layers == list(range(layers[0], layers[-1] + 1)) else str(layers))
            lines.append(f"  {name:<14} {info['dtype']:<9} {shape:<22} {layer_text:<14} "
                         f"{_size(info['bytes_on_disk']):>10}")
    for name, info in s.get("arrays", {}).items():
        lines.append(f"array:    {name} ({info['dtype']}, {info['n_traces']} traces, "
                     f"{_size(info['bytes_on_disk'])})")
    return "\n".join(lines)


def format_run(r: CacheRunResult) -> str:
    """A short report of a `cache_traces` run."""
    lines = [
        f"cache: {r.out} ({_size(r.file_bytes)})",
        f"traces: {r.n_written} written, {r.n_skipped} already complete, {r.n_redone} interrupted "
        f"redone, {r.n_too_long} too long, {r.n_bad_lines} bad lines",
        f"tokens run: {r.n_tokens:,} in {r.seconds:.1f}s ({r.tokens_per_s:,.0f} tok/s; backend "
        f"{r.backend}); {r.bytes_sites / 1e6:.1f} MB of sites at {r.write_mb_per_s:,.0f} MB/s",
    ]
    if r.nonfinite:
        lines.append(f"warning: {len(r.nonfinite)} trace(s) hold inf/NaN values (float16 "
                     f"overflow?), e.g. {next(iter(r.nonfinite))!r}; use --dtype float32")
    return "\n".join(lines)
