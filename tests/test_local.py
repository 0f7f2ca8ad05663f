"""lazymat.local: the pruned k-NN equals brute force bit for bit (ties included), radius
windows and periodic boxes against dense numpy, the sort permutation, the high-D switch-off.

Sizes are small; the kernels (D = 3, K = 4 and 5) are shared by the tests."""

from __future__ import annotations

import numpy as np
import pytest

import lazymat as lm
from lazymat import local

DTYPES = [np.float32, np.float64]
K = 4


def brute(x, y, k, box=None):
    f = lm.Vi(x).sqdist(lm.Vj(y)) if box is None else local.periodic_sqdist(
        lm.Vi(x), lm.Vj(y), box)
    return f.Kmin_argKmin(k, dim=1)


def clouds(kind, rng, dtype, M=1500, N=2000):
    if kind == "uniform":
        return rng.random((M, 3)).astype(dtype), rng.random((N, 3)).astype(dtype)
    if kind == "ties":  # integer points: many equal distances, equal points too
        return (rng.integers(0, 5, (M, 3)).astype(dtype),
                rng.integers(0, 5, (N, 3)).astype(dtype))
    # clustered: two dense blobs, a thin line and far outliers (rings grow, second passes)
    y = np.concatenate([rng.normal(0, 0.01, (N // 2, 3)), rng.normal(3, 0.3, (N // 4, 3)),
                        np.c_[np.linspace(-5, 5, N // 4 - 5), np.zeros((N // 4 - 5, 2))],
                        rng.uniform(-50, 50, (5, 3))])
    x = np.concatenate([rng.normal(0, 0.02, (M // 2, 3)), rng.uniform(-6, 6, (M - M // 2, 3))])
    return x.astype(dtype), y.astype(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["uniform", "ties", "clustered"])
def test_knn_equals_brute_force(kind, dtype):
    rng = np.random.default_rng(1)
    x, y = clouds(kind, rng, dtype)
    info: dict = {}
    v, i = local.knn(x, y, K, prune=True, info=info)
    bv, bi = brute(x, y, K)
    assert info["method"] == "pruned"
    assert v.dtype == bv.dtype and i.dtype == bi.dtype and v.shape == bv.shape
    assert np.array_equal(i, bi)
    assert np.array_equal(v, bv)  # bit for bit
    if kind == "ties":
        assert info["tied_rows"] > 0
    else:  # one grid for far-apart structures: the sparse queries see all columns
        assert info["kept_fraction"] < (0.2 if kind == "uniform" else 0.9)


def test_knn_second_pass_and_queries_outside():
    """Queries far from every column (huge K-th distance: cells beyond the first ring)."""
    rng = np.random.default_rng(2)
    y = rng.random((2000, 3))
    x = np.concatenate([rng.random((1000, 3)), rng.random((200, 3)) * 10 - 5])
    info: dict = {}
    v, i = local.knn(x, y, K, prune=True, info=info)
    bv, bi = brute(x, y, K)
    assert info["second_pass_cells"] > 0
    assert np.array_equal(i, bi) and np.array_equal(v, bv)


@pytest.mark.parametrize("dtype", DTYPES)
def test_periodic_knn(dtype):
    rng = np.random.default_rng(3)
    box = np.array([1.0, 2.0, 1.5])
    x = (rng.random((1200, 3)) * box).astype(dtype)
    y = (rng.random((1800, 3)) * box).astype(dtype)
    v, i = local.knn(x, y, K, box=box, prune=True)
    bv, bi = brute(x, y, K, box)
    assert np.array_equal(i, bi) and np.array_equal(v, bv)
    # the minimum image, densely in numpy
    d = x[:, None].astype(np.float64) - y[None]
    d -= box * np.round(d / box)
    d2 = (d ** 2).sum(-1)
    rows = np.arange(len(x))[:, None]
    np.testing.assert_allclose(v, d2[rows, i], rtol=1e-5 if dtype == np.float32 else 1e-12,
                               atol=1e-6)
    np.testing.assert_allclose(v[:, -1], np.sort(d2, 1)[:, K - 1], rtol=1e-4, atol=1e-6)
    # near the faces: neighbours across the box (x = 0.01 sees y = 0.99)
    assert (np.abs(x[rows, 0] - y[i, 0]) > 0.5).any()


def dense_window(x, y, r, b, kernel, box=None):
    d = x[:, None].astype(np.float64) - y[None].astype(np.float64)
    if box is not None:
        d -= box * np.round(d / box)
    d2 = (d ** 2).sum(-1)
    return ((d2 < r * r) * kernel(d2)) @ b


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("periodic", [False, True])
def test_radius_sum(dtype, periodic):
    rng = np.random.default_rng(4)
    box = np.array([1.0, 1.0, 2.0]) if periodic else None
    x = (rng.random((700, 3)) * (1 if box is None else box)).astype(dtype)
    y = (rng.random((800, 3)) * (1 if box is None else box)).astype(dtype)
    b = rng.standard_normal((800, 2)).astype(dtype)
    r = 0.15
    out = local.radius_sum(x, y, r, b, kernel=lambda d2: (-d2 * 30.0).exp(), box=box)
    want = dense_window(x, y, r, b, lambda d2: np.exp(-d2 * 30.0), box)
    assert out.shape == (700, 2) and out.dtype == dtype
    np.testing.assert_allclose(out, want, rtol=1e-4 if dtype == np.float32 else 1e-10,
                               atol=1e-4 if dtype == np.float32 else 1e-10)
    counts = local.radius_sum(x, y, r, box=box)
    np.testing.assert_array_equal(counts[:, 0], dense_window(
        x, y, r, np.ones(800), lambda d2: 1.0, box))


def test_radius_sum_torch_gradient():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(5)
    x = torch.tensor(rng.random((400, 3)), requires_grad=True)
    y = torch.tensor(rng.random((500, 3)), requires_grad=True)
    b = torch.tensor(rng.standard_normal((500, 2)), requires_grad=True)
    out = local.radius_sum(x, y, 0.2, b, kernel=lambda d2: (-d2 * 30.0).exp())
    d2 = ((x[:, None] - y[None]) ** 2).sum(-1)
    want = ((d2 < 0.04) * torch.exp(-d2 * 30.0)) @ b
    assert torch.allclose(out, want, atol=1e-10)
    g = torch.autograd.grad((out ** 2).sum(), [x, y, b])
    gw = torch.autograd.grad((want ** 2).sum(), [x, y, b])
    for a, c in zip(g, gw):
        assert torch.allclose(a, c, atol=1e-8)


def test_sort_permutation_round_trip():
    rng = np.random.default_rng(6)
    x = rng.random((500, 3))
    w = rng.random(500)
    labels = lm.grid_cluster(x, 0.3)
    (xs, ws), ls, perm = lm.sort_clusters((x, w), labels, return_permutation=True)
    assert np.array_equal(xs, x[perm]) and np.array_equal(ws, w[perm])
    assert (np.diff(ls) >= 0).all()
    back = np.empty_like(xs)
    back[perm] = xs  # the documented undo
    assert np.array_equal(back, x)
    # grid_cluster's labels: the lexicographic order of the cells
    cells = np.floor((x - x.min(0)) / 0.3).astype(int)
    _, want = np.unique(cells, axis=0, return_inverse=True)
    assert np.array_equal(labels, want.reshape(-1))


def test_from_pairs_matches_from_matrix():
    rng = np.random.default_rng(7)
    ri = np.array([[0, 3], [3, 3], [3, 9], [9, 10]])
    rj = np.array([[0, 4], [4, 6], [6, 11]])
    for _ in range(20):
        keep = rng.random((4, 3)) < 0.5
        a, c = np.nonzero(keep)
        p = rng.permutation(len(a))
        dense, sparse = lm.from_matrix(ri, rj, keep), lm.ranges.from_pairs(ri, rj, a[p], c[p])

        def mask(r, s, iv, M, N):
            m, prev = np.zeros((M, N), bool), 0
            for g, (i0, i1) in enumerate(r):
                for q in range(prev, s[g]):
                    m[i0:i1, iv[q, 0]:iv[q, 1]] = True
                prev = s[g]
            return m

        assert np.array_equal(mask(*dense[:3], 10, 11), mask(*sparse[:3], 10, 11))
        assert np.array_equal(mask(*dense[3:], 11, 10), mask(*sparse[3:], 11, 10))


def test_high_dimension_switches_pruning_off():
    rng = np.random.default_rng(8)
    x, y = rng.random((3000, 16)), rng.random((3000, 16))
    info: dict = {}
    v, i = local.knn(x, y, K, info=info)
    assert info["method"] == "brute force"
    bv, bi = brute(x, y, K)
    assert np.array_equal(i, bi) and np.array_equal(v, bv)
    # up to MAX_PRUNED_DIM the prediction decides: uniform D = 6 keeps too much
    x8, y8 = rng.random((3000, 6)), rng.random((3000, 6))
    local.MIN_PRUNED_PAIRS, old = 0, local.MIN_PRUNED_PAIRS
    try:
        local.knn(x8, y8, K, info=info)
    finally:
        local.MIN_PRUNED_PAIRS = old
    assert info["method"] == "brute force"


def test_torch_inputs_and_errors():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(9)
    x, y = rng.random((800, 3)), rng.random((900, 3))
    v, i = local.knn(torch.tensor(x), torch.tensor(y), K, prune=True)
    bv, bi = brute(x, y, K)
    assert isinstance(v, torch.Tensor) and np.array_equal(i.numpy(), bi)
    with pytest.raises(lm.ShapeError, match="same dimension"):
        local.knn(x, y[:, :2], K)
    with pytest.raises(lm.DtypeError, match="same dtype"):
        local.knn(x, y.astype(np.float32), K)
    with pytest.raises(lm.ShapeError, match="b must have one row"):
        local.radius_sum(x, y, 0.1, np.ones((5, 1)))
    with pytest.raises(lm.ShapeError, match="box"):
        local.knn(x, y, K, box=[1.0, -1.0, 1.0])


def test_knn_gradient_goes_through_brute_force():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(10)
    x = torch.tensor(rng.random((600, 3)), requires_grad=True)
    y = torch.tensor(rng.random((700, 3)))
    info: dict = {}
    v, i = local.knn(x, y, K, prune=True, info=info)
    assert info["method"] == "brute force" and v.requires_grad
    (g,) = torch.autograd.grad(v.sum(), [x])
    want = 2 * (x[:, None] - y[i]).sum(1)
    assert torch.allclose(g, want.detach(), atol=1e-10)
