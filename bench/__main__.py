"""`python -m bench`: the stage table (default), `--compare` (Encoder vs naive numpy), `--kmeans` (k-means
backends and precisions) or `--memory` (peak RSS of encode vs N). See bench/__init__.py; `--help` lists the options."""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import click

from kmfeat.cli import run_command
from kmfeat.errors import KmfeatError

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_PIPELINE = ROOT / "pipelines" / "cifar10.toml"
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"
QUICK_OVERRIDES = ["patches.n=20000", "kmeans.k=64", "kmeans.iters=3", "head.val=200", "head.epochs=3"]
QUICK_LIMITS = (1000, 200)
QUICK_COMPARE_IMAGES = 100
MEMORY_SMALL = (8000, 2000)
QUICK_MEMORY_SMALL = (500, 100)


def _names(option: str, text: str, allowed) -> list[str]:
    """The comma-separated names of `text`, each one of `allowed`, else a one-line error naming `option`."""
    names = [s.strip() for s in text.split(",") if s.strip()]
    if not names or any(v not in allowed for v in names):
        raise KmfeatError(f"{option}: got {text!r}, expected a comma-separated list of {', '.join(allowed)}")
    return names


def _positive(name: str, value: int | None, minimum: int = 1) -> None:
    if value is not None and value < minimum:
        raise KmfeatError(f"{name}: got {value}, expected >= {minimum}")


class Settings:
    """The resolved options: paths, -o overrides (quick defaults, then limits, then the user's)."""

    def __init__(self, data, pipeline, overrides, limit_train, limit_test, quick, work_dir):
        self.data = Path(data).resolve() if data else DEFAULT_DATA
        if not self.data.exists():
            where = "--data" if data else f"--data (default {DEFAULT_DATA})"
            raise KmfeatError(f"{where}: {self.data} not found; pass --data PATH to a CIFAR-10 copy or image folder")
        self.pipeline = Path(pipeline).resolve() if pipeline else DEFAULT_PIPELINE
        if not self.pipeline.is_file():
            raise KmfeatError(f"--pipeline: {self.pipeline}: no such file (see pipelines/*.toml)")
        self.quick = quick
        lt, ls = QUICK_LIMITS if quick else (None, None)
        self.limit_train = limit_train if limit_train is not None else lt
        self.limit_test = limit_test if limit_test is not None else ls
        _positive("--limit-train", self.limit_train, 0)
        _positive("--limit-test", self.limit_test, 0)
        self.user_overrides = list(overrides)
        self.work_dir = Path(work_dir) if work_dir else Path(tempfile.gettempdir())

    def overrides(self, with_limits: bool = True) -> list[str]:
        out = list(QUICK_OVERRIDES) if self.quick else []
        if with_limits and self.limit_train is not None:
            out.append(f"data.limit_train={self.limit_train}")
        if with_limits and self.limit_test is not None:
            out.append(f"data.limit_test={self.limit_test}")
        return out + self.user_overrides

    def config(self, overrides: list[str]):
        from kmfeat import config

        return config.load(self.pipeline, overrides, str(self.data))

    def keys(self, overrides: list[str]) -> dict[str, str]:
        from kmfeat.cache import Store
        from kmfeat.runner import Runner
        from kmfeat.stages import ORDER

        runner = Runner(self.config(overrides), Store(self.work_dir))
        return {stage: runner.key(stage) for stage in ORDER}


def _heading(info: dict, title: str, markdown: bool) -> str:
    """The Markdown header block, or one plain line naming the machine and the command."""
    from .machine import markdown_header

    return markdown_header(info, title) if markdown else f"{info['cpu']}, {info['cores']} cores; {info['command']}"


def _write_json(path: str | None, payload: dict) -> None:
    if path:
        Path(path).write_text(json.dumps(payload, indent=2, default=str) + "\n")


def _stage_mode(s: Settings, info: dict, stages: list[str], repeats: int, repeats_long: int, long_seconds: float,
                markdown: bool, out: str | None) -> None:
    from .stage_table import StageBench, render

    overrides = s.overrides()
    cfg = s.config(overrides)
    bench = StageBench(cfg, s.keys(overrides), s.pipeline, s.data, overrides, stages, s.work_dir,
                       repeats, repeats_long, long_seconds)
    results = bench.run()
    click.echo(_heading(info, "Stage timings", markdown))
    click.echo(render(results, bench.total_images, long_seconds, repeats, markdown))
    _write_json(out, {"mode": "stages", "machine": info, "overrides": overrides, "repeats": repeats,
                      "total_images": bench.total_images, "stages": [r.to_dict() for r in results]})


def _in_process(s: Settings, info: dict, mode: str, title: str, run, render, images: int | None,
                default_images: int, k: int | None, repeats: int, variants: list[str], markdown: bool,
                out: str | None) -> dict:
    """A one-process comparison (--compare, --kmeans): run(cfg, images, k, repeats, variants), print, save."""
    cfg = s.config(s.overrides(with_limits=False))
    images = images or (QUICK_COMPARE_IMAGES if s.quick else default_images)
    result = run(cfg, images, k or cfg.kmeans.k, repeats, variants)
    click.echo(_heading(info, title, markdown))
    click.echo(render(result, markdown))
    _write_json(out, {"mode": mode, "machine": info, **result})
    return result


def _compare_mode(s: Settings, info: dict, images: int | None, k: int | None, repeats: int, variants: list[str],
                  markdown: bool, out: str | None) -> int:
    from .compare import matches, render_compare, run_compare

    result = _in_process(s, info, "compare", "Encoder vs naive numpy", run_compare, render_compare, images, 2000,
                         k, repeats, variants, markdown, out)
    return 0 if matches(result) else 1


def _kmeans_mode(s: Settings, info: dict, images: int | None, k: int | None, repeats: int, variants: list[str],
                 markdown: bool, out: str | None) -> None:
    from .kmeans_compare import render_kmeans_compare, run_kmeans_compare

    _in_process(s, info, "kmeans", "k-means backends and precisions", run_kmeans_compare, render_kmeans_compare,
                images, 50_000, k, repeats, variants, markdown, out)


def _memory_mode(s: Settings, info: dict, memory: bool, memory_k: int | None, markdown: bool, out: str | None) -> None:
    from .memory import MemoryRun, measure_encode, render_memory

    base = s.overrides(with_limits=False)

    def key_of(overrides):
        return s.keys(overrides)["encode"]

    def limits(train, test):
        return [f"data.limit_train={train or 0}", f"data.limit_test={test or 0}"]

    full_limits = limits(s.limit_train, s.limit_test)
    full_label = "full copy" if not (s.limit_train or s.limit_test) else \
        f"limits {s.limit_train or 'all'} + {s.limit_test or 'all'}"
    runs, growth, big = [], None, None
    if memory:
        small = QUICK_MEMORY_SMALL if s.quick else MEMORY_SMALL
        growth = (MemoryRun(f"limits {small[0]} + {small[1]}", limits(*small)), MemoryRun(full_label, full_limits))
        runs += growth
    if memory_k:
        big = MemoryRun(f"{full_label}, k={memory_k}", [*full_limits, f"kmeans.k={memory_k}"])
        runs.append(big)
    for run in runs:
        measure_encode(run, s.pipeline, s.data, base, s.work_dir, key_of)
    click.echo(_heading(info, "Encode peak memory", markdown))
    click.echo(render_memory(runs, growth, big, markdown))
    _write_json(out, {"mode": "memory", "machine": info, "overrides": base,
                      "runs": [vars(r) for r in runs]})


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--data", metavar="PATH", help=f"Dataset (default {DEFAULT_DATA}).")
@click.option("-p", "--pipeline", metavar="TOML", help="Pipeline (default pipelines/cifar10.toml).")
@click.option("-o", "--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE",
              help="Config override passed to every kmfeat run (repeatable).")
@click.option("--limit-train", type=int, help="Same as -o data.limit_train=N.")
@click.option("--limit-test", type=int, help="Same as -o data.limit_test=M.")
@click.option("--stages", default="data,patches,whiten,kmeans,encode,train", show_default=True,
              help="Stages to time (comma-separated).")
@click.option("--repeats", default=3, show_default=True, type=int, help="Timed runs per stage (the median is shown).")
@click.option("--repeats-long", default=1, show_default=True, type=int,
              help="Runs of a stage whose first run took longer than --long-seconds.")
@click.option("--long-seconds", default=300.0, show_default=True, type=float, help="What counts as a long stage.")
@click.option("--compare", is_flag=True,
              help="Time the Encoder against the naive numpy encoder, in one process; exit status 1 when "
                   "their outputs differ by more than 1e-4 relative.")
@click.option("--kmeans", "kmeans_mode", is_flag=True,
              help="Time k-means (faiss-cpu, torch fp32, torch bf16) on the same whitened patches, in one process.")
@click.option("--kmeans-variants", default="faiss,torch,torch-bf16", show_default=True,
              help="--kmeans: variants; the first is the one the others are compared with.")
@click.option("--images", type=int, help="--compare: number of train images (default 2000; 100 with --quick); "
                                         "--kmeans: images the patches come from (default 50,000).")
@click.option("--k", type=int, help="--compare, --kmeans: number of centroids (default the pipeline's; 64 with "
                                    "--quick).")
@click.option("--variants", default="compiled,eager", show_default=True,
              help="--compare: Encoder variants (KMFEAT_COMPILE=1 / 0; -bf16: encode.precision = bf16).")
@click.option("--memory", is_flag=True, help="Peak RSS of `kmfeat encode` on 10,000 images and on the full copy.")
@click.option("--memory-k", type=int, help="Peak RSS of `kmfeat encode` on the full copy with this k (e.g. 4000).")
@click.option("--quick", is_flag=True, help="Tiny settings, so that the whole harness runs in well under a minute.")
@click.option("--markdown", is_flag=True, help="Markdown table with a machine header, for BENCHMARKS.md.")
@click.option("--out", metavar="FILE", help="Also write the results as JSON.")
@click.option("--work-dir", metavar="DIR", help="Where the temporary caches go (default: the system temp dir).")
def main(data, pipeline, overrides, limit_train, limit_test, stages, repeats, repeats_long, long_seconds, compare,
         kmeans_mode, kmeans_variants, images, k, variants, memory, memory_k, quick, markdown, out, work_dir) -> None:
    """Benchmark kmfeat: per-stage time and peak RSS (default), --compare, --kmeans, or --memory / --memory-k."""
    from .machine import machine_info

    for name, value in [("--repeats", repeats), ("--repeats-long", repeats_long), ("--images", images), ("--k", k),
                        ("--memory-k", memory_k)]:
        _positive(name, value)
    if sum([compare, kmeans_mode, bool(memory or memory_k)]) > 1:
        raise KmfeatError("--compare, --kmeans and --memory/--memory-k: choose one mode per run")
    from kmfeat.stages import ORDER

    from .compare import VARIANTS
    from .kmeans_compare import KMEANS_VARIANTS

    stage_list, variant_list = _names("--stages", stages, ORDER), _names("--variants", variants, VARIANTS)
    kmeans_list = _names("--kmeans-variants", kmeans_variants, KMEANS_VARIANTS)
    s = Settings(data, pipeline, overrides, limit_train, limit_test, quick, work_dir)
    info = machine_info(sys.argv[1:])
    if compare:
        sys.exit(_compare_mode(s, info, images, k, repeats, variant_list, markdown, out))
    if kmeans_mode:
        _kmeans_mode(s, info, images, k, repeats, kmeans_list, markdown, out)
        return
    if memory or memory_k:
        _memory_mode(s, info, memory, memory_k, markdown, out)
    else:
        _stage_mode(s, info, stage_list, repeats, repeats_long, long_seconds, markdown, out)


def run() -> None:
    """Entry point: user mistakes (and an unwritable --work-dir) end with `Error: ...` and status 2,
    Ctrl-C with 130."""
    run_command(main, None, "python -m bench", "Interrupted.",
                lambda exc: f"{exc.filename or 'bench'}: {exc.strerror or exc} (see --work-dir)")


if __name__ == "__main__":
    run()
