"""CoatesFeaturizer: a scikit-learn transformer computing exactly what the CLI stages cache."""

import numpy as np
from sklearn.base import clone
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline

from helpers import make_image_folder
from kmfeat import CoatesFeaturizer, config, load_features
from kmfeat.cache import Store
from kmfeat.data import load_dataset
from kmfeat.stages import Runner

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
