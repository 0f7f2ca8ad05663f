"""KernelSolve as N grows: iterations, time and preconditioner memory (issue 17 item 5).

``python -m benchmarks.solve_scale [--n 10000,20000,40000] [--compare] [--only 0,4]``: the
problem of ``benchmarks.sparse_batch_solve`` (Gaussian K, σ = 0.05, D = 3, x uniform in
[0, 1]³, α = 0.1, b normal, float64, eps = 1e-6, the exact-K residual criterion). Each row
one variant of :data:`VARIANTS` (Schwarz block size / overlap, ``LOOSE_TRUNCATION``; the
first is the default solve): time, CG iterations, refinements against the tight block-sparse
K, exact-residual rounds, setup, preconditioner MB, kept pairs (tight, loose) and the time of
one exact matvec. Under load compare the work, in exact matvecs: iterations × kept_loose +
refinements × kept + rounds; time ≈ setup + work × matvec.
``--coarse-study 500,1000,2000`` instead measures Schwarz with exact Galerkin Nyström coarse
spaces (dense K, N <= 20000). Targets: N = 10⁵ ≤ 15 s, N = 10⁶ ≤ 10 min.
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


def coarse_study(n: int, landmarks: list[int]) -> None:
    """Schwarz alone against Schwarz plus an exact Galerkin coarse space Z = K[:, landmarks]
    (m random landmarks, E = Zᵀ A Z), added (M + Z E⁻¹ Zᵀ) or balanced ((I - Z E⁻¹ Zᵀ A) M
    (I - A Z E⁻¹ Zᵀ) + Z E⁻¹ Zᵀ): CG iterations and the preconditioned spectrum estimated
    from CG's Lanczos coefficients, with a dense float32 K (n <= 20000: 1.6 GB). A Z costs
    m matvecs, so this measures what a coarse space could give, not a practical setup."""
    from scipy.linalg import cho_factor, cho_solve, eigh_tridiagonal

    from lazymat.preconditioners import SchwarzPreconditioner, kd_order

    alpha, gamma = 0.1, 1 / (2 * 0.05 ** 2)
    rng = np.random.default_rng(2)
    x, b = rng.random((n, 3)), rng.standard_normal((n, 1))
    perm, leaves = kd_order(x, 256)
    x, b = x[perm], b[perm]

    def kern(u, v):
        return np.exp(-gamma * np.maximum(
            (u * u).sum(1)[:, None] + (v * v).sum(1)[None] - 2 * u @ v.T, 0))

    K = kern(x, x).astype(np.float32)

    def A(v):
        return alpha * v + (K @ v.astype(np.float32)).astype(np.float64)

    def pcg(P):
        xk, r = b * 0, b.copy()
        z = P(r)
        p, rz, steps, betas = z.copy(), float((r * z).sum()), [], []
        while len(steps) < 500:
            Ap = A(p)
            step = rz / float((p * Ap).sum())
            xk, r = xk + step * p, r - step * Ap
            steps.append(step)
            if float((r * r).sum()) < n * 1e-12:
                break
            z = P(r)
            rz_new = float((r * z).sum())
            betas.append(rz_new / rz)
            p, rz = z + betas[-1] * p, rz_new
        d = [1 / steps[0]] + [1 / steps[k] + betas[k - 1] / steps[k - 1]
                              for k in range(1, len(steps))]
        e = [np.sqrt(betas[k]) / steps[k] for k in range(len(steps) - 1)]
        ev = eigh_tridiagonal(np.array(d), np.array(e), eigvals_only=True)
        return f"{len(steps)} iterations, spectrum [{ev[0]:.2f}, {ev[-1]:.1f}]"

    S = SchwarzPreconditioner(lambda i: K[np.ix_(i, i)].astype(np.float64), x, leaves, alpha,
                              like=x, single=True)
    print(f"N = {n:,}: Schwarz 256/0.25 alone: {pcg(S)}", flush=True)
    for m in landmarks:
        Z = kern(x, x[np.sort(rng.choice(n, m, replace=False))])
        AZ = A(Z)
        E = cho_factor(Z.T @ AZ + 1e-12 * np.trace(Z.T @ AZ) / m * np.eye(m))

        def add(r):
            return S(r) + Z @ cho_solve(E, Z.T @ r)

        def balance(r):
            y = S(r - AZ @ cho_solve(E, Z.T @ r))
            return Z @ cho_solve(E, Z.T @ r) + y - Z @ cho_solve(E, AZ.T @ y)

        print(f"  m = {m}: additive {pcg(add)}; balancing {pcg(balance)}", flush=True)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", default="10000,20000,40000")
    p.add_argument("--compare", action="store_true")
    p.add_argument("--only", default="", help="comma-separated variant numbers of --compare")
    p.add_argument("--coarse-study", default="", metavar="M,M,...",
                   help="instead: Schwarz with exact Galerkin coarse spaces of M landmarks "
                   "(dense K, N <= 20000)")
    a = p.parse_args(argv)
    if a.coarse_study:
        for n in (int(s) for s in a.n.split(",")):
            coarse_study(n, [int(m) for m in a.coarse_study.split(",")])
        return
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
