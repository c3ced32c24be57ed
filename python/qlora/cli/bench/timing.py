"""The timing harness of ``qlora bench``: repeated calls until a budget of calls and seconds is
met (:func:`measure`), and the per-call cost of very fast functions (:func:`per_call`)."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable

__all__ = ["Budget", "measure", "per_call"]


@dataclass
class Budget:
    min_reps: int = 3
    min_time: float = 0.25
    max_cell_time: float = 1.5  # stop repeating a slow cell after this, even below min_reps
    max_call_seconds: float = 1.0
    floor_reps: int = 2  # timed calls a cell always gets, whatever its budget
    warmup: bool = True
    # Pause before each method's warm-up. OpenBLAS' pthreads and libgomp's workers spin for tens
    # of milliseconds after a call; on a machine with as many threads as cores, the next library
    # then competes with them and a batch-8 call measured 5-30x slower (0.19 ms alone, 5.8 ms
    # 1 ms after NumPy, back to normal after ~0.1 s of idling). qlora's pool sleeps at once.
    settle: float = 0.1


def measure(fn: Callable[[], object], budget: Budget) -> tuple[list[float], object]:
    """Warm up once, then time calls until min_reps and min_time are both met (or the cell
    budget runs out, keeping at least 2 timed calls). Returns the call times and the last result."""
    time.sleep(budget.settle)
    result = fn() if budget.warmup else None
    times: list[float] = []
    start = time.perf_counter()
    while True:
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
        elapsed = time.perf_counter() - start
        if len(times) >= budget.min_reps and elapsed >= budget.min_time:
            break
        if elapsed >= budget.max_cell_time and len(times) >= budget.floor_reps:
            break
    return times, result


def per_call(fn: Callable[[], object], target: float = 0.05,
              rounds: int = 7) -> tuple[float, float]:
    """Median (wall, thread-CPU) seconds per call of a very fast function, over `rounds` loops
    of ~target s. Thread-CPU time does not count time the thread spent descheduled, so it is
    the steadier figure on a shared machine; wall time is what a caller waits."""
    fn()
    n = 1
    while True:
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        dt = time.perf_counter() - t0
        if dt >= target / 4:
            break
        n *= 4
    n = max(1, int(n * target / max(dt, 1e-9)))
    wall, cpu = [], []
    for _ in range(rounds):
        t0, c0 = time.perf_counter(), time.thread_time()
        for _ in range(n):
            fn()
        cpu.append((time.thread_time() - c0) / n)
        wall.append((time.perf_counter() - t0) / n)
    return statistics.median(wall), statistics.median(cpu)
