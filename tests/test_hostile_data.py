"""Hostile data (issue 11): a killed `kmfeat data` leaves no workers, deep grayscale images
are scaled instead of clipped, file names that are not UTF-8 load, and CIFAR files with
fields of the wrong type fail with one line naming the file and the field.
"""
import os
import pickle
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import make_image_folder
from kmfeat.data import fingerprint, load_dataset
from kmfeat.data import imagefolder
from kmfeat.data.imagefolder import load_imagefolder
from test_data_cifar import make_split, py2_pickle, write_c10_python, write_c100_python

ROOT = Path(__file__).resolve().parents[1]
IMAGEFOLDER = ["-o", 'data.source="imagefolder"']


def kmfeat_cmd(cache, *args):
    return [sys.executable, "-m", "kmfeat", "-q", "--cache-dir", str(cache), *map(str, args)]


def env(cache):
    return {**os.environ, "KMFEAT_PROGRESS": "0", "KMFEAT_COMPILE": "0", "KMFEAT_CACHE": str(cache)}


def kmfeat(cache, *args):
    return subprocess.run(kmfeat_cmd(cache, *args), capture_output=True, text=True,
                          env=env(cache), cwd=ROOT, timeout=120)


def one_error(proc) -> str:
    """Exit 2, exactly one `Error:` line on stderr and no traceback; returns that line."""
    out = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert len(out) == 1 and out[0].startswith("Error: "), proc.stderr
    return out[0]


# ---------------------------------------------------------------- 4: no orphaned workers

def _many_images(root: Path, per_class: int) -> Path:
    """train/test x 2 classes x `per_class` hard links of one 320x320 noise PNG: cheap to
    create, ~3 ms each to decode, so loading takes seconds even on many cores."""
    src = root / "src.png"
    root.mkdir(parents=True)
    noise = np.random.default_rng(0).integers(0, 256, (320, 320, 3), dtype=np.uint8)
    Image.fromarray(noise).save(src)
    for split in ("train", "test"):
        for c in ("a", "b"):
            d = root / "data" / split / c
            d.mkdir(parents=True)
            for i in range(per_class):
                try:
                    os.link(src, d / f"{i:05d}.png")
                except OSError:
                    pytest.skip(f"no hard links in {root}")
    return root / "data"


def test_killed_data_run_leaves_no_workers(tmp_path):
    """SIGKILL of `kmfeat data` while its loky workers run: every child it had is gone
    within 10 s (they used to stay alive for minutes)."""
    psutil = pytest.importorskip("psutil")
    from joblib import cpu_count
    if cpu_count() < 2:
        pytest.skip("image folders load in one process on a single core")
    data = _many_images(tmp_path / "imgs", 2500)
    cache = tmp_path / "cache"
    proc = subprocess.Popen(kmfeat_cmd(cache, "data", "--data", data, *IMAGEFOLDER,
                                       "-o", "data.resize=[16,16]"),
                            env=env(cache), cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    parent = psutil.Process(proc.pid)
    children = []
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                children = parent.children(recursive=True)
                workers = [c for c in children if "popen_loky" in " ".join(c.cmdline())]
            except psutil.Error:
                workers = []
            if len(workers) >= 2:
                break
            time.sleep(0.02)
        else:
            pytest.fail("kmfeat data ended or never started loky workers "
                        f"(exit status {proc.poll()})")
        time.sleep(0.3)     # let the workers start decoding
        children = parent.children(recursive=True)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=10) == -signal.SIGKILL, "kmfeat data finished before the kill"

        def alive():
            out = []
            for c in children:
                try:
                    if c.is_running() and c.status() != psutil.STATUS_ZOMBIE:
                        out.append(c.pid)
                except psutil.NoSuchProcess:
                    pass
            return out

        deadline = time.monotonic() + 10
        while alive() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert alive() == [], [(c.pid, c.cmdline()) for c in children if c.pid in alive()]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for c in children:      # what this test started, by pid
            try:
                c.kill()
            except psutil.Error:
                pass


# ---------------------------------------------------------------- 5: deep grayscale

def _deep_gray_cases():
    """(class name, image, file name, expected uint8 gray) for each deep grayscale kind."""
    rng = np.random.default_rng(5)
    k = rng.integers(0, 256, (16, 16))                    # the expected 8-bit values
    k.flat[:2] = [0, 255]                                  # the full range occurs
    # 16-bit v with round(v / 257) == k: anywhere within +-128 of 257 * k
    v16 = (257 * k + rng.integers(-128, 129, k.shape)).clip(0, 65535).astype(np.uint16)
    v16.flat[2:4] = [128, 254 * 257 + 128]                 # 0.498 -> 0, 254.498 -> 254
    k16 = k.copy()
    k16.flat[2:4] = [0, 254]
    frac = (k / 255).astype(np.float32)                    # in [0, 1]: x * 255 -> k
    spread = (-3 + 8 * k / 255).astype(np.float32)         # -3..5: (x + 3) * 255 / 8 -> k
    neg = (-1000 + 3 * k).astype(np.int32)                 # "I" outside 0..65535: own range
    return [
        ("c0_i16_png", Image.fromarray(v16), "g.png", k16, "I;16"),
        ("c1_i16b_tif", Image.fromarray(v16.astype(">u2")), "g.tif", k16, "I;16B"),
        ("c2_i32_tif", Image.fromarray(v16.astype(np.int32)), "g.tif", k16, "I"),
        ("c3_f01_tif", Image.fromarray(frac), "g.tif", k, "F"),
        ("c4_frange_tif", Image.fromarray(spread), "g.tif", k, "F"),
        ("c5_fconst_tif", Image.fromarray(np.full((16, 16), 7.5, np.float32)), "g.tif",
         np.zeros((16, 16), int), "F"),
        ("c6_ineg_tif", Image.fromarray(neg), "g.tif", k, "I"),
    ]


def test_deep_grayscale_scaled_not_clipped(tmp_path):
    cases = _deep_gray_cases()
    root = tmp_path / "deep"
    for split in ("train", "test"):
        for cls, img, fname, _, _ in cases:
            d = root / split / cls
            d.mkdir(parents=True)
            img.save(d / fname)
    for cls, _, fname, _, mode in cases:                   # the modes Pillow reads back
        with Image.open(root / "train" / cls / fname) as img:
            assert img.mode == mode, (cls, img.mode)
    ds = load_imagefolder(root, n_jobs=1)
    assert ds.classes == [c[0] for c in cases]
    assert ds.train_x.dtype == np.uint8 and ds.train_x.shape == (len(cases), 16, 16, 3)
    for x, xt, (cls, _, _, expected, _) in zip(ds.train_x, ds.test_x, cases):
        rgb = np.repeat(expected[:, :, None], 3, axis=2).astype(np.uint8)
        np.testing.assert_array_equal(x, rgb, err_msg=cls)
        np.testing.assert_array_equal(xt, x, err_msg=cls)
    i16 = ds.train_x[0, ..., 0]
    assert (i16 == 255).mean() < 0.05                      # clipping made 99.6 % white


def test_16bit_png_gradient_in_parallel_workers(tmp_path, monkeypatch):
    """A 16-bit gradient keeps its gradient when decoded in loky workers (one file a task)."""
    monkeypatch.setattr(imagefolder, "MIN_CHUNK", 1)
    grad = np.arange(256 * 4, dtype=np.int64).reshape(32, 32) * 64          # 0 .. 65472
    root = tmp_path / "g16"
    for split in ("train", "test"):
        for c in ("a", "b"):
            (root / split / c).mkdir(parents=True)
            Image.fromarray(grad.astype(np.uint16)).save(root / split / c / "g.png")
    ds = load_dataset("imagefolder", str(root), n_jobs=2)
    expected = np.floor(grad / 257 + 0.5).astype(np.uint8)
    for x in np.concatenate([ds.train_x, ds.test_x]):
        np.testing.assert_array_equal(x, np.repeat(expected[:, :, None], 3, axis=2))


# ---------------------------------------------------------------- 8: names that are not UTF-8

def _non_utf8_folder(tmp_path) -> Path:
    root = make_image_folder(tmp_path / "names", classes=("a", "b"), n_train=2, n_test=1)
    src = os.fsencode(root / "train" / "a" / "000.png")
    shutil.copyfile(src, os.fsencode(root / "train" / "a") + b"/caf\xe9.png")
    for split in (b"train", b"test"):
        d = os.fsencode(root) + b"/" + split + b"/cl\xe9"
        os.mkdir(d)
        shutil.copyfile(src, d + b"/x\xff.png")
    return root


def test_non_utf8_file_names_load(tmp_path):
    root = _non_utf8_folder(tmp_path)
    fp = fingerprint(root)
    assert len(fp) == 64 and fp == fingerprint(root)
    ds = load_imagefolder(root, n_jobs=1)
    assert ds.classes == ["a", "b", "cl\\xe9"]
    assert len(ds.train_x) == 2 + 1 + 2 + 1 and len(ds.test_x) == 3    # caf\xe9.png counted
    assert ds.train_y.tolist() == [0, 0, 0, 1, 1, 2]
    # the same through a tar (tarfile gives the names with surrogates)
    tar = tmp_path / "names.tar"
    with tarfile.open(tar, "w") as tf:
        tf.add(root, arcname="names")
    names = tarfile.open(tar).getnames()
    assert "names/train/a/caf\udce9.png" in names
    dt = load_imagefolder(tar, n_jobs=1)
    assert dt.classes == ds.classes
    np.testing.assert_array_equal(dt.train_x, ds.train_x)
    np.testing.assert_array_equal(dt.train_y, ds.train_y)


def test_non_utf8_file_names_through_cli(tmp_path):
    root = _non_utf8_folder(tmp_path)
    proc = kmfeat(tmp_path / "cache", "data", "--data", root, *IMAGEFOLDER)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    # a broken image with such a name is named with a backslash escape, not a surrogate
    good = (root / "train" / "a" / "000.png").read_bytes()
    with open(os.fsencode(root / "train" / "b") + b"/bad\xff.png", "wb") as f:
        f.write(good[:len(good) // 2])
    line = one_error(kmfeat(tmp_path / "cache", "data", "--data", root, *IMAGEFOLDER))
    assert "train/b/bad\\xff.png" in line and "\\udc" not in line, line


# ---------------------------------------------------------------- 9: CIFAR fields of the wrong type

def _corrupt(path: Path, key: bytes, value) -> None:
    d = pickle.loads(path.read_bytes(), encoding="bytes")
    d[key] = value
    path.write_bytes(py2_pickle(d))


C10_CASES = {
    "labels_bytes": ("data_batch_1", b"labels", b"\x01\x02\x03",
                     "is bytes, expected a list of integers"),
    "labels_dict": ("data_batch_1", b"labels", {1: 2}, "is dict, expected a list of integers"),
    "labels_int": ("test_batch", b"labels", 7, "is int, expected a list of integers"),
    "labels_bytes_items": ("data_batch_2", b"labels", ["cat"] * 20,
                         "holds b'cat' (bytes), expected a list of integers"),
    "labels_float_items": ("data_batch_1", b"labels", [1.5] * 20,
                           "holds 1.5 (float), expected a list of integers"),
    "labels_nested": ("data_batch_1", b"labels", [[1, 2]] * 10,
                      "holds [1, 2] (list), expected a list of integers"),
    "labels_huge": ("data_batch_1", b"labels", [2 ** 70] * 20, "out of the int64 range"),
    "labels_float_array": ("data_batch_1", b"labels", np.ones(20),
                           "is float64 (20,), expected a list of integers"),
    "names_int": ("batches.meta", b"label_names", 5,
                  "is int, expected a list of class names (bytes or str)"),
    "names_bytes": ("batches.meta", b"label_names", b"airplane",
                    "is bytes, expected a list of class names"),
    "names_int_items": ("batches.meta", b"label_names", list(range(10)),
                        "holds 0 (int), expected a list of class names"),
    "data_list": ("data_batch_1", b"data", [[0] * 3072] * 20,
                  "is list, expected uint8 (N, 3072)"),
    "data_bytes": ("test_batch", b"data", b"\x00" * 3072 * 15,
                   "is bytes, expected uint8 (N, 3072)"),
    "data_shape": ("data_batch_1", b"data", np.zeros((20, 32, 32, 3), np.uint8),
                   "is uint8 (20, 32, 32, 3), expected uint8 (N, 3072)"),
    "data_dtype": ("data_batch_2", b"data", np.zeros((20, 3072), np.float32),
                   "is float32 (20, 3072), expected uint8 (N, 3072)"),
}


@pytest.mark.parametrize("case", sorted(C10_CASES))
def test_cifar10_field_of_wrong_type(tmp_path, case):
    fname, key, value, expected = C10_CASES[case]
    d = write_c10_python(tmp_path / "src", *make_split(n_train_batches=5))
    _corrupt(d / fname, key, value)
    line = one_error(kmfeat(tmp_path / "cache", "data", "--data", d))
    assert f"{d / fname}: {key!r} " in line, line
    assert expected in line, line


@pytest.mark.parametrize("fname,key,value,expected", [
    ("train", b"fine_labels", b"\x00" * 30, "is bytes, expected a list of integers"),
    ("test", b"fine_labels", {b"a": 1}, "is dict, expected a list of integers"),
    ("meta", b"fine_label_names", 5, "is int, expected a list of class names"),
    ("train", b"data", 3072, "is int, expected uint8 (N, 3072)"),
], ids=["labels_bytes", "labels_dict", "names_int", "data_int"])
def test_cifar100_field_of_wrong_type(tmp_path, fname, key, value, expected):
    d = write_c100_python(tmp_path / "src")
    _corrupt(d / fname, key, value)
    line = one_error(kmfeat(tmp_path / "cache", "data", "--data", d,
                            "-o", 'data.source="cifar100"'))
    assert f"{d / fname}: {key!r} {expected}" in line, line


def test_cifar_field_of_wrong_type_in_targz(tmp_path):
    d = write_c10_python(tmp_path / "src", *make_split(n_train_batches=5))
    _corrupt(d / "data_batch_1", b"labels", b"\x01")
    out = tmp_path / "c.tar.gz"
    with tarfile.open(out, "w:gz") as tf:
        tf.add(d, arcname=d.name)
    line = one_error(kmfeat(tmp_path / "cache", "data", "--data", out))
    assert f"{out}:data_batch_1: b'labels' is bytes, expected a list of integers" in line, line
