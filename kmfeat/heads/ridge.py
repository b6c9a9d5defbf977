"""One-vs-rest ridge regression head (least squares on +-1 targets) in closed form; alpha chosen on the val split.

All classes and all alphas share one pass over the feature matrix: the Gram matrix Z^T Z and Z^T Y of the
standardized, centered features Z are accumulated chunk by chunk (each chunk's product in float32 by default,
summed into float64), then every alpha is a d x d solve. No iterations, so no tolerance to tune.
"""
import contextlib
import math
import time
import warnings
from numbers import Real

import numpy as np
import torch
from scipy.linalg import blas, cho_factor, cho_solve, eigh
from sklearn.base import BaseEstimator, ClassifierMixin

from kmfeat.errors import KmfeatError
from kmfeat.heads.common import (LinearScores, Standardizer, check_fit_data, grid_edge_note, load_torch_blob,
                                 row_chunks, signed_power)
from kmfeat.progress import bar, say
from kmfeat.rows import Rows

GRAM_DTYPES = {"float32": np.float32, "float64": np.float64}
SOLVERS = ("auto", "eigh", "cholesky")
# Default grid: these multiples of trace(Zc^T Zc) / n, the mean squared norm of a standardized row (about the
# number of features), half a decade apart. Ridge with alpha = 1 / (2 C) has the L2-SVM's penalty-to-loss ratio:
# the svm head's best C = 0.004 on 6,400 Coates features with mirrors is alpha ~ 0.02 trace / n, mid-grid.
RELATIVE_ALPHAS = (3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3)
# One float64 eigendecomposition (scipy's evr, the fastest of numpy, scipy evd/evr and torch here) cost as much as
# 16 to 28 Cholesky factorizations of the same matrix (d = 3,200 and 6,400, 2 AMD Zen 4 cores): "auto" uses eigh
# only for grids at least this long.
EIGH_COST_IN_CHOLESKYS = 20
# A float32 Cholesky solve is refined at most this many times against float64 residuals (stopping when a step no
# longer halves the residual), and accepted when the residual is this small relative to Z^T Y (else solved again
# in float64).
REFINE_STEPS = 12
REFINED_RTOL = 1e-9


def _copy_into(dst: np.ndarray, src) -> np.ndarray:
    """dst[...] = src, converting the dtype; float arrays go through torch (threaded and vectorized: numpy's
    float16 -> float32 cast is about 20x slower, ~1 s per 8192 x 12,800 chunk on one Zen 4 core)."""
    src = np.asarray(src)
    if src.dtype in (np.float16, np.float32, np.float64) and src.shape == dst.shape:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            torch.from_numpy(dst).copy_(torch.from_numpy(np.ascontiguousarray(src)))
    else:
        dst[...] = src
    return dst


def _is_real(v) -> bool:
    return isinstance(v, Real) and not isinstance(v, bool) and math.isfinite(v)


def _alpha_values(alpha) -> list[float] | None:
    """head.grid.alpha as a sorted list of distinct positive numbers; None (the default grid) stays None."""
    if alpha is None:
        return None
    values = list(alpha) if isinstance(alpha, (list, tuple)) else [alpha]
    if not values or not all(_is_real(a) and a > 0 for a in values):
        raise KmfeatError(f"head.grid.alpha: expected a number > 0 or a non-empty list of numbers > 0, got {alpha!r}")
    return sorted({float(a) for a in values})


class RidgeHead(LinearScores, ClassifierMixin, BaseEstimator):
    """One-vs-rest least squares with +-1 targets on standardized features, solved in closed form; alpha chosen
    on the validation split.

    Per class j (y_ij = +1 for class j, else -1): min ||y_j - Z w_j - b_j||^2 + alpha ||w_j||^2 with Z the
    standardized training features (a Standardizer(power) whose statistics come from the training rows, in the
    same pass as the Gram matrix), the intercept unregularized (as scikit-learn's Ridge(fit_intercept=True)):
    W = (Zc^T Zc + alpha I)^-1 Zc^T Yc on train-centered Zc, Yc and b = mean(Y) - mean(Z) W. The Gram matrix
    Zc^T Zc is accumulated over row chunks (a float16 memmap is read, never copied whole); each chunk's product
    runs in `gram_dtype` (float32: twice the float64 speed, rounding ~1e-7 relative per chunk), the sum in float64,
    and every solve in float64.

    alpha: one number or a list (the grid; the best val accuracy wins, ties: the larger alpha); None: the default
    grid, RELATIVE_ALPHAS times trace(Zc^T Zc) / n. solver: "eigh" (one eigendecomposition G = V diag(s) V^T, then
    W = V diag(1 / (s + alpha)) V^T Zc^T Yc for every alpha), "cholesky" (one factorization of G + alpha I per alpha)
    or "auto" (cholesky unless the grid has at least EIGH_COST_IN_CHOLESKYS alphas: on CPU an eigendecomposition
    costs many Cholesky factorizations). walk (cholesky with a val split): climb the grid from its middle instead
    of solving every alpha (see _fit_grid); grid_scores_ lists the alphas solved. coef_ and intercept_ act on
    standardized features: decision = standardizer_.transform(X) @ coef_.T + intercept_.
    """

    def __init__(self, alpha=None, gram_dtype="float32", solver="auto", chunk_rows=8192, power=1.0, walk=True):
        self.alpha = alpha
        self.walk = walk
        self.gram_dtype = gram_dtype
        self.solver = solver
        self.chunk_rows = chunk_rows
        self.power = power

    def _check_params(self) -> list[float] | None:
        values = _alpha_values(self.alpha)
        checks = [
            ("gram_dtype", self.gram_dtype in GRAM_DTYPES, "one of " + ", ".join(GRAM_DTYPES)),
            ("solver", self.solver in SOLVERS, "one of " + ", ".join(SOLVERS)),
            ("walk", isinstance(self.walk, bool), "true or false"),
            ("chunk_rows", isinstance(self.chunk_rows, int) and not isinstance(self.chunk_rows, bool)
             and self.chunk_rows >= 1, "an integer >= 1"),
        ]
        for name, ok, expected in checks:
            if not ok:
                raise KmfeatError(f"head.params.{name}: expected {expected}, got {getattr(self, name)!r}")
        return values

    def fit(self, X, y, X_val=None, y_val=None):
        """One pass over X: standardization statistics, Gram matrix and Z^T Y; then every alpha, the best on val.

        learned: standardizer_, coef_ (n_classes, d) float32, intercept_ (n_classes,) float32, classes_,
        best_params_ {"alpha"}, grid_scores_ (list of {params, val_acc, seconds}, by increasing alpha),
        alphas_ (the grid used), solver_ (the solver used), timings_ (seconds per step).
        """
        values = self._check_params()
        has_val = check_fit_data(X, y, X_val, y_val)
        if (values is None or len(values) > 1) and not has_val:
            raise KmfeatError("head.grid.alpha: choosing among several alpha values needs a validation split; "
                              "set head.val > 0 or give one alpha")
        if not (_is_real(self.power) and self.power > 0):
            raise KmfeatError(f"head.power: expected a number > 0 (1 = off), got {self.power!r}")
        y = np.asarray(y)
        self.classes_, y_idx = np.unique(y, return_inverse=True)
        if len(self.classes_) < 2:
            raise KmfeatError(f"train labels: need at least 2 classes, got only {self.classes_.tolist()!r}")
        n, d = X.shape
        self.n_features_in_ = d
        t0 = time.perf_counter()
        G, ZtY, z_mean, y_mean = self._gram(X, y_idx.astype(np.int64))
        self.timings_ = {"gram": time.perf_counter() - t0}
        if values is None:
            values = sorted({float(r * np.trace(G) / n) for r in RELATIVE_ALPHAS})
        self.alphas_ = values
        self.solver_ = self.solver if self.solver != "auto" else (
            "eigh" if len(values) >= EIGH_COST_IN_CHOLESKYS else "cholesky")
        t0 = time.perf_counter()
        Zv = self._standardized(X_val) if has_val else None
        self.timings_["val"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        self._fit_grid(G, ZtY, z_mean, y_mean, Zv, np.asarray(y_val) if has_val else None)
        self.timings_["solve"] = time.perf_counter() - t0
        return self

    def _standardized(self, X) -> np.ndarray:
        """X standardized, as a new C-contiguous array in gram_dtype (read chunk by chunk)."""
        if self.gram_dtype == "float32":
            return self.standardizer_.transform(X)
        self.standardizer_._check_width(X)
        Z = signed_power(np.array(X, dtype=np.float64), self.power)
        Z -= self.standardizer_.mean_
        Z /= self.standardizer_.scale_
        return Z

    def _chunk(self, X, a: int, b: int, buf: np.ndarray) -> np.ndarray:
        """Rows a:b of X, signed power applied, in an array this head may modify: read into buf[:b - a] (a
        kmfeat.rows.Rows view of buf's dtype: buf's pages are already mapped, a fresh 400 MB array costs ~0.6 s
        of page faults), the rows themselves when X handed out a new array of buf's dtype, else a copy."""
        if isinstance(X, Rows) and X.dtype == buf.dtype:
            return signed_power(X.take(np.arange(a, b), out=buf[: b - a]), self.power)  # no fresh pages to fault in
        Z = X[a:b]
        if not (type(Z) is np.ndarray and Z.base is None and Z.dtype == buf.dtype and Z.flags.c_contiguous):
            Z = _copy_into(buf[: b - a], Z)
        return signed_power(Z, self.power)

    def _gram(self, X, y_idx):
        """One chunked pass over X: fits standardizer_ and returns (Zc^T Zc, Zc^T Yc, mean of Z, mean of Y), float64,
        for Z = standardizer_.transform(X) and Zc, Yc centered on their train means. Only the upper triangle of
        the Gram matrix Zc^T Zc is filled.

        The chunks are shifted by the first chunk's column means (so float32 products lose nothing to a large
        mean) and multiplied in gram_dtype: a BLAS syrk per chunk, added into float64, with the column sums as an
        extra column of Z^T [Y, 1]. At the end the exact mean is taken out (Zc^T Zc = S^T S - n sbar sbar^T, no
        cancellation since sbar is small), the variance read off the diagonal, and rows and columns scaled by the
        Standardizer's float32 scale_, so the result is that of the float32 mean_ and scale_ predict() uses.
        """
        n, d = X.shape
        k = len(self.classes_)
        dtype = GRAM_DTYPES[self.gram_dtype]
        syrk = blas.ssyrk if dtype == np.float32 else blas.dsyrk
        G = np.zeros((d, d), np.float64, order="F")
        part = np.zeros((d, d), dtype, order="F")  # syrk writes only the upper triangle; the lower stays 0
        ZtY = np.zeros((d, k + 1), np.float64)
        Y = np.full((n, k + 1), -1.0, dtype)
        Y[np.arange(n), y_idx] = 1.0
        Y[:, k] = 1.0
        buf = np.empty((min(n, self.chunk_rows), d), dtype)
        shift = None
        chunks = bar(total=n, desc="ridge gram", unit="row")
        with chunks:
            for a, b in row_chunks(n, self.chunk_rows):
                S = self._chunk(X, a, b, buf)
                if shift is None:
                    shift = S.mean(axis=0, dtype=np.float64).astype(dtype)
                S -= shift
                part = syrk(1.0, S.T, trans=0, lower=0, beta=0.0, c=part, overwrite_c=1)  # S.T is Fortran: no copy
                G += part
                ZtY += S.T @ Y[a:b]
                chunks.update(b - a)
        del part, buf
        s_mean = ZtY[:, k] / n  # mean of the shifted rows
        y_mean = Y[:, :k].mean(axis=0, dtype=np.float64)
        ZtY = ZtY[:, :k] - n * np.outer(s_mean, y_mean)
        G -= n * np.outer(s_mean, s_mean)
        var = np.maximum(np.diagonal(G) / n, 0.0)
        mean = shift.astype(np.float64) + s_mean
        std = Standardizer(eps=0.01, power=self.power)
        std.mean_, std.var_ = mean.astype(np.float32), var.astype(np.float32)
        std.scale_ = np.sqrt(var + std.eps).astype(np.float32)
        std.n_features_in_ = d
        self.standardizer_ = std
        scale = std.scale_.astype(np.float64)
        G /= scale[:, None]
        G /= scale[None, :]
        ZtY /= scale[:, None]
        z_mean = (mean - std.mean_) / scale  # the mean of Z: float32 rounding of mean_, ~1e-8
        return G, ZtY, z_mean, y_mean

    def _fit_grid(self, G, ZtY, z_mean, y_mean, Zv, y_val) -> None:
        """Solve alphas and score each on val; keep the best (ties: the larger alpha).

        eigh scores every alpha (each is a cheap product once V is known). cholesky with `walk` climbs the grid
        from its middle to the better neighbour until neither neighbour is better (val accuracy against alpha has
        one peak in every run measured: 3 factorizations of 7 on the default features instead of 7); without
        `walk` it solves every alpha. An alpha too small for a positive definite G + alpha I (rounding against a
        nearly singular Gram matrix) is recorded with val_acc None and skipped while another alpha succeeds.
        """
        d = G.shape[0]
        if self.solver_ == "eigh":
            t0 = time.perf_counter()
            say(f"ridge: eigendecomposition of the {d} x {d} Gram matrix, shared by {len(self.alphas_)} alphas")
            s, V = eigh(G, lower=False, overwrite_a=True, check_finite=False, driver="evr")
            Q = V.T @ ZtY
            say(f"ridge: eigendecomposition done ({time.perf_counter() - t0:.1f}s)")
        tried: dict[int, tuple] = {}
        walk = self.walk and self.solver_ == "cholesky" and Zv is not None

        def solve(i: int) -> float:
            """Val accuracy of alpha i (-1 if it failed), solving it once."""
            if i not in tried:
                alpha, t0 = self.alphas_[i], time.perf_counter()
                score = {"params": {"alpha": alpha}, "val_acc": None, "seconds": 0.0}
                W = b = None
                try:
                    W = V @ (Q / (s + alpha)[:, None]) if self.solver_ == "eigh" else \
                        self._cholesky_solve(G, ZtY, alpha)
                except KmfeatError as exc:
                    if Zv is None:
                        raise
                    score["error"] = str(exc)
                if W is not None:
                    b = y_mean - z_mean @ W
                    if Zv is not None:
                        pred = (Zv @ W.astype(Zv.dtype) + b).argmax(axis=1)
                        score["val_acc"] = float(np.mean(self.classes_[pred] == y_val))
                score["seconds"] = time.perf_counter() - t0
                tried[i] = (score, W, b)
                steps.update(1)
                say(f"ridge alpha={alpha:.6g} val_acc={score['val_acc']} ({score['seconds']:.1f}s)")
            acc = tried[i][0]["val_acc"]
            return -1.0 if acc is None else acc

        n = len(self.alphas_)
        steps = bar(total=n, desc=f"ridge {self.solver_}", unit="alpha")
        with steps:
            if walk:
                i = n // 2
                while True:
                    near = [j for j in (i - 1, i, i + 1) if 0 <= j < n]
                    best = max(near, key=lambda j: (solve(j), j))
                    if best == i:
                        break
                    i = best
            else:
                for i in range(n):
                    solve(i)
        ok = [i for i in sorted(tried) if tried[i][1] is not None]
        if not ok:
            raise KmfeatError(f"head.grid.alpha: every alpha tried ({', '.join(f'{a:g}' for a in self.alphas_)}) "
                              "is too small for these features (G + alpha I not positive definite); use larger ones")
        self.grid_scores_ = [tried[i][0] for i in sorted(tried)]
        chosen = max(ok, key=lambda i: (solve(i), i))
        score, W, b = tried[chosen]
        alpha = score["params"]["alpha"]
        note = grid_edge_note("head.grid.alpha", self.alphas_, alpha) if Zv is not None else None
        if note:
            say(note)
        self.coef_ = np.ascontiguousarray(W.T, dtype=np.float32)
        self.intercept_ = b.astype(np.float32)
        self.best_params_ = dict(score["params"])

    def _cholesky_solve(self, G, ZtY, alpha: float) -> np.ndarray:
        """(G + alpha I)^-1 ZtY, float64, from a Cholesky factorization of a copy of G (upper triangle read).

        With gram_dtype float32 the factorization runs in float32 (half the float64 time) and REFINE_STEPS steps
        (at most) of iterative refinement against float64 residuals bring the solution to float64 accuracy; where they
        do not (an ill-conditioned G + alpha I), it is solved again in float64.
        """
        factor = None
        if self.gram_dtype == "float32":
            with contextlib.suppress(KmfeatError):  # not positive definite in float32: float64 may still be
                factor = self._factor(G, alpha, np.float32)
        if factor is not None:
            W, residual, target = np.zeros_like(ZtY), ZtY, REFINED_RTOL * np.linalg.norm(ZtY)
            norm = np.inf
            for _ in range(REFINE_STEPS + 1):  # each step: one float64 symmetric product, ~0.1 s at d = 12,800
                W += cho_solve(factor, residual.astype(np.float32), check_finite=False)
                residual = ZtY - blas.dsymm(1.0, G, W, side=0, lower=0) - alpha * W
                norm, last = np.linalg.norm(residual), norm
                if norm <= target or norm > 0.5 * last:
                    break
            if norm <= target:
                return W
        if self.gram_dtype == "float32":
            say(f"ridge: float32 solve for alpha={alpha:g} did not refine to float64 accuracy; solving in float64")
        return cho_solve(self._factor(G, alpha, np.float64), ZtY, check_finite=False)

    @staticmethod
    def _factor(G, alpha: float, dtype):
        A = np.array(G, dtype=dtype, order="F")
        A.flat[:: A.shape[0] + 1] += alpha
        try:
            return cho_factor(A, lower=False, overwrite_a=True, check_finite=False)
        except np.linalg.LinAlgError:
            raise KmfeatError(f"head.grid.alpha: alpha={alpha:g} is too small for these features "
                              "(the regularized Gram matrix is not positive definite); use a larger alpha") from None

    def save(self, path) -> None:
        """torch.save of params, weights, standardizer arrays, classes and the grid scores (no pickled code)."""
        torch.save({
            "format": "kmfeat.RidgeHead/1",
            **self._linear_state(),
            "alphas": list(self.alphas_),
            "solver": self.solver_,
            "timings": dict(self.timings_),
        }, path)

    @classmethod
    def load(cls, path) -> "RidgeHead":
        """Rebuild a fitted RidgeHead written by save() (weights only: no pickled code is run)."""
        blob = load_torch_blob(path, "kmfeat.RidgeHead/1")
        head = cls._from_linear_state(blob)
        head.alphas_, head.solver_, head.timings_ = blob["alphas"], blob["solver"], blob["timings"]
        return head
