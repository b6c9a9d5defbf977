"""The train stage: the test split never reaches fitting or model selection; flips and refit."""
import json

import numpy as np
import pytest

from kmfeat import config
from kmfeat.cache import Store
from kmfeat.heads.mlp import MLPHead
from kmfeat.heads.svm import LinearSVMHead
from kmfeat.train import train_head


def features_entry(tmp_path, flip=True, n=300, m=90, d=24, seed=0, dtype=np.float32, flip_test=False):
    """An encode entry of separable synthetic features; every row is unique, so rows can be traced."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(0, 3, (3, d))
    y, y_test = np.arange(n) % 3, np.arange(m) % 3
    store = Store(tmp_path)
    with store.lock("encode", "k"):
        w = store.writer("encode", "k", {}, {})
        w.save("train", (centers[y] + rng.normal(0, 1, (n, d))).astype(dtype))
        if flip:
            w.save("train_flip", (centers[y] + rng.normal(0, 1, (n, d))).astype(dtype))
        w.save("test", (centers[y_test] + rng.normal(0, 1, (m, d))).astype(dtype))
        if flip_test:
            w.save("test_flip", (centers[y_test] + rng.normal(0, 1, (m, d))).astype(dtype))
        w.save("train_y", y.astype(np.int64))
        w.save("test_y", y_test.astype(np.int64))
        w.meta["classes"] = ["a", "b", "c"]
        return w.commit()


def rows(X):
    return {r.tobytes() for r in np.asarray(X)}


def spy(monkeypatch, cls, calls):
    fit, predict = cls.fit, cls.predict

    def spy_fit(self, X, y, X_val=None, y_val=None, **kwargs):
        calls.append(("fit", rows(X) | (rows(X_val) if X_val is not None else set())))
        calls.append(("fit_rows", rows(X)))
        return fit(self, X, y, X_val, y_val, **kwargs)

    def spy_predict(self, X):
        calls.append(("predict", rows(X)))
        return predict(self, X)
    monkeypatch.setattr(cls, "fit", spy_fit)
    monkeypatch.setattr(cls, "predict", spy_predict)


@pytest.mark.parametrize("kind,cls,extra", [
    ("mlp", MLPHead, ["head.epochs=15", "head.hidden=16", "head.lr=0.01"]),
    ("svm", LinearSVMHead, ["head.grid={C=[0.001, 0.1]}", "head.refit=true"]),
])
def test_test_split_never_reaches_fit_or_selection(tmp_path, monkeypatch, kind, cls, extra):
    entry = features_entry(tmp_path)
    calls = []
    spy(monkeypatch, cls, calls)
    h = config.load(None, [f"head.kind={kind}", "head.val=30"] + extra).head
    out = Store(tmp_path).writer("train", "t", {}, {})
    metrics = train_head(h, entry, out)
    test_rows = rows(entry.array("test"))
    fits = [r for what, r in calls if what == "fit"]
    assert fits and all(not (r & test_rows) for r in fits)
    test_predictions = [i for i, (what, r) in enumerate(calls) if what == "predict" and r & test_rows]
    assert not any(r & test_rows for what, r in calls if what == "predict" and r != test_rows)
    assert len(test_predictions) == 1 and calls[test_predictions[0]][1] == test_rows
    assert test_predictions[0] > max(i for i, (what, _) in enumerate(calls) if what == "fit")
    assert metrics["test"]["accuracy"] > 0.9
    saved = json.loads(out.path("metrics.json").read_text())
    assert saved["n_test"] == 90 and saved["feature_key"] == "k"


def test_mirrors_of_validation_images_stay_out(tmp_path, monkeypatch):
    entry = features_entry(tmp_path)
    calls = []
    spy(monkeypatch, MLPHead, calls)
    h = config.load(None, ["head.val=30", "head.epochs=2", "head.hidden=8"]).head
    metrics = train_head(h, entry, Store(tmp_path).writer("train", "t", {}, {}))
    assert metrics["n_fit"] == 2 * 270 and metrics["n_val"] == 30
    train, flip = np.asarray(entry.array("train")), np.asarray(entry.array("train_flip"))
    fitted = calls[1][1]
    val_rows = {r.tobytes() for r in train} - fitted
    assert len(val_rows) == 30
    val_idx = [i for i, r in enumerate(train) if r.tobytes() in val_rows]
    assert not rows(flip[val_idx]) & fitted
    assert len(fitted & rows(flip)) == 270


def test_refit_uses_train_and_val_with_the_chosen_c(tmp_path):
    entry = features_entry(tmp_path, flip=False)
    h = config.load(None, ["head.kind=svm", "head.val=30", "head.grid={C=[0.0001, 0.1]}",
                           "head.refit=true"]).head
    metrics = train_head(h, entry, Store(tmp_path).writer("train", "t", {}, {}))
    assert metrics["refit_on_train_and_val"] and metrics["n_fit"] == 300
    assert metrics["best_params"]["C"] in (0.0001, 0.1) and len(metrics["grid_scores"]) == 2


def test_refit_is_refused_for_the_mlp():
    from kmfeat.errors import KmfeatError

    with pytest.raises(KmfeatError, match="head.refit"):
        config.load(None, ["head.refit=true"])


@pytest.mark.parametrize("kind,extra", [
    ("mlp", ["head.epochs=15", "head.hidden=16", "head.lr=0.01", "head.device=cpu"]),  # a GPU would hold it all
    ("svm", ["head.grid={C=[0.001, 0.1]}"]),
    ("sklearn", ["head.estimator=LogisticRegression"]),
])
def test_float16_features_through_every_head(tmp_path, monkeypatch, kind, extra):
    monkeypatch.setenv("KMFEAT_MLP_RAM_BUDGET", "0")  # no RAM budget: the MLP streams its batches from the memmaps
    entry = features_entry(tmp_path, dtype=np.float16)
    assert entry.array("train").dtype == np.float16
    h = config.load(None, [f"head.kind={kind}", "head.val=30"] + extra).head
    metrics = train_head(h, entry, Store(tmp_path).writer("train", "t", {}, {}))
    assert metrics["test"]["accuracy"] > 0.9 and metrics["n_fit"] == 540 and metrics["n_val"] == 30
    assert metrics["streamed"] is (True if kind == "mlp" else None)


def test_training_rows_are_a_lazy_view_of_train_and_mirrors(tmp_path):
    from kmfeat.rows import Rows
    from kmfeat.train import split_features, training_rows

    entry = features_entry(tmp_path, dtype=np.float16)
    train, flip = np.asarray(entry.array("train")), np.asarray(entry.array("train_flip"))
    idx = np.array([5, 1, 299, 42])
    X, y = training_rows(entry, idx)
    assert isinstance(X, Rows) and X.shape == (8, 24) and X.dtype == np.float32
    np.testing.assert_array_equal(X[:], np.concatenate([train[idx], flip[idx]]).astype(np.float32))
    np.testing.assert_array_equal(y, np.concatenate([idx % 3, idx % 3]))
    X_fit, y_fit, X_val, y_val, fit_idx = split_features(entry, 30, 0)
    assert isinstance(X_fit, Rows) and len(X_fit) == len(y_fit) == 540
    assert isinstance(X_val, np.ndarray) and X_val.dtype == np.float16 and X_val.shape == (30, 24)
    val_idx = np.setdiff1d(np.arange(300), fit_idx)
    np.testing.assert_array_equal(X_val, train[val_idx])
    np.testing.assert_array_equal(y_val, val_idx % 3)


@pytest.mark.parametrize("kind,extra", [("ridge", []), ("mlp", ["head.epochs=5", "head.hidden=8"]),
                                        ("sklearn", ["head.estimator=LogisticRegression"])])
def test_mirror_averaging_sums_scores_over_both_views(tmp_path, kind, extra):
    """head.tta: val and test labels are the argmax of the summed scores on the image and its mirror."""
    from kmfeat.heads.common import validation_split
    from kmfeat.train import make_head

    entry = features_entry(tmp_path, flip_test=True, d=6, seed=3)
    opts = [f"head.kind={kind}", "head.val=60", "encode.flip_train=true", "encode.flip_test=true"] + extra
    h = config.load(None, opts + ["head.tta=true"]).head
    metrics = train_head(h, entry, Store(tmp_path).writer("train", "t", {}, {}))
    _, val_idx = validation_split(np.asarray(entry.array("train_y")), 60, 0)
    head = make_head(h)
    head = type(head).load(tmp_path / "train" / ".tmp-t" / ("model.joblib" if kind == "sklearn" else "model.pt"))
    score = head.predict_proba if hasattr(head, "predict_proba") else head.decision_function
    y, y_test = np.asarray(entry.array("train_y")), np.asarray(entry.array("test_y"))
    val = (score(np.asarray(entry.array("train"))[val_idx]) + score(np.asarray(entry.array("train_flip"))[val_idx]))
    test = score(np.asarray(entry.array("test"))) + score(np.asarray(entry.array("test_flip")))
    assert metrics["val_accuracy"] == pytest.approx(np.mean(head.classes_[val.argmax(1)] == y[val_idx]))
    assert metrics["test"]["accuracy"] == pytest.approx(np.mean(head.classes_[test.argmax(1)] == y_test))
    single = np.mean(head.predict(np.asarray(entry.array("test"))) == y_test)
    assert metrics["mirror_averaged"] and metrics["test_accuracy_without_mirror_averaging"] == pytest.approx(single)


def test_mirror_averaging_without_mirrored_test_features_says_so_and_predicts_plainly(tmp_path, capsys):
    entry = features_entry(tmp_path)
    h = config.load(None, ["head.tta=true", "head.kind=ridge", "head.val=30"]).head
    metrics = train_head(h, entry, Store(tmp_path).writer("train", "t", {}, {}))
    assert not metrics["mirror_averaged"] and metrics["test_accuracy_without_mirror_averaging"] is None
    assert "without mirror averaging" in capsys.readouterr().err


@pytest.mark.parametrize("kind,extra", [("ridge", []), ("mlp", ["head.epochs=5", "head.hidden=8"])])
def test_mirror_means_fit_and_predict_on_image_plus_mirror_averages(tmp_path, monkeypatch, kind, extra):
    """head.mirrors = "mean": one row per image, (x + mirror) / 2, for fit, val and test; test rows never fit."""
    from kmfeat.heads.common import validation_split
    from kmfeat.heads.ridge import RidgeHead
    from kmfeat.train import make_head

    entry = features_entry(tmp_path, flip_test=True, d=6, seed=3, dtype=np.float16)
    opts = [f"head.kind={kind}", "head.val=60", "encode.flip_train=true", "encode.flip_test=true",
            "head.mirrors=mean"] + extra
    h = config.load(None, opts).head
    calls = []
    spy(monkeypatch, RidgeHead if kind == "ridge" else MLPHead, calls)
    metrics = train_head(h, entry, Store(tmp_path).writer("train", "t", {}, {}))
    y, y_test = np.asarray(entry.array("train_y")), np.asarray(entry.array("test_y"))
    fit_idx, val_idx = validation_split(y, 60, 0)

    def mean(name, idx=slice(None)):
        return ((np.asarray(entry.array(name), np.float64)[idx] + np.asarray(entry.array(name + "_flip"),
                np.float64)[idx]) / 2).astype(np.float32)
    test_mean = mean("test")
    fit_rows = dict(calls)["fit_rows"]
    assert fit_rows == rows(mean("train", fit_idx)) and len(fit_rows) == len(fit_idx) == metrics["n_fit"]
    assert not fit_rows & (rows(test_mean) | rows(np.asarray(entry.array("test"), np.float32)))
    head = make_head(h)
    head = type(head).load(tmp_path / "train" / ".tmp-t" / "model.pt")
    assert metrics["val_accuracy"] == pytest.approx(np.mean(head.predict(mean("train", val_idx)) == y[val_idx]))
    assert metrics["test"]["accuracy"] == pytest.approx(np.mean(head.predict(test_mean) == y_test))
    assert metrics["mirror_averaged"] and metrics["mirrors"] == "mean"
    assert metrics["test_accuracy_without_mirror_averaging"] is None  # single views are not its input


def test_mirror_means_without_mirrored_features_say_so_and_fit_single_views(tmp_path, capsys):
    """`make train HEAD=linear` sets head.mirrors = "mean"; on a pipeline without flips it still trains."""
    h = config.load(None, ["head.mirrors=mean", "head.kind=ridge", "head.val=30"]).head
    metrics = train_head(h, features_entry(tmp_path), Store(tmp_path).writer("train", "t", {}, {}))
    assert metrics["n_fit"] == 2 * 270 and not metrics["mirror_averaged"]
    assert "fitting and predicting on single views" in capsys.readouterr().err


def test_default_val_scales_with_the_data(tmp_path):
    """Issue 13: head.val = 5000 broke every run on <= 5,000 training images. The default is now 10% of the
    training images (5,000 of CIFAR-10's 50,000); a count still works, and a fraction is the same split as
    the count it rounds to."""
    from kmfeat.heads.common import validation_split

    entry = features_entry(tmp_path)
    h = config.load(None, ["head.kind=ridge"]).head
    assert h.val == 0.1
    metrics = train_head(h, entry, Store(tmp_path).writer("train", "t", {}, {}))
    assert metrics["n_val"] == 30 and metrics["n_fit"] == 2 * 270
    y = np.arange(50_000) % 10
    for a, b in zip(validation_split(y, 0.1, 3), validation_split(y, 5000, 3)):
        np.testing.assert_array_equal(a, b)
    for bad in ("head.val=1.5", "head.val=-0.1", "head.val=-3"):
        with pytest.raises(Exception, match="head.val"):
            config.load(None, [bad])
