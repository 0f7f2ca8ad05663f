r"""
Legendre–Fenchel transform with a Max reduction
===============================================

The convex conjugate :math:`f^*(s) = \max_x\, \langle s, x\rangle - f(x)` appears in convex
optimisation (dual problems, proximal operators), in optimal transport (the c-transform), in
Hamilton–Jacobi equations (the Hopf–Lax formula) and in thermodynamics. On samples
:math:`(x_j, f(x_j))` it is a ``Max`` reduction over j of a formula that is linear in s: with
lazymat, ``(Vi(s) | Vj(x)) - Vj(fx)).max(dim=1)``.

1. **On a point cloud**: M slopes s_i against N scattered samples, O(M·N), no M×N matrix.
2. **On a grid, separably**: on an n×n grid the maximum over x = (x₁, x₂) splits into a
   maximum over x₂ along every line (one batched reduction, a batch dim over the lines), then
   a maximum over x₁ along every column: O(n³) instead of O(n⁴) — for any f, separable or not.

We check both against the exact conjugate of a known function, the anisotropic quadratic
:math:`f(x) = \tfrac12 x^\top A x`, whose conjugate is :math:`f^*(s) = \tfrac12 s^\top A^{-1}s`,
and the discrete results against dense numpy; the peer is dense numpy (chunked broadcasting),
which is what one would write (no standard library has a Legendre transform).
"""

# %%
# Setup: the quadratic f, its exact conjugate, samples in the box [-2, 2]².

import numpy as np
from _gallery import check_close, header, median_time, print_table, save_figure, sized

import lazymat as lm
from lazymat import LazyTensor

header("Legendre–Fenchel transform with a Max reduction (float64)")
rng = np.random.default_rng(0)
A = np.array([[2.0, 0.9], [0.9, 1.0]])
A_inv = np.linalg.inv(A)
BOX = 2.0


def f(x):
    return 0.5 * np.einsum("...i,ij,...j->...", x, A, x)


def f_star(s):
    return 0.5 * np.einsum("...i,ij,...j->...", s, A_inv, s)


def in_reach(s, margin=0.1):
    """Slopes whose maximiser A⁻¹s lies inside the sampled box (elsewhere the discrete
    conjugate is that of f restricted to the box, a different function)."""
    return np.all(np.abs(s @ A_inv.T) < BOX - margin, axis=-1)


# %%
# 1. On a point cloud: N random samples of f, M random slopes.

M, N = sized(small=(500, 4000), full=(10_000, 100_000))
x = rng.uniform(-BOX, BOX, (N, 2))
fx = f(x)[:, None]
s = rng.uniform(-2.5, 2.5, (M, 2))


def conjugate_lazymat(s, x, fx):
    return ((lm.Vi(s) | lm.Vj(x)) - lm.Vj(fx)).max(dim=1).ravel()


def conjugate_numpy(s, x, fx, chunk=256):
    """Dense numpy, by chunks of slopes so that the chunk×N matrix fits."""
    return np.concatenate([(s[a:a + chunk] @ x.T - fx.T).max(1) for a in range(0, len(s), chunk)])


t, g = median_time(lambda: conjugate_lazymat(s, x, fx))
t_np, g_np = median_time(lambda: conjugate_numpy(s, x, fx), repeat=sized(1, 1))
check_close(g, g_np, 1e-12, "point cloud: lazymat vs dense numpy")
ok = in_reach(s)
gap = f_star(s[ok]) - g[ok]  # >= 0: a maximum over samples is below the supremum
assert gap.min() > -1e-9, "a discrete conjugate exceeds the exact one"
typical_spacing = BOX * 2 / np.sqrt(N)
assert np.median(gap) < 2 * typical_spacing**2 * np.linalg.eigvalsh(A).max(), \
    f"the discrete conjugate is far from the exact one (median gap {np.median(gap):.2e})"
print(f"  exact conjugate minus discrete: median {np.median(gap):.2e}, max {gap.max():.2e} "
      f"(N = {N:,} samples)")
print_table(f"Legendre transform on a point cloud, M = {M:,} slopes, N = {N:,} samples", [
    {"method": "lazymat Max", "seconds": t, "median gap to f*": f"{np.median(gap):.2e}"},
    {"method": "numpy, 256-row chunks", "seconds": t_np, "median gap to f*": "same"}])

# %%
# 2. On an n×n grid, separably. ``F[a, b] = f(x₁[a], x₂[b])``; slopes on an n×n grid too.
# Pass 1 (batch dim a over the lines): ``G[a, i] = max_b s₂[i] x₂[b] - F[a, b]``.
# Pass 2 (batch dim i over the columns): ``f*[k, i] = max_a s₁[k] x₁[a] + G[a, i]``.

n = sized(small=64, full=512)
grid = np.linspace(-BOX, BOX, n)
slopes = np.linspace(-2.5, 2.5, n)
F = f(np.stack(np.meshgrid(grid, grid, indexing="ij"), -1))  # (n, n): F[a, b]


def separable_lazymat(F):
    s_i = LazyTensor(slopes[None, :, None, None])  # i: slopes, shared by every batch
    x_j = LazyTensor(grid[None, None, :, None])    # j: grid points, shared by every batch
    G = (s_i * x_j - LazyTensor(F[:, None, :, None])).max(dim=2)[..., 0]       # (a, i)
    H = (s_i * x_j + LazyTensor(G.T[:, None, :, None])).max(dim=2)[..., 0]     # (i, k)
    return H.T                                                                 # (k, i)


def separable_numpy(F):
    G = np.stack([(slopes[:, None] * grid[None, :] - F[a][None, :]).max(1) for a in range(n)])
    return np.stack([(slopes[:, None] * grid[None, :] + G[:, i][None, :]).max(1)
                     for i in range(n)]).T


t_sep, H = median_time(lambda: separable_lazymat(F))
t_sep_np, H_np = median_time(lambda: separable_numpy(F), repeat=sized(1, 1))
check_close(H, H_np, 1e-12, "grid: separable lazymat vs separable numpy")
S = np.stack(np.meshgrid(slopes, slopes, indexing="ij"), -1)  # S[k, i] = (s₁[k], s₂[i])
ok = in_reach(S)
h = grid[1] - grid[0]
grid_gap = f_star(S)[ok] - H[ok]
bound = np.linalg.eigvalsh(A).max() * 2 * (h / 2) ** 2 / 2  # worst rounding to the grid
assert grid_gap.min() > -1e-9 and grid_gap.max() <= bound + 1e-12, \
    f"grid conjugate off: gap in [{grid_gap.min():.2e}, {grid_gap.max():.2e}], bound {bound:.2e}"
print(f"  grid: exact minus discrete in [{grid_gap.min():.1e}, {grid_gap.max():.1e}] "
      f"<= h² bound {bound:.1e}")

# the brute-force maximum over all n² grid points for every slope: O(n⁴)
n_brute = sized(small=64, full=128)
xb = np.stack(np.meshgrid(grid, grid, indexing="ij"), -1).reshape(-1, 2)
if n_brute == n:
    t_brute, Hb = median_time(lambda: conjugate_lazymat(S.reshape(-1, 2), xb, F.reshape(-1, 1)))
    check_close(Hb.reshape(n, n), H, 1e-12, "grid: brute force vs separable")
    brute_note = f"n = {n}"
else:  # time the brute force on a coarser grid and scale it as n⁴
    sub = slice(None, None, n // n_brute)
    xs = np.stack(np.meshgrid(grid[sub], grid[sub], indexing="ij"), -1).reshape(-1, 2)
    Ss = np.stack(np.meshgrid(slopes[sub], slopes[sub], indexing="ij"), -1).reshape(-1, 2)
    t_small, _ = median_time(lambda: conjugate_lazymat(Ss, xs, F[sub, sub].reshape(-1, 1)),
                             repeat=1)
    t_brute = t_small * (n / n_brute) ** 4
    brute_note = f"timed at n = {n_brute}, times (n/{n_brute})⁴"
print_table(f"Legendre transform on a {n}×{n} grid ({n * n:,} slopes)", [
    {"method": "lazymat separable (2 batched Max)", "seconds": t_sep, "cost": "O(n³)"},
    {"method": "numpy separable (loops of dense max)", "seconds": t_sep_np, "cost": "O(n³)"},
    {"method": "lazymat brute force (one Max)", "seconds": t_brute, "cost": "O(n⁴)",
     "note": brute_note}])

# %%
# The picture: f, its discrete conjugate on the grid, and the gap to the exact conjugate
# (zero up to the grid's rounding where A⁻¹s lies inside the box).

import matplotlib.pyplot as plt  # noqa: E402

fig, axes = plt.subplots(1, 3, figsize=(11, 3.4))
ext_x, ext_s = [-BOX, BOX, -BOX, BOX], [slopes[0], slopes[-1], slopes[0], slopes[-1]]
for ax, data, ext, title in [
        (axes[0], F, ext_x, "f(x) = ½ xᵀAx on the grid"),
        (axes[1], H, ext_s, "discrete conjugate f*(s)"),
        (axes[2], np.where(ok, f_star(S) - H, np.nan), ext_s, "exact f* minus discrete")]:
    im = ax.imshow(data.T, origin="lower", extent=ext, cmap="viridis")
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, shrink=0.8)
save_figure(fig, "conjugate")
