"""`python -m bench.data_memory`: peak RSS of `kmfeat data` on synthetic image folders of several sizes
(default 10,000 and 100,000 images of 32x32), to show that the data stage decodes into memory-mapped
files and does not grow with the number of images (issue 14: within 300 MB between the two).

The folders (5/6 train, 1/6 test, 10 classes, PNG) are written once under --work-dir and reused by
later runs (about 1 minute for 100,000 images on 2 cores); each `kmfeat data` runs in a fresh cache,
in its own process, its peak RSS taken by os.wait4 (bench/child.py). The caches are removed afterwards.
"""
from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

import click
import numpy as np

from kmfeat.cli import run_command
from kmfeat.progress import say

from .child import kmfeat_argv, run_checked
from .table import fmt_mb, fmt_seconds, markdown_table, text_table

TARGET = 300e6
"""Target: peak RSS of the largest run at most this much above the smallest's."""
CLASSES = 10
SHARD = 1000


def _write_shard(root: str, names: list[tuple[str, int]], size: int) -> None:
    from PIL import Image

    for rel, seed in names:
        rng = np.random.default_rng(seed)
        img = rng.integers(0, 256, (size // 4, size // 4, 3), dtype=np.uint8).repeat(4, 0).repeat(4, 1)
        Image.fromarray(img).save(Path(root) / rel, compress_level=1)


def make_folder(root: Path, n: int, size: int) -> Path:
    """ROOT/{train,test}/c<i>/<j>.png, n images in all (a sixth of them test); kept when already complete."""
    done = root / ".complete"
    if done.exists():
        return root
    from joblib import Parallel, delayed

    n_test = n // 6
    names = [(f"{'test' if j < n_test else 'train'}/c{j % CLASSES}/{j:07d}.png", j) for j in range(n)]
    for split in ("train", "test"):
        for c in range(CLASSES):
            (root / split / f"c{c}").mkdir(parents=True, exist_ok=True)
    say(f"bench: writing {n:,} PNGs of {size}x{size} under {root} (untimed, once) ...")
    Parallel(n_jobs=-1)(delayed(_write_shard)(str(root), names[a:a + SHARD], size) for a in range(0, n, SHARD))
    done.write_text(f"{n}\n")
    return root


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--counts", default="10000,100000", show_default=True, help="Image counts, comma-separated.")
@click.option("--size", default=32, show_default=True, type=int, help="Image side in pixels.")
@click.option("--markdown", is_flag=True, help="Markdown table with a machine header, for BENCHMARKS.md.")
@click.option("--out", metavar="FILE", help="Also write the results as JSON.")
@click.option("--work-dir", metavar="DIR", help="Where the folders and caches go (default: the system temp dir); "
                                                "folders stay there for the next run.")
def main(counts, size, markdown, out, work_dir) -> None:
    """Peak RSS of `kmfeat data` on synthetic image folders of each count."""
    from kmfeat.errors import KmfeatError

    from .machine import machine_info, markdown_header

    try:
        ns = sorted({int(c) for c in counts.split(",") if c.strip()})
    except ValueError:
        raise KmfeatError(f"--counts: got {counts!r}, expected comma-separated image counts") from None
    if not ns or ns[0] < 12 or size < 4:
        raise KmfeatError("--counts: expected counts >= 12 (10 classes in train and test); --size >= 4")
    work = Path(work_dir) if work_dir else Path(tempfile.gettempdir()) / "kmfeat-bench-data"
    work.mkdir(parents=True, exist_ok=True)
    results = []
    for n in ns:
        folder = make_folder(work / f"folder-{n}-{size}", n, size)
        cache = Path(tempfile.mkdtemp(prefix="cache-", dir=work))
        try:
            child = run_checked(kmfeat_argv(cache, "data", None, folder, ["data.source=\"imagefolder\""]),
                                "bench data-memory")
        finally:
            shutil.rmtree(cache, ignore_errors=True)
        results.append({"images": n, "size": size, "wall": child.seconds, "peak_rss": child.peak_rss,
                        "peak_anon": child.peak_anon, "uint8_bytes": n * size * size * 3})
        say(f"bench: {n:,} images: {child.seconds:.1f} s, peak RSS {child.peak_rss / 1e6:,.0f} MB")
    info = machine_info(sys.argv[1:])
    info["command"] = "python -m bench.data_memory " + " ".join(sys.argv[1:])
    header = ["images", "decoded MB", "wall s", "peak RSS MB", "peak anon MB"]
    rows = [[f"{r['images']:,}", fmt_mb(r["uint8_bytes"]), fmt_seconds(r["wall"]), fmt_mb(r["peak_rss"]),
             "-" if r["peak_anon"] is None else fmt_mb(r["peak_anon"])] for r in results]
    click.echo(markdown_header(info, "kmfeat data peak memory") if markdown else
               f"{info['cpu']}, {info['cores']} cores; {info['command']}")
    click.echo((markdown_table if markdown else text_table)(header, rows, {1, 2, 3, 4}))
    growth = results[-1]["peak_rss"] - results[0]["peak_rss"]
    bullet = "- " if markdown else ""
    click.echo(f"\n{bullet}peak RSS grows {growth / 1e6:,.0f} MB from {ns[0]:,} to {ns[-1]:,} images "
               f"(target <= {TARGET / 1e6:.0f} MB: {'ok' if growth <= TARGET else 'OVER'}); `kmfeat data` on "
               f"image folders of {size}x{size} PNGs, each in a fresh cache")
    if out:
        Path(out).write_text(json.dumps({"mode": "data-memory", "machine": info, "results": results}, indent=2) + "\n")


def run() -> None:
    run_command(main, None, "python -m bench.data_memory", "Interrupted.",
                lambda exc: f"{exc.filename or 'bench'}: {exc.strerror or exc} (see --work-dir)")


if __name__ == "__main__":
    run()
