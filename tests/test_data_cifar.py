"""CIFAR readers on tiny files written in the exact official layouts, plus download/MD5 handling."""
import hashlib
import io
import pickle
import struct
import tarfile
import urllib.error

import numpy as np
import pytest

from kmfeat.data import Dataset, balanced_subset, cifar, detect_format, fingerprint, load_dataset
from kmfeat.data.cifar import load_cifar
from kmfeat.errors import KmfeatError

C10 = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def images(n, seed):
    return np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


def rows(x):
    """Official row layout, built plane by plane: R (32x32 row-major), then G, then B."""
    return np.stack([np.concatenate([img[:, :, c].ravel() for c in range(3)]) for img in x])


class Py2Pickler(pickle._Pickler):
    """Protocol 2 writing bytes and str as python 2 `str` (BINSTRING), as the official files do."""
    dispatch = dict(pickle._Pickler.dispatch)

    def save_str8(self, obj):
        raw = obj.encode("latin1") if isinstance(obj, str) else obj
        if len(raw) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(raw)]) + raw)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(raw)) + raw)
        self.memoize(obj)

    dispatch[bytes] = save_str8
    dispatch[str] = save_str8


def py2_pickle(obj):
    """A pickle like the official (python 2 era) files: py2 strings, numpy.core module names."""
    buf = io.BytesIO()
    Py2Pickler(buf, protocol=2).dump(obj)
    blob = buf.getvalue()
    assert b"_codecs" not in blob
    return blob.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")


def make_split(n_train_batches=2, per_batch=20, n_test=15, n_classes=10, seed=0):
    xs = [images(per_batch, seed + i) for i in range(n_train_batches)]
    rng = np.random.default_rng(seed + 100)
    ys = [rng.integers(0, n_classes, per_batch) for _ in xs]
    xt, yt = images(n_test, seed + 50), rng.integers(0, n_classes, n_test)
    return xs, ys, xt, yt


def write_c10_python(folder, xs, ys, xt, yt, names=C10):
    d = folder / "cifar-10-batches-py"
    d.mkdir(parents=True)
    for i, (x, y) in enumerate(zip(xs, ys), 1):
        (d / f"data_batch_{i}").write_bytes(py2_pickle({
            b"batch_label": f"training batch {i} of 5".encode(), b"labels": [int(v) for v in y],
            b"data": rows(x), b"filenames": [f"img_{i}_{j}.png".encode() for j in range(len(x))]}))
    (d / "test_batch").write_bytes(py2_pickle({
        b"batch_label": b"testing batch 1 of 1", b"labels": [int(v) for v in yt],
        b"data": rows(xt), b"filenames": [b"t.png"] * len(xt)}))
    (d / "batches.meta").write_bytes(py2_pickle({
        b"label_names": [n.encode() for n in names], b"num_cases_per_batch": len(xs[0]),
        b"num_vis": 3072}))
    (d / "readme.html").write_text("<html></html>")
    return d


def write_c10_binary(folder, xs, ys, xt, yt, names=C10):
    d = folder / "cifar-10-batches-bin"
    d.mkdir(parents=True)
    for i, (x, y) in enumerate(zip(xs, ys), 1):
        recs = np.concatenate([np.asarray(y, np.uint8)[:, None], rows(x)], axis=1)
        (d / f"data_batch_{i}.bin").write_bytes(recs.tobytes())
    recs = np.concatenate([np.asarray(yt, np.uint8)[:, None], rows(xt)], axis=1)
    (d / "test_batch.bin").write_bytes(recs.tobytes())
    (d / "batches.meta.txt").write_text("\n".join(names) + "\n\n")
    return d


def tar_gz(folder, out):
    with tarfile.open(out, "w:gz") as tf:
        tf.add(folder, arcname=folder.name)
    return out


@pytest.fixture
def c10():
    return make_split()


def check_c10(ds, xs, ys, xt, yt):
    assert isinstance(ds, Dataset)
    assert ds.train_x.dtype == np.uint8 and ds.train_x.shape == (40, 32, 32, 3)
    assert ds.train_x.flags.c_contiguous and ds.test_x.flags.c_contiguous
    assert ds.train_y.dtype == np.int64 and ds.test_y.dtype == np.int64
    np.testing.assert_array_equal(ds.train_x, np.concatenate(xs))
    np.testing.assert_array_equal(ds.train_y, np.concatenate(ys))
    np.testing.assert_array_equal(ds.test_x, xt)
    np.testing.assert_array_equal(ds.test_y, yt)
    assert ds.classes == C10


def test_plane_order_is_rgb(tmp_path):
    """A row of all-R=200, all-G=10, all-B=77 planes must read back as pixels (200, 10, 77)."""
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    planes = [np.full(1024, 200), np.full(1024, 10), np.full(1024, 77)]
    row = np.concatenate(planes).astype(np.uint8)
    row[5] = 1   # R of pixel (0, 5)
    row[1024 + 32] = 2   # G of pixel (1, 0)
    batch = {b"data": row[None], b"labels": [3]}
    # python 3 protocol-2 pickles (bytes via _codecs.encode), as from a re-pickled release
    (d / "data_batch_1").write_bytes(pickle.dumps(batch, protocol=2))
    (d / "test_batch").write_bytes(pickle.dumps(batch, protocol=2))
    (d / "batches.meta").write_bytes(pickle.dumps({b"label_names": [n.encode() for n in C10]},
                                                  protocol=2))
    ds = load_cifar(d)
    expect = np.empty((1, 32, 32, 3), np.uint8)
    expect[...] = (200, 10, 77)
    expect[0, 0, 5, 0] = 1
    expect[0, 1, 0, 1] = 2
    np.testing.assert_array_equal(ds.train_x, expect)
    assert ds.train_y.tolist() == [3]


@pytest.mark.parametrize("where", ["release", "parent", "targz"])
def test_cifar10_python_round_trip(tmp_path, c10, where):
    d = write_c10_python(tmp_path / "src", *c10)
    path = {"release": d, "parent": d.parent, "targz": tar_gz(d, tmp_path / "c.tar.gz")}[where]
    assert detect_format(path) == "cifar10-python"
    check_c10(load_dataset("cifar10", str(path)), *c10)


@pytest.mark.parametrize("where", ["release", "parent", "targz"])
def test_cifar10_binary_round_trip(tmp_path, c10, where):
    d = write_c10_binary(tmp_path / "src", *c10)
    path = {"release": d, "parent": d.parent, "targz": tar_gz(d, tmp_path / "c.tar.gz")}[where]
    assert detect_format(path) == "cifar10-binary"
    check_c10(load_dataset("cifar10", str(path)), *c10)


def test_python_and_binary_agree(tmp_path, c10):
    a = load_cifar(write_c10_python(tmp_path / "p", *c10))
    b = load_cifar(write_c10_binary(tmp_path / "b", *c10))
    for name in ("train_x", "train_y", "test_x", "test_y", "classes"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))


def c100_data():
    rng = np.random.default_rng(7)
    x, xt = images(30, 1), images(12, 2)
    fine, fine_t = rng.integers(0, 100, 30), rng.integers(0, 100, 12)
    return x, fine, fine // 5, xt, fine_t, fine_t // 5


FINE = [f"fine{i:02d}" for i in range(100)]
COARSE = [f"coarse{i:02d}" for i in range(20)]


def write_c100_python(folder):
    x, f, c, xt, ft, ct = c100_data()
    d = folder / "cifar-100-python"
    d.mkdir(parents=True)
    for name, xx, ff, cc in (("train", x, f, c), ("test", xt, ft, ct)):
        (d / name).write_bytes(py2_pickle({
            b"filenames": [b"f.png"] * len(xx), b"batch_label": name.encode(),
            b"fine_labels": [int(v) for v in ff], b"coarse_labels": [int(v) for v in cc],
            b"data": rows(xx)}))
    (d / "meta").write_bytes(py2_pickle({b"fine_label_names": [n.encode() for n in FINE],
                                         b"coarse_label_names": [n.encode() for n in COARSE]}))
    return d


def write_c100_binary(folder):
    x, f, c, xt, ft, ct = c100_data()
    d = folder / "cifar-100-binary"
    d.mkdir(parents=True)
    for name, xx, ff, cc in (("train.bin", x, f, c), ("test.bin", xt, ft, ct)):
        recs = np.concatenate([np.asarray(cc, np.uint8)[:, None], np.asarray(ff, np.uint8)[:, None],
                               rows(xx)], axis=1)
        (d / name).write_bytes(recs.tobytes())
    (d / "fine_label_names.txt").write_text("\n".join(FINE) + "\n")
    (d / "coarse_label_names.txt").write_text("\n".join(COARSE) + "\n")
    return d


@pytest.mark.parametrize("writer,fmt", [(write_c100_python, "cifar100-python"),
                                        (write_c100_binary, "cifar100-binary")])
@pytest.mark.parametrize("as_tar", [False, True])
def test_cifar100_fine_and_coarse(tmp_path, writer, fmt, as_tar):
    d = writer(tmp_path / "src")
    path = tar_gz(d, tmp_path / "c100.tar.gz") if as_tar else d
    assert detect_format(path) == fmt
    x, f, c, xt, ft, ct = c100_data()
    ds = load_dataset("cifar100", str(path))
    np.testing.assert_array_equal(ds.train_x, x)
    np.testing.assert_array_equal(ds.test_x, xt)
    np.testing.assert_array_equal(ds.train_y, f)
    np.testing.assert_array_equal(ds.test_y, ft)
    assert ds.classes == FINE
    coarse = load_cifar(path, label_mode="coarse")
    np.testing.assert_array_equal(coarse.train_y, c)
    np.testing.assert_array_equal(coarse.test_y, ct)
    assert coarse.classes == COARSE


def test_limits_equal_balanced_subset_of_full(tmp_path):
    xs, ys, xt, yt = make_split(per_batch=60, n_test=40, n_classes=3)
    d = write_c10_python(tmp_path, xs, ys, xt, yt, names=["a", "b", "c"])
    full = load_dataset("cifar10", str(d))
    part = load_dataset("cifar10", str(d), limit_train=31, limit_test=9, seed=4)
    tr = balanced_subset(full.train_y, 31, 4)
    te = balanced_subset(full.test_y, 9, 4)
    np.testing.assert_array_equal(part.train_x, full.train_x[tr])
    np.testing.assert_array_equal(part.train_y, full.train_y[tr])
    np.testing.assert_array_equal(part.test_x, full.test_x[te])
    assert sorted(np.bincount(part.train_y).tolist()) == [10, 10, 11]


def test_resize_applies_to_cifar(tmp_path, c10):
    d = write_c10_python(tmp_path, *c10)
    ds = load_dataset("cifar10", str(d), resize=(16, 20))
    assert ds.train_x.shape == (40, 16, 20, 3) and ds.test_x.shape == (15, 16, 20, 3)


# ---------------------------------------------------------------- malformed files

def test_missing_key_names_file(tmp_path, c10):
    d = write_c10_python(tmp_path, *c10)
    (d / "data_batch_2").write_bytes(py2_pickle({b"data": rows(c10[0][1]), b"batch_label": b"x"}))
    with pytest.raises(KmfeatError, match=r"data_batch_2: missing key b'labels'"):
        load_cifar(d)


def test_wrong_data_shape_names_file(tmp_path, c10):
    d = write_c10_python(tmp_path, *c10)
    (d / "test_batch").write_bytes(py2_pickle({b"data": np.zeros((4, 3000), np.uint8),
                                               b"labels": [0, 1, 2, 3]}))
    msg = r"test_batch: b'data' is uint8 \(4, 3000\), expected uint8 \(N, 3072\)"
    with pytest.raises(KmfeatError, match=msg):
        load_cifar(d)


def test_label_count_mismatch(tmp_path, c10):
    d = write_c10_python(tmp_path, *c10)
    (d / "test_batch").write_bytes(py2_pickle({b"data": rows(images(3, 0)), b"labels": [1, 2]}))
    with pytest.raises(KmfeatError, match="test_batch: 2 labels for 3 images"):
        load_cifar(d)


def test_not_a_pickle_and_foreign_objects(tmp_path, c10):
    d = write_c10_python(tmp_path, *c10)
    (d / "data_batch_1").write_bytes(b"garbage")
    with pytest.raises(KmfeatError, match="data_batch_1: not a CIFAR python batch"):
        load_cifar(d)
    (d / "data_batch_1").write_bytes(pickle.dumps({b"data": __import__("os").getcwd}, protocol=2))
    with pytest.raises(KmfeatError, match="data_batch_1: not a CIFAR python batch"):
        load_cifar(d)


def test_missing_batch_file(tmp_path, c10):
    d = write_c10_python(tmp_path, *c10)
    (d / "test_batch").unlink()
    with pytest.raises(KmfeatError, match="test_batch: missing"):
        load_cifar(d)


def test_gap_in_training_batches(tmp_path):
    xs, ys, xt, yt = make_split(n_train_batches=3)
    d = write_c10_python(tmp_path, xs, ys, xt, yt)
    (d / "data_batch_2").unlink()
    with pytest.raises(KmfeatError, match="data_batch_2 missing"):
        load_cifar(d)


def test_bad_binary_record_size(tmp_path, c10):
    d = write_c10_binary(tmp_path, *c10)
    (d / "test_batch.bin").write_bytes(b"\0" * 3072 * 2)
    with pytest.raises(KmfeatError, match=r"test_batch.bin: size 6144 bytes .* record size 3073"):
        load_cifar(d)


def test_label_out_of_range(tmp_path, c10):
    xs, ys, xt, yt = c10
    d = write_c10_binary(tmp_path, xs, ys, xt, yt, names=C10[:3])
    with pytest.raises(KmfeatError, match=r"labels span .* expected 0\.\.2"):
        load_cifar(d)


def test_missing_path_and_unknown_file(tmp_path):
    with pytest.raises(KmfeatError, match="no such file or directory"):
        load_dataset("cifar10", str(tmp_path / "nope"))
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"\x00\x01" * 100)
    with pytest.raises(KmfeatError, match="expected a directory, .tar or .tar.gz"):
        load_dataset("cifar10", str(junk))
    with pytest.raises(KmfeatError, match="data.source"):
        load_dataset("mnist", str(junk))


# ---------------------------------------------------------------- fingerprint

def test_fingerprint_file_and_dir(tmp_path, c10):
    d = write_c10_python(tmp_path / "src", *c10)
    t = tar_gz(d, tmp_path / "c.tar.gz")
    assert fingerprint(t) == hashlib.sha256(t.read_bytes()).hexdigest()
    a = fingerprint(d)
    assert a == fingerprint(d) and len(a) == 64
    (d / "extra").write_bytes(b"1")
    assert fingerprint(d) != a
    with pytest.raises(KmfeatError, match="no such file"):
        fingerprint(tmp_path / "missing")


# ---------------------------------------------------------------- download and MD5

@pytest.fixture
def served(tmp_path, monkeypatch, c10):
    """A fake cifar-10-python.tar.gz served from a file:// URL with its real MD5 registered."""
    srv = tmp_path / "srv"
    srv.mkdir()
    archive = tar_gz(write_c10_python(tmp_path / "build", *c10), srv / "cifar-10-python.tar.gz")
    md5 = hashlib.md5(archive.read_bytes()).hexdigest()
    monkeypatch.setattr(cifar, "URL_BASE", srv.as_uri() + "/")
    monkeypatch.setitem(cifar.RELEASES, ("cifar10", "python"), ("cifar-10-python.tar.gz", md5))
    return archive, md5


def test_download_verifies_and_reuses(tmp_path, monkeypatch, served, c10):
    data_dir = tmp_path / "data"
    check_c10(load_dataset("cifar10", data_dir=str(data_dir)), *c10)
    local = data_dir / "cifar-10-python.tar.gz"
    assert local.read_bytes() == served[0].read_bytes()
    assert not (data_dir / "cifar-10-python.tar.gz.part").exists()
    assert (data_dir / "cifar-10-python.tar.gz.md5ok").exists()

    def offline(*a, **k):
        raise AssertionError("must not download again")
    monkeypatch.setattr(cifar.urllib.request, "urlopen", offline)
    monkeypatch.setattr(cifar, "md5sum", lambda p: (_ for _ in ()).throw(AssertionError("rehash")))
    check_c10(load_dataset("cifar10", data_dir=str(data_dir)), *c10)


def test_default_data_dir_from_env(tmp_path, monkeypatch, served, c10):
    monkeypatch.setenv("KMFEAT_DATA", str(tmp_path / "envdata"))
    check_c10(load_dataset("cifar10"), *c10)
    assert (tmp_path / "envdata" / "cifar-10-python.tar.gz").is_file()


def test_download_md5_mismatch(tmp_path, monkeypatch, served):
    monkeypatch.setitem(cifar.RELEASES, ("cifar10", "python"), ("cifar-10-python.tar.gz", "0" * 32))
    data_dir = tmp_path / "data"
    with pytest.raises(KmfeatError, match=f"MD5 of the download is {served[1]}, expected 0{{32}}"):
        load_dataset("cifar10", data_dir=str(data_dir))
    assert list(data_dir.iterdir()) == []


def test_local_file_md5_mismatch(tmp_path, served):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    bad = data_dir / "cifar-10-python.tar.gz"
    bad.write_bytes(served[0].read_bytes()[:-100])
    got = hashlib.md5(bad.read_bytes()).hexdigest()
    msg = (f"{bad}: MD5 is {got}, expected {served[1]} (corrupt or incomplete download); "
           "delete it and rerun")
    with pytest.raises(KmfeatError) as e:
        load_dataset("cifar10", data_dir=str(data_dir))
    assert str(e.value) == msg
    assert not (data_dir / "cifar-10-python.tar.gz.md5ok").exists()


def test_offline_message(tmp_path, monkeypatch):
    def offline(*a, **k):
        raise urllib.error.URLError("Name or service not known")
    monkeypatch.setattr(cifar.urllib.request, "urlopen", offline)
    data_dir = tmp_path / "data"
    with pytest.raises(KmfeatError) as e:
        load_dataset("cifar100", data_dir=str(data_dir))
    msg = str(e.value)
    assert "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz" in msg
    assert str(data_dir) in msg and "--data PATH" in msg and "\n" not in msg
    assert not (data_dir / "cifar-100-python.tar.gz.part").exists()


def test_extracted_release_in_data_dir_is_used(tmp_path, monkeypatch, c10):
    monkeypatch.setattr(cifar.urllib.request, "urlopen",
                        lambda *a, **k: (_ for _ in ()).throw(AssertionError("no download")))
    write_c10_python(tmp_path / "data", *c10)
    check_c10(load_dataset("cifar10", data_dir=str(tmp_path / "data")), *c10)


def test_imagefolder_name_needs_path():
    with pytest.raises(KmfeatError, match="data.path: required"):
        load_dataset("imagefolder")
