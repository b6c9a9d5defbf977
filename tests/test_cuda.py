"""CUDA paths checked against references, not only run (issue 12 item 7). Skipped without a GPU; on a GPU
machine run them with `pytest -m cuda` (a fallback from compiled to eager is an error here)."""
import warnings

import numpy as np
import pytest
import torch

from kmfeat import encode
from kmfeat.encode import Encoder
from kmfeat.heads import MLPHead
from kmfeat.heads.svm import LinearSVMHead
from kmfeat.kmeans import KMeans
from test_encode import _assert_close, _setup
from test_heads import blobs as head_blobs
from test_heads import xor
from test_kmeans import _reference_assign
from test_kmeans import patches  # noqa: F401  (fixture)
from test_svm import blobs as svm_blobs
from test_svm import reference_objective, reference_solution
from reference import reference_encode

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("kind", ["triangle", "soft"])
def test_compiled_cuda_encoder_compiles_accumulates_blocks_and_repeats(monkeypatch, kind):
    monkeypatch.setenv("KMFEAT_COMPILE", "1")
    monkeypatch.setitem(encode.BLOCK_ELEMENTS, "cuda", 3000)  # several blocks per batch
    images, mean, Wm, centroids = _setup(20, 20, 3, 5, 33, n=7)
    enc = Encoder(centroids, mean, Wm, rf=5, kind=kind, grid=[1, 3], device="cuda")
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="kmfeat.encode: torch.compile failed")
        first = enc.transform(images)
        second = enc.transform(images)
    assert enc.compile_ and enc.compiled_once_, "fell back to eager"
    ref = reference_encode(images, centroids, mean, Wm, 5, 1, kind, 0.5, [1, 3])
    _assert_close(first, ref, rtol=1e-4)
    assert first.tobytes() == second.tobytes()


def test_cuda_kmeans_one_lloyd_step_matches_the_reference(patches):  # noqa: F811
    X = patches[:3000]
    km = KMeans(k=20, iters=1, seed=3, backend="torch", device="cuda").fit(X)
    assert km.device_ == "cuda"
    init = X[np.random.default_rng(3).choice(len(X), size=20, replace=False)]
    lab, _ = _reference_assign(X, init)
    expected = np.stack([X[lab == j].astype(np.float64).mean(0) for j in range(20)])
    np.testing.assert_allclose(km.centroids_, expected, rtol=1e-4, atol=1e-5)


def test_cuda_kmeans_reseeds_empty_clusters():
    rng = np.random.default_rng(0)
    X = np.repeat(rng.normal(size=(5, 3)), 10, axis=0).astype(np.float32)
    km = KMeans(k=10, iters=10, seed=0, backend="torch", device="cuda").fit(X)
    assert np.isfinite(km.centroids_).all() and km.inertia_ < 1e-3 * ((X - X.mean(0)) ** 2).sum()


@pytest.mark.parametrize("C", [0.003, 0.3])
def test_cuda_svm_reaches_the_float64_objective(C):
    X, y = svm_blobs(600, d=20, k=3)
    head = LinearSVMHead(C=C, tol=1e-10, max_iter=2000, device="cuda", dtype="float32").fit(X, y)
    Xs = head.standardizer_.transform(X).astype(np.float64)
    f_ref = reference_solution(Xs, y, 3, C)[0]
    params = np.concatenate([head.coef_.T.astype(np.float64).ravel(), head.intercept_.astype(np.float64)])
    assert abs(reference_objective(Xs, y, 3, C)(params)[0] - f_ref) <= 1e-4 * f_ref


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_cuda_mlp_learns_and_is_seeded(precision):
    X, y = xor(3000, seed=0)
    Xt, yt = xor(1000, seed=1)
    kw = dict(hidden=64, dropout=0.1, epochs=15, batch=128, lr=1e-2, device="cuda", precision=precision, seed=4)
    a, b = MLPHead(**kw).fit(X, y), MLPHead(**kw).fit(X, y)
    assert np.mean(a.predict(Xt) == yt) >= 0.95
    np.testing.assert_array_equal(a.predict(Xt), b.predict(Xt))
    assert all(p.dtype == torch.float32 for p in a.model_.parameters())
    Xb, yb = head_blobs(1500, d=20, k=4, sep=1.0, seed=15)
    assert np.mean(MLPHead(**{**kw, "epochs": 8}).fit(Xb[:1000], yb[:1000]).predict(Xb[1000:]) == yb[1000:]) >= 0.9
