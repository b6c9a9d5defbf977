"""Cost of the whole-file checksums: writing an array with and without the xxh3 hash, and verifying it.

    python -m bench.checksum [--mb 1024] [--repeats 3] [--dir /tmp]

Writes a float16 array of --mb MB through the stage store (Writer.save, hashed while written), commits it,
and reads it back with full verification (KMFEAT_VERIFY=full, the default) and with sampled verification;
prints the median seconds of each and the hashing rate. The file stays in the page cache, as a stage's
freshly written output does, so the figures are the hashing cost, not the disk's.
"""
import argparse
import os
import statistics
import tempfile
import time

import numpy as np

from kmfeat.cache import Store, whole_digest


def _median(fn, repeats):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dir", default=None)
    args = ap.parse_args(argv)
    data = np.random.default_rng(0).standard_normal(args.mb * (1 << 20) // 2).astype(np.float16)
    with tempfile.TemporaryDirectory(dir=args.dir) as root:
        store = Store(root)
        n = [0]

        def write():
            n[0] += 1
            with store.lock("s", f"{n[0]:016x}"):
                w = store.writer("s", f"{n[0]:016x}", {}, {})
                w.save("x", data)
                return w.commit()
        commit = _median(write, args.repeats)
        path = store.get("s", f"{n[0]:016x}").path / "x.npy"
        hash_only = _median(lambda: whole_digest(path), args.repeats)
        os.environ["KMFEAT_VERIFY"] = "full"
        full = _median(lambda: store.get("s", f"{n[0]:016x}").array("x"), args.repeats)
        os.environ["KMFEAT_VERIFY"] = "sample"
        sample = _median(lambda: store.get("s", f"{n[0]:016x}").array("x"), args.repeats)
    print(f"{args.mb} MB float16 array, median of {args.repeats}:")
    print(f"  save + commit (hashed while written, fsync)  {commit:7.2f} s")
    print(f"  xxh3-128 of the file (page cache)            {hash_only:7.2f} s  ({args.mb / hash_only / 1000:.1f} GB/s)")
    print(f"  first read, KMFEAT_VERIFY=full               {full:7.2f} s")
    print(f"  first read, KMFEAT_VERIFY=sample             {sample:7.2f} s")


if __name__ == "__main__":
    main()
