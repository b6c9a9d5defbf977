"""STL-10 in the official binary release (`stl10_binary.tar.gz`), plus download.

Reads the release given as its .tar.gz, its extracted `stl10_binary/` folder or a parent folder
holding that, and returns uint8 (N, 96, 96, 3) RGB train/test/unlabeled images, int64 labels
0..9, the class names and the predefined training folds. Images are decoded in bounded chunks
into arrays from the caller's `alloc` (memory-mapped .npy files in the data stage), so the
100,000 unlabeled images (2.76 GB) never sit in RAM at once. An archive is read once, as a
stream, taking its members in whatever order they come; everything is checked once all are in.
"""
from __future__ import annotations

import os
import tarfile
import zlib
from pathlib import Path

import numpy as np

from ..errors import KmfeatError
from . import Dataset, allocate
from .cifar import fetch_archive, peek_tar

URL = "http://ai.stanford.edu/~acoates/stl10/stl10_binary.tar.gz"
ARCHIVE = "stl10_binary.tar.gz"
MD5 = "91f7769df0f17e558f3565bffb0c7dfb"
FOLDER = "stl10_binary"

SIDE = 96
PIXELS = 3 * SIDE * SIDE
CHUNK = 2000

# image file -> the `alloc` name of its array
IMAGES = {"train_X.bin": "train_x", "test_X.bin": "test_x", "unlabeled_X.bin": "unlabeled_x"}
# image file -> its label file
PAIRS = {"train_X.bin": "train_y.bin", "test_X.bin": "test_y.bin"}
CLASSES = "class_names.txt"
FOLDS = "fold_indices.txt"
# small files first, so a folder's cheap checks run before any image is decoded
FILES = (*PAIRS.values(), CLASSES, FOLDS, *IMAGES)
REQUIRED = ("train_X.bin", "train_y.bin", "test_X.bin", "test_y.bin", CLASSES)
_STREAM_BUFSIZE = 1 << 20     # ~3x faster than tarfile's 10 KB default on a 2.6 GB .tar.gz
_READ_ERRORS = (tarfile.TarError, OSError, EOFError, zlib.error)


# ---------------------------------------------------------------- format detection

def detect_stl10(path) -> bool:
    """Whether `path` is an STL-10 release: its `stl10_binary` folder, a folder holding
    train_X.bin or `stl10_binary/`, or a tar whose first members are from the release."""
    path = Path(path)
    if path.is_dir():
        return path.name == FOLDER or (path / "train_X.bin").is_file() or (path / FOLDER).is_dir()
    return bool(peek_tar(path, _detect_name))


def _parts(name: str) -> list[str]:
    return [p for p in name.replace("\\", "/").split("/") if p not in ("", ".")]


def _detect_name(name: str, is_file: bool) -> bool:
    parts = _parts(name)
    if FOLDER in (parts[:-1] if is_file else parts):
        return True
    return is_file and 0 < len(parts) <= 2 and parts[-1] in IMAGES


def _release_file(name: str, is_file: bool) -> str | None:
    """The base name of an archive member that is a release file (inside `stl10_binary/`, or at
    most one folder deep), else None."""
    parts = _parts(name)
    if not is_file or not parts or parts[-1] not in FILES:
        return None
    return parts[-1] if FOLDER in parts[:-1] or len(parts) <= 2 else None


# ---------------------------------------------------------------- reading release files

def _read_exact(f, n: int, label: str) -> bytes:
    """Exactly `n` bytes from `f`; a short or failing read is a truncated or corrupt file."""
    try:
        buf = f.read(n)
    except _READ_ERRORS as e:
        raise KmfeatError(f"{label}: cannot read it ({e}); truncated or corrupt file (delete a "
                          "downloaded archive and rerun)") from e
    if len(buf) != n:
        raise KmfeatError(f"{label}: ended after {len(buf)} of {n} expected bytes (truncated file)")
    return buf


def _image_count(size: int, label: str) -> int:
    if size <= 0 or size % PIXELS:
        raise KmfeatError(f"{label}: size {size} bytes is not a positive multiple of {PIXELS} "
                          f"(one {SIDE}x{SIDE}x3 image); truncated or not an STL-10 image file")
    return size // PIXELS


def _decode(f, out: np.ndarray, label: str) -> np.ndarray:
    """Fill `out` (N, 96, 96, 3) from the official layout, CHUNK images at a time: per image
    3 planes (R, G, B), each 96x96 stored column by column."""
    for start in range(0, len(out), CHUNK):
        k = min(CHUNK, len(out) - start)
        raw = np.frombuffer(_read_exact(f, k * PIXELS, label), dtype=np.uint8)
        out[start:start + k] = raw.reshape(k, 3, SIDE, SIDE).transpose(0, 3, 2, 1)
    return out


def _class_names(blob: bytes, label: str) -> list[str]:
    text = blob.decode("utf-8", errors="replace")
    names = [line.strip() for line in text.splitlines() if line.strip()]
    if not names:
        raise KmfeatError(f"{label}: no class names, expected one per line")
    return names


def _labels(blob: bytes, classes: list[str], label: str) -> np.ndarray:
    """1-based label bytes -> int64 class indices 0..len(classes)-1."""
    y = np.frombuffer(blob, dtype=np.uint8).astype(np.int64)
    if y.min() < 1 or y.max() > len(classes):
        raise KmfeatError(f"{label}: labels span {y.min()}..{y.max()}, expected 1..{len(classes)} "
                          f"({len(classes)} class names in {CLASSES})")
    return y - 1


def _folds(blob: bytes, n_train: int, label: str) -> list[np.ndarray]:
    """One int64 array of 0-based training image indices per non-empty line."""
    folds = []
    for i, line in enumerate(blob.decode("ascii", errors="replace").splitlines(), 1):
        tokens = line.split()
        if not tokens:
            continue
        bad = next((t for t in tokens if not (t.isascii() and t.isdigit())), None)
        if bad is not None:
            raise KmfeatError(f"{label} line {i}: {bad!r:.40} is not a 0-based training image "
                              "index; expected space-separated indices")
        idx = [int(t) for t in tokens]
        if max(idx) >= n_train:
            raise KmfeatError(f"{label} line {i}: index {max(idx)} out of range, expected "
                              f"0..{n_train - 1} ({n_train} training images)")
        folds.append(np.array(idx, dtype=np.int64))
    if not folds:
        raise KmfeatError(f"{label}: no folds, expected one line of space-separated training "
                          "image indices per fold")
    return folds


class _Release:
    """One release's files, taken by base name in any order: images decoded into `alloc`'d
    arrays, the small files (labels, class names, folds) kept as bytes; `dataset` checks the lot.
    """

    def __init__(self, where, label, alloc, unlabeled: bool):
        self.where = where          # the folder or archive, for messages
        self.label = label          # base name -> where that file lives, for messages
        self.alloc = alloc
        self.unlabeled = unlabeled
        self.counts: dict[str, int] = {}
        self.images: dict[str, np.ndarray] = {}
        self.small: dict[str, bytes] = {}

    def wants(self, name: str) -> bool:
        if name in self.counts or name in self.small:
            return False
        return self.unlabeled or name != "unlabeled_X.bin"

    def require(self, have) -> None:
        missing = [n for n in REQUIRED if n not in have]
        if missing:
            raise KmfeatError(f"{self.label(missing[0])}: missing from the STL-10 release at "
                              f"{self.where} (expected {', '.join(REQUIRED)})")

    def take(self, name: str, f, size: int) -> None:
        if name in IMAGES:
            self.counts[name] = _image_count(size, self.label(name))
            self._check_pair(name)
            out = self.alloc(IMAGES[name], (self.counts[name], SIDE, SIDE, 3), np.uint8)
            self.images[name] = _decode(f, out, self.label(name))
        else:
            self.small[name] = _read_exact(f, size, self.label(name))
            image = next((x for x, y in PAIRS.items() if y == name), None)
            if image:
                self._check_pair(image)

    def _check_pair(self, image: str) -> None:
        """Once both are known: one label byte per image."""
        labels = PAIRS.get(image)
        if image in self.counts and labels in self.small \
                and len(self.small[labels]) != self.counts[image]:
            raise KmfeatError(f"{self.label(labels)}: size {len(self.small[labels])} bytes, "
                              f"expected {self.counts[image]} (one label byte per image of "
                              f"{self.label(image)})")

    def dataset(self) -> Dataset:
        self.require({*self.counts, *self.small})
        classes = _class_names(self.small[CLASSES], self.label(CLASSES))
        train_y = _labels(self.small["train_y.bin"], classes, self.label("train_y.bin"))
        test_y = _labels(self.small["test_y.bin"], classes, self.label("test_y.bin"))
        folds = None
        if FOLDS in self.small:
            folds = _folds(self.small[FOLDS], len(train_y), self.label(FOLDS))
        return Dataset(self.images["train_X.bin"], train_y, self.images["test_X.bin"], test_y,
                       classes, self.images.get("unlabeled_X.bin"), folds)


def _release_folder(path: Path) -> Path:
    if path.name != FOLDER and not (path / "train_X.bin").is_file() and (path / FOLDER).is_dir():
        return path / FOLDER
    return path


def _read_folder(folder: Path, release: _Release) -> None:
    have = {n for n in FILES if (folder / n).is_file()}
    release.require(have)
    for name in FILES:
        if name not in have or not release.wants(name):
            continue
        try:
            f = open(folder / name, "rb")
        except OSError as e:
            raise KmfeatError(f"{folder / name}: cannot open it ({e})") from e
        with f:
            release.take(name, f, os.fstat(f.fileno()).st_size)


def _tar_files(path: Path):
    """(base name, file object, size) of each release file in an archive, in archive order, the
    archive read once as a stream. Reading a file object can fail too: see `_read_exact`."""
    try:
        with tarfile.open(path, "r|*", bufsize=_STREAM_BUFSIZE) as tf:
            for member in tf:
                name = _release_file(member.name, member.isfile())
                if name:
                    yield name, tf.extractfile(member), member.size
    except _READ_ERRORS as e:
        raise KmfeatError(f"{path}: cannot read the archive ({e}); expected the official {ARCHIVE} "
                          "(delete it and rerun if it was downloaded)") from e


def _read_tar(path: Path, release: _Release) -> None:
    files = _tar_files(path)
    try:
        for name, f, size in files:
            if release.wants(name):
                release.take(name, f, size)
    finally:
        files.close()


def load_stl10(path, alloc=allocate, unlabeled: bool = True) -> Dataset:
    """Load the STL-10 binary release from its .tar(.gz), `stl10_binary/` folder or a parent.

    `alloc(name, shape, dtype)` gives the arrays the images are decoded into ("train_x",
    "test_x", "unlabeled_x"); `unlabeled=False` skips the 100,000 unlabeled images.
    `folds` are the 10 predefined training folds when fold_indices.txt is there.
    """
    path = Path(path)
    if not path.exists():
        raise KmfeatError(f"data path {path}: no such file or directory")
    if path.is_dir():
        folder = _release_folder(path)
        release = _Release(folder, lambda n: str(folder / n), alloc, unlabeled)
        _read_folder(folder, release)
    else:
        release = _Release(path, lambda n: f"{path}:{n}", alloc, unlabeled)
        _read_tar(path, release)
    return release.dataset()


# ---------------------------------------------------------------- download

def fetch_stl10(data_dir=None) -> Path:
    """Path of the official release in `data_dir` (default $KMFEAT_DATA or ./data): the verified
    stl10_binary.tar.gz (downloaded if missing), or an already extracted `stl10_binary/` there."""
    return fetch_archive(URL, MD5, FOLDER, data_dir, size="2.6 GB")
