"""Lloyd k-means with two interchangeable backends: faiss (GPU or CPU) and torch (CUDA or CPU).

Both start from the same k distinct data points drawn with numpy from the seed (uniformly, or
D^2-weighted k-means++ on a subsample), run `iters` Lloyd iterations (assign, then mean update;
empty clusters re-seeded by splitting the largest), and report counts_ / inertia_ from one final
assignment measured the same way. precision="bf16" (torch backend) rounds the assignment's products x.c to
bfloat16 (float32 accumulation, float32 ||c||^2 and argmin); the centroid update stays float32.
"""
import warnings

import numpy as np
import torch
from sklearn.base import BaseEstimator
from sklearn.utils.validation import check_is_fitted
from threadpoolctl import threadpool_limits

from .determinism import deterministic_sums
from .errors import KmfeatError
from .linear import Linear, ProductBF16
from .precision import PRECISIONS, bf16_ok, full_fp32
from .progress import bar

BACKENDS = ("auto", "faiss", "torch")
DEVICES = ("auto", "cpu", "cuda")
INITS = ("random", "k-means++")
_PP_POOL_PER_CLUSTER = 20
_PP_MIN_POOL = 10_000
_SPLIT_EPS = 1.0 / 1024.0
_INERTIA_CHUNK = 65_536


def _faiss():
    """The faiss module, or None when it is not installed."""
    try:
        import faiss
    except ImportError:
        return None
    return faiss


def _faiss_gpus(faiss) -> int:
    """GPUs this faiss build can use (0 for faiss-cpu)."""
    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


def resolve_backend(backend: str = "auto", device: str = "auto") -> tuple[str, str]:
    """The (backend, device) that will actually run, e.g. ("faiss", "cpu") or ("torch", "cuda").

    auto picks the fastest available: faiss with GPUs, then torch on CUDA, then faiss on CPU, then torch on CPU
    (so a GPU machine with faiss-cpu runs k-means on its GPU through torch); device narrows the choice.
    """
    if backend not in BACKENDS:
        raise KmfeatError(f"kmeans.backend: expected one of {', '.join(BACKENDS)}, got {backend!r}")
    if device not in DEVICES:
        raise KmfeatError(f"kmeans.device: expected one of {', '.join(DEVICES)}, got {device!r}")
    faiss = _faiss()
    if backend == "faiss" and faiss is None:
        raise KmfeatError("kmeans.backend: faiss is not installed; `pip install faiss-cpu` (or faiss-gpu), "
                          "or set kmeans.backend = \"torch\"")
    faiss_gpu = faiss is not None and _faiss_gpus(faiss) > 0
    torch_cuda = torch.cuda.is_available()
    candidates = {
        "auto": [("faiss", "cuda", faiss_gpu), ("torch", "cuda", torch_cuda), ("faiss", "cpu", faiss is not None),
                 ("torch", "cpu", True)],
        "faiss": [("faiss", "cuda", faiss_gpu), ("faiss", "cpu", True)],
        "torch": [("torch", "cuda", torch_cuda), ("torch", "cpu", True)],
    }[backend]
    for name, dev, available in candidates:
        if available and device in ("auto", dev):
            return name, dev
    if backend == "faiss":
        raise KmfeatError("kmeans.device: \"cuda\" but this faiss has no GPU support; install faiss-gpu, "
                          "or set kmeans.backend = \"torch\" or kmeans.device = \"cpu\"")
    raise KmfeatError("kmeans.device: \"cuda\" but no CUDA GPU is available; set kmeans.device = \"cpu\" or \"auto\"")


def resolve(backend: str = "auto", device: str = "auto", precision: str = "fp32") -> tuple[str, str, str]:
    """The (backend, device, precision) that will run. bf16 runs on the torch backend only; auto picks it on a
    CPU whose bfloat16 products are native and pass the probe (kmfeat.precision.bf16_ok), where it measured
    faster than faiss-cpu at the same inertia (BENCHMARKS.md), and fp32 everywhere else."""
    if precision not in PRECISIONS:
        raise KmfeatError(f"kmeans.precision: expected one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "bf16" and backend == "faiss":
        raise KmfeatError("kmeans.precision: \"bf16\" runs on the torch backend; set kmeans.backend = \"torch\" "
                          "or \"auto\", or kmeans.precision = \"fp32\"")
    if precision == "bf16":
        return (*resolve_backend("torch", device), "bf16")
    name, dev = resolve_backend(backend, device)
    if precision == "auto" and backend in ("auto", "torch") and dev == "cpu" and bf16_ok("cpu"):
        return "torch", "cpu", "bf16"
    return name, dev, "fp32"


def _kmeanspp(X: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k-means++ seeding (D^2 sampling) over a uniform subsample of X; returns k rows (distinct indices).

    The k sequential mat-vecs are memory-bound: one BLAS thread is as fast and avoids thread thrash.
    """
    n = X.shape[0]
    pool_size = min(n, max(_PP_POOL_PER_CLUSTER * k, _PP_MIN_POOL))
    pool = np.sort(rng.choice(n, size=pool_size, replace=False)) if pool_size < n else np.arange(n)
    P = X[pool].astype(np.float64)
    p_sq = np.einsum("ij,ij->i", P, P)
    chosen = np.empty(k, dtype=np.int64)
    chosen[0] = rng.integers(pool_size)
    d2 = np.full(pool_size, np.inf)
    with threadpool_limits(limits=1, user_api="blas"):
        for j in range(k):
            if j > 0:
                cum = np.cumsum(d2)
                if cum[-1] > 0:
                    chosen[j] = np.searchsorted(cum, rng.random() * cum[-1], side="right")
                else:
                    free = np.setdiff1d(np.arange(pool_size), chosen[:j])
                    chosen[j] = free[rng.integers(free.size)]
            c = P[chosen[j]]
            np.minimum(d2, np.maximum(p_sq - 2.0 * (P @ c) + c @ c, 0.0), out=d2)
            d2[chosen[j]] = 0.0
    return X[pool[chosen]]


def _initial_centroids(X: np.ndarray, k: int, seed: int, init: str) -> np.ndarray:
    """k distinct rows of X chosen with numpy from the seed, identical for every backend."""
    rng = np.random.default_rng(seed)
    if init == "random":
        return X[rng.choice(X.shape[0], size=k, replace=False)]
    return _kmeanspp(X, k, rng)


def _as_float32(X) -> np.ndarray:
    """C-contiguous float32 (n, d) view or copy of X."""
    X = np.ascontiguousarray(X, dtype=np.float32)
    if X.ndim != 2 or X.shape[0] < 1:
        raise KmfeatError(f"kmeans: expected a non-empty 2-d array (n, d) of patches, got shape {X.shape}")
    return X


def _to_torch(X: np.ndarray, device: str) -> torch.Tensor:
    """Share a (possibly read-only) numpy array with torch; nothing writes to it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(X).to(device)


def _chunk_rows(device: str, k: int) -> int:
    """Rows per distance block: ~4 MB of float32 on CPU (stays in cache: argmin over it runs at twice the speed
    of a 16 MB block), ~1 GB on CUDA."""
    budget = (1 << 28) if device == "cuda" else (1 << 20)
    return max(256, budget // max(k, 1))


@torch.no_grad()
def _assign_torch(X: torch.Tensor, C: torch.Tensor, chunk: int, precision: str = "fp32") -> torch.Tensor:
    """Nearest centroid per row of X (int64), via argmin of ||c||^2 - 2 x.c, in row chunks. On CPU the product
    goes through kmfeat.linear (oneDNN where it is exact to float32); in bf16 X may already be bfloat16."""
    c_sq = (C * C).sum(dim=1)
    labels = torch.empty(X.shape[0], dtype=torch.int64, device=X.device)
    if precision == "bf16":
        product = ProductBF16(-2.0 * C)
        if not product.ok:
            raise KmfeatError(f"kmeans.precision = bf16: on {C.device} a bfloat16 product disagrees with float64; "
                              f"use kmeans.precision = \"fp32\"")
        def distances(x):
            return product(x).float().add_(c_sq)
    elif C.device.type == "cpu":
        distances = Linear(-2.0 * C, c_sq)
    else:
        Ct = C.T
        def distances(x):
            return torch.addmm(c_sq, x, Ct, beta=1.0, alpha=-2.0)
    if X.device.type == "cpu":  # numpy's row argmin runs ~7x faster than torch's on these shapes
        out = labels.numpy()
        for s in range(0, X.shape[0], chunk):
            np.argmin(distances(X[s:s + chunk]).numpy(), axis=1, out=out[s:s + chunk])
        return labels
    for s in range(0, X.shape[0], chunk):
        torch.argmin(distances(X[s:s + chunk]), dim=1, out=labels[s:s + chunk])
    return labels


def _split_empty(C: torch.Tensor, counts: torch.Tensor) -> int:
    """Re-seed each empty centroid by splitting the currently largest cluster (as faiss does).

    The pair becomes c * (1 +/- eps) with alternating signs per dimension. Edits C and counts
    in place; returns the number of clusters re-seeded.
    """
    empty = torch.nonzero(counts == 0).flatten().tolist()
    if not empty:
        return 0
    sign = torch.ones(C.shape[1], dtype=C.dtype, device=C.device)
    sign[1::2] = -1.0
    for ci in empty:
        cj = int(torch.argmax(counts))
        base = C[cj].clone()
        C[ci] = base * (1.0 + _SPLIT_EPS * sign)
        C[cj] = base * (1.0 - _SPLIT_EPS * sign)
        counts[ci] = counts[cj] // 2
        counts[cj] -= counts[ci]
    return len(empty)


@torch.no_grad()
def _lloyd_torch(X: np.ndarray, init: np.ndarray, iters: int, device: str, precision: str = "fp32"):
    """Lloyd iterations on device, float32 updates (bf16: assignment products in bfloat16, X rounded once);
    returns (centroids, n_iter)."""
    Xt = _to_torch(X, device)
    Xa = Xt.to(torch.bfloat16) if precision == "bf16" else Xt
    C = torch.from_numpy(init).to(device).clone()
    k, chunk = C.shape[0], _chunk_rows(device, init.shape[0])
    prev = None
    n_iter = 0
    for _ in bar(range(iters), desc=f"k-means torch/{device} {precision}", unit="iter"):
        with full_fp32(device):  # TF32 distances would move points between near-equidistant centroids
            labels = _assign_torch(Xa, C, chunk, precision)
        n_iter += 1
        counts = torch.bincount(labels, minlength=k)
        with deterministic_sums(C):  # seeded k-means gives the same centroids on CUDA too
            sums = torch.zeros_like(C).index_add_(0, labels, Xt)
        C = sums / counts.clamp(min=1).to(C.dtype)[:, None]
        split = _split_empty(C, counts)
        if prev is not None and split == 0 and torch.equal(labels, prev):
            break
        prev = labels
    return C.cpu().numpy(), n_iter


def _lloyd_faiss(X: np.ndarray, init: np.ndarray, iters: int, seed: int, gpu: bool):
    """faiss Kmeans from the given init, without subsampling; returns (centroids, n_iter)."""
    faiss = _faiss()
    d = X.shape[1]
    km = faiss.Kmeans(d, init.shape[0], niter=iters, seed=seed, gpu=gpu, verbose=False,
                      max_points_per_centroid=(1 << 31) - 1, min_points_per_centroid=1)
    km.train(X, init_centroids=init)
    return np.ascontiguousarray(km.centroids, dtype=np.float32), len(km.obj)


def _assign_faiss(X: np.ndarray, C: np.ndarray, gpu: bool) -> np.ndarray:
    """Nearest centroid per row of X (int64) with an exact faiss L2 index."""
    faiss = _faiss()
    index = faiss.IndexFlatL2(C.shape[1])
    if gpu:
        index = faiss.index_cpu_to_all_gpus(index)
    index.add(C)
    _, labels = index.search(X, 1)
    return labels.ravel().astype(np.int64)


def _inertia(X: np.ndarray, C: np.ndarray, labels: np.ndarray) -> float:
    """Sum of ||x - c_label||^2 from explicit differences, accumulated in float64."""
    C = C.astype(np.float64)
    total = 0.0
    for s in range(0, X.shape[0], _INERTIA_CHUNK):
        diff = X[s:s + _INERTIA_CHUNK].astype(np.float64) - C[labels[s:s + _INERTIA_CHUNK]]
        total += float(np.einsum("ij,ij->", diff, diff))
    return total


class KMeans(BaseEstimator):
    """k-means on patch vectors with a faiss or torch backend and the assignment's product precision (see
    resolve)."""

    def __init__(self, k: int = 1600, iters: int = 25, seed: int = 0, backend: str = "auto", device: str = "auto",
                 init: str = "random", precision: str = "fp32"):
        self.k = k
        self.iters = iters
        self.seed = seed
        self.backend = backend
        self.device = device
        self.init = init
        self.precision = precision

    def fit(self, X, y=None):
        """Cluster X (n, d); learns centroids_, counts_, inertia_, backend_, device_, precision_, n_iter_.

        n_iter_ can be below iters when the assignment stops changing (faiss: the objective).
        """
        if int(self.k) < 1:
            raise KmfeatError(f"kmeans.k: must be at least 1, got {self.k}")
        if int(self.iters) < 1:
            raise KmfeatError(f"kmeans.iters: must be at least 1, got {self.iters}")
        if self.init not in INITS:
            raise KmfeatError(f"kmeans.init: expected one of {', '.join(INITS)}, got {self.init!r}")
        backend, device, precision = resolve(self.backend, self.device, self.precision)
        X = _as_float32(X)
        k, n = int(self.k), X.shape[0]
        if k > n:
            raise KmfeatError(f"kmeans.k: {k} clusters but only {n} patches; lower kmeans.k or sample more patches")
        if not np.isfinite(X).all():
            raise KmfeatError("kmeans: input patches contain NaN or inf")
        init = _initial_centroids(X, k, int(self.seed), self.init)
        if backend == "faiss":
            C, self.n_iter_ = _lloyd_faiss(X, init, int(self.iters), int(self.seed), device == "cuda")
        else:
            C, self.n_iter_ = _lloyd_torch(X, init, int(self.iters), device, precision)
        self.centroids_ = C
        self.backend_, self.device_, self.precision_ = backend, device, precision
        self.n_features_in_ = X.shape[1]
        labels = self.predict(X)
        self.counts_ = np.bincount(labels, minlength=k).astype(np.int64)
        self.inertia_ = _inertia(X, C, labels)
        return self

    def predict(self, X) -> np.ndarray:
        """Index of the nearest centroid for each row of X, int64."""
        check_is_fitted(self, "centroids_")
        X = _as_float32(X)
        if X.shape[1] != self.n_features_in_:
            raise KmfeatError(f"kmeans: expected patches with {self.n_features_in_} values, got {X.shape[1]}")
        if self.backend_ == "faiss":
            return _assign_faiss(X, self.centroids_, self.device_ == "cuda")
        C = torch.tensor(np.asarray(self.centroids_, dtype=np.float32), device=self.device_)
        labels = _assign_torch(_to_torch(X, self.device_), C, _chunk_rows(self.device_, C.shape[0]))
        return labels.cpu().numpy()
