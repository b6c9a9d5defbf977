"""The stage graph: which stage needs which, with which params (what the cache keys are made of), and the
stage bodies, which only adapt cached arrays to the pure functions of the other modules (the encode body, with
its checkpointing, is kmfeat.encode_stage; the runner is kmfeat.runner). Heavy modules are imported inside the
bodies so `kmfeat data` stays light."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from .cache import Entry, Writer, is_disk_full
from .config import PipelineConfig
from .errors import KmfeatError
from .encode_stage import compute_encode
from .progress import say

ORDER = ["data", "patches", "whiten", "kmeans", "encode", "train"]


@dataclass
class Context:
    cfg: PipelineConfig
    inputs: dict[str, Entry]
    out: Writer
    log: Callable[[str], None] = say
    cluster: object = None  # a kmfeat.cluster.Cluster when --scheduler is given: encode and decode run there


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
    return isinstance(arr, np.memmap) and Path(arr.filename).resolve().parent == out.dir.resolve()


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
    """The k-means settings with the backend, device and precision that will run (their results differ in the
    last bits): a cached dictionary is reused only where it would be computed the same way. fp32 is left out
    of the key, so dictionaries cached before kmeans.precision existed keep theirs."""
    from .kmeans import resolve

    p = cfg.section("kmeans")
    p["backend"], p["device"], precision = resolve(p["backend"], p["device"], p.pop("precision"))
    if precision != "fp32":
        p["precision"] = precision
    return p


def _compute_kmeans(ctx: Context) -> str:
    from .kmeans import KMeans
    from .plots import plot_centroids

    k = ctx.cfg.kmeans
    whitener = load_whitener(ctx.inputs["whiten"])
    z = whitener.transform(ctx.inputs["patches"].array("patches"))
    km = KMeans(k=k.k, iters=k.iters, seed=k.seed, backend=k.backend, device=k.device,
                init=k.init, precision=k.precision).fit(z)
    if not np.isfinite(km.centroids_).all():
        raise KmfeatError("kmeans: the centroids contain NaN or inf; check whiten.eps and the input images")
    ctx.out.save("centroids", km.centroids_)
    ctx.out.save("counts", km.counts_)
    ctx.out.meta.update(inertia=float(km.inertia_), backend=km.backend_, device=km.device_, precision=km.precision_,
                        empty_clusters=int((km.counts_ == 0).sum()))
    rf = ctx.cfg.patches.rf
    plot_centroids(whitener.inverse_transform(km.centroids_), rf, km.centroids_.shape[1] // rf**2,
                   ctx.out.path("centroids.png"))
    return (f"k={k.k} on {z.shape[0]:,} patches with {km.backend_}/{km.device_} {km.precision_}, "
            f"inertia {km.inertia_:.4g}")


def _encode_params(cfg: PipelineConfig) -> dict:
    """The encode settings that change the features' bytes, the resolved device and precision among them (CPU
    and CUDA, fp32 and bf16 round differently; fp32, the default, is left out so earlier keys stand); the batch
    does not (see encode_batch)."""
    from .encode import _resolve_device
    from .precision import encode_precision

    e = cfg.section("encode")
    e["device"] = _resolve_device(e["device"])
    e.pop("batch")
    precision = encode_precision(e.pop("precision"), e["device"])
    if precision != "fp32":
        e["precision"] = precision
    return {**e, "grid": cfg.pool.grid, "pool": cfg.pool.kind, "rf": cfg.patches.rf,
            "norm_eps": cfg.patches.norm_eps}


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
    if h["bottleneck"] == 0:  # the plain MLP: keyed as before
        del h["bottleneck"]
    mlp_only = ["hidden", "bottleneck", "dropout", "input_dropout", "epochs", "batch", "lr", "weight_decay",
                "optimizer", "schedule", "patience", "label_smoothing", "precision"]
    unused = {"mlp": ["estimator", "params", "grid", "refit"], "svm": mlp_only + ["estimator"],
              "ridge": mlp_only + ["estimator"], "sklearn": mlp_only}[h["kind"]]
    for name in unused:
        h.pop(name, None)
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
    # encode revision 1: normalization and whitening folded into the centroids (bytes move at float32 rounding)
    Stage("encode", ("data", "whiten", "kmeans"), _encode_params, compute_encode, resumable=True, revision=1),
    # train resumes the MLP from its per-epoch checkpoint; revision 1: svm solved to tol 1e-6
    Stage("train", ("encode",), _train_params, _compute_train, resumable=True, revision=1),
]}


