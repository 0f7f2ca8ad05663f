"""
K-means on a million points
===========================

Lloyd's algorithm alternates two steps: assign every point to its nearest centroid (an
``ArgMin`` reduction over the symbolic M×K matrix of squared distances) and move every centroid
to the mean of its points (a ``bincount``). With lazymat the assignment step is one line and
never stores the M×K distances; scikit-learn's ``KMeans`` (Lloyd, OpenMP, float32 data) is the
tool a user would pick. Both start from the same centroids and run the same number of Lloyd
steps, so their results must agree.
"""

# %%
# The data: a million points drawn from a mixture of Gaussian blobs in the plane.

import numpy as np
from _gallery import check_close, header, median_time, peer, print_table, save_figure, sized

import lazymat as lm

sk_cluster = peer("sklearn.cluster")
header("K-means (Lloyd steps with ArgMin)")
rng = np.random.default_rng(0)
M, D, K, ITERS = sized(small=20_000, full=1_000_000), 2, sized(small=16, full=50), 10
centers = rng.uniform(-10, 10, (K, D))
x = (centers[rng.integers(0, K, M)] + rng.standard_normal((M, D))).astype(np.float32)
c0 = x[rng.choice(M, K, replace=False)].copy()  # the same initial centroids for everyone

# %%
# lazymat's K-means: the assignment is ``Vi(x).sqdist(Vj(c)).argmin(dim=1)``.


def kmeans_lazymat(x, c0, iters=ITERS):
    c = c0.copy()
    x_i = lm.Vi(x)
    for _ in range(iters):
        labels = x_i.sqdist(lm.Vj(c)).argmin(dim=1).ravel()   # nearest centroid of each point
        counts = np.bincount(labels, minlength=len(c))
        sums = np.stack([np.bincount(labels, weights=x[:, d], minlength=len(c))
                         for d in range(x.shape[1])], 1)
        nonempty = counts > 0                                   # an empty cluster stays put
        c[nonempty] = (sums[nonempty] / counts[nonempty, None]).astype(c.dtype)
    labels = x_i.sqdist(lm.Vj(c)).argmin(dim=1).ravel()
    return c, labels


def inertia(x, c, labels):
    return float(((x.astype(np.float64) - c[labels]) ** 2).sum())


t, (c, labels) = median_time(lambda: kmeans_lazymat(x, c0), repeat=sized(1, 3))

# %%
# Correctness: the final assignment is the exact nearest centroid (dense check on a subset of
# points, in float64), and the centroids are the means of their clusters.

sub = rng.choice(M, 5000, replace=False)
d2 = ((x[sub, None, :].astype(np.float64) - c[None].astype(np.float64)) ** 2).sum(-1)
best = d2.min(1)
assert np.allclose(d2[np.arange(len(sub)), labels[sub]], best, rtol=1e-5, atol=1e-6), \
    "an assignment is not to the nearest centroid"
print(f"  check: the {len(sub)} sampled points are assigned to their nearest centroid")
rows = [{"method": "lazymat ArgMin + bincount", "seconds": t,
         "inertia / M": f"{inertia(x, c, labels) / M:.5f}"}]

# %%
# scikit-learn's KMeans from the same centroids, for the same number of Lloyd steps
# (``tol=0``, one initialisation). Same algorithm, same start: same centroids, up to float32
# rounding.

if sk_cluster is not None:
    km = sk_cluster.KMeans(n_clusters=K, init=c0, n_init=1, max_iter=ITERS, tol=0,
                           algorithm="lloyd")
    t_sk, km = median_time(lambda: km.fit(x), repeat=sized(1, 3))
    sk_c = km.cluster_centers_
    # sklearn stops after the step where no label changes; lazymat runs ITERS steps, which
    # leave the centroids unchanged past that point.
    check_close(c, sk_c, 1e-3, "lazymat centroids vs scikit-learn's")
    agree = (km.labels_ == labels).mean()
    print(f"  lazymat and scikit-learn assign {100 * agree:.3f}% of the points alike")
    assert agree > 0.999, "lazymat's and scikit-learn's assignments differ"
    rows.append({"method": "sklearn KMeans (lloyd)", "seconds": t_sk,
                 "inertia / M": f"{km.inertia_ / M:.5f}"})
print_table(f"K-means, M = {M:,} points, D = {D}, K = {K}, {ITERS} Lloyd steps", rows)

# %%
# The clusters (a random tenth of the points) and their centroids.

import matplotlib.pyplot as plt  # noqa: E402

show = rng.choice(M, min(M, 100_000), replace=False)
fig, ax = plt.subplots(figsize=(6, 6))
ax.scatter(x[show, 0], x[show, 1], c=labels[show], s=0.3, cmap="tab20", rasterized=True)
ax.scatter(c[:, 0], c[:, 1], c="k", s=30, marker="x", label="centroids")
ax.set_title(f"K-means with lazymat: {M:,} points, K = {K}")
ax.set_aspect("equal")
ax.legend(loc="upper right")
save_figure(fig, "clusters")
