"""Local convolutions and attention against their specialists (issue 17 item 7).

``python -m benchmarks.local [--n N] [--attention-n 8192,16384] [--heads 8] [--no-attention]``

1. Radius-window point convolution: N points in the unit cube, 16 channels,
   out_i = Σ_{|x_i − y_j| < r} exp(−|x_i − y_j|²/σ²) b_j, r = 0.07 (~40 neighbours).
   ``lazymat.local.radius_sum`` (clustering, ranges and kernel: one call) against scipy's
   cKDTree route (two trees, ``sparse_distance_matrix``, the kernel on its entries, a CSR
   product), both timed from the raw points.
2. Attention, D = 64, float32: ``sumsoftmaxweight`` against
   ``torch.nn.functional.scaled_dot_product_attention`` at M = N in ``--attention-n``,
   without batch dims and with ``--heads`` heads (batch dims).

Every line prints the ratio (peer time / lazymat time: > 1 means lazymat is faster) of
medians measured in the same run, and the load.
"""

from __future__ import annotations

import argparse

import numpy as np

import lazymat as lm

from .timing import load, median_time




def radius_window(n: int, repeat: int, r: float = 0.07, sigma: float = 0.05) -> None:
    rng = np.random.default_rng(0)
    x = rng.random((n, 3), dtype=np.float32)
    b = rng.standard_normal((n, 16)).astype(np.float32)
    inv = 1.0 / sigma ** 2

    def ours():
        return lm.local.radius_sum(x, x, r, b, kernel=lambda d2: (-d2 * inv).exp())

    ours()
    t_ours = median_time(ours, repeat)
    print(f"radius window, N = {n}, 16 channels, r = {r} ({load()})")
    print(f"  lazymat.local.radius_sum        {t_ours:8.3f} s")
    try:
        from scipy.sparse import csr_matrix
        from scipy.spatial import cKDTree
    except ImportError:
        print("  (scipy is not installed: the cKDTree route is skipped)")
        return

    def tree():
        tx, ty = cKDTree(x), cKDTree(x)
        S = tx.sparse_distance_matrix(ty, r, output_type="coo_matrix")
        keep = S.data < r  # the window is open: |x - y| < r
        w = np.exp(-(S.data[keep] ** 2) * inv).astype(np.float32)
        A = csr_matrix((w, (S.row[keep], S.col[keep])), shape=(n, n))
        return A @ b

    want = tree()
    got = ours()
    err = float(np.abs(got - want).max() / np.abs(want).max())
    t_tree = median_time(tree, repeat)
    print(f"  cKDTree sparse matrix product   {t_tree:8.3f} s   ratio {t_tree / t_ours:5.2f}x"
          f"   (max rel. difference {err:.1e})")


def attention(sizes: list[int], heads: int, repeat: int, max_bytes: float) -> None:
    try:
        import torch
    except ImportError:
        print("(torch is not installed: the attention rows are skipped)")
        return
    rng = np.random.default_rng(1)
    print(f"attention, D = 64, float32, torch {torch.__version__}, "
          f"{torch.get_num_threads()} torch threads ({load()})")
    for n in sizes:
        for h in (1, heads):
            if 4 * h * n * n > max_bytes:  # CPU SDPA stores the (h, n, n) weights
                print(f"  M = N = {n:6d}, heads {h}: skipped (SDPA's weights would take "
                      f"{4 * h * n * n / 2**30:.1f} GiB; --max-gib)")
                continue
            shape = (h, n, 64) if h > 1 else (n, 64)
            q, k, v = (rng.standard_normal(shape).astype(np.float32) / (8 ** 0.5 if i < 2 else 1)
                       for i in range(3))
            tq, tk, tv = (torch.from_numpy(a) for a in (q, k, v))
            if h > 1:
                Q, Kt, V = (lm.LazyTensor(q[:, :, None, :]), lm.LazyTensor(k[:, None, :, :]),
                            lm.LazyTensor(v[:, None, :, :]))
            else:
                Q, Kt, V = lm.Vi(q), lm.Vj(k), lm.Vj(v)

            def ours():
                return (Q | Kt).sumsoftmaxweight(V, dim=len(shape) - 1)

            def sdpa():
                a, c, d = (t[None] if h == 1 else t for t in (tq, tk, tv))
                with torch.no_grad():
                    return torch.nn.functional.scaled_dot_product_attention(a, c, d,
                                                                            scale=1.0)

            ours()
            sdpa()
            rep = max(1, repeat if n * n * h <= 8192 ** 2 else 1)
            t_ours, t_sdpa = median_time(ours, rep), median_time(sdpa, rep)
            err = float(np.abs(np.asarray(ours()).reshape(-1)
                               - sdpa().numpy().reshape(-1)).max())
            print(f"  M = N = {n:6d}, heads {h}: lazymat {t_ours:7.3f} s, SDPA {t_sdpa:7.3f} s,"
                  f"  ratio {t_sdpa / t_ours:5.2f}x  (max abs. difference {err:.1e})")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=30_000)
    p.add_argument("--attention-n", default="8192,16384")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--no-attention", action="store_true")
    p.add_argument("--max-gib", type=float, default=4.0,
                   help="skip the attention cases whose SDPA weights exceed this")
    a = p.parse_args(argv)
    radius_window(a.n, a.repeat)
    if not a.no_attention:
        attention([int(s) for s in a.attention_n.split(",")], a.heads, a.repeat,
                  a.max_gib * 2**30)
    print(f"({load()} at the end)")


if __name__ == "__main__":
    main()
