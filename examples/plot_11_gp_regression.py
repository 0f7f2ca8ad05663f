"""
Gaussian-process / kernel ridge regression with KernelSolve
============================================================

With a Gaussian kernel :math:`k(x, y) = \\exp(-\\|x - y\\|^2 / 2\\ell^2)` and noise variance
:math:`\\sigma^2`, the posterior mean of a Gaussian process (the kernel ridge regression
predictor) at a point :math:`x_*` is

.. math::  m(x_*) = \\sum_i k(x_*, x_i)\\, a_i, \\qquad (K + \\sigma^2 \\mathrm{Id})\\, a = y,

and its posterior variance :math:`k(x_*, x_*) - k_*^\\top (K + \\sigma^2 \\mathrm{Id})^{-1} k_*`.
:class:`lazymat.KernelSolve` solves the linear system by conjugate gradient on the symbolic
N × N matrix (preconditioned by additive Schwarz on blocks of nearby points, with the blocks
of K that cannot matter skipped), so memory stays O(N); a few right-hand sides at once give the
variance at a few points.

The peers store K: ``scipy.linalg.cho_solve`` (Cholesky, exact), scikit-learn's
``KernelRidge`` (the same predictor) and GPyTorch's exact GP (CG on the dense matrix) are
compared at the N where their N × N matrix is small; lazymat then runs alone at N = 10⁴.
"""

# %%
# Noisy samples of a smooth function on the unit square
# -----------------------------------------------------
import numpy as np
from _gallery import header, median_time, need, peer, print_table, save_figure, sized

import lazymat as lm

linalg = need("scipy.linalg")
header("GP / kernel ridge regression: KernelSolve vs Cholesky, KernelRidge, GPyTorch (float64)")
rng = np.random.default_rng(0)
ELL, NOISE = 0.05, 0.2                 # kernel length scale, noise standard deviation
GAMMA, ALPHA = 1 / (2 * ELL**2), NOISE**2


def truth(x):
    return np.sin(6 * x[:, 0]) * np.cos(4 * x[:, 1]) + 0.5 * x[:, 0]


def samples(n):
    x = rng.random((n, 2))
    return x, truth(x) + NOISE * rng.standard_normal(n)


# %%
# lazymat: KernelSolve for a, then one Sum reduction for the mean
# ---------------------------------------------------------------
# The formula string is KeOps' (``KernelSolve`` is pykeops' class); ``K.solve(b, alpha=...)``
# on a LazyTensor is the same solve.
solver = lm.KernelSolve("Exp(-g * SqDist(x, y)) * a", ["g = Pm(1)", "x = Vi(2)", "y = Vj(2)",
                                                       "a = Vj(1)"], "a", axis=1)
g = np.array([GAMMA])


def fit(x, y, info=None):
    return solver(g, x, x, y[:, None], alpha=ALPHA, eps=1e-7, info=info)


def predict(x_train, a, x_test):
    """Posterior mean: K(x_test, x_train) @ a."""
    return ((-lm.Vi(x_test).sqdist(lm.Vj(x_train)) * GAMMA).exp() @ a)[:, 0]


def variance(x_train, x_few):
    """Posterior variance at a few points: one solve with one right-hand side per point
    (the LazyTensor spelling, ``K.solve``, takes an (N, P) right-hand side)."""
    k_star = np.exp(-GAMMA * ((x_train[:, None] - x_few[None]) ** 2).sum(-1))   # (N, P), P small
    K = (-lm.Vi(x_train).sqdist(lm.Vj(x_train)) * GAMMA).exp()
    v = K.solve(k_star, alpha=ALPHA, eps=1e-7)
    return 1 - (k_star * v).sum(0)


# %%
# Against the dense solvers, where K fits
# ---------------------------------------
n = sized(small=150, full=2000)
x, y = samples(n)
x_test, _ = samples(sized(100, 2000))
x_few = np.array([[0.5, 0.5], [0.1, 0.9], [0.95, 0.05], [0.3, 0.6], [0.7, 0.2]])

t_ours, mean = median_time(lambda: predict(x, fit(x, y), x_test), repeat=sized(1, 3))
t_var, var = median_time(lambda: variance(x, x_few), repeat=1, warmup=sized(0, 1))


def cholesky():
    K = np.exp(-GAMMA * ((x[:, None] - x[None]) ** 2).sum(-1))
    factor = linalg.cho_factor(K + ALPHA * np.eye(n))
    k_test = np.exp(-GAMMA * ((x_test[:, None] - x[None]) ** 2).sum(-1))
    k_few = np.exp(-GAMMA * ((x[:, None] - x_few[None]) ** 2).sum(-1))
    variance_few = 1 - (k_few * linalg.cho_solve(factor, k_few)).sum(0)
    return k_test @ linalg.cho_solve(factor, y), variance_few


t_chol, (mean_exact, var_exact) = median_time(cholesky, repeat=sized(1, 1))
err_mean = np.abs(mean - mean_exact).max() / np.abs(mean_exact).max()
err_var = np.abs(var - var_exact).max() / var_exact.max()
assert err_mean < 1e-5, f"posterior mean differs from Cholesky's by {err_mean:.1e}"
assert err_var < 1e-3, f"posterior variance differs from Cholesky's by {err_var:.1e}"
rmse = lambda m: f"{np.sqrt(np.mean((m - truth(x_test)) ** 2)):.4f}"  # noqa: E731
rows = [{"method": "lazymat KernelSolve + Sum", "seconds": t_ours,
         "rel. error vs Cholesky": f"{err_mean:.1e}", "RMSE vs truth": rmse(mean),
         "variance (5 points)": f"{t_var:.2f} s, rel. err {err_var:.0e}"},
        {"method": "scipy cho_factor/cho_solve", "seconds": t_chol,
         "rel. error vs Cholesky": "0", "RMSE vs truth": rmse(mean_exact),
         "variance (5 points)": "included"}]

kernel_ridge = peer("sklearn.kernel_ridge")
if kernel_ridge is not None:
    model = kernel_ridge.KernelRidge(alpha=ALPHA, kernel="rbf", gamma=GAMMA)
    t_kr, mean_kr = median_time(lambda: model.fit(x, y).predict(x_test), repeat=1)
    assert np.abs(mean_kr - mean_exact).max() < 1e-5 * np.abs(mean_exact).max()
    rows.append({"method": "scikit-learn KernelRidge", "seconds": t_kr,
                 "rel. error vs Cholesky": f"{np.abs(mean_kr - mean_exact).max():.1e}",
                 "RMSE vs truth": rmse(mean_kr), "variance (5 points)": "-"})
else:
    rows.append({"method": "scikit-learn KernelRidge", "seconds": None})

gpytorch = peer("gpytorch")
if gpytorch is not None:
    import torch

    class ExactGP(gpytorch.models.ExactGP):
        def __init__(self, x, y, likelihood):
            super().__init__(x, y, likelihood)
            self.mean_module = gpytorch.means.ZeroMean()
            self.covar_module = gpytorch.kernels.RBFKernel()

        def forward(self, x):
            return gpytorch.distributions.MultivariateNormal(self.mean_module(x),
                                                             self.covar_module(x))

    def with_gpytorch():
        X, Y = torch.from_numpy(x), torch.from_numpy(y)
        likelihood = gpytorch.likelihoods.GaussianLikelihood().double()
        likelihood.noise = ALPHA
        model = ExactGP(X, Y, likelihood).double()
        model.covar_module.lengthscale = ELL
        model.eval()
        likelihood.eval()
        with torch.no_grad():
            return model(torch.from_numpy(x_test)).mean.numpy()

    # one call, no warm-up (tens of seconds here; GPyTorch compiles nothing)
    t_gp, mean_gp = median_time(with_gpytorch, repeat=1, warmup=0)
    err_gp = np.abs(mean_gp - mean_exact).max() / np.abs(mean_exact).max()
    assert err_gp < 0.05, f"GPyTorch's mean is off by {err_gp:.1e}"
    rows.append({"method": "GPyTorch ExactGP (dense, CG)", "seconds": t_gp,
                 "rel. error vs Cholesky": f"{err_gp:.1e}", "RMSE vs truth": rmse(mean_gp),
                 "variance (5 points)": "-"})
else:
    rows.append({"method": "GPyTorch ExactGP", "seconds": None})
print_table(f"GP posterior mean, N = {n:,} samples, {len(x_test):,} test points "
            f"(l = {ELL}, sigma = {NOISE}, float64)", rows)

# %%
# lazymat alone at N = 10⁴
# ------------------------
# (K would take 800 MB in float64, its Cholesky factor as much again.) The check: the
# residual of the system, on a few hundred rows computed densely.
n = sized(small=300, full=10_000)
x, y = samples(n)
info = {}
t_fit, a = median_time(lambda: fit(x, y, info), repeat=1)
rows_check = rng.choice(n, 300, replace=False)
k_rows = np.exp(-GAMMA * ((x[rows_check, None] - x[None]) ** 2).sum(-1))
residual = np.abs(k_rows @ a[:, 0] + ALPHA * a[rows_check, 0] - y[rows_check]).max()
assert residual < 1e-5, f"KernelSolve's residual is {residual:.1e}"
side = np.linspace(0, 1, sized(40, 120))
grid = np.stack(np.meshgrid(side, side), -1).reshape(-1, 2)
t_pred, surface = median_time(lambda: predict(x, a, grid), repeat=sized(1, 3))
print_table(f"KernelSolve at N = {n:,} (lazymat only)", [
    {"method": "lazymat KernelSolve", "seconds": t_fit,
     "iterations": info.get("iterations", "-"),
     "preconditioner setup": f"{info.get('setup_seconds', 0):.1f} s",
     "max residual (300 dense rows)": f"{residual:.1e}"},
    {"method": f"posterior mean on a {len(side)}² grid", "seconds": t_pred, "iterations": "-",
     "max residual (300 dense rows)": "-"}])

# %%
# The fit
# -------
import matplotlib.pyplot as plt  # noqa: E402

fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
extent = (0, 1, 0, 1)
shown = axes[0].imshow(truth(grid).reshape(len(side), -1), origin="lower", extent=extent,
                       cmap="coolwarm", vmin=-1.2, vmax=1.7)
axes[0].set_title("true function")
axes[1].scatter(*x[:3000].T, c=y[:3000], s=2, cmap="coolwarm", vmin=-1.2, vmax=1.7)
axes[1].set_title(f"noisy samples ({min(n, 3000):,} of {n:,})")
axes[1].set_aspect("equal")
axes[2].imshow(surface.reshape(len(side), -1), origin="lower", extent=extent, cmap="coolwarm",
               vmin=-1.2, vmax=1.7)
axes[2].set_title("posterior mean (lazymat KernelSolve)")
fig.colorbar(shown, ax=axes, fraction=0.02)
save_figure(fig, "fit")
