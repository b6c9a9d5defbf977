"""The encode stage's body: every image encoded in checkpointed shards of SHARD images (env KMFEAT_SHARD
overrides it, e.g. to test resuming on tiny data). Each finished shard is flushed to the memory-mapped output and
recorded in a checkpoint (write + fsync + atomic rename) in the entry's temp folder, with the settings that fix
its bytes (shard, batch, device, compiled), so a killed or interrupted run resumes after the last recorded shard
and gives the same bytes as an uninterrupted one."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .cache import Entry, _fsync_dir, _fsync_file, release_pages
from .config import PipelineConfig
from .errors import KmfeatError
from .progress import bar

SHARD = 2000


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




def make_encoder(cfg: PipelineConfig, whiten: Entry, kmeans: Entry):
    """The Encoder defined by a pipeline and its cached whitening and centroids."""
    from .encode import Encoder

    e = cfg.encode
    return Encoder(np.asarray(kmeans.array("centroids")), np.asarray(whiten.array("mean")),
                   np.asarray(whiten.array("matrix")), rf=cfg.patches.rf, stride=e.stride,
                   kind=e.kind, alpha=e.alpha, split=e.split, q=e.q, grid=cfg.pool.grid, pool=cfg.pool.kind,
                   norm_eps=cfg.patches.norm_eps, device=e.device, batch=e.batch or None,
                   precision=e.precision)


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


def _compile_decision(ctx, encoder, splits) -> bool:
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


def _open_split(ctx, encoder, name: str, images: np.ndarray, flip: bool, settings: dict) -> _Split:
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


def encode_rows(encoder, images: np.ndarray, out: np.ndarray, start: int, stop: int, flip: bool, settings: dict,
                name: str) -> None:
    """Encode images[start:stop] into out[start:stop] with the stage's fixed batch and kernel, then flush the
    rows to disk and drop their pages. The one way a shard is computed, here or on a cluster worker."""
    for a, b, feats in encoder.iter_transform(images[start:stop], flip=flip, batch=settings["batch"],
                                              compiled=settings["compiled"]):
        feats = feats.astype(out.dtype, copy=False)
        if not np.isfinite(feats).all():
            hint = (" (or values beyond the float16 range: use encode.dtype = \"float32\")"
                    if out.dtype == np.float16 else "")
            raise KmfeatError(f"encode: features of {name} images {start + a}-{start + b} contain "
                              f"NaN or inf; check the whitening (whiten.eps) and the input images{hint}")
        out[start + a:start + b] = feats
    out.flush()
    release_pages(out)


def record_shard(split: _Split, start: int) -> None:
    """Add a finished (flushed) shard to the split's checkpoint: write + fsync + atomic rename."""
    split.done.add(start)
    part = split.record.with_name(split.record.name + ".part")
    part.write_text(json.dumps({"settings": split.settings, "done": sorted(split.done)}))
    _fsync_file(part)  # on disk before it says the shard is done (the flush wrote the shard itself)
    part.replace(split.record)
    _fsync_dir(split.record.parent)


def todo_shards(split: _Split) -> list[int]:
    return [s for s in range(0, len(split.images), split.settings["shard"]) if s not in split.done]


def _encode_split(split: _Split, encoder) -> None:
    """Encode a split shard by shard into its memmap; each finished shard is flushed, then
    recorded in the checkpoint, so a killed run resumes after it."""
    n, todo = len(split.images), todo_shards(split)
    with bar(total=n, initial=n - sum(split.shard_len(s) for s in todo), desc=f"encode {split.name}",
             unit="img") as progress:
        for start in todo:
            stop = start + split.shard_len(start)
            encode_rows(encoder, split.images, split.out, start, stop, split.flip, split.settings, split.name)
            record_shard(split, start)
            progress.update(stop - start)


def compute_encode(ctx) -> str:
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
    if ctx.cluster is not None:
        from .cluster import encode_on_cluster

        encode_on_cluster(ctx.cluster, ctx, opened)
    else:
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
