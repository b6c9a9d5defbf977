"""Random patch sampling and per-patch brightness/contrast normalization.

Layout contract (the encoder relies on it): a patch of images[i, y:y+rf, x:x+rf, :] is
flattened in C order, so feature index = (dy * rf + dx) * C + c.
"""
import numpy as np

from .errors import KmfeatError

_GATHER_CHUNK = 16_384
_NORM_CHUNK = 16_384


def _as_nhwc(images: np.ndarray) -> np.ndarray:
    """Accept (N, H, W, C) or grayscale (N, H, W); return a 4-d view."""
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4:
        raise KmfeatError(f"patches: images must be an array (N, H, W, C), got shape {tuple(images.shape)}")
    if images.shape[0] < 1:
        raise KmfeatError("patches: no images to sample patches from")
    return images


def sample_positions(n_images: int, H: int, W: int, rf: int, n: int, seed: int = 0):
    """Draw n (image, y, x) top-left corners uniformly with np.random.default_rng(seed).

    Returns three int64 arrays of length n; used by sample_patches so the draws can be checked.
    """
    if rf < 1 or rf > H or rf > W:
        raise KmfeatError(f"patches.rf: must be between 1 and the image size {H}x{W}, got {rf}")
    if n < 1:
        raise KmfeatError(f"patches.n: must be at least 1, got {n}")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n_images, size=n, dtype=np.int64)
    ys = rng.integers(0, H - rf + 1, size=n, dtype=np.int64)
    xs = rng.integers(0, W - rf + 1, size=n, dtype=np.int64)
    return idx, ys, xs


def sample_patches(images, rf: int = 6, n: int = 400_000, seed: int = 0) -> np.ndarray:
    """Random rf x rf patches of images (N, H, W, C) as (n, rf*rf*C) float32, C-order flattened.

    `images` may be a list of such arrays of one size (e.g. memory-mapped splits): they are drawn
    from as if concatenated, without copying them. Gathers with fancy indexing in chunks, so no
    Python loop over patches.
    """
    parts = [_as_nhwc(np.asarray(a)) for a in (images if isinstance(images, (list, tuple)) else [images])]
    if len({a.shape[1:] for a in parts}) > 1:
        raise KmfeatError(f"patches: the image sets differ in size: {', '.join(str(a.shape[1:]) for a in parts)}")
    starts = np.cumsum([0] + [len(a) for a in parts])
    _, H, W, C = parts[0].shape
    idx, ys, xs = sample_positions(int(starts[-1]), H, W, rf, n, seed)
    d = np.arange(rf, dtype=np.int64)
    out = np.empty((n, rf * rf * C), dtype=np.float32)
    for s in range(0, n, _GATHER_CHUNK):
        e = min(s + _GATHER_CHUNK, n)
        y = ys[s:e, None, None] + d[None, :, None]
        x = xs[s:e, None, None] + d[None, None, :]
        part = np.searchsorted(starts, idx[s:e], side="right") - 1
        for j, images_j in enumerate(parts):
            rows = np.flatnonzero(part == j)
            if len(rows):
                i = (idx[s:e][rows] - starts[j])[:, None, None]
                out[s + rows] = images_j[i, y[rows], x[rows], :].reshape(len(rows), -1)
    return out


SPLITS = {"train": ("train_x",), "unlabeled": ("unlabeled_x", "extra_x"),
          "all": ("train_x", "unlabeled_x", "extra_x")}


def patch_sources(data, source: str = "auto") -> tuple[str, list]:
    """The resolved `patches.source` and the image arrays of a data entry it names. auto: the unlabeled
    images when the entry has any, else the labeled training images. Only the named arrays are opened."""
    has_unlabeled = data.has("unlabeled_x")
    if source == "auto":
        source = "unlabeled" if has_unlabeled else "train"
    if source not in SPLITS:
        raise KmfeatError(f"patches.source: got {source!r}, expected one of auto, {', '.join(SPLITS)}")
    if source == "unlabeled" and not has_unlabeled:
        raise KmfeatError("patches.source = \"unlabeled\": this dataset has no unlabeled images; add a "
                          "ROOT/unlabeled/ folder, pass --unlabeled PATH, or set patches.source = \"train\"")
    return source, [data.array(name) for name in SPLITS[source] if data.has(name)]


def normalize_patches(patches: np.ndarray, eps: float = 10.0) -> np.ndarray:
    """(p - mean(p)) / sqrt(var(p) + eps) per row (population variance), float32 out.

    Computed in float64 one chunk at a time, so large inputs never get a full float64 copy.
    """
    if eps <= 0:
        raise KmfeatError(f"patches.norm_eps: normalization eps must be > 0 (Coates uses 10), got {eps}")
    patches = np.asarray(patches)
    if patches.ndim != 2:
        raise KmfeatError(f"patches: expected a 2-d array (n, d) of patches, got shape {tuple(patches.shape)}")
    out = np.empty(patches.shape, dtype=np.float32)
    for s in range(0, patches.shape[0], _NORM_CHUNK):
        p = patches[s:s + _NORM_CHUNK].astype(np.float64)
        p -= p.mean(axis=1, keepdims=True)
        p /= np.sqrt((p * p).mean(axis=1, keepdims=True) + eps)
        out[s:s + _NORM_CHUNK] = p
    return out
