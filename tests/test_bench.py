"""The benchmark harness (python -m bench): measurement helpers and tables in-process, then the
stage table, --compare and --memory end to end with --quick settings, on the real CIFAR-10 copy
when it is present (those tests are then marked `real`) and on a tiny synthetic image folder
otherwise."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from helpers import REAL_CIFAR, make_image_folder

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.child import kmfeat_argv, run_checked  # noqa: E402
from bench.compare import Timing, relative_diff, time_round_robin  # noqa: E402
from bench.stage_table import StageResult, _link_entries, render, stage_rows  # noqa: E402
from kmfeat.errors import KmfeatError  # noqa: E402
from kmfeat.stages import ORDER  # noqa: E402

HAVE_REAL = REAL_CIFAR.exists()
ON_DATA = [pytest.mark.slow] + ([pytest.mark.real] if HAVE_REAL else [])
"""End-to-end tests on DATA: the real copy when present (marked real), else a synthetic folder."""


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("images"), n_train=12, n_test=4, size=(16, 16))


@pytest.fixture(scope="module")
def data(synthetic):
    """(path, extra bench args): the real copy, or the synthetic folder with a validation split that fits it."""
    return (REAL_CIFAR, []) if HAVE_REAL else (synthetic, ["-o", "head.val=6"])


def bench(tmp_path, *args):
    env = {**os.environ, "KMFEAT_PROGRESS": "0"}
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "bench", "--work-dir", str(tmp_path), "--out", str(out),
                           *map(str, args)], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    return proc, (json.loads(out.read_text()) if out.exists() else None)


def table_row(stdout: str, name: str) -> list[str]:
    """The cells (split on runs of 2+ spaces) of the table row starting with `name`."""
    import re

    rows = [re.split(r"\s{2,}", line.strip()) for line in stdout.splitlines() if line.startswith(name + " ")]
    assert len(rows) == 1, f"expected one row for {name} in:\n{stdout}"
    return rows[0]


# Measurement helpers.

def _child(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_run_measured_reports_the_peak_of_that_child_only():
    """Measured from a small parent, as `python -m bench` runs: on Linux a child's ru_maxrss also
    counts the RSS its parent had when it forked, so a large pytest process would inflate it."""
    script = (
        "import json, sys; from bench.child import run_measured\n"
        "big = run_measured([sys.executable, '-c', \"import time; x = b'x' * 300_000_000; time.sleep(0.4)\"])\n"
        "small = run_measured([sys.executable, '-c', 'pass'])\n"
        "print(json.dumps([[r.returncode, r.peak_rss, r.peak_anon, r.seconds] for r in (big, small)]))\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, check=True)
    (big_rc, big_rss, big_anon, big_s), (small_rc, small_rss, _, small_s) = json.loads(proc.stdout)
    assert big_rc == 0 and small_rc == 0
    assert 300e6 <= big_rss < 450e6
    assert big_anon is not None and 290e6 <= big_anon <= big_rss
    # the later, small child is not charged with the earlier one's peak (RUSAGE_CHILDREN would be)
    assert 0 < small_rss < 100e6
    assert big_s >= 0.4 and small_s > 0


def test_run_checked_turns_a_failed_child_into_one_line():
    with pytest.raises(KmfeatError, match=r"status 3: boom") as info:
        run_checked(_child("import sys; sys.stderr.write('noise\\nboom\\n\\n'); sys.exit(3)"), "bench test")
    assert "\n" not in str(info.value)


def test_kmfeat_argv_passes_every_option(tmp_path):
    argv = kmfeat_argv(tmp_path, "encode", Path("p.toml"), Path("d.tar.gz"), ["kmeans.k=64", "data.limit_train=9"],
                       force=True)
    assert argv[:4] == [sys.executable, "-m", "kmfeat", "-q"]
    assert argv[4:] == ["--cache-dir", str(tmp_path), "encode", "-p", "p.toml", "--data", "d.tar.gz",
                        "-o", "kmeans.k=64", "-o", "data.limit_train=9", "--force"]


def test_link_entries_hard_links_the_upstream_entries_only(tmp_path):
    keys = {"data": "k1", "patches": "k2", "whiten": "k3"}
    src, dst = tmp_path / "src", tmp_path / "dst"
    for stage, key in keys.items():
        (src / stage / key).mkdir(parents=True)
        np.save(src / stage / key / "a.npy", np.arange(5) * len(stage))
        (src / stage / key / "manifest.json").write_text(json.dumps({"stage": stage}))
    _link_entries(src, dst, ["data", "patches"], keys)
    for stage in ("data", "patches"):
        for name in ("a.npy", "manifest.json"):
            assert (dst / stage / keys[stage] / name).stat().st_ino == (src / stage / keys[stage] / name).stat().st_ino
        np.testing.assert_array_equal(np.load(dst / stage / keys[stage] / "a.npy"), np.arange(5) * len(stage))
    assert not (dst / "whiten").exists()


def test_stage_rows_use_medians_and_flag_unrepeated_long_stages():
    quick = StageResult("data", work=1200, wall=[3.0, 1.0, 2.0], seconds=[2.5, 0.5, 1.5],
                        rss=[200_000_000, 250_000_000, 210_000_000], device="cpu, 2 threads")
    long = StageResult("encode", work=3000, wall=[400.0], seconds=[390.0], rss=[900_000_000], long=True,
                       device="cpu, 2 threads")
    rows, notes = stage_rows([quick, long], 1200, 300, repeats=3)
    assert [r[0] for r in rows] == ["data", "encode", "total"]
    assert rows[0][2] == "2.00 (3.00 1.00 2.00)" and rows[0][3] == "1.50"
    assert rows[0][4] == f"{1200 / 1.5:,.0f} images" and rows[0][5] == "250"
    assert rows[1][2].endswith("*") and any("not repeated" in n for n in notes)
    assert rows[2][2] == "402.0" and rows[2][3] == "391.5" and rows[2][5] == "900"
    md = render([quick, long], 1200, 300, repeats=3, markdown=True).splitlines()
    assert md[0].startswith("| stage |") and md[1].startswith("| --- |") and len([x for x in md if x.startswith("| ")]) == 5
    for results, repeats in [([quick], 3), ([quick, long], 1)]:
        rows, notes = stage_rows(results, 1200, 300, repeats)
        assert not any("not repeated" in n for n in notes) and not any(r[2].endswith("*") for r in rows)


def test_relative_diff_matches_a_float64_reference():
    rng = np.random.default_rng(0)
    b = rng.normal(size=(7, 40)).astype(np.float32)
    a = b + rng.normal(scale=1e-3, size=b.shape).astype(np.float32)
    expected = np.abs(a.astype(np.float64) - b).max() / np.abs(b.astype(np.float64)).max()
    assert relative_diff(a, b) == pytest.approx(expected, rel=1e-12)
    assert relative_diff(b, b) == 0.0
    a[3, 5] = np.nan
    assert relative_diff(a, b) == float("inf")
    assert relative_diff(b[:6], b) == float("inf")


@pytest.mark.parametrize("args, message", [
    (["--stages", "data,bogus"], "Error: --stages"),
    (["--variants", "fast"], "Error: --variants"),
    (["--repeats", "0"], "Error: --repeats: got 0"),
    (["--compare", "--memory"], "Error: --compare, --kmeans and --memory"),
    (["--kmeans", "--compare"], "Error: --compare, --kmeans and --memory"),
    (["--kmeans", "--kmeans-variants", "faiss,sklearn"], "Error: --kmeans-variants"),
    (["--data", "/nonexistent/cifar.tar.gz"], "Error: --data: /nonexistent/cifar.tar.gz not found"),
])
def test_user_mistakes_end_in_one_error_line(tmp_path, args, message):
    proc, _ = bench(tmp_path, *args)
    assert proc.returncode == 2
    assert proc.stderr.startswith(message) and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr


# End to end (--quick).

@pytest.mark.parametrize("_", [pytest.param(None, marks=ON_DATA)])
def test_stage_table_has_a_measured_row_per_stage(tmp_path, data, _):
    path, extra = data
    proc, result = bench(tmp_path, "--quick", "--repeats", "1", "--data", path, *extra)
    assert proc.returncode == 0, proc.stderr
    assert [s["stage"] for s in result["stages"]] == ORDER
    for s in result["stages"]:
        assert len(s["wall"]) == len(s["seconds"]) == len(s["rss"]) == 1
        assert s["wall"][0] > s["seconds"][0] > 0 and s["rss"][0] > 50e6 and s["work"] > 0
        cells = table_row(proc.stdout, s["stage"])
        assert float(cells[2].split()[0]) > 0 and float(cells[3]) > 0 and float(cells[5].replace(",", "")) > 0
        assert cells[6].startswith(("cpu", "cuda", "faiss", "torch"))
    by = {s["stage"]: s for s in result["stages"]}
    n_train, n_test = (1000, 200) if HAVE_REAL else (36, 12)
    assert by["data"]["work"] == n_train + n_test == result["total_images"]
    assert by["patches"]["work"] == 20000 and by["patches"]["unit"] == "patches"
    assert by["encode"]["work"] == 2 * (n_train + n_test)  # pipelines/cifar10.toml adds flipped train and test images
    total = table_row(proc.stdout, "total")
    assert float(total[2]) == pytest.approx(sum(s["median_wall"] for s in result["stages"]), abs=0.1)
    assert not list(tmp_path.glob("bench-cache-*")), "temporary caches left behind"


@pytest.mark.slow
def test_repeats_prepare_inputs_untimed_and_time_each_run_afresh(tmp_path, synthetic):
    proc, result = bench(tmp_path, "--quick", "--repeats", "3", "--stages", "patches", "--data", synthetic,
                         "--markdown")
    assert proc.returncode == 0, proc.stderr
    (patches,) = result["stages"]
    assert patches["stage"] == "patches" and len(patches["wall"]) == len(patches["seconds"]) == 3
    assert all(w > s > 0 for w, s in zip(patches["wall"], patches["seconds"])) and min(patches["rss"]) > 20e6
    assert patches["median_wall"] == pytest.approx(float(np.median(patches["wall"])))
    # data is prepared once, untimed; runs 2 and 3 get it hard-linked into fresh caches
    assert proc.stderr.count("preparing inputs up to data (untimed)") == 1
    assert proc.stderr.count(": patches took ") == 3
    assert proc.stdout.count("| patches |") == 1 and "| data |" not in proc.stdout
    assert "- Machine: " in proc.stdout and "- Command: `python -m bench " in proc.stdout
    assert not list(tmp_path.glob("bench-cache-*")), "temporary caches left behind"


@pytest.mark.parametrize("_", [pytest.param(None, marks=ON_DATA)])
def test_compare_prints_speedup_and_a_match_within_tolerance(tmp_path, data, _):
    path, _extra = data
    proc, result = bench(tmp_path, "--compare", "--quick", "--repeats", "1", "--data", path)
    assert proc.returncode == 0, proc.stderr
    assert result["k"] == 64 and result["images"] == (100 if HAVE_REAL else 36)
    names = [t["name"] for t in result["timings"]]
    assert names[0] == "naive numpy" and len(names) == 3
    for t in result["timings"][1:]:
        assert t["rel_diff"] <= 1e-4 and t["warmup"] > 0 and t["median"] > 0 and t["gflops"] > 0
        assert f"speed-up {t['name']}: {t['speedup']:.2f}x" in proc.stdout
        assert f"match {t['name']}: max|a-b|/max|b| = {t['rel_diff']:.2e} (<= 0.0001: ok)" in proc.stdout
    naive = result["timings"][0]
    assert result["timings"][1]["speedup"] == pytest.approx(naive["median"] / result["timings"][1]["median"])
    peaks = result["peak_gflops"]
    assert peaks["fp32"] > 0 and peaks["bf16"] > 0 and "roof: this machine's matmul" in proc.stdout
    compiled = result["timings"][1]
    assert f"{compiled['gflops'] / peaks['fp32']:.0%}" in table_row(proc.stdout, compiled["name"])


@pytest.mark.parametrize("_", [pytest.param(None, marks=ON_DATA)])
def test_kmeans_compare_times_each_variant_on_the_same_patches(tmp_path, data, _):
    path, _extra = data
    proc, result = bench(tmp_path, "--kmeans", "--quick", "--repeats", "2", "--data", path,
                         "--kmeans-variants", "torch,torch-bf16", "-o", "patches.n=3000")
    assert proc.returncode == 0, proc.stderr
    assert result["mode"] == "kmeans" and result["k"] == 64 and result["patches"] == 3000 and result["d"] == 108
    fp32, bf16 = result["variants"]
    assert (fp32["name"], fp32["precision"], bf16["name"], bf16["precision"]) == ("torch", "fp32", "torch-bf16", "bf16")
    for v in (fp32, bf16):
        assert len(v["runs"]) == 2 and v["median"] == pytest.approx(sorted(v["runs"])[0] / 2 + sorted(v["runs"])[1] / 2)
        assert v["iters"] == 3 and v["inertia"] > 0
        assert v["speedup"] == pytest.approx(fp32["median"] / v["median"])
    assert bf16["inertia_rel"] == pytest.approx((bf16["inertia"] - fp32["inertia"]) / fp32["inertia"])
    assert abs(bf16["inertia_rel"]) < 0.005 and fp32["inertia_rel"] == 0
    assert f"torch-bf16 against torch: {bf16['speedup']:.2f}x, inertia {bf16['inertia_rel']:+.3%} (within 0.5%)" \
        in proc.stdout


def test_matmul_peak_is_the_flops_of_its_shape_over_the_best_time(monkeypatch):
    import bench.compare as compare

    clock = iter(float(i) for i in range(1000))  # every timed call "takes" exactly 1 s
    monkeypatch.setattr(compare.time, "perf_counter", lambda: next(clock))
    for dtype in ("fp32", "bf16"):
        rows = compare.peak_rows(40, "cpu")
        assert compare.matmul_peak(27, 40, "cpu", dtype) == pytest.approx(2 * compare.PEAK_CALLS * rows * 27 * 40 / 1e9)


@pytest.mark.slow
def test_memory_reports_peak_rss_of_encode(tmp_path, synthetic):
    proc, result = bench(tmp_path, "--memory-k", "32", "--quick", "--data", synthetic)
    assert proc.returncode == 0, proc.stderr
    (run,) = result["runs"]
    assert run["images"] == 36 + 12 and run["peak_rss"] > 50e6 and run["seconds"] > 0
    assert table_row(proc.stdout, "limits 1000 + 200, k=32")[1] == "48"
    assert "(target < 3 GB: ok)" in proc.stdout


@pytest.mark.slow
@pytest.mark.parametrize("budget", [None, "0"])
def test_memory_train_reports_peak_rss_of_train_on_a_synthetic_entry(tmp_path, budget):
    extra = [] if budget is None else ["--ram-budget", budget]
    proc = subprocess.run(
        [sys.executable, "-m", "bench.memory_train", "--k", "16", "--train", "300", "--test", "60",
         "-o", "head.val=30", "-o", "head.hidden=8", "--work-dir", str(tmp_path), "--out", str(tmp_path / "r.json"),
         *extra], cwd=ROOT, capture_output=True, text=True, env={**os.environ, "KMFEAT_PROGRESS": "0"})
    assert proc.returncode == 0, proc.stderr
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["n_fit"] == 2 * 270 and result["n_features"] == 64 and result["rows"] == 660
    assert result["streamed"] is (budget == "0") and result["peak_rss"] > 50e6
    assert 0 <= result["test_accuracy"] <= 1 and "head.epochs=1" in result["overrides"]
    assert "peak RSS " in proc.stdout and "target is for k=8000 with flips" in proc.stdout
    assert not list(tmp_path.glob("bench-memory-train-*")), "temporary cache left behind"


def test_data_memory_reports_peak_rss_of_kmfeat_data_per_folder_size(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "bench.data_memory", "--counts", "60,120", "--size", "8",
                           "--work-dir", str(tmp_path), "--out", str(tmp_path / "r.json")],
                          cwd=ROOT, capture_output=True, text=True, env={**os.environ, "KMFEAT_PROGRESS": "0"})
    assert proc.returncode == 0, proc.stderr
    runs = json.loads((tmp_path / "r.json").read_text())["results"]
    assert [r["images"] for r in runs] == [60, 120] and all(r["peak_rss"] > 30e6 and r["wall"] > 0 for r in runs)
    assert len(list((tmp_path / "folder-120-8").rglob("*.png"))) == 120
    assert "peak RSS grows" in proc.stdout and not list(tmp_path.glob("cache-*")), "temporary cache left behind"


@pytest.mark.slow
def test_kmfeat_data_peak_rss_does_not_grow_with_the_number_of_images(tmp_path):
    """Issue 14: 100,000 images within 300 MB of 10,000 (the data stage decodes into memory maps)."""
    proc = subprocess.run([sys.executable, "-m", "bench.data_memory", "--work-dir", str(tmp_path),
                           "--out", str(tmp_path / "r.json")],
                          cwd=ROOT, capture_output=True, text=True, env={**os.environ, "KMFEAT_PROGRESS": "0"})
    assert proc.returncode == 0, proc.stderr
    small, large = json.loads((tmp_path / "r.json").read_text())["results"]
    assert large["images"] == 100_000 and large["peak_rss"] - small["peak_rss"] <= 300e6


@pytest.mark.parametrize("_", [pytest.param(None, marks=ON_DATA)])
def test_compare_bf16_variants_are_held_to_the_bf16_tolerance(tmp_path, data, _):
    path, _extra = data
    proc, result = bench(tmp_path, "--compare", "--quick", "--repeats", "1", "--data", path,
                         "--variants", "eager,eager-bf16")
    assert proc.returncode == 0, proc.stderr
    fp32, bf16 = result["timings"][1:]
    assert fp32["tolerance"] == 1e-4 and bf16["tolerance"] == 2e-2
    assert 0 < bf16["rel_diff"] <= 2e-2 and fp32["rel_diff"] <= 1e-4
    assert f"match kmfeat eager-bf16: max|a-b|/max|b| = {bf16['rel_diff']:.2e} (<= 0.02: ok)" in proc.stdout


def test_compare_times_the_variants_round_robin():
    """One run of every variant per round, so that a slow spell of a shared machine hits them alike; each
    Timing gets one run per round and the outputs are the last round's."""
    calls = []

    def runner(name):
        return Timing(name), lambda: calls.append(name) or f"{name}{len(calls)}"

    runners = [runner("a"), runner("b"), runner("c")]
    outs = time_round_robin(runners, 3)
    assert calls == ["a", "b", "c"] * 3
    assert outs == ["a7", "b8", "c9"]
    assert all(len(t.runs) == 3 and min(t.runs) >= 0 for t, _ in runners)
