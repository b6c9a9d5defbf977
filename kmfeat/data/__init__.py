"""Datasets as uint8 image arrays: official CIFAR-10/100 releases and image folders.

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
    """Train/test images (uint8 (N, H, W, 3) RGB, C-contiguous), int64 labels, class names."""
    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    classes: list[str]


from .cifar import detect_cifar, fetch_release, load_cifar  # noqa: E402  (they use Dataset)
from .imagefolder import load_imagefolder, parse_resize, resize_images  # noqa: E402
from .subset import balanced_subset  # noqa: E402

NAMES = ("cifar10", "cifar100", "imagefolder", "auto")

__all__ = ["Dataset", "load_dataset", "detect_format", "fingerprint", "balanced_subset",
           "load_cifar", "load_imagefolder", "fetch_release"]


def _existing(path) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise KmfeatError(f"data path {path}: no such file or directory")
    return p


def detect_format(path) -> str:
    """The layout at `path`: "cifar10-python" | "cifar10-binary" | "cifar100-python" |
    "cifar100-binary" | "imagefolder"."""
    p = _existing(path)
    fmt = detect_cifar(p)
    if fmt:
        return fmt
    if p.is_dir() or (p.is_file() and tarfile.is_tarfile(p)):
        return "imagefolder"
    raise KmfeatError(f"data path {path}: expected a directory, .tar or .tar.gz archive "
                      "(image folder) or a CIFAR release")


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
    """The class-balanced subsets of already decoded arrays."""
    tr = balanced_subset(ds.train_y, limit_train, seed, what="data.limit_train")
    te = balanced_subset(ds.test_y, limit_test, seed, what="data.limit_test")
    if len(tr) == len(ds.train_y) and len(te) == len(ds.test_y):
        return ds
    return Dataset(ds.train_x[tr], ds.train_y[tr], ds.test_x[te], ds.test_y[te], ds.classes)


def load_dataset(name: str = "cifar10", path: str | None = None, *, data_dir: str | None = None,
                 resize: tuple[int, int] | None = None, n_jobs: int = -1, limit_train: int = 0,
                 limit_test: int = 0, seed: int = 0, label_mode: str = "fine") -> Dataset:
    """Load a dataset by name ("cifar10" | "cifar100" | "imagefolder" | "auto") or path.

    A given `path` is detected (`detect_format`) and wins over `name`. Without a path,
    cifar10/cifar100 come from the official python release in `data_dir` (default
    $KMFEAT_DATA or ./data), downloaded and MD5-checked if missing. `resize=(H, W)` resizes
    (Pillow BICUBIC); `limit_train`/`limit_test` keep a seeded class-balanced subset (for
    image folders chosen before decoding, with the same result).
    """
    if name not in NAMES:
        raise KmfeatError(f"data.source: got {name!r}, expected one of {', '.join(NAMES)}")
    size = parse_resize(resize)
    if path:
        p = _existing(path)
        fmt = detect_format(p)
        if fmt == "imagefolder":
            return load_imagefolder(p, size, n_jobs, limit_train, limit_test, seed)
        if name in ("cifar10", "cifar100") and not fmt.startswith(name + "-"):
            say(f"data: {path} is {fmt}; using it (data.source says {name})")
        ds = load_cifar(p, fmt, label_mode)
    elif name in ("cifar10", "cifar100"):
        ds = load_cifar(fetch_release(name, data_dir), None, label_mode)
    else:
        raise KmfeatError(f"data.path: required for data.source = {name!r} (use --data PATH)")
    ds = _limit(ds, limit_train, limit_test, seed)
    if size is not None:
        check_images(len(ds.train_x) + len(ds.test_x), size)
        ds = Dataset(resize_images(ds.train_x, size), ds.train_y, resize_images(ds.test_x, size),
                     ds.test_y, ds.classes)
    return ds
