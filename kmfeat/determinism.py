"""A local switch to torch's deterministic kernels for the scatter-adds whose CUDA version uses atomics.

`index_add_` on CUDA adds in whatever order the threads arrive, so the pooled features and the k-means
centroids would change in the last bits from run to run, breaking byte-identical resume and seeded
k-means on a GPU. Around those calls only (a global switch would make other ops raise, e.g. the MLP's loss
on CUDA), torch's deterministic algorithms are turned on and the previous mode restored. On CPU these
adds are already sequential: nothing changes.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch


@contextmanager
def deterministic_sums(tensor: torch.Tensor):
    """torch.use_deterministic_algorithms(True) while the block runs, when `tensor` lives on CUDA."""
    if not tensor.is_cuda:
        yield
        return
    before = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before, warn_only=warn_only)
