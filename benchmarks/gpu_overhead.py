"""Where the time of a small GPU reduction goes: ``python -m benchmarks.gpu_overhead``.

For the Gaussian sum (D = 3, float32) at a few sizes, with and without cutting the
columns into parts: the wall time of a synchronised call, the host time of issuing
it (no synchronisation: Python, checks and the launch), and the GPU time between two
CUDA events around many calls.
"""

from __future__ import annotations

import time

import torch

import lazymat as lm
from lazymat.backends import cuda


def main(repeat: int = 50) -> None:
    print("| N | column parts | wall / call | host / call | GPU / call |\n|---|---|---|---|---|")
    for n in (100, 10_000, 30_000):
        x = torch.rand(n, 3, device="cuda")
        b = torch.randn(n, 1, device="cuda")

        def f():
            return ((-lm.Vi(x).sqdist(lm.Vj(x)) * 50).exp() * lm.Vj(b)).sum(1)

        for split in (False, True):
            cuda.BLOCKS_PER_SM = 4 if split else 0
            f()
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(repeat):
                f()
                torch.cuda.synchronize()
            wall = (time.perf_counter() - start) / repeat
            start = time.perf_counter()
            for _ in range(repeat):
                f()
            host = (time.perf_counter() - start) / repeat
            torch.cuda.synchronize()
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
            for _ in range(repeat):
                f()
            e1.record()
            torch.cuda.synchronize()
            gpu = e0.elapsed_time(e1) / repeat / 1e3
            print(f"| {n:,} | {'yes' if split else 'no'} | {wall * 1e6:.0f} µs | "
                  f"{host * 1e6:.0f} µs | {gpu * 1e6:.0f} µs |", flush=True)
    cuda.BLOCKS_PER_SM = 4


if __name__ == "__main__":
    main()
