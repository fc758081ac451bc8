"""The segmented store: one small HDF5 file per committed write, and an index of external links.

Private to `cache/`. Layout of a store whose `--out` is `run.h5`::

    run.h5                       the index: root metadata, /meta/config, /meta/info,
                                 /meta/segments (the segment files it reflects), and one group per
                                 trace whose attrs are the trace's and whose members are HDF5
                                 external links into the segments (plain h5py follows them)
    run.h5.segments/
        s-000001.h5              a segment: the root metadata plus groups /traces/<name>:
                                 whole traces (kind "trace"; one, or several committed
                                 together) or arrays and attrs added to one (kind "add");
                                 named <shard>-<seq>.h5
        s-000002.h5.tmp          a segment being written (or abandoned): never read, removed on
                                 resume
        .lock-s                  held (flock) by the one writer of shard "s"
        .migrating               present while a single-file cache at `run.h5` is being moved
                                 into segments (names that file: size, mtime, inode)

Every segment and every index is built in memory (HDF5 core driver, no backing store) and then
written with plain `os.write` under a temporary name and renamed into place. HDF5 therefore never
writes to disk itself: a full disk, a file-size limit or an I/O error surfaces as one Python
`OSError` from `os.write` on a temporary file that is then deleted, and can neither damage a
committed segment nor leave HDF5 in a broken state (the cause of the crashes of the in-place
writer). The segments are the truth; the index is derived from them and rebuilt whenever it is
missing, damaged or behind the folder (`open_index`).
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from cache import _h5, schema
from cache.errors import CacheError

SEGMENTS_SUFFIX = ".segments"
SEGMENTS_DATASET = "meta/segments"
"""Index dataset listing the segment files the index reflects (marks a segmented index)."""
ATTR_SEGMENT_KIND = "segment_kind"
KIND_TRACE = "trace"
KIND_ADD = "add"
_NAME = re.compile(r"^([A-Za-z0-9]+)-(\d{6,})\.h5$")
_TMP = re.compile(r"^([A-Za-z0-9]+)-(\d{6,})\.h5\.(.*)\.tmp$")
_memory_names = itertools.count()
_write = os.write
"""The one call that writes store bytes to disk (tests replace it to inject write errors)."""


def segments_dir(path: Path) -> Path:
    """The folder of segments of the store whose index is `path`."""
    return path.with_name(path.name + SEGMENTS_SUFFIX)


def is_segmented(path: Path) -> bool:
    """Whether `path` is (or was) the index of a segmented store.

    A single-file cache at `path` is read as that file even with a segments folder beside it
    (a move into segments in progress or interrupted, or a folder left by another store); while
    a move is marked, an unreadable `path` is that single file too (never rebuilt from the
    partial segments).
    """
    if not segments_dir(path).is_dir():
        return False
    kind = file_kind(path)
    return kind in ("index", "missing") or (kind == "unreadable" and not migration_marked(path))


def is_single_file(path: Path) -> bool:
    """Whether `path` is a readable HDF5 cache that is not a segmented store's index (no
    `/meta/segments`): one self-contained file (`pack`'s, or an older toolkit's)."""
    return file_kind(path) == "single"


def file_kind(path: Path) -> str:
    """"single" (a single-file cache), "index" (a segmented store's index), "unreadable" (not
    HDF5, damaged, locked by an HDF5 writer) or "missing"."""
    if not path.is_file():
        return "missing"
    try:
        with h5py.File(path, "r") as f:
            if SEGMENTS_DATASET in f:
                return "index"
            return "single" if schema.TRACES_GROUP in f else "unreadable"
    except (OSError, ValueError, RuntimeError):
        return "unreadable"


# -- moving a single-file cache into segments ------------------------------------------------------
MIGRATION_MARKER = ".migrating"
"""File in the segments folder while the single-file cache beside it is moved into segments."""


def file_identity(path: Path) -> dict[str, int]:
    """What names one version of the file at `path`: size, mtime_ns, inode."""
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "inode": st.st_ino}


def write_migration_marker(path: Path, *, fsync: bool) -> None:
    """Mark `path`'s segments folder as the move of the single file `path` into segments.

    Raises:
        OSError: The marker could not be written.
    """
    folder = segments_dir(path)
    write_file(json.dumps(file_identity(path)).encode(), folder / MIGRATION_MARKER,
               folder / f"{MIGRATION_MARKER}.tmp", fsync=fsync)


def migration_marked(path: Path) -> bool:
    """Whether `path`'s segments folder holds a migration marker (of any file)."""
    return (segments_dir(path) / MIGRATION_MARKER).exists()


def is_migration_of(path: Path) -> bool:
    """Whether `path`'s segments folder holds a move of exactly the file now at `path`."""
    try:
        marker = json.loads((segments_dir(path) / MIGRATION_MARKER).read_text())
        return bool(marker == file_identity(path))
    except (OSError, ValueError):
        return False


def remove_migration_marker(path: Path) -> None:
    """Forget a finished move into segments (the index has replaced the single file)."""
    folder = segments_dir(path)
    for name in (MIGRATION_MARKER, f"{MIGRATION_MARKER}.tmp"):
        with contextlib.suppress(OSError):
            os.unlink(folder / name)


def check_segments_folder(path: Path) -> None:
    """Refuse to append to the single-file cache `path` when the segments folder beside it holds
    segments that are not a move of this file (left by another store): adopting them would mix
    two caches.

    Raises:
        CacheError: Names the folder and the fix.
    """
    folder = segments_dir(path)
    if (folder.is_dir() and list_segments(folder) and is_single_file(path)
            and not is_migration_of(path)):
        raise CacheError(
            f"{path} is a single-file cache, but the folder {folder} beside it holds segments "
            f"of another store (e.g. left when the file was replaced by `pack --overwrite` of an "
            f"older toolkit); nothing was written: remove that folder or move it away (readers "
            f"already ignore it), then rerun"
        )


# -- temporary files of whole files (an index, a packed file) --------------------------------------
def temp_path(path: Path) -> Path:
    """This process's temporary name for a new version of `path`: `<path>.<pid>.tmp`."""
    return path.with_name(f"{path.name}.{os.getpid()}.tmp")


def remove_stale_temps(path: Path) -> list[Path]:
    """Delete `<path>.<pid>.tmp` files (`temp_path`) whose process is gone (killed while writing).

    Returns:
        The files removed.
    """
    pattern = re.compile(re.escape(path.name) + r"\.(\d+)\.tmp$")
    removed: list[Path] = []
    try:
        names = os.listdir(path.parent)
    except OSError:
        return removed
    for name in names:
        found = pattern.match(name)
        if found and not _process_alive(int(found.group(1))):
            with contextlib.suppress(OSError):
                os.unlink(path.parent / name)
                removed.append(path.parent / name)
    return removed


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def segment_key(name: str) -> tuple[int, str]:
    """Sort key of a segment file name: (sequence number, shard)."""
    found = _NAME.match(name)
    return (int(found.group(2)), found.group(1)) if found else (1 << 62, name)


def list_segments(folder: Path) -> list[str]:
    """Committed segment file names in write order ((seq, shard)); [] if the folder is absent."""
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return []
    return sorted((n for n in names if _NAME.match(n)), key=segment_key)


def list_pending(folder: Path, shard: str | None = None) -> list[tuple[str, str]]:
    """Temporary (uncommitted) segments: (file name, trace id or "?"), of one shard or all."""
    try:
        names = sorted(os.listdir(folder))
    except FileNotFoundError:
        return []
    out = []
    for name in names:
        found = _TMP.match(name)
        if found and (shard is None or found.group(1) == shard):
            out.append((name, schema.unescape_trace_id(found.group(3)) if found.group(3) else "?"))
    return out


def tmp_name(final: str, trace_name: str) -> str:
    """Temporary name of segment `final` (holds the escaped trace name when short enough)."""
    return f"{final}.{trace_name if len(trace_name.encode()) <= 120 else ''}.tmp"


# -- building files in memory ----------------------------------------------------------------------
def _memory_file(size_hint: int = 0) -> h5py.File:
    name = f"/nonexistent/probes-memory-{os.getpid()}-{next(_memory_names)}.h5"
    # One allocation for the whole image (the core driver grows by `block_size` steps, copying)
    block = max(1 << 16, int(size_hint * 1.05) + (1 << 20)) if size_hint else 1 << 16
    return h5py.File(name, "w", driver="core", backing_store=False, block_size=block)


def build_image(fill: Callable[[h5py.File], None], size_hint: int = 0) -> bytes:
    """The bytes of an HDF5 file that `fill` writes, built entirely in memory.

    Args:
        fill: Writes the file's content.
        size_hint: Bytes of array data `fill` writes (sizes the in-memory image at once).
    """
    f = _memory_file(size_hint)
    try:
        fill(f)
        f.flush()
        return f.id.get_file_image()
    finally:
        f.close()


def write_file(image: bytes, final: Path, tmp: Path, *, fsync: bool) -> None:
    """Write `image` to `tmp`, then rename it to `final`; on any error `tmp` is removed.

    Raises:
        OSError: The write, sync or rename failed (ENOSPC, EFBIG, EIO, ...); `final` is untouched.
    """
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        try:
            view = memoryview(image)
            while view:
                written = _write(fd, view)
                view = view[written:]
            if fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def describe_os_error(exc: OSError) -> str:
    """`exc` as "[Errno 28] No space left on device (ENOSPC)"."""
    code = errno.errorcode.get(exc.errno or 0, "")
    text = f"[Errno {exc.errno}] {exc.strerror}" if exc.errno else str(exc)
    return f"{text} ({code})" if code else text


def fix_hint(exc: OSError, *, flag: str = "--out", then: str = "rerun with --resume") -> str:
    """The fix for a failed write, by cause: what to change, then `then` (e.g. "rerun")."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"free space (or choose another {flag} folder), then {then}"
    if exc.errno == errno.EFBIG:
        return f"raise the file-size limit (ulimit -f), then {then}"
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"make the folder writable, then {then}"
    return f"check the disk, then {then}"


# -- root metadata ---------------------------------------------------------------------------------
@dataclass
class Root:
    """The root metadata of a store, as raw HDF5 values (copied verbatim into every file)."""

    attrs: dict[str, Any]
    config: str
    info: str

    @classmethod
    def read(cls, f: h5py.File) -> Root:
        """The root of an open cache, index or segment."""
        return cls(attrs={k: v for k, v in f.attrs.items() if k != ATTR_SEGMENT_KIND},
                   config=_h5.read_string_dataset(f, schema.CONFIG_DATASET),
                   info=_h5.read_string_dataset(f, schema.INFO_DATASET))

    @classmethod
    def read_image(cls, fill: Callable[[h5py.File], None]) -> Root:
        """The root that `fill` writes into an empty file (built in memory)."""
        f = _memory_file()
        try:
            fill(f)
            return cls.read(f)
        finally:
            f.close()

    def metadata(self, path: Path) -> dict[str, Any]:
        """The validated metadata dict (`_h5.read_root_metadata`) of this root, for `path`."""
        f = _memory_file()
        try:
            self.write(f)
            return _h5.read_root_metadata(f, path)
        finally:
            f.close()

    def write(self, f: h5py.File) -> None:
        """Write the root attrs and /meta datasets to `f`, and an empty creation-ordered /traces."""
        for key, value in self.attrs.items():
            f.attrs[key] = value
        f.create_group(schema.META_GROUP)
        f.create_dataset(schema.CONFIG_DATASET, data=self.config, dtype=_h5.STRING_DTYPE)
        f.create_dataset(schema.INFO_DATASET, data=self.info, dtype=_h5.STRING_DTYPE)
        f.create_group(schema.TRACES_GROUP, track_order=True)


# -- the state of a store, read from its segments ----------------------------------------------------
@dataclass
class Entry:
    """One trace as the segments define it."""

    trace_id: str
    attrs: dict[str, Any]
    datasets: dict[str, str] = field(default_factory=dict)  # dataset -> segment file
    kinds: dict[str, str] = field(default_factory=dict)      # dataset -> "site" / "array" / ""
    text: str | None = None                                  # segment holding text/


@dataclass
class State:
    """Every trace of a store (in write order), the segments read, and the unreadable ones."""

    entries: dict[str, Entry] = field(default_factory=dict)
    segments: list[str] = field(default_factory=list)
    damaged: list[str] = field(default_factory=list)
    root: Root | None = None

    def apply(self, folder: Path, seg: str) -> None:
        """Read segment `seg` of `folder` into the state (a damaged one is listed, not raised)."""
        self.segments.append(seg)
        try:
            with h5py.File(folder / seg, "r") as f:
                if self.root is None:
                    self.root = Root.read(f)
                kind = _h5.as_str(f.attrs.get(ATTR_SEGMENT_KIND, KIND_TRACE))
                traces = f[schema.TRACES_GROUP]
                for name in traces:
                    group = traces[name]
                    attrs = dict(group.attrs.items())
                    members = {key: _kind_of(obj) for key, obj in group.items()}
                    self._merge(name, kind, seg, attrs, members)
        except (OSError, KeyError, ValueError, RuntimeError):
            self.damaged.append(seg)

    def add(self, seg: str, groups: Iterable[tuple[str, str, dict[str, Any], dict[str, str]]],
            ) -> None:
        """Record segment `seg` that this process just wrote (what `apply` would read back):
        (name, kind, attrs, members) of each trace group in it."""
        self.segments.append(seg)
        for name, kind, attrs, members in groups:
            self._merge(name, kind, seg, dict(attrs), members)

    def _merge(self, name: str, kind: str, seg: str, attrs: dict[str, Any],
               members: dict[str, str]) -> None:
        entry = self.entries.get(name)
        if kind == KIND_TRACE:
            if entry is not None:  # the same trace written twice (e.g. by two shards): first wins
                return
            trace_id = _h5.as_str(attrs.get(schema.ATTR_TRACE_ID, schema.unescape_trace_id(name)))
            entry = self.entries[name] = Entry(trace_id=trace_id, attrs=attrs)
        elif entry is None:  # arrays added to a trace this store does not hold
            return
        else:
            entry.attrs.update(attrs)
        for key, member_kind in members.items():
            if key == schema.TEXT_GROUP:
                entry.text = seg
            else:
                entry.datasets[key] = seg
                entry.kinds[key] = member_kind


def _kind_of(obj: Any) -> str:
    if isinstance(obj, h5py.Group):
        return "group"
    return _h5.as_str(obj.attrs.get(schema.ATTR_KIND, ""))


def scan(folder: Path, state: State | None = None) -> State:
    """The state of the segments in `folder` (continuing `state`: only new segments are read)."""
    state = state if state is not None else State()
    known = set(state.segments)
    for seg in list_segments(folder):
        if seg not in known:
            state.apply(folder, seg)
    return state


def index_image(root: Root, state: State, folder: Path, *, absolute: bool) -> bytes:
    """The index file of `state`: root metadata, /meta/segments, a linked group per trace."""
    prefix = str(folder.resolve()) if absolute else folder.name

    def fill(f: h5py.File) -> None:
        root.write(f)
        listed = f.create_dataset(SEGMENTS_DATASET, data=np.array(state.segments, dtype=object),
                                  dtype=_h5.STRING_DTYPE)
        listed.attrs["folder"] = prefix  # the links' folder: an index of a renamed store is stale
        listed.attrs["abs_folder"] = str(folder.resolve())  # where a copied index finds its data
        traces = f[schema.TRACES_GROUP]
        for name, entry in state.entries.items():
            group = traces.create_group(name)
            for key, value in entry.attrs.items():
                group.attrs[key] = value
            for key, seg in entry.datasets.items():
                group[key] = h5py.ExternalLink(f"{prefix}/{seg}",
                                               f"/{schema.TRACES_GROUP}/{name}/{key}")
            if entry.text is not None:
                group[schema.TEXT_GROUP] = h5py.ExternalLink(
                    f"{prefix}/{entry.text}", f"/{schema.TRACES_GROUP}/{name}/{schema.TEXT_GROUP}")

    return build_image(fill)


# -- reading -----------------------------------------------------------------------------------------
def moved_folder(f: h5py.File, path: Path) -> Path:
    """The segments folder of an index that was copied or moved away from it.

    Raises:
        CacheError: That folder no longer exists either (names the fix).
    """
    listed = f[SEGMENTS_DATASET]
    folder = Path(_h5.as_str(listed.attrs.get("abs_folder", "")))
    if not folder.is_dir() or not str(folder).strip():
        raise CacheError(
            f"{path} is the index of a segmented cache, but its segments folder is neither next "
            f"to it ({segments_dir(path).name}/) nor at {folder}; copy or move the folder together "
            f"with the file, or make one self-contained file with `python -m probes.run pack`"
        )
    return folder


def open_index(path: Path, folder: Path | None = None,
               **kwargs: Any) -> tuple[h5py.File, list[str]]:
    """Open the index of the segmented store `path` for reading, rebuilding it when needed.

    The index on disk is used when it lists exactly the committed segments; otherwise (a writer
    is running or was stopped, the index is missing or damaged) an index is rebuilt from the
    segments into a private temporary file, so the reader sees every committed trace.

    Returns:
        The open file and the ids of traces being written or abandoned (temporary segments).

    Raises:
        CacheError: No segment and no readable index.
    """
    here = folder is None
    folder = segments_dir(path) if folder is None else folder
    pending = [tid for _, tid in list_pending(folder)]
    committed = list_segments(folder)
    root = None
    if path.exists():
        try:
            f = h5py.File(path, "r", **kwargs)
        except OSError:
            f = None
        if f is not None:
            try:
                listed = f[SEGMENTS_DATASET]
                names = [_h5.as_str(s) for s in listed[()]]
                if (here and names == committed
                        and _h5.as_str(listed.attrs.get("folder")) == folder.name):
                    return f, pending
                root = Root.read(f)
            except (KeyError, OSError, ValueError):
                pass
            f.close()
    state = scan(folder)
    root = root or state.root
    if root is None:
        raise CacheError(f"{path} is a segmented cache with no readable index and no readable "
                         f"segment in {folder}; re-create it")
    pending += [f"(damaged segment {seg})" for seg in state.damaged]
    image = index_image(root, state, folder, absolute=True)
    try:
        fd, name = tempfile.mkstemp(prefix="probes-index-", suffix=".h5")
        try:
            os.write(fd, image)
        finally:
            os.close(fd)
        try:
            return h5py.File(name, "r", **kwargs), pending
        finally:
            os.unlink(name)  # the open file stays readable; nothing is left behind
    except OSError:  # no room for a temporary file: read the index from memory
        tmp = f"/nonexistent/probes-index-{os.getpid()}-{next(_memory_names)}.h5"
        fapl = h5py.h5p.create(h5py.h5p.FILE_ACCESS)
        fapl.set_fapl_core(backing_store=False)
        fapl.set_file_image(image)
        fid = h5py.h5f.open(tmp.encode(), h5py.h5f.ACC_RDONLY, fapl=fapl)
        return h5py.File(fid), pending


def store_exists(path: str | os.PathLike[str]) -> bool:
    """Whether a cache is at `path` (its file, or the segments of a store whose index is gone)."""
    path = Path(path)
    return path.exists() or segments_dir(path).is_dir()


def store_bytes(path: str | os.PathLike[str]) -> int:
    """Bytes on disk of a cache: the file, plus its segments folder if it has one."""
    path = Path(path)
    total = path.stat().st_size if path.exists() else 0
    if not is_segmented(path):
        return total
    folder = segments_dir(path)
    for seg in list_segments(folder):
        with contextlib.suppress(OSError):
            total += (folder / seg).stat().st_size
    return total


def remove_store(path: Path) -> None:
    """Delete a store's segments folder (the index is replaced by the caller)."""
    shutil.rmtree(segments_dir(path), ignore_errors=True)


def read_json_attr(root: Root, key: str) -> Any:
    """A JSON root attribute of `root`, decoded."""
    return json.loads(_h5.as_str(root.attrs[key]))
