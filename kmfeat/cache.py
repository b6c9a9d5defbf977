"""Content-addressed stage store: cache/<stage>/<key>/ holding .npy arrays + manifest.json.

key = hash of the canonical JSON of {stage, params, input keys, format version}.
Writes are atomic: a stage builds its output in cache/<stage>/.tmp-<key>/ while holding a
per-key lock (flock on cache/.locks/<stage>-<key>.lock, released by the OS when a process
dies), then fsyncs and renames it into place; the manifest (with a checksum of every array) is
written last, so a folder without a valid manifest is never taken for a result. The temp
folder's name depends only on the key, so a stage that checkpoints (encode) can resume it.
Unfinished folders are removed by `Store.gc` / `Store.clean_leftovers`, never while their
key's lock is held by a running process.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import mmap
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import xxhash

from . import __version__
from .errors import KmfeatError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
KEY_RE = re.compile(r"[0-9a-f]{16}")
_SAMPLE = 1 << 20


def make_key(stage: str, params: dict, inputs: dict[str, str], revision: int = 0) -> str:
    """Stable key of a stage's output from its params, the keys of its inputs and the revision of its code.

    `revision` is bumped when a code change alters what a stage computes from the same params (0, the first,
    is left out of the hash so that the entries made before revisions existed keep their keys).
    """
    fields = {"stage": stage, "params": params, "inputs": inputs, "format": FORMAT_VERSION}
    if revision:
        fields["revision"] = revision
    blob = json.dumps(fields, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def file_digest(path: Path) -> str:
    """sha256 of the size and the first and last MiB: catches truncation and most damage cheaply."""
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        h.update(f.read(_SAMPLE))
        if size > _SAMPLE:
            f.seek(max(_SAMPLE, size - _SAMPLE))
            h.update(f.read(_SAMPLE))
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


DISK_FULL = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
"""errnos of a write that ran out of room: disk full, file size limit (ulimit -f), quota."""


def is_disk_full(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in DISK_FULL


def disk_full_error(exc: OSError, where) -> KmfeatError:
    """The one-line error for a write that ran out of room (ENOSPC, EFBIG or EDQUOT)."""
    what = {errno.EFBIG: "file size limit (ulimit -f) reached",
            errno.EDQUOT: "disk quota exceeded"}.get(exc.errno, "no space left on device")
    return KmfeatError(f"{where}: disk full while writing ({what}); free space or use --cache-dir "
                       f"on a larger disk, then rerun (no partial result was kept)")


class _Sink:
    """A file seen by numpy as a plain stream: it then writes through `write`, so a full disk
    raises OSError with its errno (ndarray.tofile reports only "n requested and m written"), and every
    byte written also goes through `hasher` (the whole-file checksum costs no second read)."""

    def __init__(self, f, hasher=None):
        self._write, self.hasher = f.write, hasher

    def write(self, data):
        if self.hasher is not None:
            self.hasher.update(data)
        return self._write(data)


def whole_digest(path: Path) -> str:
    """xxh3-128 of a file's bytes, read in 16 MiB blocks (about 10 GB/s of hashing: the read dominates)."""
    h = xxhash.xxh3_128()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(16 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verify_mode() -> str:
    """$KMFEAT_VERIFY: "full" (default: every byte of an array is checked against the manifest when an entry is
    first read) or "sample" (size and the first and last MiB only: for arrays too big to reread each time)."""
    mode = os.environ.get("KMFEAT_VERIFY", "full")
    if mode not in ("full", "sample"):
        raise KmfeatError(f"KMFEAT_VERIFY: got {mode!r}, expected full or sample")
    return mode


def free_bytes(path: Path) -> int:
    """Space left for unprivileged writes on the filesystem holding `path` (or its parent)."""
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


@dataclass
class Entry:
    """A finished stage output."""
    stage: str
    key: str
    path: Path
    manifest: dict
    _verified: set = field(default_factory=set, repr=False, compare=False)  # arrays whose whole checksum held

    @property
    def params(self) -> dict:
        return self.manifest.get("params", {})

    @property
    def meta(self) -> dict:
        return self.manifest.get("meta", {})

    def file(self, name: str) -> Path:
        return self.path / name

    def has(self, name: str) -> bool:
        return name in self.manifest.get("arrays", {})

    def array(self, name: str, mmap: bool = True) -> np.ndarray:
        """Load an array, refusing a file whose size, header or checksum differs from the manifest."""
        info = self.manifest.get("arrays", {}).get(name)
        path = self.path / f"{name}.npy"
        fix = (f"rebuild it: `kmfeat cache rm {self.stage} {self.key}` then rerun, or rerun "
               f"`kmfeat {self.stage} ... --force`")
        if info is None:
            raise KmfeatError(f"{path}: not part of this {self.stage} entry")
        if not path.is_file():
            raise KmfeatError(f"{path}: missing; {fix}")
        if path.stat().st_size != info["bytes"] or file_digest(path) != info["digest"]:
            raise KmfeatError(f"{path}: corrupt (size or checksum differs from the manifest); {fix}")
        if "xxh3" in info and name not in self._verified and verify_mode() == "full":
            if whole_digest(path) != info["xxh3"]:
                raise KmfeatError(f"{path}: corrupt (its whole-file checksum differs from the manifest); {fix}")
            self._verified.add(name)
        try:
            arr = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
        except (ValueError, OSError) as exc:
            raise KmfeatError(f"{path}: unreadable ({exc}); {fix}") from None
        if list(arr.shape) != info["shape"] or str(arr.dtype) != info["dtype"]:
            raise KmfeatError(f"{path}: shape/dtype {arr.shape}/{arr.dtype} differ from the manifest; {fix}")
        return arr

    def size_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.path.iterdir() if p.is_file())


def release_pages(arr: np.memmap) -> None:
    """Drop a flushed memmap's pages from this process's resident set (they stay in the page
    cache and on disk), so streaming a large output does not grow RSS with its size."""
    mm = getattr(arr, "_mmap", None)
    if mm is not None and hasattr(mm, "madvise"):
        mm.madvise(mmap.MADV_DONTNEED)


class Writer:
    """Builds one entry in its temp folder; `commit` makes it visible atomically.

    With resume=True an existing temp folder of the same key is kept, so a checkpointing
    stage can continue it; `created` names the arrays `open_array` had to start afresh.
    """

    def __init__(self, store: Store, stage: str, key: str, params: dict, inputs: dict, resume: bool):
        self.store, self.stage, self.key = store, stage, key
        self.params, self.inputs = params, inputs
        self.dir = store.root / stage / f".tmp-{key}"
        self.meta: dict = {}
        self.created: set[str] = set()
        self._arrays: list[str] = []
        self._scratch: set[str] = set()
        self._hashes: dict[str, str] = {}  # whole-file checksums of the arrays written by save()
        self._start = time.time()
        if self.dir.exists() and not resume:
            shutil.rmtree(self.dir)
        self.dir.mkdir(parents=True, exist_ok=True)

    def path(self, filename: str) -> Path:
        """Where to put an extra file (plot, model) that becomes part of the entry."""
        return self.dir / filename

    def scratch(self, filename: str) -> Path:
        """A checkpoint file that survives a crash with the temp folder but is not part of the
        entry: left out of the manifest and deleted once the entry is committed."""
        self._scratch.add(filename)
        return self.dir / filename

    def save(self, name: str, array) -> None:
        """Write a whole array as <name>.npy, hashing it on the way (xxh3-128, kept for the manifest)."""
        hasher = xxhash.xxh3_128()
        with open(self.dir / f"{name}.npy", "wb") as f:
            np.lib.format.write_array(_Sink(f, hasher), np.asarray(array), allow_pickle=False)
        self._hashes[name] = hasher.hexdigest()
        self._track(name)

    def _track(self, name: str) -> None:
        if name not in self._arrays:
            self._arrays.append(name)

    def open_array(self, name: str, shape, dtype) -> np.memmap:
        """A writable .npy memmap to stream into; reopened as is when resuming.

        A new file gets its blocks allocated up front, so a full disk fails here with ENOSPC
        instead of killing the process with SIGBUS when a page of the map is written.
        """
        path = self.dir / f"{name}.npy"
        self._hashes.pop(name, None)  # filled piecewise: hashed at commit
        shape = tuple(int(s) for s in shape)
        if path.exists():
            try:
                arr = np.load(path, mmap_mode="r+")
                if arr.shape == shape and arr.dtype == np.dtype(dtype):
                    self._track(name)
                    return arr
            except (ValueError, OSError):
                pass
            path.unlink()
        arr = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
        fd = os.open(path, os.O_RDWR)
        try:
            os.posix_fallocate(fd, 0, os.fstat(fd).st_size)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                raise
        finally:
            os.close(fd)
        self.created.add(name)
        self._track(name)
        return arr

    def commit(self) -> Entry:
        """Checksum, fsync, write the manifest, and rename the folder into place."""
        arrays = {}
        for name in self._arrays:
            path = self.dir / f"{name}.npy"
            arr = np.load(path, mmap_mode="r")
            _fsync_file(path)
            # memmaps (open_array) are filled piecewise, across resumed runs: hashed here, from the page cache
            whole = self._hashes.get(name) or whole_digest(path)
            arrays[name] = {"shape": list(arr.shape), "dtype": str(arr.dtype),
                            "bytes": path.stat().st_size, "digest": file_digest(path), "xxh3": whole}
            del arr
        files = sorted(p.name for p in self.dir.iterdir() if p.is_file()
                       and p.name not in self._scratch and p.name not in (MANIFEST, MANIFEST + ".part"))
        for name in files:
            if not name.endswith(".npy"):
                _fsync_file(self.dir / name)
        manifest = {
            "stage": self.stage, "key": self.key, "params": self.params, "inputs": self.inputs,
            "kmfeat_version": __version__, "format": FORMAT_VERSION, "arrays": arrays,
            "files": files,
            "seconds": round(time.time() - self._start, 3),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "meta": self.meta,
        }
        tmp = self.dir / (MANIFEST + ".part")
        tmp.write_text(json.dumps(manifest, indent=2, default=str))
        _fsync_file(tmp)
        os.rename(tmp, self.dir / MANIFEST)
        _fsync_dir(self.dir)
        final = self.store.entry_dir(self.stage, self.key)
        old = final.parent / f".old-{self.key}"
        if final.exists():
            # --force, or a damaged folder: moved aside first so the rename below cannot fail
            shutil.rmtree(old, ignore_errors=True)
            os.rename(final, old)
        os.rename(self.dir, final)
        _fsync_dir(final.parent)
        shutil.rmtree(old, ignore_errors=True)
        for name in self._scratch:
            (final / name).unlink(missing_ok=True)
        return self.store.get(self.stage, self.key)

    def abort(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


class Store:
    """The cache root (default ./cache; --cache-dir or KMFEAT_CACHE)."""

    def __init__(self, root: str | Path | None = None):
        self.root = Path(root or os.environ.get("KMFEAT_CACHE") or "cache")

    def entry_dir(self, stage: str, key: str) -> Path:
        return self.root / stage / key

    def get(self, stage: str, key: str) -> Entry | None:
        """The finished entry, or None if there is none (a folder without manifest is not one)."""
        path = self.entry_dir(stage, key)
        try:
            manifest = json.loads((path / MANIFEST).read_text())
        except FileNotFoundError:
            return None
        except (json.JSONDecodeError, UnicodeDecodeError):
            manifest = None
        if not isinstance(manifest, dict):  # garbage, or valid JSON that is not an object ([], null, "x")
            raise KmfeatError(f"{path / MANIFEST}: corrupt manifest; remove it with "
                              f"`kmfeat cache rm {stage} {key}` and rerun") from None
        return Entry(stage, key, path, manifest)

    def _lock_path(self, stage: str, key: str) -> Path:
        path = self.root / ".locks" / f"{stage}-{key}.lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def checked_entry_dir(self, stage: str, key: str) -> Path:
        """entry_dir(stage, key) for a KEY typed by a user: it must be a key (16 hex digits) naming a real folder
        directly inside <root>/<stage>/ (not a symlink), else a KmfeatError; nothing outside the cache is named."""
        if not isinstance(key, str) or not KEY_RE.fullmatch(key):
            raise KmfeatError(f"cache key {key!r}: expected 16 hexadecimal digits as `kmfeat cache ls` shows "
                              f"(nothing removed)")
        path = self.entry_dir(stage, key)
        if path.is_symlink() or (path.exists() and path.resolve().parent != (self.root / stage).resolve()):
            raise KmfeatError(f"{path}: a link out of the cache, not an entry (nothing removed)")
        return path

    @contextlib.contextmanager
    def lock(self, stage: str, key: str, blocking: bool = True, on_wait=None, shared: bool = False):
        """Per-key lock (flock: released by the OS if the process dies): exclusive for writers, `rm` and `gc`;
        shared for the stages that read a finished entry, so that gc and rm leave it alone meanwhile.

        Yields True when held; with blocking=False yields False if another process holds it.
        `on_wait()` is called once before blocking on a lock another process holds.
        """
        mode = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
        with open(self._lock_path(stage, key), "a+") as f:
            try:
                fcntl.flock(f, mode | fcntl.LOCK_NB)
            except BlockingIOError:
                if not blocking:
                    yield False
                    return
                if on_wait is not None:
                    on_wait()
                fcntl.flock(f, mode)
            try:
                yield True
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    @contextlib.contextmanager
    def reading(self, entries, on_wait=None):
        """Shared locks on finished entries for as long as a stage reads them. Each entry is checked again once
        its lock is held: removed or replaced in the meantime (rm, gc, --force) is a KmfeatError, not a
        read of a half-deleted folder."""
        with contextlib.ExitStack() as stack:
            for entry in entries:
                stack.enter_context(self.lock(entry.stage, entry.key, shared=True, on_wait=on_wait))
                now = self._valid(entry.stage, entry.key)
                if now is None or now.manifest != entry.manifest:
                    raise KmfeatError(f"{entry.path}: removed or replaced while this run started "
                                      f"(`kmfeat cache rm`/`gc` or --force); rerun")
            yield

    def writer(self, stage: str, key: str, params: dict, inputs: dict, resume: bool = False) -> Writer:
        """Call with the key's lock held."""
        return Writer(self, stage, key, params, inputs, resume)

    def _valid(self, stage: str, key: str) -> Entry | None:
        try:
            return self.get(stage, key)
        except KmfeatError:
            return None

    def _folders(self, stage: str | None = None):
        """(stage, folder) of every folder under the stage directories."""
        if not self.root.is_dir():
            return
        for stage_dir in sorted(self.root.iterdir()):
            if not stage_dir.is_dir() or stage_dir.name.startswith(".") or stage and stage_dir.name != stage:
                continue
            for path in sorted(stage_dir.iterdir()):
                if path.is_dir():
                    yield stage_dir.name, path

    def entries(self, stage: str | None = None) -> list[Entry]:
        """Finished entries (folders with a readable manifest)."""
        out = []
        for stage_name, path in self._folders(stage):
            if not path.name.startswith("."):
                entry = self._valid(stage_name, path.name)
                if entry is not None:
                    out.append(entry)
        return out

    def leftovers(self) -> list[tuple[str, str, Path]]:
        """Unfinished writes (.tmp-<key>), entries moved aside while being replaced (.old-<key>),
        and folders without a readable manifest: (stage, key, path)."""
        out = []
        for stage_name, path in self._folders():
            for prefix in (".tmp-", ".old-"):
                if path.name.startswith(prefix):
                    out.append((stage_name, path.name[len(prefix):], path))
                    break
            else:
                if not path.name.startswith(".") and self._valid(stage_name, path.name) is None:
                    out.append((stage_name, path.name, path))
        return out

    def remove(self, path: Path) -> None:
        shutil.rmtree(path, ignore_errors=True)

    def _remove_unlocked(self, doomed, dry_run: bool = False, busy: list | None = None) -> list[Path]:
        """Remove the folders of `doomed` (stage, key, path) whose key lock nobody holds; the others go to
        `busy` (in use: written, read or being removed by another process)."""
        removed = []
        for stage, key, path in doomed:
            with self.lock(stage, key, blocking=False) as held:
                if not held:
                    if busy is not None:
                        busy.append(path)
                    continue
                if not dry_run:
                    self.remove(path)
                removed.append(path)
        return removed

    def clean_leftovers(self, keep_tmp: tuple[str, ...] = ()) -> list[Path]:
        """Remove leftovers of interrupted runs that no process is writing, except the temp
        folders of the stages in `keep_tmp` (checkpoints a later run resumes)."""
        return self._remove_unlocked([(s, k, p) for s, k, p in self.leftovers()
                                      if not (s in keep_tmp and p.name.startswith(".tmp-"))])

    def gc(self, keep: dict[tuple[str, str], str] | None = None, dry_run: bool = False) -> GcReport:
        """Remove unfinished temp folders not being written, and (if `keep` is given) the entries not in it.

        keep maps (stage, key) to why it is kept (the pipeline that uses it). A search study is kept while the
        encode entry it searched over is. Folders whose key lock is held (a stage writing or reading them) are
        never touched: they are reported as busy.
        """
        report = GcReport()
        doomed = self.leftovers()
        if keep is not None:
            for e in self.entries():
                why = keep.get((e.stage, e.key))
                source = (e.manifest.get("inputs") or {}).get("encode") if e.stage == "search" else None
                if why is None and source is not None and ("encode", source) in keep:
                    why = f"a search over encode/{source}"
                if why is None:
                    doomed.append((e.stage, e.key, e.path))
                else:
                    report.kept.append((e.path, why))
        report.removed = self._remove_unlocked(doomed, dry_run, report.busy)
        return report


@dataclass
class GcReport:
    """What `Store.gc` removed, kept (path, why) and left alone because a running process holds it."""
    removed: list[Path] = field(default_factory=list)
    kept: list[tuple[Path, str]] = field(default_factory=list)
    busy: list[Path] = field(default_factory=list)
