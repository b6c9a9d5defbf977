"""Content-addressed stage store: cache/<stage>/<key>/ holding .npy arrays + manifest.json.

key = hash of the canonical JSON of {stage, params, input keys, format version}.
Writes are atomic: a stage builds its output in cache/<stage>/.tmp-<key>/ while holding a
per-key lock, then renames it into place; the manifest (with a checksum of every array) is
written last, so a folder without a valid manifest is never taken for a result. The temp
folder's name depends only on the key, so a stage that checkpoints (encode) can resume it.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from . import __version__
from .errors import KmfeatError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
_SAMPLE = 1 << 20


def make_key(stage: str, params: dict, inputs: dict[str, str]) -> str:
    """Stable key of a stage's output from its params and the keys of its inputs."""
    blob = json.dumps({"stage": stage, "params": params, "inputs": inputs, "format": FORMAT_VERSION},
                      sort_keys=True, separators=(",", ":"), default=str)
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


def disk_full_error(exc: OSError, where) -> KmfeatError:
    return KmfeatError(f"{where}: disk full (no space left on device); free space or set --cache-dir "
                       f"elsewhere, then rerun (no partial result was kept)")


@dataclass
class Entry:
    """A finished stage output."""
    stage: str
    key: str
    path: Path
    manifest: dict

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
        fix = f"rebuild it with `kmfeat cache rm {self.stage} {self.key}` or rerun with --force"
        if info is None:
            raise KmfeatError(f"{path}: not part of this {self.stage} entry")
        if not path.is_file():
            raise KmfeatError(f"{path}: missing; {fix}")
        if path.stat().st_size != info["bytes"] or file_digest(path) != info["digest"]:
            raise KmfeatError(f"{path}: corrupt (size or checksum differs from the manifest); {fix}")
        try:
            arr = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
        except (ValueError, OSError) as exc:
            raise KmfeatError(f"{path}: unreadable ({exc}); {fix}") from None
        if list(arr.shape) != info["shape"] or str(arr.dtype) != info["dtype"]:
            raise KmfeatError(f"{path}: shape/dtype {arr.shape}/{arr.dtype} differ from the manifest; {fix}")
        return arr

    def size_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.path.iterdir() if p.is_file())


class Writer:
    """Builds one entry in its temp folder; `commit` makes it visible atomically."""

    def __init__(self, store: Store, stage: str, key: str, params: dict, inputs: dict, resume: bool):
        self.store, self.stage, self.key = store, stage, key
        self.params, self.inputs = params, inputs
        self.dir = store.root / stage / f".tmp-{key}"
        self.meta: dict = {}
        self._arrays: list[str] = []
        self._start = time.time()
        if self.dir.exists() and not resume:
            shutil.rmtree(self.dir)
        self.dir.mkdir(parents=True, exist_ok=True)

    def path(self, filename: str) -> Path:
        """Where to put an extra file (plot, model) that becomes part of the entry."""
        return self.dir / filename

    def save(self, name: str, array) -> None:
        """Write a whole array as <name>.npy."""
        np.save(self.dir / f"{name}.npy", np.asarray(array), allow_pickle=False)
        self._track(name)

    def _track(self, name: str) -> None:
        if name not in self._arrays:
            self._arrays.append(name)

    def open_array(self, name: str, shape, dtype) -> np.memmap:
        """A writable .npy memmap to stream into; reopened as is when resuming."""
        path = self.dir / f"{name}.npy"
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
        self._track(name)
        return arr

    def commit(self) -> Entry:
        """Checksum, fsync, write the manifest, and rename the folder into place."""
        arrays = {}
        for name in self._arrays:
            path = self.dir / f"{name}.npy"
            arr = np.load(path, mmap_mode="r")
            _fsync_file(path)
            arrays[name] = {"shape": list(arr.shape), "dtype": str(arr.dtype),
                            "bytes": path.stat().st_size, "digest": file_digest(path)}
            del arr
        for path in self.dir.iterdir():
            if path.is_file() and path.suffix != ".npy":
                _fsync_file(path)
        manifest = {
            "stage": self.stage, "key": self.key, "params": self.params, "inputs": self.inputs,
            "kmfeat_version": __version__, "format": FORMAT_VERSION, "arrays": arrays,
            "files": sorted(p.name for p in self.dir.iterdir() if p.is_file()),
            "seconds": round(time.time() - self._start, 3),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "meta": self.meta,
        }
        tmp = self.dir / (MANIFEST + ".part")
        tmp.write_text(json.dumps(manifest, indent=2, default=str))
        _fsync_file(tmp)
        os.rename(tmp, self.dir / MANIFEST)
        _fsync_dir(self.dir)
        final = self.store.root / self.stage / self.key
        try:
            os.rename(self.dir, final)
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
            shutil.rmtree(self.dir)
        _fsync_dir(final.parent)
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
            raise KmfeatError(f"{path / MANIFEST}: corrupt manifest; remove it with "
                              f"`kmfeat cache rm {stage} {key}` and rerun") from None
        return Entry(stage, key, path, manifest)

    def _lock_path(self, stage: str, key: str) -> Path:
        path = self.root / ".locks" / f"{stage}-{key}.lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    @contextlib.contextmanager
    def lock(self, stage: str, key: str, blocking: bool = True):
        """Exclusive per-key lock (flock: released by the OS if the process dies).

        Yields True when held; with blocking=False yields False if another process holds it.
        """
        with open(self._lock_path(stage, key), "a+") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
            except BlockingIOError:
                yield False
                return
            try:
                yield True
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def writer(self, stage: str, key: str, params: dict, inputs: dict, resume: bool = False) -> Writer:
        """Call with the key's lock held."""
        return Writer(self, stage, key, params, inputs, resume)

    def entries(self, stage: str | None = None) -> list[Entry]:
        out = []
        if not self.root.is_dir():
            return out
        for stage_dir in sorted(self.root.iterdir()):
            if not stage_dir.is_dir() or stage_dir.name.startswith(".") or stage and stage_dir.name != stage:
                continue
            for path in sorted(stage_dir.iterdir()):
                if path.is_dir() and not path.name.startswith("."):
                    entry = self.get(stage_dir.name, path.name)
                    if entry is not None:
                        out.append(entry)
        return out

    def leftovers(self) -> list[tuple[str, str, Path]]:
        """Temp folders of unfinished writes, and folders without a manifest: (stage, key, path)."""
        out = []
        if not self.root.is_dir():
            return out
        for stage_dir in sorted(self.root.iterdir()):
            if not stage_dir.is_dir() or stage_dir.name.startswith("."):
                continue
            for path in sorted(stage_dir.iterdir()):
                if not path.is_dir():
                    continue
                if path.name.startswith(".tmp-"):
                    out.append((stage_dir.name, path.name[5:], path))
                elif not (path / MANIFEST).exists():
                    out.append((stage_dir.name, path.name, path))
        return out

    def remove(self, path: Path) -> None:
        shutil.rmtree(path, ignore_errors=True)

    def gc(self, keep: set[tuple[str, str]] | None = None, dry_run: bool = False) -> list[Path]:
        """Remove unfinished temp folders not being written, and (if `keep` is given) entries not in it.

        Folders whose key lock is held by a running process are never touched.
        """
        doomed = []
        for stage, key, path in self.leftovers():
            doomed.append((stage, key, path))
        if keep is not None:
            doomed += [(e.stage, e.key, e.path) for e in self.entries() if (e.stage, e.key) not in keep]
        removed = []
        for stage, key, path in doomed:
            with self.lock(stage, key, blocking=False) as held:
                if not held:
                    continue
                if not dry_run:
                    self.remove(path)
                removed.append(path)
        return removed
