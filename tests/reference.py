"""Naive float64 numpy reference of the dense encoder and helpers to build realistic inputs.

Written the obvious way (explicit patches per position, explicit distances, explicit cell sums)
so that every faster implementation can be checked against it.
"""
import math

import numpy as np


def reference_bounds(n, grid):
    """Split points ceil(i * n / grid), computed with math.ceil on exact fractions."""
    return [math.ceil(i * n / grid) for i in range(grid + 1)]


def reference_patches(image, rf, stride):
    """All rf x rf patches of one (H, W, C) image on the stride grid, float64 (ny, nx, rf*rf*C)."""
    H, W, _ = image.shape
    ys = range(0, H - rf + 1, stride)
    xs = range(0, W - rf + 1, stride)
    return np.array([[image[y:y + rf, x:x + rf, :].astype(np.float64).reshape(-1) for x in xs] for y in ys])


def reference_normalize(p, norm_eps=10.0):
    """(p - mean) / sqrt(var + eps) along the last axis, float64."""
    p = np.asarray(p, dtype=np.float64)
    mu = p.mean(axis=-1, keepdims=True)
    return (p - mu) / np.sqrt(((p - mu) ** 2).mean(axis=-1, keepdims=True) + norm_eps)


def reference_q(q, k):
    """knn's q as a count: a fraction of k (rounded, at least 1) or a count as given."""
    return max(1, min(k, round(q * k))) if q < 1 else int(q)


def reference_codes(z, centroids, kind, alpha=0.5, q=0.25, split=False):
    """Codes (n, k) of whitened patches z (n, d) in float64; split: [codes of z, codes of -z] (n, 2k)."""
    if split:
        return np.concatenate([reference_codes(s * z, centroids, kind, alpha, q) for s in (1, -1)], axis=1)
    c = np.asarray(centroids, dtype=np.float64)
    if kind == "soft":
        c_hat = c / np.sqrt((c ** 2).sum(axis=1, keepdims=True))
        return np.maximum(z @ c_hat.T - alpha, 0.0)
    dist = np.sqrt(((z[:, None, :] - c[None, :, :]) ** 2).sum(axis=-1))
    if kind == "knn":
        codes = np.zeros_like(dist)
        np.put_along_axis(codes, np.argsort(dist, axis=1)[:, :reference_q(q, len(c))], 1.0, axis=1)
        return codes
    if kind == "hard":
        codes = np.zeros_like(dist)
        codes[np.arange(len(dist)), dist.argmin(axis=1)] = 1.0
        return codes
    return np.maximum(dist.mean(axis=1, keepdims=True) - dist, 0.0)


def reference_encode(images, centroids, mean, W, rf=6, stride=1, kind="triangle", alpha=0.5, grid=2,
                     norm_eps=10.0, split=False, q=0.25, pool="sum"):
    """Pooled features float64 (N, sum(g*g) * K) of uint8 images (N, H, W, C); grid an int or a
    list of levels (concatenated in list order), each cell pooled by sum, mean or max."""
    mean = np.asarray(mean, dtype=np.float64)
    W = np.asarray(W, dtype=np.float64)
    grids = grid if isinstance(grid, list) else [grid]
    reduce = {"sum": np.sum, "mean": np.mean, "max": np.max}[pool]
    out = []
    for image in np.asarray(images):
        p = reference_patches(image, rf, stride)
        ny, nx, d = p.shape
        z = (reference_normalize(p.reshape(-1, d), norm_eps) - mean) @ W.T
        f = reference_codes(z, centroids, kind, alpha, q, split).reshape(ny, nx, -1)
        K = f.shape[-1]
        feats = []
        for g in grids:
            by, bx = reference_bounds(ny, g), reference_bounds(nx, g)
            level = np.zeros(g * g * K)
            for gy in range(g):
                for gx in range(g):
                    cell = f[by[gy]:by[gy + 1], bx[gx]:bx[gx + 1]]
                    level[(gy * g + gx) * K:(gy * g + gx + 1) * K] = reduce(cell, axis=(0, 1))
            feats.append(level)
        out.append(np.concatenate(feats))
    return np.array(out).reshape(len(out), -1)


def random_dictionary(images, rf, k, seed=0, norm_eps=10.0, symmetric=False):
    """Whitening (mean, W float32) and k centroids float32 drawn from whitened random patches of images.

    W is a ZCA matrix times a random rotation-and-scale when not symmetric, so that code which
    wrongly assumes W = W^T fails; centroids are whitened patches plus a little noise, so the
    distances are realistic rather than degenerate.
    """
    rng = np.random.default_rng(seed)
    images = np.asarray(images)
    N, H, Wd, C = images.shape
    n = 2000
    i, y, x = rng.integers(0, N, n), rng.integers(0, H - rf + 1, n), rng.integers(0, Wd - rf + 1, n)
    p = np.array([images[a, b:b + rf, c:c + rf].reshape(-1) for a, b, c in zip(i, y, x)])
    p = reference_normalize(p, norm_eps)
    mean = p.mean(axis=0)
    evals, evecs = np.linalg.eigh(np.cov(p, rowvar=False, bias=True))
    W = evecs @ np.diag(1 / np.sqrt(np.clip(evals, 0, None) + 0.1)) @ evecs.T
    if not symmetric:
        W = (np.eye(len(W)) + 0.2 * rng.standard_normal(W.shape) / np.sqrt(len(W))) @ W
    z = (p - mean) @ W.T
    centroids = z[rng.choice(n, k, replace=False)] + 0.1 * rng.standard_normal((k, z.shape[1]))
    return mean.astype(np.float32), W.astype(np.float32), centroids.astype(np.float32)
