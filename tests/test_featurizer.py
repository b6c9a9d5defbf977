"""CoatesFeaturizer: a scikit-learn transformer computing exactly what the CLI stages cache."""

from pathlib import Path

import numpy as np
from sklearn.base import clone
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline

from helpers import make_image_folder
from kmfeat import CoatesFeaturizer, config, load_features
from kmfeat.cache import Store
from kmfeat.data import load_dataset
from kmfeat.runner import Runner

PARAMS = dict(rf=4, n_patches=3000, k=12, kmeans_iters=4, kmeans_backend="torch", seed=3)


def test_fit_transform_shapes_and_sklearn_pipeline(tmp_path):
    ds = load_dataset("imagefolder", str(make_image_folder(tmp_path / "imgs", n_train=10, n_test=4)))
    feat = CoatesFeaturizer(**PARAMS)
    X = feat.fit(ds.train_x).transform(ds.test_x)
    assert X.shape == (12, 4 * 12) and X.dtype == np.float32 and np.isfinite(X).all()
    assert feat.kmeans_.centroids_.shape == (12, 4 * 4 * 3)
    assert clone(feat).get_params() == feat.get_params()
    model = make_pipeline(CoatesFeaturizer(**PARAMS), LogisticRegression(max_iter=500))
    model.fit(ds.train_x, ds.train_y)
    assert model.score(ds.train_x, ds.train_y) > 0.9


def test_same_features_as_the_cli_stages(tmp_path):
    data = make_image_folder(tmp_path / "imgs", n_train=8, n_test=3)
    overrides = ['data.source="imagefolder"', "patches.rf=4", "patches.n=3000", "patches.seed=3",
                 "kmeans.k=12", "kmeans.iters=4", "kmeans.seed=3", 'kmeans.backend="torch"']
    cfg = config.load(None, overrides, str(data))
    Runner(cfg, Store(tmp_path / "cache")).run("encode")
    X_train, _, X_test, _ = load_features(Runner(cfg, Store(tmp_path / "cache")).cached("encode").path)
    ds = load_dataset("imagefolder", str(data))
    feat = CoatesFeaturizer(**PARAMS).fit(ds.train_x)
    np.testing.assert_allclose(feat.transform(ds.train_x), X_train, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(feat.transform(ds.test_x), X_test, rtol=1e-5, atol=1e-5)


def test_split_codes_and_pyramid_same_as_the_cli_stages(tmp_path):
    data = make_image_folder(tmp_path / "imgs", n_train=8, n_test=3)
    overrides = ['data.source="imagefolder"', "patches.rf=4", "patches.n=3000", "patches.seed=3",
                 "kmeans.k=12", "kmeans.iters=4", "kmeans.seed=3", 'kmeans.backend="torch"',
                 'encode.kind="soft"', "encode.alpha=0.25", "encode.split=true", "pool.grid=[1, 2]",
                 'pool.kind="max"']
    cfg = config.load(None, overrides, str(data))
    entry = Runner(cfg, Store(tmp_path / "cache")).run("encode")
    X_train, _, _, _ = load_features(entry.path)
    ds = load_dataset("imagefolder", str(data))
    feat = CoatesFeaturizer(**PARAMS, kind="soft", alpha=0.25, split=True, grid=[1, 2], pool="max").fit(ds.train_x)
    assert X_train.shape[1] == 5 * 24 == feat.n_features_out_
    np.testing.assert_allclose(feat.transform(ds.train_x), X_train, rtol=1e-5, atol=1e-5)


def test_flip_test_encodes_the_mirrored_test_images(tmp_path):
    data = make_image_folder(tmp_path / "imgs", n_train=6, n_test=3)
    overrides = ['data.source="imagefolder"', "patches.rf=4", "patches.n=3000", "kmeans.k=12", "kmeans.iters=4",
                 'kmeans.backend="torch"', "encode.flip_train=true", "encode.flip_test=true"]
    cfg = config.load(None, overrides, str(data))
    entry = Runner(cfg, Store(tmp_path / "cache")).run("encode")
    assert entry.meta["splits"] == ["train", "train_flip", "test", "test_flip"]
    ds = load_dataset("imagefolder", str(data))
    feat = CoatesFeaturizer(rf=4, n_patches=3000, k=12, kmeans_iters=4, kmeans_backend="torch").fit(ds.train_x)
    np.testing.assert_allclose(entry.array("test_flip"), feat.transform(ds.test_x[:, :, ::-1]), rtol=1e-5, atol=1e-5)
    assert not np.allclose(entry.array("test_flip"), entry.array("test"))


def test_fitted_featurizer_pickles_and_transforms_bit_identically(tmp_path):
    """Issue 12 item 9 / issue 13 item 4: pickle and joblib failed on the packed oneDNN weights; now the encoder
    pickles its parameters and rebuilds its device state on load, with bit-identical features."""
    import io
    import pickle

    import joblib

    rng = np.random.default_rng(0)
    X = rng.integers(0, 256, (30, 16, 16, 3), dtype=np.uint8)
    f = CoatesFeaturizer(k=8, n_patches=2000, kmeans_iters=3, kind="soft", split=True, grid=[1, 2],
                         device="cpu").fit(X)
    want = f.transform(X)
    buf = io.BytesIO()
    joblib.dump(f, buf)
    buf.seek(0)
    for loaded in (pickle.loads(pickle.dumps(f)), joblib.load(buf)):
        assert loaded.transform(X).tobytes() == want.tobytes()
    names = f.get_feature_names_out()
    assert len(names) == want.shape[1] == 5 * 16 and names[0] == "coatesfeaturizer0"


def test_an_encoder_made_for_cuda_loads_on_a_cpu_only_machine(monkeypatch):
    import pickle
    import warnings

    import torch

    rng = np.random.default_rng(1)
    X = rng.integers(0, 256, (20, 16, 16, 3), dtype=np.uint8)
    f = CoatesFeaturizer(k=8, n_patches=2000, kmeans_iters=3, device="cpu").fit(X)
    want = f.transform(X)
    state = f.encoder_.__getstate__()
    assert not any(isinstance(v, torch.Tensor) for v in state.values())  # nothing bound to a device
    f.encoder_.device = "cuda"  # as if fitted with device="cuda" on a GPU machine
    blob = pickle.dumps(f)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = pickle.loads(blob)
    assert loaded.encoder_.device_ == "cpu" and any("not available here" in str(w.message) for w in caught)
    np.testing.assert_array_equal(loaded.transform(X), want)


def test_load_features_from_another_folder_and_with_mirrors(tmp_path, monkeypatch):
    """Issue 13: load_features worked only from the repo root and returned no mirrored rows; export neither."""
    import subprocess
    import sys

    import pytest

    from kmfeat.errors import KmfeatError

    data = make_image_folder(tmp_path / "imgs", n_train=4, n_test=2)
    cache = tmp_path / "store"
    over = ["data.source=\"imagefolder\"", "patches.n=2000", "kmeans.k=8", "kmeans.iters=2",
            "encode.flip_train=true", "encode.flip_test=true"]
    args = [a for o in over for a in ("-o", o)]
    root = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-m", "kmfeat", "-q", "--cache-dir", str(cache), "encode", "-p",
                    str(root / "pipelines" / "quick.toml"), "--data", str(data), *args], check=True, cwd=root)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    monkeypatch.delenv("KMFEAT_CACHE", raising=False)
    with pytest.raises(KmfeatError, match=f"in the cache {elsewhere / 'cache'}"):
        load_features(root / "pipelines" / "quick.toml", overrides=over, data=str(data))
    monkeypatch.setenv("KMFEAT_CACHE", str(cache))
    X, y, Xt, yt, Xf, Xtf = load_features(root / "pipelines" / "quick.toml", overrides=over, data=str(data), flips=True)
    assert X.shape == Xf.shape and Xt.shape == Xtf.shape and not np.array_equal(X, Xf)
    four = load_features(root / "pipelines" / "quick.toml", cache_dir=cache, overrides=over, data=str(data))
    assert len(four) == 4 and np.array_equal(four[0], X)
    out = tmp_path / "f.npz"
    subprocess.run([sys.executable, "-m", "kmfeat", "-q", "--cache-dir", str(cache), "export", "-p",
                    str(root / "pipelines" / "quick.toml"), "--data", str(data), *args, "--out", str(out)],
                   check=True, cwd=root)
    with np.load(out) as z:
        np.testing.assert_array_equal(z["X_train_flip"], Xf)
        np.testing.assert_array_equal(z["X_test_flip"], Xtf)
