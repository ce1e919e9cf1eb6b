"""The machine unit: a fixed CPU workload timed on the machine that measures something, so that costs
measured on machines of different speed can be compared (a cost in units = seconds / this figure)."""

from __future__ import annotations

import time

#: The workload: ``MATMULS`` products of two ``SIZE`` x ``SIZE`` float32 matrices.
SIZE = 1024
MATMULS = 100


def machine_unit_seconds(repeats: int = 3) -> float:
    """Seconds of 100 products of two 1024 x 1024 float32 matrices with torch (its current thread
    count), best of ``repeats``: about 215 GFLOP per unit."""
    import torch  # a benchmark's dependency, not etbench.core's: imported when a unit is timed

    generator = torch.Generator().manual_seed(0)
    a = torch.randn(SIZE, SIZE, generator=generator)
    b = torch.randn(SIZE, SIZE, generator=generator)
    torch.mm(a, b)  # warm-up: first-call allocations and thread-pool start
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(MATMULS):
            torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return best
