"""
Block-sparse reductions: clusters, ranges, and the speed-up at a given accuracy
================================================================================

A Gaussian kernel of small bandwidth σ makes most of an M × N kernel matrix negligible: two
points further apart than t·σ contribute at most :math:`e^{-t^2/2}`. Sorting the points into
clusters turns "negligible pairs" into "negligible *blocks*", and a block-sparse reduction
(KeOps' ``ranges``) skips them entirely:

1. ``grid_cluster(x, cell)`` labels the points by grid cell, ``sort_clusters`` makes every
   cluster contiguous, ``cluster_ranges_centroids`` gives each cluster's index range and centre;
2. a boolean cluster × cluster matrix keeps the pairs of clusters whose points can come within
   t·σ (centre distance minus both radii), and ``from_matrix`` turns it into the 6-tuple;
3. the same reduction, with ``ranges=``, visits only the kept blocks.

The error is bounded by construction (every skipped pair is at least t·σ apart), so t is an
accuracy knob. We compute a kernel density estimate on clustered 3-D data and compare, at a
given accuracy, with the dense lazymat reduction and with scikit-learn's tree-based
``KernelDensity`` (its ``rtol`` plays the same role).
"""

# %%
# Clustered data: a mixture of small blobs in the unit cube
# ----------------------------------------------------------
import numpy as np
from _gallery import header, median_time, peer, print_table, save_figure, sized

import lazymat as lm

header("Block-sparse Gaussian kernel sums: ranges vs dense vs scikit-learn KernelDensity")
rng = np.random.default_rng(0)
N = sized(small=2000, full=50_000)
SIGMA = 0.01
centres = rng.random((60, 3))
x = (centres[rng.integers(0, 60, N)] + 0.03 * rng.standard_normal((N, 3))).astype(np.float32)

# %%
# Clusters and their ranges
# -------------------------
CELL = 4 * SIGMA
labels = lm.grid_cluster(x, CELL)
x, labels = lm.sort_clusters(x, labels)
ranges, centroids, _ = lm.cluster_ranges_centroids(x, labels)
# Radius of each cluster: the largest distance of one of its points to its centroid.
radius = np.zeros(len(ranges), dtype=np.float32)
np.maximum.at(radius, labels, np.linalg.norm(x - centroids[labels], axis=1))
centre_distance = np.sqrt(((centroids[:, None] - centroids[None]) ** 2).sum(-1))
gap = centre_distance - radius[:, None] - radius[None]    # a lower bound of any pair's distance


def kernel_sums(ranges6=None, points=x):
    """a_i = sum_j exp(-|x_i - x_j|^2 / 2 sigma^2), on all pairs or the kept blocks."""
    K = (-lm.Vi(points).sqdist(lm.Vj(points)) * (0.5 / SIGMA**2)).exp()
    return K.sum(dim=1, ranges=ranges6)[:, 0]


kernel_sums(points=x[:100])                       # compiles the kernel (cached afterwards)
t_dense, exact = median_time(lambda: kernel_sums(), repeat=1, warmup=0)
# The check of the dense reduction itself: a few rows in float64 numpy.
rows = rng.choice(N, 200, replace=False)
d2 = ((x[rows, None].astype(np.float64) - x[None].astype(np.float64)) ** 2).sum(-1)
dense_rows = np.exp(-d2 * (0.5 / SIGMA**2)).sum(1)
assert np.abs(exact[rows] - dense_rows).max() < 1e-5 * dense_rows.max(), "dense sum is wrong"
table = [{"method": "lazymat dense (all pairs)", "seconds": t_dense, "pairs kept": "100%",
          "max rel. error": "exact", "error bound": "-"}]

# %%
# The accuracy knob: skip the blocks further apart than t·σ
# ----------------------------------------------------------
results = []
for t in (2.0, 3.0, 4.0, 5.0, 6.0):
    keep = gap < t * SIGMA
    ranges6 = lm.from_matrix(ranges, ranges, keep)
    counts = np.diff(ranges, axis=1)[:, 0]
    kept = float((counts[:, None] * counts[None] * keep).sum()) / N**2
    seconds, approx = median_time(lambda: kernel_sums(ranges6), repeat=sized(1, 3))
    error = float((np.abs(approx - exact) / exact).max())      # relative, row by row
    bound = N * np.exp(-t * t / 2)       # skipped pairs x their largest value, over a_i >= 1
    assert np.all(approx <= exact * (1 + 1e-5)), "skipping positive terms cannot add mass"
    assert error <= bound + 1e-5, f"error {error:.1e} above its bound {bound:.1e} at t = {t}"
    results.append((t, kept, seconds, error))
    table.append({"method": f"lazymat ranges, t = {t:g}", "seconds": seconds,
                  "pairs kept": f"{kept:.2%}", "max rel. error": f"{error:.1e}",
                  "error bound": f"{min(bound, 1):.0e}"})

# %%
# scikit-learn's KernelDensity: a kd-tree with a relative tolerance
# ------------------------------------------------------------------
neighbors = peer("sklearn.neighbors")
if neighbors is not None:
    for rtol in sized((1e-2,), (1e-2, 1e-4)):
        kde = neighbors.KernelDensity(bandwidth=SIGMA, rtol=rtol).fit(x.astype(np.float64))
        log_norm = np.log(N) + 1.5 * np.log(2 * np.pi * SIGMA**2)
        seconds, ours = median_time(lambda: np.exp(kde.score_samples(x) + log_norm), repeat=1,
                                    warmup=0)
        error = float((np.abs(ours - exact) / exact).max())
        assert error < 10 * rtol + 1e-4, f"KernelDensity's error {error:.1e} at rtol {rtol}"
        table.append({"method": f"scikit-learn KernelDensity, rtol = {rtol:g}",
                      "seconds": seconds, "pairs kept": "tree", "max rel. error": f"{error:.1e}",
                      "error bound": f"{rtol:.0e}"})
else:
    table.append({"method": "scikit-learn KernelDensity", "seconds": None})
print_table(f"Gaussian kernel density, N = {N:,} clustered points in 3-D, sigma = {SIGMA}, "
            f"{len(ranges):,} clusters of side {CELL} (float32)", table)
best = [r for r in results if r[3] < 1e-3]
if best:
    t, kept, seconds, error = best[0]
    print(f"  at a relative error below 1e-3 (t = {t:g}): {kept:.2%} of the pairs, "
          f"{t_dense / seconds:.1f}x faster than the dense reduction")

# %%
# The block mask and the accuracy/time trade-off
# -----------------------------------------------
import matplotlib.pyplot as plt  # noqa: E402

fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
axes[0].imshow(gap < 4 * SIGMA, cmap="Greys", interpolation="nearest")
axes[0].set_title(f"kept cluster pairs (t = 4), {len(ranges):,} clusters")
ts, kept, seconds, errors = map(np.array, zip(*results))
axes[1].semilogy(ts, errors, "o-", label="max relative error")
axes[1].semilogy(ts, kept, "s-", label="fraction of pairs kept")
axes[1].semilogy(ts, seconds / t_dense, "^-", label="time / dense time")
axes[1].set_xlabel("threshold t (in units of σ)")
axes[1].legend()
axes[1].set_title("accuracy and cost of the block-sparse reduction")
fig.tight_layout()
save_figure(fig, "tradeoff")
