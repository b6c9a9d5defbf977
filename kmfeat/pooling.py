"""Grid and pyramid pooling layout shared by the encoder and its tests.

The (ny, nx) response map is cut into grid x grid cells at ceil(i * n / grid); within one grid
the pooled feature index is (gy * grid + gx) * K + j (K codes per position). A pyramid, e.g.
grid = [1, 2, 4], concatenates its levels in list order. Every level's cuts are a subset of the
cuts of the least common multiple L of the levels (ceil(i*n/g) = ceil(i*(L/g)*n/L)), so the
encoder pools once on the L x L grid and each level is a block-sum (or block-max) of that.
"""
import math

import numpy as np

POOL_KINDS = ("sum", "mean", "max")


def levels(grid) -> list[int]:
    """pool.grid as a list of levels (an int g is the one-level pyramid [g])."""
    return list(grid) if isinstance(grid, (list, tuple)) else [int(grid)]


def finest(grid) -> int:
    """The grid every level's cells are unions of: the least common multiple of the levels."""
    return math.lcm(*levels(grid))


def n_cells(grid) -> int:
    """Pooled cells per code over all levels (sum of g*g)."""
    return sum(g * g for g in levels(grid))


def pool_bounds(n: int, grid: int) -> list[int]:
    """Split points ceil(i * n / grid) for i = 0..grid (grid=2, n=27 -> [0, 14, 27])."""
    return [-(-i * n // grid) for i in range(grid + 1)]


def cell_index(n: int, grid: int) -> np.ndarray:
    """int64 (n,): which of the grid cells along one axis each of the n positions falls in."""
    cuts = pool_bounds(n, grid)
    return np.repeat(np.arange(grid, dtype=np.int64), np.diff(cuts))


def pyramid(fine: np.ndarray, grid, kind: str, counts: np.ndarray | None = None) -> np.ndarray:
    """Pooled features (B, n_cells * K) from fine cells (B, L, L, K) pooled on the L x L grid.

    fine holds per-cell sums (kind sum or mean) or maxima (kind max); counts (L, L) are the
    positions per fine cell, needed for mean.
    """
    B, L, _, K = fine.shape
    out = []
    for g in levels(grid):
        s = L // g
        blocks = fine.reshape(B, g, s, g, s, K)
        level = blocks.max(axis=(2, 4)) if kind == "max" else blocks.sum(axis=(2, 4))
        if kind == "mean":
            level = level / counts.reshape(g, s, g, s).sum(axis=(1, 3)).reshape(1, g, g, 1)
        out.append(level.reshape(B, g * g * K).astype(fine.dtype, copy=False))
    return np.concatenate(out, axis=1)
