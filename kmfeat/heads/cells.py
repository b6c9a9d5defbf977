"""The MLP's view of space: pooled features cut into their grid cells, each cell's codes projected by one shared
linear map (a 1x1 convolution over the pooled grid, as in Thiry et al. 2021's classifier).

With pool.grid = 4 the encoder writes 16 cells of K codes each, feature (gy * 4 + gx) * K + j (kmfeat.pooling);
a plain MLP gives each of the 16 * K inputs its own weights, this projection learns one K -> d map for every
cell and lets the next layer combine the cells by position. On CIFAR-10 it turns the finer grid from a
liability (too many weights per training image) into a gain.
"""
import torch
from torch import nn


class CellProjection(nn.Module):
    """(B, cells * K) -> (B, cells * d): x.view(B, cells, K) @ W (K, d) + b, cell order kept."""

    def __init__(self, cells: int, codes: int, out: int):
        super().__init__()
        self.cells, self.codes = cells, codes
        self.proj = nn.Linear(codes, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        return self.proj(x.reshape(b, self.cells, self.codes)).reshape(b, -1)
