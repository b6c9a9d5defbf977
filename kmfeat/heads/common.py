"""Pieces shared by every classifier head: train-only standardization, the validation split, metrics."""
import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin

from kmfeat.errors import KmfeatError
from kmfeat.rows import Rows, as_rows

CHUNK_ROWS = 8192
CHUNK_BYTES = 128 << 20
"""A chunked pass reads at most CHUNK_ROWS rows and about CHUNK_BYTES bytes (in its working dtype)
at a time: at 32,000 features a float64 chunk of 8192 rows would be 2 GB."""


def row_chunks(n: int, size: int = CHUNK_ROWS):
    """Yield (start, stop) ranges covering 0..n in steps of `size` rows."""
    for start in range(0, n, size):
        yield start, min(start + size, n)


def chunk_rows(n_features: int, itemsize: int = 4, most: int | None = None) -> int:
    """Rows per chunk for a pass over (N, n_features) data held as `itemsize`-byte values:
    about CHUNK_BYTES per chunk, at most `most` (default CHUNK_ROWS) rows, at least one."""
    most = CHUNK_ROWS if most is None else most
    return max(1, min(most, CHUNK_BYTES // max(1, n_features * itemsize)))


def check_features(X, name: str = "X") -> None:
    """Features must be a 2-d numeric array (N, F) with at least one row."""
    if getattr(X, "ndim", None) != 2 or X.shape[0] == 0 or X.shape[1] == 0:
        shape = getattr(X, "shape", None)
        raise KmfeatError(f"{name}: expected a non-empty 2-d feature array (N, F), got shape {shape}")


def check_fit_data(X, y, X_val, y_val) -> bool:
    """Check a head's fit inputs (features, labels, optional validation pair); True if val is given."""
    check_features(X, "train features")
    if len(y) != X.shape[0]:
        raise KmfeatError(f"train labels: {len(y)} labels for {X.shape[0]} feature rows")
    if (X_val is None) != (y_val is None):
        raise KmfeatError("validation split: X_val and y_val must be given together")
    has_val = X_val is not None and len(X_val) > 0
    if has_val and (X_val.ndim != 2 or X_val.shape[1] != X.shape[1] or len(y_val) != X_val.shape[0]):
        raise KmfeatError(f"validation features: expected ({len(y_val)}, {X.shape[1]}), got {X_val.shape}")
    return has_val


def load_torch_blob(path, fmt: str) -> dict:
    """Read a head file written with torch.save (weights only: no pickled code runs) and check its format tag."""
    import torch

    what = fmt.split("/")[0].split(".")[-1]
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise KmfeatError(f"{path}: not a readable {what} file ({first})") from None
    if not isinstance(blob, dict) or blob.get("format") != fmt:
        raise KmfeatError(f"{path}: not a {what} file written by {what}.save")
    return blob


def signed_power(x: np.ndarray, p: float) -> np.ndarray:
    """sign(x) * |x|**p in place on a writable float array (p = 1: unchanged); returns x."""
    if p != 1:
        sign = np.signbit(x)
        np.abs(x, out=x)
        np.power(x, p, out=x)
        np.negative(x, out=x, where=sign)
    return x


class Standardizer(TransformerMixin, BaseEstimator):
    """Signed power sign(x)|x|^power, then standardization with TRAIN statistics only:
    (x - mean_) / sqrt(var_ + eps), eps=0.01 (Coates).

    power < 1 (0.5: signed square root) evens out the heavy-tailed pooled code sums before the
    head sees them. Statistics are accumulated in float64 over row chunks (of about CHUNK_BYTES),
    so a read-only memmap, a float16 one or a kmfeat.rows.Rows view is never copied whole.
    """

    def __init__(self, eps: float = 0.01, power: float = 1.0):
        self.eps = eps
        self.power = power

    def _rows(self, X: Rows, a: int, b: int, buf: np.ndarray) -> np.ndarray:
        """Rows a:b of the float64 view X read into (the start of) buf, signed power applied."""
        return signed_power(X.take(np.arange(a, b), out=buf[:b - a]), self.power)

    def fit(self, X, y=None):
        """Learn mean_ and scale_ = sqrt(var_ + eps) (both float32) of the powered X."""
        check_features(X)
        if not self.eps >= 0:
            raise KmfeatError(f"head.eps: expected a number >= 0, got {self.eps!r}")
        if not (isinstance(self.power, (int, float)) and np.isfinite(self.power) and self.power > 0):
            raise KmfeatError(f"head.power: expected a number > 0 (1 = off), got {self.power!r}")
        n, f = X.shape
        size = chunk_rows(f, 8)
        X, buf = as_rows(X, np.float64), np.empty((min(size, n), f), np.float64)
        total = np.zeros(f, np.float64)
        for a, b in row_chunks(n, size):
            total += self._rows(X, a, b, buf).sum(axis=0)
        mean = total / n
        sq = np.zeros(f, np.float64)
        for a, b in row_chunks(n, size):
            d = self._rows(X, a, b, buf)
            d -= mean
            sq += np.einsum("ij,ij->j", d, d)
        self.var_ = (sq / n).astype(np.float32)
        self.mean_ = mean.astype(np.float32)
        self.scale_ = np.sqrt(sq / n + self.eps).astype(np.float32)
        self.n_features_in_ = f
        return self

    def _check_width(self, X) -> None:
        check_features(X)
        if X.shape[1] != self.n_features_in_:
            raise KmfeatError(f"features: expected {self.n_features_in_} columns (as at fit time), got {X.shape[1]}")

    def transform(self, X) -> np.ndarray:
        """Return a new float32 array (X - mean_) / scale_, computed chunk by chunk."""
        self._check_width(X)
        out = np.empty(X.shape, np.float32)
        X = as_rows(X)
        for a, b in row_chunks(X.shape[0], chunk_rows(X.shape[1])):
            self._apply(X.take(np.arange(a, b), out=out[a:b]))
        return out

    def transform_inplace(self, X: np.ndarray) -> np.ndarray:
        """Standardize a writable float32 array in place (no copy) and return it."""
        self._check_width(X)
        if X.dtype != np.float32 or not X.flags.writeable:
            raise ValueError("transform_inplace needs a writable float32 array")
        for a, b in row_chunks(X.shape[0], chunk_rows(X.shape[1])):
            self._apply(X[a:b])
        return X

    def _apply(self, block: np.ndarray) -> None:
        signed_power(block, self.power)
        block -= self.mean_
        block /= self.scale_


class LinearScores:
    """decision_function / predict of a linear head: scores = standardizer_(X) @ coef_.T + intercept_."""

    def decision_function(self, X) -> np.ndarray:
        """One-vs-rest scores (N, n_classes), float32, standardizing X chunk by chunk (a memmap is fine)."""
        self.standardizer_._check_width(X)
        out = np.empty((X.shape[0], len(self.classes_)), np.float32)
        for a, b in row_chunks(X.shape[0], chunk_rows(X.shape[1], 4)):
            np.matmul(self.standardizer_.transform(X[a:b]), self.coef_.T, out=out[a:b])
            out[a:b] += self.intercept_
        return out

    def predict(self, X) -> np.ndarray:
        """Predicted labels (values from classes_): the class with the largest score."""
        return self.classes_[self.decision_function(X).argmax(axis=1)]

    def _linear_state(self) -> dict:
        """What every linear head's torch.save blob holds: params, weights, standardizer, classes, grid."""
        import torch

        return {"params": self.get_params(), "coef": torch.from_numpy(self.coef_),
                "intercept": torch.from_numpy(self.intercept_), **standardizer_state(self.standardizer_),
                "classes": self.classes_.tolist(), "classes_dtype": self.classes_.dtype.str,
                "best_params": self.best_params_, "grid_scores": self.grid_scores_}

    @classmethod
    def _from_linear_state(cls, blob: dict):
        """A fitted head of this class from the fields _linear_state wrote."""
        head = cls(**blob["params"])
        std = standardizer_from_state(blob)
        head.standardizer_, head.n_features_in_ = std, std.n_features_in_
        head.coef_, head.intercept_ = blob["coef"].numpy(), blob["intercept"].numpy()
        head.classes_ = np.asarray(blob["classes"], dtype=np.dtype(blob["classes_dtype"]))
        head.best_params_, head.grid_scores_ = blob["best_params"], blob["grid_scores"]
        return head


def mirror_predict(head, X, X_mirror) -> np.ndarray:
    """Labels from a head's class scores summed over the images and their mirrors (test-time flip
    averaging): probabilities where the head gives them, else its decision values."""
    for method in ("predict_proba", "decision_function"):
        if hasattr(head, method):
            try:
                scores = getattr(head, method)(X) + getattr(head, method)(X_mirror)
            except KmfeatError:  # an sklearn estimator without this method
                continue
            return head.classes_[np.asarray(scores).argmax(axis=1)]
    raise KmfeatError(f"head.tta: {type(head).__name__} gives neither probabilities nor decision values; "
                      f"set head.tta = false")


def grid_edge_note(name: str, values, chosen) -> str | None:
    """The line to say when the value chosen on val is the smallest or largest of a grid of several: the
    optimum may lie beyond it, and which way to widen the grid."""
    values = sorted(set(values))
    if len(values) < 2 or chosen not in (values[0], values[-1]):
        return None
    side, way = ("smallest", "smaller") if chosen == values[0] else ("largest", "larger")
    return (f"{name}: the best value on val, {chosen:g}, is the {side} of the grid "
            f"({', '.join(f'{v:g}' for v in values)}); add {way} values, the optimum may lie beyond it")


def standardizer_state(std: "Standardizer") -> dict:
    """The fitted Standardizer as tensors, for a head's torch.save blob."""
    import torch

    return {"mean": torch.from_numpy(std.mean_), "scale": torch.from_numpy(std.scale_),
            "var": torch.from_numpy(std.var_), "eps": std.eps, "power": std.power}


def standardizer_from_state(blob: dict) -> "Standardizer":
    """Inverse of standardizer_state."""
    std = Standardizer(eps=blob["eps"], power=blob.get("power", 1.0))
    std.mean_, std.scale_, std.var_ = (blob[k].numpy() for k in ("mean", "scale", "var"))
    std.n_features_in_ = std.mean_.shape[0]
    return std


def validation_split(y, n_val: int | float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(train_idx, val_idx): class-balanced, seeded held-out split of size n_val from the training labels
    (n_val=0: no val; a float in (0, 1): that fraction of them, rounded).

    Each class gives a share of n_val proportional to its frequency (largest remainder), so balanced
    labels give exactly n_val / n_classes per class. Both index arrays are sorted (cheap memmap reads).
    """
    y = np.asarray(y)
    n = len(y)
    if isinstance(n_val, float) and 0 < n_val < 1:  # a fraction of the training images
        n_val = int(round(n_val * n))
    if isinstance(n_val, bool) or not isinstance(n_val, (int, np.integer)) or n_val < 0:
        raise KmfeatError(f"head.val: expected a count >= 0 or a fraction in (0, 1), got {n_val!r}")
    if n_val == 0:
        return np.arange(n), np.empty(0, dtype=np.int64)
    classes, inverse, counts = np.unique(y, return_inverse=True, return_counts=True)
    if n_val > n - len(classes):
        raise KmfeatError(f"head.val: {n_val} is too large for {n} training labels in {len(classes)} classes; "
                          f"expected at most {n - len(classes)}")
    exact = n_val * counts / n
    quota = np.floor(exact).astype(np.int64)
    order = np.argsort(-(exact - quota), kind="stable")
    quota[order[: n_val - quota.sum()]] += 1
    quota = np.minimum(quota, counts - 1)
    while quota.sum() < n_val:
        quota[np.argmax(counts - 1 - quota)] += 1
    rng = np.random.default_rng(seed)
    val = [rng.permutation(np.flatnonzero(inverse == c))[:q] for c, q in enumerate(quota)]
    val_idx = np.sort(np.concatenate(val)).astype(np.int64)
    mask = np.ones(n, bool)
    mask[val_idx] = False
    return np.flatnonzero(mask).astype(np.int64), val_idx


def classification_metrics(y_true, y_pred, classes: list[str]) -> dict:
    """{"accuracy", "per_class_accuracy": {name: acc}, "confusion": [[...]] (rows = true, cols = predicted), "n"}

    Labels are integer indices into `classes`. A class with no true samples gets accuracy None (JSON null).
    """
    y_true = np.asarray(y_true).astype(np.int64).ravel()
    y_pred = np.asarray(y_pred).astype(np.int64).ravel()
    k = len(classes)
    if y_true.shape != y_pred.shape:
        raise ValueError(f"y_true has {len(y_true)} labels but y_pred has {len(y_pred)}")
    for name, arr in (("y_true", y_true), ("y_pred", y_pred)):
        if arr.size and (arr.min() < 0 or arr.max() >= k):
            raise ValueError(f"{name}: labels must be in 0..{k - 1} to index the {k} classes")
    confusion = np.bincount(y_true * k + y_pred, minlength=k * k).reshape(k, k)
    support = confusion.sum(axis=1)
    per_class = {str(name): (float(confusion[i, i] / support[i]) if support[i] else None)
                 for i, name in enumerate(classes)}
    n = int(len(y_true))
    return {
        "accuracy": float(np.trace(confusion) / n) if n else None,
        "per_class_accuracy": per_class,
        "confusion": confusion.tolist(),
        "n": n,
    }
