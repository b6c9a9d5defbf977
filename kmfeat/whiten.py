"""ZCA / PCA whitening of patch vectors as a scikit-learn style estimator.

The big matrix products go through torch: its CPU GEMM stays fast when cores are shared,
where multi-threaded OpenBLAS (numpy) can slow down by 10x or more.
"""
import numpy as np
import torch
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.utils.validation import check_is_fitted

from .errors import KmfeatError

METHODS = ("zca", "pca", "none")
_CHUNK = 65_536


def _check_X(X, what: str = "input patches") -> np.ndarray:
    """2-d finite float array, or KmfeatError."""
    X = np.asarray(X)
    if X.ndim != 2 or X.shape[0] < 1:
        raise KmfeatError(f"whiten: {what} must be a non-empty 2-d array (n, d), got shape {X.shape}")
    for s in range(0, X.shape[0], _CHUNK):
        if not np.isfinite(X[s:s + _CHUNK]).all():
            raise KmfeatError(f"whiten: {what} contain NaN or inf")
    return X


def _covariance(X: np.ndarray):
    """Mean and population covariance of X in float64, accumulated in chunks."""
    n, d = X.shape
    total = np.zeros(d)
    for s in range(0, n, _CHUNK):
        total += X[s:s + _CHUNK].sum(axis=0, dtype=np.float64)
    mean = total / n
    mean_t = torch.from_numpy(mean)
    cov = torch.zeros((d, d), dtype=torch.float64)
    for s in range(0, n, _CHUNK):
        c = torch.from_numpy(np.array(X[s:s + _CHUNK], dtype=np.float64))
        c -= mean_t
        cov.addmm_(c.T, c)
    return mean, cov.numpy() / n


class Whitener(TransformerMixin, BaseEstimator):
    """Whitening z = W (x - mean_): "zca" (symmetric W), "pca" (rows = principal axes) or "none".

    eps regularizes small eigenvalues: W uses 1 / sqrt(eigenvalue + eps).
    """

    def __init__(self, method: str = "zca", eps: float = 0.1):
        self.method = method
        self.eps = eps

    def fit(self, X, y=None):
        """Learn mean_, eigenvalues_ (descending) and the whitening matrix W_ from X (n, d)."""
        if self.method not in METHODS:
            raise KmfeatError(f"whiten.method: expected one of {', '.join(METHODS)}, got {self.method!r}")
        if not np.isfinite(self.eps) or self.eps < 0:
            raise KmfeatError(f"whiten.eps: must be a number >= 0, got {self.eps}")
        X = _check_X(X)
        d = X.shape[1]
        mean, cov = _covariance(X)
        evals, evecs = np.linalg.eigh(cov)
        evals, evecs = evals[::-1], evecs[:, ::-1]
        # deterministic signs: the largest-magnitude entry of each eigenvector is positive
        evecs *= np.where(evecs[np.abs(evecs).argmax(axis=0), np.arange(d)] < 0, -1.0, 1.0)
        self.eigenvalues_ = evals.copy()
        self.n_features_in_ = d
        if self.method == "none":
            self.mean_ = np.zeros(d, dtype=np.float32)
            self.W_ = np.eye(d, dtype=np.float32)
            return self
        denom = np.clip(evals, 0.0, None) + self.eps
        tol = max(evals[0], 0.0) * d * np.finfo(np.float32).eps
        if denom.min() <= tol:
            raise KmfeatError(f"whiten.eps: the patch covariance is (nearly) singular (normalized patches always are); "
                              f"set whiten.eps > {tol:.3g}")
        scaled = evecs.T / np.sqrt(denom)[:, None]
        W = scaled if self.method == "pca" else evecs @ scaled
        self.mean_ = mean.astype(np.float32)
        self.W_ = W.astype(np.float32)
        return self

    def transform(self, X) -> np.ndarray:
        """(X - mean_) @ W_.T as float32, in chunks."""
        check_is_fitted(self, "W_")
        X = self._check_dim(np.asarray(X))
        if self.method == "none":
            return np.array(X, dtype=np.float32, copy=True)
        out = np.empty((X.shape[0], self.W_.shape[0]), dtype=np.float32)
        Wt, mean = torch.tensor(np.asarray(self.W_)).T, torch.tensor(np.asarray(self.mean_))
        for s in range(0, X.shape[0], _CHUNK):
            x = torch.from_numpy(np.array(X[s:s + _CHUNK], dtype=np.float32))
            x -= mean
            torch.mm(x, Wt, out=torch.from_numpy(out[s:s + _CHUNK]))
        return out

    def inverse_transform(self, Z) -> np.ndarray:
        """Z @ pinv(W_).T + mean_ as float32 (e.g. to draw whitened centroids as image patches)."""
        check_is_fitted(self, "W_")
        Z = self._check_dim(np.asarray(Z))
        back = np.linalg.pinv(self.W_.astype(np.float64)).T
        return (Z.astype(np.float64) @ back + self.mean_).astype(np.float32)

    def _check_dim(self, X: np.ndarray) -> np.ndarray:
        if X.ndim != 2 or X.shape[1] != self.n_features_in_:
            raise KmfeatError(f"whiten: expected an array (n, {self.n_features_in_}) matching the fitted "
                              f"whitener, got shape {X.shape}")
        return X
