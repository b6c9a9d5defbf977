"""kmfeat.rows.Rows: the lazy row view the heads train from, and the MLP's streamed path over it."""
import numpy as np
import pytest

import kmfeat.rows as rows_mod
from kmfeat.heads import MLPHead, Standardizer
from kmfeat.heads.svm import LinearSVMHead
from kmfeat.rows import Rows, as_rows


def memmaps(tmp_path, dtype, shapes, seed=0):
    """Read-only memmaps of random non-negative data (like pooled codes) with the given shapes."""
    rng = np.random.default_rng(seed)
    out = []
    for i, shape in enumerate(shapes):
        np.save(tmp_path / f"a{i}.npy", (rng.random(shape) * 5).astype(dtype))
        out.append(np.load(tmp_path / f"a{i}.npy", mmap_mode="r"))
    return out


@pytest.fixture(params=["float16", "float32"])
def view(request, tmp_path, monkeypatch):
    """A 3-part view (two index selections, one whole array) of odd sizes, and its numpy reference."""
    monkeypatch.setattr(rows_mod, "READ_ROWS_BYTES", 5 * 13 * 4)  # runs of a few rows
    monkeypatch.setattr(rows_mod, "RELEASE_BYTES", 300)  # release pages every few runs
    a, b, c = memmaps(tmp_path, request.param, [(41, 13), (41, 13), (7, 13)])
    idx = np.array([40, 3, 3, 0, 17, 18, 19, 20, 2, 39, -1])
    idx2 = np.arange(5, 36, 2)
    rows = Rows([(a, idx), (b, idx2), c])
    ref = np.concatenate([np.asarray(a)[idx], np.asarray(b)[idx2], np.asarray(c)]).astype(np.float32)
    return rows, ref


def test_shape_dtype_len_and_whole_matrix(view):
    rows, ref = view
    assert rows.shape == ref.shape == (11 + 16 + 7, 13) and rows.ndim == 2 and len(rows) == 34
    assert rows.dtype == np.float32 and rows.nbytes == ref.nbytes
    np.testing.assert_array_equal(np.asarray(rows), ref)
    np.testing.assert_array_equal(rows.materialize(), ref)
    assert np.asarray(rows, dtype=np.float64).dtype == np.float64


@pytest.mark.parametrize("key", [slice(None), slice(3, 30), slice(0, 34, 7), slice(None, None, -1), slice(20, 5, -3),
                                 slice(10, 10), slice(-5, None), slice(30, 100)])
def test_slices_equal_the_numpy_reference(view, key):
    rows, ref = view
    got = rows[key]
    assert got.dtype == np.float32 and got.flags.c_contiguous
    np.testing.assert_array_equal(got, ref[key])


def test_fancy_indices_unsorted_repeated_negative_and_masks(view):
    rows, ref = view
    rng = np.random.default_rng(5)
    for positions in [rng.integers(0, 34, 50), np.array([33, 0, 0, 33, 12, 11, 12]), np.array([-1, -34, 5]),
                      rng.permutation(34), np.array([], dtype=np.int64), [3, 1, 2], [5, 5, 7], [20, 22, 21]]:
        np.testing.assert_array_equal(rows[positions], ref[positions])
        np.testing.assert_array_equal(rows.take(positions), ref[positions])
    mask = rng.random(34) < 0.4
    np.testing.assert_array_equal(rows[mask], ref[mask])
    np.testing.assert_array_equal(rows[7], ref[7])
    np.testing.assert_array_equal(rows[-2], ref[-2])
    np.testing.assert_array_equal(rows[4:9, 2:5], ref[4:9, 2:5])
    out = np.full((3, 13), np.nan, np.float32)
    assert rows.take([30, 2, 15], out=out) is out
    np.testing.assert_array_equal(out, ref[[30, 2, 15]])


def test_other_dtypes_and_as_rows(tmp_path):
    (a,) = memmaps(tmp_path, "float16", [(9, 4)])
    assert Rows([a], np.float16)[2:5].dtype == np.float16
    np.testing.assert_array_equal(Rows([(a, [8, 1])], np.float16)[:], np.asarray(a)[[8, 1]])
    view = as_rows(a)
    assert isinstance(view, Rows) and view.dtype == np.float32 and as_rows(view) is view
    wide = as_rows(Rows([a], np.float16), np.float64)
    assert wide.dtype == np.float64 and wide.shape == (9, 4)
    np.testing.assert_array_equal(wide[::2], np.asarray(a, np.float64)[::2])


def test_pages_are_released_as_reads_go(tmp_path, monkeypatch):
    (a,) = memmaps(tmp_path, "float16", [(200, 64)])
    released = []
    monkeypatch.setattr(rows_mod, "release_pages", lambda arr: released.append(arr))
    monkeypatch.setattr(rows_mod, "RELEASE_BYTES", 64 * 2 * 50)  # every 50 rows read
    monkeypatch.setattr(rows_mod, "READ_ROWS_BYTES", 64 * 2 * 25)  # in runs of 25 rows
    rows = Rows([a])
    rows[:]
    assert len(released) == 4 and all(r is a for r in released)
    rows[np.arange(0, 200, 2)]
    assert len(released) == 6


def test_bad_views_and_positions(tmp_path):
    a, b = memmaps(tmp_path, "float32", [(5, 3), (5, 4)])
    with pytest.raises(ValueError, match="width"):
        Rows([a, b])
    with pytest.raises(ValueError, match="at least one"):
        Rows([])
    with pytest.raises(IndexError):
        Rows([(a, [0, 5])])
    rows = Rows([a, (a, [4])])
    for bad in ([6], [-7], np.array([[1]]), [0.5]):
        with pytest.raises(IndexError):
            rows[bad]
    with pytest.raises(IndexError):
        rows[6]
    with pytest.raises(IndexError):
        rows[np.ones(3, bool)]


def test_standardizer_and_svm_read_the_view_like_the_array(view):
    rows, ref = view
    a, b = Standardizer(power=0.5).fit(rows), Standardizer(power=0.5).fit(ref)
    np.testing.assert_array_equal(a.mean_, b.mean_)
    np.testing.assert_array_equal(a.scale_, b.scale_)
    np.testing.assert_array_equal(a.transform(rows), b.transform(ref))
    y = np.arange(len(ref)) % 3
    svm_rows = LinearSVMHead(C=0.1, device="cpu").fit(rows, y)
    svm_ref = LinearSVMHead(C=0.1, device="cpu").fit(ref, y)
    np.testing.assert_allclose(svm_rows.coef_, svm_ref.coef_, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(svm_rows.predict(rows), svm_ref.predict(ref))


# ---------- the MLP trains from the view: in RAM or streamed ----------

def clusters(tmp_path, n=700, d=40, k=4, dtype="float16", seed=0):
    """A (train, train_flip) pair of memmaps of non-negative clustered features, labels, and a val split."""
    rng = np.random.default_rng(seed)
    centers = rng.random((k, d)) * 4
    y = rng.integers(0, k, n)
    out = []
    for i in range(2):
        np.save(tmp_path / f"f{i}.npy", np.abs(centers[y] + rng.normal(0, 2.5, (n, d))).astype(dtype))
        out.append(np.load(tmp_path / f"f{i}.npy", mmap_mode="r"))
    fit, val = np.arange(100, n), np.arange(100)
    return Rows([(out[0], fit), (out[1], fit)]), np.concatenate([y[fit], y[fit]]), np.asarray(out[0][val]), y[val]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_streamed_mlp_trains_the_same_model_as_in_ram(tmp_path, monkeypatch, precision):
    import kmfeat.heads.mlp as mlp

    X, y, Xv, yv = clusters(tmp_path)
    monkeypatch.setattr(mlp, "BLOCK_BYTES", 40 * 4 * 64)  # blocks of 64 rows (2 batches): 19 blocks, a ragged one
    kw = dict(hidden=16, epochs=4, batch=32, lr=3e-3, device="cpu", precision=precision, power=0.5, seed=3)
    in_ram = MLPHead(ram_budget=None, **kw).fit(X, y, Xv, yv)
    streamed = MLPHead(ram_budget=0, **kw).fit(X, y, Xv, yv)
    assert not in_ram.streamed_ and streamed.streamed_
    assert streamed._block_rows(len(y), 40) == 64
    drop = ("seconds",)
    assert [{k: v for k, v in r.items() if k not in drop} for r in streamed.history_] == \
        [{k: v for k, v in r.items() if k not in drop} for r in in_ram.history_]
    for name, p in in_ram.model_.state_dict().items():
        assert torch_equal(p, streamed.model_.state_dict()[name]), name
    assert 0.6 < in_ram.history_[-1]["val_acc"] < 1
    np.testing.assert_array_equal(streamed.predict(Xv), in_ram.predict(Xv))


def torch_equal(a, b) -> bool:
    import torch

    return bool(torch.equal(a, b))


def test_streaming_is_chosen_by_the_memory_budget(tmp_path, monkeypatch):
    import kmfeat.heads.mlp as mlp

    X, y, Xv, yv = clusters(tmp_path, n=200)
    monkeypatch.delenv(mlp.RAM_BUDGET_ENV, raising=False)
    kw = dict(hidden=4, epochs=1, batch=64, device="cpu")
    nbytes = X.shape[0] * X.shape[1] * 4
    assert not MLPHead(ram_budget=nbytes, precision="fp32", **kw).fit(X, y).streamed_
    assert MLPHead(ram_budget=nbytes - 1, precision="fp32", **kw).fit(X, y).streamed_
    assert not MLPHead(ram_budget=nbytes // 2, precision="bf16", **kw).fit(X, y).streamed_  # bf16: half the bytes
    monkeypatch.setattr(mlp, "available_memory", lambda: 4 * nbytes)  # auto: a quarter of it
    assert not MLPHead(precision="fp32", **kw).fit(X, y).streamed_
    monkeypatch.setattr(mlp, "available_memory", lambda: 4 * nbytes - 4)
    assert MLPHead(precision="fp32", **kw).fit(X, y).streamed_
    monkeypatch.setattr(mlp, "available_memory", lambda: 100 * nbytes)
    monkeypatch.setattr(mlp, "RAM_CAP", nbytes - 1)  # never more than the cap, however much is available
    assert MLPHead(precision="fp32", **kw).fit(X, y).streamed_
    assert MLPHead(ram_budget=0, precision="fp32", **kw).fit(np.asarray(X), y).streamed_  # a plain array streams too
    monkeypatch.setenv(mlp.RAM_BUDGET_ENV, str(nbytes))  # the environment replaces the share of MemAvailable
    assert not MLPHead(precision="fp32", **kw).fit(X, y).streamed_
    assert MLPHead(ram_budget=0, precision="fp32", **kw).fit(X, y).streamed_  # an explicit budget wins
    monkeypatch.setenv(mlp.RAM_BUDGET_ENV, "0")
    assert MLPHead(precision="fp32", **kw).fit(X, y).streamed_
    from kmfeat.errors import KmfeatError
    with pytest.raises(KmfeatError, match="head.ram_budget"):
        MLPHead(ram_budget=-1, **kw).fit(X, y)
    monkeypatch.setenv(mlp.RAM_BUDGET_ENV, "lots")
    with pytest.raises(KmfeatError, match="KMFEAT_MLP_RAM_BUDGET"):
        MLPHead(**kw).fit(X, y)


def test_parse_size():
    from kmfeat.errors import KmfeatError
    from kmfeat.heads.mlp import parse_size

    assert parse_size("0") == 0 and parse_size("1500") == 1500 and parse_size("1e9") == 1e9
    assert parse_size("4G") == parse_size("4GiB") == parse_size("4 gb") == 4 * 2**30
    assert parse_size("512M") == 512 * 2**20 and parse_size("2k") == 2048
    for bad in ("", "-1", "G", "lots", "nan", "inf"):
        with pytest.raises(KmfeatError):
            parse_size(bad)


def test_mean_rows_average_views_like_float64():
    from kmfeat.rows import MeanRows, Rows

    rng = np.random.default_rng(5)
    a, b = rng.normal(size=(37, 11)).astype(np.float16), rng.normal(size=(41, 11)).astype(np.float16)
    ia, ib = rng.permutation(37)[:23], rng.permutation(41)[:23]
    view = MeanRows([Rows([(a, ia)]), Rows([(b, ib)])])
    want = (a[ia].astype(np.float64) + b[ib].astype(np.float64)) / 2
    assert view.shape == (23, 11) and len(view) == 23 and isinstance(view, Rows)
    for pos in (np.arange(23), np.array([22, 0, 5, 5, -1]), rng.permutation(23)):
        got = view.take(pos)
        assert got.dtype == np.float32 and got.shape == (len(pos), 11)
        np.testing.assert_allclose(got, want[pos], rtol=1e-6, atol=1e-6)
    out = np.full((4, 11), np.nan, np.float32)
    assert view.take(np.array([3, 1, 2, 0]), out=out) is out
    np.testing.assert_allclose(out, want[[3, 1, 2, 0]], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(view[2:9], want[2:9], rtol=1e-6, atol=1e-6)
    as64 = view.astype(np.float64)
    assert as64.take(np.arange(3)).dtype == np.float64
    np.testing.assert_allclose(view.materialize(), want, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="differ in shape"):
        MeanRows([Rows([a]), Rows([b])])
