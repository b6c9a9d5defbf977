"""The extra unlabeled images of `data.unlabeled`: an image folder or archive, a CIFAR release (its
training images) or an STL-10 release (its unlabeled split). Labels are never read from them, and a
labeled source's test images never join."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import KmfeatError
from . import allocate, detect_format


def load_unlabeled_source(path, resize=None, alloc=allocate, scratch_alloc=allocate) -> np.ndarray:
    """The images of `path` as uint8 (N, H, W, 3) in `alloc("unlabeled_x", ...)`. `scratch_alloc` holds what
    a release reader decodes besides (STL-10's labeled splits), which is thrown away."""
    from .imagefolder import load_unlabeled, parse_resize, resize_images

    p = Path(path).expanduser()
    if not p.exists():
        raise KmfeatError(f"data.unlabeled {path}: no such file or directory")
    fmt = detect_format(p)
    size = parse_resize(resize)
    if fmt == "imagefolder":
        return load_unlabeled(p, size, alloc=alloc)
    if fmt == "stl10":
        from .stl10 import load_stl10

        keep = alloc if size is None else scratch_alloc  # resized copies are made in RAM below
        x = load_stl10(p, alloc=lambda name, shape, dtype: (keep if name == "unlabeled_x" else scratch_alloc)(
            name, shape, dtype)).unlabeled_x
        if x is None:
            raise KmfeatError(f"data.unlabeled {path}: this STL-10 release has no unlabeled_X.bin")
    else:
        from .cifar import load_cifar

        x = load_cifar(p, fmt).train_x
    if size is not None and x.shape[1:3] != size:
        return resize_images(x, size)
    return x
