"""The dense encoder against the naive float64 reference, plus batching, flips, errors and the baseline."""
import importlib.util
import io
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

import kmfeat.encode as encode
from kmfeat.encode import Encoder
from kmfeat.errors import KmfeatError
from kmfeat.linear import BF16_RTOL
from kmfeat.pooling import cell_index, pool_bounds
from reference import reference_bounds, reference_encode, random_dictionary

ROOT = Path(__file__).resolve().parents[1]
CIFAR = Path(__file__).resolve().parents[2] / "shared/data/cifar10-jpeg.tar.gz"

# (H, W, C, rf, stride, grid, k)
GEOMETRIES = [
    (9, 9, 3, 3, 1, 2, 7),
    (11, 8, 1, 5, 2, 1, 16),
    (16, 13, 3, 6, 3, 3, 33),
    (16, 13, 1, 3, 1, 3, 16),
    (12, 17, 3, 5, 2, 2, 33),
    (9, 9, 1, 6, 1, 2, 7),
]


@pytest.fixture(autouse=True)
def eager(monkeypatch):
    """Encoders built in these tests run eagerly unless a test turns compilation back on."""
    monkeypatch.setenv("KMFEAT_COMPILE", "0")


def _images(n, H, W, C, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, H, W, C), dtype=np.uint8)


def _setup(H, W, C, rf, k, n=5, seed=0):
    images = _images(n, H, W, C, seed)
    mean, Wm, centroids = random_dictionary(_images(20, H, W, C, seed + 1), rf, k, seed=seed)
    return images, mean, Wm, centroids


def _assert_close(out, ref, rtol=1e-4):
    assert out.shape == ref.shape
    assert out.dtype == np.float32
    assert np.isfinite(out).all()
    scale = np.abs(ref).max()
    assert scale > 0
    assert np.abs(out - ref).max() / scale < rtol
    assert np.allclose(out, ref, rtol=rtol, atol=rtol * scale)


def _naive_module():
    spec = importlib.util.spec_from_file_location("naive_encoder", ROOT / "bench" / "naive_encoder.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_pool_bounds_match_ceil_split():
    assert pool_bounds(27, 2) == [0, 14, 27]
    for n in range(1, 40):
        for grid in range(1, n + 1):
            cuts = pool_bounds(n, grid)
            assert cuts == reference_bounds(n, grid)
            assert np.all(np.diff(cuts) >= 1)
            assert np.array_equal(np.bincount(cell_index(n, grid), minlength=grid), np.diff(cuts))


@pytest.mark.parametrize("kind", encode.KINDS)
@pytest.mark.parametrize("H,W,C,rf,stride,grid,k", GEOMETRIES)
def test_matches_reference(kind, H, W, C, rf, stride, grid, k):
    images, mean, Wm, centroids = _setup(H, W, C, rf, k)
    enc = Encoder(centroids, mean, Wm, rf=rf, stride=stride, kind=kind, alpha=0.3, grid=grid, device="cpu")
    out = enc.transform(images)
    ref = reference_encode(images, centroids, mean, Wm, rf, stride, kind, 0.3, grid)
    assert out.shape == (len(images), grid * grid * k) == (len(images), enc.n_features)
    _assert_close(out, ref)


@pytest.mark.parametrize("kind", encode.KINDS)
def test_flat_and_smooth_images(kind):
    """Constant regions (variance 0, so norm_eps matters), gradients and saturated pixels."""
    rng = np.random.default_rng(5)
    yy, xx = np.mgrid[0:14, 0:15]
    images = np.stack([np.full((14, 15, 3), 255), np.zeros((14, 15, 3)),
                       np.repeat((yy * 9 + xx * 4)[..., None], 3, axis=2),
                       np.where(xx[..., None] < 7, 250, 3) + rng.integers(0, 3, (14, 15, 3))]).astype(np.uint8)
    mean, Wm, centroids = random_dictionary(_images(20, 14, 15, 3, 6), 5, 16)
    out = Encoder(centroids, mean, Wm, rf=5, kind=kind, grid=2).transform(images)
    _assert_close(out, reference_encode(images, centroids, mean, Wm, 5, 1, kind, 0.5, 2))


@pytest.mark.parametrize("block", [1, 100, 2000])
@pytest.mark.parametrize("kind", encode.KINDS)
def test_blocks_spanning_images_and_padding(monkeypatch, kind, block):
    """Blocks of 1 row, of rows crossing image boundaries, and a padded last block all agree."""
    monkeypatch.setitem(encode.BLOCK_ELEMENTS, "cpu", block)
    images, mean, Wm, centroids = _setup(11, 10, 3, 3, 16, n=7)
    enc = Encoder(centroids, mean, Wm, rf=3, kind=kind, grid=3, device="cpu")
    ref = reference_encode(images, centroids, mean, Wm, 3, 1, kind, 0.5, 3)
    _assert_close(enc.transform(images), ref)
    _assert_close(np.concatenate([f for _, _, f in enc.iter_transform(images, batch=3)]), ref)


def test_symmetric_whitening_and_default_parameters():
    images, _, _, _ = _setup(10, 10, 3, 6, 8)
    mean, Wm, centroids = random_dictionary(_images(20, 10, 10, 3, 4), 6, 8, symmetric=True)
    out = Encoder(centroids, mean, Wm).transform(images)
    _assert_close(out, reference_encode(images, centroids, mean, Wm))


def test_iter_transform_streams_to_memmap_and_matches_transform(tmp_path):
    images, mean, Wm, centroids = _setup(13, 11, 3, 5, 16, n=11)
    enc = Encoder(centroids, mean, Wm, rf=5, grid=2, device="cpu")
    full = enc.transform(images)
    src = np.lib.format.open_memmap(tmp_path / "images.npy", mode="w+", dtype=np.uint8, shape=images.shape)
    src[:] = images
    src.flush()
    del src
    readonly = np.load(tmp_path / "images.npy", mmap_mode="r")
    for batch in (1, 3, 4, 11, 50):
        out = np.lib.format.open_memmap(tmp_path / f"f{batch}.npy", mode="w+", dtype=np.float32,
                                        shape=(len(images), enc.n_features))
        out[:] = np.nan
        spans = []
        for start, stop, feats in enc.iter_transform(readonly, batch=batch):
            assert feats.dtype == np.float32 and feats.shape == (stop - start, enc.n_features)
            out[start:stop] = feats
            spans.append((start, stop))
        assert spans == [(s, min(s + batch, len(images))) for s in range(0, len(images), batch)]
        assert not np.isnan(out).any()
        np.testing.assert_array_equal(np.asarray(out), full)


def test_flip_encodes_the_mirrors():
    images, mean, Wm, centroids = _setup(12, 9, 3, 3, 16)
    enc = Encoder(centroids, mean, Wm, rf=3, device="cpu")
    flipped = enc.transform(images, flip=True)
    np.testing.assert_array_equal(flipped, enc.transform(np.ascontiguousarray(images[:, :, ::-1])))
    _assert_close(flipped, reference_encode(images[:, :, ::-1], centroids, mean, Wm, 3))
    assert not np.allclose(flipped, enc.transform(images))


@pytest.mark.parametrize("H,W,C,rf,stride,grid,k", GEOMETRIES)
def test_hard_counts_every_position_once(H, W, C, rf, stride, grid, k):
    images, mean, Wm, centroids = _setup(H, W, C, rf, k)
    out = Encoder(centroids, mean, Wm, rf=rf, stride=stride, kind="hard", grid=grid).transform(images)
    ny, nx = (H - rf) // stride + 1, (W - rf) // stride + 1
    np.testing.assert_array_equal(out.sum(axis=1), ny * nx)
    cells = out.reshape(len(images), grid, grid, k).sum(axis=3)
    np.testing.assert_array_equal(cells[0], np.outer(np.diff(pool_bounds(ny, grid)), np.diff(pool_bounds(nx, grid))))


def test_hard_ties_go_to_the_lowest_index():
    images, mean, Wm, centroids = _setup(8, 8, 1, 3, 4)
    twins = np.concatenate([centroids, centroids])
    out = Encoder(twins, mean, Wm, rf=3, kind="hard", grid=1).transform(images)
    assert out[:, 4:].sum() == 0 and out.sum() == len(images) * 36


def test_empty_input_gives_empty_output():
    _, mean, Wm, centroids = _setup(8, 8, 3, 3, 7)
    out = Encoder(centroids, mean, Wm, rf=3).transform(np.zeros((0, 8, 8, 3), np.uint8))
    assert out.shape == (0, 28) and out.dtype == np.float32


def test_auto_batch_bounds_the_working_set(monkeypatch):
    images, mean, Wm, centroids = _setup(20, 20, 3, 5, 16, n=9)
    monkeypatch.setitem(encode.BATCH_BYTES, "cpu", 300_000)
    enc = Encoder(centroids, mean, Wm, rf=5, device="cpu")  # the CPU budget is patched: pin the device
    spans = [(s, e) for s, e, _ in enc.iter_transform(images)]
    assert len(spans) > 1 and spans[0][0] == 0 and spans[-1][1] == len(images)
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    monkeypatch.setitem(encode.BATCH_BYTES, "cpu", 1 << 30)
    assert [(s, e) for s, e, _ in Encoder(centroids, mean, Wm, rf=5, device="cpu").iter_transform(images)] == [(0, 9)]


def test_auto_batch_on_cuda_is_bounded_by_the_budget_not_one(monkeypatch):
    """Issue 12: with the CUDA block size, the old fixed-cost term (views counted as copies) left a batch of 1
    for small k. Checked with a mocked device: free memory 40 GB, 2 GiB budget."""
    images, mean, Wm, centroids = _setup(32, 32, 3, 6, 16, n=2)
    enc = Encoder(centroids, mean, Wm, rf=6, device="cpu")
    enc.device_ = "cuda"
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: (40 << 30, 80 << 30))
    ny = nx = 27
    rows = encode.BLOCK_ELEMENTS["cuda"] // (nx * enc.n_codes)
    rows -= rows % ny
    geom = dict(H=32, W=32, C=3, ny=ny, nx=nx, rows=rows)
    per_image = 4 * (ny * nx * (3 * enc.d_ + 2) + 32 * 32 * 3 + 2 * enc.fine_ ** 2 * enc.n_codes)
    batch = enc._auto_batch(geom)
    assert 1000 <= batch <= encode.BATCH_BYTES["cuda"] // per_image
    monkeypatch.delenv("KMFEAT_COMPILE", raising=False)  # auto: never compiles on CUDA (issue 12 item 5)
    enc.compile_ = True  # what an encoder built under the auto policy has
    assert not enc.will_compile(1e18)
    monkeypatch.setenv("KMFEAT_COMPILE", "1")
    assert enc.will_compile(0)


def _err(match, fn):
    with pytest.raises(KmfeatError, match=match) as info:
        fn()
    assert "\n" not in str(info.value)


def test_parameter_errors():
    _, mean, Wm, c = _setup(9, 9, 3, 3, 7)
    _err("encode.kind.*triangle, hard, soft", lambda: Encoder(c, mean, Wm, rf=3, kind="sparse"))
    _err("encode.stride", lambda: Encoder(c, mean, Wm, rf=3, stride=0))
    _err("pool.grid", lambda: Encoder(c, mean, Wm, rf=3, grid=0))
    _err("encode.alpha", lambda: Encoder(c, mean, Wm, rf=3, alpha=-0.1))
    _err("patches.rf", lambda: Encoder(c, mean, Wm, rf=0))
    _err("patches.rf", lambda: Encoder(c, mean, Wm, rf=4))
    _err("patches.norm_eps", lambda: Encoder(c, mean, Wm, rf=3, norm_eps=0))
    _err("encode.batch", lambda: Encoder(c, mean, Wm, rf=3, batch=0))
    _err("encode.device", lambda: Encoder(c, mean, Wm, rf=3, device="tpu"))
    bad = c.copy()
    bad[2, 5] = np.nan
    _err("kmeans", lambda: Encoder(bad, mean, Wm, rf=3))
    _err("kmeans", lambda: Encoder(c[0], mean, Wm, rf=3))
    zero = c.copy()
    zero[1] = 0
    _err("kmeans", lambda: Encoder(zero, mean, Wm, rf=3, kind="soft"))
    inf = Wm.copy()
    inf[0, 0] = np.inf
    _err("whiten", lambda: Encoder(c, mean, inf, rf=3))
    _err("whiten", lambda: Encoder(c, np.full_like(mean, np.nan), Wm, rf=3))
    _err("whiten", lambda: Encoder(c, mean[:-1], Wm, rf=3))


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_without_gpu_is_a_user_error():
    _, mean, Wm, c = _setup(9, 9, 3, 3, 7)
    _err("encode.device", lambda: Encoder(c, mean, Wm, rf=3, device="cuda"))
    assert Encoder(c, mean, Wm, rf=3, device="auto").device_ == "cpu"


def test_image_errors():
    images, mean, Wm, c = _setup(9, 9, 3, 3, 7)
    enc = Encoder(c, mean, Wm, rf=3, grid=3)
    _err("uint8", lambda: enc.transform(images.astype(np.float32)))
    _err("uint8", lambda: enc.transform(images[..., 0]))
    _err("uint8", lambda: enc.transform(images.tolist()))
    _err("uint8", lambda: enc.iter_transform(images[0]))
    _err("patches.rf", lambda: enc.transform(_images(2, 9, 9, 1)))
    _err("patches.rf", lambda: enc.transform(_images(2, 2, 9, 3)))
    _err("pool.grid", lambda: enc.transform(_images(2, 4, 9, 3)))
    _err("encode.batch", lambda: enc.iter_transform(images, batch=0))


def test_naive_baseline_matches_reference():
    naive = _naive_module().naive_numpy_encode
    for H, W, C, rf, stride, grid, k in GEOMETRIES[:4]:
        images, mean, Wm, centroids = _setup(H, W, C, rf, k, n=7)
        for kind in ("triangle", "hard", "soft"):  # the kinds the naive baseline implements
            out = naive(images, centroids, mean, Wm, rf=rf, stride=stride, kind=kind, grid=grid, batch=3)
            ref = reference_encode(images, centroids, mean, Wm, rf, stride, kind, 0.5, grid)
            _assert_close(out, ref, rtol=1e-3)
        out = naive(images, centroids, mean, Wm, rf=rf, stride=stride, kind="soft", grid=grid, batch=3, split=True)
        _assert_close(out, reference_encode(images, centroids, mean, Wm, rf, stride, "soft", 0.5, grid, split=True),
                      rtol=1e-3)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_compiled_chain_matches_reference(monkeypatch):
    """The torch.compile path (the CPU default) on a multi-block, padded layout, triangle and soft."""
    monkeypatch.setenv("KMFEAT_COMPILE", "1")
    monkeypatch.setitem(encode.BLOCK_ELEMENTS, "cpu", 2000)
    images, mean, Wm, centroids = _setup(14, 11, 3, 5, 33, n=7)
    for kind in ("triangle", "soft"):
        enc = Encoder(centroids, mean, Wm, rf=5, kind=kind, grid=2, device="cpu")
        assert enc.compile_
        ref = reference_encode(images, centroids, mean, Wm, 5, 1, kind, 0.5, 2)
        _assert_close(enc.transform(images), ref)
        assert enc.compile_, "compilation failed and fell back to eager"
        _assert_close(np.concatenate([f for _, _, f in enc.iter_transform(images, batch=2)]), ref)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("compiled", ["0", "1"])
@pytest.mark.parametrize("kind", encode.KINDS)
@pytest.mark.parametrize("H,W,C,rf,stride,grid,k", GEOMETRIES[:3])
def test_cuda_matches_reference(monkeypatch, compiled, kind, H, W, C, rf, stride, grid, k):
    monkeypatch.setenv("KMFEAT_COMPILE", compiled)
    images, mean, Wm, centroids = _setup(H, W, C, rf, k, n=9)
    enc = Encoder(centroids, mean, Wm, rf=rf, stride=stride, kind=kind, grid=grid, device="cuda")
    ref = reference_encode(images, centroids, mean, Wm, rf, stride, kind, 0.5, grid)
    _assert_close(enc.transform(images), ref, rtol=1e-3 if encode.ALLOW_TF32 else 1e-4)
    np.testing.assert_allclose(enc.transform(images), Encoder(centroids, mean, Wm, rf=rf, stride=stride, kind=kind,
                                                               grid=grid, device="cpu").transform(images),
                               rtol=1e-3, atol=1e-3 * np.abs(ref).max())


def _cifar_images(n):
    images = []
    with tarfile.open(CIFAR, "r:gz") as tar:
        for member in tar:
            if member.isfile() and "/test/" in member.name and member.name.endswith(".jpg"):
                from PIL import Image
                images.append(np.asarray(Image.open(io.BytesIO(tar.extractfile(member).read())).convert("RGB")))
                if len(images) == n:
                    break
    return np.stack(images)


@pytest.mark.real
@pytest.mark.skipif(not CIFAR.exists(), reason="real CIFAR-10 copy not present")
def test_real_cifar_images_match_reference():
    images = _cifar_images(6)
    assert images.shape == (6, 32, 32, 3)
    mean, Wm, centroids = random_dictionary(images, 6, 40)
    for kind in encode.KINDS:
        out = Encoder(centroids, mean, Wm, kind=kind, device="cpu").transform(images)
        _assert_close(out, reference_encode(images, centroids, mean, Wm, kind=kind))


def test_compile_failure_warns_and_falls_back_to_eager(monkeypatch):
    def broken(fn, device="cpu"):
        def fail(*args):
            raise RuntimeError("no compiler")
        return fail

    monkeypatch.setenv("KMFEAT_COMPILE", "1")
    monkeypatch.setattr(encode, "_compile_broken", False)
    monkeypatch.setattr(encode, "_compiled_fn", broken)
    images, mean, Wm, centroids = _setup(10, 9, 3, 3, 16)
    enc = Encoder(centroids, mean, Wm, rf=3, device="cpu")
    assert enc.compile_
    with pytest.warns(UserWarning, match="torch.compile failed"):
        out = enc.transform(images)
    assert not enc.compile_ and not Encoder(centroids, mean, Wm, rf=3).compile_
    _assert_close(out, reference_encode(images, centroids, mean, Wm, 3))


@pytest.mark.parametrize("kind", ["triangle", "soft"])
def test_fused_chain_and_auto_compile_policy(monkeypatch, kind):
    """The expressions handed to torch.compile (run uncompiled here) match the reference, and with
    KMFEAT_COMPILE unset they are used once the encoder has seen enough work in all."""
    used = []

    def uncompiled(fn, device="cpu"):
        used.append(fn.__name__)
        return fn

    monkeypatch.delenv("KMFEAT_COMPILE")
    monkeypatch.setattr(encode, "_compiled_fn", uncompiled)
    monkeypatch.setitem(encode.BLOCK_ELEMENTS, "cpu", 3000)
    images, mean, Wm, centroids = _setup(13, 12, 3, 5, 33, n=6)
    ref = reference_encode(images, centroids, mean, Wm, 5, 1, kind, 0.5, 3)
    enc = Encoder(centroids, mean, Wm, rf=5, kind=kind, grid=3, device="cpu")
    monkeypatch.setattr(encode, "COMPILE_MIN_WORK", 1.5 * len(images) * 9 * 8 * 33)
    _assert_close(enc.transform(images), ref)
    assert used == [] and not enc.compiled_once_
    _assert_close(enc.transform(images), ref)
    assert used and set(used) == {f"_{kind}_cells"} and enc.compiled_once_
    monkeypatch.setattr(encode, "COMPILE_MIN_WORK", 1e18)
    n = len(used)
    _assert_close(np.concatenate([f for _, _, f in enc.iter_transform(images, batch=4)]), ref)
    assert len(used) > n
    assert not Encoder(centroids, mean, Wm, rf=5, kind="hard").compile_
    # a stage's recorded decision overrides the per-call policy both ways
    fresh = Encoder(centroids, mean, Wm, rf=5, kind=kind, grid=3, device="cpu")
    n = len(used)
    _assert_close(np.concatenate([f for _, _, f in fresh.iter_transform(images, compiled=True)]), ref)
    assert len(used) > n
    monkeypatch.setattr(encode, "COMPILE_MIN_WORK", 1.0)
    n = len(used)
    _assert_close(np.concatenate([f for _, _, f in fresh.iter_transform(images, compiled=False)]), ref)
    assert len(used) == n
    assert fresh.work(images.shape) == len(images) * 9 * 8 * 33
    assert fresh.will_compile(1.0) and not fresh.will_compile(0.5)
    monkeypatch.setenv("KMFEAT_COMPILE", "0")
    assert not Encoder(centroids, mean, Wm, rf=5, kind=kind).will_compile(1e18)


def test_linear_matches_float64_on_every_backend(monkeypatch):
    from kmfeat import linear

    gen = torch.Generator().manual_seed(3)
    weight, bias = torch.randn(37, 27, generator=gen), torch.randn(37, generator=gen)
    x = torch.randn(50, 27, generator=gen)
    want = x.double() @ weight.double().t() + bias.double()
    fast = linear.Linear(weight, bias)
    if linear._onednn_available():
        assert fast.backend == "onednn"
    monkeypatch.setattr(linear, "_onednn_available", lambda: False)
    plain = linear.Linear(weight, bias)
    assert plain.backend == "torch"
    for lin in (fast, plain):
        got = lin(x)
        assert got.dtype == torch.float32 and got.shape == (50, 37)
        assert float((got.double() - want).abs().max()) < 1e-5 * float(want.abs().max())


def test_linear_probe_rejects_reduced_precision_and_failures():
    from kmfeat.linear import agrees_with_float64

    weight, bias = torch.randn(64, 108), torch.randn(64)

    def exact(x):
        return torch.addmm(bias, x, weight.t())

    def bf16(x):
        return (x.bfloat16() @ weight.bfloat16().t()).float() + bias

    assert agrees_with_float64(exact, weight, bias)
    assert not agrees_with_float64(bf16, weight, bias)
    assert not agrees_with_float64(lambda x: x[:, :3], weight, bias)
    assert not agrees_with_float64(lambda x: 1 / 0, weight, bias)


# (H, W, C, rf, stride, k): odd, non-square sizes
CODE_GEOMETRIES = [(9, 11, 3, 3, 1, 7), (13, 10, 1, 5, 2, 16), (16, 13, 3, 6, 1, 33)]
CODES = [("soft", True, 0.25), ("knn", False, 0.25), ("knn", True, 0.4), ("knn", True, 3), ("knn", False, 1)]


@pytest.mark.parametrize("kind,split,q", CODES)
@pytest.mark.parametrize("H,W,C,rf,stride,k", CODE_GEOMETRIES)
def test_split_and_knn_codes_match_reference(kind, split, q, H, W, C, rf, stride, k):
    images, mean, Wm, centroids = _setup(H, W, C, rf, k)
    enc = Encoder(centroids, mean, Wm, rf=rf, stride=stride, kind=kind, alpha=0.25, split=split, q=q, grid=2)
    out = enc.transform(images)
    ref = reference_encode(images, centroids, mean, Wm, rf, stride, kind, 0.25, 2, split=split, q=q)
    assert enc.n_codes == (2 if split else 1) * k
    assert out.shape == (len(images), 4 * enc.n_codes) == (len(images), enc.n_features)
    _assert_close(out, ref)


def test_knn_codes_count_q_per_position():
    """Each position sets exactly q codes per sign: a 1x1 sum pool counts positions x q."""
    images, mean, Wm, centroids = _setup(12, 9, 3, 3, 20)
    for q, count in ((0.3, 6), (5, 5)):
        out = Encoder(centroids, mean, Wm, rf=3, kind="knn", split=True, q=q, grid=1).transform(images)
        assert np.array_equal(out[:, :20].sum(1), np.full(len(images), 10 * 7 * count))
        assert np.array_equal(out[:, 20:].sum(1), np.full(len(images), 10 * 7 * count))


@pytest.mark.parametrize("pool", ["sum", "mean", "max"])
@pytest.mark.parametrize("grid", [[1, 2, 4], [4, 2, 1], [3, 1], [2, 3], 3])
@pytest.mark.parametrize("kind", encode.KINDS)
def test_pyramids_and_pool_kinds_match_reference(kind, grid, pool):
    """Pyramid levels in list order (either order), lcm grids that are not a level (2, 3 -> 6), every pool kind."""
    images, mean, Wm, centroids = _setup(15, 14, 3, 3, 9)
    enc = Encoder(centroids, mean, Wm, rf=3, kind=kind, alpha=0.25, split=kind == "soft", grid=grid, pool=pool)
    out = enc.transform(images)
    ref = reference_encode(images, centroids, mean, Wm, 3, 1, kind, 0.25, grid, split=kind == "soft", pool=pool)
    levels = grid if isinstance(grid, list) else [grid]
    assert out.shape == (len(images), sum(g * g for g in levels) * enc.n_codes)
    _assert_close(out, ref)


@pytest.mark.parametrize("kind,pool", [("triangle", "max"), ("soft", "sum"), ("soft", "mean")])
def test_compiled_pyramid_matches_reference(monkeypatch, kind, pool):
    monkeypatch.setenv("KMFEAT_COMPILE", "1")
    images, mean, Wm, centroids = _setup(11, 13, 3, 3, 8)
    enc = Encoder(centroids, mean, Wm, rf=3, kind=kind, alpha=0.25, split=kind == "soft", grid=[1, 2], pool=pool)
    out = enc.transform(images)
    _assert_close(out, reference_encode(images, centroids, mean, Wm, 3, 1, kind, 0.25, [1, 2],
                                        split=kind == "soft", pool=pool))


def test_new_code_and_pool_errors():
    _, mean, Wm, c = _setup(9, 9, 3, 3, 8)
    for name, build in [("encode.split", lambda: Encoder(c, mean, Wm, rf=3, kind="triangle", split=True)),
                        ("encode.q", lambda: Encoder(c, mean, Wm, rf=3, kind="knn", q=9)),
                        ("encode.q", lambda: Encoder(c, mean, Wm, rf=3, kind="knn", q=2.5)),
                        ("pool.kind", lambda: Encoder(c, mean, Wm, rf=3, pool="median")),
                        ("pool.grid", lambda: Encoder(c, mean, Wm, rf=3, grid=[2, 2])),
                        ("pool.grid", lambda: Encoder(c, mean, Wm, rf=3, grid=[1, 0]))]:
        with pytest.raises(KmfeatError, match=name):
            build()
    with pytest.raises(KmfeatError, match="pool.grid: the pyramid"):
        Encoder(c, mean, Wm, rf=3, grid=[2, 3]).transform(_images(2, 7, 7, 3))  # 5x5 map < 6x6


def test_compiled_wrappers_are_per_device_and_deterministic_on_cuda(monkeypatch):
    """Issue 12 item 1: on CUDA, inductor compiles in its deterministic mode; CPU kernels are left as they were
    (their bytes are what the caches hold)."""
    made = []
    monkeypatch.setattr(encode, "_compiled", {})
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: made.append(kw) or fn)
    assert encode._compiled_fn(encode._soft_cells, "cpu") is encode._soft_cells
    encode._compiled_fn(encode._soft_cells, "cuda")
    encode._compiled_fn(encode._soft_cells, "cuda")
    assert [kw["options"] for kw in made] == [None, {"deterministic": True}]


def test_the_first_compile_is_announced_with_its_time(monkeypatch, capsys):
    """Issue 13: encode froze ~20 s without a word at its first compile."""
    monkeypatch.setenv("KMFEAT_COMPILE", "1")
    monkeypatch.setattr(encode, "_compiled", {})
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)
    images, mean, Wm, centroids = _setup(10, 10, 3, 3, 8)
    for _ in range(2):
        Encoder(centroids, mean, Wm, rf=3, device="cpu").transform(images)
    err = capsys.readouterr().err
    assert err.count("encode: compiling the fused encoder kernel, once per process") == 1
    assert err.count("encode: compiled in ") == 1


def test_inductor_cache_lives_under_the_cache_dir(monkeypatch, tmp_path):
    from click.testing import CliRunner

    from kmfeat.cli import cli

    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    CliRunner().invoke(cli, ["--cache-dir", str(tmp_path / "c"), "cache", "ls"], catch_exceptions=False)
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str((tmp_path / "c").resolve() / ".inductor")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/somewhere/else")
    CliRunner().invoke(cli, ["--cache-dir", str(tmp_path / "c"), "cache", "ls"], catch_exceptions=False)
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == "/somewhere/else"  # a user's setting is respected


@pytest.mark.parametrize("kind,split,precision", [("triangle", False, "fp32"), ("soft", True, "fp32"),
                                                   ("hard", False, "fp32"), ("knn", True, "fp32"),
                                                   ("triangle", False, "bf16"), ("soft", True, "bf16")])
def test_bright_flat_patches_keep_their_accuracy(kind, split, precision):
    """The product reads the raw patches (pixels - 128) and takes each patch's mean off afterwards
    (Encoder._prepare): on near-flat images far from 128, where that mean is large against the contrast, the
    features must still match the float64 reference to float32 accuracy (bfloat16's in bf16)."""
    rng = np.random.default_rng(3)
    images = (250 - rng.integers(0, 4, (6, 12, 12, 3))).astype(np.uint8)
    images[:3, 6:] = rng.integers(0, 256, (3, 6, 12, 3))  # contrast in some windows too
    mean, Wm, centroids = random_dictionary(_images(20, 12, 12, 3, 5), 4, 21, seed=2)
    enc = Encoder(centroids, mean, Wm, rf=4, kind=kind, split=split, alpha=0.25, grid=2, q=3, device="cpu",
                  precision=precision)
    ref = reference_encode(images, centroids, mean, Wm, 4, 1, kind, 0.25, 2, split=split, q=3)
    _assert_close(enc.transform(images), ref, rtol=BF16_RTOL if precision == "bf16" else 1e-4)


@pytest.mark.parametrize("H, W, C, rf, s", [(9, 11, 3, 3, 1), (12, 10, 1, 4, 2), (8, 13, 4, 5, 3)])
def test_window_sums_are_every_patchs_pixel_sum(H, W, C, rf, s):
    """The two-pass pooling sum equals, for every patch position, the float64 sum of its rf x rf x C pixels."""
    x = np.random.default_rng(H * W + C).integers(-128, 128, size=(2, H, W, C)).astype(np.float64)
    got = encode._window_sums(torch.from_numpy(x).view(2, 1, H, W * C), rf, C, s).numpy()
    ny, nx = (H - rf) // s + 1, (W - rf) // s + 1
    want = np.array([[[x[b, i * s:i * s + rf, j * s:j * s + rf].sum() for j in range(nx)] for i in range(ny)]
                     for b in range(2)])
    assert got.shape == (2, 1, ny, nx) and got.dtype == np.float64
    np.testing.assert_array_equal(got[:, 0], want)


def test_the_sum_column_takes_off_what_rounding_leaves_of_the_row_sums():
    """[A', -r/d] against [x, sum(x)] gives A.(x - mu) for centred A, in float32 to float32 accuracy and in
    bfloat16 to its rounding of A; without the column the rounded row sums leave r * mu on every product."""
    rng = np.random.default_rng(0)
    A = rng.standard_normal((50, 108))
    A -= A.mean(1, keepdims=True)
    x = rng.integers(-4, 5, (200, 108)).astype(np.float64) + 120  # flat patches, a mean far from 0
    want = (x - x.mean(1, keepdims=True)) @ A.T
    xs = np.concatenate([x, x.sum(1, keepdims=True)], 1)
    scale = np.abs(want).max()
    for dtype, tol in [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)]:
        aug = encode._with_sum_column(A, dtype).double().numpy()
        assert aug.shape == (50, 109)
        assert np.array_equal(aug[:, :108], torch.tensor(A, dtype=dtype).double().numpy())
        assert np.abs(xs @ aug.T - want).max() <= tol * scale
    rounded = torch.tensor(A, dtype=torch.bfloat16).double().numpy()
    assert np.abs(x @ rounded.T - want).max() > 10 * np.abs(xs @ encode._with_sum_column(A, torch.bfloat16)
                                                          .double().numpy().T - want).max()
