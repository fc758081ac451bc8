"""Activations of one trace, captured in chunks through the KV cache: `capture_trace`.

Per component the rows of every requested layer are stacked to `[n_sel, n_layers, d]` (`n_sel` =
trajectory tokens, or all tokens). Only one chunk's activations live at a time: each chunk's rows are
cast to the storage dtype on the device and copied into one preallocated output per component;
outputs larger than `max_ram_mib` are spooled to an unlinked temporary file (memory-mapped), whose
whole size is reserved on disk first (`posix_fallocate`): a full disk is one `SpoolError` before
the trace is run, never a SIGBUS from a write into the map.

Backends. Residual-stream components (`resid_pre/mid/post`, `delta`, `attn_out`, `mlp_out`, `embed`,
`ln_final`) go through `hooks.run_residual_hf` (plain HF forward with sdpa and PyTorch hooks, proven
equal to the bridge in `tests/hooks`); every other component needs the bridge (`hooks.capture`).
`choose_backend` picks. Attention scores/patterns cannot be cached (their rows are not tokens).
"""

from __future__ import annotations

import errno
import math
import os
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np
import torch
from jaxtyping import Int

from cache import SiteArray
from hooks import capture, run_residual_hf
from hooks.hf_fast import HF_FAST_COMPONENTS, HF_SITE_PATHS
from hooks.sites import (
    SITE_TABLE,
    HookSite,
    UnknownSiteError,
    available_components,
    check_site,
    parse_site,
)
from probes.errors import ProbesError
from probes.measures.capture import BACKENDS as BACKENDS
from probes.measures.capture import DEFAULT_COMPONENTS as DEFAULT_COMPONENTS
from probes.measures.capture import POSITIONS as POSITIONS
from probes.measures.capture import STORAGE_DTYPES as STORAGE_DTYPES
from probes.measures.capture import check_choice as check_choice

if TYPE_CHECKING:
    from hooks import HookSite
    from hooks.model import LoadedModel
    from probes.traces.tokenize import TokenizedTrace












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


def hook_sites(site_map: Mapping[str, tuple[int, ...] | None]) -> list[HookSite]:
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
        "hf" or "bridge" (a model split over devices by accelerate, `--device-map`, takes the
        bridge: the fast path cannot copy its dispatched modules).

    Raises:
        ProbesError: `backend="hf"` for components, a family or a split model the fast path does
            not cover.
    """

    check_choice("backend", backend, BACKENDS)
    slow = [c for c in site_map if c not in HF_FAST_COMPONENTS]
    family_ok = loaded.arch.family in HF_SITE_PATHS
    split = getattr(loaded, "device_map", None) is not None
    if backend == "bridge":
        return "bridge"
    if backend == "hf":
        if slow or not family_ok or split:
            why = (f"components {slow} need the bridge" if slow else
                   f"model family {loaded.arch.family!r} has no fast-path table" if not family_ok
                   else "the model is split over devices (--device-map)")
            raise ProbesError(f"backend 'hf' cannot capture this run: {why}; use backend 'auto' "
                              f"or 'bridge'")
        return "hf"
    return "hf" if not slow and family_ok and not split else "bridge"


@runtime_checkable
class CaptureSettings(Protocol):
    """What `capture_trace` reads from a run's settings (`probes.pipeline.capture.CacheConfig` is one)."""

    positions: str
    dtype: str
    chunk_size: int
    max_ram_mib: float


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

    positions: Int[np.ndarray, " n_sel"]
    sites: dict[str, Any]
    n_nonfinite: int
    n_tokens: int

    @property
    def nbytes(self) -> int:
        """Bytes of site data."""
        return sum(int(s.data.nbytes) for s in self.sites.values())


def selection(tt: TokenizedTrace, positions: str) -> tuple[int, int]:
    """(first, end) of the selected rows; every position in the range is selected."""
    if positions == "all":
        return 0, tt.n_tokens
    return tt.spans["trajectory"]


class SpoolError(ProbesError):
    """A spooled output whose temporary file cannot be created or given its size on disk."""


_NO_FALLOCATE = (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)
"""`posix_fallocate` errors of a filesystem that cannot reserve space (then zeros are written)."""


def reserve(fd: int, nbytes: int) -> None:
    """Give the open file `fd` `nbytes` of disk blocks, so that writes through a memory map of it
    cannot fail (a full disk would end the process with SIGBUS, no message).

    `os.posix_fallocate` where the filesystem supports it (tmpfs, ext4, xfs, btrfs); elsewhere the
    blocks are written with zeros, 1 MiB at a time.

    Raises:
        OSError: The disk has no room (ENOSPC, EDQUOT) or refuses the write.
    """
    try:
        os.posix_fallocate(fd, 0, nbytes)
        return
    except OSError as exc:
        if exc.errno not in _NO_FALLOCATE:
            raise
    block = bytes(min(nbytes, 2**20))
    done = 0
    while done < nbytes:
        done += os.pwrite(fd, memoryview(block)[:nbytes - done], done)


class _Outputs:
    """One preallocated output array per component, in RAM or spooled to an unlinked temp file."""

    def __init__(
        self,
        site_map: Mapping[str, tuple[int, ...] | None],
        n_rows: int,
        dtype: str,
        *,
        max_ram_bytes: int | float,
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
                nbytes = math.prod(full) * self.np_dtype.itemsize
                try:
                    handle = tempfile.TemporaryFile(  # noqa: SIM115 (closed by `close()`)
                        dir=self.spool_dir, prefix=".probes-spool-", suffix=".bin"
                    )
                    self._files.append(handle)
                    reserve(handle.fileno(), nbytes)
                except OSError as exc:
                    raise self._spool_error(exc, total) from None
                self.arrays[comp] = np.memmap(handle, dtype=self.np_dtype, mode="w+", shape=full)
            else:
                self.arrays[comp] = np.empty(full, dtype=self.np_dtype)

    def _spool_error(self, exc: OSError, total: int) -> SpoolError:
        folder = self.spool_dir if self.spool_dir is not None else Path(tempfile.gettempdir())
        code = errno.errorcode.get(exc.errno or 0, "")
        cause = f"[Errno {exc.errno}] {exc.strerror}" + (f" ({code})" if code else "")
        full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
        mib = math.ceil(total / 2**20 * 10) / 10
        fix = ("free space there" if full else "make that folder writable") + (
            f", or give --max-ram-mib {mib} or more to keep such outputs in RAM; then rerun with "
            "--resume (the traces written so far are kept)")
        return SpoolError(f"cannot spool a trace's output ({mib} MiB, over --max-ram-mib) to a "
                          f"temporary file in {folder}: {cause}; {fix}")

    def close(self) -> None:
        self.arrays.clear()
        for handle in self._files:
            handle.close()
        self._files.clear()


def to_numpy(t: torch.Tensor, dtype: str) -> np.ndarray:
    """A CPU numpy copy of `t` (bfloat16 as raw uint16 bits)."""
    if dtype == "bfloat16":
        return t.view(torch.int16).cpu().numpy().view(np.uint16)
    return t.cpu().numpy()


@contextmanager
def capture_trace(
    loaded: LoadedModel,
    tt: TokenizedTrace,
    site_map: Mapping[str, tuple[int, ...] | None],
    cfg: CaptureSettings,
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

    first, end = selection(tt, cfg.positions)
    n_rows = end - first
    outputs = _Outputs(site_map, n_rows, cfg.dtype, max_ram_bytes=cfg.max_ram_mib * 2**20,
                       spool_dir=spool_dir)
    sites = hook_sites(site_map)
    nonfinite: list[torch.Tensor] = []

    # A model split over devices (--device-map) has each layer's capture on its own device: copy
    # each piece to the host on its own, as on the CPU (a stack across devices would fail).
    on_cpu = loaded.device.type == "cpu" or getattr(loaded, "device_map", None) is not None

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
                target[window] = to_numpy(ts[0], cfg.dtype)
            elif on_cpu:
                for i, t in enumerate(ts):
                    target[window, i] = to_numpy(t, cfg.dtype)
            else:
                target[window] = to_numpy(torch.stack(ts, dim=1), cfg.dtype)
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
    cfg: CaptureSettings,
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
            for start in range(0, n, cfg.chunk_size):
                part = run_residual_hf(
                    loaded, ids[:, start:start + cfg.chunk_size], sites, positions=positions,
                    dtype=cfg.dtype, device=None, past_key_values=kv,
                )
                sink(part.by_name())
            return

        with capture(loaded, sites, positions=positions, dtype=cfg.dtype, device=None) as store:
            for start in range(0, n, cfg.chunk_size):
                loaded.bridge(ids[:, start:start + cfg.chunk_size], past_key_values=kv)
                sink(store.drain().by_name())


def forward_plain(
    loaded: LoadedModel, ids: Int[torch.Tensor, "1 n"], *, chunk_size: int = 512,
    backend: str = "hf",
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
