"""Encoder throughput of one pipeline's codes on real images, extrapolated to a whole encode.

    python -m bench.encode_rate -p pipelines/cifar10.toml --data ../shared/data/cifar10-jpeg.tar.gz \
        [-o encode.kind=triangle ...] [--images 6000] [--repeats 3]

Builds the pipeline's encoder from its cached (or computed) whitening and centroids, warms it up
on 500 images (compilation), then times `transform` on the first --images test images and prints
the median seconds and the rate per 110,000 images (CIFAR-10 train + mirrors + test).
"""
import argparse
import statistics

import numpy as np

from .table import timed_runs

from kmfeat import config
from kmfeat.cache import Store
from kmfeat.encode_stage import make_encoder
from kmfeat.runner import Runner


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-p", "--pipeline", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("-o", dest="overrides", action="append", default=[])
    ap.add_argument("--images", type=int, default=6000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cache-dir", default="cache")
    args = ap.parse_args(argv)
    cfg = config.load(args.pipeline, args.overrides, args.data)
    runner = Runner(cfg, Store(args.cache_dir), quiet=True)
    encoder = make_encoder(cfg, runner.run("whiten"), runner.run("kmeans"))
    images = np.asarray(runner.run("data").array("test_x"))[: args.images]
    encoder.transform(images[:500])
    times = timed_runs(lambda: encoder.transform(images), args.repeats)
    median = statistics.median(times)
    print(f"{' '.join(args.overrides) or 'pipeline as is'}: {encoder.n_features:,} features, "
          f"{len(images):,} images in {median:.2f} s median of {args.repeats} "
          f"({', '.join(f'{t:.2f}' for t in times)}) -> {median / len(images) * 110_000:.0f} s per 110,000 images")


if __name__ == "__main__":
    main()
