"""Whitener: identity covariance, symmetry, round trip, and agreement with a float64 numpy reference."""
import numpy as np
import pytest

from kmfeat.errors import KmfeatError
from kmfeat.patches import normalize_patches
from kmfeat.whiten import Whitener


@pytest.fixture(scope="module")
def correlated():
    rng = np.random.default_rng(0)
    mix = rng.normal(size=(27, 27)) * rng.uniform(0.1, 5.0, size=27)
    X = rng.normal(size=(20_000, 27)) @ mix.T + rng.normal(scale=3.0, size=27)
    return X.astype(np.float32)


def _reference_W(X, method, eps):
    X = X.astype(np.float64)
    cov = np.cov(X, rowvar=False, bias=True)
    D, V = np.linalg.eigh(cov)
    D, V = D[::-1], V[:, ::-1]
    scale = 1.0 / np.sqrt(D + eps)
    W = (V * scale) @ V.T if method == "zca" else scale[:, None] * V.T
    return X.mean(axis=0), D, W


@pytest.mark.parametrize("method", ["zca", "pca"])
def test_whitened_covariance_is_identity(correlated, method):
    w = Whitener(method=method, eps=1e-6).fit(correlated)
    Z = w.transform(correlated)
    assert Z.dtype == np.float32 and Z.shape == correlated.shape
    assert np.abs(Z.astype(np.float64).mean(axis=0)).max() < 1e-3
    cov = np.cov(Z.astype(np.float64), rowvar=False, bias=True)
    assert np.abs(cov - np.eye(27)).max() < 1e-2


@pytest.mark.parametrize("method", ["zca", "pca"])
def test_fit_matches_float64_reference(correlated, method):
    eps = 0.1
    w = Whitener(method=method, eps=eps).fit(correlated)
    mean, D, W = _reference_W(correlated, method, eps)
    assert w.mean_.dtype == np.float32 and w.W_.dtype == np.float32 and w.W_.shape == (27, 27)
    np.testing.assert_allclose(w.eigenvalues_, D, rtol=1e-6)
    assert np.all(np.diff(w.eigenvalues_) <= 0)
    np.testing.assert_allclose(w.mean_, mean, rtol=1e-5, atol=1e-5)
    if method == "zca":
        np.testing.assert_allclose(w.W_, W, rtol=1e-4, atol=1e-6 * np.abs(W).max())
    else:
        signs = np.sign(np.sum(w.W_ * W, axis=1))
        assert np.all(signs != 0)
        np.testing.assert_allclose(w.W_, signs[:, None] * W, rtol=1e-4, atol=1e-5 * np.abs(W).max())
    Z = w.transform(correlated[:500])
    ref = (correlated[:500].astype(np.float64) - mean) @ w.W_.astype(np.float64).T
    np.testing.assert_allclose(Z, ref, rtol=1e-4, atol=1e-4)


def test_zca_is_symmetric(correlated):
    W = Whitener("zca", eps=0.01).fit(correlated).W_
    np.testing.assert_allclose(W, W.T, rtol=1e-5, atol=1e-6 * np.abs(W).max())


def test_none_is_pass_through(correlated):
    w = Whitener("none").fit(correlated)
    np.testing.assert_array_equal(w.mean_, 0)
    np.testing.assert_array_equal(w.W_, np.eye(27))
    np.testing.assert_array_equal(w.transform(correlated), correlated)
    np.testing.assert_array_equal(w.inverse_transform(correlated), correlated)


@pytest.mark.parametrize("method", ["zca", "pca"])
def test_inverse_round_trip(correlated, method):
    w = Whitener(method=method, eps=0.1).fit(correlated)
    back = w.inverse_transform(w.transform(correlated))
    np.testing.assert_allclose(back, correlated, rtol=1e-3, atol=1e-3 * np.abs(correlated).max())


def test_normalized_patches_are_singular_without_eps():
    """Rows of normalized patches sum to zero, so eps = 0 must be refused, and eps > 0 works."""
    P = normalize_patches(np.random.default_rng(2).integers(0, 256, size=(3000, 12)).astype(np.float32))
    w = Whitener("zca", eps=0.1).fit(P)
    assert w.eigenvalues_[-1] < 1e-6 and np.isfinite(w.W_).all()
    with pytest.raises(KmfeatError, match="whiten.eps"):
        Whitener("zca", eps=0.0).fit(P)


def test_chunked_transform_matches_single_chunk():
    X = np.random.default_rng(3).normal(size=(70_000, 6)).astype(np.float32)
    w = Whitener("zca", eps=0.01).fit(X)
    Z = w.transform(X)
    ref = (X.astype(np.float64) - w.mean_) @ w.W_.astype(np.float64).T
    np.testing.assert_allclose(Z, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kwargs,match", [({"method": "pcaa"}, "whiten.method.*zca, pca, none"),
                                          ({"eps": -1.0}, "whiten.eps")])
def test_bad_parameters(correlated, kwargs, match):
    with pytest.raises(KmfeatError, match=match):
        Whitener(**kwargs).fit(correlated)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_input(correlated, bad):
    X = correlated.copy()
    X[123, 4] = bad
    with pytest.raises(KmfeatError, match="NaN or inf"):
        Whitener().fit(X)


def test_wrong_width_on_transform(correlated):
    w = Whitener().fit(correlated)
    with pytest.raises(KmfeatError, match="whiten"):
        w.transform(correlated[:, :5])


def test_sklearn_conventions(correlated):
    w = Whitener(method="pca", eps=0.5)
    assert w.get_params() == {"method": "pca", "eps": 0.5}
    assert w.fit(correlated) is w
    np.testing.assert_array_equal(w.fit_transform(correlated), w.transform(correlated))
