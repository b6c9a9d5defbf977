"""Deterministic scatter-adds on CUDA (issue 12 item 2): the local switch, and the bytes it buys on a GPU."""
import numpy as np
import pytest
import torch

from kmfeat.determinism import deterministic_sums
from kmfeat.encode import Encoder
from kmfeat.kmeans import KMeans
from test_encode import _setup


class OnCuda:
    is_cuda = True


def test_switch_is_local_to_cuda_tensors_and_restores_the_mode():
    assert not torch.are_deterministic_algorithms_enabled()
    with deterministic_sums(torch.zeros(3)):
        assert not torch.are_deterministic_algorithms_enabled()  # CPU adds are sequential already
    with deterministic_sums(OnCuda()):
        assert torch.are_deterministic_algorithms_enabled()
    assert not torch.are_deterministic_algorithms_enabled()
    with pytest.raises(RuntimeError, match="boom"):
        with deterministic_sums(OnCuda()):
            raise RuntimeError("boom")
    assert not torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        with deterministic_sums(OnCuda()):
            assert torch.are_deterministic_algorithms_enabled()
        assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
    finally:
        torch.use_deterministic_algorithms(False)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("kind", ["triangle", "soft"])
def test_cuda_encode_gives_the_same_bytes_twice(monkeypatch, kind):
    monkeypatch.setenv("KMFEAT_COMPILE", "0")
    images, mean, Wm, centroids = _setup(32, 32, 3, 6, 64, n=40)
    runs = [Encoder(centroids, mean, Wm, rf=6, kind=kind, grid=[1, 2], device="cuda").transform(images)
            for _ in range(2)]
    assert runs[0].tobytes() == runs[1].tobytes()
    cpu = Encoder(centroids, mean, Wm, rf=6, kind=kind, grid=[1, 2], device="cpu").transform(images)
    np.testing.assert_allclose(runs[0], cpu, rtol=1e-4, atol=1e-4 * np.abs(cpu).max())


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_kmeans_gives_the_same_centroids_twice():
    X = np.random.default_rng(0).normal(size=(20000, 27)).astype(np.float32)
    runs = [KMeans(k=64, iters=10, seed=3, backend="torch", device="cuda").fit(X).centroids_ for _ in range(2)]
    assert runs[0].tobytes() == runs[1].tobytes()
