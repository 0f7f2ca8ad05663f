"""Engine figures: cold compile, warm call overhead, Gaussian kernel sum throughput.

``python -m benchmarks.engine [--full]``. Peers (torch, numpy) are measured in
the same run; a peer size that would take too long is marked, not dropped.
Times are medians (the machine is shared).
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import tempfile
import time

import numpy as np

import lazymat as lm

from .timing import median_time


def cold_compile(n: int = 5) -> list[float]:
    """First-call time of n formulas never compiled before (fresh cache directory)."""
    os.environ["LAZYMAT_CACHE_DIR"] = tempfile.mkdtemp(prefix="lazymat-bench-")
    x, y = np.random.rand(10, 3).astype(np.float32), np.random.rand(10, 3).astype(np.float32)
    times = []
    for k in range(n):
        # An exact integer constant is compiled into the kernel: each k is a new kernel.
        start = time.perf_counter()
        (-(lm.Vi(x).sqdist(lm.Vj(y)) * (k + 2))).exp().sum(dim=1)
        times.append(time.perf_counter() - start)
    return times


def gaussian(x, y, b):
    return (-lm.Vi(x).sqdist(lm.Vj(y)) / 2).exp() @ b


def torch_chunked(x, y, b, rows: int = 4096):
    import torch

    out = []
    y2 = (y * y).sum(1)
    for i0 in range(0, x.shape[0], rows):
        xs = x[i0:i0 + rows]
        d = (xs * xs).sum(1)[:, None] + y2[None, :] - 2 * xs @ y.T
        out.append(torch.exp(-d.clamp_min(0) / 2) @ b)
    return torch.cat(out)


def numpy_chunked(x, y, b, rows: int = 4096):
    out = []
    y2 = (y * y).sum(1)
    for i0 in range(0, x.shape[0], rows):
        xs = x[i0:i0 + rows]
        d = (xs * xs).sum(1)[:, None] + y2[None, :] - 2 * xs @ y.T
        out.append(np.exp(-np.maximum(d, 0) / 2) @ b)
    return np.concatenate(out)


def _pykeops_small_calls(x, y, b) -> dict | None:
    """pykeops' times (µs) of the three small calls, or None when it is not installed."""
    try:
        from pykeops.numpy import Genred as KeOpsGenred
        from pykeops.numpy import LazyTensor as KeOpsLazyTensor
    except Exception:  # noqa: BLE001 - not installed, or it fails to import: no column
        return None
    xi, yj = x[:, None, :], y[None, :, :]
    K = (-KeOpsLazyTensor(xi).sqdist(KeOpsLazyTensor(yj)) / 2).exp()
    g = KeOpsGenred("Exp(-SqDist(x,y)/IntCst(2))*b", ["x=Vi(3)", "y=Vj(3)", "b=Vj(1)"],
                    axis=1)
    calls = {"built": lambda: (-KeOpsLazyTensor(xi).sqdist(KeOpsLazyTensor(yj)) / 2).exp() @ b,
             "K @ b": lambda: K @ b, "Genred": lambda: g(x, y, b)}
    for fn in calls.values():
        for _ in range(20):
            fn()
    return {name: median_time(fn, 500) * 1e6 for name, fn in calls.items()}


def main(full: bool = False) -> None:
    print(f"# lazymat {lm.__version__} engine benchmark\n")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"python {sys.version.split()[0]}, numpy {np.__version__}")
    colds = cold_compile()
    x, y = np.random.rand(100, 3).astype(np.float32), np.random.rand(100, 3).astype(np.float32)
    b = np.random.rand(100, 1).astype(np.float32)
    K = (-lm.Vi(x).sqdist(lm.Vj(y)) / 2).exp()
    g = lm.Genred("Exp(-SqDist(x,y)/IntCst(2))*b", ["x=Vi(3)", "y=Vj(3)", "b=Vj(1)"], axis=1)
    # 2000 calls each, after 20 untimed ones (the bound calls are stored on the second)
    small = {"built": lambda: gaussian(x, y, b), "K @ b": lambda: K @ b,
             "Genred": lambda: g(x, y, b)}
    keops = _pykeops_small_calls(x, y, b)
    for fn in small.values():
        for _ in range(20):
            fn()
    t = {name: median_time(fn, 2000) * 1e6 for name, fn in small.items()}
    print("\n| quantity | value | pykeops | target (issues 2, 17) |\n|---|---|---|---|")
    print(f"| cold compile of a new formula (median of {len(colds)}) | "
          f"{statistics.median(colds) * 1e3:.0f} ms (min {min(colds) * 1e3:.0f}, "
          f"max {max(colds) * 1e3:.0f}) | 10–25 s | ≤ 1 s |")
    for name, label, target in (("built", "LazyTensor built each call", "≤ 40 µs"),
                                ("K @ b", "K @ b on a built LazyTensor", "≤ 12 µs"),
                                ("Genred", "Genred", "≤ 8 µs")):
        other = f"{keops[name]:.0f} µs" if keops else "not installed"
        print(f"| warm call, M = N = 100, {label} | {t[name]:.0f} µs | {other} | {target} |")

    try:
        import torch

        torch.set_num_threads(os.cpu_count() or 1)
    except ImportError:
        torch = None
    print("\nGaussian kernel sum a = exp(-|x_i - y_j|^2 / 2) @ b, D = 3, float32, "
          "G pairs/s (median wall time)\n")
    print("| M = N | lazymat | torch chunked | numpy chunked | lazymat / torch |")
    print("|---|---|---|---|---|")
    for n in (10_000, 100_000):
        rng = np.random.default_rng(0)
        x = rng.standard_normal((n, 3)).astype(np.float32)
        y = rng.standard_normal((n, 3)).astype(np.float32)
        b = rng.random((n, 1)).astype(np.float32)
        repeat = 5 if n <= 10_000 else 3
        gaussian(x, y, b)
        t_lm = median_time(lambda: gaussian(x, y, b), repeat)
        cells = [f"{n * n / t_lm / 1e9:.2f} ({t_lm:.3f} s)"]
        ratio = "–"
        peers_ok = full or n <= 10_000
        if torch is not None and peers_ok:
            xt, yt, bt = (torch.from_numpy(a) for a in (x, y, b))
            t_torch = median_time(lambda: torch_chunked(xt, yt, bt), 1 if n > 10_000 else repeat)
            cells.append(f"{n * n / t_torch / 1e9:.2f} ({t_torch:.2f} s)")
            ratio = f"{t_torch / t_lm:.0f}×"
        else:
            cells.append("not run (~40 s; --full)" if torch is not None else "not installed")
        if peers_ok:
            t_np = median_time(lambda: numpy_chunked(x, y, b), 1 if n > 10_000 else repeat)
            cells.append(f"{n * n / t_np / 1e9:.2f} ({t_np:.2f} s)")
        else:
            cells.append("not run (~60 s; --full)")
        print(f"| {n:,} | " + " | ".join(cells) + f" | {ratio} |")


if __name__ == "__main__":
    main(full="--full" in sys.argv[1:])
