"""The stage store: keys, atomic commits, integrity checks, gc, and the runner's caching."""
import json
import os

import numpy as np
import pytest
import torch

from kmfeat import config, stages
from kmfeat.cache import Store, make_key
from kmfeat.errors import KmfeatError
from kmfeat.runner import Runner
from kmfeat.stages import ORDER


def test_make_key_is_stable_and_sensitive():
    a = make_key("kmeans", {"k": 10, "iters": 5}, {"whiten": "abc"})
    assert a == make_key("kmeans", {"iters": 5, "k": 10}, {"whiten": "abc"})
    assert a != make_key("kmeans", {"k": 11, "iters": 5}, {"whiten": "abc"})
    assert a != make_key("kmeans", {"k": 10, "iters": 5}, {"whiten": "abd"})
    assert a != make_key("encode", {"k": 10, "iters": 5}, {"whiten": "abc"})
    assert a == make_key("kmeans", {"k": 10, "iters": 5}, {"whiten": "abc"}, revision=0)
    assert a != make_key("kmeans", {"k": 10, "iters": 5}, {"whiten": "abc"}, revision=1)


def keys_for(tmp_path, overrides):
    cfg = config.load(None, ["data.path=" + json.dumps(str(tmp_path))] + overrides)
    runner = Runner(cfg, Store(tmp_path / "cache"))
    return {name: runner.key(name) for name in ORDER}


@pytest.mark.parametrize("override,first_changed", [
    ("data.limit_train=100", "data"),
    ("patches.n=2000", "patches"),
    ("whiten.eps=0.01", "whiten"),
    ("kmeans.k=4000", "kmeans"),
    ("encode.kind=hard", "encode"),
    ("pool.grid=3", "encode"),
    ("head.hidden=64", "train"),
])
def test_changed_param_changes_that_stage_and_dependants_only(tmp_path, override, first_changed):
    base = keys_for(tmp_path, [])
    changed = keys_for(tmp_path, [override])
    assert base == keys_for(tmp_path, [])
    for name in ORDER:
        downstream = ORDER.index(name) >= ORDER.index(first_changed)
        assert (base[name] != changed[name]) == downstream, name


def test_batch_does_not_change_keys_and_auto_is_keyed_as_the_device_it_resolves_to(tmp_path):
    resolved = "cuda" if torch.cuda.is_available() else "cpu"
    assert keys_for(tmp_path, []) == keys_for(tmp_path, ["encode.batch=7", f"encode.device={resolved}"])


def test_sklearn_head_key_ignores_mlp_params(tmp_path):
    a = keys_for(tmp_path, ["head.kind=sklearn"])
    b = keys_for(tmp_path, ["head.kind=sklearn", "head.hidden=3"])
    assert a["train"] == b["train"]


def commit_entry(store, stage="s", key="k1", arrays=None):
    with store.lock(stage, key):
        w = store.writer(stage, key, {"a": 1}, {})
        for name, arr in (arrays or {"x": np.arange(10.0)}).items():
            w.save(name, arr)
        return w.commit()


def test_commit_roundtrip_and_manifest(tmp_path):
    store = Store(tmp_path)
    entry = commit_entry(store, arrays={"x": np.arange(12, dtype=np.float32).reshape(3, 4)})
    manifest = json.loads((entry.path / "manifest.json").read_text())
    assert manifest["arrays"]["x"]["shape"] == [3, 4] and manifest["arrays"]["x"]["dtype"] == "float32"
    assert manifest["params"] == {"a": 1} and manifest["stage"] == "s"
    np.testing.assert_array_equal(entry.array("x"), np.arange(12).reshape(3, 4))
    assert not list((tmp_path / "s").glob(".tmp-*"))


def test_failure_inside_a_stage_leaves_no_valid_entry(tmp_path):
    store = Store(tmp_path)
    with store.lock("s", "k1"):
        w = store.writer("s", "k1", {}, {})
        w.save("x", np.zeros(5))
        w.abort()
    assert store.get("s", "k1") is None
    # a crash before commit leaves a temp folder that is not an entry and is gc'd
    w = store.writer("s", "k2", {}, {})
    w.save("x", np.zeros(5))
    assert store.get("s", "k2") is None and store.entries() == []
    assert [p for _, _, p in store.leftovers()] == [w.dir]
    assert store.gc(dry_run=True).removed == [w.dir] and w.dir.exists()
    assert store.gc().removed == [w.dir] and not w.dir.exists()


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete"])
def test_corrupt_array_is_refused(tmp_path, damage):
    store = Store(tmp_path)
    entry = commit_entry(store, arrays={"x": np.random.default_rng(0).random(300_000)})
    path = entry.path / "x.npy"
    if damage == "truncate":
        os.truncate(path, path.stat().st_size - 8)
    elif damage == "flip":
        with open(path, "r+b") as f:
            f.seek(200)
            byte = f.read(1)
            f.seek(200)
            f.write(bytes([byte[0] ^ 0xFF]))
    else:
        path.unlink()
    with pytest.raises(KmfeatError, match=r"x\.npy: .*kmfeat cache rm s k1"):
        store.get("s", "k1").array("x")


def test_gc_keeps_reachable_and_skips_locked(tmp_path):
    store = Store(tmp_path)
    a = commit_entry(store, key="a")
    b = commit_entry(store, key="b")
    w = store.writer("s", "c", {}, {})
    d = commit_entry(store, key="d")
    with store.lock("s", "c"), store.reading([d]):
        report = store.gc(keep={("s", "a"): "p.toml"})
    assert report.removed == [b.path] and report.kept == [(a.path, "p.toml")]
    assert sorted(report.busy) == sorted([w.dir, d.path])
    assert a.path.exists() and w.dir.exists() and d.path.exists()


class Counting:
    """Replaces stage bodies with small fakes that count calls."""

    def __init__(self, monkeypatch):
        self.calls = []
        for name in ORDER:
            stage = stages.STAGES[name]
            monkeypatch.setitem(stages.STAGES, name, stages.Stage(
                name, stage.deps, stage.params, self.body(name), stage.resumable))

    def body(self, name):
        def compute(ctx):
            self.calls.append(name)
            ctx.out.save("value", np.array([len(self.calls)]))
            return name
        return compute


def test_runner_caches_and_recomputes_only_dependants(tmp_path, monkeypatch):
    counting = Counting(monkeypatch)
    store = Store(tmp_path / "cache")
    data = tmp_path / "data"  # not tmp_path itself: its fingerprint would change with the cache inside
    data.mkdir()
    cfg = config.load(None, [f"data.path={json.dumps(str(data))}"])
    Runner(cfg, store).run("train")
    assert counting.calls == ORDER
    counting.calls.clear()
    Runner(cfg, store).run("train")
    assert counting.calls == []
    cfg2 = config.load(None, [f"data.path={json.dumps(str(data))}", "kmeans.k=7"])
    Runner(cfg2, store).run("train")
    assert counting.calls == ["kmeans", "encode", "train"]
    counting.calls.clear()
    Runner(cfg2, store, force=frozenset(["whiten"])).run("whiten")
    assert counting.calls == ["whiten"]


def test_runner_failure_keeps_no_entry(tmp_path, monkeypatch):
    def boom(ctx):
        ctx.out.save("value", np.zeros(3))
        raise RuntimeError("stage failed")
    stage = stages.STAGES["data"]
    monkeypatch.setitem(stages.STAGES, "data", stages.Stage("data", (), stage.params, boom))
    store = Store(tmp_path / "cache")
    cfg = config.load(None, [f"data.path={json.dumps(str(tmp_path))}"])
    with pytest.raises(RuntimeError):
        Runner(cfg, store).run("data")
    assert store.entries() == [] and store.leftovers() == []


def test_disk_full_is_a_clear_error(tmp_path, monkeypatch):
    import errno

    def full(ctx):
        ctx.out.save("value", np.zeros(3))
        raise OSError(errno.ENOSPC, "No space left on device")
    stage = stages.STAGES["data"]
    monkeypatch.setitem(stages.STAGES, "data", stages.Stage("data", (), stage.params, full))
    store = Store(tmp_path / "cache")
    cfg = config.load(None, [f"data.path={json.dumps(str(tmp_path))}"])
    with pytest.raises(KmfeatError, match="disk full"):
        Runner(cfg, store).run("data")
    assert store.entries() == [] and store.leftovers() == []


def test_keys_name_the_device_that_runs_consistently(monkeypatch, tmp_path):
    """Issue 12: kmeans keyed its device setting while encode and train dropped theirs. Every stage whose bytes
    depend on the device keys the one it resolves to: "auto" and "cpu" share entries on a CPU machine, and a
    CUDA machine computes its own kmeans, encode and torch-head entries; the ridge head runs on CPU anyway."""
    import torch

    def keys(cuda, *overrides):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
        runner = Runner(config.load(None, ["data.source=\"imagefolder\"", "encode.precision=\"fp32\"",
                                               "kmeans.precision=\"fp32\"", *overrides], str(tmp_path)),
                               Store(tmp_path / "cache"))
        return {name: runner.key(name) for name in ("patches", "kmeans", "encode", "train")}

    cpu, gpu = keys(False), keys(True)
    assert cpu == keys(False, "kmeans.device=\"cpu\"", "encode.device=\"cpu\"", "head.device=\"cpu\"")
    assert cpu["patches"] == gpu["patches"]
    assert all(cpu[name] != gpu[name] for name in ("kmeans", "encode", "train"))
    ridge_cpu, ridge_gpu = keys(False, "head.kind=\"ridge\""), keys(True, "head.kind=\"ridge\"")
    assert ridge_cpu["encode"] != ridge_gpu["encode"]
    assert stages._train_params(config.load(None, ["head.kind=\"ridge\""])).get("device") is None


@pytest.mark.parametrize("via", ["save", "memmap"])
def test_whole_file_checksum_catches_damage_in_the_middle(tmp_path, via, monkeypatch):
    """Issue 13: the digest covered the size and the first and last MiB, so damage in the middle of a big array
    went unseen. Every array now carries an xxh3-128 of all its bytes (hashed while save() writes, at commit for
    memmaps), checked when an entry's array is first read; KMFEAT_VERIFY=sample skips it."""
    import xxhash

    store = Store(tmp_path)
    data = np.random.default_rng(0).random(1_000_000)  # 8 MB: the middle is outside the sampled MiBs
    with store.lock("s", via):
        w = store.writer("s", via, {}, {})
        if via == "save":
            w.save("x", data)
        else:
            w.open_array("x", data.shape, data.dtype)[:] = data
        entry = w.commit()
    path = entry.path / "x.npy"
    assert entry.manifest["arrays"]["x"]["xxh3"] == xxhash.xxh3_128(path.read_bytes()).hexdigest()
    np.testing.assert_array_equal(Store(tmp_path).get("s", via).array("x"), data)
    raw = bytearray(path.read_bytes())
    raw[4_000_000] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(KmfeatError, match="whole-file checksum differs"):
        Store(tmp_path).get("s", via).array("x")
    monkeypatch.setenv("KMFEAT_VERIFY", "sample")
    assert Store(tmp_path).get("s", via).array("x").shape == data.shape  # the opt-out for huge arrays
