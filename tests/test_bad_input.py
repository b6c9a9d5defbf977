"""Bad input at the command line: every case ends with exit status 2 and one stderr line
naming the file or parameter and what was expected, no traceback, and nothing of the failing
stage left in the cache (no entry, no temp folder).
"""
import ctypes
import os
import pickle
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import make_image_folder
from kmfeat import config
from kmfeat.cache import Store
from kmfeat.errors import KmfeatError
from kmfeat.runner import Runner

ROOT = Path(__file__).resolve().parents[1]
IMAGEFOLDER = ["-o", "data.source=\"imagefolder\""]
SMALL = IMAGEFOLDER + ["-o", "patches.n=500", "-o", "kmeans.k=8", "-o", "kmeans.iters=2"]
STATUS_WORDS = (": computing (", ": cached ", "cache: removed ")


def kmfeat(*args, cache, env=None, preexec_fn=None, quiet=True):
    full_env = {**os.environ, "KMFEAT_PROGRESS": "0", "KMFEAT_COMPILE": "0", "KMFEAT_CACHE": str(cache),
                **(env or {})}
    return subprocess.run([sys.executable, "-m", "kmfeat", *(["-q"] if quiet else []), *map(str, args)],
                          capture_output=True, text=True, env=full_env, cwd=ROOT, preexec_fn=preexec_fn)


def lines(text):
    return [line for line in text.splitlines() if line.strip()]


def folders(cache, stage) -> set[str]:
    path = Path(cache) / stage
    return {p.name for p in path.iterdir()} if path.is_dir() else set()


def assert_rejected(proc, cache, expected, stage=None, before=frozenset()):
    """Exit 2, one line naming what is wrong, no traceback, nothing new of `stage` in the cache
    (its folders are still `before`), nothing at all when no stage is given."""
    out = lines(proc.stderr)
    assert proc.returncode == 2, proc.stderr
    assert len(out) == 1 and out[0].startswith("Error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    for text in [expected] if isinstance(expected, str) else expected:
        assert text in out[0], out[0]
    store = Store(cache)
    assert store.leftovers() == []
    if stage is None:
        assert store.entries() == []
    else:
        assert folders(cache, stage) == set(before)


def image(path: Path, size=(16, 16), value=None, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (*size, 3)) if value is None else np.full((*size, 3), value)
    Image.fromarray(pixels.astype(np.uint8)).save(path)
    return path


@pytest.fixture(scope="module")
def ok_folder(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("ok") / "imgs", n_train=4, n_test=2)


@pytest.fixture(scope="module")
def upstream(tmp_path_factory, ok_folder):
    """A cache with data, patches, whiten and kmeans of the small pipeline on ok_folder."""
    cache = tmp_path_factory.mktemp("upstream") / "cache"
    overrides = [o for o in SMALL if o != "-o"]
    Runner(config.load(None, overrides, str(ok_folder)), Store(cache), quiet=True).run("kmeans")
    return cache


@pytest.fixture
def variant(tmp_path, ok_folder):
    """A copy of the good image folder to damage."""
    def make():
        return Path(shutil.copytree(ok_folder, tmp_path / "imgs"))
    return make


@pytest.fixture
def cache(tmp_path):
    return tmp_path / "cache"


# ---------------------------------------------------------------- dataset paths and archives

def test_missing_dataset_path(tmp_path, cache):
    missing = tmp_path / "nope.tar.gz"
    assert_rejected(kmfeat("data", "--data", missing, cache=cache), cache,
                    [str(missing), "no such file or directory"])


def _drop_file_permission_override():
    """Children of root ignore file modes; dropping CAP_DAC_* from the bounding set before
    exec makes the child's root obey them."""
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
        if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


@pytest.mark.parametrize("what", ["archive", "image"])
def test_unreadable_dataset(tmp_path, cache, variant, what):
    target = tmp_path / "secret.tar.gz" if what == "archive" else variant() / "train" / "a" / "000.png"
    if what == "archive":
        target.write_bytes(b"\x1f\x8b not really")
    path = target if what == "archive" else tmp_path / "imgs"
    target.chmod(0)
    preexec = _drop_file_permission_override if os.geteuid() == 0 else None
    probe = subprocess.run(["cat", str(target)], capture_output=True, preexec_fn=preexec)
    if probe.returncode == 0:
        pytest.skip("file permissions cannot be enforced here")
    proc = kmfeat("data", "--data", path, *IMAGEFOLDER, cache=cache, preexec_fn=preexec)
    assert_rejected(proc, cache, [str(target), "Permission denied"], "data")


def test_broken_link_in_image_folder(cache, variant):
    folder = variant()
    (folder / "train" / "a" / "zzz.png").symlink_to(folder / "gone.png")
    assert_rejected(kmfeat("data", "--data", folder, *IMAGEFOLDER, cache=cache), cache,
                    ["train/a/zzz.png", "cannot read", "No such file or directory"], "data")


def _archives(tmp_path: Path, ok_folder: Path) -> dict[str, Path]:
    text = tmp_path / "x.tar.gz"
    text.write_text("this is not an archive\n")
    zipped = tmp_path / "images.zip"
    with zipfile.ZipFile(zipped, "w") as z:
        for p in ok_folder.rglob("*.png"):
            z.write(p, p.relative_to(ok_folder.parent))
    zip_named_tgz = tmp_path / "zip.tar.gz"
    shutil.copy(zipped, zip_named_tgz)
    good = tmp_path / "good.tar.gz"
    with tarfile.open(good, "w:gz") as tf:
        tf.add(ok_folder, arcname="imgs")
    truncated = tmp_path / "truncated.tar.gz"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    return {"text": text, "zip": zipped, "zip named .tar.gz": zip_named_tgz, "truncated": truncated}


@pytest.mark.parametrize("kind,expected", [
    ("text", "expected a directory, .tar or .tar.gz archive"),
    ("zip", "expected a directory, .tar or .tar.gz archive"),
    ("zip named .tar.gz", "expected a directory, .tar or .tar.gz archive"),
    ("truncated", "archive is truncated or corrupt"),
])
def test_not_a_tar_archive(tmp_path, cache, ok_folder, kind, expected):
    path = _archives(tmp_path, ok_folder)[kind]
    assert_rejected(kmfeat("data", "--data", path, *IMAGEFOLDER, cache=cache), cache, [str(path), expected], "data")


# ---------------------------------------------------------------- CIFAR releases

def test_cifar_archive_with_wrong_md5(tmp_path, cache):
    data_dir = tmp_path / "downloads"
    data_dir.mkdir()
    archive = data_dir / "cifar-10-python.tar.gz"
    archive.write_bytes(b"an incomplete download")
    proc = kmfeat("data", "-o", "data.source=\"cifar10\"", cache=cache, env={"KMFEAT_DATA": str(data_dir)})
    assert_rejected(proc, cache, [str(archive), "MD5 is", "expected c58f30108f718f92721af3b95e74349a"], "data")


def _cifar_folder(root: Path, label_key=b"labels", meta=None) -> Path:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8), label_key: [0, 1, 0, 1]}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    (folder / "batches.meta").write_bytes(meta if meta is not None else
                                          pickle.dumps({b"label_names": [b"cat", b"dog"]}, protocol=2))
    return folder


def test_cifar_batch_with_wrong_pickle_keys(tmp_path, cache):
    folder = _cifar_folder(tmp_path, label_key=b"fine_labels")
    assert_rejected(kmfeat("data", "--data", folder, cache=cache), cache,
                    [str(folder / "data_batch_1"), "missing key b'labels'"], "data")


def test_cifar_meta_that_is_not_a_pickle(tmp_path, cache):
    folder = _cifar_folder(tmp_path, meta=b"label_names: cat, dog\n")
    assert_rejected(kmfeat("data", "--data", folder, cache=cache), cache,
                    [str(folder / "batches.meta"), "not a CIFAR python batch"], "data")


# ---------------------------------------------------------------- image folders

def _no_classes(folder):
    for split in ("train", "test"):
        shutil.rmtree(folder / split)
        (folder / split).mkdir()


def _empty_class(folder):
    for p in (folder / "test" / "b").iterdir():
        p.unlink()


def _other_classes(folder):
    (folder / "test" / "c").rename(folder / "test" / "z")


def _truncated_image(folder):
    path = folder / "train" / "b" / "001.png"
    path.write_bytes(path.read_bytes()[:100])


def _other_size(folder):
    image(folder / "train" / "c" / "002.png", size=(20, 18))


@pytest.mark.parametrize("damage,expected", [
    (_no_classes, ["no class folders", "expected train/<class>/*"]),
    (_empty_class, ["class folder test/b has no images"]),
    (_other_classes, ["train and test have different classes", "only in train: ['c']", "only in test: ['z']"]),
    (_truncated_image, ["train/b/001.png", "cannot decode image", "fix or remove the file"]),
    (_other_size, ["data.resize", "train/c/002.png is 20x18", "set data.resize = [H, W]"]),
], ids=lambda v: v.__name__.strip("_") if callable(v) else "")
def test_bad_image_folder(cache, variant, damage, expected):
    folder = variant()
    damage(folder)
    assert_rejected(kmfeat("data", "--data", folder, *IMAGEFOLDER, cache=cache), cache, expected, "data")


def test_non_image_files_are_skipped_with_one_warning(cache, variant):
    folder = variant()
    (folder / "train" / "a" / "notes.txt").write_text("not an image")
    (folder / "test" / "b" / "Thumbs.db").write_bytes(b"\0" * 64)
    proc = kmfeat("data", "--data", folder, *IMAGEFOLDER, cache=cache)
    assert proc.returncode == 0, proc.stderr
    (warning,) = lines(proc.stderr)
    assert "skipped 2 file(s)" in warning and str(folder) in warning
    entry = Store(cache).entries("data")[0]
    assert entry.array("train_x").shape == (12, 16, 16, 3) and entry.array("test_x").shape == (6, 16, 16, 3)


def test_status_lines_without_quiet_end_with_the_error(cache, variant):
    folder = variant()
    _truncated_image(folder)
    proc = kmfeat("data", "--data", folder, *IMAGEFOLDER, cache=cache, quiet=False)
    out = lines(proc.stderr)
    assert proc.returncode == 2 and out[-1].startswith("Error: ") and "cannot decode image" in out[-1]
    assert all(any(word in line for word in STATUS_WORDS) for line in out[:-1]), proc.stderr


# ---------------------------------------------------------------- configuration

@pytest.mark.parametrize("args,expected", [
    (["kmeans", "-o", "kmeans.kk=3"], ["kmeans.kk: unknown key", "valid keys: k, iters"]),
    (["kmeans", "-o", "kmeans.k=\"many\""], ["kmeans.k: got 'many'", "expected int"]),
    (["kmeans", "-o", "kmeans.k=2.5"], ["kmeans.k: got 2.5", "expected int"]),
    (["kmeans", "-o", "clusters.k=3"], ["clusters: unknown section", "valid sections"]),
    (["encode", "-o", "encode.stride=0"], ["encode.stride: got 0, expected >= 1"]),
    (["encode", "-o", "pool.grid=0"], ["pool.grid: got 0, expected a grid size >= 1"]),
    (["train", "-o", "head.dropout=-0.1"], ["head.dropout: got -0.1", "expected 0 <= dropout < 1"]),
    (["train", "-o", "head.input_dropout=-0.5"], ["head.input_dropout: got -0.5"]),
    (["data", "-o", "data.resize=[32]"], ["data.resize: got [32], expected [H, W]"]),
    (["data", "-o", "data.source=\"svhn\""], ["data.source: got 'svhn'", "expected one of"]),
])
def test_bad_parameter(cache, args, expected):
    assert_rejected(kmfeat(*args, cache=cache), cache, expected)


@pytest.mark.parametrize("text,expected", [
    ("[kmeans]\nkk = 3\n", "kmeans.kk: unknown key"),
    ("[kmeans]\nk = \"many\"\n", "kmeans.k: got 'many' (str), expected int"),
    ("[kmeans\nk = 3\n", "not valid TOML"),
    ("kmeans = 3\n", "kmeans: expected a [kmeans] table"),
])
def test_bad_pipeline_file(tmp_path, cache, text, expected):
    path = tmp_path / "p.toml"
    path.write_text(text)
    assert_rejected(kmfeat("kmeans", "-p", path, cache=cache), cache, expected)


# ---------------------------------------------------------------- parameters that do not fit the data

@pytest.fixture
def warm(tmp_path, upstream):
    """A copy of the upstream cache: only the failing stage runs."""
    return Path(shutil.copytree(upstream, tmp_path / "cache"))


@pytest.mark.parametrize("stage,args,expected", [
    ("kmeans", ["-o", "kmeans.k=600"], ["kmeans.k: 600 clusters but only 500 patches"]),
    ("patches", ["-o", "patches.rf=20"], ["patches.rf", "16x16", "got 20"]),
    ("encode", ["-o", "pool.grid=20"], ["pool.grid: 20x20 cells do not fit the 11x11 response map"]),
    ("whiten", ["-o", "whiten.eps=0"], ["whiten.eps", "singular", "set whiten.eps >"]),
])
def test_parameter_that_does_not_fit_the_data(warm, ok_folder, stage, args, expected):
    before = folders(warm, stage)
    proc = kmfeat(stage, "--data", ok_folder, *SMALL, *args, cache=warm)
    assert_rejected(proc, warm, expected, stage, before)


def test_bad_shard_setting(warm, ok_folder):
    proc = kmfeat("encode", "--data", ok_folder, *SMALL, cache=warm, env={"KMFEAT_SHARD": "ten"})
    assert_rejected(proc, warm, ["KMFEAT_SHARD: got 'ten'", "expected a positive integer"], "encode", set())


# ---------------------------------------------------------------- NaN and inf

def test_whitening_that_overflows_on_constant_images(tmp_path, cache):
    folder = tmp_path / "flat"
    for split, n in (("train", 3), ("test", 1)):
        for name in ("a", "b"):
            for i in range(n):
                image(folder / split / name / f"{i}.png", value=100)
    # constant images: all normalized patches are 0, so W = 1/sqrt(eps) overflows float32
    proc = kmfeat("kmeans", "--data", folder, *SMALL, "-o", "whiten.eps=1e-300", cache=cache)
    assert_rejected(proc, cache, ["whiten.eps", "NaN or inf", "1e-300"], "whiten")
    assert Store(cache).entries("kmeans") == []


def test_nan_features_are_refused(monkeypatch, tmp_path, upstream, ok_folder):
    from kmfeat.encode import Encoder

    def nan_batches(self, images, flip=False, batch=None, compiled=None):
        for start in range(0, len(images), 4):
            stop = min(start + 4, len(images))
            yield start, stop, np.full((stop - start, self.n_features), np.nan, np.float32)

    monkeypatch.setattr(Encoder, "iter_transform", nan_batches)
    cache = Path(shutil.copytree(upstream, tmp_path / "cache"))
    cfg = config.load(None, [o for o in SMALL if o != "-o"], str(ok_folder))
    with pytest.raises(KmfeatError, match=r"encode: features of train images 0-4 contain NaN or inf; .*whiten\.eps"):
        Runner(cfg, Store(cache), quiet=True).run("encode")
    assert not list((cache / "encode").iterdir())
