"""x @ weight.T + bias in float32, as fast as the device allows.

On CPU, torch.mm goes through MKL, which on some CPUs (AMD Zen) runs well below oneDNN's AVX-512
brgemm: for the encoder's shapes (K = 108, N = 1600) we measured about 95 vs 230 GFLOP/s per core.
oneDNN is reached through the prepacked-weight linear op that inductor itself uses. It is used
only if a probe product agrees with a float64 product to float32 accuracy, so that a reduced
precision oneDNN mode (bf16, tf32) is never picked up silently; otherwise, and on CUDA, torch.addmm.
"""
import torch


def _onednn_available() -> bool:
    ops = getattr(torch.ops, "mkldnn", None)
    return (torch.backends.mkldnn.is_available() and hasattr(ops, "_linear_pointwise")
            and hasattr(ops, "_reorder_linear_weight"))


def agrees_with_float64(fn, weight, bias, rtol=1e-5) -> bool:
    """Whether fn(x) matches x @ weight.T + bias in float64 on a random probe x, within rtol of its scale."""
    probe = torch.randn(16, weight.shape[1], generator=torch.Generator().manual_seed(0)).to(weight.device)
    try:
        got = fn(probe).double()
    except Exception:
        return False
    w, b, x = weight.double(), bias.double(), probe.double()
    scale = float((x.abs() @ w.abs().t()).max() + b.abs().max())
    return got.shape == (len(x), len(w)) and float((got - (x @ w.t() + b)).abs().max()) <= rtol * scale


class Linear:
    """Callable x (n, d) -> x @ weight.T + bias (n, k) for a fixed float32 weight (k, d) and bias (k,)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor):
        self.weight = weight
        self.bias = bias
        self.packed = None
        if weight.device.type == "cpu" and _onednn_available():
            try:
                packed = torch.ops.mkldnn._reorder_linear_weight(weight)
            except Exception:
                packed = None
            if packed is not None and agrees_with_float64(
                    lambda x: torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], ""), weight, bias):
                self.packed = packed

    @property
    def backend(self) -> str:
        return "onednn" if self.packed is not None else "torch"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        return torch.addmm(self.bias, x, self.weight.t())


BF16_RTOL = 2e-2
"""How far a bfloat16 product may be from float64, relative to the product's scale: inputs rounded to 8
significant bits (2^-9 relative each), float32 accumulation, the output rounded to bfloat16."""


class ProductBF16:
    """Callable x (n, d) float32 -> x @ weight.T (n, k) in bfloat16: both factors rounded to bfloat16, the dot
    products accumulated in float32 by oneDNN (AVX512-BF16 / AMX on CPU) or tensor cores (CUDA), the result
    given back in bfloat16 (torch has no bf16 x bf16 -> float32 product on the CPU); the caller adds the bias
    in float32. `ok` says whether a probe agreed with float64 within BF16_RTOL."""

    def __init__(self, weight: torch.Tensor):
        self.weight = weight.to(torch.bfloat16)
        self.packed = None
        if weight.device.type == "cpu" and _onednn_available():
            try:
                self.packed = torch.ops.mkldnn._reorder_linear_weight(self.weight)
            except Exception:
                self.packed = None
        zero = torch.zeros(weight.shape[0], device=weight.device)
        self.ok = agrees_with_float64(lambda x: self(x).float(), weight, zero, rtol=BF16_RTOL)

    @property
    def backend(self) -> str:
        return "onednn-bf16" if self.packed is not None else "torch-bf16"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        xb = x.to(torch.bfloat16)
        if self.packed is not None:
            return torch.ops.mkldnn._linear_pointwise(xb, self.packed, None, "none", [], "")
        return xb @ self.weight.t()
