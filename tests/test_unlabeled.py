"""Issue 14: unlabeled images (ROOT/unlabeled/, --unlabeled PATH), patches.source, decoding into the data
stage's memory maps, and the per-fold (STL-10) protocol."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import make_image_folder
from kmfeat import config
from kmfeat.cache import Entry, Store
from kmfeat.data import load_dataset
from kmfeat.errors import KmfeatError
from kmfeat.patches import sample_patches
from kmfeat.runner import Runner
from test_train import features_entry

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["patches.n=500", "kmeans.k=8", "kmeans.iters=2", "head.val=6", "head.epochs=2", "head.hidden=8"]


def add_unlabeled(root: Path, n=7, size=(16, 16), seed=5, where="unlabeled") -> np.ndarray:
    """n PNGs at several depths under root/<where>/, returned in path order."""
    rng = np.random.default_rng(seed)
    imgs = rng.integers(0, 256, size=(n, *size, 3), dtype=np.uint8)
    for i, img in enumerate(imgs):
        folder = root / where / ("deep/er" if i % 2 else "")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(folder / f"u{i:02d}.png")
    (root / where / ".hidden").mkdir(exist_ok=True)
    Image.fromarray(imgs[0]).save(root / where / ".hidden" / "skip.png")
    order = sorted(range(n), key=lambda i: f"{'deep/er/' if i % 2 else ''}u{i:02d}.png")
    return imgs[order]


def runner(tmp_path, data, overrides=(), unlabeled=None):
    cfg = config.load(None, ["data.source=\"imagefolder\"", *SMALL, *overrides], str(data), unlabeled)
    return Runner(cfg, Store(tmp_path / "cache"), quiet=True)


def test_unlabeled_folder_is_its_own_split_decoded_into_the_entrys_memory_maps(tmp_path):
    data = make_image_folder(tmp_path / "imgs", n_train=5, n_test=2)
    expected = add_unlabeled(data)
    entry = runner(tmp_path, data).run("data")
    got = entry.array("unlabeled_x")
    assert got.dtype == np.uint8 and got.shape == (7, 16, 16, 3)
    np.testing.assert_array_equal(got, expected)  # every element written, in path order, hidden folder skipped
    ram = load_dataset("imagefolder", str(data))  # the in-RAM loader gives the same arrays
    for name in ("train_x", "test_x", "unlabeled_x"):
        np.testing.assert_array_equal(entry.array(name), getattr(ram, name))
    assert len(entry.array("train_y")) == 15 and not list(entry.path.glob("*.scratch.npy"))


def test_a_relative_cache_dir_keeps_the_decoded_memory_maps(tmp_path):
    """The data stage must recognise its own memory maps whatever the cache path looks like: saving one over
    itself would truncate the file under its own map (SIGBUS)."""
    data = make_image_folder(tmp_path / "imgs", n_train=5, n_test=2)
    expected = add_unlabeled(data)
    proc = subprocess.run([sys.executable, "-m", "kmfeat", "--cache-dir", "rel-cache", "data", "--data", str(data),
                           "-o", "data.source=\"imagefolder\""], capture_output=True, text=True, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr
    (entry,) = Store(tmp_path / "rel-cache").entries("data")
    np.testing.assert_array_equal(entry.array("unlabeled_x"), expected)
    assert entry.array("train_x").shape == (15, 16, 16, 3)


def test_patches_from_unlabeled_never_read_the_labeled_splits(tmp_path, monkeypatch):
    data = make_image_folder(tmp_path / "imgs", n_train=5, n_test=2)
    add_unlabeled(data)
    r = runner(tmp_path, data, ["patches.source=\"unlabeled\""])
    r.run("data")
    read = []
    real = Entry.array
    monkeypatch.setattr(Entry, "array", lambda self, name, *a, **k: read.append((self.stage, name)) or
                        real(self, name, *a, **k))
    entry = r.run("patches")
    assert [n for s, n in read if s == "data"] == ["unlabeled_x"]
    assert entry.meta["source"] == "unlabeled"


def test_auto_source_is_unlabeled_when_there_is_some_else_train_and_the_key_follows_the_source(tmp_path):
    data = make_image_folder(tmp_path / "imgs", n_train=5, n_test=2)
    plain = runner(tmp_path, data)
    assert plain.run("patches").meta["source"] == "train"
    add_unlabeled(data)
    auto = runner(tmp_path, data)
    assert auto.run("patches").meta["source"] == "unlabeled"
    keys = {s: runner(tmp_path, data, [f"patches.source=\"{s}\""]).key("patches") for s in ("train", "all")}
    assert len({auto.key("patches"), *keys.values()}) == 3


def test_patches_from_all_draw_from_both_arrays_as_if_concatenated():
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 256, (9, 11, 13, 3), dtype=np.uint8), rng.integers(0, 256, (4, 11, 13, 3), dtype=np.uint8)
    np.testing.assert_array_equal(sample_patches([a, b], rf=5, n=333, seed=3),
                                  sample_patches(np.concatenate([a, b]), rf=5, n=333, seed=3))
    with pytest.raises(KmfeatError, match="differ in size"):
        sample_patches([a, b[:, :10]], rf=5, n=10)


def test_unlabeled_source_without_unlabeled_images_is_a_one_line_error(tmp_path):
    data = make_image_folder(tmp_path / "imgs", n_train=5, n_test=2)
    with pytest.raises(KmfeatError, match="no unlabeled images"):
        runner(tmp_path, data, ["patches.source=\"unlabeled\""]).run("patches")


def test_cli_unlabeled_takes_a_folder_of_loose_images_and_an_image_folders_train_split(tmp_path):
    data = make_image_folder(tmp_path / "imgs", n_train=5, n_test=2)
    loose = add_unlabeled(tmp_path / "more", n=5, where="")
    cache = tmp_path / "cache"
    args = [sys.executable, "-m", "kmfeat", "--cache-dir", str(cache), "data", "--data", str(data),
            "-o", "data.source=\"imagefolder\""]
    proc = subprocess.run([*args, "--unlabeled", str(tmp_path / "more")], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert "15 train + 6 test + 5 unlabeled images" in proc.stderr
    (entry,) = Store(cache).entries("data")
    np.testing.assert_array_equal(entry.array("unlabeled_x"), loose)
    other = make_image_folder(tmp_path / "other", n_train=2, n_test=3, seed=9)  # its train/ only (6), never test/
    proc = subprocess.run([*args, "--unlabeled", str(other)], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0 and "+ 6 unlabeled images" in proc.stderr, proc.stderr


def test_unlabeled_images_of_another_size_name_data_resize(tmp_path):
    data = make_image_folder(tmp_path / "imgs", n_train=5, n_test=2)
    add_unlabeled(tmp_path / "big", n=2, size=(20, 20), where="")
    with pytest.raises(KmfeatError, match=r"data.unlabeled .*20x20.*16x16.*data.resize"):
        runner(tmp_path, data, unlabeled=str(tmp_path / "big")).run("data")
    entry = runner(tmp_path, data, ["data.resize=[16, 16]"], unlabeled=str(tmp_path / "big")).run("data")
    assert entry.array("unlabeled_x").shape == (2, 16, 16, 3)


def folds_entry(tmp_path, folds):
    entry = features_entry(tmp_path, flip=True)
    w = Store(tmp_path).writer("encode", "f", {}, {})
    for name in ("train", "train_flip", "test", "train_y", "test_y"):
        w.save(name, entry.array(name))
    from kmfeat.stages import fold_matrix
    w.save("folds", fold_matrix(folds))
    w.meta["classes"] = entry.meta["classes"]
    return w.commit()


def test_folds_train_one_head_per_fold_on_that_folds_images_only(tmp_path, monkeypatch):
    from kmfeat.folds import train_folds
    from kmfeat.heads.mlp import MLPHead

    folds = [np.arange(0, 90), np.arange(60, 150), np.arange(200, 290, dtype=np.int64)[::-1]]
    entry = folds_entry(tmp_path, folds)
    seen = []
    real = MLPHead.fit
    monkeypatch.setattr(MLPHead, "fit", lambda self, X, y, Xv=None, yv=None, **k: seen.append(
        (len(X), len(Xv))) or real(self, X, y, Xv, yv, **k))
    h = config.load(None, ["head.folds=\"stl10\"", "head.val=9", "head.epochs=3", "head.hidden=8"]).head
    out = Store(tmp_path).writer("train", "t", {}, {})
    m = train_folds(h, entry, out)
    assert seen == [(2 * 81, 9)] * 3  # 81 fit images + their mirrors, 9 val, all out of the fold's 90
    assert m["folds"] == 3 and m["n_fit"] == [162] * 3 and m["n_val"] == [9] * 3
    acc = np.array(m["fold_test_accuracy"])
    assert m["test_accuracy_mean"] == pytest.approx(acc.mean()) and m["test_accuracy_std"] == pytest.approx(acc.std())
    for i in range(3):
        fold = json.loads(out.path(f"fold-{i}-metrics.json").read_text())
        assert fold["test"]["accuracy"] == acc[i] and fold["train_accuracy_images"] == 81
    assert json.loads(out.path("metrics.json").read_text())["fold_test_accuracy"] == acc.tolist()


def test_folds_without_predefined_folds_is_a_one_line_error(tmp_path):
    from kmfeat.folds import train_folds

    h = config.load(None, ["head.folds=\"stl10\""]).head
    with pytest.raises(KmfeatError, match="no predefined folds"):
        train_folds(h, features_entry(tmp_path), Store(tmp_path).writer("train", "t", {}, {}))


def test_default_folds_and_source_leave_existing_keys_alone(tmp_path):
    data = make_image_folder(tmp_path / "imgs", n_train=2, n_test=1)
    a = runner(tmp_path, data)
    b = runner(tmp_path, data, ["patches.source=\"auto\"", "head.folds=\"none\""])
    assert {s: a.key(s) for s in ("patches", "train")} == {s: b.key(s) for s in ("patches", "train")}
    c = runner(tmp_path, data, ["head.folds=\"stl10\""])
    assert c.key("train") != a.key("train") and c.key("encode") == a.key("encode")
