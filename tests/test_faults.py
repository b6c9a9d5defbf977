"""Fault tests: kill -9 and Ctrl-C during encode, concurrent runs of one key, gc during a
write, corrupted cache files, and a full disk. Everything runs `python -m kmfeat` in
subprocesses on a small synthetic workload (390 16x16 images, k=64) whose encode is split
into many checkpointed shards (KMFEAT_SHARD), and compares with an uninterrupted run.
"""
import contextlib
import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from helpers import REAL_CIFAR, make_image_folder
from kmfeat import config, load_features
from kmfeat.cache import Store
from kmfeat.errors import KmfeatError
from kmfeat.runner import Runner

ROOT = Path(__file__).resolve().parents[1]
SHARD = 10
OVERRIDES = ["data.source=\"imagefolder\"", "patches.n=4000", "kmeans.k=64", "kmeans.iters=3",
             "head.val=30", "head.epochs=2", "head.hidden=16"]
ENV = {"KMFEAT_PROGRESS": "0", "KMFEAT_COMPILE": "0", "KMFEAT_SHARD": str(SHARD)}
INTERRUPTED = "Interrupted; rerun the same command to resume."


@dataclass
class Workload:
    data: Path
    base: Path       # cache holding data, patches, whiten and kmeans
    reference: Path  # base + an uninterrupted encode
    key: str         # the encode key
    n_train: int


def _args(data):
    out = ["--data", str(data)]
    for item in OVERRIDES:
        out += ["-o", item]
    return out


def _env(cache, **extra):
    return {**os.environ, **ENV, "KMFEAT_CACHE": str(cache), **extra}


def kmfeat(*args, cache, check=True, env=None, **kwargs):
    proc = subprocess.run([sys.executable, "-m", "kmfeat", *map(str, args)], capture_output=True,
                          text=True, env=_env(cache, **(env or {})), cwd=ROOT, **kwargs)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def _default_sigint():
    """A child of a background job inherits SIGINT as ignored; give it the default, as a terminal would."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start(*args, cache, log: Path, env=None):
    """A kmfeat process in the background, its stderr going to `log`."""
    with open(log, "w") as err:
        return subprocess.Popen([sys.executable, "-m", "kmfeat", *map(str, args)], cwd=ROOT,
                                env=_env(cache, **(env or {})), stdout=subprocess.DEVNULL, stderr=err,
                                preexec_fn=_default_sigint)


@contextlib.contextmanager
def environ(**values):
    before = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def runner(workload, cache):
    cfg = config.load(None, OVERRIDES, str(workload.data))
    return Runner(cfg, Store(cache), quiet=True)


@pytest.fixture(scope="module")
def workload(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    data = make_image_folder(root / "imgs", n_train=100, n_test=30, size=(16, 16))
    w = Workload(data, root / "base", root / "reference", "", 300)
    with environ(**ENV):
        Runner(config.load(None, OVERRIDES, str(data)), Store(w.base), quiet=True).run("kmeans")
        shutil.copytree(w.base, w.reference)
        entry = runner(w, w.reference).run("encode")
    w.key = entry.key
    return w


def copy_base(workload, tmp_path) -> Path:
    cache = tmp_path / "cache"
    shutil.copytree(workload.base, cache)
    return cache


def done_shards(cache, key, split="train") -> int:
    try:
        return len(json.loads((cache / "encode" / f".tmp-{key}" / f"progress-{split}.json").read_text())["done"])
    except (OSError, ValueError, KeyError):
        return 0


def wait_until(proc, condition, timeout=120.0):
    """Poll every millisecond until condition() holds; fail if the process ends first."""
    end = time.time() + timeout
    while not condition():
        assert proc.poll() is None, "kmfeat ended before the kill point was reached"
        assert time.time() < end, "kill point not reached in time"
        time.sleep(0.001)


def assert_same_as_reference(workload, cache, reference=None, key=None):
    """The encode entry in `cache` equals the uninterrupted run's byte for byte."""
    entry = Store(cache).get("encode", key or workload.key)
    assert entry is not None
    ref = Store(reference or workload.reference).get("encode", key or workload.key)
    for name in ["train", "test", "train_y", "test_y"]:
        got = (entry.path / f"{name}.npy").read_bytes()
        assert got == (ref.path / f"{name}.npy").read_bytes(), f"{name}.npy differs from the uninterrupted run"
        entry.array(name)  # size and checksum match the manifest
    names = sorted(p.name for p in entry.path.iterdir())
    assert names == sorted(p.name for p in ref.path.iterdir()), f"checkpoint files left behind? {names}"
    assert not list((cache / "encode").glob(".*")), "temp folders left behind"


def nonempty_lines(text):
    return [line for line in text.splitlines() if line.strip()]


def test_reference_encode_has_the_expected_shape(workload):
    X_train, y_train, X_test, y_test = load_features(workload.reference / "encode" / workload.key)
    assert X_train.shape == (300, 4 * 64) and X_test.shape == (90, 4 * 64)
    assert X_train.dtype == np.float32 and np.isfinite(X_train).all() and (X_train != 0).any(axis=1).all()
    assert y_train.shape == (300,) and y_test.shape == (90,)


@pytest.mark.parametrize("compiled", ["0", pytest.param("1", marks=pytest.mark.slow)])
def test_kill9_at_random_points_then_rerun_is_bit_identical(workload, tmp_path, compiled):
    env = {"KMFEAT_COMPILE": compiled}
    reference = workload.reference
    if compiled == "1":  # torch.compile rounds differently from eager: compare with its own run
        reference = Path(shutil.copytree(workload.base, tmp_path / "reference"))
        kmfeat("encode", *_args(workload.data), cache=reference, env=env)
    cache = copy_base(workload, tmp_path)
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    key, n_shards = workload.key, workload.n_train // SHARD
    # kill points: a random moment of start-up, after a random number of train shards, and
    # during the test split; each time the checkpoint must keep what was done
    points = [("sleep", rng.uniform(0.05, 0.6)),
              ("train", rng.randint(1, n_shards // 2)),
              ("test", 1)]
    before = 0
    for kind, value in points:
        proc = start("encode", *_args(workload.data), cache=cache, log=tmp_path / "log", env=env)
        if kind == "sleep":
            time.sleep(value)
        elif kind == "train":
            wait_until(proc, lambda: done_shards(cache, key) >= before + value)
        else:
            wait_until(proc, lambda: done_shards(cache, key, "test") >= value)
        proc.kill()
        assert proc.wait() == -signal.SIGKILL, f"seed {seed}: {kind} kill came too late"
        assert Store(cache).get("encode", key) is None
        now = done_shards(cache, key)
        assert now >= before, f"seed {seed}: the checkpoint went back from {before} to {now} shards"
        before = now
    assert before == n_shards  # the train split finished before the last kill
    rerun = kmfeat("encode", *_args(workload.data), cache=cache, env=env)
    assert "encode: resuming, " in rerun.stderr and "/390 images already done" in rerun.stderr, rerun.stderr
    assert_same_as_reference(workload, cache, reference)


AUTO_COMPILE = ("import sys; import kmfeat.encode as e; e.COMPILE_MIN_WORK = float(sys.argv[1]); "
                "from kmfeat.cli import main; main(sys.argv[2:])")


AUTO_DEVICE = "encode.device=cpu"
"""The auto compile policy compiles on the CPU only (CUDA runs eager), so the auto tests pin the CPU."""


def start_auto(cache, workload, threshold, log):
    """`kmfeat encode` on the CPU under the default compile policy (KMFEAT_COMPILE unset) with COMPILE_MIN_WORK
    lowered."""
    env = {k: v for k, v in _env(cache).items() if k != "KMFEAT_COMPILE"}
    args = [*_args(workload.data), "-o", AUTO_DEVICE]
    with open(log, "w") as err:
        return subprocess.Popen([sys.executable, "-c", AUTO_COMPILE, str(threshold), "encode", *args],
                                cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=err)


def test_kill9_after_the_auto_policy_compiled_then_rerun_is_bit_identical(workload, tmp_path):
    """Issue 12: under the default policy the encoder switched to the compiled kernel once its per-process work
    passed COMPILE_MIN_WORK, so a resumed run redid eagerly what the first run compiled. The decision is now
    taken once from the stage's planned work and recorded in the checkpoint."""
    per_shard = SHARD * 11 * 11 * 64  # 16x16 images, rf 6: 11 x 11 positions, k = 64
    threshold = 3.5 * per_shard  # the old per-process counter switched after 3 shards
    key = Runner(config.load(None, OVERRIDES + [AUTO_DEVICE], str(workload.data)), Store(tmp_path)).key("encode")
    reference = Path(shutil.copytree(workload.base, tmp_path / "reference"))
    first = start_auto(reference, workload, threshold, tmp_path / "ref.log")
    assert first.wait(timeout=300) == 0, (tmp_path / "ref.log").read_text()
    cache = copy_base(workload, tmp_path)
    proc = start_auto(cache, workload, threshold, tmp_path / "log")
    wait_until(proc, lambda: done_shards(cache, key) >= 6, timeout=300)
    proc.kill()
    assert proc.wait() == -signal.SIGKILL
    saved = json.loads((cache / "encode" / f".tmp-{key}" / "progress-train.json").read_text())
    assert saved["settings"]["compiled"] is True and len(saved["done"]) >= 6
    rerun = start_auto(cache, workload, threshold, tmp_path / "rerun.log")
    assert rerun.wait(timeout=300) == 0, (tmp_path / "rerun.log").read_text()
    assert "encode: resuming, " in (tmp_path / "rerun.log").read_text()
    assert_same_as_reference(workload, cache, reference, key)


@pytest.mark.slow
@pytest.mark.skipif(not REAL_CIFAR.exists(), reason=f"{REAL_CIFAR} not present")
def test_kill9_after_the_auto_switch_on_the_real_copy_then_rerun_is_bit_identical(tmp_path):
    """The same on real CIFAR-10 with the shipped threshold: 11,000 images at k = 1,600 pass COMPILE_MIN_WORK
    after about 8,500 images, where the old per-process switch happened; the kill comes after that point."""
    args = ["encode", "-p", "pipelines/quick.toml", "--data", str(REAL_CIFAR), "-o", "data.limit_train=10000",
            "-o", "kmeans.k=1600", "-o", "patches.n=100000", "-o", "kmeans.iters=5", "-o", AUTO_DEVICE]
    env = {k: v for k, v in _env(tmp_path / "base", KMFEAT_SHARD="500").items() if k != "KMFEAT_COMPILE"}

    def run(cache, wait=True):
        proc = subprocess.Popen([sys.executable, "-m", "kmfeat", *args], cwd=ROOT, env={**env, "KMFEAT_CACHE": str(cache)},
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if wait:
            assert proc.wait(timeout=1200) == 0, proc.stderr.read()
        return proc

    run(tmp_path / "reference")
    (key,) = [p.name for p in (tmp_path / "reference" / "encode").iterdir()]
    cache = tmp_path / "cache"
    proc = run(cache, wait=False)
    wait_until(proc, lambda: done_shards(cache, key) >= 18, timeout=1200)  # 9,000 of 10,000 train images
    proc.kill()
    proc.wait()
    run(cache)
    ref, got = Store(tmp_path / "reference").get("encode", key), Store(cache).get("encode", key)
    for name in ("train", "test"):
        assert (got.path / f"{name}.npy").read_bytes() == (ref.path / f"{name}.npy").read_bytes(), name


def test_ctrl_c_keeps_checkpoint_and_rerun_resumes(workload, tmp_path):
    cache = copy_base(workload, tmp_path)
    log = tmp_path / "log"
    proc = start("encode", *_args(workload.data), cache=cache, log=log)
    wait_until(proc, lambda: done_shards(cache, workload.key) >= 2)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 130
    err = log.read_text()
    assert nonempty_lines(err)[-1] == INTERRUPTED and "Traceback" not in err, err
    assert done_shards(cache, workload.key) >= 2
    rerun = kmfeat("encode", *_args(workload.data), cache=cache)
    assert "encode: resuming, " in rerun.stderr, rerun.stderr
    assert_same_as_reference(workload, cache)


def test_ctrl_c_during_train_says_what_is_kept_and_the_mlp_resumes(workload, tmp_path):
    """Issue 13: Ctrl-C in train said "rerun to resume" while nothing resumed. The line now says what is true
    for the stage, and the MLP continues from its per-epoch checkpoint."""
    cache = Path(shutil.copytree(workload.reference, tmp_path / "cache"))
    args = [*_args(workload.data), "-o", "head.epochs=400", "-o", "head.patience=400", "-o", "head.hidden=256"]
    log = tmp_path / "log"
    proc = start("train", *args, cache=cache, log=log)
    checkpoints = lambda: list((cache / "train").glob(".tmp-*/mlp-checkpoint.pt"))  # noqa: E731
    wait_until(proc, lambda: bool(checkpoints()))
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 130
    err = log.read_text()
    assert nonempty_lines(err)[-1].startswith("Interrupted during train; rerun the same command: an MLP head "
                                              "resumes after its last checkpointed epoch"), err
    assert checkpoints(), "the checkpoint must survive the interruption"
    rerun = start("train", *args, cache=cache, log=tmp_path / "rerun")
    wait_until(rerun, lambda: "mlp: resuming after epoch" in (tmp_path / "rerun").read_text())
    rerun.kill()
    rerun.wait()


def test_two_runs_of_one_key_and_gc_during_the_write(workload, tmp_path):
    cache = copy_base(workload, tmp_path)
    first = start("encode", *_args(workload.data), cache=cache, log=tmp_path / "first")
    wait_until(first, lambda: done_shards(cache, workload.key) >= 1)
    first.send_signal(signal.SIGSTOP)  # frozen mid-write, holding the key's lock
    try:
        second = start("encode", *_args(workload.data), cache=cache, log=tmp_path / "second")
        wait_until(second, lambda: "waiting for it" in (tmp_path / "second").read_text())
        gc = kmfeat("cache", "gc", cache=cache)
        assert "gc: 0 folder(s) removed" in gc.stdout, gc.stdout
        assert (cache / "encode" / f".tmp-{workload.key}").is_dir()
        assert second.poll() is None  # still waiting for the lock
    finally:
        first.send_signal(signal.SIGCONT)
    assert first.wait(timeout=120) == 0, (tmp_path / "first").read_text()
    assert second.wait(timeout=120) == 0, (tmp_path / "second").read_text()
    assert "encode: computing" in (tmp_path / "first").read_text()
    err = (tmp_path / "second").read_text()
    assert "encode: cached (computed by another run)" in err and "encode: computing" not in err, err
    assert_same_as_reference(workload, cache)


def test_gc_keeps_what_a_pipeline_run_with_data_and_overrides_uses(workload, tmp_path):
    """`cache gc -p/--data/-o` keeps the entries of the pipeline as it was run (issue 11: without --data/-o
    every entry of a run made with them counted as unreachable), and says why it keeps each."""
    cache = copy_base(workload, tmp_path)
    stages = ("data", "patches", "whiten", "kmeans")
    dry = kmfeat("cache", "gc", "--dry-run", *_args(workload.data), cache=cache)
    assert "would remove" not in dry.stdout and "gc: 0 folder(s) to remove, 4 kept" in dry.stdout, dry.stdout
    for stage in stages:
        (entry,) = Store(cache).entries(stage)
        assert f"keep {entry.path} (used by the default pipeline)" in dry.stdout
    other = make_image_folder(tmp_path / "other", n_train=2, n_test=1)
    dry = kmfeat("cache", "gc", "--dry-run", "--data", other, cache=cache)
    assert "gc: 4 folder(s) to remove, 0 kept" in dry.stdout, dry.stdout


def test_gc_never_removes_the_inputs_or_output_of_a_running_encode(workload, tmp_path):
    """An encode is frozen mid-write; gc for another pipeline (to which every entry is unreachable) removes none
    of the encode's inputs (shared locks) nor its checkpoint, and the encode then finishes byte-identical.
    Issue 11: gc deleted the inputs of a running encode, which then failed and lost its finished shards."""
    cache = copy_base(workload, tmp_path)
    other = make_image_folder(tmp_path / "other", n_train=2, n_test=1)
    first = start("encode", *_args(workload.data), cache=cache, log=tmp_path / "first")
    wait_until(first, lambda: done_shards(cache, workload.key) >= 1)
    first.send_signal(signal.SIGSTOP)
    try:
        gc = kmfeat("cache", "gc", "--data", other, cache=cache)
        # encode reads data, whiten and kmeans; the patches entry is not its input, so it may go
        assert "gc: 1 folder(s) removed, 4 kept" in gc.stdout, gc.stdout
        assert gc.stdout.count("(in use by a running kmfeat)") == 4
        for stage in ("data", "whiten", "kmeans"):
            assert len(Store(cache).entries(stage)) == 1
        assert Store(cache).entries("patches") == []
        assert (cache / "encode" / f".tmp-{workload.key}").is_dir()
    finally:
        first.send_signal(signal.SIGCONT)
    assert first.wait(timeout=120) == 0, (tmp_path / "first").read_text()
    assert_same_as_reference(workload, cache)
    gc = kmfeat("cache", "gc", "--data", other, cache=cache)  # nothing running now: the other four go
    assert "gc: 4 folder(s) removed, 0 kept" in gc.stdout, gc.stdout
    assert Store(cache).entries() == []


def test_two_runs_started_together_from_scratch(workload, tmp_path):
    cache = tmp_path / "cache"
    procs = [start("whiten", *_args(workload.data), cache=cache, log=tmp_path / f"log{i}") for i in range(2)]
    for i, proc in enumerate(procs):
        assert proc.wait(timeout=120) == 0, (tmp_path / f"log{i}").read_text()
    store = Store(cache)
    for stage in ["data", "patches", "whiten"]:
        entries = store.entries(stage)
        assert len(entries) == 1 and entries[0].key == runner(workload, cache).key(stage)
        for name in entries[0].manifest["arrays"]:
            entries[0].array(name)
    assert store.leftovers() == []
    computed = sum((tmp_path / f"log{i}").read_text().count(": computing") for i in range(2))
    assert computed == 3  # each stage computed once, the other run reused it


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_corrupt_features_are_refused_and_force_rebuilds(workload, tmp_path, damage):
    cache = tmp_path / "cache"
    shutil.copytree(workload.reference, cache)
    folder = cache / "encode" / workload.key
    path = folder / "train.npy"
    if damage == "truncate":
        os.truncate(path, path.stat().st_size - 1000)
    else:
        with open(path, "r+b") as f:
            f.seek(5000)
            byte = f.read(1)
            f.seek(5000)
            f.write(bytes([byte[0] ^ 0x55]))
    with pytest.raises(KmfeatError, match=rf"train\.npy: corrupt .*kmfeat cache rm encode {workload.key}.*--force"):
        load_features(folder)
    if damage == "truncate":
        proc = kmfeat("-q", "train", *_args(workload.data), cache=cache, check=False)
        lines = nonempty_lines(proc.stderr)
        assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
        assert str(path) in lines[0] and f"kmfeat cache rm encode {workload.key}" in lines[0]
        assert "--force" in lines[0]
        assert not (cache / "train").exists() or not list((cache / "train").iterdir())
        kmfeat("encode", "--force", *_args(workload.data), cache=cache)
        assert_same_as_reference(workload, cache)
        X_train = load_features(folder)[0]
        assert X_train.shape == (300, 256)


def _limit_file_size(limit):
    def apply():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
    return apply


@pytest.mark.parametrize("stage", ["data", "encode"])  # np.save of whole arrays; a streamed memmap
def test_file_size_limit_is_a_clean_disk_full_error(workload, tmp_path, stage):
    """RLIMIT_FSIZE (ulimit -f) makes big writes fail with EFBIG, like a full disk would."""
    cache = copy_base(workload, tmp_path) if stage == "encode" else tmp_path / "cache"
    proc = kmfeat("-q", stage, *_args(workload.data), cache=cache, check=False,
                  preexec_fn=_limit_file_size(64 << 10))
    lines = nonempty_lines(proc.stderr)
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "disk full" in lines[0] and "file size limit" in lines[0] and str(cache / stage) in lines[0]
    assert not list((cache / stage).iterdir())
    assert Store(cache).leftovers() == []
    expected = ["data", "kmeans", "patches", "whiten"] if stage == "encode" else []
    assert sorted(e.stage for e in Store(cache).entries()) == expected


@contextlib.contextmanager
def tmpfs(path: Path, size: int):
    path.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip()}); the RLIMIT_FSIZE test covers disk full")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def _du(path: Path) -> int:
    return sum(p.stat().st_blocks * 512 for p in path.rglob("*") if p.is_file())


@pytest.mark.parametrize("stage", ["patches", "encode"])
def test_disk_full_leaves_no_partial_entry(workload, tmp_path, stage):
    if stage == "patches":
        upstream = {"data": Store(workload.base).get("data", runner(workload, workload.base).key("data"))}
        size = _du(upstream["data"].path) + (256 << 10)
    else:
        size = _du(workload.base) + (96 << 10)  # room for the upstream entries, not the features
    with tmpfs(tmp_path / "mnt", size) as mnt:
        cache = mnt / "cache"
        if stage == "encode":
            shutil.copytree(workload.base, cache)
        proc = kmfeat("-q", stage, *_args(workload.data), cache=cache, check=False)
        lines = nonempty_lines(proc.stderr)
        assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
        assert "disk full" in lines[0] and "no space left on device" in lines[0], lines[0]
        assert not list((cache / stage).iterdir())
        store = Store(cache)
        assert store.leftovers() == [] and len(store.entries("data")) == 1
        store.entries("data")[0].array("train_x")


def test_leftovers_of_killed_runs_are_cleaned_by_the_next_run(workload, tmp_path):
    cache = copy_base(workload, tmp_path)
    store = Store(cache)
    stale = cache / "kmeans" / ".tmp-0123456789abcdef"
    stale.mkdir()
    (stale / "centroids.npy").write_bytes(b"half written")
    resumable = cache / "encode" / ".tmp-fedcba9876543210"
    resumable.mkdir(parents=True)
    proc = kmfeat("data", *_args(workload.data), cache=cache)
    assert "removed 1 unfinished folder(s)" in proc.stderr
    assert not stale.exists() and resumable.exists()  # encode checkpoints wait for their rerun or gc
    with store.lock("encode", "fedcba9876543210"):
        assert "gc: 0 folder(s) removed" in kmfeat("cache", "gc", cache=cache).stdout
    assert "gc: 1 folder(s) removed" in kmfeat("cache", "gc", cache=cache).stdout
    assert not resumable.exists()
