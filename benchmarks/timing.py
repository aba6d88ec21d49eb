"""Timing shared by the benchmarks: peers run alternately, round after round, so drift hits both alike."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def alternate(runners: dict[str, Callable[[], object]], rounds: int,
              sync: Callable[[], None] = lambda: None) -> dict[str, float]:
    """Median seconds of each runner over ``rounds`` rounds, each round running every runner once in turn."""
    times: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(rounds):
        for name, run in runners.items():
            sync()
            t0 = time.perf_counter()
            run()
            sync()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}
