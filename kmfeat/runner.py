"""The runner: resolves a stage and its dependencies for one pipeline, reuses cached entries and computes
missing ones under a per-key lock, committed atomically.

Failure handling: a stage that fails with a user mistake (KmfeatError) or a full disk leaves nothing in the
cache; one that is interrupted (Ctrl-C, kill, crash) leaves its temp folder, which the next run removes, except
for the resumable stages (encode, train), which resume from their checkpoints.
"""
from __future__ import annotations

import errno
import os
import time

from .cache import Entry, Store, disk_full_error, free_bytes, is_disk_full, make_key
from .cluster import active
from .config import PipelineConfig
from .errors import KmfeatError
from .memory import human_bytes
from .progress import say
from .stages import INTERRUPTED, ORDER, STAGES, Context, Stage

LOW_SPACE = 1 << 20
"""A stage that fails with less free space than this on the cache disk is reported as disk full."""


class Runner:
    """Resolves a stage and its dependencies for one pipeline: cached entries are reused,
    missing ones computed under a per-key lock and committed atomically. The first `run`
    removes what interrupted runs left behind (except encode checkpoints, which are resumed).
    `quiet` drops the status lines (warnings and errors still show)."""

    def __init__(self, cfg: PipelineConfig, store: Store, force: frozenset[str] = frozenset(),
                 quiet: bool = False, cluster=None):
        self.cfg, self.store, self.force = cfg, store, set(force)
        self.quiet = quiet
        self.cluster = cluster  # a kmfeat.cluster.Cluster: encode and image decoding run on its workers
        self._keys: dict[str, str] = {}
        self._done: dict[str, Entry] = {}
        self._cleaned = False

    def log(self, msg: str) -> None:
        if not self.quiet:
            say(msg)

    def key(self, name: str) -> str:
        if name not in self._keys:
            stage = STAGES[name]
            self._keys[name] = make_key(name, stage.params(self.cfg), self.input_keys(name), stage.revision)
        return self._keys[name]

    def input_keys(self, name: str) -> dict[str, str]:
        return {dep: self.key(dep) for dep in STAGES[name].deps}

    def cached(self, name: str) -> Entry | None:
        """The finished entry of this stage for this pipeline, without computing anything."""
        return self.store.get(name, self.key(name))

    def keys(self, upto: str = "train") -> set[tuple[str, str]]:
        """(stage, key) of every stage up to `upto`: what gc keeps for this pipeline."""
        return {(name, self.key(name)) for name in ORDER[: ORDER.index(upto) + 1]}

    def _clean(self) -> None:
        self._cleaned = True
        keep = tuple(name for name, stage in STAGES.items() if stage.resumable)
        removed = self.store.clean_leftovers(keep_tmp=keep)
        if removed:
            self.log(f"cache: removed {len(removed)} unfinished folder(s) left by interrupted runs")

    def run(self, name: str) -> Entry:
        if not self._cleaned:
            self._clean()
        if name in self._done:
            return self._done[name]
        stage = STAGES[name]
        inputs = {dep: self.run(dep) for dep in stage.deps}
        key = self.key(name)
        entry = None if name in self.force else self.store.get(name, key)
        if entry is None:
            def waiting():
                self.log(f"{name}: another run is computing this entry ({key}); waiting for it ...")
            with self.store.lock(name, key, on_wait=waiting):
                entry = None if name in self.force else self.store.get(name, key)
                if entry is None:
                    with self.store.reading(inputs.values()):  # gc and rm leave the inputs alone meanwhile
                        entry = self._compute(stage, key, inputs)
                    self.force.discard(name)
                else:
                    self.log(f"{name}: cached (computed by another run) -> {entry.path}")
        else:
            self.log(f"{name}: cached -> {entry.path}")
        self._done[name] = entry
        return entry

    def _compute(self, stage: Stage, key: str, inputs: dict[str, Entry]) -> Entry:
        """Run a stage body into a fresh (or, for a resumable stage, resumed) temp folder and
        commit it. User mistakes and a full disk leave nothing; an interruption of a resumable
        stage keeps its checkpoint."""
        params = stage.params(self.cfg)
        writer = self.store.writer(stage.name, key, params, self.input_keys(stage.name),
                                   resume=stage.resumable and stage.name not in self.force)
        self.log(f"{stage.name}: computing ({key}) ...")
        start = time.time()
        try:
            with active(self.cluster):
                summary = stage.compute(Context(self.cfg, inputs, writer, self.log, self.cluster))
            entry = writer.commit()
        except KmfeatError as exc:
            if not (stage.resumable and getattr(exc, "keep_checkpoint", False)):
                writer.abort()
            raise
        except Exception as exc:
            # libraries that lose the errno of a failed write (numpy's tofile, torch.save) are
            # caught by looking at the space left
            full = exc if is_disk_full(exc) else None
            if full is None and free_bytes(self.store.root) < LOW_SPACE:
                full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            if full is not None or not stage.resumable:
                writer.abort()
            if full is not None:
                raise disk_full_error(full, self.store.root / stage.name) from None
            raise
        except BaseException as exc:
            if not stage.resumable:
                writer.abort()
            if isinstance(exc, KeyboardInterrupt):
                exc.kmfeat_hint = INTERRUPTED.get(stage.name, INTERRUPTED[None]).format(stage=stage.name)
            raise
        self.log(f"{stage.name}: {summary}; {time.time() - start:.1f} s, "
                 f"{human_bytes(entry.size_bytes())} -> {entry.path}")
        return entry
