"""Train a classifier head on cached features and write its metrics, model and plots.

The test split is touched exactly once, after the head (and its epoch or hyper-parameters)
was chosen on the validation split held out of train. Mirrored training images (flip_train)
join the training part only: the mirrors of validation images stay out. With `head.refit`
(svm, ridge and sklearn heads), the chosen hyper-parameters are then refit on train + val, as the
paper does after cross-validation; val accuracy is still that of the model that never saw it.
With `head.tta` (and mirrored val/test features), val and test predictions sum the head's class
scores over each image and its mirror (train_flip rows of the val images, test_flip); the MLP still
picks its epoch on plain val. With `head.mirrors = "mean"` every train, val and test image is one
row, the mean of its features and its mirror's: the ridge head's Gram matrix over half the rows, fit
on exactly what it predicts from.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict

import numpy as np

from .cache import Entry, Writer
from .config import HeadConfig
from .errors import KmfeatError
from .progress import say
from .rows import MeanRows, Rows


def feature_cells(features: Entry) -> int:
    """How many pooled cells (of equal width) an encode entry's feature rows hold: sum of g*g over pool.grid."""
    from .pooling import n_cells

    return n_cells(features.params.get("grid", 1))


def make_head(h: HeadConfig, chosen: dict | None = None, cells: int = 1):
    """The head estimator a HeadConfig describes; `chosen` fixes the grid to one point; `cells`: pooled cells per
    feature row (feature_cells), what the MLP's head.bottleneck projects one by one."""
    if h.kind == "sklearn":
        from .heads.sklearn import SklearnHead

        if chosen is not None:
            return SklearnHead(estimator=h.estimator, params={**h.params, **chosen}, grid={}, power=h.power)
        return SklearnHead(estimator=h.estimator, params=dict(h.params), grid=dict(h.grid), power=h.power)
    if h.kind == "svm":
        from .heads.svm import LinearSVMHead

        grid = dict(chosen or h.grid)
        C = grid.pop("C", LinearSVMHead().C)
        if grid:
            raise KmfeatError(f"head.grid: the svm head searches only C, got {sorted(grid)}")
        return LinearSVMHead(C=tuple(C) if isinstance(C, list) else (C,), power=h.power, **h.params)
    if h.kind == "ridge":
        from .heads.ridge import RidgeHead

        grid, params = dict(chosen or h.grid), dict(h.params)
        alpha = grid.pop("alpha", params.pop("alpha", None))
        if grid:
            raise KmfeatError(f"head.grid: the ridge head searches only alpha, got {sorted(grid)}")
        allowed = sorted(set(RidgeHead().get_params()) - {"alpha", "power"})
        if set(params) - set(allowed):
            raise KmfeatError(f"head.params: the ridge head takes {', '.join(allowed)}, got {sorted(params)}")
        return RidgeHead(alpha=tuple(alpha) if isinstance(alpha, list) else alpha, power=h.power, **params)
    from .heads.mlp import MLPHead

    return MLPHead(hidden=h.hidden, dropout=h.dropout, epochs=h.epochs, batch=h.batch, lr=h.lr,
                   weight_decay=h.weight_decay, optimizer=h.optimizer, schedule=h.schedule,
                   patience=h.patience, seed=h.seed, device=h.device, input_dropout=h.input_dropout,
                   label_smoothing=h.label_smoothing, precision=h.precision, power=h.power,
                   bottleneck=h.bottleneck, cells=cells)


def training_rows(features: Entry, idx: np.ndarray, mean: bool = False):
    """Features and labels of train images `idx`, plus their mirrors when they were encoded.

    The features are a kmfeat.rows.Rows view (float32 reads) of the memory-mapped train[idx] and
    train_flip[idx], not a copy: at k = 8000 with mirrors the concatenation would be 12.8 GB.
    With `mean` (head.mirrors = "mean") each image's row is the mean of its features and its mirror's.
    """
    X, y = features.array("train"), np.asarray(features.array("train_y"))[idx]
    if mean:
        return MeanRows([Rows([(X, idx)]), Rows([(features.array("train_flip"), idx)])]), y
    parts = [(X, idx)]
    if features.has("train_flip"):
        parts.append((features.array("train_flip"), idx))
        y = np.concatenate([y, y])
    return Rows(parts), y


def split_features(features: Entry, n_val: int, seed: int, mean: bool = False, images: np.ndarray | None = None):
    """(X_fit, y_fit, X_val, y_val, fit_idx) from an encode entry: val held out of the
    unflipped train images (of `images` only, e.g. one predefined fold, when given); the fit part
    adds the mirrors of the fit images. X_fit is a lazy Rows view of the memory-mapped features;
    X_val (small) is read into RAM in the features' dtype (float32 mirror means with `mean`)."""
    from .heads.common import validation_split

    y = np.asarray(features.array("train_y"))
    if images is None:
        fit_idx, val_idx = validation_split(y, n_val, seed)
    else:
        fit_pos, val_pos = validation_split(y[images], n_val, seed)
        fit_idx, val_idx = np.sort(images[fit_pos]), np.sort(images[val_pos])
    X_fit, y_fit = training_rows(features, fit_idx, mean)
    X_val, y_val = (validation_rows(features, val_idx, mean), y[val_idx]) if len(val_idx) else (None, None)
    return X_fit, y_fit, X_val, y_val, fit_idx


def validation_rows(features: Entry, val_idx: np.ndarray, mean: bool = False) -> np.ndarray:
    """The features of validation images `val_idx` in RAM: unflipped in the features' dtype, or with `mean`
    the float32 averages with their mirrors (what a head fit on mirror means predicts from)."""
    if mean:
        return training_rows(features, val_idx, True)[0].materialize()
    X = features.array("train")
    return Rows([(X, val_idx)], X.dtype).materialize()


def train_head(h: HeadConfig, features: Entry, out: Writer, images: np.ndarray | None = None) -> dict:
    """Fit, select on val, score test once; writes metrics.json, the model and PNGs into `out`.
    `images`: train only on these training images (one predefined fold), val held out of them."""
    from .heads.common import classification_metrics, mirror_predict
    from .plots import plot_confusion, plot_curves

    start = time.time()
    classes = features.meta["classes"]
    tta = h.tta and features.has("train_flip") and features.has("test_flip")
    if h.tta and not tta:
        say("train: head.tta is on but the features have no mirrored val/test images (encode.flip_train and "
            "encode.flip_test); predicting without mirror averaging")
    mean = h.mirrors == "mean" and features.has("train_flip") and features.has("test_flip")
    if h.mirrors == "mean" and not mean:
        say("train: head.mirrors = \"mean\" but the features have no mirrored train and test images "
            "(encode.flip_train and encode.flip_test); fitting and predicting on single views")
    tta = tta and not mean  # mean: predictions already see each image with its mirror
    X_fit, y_fit, X_val, y_val, fit_idx = split_features(features, h.val, h.seed, mean, images)
    val_idx = np.setdiff1d(np.arange(len(features.array("train_y"))) if images is None else images, fit_idx)
    head = make_head(h, cells=feature_cells(features))
    if h.kind == "mlp":  # a checkpoint per epoch in the temp folder: an interrupted train resumes from it
        out.scratch("mlp-checkpoint.pt.part")
        head.fit(X_fit, y_fit, X_val, y_val, checkpoint=out.scratch("mlp-checkpoint.pt"))
    else:
        head.fit(X_fit, y_fit, X_val, y_val)
    val_acc = float("nan")
    if X_val is not None:
        val_pred = head.predict(X_val)
        if tta:
            val_pred = mirror_predict(head, X_val, Rows([(features.array("train_flip"), val_idx)]).materialize())
        val_acc = float((val_pred == y_val).mean())
    refit = h.refit and X_val is not None
    if refit:
        del X_fit, y_fit
        fit_idx = np.arange(len(features.array("train_y"))) if images is None else np.sort(images)
        X_fit, y_fit = training_rows(features, fit_idx, mean)
        chosen = getattr(head, "best_params_", None) or {}
        selected = head
        head = make_head(h, chosen, feature_cells(features)).fit(X_fit, y_fit)
        for name in ("best_params_", "grid_scores_"):
            setattr(head, name, getattr(selected, name, None))
    fit_seconds = time.time() - start

    X_train, y_train = features.array("train"), np.asarray(features.array("train_y"))
    train_pred = head.predict(training_rows(features, fit_idx, True)[0] if mean else Rows([(X_train, fit_idx)]))
    y_test = np.asarray(features.array("test_y"))
    X_test = Rows([features.array("test")])
    single = None  # with mirrors = "mean" the head never saw a single view: it predicts only from image + mirror
    if mean:
        test_pred = head.predict(MeanRows([X_test, Rows([features.array("test_flip")])]))
    elif tta:
        X_test = X_test.materialize()
        single = float((head.predict(X_test) == y_test).mean())
        test_pred = mirror_predict(head, X_test, Rows([features.array("test_flip")]).materialize())
    else:
        test_pred = head.predict(X_test)
    test = classification_metrics(y_test, test_pred, classes)

    history = getattr(head, "history_", [])
    metrics = {
        "head": f"sklearn:{h.estimator}" if h.kind == "sklearn" else h.kind,
        "train_accuracy": float((train_pred == y_train[fit_idx]).mean()),
        "train_accuracy_images": int(len(fit_idx)),  # measured on the fit images themselves, not their mirrors
        "val_accuracy": val_acc,
        "test": test,
        "n_fit": int(len(y_fit)), "n_val": int(0 if y_val is None else len(y_val)), "n_test": int(len(y_test)),
        "refit_on_train_and_val": refit,
        "flipped_training_copies": features.has("train_flip"),
        "mirror_averaged": tta or mean,
        "mirrors": h.mirrors,
        "test_accuracy_without_mirror_averaging": single,
        "streamed": getattr(head, "streamed_", None),
        "epochs_run": getattr(head, "n_epochs_run_", None),
        "best_epoch": getattr(head, "best_epoch_", None),
        "best_params": getattr(head, "best_params_", None),
        "grid_scores": getattr(head, "grid_scores_", None),
        "history": history,
        "fit_seconds": round(fit_seconds, 2),
        "seconds": round(time.time() - start, 2),
        "feature_key": features.key,
        "config": asdict(h),
    }
    out.path("metrics.json").write_text(json.dumps(metrics, indent=2, default=float))
    head.save(out.path("model.joblib" if h.kind == "sklearn" else "model.pt"))
    plot_confusion(np.array(test["confusion"]), classes, out.path("confusion.png"),
                   title=f"{metrics['head']}: test accuracy {test['accuracy']:.4f}")
    if history:
        plot_curves(history, out.path("curves.png"))
    out.meta.update(test_accuracy=test["accuracy"], val_accuracy=val_acc)
    return metrics
