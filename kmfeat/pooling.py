"""Grid sum-pooling layout shared by the encoder and its tests.

The (ny, nx) response map is cut into grid x grid cells at ceil(i * n / grid); pooled feature
index = (gy * grid + gx) * k + j.
"""
import numpy as np


def pool_bounds(n: int, grid: int) -> list[int]:
    """Split points ceil(i * n / grid) for i = 0..grid (grid=2, n=27 -> [0, 14, 27])."""
    return [-(-i * n // grid) for i in range(grid + 1)]


def cell_index(n: int, grid: int) -> np.ndarray:
    """int64 (n,): which of the grid cells along one axis each of the n positions falls in."""
    cuts = pool_bounds(n, grid)
    return np.repeat(np.arange(grid, dtype=np.int64), np.diff(cuts))
