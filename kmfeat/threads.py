"""One place to set how many CPU threads torch, faiss and BLAS/OpenMP use."""
import os

import torch

from .errors import KmfeatError


def available_cpus() -> int:
    """CPUs this process may run on (respects taskset / cgroup affinity)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def configure_threads(n: int | None = None) -> int:
    """Set torch intra-op, faiss OpenMP and (via threadpoolctl) BLAS/OpenMP threads to n.

    n defaults to the CPUs available to this process. Returns n; calling again is harmless.
    """
    n = available_cpus() if n is None else int(n)
    if n < 1:
        raise KmfeatError(f"threads: must be at least 1, got {n}")
    torch.set_num_threads(n)
    try:
        import faiss
        faiss.omp_set_num_threads(n)
    except ImportError:
        pass
    try:
        from threadpoolctl import threadpool_limits
        threadpool_limits(limits=n)
    except ImportError:
        pass
    return n
