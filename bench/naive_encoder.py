"""Baseline encoder written the way a competent numpy user would: the benchmarks compare against it.

Per batch of images: sliding-window patches, float32 normalization and whitening, distances
through ||z||^2 - 2 z.c + ||c||^2, the code, and quadrant sums by slicing. Every step is a
full pass over a (batch * positions, k) array in memory.
"""
import numpy as np


def _bounds(n: int, grid: int) -> list[int]:
    """Pooling split points ceil(i * n / grid), i = 0..grid."""
    return [-(-i * n // grid) for i in range(grid + 1)]


def naive_numpy_encode(images, centroids, mean, W, rf=6, stride=1, kind="triangle", grid=2,
                       norm_eps=10.0, batch=50, alpha=0.5, split=False):
    """Pooled features (N, grid*grid*K) float32 of uint8 images (N, H, W, C); K = 2k for split soft codes
    (max(0, c.z - alpha), then max(0, -c.z - alpha))."""
    images = np.asarray(images)
    N, H, Wd, C = images.shape
    centroids = np.asarray(centroids, dtype=np.float32)
    k = centroids.shape[0] * (2 if split else 1)
    mean = np.asarray(mean, dtype=np.float32)
    Wt = np.asarray(W, dtype=np.float32).T
    if kind == "soft":
        centroids = centroids / np.linalg.norm(centroids, axis=1, keepdims=True)
    c2 = (centroids ** 2).sum(axis=1)
    out = np.empty((N, grid * grid * k), dtype=np.float32)
    for s in range(0, N, batch):
        x = images[s:s + batch]
        b = x.shape[0]
        win = np.lib.stride_tricks.sliding_window_view(x, (rf, rf), axis=(1, 2))[:, ::stride, ::stride]
        ny, nx = win.shape[1:3]
        p = win.transpose(0, 1, 2, 4, 5, 3).reshape(b * ny * nx, -1).astype(np.float32)
        p -= p.mean(axis=1, keepdims=True)
        p /= np.sqrt(p.var(axis=1, keepdims=True) + norm_eps)
        z = (p - mean) @ Wt
        dots = z @ centroids.T
        if kind == "triangle":
            d = np.sqrt(np.maximum((z ** 2).sum(axis=1, keepdims=True) - 2 * dots + c2, 0))
            f = np.maximum(d.mean(axis=1, keepdims=True) - d, 0)
        elif kind == "hard":
            f = np.zeros_like(dots)
            f[np.arange(len(dots)), np.argmin(c2 - 2 * dots, axis=1)] = 1
        else:
            f = np.maximum(dots - alpha, 0)
            if split:
                f = np.concatenate([f, np.maximum(-dots - alpha, 0)], axis=1)
        f = f.reshape(b, ny, nx, k)
        ys, xs = _bounds(ny, grid), _bounds(nx, grid)
        for gy in range(grid):
            for gx in range(grid):
                q = (gy * grid + gx) * k
                out[s:s + b, q:q + k] = f[:, ys[gy]:ys[gy + 1], xs[gx]:xs[gx + 1]].sum(axis=(1, 2))
    return out
