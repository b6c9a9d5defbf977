"""Run one `kmfeat` command in its own process and measure that process: wall time and peak RSS.

Peak RSS comes from `os.wait4`, which returns the resource usage of exactly that child (on Linux
the maximum over it and the children it reaped), so every stage is measured on its own. RSS counts
the pages of memory-mapped files too (inputs read from the cache, outputs written through a
np.memmap), so the peak of anonymous memory alone is also sampled from /proc/<pid>/status.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from kmfeat.errors import KmfeatError

CHILD_ENV = {"KMFEAT_PROGRESS": "0"}
"""No progress bars in measured children (their stderr goes to a file)."""
SAMPLE_SECONDS = 0.05


@dataclass
class ChildRun:
    argv: list[str]
    seconds: float
    peak_rss: int
    peak_anon: int | None
    returncode: int
    stdout: str
    stderr: str


def kmfeat_argv(cache_dir: Path, stage: str, pipeline: Path | None, data: Path | None,
                overrides: list[str], force: bool = False) -> list[str]:
    """The `python -m kmfeat -q --cache-dir DIR STAGE -p ... --data ... -o ...` command line."""
    argv = [sys.executable, "-m", "kmfeat", "-q", "--cache-dir", str(cache_dir), stage]
    if pipeline:
        argv += ["-p", str(pipeline)]
    if data:
        argv += ["--data", str(data)]
    for item in overrides:
        argv += ["-o", item]
    if force:
        argv.append("--force")
    return argv


def _maxrss_bytes(usage) -> int:
    """ru_maxrss in bytes (Linux reports KiB, macOS bytes)."""
    return int(usage.ru_maxrss) * (1 if sys.platform == "darwin" else 1024)


class _AnonSampler(threading.Thread):
    """Polls RssAnon of one process until stopped; `peak` is the largest value seen, in bytes (None
    where /proc is unavailable)."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.path = f"/proc/{pid}/status"
        self.peak: int | None = None
        self.stopped = threading.Event()

    def _read(self) -> int | None:
        try:
            with open(self.path) as f:
                for line in f:
                    if line.startswith("RssAnon:"):
                        return int(line.split()[1]) * 1024
        except (OSError, ValueError, IndexError):
            pass
        return None

    def run(self) -> None:
        while not self.stopped.is_set():
            value = self._read()
            if value is not None:
                self.peak = max(self.peak or 0, value)
            self.stopped.wait(SAMPLE_SECONDS)


def run_measured(argv: list[str], env: dict | None = None) -> ChildRun:
    """Run argv to completion; its output is kept in temp files (no pipe to drain while waiting)."""
    env = {**os.environ, **CHILD_ENV, **(env or {})}
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen(argv, stdout=out, stderr=err, env=env)
        sampler = _AnonSampler(proc.pid)
        sampler.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        finally:
            sampler.stopped.set()
        seconds = time.perf_counter() - start
        sampler.join()
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return ChildRun(argv, seconds, _maxrss_bytes(usage), sampler.peak, proc.returncode,
                        out.read().decode(errors="replace"), err.read().decode(errors="replace"))


def run_checked(argv: list[str], what: str, env: dict | None = None) -> ChildRun:
    """run_measured, turning a failed child into a one-line KmfeatError with its last error line."""
    run = run_measured(argv, env)
    if run.returncode != 0:
        lines = [line for line in run.stderr.strip().splitlines() if line.strip()]
        last = lines[-1] if lines else "no output"
        raise KmfeatError(f"{what}: `kmfeat {' '.join(argv[3:])}` failed with status {run.returncode}: {last}")
    return run
