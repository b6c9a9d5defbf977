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


def native_bf16(dev: torch.device) -> bool:
    """Whether `dev` does bfloat16 matmuls in hardware (CUDA with bf16, or a CPU with AVX512-BF16 / AMX)."""
    if dev.type == "cuda":
        return native_cuda_bf16(dev)
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return torch.backends.mkldnn.is_available() and bool({"avx512_bf16", "amx_bf16"} & set(flags))


PRECISIONS = ("fp32", "bf16", "auto")
_resolved: dict = {}


def bf16_ok(device: str) -> bool:
    """Whether `device` (a resolved "cpu" / "cuda[:N]") multiplies bfloat16 natively and a probe product agrees
    with float64 within kmfeat.linear.BF16_RTOL; cached per device, so cache keys and the stages agree."""
    if device not in _resolved:
        from .linear import ProductBF16

        dev = torch.device(device)
        probe = torch.randn(64, 108, generator=torch.Generator().manual_seed(1)).to(dev)
        _resolved[device] = native_bf16(dev) and ProductBF16(probe).ok
    return _resolved[device]


def encode_precision(requested: str, device: str) -> str:
    """The encoder's matmul precision for `requested` on `device` (a resolved "cpu" / "cuda[:N]"): auto is
    bf16 where bf16_ok(device), else fp32."""
    from .errors import KmfeatError

    if requested not in PRECISIONS:
        raise KmfeatError(f"encode.precision: expected one of {', '.join(PRECISIONS)}, got {requested!r}")
    if requested != "auto":
        return requested
    return "bf16" if bf16_ok(device) else "fp32"
