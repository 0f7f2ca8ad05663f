"""Block-sparse reductions: KeOps' ``ranges`` 6-tuple and the clustering helpers that build it.

A reduction over j with ``ranges=(ranges_i, slices_i, redranges_j, ranges_j, slices_j,
redranges_i)`` computes, for the rows of each output range ``ranges_i[c]``, only the
columns of the intervals ``redranges_j[slices_i[c-1]:slices_i[c]]``; the last three
arrays serve reductions over i (and gradients). Rows outside every range hold the
reduction's identity. With lazymat, ranges also work with batch dimensions (the same
ranges for every batch).

>>> import numpy as np
>>> x = np.random.rand(1000, 2)
>>> labels = grid_cluster(x, 0.25)
>>> x, labels = sort_clusters(x, labels)
>>> ranges, centroids, _ = cluster_ranges_centroids(x, labels)
>>> keep = ((centroids[:, None] - centroids[None]) ** 2).sum(-1) < 0.3 ** 2
>>> len(from_matrix(ranges, ranges, keep))
6
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from .arraylib import like as _like, to_numpy as _numpy

__all__ = ["grid_cluster", "sort_clusters", "cluster_ranges", "cluster_centroids",
           "cluster_ranges_centroids", "from_matrix", "from_pairs", "swap_axes"]


def grid_cluster(x: Any, size: float | Sequence[float]) -> Any:
    """Cluster labels (int64, 0..C-1) of the points x (n, D) by cubic cells of side ``size``
    (a float, or one per dimension), numbered in the lexicographic order of the cells. Any D
    works (KeOps: D ≤ 3).

    >>> grid_cluster(np.array([[0.1, 0.1], [0.2, 0.15], [0.9, 0.9]]), 0.5).tolist()
    [0, 0, 1]
    """
    pts = _numpy(x)
    cells = np.floor((pts - pts.min(0)) / np.asarray(size, dtype=pts.dtype)).astype(np.int64)
    if len(cells) == 0:
        return _like(np.zeros(0, np.int64), x)
    extent = cells.max(0) + 1
    if float(np.prod(extent.astype(np.float64))) < 2.0 ** 62:
        # One integer per cell (row-major over the cells' extents: the lexicographic order),
        # then a 1-D unique: ~10x faster than np.unique(axis=0) on rows.
        strides = np.cumprod(np.concatenate([extent[1:], [1]])[::-1])[::-1]
        _, labels = np.unique(cells @ strides, return_inverse=True)
    else:
        _, labels = np.unique(cells, axis=0, return_inverse=True)
    return _like(labels.reshape(-1).astype(np.int64), x)


def sort_clusters(x: Any, labels: Any, return_permutation: bool = False) -> tuple:
    """x (an array or a tuple of arrays) and labels, reordered so each cluster is contiguous
    (a stable sort: points of one cluster keep their order). With ``return_permutation``
    also the permutation ``perm`` (``x_sorted = x[perm]``; ``out[perm] = out_sorted``
    undoes it on a result).

    >>> xs, ls, perm = sort_clusters(np.array([[3.], [1.], [2.]]), np.array([1, 0, 1]), True)
    >>> perm.tolist(), xs[:, 0].tolist()
    ([1, 0, 2], [1.0, 3.0, 2.0])
    """
    order = np.argsort(_numpy(labels), kind="stable")
    idx = _like(order, labels)
    if isinstance(x, (tuple, list)):
        out = (type(x)(a[idx] for a in x), labels[idx])
    else:
        out = (x[idx], labels[idx])
    return out + (idx,) if return_permutation else out


def cluster_ranges(labels: Any, n_labels: int | None = None) -> Any:
    """(C, 2) index ranges [start, end) of each cluster of *sorted* labels.

    >>> cluster_ranges(np.array([0, 0, 1, 1, 1])).tolist()
    [[0, 2], [2, 5]]
    """
    lab = _numpy(labels)
    counts = np.bincount(lab, minlength=n_labels or 0)
    ends = np.cumsum(counts)
    return _like(np.stack([ends - counts, ends], 1).astype(np.int64), labels)


def cluster_centroids(x: Any, labels: Any, n_labels: int | None = None, weights: Any = None,
                      weights_c: Any = None) -> Any:
    """(Weighted) centroid of each cluster, shape (C, D).

    >>> cluster_centroids(np.array([[0.0], [2.0], [10.0]]), np.array([0, 0, 1])).tolist()
    [[1.0], [10.0]]
    """
    pts, lab = _numpy(x), _numpy(labels)
    n = int(n_labels or (lab.max() + 1 if len(lab) else 0))
    w = np.ones(len(pts), pts.dtype) if weights is None else _numpy(weights).reshape(-1)
    sums = np.zeros((n, pts.shape[1]), pts.dtype)
    np.add.at(sums, lab, pts * w[:, None])
    wc = np.bincount(lab, weights=w, minlength=n) if weights_c is None else _numpy(weights_c)
    return _like((sums / np.maximum(wc, np.finfo(pts.dtype).tiny)[:, None]).astype(pts.dtype), x)


def cluster_ranges_centroids(x: Any, labels: Any, weights: Any = None, min_weight: float = 0
                             ) -> tuple[Any, Any, Any]:
    """(ranges, centroids, cluster weights) of *sorted* labels; clusters lighter than
    ``min_weight`` get an empty range.

    >>> r, c, w = cluster_ranges_centroids(np.array([[0.0], [2.0], [10.0]]), np.array([0, 0, 1]))
    >>> r.tolist(), c.tolist(), w.tolist()
    ([[0, 2], [2, 3]], [[1.0], [10.0]], [2.0, 1.0])
    """
    pts, lab = _numpy(x), _numpy(labels)
    n = int(lab.max() + 1) if len(lab) else 0
    w = np.ones(len(pts), pts.dtype) if weights is None else _numpy(weights).reshape(-1)
    wc = np.bincount(lab, weights=w, minlength=n).astype(pts.dtype)
    ranges = _numpy(cluster_ranges(labels, n))
    ranges[wc < min_weight] = 0
    centroids = _numpy(cluster_centroids(x, labels, n, weights, wc))
    return _like(ranges, labels), _like(centroids, x), _like(wc, x)


def from_matrix(ranges_i: Any, ranges_j: Any, keep: Any) -> tuple:
    """The 6-tuple of a block mask: ``keep[a, b]`` says whether row cluster a interacts with
    column cluster b.

    >>> r = np.array([[0, 2], [2, 3]])
    >>> ranges = from_matrix(r, r, np.array([[True, False], [True, True]]))
    >>> ranges[1].tolist(), ranges[2].tolist()  # row cluster 1 sees both column clusters
    ([1, 3], [[0, 2], [0, 2], [2, 3]])
    """
    ri, rj, mask = _numpy(ranges_i), _numpy(ranges_j), _numpy(keep).astype(bool)
    slices_i = np.cumsum(mask.sum(1)).astype(np.int64)
    redranges_j = rj[np.nonzero(mask)[1]].reshape(-1, 2).astype(np.int64)
    slices_j = np.cumsum(mask.sum(0)).astype(np.int64)
    redranges_i = ri[np.nonzero(mask.T)[1]].reshape(-1, 2).astype(np.int64)
    parts = (ri.astype(np.int64), slices_i, redranges_j, rj.astype(np.int64), slices_j,
             redranges_i)
    return tuple(_like(p, ranges_i) for p in parts)


def _merged(owner: np.ndarray, iv: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Intervals ``iv`` (n, 2), grouped by a non-decreasing ``owner`` and ascending within a
    group: empty ones dropped, each run of touching ones of one owner merged into one."""
    keep = iv[:, 1] > iv[:, 0]
    owner, iv = owner[keep], iv[keep]
    if len(iv) == 0:
        return owner, iv.reshape(0, 2)
    first = np.ones(len(iv), bool)
    first[1:] = (owner[1:] != owner[:-1]) | (iv[1:, 0] != iv[:-1, 1])
    starts = np.nonzero(first)[0]
    ends = np.append(starts[1:], len(iv)) - 1
    return owner[starts], np.stack([iv[starts, 0], iv[ends, 1]], 1)


def _slices(owner: np.ndarray, n: int) -> np.ndarray:
    return np.cumsum(np.bincount(owner, minlength=n)).astype(np.int64)


def from_pairs(ranges_i: Any, ranges_j: Any, rows: Any, cols: Any) -> tuple:
    """The 6-tuple of a sparse block mask: row cluster ``rows[p]`` interacts with column
    cluster ``cols[p]`` (pairs in any order, no repeats). Touching intervals of one cluster
    are merged. The same as :func:`from_matrix` without the dense (C_i, C_j) matrix.

    >>> r = np.array([[0, 2], [2, 5]])
    >>> from_pairs(r, r, np.array([1, 0, 1]), np.array([0, 0, 1]))[2].tolist()
    [[0, 2], [0, 5]]
    """
    ri = _numpy(ranges_i).astype(np.int64).reshape(-1, 2)
    rj = _numpy(ranges_j).astype(np.int64).reshape(-1, 2)
    a = _numpy(rows).astype(np.int64).reshape(-1)
    b = _numpy(cols).astype(np.int64).reshape(-1)
    order = np.lexsort((b, a))  # by row cluster, then column cluster
    owner, redranges_j = _merged(a[order], rj[b[order]])
    slices_i = _slices(owner, len(ri))
    order = np.lexsort((a, b))  # the transposed mask, for reductions over i
    owner, redranges_i = _merged(b[order], ri[a[order]])
    slices_j = _slices(owner, len(rj))
    parts = (ri, slices_i, redranges_j, rj, slices_j, redranges_i)
    return tuple(_like(p, ranges_i) for p in parts)


def swap_axes(ranges: Sequence[Any]) -> tuple:
    """The ranges of the transposed matrix (i and j swapped).

    >>> swap_axes(("ri", "si", "rj_red", "rj", "sj", "ri_red"))
    ('rj', 'sj', 'ri_red', 'ri', 'si', 'rj_red')
    """
    return tuple(ranges[3:]) + tuple(ranges[:3])
