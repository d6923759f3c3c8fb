"""Timing helpers shared by the latency benchmarks, so every table reports p50/p95 the same way."""
from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np


def percentiles(seconds: list[float] | np.ndarray) -> dict:
    """{"p50", "p95"} in milliseconds and the sample count "n"."""
    ms = np.asarray(seconds, dtype=np.float64) * 1e3
    return {"p50": round(float(np.percentile(ms, 50)), 4), "p95": round(float(np.percentile(ms, 95)), 4), "n": len(ms)}


def timeit(fn: Callable[[], object], n: int, warmup: int = 5) -> dict:
    """``n`` timed calls of ``fn`` after ``warmup`` untimed ones (first calls allocate and JIT)."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return percentiles(out)


def matmul_peak_gflops(threads: int = 1, n: int = 1024, repeats: int = 10) -> float:
    """GFLOP/s of a large float32 matmul through numpy's BLAS at ``threads`` threads: a practical
    compute ceiling of this CPU to set a network's achieved GFLOP/s against (best of ``repeats``)."""
    from threadpoolctl import threadpool_limits

    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    with threadpool_limits(limits=threads):
        a @ a
        best = float("inf")
        for _ in range(repeats):
            t = time.perf_counter()
            a @ a
            best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def run_with_data(name: str, needs: list, run: Callable[[], object], hint: str = "see README, Data") -> int:
    """A bench's ``main``: exit 2 with one line when an input is missing, else run it and say how long it took."""
    import sys
    from pathlib import Path

    for need in map(Path, needs):
        if not need.exists():
            print(f"{name}: {need} not found ({hint})", file=sys.stderr)
            return 2
    t0 = time.time()
    run()
    print(f"done in {time.time() - t0:.0f} s")
    return 0
