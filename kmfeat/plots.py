"""PNG figures: centroid grid, confusion matrix, learning curves (matplotlib Agg canvases, no global backend change)."""
import math
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from kmfeat.errors import KmfeatError


def _save(fig: Figure, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, format="png", dpi=fig.dpi)
    return path


def centroid_mosaic(patches: np.ndarray, rf: int, channels: int, max_show: int = 400) -> np.ndarray:
    """A (rows*(rf+1)+1, cols*(rf+1)+1, 3) float image in 0..1: each patch min/max-rescaled, on a grey 1-pixel grid.

    Patch columns are laid out as (dy*rf+dx)*C+c; one channel is shown grey, three as RGB, others as their mean.
    """
    patches = np.asarray(patches, dtype=np.float64)
    if patches.ndim != 2 or patches.shape[1] != rf * rf * channels:
        raise KmfeatError(f"plot_centroids: expected centroids of shape (k, {rf * rf * channels}) for rf={rf}, "
                          f"channels={channels}, got {patches.shape}")
    shown = patches[: max(1, max_show)].reshape(-1, rf, rf, channels)
    if channels != 3:
        shown = np.repeat(shown.mean(axis=3, keepdims=True), 3, axis=3)
    lo = shown.min(axis=(1, 2, 3), keepdims=True)
    span = shown.max(axis=(1, 2, 3), keepdims=True) - lo
    shown = np.where(span > 0, (shown - lo) / np.where(span > 0, span, 1), 0.5)
    n = len(shown)
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    step = rf + 1
    mosaic = np.full((rows * step + 1, cols * step + 1, 3), 0.5)
    for i, patch in enumerate(shown):
        r, c = divmod(i, cols)
        mosaic[1 + r * step: 1 + r * step + rf, 1 + c * step: 1 + c * step + rf] = patch
    return mosaic


def plot_centroids(patches: np.ndarray, rf: int, channels: int, path, max_show: int = 400) -> Path:
    """Grid of centroid patches (k, rf*rf*C) — already un-whitened by the caller (Whitener.inverse_transform) — each
    rescaled to 0..1 by its own min/max, laid out in a near-square grid; layout index (dy*rf+dx)*C+c."""
    mosaic = centroid_mosaic(patches, rf, channels, max_show)
    side = min(12.0, max(3.0, mosaic.shape[1] / 16))
    fig = Figure(figsize=(side, side * mosaic.shape[0] / mosaic.shape[1] + 0.4), dpi=100)
    ax = fig.add_axes((0, 0, 1, 1 - 0.4 / fig.get_figheight()))
    ax.imshow(mosaic, interpolation="nearest")
    ax.set_axis_off()
    fig.suptitle(f"{min(len(patches), max(1, max_show))} of {len(patches)} centroids ({rf}x{rf}x{channels})",
                 fontsize=9, y=1 - 0.05 / fig.get_figheight())
    return _save(fig, path)


def plot_confusion(confusion, classes, path, title=None) -> Path:
    """Confusion matrix (rows = true, cols = predicted): colours row-normalized, counts written in the cells."""
    counts = np.asarray(confusion, dtype=np.int64)
    k = len(classes)
    if counts.shape != (k, k):
        raise KmfeatError(f"plot_confusion: expected a {k}x{k} matrix for {k} classes, got shape {counts.shape}")
    rows = counts.sum(axis=1, keepdims=True)
    norm = counts / np.maximum(rows, 1)
    side = min(20.0, max(4.0, 0.55 * k + 2))
    fig = Figure(figsize=(side + 1, side), dpi=100)
    ax = fig.add_subplot()
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of true class")
    ticks = np.arange(k)
    ax.set_xticks(ticks, [str(c) for c in classes], rotation=45, ha="right", fontsize=8)
    ax.set_yticks(ticks, [str(c) for c in classes], fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if k <= 30:
        for i in range(k):
            for j in range(k):
                ax.text(j, i, str(counts[i, j]), ha="center", va="center", fontsize=7,
                        color="white" if norm[i, j] > 0.5 else "black")
    total = counts.sum()
    acc = np.trace(counts) / total if total else float("nan")
    ax.set_title(title or f"confusion (accuracy {acc:.2%}, n={total})")
    fig.tight_layout()
    return _save(fig, path)


def best_epoch(history: list[dict]):
    """Epoch with the highest val_acc (earliest on ties), or None when there is no validation accuracy."""
    scored = [(h["val_acc"], -i) for i, h in enumerate(history) if h.get("val_acc") is not None]
    return history[-max(scored)[1]]["epoch"] if scored else None


def plot_curves(history: list[dict], path) -> Path:
    """Two panels: loss (train, val) and accuracy (train, val) per epoch; the best epoch (by val_acc) is marked."""
    if not history:
        raise KmfeatError("plot_curves: the training history is empty")
    epochs = [h["epoch"] for h in history]
    fig = Figure(figsize=(10, 4), dpi=100)
    best = best_epoch(history)
    for ax, metric in zip(fig.subplots(1, 2), ("loss", "acc")):
        for split, style, label in (("train", "-", "train (running, dropout on)"), ("val", "--", "val")):
            pts = [(e, h.get(f"{split}_{metric}")) for e, h in zip(epochs, history)]
            pts = [(e, v) for e, v in pts if v is not None]
            if pts:
                ax.plot(*zip(*pts), style, marker="o", markersize=3, label=label)
        if best is not None:
            ax.axvline(best, color="tab:red", linestyle=":", label=f"best epoch {best}")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.set_ylabel("accuracy" if metric == "acc" else "cross-entropy loss")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    return _save(fig, path)


def plot_search(trials: list[dict], path, importance: dict[str, float] | None = None,
                log_params=(), title: str | None = None, top: int = 3) -> Path:
    """A hyper-parameter search: val accuracy against trial (random start-up trials grey, model-guided
    ones blue, running best as a red step line), then against each of the `top` most important
    parameters (log x-axis for those in `log_params`; colour = trial order). `trials` holds dicts
    {"number", "val_accuracy", "params": {name: value}, "sampler"}; the best trial is starred."""
    done = [t for t in trials if t.get("val_accuracy") is not None]
    if not done:
        raise KmfeatError("plot_search: no finished trial to plot")
    names = list(importance or {}) or list(done[0]["params"])
    names = [n for n in names if any(n in t["params"] for t in done)][:max(0, top)]
    number = np.array([t["number"] for t in done])
    acc = np.array([t["val_accuracy"] for t in done], dtype=np.float64)
    best = int(np.argmax(acc))
    fig = Figure(figsize=(4.2 * (1 + len(names)), 3.8), dpi=100)
    axes = np.atleast_1d(fig.subplots(1, 1 + len(names)))
    ax = axes[0]
    guided = np.array([t.get("sampler") != "random" for t in done])
    for mask, colour, label in ((~guided, "tab:gray", "random start-up"), (guided, "tab:blue", "model-guided")):
        if mask.any():
            ax.scatter(number[mask], acc[mask], s=18, color=colour, label=label, zorder=2)
    order = np.argsort(number)
    ax.step(number[order], np.maximum.accumulate(acc[order]), where="post", color="tab:red", label="best so far")
    ax.scatter([number[best]], [acc[best]], marker="*", s=160, color="tab:red", zorder=3)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("trial")
    ax.set_ylabel("validation accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    for ax, name in zip(axes[1:], names):
        pts = [(t["params"][name], a, n) for t, a, n in zip(done, acc, number) if name in t["params"]]
        xs = [p[0] if isinstance(p[0], (int, float)) and not isinstance(p[0], bool) else str(p[0]) for p in pts]
        ax.scatter(xs, [p[1] for p in pts], c=[p[2] for p in pts], cmap="viridis", s=18, zorder=2)
        if name in done[best]["params"]:
            value = done[best]["params"][name]
            ax.scatter([value if not isinstance(value, (bool, str)) else str(value)], [acc[best]], marker="*",
                       s=160, color="tab:red", zorder=3)
        if name in log_params:
            ax.set_xscale("log")
        weight = (importance or {}).get(name)
        ax.set_title(f"importance {weight:.2f}" if weight is not None else "", fontsize=9)
        ax.set_xlabel(name)
        ax.grid(alpha=0.3)
    fig.suptitle(title or f"search: best validation accuracy {acc[best]:.4f} (trial {number[best]})", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)
