"""Throughput under contention: lazymat's Gaussian sum against a plain OpenMP kernel.

``python -m benchmarks.contention [--full]``: D = 3, float32, a = exp(-|x_i - y_j|²/2) @ b.
Both run alternately in this process (same libgomp, same threads), first as the machine is,
then beside two busy competing processes (Python spin loops started here). The hand kernel
is the textbook loop: ``#pragma omp parallel for schedule(static)`` over rows, ``expf``
(vectorized by -ffast-math).
Target (issue 17.1): lazymat ≥ 0.9× the hand kernel in both cases. The load average is
printed with each table: on a shared machine "quiet" is whatever the others leave.
"""

from __future__ import annotations

import ctypes
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import lazymat as lm
from lazymat.compile import compiler_info

HAND = r"""
#include <cmath>
extern "C" void hand_gauss(long M, long N, const float* x, const float* y, const float* b,
                           float* out, int threads) {
  #pragma omp parallel for num_threads(threads) schedule(static)
  for (long i = 0; i < M; i++) {
    const float x0 = x[3 * i], x1 = x[3 * i + 1], x2 = x[3 * i + 2];
    float s = 0;
    #pragma omp simd reduction(+:s)
    for (long j = 0; j < N; j++) {
      const float d0 = x0 - y[3 * j], d1 = x1 - y[3 * j + 1], d2 = x2 - y[3 * j + 2];
      s += expf(-0.5f * (d0 * d0 + d1 * d1 + d2 * d2)) * b[j];
    }
    out[i] = s;
  }
}
"""


def hand_kernel():
    """The hand kernel built as its author would: lazymat's compiler and flags (-O3,
    -march=native, -fopenmp) plus -ffast-math, so that expf vectorizes (libmvec)."""
    info = compiler_info()
    directory = Path(tempfile.mkdtemp(prefix="lazymat-hand-"))
    src, out = directory / "hand.cpp", directory / "hand.so"
    src.write_text(HAND)
    cmd = info.command(src, out)
    subprocess.run(cmd[:1] + ["-ffast-math"] + cmd[1:], check=True)
    fn = ctypes.CDLL(str(out)).hand_gauss
    fn.argtypes = [ctypes.c_long, ctypes.c_long] + [ctypes.c_void_p] * 4 + [ctypes.c_int]
    fn.restype = None
    return fn


def busy_processes(n: int) -> list[subprocess.Popen]:
    """n competing processes that keep one core each busy (Python spin loops)."""
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def measure(x, y, b, rounds: int) -> dict:
    """Median seconds of lazymat and of the hand kernel, called alternately."""
    from lazymat.backends.launch import num_threads

    fn, threads = hand_kernel(), num_threads()
    out = np.empty((len(x), 1), np.float32)

    def hand():
        fn(len(x), len(y), x.ctypes.data, y.ctypes.data, b.ctypes.data, out.ctypes.data,
           threads)
        return out

    gauss = lm.Genred("Exp(-SqDist(x,y)/IntCst(2))*b", ["x=Vi(3)", "y=Vj(3)", "b=Vj(1)"],
                      axis=1)
    np.testing.assert_allclose(gauss(x, y, b), hand(), rtol=1e-3, atol=1e-3)
    times: dict[str, list[float]] = {"lazymat": [], "hand": []}
    for _ in range(rounds):  # alternately, so that both see the same load
        for name, f in (("lazymat", lambda: gauss(x, y, b)), ("hand", hand)):
            t = time.perf_counter()
            f()
            times[name].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()} | {"threads": threads}


def main(full: bool = False) -> None:
    n = 20_000 if full else 8_000
    rounds = 15 if full else 9
    rng = np.random.default_rng(0)
    # square, and few rows against many columns (lazymat cuts the columns into parts then)
    shapes = [(n, n), (64, 40 * n)]
    print(f"\nGaussian sum, D = 3, float32: lazymat vs a plain OpenMP kernel (alternately, "
          f"medians of {rounds})\n")
    print("| M × N | case | load (1 min) | threads | lazymat | hand OpenMP | lazymat / hand |")
    print("|---|---|---|---|---|---|---|")
    for M, N in shapes:
        x = rng.standard_normal((M, 3)).astype(np.float32)
        y = rng.standard_normal((N, 3)).astype(np.float32)
        b = rng.random((N, 1)).astype(np.float32)
        for case, competitors in (("as is", 0), ("+ 2 busy processes", 2)):
            procs = busy_processes(competitors)
            try:
                if procs:
                    time.sleep(1.0)
                r = measure(x, y, b, rounds)
            finally:
                for p in procs:
                    p.kill()
                    p.wait()
            pairs = M * N
            print(f"| {M:,} × {N:,} | {case} | {os.getloadavg()[0]:.1f} | {r['threads']} | "
                  f"{pairs / r['lazymat'] / 1e9:.2f} G pairs/s | "
                  f"{pairs / r['hand'] / 1e9:.2f} G pairs/s | "
                  f"{r['hand'] / r['lazymat']:.2f}× |", flush=True)


if __name__ == "__main__":
    main(full="--full" in sys.argv[1:])
