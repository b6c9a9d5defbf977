"""The CLI as a user meets it: help, one-line errors with exit status 2, a tiny end-to-end run."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from helpers import make_image_folder

ROOT = Path(__file__).resolve().parents[1]
TINY = ["-o", "patches.n=3000", "-o", "kmeans.k=8", "-o", "kmeans.iters=5", "-o", "head.val=6",
        "-o", "head.epochs=3", "-o", "head.hidden=16", "-o", "data.source=\"imagefolder\""]


def kmfeat(*args, cache=None, check=True):
    env = {**os.environ, "KMFEAT_PROGRESS": "0"}
    if cache:
        env["KMFEAT_CACHE"] = str(cache)
    proc = subprocess.run([sys.executable, "-m", "kmfeat", *map(str, args)], capture_output=True,
                          text=True, env=env, cwd=ROOT)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def test_help_lists_every_command():
    out = kmfeat("--help").stdout
    for name in ["data", "patches", "whiten", "kmeans", "encode", "train", "evaluate", "run",
                 "cache", "info", "export"]:
        assert f"  {name}" in out


@pytest.mark.parametrize("args,expected", [
    (["kmeans", "-o", "kmeans.k=0"], "kmeans.k: got 0, expected >= 1"),
    (["kmeans", "-o", "kmeans.kk=3"], "kmeans.kk: unknown key"),
    (["data", "-p", "nope.toml"], "nope.toml: no such file"),
    (["data", "--data", "/no/such/dataset.tar.gz"], "/no/such/dataset.tar.gz"),
    (["train", "-o", "head.dropout=1.5"], "head.dropout"),
    (["cache", "rm", "encode", "0123"], "expected 16 hexadecimal digits"),
    (["cache", "rm", "encode", "0123456789abcdef"], "no such entry"),
])
def test_user_mistakes_are_one_line_exit_2(tmp_path, args, expected):
    proc = kmfeat(*args, cache=tmp_path, check=False)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and expected in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_tiny_pipeline_end_to_end(tmp_path):
    data = make_image_folder(tmp_path / "imgs")
    cache = tmp_path / "cache"
    run = kmfeat("run", "--data", data, *TINY, cache=cache)
    assert "test accuracy" in run.stdout
    again = kmfeat("encode", "--data", data, *TINY, cache=cache)
    for stage in ["data", "patches", "whiten", "kmeans", "encode"]:
        assert f"{stage}: cached" in again.stderr
    folder = Path(kmfeat("cache", "path", "encode", "--data", data, *TINY, cache=cache).stdout.strip())
    assert (folder / "manifest.json").is_file()
    X = np.load(folder / "train.npy", mmap_mode="r")
    assert X.shape == (36, 4 * 8) and X.dtype == np.float32
    train_dir = Path(kmfeat("cache", "path", "train", "--data", data, *TINY, cache=cache).stdout.strip())
    metrics = json.loads((train_dir / "metrics.json").read_text())
    assert 0 <= metrics["test"]["accuracy"] <= 1 and metrics["feature_key"] == folder.name
    for png in ["confusion.png", "curves.png"]:
        assert (train_dir / png).stat().st_size > 1000
    kmeans_dir = Path(kmfeat("cache", "path", "kmeans", "--data", data, *TINY, cache=cache).stdout.strip())
    assert (kmeans_dir / "centroids.png").stat().st_size > 1000
    evaluate = kmfeat("evaluate", "--data", data, *TINY, cache=cache).stdout
    assert "test accuracy" in evaluate
    # issue 13: train accuracy is measured on the fit images, which is not the number of fit rows with mirrors
    n_images = metrics["train_accuracy_images"]
    assert n_images == 36 - 6 and f"(on the {n_images:,} fit images; fit on {metrics['n_fit']:,} rows)" in evaluate
    ls = kmfeat("cache", "ls", cache=cache).stdout
    assert all(stage in ls for stage in ["data", "patches", "whiten", "kmeans", "encode", "train"])
    # a scikit-learn head on the same cached features: encode is not recomputed
    svm = kmfeat("train", "--data", data, *TINY, "-o", "head.kind=sklearn", "-o",
                 "head.estimator=LogisticRegression", cache=cache)
    assert "encode: cached" in svm.stderr and "train: computing" in svm.stderr
    out = tmp_path / "f.npz"
    kmfeat("export", "--data", data, *TINY, "--out", out, cache=cache)
    with np.load(out) as z:
        np.testing.assert_array_equal(z["X_train"], X)


def test_load_features_from_pipeline_and_folder(tmp_path):
    import kmfeat as km

    data = make_image_folder(tmp_path / "imgs", n_train=6, n_test=2)
    cache = tmp_path / "cache"
    kmfeat("encode", "--data", data, *TINY, cache=cache)
    folder = Path(kmfeat("cache", "path", "encode", "--data", data, *TINY, cache=cache).stdout.strip())
    X_train, y_train, X_test, y_test = km.load_features(folder)
    assert X_train.shape == (18, 32) and X_test.shape == (6, 32)
    assert y_train.dtype == np.int64 and sorted(set(y_train.tolist())) == [0, 1, 2]
    pipeline = tmp_path / "p.toml"
    pipeline.write_text(f'[data]\nsource = "imagefolder"\npath = "{data}"\n[patches]\nn = 3000\n'
                        f'[kmeans]\nk = 8\niters = 5\n')
    again = km.load_features(pipeline, cache_dir=cache)
    np.testing.assert_array_equal(again[0], X_train)


def test_an_entry_cached_under_another_data_is_named(tmp_path):
    """Issue 13: features computed with `make` (--data the JPEG copy) looked "not computed yet" to a CLI call
    without --data, and `cache path` printed a folder that did not exist."""
    data = make_image_folder(tmp_path / "imgs", n_train=4, n_test=2)
    other = make_image_folder(tmp_path / "other", n_train=2, n_test=1)
    cache = tmp_path / "cache"
    kmfeat("encode", "--data", data, *TINY, cache=cache)
    for args in (["export", "--out", tmp_path / "f.npz"], ["cache", "path", "encode"], ["evaluate"]):
        for where in ([], ["--data", other]):
            proc = kmfeat(*args, *where, *TINY, cache=cache, check=False)
            lines = proc.stderr.strip().splitlines()
            assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
            stage = "train" if args == ["evaluate"] else "encode"
            if stage == "encode":
                assert f"but it is with: --data {data.resolve()}" in lines[0], lines[0]
            else:
                assert "not computed yet" in lines[0] and "run `kmfeat train`" in lines[0], lines[0]
    expected = kmfeat("cache", "path", "encode", "--data", other, *TINY, "--expected", cache=cache)
    assert expected.stdout.strip().startswith(str(cache / "encode"))
    assert not Path(expected.stdout.strip()).exists()
