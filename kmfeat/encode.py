"""Dense Coates encoder: every window of every image -> normalize -> whiten -> code -> grid/pyramid pool.

Codes (K per position): triangle, hard, soft max(0, c_hat.z - alpha) and knn (1 for the q nearest
centroids, Thiry et al. 2021); split=True gives soft and knn codes for both signs of the patch
(K = 2k: first the k codes of z, then the k codes of -z, i.e. max(0, -c_hat.z - alpha)).

Two costs dominate: the dot products z.c (one (positions x d) @ (d x k) matmul, done on CPU by
oneDNN's AVX-512 kernel through kmfeat.linear) and the images x positions x k distance map after
it, where every elementwise pass costs memory bandwidth. So the whitened patches z of a batch of
images are built at once, then the matmul runs one cache-sized block of response-map rows at a
time and everything after it (distance, code, per-cell sums) runs on that block while it is still
in cache: as one fused torch.compile kernel for big jobs, or as in-place eager passes.
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
"""Target size (positions x k floats) of one block of the distance map: cache-sized on CPU."""
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


def _triangle_cells(e, zz, cuts, reduce):
    """Triangle codes from e = ||c||^2 - 2 z.c and zz = ||z||^2, written as one fusable expression."""
    d = (e + zz.unsqueeze(-1)).clamp_min(0).sqrt()
    return _reduce_cols((d.mean(-1, keepdim=True) - d).clamp_min(0), cuts, reduce)


def _soft_cells(e, cuts, reduce):
    """Soft-threshold codes from e = c_hat.z - alpha, as one fusable expression."""
    return _reduce_cols(e.clamp_min(0), cuts, reduce)


def _soft_split_cells(e, two_alpha, cuts, reduce):
    """Both signs from one product e = c_hat.z - alpha: max(0, e), and
    max(0, -c_hat.z - alpha) = max(0, -e - 2 alpha)."""
    return _reduce_cols(torch.cat([e, e.neg() - two_alpha], -1).clamp_min(0), cuts, reduce)


def _triangle_cells_bf16(p, bias, zz, cuts, reduce):
    """_triangle_cells of the bfloat16 product p = -2 z.c: widened to float32 and biased inside the kernel."""
    return _triangle_cells(p.float() + bias, zz, cuts, reduce)


def _soft_cells_bf16(p, bias, cuts, reduce):
    return _soft_cells(p.float() + bias, cuts, reduce)


def _soft_split_cells_bf16(p, bias, two_alpha, cuts, reduce):
    return _soft_split_cells(p.float() + bias, two_alpha, cuts, reduce)


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
    both = torch.cat([e, torch.neg(e).sub_(two_alpha)], -1)
    return _cell_reduce_(both.clamp_min_(0), cuts, reduce, out)


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
        """Device-side affine maps: whitening z = W p + (-W m), and e = bias + scale * c.z for the code."""
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
        self.whiten_ = Linear(as_tensor(W), as_tensor(-(np.asarray(self.whiten_mean, np.float64) @ W.T)))
        self.code_ = Linear(as_tensor(weight), as_tensor(bias))
        self.precision_ = encode_precision(self.precision, dev)
        self.product_ = ProductBF16(as_tensor(weight)) if self.precision_ == "bf16" else None
        if self.product_ is not None and not self.product_.ok:
            raise KmfeatError(f"encode.precision = bf16: on {dev} a bfloat16 product of these centroids disagrees "
                              f"with float64 beyond {BF16_RTOL:g}; use encode.precision = \"fp32\"")
        self.code_bias_ = as_tensor(bias)
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
        for start in range(0, len(images), batch):
            x = images[start:start + batch]
            x = np.array(x[:, :, ::-1] if flip else x, order="C")
            yield start, start + len(x), self._encode_batch(x, geom)

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
        rows = max(1, BLOCK_ELEMENTS[self.device_] // (nx * self.n_codes))
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

    def _whitened(self, x, geom, padded_rows):
        """z (padded_rows, nx, d) and ||z||^2 (padded_rows, nx) of float images x (B, H, W, C).

        Padding rows hold all-zero patches: finite values that the caller routes to a spare slot.
        """
        B, H, W, C = x.shape
        ny, nx, rf, s, d = geom["ny"], geom["nx"], self.rf, self.stride, self.d_
        p = torch.empty(padded_rows * nx, d, device=x.device)
        n = B * ny * nx
        p[:n].view(B, ny, nx, rf, rf, C).copy_(
            x.as_strided((B, ny, nx, rf, rf, C), (H * W * C, s * W * C, s * C, W * C, C, 1)))
        p[n:].zero_()
        p -= p.mean(1, keepdim=True)
        p /= torch.linalg.vector_norm(p, dim=1, keepdim=True).square_().div_(d).add_(self.norm_eps).sqrt_()
        z = self.whiten_(p)
        zz = torch.linalg.vector_norm(z, dim=1).square_()
        return z.view(padded_rows, nx, d), zz.view(padded_rows, nx)

    def _cells(self, zb, zz, geom, out, ones):
        """Per-row, per-column-cell code sums or maxima (L, R, K) of one block of whitened patches zb (R*nx, d):
        e = bias + scale * z.c from one matmul, then the fused kernel (compiled) or in-place passes (eager)."""
        global _compile_broken
        cuts, reduce = geom["cuts"], "max" if self.pool == "max" else "sum"
        bf16 = self.product_ is not None
        e = (self.product_ if bf16 else self.code_)(zb).view(zz.shape[0], zz.shape[1], -1)
        soft_split = self.kind == "soft" and self.split
        if geom["compiled"] and self.compile_:
            if bf16:  # the float32 widening and the bias are fused into the kernel
                b = self.code_bias_
                fn, args = ((_triangle_cells_bf16, (e, b, zz)) if self.kind == "triangle" else
                            (_soft_split_cells_bf16, (e, b, 2.0 * self.alpha)) if soft_split else
                            (_soft_cells_bf16, (e, b)))
            else:
                fn, args = ((_triangle_cells, (e, zz)) if self.kind == "triangle" else
                            (_soft_split_cells, (e, 2.0 * self.alpha)) if soft_split else (_soft_cells, (e,)))
            fresh, t0 = (fn, self.device_) not in _compiled, time.perf_counter()
            if fresh:
                say("encode: compiling the fused encoder kernel, once per process (about 10-30 s the first time, "
                    "a few s from the inductor cache) ...")
            try:
                cells = _compiled_fn(fn, self.device_)(*args, cuts, reduce)
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
        if bf16:
            e = e.float().add_(self.code_bias_)
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
    def _encode_batch(self, images: np.ndarray, geom) -> np.ndarray:
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
            x = torch.from_numpy(images).to(dev).float()
            z, zz = self._whitened(x, geom, padded)
            slot = torch.full((padded,), B * g, dtype=torch.long, device=dev)
            slot[:n_rows] = (torch.arange(B, device=dev).unsqueeze(1) * g + geom["cell_y"]).view(-1)
            acc = torch.zeros(g, B * g + 1, k, device=dev)
            out = torch.empty(g, R, k, device=dev)
            ones = torch.ones(R * nx, device=dev)
            for r in range(0, padded, R):
                cells = self._cells(z[r:r + R].view(R * nx, -1), zz[r:r + R], geom, out, ones)
                if self.pool == "max":  # codes are >= 0, so the zero start is neutral
                    acc.index_reduce_(1, slot[r:r + R], cells, "amax")
                else:
                    with deterministic_sums(acc):  # no CUDA atomics: the same bytes every run
                        acc.index_add_(1, slot[r:r + R], cells)
            fine = acc[:, :B * g].view(g, B, g, k).permute(1, 2, 0, 3)
            if self.levels_ == [g] and self.pool == "sum":
                return fine.reshape(B, g * g * k).cpu().numpy()
            return pyramid(fine.cpu().numpy(), self.grid, self.pool, geom["counts"])
