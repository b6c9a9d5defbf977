"""Projected cluster encode time: one worker's measured shard time × shards ÷ workers.

    python -m bench.cluster_projection [--size 64] [--k 4000] [--images 1281167] [--shard-images 64]
        [--workers 1,8,64] [--threads 1] [--repeats 3]

Times the Encoder (soft threshold, polarity split, 2x2 sum pooling: the default codes) on --shard-images
random uint8 images of --size x --size with random whitening and k centroids, in this process on --threads
torch threads (one worker of a `local:N` cluster on this machine), after a warm-up batch; then prints the
projection for --images images on each worker count, assuming perfect scaling (no scheduling or I/O cost:
the per-shard overhead of the engine is measured separately, `--scheduler local:2` against one process).
"""
import argparse
import statistics

import numpy as np

from .table import timed_runs


def main(argv=None) -> None:
    from kmfeat.encode import Encoder
    from kmfeat.threads import configure_threads

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--k", type=int, default=4000)
    ap.add_argument("--images", type=int, default=1_281_167, help="ImageNet-1k train")
    ap.add_argument("--shard-images", type=int, default=64)
    ap.add_argument("--workers", default="1,8,64")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    configure_threads(args.threads)
    rng = np.random.default_rng(0)
    d = 6 * 6 * 3
    enc = Encoder(rng.normal(size=(args.k, d)).astype(np.float32), rng.normal(size=d).astype(np.float32),
                  np.eye(d, dtype=np.float32), rf=6, kind="soft", alpha=0.25, split=True, grid=2, device="cpu")
    images = rng.integers(0, 256, (args.shard_images, args.size, args.size, 3), dtype=np.uint8)
    enc.transform(images[:8])
    times = timed_runs(lambda: enc.transform(images), args.repeats)
    per_image = statistics.median(times) / len(images)
    positions = (args.size - 5) ** 2
    gflop = 2 * positions * args.k * d / 1e9
    print(f"one worker ({args.threads} thread(s)): {per_image * 1e3:.1f} ms per {args.size}x{args.size} image at "
          f"k={args.k} ({gflop:.2f} GFLOP of distance matmul each, {gflop / per_image:.0f} GFLOP/s), median of "
          f"{args.repeats} runs of {len(images)} images ({', '.join(f'{t:.2f}' for t in times)} s)")
    print(f"\nProjection (not a measurement) for {args.images:,} images, perfect scaling:\n")
    print("| workers | hours |\n| ---: | ---: |")
    for w in (int(x) for x in args.workers.split(",")):
        print(f"| {w} | {per_image * args.images / w / 3600:.2f} |")


if __name__ == "__main__":
    main()
