"""The stage graph (which stage needs which, with which params) and the runner that resolves,
caches and runs stages. Stage bodies only adapt cached arrays to the pure functions of the
other modules; heavy modules are imported inside them so `kmfeat data` stays light.

Failure handling: a stage that fails with a user mistake (KmfeatError) or a full disk leaves
nothing in the cache; one that is interrupted (Ctrl-C, kill, crash) leaves its temp folder,
which the next run removes, except for `encode`, which checkpoints every shard of SHARD images
(env KMFEAT_SHARD overrides it, e.g. to test resuming on tiny data) and resumes from there.
"""
from __future__ import annotations

import errno
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from .cache import (Entry, Store, Writer, _fsync_dir, _fsync_file, disk_full_error, free_bytes, is_disk_full,
                    make_key, release_pages)
from .config import PipelineConfig
from .memory import human_bytes
from .errors import KmfeatError
from .progress import bar, say

ORDER = ["data", "patches", "whiten", "kmeans", "encode", "train"]
SHARD = 2000
LOW_SPACE = 1 << 20
"""A stage that fails with less free space than this on the cache disk is reported as disk full."""


def shard_size() -> int:
    """Images per encode checkpoint: $KMFEAT_SHARD if set, else SHARD."""
    text = os.environ.get("KMFEAT_SHARD", "").strip()
    if not text:
        return SHARD
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise KmfeatError(f"KMFEAT_SHARD: got {text!r}, expected a positive integer (images per encode checkpoint)")
    return value


@dataclass
class Context:
    cfg: PipelineConfig
    inputs: dict[str, Entry]
    out: Writer
    log: Callable[[str], None] = say


INTERRUPTED = {
    "encode": "Interrupted; rerun the same command to resume.",
    "train": "Interrupted during train; rerun the same command: an MLP head resumes after its last checkpointed epoch, "
             "other heads start over (the features and earlier stages are kept).",
    None: "Interrupted during {stage}; rerun the same command: finished stages are kept, {stage} starts over.",
}
"""What is true after Ctrl-C in each stage (printed instead of the CLI's generic line)."""


@dataclass(frozen=True)
class Stage:
    name: str
    deps: tuple[str, ...]
    params: Callable[[PipelineConfig], dict]
    compute: Callable[[Context], str]
    resumable: bool = False
    revision: int = 0
    """Bumped when the stage's code computes something else from the same params (see make_key)."""


def _unreadable(path: str, exc: OSError) -> KmfeatError:
    where = exc.filename if exc.filename and str(exc.filename) != str(path) else "it"
    return KmfeatError(f"data path {path}: cannot read {where} ({exc.strerror or exc}); "
                       f"check that it exists and is readable")


def _data_params(cfg: PipelineConfig) -> dict:
    from .data import fingerprint

    d = cfg.data
    origin, extra = (_fingerprint(fingerprint, p) for p in (d.path, d.unlabeled))
    params = {"source": d.source, "origin": origin or f"official:{d.source}", "resize": d.resize,
              "limit_train": d.limit_train, "limit_test": d.limit_test, "seed": d.seed}
    if d.unlabeled:  # only when set, so the keys of existing caches stay as they were
        params["unlabeled"] = extra
    return params


def _fingerprint(fingerprint, path: str) -> str:
    try:
        return fingerprint(path) if path else ""
    except OSError as exc:
        raise _unreadable(path, exc) from None


def _writer_array(out: Writer, arr) -> bool:
    """Whether `arr` is already the memory-mapped file of `out` (decoded in place): no save needed."""
    return isinstance(arr, np.memmap) and Path(arr.filename).parent == out.dir


def _compute_data(ctx: Context) -> str:
    from .data import load_dataset
    from .data.unlabeled import load_unlabeled_source

    d, out = ctx.cfg.data, ctx.out
    scratch = lambda name, shape, dtype: np.lib.format.open_memmap(  # noqa: E731
        out.scratch(f"{name}.scratch.npy"), mode="w+", dtype=dtype, shape=shape)
    try:
        ds = load_dataset(d.source, d.path or None, resize=tuple(d.resize) or None, limit_train=d.limit_train,
                          limit_test=d.limit_test, seed=d.seed, alloc=out.open_array)
        extra = (load_unlabeled_source(d.unlabeled, tuple(d.resize) or None, out.open_array
                                       if ds.unlabeled_x is None else _renamed(out.open_array, "extra_x"), scratch)
                 if d.unlabeled else None)
    except OSError as exc:
        if is_disk_full(exc):
            raise
        raise _unreadable(d.path, exc) from None
    arrays = {"train_x": ds.train_x, "train_y": ds.train_y, "test_x": ds.test_x, "test_y": ds.test_y}
    if ds.unlabeled_x is not None:
        arrays["unlabeled_x"] = ds.unlabeled_x
    if extra is not None:
        arrays["unlabeled_x" if ds.unlabeled_x is None else "extra_x"] = extra
        _same_size(ds.train_x, extra, d.unlabeled)
    if ds.folds is not None:
        arrays["folds"] = fold_matrix(ds.folds)
    for name, arr in arrays.items():
        if not _writer_array(out, arr):
            out.save(name, arr)
    out.meta["classes"] = list(ds.classes)
    out.meta["path"] = str(Path(d.path).resolve()) if d.path else ""  # what --data selects this entry
    n_unlabeled = sum(len(arrays[n]) for n in ("unlabeled_x", "extra_x") if n in arrays)
    return (f"{len(ds.train_x):,} train + {len(ds.test_x):,} test"
            + (f" + {n_unlabeled:,} unlabeled" if n_unlabeled else "")
            + f" images of {'x'.join(map(str, ds.train_x.shape[1:]))}, {len(ds.classes)} classes"
            + (f", {len(ds.folds)} predefined folds" if ds.folds is not None else ""))


def _renamed(alloc, name: str):
    return lambda _name, shape, dtype: alloc(name, shape, dtype)


def _same_size(train_x, extra, where: str) -> None:
    if extra.shape[1:] != train_x.shape[1:]:
        have, want = ("x".join(map(str, a.shape[1:3])) for a in (extra, train_x))
        raise KmfeatError(f"data.unlabeled {where}: its images are {have}, the labeled ones {want}; "
                          f"set data.resize = [H, W] to bring both to one size")


def fold_matrix(folds) -> np.ndarray:
    """Predefined folds as one int64 (n_folds, longest) array of train indices, padded with -1."""
    width = max(len(f) for f in folds)
    out = np.full((len(folds), width), -1, dtype=np.int64)
    for i, f in enumerate(folds):
        out[i, :len(f)] = f
    return out


def _patches_params(cfg: PipelineConfig) -> dict:
    params = cfg.section("patches")
    if params["source"] == "auto":  # the default: keyed as before (the data key says what auto means)
        del params["source"]
    return params


def _compute_patches(ctx: Context) -> str:
    from .patches import normalize_patches, patch_sources, sample_patches

    p = ctx.cfg.patches
    source, images = patch_sources(ctx.inputs["data"], p.source)
    patches = normalize_patches(sample_patches(images, rf=p.rf, n=p.n, seed=p.seed), eps=p.norm_eps)
    ctx.out.save("patches", patches)
    ctx.out.meta["source"] = source
    return f"{patches.shape[0]:,} patches of {patches.shape[1]} values from the {source} images"


def _whiten_params(cfg: PipelineConfig) -> dict:
    return cfg.section("whiten")


def _compute_whiten(ctx: Context) -> str:
    from .whiten import Whitener

    w = ctx.cfg.whiten
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):  # checked just below
        whitener = Whitener(method=w.method, eps=w.eps).fit(ctx.inputs["patches"].array("patches"))
    if not (np.isfinite(whitener.W_).all() and np.isfinite(whitener.mean_).all()):
        raise KmfeatError(f"whiten.eps: the whitening matrix has NaN or inf: eps = {w.eps:g} is too small for "
                          f"these patches (constant images?); use a larger whiten.eps, e.g. 0.1")
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
    """The k-means settings with the backend and device that will run (their results differ in the last
    bits): a cached dictionary is reused only where it would be computed the same way."""
    from .kmeans import resolve_backend

    p = cfg.section("kmeans")
    p["backend"], p["device"] = resolve_backend(p["backend"], p["device"])
    return p


def _compute_kmeans(ctx: Context) -> str:
    from .kmeans import KMeans
    from .plots import plot_centroids

    k = ctx.cfg.kmeans
    whitener = load_whitener(ctx.inputs["whiten"])
    z = whitener.transform(ctx.inputs["patches"].array("patches"))
    km = KMeans(k=k.k, iters=k.iters, seed=k.seed, backend=k.backend, device=k.device,
                init=k.init).fit(z)
    if not np.isfinite(km.centroids_).all():
        raise KmfeatError("kmeans: the centroids contain NaN or inf; check whiten.eps and the input images")
    ctx.out.save("centroids", km.centroids_)
    ctx.out.save("counts", km.counts_)
    ctx.out.meta.update(inertia=float(km.inertia_), backend=km.backend_, device=km.device_,
                        empty_clusters=int((km.counts_ == 0).sum()))
    rf = ctx.cfg.patches.rf
    plot_centroids(whitener.inverse_transform(km.centroids_), rf, km.centroids_.shape[1] // rf**2,
                   ctx.out.path("centroids.png"))
    return f"k={k.k} on {z.shape[0]:,} patches with {km.backend_}/{km.device_}, inertia {km.inertia_:.4g}"


def _encode_params(cfg: PipelineConfig) -> dict:
    """The encode settings that change the features' bytes, the resolved device among them (CPU and CUDA
    round differently); the batch does not (see encode_batch)."""
    from .encode import _resolve_device

    e = cfg.section("encode")
    e["device"] = _resolve_device(e["device"])
    e.pop("batch")
    return {**e, "grid": cfg.pool.grid, "pool": cfg.pool.kind, "rf": cfg.patches.rf,
            "norm_eps": cfg.patches.norm_eps}


def make_encoder(cfg: PipelineConfig, whiten: Entry, kmeans: Entry):
    """The Encoder defined by a pipeline and its cached whitening and centroids."""
    from .encode import Encoder

    e = cfg.encode
    return Encoder(np.asarray(kmeans.array("centroids")), np.asarray(whiten.array("mean")),
                   np.asarray(whiten.array("matrix")), rf=cfg.patches.rf, stride=e.stride,
                   kind=e.kind, alpha=e.alpha, split=e.split, q=e.q, grid=cfg.pool.grid, pool=cfg.pool.kind,
                   norm_eps=cfg.patches.norm_eps, device=e.device, batch=e.batch or None)


def encode_batch(encoder, image_shape) -> int:
    """Images per encoder batch, fixed by the image size, k and the device (never by free memory),
    so that a resumed encode computes every shard exactly as an uninterrupted run does."""
    from .encode import BATCH_BYTES

    _, H, W, C = image_shape
    ny, nx = (H - encoder.rf) // encoder.stride + 1, (W - encoder.rf) // encoder.stride + 1
    per_image = 4 * (max(ny, 1) * max(nx, 1) * (3 * encoder.d_ + 2) + H * W * C
                     + 2 * encoder.fine_ ** 2 * encoder.n_codes)
    return int(max(1, BATCH_BYTES[encoder.device_] // per_image))


@dataclass
class _Split:
    """One split to encode: its memmap, checkpoint file and the shards already finished."""
    name: str
    images: np.ndarray
    flip: bool
    out: np.memmap
    record: Path
    settings: dict
    done: set[int]

    def shard_len(self, start: int) -> int:
        return min(self.settings["shard"], len(self.images) - start)


def _read_checkpoint(record: Path) -> dict:
    try:
        saved = json.loads(record.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, OSError):
        return {}
    return saved if isinstance(saved, dict) else {}


def _compile_decision(ctx: Context, encoder, splits) -> bool:
    """Whether this encode runs the compiled kernel, decided once from its total planned work. Under the auto
    policy (KMFEAT_COMPILE unset) an interrupted run's recorded decision wins, so a resumed encode computes its
    remaining shards exactly as the first run did (the first run's per-process switch point is not replayed)."""
    from .encode import compile_mode

    planned = encoder.will_compile(sum(encoder.work(images.shape) for _, images, _ in splits))
    if compile_mode() != "auto":
        return planned
    for name, _, _ in splits:
        saved = _read_checkpoint(ctx.out.path(f"progress-{name}.json")).get("settings")
        if isinstance(saved, dict) and isinstance(saved.get("compiled"), bool):
            if saved["compiled"] and not encoder.compile_:
                return planned  # cannot compile here: the checkpoint is discarded by the settings check
            return saved["compiled"]
    return planned


def _open_split(ctx: Context, encoder, name: str, images: np.ndarray, flip: bool, settings: dict) -> _Split:
    """Open (or reopen) a split's output and read its checkpoint; a checkpoint written with
    other settings, or for an output that had to be recreated, is discarded."""
    out = ctx.out.open_array(name, (len(images), encoder.n_features), np.dtype(ctx.cfg.encode.dtype))
    record = ctx.out.scratch(f"progress-{name}.json")
    ctx.out.scratch(f"progress-{name}.json.part")
    done: set[int] = set()
    if record.exists() and name not in ctx.out.created:
        saved = _read_checkpoint(record)
        if saved.get("settings") == settings:
            done = {int(s) for s in saved.get("done", [])}
        else:
            ctx.log(f"encode: {name}: the interrupted run used other settings; encoding it again")
    return _Split(name, images, flip, out, record, settings, done)


def _encode_split(split: _Split, encoder) -> None:
    """Encode a split shard by shard into its memmap; each finished shard is flushed, then
    recorded in the checkpoint (write + atomic rename), so a killed run resumes after it."""
    n, step = len(split.images), split.settings["shard"]
    todo = [s for s in range(0, n, step) if s not in split.done]
    with bar(total=n, initial=n - sum(split.shard_len(s) for s in todo), desc=f"encode {split.name}",
             unit="img") as progress:
        for start in todo:
            stop = start + split.shard_len(start)
            for a, b, feats in encoder.iter_transform(split.images[start:stop], flip=split.flip,
                                                      batch=split.settings["batch"],
                                                      compiled=split.settings["compiled"]):
                feats = feats.astype(split.out.dtype, copy=False)
                if not np.isfinite(feats).all():
                    hint = (" (or values beyond the float16 range: use encode.dtype = \"float32\")"
                            if split.out.dtype == np.float16 else "")
                    raise KmfeatError(f"encode: features of {split.name} images {start + a}-{start + b} contain "
                                      f"NaN or inf; check the whitening (whiten.eps) and the input images{hint}")
                split.out[start + a:start + b] = feats
            split.out.flush()
            release_pages(split.out)
            split.done.add(start)
            part = split.record.with_name(split.record.name + ".part")
            part.write_text(json.dumps({"settings": split.settings, "done": sorted(split.done)}))
            _fsync_file(part)  # on disk before it says the shard is done (msync above wrote the shard itself)
            part.replace(split.record)
            _fsync_dir(split.record.parent)
            progress.update(stop - start)


def _compute_encode(ctx: Context) -> str:
    data = ctx.inputs["data"]
    encoder = make_encoder(ctx.cfg, ctx.inputs["whiten"], ctx.inputs["kmeans"])
    train_x, test_x = data.array("train_x"), data.array("test_x")
    splits = [("train", train_x, False), ("test", test_x, False)]
    if ctx.cfg.encode.flip_train:
        splits.insert(1, ("train_flip", train_x, True))
    if ctx.cfg.encode.flip_test:
        splits.append(("test_flip", test_x, True))
    settings = {"shard": shard_size(), "batch": ctx.cfg.encode.batch or encode_batch(encoder, train_x.shape),
                "device": encoder.device_, "compiled": _compile_decision(ctx, encoder, splits)}
    opened = [_open_split(ctx, encoder, name, images, flip, settings) for name, images, flip in splits]
    total = sum(len(s.images) for s in opened)
    done = sum(s.shard_len(start) for s in opened for start in s.done)
    if done:
        ctx.log(f"encode: resuming, {done:,}/{total:,} images already done")
    for split in opened:
        _encode_split(split, encoder)
    ctx.out.save("train_y", data.array("train_y"))
    ctx.out.save("test_y", data.array("test_y"))
    if data.has("folds"):
        ctx.out.save("folds", data.array("folds"))
    ctx.out.meta.update(classes=data.meta["classes"], n_features=encoder.n_features,
                        splits=[s[0] for s in splits])
    size = total * encoder.n_features * np.dtype(ctx.cfg.encode.dtype).itemsize
    return f"{total:,} images -> {encoder.n_features:,} {ctx.cfg.encode.dtype} features ({size / 1e9:.2f} GB)"


def _train_params(cfg: PipelineConfig) -> dict:
    """The head settings that change the model: for the torch heads (mlp, svm) the device type they resolve
    to; the ridge and scikit-learn heads run on the CPU whatever head.device says."""
    h = cfg.section("head")
    device = h.pop("device")
    if h["folds"] == "none":  # the default: keyed as before
        del h["folds"]
    if h["kind"] in ("mlp", "svm"):
        cuda = device.startswith("cuda") or (device == "auto" and torch_cuda_available())
        h["device"] = "cuda" if cuda else "cpu"
    mlp_only = ["hidden", "dropout", "input_dropout", "epochs", "batch", "lr", "weight_decay",
                "optimizer", "schedule", "patience", "label_smoothing", "precision"]
    unused = {"mlp": ["estimator", "params", "grid", "refit"], "svm": mlp_only + ["estimator"],
              "ridge": mlp_only + ["estimator"], "sklearn": mlp_only}[h["kind"]]
    for name in unused:
        h.pop(name)
    return h


def torch_cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _compute_train(ctx: Context) -> str:
    from .train import train_head

    if ctx.cfg.head.folds != "none":
        from .folds import train_folds

        m = train_folds(ctx.cfg.head, ctx.inputs["encode"], ctx.out)
        return (f"test accuracy {m['test_accuracy_mean']:.4f} ± {m['test_accuracy_std']:.4f} over {m['folds']} "
                f"folds (val {m['val_accuracy_mean']:.4f})")
    metrics = train_head(ctx.cfg.head, ctx.inputs["encode"], ctx.out)
    return (f"test accuracy {metrics['test']['accuracy']:.4f} (val {metrics['val_accuracy']:.4f}, "
            f"train {metrics['train_accuracy']:.4f})")


STAGES: dict[str, Stage] = {s.name: s for s in [
    Stage("data", (), _data_params, _compute_data),
    Stage("patches", ("data",), _patches_params, _compute_patches),
    Stage("whiten", ("patches",), _whiten_params, _compute_whiten),
    Stage("kmeans", ("patches", "whiten"), _kmeans_params, _compute_kmeans),
    Stage("encode", ("data", "whiten", "kmeans"), _encode_params, _compute_encode, resumable=True),
    # train resumes the MLP from its per-epoch checkpoint; revision 1: svm solved to tol 1e-6
    Stage("train", ("encode",), _train_params, _compute_train, resumable=True, revision=1),
]}


class Runner:
    """Resolves a stage and its dependencies for one pipeline: cached entries are reused,
    missing ones computed under a per-key lock and committed atomically. The first `run`
    removes what interrupted runs left behind (except encode checkpoints, which are resumed).
    `quiet` drops the status lines (warnings and errors still show)."""

    def __init__(self, cfg: PipelineConfig, store: Store, force: frozenset[str] = frozenset(),
                 quiet: bool = False):
        self.cfg, self.store, self.force = cfg, store, set(force)
        self.quiet = quiet
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
            summary = stage.compute(Context(self.cfg, inputs, writer, self.log))
            entry = writer.commit()
        except KmfeatError:
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
