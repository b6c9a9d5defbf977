"""Shared test fixtures: tiny synthetic image folders and the real CIFAR-10 copy."""
from pathlib import Path

import numpy as np
from PIL import Image

REAL_CIFAR = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpeg.tar.gz"


def make_image_folder(root: Path, classes=("a", "b", "c"), n_train=12, n_test=4, size=(16, 16), seed=0):
    """ROOT/train/<class>/*.png and ROOT/test/<class>/*.png with class-dependent colour blobs,
    so that a classifier on learned features can do better than chance."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("test", n_test)):
        for ci, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                img = rng.integers(0, 60, size=(*size, 3))
                img[..., ci % 3] += 150
                Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(folder / f"{i:03d}.png")
    return root
