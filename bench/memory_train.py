"""`python -m bench.memory_train`: peak RSS of `kmfeat train` on a synthetic encode entry of a
big dictionary (default k = 8000: 32,000 pooled float16 features; 50,000 train + 50,000 mirrored
+ 10,000 test rows, 7 GB on disk, so --work-dir needs that much room), without running the real
encode. About 1 minute to write the entry, then 2-4 minutes of `kmfeat train` on 2 cores.

The entry is written straight into a temporary cache at the key the pipeline's `kmfeat train`
looks up, with empty stand-ins for the stages before encode, so the measured child runs the train
stage only. Features are random non-negative rows drawn from a pool of prototypes (the class of a
row is its prototype's index mod 10), so the head has something to learn. Peak RSS comes from
os.wait4 of the child (bench/child.py), which counts the resident pages of the memory-mapped
features too; peak anon is the anonymous memory alone. The temporary cache is removed afterwards.
"""
from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import click
import numpy as np

from kmfeat.cli import run_command
from kmfeat.progress import say

from .child import kmfeat_argv, run_checked
from .table import fmt_mb, fmt_seconds, markdown_table, text_table

TARGET = 8e9
"""Target: peak RSS of `kmfeat train` at k = 8000 with flips."""
UPSTREAM = ("data", "patches", "whiten", "kmeans")
CLASSES = [f"c{i}" for i in range(10)]
PROTOTYPES = 2048
WRITE_ROWS = 2048


def _fill(writer, name: str, n: int, n_features: int, dtype, pool: np.ndarray, rng) -> np.ndarray:
    """Stream n rows of pool prototypes into <name>.npy; returns each row's prototype index."""
    from kmfeat.cache import release_pages

    arr = writer.open_array(name, (n, n_features), dtype)
    which = rng.integers(0, len(pool), n)
    for a in range(0, n, WRITE_ROWS):
        arr[a:a + WRITE_ROWS] = pool[which[a:a + WRITE_ROWS]]
        if a // WRITE_ROWS % 8 == 7:
            arr.flush()
            release_pages(arr)
    arr.flush()
    del arr
    return which


def write_synthetic_entry(cache: Path, overrides: list[str], n_train: int, n_test: int, n_features: int,
                          dtype: str, flips: bool, seed: int = 0):
    """Commit stand-ins for the stages before encode and a synthetic encode entry, at the keys the
    pipeline (default config + overrides) uses; returns the encode Entry."""
    from kmfeat import config
    from kmfeat.cache import Store
    from kmfeat.runner import Runner

    cfg = config.load(None, overrides)
    store = Store(cache)
    runner = Runner(cfg, store, quiet=True)
    for stage in UPSTREAM:
        key = runner.key(stage)
        with store.lock(stage, key):
            w = store.writer(stage, key, {"synthetic": True}, runner.input_keys(stage))
            w.meta["synthetic"] = "stand-in written by bench.memory_train; holds no arrays"
            w.commit()
    key = runner.key("encode")
    rng = np.random.default_rng(seed)
    pool = (rng.random((PROTOTYPES, n_features), dtype=np.float32) ** 2 * 4).astype(dtype)
    with store.lock("encode", key):
        w = store.writer("encode", key, {"synthetic": True}, runner.input_keys("encode"))
        which = _fill(w, "train", n_train, n_features, dtype, pool, rng)
        train_y = which % len(CLASSES)
        if flips:
            # a mirror shows the same image: a prototype of the same class
            flip_pool = np.roll(pool, len(CLASSES), axis=0)
            arr = w.open_array("train_flip", (n_train, n_features), dtype)
            for a in range(0, n_train, WRITE_ROWS):
                arr[a:a + WRITE_ROWS] = flip_pool[which[a:a + WRITE_ROWS]]
            arr.flush()
            del arr
        test_y = _fill(w, "test", n_test, n_features, dtype, pool, rng) % len(CLASSES)
        w.save("train_y", train_y.astype(np.int64))
        w.save("test_y", test_y.astype(np.int64))
        w.meta.update(classes=CLASSES, n_features=n_features,
                      splits=["train", "train_flip", "test"] if flips else ["train", "test"], synthetic=True)
        return w.commit()


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--k", default=8000, show_default=True, type=int,
              help="Dictionary size: 4k pooled features (kmeans.k is set to it).")
@click.option("--train", "n_train", default=50000, show_default=True, type=int, help="Train rows.")
@click.option("--test", "n_test", default=10000, show_default=True, type=int, help="Test rows.")
@click.option("--dtype", default="float16", show_default=True, type=click.Choice(["float16", "float32"]),
              help="Feature dtype (encode.dtype).")
@click.option("--no-flips", is_flag=True, help="No train_flip copies.")
@click.option("-o", "--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE",
              help="Override passed to `kmfeat train` (repeatable); default head.epochs=1 (the peak is reached in "
                   "the first epoch; each one takes about 1.5 minutes on 2 cores).")
@click.option("--ram-budget", metavar="SIZE",
              help="KMFEAT_MLP_RAM_BUDGET for the child (e.g. 0: always stream; default: the MLP's own rule).")
@click.option("--markdown", is_flag=True, help="Markdown table with a machine header, for BENCHMARKS.md.")
@click.option("--out", metavar="FILE", help="Also write the results as JSON.")
@click.option("--work-dir", metavar="DIR", help="Where the temporary cache goes (default: the system temp dir).")
@click.option("--keep", is_flag=True, help="Keep the temporary cache (and print its path).")
def main(k, n_train, n_test, dtype, no_flips, overrides, ram_budget, markdown, out, work_dir, keep) -> None:
    """Peak RSS of `kmfeat train` on a synthetic encode entry of dictionary size k."""
    from kmfeat.errors import KmfeatError

    from .machine import machine_info, markdown_header

    for name, value in (("--k", k), ("--train", n_train), ("--test", n_test)):
        if value < 1:
            raise KmfeatError(f"{name}: got {value}, expected >= 1")
    if ram_budget is not None:
        from kmfeat.heads.mlp import parse_size

        parse_size(ram_budget)
    n_features, flips = 4 * k, not no_flips
    overrides = [f"kmeans.k={k}", f"encode.dtype={dtype}", f"encode.flip_train={str(flips).lower()}",
                 "head.kind=mlp", "head.epochs=1", *overrides]
    rows = n_train * (2 if flips else 1) + n_test
    size = rows * n_features * np.dtype(dtype).itemsize
    work = Path(work_dir) if work_dir else Path(tempfile.gettempdir())
    work.mkdir(parents=True, exist_ok=True)
    cache = Path(tempfile.mkdtemp(prefix="bench-memory-train-", dir=work))
    try:
        say(f"bench: writing a synthetic encode entry: {rows:,} rows x {n_features:,} {dtype} "
            f"({size / 1e9:.1f} GB) under {cache} (untimed) ...")
        t0 = time.perf_counter()
        write_synthetic_entry(cache, overrides, n_train, n_test, n_features, dtype, flips)
        say(f"bench: written in {time.perf_counter() - t0:.0f} s; kmfeat train ...")
        env = {} if ram_budget is None else {"KMFEAT_MLP_RAM_BUDGET": ram_budget}
        child = run_checked(kmfeat_argv(cache, "train", None, None, overrides), "bench memory-train", env)
        metrics_path = next((cache / "train").glob("*/metrics.json"))
        metrics = json.loads(metrics_path.read_text())
    finally:
        if keep:
            say(f"bench: kept {cache}")
        else:
            shutil.rmtree(cache, ignore_errors=True)
    result = {"k": k, "n_features": n_features, "dtype": dtype, "flips": flips, "rows": rows,
              "feature_bytes": size, "fit_matrix_bytes": metrics["n_fit"] * n_features * 4,
              "n_fit": metrics["n_fit"], "streamed": metrics.get("streamed"),
              "peak_rss": child.peak_rss, "peak_anon": child.peak_anon, "wall": child.seconds,
              "fit_seconds": metrics["fit_seconds"], "test_accuracy": metrics["test"]["accuracy"],
              "ram_budget": ram_budget, "overrides": overrides}
    info = machine_info(sys.argv[1:])
    info["command"] = "python -m bench.memory_train " + " ".join(sys.argv[1:])
    header = ["train run", "fit rows", "features GB", "fit matrix f32 GB", "streamed", "peak RSS MB",
              "peak anon MB", "wall s", "fit s", "test acc"]
    row = [f"k={k}, {dtype}{', flips' if flips else ''}", f"{metrics['n_fit']:,}", f"{size / 1e9:.1f}",
           f"{result['fit_matrix_bytes'] / 1e9:.1f}", str(result["streamed"]).lower(), fmt_mb(child.peak_rss),
           "-" if child.peak_anon is None else fmt_mb(child.peak_anon), fmt_seconds(child.seconds),
           fmt_seconds(metrics["fit_seconds"]), f"{metrics['test']['accuracy']:.4f}"]
    right = set(range(1, len(header)))
    click.echo(markdown_header(info, "Train peak memory") if markdown else f"{info['cpu']}, {info['cores']} cores; "
               f"{info['command']}")
    click.echo(markdown_table(header, [row], right) if markdown else text_table(header, [row], right))
    verdict = f"target < {TARGET / 1e9:g} GB: {'ok' if child.peak_rss < TARGET else 'OVER'}" \
        if k >= 8000 and flips else f"the < {TARGET / 1e9:g} GB target is for k=8000 with flips"
    bullet = "- " if markdown else ""
    click.echo(f"\n{bullet}peak RSS {child.peak_rss / 1e9:.2f} GB ({verdict}); `kmfeat train` with "
               f"{' '.join('-o ' + o for o in overrides)}"
               + (f"; KMFEAT_MLP_RAM_BUDGET={ram_budget}" if ram_budget is not None else ""))
    click.echo(f"{bullet}peak RSS: the `kmfeat train` process (os.wait4), including the resident pages of the "
               f"memory-mapped features; peak anon: anonymous memory only (sampled every 50 ms from /proc)")
    if out:
        Path(out).write_text(json.dumps({"mode": "memory-train", "machine": info, **result}, indent=2) + "\n")


def run() -> None:
    run_command(main, None, "python -m bench.memory_train", "Interrupted.",
                lambda exc: f"{exc.filename or 'bench'}: {exc.strerror or exc} (see --work-dir)")


if __name__ == "__main__":
    run()
