"""Issue 16 item 4: k-means with the assignment's products in bfloat16 (kmeans.precision), against float64."""
import numpy as np
import pytest
import torch

from kmfeat import config, kmeans as km_mod, precision
from kmfeat.cache import Store
from kmfeat.errors import KmfeatError
from kmfeat.kmeans import KMeans, resolve
from kmfeat.linear import BF16_RTOL, ProductBF16
from kmfeat.runner import Runner
from helpers import make_image_folder
from test_kmeans import HAVE_FAISS, _check_fitted, _reference_assign, blobs, patches, quiet  # noqa: F401

DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU")])]


@pytest.fixture
def bf16_here(monkeypatch):
    """Set whether this machine counts as doing bfloat16 natively (auto's first condition)."""
    def set_native(value: bool):
        monkeypatch.setattr(precision, "_resolved", {})
        monkeypatch.setattr(precision, "native_bf16", lambda dev: value)
    return set_native


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n,d,k,chunk", [(997, 108, 37, 256), (1301, 27, 300, 999), (64, 5, 64, 1000)])
def test_bf16_assignment_is_nearest_within_the_rounding_of_the_products(device, n, d, k, chunk):
    rng = np.random.default_rng(n)
    X, C = rng.normal(size=(n, d)).astype(np.float32), rng.normal(size=(k, d)).astype(np.float32)
    labels = km_mod._assign_torch(torch.from_numpy(X).to(device), torch.from_numpy(C).to(device), chunk,
                                  "bf16").cpu().numpy()
    assert labels.dtype == np.int64 and labels.shape == (n,) and labels.min() >= 0 and labels.max() < k
    exact, dmin = _reference_assign(X, C)
    d_got = ((X.astype(np.float64) - C[labels].astype(np.float64)) ** 2).sum(1)
    # each computed 2 x.c is off by at most (2^-8 inputs + 2^-9 output) * 2 sum_i |x_i c_i|; two are compared
    bound = 4 * (2.0 ** -8 + 2.0 ** -9) * (np.abs(X.astype(np.float64)) @ np.abs(C.astype(np.float64)).T).max(1)
    assert np.all(d_got - dmin <= 1.25 * bound)
    assert np.all(d_got - dmin <= BF16_RTOL * dmin.max())
    assert np.mean(labels == exact) > 0.9  # only near-ties move
    fp32 = km_mod._assign_torch(torch.from_numpy(X).to(device), torch.from_numpy(C).to(device), chunk)
    np.testing.assert_array_equal(fp32.cpu().numpy(), exact)


def test_one_bf16_lloyd_step_is_the_mean_of_the_points_it_assigned(patches):
    """The update stays float32: centroids are the float64 means of the bf16 assignment's clusters."""
    X = patches[:3000]
    km = KMeans(k=20, iters=1, seed=3, backend="torch", device="cpu", precision="bf16").fit(X)
    init = X[np.random.default_rng(3).choice(len(X), size=20, replace=False)]
    lab = km_mod._assign_torch(torch.from_numpy(X), torch.from_numpy(init), 512, "bf16").numpy()
    expected = np.stack([X[lab == j].astype(np.float64).mean(0) for j in range(20)])
    np.testing.assert_allclose(km.centroids_, expected, rtol=1e-4, atol=1e-5)
    assert km.precision_ == "bf16"
    _check_fitted(km, X)  # predict and inertia_ are exact float32 whatever the fit's precision


def test_bf16_recovers_separated_blobs(blobs):
    from sklearn.metrics import adjusted_rand_score

    X, y, _ = blobs
    km = KMeans(k=8, iters=25, seed=0, backend="torch", device="cpu", init="k-means++", precision="bf16").fit(X)
    assert adjusted_rand_score(y, km.predict(X)) == 1.0


def test_bf16_reaches_the_fp32_inertia_within_half_a_percent(patches):
    fp32 = KMeans(k=64, iters=15, seed=7, backend="torch", device="cpu").fit(patches)
    bf16 = KMeans(k=64, iters=15, seed=7, backend="torch", device="cpu", precision="bf16").fit(patches)
    _check_fitted(bf16, patches)
    assert abs(bf16.inertia_ - fp32.inertia_) / fp32.inertia_ < 0.005
    assert not np.array_equal(bf16.centroids_, fp32.centroids_)
    again = KMeans(k=64, iters=15, seed=7, backend="torch", device="cpu", precision="bf16").fit(patches)
    np.testing.assert_array_equal(again.centroids_, bf16.centroids_)


def test_resolve_picks_bf16_on_the_cpu_only_where_auto_may(bf16_here):
    bf16_here(True)
    assert resolve("auto", "cpu", "auto") == ("torch", "cpu", "bf16")
    assert resolve("torch", "cpu", "auto") == ("torch", "cpu", "bf16")
    assert resolve("auto", "cpu", "fp32")[2] == "fp32"
    if HAVE_FAISS:
        assert resolve("faiss", "cpu", "auto") == ("faiss", "cpu", "fp32")
    bf16_here(False)
    assert resolve("torch", "cpu", "auto") == ("torch", "cpu", "fp32")
    assert resolve("torch", "cpu", "bf16") == ("torch", "cpu", "bf16")  # asked for: emulated, but honoured
    if HAVE_FAISS:
        assert resolve("auto", "cpu", "auto") == ("faiss", "cpu", "fp32")


def test_auto_falls_back_to_fp32_where_the_probe_fails(bf16_here, monkeypatch):
    bf16_here(True)
    monkeypatch.setattr(ProductBF16, "__init__", lambda self, w: setattr(self, "ok", False))
    assert resolve("torch", "cpu", "auto") == ("torch", "cpu", "fp32")
    X = np.random.default_rng(0).normal(size=(200, 6)).astype(np.float32)
    with pytest.raises(KmfeatError, match="kmeans.precision = bf16"):
        KMeans(k=4, iters=2, backend="torch", device="cpu", precision="bf16").fit(X)


@pytest.mark.parametrize("kwargs,match", [
    ({"precision": "fp16"}, r"kmeans\.precision.*fp32, bf16, auto"),
    ({"precision": "bf16", "backend": "faiss"}, r"kmeans\.precision.*torch backend"),
])
def test_bad_precision(kwargs, match):
    if kwargs.get("backend") == "faiss" and not HAVE_FAISS:
        pytest.skip("faiss not installed")
    X = np.random.default_rng(0).normal(size=(100, 4)).astype(np.float32)
    with pytest.raises(KmfeatError, match=match):
        KMeans(k=5, **kwargs).fit(X)


def test_the_kmeans_cache_key_follows_the_precision_used(tmp_path, bf16_here):
    def key(*overrides):
        return Runner(config.load(None, ["kmeans.backend=\"torch\"", "kmeans.device=\"cpu\"", *overrides]),
                      Store(tmp_path)).key("kmeans")

    bf16_here(False)
    fp32, bf16 = key("kmeans.precision=\"fp32\""), key("kmeans.precision=\"bf16\"")
    assert fp32 != bf16 and key("kmeans.precision=\"auto\"") == fp32
    bf16_here(True)
    assert key("kmeans.precision=\"auto\"") == bf16
    assert key("kmeans.precision=\"auto\"", "kmeans.backend=\"auto\"") == bf16  # auto resolves to torch here


def test_the_stage_records_the_precision(tmp_path, bf16_here):
    bf16_here(True)
    make_image_folder(tmp_path / "imgs", classes=("a", "b"), n_train=4, n_test=4, size=(12, 12))
    cfg = config.load(None, ["patches.n=2000", "patches.rf=4", "kmeans.k=16", "kmeans.iters=3",
                             "kmeans.precision=\"auto\""], data=str(tmp_path / "imgs"))
    entry = Runner(cfg, Store(tmp_path / "cache"), quiet=True).run("kmeans")
    assert entry.meta["precision"] == "bf16" and entry.meta["backend"] == "torch"
