"""k-means backends and precisions on the same whitened patches, in one process (issue 16 item 4): faiss-cpu,
the torch backend in float32, and the torch backend with the assignment's products in bfloat16. Every variant
starts from the same initial centroids and runs the pipeline's iterations; its inertia is measured the same
exact way (kmfeat.kmeans._inertia on a float32 assignment), so the columns compare like with like."""
from __future__ import annotations

import statistics
import time

import numpy as np

from kmfeat.config import PipelineConfig
from kmfeat.progress import say

from .table import fmt_seconds, markdown_table, text_table

KMEANS_VARIANTS = {"faiss": ("faiss", "fp32"), "torch": ("torch", "fp32"), "torch-bf16": ("torch", "bf16")}
"""Variant name: (kmeans.backend, kmeans.precision)."""
INERTIA_TOLERANCE = 0.005
"""How far a variant's inertia may be from the first variant's for it to count as the same clustering."""


def whitened_patches(cfg: PipelineConfig, n_images: int) -> np.ndarray:
    """The pipeline's patches (patches.n of them, from the first n_images training images), whitened."""
    from kmfeat.patches import normalize_patches, sample_patches
    from kmfeat.whiten import Whitener

    from .compare import load_images

    p = cfg.patches
    images = load_images(cfg, n_images)
    patches = normalize_patches(sample_patches(images, rf=p.rf, n=p.n, seed=p.seed), eps=p.norm_eps)
    return Whitener(method=cfg.whiten.method, eps=cfg.whiten.eps).fit_transform(patches)


def run_kmeans_compare(cfg: PipelineConfig, n_images: int, k: int, repeats: int, variants: list[str]) -> dict:
    """Fit KMeans with each variant `repeats` times on the same patches; a JSON-able result."""
    from kmfeat.kmeans import KMeans
    from kmfeat.threads import configure_threads

    threads = configure_threads()
    say(f"bench: sampling {cfg.patches.n:,} patches from {n_images:,} images and whitening them ...")
    X = whitened_patches(cfg, n_images)
    rows = []
    for name in variants:
        backend, precision = KMEANS_VARIANTS[name]
        runs, km = [], None
        for r in range(repeats):
            start = time.perf_counter()
            km = KMeans(k=k, iters=cfg.kmeans.iters, seed=cfg.kmeans.seed, backend=backend, device="cpu",
                        init=cfg.kmeans.init, precision=precision).fit(X)
            runs.append(time.perf_counter() - start)
            say(f"bench: k-means {name} run {r + 1}/{repeats}: {runs[-1]:.2f} s, inertia {km.inertia_:.6g}")
        rows.append({"name": name, "backend": km.backend_, "precision": km.precision_, "runs": runs,
                     "median": statistics.median(runs), "iters": km.n_iter_, "inertia": km.inertia_})
    base = rows[0]
    for row in rows:
        row["speedup"] = base["median"] / row["median"]
        row["inertia_rel"] = (row["inertia"] - base["inertia"]) / base["inertia"]
    return {"patches": X.shape[0], "d": X.shape[1], "k": k, "iters": cfg.kmeans.iters, "threads": threads,
            "tolerance": INERTIA_TOLERANCE, "variants": rows}


def render_kmeans_compare(result: dict, markdown: bool) -> str:
    """The table, then one line per variant: faster than the first, and its inertia within the tolerance."""
    header = ["k-means", "seconds, median (runs)", "iterations", "inertia", "vs first", "speed-up"]
    rows = [[r["name"], f"{fmt_seconds(r['median'])} ({' '.join(fmt_seconds(s) for s in r['runs'])})",
             str(r["iters"]), f"{r['inertia']:.6g}", f"{r['inertia_rel']:+.3%}", f"{r['speedup']:.2f}x"]
            for r in result["variants"]]
    right = set(range(1, len(header)))
    title = (f"{result['patches']:,} whitened patches of {result['d']} values, k={result['k']}, "
             f"{result['iters']} iterations from the same initial centroids; cpu, {result['threads']} threads")
    lines = [title, "", markdown_table(header, rows, right) if markdown else text_table(header, rows, right), ""]
    first, tol = result["variants"][0], result["tolerance"]
    for r in result["variants"][1:]:
        same = abs(r["inertia_rel"]) <= tol
        lines.append(f"{'- ' if markdown else ''}{r['name']} against {first['name']}: {r['speedup']:.2f}x, "
                     f"inertia {r['inertia_rel']:+.3%} ({'within' if same else 'beyond'} {tol:.1%})")
    return "\n".join(lines)
