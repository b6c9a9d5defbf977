"""Classifier heads: standardization, validation split, metrics, the torch MLP and the scikit-learn wrapper."""
import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, confusion_matrix

from kmfeat.errors import KmfeatError
from kmfeat.heads import MLPHead, SklearnHead, Standardizer, classification_metrics, validation_split


def blobs(n, d=20, k=4, sep=4.0, seed=0):
    """k Gaussian classes in d dimensions, float32 features and int64 labels."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(k, d)) * sep
    y = rng.integers(0, k, n).astype(np.int64)
    return (centers[y] + rng.normal(size=(n, d))).astype(np.float32), y


def xor(n, d=10, seed=0):
    """Label = sign(x0) xor sign(x1): no linear model beats chance; other dims are noise."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d)).astype(np.float32) * 3 + 5  # offset/scale so standardization matters
    y = (((X[:, 0] > 5) ^ (X[:, 1] > 5))).astype(np.int64)
    return X, y


# ---------- Standardizer ----------

def test_standardizer_matches_float64_reference_and_is_chunked(monkeypatch):
    import kmfeat.heads.common as common
    monkeypatch.setattr(common, "CHUNK_ROWS", 7)  # force many chunks, including a ragged last one
    rng = np.random.default_rng(1)
    X = (rng.normal(size=(101, 13)) * rng.uniform(0.1, 5, 13) + rng.uniform(-10, 10, 13)).astype(np.float32)
    std = Standardizer().fit(X)
    X64 = X.astype(np.float64)
    assert std.mean_.dtype == np.float32 and std.scale_.dtype == np.float32
    np.testing.assert_allclose(std.mean_, X64.mean(0), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(std.scale_, np.sqrt(X64.var(0) + 0.01), rtol=1e-6)
    out = std.transform(X)
    assert out.dtype == np.float32 and out.shape == X.shape
    np.testing.assert_allclose(out, (X64 - X64.mean(0)) / np.sqrt(X64.var(0) + 0.01), rtol=1e-5, atol=1e-5)
    buf = X.copy()
    assert std.transform_inplace(buf) is buf
    np.testing.assert_array_equal(buf, out)


def test_standardizer_accepts_readonly_memmap(tmp_path):
    X, _ = blobs(300, d=8)
    np.save(tmp_path / "x.npy", X)
    mm = np.load(tmp_path / "x.npy", mmap_mode="r")
    std = Standardizer().fit(mm)
    np.testing.assert_allclose(std.transform(mm), Standardizer().fit(X).transform(X), rtol=1e-6)
    with pytest.raises(KmfeatError, match="columns"):
        std.transform(X[:, :5])


def test_mlp_standardizes_with_train_statistics_only():
    X, y = blobs(400, d=12, seed=2)
    Xv, yv = blobs(100, d=12, seed=3)
    kw = dict(hidden=8, epochs=2, device="cpu", batch=64)
    a = MLPHead(**kw).fit(X, y, Xv, yv)
    b = MLPHead(**kw).fit(X, y, Xv * 10 + 3, yv)  # different val features: same statistics
    X64 = X.astype(np.float64)
    np.testing.assert_allclose(a.standardizer_.mean_, X64.mean(0), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(a.standardizer_.scale_, np.sqrt(X64.var(0) + 0.01), rtol=1e-6)
    np.testing.assert_array_equal(a.standardizer_.mean_, b.standardizer_.mean_)
    np.testing.assert_array_equal(a.standardizer_.scale_, b.standardizer_.scale_)
    assert not np.allclose(a.standardizer_.mean_, np.concatenate([X, Xv]).mean(0), atol=1e-3)


@pytest.mark.parametrize("power", [0.5, 0.25, 1.7])
def test_power_against_float64_reference_fitted_on_train_rows_only(power):
    """head.power: sign(x)|x|^p, then train-only standardization; val and test never move the statistics."""
    rng = np.random.default_rng(4)
    X = (rng.normal(size=(150, 9)) * rng.uniform(0.5, 4, 9)).astype(np.float32)
    p64 = np.sign(X.astype(np.float64)) * np.abs(X.astype(np.float64)) ** power
    std = Standardizer(power=power).fit(X)
    np.testing.assert_allclose(std.mean_, p64.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(std.scale_, np.sqrt(p64.var(0) + 0.01), rtol=1e-5)
    Xt = (rng.normal(size=(40, 9)) * 3).astype(np.float32)
    want = (np.sign(Xt.astype(np.float64)) * np.abs(Xt.astype(np.float64)) ** power - p64.mean(0)) / np.sqrt(
        p64.var(0) + 0.01)
    np.testing.assert_allclose(std.transform(Xt), want, rtol=1e-4, atol=1e-5)
    Xv, yv = blobs(60, d=9, seed=5)
    y = np.arange(150) % 4
    for head in (MLPHead(hidden=4, epochs=1, device="cpu", power=power), SklearnHead("RidgeClassifier", power=power)):
        a = head.fit(X, y, Xv, yv).standardizer_
        b = type(head)(**head.get_params()).fit(X, y, Xv * 5 - 2, yv).standardizer_
        np.testing.assert_array_equal(a.mean_, std.mean_)
        np.testing.assert_array_equal(b.scale_, std.scale_)


# ---------- validation_split ----------

def test_validation_split_balanced_disjoint_seeded():
    y = np.repeat(np.arange(10), 50)
    np.random.default_rng(0).shuffle(y)
    tr, va = validation_split(y, 100, seed=3)
    assert len(va) == 100 and len(tr) == 400
    assert np.intersect1d(tr, va).size == 0
    np.testing.assert_array_equal(np.sort(np.concatenate([tr, va])), np.arange(500))
    np.testing.assert_array_equal(np.bincount(y[va], minlength=10), np.full(10, 10))
    tr2, va2 = validation_split(y, 100, seed=3)
    np.testing.assert_array_equal(va, va2)
    np.testing.assert_array_equal(tr, tr2)
    assert not np.array_equal(va, validation_split(y, 100, seed=4)[1])


def test_validation_split_unbalanced_and_edges():
    y = np.array([0] * 70 + [1] * 25 + [2] * 5)
    tr, va = validation_split(y, 20, seed=0)
    np.testing.assert_array_equal(np.bincount(y[va], minlength=3), [14, 5, 1])
    tr, va = validation_split(y, 0)
    assert va.size == 0 and np.array_equal(tr, np.arange(100))
    tr, va = validation_split(y, 97)  # every class keeps one training example
    np.testing.assert_array_equal(np.bincount(y[tr], minlength=3), [1, 1, 1])
    for bad in (-1, 98, 2.5):
        with pytest.raises(KmfeatError, match="head.val"):
            validation_split(y, bad)


# ---------- metrics ----------

def test_classification_metrics_vs_sklearn():
    rng = np.random.default_rng(5)
    classes = ["a", "b", "c", "d", "e"]
    y_true = rng.integers(0, 4, 300)  # class "e" never occurs as truth
    y_pred = np.where(rng.random(300) < 0.6, y_true, rng.integers(0, 5, 300))
    m = classification_metrics(y_true, y_pred, classes)
    cm = confusion_matrix(y_true, y_pred, labels=range(5))
    assert m["n"] == 300
    assert m["accuracy"] == pytest.approx(accuracy_score(y_true, y_pred))
    np.testing.assert_array_equal(np.array(m["confusion"]), cm)
    for i, name in enumerate(classes[:4]):
        assert m["per_class_accuracy"][name] == pytest.approx(cm[i, i] / cm[i].sum())
    assert m["per_class_accuracy"]["e"] is None
    with pytest.raises(ValueError):
        classification_metrics([0, 7], [0, 1], classes)


# ---------- MLP ----------

def test_mlp_learns_nonlinear_problem():
    X, y = xor(3000, seed=0)
    Xt, yt = xor(1000, seed=1)
    Xv, yv = xor(500, seed=2)
    head = MLPHead(hidden=64, dropout=0.1, epochs=15, batch=128, lr=1e-2, patience=5, device="cpu",
                   precision="fp32").fit(X, y, Xv, yv)
    acc = np.mean(head.predict(Xt) == yt)
    assert acc >= 0.97, acc
    linear = SklearnHead("LogisticRegression").fit(X, y)
    assert np.mean(linear.predict(Xt) == yt) < 0.7  # the problem really needs the hidden layer
    proba = head.predict_proba(Xt)
    assert proba.dtype == np.float32 and proba.shape == (1000, 2)
    assert np.isfinite(proba).all()
    np.testing.assert_allclose(proba.sum(1), 1, atol=1e-5)


def test_mlp_bf16_training_learns_and_keeps_float32_weights():
    X, y = blobs(1500, d=20, k=4, sep=1.0, seed=15)
    fp32, bf16 = (MLPHead(hidden=32, epochs=8, batch=128, lr=1e-2, device="cpu", precision=p).fit(X[:1000], y[:1000])
                  for p in ("fp32", "bf16"))
    assert bf16.precision_ == "bf16" and fp32.precision_ == "fp32"
    assert all(p.dtype == torch.float32 for p in bf16.model_.parameters())
    acc32, acc16 = (np.mean(h.predict(X[1000:]) == y[1000:]) for h in (fp32, bf16))
    assert acc16 >= 0.9 and abs(acc16 - acc32) <= 0.03, (acc16, acc32)
    assert bf16.predict_proba(X).dtype == np.float32


def test_mlp_nonconsecutive_labels_map_back_to_classes():
    X, y = blobs(600, k=3, seed=4)
    y = np.array([10, 20, 30])[y]
    head = MLPHead(hidden=16, epochs=10, batch=64, lr=1e-2, device="cpu").fit(X, y)
    np.testing.assert_array_equal(head.classes_, [10, 20, 30])
    assert set(np.unique(head.predict(X))) <= {10, 20, 30}
    assert np.mean(head.predict(X) == y) > 0.95


def test_mlp_dropout_on_in_training_off_in_eval():
    X, y = blobs(200, d=16, seed=6)
    head = MLPHead(hidden=256, dropout=0.5, epochs=1, device="cpu").fit(X, y)
    model = head.model_
    assert not model.training
    seen = []
    handle = model[3].register_forward_hook(lambda mod, inp, out: seen.append((inp[0].detach(), out.detach())))
    xb = torch.from_numpy(head.standardizer_.transform(X[:64]))
    try:
        model.train()
        with torch.no_grad():
            t1, t2 = model(xb), model(xb)
        model.eval()
        p1, p2 = head.predict_proba(X[:64]), head.predict_proba(X[:64])
    finally:
        handle.remove()
        model.eval()
    assert not torch.equal(t1, t2)
    np.testing.assert_array_equal(p1, p2)
    (tin, tout), (ein, eout) = seen[0], seen[-1]
    active = tin > 0  # ReLU outputs that dropout could zero
    frac = (tout[active] == 0).float().mean().item()
    assert 0.4 < frac < 0.6
    torch.testing.assert_close(tout[active & (tout != 0)], 2 * tin[active & (tout != 0)])  # inverted-dropout scaling
    torch.testing.assert_close(eout, ein)


def test_mlp_early_stopping_restores_best_epoch():
    X, y = blobs(400, d=20, sep=0.6, seed=7)
    Xv, yv = blobs(200, d=20, sep=0.6, seed=8)
    head = MLPHead(hidden=256, dropout=0.0, epochs=40, batch=32, lr=1e-2, schedule="none", patience=3,
                   device="cpu").fit(X, y, Xv, yv)
    hist = head.history_
    assert [h["epoch"] for h in hist] == list(range(1, head.n_epochs_run_ + 1))
    val = np.array([h["val_acc"] for h in hist])
    assert head.best_epoch_ == int(np.argmax(val)) + 1  # argmax: earliest on ties
    assert head.n_epochs_run_ < 40 and head.n_epochs_run_ == head.best_epoch_ + 3  # stopped by patience
    assert all(set(h) == {"epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds"} for h in hist)
    # restored weights are the best epoch's: re-evaluating on val gives its recorded accuracy
    assert np.mean(head.predict(Xv) == yv) == pytest.approx(val.max())
    assert "X_test" not in MLPHead.fit.__code__.co_varnames[: MLPHead.fit.__code__.co_argcount]
    assert MLPHead.fit.__code__.co_varnames[: MLPHead.fit.__code__.co_argcount] == ("self", "X", "y", "X_val", "y_val",
                                                                                    "checkpoint")


def test_mlp_without_validation_runs_all_epochs_and_schedules():
    X, y = blobs(200, d=8, seed=9)
    for schedule, expected in (("cosine", [1e-2, 0.5 * (1 + np.cos(np.pi / 4)) * 1e-2, 5e-3]),
                               ("step", [1e-2, 1e-2, 1e-3, 1e-4]), ("none", [1e-2] * 4)):
        head = MLPHead(hidden=8, epochs=4, lr=1e-2, schedule=schedule, optimizer="sgd", device="cpu").fit(X, y)
        assert head.n_epochs_run_ == 4 and head.best_epoch_ == 4
        assert all(h["val_acc"] is None for h in head.history_)
        np.testing.assert_allclose([h["lr"] for h in head.history_][: len(expected)], expected)


def test_mlp_is_seeded_and_accepts_memmap(tmp_path):
    X, y = blobs(300, d=10, seed=10)
    np.save(tmp_path / "x.npy", X)
    mm = np.load(tmp_path / "x.npy", mmap_mode="r")
    kw = dict(hidden=16, epochs=3, device="cpu", seed=5)
    a = MLPHead(**kw).fit(mm, y)
    b = MLPHead(**kw).fit(X, y)
    np.testing.assert_array_equal(a.predict_proba(X), b.predict_proba(mm))
    assert not mm.flags.writeable and np.array_equal(np.asarray(mm), X)  # input untouched


def test_mlp_save_load_round_trip(tmp_path):
    X, y = blobs(300, d=10, seed=11)
    head = MLPHead(hidden=16, epochs=3, device="cpu", input_dropout=0.1).fit(X[:200], y[:200], X[200:], y[200:])
    head.save(tmp_path / "mlp.pt")
    back = MLPHead.load(tmp_path / "mlp.pt")
    assert back.get_params() == head.get_params()
    np.testing.assert_array_equal(back.predict_proba(X), head.predict_proba(X))
    np.testing.assert_array_equal(back.classes_, head.classes_)
    assert back.history_ == head.history_ and back.best_epoch_ == head.best_epoch_
    (tmp_path / "junk.pt").write_bytes(b"not a model")
    with pytest.raises(KmfeatError, match="junk.pt"):
        MLPHead.load(tmp_path / "junk.pt")


@pytest.mark.parametrize("param,value", [
    ("dropout", -0.1), ("dropout", 1.0), ("hidden", 0), ("epochs", 0), ("lr", 0), ("lr", -1.0),
    ("optimizer", "adam2"), ("schedule", "linear"), ("batch", 0), ("patience", 0), ("input_dropout", 1.5),
    ("precision", "fp16"), ("label_smoothing", 1.0),
])
def test_mlp_bad_params(param, value):
    X, y = blobs(50, d=4)
    with pytest.raises(KmfeatError, match=rf"^head\.{param}: expected"):
        MLPHead(**{param: value}, device="cpu").fit(X, y)


def test_mlp_bad_inputs():
    X, y = blobs(50, d=4)
    with pytest.raises(KmfeatError, match="labels"):
        MLPHead(device="cpu").fit(X, y[:40])
    with pytest.raises(KmfeatError, match="validation labels"):
        MLPHead(hidden=4, epochs=1, device="cpu").fit(X, y % 2, X, y)  # val has classes not seen in train
    with pytest.raises(KmfeatError, match="head.device"):
        MLPHead(device="tpu").fit(X, y)


# ---------- scikit-learn head ----------

@pytest.mark.parametrize("name,params", [("LogisticRegression", {"max_iter": 500}),
                                         ("LinearSVC", {"loss": "squared_hinge", "dual": True})])
def test_sklearn_head_learns(name, params):
    X, y = blobs(600, d=20, k=4, seed=12)
    Xt, yt = blobs(300, d=20, k=4, seed=12)
    head = SklearnHead(name, params=params).fit(X[:500], y[:500], X[500:], y[500:])
    assert np.mean(head.predict(Xt) == yt) >= 0.97
    assert type(head.estimator_).__name__ == name
    assert head.best_params_ == params and len(head.grid_scores_) == 1
    np.testing.assert_array_equal(head.classes_, np.arange(4))
    X64 = X[:500].astype(np.float64)
    np.testing.assert_allclose(head.standardizer_.mean_, X64.mean(0), rtol=1e-5, atol=1e-5)


def test_sklearn_grid_picks_best_on_validation():
    # weakly separated classes: a tiny C underfits badly, so C=1 must win on val
    X, y = blobs(900, d=40, k=3, sep=0.5, seed=13)
    head = SklearnHead("LogisticRegression", params={"max_iter": 300}, grid={"C": [1e-6, 1.0]})
    head.fit(X[:600], y[:600], X[600:], y[600:])
    scores = {s["params"]["C"]: s["val_acc"] for s in head.grid_scores_}
    assert scores[1.0] > scores[1e-6] + 0.1
    assert head.best_params_ == {"max_iter": 300, "C": 1.0}
    assert head.estimator_.C == 1.0
    assert np.mean(head.predict(X[600:]) == y[600:]) == pytest.approx(scores[1.0])
    with pytest.raises(KmfeatError, match="head.grid"):
        SklearnHead("LogisticRegression", grid={"C": [0.1, 1.0]}).fit(X, y)  # a grid needs a val split


def test_sklearn_errors():
    X, y = blobs(60, d=4)
    with pytest.raises(KmfeatError, match=r"head\.estimator: .*LogisticRegression"):
        SklearnHead("LogisticRegresion").fit(X, y)
    with pytest.raises(KmfeatError, match=r"head\.params\.Cee: .*did you mean C"):
        SklearnHead("LinearSVC", params={"Cee": 1.0}).fit(X, y)
    with pytest.raises(KmfeatError, match=r"head\.grid\.alpha"):
        SklearnHead("LinearSVC", grid={"alpha": [1, 2]}).fit(X, y, X, y)
    with pytest.raises(KmfeatError, match=r"head\.params: .*C"):
        SklearnHead("LinearSVC", params={"C": -1.0}).fit(X, y)


def test_sklearn_save_load_round_trip(tmp_path):
    X, y = blobs(300, d=10, seed=14)
    head = SklearnHead("LogisticRegression", grid={"C": [0.01, 1.0]}).fit(X[:200], y[:200], X[200:], y[200:])
    head.save(tmp_path / "head.joblib")
    back = SklearnHead.load(tmp_path / "head.joblib")
    np.testing.assert_array_equal(back.predict(X), head.predict(X))
    np.testing.assert_array_equal(back.predict_proba(X), head.predict_proba(X))
    assert back.best_params_ == head.best_params_
    (tmp_path / "junk.joblib").write_bytes(b"junk")
    with pytest.raises(KmfeatError, match="junk.joblib"):
        SklearnHead.load(tmp_path / "junk.joblib")


def test_sklearn_convergence_warning_is_one_line_and_grid_edges_are_said(capsys):
    """Issue 13: scikit-learn's multi-line ConvergenceWarnings became one line per fit, and a best value at the
    edge of a grid says which way to widen it."""
    import warnings

    X, y = blobs(400, d=10, k=3, sep=1.0, seed=2)
    Xv, yv = blobs(200, d=10, k=3, sep=1.0, seed=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning may escape
        head = SklearnHead("LogisticRegression", params={"max_iter": 2}, grid={"C": [1e-4, 1e-3]}).fit(X, y, Xv, yv)
    err = capsys.readouterr().err
    assert err.count("LogisticRegression did not converge in 2 iterations; raise head.params.max_iter") == 2
    C = head.best_params_["C"]
    side, way = ("largest", "larger") if C == 1e-3 else ("smallest", "smaller")
    assert f"head.grid.C: the best value on val, {C:g}, is the {side} of the grid (0.0001, 0.001); add {way}" in err


def test_grid_edge_note():
    from kmfeat.heads.common import grid_edge_note

    assert grid_edge_note("head.grid.C", [0.1, 1, 10], 1) is None and grid_edge_note("x", [3], 3) is None
    assert "smallest" in grid_edge_note("head.grid.C", [10, 0.1, 1], 0.1)


@pytest.mark.parametrize("stop_after", [1, 4])
def test_mlp_interrupted_then_resumed_ends_with_the_same_weights(tmp_path, monkeypatch, stop_after):
    """Issue 13: Ctrl-C during `train` lost the MLP's epochs. It checkpoints every epoch; a fit that finds the
    checkpoint resumes and ends bit-identical to an uninterrupted fit."""
    X, y = blobs(600, d=12, k=3, sep=1.0, seed=21)
    Xv, yv = blobs(150, d=12, k=3, sep=1.0, seed=22)
    kw = dict(hidden=16, epochs=6, batch=64, lr=1e-2, dropout=0.3, device="cpu", precision="fp32", seed=3,
              patience=10)
    whole = MLPHead(**kw).fit(X, y, Xv, yv)
    ckpt = tmp_path / "mlp.pt"
    evaluate, calls = MLPHead._evaluate, []

    def interrupt(*args):
        calls.append(1)
        if len(calls) > stop_after:
            raise KeyboardInterrupt
        return evaluate(*args)
    monkeypatch.setattr(MLPHead, "_evaluate", staticmethod(interrupt))
    with pytest.raises(KeyboardInterrupt):
        MLPHead(**kw).fit(X, y, Xv, yv, checkpoint=ckpt)
    monkeypatch.setattr(MLPHead, "_evaluate", staticmethod(evaluate))
    assert ckpt.is_file()
    resumed = MLPHead(**kw).fit(X, y, Xv, yv, checkpoint=ckpt)
    for a, b in zip(whole.model_.state_dict().values(), resumed.model_.state_dict().values()):
        assert torch.equal(a, b)
    assert resumed.history_[0]["train_loss"] == whole.history_[0]["train_loss"]
    assert [r["val_acc"] for r in resumed.history_] == [r["val_acc"] for r in whole.history_]
    other = MLPHead(**{**kw, "lr": 2e-2}).fit(X, y, Xv, yv, checkpoint=ckpt)  # another fit ignores it
    assert len(other.history_) == 6
