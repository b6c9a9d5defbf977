"""Issue 16: the encoder's centroid product in bfloat16 (encode.precision), against the float64 reference."""
import numpy as np
import pytest
import torch

from kmfeat import config, precision
from kmfeat.encode import Encoder
from kmfeat.errors import KmfeatError
from kmfeat.linear import BF16_RTOL, ProductBF16
from kmfeat.runner import Runner
from kmfeat.cache import Store
from reference import reference_encode
from test_encode import _setup

KINDS = [("triangle", False), ("soft", False), ("soft", True), ("hard", False), ("knn", True)]


def feature_error(out, ref):
    """max and median |out - ref| relative to the largest reference feature."""
    err = np.abs(out.astype(np.float64) - ref) / np.abs(ref).max()
    return err.max(), np.median(err)


@pytest.mark.parametrize("compiled", ["1", "0"])
@pytest.mark.parametrize("kind,split", KINDS)
def test_bf16_features_match_float64_within_the_documented_tolerance(monkeypatch, compiled, kind, split):
    monkeypatch.setenv("KMFEAT_COMPILE", compiled)
    images, mean, Wm, centroids = _setup(19, 17, 3, 5, 37, n=6)
    enc = Encoder(centroids, mean, Wm, rf=5, kind=kind, split=split, alpha=0.25, grid=[1, 2], device="cpu",
                  precision="bf16")
    out = enc.transform(images)
    assert enc.precision_ == "bf16" and out.dtype == np.float32 and np.isfinite(out).all()
    ref = reference_encode(images, centroids, mean, Wm, 5, 1, kind, 0.25, [1, 2], split=split)
    worst, median = feature_error(out, ref)
    if kind in ("hard", "knn"):  # a rounded distance may reorder near-ties: counts move by whole units
        assert np.mean(out != ref.astype(np.float32)) < 0.05
    else:
        assert worst <= BF16_RTOL and median <= 1e-3, (worst, median)
    fp32 = Encoder(centroids, mean, Wm, rf=5, kind=kind, split=split, alpha=0.25, grid=[1, 2], device="cpu")
    assert not np.array_equal(fp32.transform(images), out) or kind in ("hard", "knn")


def test_the_bf16_product_rounds_only_its_factors_and_output():
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(300, 108, generator=g), torch.randn(500, 108, generator=g)
    got = ProductBF16(w)(x)
    assert got.dtype == torch.bfloat16 and got.shape == (500, 300)
    exact = x.double() @ w.double().t()
    rounded = (x.bfloat16().double() @ w.bfloat16().double().t())
    assert float((got.double() - rounded).abs().max()) <= 2 ** -8 * float(rounded.abs().max())
    assert float((got.double() - exact).abs().max()) <= BF16_RTOL * float(exact.abs().max())


def test_auto_falls_back_to_fp32_where_the_probe_fails_or_the_hardware_lacks_bf16(monkeypatch):
    monkeypatch.setattr(precision, "_resolved", {})
    monkeypatch.setattr(precision, "native_bf16", lambda dev: True)
    monkeypatch.setattr(ProductBF16, "__init__", lambda self, w: setattr(self, "ok", False))
    assert precision.encode_precision("auto", "cpu") == "fp32"
    monkeypatch.setattr(precision, "_resolved", {})
    monkeypatch.setattr(precision, "native_bf16", lambda dev: False)
    assert precision.encode_precision("auto", "cpu") == "fp32"
    assert precision.encode_precision("bf16", "cpu") == "bf16"
    with pytest.raises(KmfeatError, match="encode.precision"):
        precision.encode_precision("fp16", "cpu")


def test_auto_picks_bf16_on_native_hardware_with_a_good_probe(monkeypatch):
    monkeypatch.setattr(precision, "_resolved", {})
    monkeypatch.setattr(precision, "native_bf16", lambda dev: True)
    assert precision.encode_precision("auto", "cpu") == "bf16"


def test_the_cache_key_follows_the_precision_used(tmp_path, monkeypatch):
    def key(*overrides):
        return Runner(config.load(None, ['kmeans.precision="fp32"', *overrides]), Store(tmp_path)).key("encode")

    monkeypatch.setattr(precision, "_resolved", {})
    monkeypatch.setattr(precision, "native_bf16", lambda dev: False)
    fp32, bf16 = key(), key("encode.precision=\"bf16\"")
    assert fp32 != bf16 and key("encode.precision=\"fp32\"") == fp32
    assert key("encode.precision=\"auto\"") == fp32  # auto resolved to fp32 here: the same entry
    monkeypatch.setattr(precision, "_resolved", {})
    monkeypatch.setattr(precision, "native_bf16", lambda dev: True)
    assert key("encode.precision=\"auto\"") == bf16


def test_a_pickled_encoder_keeps_its_precision():
    import pickle

    images, mean, Wm, centroids = _setup(12, 12, 3, 4, 9, n=3)
    enc = Encoder(centroids, mean, Wm, rf=4, kind="soft", device="cpu", precision="bf16")
    again = pickle.loads(pickle.dumps(enc))
    assert again.precision_ == "bf16"
    np.testing.assert_array_equal(again.transform(images), enc.transform(images))
