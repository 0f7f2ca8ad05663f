r"""
Non-uniform Fourier transform: exact sums vs FINUFFT
====================================================

The type-1 non-uniform discrete Fourier transform of strengths c_j at points x_j,

.. math:: \hat f_k = \sum_j c_j\, e^{i\, k \cdot x_j}, \qquad k \in \mathbb{Z}^d,\ |k_n| \le N_n/2,

is a complex Sum reduction: with lazymat, ``((Vi(k) | Vj(x)).exp1j() * Vj(c)).sum(dim=1)``,
O(M·N) operations and exact to rounding. FINUFFT (the Flatiron Institute's NUFFT) spreads the
points onto a fine grid and uses an FFT: O(M + N log N) at a tolerance ``eps`` that the user
picks. We compare both, in 1-D and 2-D, for several tolerances (time and error), and find
where each is the right tool: the exact sum wins for few modes (or a few arbitrary
frequencies), for exactness, and for formulas FINUFFT does not cover; FINUFFT wins as soon as
there are many modes.
"""

# %%
# Setup: M points in [-π, π)^d with complex strengths; the modes in FINUFFT's order.

import numpy as np
from _gallery import check_close, header, median_time, peer, print_table, save_figure, sized

import lazymat as lm

finufft = peer("finufft")
header("Non-uniform Fourier transform (type 1): exact sum vs FINUFFT")
rng = np.random.default_rng(0)
M = sized(small=2000, full=20_000)
TOLERANCES = [1e-3, 1e-6, 1e-9, 1e-12]


def modes(n):
    """The integer frequencies -n/2 <= k <= (n-1)/2, ascending (FINUFFT's default order)."""
    return np.arange(-(n // 2), n - n // 2, dtype=np.float64)


def nudft_lazymat(k, x, c):
    """Exact sum: k (N, d) frequencies, x (M, d) points, c (M,) complex strengths."""
    return ((lm.Vi(k) | lm.Vj(x)).exp1j() * lm.Vj(c[:, None])).sum(dim=1).ravel()


def relative_l2(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


x1 = rng.uniform(-np.pi, np.pi, (M, 1))
c = rng.standard_normal(M) + 1j * rng.standard_normal(M)

# %%
# Correctness of the exact sum: against a dense numpy evaluation on a few modes, float64.

k = modes(sized(small=64, full=256))[:, None]
exact = nudft_lazymat(k, x1, c)
rows = rng.choice(len(k), 16, replace=False)
dense = np.exp(1j * k[rows] @ x1.T) @ c
check_close(exact[rows], dense, 1e-11, "lazymat exact sum vs dense numpy (float64)")

# %%
# 1-D: time and error against the float64 exact sum, as the number of modes N grows.
# lazymat float32 (complex64) is the fast exact sum; its error is float32 rounding of the
# phases k·x, which grows with N.

table, curves = [], {"lazymat float64": [], "lazymat float32": []}
curves.update({f"FINUFFT eps={eps:.0e}": [] for eps in TOLERANCES})
N_MODES = sized(small=[16, 256], full=[16, 128, 1024, 4096])
x1_32, c_32 = x1.astype(np.float32), c.astype(np.complex64)
x1_flat = np.ascontiguousarray(x1[:, 0])  # FINUFFT wants contiguous 1-D coordinates
for n in N_MODES:
    k = modes(n)[:, None]
    t, exact = median_time(lambda: nudft_lazymat(k, x1, c))
    table.append({"case": f"1-D N={n}", "method": "lazymat exact float64", "seconds": t,
                  "rel. error": "reference"})
    curves["lazymat float64"].append(t)
    k32 = k.astype(np.float32)
    t, approx = median_time(lambda: nudft_lazymat(k32, x1_32, c_32))
    err = relative_l2(approx, exact)
    # float32 phases k·x of size up to N·π carry an absolute error ~ N·π·6e-8
    assert err < 1e-6 * n + 1e-5, f"lazymat float32 error {err:.2e}"
    table.append({"case": f"1-D N={n}", "method": "lazymat exact float32", "seconds": t,
                  "rel. error": err})
    curves["lazymat float32"].append(t)
    if finufft is None:
        continue
    for eps in TOLERANCES:
        t, approx = median_time(lambda: finufft.nufft1d1(x1_flat, c, n, eps=eps))
        err = relative_l2(approx, exact)
        assert err < 100 * eps + 1e-13, f"FINUFFT error {err:.2e} at eps={eps:.0e}"
        table.append({"case": f"1-D N={n}", "method": f"FINUFFT eps={eps:.0e}", "seconds": t,
                      "rel. error": err})
        curves[f"FINUFFT eps={eps:.0e}"].append(t)
print_table(f"1-D type-1 NUFFT, M = {M:,} points (ratios to lazymat float64, same N)", table)

# %%
# A few arbitrary frequencies (type 3: non-integer, say the 8 peaks of a spectrum to refine):
# the exact sum costs M·8 operations, FINUFFT's type 3 still builds its fine grid.

s3 = rng.uniform(-3 * M ** 0.5, 3 * M ** 0.5, (8, 1))
t, exact3 = median_time(lambda: nudft_lazymat(s3, x1, c))
check_close(exact3, np.exp(1j * s3 @ x1.T) @ c, 1e-11, "type-3 exact sum vs dense numpy")
table = [{"method": "lazymat exact float64", "seconds": t, "rel. error": "reference"}]
if finufft is not None:
    s3_flat = np.ascontiguousarray(s3[:, 0])
    for eps in (1e-6, 1e-12):
        t, approx = median_time(lambda: finufft.nufft1d3(x1_flat, c, s3_flat, eps=eps))
        err = relative_l2(approx, exact3)
        assert err < 100 * eps + 1e-13, f"FINUFFT type-3 error {err:.2e} at eps={eps:.0e}"
        table.append({"method": f"FINUFFT type 3, eps={eps:.0e}", "seconds": t,
                      "rel. error": err})
print_table(f"1-D type-3 NUFFT: 8 arbitrary frequencies, M = {M:,} points", table)

# %%
# 2-D: an N×N grid of modes from M scattered samples (say, an MRI k-space trajectory).

n2 = sized(small=16, full=64)
x2 = rng.uniform(-np.pi, np.pi, (M, 2))
x2_a, x2_b = np.ascontiguousarray(x2[:, 0]), np.ascontiguousarray(x2[:, 1])
k1 = modes(n2)
k2 = np.stack(np.meshgrid(k1, k1, indexing="ij"), -1).reshape(-1, 2)  # (n2*n2, 2), x fastest
t, exact2 = median_time(lambda: nudft_lazymat(k2, x2, c))
sub = rng.choice(len(k2), 16, replace=False)
check_close(exact2[sub], np.exp(1j * k2[sub] @ x2.T) @ c, 1e-11, "2-D exact sum vs dense numpy")
table = [{"method": "lazymat exact float64", "seconds": t, "rel. error": "reference"}]
t, approx = median_time(lambda: nudft_lazymat(k2.astype(np.float32), x2.astype(np.float32),
                                              c.astype(np.complex64)))
table.append({"method": "lazymat exact float32", "seconds": t,
              "rel. error": relative_l2(approx, exact2)})
if finufft is not None:
    for eps in TOLERANCES:
        t, approx = median_time(lambda: finufft.nufft2d1(x2_a, x2_b, c, (n2, n2), eps=eps))
        err = relative_l2(approx.reshape(-1), exact2)
        assert err < 100 * eps + 1e-13, f"FINUFFT 2-D error {err:.2e} at eps={eps:.0e}"
        table.append({"method": f"FINUFFT eps={eps:.0e}", "seconds": t, "rel. error": err})
print_table(f"2-D type-1 NUFFT, M = {M:,} points, {n2}×{n2} modes", table)

# %%
# The picture: time against the number of modes in 1-D. The exact sum costs M·N; FINUFFT
# costs about the same whatever N, more for a tighter tolerance: the lines cross.

import matplotlib.pyplot as plt  # noqa: E402

fig, ax = plt.subplots(figsize=(6, 4))
for name, ts in curves.items():
    if ts:
        ax.loglog(N_MODES, ts, "o-" if name.startswith("lazymat") else "x--", label=name)
ax.set_xlabel("number of modes N")
ax.set_ylabel("time (s, median)")
ax.set_title(f"1-D type-1 NUFFT, M = {M:,} points")
ax.grid(True, which="both", alpha=0.3)
ax.legend(fontsize=8)
save_figure(fig, "timings")
