"""Datasets as uint8 image arrays: official CIFAR-10/100 and STL-10 releases, image folders.

`load_dataset` is the one entry point the stage runner uses; `detect_format` tells the
supported layouts apart and `fingerprint` gives a cheap content identity for cache keys.
"""
from __future__ import annotations

import hashlib
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import KmfeatError
from ..memory import check_images
from ..progress import say


@dataclass
class Dataset:
    """Train/test images (uint8 (N, H, W, 3) RGB, C-contiguous), int64 labels, class names; optionally
    unlabeled images (same layout, no labels) and predefined training folds (arrays of train indices)."""
    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    classes: list[str]
    unlabeled_x: np.ndarray | None = None
    folds: list[np.ndarray] | None = None


def allocate(name: str, shape, dtype) -> np.ndarray:
    """The default `alloc` of the loaders: a plain array. The data stage passes its writer's `open_array`
    instead, so decoded images go straight into memory-mapped .npy files and never all sit in RAM."""
    return np.empty(shape, dtype=dtype)


from .cifar import detect_cifar, fetch_release, load_cifar, peek_tar  # noqa: E402  (they use Dataset)
from .imagefolder import load_imagefolder, parse_resize, resize_images  # noqa: E402
from .stl10 import detect_stl10, fetch_stl10, load_stl10  # noqa: E402
from .subset import balanced_subset  # noqa: E402

NAMES = ("cifar10", "cifar100", "stl10", "imagefolder", "auto")

__all__ = ["Dataset", "load_dataset", "detect_format", "fingerprint", "balanced_subset",
           "load_cifar", "load_imagefolder", "fetch_release", "load_stl10", "fetch_stl10"]


def _existing(path) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise KmfeatError(f"data path {path}: no such file or directory")
    return p


def detect_format(path) -> str:
    """The layout at `path`: "cifar10-python" | "cifar10-binary" | "cifar100-python" |
    "cifar100-binary" | "stl10" | "imagefolder"."""
    p = _existing(path)
    fmt = (detect_cifar(p) or ("stl10" if detect_stl10(p) else None)) if p.is_dir() else _detect_tar(p)
    if fmt:
        return fmt
    if p.is_dir() or (p.is_file() and tarfile.is_tarfile(p)):
        return "imagefolder"
    raise KmfeatError(f"data path {path}: expected a directory, .tar or .tar.gz archive "
                      "(image folder), a CIFAR release or the STL-10 binary release")


def _detect_tar(path: Path) -> str | None:
    """The release format of an archive from its first member names, read once (a 2.6 GB STL-10 .tar.gz is
    told apart at its first member, not after decompressing it whole)."""
    from .cifar import _detect_name as cifar_name
    from .stl10 import _detect_name as stl10_name

    return peek_tar(path, lambda name, is_file: cifar_name(name, is_file)
                    or ("stl10" if stl10_name(name, is_file) else None))


def fingerprint(path) -> str:
    """sha256 of a file's bytes, or of the sorted (relative path, size, mtime_ns) of a folder's
    files: a cheap, run-stable content identity for cache keys."""
    p = _existing(path)
    h = hashlib.sha256()
    if p.is_file():
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        return h.hexdigest()
    rows = []
    for d, _, names in os.walk(p, followlinks=True):
        for n in names:
            full = os.path.join(d, n)
            st = os.stat(full)
            rel = os.fsencode(Path(full).relative_to(p).as_posix())    # names need not be UTF-8
            rows.append((rel, st.st_size, st.st_mtime_ns))
    for rel, size, mtime in sorted(rows):
        h.update(rel + f"\0{size}\0{mtime}\n".encode())
    return h.hexdigest()


def _limit(ds: Dataset, limit_train: int, limit_test: int, seed: int) -> Dataset:
    """The class-balanced subsets of already decoded arrays; predefined folds keep the chosen images they
    hold, renumbered (unlabeled images are not limited)."""
    tr = balanced_subset(ds.train_y, limit_train, seed, what="data.limit_train")
    te = balanced_subset(ds.test_y, limit_test, seed, what="data.limit_test")
    if len(tr) == len(ds.train_y) and len(te) == len(ds.test_y):
        return ds
    folds = ds.folds
    if folds is not None:
        new = np.full(len(ds.train_y), -1, dtype=np.int64)
        new[tr] = np.arange(len(tr))
        folds = [new[f][new[f] >= 0] for f in folds]
    return Dataset(ds.train_x[tr], ds.train_y[tr], ds.test_x[te], ds.test_y[te], ds.classes, ds.unlabeled_x, folds)


def load_dataset(name: str = "cifar10", path: str | None = None, *, data_dir: str | None = None,
                 resize: tuple[int, int] | None = None, n_jobs: int = -1, limit_train: int = 0,
                 limit_test: int = 0, seed: int = 0, label_mode: str = "fine",
                 alloc=allocate) -> Dataset:
    """Load a dataset by name ("cifar10" | "cifar100" | "stl10" | "imagefolder" | "auto") or path.

    A given `path` is detected (`detect_format`) and wins over `name`. Without a path,
    cifar10/cifar100 come from the official python release and stl10 from the official binary
    release in `data_dir` (default $KMFEAT_DATA or ./data), downloaded and MD5-checked if
    missing. `resize=(H, W)` resizes (Pillow BICUBIC); `limit_train`/`limit_test` keep a seeded
    class-balanced subset (for image folders chosen before decoding, with the same result).
    `alloc(name, shape, dtype)` gives the arrays image folders and STL-10 are decoded into.
    """
    if name not in NAMES:
        raise KmfeatError(f"data.source: got {name!r}, expected one of {', '.join(NAMES)}")
    size = parse_resize(resize)
    if path:
        p = _existing(path)
        fmt = detect_format(p)
        if fmt == "imagefolder":
            return load_imagefolder(p, size, n_jobs, limit_train, limit_test, seed, alloc=alloc)
        if name in ("cifar10", "cifar100", "stl10") and fmt != name \
                and not fmt.startswith(name + "-"):
            say(f"data: {path} is {fmt}; using it (data.source says {name})")
        ds = load_stl10(p, alloc) if fmt == "stl10" else load_cifar(p, fmt, label_mode)
    elif name in ("cifar10", "cifar100"):
        ds = load_cifar(fetch_release(name, data_dir), None, label_mode)
    elif name == "stl10":
        ds = load_stl10(fetch_stl10(data_dir), alloc)
    else:
        raise KmfeatError(f"data.path: required for data.source = {name!r} (use --data PATH)")
    ds = _limit(ds, limit_train, limit_test, seed)
    if size is not None:
        extra = ds.unlabeled_x
        check_images(len(ds.train_x) + len(ds.test_x) + (0 if extra is None else len(extra)), size)
        ds = Dataset(resize_images(ds.train_x, size), ds.train_y, resize_images(ds.test_x, size),
                     ds.test_y, ds.classes, None if extra is None else resize_images(extra, size), ds.folds)
    return ds
