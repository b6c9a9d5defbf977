"""Issue 15: encode and image decoding on a Dask cluster give the bytes of a single process, survive a killed
worker, resume after a killed client (without the cluster), and refuse workers that cannot see the cache.
Skipped where dask distributed is not installed (`pip install 'kmfeat[dask]'`)."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

pytest.importorskip("distributed")

from helpers import make_image_folder  # noqa: E402
from kmfeat.cache import Store  # noqa: E402
from kmfeat.cluster import Cluster, parse_spec  # noqa: E402
from kmfeat.errors import KmfeatError  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OVERRIDES = ["data.source=\"imagefolder\"", "patches.n=4000", "kmeans.k=256", "kmeans.iters=2",
             "encode.flip_train=true"]
ENV = {"KMFEAT_PROGRESS": "0", "KMFEAT_COMPILE": "0", "KMFEAT_SHARD": "20"}
ARRAYS = ["train", "train_flip", "test", "train_y", "test_y"]


@pytest.fixture(scope="module")
def workload(tmp_path_factory):
    """An image folder (600 train + 60 test images of 32x32) and its uninterrupted single-process encode."""
    root = tmp_path_factory.mktemp("cluster")
    data = make_image_folder(root / "imgs", n_train=200, n_test=20, size=(32, 32))
    proc = kmfeat("encode", data=data, cache=root / "reference")
    assert proc.returncode == 0, proc.stderr
    return data, root / "reference"


def kmfeat(*args, data, cache, wait=True, **kwargs):
    argv = [sys.executable, "-m", "kmfeat", "--cache-dir", str(cache), *args, "--data", str(data)]
    for item in OVERRIDES:
        argv += ["-o", item]
    env = {**os.environ, **ENV}
    if wait:
        return subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600, **kwargs)
    return subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, **kwargs)


def entry(cache, stage="encode"):
    (found,) = Store(cache).entries(stage)
    return found


def assert_same(cache, reference, stages=("encode",)):
    for stage in stages:
        got, ref = entry(cache, stage), entry(reference, stage)
        assert got.key == ref.key
        for name in (ARRAYS if stage == "encode" else ["train_x", "test_x", "train_y", "test_y"]):
            assert (got.path / f"{name}.npy").read_bytes() == (ref.path / f"{name}.npy").read_bytes(), (stage, name)


def done_shards(cache) -> int:
    total = 0
    for record in (Path(cache) / "encode").glob(".tmp-*/progress-*.json"):
        try:
            total += len(json.loads(record.read_text())["done"])
        except (OSError, ValueError, KeyError):
            pass
    return total


def wait_for(proc, condition, timeout=300):
    end = time.time() + timeout
    while not condition():
        assert proc.poll() is None, f"kmfeat ended before the kill point: {proc.stderr.read()}"
        assert time.time() < end, "kill point not reached in time"
        time.sleep(0.02)


def test_local_cluster_gives_the_single_process_bytes_for_data_and_encode(workload, tmp_path):
    data, reference = workload
    proc = kmfeat("encode", "--scheduler", "local:2", data=data, cache=tmp_path / "cache")
    assert proc.returncode == 0, proc.stderr
    assert_same(tmp_path / "cache", reference, ("data", "encode"))
    assert not list((tmp_path / "cache").glob(".kmfeat-cluster-check-*")), "storage token left behind"


def test_a_worker_killed_mid_run_still_gives_the_same_bytes(workload, tmp_path):
    data, reference = workload
    cache = tmp_path / "cache"
    proc = kmfeat("encode", "--scheduler", "local:2", data=data, cache=cache, wait=False)
    wait_for(proc, lambda: done_shards(cache) >= 3)
    workers = [p for p in psutil.Process(proc.pid).children(recursive=True)
               if "spawn_main" in " ".join(p.cmdline())]
    assert workers, "no worker process found"
    workers[0].send_signal(signal.SIGKILL)
    assert proc.wait(timeout=600) == 0, proc.stderr.read()
    assert_same(cache, reference)


def test_the_client_killed_mid_run_then_a_rerun_without_cluster_resumes(workload, tmp_path):
    data, reference = workload
    cache = tmp_path / "cache"
    proc = kmfeat("encode", "--scheduler", "local:2", data=data, cache=cache, wait=False)
    wait_for(proc, lambda: done_shards(cache) >= 4)
    os.killpg(proc.pid, signal.SIGKILL)  # the client and the workers it started
    proc.wait()
    assert not Store(cache).entries("encode") and done_shards(cache) >= 4
    rerun = kmfeat("encode", data=data, cache=cache)
    assert rerun.returncode == 0, rerun.stderr
    assert "encode: resuming, " in rerun.stderr
    assert_same(cache, reference)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_scheduler_gone_is_one_line_and_keeps_the_checkpoint(workload, tmp_path):
    data, reference = workload
    port = _free_port()
    address = f"tcp://127.0.0.1:{port}"
    scheduler = subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1",
                                  "--port", str(port), "--dashboard-address", ":0"], stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL, start_new_session=True)
    worker = subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_worker", address, "--nthreads", "1",
                               "--nworkers", "1", "--no-dashboard"], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True, env={**os.environ, **ENV})
    cache = tmp_path / "cache"
    try:
        proc = kmfeat("encode", "--scheduler", address, data=data, cache=cache, wait=False)
        wait_for(proc, lambda: done_shards(cache) >= 3)
        os.killpg(scheduler.pid, signal.SIGKILL)
        assert proc.wait(timeout=300) == 2
        lines = [line for line in proc.stderr.read().splitlines() if line.startswith("Error")]
        assert len(lines) == 1 and "lost the cluster" in lines[0] and "rerun" in lines[0], lines
    finally:
        for p in (scheduler, worker):
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    kept = done_shards(cache)
    assert kept >= 3 and not Store(cache).entries("encode")
    rerun = kmfeat("encode", data=data, cache=cache)
    assert rerun.returncode == 0 and "encode: resuming, " in rerun.stderr, rerun.stderr
    assert_same(cache, reference)


class FakeClient:
    """Answers `run` like a scheduler whose second worker sees another filesystem; records submissions."""

    def __init__(self):
        self.submitted = []

    def run(self, fn, path):
        return {"tcp://10.0.0.1:4001": fn(path), "tcp://10.0.0.2:4001": fn(path + ".elsewhere")}

    def submit(self, *args, **kwargs):
        self.submitted.append(args)


def test_a_worker_that_cannot_see_the_cache_is_named_and_nothing_is_submitted(tmp_path):
    from kmfeat import config
    from kmfeat.runner import Runner

    data = make_image_folder(tmp_path / "imgs", n_train=4, n_test=2)
    cluster = Cluster("tcp://10.0.0.9:8786")
    fake = FakeClient()
    cluster._client = fake
    cfg = config.load(None, [*OVERRIDES, "patches.n=500", "kmeans.k=8"], str(data))
    with pytest.raises(KmfeatError, match=r"worker tcp://10\.0\.0\.2:4001 cannot read .*cache.*same path"):
        Runner(cfg, Store(tmp_path / "cache"), quiet=True, cluster=cluster).run("encode")
    assert fake.submitted == [] and not Store(tmp_path / "cache").entries()
    assert not list((tmp_path / "cache").glob(".kmfeat-cluster-check-*"))


@pytest.mark.parametrize("spec,expected", [("local:3", ("local", 3)), ("tcp://h:8786", ("address", "tcp://h:8786"))])
def test_scheduler_specs(spec, expected):
    assert parse_spec(spec) == expected


@pytest.mark.parametrize("spec", ["local:0", "local:x", "", "a b"])
def test_bad_scheduler_specs_are_one_line_errors(spec):
    with pytest.raises(KmfeatError, match="--scheduler"):
        parse_spec(spec)
