"""`kmfeat search`: files, best.toml that trains, resuming, the test split never read, subsets, bad input."""
import csv
import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest

from helpers import make_image_folder
from kmfeat import config
from kmfeat.cache import Entry, Store
from kmfeat.errors import KmfeatError
from kmfeat.heads.svm import LinearSVMHead
from kmfeat.search import apply_params, pipeline_toml, search_features, search_space
from kmfeat.train import make_head, split_features, train_head

ROOT = Path(__file__).resolve().parents[1]
SVM = ["head.kind=svm", "head.val=30"]


def features_entry(tmp_path, flip=False, n=300, m=90, d=16, noise=2.5, seed=0):
    """An encode entry of three noisy classes (val accuracy varies with C); every row is unique."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(0, 1, (3, d))
    y, y_test = np.arange(n) % 3, np.arange(m) % 3
    store = Store(tmp_path)
    with store.lock("encode", "k"):
        w = store.writer("encode", "k", {}, {})
        w.save("train", (centers[y] + rng.normal(0, noise, (n, d))).astype(np.float32))
        if flip:
            w.save("train_flip", (centers[y] + rng.normal(0, noise, (n, d))).astype(np.float32))
        w.save("test", (centers[y_test] + rng.normal(0, noise, (m, d))).astype(np.float32))
        w.save("train_y", y.astype(np.int64))
        w.save("test_y", y_test.astype(np.int64))
        w.meta["classes"] = ["a", "b", "c"]
        return w.commit()


def rows(X):
    return {r.tobytes() for r in np.asarray(X, dtype=np.float32)}


def quiet(msg):
    pass


def read_csv(folder):
    with open(folder / "trials.csv") as f:
        return list(csv.DictReader(f))


def count_fits(monkeypatch, cls=LinearSVMHead, calls=None):
    calls = [] if calls is None else calls
    fit, predict = cls.fit, cls.predict

    def spy_fit(self, X, y, X_val=None, y_val=None):
        calls.append(("fit", rows(X), np.asarray(y), rows(X_val) if X_val is not None else set()))
        return fit(self, X, y, X_val, y_val)

    def spy_predict(self, X):
        calls.append(("predict", rows(X), None, set()))
        return predict(self, X)
    monkeypatch.setattr(cls, "fit", spy_fit)
    monkeypatch.setattr(cls, "predict", spy_predict)
    return calls


def test_search_writes_csv_png_and_a_best_toml_that_trains(tmp_path):
    entry = features_entry(tmp_path)
    cfg = config.load(None, SVM + ["kmeans.k=8"], data=str(tmp_path / "imgs"))
    result = search_features(cfg, entry, Store(tmp_path), trials=3, log=quiet)
    assert result.trials == 3 and result.ran == 3
    folder = result.folder
    assert folder.parent == tmp_path / "search"
    table = read_csv(folder)
    assert [r["trial"] for r in table] == ["0", "1", "2"] and {r["state"] for r in table} == {"COMPLETE"}
    assert {"val_accuracy", "C", "power", "sampler", "seconds"} <= set(table[0])
    assert max(float(r["val_accuracy"]) for r in table) == pytest.approx(result.best_value, abs=1e-6)
    png = (folder / "search.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    best = config.load(folder / "best.toml")
    assert best.kmeans.k == 8 and best.data.path == str((tmp_path / "imgs").resolve())
    assert best.head.grid == {"C": [result.best_params["C"]]} and best.head.power == result.best_params["power"]
    # fit on the same rows, the best settings give the best trial's validation accuracy
    metrics = train_head(best.head, entry, Store(tmp_path).writer("train", "t", {}, {}))
    assert metrics["val_accuracy"] == pytest.approx(result.best_value, abs=1e-9)
    # the study folder is an entry of the store: never taken for a leftover of an interrupted run
    store = Store(tmp_path)
    assert store.get("search", folder.name).meta["trials_complete"] == 3
    assert folder not in [path for *_, path in store.leftovers()]
    store.clean_leftovers()
    assert (folder / "study.db").is_file()
    assert not list(folder.glob("*.part"))


def test_rerun_with_more_trials_runs_only_the_missing_ones(tmp_path, monkeypatch):
    entry = features_entry(tmp_path)
    calls = count_fits(monkeypatch)
    cfg = config.load(None, SVM)
    first = search_features(cfg, entry, Store(tmp_path), trials=2, log=quiet)
    fits = sum(c[0] == "fit" for c in calls)
    assert first.ran == 2 and fits == 2
    again = search_features(cfg, entry, Store(tmp_path), trials=4, log=quiet)
    assert again.folder == first.folder and again.ran == 2 and again.trials == 4
    assert sum(c[0] == "fit" for c in calls) == fits + 2
    table = read_csv(again.folder)
    assert len(table) == 4 and len({r["C"] for r in table}) == 4  # a resumed study draws new points
    same = search_features(cfg, entry, Store(tmp_path), trials=3, log=quiet)
    assert same.ran == 0 and same.trials == 4 and sum(c[0] == "fit" for c in calls) == fits + 2
    # another seed or subset is another study
    other = search_features(cfg, entry, Store(tmp_path), trials=1, seed=1, log=quiet)
    assert other.folder != first.folder and other.ran == 1


def test_an_interrupted_trial_is_not_counted_and_the_rest_resumes(tmp_path, monkeypatch):
    entry = features_entry(tmp_path)
    fit = LinearSVMHead.fit
    seen = []

    def flaky(self, *args, **kwargs):
        seen.append(1)
        if len(seen) == 2:
            raise KeyboardInterrupt
        return fit(self, *args, **kwargs)
    monkeypatch.setattr(LinearSVMHead, "fit", flaky)
    cfg = config.load(None, SVM)
    with pytest.raises(KeyboardInterrupt):
        search_features(cfg, entry, Store(tmp_path), trials=3, log=quiet)
    folder = next((tmp_path / "search").iterdir())
    assert [r["state"] for r in read_csv(folder)] == ["COMPLETE", "FAIL"]
    assert (folder / "best.toml").is_file()
    result = search_features(cfg, entry, Store(tmp_path), trials=3, log=quiet)
    assert result.ran == 2 and [r["state"] for r in read_csv(folder)] == ["COMPLETE", "FAIL", "COMPLETE", "COMPLETE"]


def test_timeout_stops_starting_trials(tmp_path):
    entry = features_entry(tmp_path)
    result = search_features(config.load(None, SVM), entry, Store(tmp_path), trials=50, timeout=1e-6, log=quiet)
    assert result.ran == 1 and result.trials == 1


@pytest.mark.parametrize("kind,extra", [
    ("svm", []),
    ("mlp", ["head.epochs=2", "head.hidden=8"]),
])
def test_search_never_reads_test_rows(tmp_path, monkeypatch, kind, extra):
    entry = features_entry(tmp_path, flip=True)
    names = []
    array = Entry.array

    def spy_array(self, name, *args, **kwargs):
        names.append(name)
        return array(self, name, *args, **kwargs)
    monkeypatch.setattr(Entry, "array", spy_array)
    cls = type(make_head(config.load(None, [f"head.kind={kind}"]).head))
    calls = count_fits(monkeypatch, cls)
    cfg = config.load(None, [f"head.kind={kind}", "head.val=30"] + extra)
    search_features(cfg, entry, Store(tmp_path), trials=2, subset=60, log=quiet)
    search_features(cfg, entry, Store(tmp_path), trials=2, log=quiet)
    assert names and not {"test", "test_y"} & set(names)
    test_rows = rows(array(entry, "test"))
    assert calls and all(not (seen & test_rows) and not (val & test_rows) for _, seen, _, val in calls)


def test_subset_is_class_balanced_with_mirrors_and_the_same_val_as_train(tmp_path, monkeypatch):
    entry = features_entry(tmp_path, flip=True)
    calls = count_fits(monkeypatch)
    cfg = config.load(None, SVM)
    search_features(cfg, entry, Store(tmp_path), trials=1, subset=60, log=quiet)
    _, fitted, y_fit, val = calls[0]
    assert len(y_fit) == 120 and np.bincount(y_fit).tolist() == [40, 40, 40]
    X_fit, _, X_val, _, fit_idx = split_features(entry, 30, 0)
    assert val == rows(X_val)
    train, flip = np.asarray(entry.array("train")), np.asarray(entry.array("train_flip"))
    originals = [i for i, r in enumerate(train) if r.tobytes() in fitted]
    assert len(originals) == 60 and set(originals) <= set(fit_idx.tolist())
    assert rows(flip[originals]) <= fitted and len(fitted) == 120
    # the whole fit split without --subset, as `kmfeat train` fits it
    search_features(cfg, entry, Store(tmp_path), trials=1, log=quiet)
    assert calls[-2][1] == rows(X_fit) and calls[-2][3] == rows(X_val)


def test_spaces_put_values_where_each_head_takes_them():
    h = config.load(None, ["head.kind=sklearn", "head.estimator=LogisticRegression", "head.params={max_iter=50}",
                           "head.grid={C=[0.001, 1.0], tol=[0.0001], penalty=[\"l2\"]}"]).head
    space = search_space(h)
    assert space["C"].log and (space["C"].low, space["C"].high) == (0.001, 1.0)
    assert space["tol"].low == pytest.approx(1e-5) and space["penalty"].choices == ("l2",)
    chosen = apply_params(h, {"C": 0.5, "tol": 1e-4, "penalty": "l2", "power": 0.5}, space)
    assert chosen.params == {"max_iter": 50, "C": 0.5, "tol": 1e-4, "penalty": "l2"} and chosen.grid == {}
    assert chosen.power == 0.5 and make_head(chosen).params["C"] == 0.5
    svm = config.load(None, ["head.kind=svm"]).head
    assert make_head(apply_params(svm, {"C": 0.02, "power": 0.7}, search_space(svm))).C == (0.02,)
    mlp = config.load(None, []).head
    assert {"lr", "weight_decay", "dropout", "hidden", "power"} == set(search_space(mlp))
    with pytest.raises(KmfeatError, match="head.grid"):
        search_space(config.load(None, ["head.kind=sklearn"]).head)
    ridge = config.load(None, ["head.kind=ridge"]).head
    if (ROOT / "kmfeat" / "heads" / "ridge.py").exists():
        assert "alpha" in search_space(ridge)
    else:
        with pytest.raises(KmfeatError, match="no ridge head"):
            search_space(ridge)


def test_pipeline_toml_reads_back_equal(tmp_path):
    cfg = config.load(ROOT / "pipelines" / "quick.toml",
                      ["pool.grid=[1, 2]", "data.resize=[24, 24]", "head.params={a = \"x\\\"y\", b = 1e-07}",
                       "head.grid={C = [0.5, 2]}", "head.power=0.333333333333"])
    text = pipeline_toml(cfg, "a header\nline two")
    path = tmp_path / "p.toml"
    path.write_text(text)
    assert tomllib.loads(text)["head"]["params"] == {"a": "x\"y", "b": 1e-07}
    loaded = config.load(path)
    assert loaded == cfg


# --- the command line (in this process: no interpreter start-up per call) --------------------

def kmfeat(capsys, *args, cache, check=True):
    """(exit status, stdout, stderr) of `kmfeat --cache-dir CACHE ARGS...` run as `main` runs it."""
    from kmfeat.cli import main

    capsys.readouterr()
    try:
        main(["--cache-dir", str(cache), *map(str, args)])
        code = 0
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    if check:
        assert code == 0, err
    return code, out, err


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny image-folder pipeline with its features computed: (pipeline, data, cache)."""
    from kmfeat.cli import main

    root = tmp_path_factory.mktemp("search-cli")
    data = make_image_folder(root / "imgs")
    pipeline = root / "tiny.toml"
    pipeline.write_text('[data]\nsource = "imagefolder"\n[patches]\nn = 3000\n[kmeans]\nk = 8\niters = 5\n'
                        '[head]\nval = 6\nepochs = 3\nhidden = 16\n')
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KMFEAT_PROGRESS", "0")
        main(["-q", "--cache-dir", str(root / "cache"), "encode", "-p", str(pipeline), "--data", str(data)])
    return pipeline, data, root / "cache"


@pytest.fixture(autouse=True)
def no_bars(monkeypatch):
    monkeypatch.setenv("KMFEAT_PROGRESS", "0")


def test_cli_search_then_train_best_toml_and_resume(tiny, capsys):
    pipeline, data, cache = tiny
    _, out, err = kmfeat(capsys, "search", "-p", pipeline, "--data", data, "--trials", 3, cache=cache)
    assert "encode: cached" in err
    assert len([line for line in err.splitlines() if line.startswith("search: trial")]) == 3
    summary = out.strip().splitlines()
    assert len(summary) == 1 and "3 trials complete (3 run now)" in summary[0] and "best val accuracy" in summary[0]
    folder = Path(summary[0].split(" -> ")[1].split("/ (")[0])
    assert folder.parent == cache / "search"
    for name in ("trials.csv", "search.png", "best.toml", "study.db"):
        assert (folder / name).stat().st_size > 0
    _, _, err = kmfeat(capsys, "train", "-p", folder / "best.toml", cache=cache)
    assert "encode: cached" in err and "train: computing" in err
    _, out, _ = kmfeat(capsys, "cache", "path", "train", "-p", folder / "best.toml", cache=cache)
    metrics = json.loads((Path(out.strip()) / "metrics.json").read_text())
    best = tomllib.loads((folder / "best.toml").read_text())["head"]
    assert metrics["config"]["lr"] == best["lr"] and metrics["config"]["power"] == best["power"]
    _, out, _ = kmfeat(capsys, "search", "-p", pipeline, "--data", data, "--trials", 5, cache=cache)
    assert "5 trials complete (2 run now)" in out and len(read_csv(folder)) == 5
    assert "  search" in kmfeat(capsys, "--help", cache=cache)[1]
    assert "search" in kmfeat(capsys, "cache", "ls", cache=cache)[1]


def test_cli_runs_as_a_program(tiny):
    """The installed entry point: a user mistake is one line on stderr and exit status 2."""
    pipeline, data, cache = tiny
    proc = subprocess.run([sys.executable, "-m", "kmfeat", "--cache-dir", str(cache), "search", "-p", str(pipeline),
                           "--data", str(data), "--trials", "0"], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "KMFEAT_PROGRESS": "0"})
    assert proc.returncode == 2 and proc.stderr.strip() == "Error: --trials: got 0, expected an integer >= 1"


@pytest.mark.parametrize("args,expected", [
    (["--trials", "0"], "--trials: got 0, expected an integer >= 1"),
    (["--trials", "2", "--timeout", "0"], "--timeout"),
    (["--trials", "2", "--subset", "-5"], "--subset: got -5"),
    (["--trials", "2", "--subset", "31"], "--subset 31: expected at least one image per class (3) and at most the 30"),
    (["--trials", "2", "--subset", "2"], "--subset 2"),
    (["--trials", "2", "-o", "head.val=0"], "head.val = 0"),
    (["--trials", "2", "-o", "head.kind=sklearn"], "head.grid"),
    (["--trials", "2", "-o", "head.kind=nope"], "head.kind"),
])
def test_cli_bad_input_is_one_line_exit_2(tiny, capsys, args, expected):
    pipeline, data, cache = tiny
    before = sorted((cache / "search").glob("*"))
    code, _, err = kmfeat(capsys, "-q", "search", "-p", pipeline, "--data", data, *args, cache=cache, check=False)
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and expected in lines[0], err
    assert sorted((cache / "search").glob("*")) == before  # nothing written


def test_a_second_search_of_the_same_study_waits_for_the_first(tmp_path):
    import threading
    import time

    entry = features_entry(tmp_path)
    cfg = config.load(None, SVM)
    first = search_features(cfg, entry, Store(tmp_path), trials=1, log=quiet)
    said, results = [], []
    with Store(tmp_path).lock("search", first.folder.name):
        worker = threading.Thread(target=lambda: results.append(
            search_features(cfg, entry, Store(tmp_path), trials=2, log=said.append)))
        worker.start()
        deadline = time.time() + 30
        while not said and time.time() < deadline:
            time.sleep(0.05)
        assert said and "waiting" in said[0] and worker.is_alive() and not results
    worker.join(60)
    assert results and results[0].ran == 1 and results[0].trials == 2


@pytest.mark.skipif(not (ROOT / "kmfeat" / "heads" / "ridge.py").exists(), reason="no ridge head in this tree")
def test_ridge_search_sets_alpha(tmp_path):
    entry = features_entry(tmp_path)
    result = search_features(config.load(None, ["head.kind=ridge", "head.val=30"]), entry, Store(tmp_path),
                             trials=2, log=quiet)
    best = config.load(result.folder / "best.toml").head
    assert best.kind == "ridge" and best.grid == {"alpha": [result.best_params["alpha"]]}
    metrics = train_head(best, entry, Store(tmp_path).writer("train", "t", {}, {}))
    assert metrics["val_accuracy"] == pytest.approx(result.best_value, abs=1e-9)
