"""Plots: each function writes a valid, non-trivial PNG; the centroid mosaic follows the patch layout."""
import numpy as np
import pytest
from PIL import Image

from kmfeat.errors import KmfeatError
from kmfeat.plots import best_epoch, centroid_mosaic, plot_centroids, plot_confusion, plot_curves


def check_png(path, min_side=100):
    assert path.exists() and path.stat().st_size > 0
    with Image.open(path) as im:
        assert im.format == "PNG"
        assert min(im.size) >= min_side
        arr = np.asarray(im.convert("RGB"))
    assert len(np.unique(arr.reshape(-1, 3), axis=0)) > 2  # not a flat colour


@pytest.mark.parametrize("channels", [1, 3])
def test_plot_centroids(tmp_path, channels):
    rng = np.random.default_rng(0)
    cents = rng.normal(size=(50, 6 * 6 * channels))
    out = plot_centroids(cents, 6, channels, tmp_path / "sub" / "c.png", max_show=40)
    assert out == tmp_path / "sub" / "c.png"
    check_png(out)


def test_centroid_mosaic_layout():
    rf, C = 3, 3
    rng = np.random.default_rng(1)
    cents = rng.normal(size=(5, rf * rf * C))
    cents[4] = 7.0  # a flat patch is shown mid-grey, not divided by zero
    mosaic = centroid_mosaic(cents, rf, C, max_show=5)
    assert mosaic.shape == (2 * (rf + 1) + 1, 3 * (rf + 1) + 1, 3)  # 5 patches -> 2 rows x 3 cols
    assert np.isfinite(mosaic).all() and mosaic.min() >= 0 and mosaic.max() <= 1
    for i in range(4):
        r, c = divmod(i, 3)
        tile = mosaic[1 + r * 4: 1 + r * 4 + rf, 1 + c * 4: 1 + c * 4 + rf]
        p = cents[i]
        ref = np.array([[[p[(dy * rf + dx) * C + ch] for ch in range(C)] for dx in range(rf)] for dy in range(rf)])
        np.testing.assert_allclose(tile, (ref - p.min()) / (p.max() - p.min()))
    np.testing.assert_allclose(mosaic[5:8, 5:8], 0.5)
    with pytest.raises(KmfeatError, match="plot_centroids"):
        centroid_mosaic(cents, 4, C)


def test_plot_confusion(tmp_path):
    rng = np.random.default_rng(2)
    conf = rng.integers(0, 50, size=(10, 10)) + np.diag(rng.integers(100, 900, 10))
    classes = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    check_png(plot_confusion(conf, classes, tmp_path / "conf.png", title="test"))
    check_png(plot_confusion(np.zeros((3, 3), int), ["a", "b", "c"], tmp_path / "empty.png"))
    with pytest.raises(KmfeatError, match="plot_confusion"):
        plot_confusion(conf, classes[:3], tmp_path / "bad.png")


def test_plot_curves(tmp_path):
    hist = [{"epoch": e, "train_loss": 2 / e, "train_acc": 1 - 1 / (e + 1), "val_loss": 2 / e + 0.1,
             "val_acc": [0.5, 0.7, 0.8, 0.8, 0.75][e - 1], "lr": 1e-3, "seconds": 1.0} for e in range(1, 6)]
    assert best_epoch(hist) == 3  # ties go to the earliest epoch
    check_png(plot_curves(hist, tmp_path / "curves.png"))
    no_val = [{**h, "val_loss": None, "val_acc": None} for h in hist]
    assert best_epoch(no_val) is None
    check_png(plot_curves(no_val, tmp_path / "curves_noval.png"))
    with pytest.raises(KmfeatError, match="plot_curves"):
        plot_curves([], tmp_path / "x.png")
