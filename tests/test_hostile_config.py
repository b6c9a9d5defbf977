"""Hostile settings (issue 11, items 6, 7 and 11): negative seeds, NaN / inf floats, impossible head
settings, k above patches.n and sizes that cannot fit in memory are refused by config validation,
before the first stage runs: exit 2, one `Error:` line naming the parameter, no traceback, and
nothing in the cache.
"""
import dataclasses
import os
import subprocess
import sys
import typing
from pathlib import Path

import numpy as np
import pytest

from helpers import make_image_folder
from kmfeat import config
from kmfeat.cache import Store
from kmfeat.errors import KmfeatError

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = [f.name for f in dataclasses.fields(config.PipelineConfig) if f.name != "name"]


def fields_of_type(tp) -> list[str]:
    """'section.key' of every field annotated `tp` in every section."""
    out = []
    for section in SECTIONS:
        cls = typing.get_type_hints(config.PipelineConfig)[section]
        hints = typing.get_type_hints(cls)
        out += [f"{section}.{f.name}" for f in dataclasses.fields(cls) if hints[f.name] is tp]
    return out


SEEDS = [key for key in fields_of_type(int) if key.rsplit(".", 1)[1] == "seed"]
FLOATS = fields_of_type(float)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Two images: one class, 1 train + 1 test."""
    return make_image_folder(tmp_path_factory.mktemp("tiny") / "imgs", classes=("a",), n_train=1, n_test=1)


def kmfeat_patches(cache: Path, data: Path, *overrides: str, env=None):
    args = [sys.executable, "-m", "kmfeat", "-q", "--cache-dir", str(cache), "patches", "--data", str(data),
            "-o", 'data.source="imagefolder"']
    for o in overrides:
        args += ["-o", o]
    full_env = {**os.environ, "KMFEAT_PROGRESS": "0", "KMFEAT_COMPILE": "0"}
    full_env.pop("KMFEAT_MEMORY_AVAILABLE", None)  # the machine's own figure unless a case pins one
    full_env.update(env or {})
    return subprocess.run(args, capture_output=True, text=True, env=full_env, cwd=ROOT, timeout=120)


BIG_N = "100000000000"
HUGE_N = "99999999999999999999999"

CLI_CASES = [
    # 6: seeds
    *[(f"{key}=-1", [f"{key}: got -1, expected an integer in 0..2147483647"], None) for key in
      ("data.seed", "patches.seed", "kmeans.seed", "head.seed")],
    ("kmeans.seed=2147483648", ["kmeans.seed: got 2147483648"], None),
    # 7: sizes
    (f"patches.n={BIG_N}", ["patches.n: 100,000,000,000 patches of 6x6x3 need 86.4 TB",
                            "two float32 copies of 43.2 TB", "available; lower patches.n"], None),
    (f"patches.n={HUGE_N}", ["patches.n: 99,999,999,999,999,999,999,999 patches of 6x6x3 need 86.4 YB",
                             "available; lower patches.n"], None),
    # the available memory is pinned so that no machine goes on to allocate 2 x 30 GB images
    ("data.resize=[100000, 100000]", ["data.resize: 2 images", "of 100000x100000 need 100.0 GB",
                                      "KMFEAT_MEMORY_AVAILABLE allows 17.2 GB; lower data.resize"],
     {"KMFEAT_MEMORY_AVAILABLE": "16G"}),
    ("patches.rf=40", ["patches.n: 400,000 patches of 40x40x3 need 15.4 GB"], {"KMFEAT_MEMORY_AVAILABLE": "8G"}),
    # 11: floats that must be finite
    ("patches.norm_eps=nan", ["patches.norm_eps: got nan, expected a finite number"], None),
    ("whiten.eps=inf", ["whiten.eps: got inf, expected a finite number"], None),
    ("encode.alpha=nan", ["encode.alpha: got nan"], None),
    ("encode.q=inf", ["encode.q: got inf"], None),
    ("head.lr=nan", ["head.lr: got nan"], None),
    ("head.weight_decay=inf", ["head.weight_decay: got inf"], None),
    ("head.power=inf", ["head.power: got inf"], None),
    ("head.label_smoothing=nan", ["head.label_smoothing: got nan"], None),
    ("head.params={C=nan}", ["head.params.C: got nan"], None),
    # 11: impossible head settings and k
    ("head.lr=-1", ["head.lr: got -1.0, expected > 0"], None),
    ("head.lr=0", ["head.lr: got 0.0, expected > 0"], None),
    ("head.epochs=0", ["head.epochs: got 0, expected >= 1"], None),
    ("head.batch=0", ["head.batch: got 0, expected >= 1"], None),
    ("head.hidden=0", ["head.hidden: got 0, expected >= 1"], None),
    ("head.patience=-1", ["head.patience: got -1, expected >= 1"], None),
    ("head.weight_decay=-0.1", ["head.weight_decay: got -0.1, expected >= 0"], None),
    ("head.label_smoothing=1", ["head.label_smoothing: got 1.0, expected 0 <= label_smoothing < 1"], None),
    ("kmeans.k=1000000000", ["kmeans.k: 1,000,000,000 clusters but only 400,000 patches (patches.n)"], None),
    ("kmeans.iters=99999999999", ["kmeans.iters: got 99999999999"], None),
]


@pytest.mark.parametrize("override,expected,env", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_refused_before_the_data_stage(tmp_path, tiny, override, expected, env):
    cache = tmp_path / "cache"
    proc = kmfeat_patches(cache, tiny, override, env=env)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(lines) == 1 and lines[0].startswith("Error: "), proc.stderr
    for text in expected:
        assert text in lines[0], lines[0]
    assert not cache.exists() or (Store(cache).entries() == [] and Store(cache).leftovers() == [])


def test_the_same_command_runs_with_sane_values(tmp_path, tiny):
    """The CLI cases above fail because of their override, not because of the command."""
    cache = tmp_path / "cache"
    proc = kmfeat_patches(cache, tiny, "patches.n=64", "data.seed=7", "head.lr=0.01", "kmeans.k=64")
    assert proc.returncode == 0, proc.stderr
    assert {e.stage for e in Store(cache).entries()} == {"data", "patches"}


# ---------------------------------------------------------------- every field of every section

def test_the_sections_have_the_seeds_and_floats_of_the_issue():
    assert {"data.seed", "patches.seed", "kmeans.seed", "head.seed"} <= set(SEEDS)
    assert {"patches.norm_eps", "whiten.eps", "encode.alpha", "encode.q", "head.lr", "head.weight_decay",
            "head.dropout", "head.input_dropout", "head.power", "head.label_smoothing"} <= set(FLOATS)


@pytest.mark.parametrize("key", SEEDS)
def test_every_seed_is_checked(key):
    for bad in (-1, -(2**40), 2**31):
        with pytest.raises(KmfeatError, match=rf"^{key}: got {bad}, expected an integer in 0\.\.2147483647$"):
            config.load(None, [f"{key}={bad}"])
    for good in (0, 2**31 - 1):
        section, name = key.split(".")
        assert getattr(getattr(config.load(None, [f"{key}={good}"]), section), name) == good


@pytest.mark.parametrize("key", FLOATS)
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_every_float_must_be_finite(key, value):
    with pytest.raises(KmfeatError, match=rf"^{key}: got {value}, expected a finite number$"):
        config.load(None, [f"{key}={value}"])


@pytest.mark.parametrize("kind", ["mlp", "svm", "ridge", "sklearn"])
@pytest.mark.parametrize("override,match", [
    ("head.lr=-1", "head.lr"), ("head.lr=0", "head.lr"), ("head.epochs=0", "head.epochs"),
    ("head.batch=0", "head.batch"), ("head.hidden=0", "head.hidden"), ("head.patience=-1", "head.patience"),
    ("head.patience=0", "head.patience"), ("head.weight_decay=-1e-9", "head.weight_decay"),
    ("head.label_smoothing=1.0", "head.label_smoothing"), ("head.label_smoothing=-0.1", "head.label_smoothing"),
    ("head.epochs=99999999999999999999", "head.epochs: got 99999999999999999999, expected an integer below 2"),
])
def test_head_settings_are_checked_whatever_the_kind(kind, override, match):
    with pytest.raises(KmfeatError, match=f"^{match}"):
        config.load(None, [f"head.kind={kind}", override])


def test_boundary_values_still_load():
    cfg = config.load(None, ["head.weight_decay=0", "head.label_smoothing=0.99", "head.patience=1", "head.lr=1e-9",
                             "patches.n=1000", "kmeans.k=1000", "kmeans.iters=2147483647",
                             "encode.kind=knn", "encode.q=1000", "head.grid={C=[0.1, 1e9]}"])
    assert (cfg.kmeans.k, cfg.patches.n, cfg.head.label_smoothing) == (1000, 1000, 0.99)


def test_k_above_patches_n_and_knn_q_above_k():
    with pytest.raises(KmfeatError, match=r"^kmeans\.k: 1,001 clusters but only 1,000 patches \(patches\.n\)"):
        config.load(None, ["patches.n=1000", "kmeans.k=1001"])
    with pytest.raises(KmfeatError, match=r"^encode\.q: got 17, .* up to kmeans\.k = 16"):
        config.load(None, ["kmeans.k=16", "encode.kind=knn", "encode.q=17"])
    with pytest.raises(KmfeatError, match=r"^head\.grid\.C\[1\]: got nan"):
        config.load(None, ["head.kind=svm", "head.grid={C=[1.0, nan]}"])


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "pipelines").glob("*.toml")))
def test_shipped_pipelines_pass_the_memory_checks_on_a_small_machine(monkeypatch, name):
    monkeypatch.setenv("KMFEAT_MEMORY_AVAILABLE", "2G")
    config.load(ROOT / "pipelines" / name)


# ---------------------------------------------------------------- memory estimates

def test_patch_estimate_is_what_the_patches_stage_allocates():
    """Two float32 (n, rf*rf*3) arrays are alive while normalizing: the sample and its normalized copy."""
    from kmfeat.memory import patches_bytes
    from kmfeat.patches import normalize_patches, sample_patches

    images = np.random.default_rng(0).integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    sample = sample_patches(images, rf=5, n=1000, seed=0)
    normalized = normalize_patches(sample)
    assert patches_bytes(1000, 5) == sample.nbytes + normalized.nbytes


def test_available_memory_reads_meminfo_and_the_cgroup_limit(tmp_path, monkeypatch):
    from kmfeat import memory

    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:  9000 kB\nMemFree:  10 kB\nMemAvailable:  2000 kB\nSwapFree:  48 kB\n")
    assert memory._meminfo(meminfo) == 2048 * 1024
    meminfo.write_text("MemTotal:  9000 kB\n")
    assert memory._meminfo(meminfo) is None
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "memory.max").write_text("1000000\n")
    (v2 / "memory.current").write_text("600000\n")
    (v2 / "memory.stat").write_text("anon 500000\ninactive_file 50000\n")
    assert memory._cgroup_headroom(v2) == 450000
    (v2 / "memory.max").write_text("max\n")
    assert memory._cgroup_headroom(v2) is None
    v1 = tmp_path / "v1" / "memory"
    v1.mkdir(parents=True)
    (v1 / "memory.limit_in_bytes").write_text("9223372036854771712\n")
    (v1 / "memory.usage_in_bytes").write_text("5\n")
    assert memory._cgroup_headroom(tmp_path / "v1") is None
    (v1 / "memory.limit_in_bytes").write_text("100\n")
    assert memory._cgroup_headroom(tmp_path / "v1") == 95

    monkeypatch.delenv(memory.ENV, raising=False)
    real = memory.available_memory()
    if Path("/proc/meminfo").exists():
        assert real is not None and 0 < real <= memory._meminfo()
    monkeypatch.setenv(memory.ENV, "1.5G")
    assert memory.available_memory() == 3 * 2**29
    monkeypatch.setenv(memory.ENV, "lots")
    with pytest.raises(KmfeatError, match="^KMFEAT_MEMORY_AVAILABLE: got 'lots'"):
        memory.available_memory()


def test_check_images_for_the_data_stage(monkeypatch):
    """What the data stage calls once it knows the image count: the uint8 array plus one Pillow image."""
    from kmfeat import memory

    monkeypatch.setenv(memory.ENV, "1G")
    memory.check_images(1000, [32, 32])
    memory.check_images(1000, [])
    with pytest.raises(KmfeatError, match=r"^data\.resize: 60,000 images of 224x224 need 9.0 GB \(9.0 GB in uint8 "
                                          r"RGB plus 200.7 KB .*\), KMFEAT_MEMORY_AVAILABLE allows 1.1 GB; "
                                          r"lower data\.resize$"):
        memory.check_images(60_000, (224, 224))
    assert memory.images_bytes(2, 10, 20) == 2 * 10 * 20 * 3 + 10 * 20 * 4


def test_human_bytes():
    from kmfeat.memory import human_bytes

    assert [human_bytes(n) for n in (0, 999, 1000, 43_200_000_000_000, 8.64e25, 8.64e28)] == \
        ["0 B", "999 B", "1.0 KB", "43.2 TB", "86.4 YB", "86,400.0 YB"]


def test_in_ram_loading_checks_the_memory_of_the_images_it_found_and_the_data_stage_needs_none(tmp_path,
                                                                                               monkeypatch):
    """The config can only assume the smallest dataset (2 images); the in-RAM loader checks the real count
    before allocating: 48 images of 300x300 pass the config check under 1 MiB, then fail there. The data
    stage decodes into memory-mapped files instead (issue 14), so it runs under the same budget."""
    from kmfeat.data import load_dataset

    cache, data = tmp_path / "cache", make_image_folder(tmp_path / "imgs")
    monkeypatch.setenv("KMFEAT_MEMORY_AVAILABLE", "1M")
    with pytest.raises(KmfeatError, match=r"^data.resize: 48 images .*lower data.resize"):
        load_dataset("imagefolder", str(data), resize=(300, 300))
    proc = kmfeat_patches(cache, data, "data.resize=[300, 300]", "patches.n=100", "kmeans.k=8",
                          env={"KMFEAT_MEMORY_AVAILABLE": "1M"})
    assert proc.returncode == 0, proc.stderr
    (entry,) = Store(cache).entries("data")
    assert entry.array("train_x").shape == (36, 300, 300, 3)
