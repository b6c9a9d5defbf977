"""Where a pipeline's entry is when it is not where the given options point: other `--data` origins.

Without `--data` the CLI means the official CIFAR release, while `make` passes the JPEG copy; a user who
computed features with one and asks with the other got "not computed yet". These helpers name the `--data`
values under which the same pipeline and overrides do have the entry, from the paths data entries record.
"""
from __future__ import annotations

from .cache import Store
from .errors import KmfeatError


def other_data(pipeline, overrides, data, store: Store, stage: str) -> list[str]:
    """The --data values (paths recorded by the store's data entries, "" for the official release) other than
    `data` under which `pipeline` with `overrides` has a finished `stage` entry."""
    from . import config
    from .runner import Runner

    found = []
    for entry in store.entries("data"):
        path = entry.meta.get("path")
        if path is None or path == (data or ""):
            continue
        try:
            extra = [] if path else ['data.path=""']
            cfg = config.load(pipeline, list(overrides) + extra, path or None)
            if store.get(stage, Runner(cfg, store).key(stage)) is not None:
                found.append(path)
        except (KmfeatError, OSError):
            continue  # a recorded path that no longer exists or no longer fits the pipeline
    return sorted(set(found))


def not_cached(pipeline, overrides, data, store: Store, stage: str, todo: str) -> KmfeatError:
    """The error for a stage that is not cached under these options, naming the --data that would find it."""
    what = f"{stage} for {pipeline or 'the default pipeline'}"
    origin = f"--data {data}" if data else "no --data (the official CIFAR release)"
    found = other_data(pipeline, overrides, data, store, stage)
    if not found:
        return KmfeatError(f"{what} not computed yet with {origin} in the cache {store.root}; {todo}")
    options = "; ".join(f"--data {p}" if p else "no --data (the official release)" for p in found)
    return KmfeatError(f"{what} not computed with {origin}, but it is with: {options} (add the same --data)")
