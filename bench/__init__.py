"""Benchmark harness for kmfeat (`python -m bench`, `make bench`): per-stage wall time, throughput
and peak RSS on the real CIFAR-10 copy, the fast encoder against the naive numpy baseline, k-means backends and
precisions on the same patches (--kmeans), and the peak memory of `kmfeat encode` as the number of images grows. The figures go into BENCHMARKS.md.
"""
