"""KernelSolve as N grows: iterations, time and preconditioner memory (issue 17 item 5).

``python -m benchmarks.solve_scale [--n 10000,20000,40000] [--compare]``: the problem of
``benchmarks.sparse_batch_solve`` (Gaussian K, σ = 0.05, D = 3, x uniform in [0, 1]³,
α = 0.1, b normal, float64, eps = 1e-6, the exact-K residual criterion). Each row: the
default solve (additive Schwarz on k-d blocks, float32 block inverses, block-sparse
matvecs); ``--compare`` adds plain CG on block-sparse matvecs (``precond=None``). Prints the time, CG iterations, exact-residual rounds,
setup, preconditioner MB, kept pairs and the time of one exact matvec, so that larger N
can be extrapolated: time ≈ setup + iterations × (kept × matvec) + rounds × matvec.
Targets: N = 10⁵ ≤ 15 s, iterations flat in N, preconditioner < 1.35 GB at 10⁵.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

import lazymat as lm

from .timing import load




def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", default="10000,20000,40000")
    p.add_argument("--compare", action="store_true")
    a = p.parse_args(argv)
    eps, alpha, gamma = 1e-6, 0.1, 1 / (2 * 0.05 ** 2)
    print(f"KernelSolve scaling, Gaussian σ = 0.05, D = 3, α = {alpha}, float64, eps = {eps} "
          f"({load()}, {os.cpu_count()} cores)")
    print("| N | preconditioner | time | iterations | rounds | setup | precond MB | kept | "
          "exact matvec |")
    print("|---|---|---|---|---|---|---|---|---|")
    warm = np.random.default_rng(0).random((3000, 3))
    (-lm.Vi(warm).sqdist(lm.Vj(warm)) * gamma).exp().solve(warm[:, :1], alpha=alpha)
    for n in (int(s) for s in a.n.split(",")):
        rng = np.random.default_rng(2)
        x, b = rng.random((n, 3)), rng.standard_normal((n, 1))
        K = (-lm.Vi(x).sqdist(lm.Vj(x)) * gamma).exp()
        K @ b
        start = time.perf_counter()
        K @ b
        t_mv = time.perf_counter() - start
        runs = [("Schwarz", "auto")]
        if a.compare:
            runs.append(("none (plain CG)", None))
        for name, pre in runs:
            info: dict = {}
            start = time.perf_counter()
            K.solve(b, alpha=alpha, eps=eps, precond=pre, info=info)
            t = time.perf_counter() - start
            print(f"| {n:,} | {name} | {t:.2f} s | {info['iterations']} | {info['rounds']} | "
                  f"{info.get('setup_seconds', 0):.2f} s | {info.get('precond_mbytes', 0):.0f} | "
                  f"{100 * info.get('kept', 1):.0f} % | {t_mv:.2f} s |", flush=True)
    print(f"({load()} at the end)")


if __name__ == "__main__":
    main()
