"""lazymat showcase: three classic reductions on 100,000 points in 3-D.

Run with ``make demo``. Each reduction streams over the 10^10 pairs of a
symbolic 100,000 x 100,000 matrix without storing it; its result is checked
against a plain chunked numpy computation on a random subset of rows (the
full chunked computation would take minutes). The numpy timing uses float32,
like lazymat; the errors are measured against float64.
"""

from __future__ import annotations

import time

import numpy as np

import lazymat as lm

M = N = 100_000
CHECK_ROWS = 500
rng = np.random.default_rng(0)
x = rng.standard_normal((M, 3)).astype(np.float32)
y = rng.standard_normal((N, 3)).astype(np.float32)
b = rng.random((N, 1)).astype(np.float32)
rows = rng.choice(M, CHECK_ROWS, replace=False)


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def chunked_sqdist(rows_x: np.ndarray, dtype=np.float64) -> np.ndarray:
    """Dense squared distances of a few rows against all of y (|x|^2 + |y|^2 - 2 x.y)."""
    xs, ys = rows_x.astype(dtype), y.astype(dtype)
    d = (xs**2).sum(1)[:, None] + (ys**2).sum(1)[None, :] - 2 * xs @ ys.T
    return np.maximum(d, 0)


def report(name: str, seconds: float, ref_seconds: float, error: str) -> None:
    """lazymat's time on all rows; numpy's on CHECK_ROWS rows, and scaled to all rows."""
    print(f"{name:26s} lazymat {seconds:5.2f} s ({M * N / seconds / 1e9:5.2f} G pairs/s)   "
          f"numpy {ref_seconds:5.2f} s for {CHECK_ROWS} rows "
          f"(~{ref_seconds * M / CHECK_ROWS:4.0f} s for all)   {error}")


def main() -> None:
    print(f"lazymat {lm.__version__}: M = N = {M:,} points in 3-D, float32, "
          f"{lm.check_health(verbose=False)['compiler']}")
    def symbolic(xs, ys):
        D_ij = lm.Vi(xs).sqdist(lm.Vj(ys))     # symbolic squared distances
        return D_ij, (-D_ij / 2).exp()          # and the symbolic Gaussian kernel matrix

    # A tiny problem first compiles the three kernels (cached on disk afterwards).
    def warm_up():
        D_small, K_small = symbolic(x[:10], y[:20])
        return K_small @ b[:20], D_small.argKmin(K=10, dim=1), (-D_small).logsumexp(dim=1)

    _, compile_s = timed(warm_up)
    print(f"compiling the kernels (first run only, then cached): {compile_s:.2f} s\n")
    D_ij, K_ij = symbolic(x, y)

    a, t = timed(lambda: K_ij @ b)
    # Speed is compared with the same float32 computation in numpy; errors with float64.
    _, t_ref = timed(lambda: np.exp(-chunked_sqdist(x[rows], np.float32) / 2) @ b)
    dense = np.exp(-chunked_sqdist(x[rows]) / 2) @ b.astype(np.float64)
    err = np.abs(a[rows] - dense).max() / np.abs(dense).max()
    report("Gaussian kernel sum K @ b", t, t_ref, f"max rel. error {err:.1e}")

    idx, t = timed(lambda: D_ij.argKmin(K=10, dim=1))
    _, t_ref = timed(lambda: np.argpartition(chunked_sqdist(x[rows], np.float32), 10, 1))
    ref = np.argpartition(chunked_sqdist(x[rows]), 10, axis=1)[:, :10]
    same = (np.sort(idx[rows], 1) == np.sort(ref, 1)).mean()
    report("10 nearest neighbours", t, t_ref, f"{100 * same:.2f}% same neighbours")

    lse, t = timed(lambda: (-D_ij).logsumexp(dim=1))

    def dense_lse(dtype=np.float64):
        d = -chunked_sqdist(x[rows], dtype)
        m = d.max(1, keepdims=True)
        return m + np.log(np.exp(d - m).sum(1, keepdims=True))

    _, t_ref = timed(lambda: dense_lse(np.float32))
    ref = dense_lse()
    report("LogSumExp of -|x-y|^2", t, t_ref, f"max abs. error {np.abs(lse[rows] - ref).max():.1e}")


if __name__ == "__main__":
    main()
