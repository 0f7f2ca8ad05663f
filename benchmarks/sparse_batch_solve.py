"""Block-sparse ranges, batches of small problems and kernel solves.

``python -m benchmarks.sparse_batch_solve [--full]`` prints three tables:

- time of a Gaussian kernel sum against the density of a block mask (ranges);
- a batch of 100 small problems in one call against one problem of the same
  total size, and against a Python loop over the batch;
- KernelSolve (Gaussian, D = 3, α = 0.1) against scipy's CG with a dense
  matrix-vector product and torch's Cholesky solve (N = 10⁴; 10⁵ with --full,
  where the dense matrix would need 80 GB).
"""

from __future__ import annotations

import sys
import time

import numpy as np

import lazymat as lm

from .timing import median_time


def ranges_table() -> None:
    rng = np.random.default_rng(0)
    n, clusters = 40_000, 100
    x = rng.random((n, 3)).astype(np.float32)
    b = rng.random((n, 1)).astype(np.float32)
    labels = lm.grid_cluster(x, 1 / 4.64)  # about 100 cells
    x, labels = lm.sort_clusters(x, labels)
    ranges, centroids, _ = lm.cluster_ranges_centroids(x, labels)
    dist = ((centroids[:, None] - centroids[None]) ** 2).sum(-1)
    K = (-lm.Vi(x).sqdist(lm.Vj(x)) * 50).exp()
    full = median_time(lambda: K @ b, warm_up=True)
    print(f"\nGaussian kernel sum, N = {n:,}, D = 3, float32, {len(ranges)} clusters (about "
          f"{clusters}): time against the density of the block mask\n")
    print("| kept blocks | time | vs dense |\n|---|---|---|")
    print(f"| 100 % (no ranges) | {full:.3f} s | 1.00 |")
    for q in (0.5, 0.2, 0.05):
        keep = dist <= np.quantile(dist, q)
        six = lm.from_matrix(ranges, ranges, keep)
        t = median_time(lambda: (K * lm.Vj(b)).sum(dim=1, ranges=six), warm_up=True)
        print(f"| {100 * keep.mean():.0f} % | {t:.3f} s | {t / full:.2f} |")


def batch_table() -> None:
    rng = np.random.default_rng(1)
    B, n = 100, 1000
    x = rng.standard_normal((B, n, 3)).astype(np.float32)
    y = rng.standard_normal((B, n, 3)).astype(np.float32)
    b = rng.random((B, n, 1)).astype(np.float32)

    def batched():
        return (-lm.Vi(x).sqdist(lm.Vj(y))).exp() @ b

    def looped():
        return [(-lm.Vi(x[k]).sqdist(lm.Vj(y[k]))).exp() @ b[k] for k in range(B)]

    xs, ys = x.reshape(-1, 3)[:B * n // 10], y.reshape(-1, 3)[:B * n // 10]
    bs = b.reshape(-1, 1)[:B * n // 10]

    def one_problem():  # 10,000 x 10,000: the same number of pairs as the batch
        return (-lm.Vi(xs).sqdist(lm.Vj(ys))).exp() @ bs

    t_batch, t_loop, t_one = (median_time(f, warm_up=True) for f in (batched, looped, one_problem))
    print(f"\nA batch of {B} Gaussian sums of {n} x {n} points (D = 3, float32) against one "
          f"problem with as many pairs\n")
    print("| | time | G pairs/s |\n|---|---|---|")
    pairs = B * n * n
    for name, t in (("batch in one call", t_batch), ("Python loop over the batch", t_loop),
                    ("one 10⁴ x 10⁴ problem", t_one)):
        print(f"| {name} | {t:.4f} s | {pairs / t / 1e9:.2f} |")


def solve_table(full: bool) -> None:
    print("\nKernelSolve: (0.1 Id + K) a = b, K_ij = exp(-|x_i - x_j|² / (2 · 0.05²)), "
          "D = 3, x uniform in [0, 1]³, float64\n")
    print("| N | lazymat K.solve | CG iterations | scipy CG, dense matvec | torch Cholesky |")
    print("|---|---|---|---|---|")
    for n in (10_000, 100_000) if full else (10_000,):
        rng = np.random.default_rng(2)
        x, b = rng.random((n, 3)), rng.standard_normal((n, 1))
        gamma = 1 / (2 * 0.05 ** 2)
        K = (-lm.Vi(x).sqdist(lm.Vj(x)) * gamma).exp()
        start = time.perf_counter()
        a = K.solve(b, alpha=0.1, eps=1e-6)
        t_lm = time.perf_counter() - start
        iters = _iterations(K, b)
        cells = [f"{t_lm:.2f} s", str(iters)]
        if n <= 20_000:
            dense = np.exp(-gamma * ((x[:, None] - x[None]) ** 2).sum(-1))
            try:
                import scipy.sparse.linalg as sla

                op = sla.LinearOperator((n, n), matvec=lambda v: 0.1 * v + dense @ v)
                start = time.perf_counter()
                sla.cg(op, b[:, 0], rtol=1e-8)
                cells.append(f"{time.perf_counter() - start:.2f} s")
            except ImportError:
                cells.append("scipy not installed")
            try:
                import torch

                Kt = torch.from_numpy(dense) + 0.1 * torch.eye(n, dtype=torch.float64)
                start = time.perf_counter()
                torch.cholesky_solve(torch.from_numpy(b), torch.linalg.cholesky(Kt))
                cells.append(f"{time.perf_counter() - start:.2f} s")
            except ImportError:
                cells.append("torch not installed")
            residual = np.abs(0.1 * a + dense @ a - b).max()
            cells[0] += f" (residual {residual:.1e})"
        else:
            cells += ["not run (dense: 80 GB)"] * 2
        print(f"| {n:,} | " + " | ".join(cells) + " |")


def _iterations(K, b) -> int:
    count = [0]

    def matvec(v):
        count[0] += 1
        return K @ v

    from lazymat.solve import conjugate_gradient

    conjugate_gradient(matvec, b, 0.1, 1e-6)
    return count[0]


def main(full: bool = False) -> None:
    ranges_table()
    batch_table()
    solve_table(full)


if __name__ == "__main__":
    main(full="--full" in sys.argv[1:])
