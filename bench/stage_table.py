"""Per-stage benchmark: every selected stage timed in its own `kmfeat` process on a fresh cache.

Repeat 1 runs the stages in order in one empty cache: each selected stage is timed, each stage
only needed as an input is run untimed just before. Later repeats time each stage in a new empty
cache into which the finished upstream entries of repeat 1 are hard-linked (prepared, untimed),
so no run ever finds its own result cached. A stage whose first run took longer than
`long_seconds` runs `repeats_long` times only.
"""
from __future__ import annotations

import json
import shutil
import statistics
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from kmfeat.config import PipelineConfig
from kmfeat.stages import ORDER

from kmfeat.progress import say

from .child import kmfeat_argv, run_checked
from .table import fmt_count, fmt_mb, fmt_seconds, markdown_table, text_table


@dataclass
class StageResult:
    """All timed runs of one stage: subprocess wall seconds, manifest seconds, peak RSS bytes."""
    stage: str
    work: int = 0
    unit: str = "images"
    device: str = ""
    wall: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    rss: list[int] = field(default_factory=list)
    anon: list[int | None] = field(default_factory=list)
    long: bool = False

    @property
    def median_wall(self) -> float:
        return statistics.median(self.wall)

    @property
    def median_seconds(self) -> float:
        return statistics.median(self.seconds)

    def to_dict(self) -> dict:
        return {**asdict(self), "median_wall": self.median_wall, "median_seconds": self.median_seconds,
                "rate": self.work / self.median_seconds if self.median_seconds > 0 else None,
                "peak_rss": max(self.rss)}


def _manifest(cache: Path, stage: str, key: str) -> dict:
    return json.loads((cache / stage / key / "manifest.json").read_text())


def _rows(manifest: dict, *names: str) -> int:
    arrays = manifest["arrays"]
    return sum(arrays[n]["shape"][0] for n in names if n in arrays)


def stage_work(stage: str, cache: Path, keys: dict[str, str]) -> tuple[int, str]:
    """(amount, unit) of what a stage processed, read from the manifests in `cache`."""
    if stage == "data":
        return _rows(_manifest(cache, "data", keys["data"]), "train_x", "test_x"), "images"
    if stage in ("patches", "whiten", "kmeans"):
        return _rows(_manifest(cache, "patches", keys["patches"]), "patches"), "patches"
    encode = _manifest(cache, "encode", keys["encode"])
    if stage == "encode":
        return _rows(encode, "train", "train_flip", "test", "test_flip"), "images"
    return _rows(encode, "train", "train_flip"), "images"


def _torch_device(setting: str) -> str:
    import torch

    return ("cuda" if torch.cuda.is_available() else "cpu") if setting == "auto" else setting


def stage_device(stage: str, cfg: PipelineConfig, manifest: dict) -> str:
    """Where a stage ran, with the torch thread count: e.g. "faiss/cpu, 2 threads"."""
    import torch

    if stage == "kmeans":
        where = f"{manifest['meta'].get('backend', '?')}/{manifest['meta'].get('device', '?')}"
    elif stage == "encode":
        where = _torch_device(cfg.encode.device)
    elif stage == "train":
        where = "cpu" if cfg.head.kind == "sklearn" else _torch_device(cfg.head.device)
    else:
        where = "cpu"
    return f"{where}, {torch.get_num_threads()} threads"


def _link_entries(src: Path, dst: Path, stages: list[str], keys: dict[str, str]) -> None:
    """Hard-link (copy where linking fails) the finished entries of `stages` from cache src to dst."""
    for stage in stages:
        target = dst / stage / keys[stage]
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            shutil.copytree(src / stage / keys[stage], target, copy_function=_link_or_copy)
        except shutil.Error as exc:
            raise OSError(f"cannot prepare {target}: {exc}") from None


def _link_or_copy(src: str, dst: str) -> None:
    try:
        Path(dst).hardlink_to(src)
    except OSError:
        shutil.copy2(src, dst)


class StageBench:
    """Times `stages` of one pipeline (cfg as loaded from pipeline + overrides + data)."""

    def __init__(self, cfg: PipelineConfig, keys: dict[str, str], pipeline: Path, data: Path,
                 overrides: list[str], stages: list[str], work_dir: Path, repeats: int = 3,
                 repeats_long: int = 1, long_seconds: float = 300.0):
        self.cfg, self.keys, self.pipeline, self.data = cfg, keys, pipeline, data
        self.overrides, self.work_dir = overrides, work_dir
        self.stages = [s for s in ORDER if s in stages]
        self.repeats, self.repeats_long, self.long_seconds = repeats, repeats_long, long_seconds
        self.results = {s: StageResult(s) for s in self.stages}
        self.total_images = 0

    def _argv(self, cache: Path, stage: str) -> list[str]:
        return kmfeat_argv(cache, stage, self.pipeline, self.data, self.overrides, force=True)

    def _timed(self, cache: Path, stage: str, label: str) -> None:
        say(f"bench: {label}: {stage} ...")
        run = run_checked(self._argv(cache, stage), f"bench {stage}")
        result = self.results[stage]
        manifest = _manifest(cache, stage, self.keys[stage])
        result.wall.append(run.seconds)
        result.seconds.append(float(manifest["seconds"]))
        result.rss.append(run.peak_rss)
        result.anon.append(run.peak_anon)
        if not result.device:
            result.device = stage_device(stage, self.cfg, manifest)
        say(f"bench: {label}: {stage} took {run.seconds:.1f} s (stage {manifest['seconds']:.1f} s), "
            f"peak RSS {run.peak_rss / 1e6:,.0f} MB")

    def _first_repeat(self, base: Path) -> None:
        """Repeat 1 in one empty cache: untimed runs for inputs only, timed runs for selected stages."""
        pending = None
        label = f"run 1/{self.repeats}"
        for stage in ORDER[: ORDER.index(self.stages[-1]) + 1]:
            if stage not in self.results:
                pending = stage
                continue
            if pending:
                say(f"bench: {label}: preparing inputs up to {pending} (untimed) ...")
                run_checked(self._argv(base, pending), f"bench (preparing {pending})")
                pending = None
            self._timed(base, stage, label)
        for stage, result in self.results.items():
            result.work, result.unit = stage_work(stage, base, self.keys)
            result.long = result.wall[0] > self.long_seconds

    def _runs_wanted(self, result: StageResult) -> int:
        return min(self.repeats, self.repeats_long) if result.long else self.repeats

    def run(self) -> list[StageResult]:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        base = Path(tempfile.mkdtemp(prefix="bench-cache-", dir=self.work_dir))
        try:
            self._first_repeat(base)
            for r in range(2, self.repeats + 1):
                for stage, result in self.results.items():
                    if len(result.wall) >= self._runs_wanted(result):
                        continue
                    cache = Path(tempfile.mkdtemp(prefix="bench-cache-", dir=self.work_dir))
                    try:
                        _link_entries(base, cache, ORDER[: ORDER.index(stage)], self.keys)
                        self._timed(cache, stage, f"run {r}/{self.repeats}")
                    finally:
                        shutil.rmtree(cache, ignore_errors=True)
            self.total_images = stage_work("data", base, self.keys)[0]
        finally:
            shutil.rmtree(base, ignore_errors=True)
        return list(self.results.values())


HEADER = ["stage", "work", "wall s, median (runs)", "stage s", "rate /s", "peak RSS MB", "device"]


def stage_rows(results: list[StageResult], total_images: int, long_seconds: float,
               repeats: int) -> tuple[list[list[str]], list[str]]:
    """Table rows (one per stage, then the total) and footnotes."""
    rows, notes = [], []
    for r in results:
        runs = " ".join(fmt_seconds(w) for w in r.wall)
        mark = " *" if r.long and len(r.wall) < repeats else ""
        rate = r.work / r.median_seconds if r.median_seconds > 0 else float("nan")
        rows.append([r.stage, f"{r.work:,} {r.unit}", f"{fmt_seconds(r.median_wall)} ({runs}){mark}",
                     fmt_seconds(r.median_seconds), f"{fmt_count(rate)} {r.unit}", fmt_mb(max(r.rss)), r.device])
    total_wall = sum(r.median_wall for r in results)
    total_stage = sum(r.median_seconds for r in results)
    rows.append(["total", f"{total_images:,} images", fmt_seconds(total_wall), fmt_seconds(total_stage),
                 f"{fmt_count(total_images / total_stage)} images" if total_stage > 0 else "-",
                 fmt_mb(max(max(r.rss) for r in results)), ""])
    if any(r.long and len(r.wall) < repeats for r in results):
        notes.append(f"* first run took over {long_seconds:g} s, so it was not repeated {repeats} times "
                     f"(--repeats-long)")
    notes.append("wall s: the whole `kmfeat` process (start-up and imports included); stage s: the stage's own "
                 "time from its manifest.json; rate: work / stage s; peak RSS: the stage process (os.wait4)")
    return rows, notes


def render(results: list[StageResult], total_images: int, long_seconds: float, repeats: int, markdown: bool) -> str:
    rows, notes = stage_rows(results, total_images, long_seconds, repeats)
    right = {2, 3, 4, 5}
    if markdown:
        return markdown_table(HEADER, rows, right) + "\n\n" + "\n".join(f"{n}  " for n in notes)
    return text_table(HEADER, rows, right) + "\n" + "\n".join(notes)
