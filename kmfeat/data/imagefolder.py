"""Image folders `ROOT/{train,test}/<class>/*` (plus an optional `ROOT/unlabeled/`, images at any depth)
from a directory, a .tar or a .tar.gz.

ROOT is the given folder (or archive top) or its single top-level subfolder; hidden folders
(".name") are not classes. Any image Pillow reads is accepted and converted to RGB with
`Image.convert("RGB")` (alpha dropped, no EXIF rotation), except grayscale images with more
than 8 bits, which `convert` would clip (a 16-bit image would come out almost all white):

* 16-bit modes ("I;16", "I;16B", ...) and 32-bit integer "I" images whose values all lie in
  0..65535 (how Pillow may open 16-bit PNG/TIFF) are scaled from 0..65535 to 0..255
  (value / 257, rounded);
* integer images with values outside 0..65535, and float "F" images, map their own min..max
  range to 0..255 (rounded; a constant image gives 0), except that "F" images with all
  values in [0, 1] become round(value * 255). NaN counts as the minimum, +-inf as the
  maximum / minimum.

The gray value is copied to all three channels. File names need not be valid UTF-8 (they
are kept as the OS gives them and shown with backslash escapes in messages).
Files Pillow does not recognise are skipped with one warning; an image that is recognised
but fails to decode is an error.
Loading runs in two parallel passes over chunks of files: a cheap header probe (sizes,
which files are images), then decoding of only the files kept by the optional
class-balanced limits, straight into the arrays `alloc` gives (memory-mapped files in the data
stage), a bounded number of chunks in flight, so a folder's images never all sit in RAM. Archives
are read once, sequentially, into memory in the main process (tar.gz cannot be seeked cheaply);
workers decode the bytes. Worker processes
watch their parent and exit as soon as it is gone (a killed run leaves none behind).
"""
from __future__ import annotations

import io
import math
import os
import posixpath
import tarfile
import threading
import time
import zlib
from pathlib import Path

import numpy as np
from joblib import Parallel, delayed, effective_n_jobs
from PIL import Image, UnidentifiedImageError

from ..cache import release_pages
from ..cluster import current, decode_on_cluster
from ..errors import KmfeatError
from ..memory import check_images
from ..progress import bar, say
from . import Dataset, allocate
from .subset import balanced_subset

SPLITS = ("train", "test")
UNLABELED = "unlabeled"
CHUNK = 2000        # most files per parallel task (keeps per-task overhead small)
MIN_CHUNK = 256     # fewest files per task when splitting a small set over workers
RESAMPLE = Image.Resampling.BICUBIC


def parse_resize(resize) -> tuple[int, int] | None:
    """`data.resize` as (H, W), or None when not set."""
    if resize is None or (hasattr(resize, "__len__") and len(resize) == 0):
        return None
    try:
        h, w = (int(v) for v in resize)
        ok = h >= 1 and w >= 1 and all(float(v) == int(v) for v in resize)
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise KmfeatError(f"data.resize: got {resize!r}, expected [H, W] with two integers >= 1")
    return h, w


def resize_images(x: np.ndarray, size) -> np.ndarray:
    """Resize uint8 (N, H, W, 3) images to `size` = (H, W) with Pillow BICUBIC."""
    h, w = parse_resize(size)
    if x.shape[1:3] == (h, w):
        return x
    out = np.empty((len(x), h, w, 3), np.uint8)
    for i in bar(range(len(x)), desc="resize images", unit="img"):
        out[i] = np.asarray(Image.fromarray(x[i]).resize((w, h), RESAMPLE))
    return out


# ---------------------------------------------------------------- listing files

def _norm(name: str) -> str | None:
    """A tar member name as a clean relative posix path (None for names escaping the archive)."""
    p = posixpath.normpath(name.replace("\\", "/")).lstrip("/")
    return None if p in ("", ".") or p == ".." or p.startswith("../") else p


def _list_tar(path: Path) -> tuple[dict[str, bytes], set[str]]:
    """All regular files (bytes, in one sequential pass) and directories of a tar archive."""
    files: dict[str, bytes] = {}
    dirs: set[str] = set()
    try:
        with tarfile.open(path, "r|*") as tf:
            for member in bar(tf, desc=f"read {path.name}", unit="file"):
                name = _norm(member.name)
                if name is None:
                    continue
                if member.isdir():
                    dirs.add(name)
                elif member.isfile():
                    files[name] = tf.extractfile(member).read()
    except tarfile.ReadError as e:
        if not files and not dirs:
            raise KmfeatError(f"data path {path}: expected a directory, .tar or .tar.gz archive "
                              "(image folder) or a CIFAR release") from e
        raise KmfeatError(f"data path {path}: archive is truncated or corrupt ({e})") from e
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
        raise KmfeatError(f"data path {path}: archive is truncated or corrupt ({e})") from e
    for name in files:
        parent = posixpath.dirname(name)
        while parent:
            dirs.add(parent)
            parent = posixpath.dirname(parent)
    return files, dirs


def _tar_root(dirs: set[str], path: Path) -> str:
    """'' or 'top/' : where train/ and test/ sit inside the archive."""
    if all(s in dirs for s in SPLITS):
        return ""
    tops = sorted(d for d in dirs if "/" not in d and not d.startswith("."))
    if len(tops) == 1 and all(f"{tops[0]}/{s}" in dirs for s in SPLITS):
        return tops[0] + "/"
    raise _no_root(path, tops)


def _dir_root(path: Path) -> Path:
    """The folder holding train/ and test/: `path` or its single top-level subfolder."""
    if all((path / s).is_dir() for s in SPLITS):
        return path
    tops = sorted(p.name for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(tops) == 1 and all((path / tops[0] / s).is_dir() for s in SPLITS):
        return path / tops[0]
    raise _no_root(path, tops)


def _no_root(path: Path, tops: list[str]) -> KmfeatError:
    found = ", ".join(tops[:5]) + (", ..." if len(tops) > 5 else "") if tops else "no folders"
    return KmfeatError(f"data path {path}: expected an image folder with train/<class>/* and "
                       f"test/<class>/* in it or in its single top-level folder (found {found})")


def _list_dir(root: Path, tops=(*SPLITS, UNLABELED)) -> tuple[dict[str, str], set[str]]:
    """Files (absolute paths) and directories under root/train, root/test and root/unlabeled (those
    that exist), relative to root; `tops=("",)` lists everything under root."""
    files: dict[str, str] = {}
    dirs: set[str] = set()
    for split in tops:
        if not (root / split).is_dir():
            continue
        for d, subdirs, names in os.walk(root / split, followlinks=True):
            rel = Path(d).relative_to(root).as_posix()
            pre = "" if rel == "." else f"{rel}/"
            if pre:
                dirs.add(rel)
            dirs.update(f"{pre}{s}" for s in subdirs)
            files.update((f"{pre}{n}", os.path.join(d, n)) for n in names)
    return files, dirs


def _listing(path: Path) -> tuple[dict, set[str], str]:
    """Files and folders relative to ROOT (train/..., test/...), and the prefix naming them."""
    if path.is_dir():
        root = _dir_root(path)
        files, dirs = _list_dir(root)
        return files, dirs, f"{root}/"
    files, dirs = _list_tar(path)
    top = _tar_root(dirs, path)
    files = {k[len(top):]: v for k, v in files.items() if k.startswith(top)}
    dirs = {d[len(top):] for d in dirs if d.startswith(top) and d != top.rstrip("/")}
    return files, dirs, f"{path}:{top}"


def _group(files: dict, dirs: set[str], path: Path):
    """Per split: sorted class names and (class index, rel path, item) in (class, path) order.

    Returns (classes, {split: entries}, loose) where loose counts files not in a class folder.
    """
    found = {s: sorted({d.split("/")[1] for d in dirs
                        if d.count("/") == 1 and d.split("/")[0] == s
                        and not d.split("/")[1].startswith(".")}) for s in SPLITS}
    train, test = set(found["train"]), set(found["test"])
    if train != test:
        raise KmfeatError(f"data path {path}: train and test have different classes: "
                          f"only in train: {sorted(train - test)}; "
                          f"only in test: {sorted(test - train)}")
    classes = found["train"]
    if not classes:
        raise KmfeatError(f"data path {path}: no class folders (expected train/<class>/* and "
                          "test/<class>/*)")
    index = {c: i for i, c in enumerate(classes)}
    entries: dict[str, list] = {s: [] for s in (*SPLITS, UNLABELED)}
    loose = 0
    for rel, item in files.items():
        parts = rel.split("/")
        if parts[0] == UNLABELED:
            if not any(p.startswith(".") for p in parts[1:-1]):
                entries[UNLABELED].append((-1, rel, item))
            continue
        if parts[0] not in entries:
            continue
        if len(parts) < 3:
            loose += 1
        elif parts[1] in index:
            entries[parts[0]].append((index[parts[1]], rel, item))
    for split in entries:
        entries[split].sort(key=lambda e: (e[0], e[1]))
    return [shown(c) for c in classes], entries, loose


# ---------------------------------------------------------------- parallel probe + decode

def _open(item):
    return Image.open(io.BytesIO(item) if isinstance(item, bytes) else item)


def shown(name: str) -> str:
    """`name` printable: bytes that are not UTF-8 (kept by the OS and tarfile as lone
    surrogates) as backslash escapes, e.g. "caf\\xe9.png"."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _gray_to_rgb(g: np.ndarray) -> Image.Image:
    return Image.fromarray(np.repeat(g[:, :, None], 3, axis=2))


def _scale_range(a: np.ndarray) -> np.ndarray:
    """The image's own min..max as 0..255 (constant: 0); NaN as the minimum."""
    a = a.astype(np.float64)
    finite = a[np.isfinite(a)]
    lo, hi = (finite.min(), finite.max()) if finite.size else (0.0, 0.0)
    a = np.nan_to_num(a, nan=lo, posinf=hi, neginf=lo)
    if hi <= lo:
        return np.zeros(a.shape, np.uint8)
    return np.rint((a - lo) * (255.0 / (hi - lo))).clip(0, 255).astype(np.uint8)


def to_rgb(img: Image.Image) -> Image.Image:
    """An opened image as 8-bit RGB; deep grayscale is scaled, not clipped (module docstring)."""
    mode = img.mode
    if mode.startswith("I;16") or mode == "I":
        a = np.asarray(img).astype(np.int64)
        if a.size and (a.min() < 0 or a.max() > 65535):
            return _gray_to_rgb(_scale_range(a))
        return _gray_to_rgb(((a * 2 + 257) // 514).astype(np.uint8))    # round(a / 257)
    if mode == "F":
        a = np.asarray(img)
        if a.size and np.isfinite(a).all() and a.min() >= 0 and a.max() <= 1:
            return _gray_to_rgb(np.rint(a.astype(np.float64) * 255).astype(np.uint8))
        return _gray_to_rgb(_scale_range(a))
    return img.convert("RGB")


_watching = False


def _die_with_parent(parent: int) -> None:
    """Worker initializer: exit as soon as `parent` (the kmfeat process) is gone.

    loky workers otherwise outlive a parent killed with SIGKILL for minutes. A daemon thread
    polls the parent pid (no prctl: PR_SET_PDEATHSIG follows the parent *thread* that forked
    the worker, and loky may fork from a helper thread).
    """
    global _watching
    if os.getpid() == parent or _watching:
        return
    if os.getppid() != parent:
        os._exit(1)

    def watch():
        while os.getppid() == parent:
            time.sleep(0.2)
        os._exit(1)

    threading.Thread(target=watch, name="kmfeat-parent-watch", daemon=True).start()
    _watching = True


def _probe_chunk(items: list, names: list[str]) -> np.ndarray:
    """(H, W) of each file from its header; (-1, -1) for files Pillow does not recognise."""
    out = np.full((len(items), 2), -1, dtype=np.int64)
    for i, (item, name) in enumerate(zip(items, names)):
        try:
            with _open(item) as img:
                out[i] = img.height, img.width
        except UnidentifiedImageError:
            continue
        except Exception as e:
            raise KmfeatError(f"{name}: cannot read image ({e}); fix or remove the file") from None
    return out


def _decode_chunk(items: list, names: list[str], size: tuple[int, int]) -> np.ndarray:
    """Decode files to uint8 RGB (n, H, W, 3), resizing (BICUBIC) those not already H x W."""
    h, w = size
    out = np.empty((len(items), h, w, 3), dtype=np.uint8)
    for i, (item, name) in enumerate(zip(items, names)):
        try:
            with _open(item) as img:
                rgb = to_rgb(img)
        except Exception as e:
            raise KmfeatError(f"{name}: cannot decode image ({e}); "
                              "fix or remove the file") from None
        if rgb.size != (w, h):
            rgb = rgb.resize((w, h), RESAMPLE)
        out[i] = np.asarray(rgb)
    return out


def _jobs(n_jobs) -> int:
    """joblib's worker count for `n_jobs` (-1: all cores), as a KmfeatError when invalid."""
    try:
        return max(1, effective_n_jobs(n_jobs))
    except (ValueError, TypeError) as e:
        raise KmfeatError(f"n_jobs: got {n_jobs!r}, expected -1 (all cores) or a positive "
                          "number of processes") from e


def _run_chunks(func, items: list, names: list[str], n_jobs: int, desc: str, *args):
    """Yield (start, stop, func(items[start:stop], names[start:stop], *args)) in order.

    Chunks run in parallel (joblib) when there are several; a progress bar counts files.
    """
    n = len(items)
    jobs = _jobs(n_jobs)
    n_chunks = max(math.ceil(n / CHUNK), min(jobs, math.ceil(n / MIN_CHUNK)), 1)
    step = max(1, math.ceil(n / n_chunks))
    bounds = [(i, min(i + step, n)) for i in range(0, n, step)]
    calls = ((items[a:b], names[a:b]) for a, b in bounds)
    if jobs == 1 or len(bounds) <= 1:
        results = (func(it, nm, *args) for it, nm in calls)
    else:
        results = Parallel(n_jobs=jobs, return_as="generator", initializer=_die_with_parent,
                           initargs=(os.getpid(),))(
            delayed(func)(it, nm, *args) for it, nm in calls)
    with bar(total=n, desc=desc, unit="img") as pb:
        for (a, b), res in zip(bounds, results):
            yield a, b, res
            pb.update(b - a)


def _check_sizes(hw: np.ndarray, names: list[str]) -> tuple[int, int]:
    """The one (H, W) all images share, else a KmfeatError naming one file of each size."""
    first = hw[0]
    other = np.flatnonzero((hw != first).any(axis=1))
    if len(other):
        j = other[0]
        raise KmfeatError(f"data.resize: images of different sizes: {names[0]} is "
                          f"{first[0]}x{first[1]} but {names[j]} is {hw[j, 0]}x{hw[j, 1]} (HxW); "
                          "set data.resize = [H, W]")
    return int(first[0]), int(first[1])


def load_imagefolder(path, resize=None, n_jobs: int = -1, limit_train: int = 0,
                     limit_test: int = 0, seed: int = 0, alloc=allocate, unlabeled: bool = True) -> Dataset:
    """Load ROOT/{train,test}/<class>/* images as uint8 (N, H, W, 3) RGB with int64 labels, and the
    images anywhere under ROOT/unlabeled/ (when present and `unlabeled`) as `unlabeled_x`.

    Classes are the sorted class-folder names; images are ordered by (class, file path), unlabeled
    ones by path. `resize=(H, W)` resizes with Pillow BICUBIC (needed when sizes differ).
    `limit_train` / `limit_test` keep the `balanced_subset` of that size (seeded), chosen before
    decoding. Each split is decoded into `alloc(name, shape, uint8)` ("train_x", "test_x", "unlabeled_x").
    """
    path = Path(path)
    if not path.exists():
        raise KmfeatError(f"data path {path}: no such file or directory")
    size = parse_resize(resize)
    _jobs(n_jobs)
    files, dirs, prefix = _listing(path)
    classes, entries, loose = _group(files, dirs, path)
    if not unlabeled:
        entries[UNLABELED] = []
    for split in SPLITS:
        _require_all_classes(np.array([e[0] for e in entries[split]], dtype=np.int64), classes,
                             split, path)

    flat = entries["train"] + entries["test"] + entries[UNLABELED]
    names = [shown(prefix + e[1]) for e in flat]
    labels = np.array([e[0] for e in flat], dtype=np.int64)
    hw = _probe([e[2] for e in flat], names, n_jobs)
    is_img = hw[:, 0] >= 0
    _warn_skipped(path, [n for n, ok in zip(names, is_img) if not ok], loose)

    n_train, n_test = len(entries["train"]), len(entries["test"])
    keep = []
    for split, lo, hi, limit in (("train", 0, n_train, limit_train),
                                 ("test", n_train, n_train + n_test, limit_test)):
        idx = lo + np.flatnonzero(is_img[lo:hi])
        _require_all_classes(labels[idx], classes, split, path)
        keep.append(idx[balanced_subset(labels[idx], limit, seed, what=f"data.limit_{split}")])
    keep.append(n_train + n_test + np.flatnonzero(is_img[n_train + n_test:]))
    if size is None:
        size = _check_sizes(hw[is_img], [n for n, ok in zip(names, is_img) if ok])

    if alloc is allocate:  # into RAM; an alloc of memory maps needs disk, which open_array reserves
        check_images(sum(map(len, keep)), size, fix="" if resize else "set data.resize = [H, W]")
    arrays = [decode_into(alloc, name, [flat[i][2] for i in idx], [names[i] for i in idx], size, n_jobs)
              if len(idx) or name != "unlabeled_x" else None
              for name, idx in zip(("train_x", "test_x", "unlabeled_x"), keep)]
    return Dataset(train_x=arrays[0], train_y=labels[keep[0]], test_x=arrays[1], test_y=labels[keep[1]],
                   classes=classes, unlabeled_x=arrays[2])


def load_unlabeled(path, resize=None, n_jobs: int = -1, alloc=allocate) -> np.ndarray:
    """Every image of an extra unlabeled source (`data.unlabeled`, a folder or archive) as uint8
    (N, H, W, 3) in `alloc("unlabeled_x", ...)`: for an image folder with train/ and test/, the images
    under train/ and unlabeled/ (never test/); for any other folder, all its images at any depth."""
    path = Path(path)
    if not path.exists():
        raise KmfeatError(f"data.unlabeled {path}: no such file or directory")
    size = parse_resize(resize)
    _jobs(n_jobs)
    try:
        files, _, prefix = _listing(path)
        files = {rel: item for rel, item in files.items() if rel.split("/")[0] in ("train", UNLABELED)}
    except KmfeatError:
        if path.is_dir():
            files, prefix = _list_dir(path, ("",))[0], f"{path}/"
        else:
            files = _list_tar(path)[0]
            prefix = f"{path}:"
    rels = sorted(r for r in files if not any(p.startswith(".") for p in r.split("/")[:-1]))
    names = [shown(prefix + r) for r in rels]
    hw = _probe([files[r] for r in rels], names, n_jobs)
    ok = np.flatnonzero(hw[:, 0] >= 0)
    if len(rels) - len(ok):
        say(f"data: skipped {len(rels) - len(ok)} file(s) in {path} that are not images")
    if not len(ok):
        raise KmfeatError(f"data.unlabeled {path}: no images found (expected image files, at any depth)")
    if size is None:
        size = _check_sizes(hw[ok], [names[i] for i in ok])
    if alloc is allocate:
        check_images(len(ok), size, what="data.unlabeled", fix="" if resize else "set data.resize = [H, W]")
    return decode_into(alloc, "unlabeled_x", [files[rels[i]] for i in ok], [names[i] for i in ok], size, n_jobs)


def _probe(items: list, names: list[str], n_jobs: int) -> np.ndarray:
    """(n, 2) image heights and widths, -1 for files Pillow does not recognise."""
    hw = np.full((len(items), 2), -1, dtype=np.int64)
    for a, b, res in _run_chunks(_probe_chunk, items, names, n_jobs, "scan images"):
        hw[a:b] = res
    return hw


def decode_into(alloc, name: str, items: list, names: list[str], size, n_jobs: int) -> np.ndarray:
    """Decode `items` into `alloc(name, (n, H, W, 3), uint8)` chunk by chunk; a memory map's written pages
    are flushed and dropped from the resident set as it fills, so RSS does not grow with n. With a cluster
    active (--scheduler) the chunks of a memory map are decoded on its workers."""
    out = alloc(name, (len(items), *size, 3), np.uint8)
    cluster = current()
    if cluster is not None and isinstance(out, np.memmap) and len(items):
        decode_on_cluster(cluster, out, items, names, size, CHUNK)
        release_pages(out)
        return out
    for a, b, res in _run_chunks(_decode_chunk, items, names, n_jobs, f"decode {name.split('_')[0]}", size):
        out[a:b] = res
        if isinstance(out, np.memmap):
            out.flush()
            release_pages(out)
    return out


def _warn_skipped(path: Path, not_images: list[str], loose: int) -> None:
    """One warning for all skipped files (non-images and files outside class folders)."""
    if not_images or loose:
        example = not_images[0] if not_images else "a file outside the class folders"
        say(f"data: skipped {len(not_images) + loose} file(s) in {path} that are not images in a "
            f"class folder (e.g. {example})")


def _require_all_classes(labels: np.ndarray, classes: list[str], split: str, path: Path) -> None:
    """Every class folder must hold at least one image."""
    counts = np.bincount(labels, minlength=len(classes))
    empty = [classes[i] for i in np.flatnonzero(counts == 0)]
    if empty:
        raise KmfeatError(f"data path {path}: class folder {split}/{empty[0]} has no images"
                          + (f" (nor {len(empty) - 1} more)" if len(empty) > 1 else ""))
