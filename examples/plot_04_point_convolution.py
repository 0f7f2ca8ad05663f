r"""
Point-cloud convolution (message passing) with a learned filter
===============================================================

A continuous convolution on a point cloud — the building block of PointConv, KPConv and of
message-passing networks on geometric graphs — computes, for every point x_i,

.. math:: a_i = \sum_j w(x_i, y_j)\; h_\theta(x_i - y_j) \odot f_j ,

a window w times a small MLP filter :math:`h_\theta` of the offset, applied to the features
f_j of the neighbours. The usual implementation builds a **radius graph** (the edges with
:math:`\|x_i - y_j\| < r`, from a kd-tree), evaluates the MLP on every edge and scatters the
messages back (``index_add_``), as PyTorch Geometric does. With lazymat the whole sum is one
reduction whose formula contains the MLP: no graph to build or store, the window can be
global (a Gaussian over all pairs) or compact (zero beyond r), and torch autograd trains
:math:`\theta` through it.

We train the filter for a few steps on a synthetic task (recover a known filter from its
outputs), with the compact window computed both ways, check that lazymat's layer equals the
edge-list layer (output and gradient), and time one training step of each.
"""

# %%
# Setup: points in the unit cube, C feature channels, and a ground-truth layer to recover.

import numpy as np
import torch
from _gallery import check_close, header, median_time, need, print_table, save_figure, sized

import lazymat as lm

spatial = need("scipy.spatial")
header("Point-cloud convolution with an MLP filter")
torch.manual_seed(0)
N, C, H = sized(small=400, full=3000), 4, 16  # points, channels, hidden units of the filter
R = float((24 / (np.pi * N)) ** (1 / 3))        # about 32 neighbours within the radius
STEPS = sized(small=3, full=10)
x = torch.rand(N, 3)
f = torch.randn(N, C)


def compact_window(d2):
    """(1 - d²/r²)₊²: smooth, and zero beyond r (works on lazymat and torch values alike)."""
    return ((1 - d2 / R**2).relu()) ** 2


def init_params(scale=1.0):
    g = torch.Generator().manual_seed(1 if scale == 1.0 else 2)
    return [(torch.randn(H, 3, generator=g) * scale / R).requires_grad_(True),
            torch.zeros(H).requires_grad_(True),
            (torch.randn(C, H, generator=g) * scale / H**0.5).requires_grad_(True),
            torch.zeros(C).requires_grad_(True)]


# %%
# lazymat's layer: the MLP filter is part of the formula (``matvecmult`` by the weight
# parameters), the window is global (Gaussian) or compact; nothing of size N×N is stored.


def conv_lazymat(params, window="compact", points=None, features=None, ranges=None):
    W1, b1, W2, b2 = params
    points = x if points is None else points
    features = f if features is None else features
    d = lm.Vi(points) - lm.Vj(points)                                # offsets, dim 3
    hidden = (lm.Pm(W1.reshape(-1)).matvecmult(d) + lm.Pm(b1)).relu()   # dim H
    filt = lm.Pm(W2.reshape(-1)).matvecmult(hidden) + lm.Pm(b2)         # dim C
    d2 = d.sqnorm2()
    w = compact_window(d2) if window == "compact" else (-d2 / (2 * (R / 2) ** 2)).exp()
    return (w * filt * lm.Vj(features)).sum(dim=1, ranges=ranges)    # (N, C)


# %%
# The compact window is zero beyond r, so the pairs of grid cells farther apart than r can
# be skipped: sort the points by cells of side r once (as the graph is built once), keep the
# cell pairs whose bounding boxes are closer than r (block-sparse ``ranges``), and undo the
# sort on the result. Exact: every skipped pair has a zero window.


def cell_ranges(points):
    """(sorted points, their permutation, the 6-tuple of the cell pairs within R)."""
    labels = lm.grid_cluster(points, R)
    xs, labels, perm = lm.sort_clusters(points, labels, return_permutation=True)
    ranges = lm.cluster_ranges(labels)
    xs_np, starts = xs.numpy(), ranges[:, 0].numpy()
    lo, hi = np.minimum.reduceat(xs_np, starts, 0), np.maximum.reduceat(xs_np, starts, 0)
    gap = np.maximum(0, np.maximum(lo[:, None] - hi[None], lo[None] - hi[:, None]))
    keep = torch.from_numpy((gap ** 2).sum(-1) < R ** 2)
    return xs, perm, lm.from_matrix(ranges, ranges, keep)


def conv_lazymat_sparse(params, blocks):
    xs, perm, ranges = blocks
    out_sorted = conv_lazymat(params, "compact", xs, f[perm], ranges)
    return out_sorted[torch.argsort(perm)]                           # back to x's order


# %%
# The peer: a radius graph from scipy's kd-tree, the MLP on every edge, ``index_add_``.


def radius_graph(points):
    pairs = spatial.cKDTree(points.numpy()).query_pairs(R, output_type="ndarray")
    loops = np.arange(len(points))
    i = np.concatenate([pairs[:, 0], pairs[:, 1], loops])
    j = np.concatenate([pairs[:, 1], pairs[:, 0], loops])
    return torch.from_numpy(i).long(), torch.from_numpy(j).long()


def conv_edges(params, edges):
    W1, b1, W2, b2 = params
    i, j = edges
    d = x[i] - x[j]
    filt = torch.relu(d @ W1.T + b1) @ W2.T + b2
    msg = compact_window((d**2).sum(1, keepdim=True)) * filt * f[j]
    return torch.zeros(N, C).index_add_(0, i, msg)


t_graph, edges = median_time(lambda: radius_graph(x), repeat=sized(1, 3))
t_blocks, blocks = median_time(lambda: cell_ranges(x), repeat=sized(1, 3))
print(f"  radius graph: {len(edges[0]):,} edges ({len(edges[0]) / N:.1f} per point), "
      f"r = {R:.3f}")

# %%
# Correctness: with the compact window the two layers compute the same sum (the window is
# zero on the pairs that are not edges); outputs and gradients must agree.

params = init_params()
out_lm, out_e = conv_lazymat(params), conv_edges(params, edges)
check_close(out_lm, out_e, 1e-4, "lazymat layer vs edge-list layer")
out_sparse = conv_lazymat_sparse(params, blocks)
check_close(out_sparse, out_e, 1e-4, "block-sparse lazymat layer vs edge-list layer")
for name, a, b in zip(["W1", "b1", "W2", "b2"],
                      torch.autograd.grad(out_sparse.square().sum(), params),
                      torch.autograd.grad(conv_edges(params, edges).square().sum(), params)):
    check_close(a, b, 1e-3, f"block-sparse gradient wrt {name}")
g_lm = torch.autograd.grad(out_lm.square().sum(), params)
g_e = torch.autograd.grad(out_e.square().sum(), params)
for name, a, b in zip(["W1", "b1", "W2", "b2"], g_lm, g_e):
    check_close(a, b, 1e-3, f"gradient wrt {name}")

# %%
# Training: recover a filter from the outputs of a "true" layer (fixed random parameters)
# by Adam on the mean squared error. Each method trains from the same start.

with torch.no_grad():
    target_compact = conv_edges(init_params(scale=0.7), edges)
    target_global = conv_lazymat(init_params(scale=0.7), window="gaussian")


def train(layer, target, steps=STEPS):
    params = init_params()
    opt = torch.optim.Adam(params, lr=3e-2)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = ((layer(params) - target) ** 2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


runs = {
    "lazymat, compact window": lambda p: conv_lazymat(p, "compact"),
    "lazymat, compact window, block-sparse": lambda p: conv_lazymat_sparse(p, blocks),
    "edge list (kd-tree graph)": lambda p: conv_edges(p, edges),
    "lazymat, global Gaussian window": lambda p: conv_lazymat(p, "gaussian"),
}
rows, curves = [], {}
for name, layer in runs.items():
    target = target_global if "global" in name else target_compact
    losses = train(layer, target)
    curves[name] = losses
    assert losses[-1] < losses[0], f"{name}: training did not lower the loss {losses}"

    def step(layer=layer, target=target):
        p = init_params()
        loss = ((layer(p) - target) ** 2).mean()
        loss.backward()

    t, _ = median_time(step)
    rows.append({"method": name, "seconds": t, "loss first -> last":
                 f"{losses[0]:.3g} -> {losses[-1]:.3g}"})
rows[0]["note"] = "all N² pairs"
rows[1]["note"] = f"+ cell sort and ranges {t_blocks * 1e3:.0f} ms once"
rows[2]["note"] = f"+ graph build {t_graph * 1e3:.0f} ms once"
rows[3]["note"] = "all N² pairs, no graph"
# the two compact-window runs follow the same trajectory (same sum, same start)
assert np.allclose(curves["lazymat, compact window"], curves["edge list (kd-tree graph)"],
                   rtol=1e-3), "the two compact-window trainings diverged"
print_table(f"One training step (forward + backward), N = {N:,}, C = {C}, H = {H}", rows)

# %%
# The training curves.

import matplotlib.pyplot as plt  # noqa: E402

fig, ax = plt.subplots(figsize=(6, 3.5))
for (name, losses), style in zip(curves.items(), ["o-", "d:", "x--", "s-"]):
    ax.semilogy(losses, style, label=name, markersize=4)
ax.set_xlabel("Adam step")
ax.set_ylabel("MSE loss")
ax.set_title("Learning a point-cloud convolution filter")
ax.legend()
save_figure(fig, "training")
