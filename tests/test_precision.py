"""One float32 precision guard for every torch path, and bf16 counted only where it is native (issue 12 item 8)."""
import warnings

import pytest
import torch

from kmfeat import precision
from kmfeat.precision import native_bf16


@pytest.mark.parametrize("device", ["cuda", torch.device("cuda", 0), "cuda:1"])
def test_full_fp32_on_cuda_sets_highest_and_restores(device):
    torch.set_float32_matmul_precision("high")
    try:
        with precision.full_fp32(device):
            assert torch.get_float32_matmul_precision() == "highest"
        assert torch.get_float32_matmul_precision() == "high"
        with precision.full_fp32(device, allow_tf32=True):
            assert torch.get_float32_matmul_precision() == "high"
        with pytest.raises(ValueError):
            with precision.full_fp32(device):
                raise ValueError
        assert torch.get_float32_matmul_precision() == "high"
        with precision.full_fp32("cpu"):
            assert torch.get_float32_matmul_precision() == "high"  # nothing to guard on CPU
    finally:
        torch.set_float32_matmul_precision("highest")


def test_an_environment_override_forcing_tf32_is_said_once(monkeypatch):
    monkeypatch.setenv(precision.OVERRIDE, "1")
    monkeypatch.setattr(precision, "_warned", False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            with precision.full_fp32("cuda"):
                pass
    said = [w for w in caught if precision.OVERRIDE in str(w.message)]
    assert len(said) == 1 and "TF32" in str(said[0].message)


@pytest.mark.parametrize("capability, emulated, native", [((7, 5), True, False), ((8, 0), True, True),
                                                          ((9, 0), True, True), ((6, 1), False, False)])
def test_bf16_counts_only_native_hardware(monkeypatch, capability, emulated, native):
    """A Turing (7.5) GPU reports bf16 as supported through emulation: the MLP must not pick bf16 there."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: emulated or native)
    assert native_bf16(torch.device("cuda", 0)) is native
