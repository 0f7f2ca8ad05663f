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
import lazymat.solve as lm_solve

from .timing import load




#: --compare: (name, precond, LOOSE_TRUNCATION); the first is the default solve.
VARIANTS = [
    ("default", "auto", "default"),
    ("Schwarz 256/0.25, tight K only", {"block_size": 256, "overlap": 0.25}, None),
    ("Schwarz 256/0.25, loose 0.01", {"block_size": 256, "overlap": 0.25}, 0.01),
    ("Schwarz 512/0.1, loose 0.05", {"block_size": 512, "overlap": 0.1}, 0.05),
    ("Schwarz 1024/0.1, loose 0.05", {"block_size": 1024, "overlap": 0.1}, 0.05),
    ("none (plain CG), loose 0.05", None, 0.05),
]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", default="10000,20000,40000")
    p.add_argument("--compare", action="store_true")
    p.add_argument("--only", default="", help="comma-separated variant numbers of --compare")
    a = p.parse_args(argv)
    eps, alpha, gamma = 1e-6, 0.1, 1 / (2 * 0.05 ** 2)
    print(f"KernelSolve scaling, Gaussian σ = 0.05, D = 3, α = {alpha}, float64, eps = {eps} "
          f"({load()}, {os.cpu_count()} cores)")
    print("| N | variant | time | iterations | refinements | rounds | setup | precond MB | "
          "kept (loose) | exact matvec |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    warm = np.random.default_rng(0).random((3000, 3))
    (-lm.Vi(warm).sqdist(lm.Vj(warm)) * gamma).exp().solve(warm[:, :1], alpha=alpha)
    runs = VARIANTS if a.compare else VARIANTS[:1]
    if a.only:
        runs = [VARIANTS[int(k)] for k in a.only.split(",")]
    default_loose = lm_solve.LOOSE_TRUNCATION
    for n in (int(s) for s in a.n.split(",")):
        rng = np.random.default_rng(2)
        x, b = rng.random((n, 3)), rng.standard_normal((n, 1))
        K = (-lm.Vi(x).sqdist(lm.Vj(x)) * gamma).exp()
        K @ b
        start = time.perf_counter()
        K @ b
        t_mv = time.perf_counter() - start
        for name, pre, loose in runs:
            lm_solve.LOOSE_TRUNCATION = default_loose if loose == "default" else loose
            info: dict = {}
            start = time.perf_counter()
            try:
                K.solve(b, alpha=alpha, eps=eps, precond=pre, info=info)
            finally:
                lm_solve.LOOSE_TRUNCATION = default_loose
            t = time.perf_counter() - start
            kept = f"{100 * info.get('kept', 1):.0f} %"
            if "kept_loose" in info and info["options"]["loose_truncation"]:
                kept += f" ({100 * info['kept_loose']:.0f} %)"
            print(f"| {n:,} | {name} | {t:.2f} s | {info['iterations']} | "
                  f"{info['refinements']} | {info['rounds']} | "
                  f"{info.get('setup_seconds', 0):.2f} s | {info.get('precond_mbytes', 0):.0f} | "
                  f"{kept} | {t_mv:.2f} s |", flush=True)
    print(f"({load()} at the end)")


if __name__ == "__main__":
    main()
