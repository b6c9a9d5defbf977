"""The `kmfeat` command line: parses options and calls the runner; nothing else."""
from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import click

from . import __version__
from .errors import KmfeatError

STAGE_HELP = {
    "data": "Load the dataset into uint8 arrays (N, H, W, C) + labels.",
    "patches": "Sample random patches and contrast-normalize them.",
    "whiten": "Fit mean subtraction + ZCA/PCA whitening on the patches.",
    "kmeans": "Learn the k-means dictionary (faiss or torch); writes centroids.png.",
    "encode": "Encode every image densely and pool: train.npy / test.npy features.",
    "train": "Train the classifier head on the cached features; writes metrics.json + plots.",
}


def _pipeline_options(func):
    """-p/--data/-o/--force, shared by every command that resolves a pipeline."""
    func = click.option("--force", is_flag=True, help="Recompute this stage even if cached.")(func)
    func = click.option("-o", "--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE",
                        help="Override a config value, e.g. -o kmeans.k=4000 (repeatable).")(func)
    func = click.option("--scheduler", metavar="ADDRESS", envvar="KMFEAT_SCHEDULER", expose_value=False,
                        callback=_keep_scheduler,
                        help="Run encode (and image decoding) on a Dask cluster: tcp://host:8786, or local:N worker "
                             "processes on this machine (env KMFEAT_SCHEDULER; needs kmfeat[dask]).")(func)
    func = click.option("--unlabeled", metavar="PATH", expose_value=False, callback=_keep_unlabeled,
                        help="Extra unlabeled images for the dictionary: an image folder or archive (its train/ "
                             "and unlabeled/ images, or all), a CIFAR or STL-10 release (= -o data.unlabeled=PATH)."
                        )(func)
    func = click.option("--data", "data", metavar="PATH",
                        help="Dataset: CIFAR or STL-10 release (.tar.gz or folder) or image folder (dir, .tar, "
                             ".tar.gz; an unlabeled/ folder in it holds unlabeled images).")(func)
    func = click.option("-p", "--pipeline", "pipeline", metavar="TOML",
                        help="Pipeline config (pipelines/*.toml); default: built-in Coates defaults.")(func)
    return func


def _keep_scheduler(ctx: click.Context, _param, value):
    if value:
        from .cluster import Cluster

        cluster = Cluster(value)
        ctx.meta["kmfeat.cluster"] = cluster
        ctx.call_on_close(cluster.close)


def _keep_unlabeled(ctx: click.Context, _param, value):
    if value:
        ctx.meta["kmfeat.unlabeled"] = value


def _config(pipeline, overrides, data):
    """The pipeline config of a command: the TOML, -o overrides, --data and --unlabeled."""
    from . import config

    return config.load(pipeline, overrides, data, click.get_current_context().meta.get("kmfeat.unlabeled"))


def _runner(ctx: click.Context, pipeline, data, overrides, force_stage=None):
    from .cache import Store
    from .runner import Runner

    cfg = _config(pipeline, overrides, data)
    force = frozenset([force_stage]) if force_stage else frozenset()
    return Runner(cfg, Store(ctx.obj["cache_dir"]), force=force, quiet=ctx.obj["quiet"],
                  cluster=ctx.meta.get("kmfeat.cluster"))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="kmfeat")
@click.option("--cache-dir", envvar="KMFEAT_CACHE", default="cache", show_default=True,
              type=click.Path(file_okay=False), help="Stage store root (env KMFEAT_CACHE).")
@click.option("-q", "--quiet", is_flag=True, help="No stage status lines on stderr (warnings and errors only).")
@click.pass_context
def cli(ctx: click.Context, cache_dir: str, quiet: bool) -> None:
    """kmfeat: Coates-style unsupervised feature learning on images, as cached stages.

    Errors exit with status 2, Ctrl-C with 130; an interrupted `encode` resumes when rerun.
    """
    _check_cache_dir(cache_dir)
    # torch.compile's kernels live with the stage store (not in /tmp/torchinductor_$USER) unless set
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(Path(cache_dir).resolve() / ".inductor"))
    ctx.obj = {"cache_dir": cache_dir, "quiet": quiet}


def _check_cache_dir(cache_dir: str) -> None:
    """--cache-dir must be a folder or a path that can become one: its nearest existing ancestor a folder."""
    path = Path(cache_dir)
    for p in (path, *path.parents):
        if p.exists():
            if not p.is_dir():
                raise KmfeatError(f"--cache-dir {cache_dir}: {p} is not a folder")
            return


def _stage_command(name: str):
    @cli.command(name, help=STAGE_HELP[name])
    @_pipeline_options
    @click.pass_context
    def command(ctx, pipeline, data, overrides, force):
        start = time.time()
        entry = _runner(ctx, pipeline, data, overrides, name if force else None).run(name)
        click.echo(f"{name}: ready in {time.time() - start:.1f} s -> {entry.path}")
    return command


for _name in STAGE_HELP:
    _stage_command(_name)


@cli.command("run")
@_pipeline_options
@click.pass_context
def run_all(ctx, pipeline, data, overrides, force):
    """Run every stage up to train (data -> ... -> train)."""
    start = time.time()
    runner = _runner(ctx, pipeline, data, overrides, "train" if force else None)
    entry = runner.run("train")
    click.echo(f"run: finished in {time.time() - start:.1f} s; test accuracy "
               f"{entry.meta.get('test_accuracy', float('nan')):.4f} -> {entry.path}")


@cli.command("search")
@_pipeline_options
@click.option("--trials", type=int, required=True, metavar="N",
              help="Run until the study has N finished trials (a rerun adds only the missing ones).")
@click.option("--timeout", type=float, default=None, metavar="S", help="Start no new trial after S seconds.")
@click.option("--subset", type=int, default=0, show_default=True, metavar="N",
              help="Fit on a class-balanced subset of N fit images (0: all of the fit split).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the subset and the sampler.")
@click.pass_context
def search(ctx, pipeline, data, overrides, force, trials, timeout, subset, seed):
    """Optuna over the head's parameters and head.power on the cached features, scored on the
    validation split only (never test); resumable. Writes trials.csv, search.png and best.toml
    (run it with `kmfeat train -p best.toml`). --force starts the study afresh."""
    from .cache import Store
    from .search import run_search

    result = run_search(_config(pipeline, overrides, data), Store(ctx.obj["cache_dir"]), trials=trials,
                        timeout=timeout, subset=subset, seed=seed, force=force, quiet=ctx.obj["quiet"])
    click.echo(result.summary())


def _metrics_table(metrics: dict) -> str:
    test = metrics["test"]
    images = metrics.get("train_accuracy_images")
    measured = f"on the {images:,} fit images; " if images is not None else ""
    lines = [f"head            {metrics['head']}",
             f"train accuracy  {metrics['train_accuracy']:.4f}  ({measured}fit on {metrics['n_fit']:,} rows)",
             f"val accuracy    {metrics['val_accuracy']:.4f}  ({metrics['n_val']:,} images)",
             f"test accuracy   {test['accuracy']:.4f}  ({metrics['n_test']:,} images)"]
    if metrics.get("epochs_run"):
        lines.append(f"epochs          {metrics['epochs_run']} run, best {metrics['best_epoch']}")
    if metrics.get("best_params"):
        lines.append(f"best params     {metrics['best_params']}")
    lines.append(f"fit time        {metrics['fit_seconds']:.1f} s")
    lines.append("per-class test accuracy:")
    lines += [f"  {name:<14}{acc:.4f}" for name, acc in test["per_class_accuracy"].items()]
    return "\n".join(lines)


@cli.command("evaluate")
@_pipeline_options
@click.pass_context
def evaluate(ctx, pipeline, data, overrides, force):
    """Print the metrics of the trained head of a pipeline (run `kmfeat train` first)."""
    from .lookup import not_cached

    runner = _runner(ctx, pipeline, data, overrides)
    entry = runner.cached("train")
    if entry is None:
        raise not_cached(pipeline, overrides, data, runner.store, "train", "run `kmfeat train` with the same options")
    metrics = json.loads(entry.file("metrics.json").read_text())
    if "fold_test_accuracy" in metrics:
        from .folds import folds_table

        click.echo(folds_table(metrics))
    else:
        click.echo(_metrics_table(metrics))
    click.echo(f"files: {entry.path}")


@cli.command("export")
@_pipeline_options
@click.option("--out", "out", required=True, metavar="FILE.npz",
              help="Output .npz file: a new file, or a regular file to replace.")
@click.pass_context
def export(ctx, pipeline, data, overrides, force, out):
    """Write the cached features and labels to one .npz (X_train, y_train, X_test, y_test, classes, and
    X_train_flip / X_test_flip when the pipeline encoded mirrored images)."""
    from .export import export_features
    from .lookup import not_cached

    runner = _runner(ctx, pipeline, data, overrides)
    entry = runner.cached("encode")
    if entry is None:
        raise not_cached(pipeline, overrides, data, runner.store, "encode", "run `kmfeat encode` with the same options")
    with runner.store.reading([entry]):
        path = export_features(entry, out)
    click.echo(f"export: {path} ({path.stat().st_size / 1e6:.1f} MB)")


@cli.group("cache")
def cache_group():
    """Inspect and clean the stage store."""


@cache_group.command("ls")
@click.option("--stage", default=None, help="Only this stage.")
@click.option("--long", "long_", is_flag=True, help="Every param of each entry.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable: a JSON list of entries.")
@click.pass_context
def cache_ls(ctx, stage, long_, as_json):
    """List entries: stage, key, size, age, status (train entries: test accuracy; unfinished ones: running or
    interrupted) and params."""
    from . import listing
    from .cache import Store

    entries = listing.rows(Store(ctx.obj["cache_dir"]), stage)
    click.echo(listing.as_json(entries) if as_json else listing.table(entries, long_))


@cache_group.command("path")
@click.argument("stage", type=click.Choice(list(STAGE_HELP)))
@_pipeline_options
@click.option("--expected", is_flag=True, help="Print the folder the entry will have even if it is not computed yet.")
@click.pass_context
def cache_path(ctx, stage, pipeline, data, overrides, force, expected):
    """Print the folder of STAGE's entry for a pipeline (an error if it is not computed, unless --expected)."""
    from .lookup import not_cached

    runner = _runner(ctx, pipeline, data, overrides)
    if not expected and runner.cached(stage) is None:
        raise not_cached(pipeline, overrides, data, runner.store, stage,
                         f"run `kmfeat {stage}` with the same options (or use --expected)")
    click.echo(runner.store.entry_dir(stage, runner.key(stage)))


@cache_group.command("gc")
@click.option("-p", "--pipeline", "pipelines", multiple=True, metavar="TOML",
              help="Keep the entries of these pipelines (repeatable); others are removed.")
@click.option("--data", "data", metavar="PATH", help="The --data the pipelines were run with (applies to each).")
@click.option("-o", "--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE",
              help="The -o overrides the pipelines were run with (repeatable; applies to each).")
@click.option("--dry-run", is_flag=True, help="Only list what would be removed.")
@click.pass_context
def cache_gc(ctx, pipelines, data, overrides, dry_run):
    """Remove unfinished temp folders and, given pipelines (with the --data and -o they were run with; --data
    or -o alone: the built-in default pipeline), every entry they do not use. Entries a running stage writes
    or reads are never removed."""
    from . import config
    from .cache import Store
    from .runner import Runner

    store = Store(ctx.obj["cache_dir"])
    keep = None
    if pipelines or data or overrides:
        keep = {}
        for p in pipelines or (None,):
            for stage_key in sorted(Runner(config.load(p, overrides, data), store).keys()):
                keep.setdefault(stage_key, p or "the default pipeline")
    report = store.gc(keep, dry_run=dry_run)
    for path, why in report.kept:
        click.echo(f"keep {path} (used by {why})")
    for path in report.busy:
        click.echo(f"keep {path} (in use by a running kmfeat)")
    for path in report.removed:
        click.echo(f"{'would remove' if dry_run else 'removed'} {path}")
    click.echo(f"gc: {len(report.removed)} folder(s) {'to remove' if dry_run else 'removed'}, "
               f"{len(report.kept) + len(report.busy)} kept")


@cache_group.command("rm")
@click.argument("stage", type=click.Choice([*STAGE_HELP, "search"]))
@click.argument("key")
@click.pass_context
def cache_rm(ctx, stage, key):
    """Remove one entry (e.g. a corrupt one); KEY as `kmfeat cache ls` shows it. Waits for a run that
    writes or reads it."""
    from .cache import Store

    store = Store(ctx.obj["cache_dir"])
    path = store.checked_entry_dir(stage, key)
    if not path.is_dir():
        raise KmfeatError(f"{path}: no such entry (see `kmfeat cache ls`)")
    with store.lock(stage, key, on_wait=lambda: click.echo(f"waiting for the run using {path} ...", err=True)):
        store.remove(path)
    click.echo(f"removed {path}")


@cli.command("info")
@click.pass_context
def info(ctx):
    """Versions, devices and thread counts."""
    import numpy as np
    import torch

    from .threads import configure_threads

    click.echo(f"kmfeat {__version__}  python {sys.version.split()[0]}  numpy {np.__version__}")
    click.echo(f"torch {torch.__version__}  threads {configure_threads()}  "
               f"cores available {len(os.sched_getaffinity(0))}")
    if torch.cuda.is_available():
        names = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
        click.echo(f"CUDA {torch.version.cuda}: {names}")
    else:
        click.echo("CUDA: not available (torch paths run on CPU)")
    try:
        import faiss

        click.echo(f"faiss {faiss.__version__}  GPUs {faiss.get_num_gpus() if hasattr(faiss, 'get_num_gpus') else 0}")
    except ImportError:
        click.echo("faiss: not installed (k-means uses the torch backend)")
    click.echo(f"cache dir {Path(ctx.obj['cache_dir']).resolve()}")


def _os_error(exc: OSError) -> str:
    """One line for an OSError that escaped the stages (unreadable file, full disk)."""
    from .cache import disk_full_error, is_disk_full

    where = exc.filename or "kmfeat"
    if is_disk_full(exc):
        return str(disk_full_error(exc, where))
    return f"{where}: {exc.strerror or exc}"


def run_command(command: click.Command, argv, prog_name: str, interrupted: str, os_error) -> None:
    """Run a click command as a program: user mistakes end with one `Error:` line and status 2,
    Ctrl-C with `interrupted` and 130; `os_error(exc)` words an OSError (unwritable path, ...)."""
    try:
        command.main(args=argv, prog_name=prog_name, standalone_mode=False)
    except (click.exceptions.Abort, KeyboardInterrupt) as exc:
        # click turns Ctrl-C into Abort; the KeyboardInterrupt behind it carries what the running stage keeps
        hints = [getattr(e, "kmfeat_hint", None) for e in (exc, exc.__cause__, exc.__context__)]
        click.echo(next((h for h in hints if h), interrupted), err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except KmfeatError as exc:
        click.echo(f"Error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
    except OSError as exc:
        click.echo(f"Error: {os_error(exc)}", err=True)
        sys.exit(2)


def main(argv=None) -> None:
    """Entry point of `kmfeat`.

    SIGXFSZ is ignored so that a file size limit (ulimit -f) fails a write with EFBIG, reported
    like a full disk, instead of killing the process.
    """
    if hasattr(signal, "SIGXFSZ"):
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    run_command(cli, argv, "kmfeat", "Interrupted; rerun the same command to resume.", _os_error)


if __name__ == "__main__":
    main()
