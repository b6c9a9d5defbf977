"""Peak RSS of `kmfeat encode` as the number of images grows, each run in its own process on an
empty cache whose inputs (data ... kmeans) are prepared first, untimed. Flips are off, so the
image counts are exactly the train + test sizes.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from kmfeat.progress import say

from .child import kmfeat_argv, run_checked
from .table import fmt_mb, fmt_seconds, markdown_table, text_table

GROWTH_TARGET = 500e6
"""Target: peak RSS grows by less than this from the small run to the full one."""
BIG_K_TARGET = 3e9
"""Target: peak RSS of the full-copy run at large k."""


@dataclass
class MemoryRun:
    label: str
    overrides: list[str]
    images: int = 0
    peak_rss: int = 0
    peak_anon: int | None = None
    wall: float = 0.0
    seconds: float = 0.0


def measure_encode(run: MemoryRun, pipeline: Path, data: Path, base_overrides: list[str], work_dir: Path,
                   key_of) -> MemoryRun:
    """Prepare the inputs of `encode` untimed, then run it once, measured; fills in `run`."""
    overrides = [*base_overrides, *run.overrides, "encode.flip_train=false"]
    work_dir.mkdir(parents=True, exist_ok=True)
    cache = Path(tempfile.mkdtemp(prefix="bench-memory-", dir=work_dir))
    try:
        say(f"bench: memory {run.label}: preparing inputs (untimed) ...")
        run_checked(kmfeat_argv(cache, "kmeans", pipeline, data, overrides), "bench memory (preparing kmeans)")
        say(f"bench: memory {run.label}: encode ...")
        child = run_checked(kmfeat_argv(cache, "encode", pipeline, data, overrides, force=True), "bench memory encode")
        manifest = json.loads((cache / "encode" / key_of(overrides) / "manifest.json").read_text())
        arrays = manifest["arrays"]
        run.images = sum(arrays[n]["shape"][0] for n in ("train", "train_flip", "test") if n in arrays)
        run.peak_rss, run.peak_anon = child.peak_rss, child.peak_anon
        run.wall, run.seconds = child.seconds, float(manifest["seconds"])
        say(f"bench: memory {run.label}: peak RSS {run.peak_rss / 1e6:,.0f} MB")
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    return run


def render_memory(runs: list[MemoryRun], growth: tuple[MemoryRun, MemoryRun] | None, big_k: MemoryRun | None,
                  markdown: bool) -> str:
    """The table of runs, then the growth from the small run to the full one and the large-k verdict."""
    header = ["encode run", "images", "peak RSS MB", "peak anon MB", "wall s", "stage s"]
    rows = [[r.label, f"{r.images:,}", fmt_mb(r.peak_rss), "-" if r.peak_anon is None else fmt_mb(r.peak_anon),
             fmt_seconds(r.wall), fmt_seconds(r.seconds)] for r in runs]
    right = {1, 2, 3, 4, 5}
    lines = [markdown_table(header, rows, right) if markdown else text_table(header, rows, right), ""]
    bullet = "- " if markdown else ""
    if growth:
        small, full = growth
        diff = full.peak_rss - small.peak_rss
        anon = "" if small.peak_anon is None or full.peak_anon is None else \
            f"; anonymous memory only: {(full.peak_anon - small.peak_anon) / 1e6:+,.0f} MB"
        lines.append(f"{bullet}peak RSS growth {small.images:,} -> {full.images:,} images: {diff / 1e6:+,.0f} MB "
                     f"(target < {GROWTH_TARGET / 1e6:,.0f} MB: {'ok' if diff < GROWTH_TARGET else 'OVER'}){anon}")
    if big_k:
        lines.append(f"{bullet}peak RSS {big_k.label}: {big_k.peak_rss / 1e6:,.0f} MB "
                     f"(target < {BIG_K_TARGET / 1e9:g} GB: {'ok' if big_k.peak_rss < BIG_K_TARGET else 'OVER'})")
    lines.append(f"{bullet}peak RSS: the `kmfeat encode` process (os.wait4), including the resident pages of the "
                 f"memory-mapped input images and output features; peak anon: anonymous memory only (sampled every "
                 f"50 ms from /proc); encode.flip_train = false")
    return "\n".join(lines)
