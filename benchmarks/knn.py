"""Exact k-NN in low dimension: lazymat's pruned k-NN against trees and brute force.

``python -m benchmarks.knn [--n N] [--k K] [--faiss-n NF] [--high-d D]``: uniform points in
the unit cube, M = N queries, float32, K = 10. Rows: ``lazymat.local.knn`` (grid-pruned,
exact), lazymat brute force (``Vi(x).sqdist(Vj(y)).Kmin_argKmin``), scikit-learn
``KDTree`` (build + query), faiss ``IndexFlatL2`` (brute force, measured at NF points and
scaled by (N/NF)², its cost being M·N) and, at D = ``--high-d``, the pruned call against
brute force (the pruning must switch itself off there). Every row prints its ratio to the
pruned k-NN, measured in the same run; the results of the pruned call are checked
against KDTree's indices. Target (issue 17 item 3): ≥ 3× KDTree and faiss at N = 10⁶.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

import lazymat as lm

from .timing import load, median_time




def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=100_000)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--dim", type=int, default=3)
    p.add_argument("--faiss-n", type=int, default=20_000)
    p.add_argument("--brute-n", type=int, default=100_000,
                   help="lazymat brute force at min(N, this), scaled by (N/n)^2")
    p.add_argument("--high-d", type=int, default=32)
    p.add_argument("--repeat", type=int, default=3)
    a = p.parse_args(argv)
    rng = np.random.default_rng(0)
    N, K, D = a.n, a.k, a.dim
    x = rng.random((N, D), dtype=np.float32)
    y = rng.random((N, D), dtype=np.float32)
    print(f"exact k-NN, D = {D}, M = N = {N}, K = {K}, float32 ({load()}, "
          f"{os.cpu_count()} cores)")
    lm.local.knn(x[:50_000], y[:50_000], K)  # compile outside the timings
    t_pruned = median_time(lambda: lm.local.knn(x, y, K), a.repeat)
    _, idx = lm.local.knn(x, y, K)
    rows = [("lazymat.local.knn (pruned)", t_pruned, "")]

    nb = min(N, a.brute_n)
    f = lm.Vi(x[:nb]).sqdist(lm.Vj(y[:nb]))
    f.Kmin_argKmin(K, dim=1)
    t = median_time(lambda: f.Kmin_argKmin(K, dim=1), 1) * (N / nb) ** 2
    rows.append(("lazymat brute force", t, "" if nb == N else f"(at {nb}, x (N/n)^2)"))
    try:
        from sklearn.neighbors import KDTree
    except ImportError:
        print("(scikit-learn is not installed: pip install 'lazymat[bench]')")
    else:
        t = median_time(lambda: KDTree(y).query(x, k=K), a.repeat)
        _, tree_idx = KDTree(y).query(x, k=K)
        same = float((tree_idx == idx).mean())
        rows.append(("sklearn KDTree (build + query)", t, f"same indices: {same:.6f}"))
    try:
        import faiss
    except ImportError:
        print("(faiss is not installed: pip install 'lazymat[bench]')")
    else:
        nf = min(N, a.faiss_n)

        def flat() -> None:
            index = faiss.IndexFlatL2(D)
            index.add(y[:nf])
            index.search(x[:nf], K)

        t = median_time(flat, 1) * (N / nf) ** 2
        rows.append(("faiss IndexFlatL2", t, "" if nf == N else f"(at {nf}, x (N/n)^2)"))
    print(f"{'':34s} {'seconds':>9s} {'÷ pruned':>9s}")
    for name, t, note in rows:
        print(f"{name:34s} {t:9.3f} {t / t_pruned:8.2f}x  {note}")

    Dh = a.high_d
    nh = min(N, 20_000)
    xh = rng.random((nh, Dh), dtype=np.float32)
    yh = rng.random((nh, Dh), dtype=np.float32)
    fh = lm.Vi(xh).sqdist(lm.Vj(yh))
    fh.Kmin_argKmin(K, dim=1)
    lm.local.knn(xh, yh, K)
    tb = median_time(lambda: fh.Kmin_argKmin(K, dim=1), a.repeat)
    tp = median_time(lambda: lm.local.knn(xh, yh, K), a.repeat)
    print(f"D = {Dh}, M = N = {nh}: pruned {tp:.3f} s, brute force {tb:.3f} s "
          f"(pruned / brute = {tp / tb:.2f}; the pruning is off above D = "
          f"{lm.local.MAX_PRUNED_DIM})")
    D8 = min(lm.local.MAX_PRUNED_DIM, Dh)
    x8, y8 = xh[:, :D8].copy(), yh[:, :D8].copy()
    f8 = lm.Vi(x8).sqdist(lm.Vj(y8))
    f8.Kmin_argKmin(K, dim=1)
    lm.local.knn(x8, y8, K)
    tb = median_time(lambda: f8.Kmin_argKmin(K, dim=1), a.repeat)
    start = time.perf_counter()
    lm.local.knn(x8, y8, K)
    tp = time.perf_counter() - start
    print(f"D = {D8} (the largest D still tried), M = N = {nh}: pruned {tp:.3f} s, brute "
          f"force {tb:.3f} s (pruned / brute = {tp / tb:.2f})")
    print(f"({load()} at the end)")


if __name__ == "__main__":
    main()
