"""Block-sparse ranges: random block masks against dense masking, with and without batch dims."""

from __future__ import annotations

import numpy as np
import pytest

import lazymat as lm
from lazymat import autograd
from lazymat.formula import SqDist, Var, make
from lazymat.plan import Request, run
from lazymat.ranges import (
    cluster_centroids,
    cluster_ranges,
    cluster_ranges_centroids,
    from_matrix,
    grid_cluster,
    sort_clusters,
    swap_axes,
)

x, y, b = Var(0, 3, 0), Var(1, 3, 1), Var(2, 2, 1)
GAUSS = make("Exp", (-SqDist(x, y),)) * b
SCALAR = -SqDist(x, y)
CASES = [("Sum", GAUSS, None, None), ("Min_ArgMin", GAUSS, None, None),
         ("KMin_ArgKMin", SCALAR, None, 2), ("LogSumExp", SCALAR, None, None),
         ("SumSoftMaxWeight", SCALAR, b, None)]


def clusters(n: int, sizes: list[int]) -> np.ndarray:
    ends = np.cumsum(sizes)
    assert ends[-1] == n
    return np.stack([ends - np.array(sizes), ends], 1)


def block_problem(seed: int, batch: tuple[int, ...] = (), empty_rows: bool = True):
    rng = np.random.default_rng(seed)
    M, N = 37, 45
    ri, rj = clusters(M, [5, 12, 1, 19]), clusters(N, [10, 3, 20, 12])
    keep = rng.random((4, 4)) < 0.5
    keep[0, :] = not empty_rows  # a row cluster with no column at all: identity rows
    keep[:, 0] |= not empty_rows
    X = rng.standard_normal(batch + (M, 3))
    Y = rng.standard_normal(batch + (N, 3))
    B = rng.random(batch + (N, 2)) + 0.1
    mask = np.zeros((M, N), bool)
    for a in range(4):
        for c in range(4):
            if keep[a, c]:
                mask[ri[a, 0]:ri[a, 1], rj[c, 0]:rj[c, 1]] = True
    return [X, Y, B], from_matrix(ri, rj, keep), mask


def masked_dense(name, formula, weight, K, arrays, mask, axis):
    """The same reduction on the dense matrix, masked entries replaced by the identity."""
    X, Y, B = arrays
    d = ((X[..., :, None, :] - Y[..., None, :, :]) ** 2).sum(-1)
    F = np.exp(-d)[..., None] * B[..., None, :, :] if formula is GAUSS else -d[..., None]
    if axis == 0:
        F, m = np.swapaxes(F, -3, -2), mask.T
    else:
        m = mask
    m = m[..., None]
    if name == "Sum":
        return [np.where(m, F, 0).sum(-2)]
    if name == "Min_ArgMin":
        G = np.where(m, F, np.inf)
        idx = G.argmin(-2)
        return [G.min(-2), np.where(np.isinf(G.min(-2)), -1, idx)]
    if name == "KMin_ArgKMin":
        G = np.where(m, F, np.inf)[..., 0]
        idx = np.argsort(G, -1, kind="stable")[..., :K]
        vals = np.take_along_axis(G, idx, -1)
        return [vals, np.where(np.isinf(vals), -1, idx)]
    G = np.where(m, F, -np.inf)
    mx = G.max(-2, keepdims=True)
    safe = np.where(np.isinf(mx), 0, mx)
    e = np.exp(G - safe)
    if name == "LogSumExp":
        with np.errstate(divide="ignore"):
            return [np.where(np.isinf(mx[..., 0, :]), -np.inf,
                             safe[..., 0, :] + np.log(e.sum(-2)))]
    W = B if axis == 1 else None
    s0 = e.sum(-2)
    s = (e * W[..., None, :, :]).sum(-2) if axis == 1 else None
    return [np.where(s0 > 0, s / np.where(s0 > 0, s0, 1), 0)]


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("batch", [(), (2, 1)], ids=["nobatch", "batch"])
@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_block_mask_matches_dense(case, axis, batch, backend):
    name, formula, weight, K = case
    if name == "SumSoftMaxWeight" and axis == 0:
        pytest.skip("the weight is a j-variable: over i it would need an i-indexed weight")
    arrays, ranges, mask = block_problem(3, batch)
    got = run(Request(name, formula, axis=axis, K=K, weight=weight), arrays, backend=backend,
              ranges=ranges)
    want = masked_dense(name, formula, weight, K, arrays, mask, axis)
    for g, w in zip(got, want):
        w = np.broadcast_to(w, g.shape)
        if g.dtype == np.int64:
            # the first index is compared where the row is not empty
            np.testing.assert_array_equal(g, w)
        else:
            np.testing.assert_allclose(g, w, rtol=1e-12, atol=1e-12)


def test_genred_and_gradients_with_ranges():
    torch = pytest.importorskip("torch")
    arrays, ranges, mask = block_problem(5)
    g = lm.Genred("Exp(-SqDist(x,y)) * b", ["x = Vi(3)", "y = Vj(3)", "b = Vj(2)"],
                  reduction_op="Sum", axis=1)
    np.testing.assert_allclose(g(*arrays, ranges=ranges),
                               masked_dense("Sum", GAUSS, None, None, arrays, mask, 1)[0],
                               rtol=1e-12)
    # Every row and column sees some block: an empty one is +inf/-inf, not differentiable.
    arrays, ranges, mask = block_problem(5, empty_rows=False)
    X, Y, B = (torch.tensor(a, requires_grad=True) for a in arrays)
    for name, formula, weight, K in CASES:
        for axis in (0, 1):
            if name == "SumSoftMaxWeight" and axis == 0:
                continue

            def fn(*a):
                req = Request(name, formula, axis=axis, K=K, weight=weight)
                return autograd.run(req, list(a), ranges=ranges)[0]

            assert torch.autograd.gradcheck(fn, (X, Y, B)), (name, axis)


def test_bad_ranges_raise_before_compiling():
    arrays, ranges, _ = block_problem(1)
    req = Request("Sum", GAUSS, axis=1)
    with pytest.raises(lm.ShapeError, match="6-tuple"):
        run(req, arrays, ranges=ranges[:3])
    bad = list(ranges)
    bad[2] = bad[2] + 1000
    with pytest.raises(lm.ShapeError, match="outside"):
        run(req, arrays, ranges=bad)
    bad = list(ranges)
    bad[0] = bad[0].astype(float)
    with pytest.raises(lm.DtypeError, match="integers"):
        run(req, arrays, ranges=bad)


def test_clustering_helpers():
    rng = np.random.default_rng(0)
    pts = rng.random((500, 2))
    lab = grid_cluster(pts, 0.25)
    assert lab.dtype == np.int64 and lab.max() < 16
    spts, slab = sort_clusters(pts, lab)
    assert (np.diff(slab) >= 0).all()
    r = cluster_ranges(slab)
    assert r[0, 0] == 0 and r[-1, 1] == 500 and (r[1:, 0] == r[:-1, 1]).all()
    c = cluster_centroids(spts, slab)
    np.testing.assert_allclose(c[3], spts[slab == 3].mean(0))
    r2, c2, w2 = cluster_ranges_centroids(spts, slab)
    np.testing.assert_array_equal(r2, r)
    np.testing.assert_allclose(w2, np.bincount(slab))
    six = from_matrix(r, r, np.eye(len(r), dtype=bool))
    assert len(six) == 6 and swap_axes(swap_axes(six))[0] is six[0]


def test_pykeops_style_import_paths():
    from lazymat.numpy.cluster import from_matrix as f1
    from lazymat.numpy.cluster import grid_cluster as g1

    assert f1 is from_matrix and g1 is grid_cluster
    pytest.importorskip("torch")
    from lazymat.torch.cluster import cluster_ranges_centroids as c2

    assert c2 is cluster_ranges_centroids
