"""Patch sampling layout/determinism and per-patch normalization against a float64 reference."""
import numpy as np
import pytest

from kmfeat.errors import KmfeatError
from kmfeat.patches import normalize_patches, sample_patches, sample_positions


@pytest.fixture
def images():
    return np.random.default_rng(1).integers(0, 256, size=(7, 11, 9, 3), dtype=np.uint8)


def test_shape_dtype_and_every_row_is_the_drawn_slice(images):
    rf, n = 4, 3000
    P = sample_patches(images, rf=rf, n=n, seed=5)
    assert P.shape == (n, rf * rf * 3) and P.dtype == np.float32
    idx, ys, xs = sample_positions(7, 11, 9, rf, n, seed=5)
    expected = np.stack([images[i, y:y + rf, x:x + rf].reshape(-1) for i, y, x in zip(idx, ys, xs)])
    np.testing.assert_array_equal(P, expected.astype(np.float32))


def test_positions_cover_valid_range_uniformly():
    idx, ys, xs = sample_positions(5, 10, 8, 3, 20_000, seed=0)
    assert idx.min() == 0 and idx.max() == 4
    assert ys.min() == 0 and ys.max() == 10 - 3
    assert xs.min() == 0 and xs.max() == 8 - 3
    counts = np.bincount(ys, minlength=8)
    assert counts.min() > 0.8 * 20_000 / 8


def test_feature_index_layout(images):
    """feature (dy*rf + dx)*C + c is pixel (y+dy, x+dx) channel c."""
    rf = 3
    P = sample_patches(images, rf=rf, n=50, seed=2)
    idx, ys, xs = sample_positions(7, 11, 9, rf, 50, seed=2)
    for row, (i, y, x) in enumerate(zip(idx, ys, xs)):
        for dy in range(rf):
            for dx in range(rf):
                for c in range(3):
                    assert P[row, (dy * rf + dx) * 3 + c] == images[i, y + dy, x + dx, c]


def test_grayscale_and_chunk_boundaries():
    imgs = np.random.default_rng(3).integers(0, 256, size=(4, 8, 8), dtype=np.uint8)
    n = 16_384 + 17
    P = sample_patches(imgs, rf=2, n=n, seed=0)
    idx, ys, xs = sample_positions(4, 8, 8, 2, n, seed=0)
    last = imgs[idx[-1], ys[-1]:ys[-1] + 2, xs[-1]:xs[-1] + 2].reshape(-1)
    np.testing.assert_array_equal(P[-1], last)
    assert P.shape == (n, 4)


def test_seeded_determinism(images):
    a = sample_patches(images, rf=5, n=500, seed=9)
    np.testing.assert_array_equal(a, sample_patches(images, rf=5, n=500, seed=9))
    assert not np.array_equal(a, sample_patches(images, rf=5, n=500, seed=10))


@pytest.mark.parametrize("rf,n,param", [(12, 10, "patches.rf"), (10, 10, "patches.rf"), (0, 10, "patches.rf"),
                                        (3, 0, "patches.n")])
def test_bad_parameters(images, rf, n, param):
    with pytest.raises(KmfeatError, match=param):
        sample_patches(images, rf=rf, n=n)


def test_bad_image_array():
    with pytest.raises(KmfeatError, match="images"):
        sample_patches(np.zeros((10, 10), dtype=np.uint8), rf=2, n=5)


def _normalize_reference(P, eps):
    P = P.astype(np.float64)
    mu = P.mean(axis=1, keepdims=True)
    var = ((P - mu) ** 2).mean(axis=1, keepdims=True)
    return (P - mu) / np.sqrt(var + eps)


@pytest.mark.parametrize("eps", [10.0, 0.5])
def test_normalize_matches_float64_reference(eps):
    P = np.random.default_rng(4).integers(0, 256, size=(40_000, 108)).astype(np.float32)
    P[::7] *= 0.01
    out = normalize_patches(P, eps=eps)
    assert out.dtype == np.float32 and out.shape == P.shape
    ref = _normalize_reference(P, eps)
    assert np.abs(out - ref).max() / np.abs(ref).max() < 1e-5
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)


def test_normalize_constant_patches_are_zero():
    P = np.full((5, 27), 200.0, dtype=np.float32)
    out = normalize_patches(P)
    assert np.isfinite(out).all() and (out == 0).all()


def test_normalize_accepts_uint8_and_leaves_input_alone():
    P = np.random.default_rng(5).integers(0, 256, size=(100, 12), dtype=np.uint8)
    before = P.copy()
    out = normalize_patches(P)
    np.testing.assert_array_equal(P, before)
    np.testing.assert_allclose(out, _normalize_reference(P, 10.0), rtol=1e-5, atol=1e-6)


def test_normalize_bad_eps():
    with pytest.raises(KmfeatError, match=r"patches\.norm_eps"):
        normalize_patches(np.zeros((3, 4), dtype=np.float32), eps=0.0)
