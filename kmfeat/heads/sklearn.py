"""Any scikit-learn classifier as a head, on standardized features, with an optional grid chosen on val."""
import difflib
import itertools
import time
import warnings

import joblib
import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin, clone
from sklearn.exceptions import ConvergenceWarning
from sklearn.utils import all_estimators

from kmfeat.errors import KmfeatError
from kmfeat.heads.common import Standardizer, check_fit_data, chunk_rows, grid_edge_note, row_chunks
from kmfeat.progress import say

PREDICT_CHUNK = 8192


def classifier_class(name: str):
    """The scikit-learn classifier class called `name`; unknown names list the closest matches."""
    found = dict(all_estimators(type_filter="classifier"))
    if name in found:
        return found[name]
    close = difflib.get_close_matches(str(name), found, n=4, cutoff=0.4)
    hint = ", ".join(close) if close else ", ".join(sorted(found)[:6]) + ", ..."
    raise KmfeatError(f"head.estimator: unknown scikit-learn classifier {name!r}; close matches: {hint}")


def _check_names(cls, names, prefix: str) -> None:
    allowed = cls._get_param_names()
    for name in names:
        if name not in allowed:
            close = difflib.get_close_matches(name, allowed, n=3, cutoff=0.5)
            hint = f"did you mean {', '.join(close)}?" if close else f"expected one of {', '.join(allowed)}"
            raise KmfeatError(f"{prefix}.{name}: {cls.__name__} has no parameter {name!r}; {hint}")


def _fit_one(estimator, X, y):
    """Fit, turning scikit-learn's parameter-value and data errors into one-line KmfeatErrors, and its
    multi-line ConvergenceWarnings into one line per fit that says what to raise."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        try:
            fitted = estimator.fit(X, y)
        except ValueError as e:  # includes scikit-learn's InvalidParameterError
            msg = " ".join(str(e).split())
            raise KmfeatError(f"head.params: {type(estimator).__name__} could not be fit: {msg}") from None
    for w in caught:
        if issubclass(w.category, ConvergenceWarning):
            n_iter = getattr(estimator, "max_iter", None)
            said = f" in {n_iter} iterations" if n_iter is not None else ""
            say(f"{type(estimator).__name__} did not converge{said}; raise head.params.max_iter")
            break
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return fitted


class SklearnHead(ClassifierMixin, BaseEstimator):
    """Any scikit-learn classifier by name, on standardized features; optional hyper-parameter choice on the val split."""

    def __init__(self, estimator: str = "LinearSVC", params: dict | None = None, grid: dict | None = None,
                 power: float = 1.0):
        self.estimator = estimator
        self.params = params
        self.grid = grid
        self.power = power

    def _combinations(self) -> list[dict]:
        grid = self.grid or {}
        for name, values in grid.items():
            if isinstance(values, (str, bytes)) or not hasattr(values, "__len__") or len(values) == 0:
                raise KmfeatError(f"head.grid.{name}: expected a non-empty list of values, got {values!r}")
        names = list(grid)
        return [dict(zip(names, combo)) for combo in itertools.product(*(grid[n] for n in names))]

    def fit(self, X, y, X_val=None, y_val=None):
        """estimator looked up by class name among sklearn.utils.all_estimators(type_filter="classifier") (unknown name ->
        KmfeatError listing a few close matches via difflib); params passed to its constructor (bad param name -> KmfeatError
        naming `head.params.<name>`). grid = {"C": [0.001, 0.01, 0.1]}: each combination is fit on the train part and scored
        on (X_val, y_val); the best (ties: the first) is kept, fit on train only, so val stays honest and test untouched.
        learned: standardizer_, estimator_, best_params_, grid_scores_ (list of {params, val_acc, seconds}), classes_"""
        cls = classifier_class(self.estimator)
        params = dict(self.params or {})
        _check_names(cls, params, "head.params")
        _check_names(cls, (self.grid or {}), "head.grid")
        combos = self._combinations()
        has_val = check_fit_data(X, y, X_val, y_val)
        if len(combos) > 1 and not has_val:
            raise KmfeatError("head.grid: choosing among several values needs a validation split; set head.val > 0")
        try:
            base = cls(**params)
        except TypeError as e:
            raise KmfeatError(f"head.estimator: {self.estimator} cannot be built from head.params ({e})") from None

        self.standardizer_ = Standardizer(power=self.power).fit(X)
        self.n_features_in_ = X.shape[1]
        Xs = self.standardizer_.transform(X)
        Xv = self.standardizer_.transform(X_val) if has_val else None
        self.grid_scores_, best = [], None
        for combo in combos:
            t0 = time.perf_counter()
            est = _fit_one(clone(base).set_params(**combo), Xs, y)
            score = {"params": combo, "val_acc": None, "seconds": time.perf_counter() - t0}
            if has_val:
                score["val_acc"] = float(np.mean(est.predict(Xv) == np.asarray(y_val)))
                say(f"{self.estimator} {combo or ''} val_acc={score['val_acc']:.4f} ({score['seconds']:.1f}s)")
            self.grid_scores_.append(score)
            if best is None or (has_val and score["val_acc"] > best[0]["val_acc"]):
                best = (score, est)
        self.estimator_ = best[1]
        self.best_params_ = {**params, **best[0]["params"]}
        for name, values in (self.grid or {}).items() if has_val else ():
            chosen = best[0]["params"][name]
            note = grid_edge_note(f"head.grid.{name}", values, chosen) if all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in values) else None
            if note:
                say(note)
        self.classes_ = self.estimator_.classes_
        return self

    def _chunked(self, method: str, X) -> np.ndarray:
        self.standardizer_._check_width(X)
        fn = getattr(self.estimator_, method)
        chunks = row_chunks(X.shape[0], chunk_rows(X.shape[1], 4, PREDICT_CHUNK))
        return np.concatenate([fn(self.standardizer_.transform(X[a:b])) for a, b in chunks])

    def predict(self, X) -> np.ndarray:
        """Predicted labels, standardizing X chunk by chunk (a memmap is fine)."""
        return self._chunked("predict", X)

    def predict_proba(self, X) -> np.ndarray:
        """Class probabilities, for estimators that have predict_proba."""
        if not hasattr(self.estimator_, "predict_proba"):
            raise KmfeatError(f"head.estimator: {self.estimator} gives no probabilities")
        return self._chunked("predict_proba", X)

    def save(self, path) -> None:
        """Write the fitted head with joblib."""
        joblib.dump(self, path)

    @classmethod
    def load(cls, path) -> "SklearnHead":
        """Read a head written by save() (joblib: only load files you trust)."""
        try:
            head = joblib.load(path)
        except Exception as e:
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise KmfeatError(f"{path}: not a readable SklearnHead file ({first})") from None
        if not isinstance(head, cls):
            raise KmfeatError(f"{path}: expected a SklearnHead written by SklearnHead.save, got {type(head).__name__}")
        return head
