"""Ridge head: closed form vs scikit-learn's Ridge, alpha selection on val, float16 memmaps, power, save/load,
param errors, and the train stage (test rows never reach fit)."""
import json

import numpy as np
import pytest
import torch
from sklearn.linear_model import Ridge

from kmfeat import config
from kmfeat.cache import Store
from kmfeat.errors import KmfeatError
from kmfeat.heads import HEADS
from kmfeat.heads.common import Standardizer
from kmfeat.heads.ridge import EIGH_COST_IN_CHOLESKYS, RELATIVE_ALPHAS, RidgeHead
from kmfeat.stages import _train_params
from kmfeat.train import make_head, train_head
from test_train import features_entry, rows, spy


def blobs(n, d=20, k=3, sep=1.0, seed=0):
    """k Gaussian classes in d dims, scaled and shifted (negative values too) so standardization matters."""
    rng = np.random.default_rng(seed)
    centers = np.random.default_rng(100).normal(size=(k, d)) * sep
    y = rng.integers(0, k, n)
    X = (centers[y] + rng.normal(size=(n, d))) * rng.uniform(0.5, 4, d) + rng.uniform(-3, 3, d)
    return X.astype(np.float32), y


def targets(y, k):
    return np.where(np.asarray(y)[:, None] == np.arange(k), 1.0, -1.0)


def standardized64(head, X):
    """X standardized with the head's own (float32) statistics, in float64."""
    std = head.standardizer_
    Xp = np.sign(X.astype(np.float64)) * np.abs(X.astype(np.float64)) ** std.power
    return (Xp - std.mean_.astype(np.float64)) / std.scale_.astype(np.float64)


def assert_close(got, want, rtol):
    np.testing.assert_allclose(got, want, rtol=0, atol=rtol * np.abs(want).max())


@pytest.mark.parametrize("solver", ["eigh", "cholesky"])
def test_matches_sklearn_ridge(solver):
    X, y = blobs(500, d=20, k=3)
    head = RidgeHead(alpha=3.0, gram_dtype="float64", solver=solver, chunk_rows=128).fit(X, y)
    assert head.solver_ == solver
    ref = Ridge(alpha=3.0, fit_intercept=True).fit(standardized64(head, X), targets(y, 3))
    assert head.coef_.shape == (3, 20) and head.coef_.dtype == np.float32
    assert head.intercept_.shape == (3,) and head.intercept_.dtype == np.float32
    assert_close(head.coef_, ref.coef_, 1e-6)
    assert_close(head.intercept_, ref.intercept_, 1e-6)
    fast = RidgeHead(alpha=3.0, solver=solver, chunk_rows=128).fit(X, y)  # float32 chunk products
    assert_close(fast.coef_, ref.coef_, 1e-4)
    assert_close(fast.intercept_, ref.intercept_, 1e-4)


def test_decision_function_and_labels():
    X, y = blobs(900, d=30, k=5, sep=3.0, seed=1)
    Xt, yt = blobs(400, d=30, k=5, sep=3.0, seed=2)
    y, yt = y * 10 + 7, yt * 10 + 7  # non-consecutive labels map back through classes_
    head = RidgeHead(alpha=10.0).fit(X, y)
    np.testing.assert_array_equal(head.classes_, np.arange(5) * 10 + 7)
    assert np.mean(head.predict(Xt) == yt) >= 0.95
    scores = head.decision_function(Xt)
    assert scores.shape == (400, 5) and scores.dtype == np.float32
    ref = standardized64(head, Xt) @ head.coef_.T.astype(np.float64) + head.intercept_
    assert_close(scores, ref, 1e-5)
    assert head.best_params_ == {"alpha": 10.0} and head.grid_scores_[0]["val_acc"] is None


@pytest.mark.parametrize("solver", ["eigh", "cholesky"])
def test_alpha_chosen_on_val_like_brute_force_sklearn(solver):
    X, y = blobs(300, d=60, k=4, sep=0.35, seed=3)
    Xv, yv = blobs(400, d=60, k=4, sep=0.35, seed=4)
    grid = [1e5, 0.01, 30.0, 1.0, 300.0, 3000.0]
    head = RidgeHead(alpha=grid, gram_dtype="float64", solver=solver, walk=False).fit(X, y, Xv, yv)
    Xs, Xvs = standardized64(head, X), standardized64(head, Xv)
    brute = []
    for alpha in sorted(grid):
        ref = Ridge(alpha=alpha).fit(Xs, targets(y, 4))
        brute.append(float(np.mean(ref.predict(Xvs).argmax(1) == yv)))
    assert [s["params"]["alpha"] for s in head.grid_scores_] == sorted(grid)
    assert [s["val_acc"] for s in head.grid_scores_] == brute
    assert len(set(brute)) > 2  # the grid matters on this problem
    best = max(brute)
    chosen = max(a for a, acc in zip(sorted(grid), brute) if acc == best)  # ties: the larger alpha
    assert head.best_params_ == {"alpha": chosen}
    assert np.mean(head.predict(Xv) == yv) == pytest.approx(best)
    single = RidgeHead(alpha=chosen, gram_dtype="float64").fit(X, y)
    assert_close(head.coef_, single.coef_, 1e-6)


def hill_climb(scores: list[float]) -> tuple[int, set[int]]:
    """Reference walk: from the middle index to the better neighbour (ties: the larger index) until neither
    neighbour is better; (stop index, indices visited)."""
    i, seen = len(scores) // 2, set()
    while True:
        near = [j for j in (i - 1, i, i + 1) if 0 <= j < len(scores)]
        seen |= set(near)
        best = max(near, key=lambda j: (scores[j], j))
        if best == i:
            return i, seen
        i = best


@pytest.mark.parametrize("seed", [3, 7, 11])
def test_walk_solves_only_the_climb_and_picks_its_peak(seed):
    X, y = blobs(300, d=60, k=4, sep=0.35, seed=seed)
    Xv, yv = blobs(400, d=60, k=4, sep=0.35, seed=seed + 1)
    grid = [0.01, 0.1, 1.0, 10.0, 30.0, 100.0, 300.0, 3000.0, 1e5]
    full = RidgeHead(alpha=grid, gram_dtype="float64", walk=False).fit(X, y, Xv, yv)
    brute = [s["val_acc"] for s in full.grid_scores_]
    stop, seen = hill_climb(brute)
    head = RidgeHead(alpha=grid, gram_dtype="float64").fit(X, y, Xv, yv)
    assert [s["params"]["alpha"] for s in head.grid_scores_] == [grid[i] for i in sorted(seen)]
    assert [s["val_acc"] for s in head.grid_scores_] == [brute[i] for i in sorted(seen)]
    assert len(seen) < len(grid)
    assert head.best_params_ == {"alpha": grid[stop]}
    assert_close(head.coef_, RidgeHead(alpha=grid[stop], gram_dtype="float64").fit(X, y).coef_, 1e-6)


def test_an_alpha_too_small_is_skipped_not_fatal():
    rng = np.random.default_rng(0)
    base = rng.normal(size=(200, 5))
    X = np.hstack([base, base @ rng.normal(size=(5, 40))]).astype(np.float32)  # rank 5 of 45 columns
    y = (base[:, 0] > 0).astype(int)
    Xv, yv = X[:50], y[:50]
    head = RidgeHead(alpha=[1e-30, 1.0, 10.0], gram_dtype="float32", walk=False).fit(X, y, Xv, yv)
    failed = [s for s in head.grid_scores_ if s["val_acc"] is None]
    assert failed and all("too small" in s["error"] for s in failed)
    assert head.best_params_["alpha"] in (1.0, 10.0)
    with pytest.raises(KmfeatError, match="too small"):
        RidgeHead(alpha=1e-30, gram_dtype="float32").fit(X, y)


def test_default_grid_spans_decades_relative_to_trace_over_n():
    X, y = blobs(400, d=15, k=3, seed=5)
    Xv, yv = blobs(100, d=15, k=3, seed=6)
    head = RidgeHead(gram_dtype="float64", walk=False).fit(X, y, Xv, yv)
    Xs = standardized64(head, X)
    trace_over_n = np.sum((Xs - Xs.mean(0)) ** 2) / len(X)
    np.testing.assert_allclose(head.alphas_, np.array(RELATIVE_ALPHAS) * trace_over_n, rtol=1e-9)
    assert max(head.alphas_) / min(head.alphas_) >= 1e3
    assert len(head.grid_scores_) == len(RELATIVE_ALPHAS) and head.best_params_["alpha"] in head.alphas_
    assert head.solver_ == "cholesky"  # a 7-point grid: per-alpha factorizations are cheaper than one eigh
    long_grid = RidgeHead(alpha=np.logspace(-2, 3, EIGH_COST_IN_CHOLESKYS).tolist()).fit(X, y, Xv, yv)
    assert long_grid.solver_ == "eigh" and len(long_grid.grid_scores_) == EIGH_COST_IN_CHOLESKYS
    same = RidgeHead(alpha=long_grid.best_params_["alpha"], solver="cholesky").fit(X, y)
    assert_close(long_grid.coef_, same.coef_, 1e-5)


@pytest.mark.parametrize("gram_dtype, rtol", [("float32", 1e-5), ("float64", 1e-6)])
def test_one_pass_statistics_match_a_fitted_standardizer(gram_dtype, rtol):
    X, y = blobs(1000, d=16, k=3, seed=11)
    X = X + np.linspace(0, 2000, 16, dtype=np.float32)  # means far above the spread: shifted chunks stay exact
    X_before = X.copy()
    head = RidgeHead(alpha=1.0, gram_dtype=gram_dtype, chunk_rows=97, power=0.5).fit(X, y)
    np.testing.assert_array_equal(X, X_before)  # the caller's array is not modified
    ref = Standardizer(power=0.5).fit(X)
    for name in ("mean_", "var_", "scale_"):
        np.testing.assert_allclose(getattr(head.standardizer_, name), getattr(ref, name), rtol=rtol)
    want = Ridge(alpha=1.0).fit(standardized64(head, X), targets(y, 3))
    assert_close(head.coef_, want.coef_, 1e-3 if gram_dtype == "float32" else 1e-6)


def test_best_alpha_at_the_grid_edge_is_reported(capsys):
    X, y = blobs(300, d=10, k=3, sep=3.0, seed=12)
    Xv, yv = blobs(300, d=10, k=3, sep=3.0, seed=13)
    head = RidgeHead(alpha=[1e6, 1e7]).fit(X, y, Xv, yv)
    err = capsys.readouterr().err
    assert "ridge alpha=1e+06 val_acc=" in err and "ridge alpha=1e+07 val_acc=" in err
    edge = "smallest" if head.best_params_["alpha"] == 1e6 else "largest"
    assert f"head.grid.alpha: the best value on val, {head.best_params_['alpha']:g}, is the {edge} of the grid" in err


def test_float16_memmap_input(tmp_path):
    X, y = blobs(700, d=24, k=3, seed=7)
    X16 = X.astype(np.float16)
    np.save(tmp_path / "x.npy", X16)
    mm = np.load(tmp_path / "x.npy", mmap_mode="r")
    a = RidgeHead(alpha=5.0, chunk_rows=100).fit(mm, y, mm[:50], y[:50])
    b = RidgeHead(alpha=5.0, chunk_rows=100).fit(X16.astype(np.float32), y)
    np.testing.assert_array_equal(np.load(tmp_path / "x.npy"), X16)
    np.testing.assert_array_equal(a.coef_, b.coef_)
    np.testing.assert_array_equal(a.predict(mm), b.predict(X16.astype(np.float32)))
    ref = Ridge(alpha=5.0).fit(standardized64(a, X16.astype(np.float32)), targets(y, 3))
    assert_close(a.coef_, ref.coef_, 1e-4)


def test_power_is_applied_before_standardization():
    X, y = blobs(500, d=20, k=3, seed=8)
    head = RidgeHead(alpha=2.0, gram_dtype="float64", power=0.5).fit(X, y)
    x = X.astype(np.float64)
    Xp = np.sign(x) * np.abs(x) ** 0.5
    Xs = (Xp - Xp.mean(0)) / np.sqrt(Xp.var(0) + 0.01)
    ref = Ridge(alpha=2.0).fit(Xs, targets(y, 3))
    assert_close(head.coef_, ref.coef_, 1e-5)
    assert_close(head.intercept_, ref.intercept_, 1e-5)
    plain = RidgeHead(alpha=2.0, gram_dtype="float64").fit(X, y)
    assert np.abs(plain.coef_ - head.coef_).max() > 1e-2


def test_save_load_round_trip(tmp_path):
    X, y = blobs(400, d=12, k=3, seed=9)
    Xv, yv = blobs(200, d=12, k=3, seed=10)
    names = np.array(["cat", "dog", "frog"])
    head = RidgeHead(alpha=(0.1, 10.0, 1000.0), power=0.5).fit(X, names[y], Xv, names[yv])
    head.save(tmp_path / "ridge.pt")
    back = RidgeHead.load(tmp_path / "ridge.pt")
    assert back.get_params() == head.get_params()
    np.testing.assert_array_equal(back.classes_, head.classes_)
    np.testing.assert_array_equal(back.decision_function(Xv), head.decision_function(Xv))
    np.testing.assert_array_equal(back.predict(Xv), head.predict(Xv))
    assert back.best_params_ == head.best_params_ and back.grid_scores_ == head.grid_scores_
    assert back.alphas_ == head.alphas_ and back.solver_ == head.solver_
    (tmp_path / "junk.pt").write_bytes(b"not a model")
    with pytest.raises(KmfeatError, match="junk.pt"):
        RidgeHead.load(tmp_path / "junk.pt")
    torch.save({"format": "kmfeat.LinearSVMHead/1"}, tmp_path / "svm.pt")
    with pytest.raises(KmfeatError, match="svm.pt"):
        RidgeHead.load(tmp_path / "svm.pt")


@pytest.mark.parametrize("params, match", [
    ({"alpha": -1.0}, "head.grid.alpha"),
    ({"alpha": 0}, "head.grid.alpha"),
    ({"alpha": []}, "head.grid.alpha"),
    ({"alpha": (1.0, -2.0)}, "head.grid.alpha"),
    ({"alpha": (0.1, "x")}, "head.grid.alpha"),
    ({"alpha": float("nan")}, "head.grid.alpha"),
    ({"alpha": True}, "head.grid.alpha"),
    ({"gram_dtype": "float16"}, "head.params.gram_dtype"),
    ({"solver": "lu"}, "head.params.solver"),
    ({"chunk_rows": 0}, "head.params.chunk_rows"),
    ({"power": 0}, "head.power"),
])
def test_bad_params_raise_one_line_kmfeat_error(params, match):
    X, y = blobs(60, d=5, k=3)
    with pytest.raises(KmfeatError, match=match) as err:
        RidgeHead(**{"alpha": 1.0, **params}).fit(X, y)
    assert "\n" not in str(err.value)


def test_bad_data_raise_kmfeat_error():
    X, y = blobs(60, d=5, k=3)
    for alpha in (None, (0.1, 1.0)):  # a grid needs a validation split
        with pytest.raises(KmfeatError, match="head.grid.alpha"):
            RidgeHead(alpha=alpha).fit(X, y)
    with pytest.raises(KmfeatError, match="train labels"):
        RidgeHead(alpha=1.0).fit(X, y[:-1])
    with pytest.raises(KmfeatError, match="2 classes"):
        RidgeHead(alpha=1.0).fit(X, np.zeros(60, np.int64))
    with pytest.raises(KmfeatError, match="validation"):
        RidgeHead(alpha=1.0).fit(X, y, X[:10, :3], y[:10])
    head = RidgeHead(alpha=1.0).fit(X, y)
    with pytest.raises(KmfeatError, match="columns"):
        head.predict(X[:, :4])


def test_config_wiring():
    assert HEADS["ridge"] is RidgeHead
    h = config.load(None, ["head.kind=ridge", "head.grid={alpha=[1.0, 10.0]}", "head.power=0.5",
                           "head.params={gram_dtype='float64'}"]).head
    head = make_head(h)
    assert isinstance(head, RidgeHead)
    assert (head.alpha, head.power, head.gram_dtype) == ((1.0, 10.0), 0.5, "float64")
    assert make_head(h, {"alpha": 10.0}).alpha == 10.0
    assert make_head(config.load(None, ["head.kind=ridge"]).head).alpha is None
    for grid, match in [("{alpha=[]}", "head.grid.alpha"), ("{alpha=-1.0}", "head.grid.alpha"),
                        ("{C=[1.0]}", "head.grid")]:
        bad = config.load(None, ["head.kind=ridge", f"head.grid={grid}"]).head
        with pytest.raises(KmfeatError, match=match):
            make_head(bad).fit(*blobs(60, d=5, k=3))
    with pytest.raises(KmfeatError, match="head.params"):
        make_head(config.load(None, ["head.kind=ridge", "head.params={max_iter=5}"]).head)
    params = _train_params(config.load(None, ["head.kind=ridge"]))
    assert {"kind", "val", "power", "refit", "seed", "params", "grid"} <= set(params)
    assert not {"estimator", "hidden", "epochs", "lr", "device"} & set(params)


@pytest.mark.parametrize("refit", [False, True])
def test_train_stage_test_rows_never_reach_fit(tmp_path, monkeypatch, refit):
    entry = features_entry(tmp_path)
    calls = []
    spy(monkeypatch, RidgeHead, calls)
    h = config.load(None, ["head.kind=ridge", "head.val=30", "head.grid={alpha=[0.1, 10.0, 1000.0]}",
                           f"head.refit={str(refit).lower()}"]).head
    out = Store(tmp_path).writer("train", "t", {}, {})
    metrics = train_head(h, entry, out)
    test_rows = rows(entry.array("test"))
    fits = [r for what, r in calls if what == "fit"]
    assert len(fits) == (2 if refit else 1) and all(not (r & test_rows) for r in fits)
    test_predictions = [i for i, (what, r) in enumerate(calls) if what == "predict" and r & test_rows]
    assert len(test_predictions) == 1 and calls[test_predictions[0]][1] == test_rows
    assert test_predictions[0] > max(i for i, (what, _) in enumerate(calls) if what == "fit")
    assert metrics["test"]["accuracy"] > 0.9 and metrics["head"] == "ridge"
    assert metrics["best_params"]["alpha"] in (0.1, 10.0, 1000.0) and len(metrics["grid_scores"]) == 3
    assert metrics["refit_on_train_and_val"] == refit
    assert metrics["n_fit"] == (600 if refit else 540)
    saved = json.loads(out.path("metrics.json").read_text())
    assert saved["n_test"] == 90
    back = RidgeHead.load(out.path("model.pt"))
    assert np.mean(back.predict(entry.array("test")) == entry.array("test_y")) == metrics["test"]["accuracy"]
    if refit:
        assert back.alpha == metrics["best_params"]["alpha"]


def test_float32_factorization_refines_to_the_float64_solution(capsys):
    """gram_dtype float32 factors in float32 and refines against float64 residuals; an ill-conditioned
    system falls back to a float64 factorization."""
    rng = np.random.default_rng(8)
    X, y = blobs(500, d=80, k=4, sep=0.5, seed=8)
    head = RidgeHead(alpha=1.0).fit(X, y)
    G, ZtY, _, _ = head._gram(X, np.searchsorted(head.classes_, y))
    for alpha in (0.1, 10.0, 1e4):
        f32 = head._cholesky_solve(G, ZtY, alpha)
        ref = np.linalg.solve(np.triu(G) + np.triu(G, 1).T + alpha * np.eye(len(G)), ZtY)
        assert_close(f32, ref, 1e-9)
    assert "solving in float64" not in capsys.readouterr().err
    base = rng.normal(size=(300, 3))
    Xs = np.hstack([base, base @ rng.normal(size=(3, 60)) + 1e-4 * rng.normal(size=(300, 60))])
    ys = (base[:, 0] > 0).astype(int)
    exact = RidgeHead(alpha=1.0, gram_dtype="float64").fit(Xs, ys)
    G, ZtY, _, _ = exact._gram(Xs, ys)
    W = RidgeHead(gram_dtype="float32")._cholesky_solve(G, ZtY, 1e-5)
    ref = np.linalg.solve(np.triu(G) + np.triu(G, 1).T + 1e-5 * np.eye(len(G)), ZtY)
    assert "solving in float64" in capsys.readouterr().err
    assert_close(W, ref, 1e-4)
