"""The stage graph (which stage needs which, with which params) and the runner that resolves,
caches and runs stages. Stage bodies only adapt cached arrays to the pure functions of the
other modules; heavy modules are imported inside them so `kmfeat data` stays light.
"""
from __future__ import annotations

import errno
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from .cache import Entry, Store, Writer, disk_full_error, make_key
from .config import PipelineConfig
from .errors import KmfeatError
from .progress import bar, say

ORDER = ["data", "patches", "whiten", "kmeans", "encode", "train"]
SHARD = 2000


@dataclass
class Context:
    cfg: PipelineConfig
    inputs: dict[str, Entry]
    out: Writer


@dataclass(frozen=True)
class Stage:
    name: str
    deps: tuple[str, ...]
    params: Callable[[PipelineConfig], dict]
    compute: Callable[[Context], str]
    resumable: bool = False


def _data_params(cfg: PipelineConfig) -> dict:
    from .data import fingerprint

    d = cfg.data
    origin = fingerprint(d.path) if d.path else f"official:{d.source}"
    return {"source": d.source, "origin": origin, "resize": d.resize,
            "limit_train": d.limit_train, "limit_test": d.limit_test, "seed": d.seed}


def _compute_data(ctx: Context) -> str:
    from .data import load_dataset

    d = ctx.cfg.data
    ds = load_dataset(d.source, d.path or None, resize=tuple(d.resize) or None,
                      limit_train=d.limit_train, limit_test=d.limit_test, seed=d.seed)
    for name in ("train_x", "train_y", "test_x", "test_y"):
        ctx.out.save(name, getattr(ds, name))
    ctx.out.meta["classes"] = list(ds.classes)
    return (f"{len(ds.train_x):,} train + {len(ds.test_x):,} test images of "
            f"{'x'.join(map(str, ds.train_x.shape[1:]))}, {len(ds.classes)} classes")


def _patches_params(cfg: PipelineConfig) -> dict:
    return cfg.section("patches")


def _compute_patches(ctx: Context) -> str:
    from .patches import normalize_patches, sample_patches

    p = ctx.cfg.patches
    images = ctx.inputs["data"].array("train_x")
    patches = normalize_patches(sample_patches(images, rf=p.rf, n=p.n, seed=p.seed), eps=p.norm_eps)
    ctx.out.save("patches", patches)
    return f"{patches.shape[0]:,} patches of {patches.shape[1]} values"


def _whiten_params(cfg: PipelineConfig) -> dict:
    return cfg.section("whiten")


def _compute_whiten(ctx: Context) -> str:
    from .whiten import Whitener

    w = ctx.cfg.whiten
    whitener = Whitener(method=w.method, eps=w.eps).fit(ctx.inputs["patches"].array("patches"))
    ctx.out.save("mean", whitener.mean_)
    ctx.out.save("matrix", whitener.W_)
    ctx.out.save("eigenvalues", whitener.eigenvalues_)
    return f"{w.method} whitening of {whitener.W_.shape[0]}-d patches"


def load_whitener(entry: Entry):
    """The fitted Whitener stored in a whiten entry."""
    from .whiten import Whitener

    whitener = Whitener(method=entry.params["method"], eps=entry.params["eps"])
    whitener.mean_ = np.asarray(entry.array("mean"))
    whitener.W_ = np.asarray(entry.array("matrix"))
    whitener.eigenvalues_ = np.asarray(entry.array("eigenvalues"))
    whitener.n_features_in_ = whitener.W_.shape[1]
    return whitener


def _kmeans_params(cfg: PipelineConfig) -> dict:
    return cfg.section("kmeans")


def _compute_kmeans(ctx: Context) -> str:
    from .kmeans import KMeans
    from .plots import plot_centroids

    k = ctx.cfg.kmeans
    whitener = load_whitener(ctx.inputs["whiten"])
    z = whitener.transform(ctx.inputs["patches"].array("patches"))
    km = KMeans(k=k.k, iters=k.iters, seed=k.seed, backend=k.backend, device=k.device,
                init=k.init).fit(z)
    ctx.out.save("centroids", km.centroids_)
    ctx.out.save("counts", km.counts_)
    ctx.out.meta.update(inertia=float(km.inertia_), backend=km.backend_, device=km.device_,
                        empty_clusters=int((km.counts_ == 0).sum()))
    rf = ctx.cfg.patches.rf
    plot_centroids(whitener.inverse_transform(km.centroids_), rf, km.centroids_.shape[1] // rf**2,
                   ctx.out.path("centroids.png"))
    return f"k={k.k} on {z.shape[0]:,} patches with {km.backend_}/{km.device_}, inertia {km.inertia_:.4g}"


def _encode_params(cfg: PipelineConfig) -> dict:
    e = cfg.section("encode")
    e.pop("device")
    e.pop("batch")
    return {**e, "grid": cfg.pool.grid, "rf": cfg.patches.rf, "norm_eps": cfg.patches.norm_eps}


def make_encoder(cfg: PipelineConfig, whiten: Entry, kmeans: Entry):
    """The Encoder defined by a pipeline and its cached whitening and centroids."""
    from .encode import Encoder

    e = cfg.encode
    return Encoder(np.asarray(kmeans.array("centroids")), np.asarray(whiten.array("mean")),
                   np.asarray(whiten.array("matrix")), rf=cfg.patches.rf, stride=e.stride,
                   kind=e.kind, alpha=e.alpha, grid=cfg.pool.grid, norm_eps=cfg.patches.norm_eps,
                   device=e.device, batch=e.batch or None)


def _encode_split(ctx: Context, encoder, name: str, images: np.ndarray, flip: bool) -> None:
    """Encode one split shard by shard into a .npy memmap; finished shards are recorded in
    progress-<name>.json after a flush, so a killed run resumes where it stopped."""
    out = ctx.out.open_array(name, (len(images), encoder.n_features), np.float32)
    record = ctx.out.path(f"progress-{name}.json")
    done = set(json.loads(record.read_text())) if record.exists() else set()
    shards = [s for s in range(0, len(images), SHARD) if s not in done]
    with bar(total=len(images), initial=len(images) - sum(min(SHARD, len(images) - s) for s in shards),
             desc=f"encode {name}", unit="img") as progress:
        for start in shards:
            stop = min(start + SHARD, len(images))
            feats = encoder.transform(np.asarray(images[start:stop]), flip=flip)
            if not np.isfinite(feats).all():
                raise KmfeatError(f"encode: features of {name} images {start}-{stop} contain NaN or "
                                  f"inf; check the whitening (whiten.eps) and the input images")
            out[start:stop] = feats
            out.flush()
            done.add(start)
            tmp = record.with_suffix(".part")
            tmp.write_text(json.dumps(sorted(done)))
            tmp.replace(record)
            progress.update(stop - start)
    del out
    record.unlink()


def _compute_encode(ctx: Context) -> str:
    data = ctx.inputs["data"]
    encoder = make_encoder(ctx.cfg, ctx.inputs["whiten"], ctx.inputs["kmeans"])
    train_x, test_x = data.array("train_x"), data.array("test_x")
    splits = [("train", train_x, False), ("test", test_x, False)]
    if ctx.cfg.encode.flip_train:
        splits.insert(1, ("train_flip", train_x, True))
    for name, images, flip in splits:
        _encode_split(ctx, encoder, name, images, flip)
    ctx.out.save("train_y", data.array("train_y"))
    ctx.out.save("test_y", data.array("test_y"))
    ctx.out.meta.update(classes=data.meta["classes"], n_features=encoder.n_features,
                        splits=[s[0] for s in splits])
    n = sum(len(s[1]) for s in splits)
    return f"{n:,} images -> {encoder.n_features:,} features ({n * encoder.n_features * 4 / 1e9:.2f} GB)"


def _train_params(cfg: PipelineConfig) -> dict:
    h = cfg.section("head")
    h.pop("device")
    mlp_only = ["hidden", "dropout", "input_dropout", "epochs", "batch", "lr", "weight_decay",
                "optimizer", "schedule", "patience", "label_smoothing"]
    for name in (mlp_only if h["kind"] == "sklearn" else ["estimator", "params", "grid"]):
        h.pop(name)
    return h


def _compute_train(ctx: Context) -> str:
    from .train import train_head

    metrics = train_head(ctx.cfg.head, ctx.inputs["encode"], ctx.out)
    return (f"test accuracy {metrics['test']['accuracy']:.4f} (val {metrics['val_accuracy']:.4f}, "
            f"train {metrics['train_accuracy']:.4f})")


STAGES: dict[str, Stage] = {s.name: s for s in [
    Stage("data", (), _data_params, _compute_data),
    Stage("patches", ("data",), _patches_params, _compute_patches),
    Stage("whiten", ("patches",), _whiten_params, _compute_whiten),
    Stage("kmeans", ("patches", "whiten"), _kmeans_params, _compute_kmeans),
    Stage("encode", ("data", "whiten", "kmeans"), _encode_params, _compute_encode, resumable=True),
    Stage("train", ("encode",), _train_params, _compute_train),
]}


def _human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} GB"


class Runner:
    """Resolves a stage and its dependencies for one pipeline: cached entries are reused,
    missing ones computed under a per-key lock and committed atomically."""

    def __init__(self, cfg: PipelineConfig, store: Store, force: frozenset[str] = frozenset()):
        self.cfg, self.store, self.force = cfg, store, set(force)
        self._keys: dict[str, str] = {}
        self._done: dict[str, Entry] = {}

    def key(self, name: str) -> str:
        if name not in self._keys:
            stage = STAGES[name]
            self._keys[name] = make_key(name, stage.params(self.cfg), self.input_keys(name))
        return self._keys[name]

    def input_keys(self, name: str) -> dict[str, str]:
        return {dep: self.key(dep) for dep in STAGES[name].deps}

    def cached(self, name: str) -> Entry | None:
        """The finished entry of this stage for this pipeline, without computing anything."""
        return self.store.get(name, self.key(name))

    def keys(self, upto: str = "train") -> set[tuple[str, str]]:
        """(stage, key) of every stage up to `upto`: what gc keeps for this pipeline."""
        return {(name, self.key(name)) for name in ORDER[: ORDER.index(upto) + 1]}

    def run(self, name: str) -> Entry:
        if name in self._done:
            return self._done[name]
        stage = STAGES[name]
        inputs = {dep: self.run(dep) for dep in stage.deps}
        key = self.key(name)
        entry = None if name in self.force else self.store.get(name, key)
        if entry is None:
            with self.store.lock(name, key):
                entry = None if name in self.force else self.store.get(name, key)
                if entry is None:
                    entry = self._compute(stage, key, inputs)
                    self.force.discard(name)
                else:
                    say(f"{name}: cached (computed by another run) -> {entry.path}")
        else:
            say(f"{name}: cached -> {entry.path}")
        self._done[name] = entry
        return entry

    def _compute(self, stage: Stage, key: str, inputs: dict[str, Entry]) -> Entry:
        old = self.store.get(stage.name, key)
        if old is not None:
            self.store.remove(old.path)
        params = stage.params(self.cfg)
        writer = self.store.writer(stage.name, key, params, self.input_keys(stage.name),
                                   resume=stage.resumable)
        say(f"{stage.name}: computing ({key}) ...")
        start = time.time()
        try:
            summary = stage.compute(Context(self.cfg, inputs, writer))
            entry = writer.commit()
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                writer.abort()
                raise disk_full_error(exc, writer.dir) from None
            if not stage.resumable:
                writer.abort()
            raise
        except BaseException:
            if not stage.resumable:
                writer.abort()
            raise
        say(f"{stage.name}: {summary}; {time.time() - start:.1f} s, "
            f"{_human_bytes(entry.size_bytes())} -> {entry.path}")
        return entry


def load_features(source: str | Path, cache_dir: str | Path | None = None, overrides=(),
                  data: str | None = None):
    """(X_train, y_train, X_test, y_test) of cached features, memory-mapped.

    `source` is an encode folder (as printed by `kmfeat cache path encode`) or a pipeline TOML
    whose features were computed with `kmfeat encode`.
    """
    from . import config

    path = Path(source)
    if path.is_dir():
        store = Store(path.parent.parent)
        entry = store.get(path.parent.name, path.name)
        if entry is None or entry.stage != "encode":
            raise KmfeatError(f"{path}: not a finished encode entry (no manifest.json)")
    else:
        cfg = config.load(path, overrides, data)
        entry = Runner(cfg, Store(cache_dir)).cached("encode")
        if entry is None:
            raise KmfeatError(f"{path}: features not computed yet; run `kmfeat encode -p {path}` first")
    return entry.array("train"), entry.array("train_y"), entry.array("test"), entry.array("test_y")
