r"""
k-nearest neighbours under any metric
=====================================

A k-nearest-neighbour search is a reduction: for each query x_i, the K smallest values of
d(x_i, y_j) over the database points y_j, and their indices (``argKmin``). lazymat computes it
by brute force for **any formula d**, exactly, without storing the M×N distance matrix. The
specialised tools are faster where they apply — faiss's ``IndexFlatL2`` (BLAS) for Euclidean
distances in high dimension, scikit-learn's kd-tree for Euclidean distances in low dimension —
but they apply to few metrics. We show:

1. Euclidean k-NN, in 3-D (vs the kd-tree; ``lazymat.local.knn`` prunes the brute force there
   with grid cells and distance bounds, same result) and in 32-D (vs faiss ``IndexFlatL2``);
2. cosine similarity (normalised dot products);
3. the **Poincaré-ball (hyperbolic) distance**
   :math:`d(u, v) = \operatorname{arcosh}\big(1 + 2\|u-v\|^2 / ((1-\|u\|^2)(1-\|v\|^2))\big)`,
   used for tree-like embeddings, which neither faiss nor the kd-tree offers;
4. a k-NN classifier on scikit-learn's bundled handwritten digits, with its accuracy.

Every result is checked against a dense computation (numpy, in float64) on a subset of queries.
"""

# %%
# Setup and a dense oracle: the exact K smallest distances of a few queries.

import numpy as np
from _gallery import check_close, header, median_time, need, peer, print_table, save_figure, sized

import lazymat as lm

sklearn_datasets = need("sklearn.datasets")
faiss = peer("faiss")
sk_neighbors = peer("sklearn.neighbors")
header("k-nearest neighbours under any metric (float32, K = 10)")
rng = np.random.default_rng(0)
K = 10
N_CHECK = sized(small=50, full=200)  # queries checked against the dense oracle


def dense_kmin(dist_fn, x, y, k=None):
    """The k smallest distances of each row of x, dense in float64."""
    d = dist_fn(x.astype(np.float64), y.astype(np.float64))
    return np.sort(np.partition(d, (k or K) - 1, axis=1)[:, :k or K], axis=1)


def sqeuclid(x, y):
    return np.maximum((x**2).sum(1)[:, None] + (y**2).sum(1)[None, :] - 2 * x @ y.T, 0)


def check_knn(idx, x, y, dist_fn, what, rtol=1e-4):
    """The distances to the neighbours found equal the true K smallest (ties make indices
    ambiguous, distances are not)."""
    idx = np.asarray(idx)
    rows = np.arange(min(N_CHECK, len(x)))
    xs, ref = x[rows], dense_kmin(dist_fn, x[rows], y, idx.shape[1])
    found = dist_fn(xs.astype(np.float64), y.astype(np.float64))
    found = np.take_along_axis(found, idx[rows], axis=1)
    check_close(np.sort(found, 1), ref, rtol, what)


# %%
# 1. Euclidean k-NN. lazymat's ``argKmin`` over the symbolic squared distances, the kd-tree
# (sklearn ``KDTree``, the best tool in 3-D) and faiss's exact ``IndexFlatL2`` (the best in
# high dimension).

rows = []
for D, M, N in sized(small=[(3, 500, 4000), (3, 4000, 4000), (32, 300, 3000)],
                     full=[(3, 10_000, 100_000), (3, 100_000, 100_000), (32, 5000, 100_000)]):
    x = rng.standard_normal((M, D)).astype(np.float32)
    y = rng.standard_normal((N, D)).astype(np.float32)
    case = f"D={D} M={M} N={N}"

    t, idx = median_time(lambda: lm.Vi(x).sqdist(lm.Vj(y)).argKmin(K=K, dim=1))
    check_knn(idx, x, y, sqeuclid, f"lazymat Euclidean {case}")
    rows.append({"case": case, "method": "lazymat argKmin", "seconds": t})
    if D <= 8:  # low dimension: lazymat's exact pruned search (grid cells, bounds), same result
        info: dict = {}
        t, (_, idx_pruned) = median_time(lambda: lm.local.knn(x, y, K, info=info))
        check_knn(idx_pruned, x, y, sqeuclid, f"lazymat local.knn {case}")
        assert (np.asarray(idx_pruned) == np.asarray(idx)).all(), "pruned k-NN != brute force"
        rows.append({"case": case, "method": "lazymat local.knn (pruned)", "seconds": t,
                     "note": f"{info['method']}, {info.get('kept_fraction', 1):.1%} of pairs"})

    if sk_neighbors is not None and D <= 8:  # in 32-D a kd-tree visits every leaf: not a peer
        tree = sk_neighbors.KDTree(y)
        t_build, _ = median_time(lambda: sk_neighbors.KDTree(y), repeat=1)
        t, (_, idx) = median_time(lambda: tree.query(x, k=K))
        check_knn(idx, x, y, sqeuclid, f"kd-tree {case}")
        rows.append({"case": case, "method": "sklearn KDTree query", "seconds": t,
                     "note": f"+ build {t_build:.2f} s"})
    if faiss is not None and M * N <= 10**9:  # brute force over BLAS: ~30 s at 10⁵ × 10⁵
        index = faiss.IndexFlatL2(D)
        index.add(y)
        t, (_, idx) = median_time(lambda: index.search(x, K))
        check_knn(idx, x, y, sqeuclid, f"faiss IndexFlatL2 {case}")
        rows.append({"case": case, "method": "faiss IndexFlatL2", "seconds": t})
print_table("Euclidean k-NN, K = 10 (ratios to lazymat in the same case)", rows)

# %%
# 2. Cosine similarity: the K largest normalised dot products are the K smallest of their
# negatives. faiss does it with ``IndexFlatIP`` on normalised vectors.

D, M, N = 32, *sized(small=(300, 3000), full=(5000, 100_000))
x = rng.standard_normal((M, D)).astype(np.float32)
y = rng.standard_normal((N, D)).astype(np.float32)
xn = x / np.linalg.norm(x, axis=1, keepdims=True)
yn = y / np.linalg.norm(y, axis=1, keepdims=True)


def neg_cosine(a, b):
    return -(a / np.linalg.norm(a, axis=1, keepdims=True)) @ (
        b / np.linalg.norm(b, axis=1, keepdims=True)).T


t, idx = median_time(lambda: (-(lm.Vi(xn) | lm.Vj(yn))).argKmin(K=K, dim=1))
check_knn(idx, x, y, neg_cosine, "lazymat cosine")
rows = [{"method": "lazymat argKmin of -<x,y>", "seconds": t}]
if faiss is not None:
    index = faiss.IndexFlatIP(D)
    index.add(yn)
    t, (_, idx) = median_time(lambda: index.search(xn, K))
    check_knn(idx, x, y, neg_cosine, "faiss cosine")
    rows.append({"method": "faiss IndexFlatIP", "seconds": t})
print_table(f"Cosine k-NN, D = {D}, M = {M}, N = {N}", rows)

# %%
# 3. The Poincaré-ball distance. arcosh is increasing, so the K nearest points are those
# with the K smallest :math:`\|u-v\|^2 / ((1-\|u\|^2)(1-\|v\|^2))`: one product of a squared
# distance and two per-point factors, which lazymat reduces directly (``Kmin_argKmin``); the
# true distances follow from the K values. No standard k-NN library has this metric; the peer
# is dense numpy, in chunks of queries so that the M×N matrix fits.

D, M, N = 5, *sized(small=(500, 4000), full=(10_000, 100_000))


def poincare_points(n):
    """Points inside the unit ball, denser near the boundary, as hyperbolic embeddings are."""
    v = rng.standard_normal((n, D))
    r = rng.beta(4, 1, (n, 1)) * 0.98
    return (v / np.linalg.norm(v, axis=1, keepdims=True) * r).astype(np.float32)


u, v = poincare_points(M), poincare_points(N)
au = (1 / (1 - (u**2).sum(1, keepdims=True))).astype(np.float32)
av = (1 / (1 - (v**2).sum(1, keepdims=True))).astype(np.float32)


def poincare(a, b):
    ratio = sqeuclid(a, b) / ((1 - (a**2).sum(1, keepdims=True)) * (1 - (b**2).sum(1))[None])
    return np.arccosh(1 + 2 * ratio)


def poincare_lazymat():
    ratio = lm.Vi(u).sqdist(lm.Vj(v)) * lm.Vi(au) * lm.Vj(av)
    values, idx = ratio.Kmin_argKmin(K=K, dim=1)
    return np.arccosh(1 + 2 * values), idx


def poincare_dense_numpy(queries, chunk=250):
    return np.concatenate([np.argpartition(poincare(queries[s:s + chunk], v), K, axis=1)[:, :K]
                           for s in range(0, len(queries), chunk)])


t, (dist, idx) = median_time(poincare_lazymat)
check_knn(idx, u, v, poincare, "lazymat Poincaré neighbours", rtol=1e-3)
check_close(dist[:N_CHECK], dense_kmin(poincare, u[:N_CHECK], v), 1e-3, "Poincaré distances")
M_PEER = min(M, 1000)  # dense numpy is timed on the first 1000 queries, then scaled to M
t_dense, _ = median_time(lambda: poincare_dense_numpy(u[:M_PEER]), repeat=1)
t_dense *= M / M_PEER
print_table(f"Poincaré-ball k-NN, D = {D}, M = {M}, N = {N}", [
    {"method": "lazymat Kmin_argKmin", "seconds": t},
    {"method": "dense numpy, 250-row chunks", "seconds": t_dense,
     "note": f"timed on {M_PEER} queries, times {M / M_PEER:g}" if M > M_PEER else ""}])

# %%
# 4. A k-NN classifier on the bundled digits (1797 images of 8×8 pixels, no download):
# the label of a test image is the majority label of its K = 5 nearest training images.

digits = sklearn_datasets.load_digits()
X, labels = digits.data.astype(np.float32), digits.target
perm = rng.permutation(len(X))
train, test = perm[:1300], perm[1300:]


def knn_classify(k=5):
    idx = lm.Vi(X[test]).sqdist(lm.Vj(X[train])).argKmin(K=k, dim=1)
    votes = labels[train][idx]  # (n_test, k) labels of the neighbours
    return np.array([np.bincount(row, minlength=10).argmax() for row in votes]), idx


t, (predicted, idx) = median_time(knn_classify)
check_knn(idx, X[test], X[train], lambda a, b: sqeuclid(a, b), "digits neighbours", rtol=1e-5)
accuracy = (predicted == labels[test]).mean()
rows = [{"method": "lazymat argKmin + vote", "seconds": t, "accuracy": f"{accuracy:.3f}"}]
assert accuracy > 0.95, f"k-NN accuracy on digits {accuracy:.3f} is too low"
if sk_neighbors is not None:
    clf = sk_neighbors.KNeighborsClassifier(n_neighbors=5, algorithm="brute").fit(
        X[train], labels[train])
    t_sk, sk_predicted = median_time(lambda: clf.predict(X[test]))
    agree = (sk_predicted == predicted).mean()
    print(f"  lazymat and scikit-learn agree on {100 * agree:.1f}% of the test images")
    assert agree > 0.99, "lazymat's and scikit-learn's k-NN classifiers disagree"
    rows.append({"method": "sklearn KNeighborsClassifier", "seconds": t_sk,
                 "accuracy": f"{(sk_predicted == labels[test]).mean():.3f}"})
print_table(f"k-NN classifier (K = 5) on digits: {len(train)} train, {len(test)} test", rows)

# %%
# A picture: a few test digits and their five nearest training digits.

import matplotlib.pyplot as plt  # noqa: E402

fig, axes = plt.subplots(4, 6, figsize=(6, 4.2))
for r in range(4):
    images = [X[test][r]] + [X[train][j] for j in idx[r, :5]]
    for c, img in enumerate(images):
        axes[r, c].imshow(img.reshape(8, 8), cmap="gray_r")
        axes[r, c].set_xticks([])
        axes[r, c].set_yticks([])
    axes[r, 0].set_ylabel(f"pred. {predicted[r]}")
axes[0, 0].set_title("query")
for c in range(1, 6):
    axes[0, c].set_title(f"#{c}")
fig.suptitle(f"k-NN on digits: accuracy {accuracy:.3f}")
save_figure(fig, "digits")
