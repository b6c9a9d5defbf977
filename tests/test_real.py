"""End to end on a real subset of CIFAR-10 (../shared/data/cifar10-jpeg.tar.gz): 5,000 train /
1,000 test images through the quick pipeline (k=256), then heads on the same cached features."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from helpers import REAL_CIFAR

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.real,
              pytest.mark.skipif(not REAL_CIFAR.exists(), reason=f"{REAL_CIFAR} not present")]


def kmfeat(cache, *args):
    env = {**os.environ, "KMFEAT_PROGRESS": "0", "KMFEAT_CACHE": str(cache)}
    proc = subprocess.run([sys.executable, "-m", "kmfeat", *map(str, args)], capture_output=True,
                          text=True, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    return proc


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """The quick pipeline trained once; its cache is shared by the tests below."""
    cache = tmp_path_factory.mktemp("cache")
    run = kmfeat(cache, "run", "-p", "pipelines/quick.toml", "--data", REAL_CIFAR)
    return cache, run


def path_of(cache, stage, *extra):
    return Path(kmfeat(cache, "cache", "path", stage, "-p", "pipelines/quick.toml", "--data",
                       REAL_CIFAR, *extra).stdout.strip())


def test_quick_pipeline_mlp_reaches_045(quick):
    cache, run = quick
    metrics = json.loads((path_of(cache, "train") / "metrics.json").read_text())
    assert metrics["n_test"] == 1000 and metrics["n_fit"] + metrics["n_val"] == 5000
    assert metrics["test"]["accuracy"] >= 0.45, metrics["test"]["accuracy"]
    counts = np.bincount(np.load(path_of(cache, "encode") / "test_y.npy"))
    assert counts.tolist() == [100] * 10


def test_logistic_regression_on_cached_k256_features(quick):
    cache, _ = quick
    over = ["-o", "head.kind=sklearn", "-o", "head.estimator=LogisticRegression",
            "-o", "head.params={max_iter=200}", "-o", "head.grid={C=[0.001, 0.01]}"]
    train = kmfeat(cache, "train", "-p", "pipelines/quick.toml", "--data", REAL_CIFAR, *over)
    assert "encode: cached" in train.stderr
    metrics = json.loads((path_of(cache, "train", *over) / "metrics.json").read_text())
    assert metrics["test"]["accuracy"] >= 0.45, metrics["test"]["accuracy"]
