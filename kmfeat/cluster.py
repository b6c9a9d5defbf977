"""Encode and decode on a Dask distributed cluster (`--scheduler ADDRESS`, env KMFEAT_SCHEDULER).

`tcp://host:8786` (any address a dask Client takes) connects to a running scheduler; `local:N` starts a
`distributed.LocalCluster` of N single-threaded worker processes on this machine, each running torch on
cores/N threads (on a multi-GPU box worker i uses GPU i mod count). Without it every stage runs in this process.

The encode stage keeps its checkpoint here, in the entry's temp folder: it creates the memory-mapped outputs,
then submits one task per unfinished shard; a task opens the cached images, whitening and centroids, encodes its
rows with the stage's fixed settings (the same `encode_rows` a local run uses), writes, flushes and fsyncs them
into the shared output file, and returns. Each finished shard is recorded in the checkpoint as it arrives, so a
killed client resumes like a local run (with or without a cluster), and the bytes are those of a single process.
Workers must see the cache root at the same path (a shared filesystem, or this machine): a token written into it
is read back by every worker before anything is submitted. Whitening and k-means stay in this process (400,000
patches are 170 MB). Tasks are retried on another worker when theirs dies.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import logging
import os
import uuid
from pathlib import Path

import numpy as np

from .cache import _fsync_file
from .errors import KmfeatError
from .progress import bar

ENV = "KMFEAT_SCHEDULER"
RETRIES = 3
"""Times a task is resubmitted after its worker died."""
_ACTIVE: contextvars.ContextVar = contextvars.ContextVar("kmfeat_cluster", default=None)


class ClusterGone(KmfeatError):
    """The scheduler or the connection to it went away mid-stage: a user-facing error after which the stage's
    checkpoint is kept (the runner does not discard a resumable stage's temp folder for it)."""

    keep_checkpoint = True


def parse_spec(spec: str) -> tuple[str, int | str]:
    """("local", N) or ("address", ADDRESS) for a --scheduler value; a KmfeatError names what was expected."""
    text = spec.strip()
    if text.startswith("local:"):
        try:
            n = int(text[len("local:"):])
        except ValueError:
            n = 0
        if n < 1:
            raise KmfeatError(f"--scheduler: got {spec!r}, expected local:N with N >= 1 worker processes")
        return "local", n
    if not text or " " in text:
        raise KmfeatError(f"--scheduler: got {spec!r}, expected a scheduler address (tcp://host:8786) or local:N")
    return "address", text


def _distributed():
    try:
        import distributed
    except ImportError:
        raise KmfeatError("--scheduler: Dask distributed is not installed; it is an optional extra: "
                          "pip install 'kmfeat[dask]'") from None
    return distributed


class Cluster:
    """A Dask client, connected on first use (cached stages never start workers)."""

    def __init__(self, spec: str):
        self.spec = spec
        self.kind, self.target = parse_spec(spec)
        self._client = None
        self._local = None
        self._checked: set[str] = set()

    @property
    def client(self):
        if self._client is None:
            distributed = _distributed()
            try:
                if self.kind == "local":
                    self._local = distributed.LocalCluster(
                        n_workers=self.target, threads_per_worker=1, processes=True, dashboard_address=None,
                        silence_logs=logging.ERROR)
                    self._client = distributed.Client(self._local)
                else:
                    self._client = distributed.Client(self.target, timeout="20s")
            except (OSError, TimeoutError) as exc:
                self.close()
                raise KmfeatError(f"--scheduler {self.spec}: cannot connect ({exc}); start one with "
                                  f"`dask scheduler`, or use local:N") from None
        return self._client

    def threads(self) -> int | None:
        """torch threads per worker: cores / N for local:N (so N workers share the cores), else the worker's own."""
        if self.kind != "local":
            return None
        from .threads import available_cpus

        return max(1, available_cpus() // self.target)

    def check_storage(self, root: Path) -> None:
        """Every worker reads back a token written into `root`; the first that cannot is named, and nothing is
        submitted. Checked once per root."""
        root = Path(root).resolve()
        if str(root) in self._checked:
            return
        token = uuid.uuid4().hex
        probe = root / f".kmfeat-cluster-check-{token}"
        probe.write_text(token)
        try:
            answers = self.client.run(_read_token, str(probe))
        finally:
            probe.unlink(missing_ok=True)
        if not answers:
            raise KmfeatError(f"--scheduler {self.spec}: the scheduler has no workers")
        for worker, got in sorted(answers.items()):
            if got != token:
                raise KmfeatError(f"--scheduler {self.spec}: worker {worker} cannot read {root} in the cache "
                                  f"({got}); workers must see the cache at the same path (a shared filesystem)")
        self._checked.add(str(root))

    def check_readable(self, path: str, what: str) -> None:
        """Every worker can open `path` (one input file): else the first that cannot is named."""
        answers = self.client.run(_readable, path)
        for worker, got in sorted(answers.items()):
            if got:
                raise KmfeatError(f"--scheduler {self.spec}: worker {worker} cannot read {what} {path} ({got}); "
                                  f"workers must see it at the same path (a shared filesystem)")

    def run_tasks(self, fn, jobs: list, on_done, desc: str, total: int, initial: int = 0) -> None:
        """Submit fn(job) for every job (with retries) and call on_done(job, result) in this process as each
        finishes, with a progress bar counting job["count"]; a lost scheduler is a ClusterGone."""
        distributed = _distributed()
        client = self.client
        futures = {}
        try:
            for job in jobs:
                futures[client.submit(fn, job, retries=RETRIES, pure=False)] = job
            with bar(total=total, initial=initial, desc=desc, unit="img") as progress:
                for future in distributed.as_completed(list(futures)):
                    job = futures[future]
                    on_done(job, future.result())
                    progress.update(job["count"])
        except KmfeatError:
            raise
        except (OSError, TimeoutError, distributed.comm.CommClosedError, distributed.client.FutureCancelledError
                ) as exc:
            reason = (str(exc).strip().splitlines() or [""])[0][:160].rstrip(".")
            raise ClusterGone(f"--scheduler {self.spec}: lost the cluster mid-stage ({type(exc).__name__}"
                              f"{': ' + reason if reason else ''}); finished shards are kept, rerun (with or without "
                              f"--scheduler) to resume") from None
        finally:
            for future in futures:
                future.release()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            if self._client is not None:
                self._client.close()
        with contextlib.suppress(Exception):
            if self._local is not None:
                self._local.close()
        self._client = self._local = None


def _readable(path: str) -> str:
    try:
        with open(path, "rb"):
            return ""
    except OSError as exc:
        return exc.strerror or str(exc)


def _read_token(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError as exc:
        return f"{exc.strerror or exc}: {path}"


@contextlib.contextmanager
def active(cluster: Cluster | None):
    """Make `cluster` the one the data stage's decoders use while a stage runs."""
    reset = _ACTIVE.set(cluster)
    try:
        yield
    finally:
        _ACTIVE.reset(reset)


def current() -> Cluster | None:
    return _ACTIVE.get()


# ---------------------------------------------------------------- encode

def _absolute(entry):
    return dataclasses.replace(entry, path=Path(entry.path).resolve(), _verified=set())


def encode_on_cluster(cluster: Cluster, ctx, splits) -> None:
    """Submit every unfinished shard of `splits` (kmfeat.encode_stage._Split) and record each as it finishes."""
    from .encode_stage import record_shard, todo_shards

    cluster.check_storage(ctx.out.store.root)
    data, whiten, kmeans = (_absolute(ctx.inputs[n]) for n in ("data", "whiten", "kmeans"))
    by_name = {s.name: s for s in splits}
    jobs, total, initial = [], 0, 0
    for split in splits:
        total += len(split.images)
        todo = todo_shards(split)
        initial += len(split.images) - sum(split.shard_len(s) for s in todo)
        images = "train_x" if split.name.startswith("train") else "test_x"
        for start in todo:
            jobs.append({"cfg": ctx.cfg, "data": data, "whiten": whiten, "kmeans": kmeans, "images": images,
                         "split": split.name, "flip": split.flip, "out": str(Path(split.out.filename).resolve()),
                         "start": start, "stop": start + split.shard_len(start), "settings": split.settings,
                         "threads": cluster.threads(), "count": split.shard_len(start)})
    if not jobs:
        return
    for split in splits:
        split.out.flush()  # the file the workers open holds its header and every earlier shard
    cluster.run_tasks(encode_task, jobs, lambda job, _: record_shard(by_name[job["split"]], job["start"]),
                      desc="encode (cluster)", total=total, initial=initial)


_ENCODERS: dict = {}
_ENTRIES: dict = {}


def _worker_entry(entry):
    """The first copy of a data entry this worker received: its whole-file checksum is then verified once per
    worker, not once per shard (each task brings a fresh, unverified copy)."""
    return _ENTRIES.setdefault((entry.stage, entry.key, str(entry.path)), entry)
_HEAP_SET = False
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters
MMAP_THRESHOLD = 32 << 20
"""glibc's own ceiling for its dynamic mmap threshold (64-bit)."""


def keep_heap_memory() -> None:
    """Undo dask's worker default MALLOC_TRIM_THRESHOLD_=65536: with it glibc serves every allocation over
    128 KiB by a fresh mmap and returns it on free, so each encoder batch page-faults its buffers anew (4x
    slower encode measured). Large blocks come from the heap again, kept there for the next batch."""
    global _HEAP_SET
    if _HEAP_SET or "MALLOC_TRIM_THRESHOLD_" not in os.environ:
        return
    _HEAP_SET = True
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
        libc.mallopt(M_TRIM_THRESHOLD, 1 << 30)


def _worker_encoder(job: dict):
    """The encoder of a job, built once per worker process and kept for its later shards."""
    from .encode_stage import make_encoder

    key = (job["whiten"].key, job["kmeans"].key, repr(job["cfg"].encode), repr(job["cfg"].pool),
           job["settings"]["device"])
    if key not in _ENCODERS:
        cfg = dataclasses.replace(job["cfg"], encode=dataclasses.replace(job["cfg"].encode,
                                                                         device=_worker_device(job)))
        _ENCODERS.clear()
        _ENCODERS[key] = make_encoder(cfg, job["whiten"], job["kmeans"])
    return _ENCODERS[key]


def _worker_device(job: dict) -> str:
    """The stage's device; on a worker of a multi-GPU box, the GPU of its index (workers named 0..N-1)."""
    device = job["settings"]["device"]
    if device == "cuda":
        import torch

        count = torch.cuda.device_count()
        try:
            from distributed import get_worker

            index = int(get_worker().name)
        except (ValueError, TypeError, ImportError):
            index = 0
        return f"cuda:{index % count}" if count > 1 else "cuda"
    return device


def encode_task(job: dict) -> str:
    """On a worker: encode one shard into the shared output file and fsync it."""
    from .encode_stage import encode_rows
    from .threads import configure_threads

    keep_heap_memory()
    if job["threads"]:
        configure_threads(job["threads"])
    encoder = _worker_encoder(job)
    images = _worker_entry(job["data"]).array(job["images"])
    out = np.load(job["out"], mmap_mode="r+")
    encode_rows(encoder, images, out, job["start"], job["stop"], job["flip"], job["settings"], job["split"])
    _fsync_file(job["out"])
    return job["split"]


# ---------------------------------------------------------------- decode

def decode_on_cluster(cluster: Cluster, out: np.memmap, items: list, names: list[str], size, chunk: int) -> None:
    """Decode items in chunks on the workers, each writing its rows of the data stage's memory-mapped `out`."""
    path = Path(out.filename).resolve()
    cluster.check_storage(path.parent)
    items = [os.path.abspath(i) if isinstance(i, str) else i for i in items]  # workers have other working dirs
    if isinstance(items[0], str):
        cluster.check_readable(items[0], "the data file")
    out.flush()
    jobs = [{"out": str(path), "start": a, "items": items[a:a + chunk], "names": names[a:a + chunk],
             "size": tuple(size), "count": len(items[a:a + chunk])} for a in range(0, len(items), chunk)]
    cluster.run_tasks(decode_task, jobs, lambda job, _: None, desc=f"decode {path.stem.split('_')[0]} (cluster)",
                      total=len(items))


def decode_task(job: dict) -> int:
    """On a worker: decode one chunk of files into rows of the shared output file and fsync it."""
    from .data.imagefolder import _decode_chunk

    keep_heap_memory()
    rows = _decode_chunk(job["items"], job["names"], job["size"])
    out = np.load(job["out"], mmap_mode="r+")
    out[job["start"]:job["start"] + len(rows)] = rows
    out.flush()
    _fsync_file(job["out"])
    return len(rows)
