"""The one timer of the benchmarks: the median wall time of repeated calls."""

from __future__ import annotations

import os
import statistics
import time
from typing import Callable


def median_time(fn: Callable[[], object], repeat: int = 3, warm_up: bool = False) -> float:
    """Median of ``repeat`` timed calls (after one untimed call if ``warm_up``)."""
    if warm_up:
        fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def load() -> str:
    """The machine's load averages, for the header of a benchmark's output."""
    try:
        return "load %.1f %.1f %.1f" % os.getloadavg()
    except OSError:
        return "load unknown"
