"""Linear L2-SVM head: optimum vs a float64 scipy reference, learning, C selection on val, save/load, param errors."""
import numpy as np
import pytest
import torch
from scipy.optimize import minimize

from kmfeat.errors import KmfeatError
from kmfeat.heads import HEADS, LinearSVMHead
from kmfeat.heads.svm import Products, SquaredHingeObjective, agrees_with_float64, onednn_linear


def blobs(n, d=20, k=3, sep=1.0, weights=None, seed=0):
    """k Gaussian classes in d dims, scaled and shifted so standardization matters; float32 X, int64 y."""
    rng = np.random.default_rng(seed)
    centers = np.random.default_rng(100).normal(size=(k, d)) * sep
    y = rng.choice(k, size=n, p=weights).astype(np.int64)
    X = (centers[y] + rng.normal(size=(n, d))) * rng.uniform(0.5, 4, d) + rng.uniform(-5, 5, d)
    return X.astype(np.float32), y


def reference_objective(Xs, y, k, C):
    """The exact float64 objective and gradient over stacked (W (d, k), b (k,)), as scipy wants it."""
    d = Xs.shape[1]
    Y = np.where(y[:, None] == np.arange(k), 1.0, -1.0)

    def f(p):
        W, b = p[:d * k].reshape(d, k), p[d * k:]
        slack = np.maximum(0.0, 1.0 - Y * (Xs @ W + b))
        G = -2.0 * C * Y * slack
        return 0.5 * np.sum(W * W) + C * np.sum(slack * slack), np.concatenate([(W + Xs.T @ G).ravel(), G.sum(0)])
    return f


def reference_solution(Xs, y, k, C):
    """(objective, coef (k, d), intercept (k,)) from scipy L-BFGS-B in float64 to tight tolerance."""
    d = Xs.shape[1]
    res = minimize(reference_objective(Xs, y, k, C), np.zeros(d * k + k), jac=True, method="L-BFGS-B",
                   options={"maxiter": 20000, "ftol": 1e-16, "gtol": 1e-12, "maxcor": 50})
    return res.fun, res.x[:d * k].reshape(d, k).T, res.x[d * k:]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("C", [0.003, 0.3])
def test_reaches_float64_reference_optimum(dtype, C):
    X, y = blobs(600, d=20, k=3)
    head = LinearSVMHead(C=C, tol=1e-10, max_iter=2000, device="cpu", dtype=dtype).fit(X, y)
    Xs = head.standardizer_.transform(X).astype(np.float64)
    f_ref, coef_ref, b_ref = reference_solution(Xs, y, 3, C)
    params = np.concatenate([head.coef_.T.astype(np.float64).ravel(), head.intercept_.astype(np.float64)])
    f_head = reference_objective(Xs, y, 3, C)(params)[0]  # the objective of our solution, evaluated in float64
    assert abs(f_head - f_ref) <= 1e-4 * f_ref
    assert abs(head.objective_ - f_ref) <= 1e-4 * f_ref
    scale = np.abs(coef_ref).max()
    np.testing.assert_allclose(head.coef_, coef_ref, rtol=0, atol=1e-3 * scale)
    np.testing.assert_allclose(head.intercept_, b_ref, rtol=0, atol=1e-3 * max(1.0, np.abs(b_ref).max()))
    assert head.coef_.dtype == np.float32 and head.coef_.shape == (3, 20)
    assert head.intercept_.dtype == np.float32 and head.intercept_.shape == (3,)
    assert 1 <= head.n_iter_ < 2000


@pytest.mark.parametrize("dtype, engine", [(torch.float32, "auto"), (torch.float32, "addmm"),
                                           (torch.float64, "auto")])
def test_objective_and_gradient_match_float64_reference(dtype, engine):
    rng = np.random.default_rng(4)
    n, d, k, C = 300, 15, 4, 0.07
    X, y = rng.normal(size=(n, d)), rng.integers(0, k, n)
    W, b = rng.normal(size=(k, d)) * 0.3, rng.normal(size=k) * 0.3
    f_ref, g_ref = reference_objective(X, y, k, C)(np.concatenate([W.T.ravel(), b]))
    g_ref = np.concatenate([g_ref[:d * k].reshape(d, k).T.ravel(), g_ref[d * k:]])  # as (W (k, d), b)
    products = Products(torch.tensor(X, dtype=dtype))
    if engine == "addmm":
        products.linear = None
    Y = torch.where(torch.from_numpy(y)[:, None] == torch.arange(k), 1.0, -1.0).to(dtype)
    Wt, bt = torch.tensor(W, dtype=dtype), torch.tensor(b, dtype=dtype)
    obj = SquaredHingeObjective(products, Y, Wt, bt, C)
    Wt.grad = torch.full_like(Wt, float("nan"))
    bt.grad = torch.full_like(bt, float("nan"))
    loss = obj()
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    assert loss == pytest.approx(f_ref, rel=tol)
    grad = np.concatenate([Wt.grad.double().numpy().ravel(), bt.grad.double().numpy()])
    assert not np.isnan(grad).any()
    np.testing.assert_allclose(grad, g_ref, rtol=tol, atol=tol * np.abs(g_ref).max())
    assert obj() == loss and obj.n_evals == 1  # a point already seen costs no new evaluation
    Wt.add_(0.01)
    assert obj() != loss and obj.n_evals == 2
    scores = products.scores(Wt, bt).double().numpy()
    np.testing.assert_allclose(scores, X @ Wt.double().numpy().T + b, rtol=tol, atol=tol * np.abs(scores).max())


def test_fast_cpu_matmul_only_where_it_is_float32_exact():
    linear = onednn_linear()
    assert Products(torch.zeros(4, 3)).linear is linear
    assert Products(torch.zeros(4, 3, dtype=torch.float64)).linear is None
    if linear is not None:
        assert agrees_with_float64(linear)

    def exact(a, w, bias, *args):
        return a @ w.T

    def bf16(a, w, bias, *args):  # what a reduced-precision oneDNN mode would give
        return (a.bfloat16() @ w.bfloat16().T).float()

    def broken(a, w, bias, *args):
        raise RuntimeError("no kernel")

    assert agrees_with_float64(exact)
    assert not agrees_with_float64(bf16)
    assert not agrees_with_float64(broken)


def test_learns_separable_multiclass_problem_and_decision_function():
    X, y = blobs(1500, d=30, k=5, sep=3.0, seed=1)
    Xt, yt = blobs(600, d=30, k=5, sep=3.0, seed=2)
    y, yt = y * 10 + 7, yt * 10 + 7  # non-consecutive labels map back through classes_
    head = LinearSVMHead(C=0.01, device="cpu").fit(X, y)
    np.testing.assert_array_equal(head.classes_, np.arange(5) * 10 + 7)
    assert np.mean(head.predict(Xt) == yt) >= 0.95
    scores = head.decision_function(Xt)
    assert scores.shape == (600, 5) and scores.dtype == np.float32 and np.isfinite(scores).all()
    X64 = Xt.astype(np.float64)
    Xs = (X64 - head.standardizer_.mean_) / head.standardizer_.scale_
    ref = Xs @ head.coef_.T.astype(np.float64) + head.intercept_
    np.testing.assert_allclose(scores, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    np.testing.assert_array_equal(head.predict(Xt), head.classes_[ref.argmax(1)])
    assert head.best_params_ == {"C": 0.01} and len(head.grid_scores_) == 1
    assert head.grid_scores_[0]["val_acc"] is None


def test_c_grid_picks_best_on_val_in_increasing_order_with_warm_starts():
    weights = [0.5, 0.3, 0.2]  # a tiny C leaves w ~ 0 and the biases then vote for the majority class
    X, y = blobs(900, d=20, k=3, sep=2.0, weights=weights, seed=3)
    Xv, yv = blobs(600, d=20, k=3, sep=2.0, weights=weights, seed=4)
    head = LinearSVMHead(C=[1.0, 1e-7, 1e-2], device="cpu", tol=1e-9, max_iter=1000).fit(X, y, Xv, yv)
    cs = [s["params"]["C"] for s in head.grid_scores_]
    assert cs == [1e-7, 1e-2, 1.0]
    accs = [s["val_acc"] for s in head.grid_scores_]
    assert accs[0] < 0.6 and max(accs) >= 0.95
    best = max(accs)
    assert head.best_params_["C"] == cs[accs.index(best)]  # first (smallest) C among ties
    assert np.mean(head.predict(Xv) == yv) == pytest.approx(best)
    for s in head.grid_scores_:
        assert s["seconds"] > 0 and 1 <= s["n_iter"] <= s["n_evals"] and s["objective"] > 0
    single = LinearSVMHead(C=head.best_params_["C"], device="cpu", tol=1e-9, max_iter=1000).fit(X, y)
    assert head.objective_ == pytest.approx(single.objective_, rel=1e-5)  # a warm start reaches the same optimum
    np.testing.assert_allclose(head.coef_, single.coef_, atol=1e-3 * np.abs(single.coef_).max())


def test_stopping_rules(capsys):
    X, y = blobs(600, d=20, k=3, seed=10)
    f_opt = LinearSVMHead(C=0.05, device="cpu", dtype="float64", tol=0, max_iter=3000).fit(X, y).objective_
    capped = LinearSVMHead(C=0.05, device="cpu", tol=0, max_iter=3).fit(X, y)
    loose = LinearSVMHead(C=0.05, device="cpu", tol=1e-2).fit(X, y)
    tight = LinearSVMHead(C=0.05, device="cpu", tol=1e-7).fit(X, y)
    assert capped.n_iter_ == 3 and capped.objective_ > f_opt * (1 + 1e-3)
    assert [s["converged"] for s in (capped.grid_scores_ + loose.grid_scores_ + tight.grid_scores_)] == [
        False, True, True]
    assert "stopped at head.params.max_iter=3 before converging" in capsys.readouterr().err
    assert 5 <= loose.n_iter_ < tight.n_iter_ < 300
    assert f_opt <= loose.objective_ * (1 + 1e-6) and loose.objective_ <= f_opt * (1 + 0.05)
    assert tight.objective_ == pytest.approx(f_opt, rel=1e-5)


def test_ties_go_to_the_smaller_c():
    X, y = blobs(300, d=10, k=2, sep=6.0, seed=5)
    Xv, yv = blobs(300, d=10, k=2, sep=6.0, seed=6)
    head = LinearSVMHead(C=(10.0, 1.0), device="cpu").fit(X, y, Xv, yv)
    assert [s["val_acc"] for s in head.grid_scores_] == [1.0, 1.0]
    assert head.best_params_ == {"C": 1.0}


def test_memmap_input_is_read_not_modified(tmp_path):
    X, y = blobs(400, d=12, k=3, seed=7)
    np.save(tmp_path / "x.npy", X)
    mm = np.load(tmp_path / "x.npy", mmap_mode="r")
    a = LinearSVMHead(C=0.1, device="cpu").fit(mm, y)
    b = LinearSVMHead(C=0.1, device="cpu").fit(X.copy(), y)
    np.testing.assert_array_equal(np.load(tmp_path / "x.npy"), X)
    np.testing.assert_array_equal(a.coef_, b.coef_)
    np.testing.assert_array_equal(a.predict(mm), b.predict(X))


def test_save_load_round_trip(tmp_path):
    X, y = blobs(400, d=12, k=3, seed=8)
    labels = np.array(["cat", "dog", "frog"])[y]
    Xv, yv = blobs(200, d=12, k=3, seed=9)
    head = LinearSVMHead(C=[0.001, 0.1], device="cpu").fit(X, labels, Xv, np.array(["cat", "dog", "frog"])[yv])
    head.save(tmp_path / "svm.pt")
    back = LinearSVMHead.load(tmp_path / "svm.pt")
    assert back.get_params() == head.get_params()
    np.testing.assert_array_equal(back.classes_, head.classes_)
    np.testing.assert_array_equal(back.decision_function(Xv), head.decision_function(Xv))
    np.testing.assert_array_equal(back.predict(Xv), head.predict(Xv))
    assert back.best_params_ == head.best_params_ and back.grid_scores_ == head.grid_scores_
    assert back.n_iter_ == head.n_iter_ and back.objective_ == head.objective_
    (tmp_path / "junk.pt").write_bytes(b"not a model")
    with pytest.raises(KmfeatError, match="junk.pt"):
        LinearSVMHead.load(tmp_path / "junk.pt")
    torch.save({"format": "something else"}, tmp_path / "other.pt")
    with pytest.raises(KmfeatError, match="other.pt"):
        LinearSVMHead.load(tmp_path / "other.pt")


def test_registered_as_svm_head():
    assert HEADS["svm"] is LinearSVMHead


@pytest.mark.parametrize("params, match", [
    ({"C": 0}, "head.C"),
    ({"C": -1.0}, "head.C"),
    ({"C": []}, "head.C"),
    ({"C": (0.1, "x")}, "head.C"),
    ({"C": float("nan")}, "head.C"),
    ({"max_iter": 0}, "head.max_iter"),
    ({"max_iter": 2.5}, "head.max_iter"),
    ({"tol": -1}, "head.tol"),
    ({"dtype": "float16"}, "head.dtype"),
    ({"device": "tpu"}, "head.device"),
])
def test_bad_params_raise_kmfeat_error(params, match):
    X, y = blobs(60, d=5, k=3)
    with pytest.raises(KmfeatError, match=match):
        LinearSVMHead(**{"C": 0.1, **params}).fit(X, y)


def test_bad_data_raise_kmfeat_error():
    X, y = blobs(60, d=5, k=3)
    with pytest.raises(KmfeatError, match="head.grid.C"):
        LinearSVMHead(C=(0.1, 1.0), device="cpu").fit(X, y)
    with pytest.raises(KmfeatError, match="train labels"):
        LinearSVMHead(C=0.1, device="cpu").fit(X, y[:-1])
    with pytest.raises(KmfeatError, match="2 classes"):
        LinearSVMHead(C=0.1, device="cpu").fit(X, np.zeros(60, np.int64))
    with pytest.raises(KmfeatError, match="train features"):
        LinearSVMHead(C=0.1, device="cpu").fit(X[:, 0], y)
    with pytest.raises(KmfeatError, match="validation"):
        LinearSVMHead(C=0.1, device="cpu").fit(X, y, X[:10, :3], y[:10])
    with pytest.raises(KmfeatError, match="validation"):
        LinearSVMHead(C=0.1, device="cpu").fit(X, y, X[:10], None)
    head = LinearSVMHead(C=0.1, device="cpu").fit(X, y)
    with pytest.raises(KmfeatError, match="columns"):
        head.predict(X[:, :4])


def test_remembered_points_are_looked_up_newest_first(monkeypatch):
    """The line search re-asks the latest point: it must be found with one comparison of W (each torch.equal is
    a host sync on CUDA), not after scanning every older point (issue 12 item 9)."""
    rng = np.random.default_rng(1)
    X, y = torch.tensor(rng.normal(size=(50, 6))), rng.integers(0, 3, 50)
    Y = torch.where(torch.from_numpy(y)[:, None] == torch.arange(3), 1.0, -1.0).double()
    W, b = torch.zeros(3, 6, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    obj = SquaredHingeObjective(Products(X), Y, W, b, 0.1)
    for step in range(4):
        W.fill_(0.01 * step)
        obj()
    calls = []
    real_equal = torch.equal
    monkeypatch.setattr(torch, "equal", lambda a, c: calls.append(1) or real_equal(a, c))
    loss = obj()
    assert obj.n_evals == 4 and len(calls) == 2 and np.isfinite(loss)  # W and b of the newest point only
