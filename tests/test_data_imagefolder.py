"""Image-folder loader (dir, .tar, .tar.gz) on tiny PNG trees, balanced subsets, real archive."""
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kmfeat.data import balanced_subset, detect_format, load_dataset
from kmfeat.data import imagefolder
from kmfeat.data.imagefolder import load_imagefolder
from kmfeat.errors import KmfeatError

REAL = Path(__file__).resolve().parents[2] / "shared/data/cifar10-jpeg.tar.gz"
CLASSES = ["bird", "cat", "dog"]
# "10" sorts before "2": file order must follow the path string, not numbers
FILES = ["2.png", "10.png", "a.png", "b.png"]


def make_tree(root, classes=CLASSES, files=FILES, size=(8, 10), seed=0, test_files=None):
    """Write root/{train,test}/<class>/<file> PNGs of random pixels; return expected arrays."""
    rng = np.random.default_rng(seed)
    out = {}
    for split, names in (("train", files), ("test", test_files or files[:2])):
        xs, ys = [], []
        for ci, c in enumerate(classes):
            d = root / split / c
            d.mkdir(parents=True, exist_ok=True)
            for name in sorted(names):
                x = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
                Image.fromarray(x).save(d / name)
                xs.append(x)
                ys.append(ci)
        out[split] = (np.stack(xs), np.array(ys))
    return out


def make_tar(folder, out, arcname=None):
    with tarfile.open(out, "w:gz" if str(out).endswith("gz") else "w") as tf:
        tf.add(folder, arcname=arcname if arcname is not None else ".")
    return out


def check(ds, expect):
    assert ds.classes == CLASSES
    for split in ("train", "test"):
        x, y = getattr(ds, f"{split}_x"), getattr(ds, f"{split}_y")
        assert x.dtype == np.uint8 and x.flags.c_contiguous and y.dtype == np.int64
        np.testing.assert_array_equal(x, expect[split][0])
        np.testing.assert_array_equal(y, expect[split][1])


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "tree"
    return root, make_tree(root)


def test_dir_tar_targz_identical(tmp_path, tree):
    root, expect = tree
    for path in (root, make_tar(root, tmp_path / "t.tar"), make_tar(root, tmp_path / "t.tar.gz"),
                 make_tar(root, tmp_path / "t.tgz")):
        assert detect_format(path) == "imagefolder"
        check(load_dataset("cifar10", str(path)), expect)


def test_single_top_folder(tmp_path, tree):
    root, expect = tree
    check(load_imagefolder(tmp_path), expect)                       # tmp_path/tree/train/...
    check(load_imagefolder(make_tar(root, tmp_path / "n.tar.gz", arcname="top")), expect)


def test_modes_converted_like_pillow(tmp_path):
    root = tmp_path / "modes"
    rng = np.random.default_rng(3)
    saved = []
    for split in ("train", "test"):
        d = root / split / "x"
        d.mkdir(parents=True)
        rgba = rng.integers(0, 256, (6, 7, 4), dtype=np.uint8)
        imgs = {"l.png": Image.fromarray(rgba[..., 0]),
                "la.png": Image.fromarray(rgba).convert("LA"),
                "rgba.png": Image.fromarray(rgba),
                "p.png": Image.fromarray(rgba[..., :3]).quantize(16),
                "i16.png": Image.fromarray(rgba[..., 0].astype(np.uint16) * 3),
                "cmyk.tif": Image.fromarray(rgba).convert("CMYK")}
        for name, img in imgs.items():
            assert img.mode == {"l": "L", "la": "LA", "rgba": "RGBA", "p": "P", "i16": "I;16",
                                "cmyk": "CMYK"}[name.split(".")[0]]
            img.save(d / name)
            saved.append(d / name)
    ds = load_imagefolder(root)
    n = len(ds.train_x)
    assert n == 6 and ds.train_x.shape == (6, 6, 7, 3)
    for x, f in zip(np.concatenate([ds.train_x, ds.test_x]), sorted(saved[:6]) + sorted(saved[6:])):
        with Image.open(f) as img:
            if img.mode == "I;16":      # 16-bit scaled to 8 (round(v / 257)), not clipped
                gray = np.floor(np.asarray(img) / 257 + 0.5).astype(np.uint8)
                np.testing.assert_array_equal(x, np.repeat(gray[..., None], 3, axis=2))
                continue
            np.testing.assert_array_equal(x, np.asarray(img.convert("RGB")))
    rgba_file = root / "train/x/rgba.png"
    idx = sorted(saved[:6]).index(rgba_file)
    np.testing.assert_array_equal(ds.train_x[idx], np.asarray(Image.open(rgba_file))[..., :3])


def test_mixed_sizes_error_and_resize(tmp_path, tree):
    root, _ = tree
    odd = root / "train/dog/zz.png"
    Image.fromarray(np.zeros((5, 7, 3), np.uint8)).save(odd)
    with pytest.raises(KmfeatError) as e:
        load_imagefolder(root)
    msg = str(e.value)
    assert "zz.png is 5x7" in msg and "8x10" in msg and "data.resize = [H, W]" in msg
    assert "train/bird/10.png" in msg
    ds = load_imagefolder(root, resize=(12, 9))
    assert ds.train_x.shape == (13, 12, 9, 3) and ds.test_x.shape == (6, 12, 9, 3)
    with Image.open(odd) as img:
        want = np.asarray(img.convert("RGB").resize((9, 12), Image.Resampling.BICUBIC))
    np.testing.assert_array_equal(ds.train_x[-1], want)
    with pytest.raises(KmfeatError, match="data.resize"):
        load_imagefolder(root, resize=(0, 3))


def test_resize_to_native_size_is_exact(tree):
    root, expect = tree
    check(load_imagefolder(root, resize=[8, 10]), expect)


@pytest.mark.parametrize("kind", ["dir", "tar"])
def test_truncated_image_names_file(tmp_path, tree, kind):
    root, _ = tree
    f = root / "test/cat/10.png"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    path = root if kind == "dir" else make_tar(root, tmp_path / "t.tar.gz")
    with pytest.raises(KmfeatError, match=r"test/cat/10\.png: cannot decode image"):
        load_imagefolder(path)


def test_non_images_skipped_with_one_warning(tmp_path, tree, capsys):
    root, expect = tree
    (root / "train/cat/README.txt").write_text("not an image")
    (root / "train/dog/.DS_Store").write_bytes(b"\0\0\0\1Bud1" + b"\0" * 50)
    (root / "test/bird/empty.jpg").write_bytes(b"")
    for path in (root, make_tar(root, tmp_path / "t.tar")):
        capsys.readouterr()
        check(load_imagefolder(path), expect)
        err = capsys.readouterr().err
        assert err.count("data: skipped") == 1 and "skipped 3 file(s)" in err


def test_empty_class_and_class_of_non_images(tmp_path, tree):
    root, _ = tree
    (root / "train/eel").mkdir()
    (root / "test/eel").mkdir()
    with pytest.raises(KmfeatError, match="train/eel has no images"):
        load_imagefolder(root)
    (root / "train/eel/notes.txt").write_text("x")
    (root / "test/eel/notes.txt").write_text("x")
    with pytest.raises(KmfeatError, match="train/eel has no images"):
        load_imagefolder(make_tar(root, tmp_path / "t.tar"))


def test_class_mismatch(tree):
    root, _ = tree
    (root / "test/cat").rename(root / "test/kitten")
    with pytest.raises(KmfeatError, match=r"only in train: \['cat'\]; only in test: \['kitten'\]"):
        load_imagefolder(root)


def test_layout_errors(tmp_path):
    with pytest.raises(KmfeatError, match="no such file or directory"):
        load_imagefolder(tmp_path / "missing")
    (tmp_path / "a" / "train").mkdir(parents=True)
    with pytest.raises(KmfeatError, match=r"train/<class>/\* and test/<class>/\*"):
        load_imagefolder(tmp_path / "a")
    (tmp_path / "a" / "test").mkdir()
    with pytest.raises(KmfeatError, match="no class folders"):
        load_imagefolder(tmp_path / "a")
    with pytest.raises(KmfeatError, match="n_jobs: got 0"):
        load_imagefolder(tmp_path / "a", n_jobs=0)
    notes = tmp_path / "notes.txt"
    notes.write_text("hello")
    with pytest.raises(KmfeatError, match="expected a directory, .tar or .tar.gz"):
        load_dataset("imagefolder", str(notes))
    with pytest.raises(KmfeatError, match="expected a directory, .tar or .tar.gz"):
        load_imagefolder(notes)


def test_truncated_archive(tmp_path, tree):
    root, _ = tree
    t = make_tar(root, tmp_path / "t.tar.gz")
    data = t.read_bytes()
    t.write_bytes(data[: len(data) // 2])
    with pytest.raises(KmfeatError, match="truncated or corrupt"):
        load_imagefolder(t)


def test_limits_select_before_decoding_same_as_after(tmp_path):
    root = tmp_path / "big"
    make_tree(root, files=[f"{i}.png" for i in range(9)], size=(4, 4),
              test_files=["x.png", "y.png"])
    full = load_imagefolder(root)
    for path in (root, make_tar(root, tmp_path / "b.tar.gz")):
        for seed in (0, 1):
            part = load_dataset("imagefolder", str(path), limit_train=8, limit_test=3, seed=seed)
            tr, te = balanced_subset(full.train_y, 8, seed), balanced_subset(full.test_y, 3, seed)
            np.testing.assert_array_equal(part.train_x, full.train_x[tr])
            np.testing.assert_array_equal(part.train_y, full.train_y[tr])
            np.testing.assert_array_equal(part.test_x, full.test_x[te])
            assert np.bincount(part.train_y).tolist() == [3, 3, 2]
    for f in sorted((root / "train/dog").iterdir())[:6]:
        f.unlink()
    with pytest.raises(KmfeatError, match="data.limit_train = 12: class 2 has only 3 examples"):
        load_imagefolder(root, limit_train=12)


def test_parallel_chunks_match_serial(tmp_path, tree, monkeypatch):
    root, expect = tree
    monkeypatch.setattr(imagefolder, "CHUNK", 5)
    monkeypatch.setattr(imagefolder, "MIN_CHUNK", 1)
    check(load_imagefolder(make_tar(root, tmp_path / "t.tar.gz"), n_jobs=2), expect)
    f = root / "train/dog/b.png"
    f.write_bytes(f.read_bytes()[:60])
    with pytest.raises(KmfeatError, match=r"train/dog/b\.png: cannot"):
        load_imagefolder(root, n_jobs=2)


# ---------------------------------------------------------------- balanced_subset

def test_balanced_subset_properties():
    rng = np.random.default_rng(0)
    y = rng.permutation(np.repeat(np.arange(4), [30, 25, 40, 20]))
    idx = balanced_subset(y, 42, seed=3)
    assert idx.dtype == np.int64 and len(idx) == 42 and len(np.unique(idx)) == 42
    assert np.all(np.diff(idx) > 0)
    assert np.bincount(y[idx]).tolist() == [11, 11, 10, 10]
    np.testing.assert_array_equal(idx, balanced_subset(y, 42, seed=3))
    assert not np.array_equal(idx, balanced_subset(y, 42, seed=4))
    for limit in (0, -1, len(y), len(y) + 10):
        np.testing.assert_array_equal(balanced_subset(y, limit), np.arange(len(y)))
    with pytest.raises(KmfeatError, match="class 3 has only 20 examples, 22 needed"):
        balanced_subset(y, 88)


def test_balanced_subset_string_like_labels_sorted():
    y = np.array([5, 5, 9, 9, 2, 2, 9])
    idx = balanced_subset(y, 4, seed=0)
    assert sorted(np.bincount(y[idx], minlength=10)[[2, 5, 9]].tolist()) == [1, 1, 2]
    assert np.bincount(y[idx], minlength=10)[2] == 2       # first (smallest) label gets the extra


# ---------------------------------------------------------------- the real archive

real = pytest.mark.skipif(not REAL.exists(), reason=f"{REAL} not present")
C10 = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@pytest.mark.real
@real
def test_real_archive_subset():
    ds = load_dataset("imagefolder", str(REAL), limit_train=500, limit_test=100)
    assert ds.train_x.shape == (500, 32, 32, 3) and ds.test_x.shape == (100, 32, 32, 3)
    assert ds.classes == C10
    assert np.bincount(ds.train_y).tolist() == [50] * 10
    assert np.bincount(ds.test_y).tolist() == [10] * 10
    assert 40 < ds.train_x.mean() < 200 and ds.train_x.std() > 20


@pytest.mark.real
@pytest.mark.slow
@real
def test_real_archive_full():
    t = time.perf_counter()
    ds = load_dataset("cifar10", str(REAL))
    seconds = time.perf_counter() - t
    assert ds.train_x.shape == (50000, 32, 32, 3) and ds.test_x.shape == (10000, 32, 32, 3)
    assert np.bincount(ds.train_y).tolist() == [5000] * 10
    assert np.bincount(ds.test_y).tolist() == [1000] * 10
    assert ds.classes == C10
    assert seconds < 120
