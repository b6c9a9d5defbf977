"""CIFAR-10/100 in the official python (pickle) and binary release formats, plus download.

Reads a release given as its .tar.gz, its extracted folder (e.g. `cifar-10-batches-py`) or a
parent folder holding that, and returns uint8 (N, 32, 32, 3) RGB images with int64 labels.
Batch files are parsed strictly (keys, field types, record sizes, shapes) so a wrong file
fails with a one-line KmfeatError naming it and the field (e.g. `.../data_batch_1: b'labels'
is bytes, expected a list of integers`); the number of images per batch is taken from the
data length.
"""
from __future__ import annotations

import hashlib
import io
import os
import pickle
import re
import tarfile
import zlib
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np

from ..errors import KmfeatError
from ..progress import bar, say
from . import Dataset

URL_BASE = "https://www.cs.toronto.edu/~kriz/"

# (dataset, format) -> (archive name, MD5 of the official archive)
RELEASES = {
    ("cifar10", "python"): ("cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a"),
    ("cifar10", "binary"): ("cifar-10-binary.tar.gz", "c32a1d4ab5d03f1284b67883e8d87530"),
    ("cifar100", "python"): ("cifar-100-python.tar.gz", "eb9058c3a382ffc7106e4002c42a8d85"),
    ("cifar100", "binary"): ("cifar-100-binary.tar.gz", "03b5dce01913d631647c71ecec9e9cb8"),
}

# folder name inside each release -> format name used by detect_format
FOLDERS = {
    "cifar-10-batches-py": "cifar10-python",
    "cifar-10-batches-bin": "cifar10-binary",
    "cifar-100-python": "cifar100-python",
    "cifar-100-binary": "cifar100-binary",
}

# a regular file with one of these names marks an (extracted) release folder
MARKERS = {
    "data_batch_1": "cifar10-python",
    "batches.meta": "cifar10-python",
    "data_batch_1.bin": "cifar10-binary",
    "batches.meta.txt": "cifar10-binary",
    "fine_label_names.txt": "cifar100-binary",
    "train.bin": "cifar100-binary",
    "meta": "cifar100-python",
}

SIDE = 32
PIXELS = 3 * SIDE * SIDE
TRAIN_BATCHES = 5
_TAR_PEEK = 64


# ---------------------------------------------------------------- format detection

def detect_cifar(path) -> str | None:
    """The CIFAR format of a tar archive or folder ("cifar10-python", ...), or None."""
    path = Path(path)
    return _detect_dir(path) if path.is_dir() else peek_tar(path, _detect_name)


def peek_tar(path, detect):
    """The first non-empty detect(member name, is_file) over an archive's first _TAR_PEEK members (read as a
    stream, so a big .tar.gz is not decompressed past them), or None; None for what is not a readable tar."""
    try:
        with tarfile.open(path, "r|*") as tf:
            for i, member in enumerate(tf):
                if i >= _TAR_PEEK:
                    break
                found = detect(member.name, member.isfile())
                if found:
                    return found
    except (tarfile.TarError, OSError, EOFError, zlib.error):
        return None
    return None


def _detect_name(name: str, is_file: bool) -> str | None:
    parts = [p for p in name.replace("\\", "/").split("/") if p not in ("", ".")]
    for part in parts[:-1] if is_file else parts:
        if part in FOLDERS:
            return FOLDERS[part]
    if is_file and 0 < len(parts) <= 2 and parts[-1] in MARKERS:
        return MARKERS[parts[-1]]
    return None


def _detect_dir(path: Path) -> str | None:
    if path.name in FOLDERS:
        return FOLDERS[path.name]
    for name, fmt in MARKERS.items():
        if (path / name).is_file():
            return fmt
    for name, fmt in FOLDERS.items():
        if (path / name).is_dir():
            return fmt
    return None


# ---------------------------------------------------------------- reading release files

class _Files:
    """The files of one release by base name, from a folder or read in one pass from a tar."""

    def __init__(self, path: Path, fmt: str):
        self.path = path
        self.blobs: dict[str, bytes] = {}
        self.folder: Path | None = None
        if path.is_dir():
            self.folder = self._release_folder(path, fmt)
            self.names = {p.name for p in self.folder.iterdir() if p.is_file()}
        else:
            self._read_tar(path, fmt)
            self.names = set(self.blobs)

    @staticmethod
    def _release_folder(path: Path, fmt: str) -> Path:
        for name, f in FOLDERS.items():
            if f == fmt and (path / name).is_dir() and path.name != name:
                return path / name
        return path

    def _read_tar(self, path: Path, fmt: str) -> None:
        folder = next(name for name, f in FOLDERS.items() if f == fmt)
        try:
            with tarfile.open(path, "r|*") as tf:
                for member in tf:
                    if not member.isfile():
                        continue
                    parts = member.name.replace("\\", "/").split("/")
                    inside = folder in parts[:-1] or len(parts) <= 2
                    if inside and parts[-1] not in self.blobs:
                        self.blobs[parts[-1]] = tf.extractfile(member).read()
        except (tarfile.TarError, OSError, EOFError) as e:
            raise KmfeatError(f"{path}: cannot read the archive ({e}); expected an official CIFAR "
                              "release .tar.gz (delete it and rerun if it was downloaded)") from e

    def label(self, name: str) -> str:
        """Where a file lives, for error messages."""
        return str(self.folder / name) if self.folder else f"{self.path}:{name}"

    def read(self, name: str) -> bytes:
        if name not in self.names:
            raise KmfeatError(f"{self.label(name)}: missing from the CIFAR release at {self.path}")
        if self.folder is None:
            return self.blobs[name]
        return (self.folder / name).read_bytes()

    def batches(self, prefix: str, suffix: str = "") -> list[str]:
        """`prefix1suffix .. prefixNsuffix`, which must be numbered 1..N without gaps."""
        pat = re.compile(re.escape(prefix) + r"(\d+)" + re.escape(suffix) + "$")
        nums = sorted(int(m.group(1)) for n in self.names if (m := pat.match(n)))
        if not nums:
            first = self.label(f"{prefix}1{suffix}")
            raise KmfeatError(f"{first}: missing from the CIFAR release at {self.path}")
        if nums != list(range(1, len(nums) + 1)):
            missing = sorted(set(range(1, max(nums) + 1)) - set(nums))
            raise KmfeatError(f"{self.path}: training batch {prefix}{missing[0]}{suffix} "
                              f"missing; expected {prefix}1{suffix} .. "
                              f"{prefix}{TRAIN_BATCHES}{suffix}")
        if len(nums) != TRAIN_BATCHES:
            say(f"data: {self.path} has {len(nums)} training batches, the official release has "
                f"{TRAIN_BATCHES}")
        return [f"{prefix}{i}{suffix}" for i in nums]


def _multiarray():
    """numpy's multiarray module (numpy._core in numpy 2, numpy.core before)."""
    core = getattr(np, "_core", None) or np.core
    return core.multiarray


class _BatchUnpickler(pickle.Unpickler):
    """Unpickler that only builds what CIFAR batches contain (dicts, lists, bytes, numpy arrays)."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
    }

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"unexpected object {module}.{name}")
        if module == "_codecs":
            import codecs
            return codecs.encode
        if module.endswith("multiarray"):
            return getattr(_multiarray(), name)
        return getattr(np, name)


def _unpickle(files: _Files, name: str) -> dict:
    try:
        obj = _BatchUnpickler(io.BytesIO(files.read(name)), encoding="bytes").load()
    except KmfeatError:
        raise
    except Exception as e:
        raise KmfeatError(f"{files.label(name)}: not a CIFAR python batch (pickle protocol 2 "
                          f"dict): {e}") from e
    if not isinstance(obj, dict):
        raise KmfeatError(f"{files.label(name)}: expected a pickled dict, got {type(obj).__name__}")
    return obj


def _key(d: dict, key: bytes, files: _Files, name: str):
    if key not in d:
        have = ", ".join(sorted(repr(k) for k in d))
        raise KmfeatError(f"{files.label(name)}: missing key {key!r} (has {have})")
    return d[key]


def _to_hwc(data: np.ndarray) -> np.ndarray:
    """Rows of R, G, B planes (each 32x32 row-major) -> (N, 32, 32, 3)."""
    return np.ascontiguousarray(data.reshape(-1, 3, SIDE, SIDE).transpose(0, 2, 3, 1))


def _what(value) -> str:
    """A field's type for messages: "bytes", "dict", "float64 (2, 3)" (an array)."""
    if isinstance(value, np.ndarray):
        return f"{value.dtype} {value.shape}"
    return type(value).__name__


def _int_list(value, files: _Files, name: str, key: bytes) -> np.ndarray:
    """A batch's labels (a list of integers, or a 1-D integer array) as int64."""
    where = f"{files.label(name)}: {key!r}"
    if not isinstance(value, (list, tuple, np.ndarray)):
        raise KmfeatError(f"{where} is {_what(value)}, expected a list of integers")
    if isinstance(value, np.ndarray):
        arr = value
    elif any(type(v) is not int and not isinstance(v, np.integer) for v in value):
        bad = next(v for v in value if type(v) is not int and not isinstance(v, np.integer))
        raise KmfeatError(f"{where} holds {bad!r:.40} ({type(bad).__name__}), expected a list "
                          "of integers")
    else:
        try:
            arr = np.array(value, dtype=np.int64)
        except OverflowError:
            raise KmfeatError(f"{where} holds an integer out of the int64 range, expected "
                              "class indices") from None
    if arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iu"):
        raise KmfeatError(f"{where} is {_what(arr)}, expected a list of integers")
    if arr.dtype.kind == "u" and arr.size and arr.max() > np.iinfo(np.int64).max:
        raise KmfeatError(f"{where} holds an integer out of the int64 range, expected "
                          "class indices")
    return arr.astype(np.int64)


def _python_batch(files: _Files, name: str, label_key: bytes):
    d = _unpickle(files, name)
    data = _key(d, b"data", files, name)
    labels = _key(d, label_key, files, name)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 \
            or data.shape[1] != PIXELS:
        raise KmfeatError(f"{files.label(name)}: b'data' is {_what(data)}, expected uint8 "
                          f"(N, {PIXELS})")
    y = _int_list(labels, files, name, label_key)
    if len(y) != len(data):
        raise KmfeatError(f"{files.label(name)}: {len(y)} labels for {len(data)} images")
    return _to_hwc(data), y


def _binary_batch(files: _Files, name: str, n_label_bytes: int, label_byte: int):
    blob = files.read(name)
    rec = n_label_bytes + PIXELS
    if not blob or len(blob) % rec:
        raise KmfeatError(f"{files.label(name)}: size {len(blob)} bytes is not a positive multiple "
                          f"of the record size {rec} ({n_label_bytes} label byte(s) + {PIXELS} "
                          "pixel bytes)")
    rows = np.frombuffer(blob, dtype=np.uint8).reshape(-1, rec)
    return _to_hwc(rows[:, n_label_bytes:]), rows[:, label_byte].astype(np.int64)


def _text_names(files: _Files, name: str) -> list[str]:
    text = files.read(name).decode("utf-8", errors="replace")
    return [line.strip() for line in text.splitlines() if line.strip()]


def _pickled_names(files: _Files, name: str, key: bytes) -> list[str]:
    names = _key(_unpickle(files, name), key, files, name)
    where = f"{files.label(name)}: {key!r}"
    if not isinstance(names, (list, tuple)):
        raise KmfeatError(f"{where} is {_what(names)}, expected a list of class names (bytes "
                          "or str)")
    for n in names:
        if not isinstance(n, (bytes, str)):
            raise KmfeatError(f"{where} holds {n!r:.40} ({type(n).__name__}), expected a list "
                              "of class names (bytes or str)")
    return [n.decode("utf-8", "backslashreplace") if isinstance(n, bytes) else n for n in names]


def _check_labels(y: np.ndarray, classes: list[str], where: str) -> None:
    if len(y) and (y.min() < 0 or y.max() >= len(classes)):
        raise KmfeatError(f"{where}: labels span {y.min()}..{y.max()}, "
                          f"expected 0..{len(classes) - 1} ({len(classes)} class names)")


def load_cifar(path, fmt: str | None = None, label_mode: str = "fine") -> Dataset:
    """Load a CIFAR-10/100 release (python or binary format) from a .tar.gz or folder.

    `label_mode` picks CIFAR-100's fine (100) or coarse (20) labels; CIFAR-10 ignores it.
    """
    path = Path(path)
    if not path.exists():
        raise KmfeatError(f"data path {path}: no such file or directory")
    if label_mode not in ("fine", "coarse"):
        raise KmfeatError(f"label_mode: got {label_mode!r}, expected 'fine' or 'coarse'")
    fmt = fmt or detect_cifar(path)
    if fmt not in FOLDERS.values():
        raise KmfeatError(f"data path {path}: not a CIFAR release (expected "
                          "cifar-10-python.tar.gz, cifar-10-binary.tar.gz, cifar-100-*.tar.gz "
                          "or their extracted folder)")
    files = _Files(path, fmt)
    if fmt == "cifar10-python":
        classes = _pickled_names(files, "batches.meta", b"label_names")
        train = [_python_batch(files, n, b"labels") for n in files.batches("data_batch_")]
        test = [_python_batch(files, "test_batch", b"labels")]
    elif fmt == "cifar10-binary":
        classes = _text_names(files, "batches.meta.txt")
        train = [_binary_batch(files, n, 1, 0) for n in files.batches("data_batch_", ".bin")]
        test = [_binary_batch(files, "test_batch.bin", 1, 0)]
    elif fmt == "cifar100-python":
        classes = _pickled_names(files, "meta", f"{label_mode}_label_names".encode())
        key = f"{label_mode}_labels".encode()
        train = [_python_batch(files, "train", key)]
        test = [_python_batch(files, "test", key)]
    else:
        classes = _text_names(files, f"{label_mode}_label_names.txt")
        byte = 1 if label_mode == "fine" else 0
        train = [_binary_batch(files, "train.bin", 2, byte)]
        test = [_binary_batch(files, "test.bin", 2, byte)]
    ds = Dataset(train_x=np.concatenate([x for x, _ in train]),
                 train_y=np.concatenate([y for _, y in train]),
                 test_x=test[0][0], test_y=test[0][1], classes=classes)
    _check_labels(ds.train_y, classes, f"{path} (training batches)")
    _check_labels(ds.test_y, classes, f"{path} (test batch)")
    return ds


# ---------------------------------------------------------------- download + checksum

def default_data_dir() -> Path:
    """Where official releases are kept: $KMFEAT_DATA, else ./data."""
    return Path(os.environ.get("KMFEAT_DATA") or "data")


def md5sum(path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _stamp(path: Path, md5: str) -> tuple[Path, str]:
    """The `<file>.md5ok` stamp and the token it holds once `path` (as it is now) matched `md5`."""
    st = path.stat()
    return Path(f"{path}.md5ok"), f"{st.st_size} {st.st_mtime_ns} {md5}"


def verify_md5(path, expected: str) -> None:
    """Check a local archive's MD5 once; a `<file>.md5ok` stamp (size, mtime, md5) skips rechecks.
    """
    path = Path(path)
    stamp, token = _stamp(path, expected)
    try:
        if stamp.read_text().strip() == token:
            return
    except OSError:
        pass
    got = md5sum(path)
    if got != expected:
        raise KmfeatError(f"{path}: MD5 is {got}, expected {expected} (corrupt or incomplete "
                          "download); delete it and rerun")
    _write_stamp(path, expected)


def _write_stamp(path: Path, md5: str) -> None:
    stamp, token = _stamp(path, md5)
    try:
        stamp.write_text(token + "\n")
    except OSError:
        pass


def _download(url: str, dest: Path, expected: str) -> None:
    """Fetch `url` to `dest.part` with a byte progress bar, check its MD5, then rename to `dest`."""
    part = Path(f"{dest}.part")
    hint = (f"download {url} by hand into {dest.parent}/ (or point --data PATH at a local copy "
            "of the release)")
    try:
        with urllib.request.urlopen(url, timeout=60) as resp, open(part, "wb") as out:
            total = resp.headers.get("Content-Length") if resp.headers else None
            with bar(total=int(total) if total else None, desc=f"download {dest.name}", unit="B",
                     unit_scale=True) as pb:
                for block in iter(lambda: resp.read(1 << 20), b""):
                    out.write(block)
                    pb.update(len(block))
    except (urllib.error.URLError, OSError, ValueError) as e:
        part.unlink(missing_ok=True)
        reason = getattr(e, "reason", None) or e
        raise KmfeatError(f"cannot download {url} ({reason}); {hint}") from e
    got = md5sum(part)
    if got != expected:
        part.unlink(missing_ok=True)
        raise KmfeatError(f"{dest}: MD5 of the download is {got}, expected {expected} (corrupt or "
                          f"incomplete download); rerun, or {hint}")
    os.replace(part, dest)
    _write_stamp(dest, expected)


def fetch_release(name: str = "cifar10", data_dir=None, fmt: str = "python") -> Path:
    """Path of the official release in `data_dir`: the verified .tar.gz (downloaded if missing),
    or an already extracted release folder there."""
    if (name, fmt) not in RELEASES:
        raise KmfeatError(f"data.source: no official release for {name!r} in {fmt!r} format "
                          "(expected cifar10 or cifar100, python or binary)")
    filename, md5 = RELEASES[name, fmt]
    folder = next(f for f, v in FOLDERS.items() if v == f"{name}-{fmt}")
    return fetch_archive(URL_BASE + filename, md5, folder, data_dir)


def fetch_archive(url: str, md5: str, folder: str, data_dir=None, size: str = "") -> Path:
    """The verified archive of `url` in `data_dir` (default $KMFEAT_DATA or ./data), downloaded if missing,
    or the already extracted `folder` there."""
    data_dir = Path(data_dir) if data_dir else default_data_dir()
    archive = data_dir / url.rsplit("/", 1)[-1]
    if archive.is_file():
        verify_md5(archive, md5)
        return archive
    if (data_dir / folder).is_dir():
        return data_dir / folder
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise KmfeatError(f"data dir {data_dir}: cannot create it ({e}); set KMFEAT_DATA to a "
                          "writable folder") from e
    say(f"data: downloading {url}{f' ({size})' if size else ''} to {data_dir}/")
    _download(url, archive, md5)
    return archive
