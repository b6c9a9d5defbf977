"""k-means: cluster recovery, backend agreement, empty clusters, errors, backend resolution."""
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import adjusted_rand_score

from kmfeat import kmeans as km_mod
from kmfeat.errors import KmfeatError
from kmfeat.kmeans import KMeans, resolve_backend
from kmfeat.patches import normalize_patches, sample_patches
from kmfeat.whiten import Whitener

try:
    import faiss  # noqa: F401
    HAVE_FAISS = True
except ImportError:
    HAVE_FAISS = False

CPU_BACKENDS = [pytest.param("faiss", marks=pytest.mark.skipif(not HAVE_FAISS, reason="faiss not installed")),
                "torch"]


@pytest.fixture(autouse=True)
def quiet(monkeypatch):
    monkeypatch.setenv("KMFEAT_PROGRESS", "0")


@pytest.fixture(scope="module")
def blobs():
    rng = np.random.default_rng(0)
    centers = np.zeros((8, 16))
    centers[np.arange(8), np.arange(8)] = 10.0 / np.sqrt(2)
    y = rng.integers(0, 8, size=8000)
    X = centers[y] + rng.normal(scale=0.05, size=(8000, 16))
    return X.astype(np.float32), y, centers


@pytest.fixture(scope="module")
def patches():
    """Whitened normalized patches of smooth-ish random images: clusters that are not obvious."""
    rng = np.random.default_rng(1)
    imgs = rng.integers(0, 256, size=(60, 16, 16, 3)).astype(np.float32)
    imgs = (imgs + np.roll(imgs, 1, axis=1) + np.roll(imgs, 1, axis=2)) / 3
    P = normalize_patches(sample_patches(imgs.astype(np.uint8), rf=4, n=12_000, seed=0))
    return Whitener("zca", eps=0.1).fit_transform(P)


def _reference_assign(X, C):
    d = ((X.astype(np.float64)[:, None, :] - C.astype(np.float64)[None]) ** 2).sum(-1)
    return d.argmin(1), d.min(1)


def _check_fitted(km, X):
    k, d = km.k, X.shape[1]
    assert km.centroids_.shape == (k, d) and km.centroids_.dtype == np.float32
    assert np.isfinite(km.centroids_).all()
    assert km.counts_.dtype == np.int64 and km.counts_.shape == (k,) and km.counts_.sum() == X.shape[0]
    labels = km.predict(X)
    assert labels.dtype == np.int64 and labels.shape == (X.shape[0],)
    np.testing.assert_array_equal(np.bincount(labels, minlength=k), km.counts_)
    diff = X.astype(np.float64) - km.centroids_[labels].astype(np.float64)
    assert km.inertia_ == pytest.approx((diff ** 2).sum(), rel=1e-9)
    _, dmin = _reference_assign(X, km.centroids_)
    assert dmin.sum() * (1 - 1e-9) <= km.inertia_ <= dmin.sum() * (1 + 1e-3)
    assert 1 <= km.n_iter_ <= km.iters


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_recovers_separated_blobs(blobs, backend):
    X, y, centers = blobs
    km = KMeans(k=8, iters=25, seed=0, backend=backend, device="cpu", init="k-means++").fit(X)
    assert (km.backend_, km.device_) == (backend, "cpu")
    _check_fitted(km, X)
    labels = km.predict(X)
    assert adjusted_rand_score(y, labels) == 1.0
    dist = np.linalg.norm(km.centroids_[:, None, :] - centers[None], axis=-1)
    assert np.all(dist.min(axis=1) < 0.1)
    assert sorted(dist.argmin(axis=1)) == list(range(8))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_one_lloyd_step_matches_reference(patches, backend):
    """iters=1: centroids are the means of the points nearest to the seeded initial points."""
    X = patches[:3000]
    km = KMeans(k=20, iters=1, seed=3, backend=backend, device="cpu").fit(X)
    init = X[np.random.default_rng(3).choice(len(X), size=20, replace=False)]
    lab, _ = _reference_assign(X, init)
    expected = np.stack([X[lab == j].astype(np.float64).mean(0) for j in range(20)])
    assert np.bincount(lab, minlength=20).min() > 0
    np.testing.assert_allclose(km.centroids_, expected, rtol=1e-4, atol=1e-5)
    _check_fitted(km, X)


@pytest.mark.skipif(not HAVE_FAISS, reason="faiss not installed")
@pytest.mark.parametrize("init", ["random", "k-means++"])
def test_faiss_and_torch_agree_on_patches(patches, init):
    a = KMeans(k=64, iters=15, seed=7, backend="faiss", device="cpu", init=init).fit(patches)
    b = KMeans(k=64, iters=15, seed=7, backend="torch", device="cpu", init=init).fit(patches)
    _check_fitted(a, patches)
    _check_fitted(b, patches)
    assert abs(a.inertia_ - b.inertia_) / b.inertia_ < 0.01
    total = ((patches - patches.mean(0)) ** 2).sum(dtype=np.float64)
    assert b.inertia_ < 0.9 * total


def test_more_iterations_do_not_increase_inertia(patches):
    one = KMeans(k=32, iters=1, seed=0, backend="torch", device="cpu").fit(patches)
    many = KMeans(k=32, iters=10, seed=0, backend="torch", device="cpu").fit(patches)
    assert many.inertia_ <= one.inertia_


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("init", ["random", "k-means++"])
def test_empty_clusters_never_nan(backend, init):
    rng = np.random.default_rng(0)
    X = np.repeat(rng.normal(size=(5, 3)), 10, axis=0).astype(np.float32)
    km = KMeans(k=10, iters=10, seed=0, backend=backend, device="cpu", init=init).fit(X)
    _check_fitted(km, X)
    assert km.inertia_ < 1e-3 * ((X - X.mean(0)) ** 2).sum()


def test_split_empty_reseeds_next_to_largest():
    C = torch.tensor([[1.0, 2.0], [5.0, 5.0], [9.0, 9.0]])
    counts = torch.tensor([6, 0, 2])
    assert km_mod._split_empty(C, counts) == 1
    assert torch.isfinite(C).all()
    assert torch.allclose(C[1], C[0], rtol=1e-2) and not torch.equal(C[1], C[0])
    assert counts.tolist() == [3, 3, 2]


def test_kmeanspp_init_is_distinct_rows():
    X = np.repeat(np.arange(12, dtype=np.float32)[:, None], 4, axis=0) * np.ones((1, 3), dtype=np.float32)
    init = km_mod._initial_centroids(X, 12, seed=1, init="k-means++")
    assert len(np.unique(init, axis=0)) == 12
    init = km_mod._initial_centroids(X, 20, seed=1, init="k-means++")
    assert init.shape == (20, 3) and len(np.unique(init, axis=0)) == 12


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_seeded_determinism(patches, backend):
    a = KMeans(k=16, iters=5, seed=4, backend=backend, device="cpu").fit(patches)
    b = KMeans(k=16, iters=5, seed=4, backend=backend, device="cpu").fit(patches)
    np.testing.assert_array_equal(a.centroids_, b.centroids_)


@pytest.mark.parametrize("kwargs,match", [
    ({"k": 101}, r"kmeans\.k.*100 patches"),
    ({"k": 0}, r"kmeans\.k"),
    ({"iters": 0}, r"kmeans\.iters"),
    ({"backend": "sklearn"}, r"kmeans\.backend.*auto, faiss, torch"),
    ({"device": "tpu"}, r"kmeans\.device.*auto, cpu, cuda"),
    ({"init": "kmeans||"}, r"kmeans\.init"),
])
def test_bad_parameters(kwargs, match):
    X = np.random.default_rng(0).normal(size=(100, 4)).astype(np.float32)
    with pytest.raises(KmfeatError, match=match):
        KMeans(**{"k": 5, "backend": "torch", **kwargs}).fit(X)


def test_non_finite_input():
    X = np.ones((50, 3), dtype=np.float32)
    X[3, 1] = np.nan
    with pytest.raises(KmfeatError, match="NaN"):
        KMeans(k=2, backend="torch").fit(X)


def test_resolve_backend_here():
    cuda = torch.cuda.is_available()
    assert resolve_backend("torch", "cpu") == ("torch", "cpu")
    assert resolve_backend("torch", "auto") == ("torch", "cuda" if cuda else "cpu")
    if HAVE_FAISS:
        faiss_gpu = faiss.get_num_gpus() > 0 if hasattr(faiss, "get_num_gpus") else False
        want = ("faiss", "cuda") if faiss_gpu else ("torch", "cuda") if cuda else ("faiss", "cpu")
        assert resolve_backend("auto", "auto") == want
        assert resolve_backend("faiss", "cpu") == ("faiss", "cpu")
    if not cuda:
        with pytest.raises(KmfeatError, match=r"kmeans\.device"):
            resolve_backend("torch", "cuda")


def test_resolve_backend_without_faiss(monkeypatch):
    monkeypatch.setattr(km_mod, "_faiss", lambda: None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_backend("auto", "auto") == ("torch", "cpu")
    with pytest.raises(KmfeatError, match="pip install faiss-cpu"):
        resolve_backend("faiss", "auto")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_backend("auto", "auto") == ("torch", "cuda")


def test_resolve_backend_faiss_without_gpu(monkeypatch):
    class FakeFaiss:
        @staticmethod
        def get_num_gpus():
            return 0
    monkeypatch.setattr(km_mod, "_faiss", lambda: FakeFaiss)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_backend("auto", "cuda") == ("torch", "cuda")
    with pytest.raises(KmfeatError, match="faiss-gpu"):
        resolve_backend("faiss", "cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(KmfeatError, match=r"kmeans\.device"):
        resolve_backend("auto", "cuda")


class _Faiss:
    def __init__(self, gpus):
        self.gpus = gpus

    def get_num_gpus(self):
        return self.gpus


# (faiss: None / GPUs, torch CUDA) -> what backend="auto" runs for device auto / cpu / cuda (None: an error)
AUTO_TABLE = [
    (2, True, ("faiss", "cuda"), ("faiss", "cpu"), ("faiss", "cuda")),
    (2, False, ("faiss", "cuda"), ("faiss", "cpu"), ("faiss", "cuda")),
    (0, True, ("torch", "cuda"), ("faiss", "cpu"), ("torch", "cuda")),  # issue 12: faiss-cpu on a GPU machine
    (0, False, ("faiss", "cpu"), ("faiss", "cpu"), None),
    (None, True, ("torch", "cuda"), ("torch", "cpu"), ("torch", "cuda")),
    (None, False, ("torch", "cpu"), ("torch", "cpu"), None),
]


@pytest.mark.parametrize("gpus, cuda, auto, cpu, on_cuda", AUTO_TABLE)
def test_auto_backend_prefers_faiss_gpu_then_torch_cuda_then_faiss_cpu(monkeypatch, gpus, cuda, auto, cpu, on_cuda):
    monkeypatch.setattr(km_mod, "_faiss", lambda: None if gpus is None else _Faiss(gpus))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    assert resolve_backend("auto", "auto") == auto
    assert resolve_backend("auto", "cpu") == cpu
    if on_cuda is None:
        with pytest.raises(KmfeatError, match=r"kmeans\.device"):
            resolve_backend("auto", "cuda")
    else:
        assert resolve_backend("auto", "cuda") == on_cuda
    assert resolve_backend("torch", "auto") == ("torch", "cuda" if cuda else "cpu")
    if gpus is not None:
        assert resolve_backend("faiss", "auto") == ("faiss", "cuda" if gpus else "cpu")


def test_extras_install_one_faiss_build():
    """faiss-cpu and faiss-gpu both provide the `faiss` package: neither is a core dependency, each is its own
    extra (cpu, gpu), and the Makefile installs one of them."""
    import tomllib
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    assert not [d for d in project["dependencies"] if d.startswith("faiss")]
    extras = project["optional-dependencies"]
    builds = {name: {d.split(">")[0].split("=")[0] for d in deps if d.startswith("faiss")}
              for name, deps in extras.items()}
    assert builds["cpu"] == {"faiss-cpu"} and builds["gpu"] == {"faiss-gpu"}
    assert all(len(b) <= 1 for b in builds.values())
    makefile = (root / "Makefile").read_text()
    default = next(line for line in makefile.splitlines() if line.startswith("EXTRAS ?= ")).split("= ")[1]
    assert "cpu" in default.split(",") and "gpu" not in default.split(",") and '-e ".[$(EXTRAS)]"' in makefile


def test_sklearn_conventions():
    km = KMeans(k=3, iters=2, seed=1, backend="torch", device="cpu")
    assert km.get_params() == {"k": 3, "iters": 2, "seed": 1, "backend": "torch", "device": "cpu", "init": "random",
                              "precision": "fp32"}
    X = np.random.default_rng(0).normal(size=(30, 2))
    assert km.fit(X) is km
    assert km.get_params()["backend"] == "torch"


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_torch_cuda_matches_cpu(patches):
    gpu = KMeans(k=64, iters=10, seed=2, backend="torch", device="cuda").fit(patches)
    cpu = KMeans(k=64, iters=10, seed=2, backend="torch", device="cpu").fit(patches)
    assert gpu.device_ == "cuda"
    _check_fitted(gpu, patches)
    assert abs(gpu.inertia_ - cpu.inertia_) / cpu.inertia_ < 0.01


@pytest.mark.cuda
@pytest.mark.skipif(not (HAVE_FAISS and faiss.get_num_gpus() > 0), reason="needs faiss with a GPU")
def test_faiss_gpu_matches_cpu(patches):
    gpu = KMeans(k=64, iters=10, seed=2, backend="faiss", device="cuda").fit(patches)
    cpu = KMeans(k=64, iters=10, seed=2, backend="faiss", device="cpu").fit(patches)
    _check_fitted(gpu, patches)
    assert abs(gpu.inertia_ - cpu.inertia_) / cpu.inertia_ < 0.01


def test_configure_threads_sets_torch_and_faiss():
    from kmfeat.threads import available_cpus, configure_threads
    before = torch.get_num_threads()
    try:
        assert configure_threads(1) == 1 and torch.get_num_threads() == 1
        assert configure_threads(1) == 1 and torch.get_num_threads() == 1
        if HAVE_FAISS:
            assert faiss.omp_get_max_threads() == 1
        assert configure_threads() == available_cpus() == torch.get_num_threads()
        with pytest.raises(KmfeatError, match="threads"):
            configure_threads(0)
    finally:
        configure_threads(before)


REAL = Path(__file__).resolve().parents[2] / "shared/data/cifar10-jpeg.tar.gz"


def _first_real_images(count):
    import io
    import tarfile

    from PIL import Image
    out = []
    with tarfile.open(REAL, "r|gz") as tf:
        for member in tf:
            if member.isfile() and "/train/" in member.name and member.name.endswith(".jpg"):
                out.append(np.asarray(Image.open(io.BytesIO(tf.extractfile(member).read())).convert("RGB")))
                if len(out) == count:
                    break
    return np.stack(out)


@pytest.mark.real
@pytest.mark.slow
@pytest.mark.skipif(not REAL.exists(), reason="real CIFAR-10 copy not found")
def test_real_patches_pipeline():
    """Coates front end on 1,000 real CIFAR-10 images: whitened spectrum D/(D+eps), backends agree."""
    imgs = _first_real_images(1000)
    P = normalize_patches(sample_patches(imgs, rf=6, n=20_000, seed=0))
    assert P.shape == (20_000, 108) and np.isfinite(P).all()
    w = Whitener("zca", eps=0.1)
    Z = w.fit_transform(P)
    cov_evals = np.linalg.eigvalsh(np.cov(Z.astype(np.float64), rowvar=False, bias=True))[::-1]
    D = np.clip(w.eigenvalues_, 0, None)
    np.testing.assert_allclose(cov_evals, D / (D + 0.1), atol=1e-3)
    torch_km = KMeans(k=64, iters=10, seed=0, backend="torch", device="cpu").fit(Z)
    _check_fitted(torch_km, Z)
    if HAVE_FAISS:
        faiss_km = KMeans(k=64, iters=10, seed=0, backend="faiss", device="cpu").fit(Z)
        assert abs(faiss_km.inertia_ - torch_km.inertia_) / torch_km.inertia_ < 0.01
