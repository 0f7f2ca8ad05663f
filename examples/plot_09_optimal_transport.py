"""
Optimal transport: Sinkhorn in the log domain and the C-transform
==================================================================

Moving a cloud of points :math:`x_i` (weights :math:`a_i`) onto a cloud :math:`y_j` (weights
:math:`b_j`) at the least total cost :math:`C(x, y) = \\|x - y\\|^2 / 2` is an optimal transport
problem. Its entropic relaxation is solved by Sinkhorn's algorithm, whose two steps are
*soft-min* reductions of the symbolic cost matrix — LogSumExp reductions:

.. math::  f_i = -\\varepsilon \\log \\sum_j \\exp\\big(\\log b_j + (g_j - C(x_i, y_j))/\\varepsilon\\big),
           \\qquad g_j = \\text{the same over } i.

Starting with a large ε and dividing it by 2 at every step (ε-scaling, as GeomLoss does) makes
a few dozen reductions enough. The hard-min version of the same step is the **C-transform**,
a Min reduction: :math:`f^c_i = \\min_j C(x_i, y_j) - g_j`. Applied to Sinkhorn's potential it
gives a pair with :math:`f^c_i + g^c_j \\le C(x_i, y_j)`, hence a *certified lower bound* on the
exact transport cost.

With 10⁵ points each side the 10⁵ × 10⁵ cost matrix (40 GB in float32) is never stored; POT's
dense Sinkhorn, its exact network simplex and GeomLoss's tensorized backend are compared where
their dense matrices fit. The full-size run streams over 10¹⁰ pairs per reduction, 25
times (and twice more for the bound): 3.6 minutes on two shared cores (measured at load
average 6.5), the longest script of the gallery.
"""

# %%
# Two point clouds: a crescent moved onto three blobs
# ----------------------------------------------------
import numpy as np
import torch
from _gallery import format_bytes, header, median_time, peer, print_table, save_figure, sized

import lazymat as lm

header("Optimal transport: log-domain Sinkhorn with eps-scaling and the C-transform")
rng = np.random.default_rng(0)


def crescent(n):
    t = rng.uniform(0.15 * np.pi, 1.85 * np.pi, n)
    r = 1.0 + 0.15 * rng.standard_normal(n)
    return np.stack([r * np.cos(t) - 0.5, r * np.sin(t)], 1).astype(np.float32)


def blobs(n):
    centres = np.array([[1.2, 0.9], [1.6, -0.6], [0.4, -1.3]], dtype=np.float32)
    return (centres[rng.integers(0, 3, n)] + 0.2 * rng.standard_normal((n, 2))).astype(np.float32)


# %%
# Sinkhorn with ε-scaling: every step is one LogSumExp reduction
# ---------------------------------------------------------------
# ``eps`` is a Python float, i.e. a parameter of the formula: changing it at every step does
# not compile a new kernel. The same kernel serves both directions (x→y and y→x).


def softmin(x, y, h, eps):
    """-eps log sum_j exp(h_j - |x_i - y_j|^2 / (2 eps)) for every i, with h = log b + g / eps."""
    cost = lm.Vi(x).sqdist(lm.Vj(y)) * (0.5 / eps)
    return -eps * (lm.Vj(h[:, None]) - cost).logsumexp(dim=1)[:, 0]


def eps_schedule(diameter, blur, scaling):
    """GeomLoss's schedule for p = 2: diameter^2, then geometric steps down to blur^2."""
    steps = np.arange(2 * np.log(diameter), 2 * np.log(blur), 2 * np.log(scaling))
    return [float(e) for e in (diameter**2, *np.exp(steps), blur**2)]


def sinkhorn(x, a, y, b, blur, scaling, diameter, n_final=3):
    """Potentials (f, g) of entropic OT at eps = blur^2 after eps-scaling, as GeomLoss does:
    one pair of updates per eps, then ``n_final`` more at the last one. Also the L1 error of
    the plan's column sums (its rows sum to a exactly after the last f-update)."""
    log_a, log_b = np.log(a), np.log(b)
    g = np.zeros(len(y), dtype=x.dtype)
    schedule = eps_schedule(diameter, blur, scaling)
    for eps in schedule + [schedule[-1]] * n_final:
        f = softmin(x, y, log_b + g / eps, eps)
        g_next = softmin(y, x, log_a + f / eps, eps)
        error, g = np.abs(b * np.expm1((g - g_next) / eps)).sum(), g_next
    f = softmin(x, y, log_b + g / eps, eps)
    # columns of the plan sum to b_j exp((g_j - g_next_j) / eps) with g_next the next update
    return f, g, eps, float(error), len(schedule) + n_final


def c_transform_bound(x, a, y, b, g):
    """Exact C-transforms (two Min reductions): a lower bound <a, f^c> + <b, g^c> of OT."""
    f_c = (lm.Vi(x).sqdist(lm.Vj(y)) * 0.5 - lm.Vj(g[:, None])).min(dim=1)[:, 0]
    g_c = (lm.Vi(y).sqdist(lm.Vj(x)) * 0.5 - lm.Vj(f_c[:, None])).min(dim=1)[:, 0]
    return float(a @ f_c + b @ g_c)


def barycentric_map(x, y, b, g, eps):
    """Where the plan sends each x_i: sum_j pi_ij y_j / a_i (a SumSoftMaxWeight)."""
    cost = lm.Vi(x).sqdist(lm.Vj(y)) * (0.5 / eps)
    return (lm.Vj((np.log(b) + g / eps)[:, None]) - cost).sumsoftmaxweight(lm.Vj(y), dim=1)


def solve(x, y, blur=0.05, scaling=0.5):
    a = np.full(len(x), 1 / len(x), dtype=np.float32)
    b = np.full(len(y), 1 / len(y), dtype=np.float32)
    both = np.concatenate([x, y])
    diameter = float(np.linalg.norm(both.max(0) - both.min(0)))
    f, g, eps, error, steps = sinkhorn(x, a, y, b, blur, scaling, diameter)
    return dict(a=a, b=b, f=f, g=g, eps=eps, error=error, steps=steps, diameter=diameter,
                dual=float(a @ f + b @ g))


# %%
# A dense check of the same iterations, and the peers where the dense matrix fits
# --------------------------------------------------------------------------------
# The dual value <a, f> + <b, g> estimates the exact OT cost (here within a fraction of a
# percent); the C-transform bound is below it, certifiably.
ot = peer("ot")
geomloss = peer("geomloss")

n_peer = sized(small=150, full=2000)
x, y = crescent(n_peer), blobs(n_peer)
t_ours, ours = median_time(lambda: solve(x, y), repeat=sized(1, 3))
a, b, f, g, eps = (ours[k] for k in ("a", "b", "f", "g", "eps"))
t_bound, bound = median_time(lambda: c_transform_bound(x, a, y, b, g), repeat=sized(1, 3))

# The same Sinkhorn iterations on the dense matrix (float64 torch): the potentials agree.
X, Y = torch.from_numpy(x).double(), torch.from_numpy(y).double()
C = torch.cdist(X, Y) ** 2 / 2
log_a, log_b = torch.from_numpy(np.log(a)).double(), torch.from_numpy(np.log(b)).double()
g_dense = torch.zeros(len(y), dtype=torch.float64)
schedule = eps_schedule(ours["diameter"], 0.05, 0.5)
for e in schedule + [eps] * (ours["steps"] - len(schedule)):
    f_dense = -e * torch.logsumexp(log_b + (g_dense - C) / e, 1)
    g_dense = -e * torch.logsumexp(log_a[:, None] + (f_dense[:, None] - C) / e, 0)
f_dense = -eps * torch.logsumexp(log_b + (g_dense - C) / eps, 1)
assert np.abs(f - f_dense.numpy()).max() < 1e-3, "Sinkhorn potentials differ from dense"
assert np.abs(g - g_dense.numpy()).max() < 1e-3, "Sinkhorn potentials differ from dense"
assert bound <= ours["dual"] + 1e-4, "the C-transform bound must be below the OT value"
exact = None
if ot is not None:
    M = ot.dist(x.astype(np.float64), y.astype(np.float64)) / 2
    t_emd, exact = median_time(lambda: ot.emd2(a.astype(np.float64), b.astype(np.float64), M,
                                                numItermax=10**7), repeat=1, warmup=0)
    assert bound <= exact + 1e-4, "C-transform bound above the exact OT cost"
    assert abs(ours["dual"] - exact) < 0.01 * exact, "entropic OT value far from the exact one"


def row(method, seconds, value, note):
    error = "-" if exact is None or value is None else f"{abs(value - exact) / exact:.1e}"
    return {"method": method, "seconds": seconds,
            "OT value": "-" if value is None else f"{value:.5f}", "error vs exact": error,
            "note": note}


rows = [row("lazymat Sinkhorn, eps-scaling", t_ours, ours["dual"],
            f"marginal error {ours['error']:.1e}"),
        row("lazymat C-transform bound (2 Min)", t_bound, bound, "certified lower bound")]
if geomloss is not None:
    loss = geomloss.SamplesLoss("sinkhorn", p=2, blur=0.05, scaling=0.5, debias=False,
                                diameter=ours["diameter"], backend="tensorized")
    t_geom, value = median_time(lambda: float(loss(torch.from_numpy(x), torch.from_numpy(y))),
                                 repeat=sized(1, 3))
    # GeomLoss anneals eps with averaged (symmetric) updates: a similar, not equal, value.
    assert abs(value - ours["dual"]) < 0.05 * abs(ours["dual"]), "GeomLoss value far off"
    rows.append(row("GeomLoss tensorized, eps-scaling", t_geom, value, "dense torch"))
else:
    rows.append(row("GeomLoss tensorized", None, None, "not installed"))
if ot is not None:
    # Without eps-scaling, Sinkhorn needs thousands of iterations at this eps: POT's dense
    # log-domain solver is given a fixed budget, and its error shows where it stands.
    pot_iterations = sized(10, 30)  # each one is a dense log-sum-exp over the 2000² matrix
    t_pot, value = median_time(lambda: float(ot.sinkhorn2(
        a.astype(np.float64), b.astype(np.float64), M, eps, method="sinkhorn_log",
        numItermax=pot_iterations, stopThr=1e-3, warn=False)), repeat=1, warmup=0)
    rows.append(row(f"POT sinkhorn_log ({pot_iterations} its)", t_pot, value,
                    "dense, same eps, no scaling"))
    rows.append(row("POT emd2 (network simplex)", t_emd, exact, "exact"))
else:
    rows.append(row("POT", None, None, "not installed"))
print_table(f"Optimal transport, N = M = {n_peer:,} (2-D, eps = 0.05², cost |x-y|²/2)", rows)

# %%
# The full-size problem: 10⁵ points on each side
# -----------------------------------------------
# Only lazymat runs here: the dense peers would need the 40 GB cost matrix. The check
# recomputes the last Sinkhorn step densely on a few hundred rows.
n = sized(small=300, full=100_000)
x, y = crescent(n), blobs(n)
t_big, big = median_time(lambda: solve(x, y), repeat=1, warmup=0)
rows_check = rng.choice(n, 300, replace=False)
C_rows = ((x[rows_check, None].astype(np.float64) - y[None].astype(np.float64)) ** 2).sum(-1) / 2
h = np.log(big["b"]).astype(np.float64) + big["g"] / big["eps"] - C_rows / big["eps"]
f_rows = -big["eps"] * (h.max(1) + np.log(np.exp(h - h.max(1, keepdims=True)).sum(1)))
assert np.abs(big["f"][rows_check] - f_rows).max() < 1e-3, "full-size potentials are wrong"
t_bound, bound_big = median_time(lambda: c_transform_bound(x, big["a"], y, big["b"], big["g"]),
                                 repeat=1, warmup=0)
assert bound_big <= big["dual"] + 1e-4
exact = None
print_table(f"Optimal transport, N = M = {n:,}: lazymat only (a dense float32 cost matrix: "
            f"{format_bytes(4 * n * n)})", [
                row(f"lazymat Sinkhorn ({2 * big['steps'] + 1} LogSumExp)", t_big, big["dual"],
                    f"marginal error {big['error']:.1e}"),
                row("lazymat C-transform bound (2 Min)", t_bound, bound_big,
                    "certified lower bound")])

# %%
# The transport of the crescent onto the blobs
# ---------------------------------------------
import matplotlib.pyplot as plt  # noqa: E402

moved = barycentric_map(x, y, big["b"], big["g"], big["eps"])
show = rng.choice(n, min(n, 300), replace=False)
fig, ax = plt.subplots(figsize=(6, 6))
ax.scatter(*y[rng.choice(n, min(n, 4000), replace=False)].T, s=1, c="tab:orange", alpha=0.4,
           label="target y_j")
ax.scatter(*x[show].T, s=4, c="tab:blue", label="source x_i")
ax.quiver(*x[show].T, *(moved[show] - x[show]).T, angles="xy", scale_units="xy", scale=1,
          width=0.002, alpha=0.5)
ax.set_title(f"entropic OT plan, {n:,} points: x_i → barycentre of its plan row")
ax.legend(loc="upper left")
ax.set_aspect("equal")
save_figure(fig, "optimal_transport")
