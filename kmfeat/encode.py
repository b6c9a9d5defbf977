"""Dense Coates encoder: every window of every image -> normalize -> whiten -> code -> grid/pyramid pool.

Codes (K per position): triangle, hard, soft max(0, c_hat.z - alpha) and knn (1 for the q nearest
centroids, Thiry et al. 2021); split=True gives soft and knn codes for both signs of the patch
(K = 2k: first the k codes of z, then the k codes of -z, i.e. max(0, -c_hat.z - alpha)).

Two costs dominate: the dot products z.c (one (positions x d) @ (d x k) matmul, done on CPU by
oneDNN's AVX-512 kernel through kmfeat.linear) and the images x positions x k distance map after
it, where every elementwise pass costs memory bandwidth. So the normalization and the whitening are
folded into the centroids (Encoder._prepare): the matmul reads the raw patches of a batch of images
(one strided copy, in the product's dtype), one cache-sized block of response-map rows at a time,
and everything after it (per-patch scale, distance, code, per-cell sums) runs on that block while it
is still in cache: as one fused torch.compile kernel for big jobs, or as in-place eager passes.
"""
import functools
import os
import time
import warnings

import numpy as np
import psutil
import torch

from .determinism import deterministic_sums
from .errors import KmfeatError
from .linear import BF16_RTOL, Linear, ProductBF16
from .precision import encode_precision, full_fp32
from .progress import say
from .pooling import POOL_KINDS, cell_index, finest, levels, n_cells, pool_bounds, pyramid

KINDS = ("triangle", "hard", "soft", "knn")
DEVICES = ("auto", "cpu", "cuda")
ALLOW_TF32 = False
"""TF32 matmuls on CUDA: off until checked within 1e-3 of the float64 reference on the target GPU."""
BLOCK_ELEMENTS = {"cpu": 1 << 20, "cuda": 1 << 26}
"""Target size (positions x product columns) of one block of the code map: cache-sized on CPU."""
BATCH_BYTES = {"cpu": 256 << 20, "cuda": 2 << 30}
"""Upper bound on the per-batch working set (patches, z, buffers) when batch=None."""
COMPILE_MIN_WORK = 1e10
"""With KMFEAT_COMPILE unset, an encoder compiles once it has been asked for this many (image, position,
centroid) triples in all (about 8,500 CIFAR images at k=1600, some 10 s of eager work on 2 cores), so
that the one-off compile (about 4 s with a warm inductor cache, 12-35 s cold) pays off on big jobs only."""

warnings.filterwarnings("ignore", message="index_reduce\\(\\) is in beta", category=UserWarning)
_compiled = {}
_compile_broken = False


def compile_mode() -> str:
    """"off" (KMFEAT_COMPILE=0 or an earlier compile failed), "on" (=1) or "auto" (unset: big calls only)."""
    if _compile_broken or os.environ.get("KMFEAT_COMPILE") == "0":
        return "off"
    return "on" if os.environ.get("KMFEAT_COMPILE") == "1" else "auto"


# The torch core: one block of R response-map rows, (R, nx, k), to per-row column-cell sums (grid, R, k).

def _reduce_cols(f, cuts, reduce):
    """(cells, R, K): per row, the sum or max of f (R, nx, K) over each column cell."""
    if reduce == "max":
        return torch.stack([f[:, cuts[g]:cuts[g + 1]].amax(1) for g in range(len(cuts) - 1)])
    return torch.stack([f[:, cuts[g]:cuts[g + 1]].sum(1) for g in range(len(cuts) - 1)])


def _affine(p, inv_s, b):
    """The code map e (R, nx, K) = b + p / sigma from the product p = A.(x - mu) of the raw patches (any float
    dtype; see Encoder._prepare), with inv_s (R, nx) the 1/sigma of each patch."""
    return p.float() * inv_s.unsqueeze(-1) + b


def _triangle_cells(p, inv_s, b, zz, cuts, reduce):
    """Triangle codes from e = ||c||^2 - 2 z.c (via _affine) and zz = ||z||^2, as one fusable expression."""
    d = (_affine(p, inv_s, b) + zz.unsqueeze(-1)).clamp_min(0).sqrt()
    return _reduce_cols((d.mean(-1, keepdim=True) - d).clamp_min(0), cuts, reduce)


def _soft_cells(p, inv_s, b, cuts, reduce):
    """Soft-threshold codes from e = c_hat.z - alpha (via _affine), as one fusable expression."""
    return _reduce_cols(_affine(p, inv_s, b).clamp_min(0), cuts, reduce)


def _soft_split_cells(p, inv_s, b, two_alpha, cuts, reduce):
    """Both signs from one product, e = c_hat.z - alpha: max(0, e), and
    max(0, -c_hat.z - alpha) = max(0, -e - 2 alpha); two reductions that inductor fuses into one pass."""
    e = _affine(p, inv_s, b)
    return torch.cat([_reduce_cols(e.clamp_min(0), cuts, reduce),
                      _reduce_cols((e.neg() - two_alpha).clamp_min(0), cuts, reduce)], -1)


def _affine_(p, inv_s, b):
    """Eager _affine, in place where p is float32."""
    e = p if p.dtype == torch.float32 else p.float()
    return e.mul_(inv_s.unsqueeze(-1)).add_(b)


def _with_sum_column(A, dtype):
    """[A', -r / d] (k, d + 1) float32 for A (k, d) with centred rows: A' is A rounded to `dtype`, r its row sums
    (what the rounding left of A.1 = 0). Against a patch x with its pixel sum appended, [x, sum(x)], it gives
    A'.x - r mu = A'.(x - mu) up to the rounding of r / d and of the sum (a 2^-8 part of r mu in bfloat16)."""
    rounded = torch.tensor(A, dtype=dtype).double()
    return torch.cat([rounded, -rounded.sum(1, keepdim=True) / A.shape[1]], 1).float()


def _raw_product(A, precision: str, device):
    """The product [x, sum(x)] -> A.(x - mu) for A (k, d) with centred rows, on `device`: ProductBF16 in "bf16"
    (its result in bfloat16), else a float32 Linear."""
    if precision == "bf16":
        return ProductBF16(_with_sum_column(A, torch.bfloat16).to(device))
    return Linear(_with_sum_column(A, torch.float32).to(device), torch.zeros(len(A), device=device))


def _window_sums(t, rf, C, s):
    """Sums of every rf x rf patch (stride s) of t (B, 1, H, W * C), channels interleaved: rf * C columns,
    then rf rows, as two pooling passes (a third of the time of one rf x rf * C window)."""
    pool = functools.partial(torch.nn.functional.avg_pool2d, divisor_override=1)
    return pool(pool(t, (1, rf * C), (1, s * C)), (rf, 1), (s, 1))


def _cell_reduce_(f, cuts, reduce, out):
    for g in range(len(cuts) - 1):
        if reduce == "max":
            torch.amax(f[:, cuts[g]:cuts[g + 1]], 1, out=out[g])
        else:
            torch.sum(f[:, cuts[g]:cuts[g + 1]], 1, out=out[g])
    return out


def _triangle_cells_(e, zz, cuts, reduce, out):
    """Eager triangle on e = ||c||^2 - 2 z.c, in place (e is overwritten), into out."""
    d = e.add_(zz.unsqueeze(-1)).clamp_min_(0).sqrt_()
    mu = d.mean(-1, keepdim=True)
    return _cell_reduce_(torch.sub(mu, d, out=d).clamp_min_(0), cuts, reduce, out)


def _soft_cells_(e, cuts, reduce, out):
    """Eager soft threshold on e = c_hat.z - alpha, in place, into out."""
    return _cell_reduce_(e.clamp_min_(0), cuts, reduce, out)


def _soft_split_cells_(e, two_alpha, cuts, reduce, out):
    """Eager sign split of e = c_hat.z - alpha (R, nx, k) into out (L, R, 2k)."""
    k = e.shape[-1]
    neg = torch.neg(e).sub_(two_alpha).clamp_min_(0)
    _cell_reduce_(e.clamp_min_(0), cuts, reduce, out[..., :k])
    _cell_reduce_(neg, cuts, reduce, out[..., k:])
    return out


def _knn_cells_(e, q, halves, cuts, reduce, out):
    """1 where e (a distance up to a per-position constant) is among the q smallest of its half
    (R, nx, halves * k): the q nearest centroids of z (and of -z in the second half)."""
    R, nx, K = e.shape
    h = e.view(R, nx, halves, K // halves)
    kth = torch.kthvalue(h, q, dim=-1, keepdim=True).values
    return _cell_reduce_(torch.le(h, kth, out=torch.empty(h.shape, dtype=torch.bool, device=e.device))
                         .view(R, nx, K).to(e.dtype), cuts, reduce, out)


def _hard_cells_(e, cell_x, ones, reduce, out):
    """One-hot of argmin_j e (e = ||c||^2 - 2 z.c; lowest index on ties) counted into out (max: 0/1)."""
    R, nx, k = e.shape
    rows = torch.arange(R, device=e.device).unsqueeze(1)
    flat = (cell_x * R + rows) * k + e.argmin(-1)
    out = out.zero_().view(-1).index_add_(0, flat.view(-1), ones).view(out.shape)
    return out.clamp_max_(1) if reduce == "max" else out


def _compiled_fn(fn, device: str = "cpu"):
    """One torch.compile wrapper per chain function and device type, static shapes (the blocks are fixed-size).
    On CUDA inductor runs in its deterministic mode (no atomics, no autotuning by timing), so a compiled
    encode gives the same bytes every run."""
    if (fn, device) not in _compiled:
        options = {"deterministic": True} if device == "cuda" else None
        _compiled[fn, device] = torch.compile(fn, dynamic=False, fullgraph=True, options=options)
    return _compiled[fn, device]


# Validation.

def _check_finite(name, arr, shape=None):
    arr = np.asarray(arr)
    if shape is not None and arr.shape != shape:
        raise KmfeatError(f"{name}: expected an array of shape {shape}, got {arr.shape}")
    if not np.issubdtype(arr.dtype, np.number) or not np.isfinite(arr).all():
        raise KmfeatError(f"{name}: contains NaN or inf (or is not numeric); recompute it")
    return arr


def _positive_int(name, value, minimum=1):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise KmfeatError(f"{name}: expected an integer >= {minimum}, got {value!r}")


def _resolve_device(device):
    if device not in DEVICES:
        raise KmfeatError(f"encode.device: expected one of {', '.join(DEVICES)}, got {device!r}")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise KmfeatError("encode.device: 'cuda' requested but torch sees no CUDA GPU; use 'cpu' or 'auto'")
    return device


ENCODER_PARAMS = ("centroids", "whiten_mean", "whiten_matrix", "rf", "stride", "kind", "alpha", "split", "q", "grid",
                  "pool", "norm_eps", "device", "batch", "precision")


class Encoder:
    """Dense Coates encoder: learned whitening + centroids in, pooled features out."""

    def __init__(self, centroids, whiten_mean, whiten_matrix, *, rf=6, stride=1, kind="triangle", alpha=0.5,
                 split=False, q=0.25, grid=2, pool="sum", norm_eps=10.0, device="auto", batch=None, precision="fp32"):
        self.centroids = centroids
        self.whiten_mean = whiten_mean
        self.whiten_matrix = whiten_matrix
        self.rf = rf
        self.stride = stride
        self.kind = kind
        self.alpha = alpha
        self.split = split
        self.q = q
        self.grid = grid
        self.pool = pool
        self.norm_eps = norm_eps
        self.device = device
        self.batch = batch
        self.precision = precision
        self._validate()
        self.device_ = _resolve_device(device)
        self._prepare()

    def __getstate__(self) -> dict:
        """The constructor's parameters only: the device tensors (oneDNN-packed weights cannot be pickled, CUDA
        tensors cannot be loaded without a GPU) are rebuilt by __setstate__ on the loading machine."""
        return {name: getattr(self, name) for name in ENCODER_PARAMS}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update({"precision": "fp32", **state})  # pickled before encode.precision existed
        try:
            self.device_ = _resolve_device(self.device)
        except KmfeatError:
            warnings.warn(f"kmfeat.encode: this encoder was made for device {self.device!r}, which is not available "
                          f"here; using the CPU", stacklevel=2)
            self.device_ = "cpu"
        self._prepare()

    def _validate(self):
        if self.kind not in KINDS:
            raise KmfeatError(f"encode.kind: expected one of {', '.join(KINDS)}, got {self.kind!r}")
        _positive_int("patches.rf", self.rf)
        _positive_int("encode.stride", self.stride)
        grids = levels(self.grid)
        for g in grids:
            _positive_int("pool.grid", g)
        if not grids or len(set(grids)) != len(grids):
            raise KmfeatError(f"pool.grid: expected a grid size or a list of distinct sizes, got {self.grid!r}")
        if self.pool not in POOL_KINDS:
            raise KmfeatError(f"pool.kind: expected one of {', '.join(POOL_KINDS)}, got {self.pool!r}")
        if self.split and self.kind not in ("soft", "knn"):
            raise KmfeatError(f"encode.split: only the soft and knn codes have a sign split, not {self.kind!r}")
        if self.batch is not None:
            _positive_int("encode.batch", self.batch)
        if not np.isfinite(self.alpha) or self.alpha < 0:
            raise KmfeatError(f"encode.alpha: expected a number >= 0, got {self.alpha!r}")
        if not np.isfinite(self.norm_eps) or self.norm_eps <= 0:
            raise KmfeatError(f"patches.norm_eps: expected a number > 0 (Coates uses 10), got {self.norm_eps!r}")
        c = _check_finite("kmeans", self.centroids)
        if c.ndim != 2 or c.shape[0] < 1:
            raise KmfeatError(f"kmeans: centroids must be a 2-d array (k, d), got shape {c.shape}")
        d = c.shape[1]
        _check_finite("whiten", self.whiten_mean, (d,))
        _check_finite("whiten", self.whiten_matrix, (d, d))
        if d % (self.rf * self.rf):
            raise KmfeatError(f"patches.rf: centroids have dimension {d}, not a multiple of rf*rf = {self.rf ** 2}")
        if self.kind == "soft" and (np.linalg.norm(c, axis=1) == 0).any():
            raise KmfeatError("kmeans: a centroid is all zeros, so soft encoding cannot normalize it")
        if self.kind == "knn":
            q = self.q
            if isinstance(q, bool) or not (0 < q < 1 or (q >= 1 and q == int(q) and q <= c.shape[0])):
                raise KmfeatError(f"encode.q: expected a fraction in (0, 1) or a whole count in 1..k={c.shape[0]}, "
                                  f"got {q!r}")

    def _prepare(self):
        """Device-side affine maps, folded so that one product of the raw patches gives every code.

        With x a patch's pixels - 128, mu and sigma its mean and contrast, the normalized patch is
        (x - mu) / sigma, the whitened z = W (x - mu) / sigma + w0, and a code needs e = bias + weight.z =
        b + A.(x - mu) / sigma with A = weight W and b = bias + weight.w0. A's rows are centred (A.1 = 0,
        which changes nothing for x - mu), so A.(x - mu) = A.x: the product reads the raw integer patches
        (exact in float32 and in bfloat16) and skips the normalizing and whitening passes; 1/sigma is a
        per-patch scale after it. What rounding A leaves of its row sums is taken off through an extra column
        (_with_sum_column)."""
        dev = self.device_
        c = np.asarray(self.centroids, dtype=np.float64)
        W = np.asarray(self.whiten_matrix, dtype=np.float64)
        self.k_, self.d_ = c.shape
        if self.kind == "soft":
            weight, bias = c / np.linalg.norm(c, axis=1, keepdims=True), np.full(self.k_, -float(self.alpha))
        else:
            weight, bias = -2 * c, (c * c).sum(1)
        self.halves_ = 2 if self.split else 1
        if self.split and self.kind == "knn":  # distances of -z: ||c||^2 + 2 z.c (soft splits after one product)
            weight, bias = np.concatenate([weight, -weight]), np.concatenate([bias, bias])
        self.q_ = max(1, min(self.k_, round(self.q * self.k_))) if self.q < 1 else int(self.q)
        self.levels_, self.fine_ = levels(self.grid), finest(self.grid)
        as_tensor = functools.partial(torch.tensor, dtype=torch.float32, device=dev)
        w0 = -(np.asarray(self.whiten_mean, np.float64) @ W.T)
        self.precision_ = encode_precision(self.precision, dev)
        A = weight @ W
        A -= A.mean(1, keepdims=True)
        self.product_ = _raw_product(A, self.precision_, dev)
        if self.precision_ == "bf16" and not self.product_.ok:
            raise KmfeatError(f"encode.precision = bf16: on {dev} a bfloat16 product of these centroids disagrees "
                              f"with float64 beyond {BF16_RTOL:g}; use encode.precision = \"fp32\"")
        self.code_bias_ = as_tensor(bias + weight @ w0)
        if self.kind == "triangle":  # ||z||^2, from z = W.(x - mu) / sigma + w0 computed the same way
            self.whiten_ = _raw_product(W - W.mean(1, keepdims=True), "fp32", dev)
            self.whiten_bias_ = as_tensor(w0)
        self.compile_ = compile_mode() != "off" and self.kind in ("triangle", "soft")
        self.compiled_once_ = False
        self.work_seen_ = 0

    @property
    def n_codes(self) -> int:
        """Codes per position: k, or 2k with the sign split."""
        return self.halves_ * self.k_

    @property
    def n_features(self) -> int:
        return n_cells(self.grid) * self.n_codes

    def transform(self, images, flip: bool = False) -> np.ndarray:
        """Pooled features (N, n_features) float32; flip=True encodes the mirrors images[:, :, ::-1]."""
        batches = self.iter_transform(images, flip=flip)
        out = np.empty((len(images), self.n_features), dtype=np.float32)
        for start, stop, feats in batches:
            out[start:stop] = feats
        return out

    def work(self, shape) -> int:
        """(image, position, centroid) triples of encoding images of `shape` (N, H, W, C): what the compile
        policy weighs."""
        n, H, W = shape[0], shape[1], shape[2]
        return n * ((H - self.rf) // self.stride + 1) * ((W - self.rf) // self.stride + 1) * self.k_

    def will_compile(self, work: float) -> bool:
        """The compile decision for a job of `work` triples: KMFEAT_COMPILE=1 always, unset (auto) from
        COMPILE_MIN_WORK on CPU and never on CUDA (eager does that work in well under a second there, less than
        a cold Triton compile; off until a GPU measurement says otherwise), =0 or a kind without a fused kernel
        never. A stage takes it once from its total planned work (and records it), so that a resumed run
        encodes every shard as the first run did."""
        mode = compile_mode()
        return self.compile_ and (mode == "on" or (self.device_ == "cpu" and work >= COMPILE_MIN_WORK))

    def iter_transform(self, images, flip: bool = False, batch: int | None = None, compiled: bool | None = None):
        """Yields (start, stop, features float32 numpy (stop-start, F)) over batches of images, so callers can
        stream to a np.memmap / .npy on disk and memory does not grow with N. `images` may be a read-only
        np.memmap (uint8). `compiled` fixes the kernel (a stage's recorded decision); None decides per call,
        compiling once this encoder has seen COMPILE_MIN_WORK triples in all (library use)."""
        geom = self._geometry(images)
        if batch is not None:
            _positive_int("encode.batch", batch)
        batch = batch or self.batch or self._auto_batch(geom)
        geom["rows"] = min(geom["rows"], batch * geom["ny"])
        self.work_seen_ += len(images) * geom["ny"] * geom["nx"] * self.k_
        if compiled is None:
            compiled = self.compiled_once_ or self.will_compile(self.work_seen_)
        geom["compiled"] = self.compile_ and compiled
        return self._batches(images, flip, batch, geom)

    def _batches(self, images, flip, batch, geom):
        """Encodes batch after batch with one patch matrix (the workspace): a fresh one per batch (35 MB in
        float32 for 111 CIFAR images, past malloc's mmap threshold) is page-faulted in every time, which took
        7x as long as the copy that fills it (BENCHMARKS.md)."""
        workspace = {}
        for start in range(0, len(images), batch):
            x = images[start:start + batch]
            x = np.array(x[:, :, ::-1] if flip else x, order="C")
            yield start, start + len(x), self._encode_batch(x, geom, workspace)

    def _geometry(self, images) -> dict:
        """Check the images against the encoder; sizes of the response map and of the blocks."""
        if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4:
            what = f"{images.dtype} array of shape {images.shape}" if isinstance(images, np.ndarray) \
                else type(images).__name__
            raise KmfeatError(f"encode: images must be a uint8 numpy array (N, H, W, C), got {what}")
        _, H, W, C = images.shape
        rf, s, g = self.rf, self.stride, self.fine_
        if rf > min(H, W):
            raise KmfeatError(f"patches.rf: receptive field {rf} is larger than the {H}x{W} images")
        if rf * rf * C != self.d_:
            raise KmfeatError(f"patches.rf: centroids have dimension {self.d_}, but rf={rf} on {C}-channel "
                              f"images gives {rf * rf * C}; use the rf and images the centroids were learned on")
        ny, nx = (H - rf) // s + 1, (W - rf) // s + 1
        if g > min(ny, nx):
            what = f"{g}x{g} cells" if self.levels_ == [g] else f"the pyramid {self.grid} needs {g}x{g} cells, which"
            raise KmfeatError(f"pool.grid: {what} do not fit the {ny}x{nx} response map "
                              f"({H}x{W} images, rf {rf}, stride {s})")
        rows = max(1, BLOCK_ELEMENTS[self.device_] // (nx * len(self.code_bias_)))
        if rows >= ny:
            rows -= rows % ny
        counts = np.outer(np.diff(pool_bounds(ny, g)), np.diff(pool_bounds(nx, g)))
        return dict(H=H, W=W, C=C, ny=ny, nx=nx, rows=rows, cuts=tuple(pool_bounds(nx, g)), counts=counts,
                    cell_y=torch.as_tensor(cell_index(ny, g), device=self.device_),
                    cell_x=torch.as_tensor(cell_index(nx, g), device=self.device_))

    def _auto_batch(self, geom) -> int:
        """Images per batch so that the per-batch working set stays within BATCH_BYTES and free memory."""
        if self.device_ == "cuda":
            free = torch.cuda.mem_get_info()[0]
        else:
            free = psutil.virtual_memory().available
        per_image = 4 * (geom["ny"] * geom["nx"] * (3 * self.d_ + 2) + geom["H"] * geom["W"] * geom["C"]
                         + 2 * self.fine_ ** 2 * self.n_codes)
        # per block: the code map e (rows x nx x codes) and its per-cell sums (rows x fine x codes); the block's
        # patches and z are views of the batch's, counted in per_image
        fixed = 4 * geom["rows"] * self.n_codes * (geom["nx"] + self.fine_)
        batch = max(1, (min(BATCH_BYTES[self.device_], free // 4) - fixed) // per_image)
        per_block = geom["rows"] // geom["ny"]
        return batch // per_block * per_block if batch > per_block > 0 else batch

    def _precision(self):
        """On CUDA, fp32 matmuls in full precision unless ALLOW_TF32; restored afterwards."""
        return full_fp32(self.device_, ALLOW_TF32)

    def _patches(self, images, geom, padded_rows, workspace):
        """The raw patches x = pixels - 128 of uint8 images (B, H, W, C) with their pixel sums appended,
        (padded_rows * nx, d + 1) in the product's dtype (in workspace["patches"], grown as needed); 1/sigma of
        each, (padded_rows, nx) float32; and ||z||^2 (padded_rows, nx) for triangle codes, else None.

        mu and sigma = sqrt(var + norm_eps) come from window sums of the pixels and of their squares, in
        float64 (exact: they are integers). Padding rows hold zero patches with a zero scale: finite values
        that the caller routes to a spare slot.
        """
        B, H, W, C = images.shape
        ny, nx, rf, s, d = geom["ny"], geom["nx"], self.rf, self.stride, self.d_
        x = images.float().sub_(128)
        p = workspace.get("patches")
        if p is None or len(p) < padded_rows * nx:
            p = workspace["patches"] = torch.empty(padded_rows * nx, d + 1, device=x.device,
                                                   dtype=self.product_.weight.dtype)
        p = p[:padded_rows * nx]
        n = B * ny * nx
        p[:n, :d].view(B, ny, nx, rf, rf, C).copy_(
            x.to(p.dtype).as_strided((B, ny, nx, rf, rf, C), (H * W * C, s * W * C, s * C, W * C, C, 1)))
        p[n:].zero_()
        x64 = x.double().view(B, 1, H, W * C)
        s1 = _window_sums(x64, rf, C, s).view(n)
        s2 = _window_sums(x64.square(), rf, C, s).view(n)
        p[:n, d] = s1
        inv_s = torch.zeros(padded_rows * nx, device=x.device)
        inv_s[:n] = ((d * s2 - s1 * s1) / (d * d) + self.norm_eps).rsqrt_()
        inv_s = inv_s.view(padded_rows, nx)
        zz = None
        if self.kind == "triangle":
            z = _affine_(self.whiten_(p.float()).view(padded_rows, nx, d), inv_s, self.whiten_bias_)
            zz = torch.linalg.vector_norm(z, dim=-1).square_()
        return p, inv_s, zz

    def _cells(self, pb, inv_s, zz, geom, out, ones):
        """Per-row, per-column-cell code sums or maxima (L, R, K) of one block of raw patches pb (R*nx, d + 1):
        the product A.x from one matmul, then the scaling, the code and the sums, in the fused kernel (compiled)
        or in in-place passes (eager)."""
        global _compile_broken
        cuts, reduce = geom["cuts"], "max" if self.pool == "max" else "sum"
        e = self.product_(pb).view(*inv_s.shape, -1)
        affine = (inv_s, self.code_bias_)
        soft_split = self.kind == "soft" and self.split
        if geom["compiled"] and self.compile_:
            fn, extra = ((_triangle_cells, (zz,)) if self.kind == "triangle" else
                         (_soft_split_cells, (2.0 * self.alpha,)) if soft_split else (_soft_cells, ()))
            fresh, t0 = (fn, self.device_) not in _compiled, time.perf_counter()
            if fresh:
                say("encode: compiling the fused encoder kernel, once per process (about 10-30 s the first time, "
                    "a few s from the inductor cache) ...")
            try:
                cells = _compiled_fn(fn, self.device_)(e, *affine, *extra, cuts, reduce)
                self.compiled_once_ = True
                if fresh:
                    say(f"encode: compiled in {time.perf_counter() - t0:.1f} s")
                return cells
            except torch.OutOfMemoryError:
                raise  # not a compiler failure: eager would run out of memory too
            except Exception as exc:
                warnings.warn(f"kmfeat.encode: torch.compile failed, using the eager encoder ({exc})", stacklevel=2)
                _compile_broken = True
                self.compile_ = False
        e = _affine_(e, *affine)
        if self.kind == "triangle":
            return _triangle_cells_(e, zz, cuts, reduce, out)
        if soft_split:
            return _soft_split_cells_(e, 2.0 * self.alpha, cuts, reduce, out)
        if self.kind == "soft":
            return _soft_cells_(e, cuts, reduce, out)
        if self.kind == "knn":
            return _knn_cells_(e, self.q_, self.halves_, cuts, reduce, out)
        return _hard_cells_(e, geom["cell_x"], ones, reduce, out)

    @torch.no_grad()
    def _encode_batch(self, images: np.ndarray, geom, workspace) -> np.ndarray:
        """Pooled features of one batch of uint8 images, computed block by block on the device.

        Compiled blocks always have geom["rows"] rows (the last one zero-padded) so the kernel
        compiles once; eager blocks shrink to the batch. Rows of padding go to a spare slot of acc.
        """
        B, dev, g, k = len(images), self.device_, self.fine_, self.n_codes
        ny, nx = geom["ny"], geom["nx"]
        n_rows = B * ny
        R = geom["rows"] if geom["compiled"] else min(geom["rows"], n_rows)
        padded = -(-n_rows // R) * R
        with self._precision():
            p, inv_s, zz = self._patches(torch.from_numpy(images).to(dev), geom, padded, workspace)
            slot = torch.full((padded,), B * g, dtype=torch.long, device=dev)
            slot[:n_rows] = (torch.arange(B, device=dev).unsqueeze(1) * g + geom["cell_y"]).view(-1)
            acc = torch.zeros(g, B * g + 1, k, device=dev)
            out = torch.empty(g, R, k, device=dev)
            ones = torch.ones(R * nx, device=dev)
            for r in range(0, padded, R):
                cells = self._cells(p[r * nx:(r + R) * nx], inv_s[r:r + R], None if zz is None else zz[r:r + R],
                                    geom, out, ones)
                if self.pool == "max":  # codes are >= 0, so the zero start is neutral
                    acc.index_reduce_(1, slot[r:r + R], cells, "amax")
                else:
                    with deterministic_sums(acc):  # no CUDA atomics: the same bytes every run
                        acc.index_add_(1, slot[r:r + R], cells)
            fine = acc[:, :B * g].view(g, B, g, k).permute(1, 2, 0, 3)
            if self.levels_ == [g] and self.pool == "sum":
                return fine.reshape(B, g * g * k).cpu().numpy()
            return pyramid(fine.cpu().numpy(), self.grid, self.pool, geom["counts"])
