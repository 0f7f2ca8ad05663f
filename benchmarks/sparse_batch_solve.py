"""Block-sparse ranges, batches of small problems and kernel solves.

``python -m benchmarks.sparse_batch_solve [--full]`` prints three tables:

- time of a Gaussian kernel sum against the density of a block mask (ranges);
- a batch of 100 small problems in one call against one problem of the same
  total size, and against a Python loop over the batch;
- KernelSolve (Gaussian, D = 3, α = 0.1): lazymat's default (Schwarz-preconditioned
  CG with block-sparse matvecs) and plain CG, against scipy's CG with a dense
  matrix-vector product and torch's Cholesky solve (N = 10⁴; 10⁵ with --full,
  where the dense matrix would need 80 GB).
"""

from __future__ import annotations

import sys

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
    eps, alpha, gamma = 1e-6, 0.1, 1 / (2 * 0.05 ** 2)
    print(f"\nKernelSolve: ({alpha} Id + K) a = b, K_ij = exp(-|x_i - x_j|² / (2 · 0.05²)), "
          f"D = 3, x uniform in [0, 1]³, b normal, float64, eps = {eps:g}: median of 3 calls "
          f"at N = 10⁴, one call at 10⁵. Residual: ‖(αId + K) a - b‖² / (N·eps²) with the "
          f"exact K (< 1: converged). 'plain CG' has exact matvecs (precond=None, "
          f"truncate=False); 'Schwarz + block-sparse' is the default.\n")
    print("| N | solver | time | CG iterations | residual / target | setup | kept pairs |")
    print("|---|---|---|---|---|---|---|")
    warm = np.random.default_rng(0).random((3000, 3))
    (-lm.Vi(warm).sqdist(lm.Vj(warm)) * gamma).exp().solve(warm[:, :1], alpha=alpha)
    for n in (10_000, 100_000) if full else (10_000,):
        rng = np.random.default_rng(2)
        x, b = rng.random((n, 3)), rng.standard_normal((n, 1))
        K = (-lm.Vi(x).sqdist(lm.Vj(x)) * gamma).exp()
        K @ b  # compiled
        small = n <= 20_000
        runs = [("lazymat Schwarz + block-sparse", {})]
        if small:
            runs.append(("lazymat plain CG", {"precond": None, "truncate": False}))
        for name, options in runs:
            info: dict = {}
            t = median_time(lambda: K.solve(b, alpha=alpha, eps=eps, info=info, **options),
                            repeat=3 if small else 1)
            setup = f"{info['setup_seconds']:.2f} s" if "setup_seconds" in info else "-"
            kept = f"{100 * info['kept']:.0f} %" if "kept" in info else "100 %"
            print(f"| {n:,} | {name} | {t:.2f} s | {info['iterations']} | "
                  f"{info['residual'] / info['target']:.2f} | {setup} | {kept} |", flush=True)
        if not small:
            t = median_time(lambda: K @ b, repeat=1)
            print(f"| {n:,} | lazymat plain CG | not run: {t:.1f} s per exact matvec, "
                  f"hundreds of iterations | | | | |")
            print(f"| {n:,} | scipy CG, dense matvec / torch Cholesky | not run (dense K: "
                  f"{8 * n * n / 1e9:.0f} GB) | | | | |")
            continue
        dense = np.exp(-gamma * ((x[:, None] - x[None]) ** 2).sum(-1))
        out: list = []
        try:
            import scipy.sparse.linalg as sla

            op = sla.LinearOperator((n, n), matvec=lambda v: alpha * v + dense @ v)
            rtol = eps * np.sqrt(n) / np.linalg.norm(b)  # the same criterion as lazymat's
            count = [0]

            def scipy_cg():
                count[0] = 0
                out[:] = [sla.cg(op, b[:, 0], rtol=rtol, callback=lambda _: count.__setitem__(
                    0, count[0] + 1))[0]]

            t = median_time(scipy_cg)
            r = alpha * out[0] + dense @ out[0] - b[:, 0]
            print(f"| {n:,} | scipy CG, dense matvec | {t:.2f} s | {count[0]} | "
                  f"{(r @ r) / (n * eps * eps):.2f} | | |", flush=True)
        except ImportError:
            print(f"| {n:,} | scipy CG, dense matvec | scipy not installed | | | | |")
        try:
            import torch

            Kt = torch.from_numpy(dense) + alpha * torch.eye(n, dtype=torch.float64)

            def cholesky():
                out[:] = [torch.cholesky_solve(torch.from_numpy(b),
                                               torch.linalg.cholesky(Kt)).numpy()]

            t = median_time(cholesky)
            r = alpha * out[0] + dense @ out[0] - b
            print(f"| {n:,} | torch Cholesky | {t:.2f} s | - | "
                  f"{float((r * r).sum()) / (n * eps * eps):.2f} | | |", flush=True)
        except ImportError:
            print(f"| {n:,} | torch Cholesky | torch not installed | | | | |")


def main(full: bool = False) -> None:
    ranges_table()
    batch_table()
    solve_table(full)


if __name__ == "__main__":
    main(full="--full" in sys.argv[1:])
