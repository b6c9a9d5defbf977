"""STL-10 binary reader on tiny files written in the exact official layout, plus download/MD5."""
import hashlib
import io
import json
import subprocess
import sys
import tarfile
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kmfeat.cache import Store
from kmfeat.data import Dataset, detect_format, load_dataset, stl10
from kmfeat.data.stl10 import detect_stl10, fetch_stl10, load_stl10
from kmfeat.errors import KmfeatError
from test_data_cifar import make_split, tar_gz, write_c10_binary, write_c10_python

CLASSES = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]
N_TRAIN, N_TEST, N_UNLABELED = 12, 10, 7


def images(n, seed):
    return np.random.default_rng(seed).integers(0, 256, (n, 96, 96, 3), dtype=np.uint8)


def x_bytes(x):
    """The official layout, built independently of the reader: per image the R, G, B planes,
    each stored column by column (image[y, x, c] -> byte c*96*96 + x*96 + y)."""
    return b"".join(img.transpose(2, 1, 0).tobytes() for img in x)


@pytest.fixture
def rel():
    """A small release: images, 0-based labels, class names, folds (3 train indices each)."""
    rng = np.random.default_rng(7)
    train_y = np.concatenate([np.arange(10), rng.integers(0, 10, N_TRAIN - 10)])
    folds = [np.sort(rng.choice(N_TRAIN, 3, replace=False)) for _ in range(10)]
    return dict(train_x=images(N_TRAIN, 1), train_y=train_y, test_x=images(N_TEST, 2),
                test_y=rng.integers(0, 10, N_TEST), unlabeled_x=images(N_UNLABELED, 3),
                folds=folds)


def release_files(rel, **override):
    """Base name -> bytes, as in the official stl10_binary/ folder (labels 1-based)."""
    files = {
        "train_X.bin": x_bytes(rel["train_x"]),
        "train_y.bin": (rel["train_y"] + 1).astype(np.uint8).tobytes(),
        "test_X.bin": x_bytes(rel["test_x"]),
        "test_y.bin": (rel["test_y"] + 1).astype(np.uint8).tobytes(),
        "unlabeled_X.bin": x_bytes(rel["unlabeled_x"]),
        "class_names.txt": "\n".join(CLASSES).encode() + b"\n",
        "fold_indices.txt": "".join(" ".join(map(str, f)) + " \n" for f in rel["folds"]).encode(),
    }
    files.update(override)
    return {k: v for k, v in files.items() if v is not None}


def write_folder(parent, rel, **override):
    d = parent / "stl10_binary"
    d.mkdir(parents=True)
    for name, blob in release_files(rel, **override).items():
        (d / name).write_bytes(blob)
    return d


def write_tar(out, rel, order=None, folder="stl10_binary", **override):
    """A .tar(.gz) of the release files as `folder/<name>`, members in the given order."""
    files = release_files(rel, **override)
    with tarfile.open(out, "w:gz" if out.name.endswith(".gz") else "w") as tf:
        for name in order or files:
            info = tarfile.TarInfo(f"{folder}/{name}" if folder else name)
            info.size = len(files[name])
            tf.addfile(info, io.BytesIO(files[name]))
    return out


def check(ds, rel, unlabeled=True, folds=True):
    assert isinstance(ds, Dataset)
    for x in (ds.train_x, ds.test_x):
        assert x.dtype == np.uint8 and x.flags.c_contiguous
    assert ds.train_x.shape == (N_TRAIN, 96, 96, 3) and ds.test_x.shape == (N_TEST, 96, 96, 3)
    np.testing.assert_array_equal(ds.train_x, rel["train_x"])
    np.testing.assert_array_equal(ds.test_x, rel["test_x"])
    assert ds.train_y.dtype == np.int64 and ds.test_y.dtype == np.int64
    np.testing.assert_array_equal(ds.train_y, rel["train_y"])
    np.testing.assert_array_equal(ds.test_y, rel["test_y"])
    assert ds.classes == CLASSES
    if unlabeled:
        assert ds.unlabeled_x.shape == (N_UNLABELED, 96, 96, 3)
        np.testing.assert_array_equal(ds.unlabeled_x, rel["unlabeled_x"])
    else:
        assert ds.unlabeled_x is None
    if folds:
        assert len(ds.folds) == 10
        for got, want in zip(ds.folds, rel["folds"]):
            assert got.dtype == np.int64
            np.testing.assert_array_equal(got, want)
    else:
        assert ds.folds is None


# ---------------------------------------------------------------- layouts

def test_pixel_orientation(tmp_path, rel):
    """Byte c*96*96 + x*96 + y of an image is pixel (row y, column x, channel c)."""
    raw = np.zeros((N_TRAIN, 3, 96, 96), np.uint8)
    raw[0, 0, 5, 2] = 11       # R, column 5, row 2
    raw[0, 1, 0, 90] = 22      # G, column 0, row 90
    raw[1, 2, 95, 1] = 33      # B of the second image, column 95, row 1
    d = write_folder(tmp_path, rel, **{"train_X.bin": raw.tobytes()})
    x = load_stl10(d).train_x
    assert x[0, 2, 5, 0] == 11 and x[0, 90, 0, 1] == 22 and x[1, 1, 95, 2] == 33
    assert int(x.astype(int).sum()) == 66


@pytest.mark.parametrize("where", ["release", "parent", "renamed"])
def test_folder_forms(tmp_path, rel, where):
    d = write_folder(tmp_path / "p", rel)
    if where == "renamed":
        d = d.rename(tmp_path / "mine")
    path = d.parent if where == "parent" else d
    assert detect_stl10(path) and detect_format(path) == "stl10"
    check(load_stl10(path), rel)
    check(load_dataset("stl10", str(path)), rel)


ORDERS = {
    "official": None,
    "reversed": ["fold_indices.txt", "class_names.txt", "unlabeled_X.bin", "test_y.bin",
                 "test_X.bin", "train_y.bin", "train_X.bin"],
    "labels_last": ["unlabeled_X.bin", "train_X.bin", "class_names.txt", "test_X.bin",
                    "fold_indices.txt", "test_y.bin", "train_y.bin"],
}


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("suffix", [".tar.gz", ".tar"])
def test_archive_any_member_order(tmp_path, rel, order, suffix, monkeypatch):
    monkeypatch.setattr(stl10, "CHUNK", 5)     # chunk edges inside every split
    t = write_tar(tmp_path / f"stl10_binary{suffix}", rel, ORDERS[order])
    assert detect_stl10(t) and detect_format(t) == "stl10"
    check(load_stl10(t), rel)


def test_archive_flat_members(tmp_path, rel):
    t = write_tar(tmp_path / "flat.tar.gz", rel, folder="")
    assert detect_format(t) == "stl10"
    check(load_dataset("cifar10", str(t)), rel)


def test_optional_files(tmp_path, rel):
    d = write_folder(tmp_path, rel)
    check(load_stl10(d, unlabeled=False), rel, unlabeled=False)
    t = write_tar(tmp_path / "a.tar.gz", rel)
    check(load_stl10(t, unlabeled=False), rel, unlabeled=False)
    (d / "unlabeled_X.bin").unlink()
    (d / "fold_indices.txt").unlink()
    check(load_stl10(d), rel, unlabeled=False, folds=False)


def test_other_formats_unaffected(tmp_path):
    c10 = make_split(n_train_batches=1, per_batch=4, n_test=3)
    py = write_c10_python(tmp_path / "py", *c10)
    assert detect_format(py) == "cifar10-python"
    assert detect_format(tar_gz(py, tmp_path / "c.tar.gz")) == "cifar10-python"
    assert detect_format(write_c10_binary(tmp_path / "bin", *c10)) == "cifar10-binary"
    folder = tmp_path / "imgs"
    for cls in ("cat", "dog"):
        (folder / "train" / cls).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(folder / "train" / cls / "a.png")
    assert not detect_stl10(folder) and detect_format(folder) == "imagefolder"
    assert not detect_stl10(tar_gz(folder, tmp_path / "imgs.tar.gz"))
    assert not detect_stl10(tmp_path / "c.tar.gz")


# ---------------------------------------------------------------- alloc

def test_alloc_memmaps_are_returned_and_written(tmp_path, rel, monkeypatch):
    monkeypatch.setattr(stl10, "CHUNK", 4)
    t = write_tar(tmp_path / "stl10_binary.tar.gz", rel, ORDERS["labels_last"])
    calls, maps = [], {}

    def alloc(name, shape, dtype):
        calls.append((name, tuple(shape), np.dtype(dtype)))
        maps[name] = np.lib.format.open_memmap(tmp_path / f"{name}.npy", mode="w+", dtype=dtype,
                                               shape=shape)
        return maps[name]

    ds = load_dataset("stl10", str(t), alloc=alloc)
    assert sorted(calls) == [("test_x", (N_TEST, 96, 96, 3), np.uint8),
                             ("train_x", (N_TRAIN, 96, 96, 3), np.uint8),
                             ("unlabeled_x", (N_UNLABELED, 96, 96, 3), np.uint8)]
    assert ds.train_x is maps["train_x"] and ds.test_x is maps["test_x"]
    assert ds.unlabeled_x is maps["unlabeled_x"]
    check(ds, rel)
    for m in maps.values():
        m.flush()
    np.testing.assert_array_equal(np.load(tmp_path / "unlabeled_x.npy"), rel["unlabeled_x"])
    np.testing.assert_array_equal(np.load(tmp_path / "train_x.npy"), rel["train_x"])


def test_alloc_skips_unlabeled_when_not_wanted(tmp_path, rel):
    names = []
    d = write_folder(tmp_path, rel)
    load_stl10(d, lambda n, s, t: names.append(n) or np.empty(s, t), unlabeled=False)
    assert sorted(names) == ["test_x", "train_x"]


# ---------------------------------------------------------------- bad files

@pytest.mark.parametrize("form", ["folder", "tar"])
def test_truncated_images(tmp_path, rel, form):
    blob = x_bytes(rel["test_x"])[:-100]
    path = (write_folder(tmp_path, rel, **{"test_X.bin": blob}) if form == "folder" else
            write_tar(tmp_path / "a.tar.gz", rel, **{"test_X.bin": blob}))
    with pytest.raises(KmfeatError) as e:
        load_stl10(path)
    msg = str(e.value)
    assert "test_X.bin" in msg and f"size {len(blob)} bytes" in msg and "27648" in msg
    assert "\n" not in msg


@pytest.mark.parametrize("form", ["folder", "tar", "tar_labels_first"])
def test_label_count_mismatch(tmp_path, rel, form):
    short = (rel["train_y"][:-1] + 1).astype(np.uint8).tobytes()
    if form == "folder":
        path = write_folder(tmp_path, rel, **{"train_y.bin": short})
    else:
        order = ORDERS["reversed" if form == "tar" else "labels_last"][::-1]
        path = write_tar(tmp_path / "a.tar.gz", rel, order, **{"train_y.bin": short})
    with pytest.raises(KmfeatError, match=rf"train_y.bin: size {N_TRAIN - 1} bytes, expected "
                                          rf"{N_TRAIN} \(one label byte per image of .*train_X"):
        load_stl10(path)


@pytest.mark.parametrize("bad", [0, 11])
def test_label_out_of_range(tmp_path, rel, bad):
    y = (rel["test_y"] + 1).astype(np.uint8)
    y[3] = bad
    d = write_folder(tmp_path, rel, **{"test_y.bin": y.tobytes()})
    with pytest.raises(KmfeatError, match=r"test_y.bin: labels span .*, expected 1..10 "
                                          r"\(10 class names in class_names.txt\)"):
        load_stl10(d)


@pytest.mark.parametrize("form", ["folder", "tar"])
def test_missing_required_file(tmp_path, rel, form):
    if form == "folder":
        path = write_folder(tmp_path, rel, **{"test_y.bin": None})
        where = f"{path / 'test_y.bin'}: missing from the STL-10 release at {path} "
    else:
        path = write_tar(tmp_path / "a.tar.gz", rel, **{"test_y.bin": None})
        where = f"{path}:test_y.bin: missing from the STL-10 release at {path} "
    with pytest.raises(KmfeatError) as e:
        load_stl10(path)
    assert str(e.value).startswith(where)


@pytest.mark.parametrize("text, match", [
    ("1 2\n3 x4 5\n", r"fold_indices.txt line 2: 'x4' is not a 0-based training image index"),
    ("1 -2\n", r"fold_indices.txt line 1: '-2' is not"),
    ("0 1\n\n2 12\n", rf"fold_indices.txt line 3: index 12 out of range, expected 0..{N_TRAIN - 1}"),
    ("\n \n", r"fold_indices.txt: no folds"),
])
def test_malformed_folds(tmp_path, rel, text, match):
    d = write_folder(tmp_path, rel, **{"fold_indices.txt": text.encode()})
    with pytest.raises(KmfeatError, match=match):
        load_stl10(d)


def test_corrupt_archive(tmp_path, rel):
    t = write_tar(tmp_path / "stl10_binary.tar.gz", rel)
    t.write_bytes(t.read_bytes()[:len(t.read_bytes()) // 2])
    with pytest.raises(KmfeatError, match=rf"{t}.*(cannot read|truncated)"):
        load_stl10(t)


# ---------------------------------------------------------------- fetch, MD5, download

def no_download(*a, **k):
    raise AssertionError("must not download")


def test_verified_local_archive_used(tmp_path, rel, monkeypatch):
    data = tmp_path / "data"
    data.mkdir()
    t = write_tar(data / "stl10_binary.tar.gz", rel)
    monkeypatch.setattr(stl10, "MD5", hashlib.md5(t.read_bytes()).hexdigest())
    monkeypatch.setattr(urllib.request, "urlopen", no_download)
    assert fetch_stl10(data) == t
    check(load_dataset("stl10", data_dir=str(data)), rel)
    assert (data / "stl10_binary.tar.gz.md5ok").exists()


def test_local_archive_md5_mismatch(tmp_path, monkeypatch):
    data = tmp_path / "data"
    data.mkdir()
    bad = data / "stl10_binary.tar.gz"
    bad.write_bytes(b"not the release")
    monkeypatch.setattr(urllib.request, "urlopen", no_download)
    with pytest.raises(KmfeatError) as e:
        load_dataset("stl10", data_dir=str(data))
    got = hashlib.md5(b"not the release").hexdigest()
    assert str(e.value) == (f"{bad}: MD5 is {got}, expected 91f7769df0f17e558f3565bffb0c7dfb "
                            "(corrupt or incomplete download); delete it and rerun")


def test_extracted_release_in_data_dir(tmp_path, rel, monkeypatch):
    monkeypatch.setattr(urllib.request, "urlopen", no_download)
    write_folder(tmp_path / "data", rel)
    check(load_dataset("stl10", data_dir=str(tmp_path / "data")), rel)


def test_download(tmp_path, rel, monkeypatch):
    srv = tmp_path / "srv"
    srv.mkdir()
    t = write_tar(srv / "stl10_binary.tar.gz", rel)
    monkeypatch.setattr(stl10, "URL", t.as_uri())
    monkeypatch.setattr(stl10, "MD5", hashlib.md5(t.read_bytes()).hexdigest())
    data = tmp_path / "data"
    check(load_dataset("stl10", data_dir=str(data)), rel)
    assert (data / "stl10_binary.tar.gz").read_bytes() == t.read_bytes()


def test_offline_message(tmp_path, monkeypatch):
    def offline(*a, **k):
        raise urllib.error.URLError("Name or service not known")
    monkeypatch.setattr(urllib.request, "urlopen", offline)
    data = tmp_path / "data"
    with pytest.raises(KmfeatError) as e:
        load_dataset("stl10", data_dir=str(data))
    msg = str(e.value)
    assert "http://ai.stanford.edu/~acoates/stl10/stl10_binary.tar.gz" in msg
    assert str(data) in msg and "\n" not in msg
    assert list(data.iterdir()) == []


def test_stl10_pipeline_end_to_end_on_a_synthetic_release(tmp_path):
    """pipelines/stl10.toml as shipped (only sizes made small) on a release written in the official layout:
    the dictionary from the unlabeled images, one head per predefined fold, mean ± std in evaluate."""
    root = Path(__file__).resolve().parents[1]
    rng = np.random.default_rng(0)
    n_train = 60
    train_y = np.arange(n_train) % 10
    folds = [np.sort(rng.choice(n_train, 30, replace=False)) for _ in range(10)]
    release = dict(train_x=images(n_train, 1), train_y=train_y, test_x=images(20, 2), test_y=np.arange(20) % 10,
                   unlabeled_x=images(30, 3), folds=folds)
    archive = write_tar(tmp_path / "stl10_binary.tar.gz", release)
    cache = tmp_path / "cache"
    small = ["patches.n=2000", "kmeans.k=16", "kmeans.iters=2", "head.val=10"]
    base = [sys.executable, "-m", "kmfeat", "--cache-dir", str(cache)]
    opts = ["-p", "pipelines/stl10.toml", "--data", str(archive), *sum((["-o", o] for o in small), [])]
    proc = subprocess.run([*base, "run", *opts], capture_output=True, text=True, cwd=root)
    assert proc.returncode == 0, proc.stderr
    assert "60 train + 20 test + 30 unlabeled images of 32x32x3, 10 classes, 10 predefined folds" in proc.stderr
    (patches,) = Store(cache).entries("patches")
    assert patches.meta["source"] == "unlabeled"
    (train,) = Store(cache).entries("train")
    metrics = json.loads(train.file("metrics.json").read_text())
    assert metrics["folds"] == 10 and metrics["n_val"] == [10] * 10 and metrics["n_fit"] == [20] * 10
    assert len(metrics["fold_test_accuracy"]) == 10 and metrics["n_test"] == 20
    assert np.isclose(metrics["test_accuracy_mean"], np.mean(metrics["fold_test_accuracy"]))
    out = subprocess.run([*base, "evaluate", *opts], capture_output=True, text=True, cwd=root)
    assert out.returncode == 0 and "± " in out.stdout and out.stdout.count("  fold ") == 10, out.stderr
