"""`load_features`: the cached features of an encode entry, memory-mapped, for any classifier."""
from __future__ import annotations

from pathlib import Path

from .cache import Store
from .errors import KmfeatError
from .lookup import other_data


def load_features(source: str | Path, cache_dir: str | Path | None = None, overrides=(), data: str | None = None,
                  flips: bool = False):
    """(X_train, y_train, X_test, y_test) of cached features, memory-mapped; with flips=True also
    (X_train_flip, X_test_flip): the mirrored images' features (None where the pipeline did not encode them),
    e.g. to rebuild the default head's training rows, X_train[i] and X_train_flip[i] for each fit image i.

    `source` is an encode folder (as `kmfeat cache path encode` prints it) or a pipeline TOML whose features
    were computed with `kmfeat encode` (with its `data` and `overrides`). The cache is `cache_dir`, else
    $KMFEAT_CACHE, else ./cache: from another folder give cache_dir (the error says where it looked).
    """
    from . import config
    from .runner import Runner

    path = Path(source)
    if path.is_dir():
        entry = Store(path.parent.parent).get(path.parent.name, path.name)
        if entry is None or entry.stage != "encode":
            raise KmfeatError(f"{path}: not a finished encode entry (no manifest.json)")
    else:
        store = Store(cache_dir)
        entry = Runner(config.load(path, overrides, data), store).cached("encode")
        if entry is None:
            found = other_data(path, overrides, data, store, "encode")
            if found:
                raise KmfeatError(f"{path}: features not computed with data={data!r}, but they are with data="
                                  + " or ".join(repr(p or None) for p in found))
            raise KmfeatError(f"{path}: features not computed yet in the cache {store.root.resolve()} (cache_dir, else "
                              f"$KMFEAT_CACHE, else ./cache); run `kmfeat encode -p {path}` first, or pass the "
                              f"cache_dir it used")
    out = (entry.array("train"), entry.array("train_y"), entry.array("test"), entry.array("test_y"))
    if flips:
        out += tuple(entry.array(name) if entry.has(name) else None for name in ("train_flip", "test_flip"))
    return out
