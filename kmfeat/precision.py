"""float32 matmuls at full float32 precision on CUDA, one guard for every torch path (encoder, k-means, heads).

Ampere and later GPUs may run float32 matmuls as TF32 (10-bit mantissa); the encoder's distances, the
k-means assignments and the heads' gradients are checked against float64 references at float32 accuracy,
so they run with torch's "highest" float32 matmul precision and the caller's setting is restored after.
An environment override (TORCH_ALLOW_TF32_CUBLAS_OVERRIDE=1) makes cuBLAS use TF32 whatever torch asks:
that is said once, since the results then differ from the references by more than float32 rounding.
"""
from __future__ import annotations

import os
import warnings
from contextlib import contextmanager

import torch

OVERRIDE = "TORCH_ALLOW_TF32_CUBLAS_OVERRIDE"
_warned = False


def _device_type(device) -> str:
    return device.type if isinstance(device, torch.device) else str(device).split(":")[0]


@contextmanager
def full_fp32(device, allow_tf32: bool = False):
    """torch.set_float32_matmul_precision("highest") ("high" with allow_tf32) while the block runs on a CUDA
    `device`; nothing on CPU (no TF32 there)."""
    global _warned
    if _device_type(device) != "cuda":
        yield
        return
    if not allow_tf32 and os.environ.get(OVERRIDE) == "1" and not _warned:
        _warned = True
        warnings.warn(f"kmfeat: {OVERRIDE}=1 forces TF32 float32 matmuls on this GPU; results will differ from "
                      f"float32 by up to ~1e-3 relative (unset it for full precision)", stacklevel=3)
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high" if allow_tf32 else "highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


def native_cuda_bf16(device) -> bool:
    """Whether the CUDA `device` multiplies bfloat16 in hardware (compute capability 8.0 or later); emulated
    bf16 (slower than float32) does not count."""
    major, _ = torch.cuda.get_device_capability(device)
    return major >= 8
