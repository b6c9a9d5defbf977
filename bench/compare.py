"""kmfeat's Encoder against the naive numpy baseline, in one process, on the same real images
and the same whitening and centroids (fitted quickly: their quality does not matter for timing,
only k and d do). Each Encoder variant gets one warm-up call on a few images first, so that the
torch.compile / oneDNN set-up is reported apart from the timed runs. The timed runs go round-robin (one
run of every variant per round), so that a shared VM's slow spells fall on all variants alike.
"""
from __future__ import annotations

import os
import statistics
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np

from kmfeat.config import PipelineConfig
from kmfeat.progress import say

from .naive_encoder import naive_numpy_encode
from .table import fmt_count, fmt_seconds, markdown_table, text_table

VARIANTS = {"compiled": ("1", "fp32"), "eager": ("0", "fp32"), "compiled-bf16": ("1", "bf16"),
            "eager-bf16": ("0", "bf16")}
"""Encoder variants: the KMFEAT_COMPILE value and the encode.precision of each."""
TOLERANCE = 1e-4
TARGET_SPEEDUP = 6.0
"""Target speed-up of the Encoder over the naive baseline (2 CPU cores, k=1600)."""
WARMUP_IMAGES = 8
DICTIONARY_ITERS = 2
PEAK_CALLS = 40
"""Products per timed roofline run (each the size of one encoder block), so a run lasts tens of ms."""
PEAK_REPEATS = 5


def peak_rows(k: int, device: str) -> int:
    """Rows of one encoder block (kmfeat.encode.BLOCK_ELEMENTS positions x codes): the product the roof times."""
    from kmfeat.encode import BLOCK_ELEMENTS

    return max(1, BLOCK_ELEMENTS[device] // k)


def matmul_peak(d: int, k: int, device: str, dtype: str) -> float:
    """This machine's GFLOP/s for the encoder's matmul shape class, (rows x d) @ (d x k) with the rows of one
    encoder block, in `dtype` ("fp32" or "bf16": bfloat16 inputs, float32 accumulation inside the kernel):
    the best of torch.mm and oneDNN's prepacked linear (CPU) among those whose result agrees with float64 to
    that precision (a library may run "fp32" through bf16), PEAK_CALLS products per timed run, best of
    PEAK_REPEATS runs after a warm-up. The roof each encoder is put against; bf16 is the floor a bfloat16
    encoder could reach (issue 16)."""
    import torch

    from kmfeat.linear import _onednn_available

    rows = peak_rows(k, device)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, d, generator=g).to(device)
    w = torch.randn(k, d, generator=g).to(device)
    b = torch.zeros(k, device=device)
    if dtype == "bf16":
        x, w, b = x.bfloat16(), w.bfloat16(), b.bfloat16()
    calls = [lambda: torch.mm(x, w.t())]
    if device == "cpu" and _onednn_available():
        packed = torch.ops.mkldnn._reorder_linear_weight(w)
        calls.append(lambda: torch.ops.mkldnn._linear_pointwise(x, packed, b, "none", [], ""))
    from kmfeat.linear import BF16_RTOL

    exact = x.double() @ w.double().t()
    rtol = BF16_RTOL if dtype == "bf16" else 1e-5
    scale = float((x.double().abs() @ w.double().abs().t()).max())
    calls = [c for c in calls if float((c().double() - exact).abs().max()) <= rtol * scale]  # no silent bf16 "fp32"
    best = float("inf")
    for call in calls:
        call()
        for _ in range(PEAK_REPEATS):
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(PEAK_CALLS):
                call()
            if device == "cuda":
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - start)
    return 2.0 * PEAK_CALLS * rows * d * k / best / 1e9


@dataclass
class Timing:
    """Timed runs of one encoder on the N images; rel_diff is max|a-b| / max|b| against the baseline."""
    name: str
    runs: list[float] = field(default_factory=list)
    warmup: float | None = None
    rel_diff: float | None = None

    @property
    def median(self) -> float:
        return statistics.median(self.runs)


def load_images(cfg: PipelineConfig, n: int) -> np.ndarray:
    """The first n training images (a class-balanced subset, as data.limit_train picks) of the pipeline's data."""
    from kmfeat.data import load_dataset

    d = cfg.data
    ds = load_dataset(d.source, d.path or None, resize=tuple(d.resize) or None, limit_train=n, limit_test=1,
                      seed=d.seed)
    return np.ascontiguousarray(ds.train_x)


def fit_dictionary(images: np.ndarray, cfg: PipelineConfig, k: int, seed: int = 0):
    """(centroids, whitening mean, whitening matrix) from a quick patches -> Whitener -> KMeans fit."""
    from kmfeat.kmeans import KMeans
    from kmfeat.patches import normalize_patches, sample_patches
    from kmfeat.whiten import Whitener

    p = cfg.patches
    patches = normalize_patches(sample_patches(images, rf=p.rf, n=max(20_000, 10 * k), seed=seed), eps=p.norm_eps)
    whitener = Whitener(method=cfg.whiten.method, eps=cfg.whiten.eps).fit(patches)
    km = KMeans(k=k, iters=DICTIONARY_ITERS, seed=seed, backend=cfg.kmeans.backend,
                device=cfg.kmeans.device).fit(whitener.transform(patches))
    return km.centroids_, whitener.mean_, whitener.W_


@contextmanager
def _env(name: str, value: str):
    before = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before


def relative_diff(a: np.ndarray, b: np.ndarray) -> float:
    """max |a - b| / max |b| in float64 (inf when a has NaN/inf or the shapes differ)."""
    if a.shape != b.shape or not np.isfinite(a).all():
        return float("inf")
    a, b = a.astype(np.float64), b.astype(np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), np.finfo(np.float64).tiny))


def _encoder_settings(cfg: PipelineConfig) -> dict:
    e = cfg.encode
    return dict(rf=cfg.patches.rf, stride=e.stride, kind=e.kind, alpha=e.alpha, grid=cfg.pool.grid,
                norm_eps=cfg.patches.norm_eps, split=e.split)


def encoder_runner(images, dictionary, cfg: PipelineConfig, variant: str):
    """(Timing with its warm-up, a callable that encodes the images once) for kmfeat's Encoder with
    KMFEAT_COMPILE set for `variant` while it runs."""
    from kmfeat.encode import Encoder

    compile_flag, precision = VARIANTS[variant]
    with _env("KMFEAT_COMPILE", compile_flag):
        encoder = Encoder(*dictionary, **_encoder_settings(cfg), device=cfg.encode.device,
                          batch=cfg.encode.batch or None, precision=precision)
        timing = Timing(f"kmfeat {variant}")
        start = time.perf_counter()
        encoder.transform(images[:WARMUP_IMAGES])
        timing.warmup = time.perf_counter() - start
    if compile_flag == "1" and not encoder.compiled_once_:  # the warm-up compiles (fixed block shapes after it)
        timing.name += " (compile failed: eager)"

    def run():
        with _env("KMFEAT_COMPILE", compile_flag):
            return encoder.transform(images)
    return timing, run


def time_round_robin(runners, repeats: int) -> list:
    """Time each (Timing, run) once per round, `repeats` rounds, so that a shared machine's slow spells fall
    on every variant alike; the outputs of the last round."""
    outs = []
    for r in range(repeats):
        outs = []
        for timing, run in runners:
            start = time.perf_counter()
            outs.append(run())
            timing.runs.append(time.perf_counter() - start)
            say(f"bench: {timing.name} run {r + 1}/{repeats}: {timing.runs[-1]:.2f} s")
    return outs


def run_compare(cfg: PipelineConfig, n_images: int, k: int, repeats: int, variants: list[str]) -> dict:
    """Time the baseline and each Encoder variant on the same images; a JSON-able result."""
    import torch

    from kmfeat.threads import configure_threads

    threads = configure_threads()
    say(f"bench: loading {n_images:,} images ...")
    images = load_images(cfg, n_images)
    say(f"bench: fitting whitening + k={k} centroids ({DICTIONARY_ITERS} k-means iterations) ...")
    dictionary = fit_dictionary(images, cfg, k)
    N, H, W, C = images.shape
    rf, stride = cfg.patches.rf, cfg.encode.stride
    positions = ((H - rf) // stride + 1) * ((W - rf) // stride + 1)
    d = dictionary[0].shape[1]
    flop = 2.0 * N * positions * k * d
    settings = _encoder_settings(cfg)
    runners = [(Timing("naive numpy"), lambda: naive_numpy_encode(images, *dictionary, **settings))]
    runners += [encoder_runner(images, dictionary, cfg, variant) for variant in variants]
    reference, *outs = time_round_robin(runners, repeats)
    timings = [timing for timing, _ in runners]
    for timing, out in zip(timings[1:], outs):
        timing.rel_diff = relative_diff(out, reference)
    naive = timings[0]
    device = "cuda" if cfg.encode.device != "cpu" and torch.cuda.is_available() else "cpu"
    say("bench: the matmul roof of this shape class (fp32, bf16) ...")
    peaks = {p: matmul_peak(d, k, device, p) for p in ("fp32", "bf16")}
    return {
        "images": N, "image_shape": [H, W, C], "k": k, "d": d, "positions": positions,
        "kind": cfg.encode.kind + (" split" if cfg.encode.split else ""),
        "flop": flop, "threads": threads, "device": device, "tolerance": TOLERANCE, "peak_gflops": peaks,
        "timings": [{"name": t.name, "runs": t.runs, "median": t.median, "warmup": t.warmup,
                     "images_per_s": N / t.median, "gflops": flop / t.median / 1e9,
                     "speedup": naive.median / t.median, "rel_diff": t.rel_diff,
                     "tolerance": tolerance(t.name)} for t in timings],
    }


def render_compare(result: dict, markdown: bool) -> str:
    """The comparison table, then one speed-up and one match line per Encoder variant."""
    header = ["encoder", "warm-up s", "seconds, median (runs)", "images/s", "GFLOP/s", "of fp32 roof", "speed-up",
              "max rel diff"]
    peaks = result.get("peak_gflops") or {}
    rows = []
    for t in result["timings"]:
        runs = " ".join(fmt_seconds(s) for s in t["runs"])
        roof = f"{t['gflops'] / peaks['fp32']:.0%}" if peaks.get("fp32") else "-"
        rows.append([t["name"], "-" if t["warmup"] is None else fmt_seconds(t["warmup"]),
                     f"{fmt_seconds(t['median'])} ({runs})", fmt_count(t["images_per_s"]), f"{t['gflops']:.1f}",
                     roof, f"{t['speedup']:.2f}x", "-" if t["rel_diff"] is None else f"{t['rel_diff']:.1e}"])
    H, W, C = result["image_shape"]
    title = (f"{result['images']:,} images {H}x{W}x{C}, k={result['k']}, d={result['d']}, "
             f"{result['positions']} positions, {result['kind']}; {result['device']}, {result['threads']} threads; "
             f"GFLOP/s counts the distance matmul (2*N*positions*k*d = {result['flop'] / 1e9:,.0f} GFLOP)")
    right = set(range(1, len(header)))
    table = markdown_table(header, rows, right) if markdown else text_table(header, rows, right)
    lines = [title, "", table, ""]
    if peaks:
        lines.append(f"{'- ' if markdown else ''}roof: this machine's matmul of the same shape class "
                     f"({peak_rows(result['k'], result['device']):,} x {result['d']} @ {result['d']} x {result['k']}, "
                     f"one encoder block, best of torch.mm and oneDNN) "
                     f"runs {peaks['fp32']:.0f} GFLOP/s in fp32 and {peaks['bf16']:.0f} in bf16 (bf16 inputs, "
                     f"float32 accumulation): the floor a bf16 encoder could reach")
    bullet = "- " if markdown else ""
    for t in result["timings"][1:]:
        tol = t.get("tolerance", result["tolerance"])
        ok = t["rel_diff"] <= tol
        lines.append(f"{bullet}speed-up {t['name']}: {t['speedup']:.2f}x over naive numpy "
                     f"(target >= {TARGET_SPEEDUP:g}x: {'ok' if t['speedup'] >= TARGET_SPEEDUP else 'below'})")
        lines.append(f"{bullet}match {t['name']}: max|a-b|/max|b| = {t['rel_diff']:.2e} "
                     f"({'<=' if ok else '>'} {tol:g}: {'ok' if ok else 'MISMATCH'})")
    return "\n".join(lines)


def tolerance(name: str) -> float:
    """How close a variant must come to the naive float32 encoder: float32 rounding, or bf16's (issue 16)."""
    from kmfeat.linear import BF16_RTOL

    return BF16_RTOL if "-bf16" in name else TOLERANCE


def matches(result: dict) -> bool:
    return all(t["rel_diff"] <= t.get("tolerance", result["tolerance"]) for t in result["timings"][1:])
