"""Issue 11's data-loss cases: `cache rm` keys, `export --out` targets, broken manifests, --cache-dir."""
import json
import os
import resource
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from helpers import make_image_folder
from kmfeat.cache import Store
from kmfeat.errors import KmfeatError
from kmfeat.export import export_features, output_path

ROOT = Path(__file__).resolve().parents[1]
TINY = ["-o", "patches.n=3000", "-o", "kmeans.k=8", "-o", "kmeans.iters=5", "-o", "data.source=\"imagefolder\""]


def kmfeat(*args, cache, **kwargs):
    env = {**os.environ, "KMFEAT_PROGRESS": "0", "KMFEAT_CACHE": str(cache)}
    return subprocess.run([sys.executable, "-m", "kmfeat", "-q", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=ROOT, **kwargs)


def one_error(proc, *words):
    """Exit status 2, exactly one stderr line `Error: ...` holding every word, no traceback."""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("Error: "), proc.stderr
    assert all(w in lines[0] for w in words), lines[0]
    return lines[0]


def commit(store, stage, key, value=1.0):
    with store.lock(stage, key):
        w = store.writer(stage, key, {"v": value}, {})
        w.save("x", np.full(4, value))
        return w.commit()


def tree(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


@pytest.fixture
def populated(tmp_path):
    """A cache with a data and an encode entry, and a sentinel folder beside the cache."""
    cache = tmp_path / "cache"
    store = Store(cache)
    data, enc = commit(store, "data", "0123456789abcdef"), commit(store, "encode", "fedcba9876543210", 2.0)
    sentinel = tmp_path / "sentinel"
    (sentinel / "sub").mkdir(parents=True)
    (sentinel / "sub" / "keep.txt").write_text("precious")
    return cache, data, enc, sentinel


@pytest.mark.parametrize("key", ["..", "../encode", "../encode/fedcba9876543210", ".", "", "0123456789ABCDEF",
                                 "0123456789abcdef/..", "SENTINEL", "~"])
def test_cache_rm_refuses_anything_but_a_key_and_removes_nothing(populated, key):
    cache, data, enc, sentinel = populated
    key = str(sentinel) if key == "SENTINEL" else key
    before, outside = tree(cache), tree(sentinel)
    one_error(kmfeat("cache", "rm", "data", key, cache=cache), "expected 16 hexadecimal digits", "nothing removed")
    assert tree(cache) == before and tree(sentinel) == outside
    assert Store(cache).get("encode", enc.key) is not None and Store(cache).get("data", data.key) is not None


def test_cache_rm_refuses_an_entry_that_links_out_of_the_cache(populated):
    cache, data, enc, sentinel = populated
    link = cache / "data" / "aaaaaaaaaaaaaaaa"
    link.symlink_to(sentinel, target_is_directory=True)
    one_error(kmfeat("cache", "rm", "data", link.name, cache=cache), "link out of the cache", "nothing removed")
    assert (sentinel / "sub" / "keep.txt").read_text() == "precious" and link.is_symlink()


def test_cache_rm_removes_exactly_the_entry_named(populated):
    cache, data, enc, sentinel = populated
    proc = kmfeat("cache", "rm", "data", data.key, cache=cache)
    assert proc.returncode == 0 and f"removed {data.path}" in proc.stdout
    assert not data.path.exists() and Store(cache).get("encode", enc.key) is not None
    assert (sentinel / "sub" / "keep.txt").exists()


def test_cache_rm_waits_for_a_stage_reading_the_entry(populated):
    cache, data, _, _ = populated
    store = Store(cache)
    with store.reading([store.get("data", data.key)]):
        proc = subprocess.Popen([sys.executable, "-m", "kmfeat", "cache", "rm", "data", data.key], cwd=ROOT,
                                env={**os.environ, "KMFEAT_CACHE": str(cache)}, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        with pytest.raises(subprocess.TimeoutExpired):
            proc.wait(timeout=3)
        assert data.path.is_dir()  # not removed while it is read
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0 and "waiting for the run using" in err and not data.path.exists()


def test_reading_an_entry_removed_meanwhile_is_one_clear_error(populated):
    cache, data, _, _ = populated
    store = Store(cache)
    entry = store.get("data", data.key)
    store.remove(entry.path)
    with pytest.raises(KmfeatError, match="removed or replaced while this run started"):
        with store.reading([entry]):
            pass


@pytest.fixture(scope="module")
def encoded(tmp_path_factory):
    """A tiny pipeline encoded once: (cache, data folder)."""
    root = tmp_path_factory.mktemp("export")
    data = make_image_folder(root / "imgs", n_train=6, n_test=2)
    cache = root / "cache"
    proc = kmfeat("encode", "--data", data, *TINY, cache=cache)
    assert proc.returncode == 0, proc.stderr
    return cache, data


def _fifo(path):
    os.mkfifo(path)


def _socket(path):
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(path))
    return s


@pytest.mark.parametrize("kind,expected", [("fifo", "is a FIFO"), ("socket", "is a socket"), ("dir", "is a folder"),
                                           ("link-to-fifo", "is a FIFO")])
def test_export_writes_only_regular_files(encoded, tmp_path, kind, expected):
    cache, data = encoded
    target = tmp_path / "target"
    keep = None
    if kind in ("fifo", "link-to-fifo"):
        _fifo(target)
    elif kind == "socket":
        keep = _socket(target)
    else:
        target.mkdir()
    out = target
    if kind == "link-to-fifo":
        out = tmp_path / "link.npz"
        out.symlink_to(target)
    mode = os.lstat(target).st_mode
    one_error(kmfeat("export", "--data", data, *TINY, "--out", out, cache=cache), f"--out {out}", expected)
    assert os.lstat(target).st_mode == mode and not list(tmp_path.glob(".*part*"))
    if keep is not None:
        keep.close()


def test_export_refuses_a_device_before_writing():
    """/dev/null is never opened for writing: the check names it from its mode alone."""
    with pytest.raises(KmfeatError, match="--out /dev/null: is a character device"):
        output_path("/dev/null")


def test_export_replaces_a_regular_file_and_writes_through_a_link(encoded, tmp_path):
    cache, data = encoded
    old = tmp_path / "old.npz"
    old.write_text("old contents")
    link = tmp_path / "link.npz"
    link.symlink_to(old)
    for out in (old, link):
        proc = kmfeat("export", "--data", data, *TINY, "--out", out, cache=cache)
        assert proc.returncode == 0, proc.stderr
        with np.load(old) as z:
            assert z["X_train"].shape[0] == 18 and list(z["y_test"]) == [0, 0, 1, 1, 2, 2]
    assert link.is_symlink()
    one_error(kmfeat("export", "--data", data, *TINY, "--out", tmp_path / "no" / "f.npz", cache=cache),
              "does not exist")


def test_export_on_a_full_disk_names_out_and_leaves_nothing(encoded, tmp_path):
    cache, data = encoded
    folder = Path(kmfeat("cache", "path", "encode", "--data", data, *TINY, cache=cache).stdout.strip())
    out = tmp_path / "f.npz"
    code = ("import signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
            "from kmfeat.cache import Store; from kmfeat.export import export_features\n"
            "from kmfeat.errors import KmfeatError\n"
            f"e = Store({str(folder.parent.parent)!r}).get('encode', {folder.name!r})\n"
            f"try:\n    export_features(e, {str(out)!r})\nexcept KmfeatError as exc:\n    print(exc)\n")

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (1024, 1024))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, preexec_fn=limit)
    assert f"--out {out}: disk full while writing" in proc.stdout and "--cache-dir" not in proc.stdout, proc
    assert not out.exists() and os.listdir(tmp_path) == []


@pytest.mark.parametrize("text", ["[]", "null", '"x"', "5", "{not json"])
def test_a_manifest_that_is_not_an_object_is_a_broken_entry(tmp_path, text):
    data = make_image_folder(tmp_path / "imgs", n_train=2, n_test=1)
    cache = tmp_path / "cache"
    assert kmfeat("data", "--data", data, cache=cache).returncode == 0
    (entry,) = Store(cache).entries("data")
    (entry.path / "manifest.json").write_text(text)
    with pytest.raises(KmfeatError, match="corrupt manifest"):
        Store(cache).get("data", entry.key)
    assert Store(cache).entries() == []
    ls = kmfeat("cache", "ls", cache=cache)
    row = next(line for line in ls.stdout.splitlines() if entry.key in line)
    assert ls.returncode == 0 and "interrupted" in row and "Traceback" not in ls.stderr
    for extra in ([], ["--force"]):  # like a garbage manifest: removed as a leftover and computed again
        (entry.path / "manifest.json").write_text(text)
        proc = kmfeat("data", "--data", data, *extra, cache=cache)
        assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
        assert isinstance(json.loads((entry.path / "manifest.json").read_text()), dict)
        assert Store(cache).get("data", entry.key).array("train_x").shape[0] == 6
        assert not list((cache / "data").glob(".*"))


def test_cache_dir_under_a_file_names_the_file(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    proc = subprocess.run([sys.executable, "-m", "kmfeat", "--cache-dir", str(f / "sub"), "cache", "ls"],
                          capture_output=True, text=True, cwd=ROOT)
    line = one_error(proc, f"--cache-dir {f / 'sub'}", f"{f} is not a folder")
    assert "manifest" not in line
