"""The walk down the tree of keys runs on one CPU thread.

Walking `entry_keys`' tree takes a few dozen tensor operations per chunk, on arrays of a few thousand to a few
hundred thousand elements: too small for a second thread to pay for itself, and every operation that is spread over
the thread pool wakes it — with `OMP_WAIT_POLICY=PASSIVE`, or whenever the pool has gone to sleep, a wake-up costs
more than the operation (docs/benchmarks.md). The chunk's importance (one pass over its entries) stays on every
thread.
"""

from __future__ import annotations

import functools

import torch

_OPENMP = "parallel backend: OpenMP" in torch.__config__.parallel_info()


def on_one_thread(method):
    """Run `method` with one intra-op thread when the CPU thread pool is OpenMP's (the native pool cannot be resized
    once it has started)."""

    @functools.wraps(method)
    def wrapped(*args, **kwargs):
        threads = torch.get_num_threads()
        if threads == 1 or not _OPENMP:
            return method(*args, **kwargs)
        torch.set_num_threads(1)
        try:
            return method(*args, **kwargs)
        finally:
            torch.set_num_threads(threads)

    return wrapped
