"""The STL-10 protocol (`head.folds = "stl10"`): one head per predefined training fold (1,000 images in
STL-10, its validation split held out of that fold), each scored on the whole test split; reported as
the per-fold accuracies and their mean ± std, as Coates, Lee & Ng (2011) report STL-10."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .cache import Entry, Writer
from .config import HeadConfig
from .errors import KmfeatError
from .progress import say


class FoldOut:
    """A Writer seen through a file-name prefix, so each fold's metrics, model and plots sit side by side
    in the one train entry (fold-3-metrics.json, ...)."""

    def __init__(self, out: Writer, prefix: str):
        self.out, self.prefix, self.meta = out, prefix, {}

    def path(self, filename: str) -> Path:
        return self.out.path(self.prefix + filename)

    def scratch(self, filename: str) -> Path:
        return self.out.scratch(self.prefix + filename)


def fold_indices(features: Entry) -> list[np.ndarray]:
    """The predefined folds of the features' training images (the data stage's -1-padded matrix)."""
    if not features.has("folds"):
        raise KmfeatError("head.folds = \"stl10\": these features have no predefined folds (they come with an "
                          "STL-10 release's fold_indices.txt); set head.folds = \"none\"")
    return [row[row >= 0] for row in np.asarray(features.array("folds"))]


def train_folds(h: HeadConfig, features: Entry, out: Writer) -> dict:
    """Train and score one head per fold; a fold whose metrics are already in the (resumed) temp folder is
    not trained again. Writes metrics.json with the summary and fold-<i>-* files per fold."""
    from .train import train_head

    folds = fold_indices(features)
    per_fold = []
    for i, images in enumerate(folds):
        fold_out = FoldOut(out, f"fold-{i}-")
        done = fold_out.path("metrics.json")
        if done.exists():
            metrics = json.loads(done.read_text())
        else:
            say(f"train: fold {i + 1}/{len(folds)} ({len(images):,} training images)")
            metrics = train_head(h, features, fold_out, images=images)
        per_fold.append(metrics)
    test = np.array([m["test"]["accuracy"] for m in per_fold])
    val = np.array([m["val_accuracy"] for m in per_fold])
    summary = {
        "head": per_fold[0]["head"], "folds": len(folds),
        "fold_test_accuracy": test.tolist(), "fold_val_accuracy": val.tolist(),
        "test_accuracy_mean": float(test.mean()), "test_accuracy_std": float(test.std()),
        "val_accuracy_mean": float(np.nanmean(val)) if np.isfinite(val).any() else float("nan"),
        "n_fit": [m["n_fit"] for m in per_fold], "n_val": [m["n_val"] for m in per_fold],
        "n_test": per_fold[0]["n_test"], "seconds": round(sum(m["seconds"] for m in per_fold), 2),
        "feature_key": features.key,
    }
    out.path("metrics.json").write_text(json.dumps(summary, indent=2, default=float))
    out.meta.update(test_accuracy=summary["test_accuracy_mean"], test_accuracy_std=summary["test_accuracy_std"],
                    val_accuracy=summary["val_accuracy_mean"])
    return summary


def folds_table(metrics: dict) -> str:
    """What `kmfeat evaluate` prints for a per-fold run."""
    lines = [f"head            {metrics['head']} on {metrics['folds']} predefined folds",
             f"test accuracy   {metrics['test_accuracy_mean']:.4f} ± {metrics['test_accuracy_std']:.4f} "
             f"(mean ± std over folds, {metrics['n_test']:,} test images each)"]
    lines += [f"  fold {i:<9} test {t:.4f}  val {v:.4f}"
              for i, (t, v) in enumerate(zip(metrics["fold_test_accuracy"], metrics["fold_val_accuracy"]))]
    return "\n".join(lines)
