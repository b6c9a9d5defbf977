"""One-vs-rest linear L2-SVM (squared hinge) head in torch: full-batch L-BFGS, C chosen on the val split.

Coates, Lee & Ng (2011) classify pooled features with a linear L2-SVM. scikit-learn's LinearSVC needs about half
an hour per C on CIFAR-10-sized features on 2 cores; here all classes are one smooth problem solved by L-BFGS,
whose every objective/gradient evaluation is two skinny matmuls over the standardized feature matrix.
"""
import math
import time
from collections import deque
from numbers import Integral, Real

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin

from kmfeat.errors import KmfeatError
from kmfeat.heads.common import (LinearScores, Standardizer, check_fit_data, chunk_rows, grid_edge_note,
                                 load_torch_blob, row_chunks)
from kmfeat.heads.mlp import resolve_device
from kmfeat.precision import full_fp32
from kmfeat.progress import bar, say

DTYPES = {"float32": torch.float32, "float64": torch.float64}
MAX_LINE_SEARCH = 25
HISTORY = 30
WINDOW = 5


def agrees_with_float64(op) -> bool:
    """Whether op(A, B, None, ...) gives A @ B.T to float32 accuracy, for B contiguous and for B a transposed view.

    Guards against a reduced-precision oneDNN mode (bf16, tf32) being picked up silently.
    """
    gen = torch.Generator().manual_seed(0)
    a, w, m = (torch.randn(shape, generator=gen) for shape in ((37, 23), (5, 23), (23, 5)))
    try:
        for weight in (w, m.T):
            got = op(a, weight, None, "none", [], "").double()
            want = a.double() @ weight.double().T
            scale = float((a.double().abs() @ weight.double().abs().T).max())
            if got.shape != want.shape or float((got - want).abs().max()) > 1e-5 * scale:
                return False
    except (RuntimeError, TypeError, ValueError):
        return False
    return True


def onednn_linear():
    """torch's oneDNN float32 linear, op(A, B, bias, "none", [], "") = A @ B.T + bias, or None where unusable.

    On CPU it is several times faster than the MKL GEMM that addmm uses for these skinny (n x d) @ (d x classes)
    products (0.07 s vs 0.25 s forward, 0.13 s vs 0.24 s backward for 45,000 x 6,400 x 10 on 2 AMD Zen cores),
    and it takes the transposed view X.T as B without copying. It is a private op (the one inductor uses), so it is
    used only when present and checked against a float64 product first.
    """
    try:
        op = torch.ops.mkldnn._linear_pointwise
    except (AttributeError, RuntimeError):
        return None
    return op if torch.backends.mkldnn.is_available() and agrees_with_float64(op) else None


class Products:
    """The two matmuls over the standardized matrix X (n, d): scores X @ W.T + b and gradient G.T @ X."""

    def __init__(self, X: torch.Tensor):
        self.X = X
        self.linear = onednn_linear() if X.device.type == "cpu" and X.dtype == torch.float32 else None

    def scores(self, W: torch.Tensor, b: torch.Tensor, X: torch.Tensor | None = None) -> torch.Tensor:
        """(n, k) = X @ W.T + b, for W (k, d) and b (k,); X defaults to the training matrix."""
        X = self.X if X is None else X
        if self.linear is not None:
            return self.linear(X, W, b, "none", [], "")
        return torch.addmm(b, X, W.T)

    def back(self, Gt: torch.Tensor) -> torch.Tensor:
        """(k, d) = Gt @ X, for Gt (k, n) contiguous."""
        if self.linear is not None:
            return self.linear(Gt, self.X.T, None, "none", [], "")
        return torch.mm(Gt, self.X)


class SquaredHingeObjective:
    """sum_j [0.5 ||w_j||^2 + C sum_i max(0, 1 - y_ij (w_j . x_i + b_j))^2] and its gradient, as an L-BFGS closure.

    W is (k, d), b is (k,), Y is (n, k) with entries +-1. Writes the gradient into W.grad and b.grad. Each new
    point costs two matmuls over X and O(n k) elementwise work. Evaluations are remembered by their exact
    parameter values, so re-asking for a point the line search already visited (torch's LBFGS does so at the
    start of every step) costs nothing.
    """

    def __init__(self, products: Products, Y: torch.Tensor, W: torch.Tensor, b: torch.Tensor, C: float):
        self.products, self.Y, self.W, self.b, self.C = products, Y, W, b, C
        self.seen = deque(maxlen=MAX_LINE_SEARCH + 2)
        self.n_evals = 0

    def _lookup(self):
        """The remembered evaluation at the current point, newest first (the line search re-asks the latest;
        each torch.equal on CUDA is a host sync, so the usual hit costs one)."""
        for W, b, loss, gW, gb in reversed(self.seen):
            if torch.equal(W, self.W) and torch.equal(b, self.b):
                return loss, gW, gb
        return None

    def evaluate(self) -> tuple[float, torch.Tensor, torch.Tensor]:
        """(objective, dW, db) at the current parameters."""
        hit = self._lookup()
        if hit is not None:
            return hit
        W, b = self.W, self.b
        slack = self.products.scores(W, b).mul_(self.Y).neg_().add_(1.0).clamp_(min=0.0)  # max(0, 1 - y s)
        loss = float(0.5 * W.pow(2).sum() + self.C * slack.pow(2).sum())
        G = slack.mul_(self.Y).mul_(-2.0 * self.C)  # d loss / d scores, (n, k)
        gW = self.products.back(G.T.contiguous()).add_(W)
        gb = G.sum(dim=0)
        self.n_evals += 1
        self.seen.append((W.clone(), b.clone(), loss, gW, gb))
        return loss, gW, gb

    def __call__(self) -> float:
        loss, gW, gb = self.evaluate()
        self.W.grad, self.b.grad = gW.clone(), gb.clone()
        return loss


def _is_real(v) -> bool:
    return isinstance(v, Real) and not isinstance(v, bool) and math.isfinite(v)


def _c_values(C) -> list[float]:
    """head.C as a sorted list of distinct positive numbers (one number or a non-empty list/tuple)."""
    values = list(C) if isinstance(C, (list, tuple)) else [C]
    if not values or not all(_is_real(c) and c > 0 for c in values):
        raise KmfeatError(f"head.C: expected a number > 0 or a non-empty list of numbers > 0, got {C!r}")
    return sorted({float(c) for c in values})


class LinearSVMHead(LinearScores, ClassifierMixin, BaseEstimator):
    """One-vs-rest linear L2-SVM (squared hinge) on standardized features, trained in torch with full-batch L-BFGS;
    C chosen on the validation split.

    Per class j (y_ij = +1 for class j, else -1): 0.5 ||w_j||^2 + C sum_i max(0, 1 - y_ij (w_j . x_i + b_j))^2, the
    bias unregularized; all classes are solved jointly (the objective is a sum over classes). Several C are fit in
    increasing order, each warm-started from the previous; the best validation accuracy wins (ties: smaller C).
    A C stops after max_iter L-BFGS iterations, when the last 5 iterations together changed the objective by at
    most tol relative, or when the gradient norm falls to tol times its norm at w = 0, b = 0.
    coef_ and intercept_ act on standardized features: decision = standardizer_.transform(X) @ coef_.T + intercept_.
    """

    def __init__(self, C=(0.0001, 0.001, 0.01), max_iter=2000, tol=1e-6, device="auto", dtype="float32", power=1.0):
        self.C = C
        self.max_iter = max_iter
        self.tol = tol
        self.device = device
        self.dtype = dtype
        self.power = power

    def _check_params(self) -> list[float]:
        values = _c_values(self.C)
        checks = [
            ("max_iter", isinstance(self.max_iter, Integral) and not isinstance(self.max_iter, bool)
             and self.max_iter >= 1, "an integer >= 1"),
            ("tol", _is_real(self.tol) and self.tol >= 0, "a number >= 0"),
            ("dtype", self.dtype in DTYPES, "one of " + ", ".join(DTYPES)),
        ]
        for name, ok, expected in checks:
            if not ok:
                raise KmfeatError(f"head.{name}: expected {expected}, got {getattr(self, name)!r}")
        return values

    def fit(self, X, y, X_val=None, y_val=None):
        """Standardize X once (train statistics), then fit every C on (X, y) and keep the one best on (X_val, y_val).

        learned: standardizer_, coef_ (n_classes, d) float32, intercept_ (n_classes,) float32, classes_,
        best_params_ {"C"}, grid_scores_ (list of {params, val_acc, seconds, n_iter, n_evals, objective,
        converged}, by increasing C), n_iter_ and objective_ of the chosen C.
        """
        c_values = self._check_params()
        has_val = check_fit_data(X, y, X_val, y_val)
        if len(c_values) > 1 and not has_val:
            raise KmfeatError("head.grid.C: choosing among several C values needs a validation split; set head.val > 0")
        y = np.asarray(y)
        self.classes_, y_idx = np.unique(y, return_inverse=True)
        if len(self.classes_) < 2:
            raise KmfeatError(f"train labels: need at least 2 classes, got only {self.classes_.tolist()!r}")
        dev = resolve_device(self.device)
        dtype = DTYPES[self.dtype]
        self.n_features_in_ = X.shape[1]
        self.standardizer_ = Standardizer(eps=0.01, power=self.power).fit(X)
        Xt = self._device_matrix(self._standardized(X, dtype), dev)
        Y = torch.full((X.shape[0], len(self.classes_)), -1.0, dtype=dtype)
        Y[torch.arange(X.shape[0]), torch.from_numpy(y_idx.astype(np.int64))] = 1.0
        Xv = torch.from_numpy(self._standardized(X_val, dtype)).to(Xt.device) if has_val else None
        with full_fp32(Xt.device):  # no TF32: L-BFGS needs float32-accurate gradients
            self._fit_grid(c_values, Products(Xt), Y.to(Xt.device), Xv, y_val)
        return self

    def _fit_grid(self, c_values, products, Y, Xv, y_val) -> None:
        """Fit each C in increasing order, warm-started; keep the best on val (ties: the smaller C)."""
        g0 = self._zero_gradient_norm(products, Y)
        k, d = Y.shape[1], products.X.shape[1]
        W = torch.zeros((k, d), dtype=Y.dtype, device=Y.device)
        b = torch.zeros(k, dtype=Y.dtype, device=Y.device)
        self.grid_scores_, best = [], None
        for C in c_values:
            t0 = time.perf_counter()
            loss, n_iter, n_evals, converged = self._solve(products, Y, W, b, C, g0 * C)
            if not converged:
                say(f"svm C={C:g}: stopped at head.params.max_iter={self.max_iter} before converging; "
                    "raise it for the optimum")
            score = {"params": {"C": C}, "val_acc": None, "seconds": 0.0, "n_iter": n_iter, "n_evals": n_evals,
                     "objective": loss, "converged": converged}
            if Xv is not None:
                pred = products.scores(W, b, Xv).argmax(dim=1).cpu().numpy()
                score["val_acc"] = float(np.mean(self.classes_[pred] == np.asarray(y_val)))
            score["seconds"] = time.perf_counter() - t0
            self.grid_scores_.append(score)
            say(f"svm C={C:g} val_acc={score['val_acc']} objective={loss:.6g} iters={n_iter} ({score['seconds']:.1f}s)")
            if best is None or (Xv is not None and score["val_acc"] > best[0]["val_acc"]):
                best = (score, W.to("cpu", torch.float32).numpy().copy(), b.to("cpu", torch.float32).numpy().copy())
        score, self.coef_, self.intercept_ = best
        self.best_params_ = dict(score["params"])
        note = grid_edge_note("head.grid.C", c_values, score["params"]["C"]) if Xv is not None else None
        if note:
            say(note)
        self.n_iter_, self.objective_ = score["n_iter"], score["objective"]

    def _standardized(self, X, dtype) -> np.ndarray:
        """One new C-contiguous array of standardized X in `dtype` (read chunk by chunk, so memmaps, float16
        features and kmfeat.rows.Rows views are fine: only the standardized matrix is held whole)."""
        if dtype == torch.float32:
            return self.standardizer_.transform(X)
        self.standardizer_._check_width(X)
        out = np.empty(X.shape, np.float64)
        for a, b in row_chunks(X.shape[0], chunk_rows(X.shape[1])):
            out[a:b] = self.standardizer_.transform(X[a:b])
        return out

    @staticmethod
    def _device_matrix(A: np.ndarray, dev: torch.device) -> torch.Tensor:
        """Wrap A without a copy on CPU; move it to the GPU when it fits comfortably there, else stay on CPU."""
        t = torch.from_numpy(A)
        if dev.type == "cuda":
            if t.numel() * t.element_size() < 0.7 * torch.cuda.mem_get_info(dev)[0]:
                return t.to(dev)
            say("svm: features do not fit in GPU memory; training on the CPU")
        return t

    @staticmethod
    def _zero_gradient_norm(products: Products, Y: torch.Tensor) -> float:
        """||grad f(0, 0)|| / C: the gradient at zero is -2C [Y^T X, 1^T Y], the reference for the gradient test."""
        return 2.0 * math.sqrt(float(products.back(Y.T.contiguous()).pow(2).sum()) + float(Y.sum(dim=0).pow(2).sum()))

    def _solve(self, products, Y, W, b, C: float, g0: float) -> tuple[float, int, int, bool]:
        """Run L-BFGS from the current (W, b), updated in place; returns (final objective, iterations, evaluations,
        whether a stopping rule other than max_iter ended it).

        Stops after max_iter iterations; when the last WINDOW iterations together lowered the objective by at most
        tol relative (one iteration alone is no guide: L-BFGS's first step is deliberately tiny, and later ones
        alternate small and large); when the gradient norm is at most tol * g0; or when an iteration changes
        nothing (no descent direction left at this precision).
        """
        objective = SquaredHingeObjective(products, Y, W, b, C)
        opt = torch.optim.LBFGS([W, b], lr=1.0, max_iter=1, max_eval=MAX_LINE_SEARCH + 1, tolerance_grad=0.0,
                                tolerance_change=1e-12 if W.dtype == torch.float64 else 1e-9,
                                history_size=HISTORY, line_search_fn="strong_wolfe")
        history = [objective.evaluate()[0]]
        converged = False
        steps = bar(total=self.max_iter, desc=f"svm C={C:g}", unit="iter")
        with steps:
            while not converged and len(history) <= self.max_iter:
                opt.step(objective)
                loss, gW, gb = objective.evaluate()
                history.append(loss)
                steps.update(1)
                steps.set_postfix(objective=f"{loss:.6g}")
                gnorm = math.sqrt(float(gW.pow(2).sum()) + float(gb.pow(2).sum()))
                settled = len(history) > WINDOW and history[-WINDOW - 1] - loss <= self.tol * abs(loss)
                converged = settled or loss == history[-2] or gnorm <= self.tol * g0
        W.grad = b.grad = None
        return history[-1], len(history) - 1, objective.n_evals, converged

    def save(self, path) -> None:
        """torch.save of params, weights, standardizer arrays, classes and the grid scores (no pickled code)."""
        torch.save({
            "format": "kmfeat.LinearSVMHead/1",
            **self._linear_state(),
            "n_iter": self.n_iter_,
            "objective": self.objective_,
        }, path)

    @classmethod
    def load(cls, path) -> "LinearSVMHead":
        """Rebuild a fitted LinearSVMHead written by save() (weights only: no pickled code is run)."""
        blob = load_torch_blob(path, "kmfeat.LinearSVMHead/1")
        head = cls._from_linear_state(blob)
        head.n_iter_, head.objective_ = blob["n_iter"], blob["objective"]
        return head
