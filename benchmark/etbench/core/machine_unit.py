"""The machine unit: the seconds of a fixed fp32 matmul workload on this machine, so that a cost measured
on one machine compares with one measured on another (absolute times differed 4.3x between two 2-core
CPUs). Costs are stated as multiples of it, timed in the same run, before and after."""

from __future__ import annotations

import time

#: The workload: ``MATMULS`` products of two ``SIZE`` x ``SIZE`` fp32 matrices; the unit is its best of ``REPEATS``.
SIZE, MATMULS, REPEATS = 1024, 100, 3


def machine_unit_seconds(repeats: int = REPEATS) -> float:
    """Seconds of ``MATMULS`` x a ``SIZE``-square fp32 torch matmul on the CPU (torch's thread count in force),
    best of ``repeats`` (the best is the least disturbed by other processes)."""
    import torch

    generator = torch.Generator().manual_seed(0)
    a = torch.randn(SIZE, SIZE, generator=generator)
    b = torch.randn(SIZE, SIZE, generator=generator)
    out = torch.empty(SIZE, SIZE)
    torch.matmul(a, b, out=out)  # warm-up: first-call allocations and kernel choice
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(MATMULS):
            torch.matmul(a, b, out=out)
        best = min(best, time.perf_counter() - start)
    return best
