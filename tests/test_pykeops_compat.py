"""pykeops 2.3's public behaviour on lazymat: its documented idioms and tutorials' usage,
each checked against dense numpy/torch; the opt-in ``install_as_pykeops()`` switch; SciPy's
``aslinearoperator`` on a LazyTensor."""

import importlib.machinery
import os
import pickle
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import scipy.sparse.linalg as sla
import torch

import lazymat as lm
from lazymat import ComplexLazyTensor, LazyTensor, Pm, Vi, Vj
from lazymat.torch.utils import torchtools

SRC = os.path.join(os.path.dirname(__file__), "..", "src")
# the switch refuses to shadow a real pykeops (the bench extra installs one): those tests skip
REAL_PYKEOPS = importlib.machinery.PathFinder.find_spec("pykeops") is not None
no_real_pykeops = pytest.mark.skipif(REAL_PYKEOPS, reason="a real pykeops is installed")


def tol(dtype):
    return dict(rtol=2e-4, atol=2e-5) if dtype in (torch.float32, np.float32) else \
        dict(rtol=1e-9, atol=1e-11)


def t(a):
    return a.detach().cpu().numpy() if torch.is_tensor(a) else np.asarray(a)


@pytest.fixture
def pts():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 3, generator=g, dtype=torch.float64)
    y = torch.randn(30, 3, generator=g, dtype=torch.float64)
    return x, y


# ---------------------------------------------------------------------- axis conventions

def test_feature_axis_nbatch_plus_2_is_the_component_op(pts):
    x, y = pts
    x_i, y_j = LazyTensor(x[:, None, :]), LazyTensor(y[None, :, :])
    diff = (x[:, None, :] - y[None]) ** 2  # dense (M, N, D)
    D_ij = (x_i - y_j) ** 2
    for axis in (2, -1):
        np.testing.assert_allclose(t(D_ij.sum(axis).sum(1)), t(diff.sum(-1).sum(1))[:, None])
        np.testing.assert_allclose(t(D_ij.sum(dim=axis).sum(dim=0)),
                                   t(diff.sum(-1).sum(0))[:, None])
        np.testing.assert_allclose(t(D_ij.min(axis).min(1)),
                                   t(diff.min(-1).values.min(1).values)[:, None])
        np.testing.assert_allclose(t(D_ij.max(axis=axis).max(1)),
                                   t(diff.max(-1).values.max(1).values)[:, None])
        # argmin over the components, then a value reduction of those indices
        np.testing.assert_allclose(t(D_ij.argmin(axis).sum(1)),
                                   t(diff.argmin(-1).double().sum(1))[:, None])
        np.testing.assert_allclose(t(D_ij.argmax(dim=axis).sum(1)),
                                   t(diff.argmax(-1).double().sum(1))[:, None])
    np.testing.assert_allclose(t((x_i - y_j).norm(dim=2).sum(1)),
                               t(diff.sum(-1).sqrt().sum(1))[:, None])
    # the default of sum/min/max/argmin/argmax is the feature axis, as in pykeops
    assert D_ij.sum().ndim == 1 and D_ij.sum().shape == (40, 30)


def test_feature_axis_with_batch_dims():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(2, 5, 3, generator=g), torch.randn(2, 7, 3, generator=g)
    x_i, y_j = LazyTensor(x[:, :, None, :]), LazyTensor(y[:, None, :, :])
    D_ij = ((x_i - y_j) ** 2).sum(3)  # one batch dim: the feature axis is 3
    assert D_ij._shape == (2, 5, 7, 1) and D_ij.nbatchdims == 1 and D_ij.dim() == 4
    dense = ((x[:, :, None] - y[:, None]) ** 2).sum(-1)
    np.testing.assert_allclose(t(D_ij.logsumexp(2)), t(torch.logsumexp(dense, 2))[..., None],
                               rtol=1e-5)
    np.testing.assert_allclose(t((-D_ij).exp().sum(dim=1)), t((-dense).exp().sum(1))[..., None],
                               rtol=1e-5)
    with pytest.raises(lm.ShapeError, match="dim must be 1"):
        D_ij.sum(0)


def test_reduction_spellings_always_reduce(pts):
    x, y = pts
    K = (-Vi(x).sqdist(Vj(y))).exp()
    Kd = torch.exp(-torch.cdist(x, y) ** 2)
    np.testing.assert_allclose(t(K.sum_reduction(axis=1)),
                               t(Kd.sum(1, keepdim=True)), **tol(x.dtype))
    np.testing.assert_allclose(t(K.sum_reduction(dim=0)), t(Kd.sum(0))[:, None], **tol(x.dtype))
    np.testing.assert_allclose(t(K.min_reduction(dim=1)), t(Kd.min(1).values)[:, None])
    np.testing.assert_array_equal(t(K.argmax_reduction(axis=1))[:, 0], t(Kd.argmax(1)))
    with pytest.raises(lm.ShapeError, match="dim"):
        K.sum_reduction()  # pykeops: the *_reduction forms need an axis


def test_weights_as_other_and_K_as_a_0d_tensor(pts):
    x, y = pts
    w = torch.rand(30, 2, dtype=torch.float64)
    S_ij = -Vi(x).sqdist(Vj(y))
    Sd = -torch.cdist(x, y) ** 2
    lse = S_ij.logsumexp(dim=1, other=Vj(w[:, :1]))
    want = torch.logsumexp(Sd + w[:, 0].log()[None], 1, keepdim=True)
    np.testing.assert_allclose(t(lse), t(want), **tol(x.dtype))
    np.testing.assert_allclose(t(S_ij.logsumexp(1, weight=Vj(w[:, :1]))), t(want), **tol(x.dtype))
    ssw = S_ij.sumsoftmaxweight(axis=1, other=Vj(w))
    np.testing.assert_allclose(t(ssw), t(torch.softmax(Sd, 1) @ w), **tol(x.dtype))
    D = Vi(x).sqdist(Vj(y))
    Dd = torch.cdist(x, y) ** 2
    for K in (torch.tensor(3), np.int64(3), torch.tensor(3.0)):
        np.testing.assert_array_equal(t(D.argKmin(K, dim=1)),
                                      t(Dd.topk(3, 1, largest=False).indices))
        np.testing.assert_allclose(t(D.Kmin(K=K, dim=1)), t(Dd.topk(3, 1, largest=False).values),
                                   **tol(x.dtype))
        vals, idx = D.Kmin_argKmin(K, 1)
        np.testing.assert_array_equal(t(idx), t(Dd.topk(3, 1, largest=False).indices))
    np.testing.assert_array_equal(t(D.argKmin(opt_arg=2, dim=1)),
                                  t(Dd.topk(2, 1, largest=False).indices))


# ---------------------------------------------------------------------- attributes

def test_attributes_that_libraries_inspect(pts):
    x, y = pts
    x_i, y_j = LazyTensor(x[:, None, :]), LazyTensor(y[None, :, :])
    D_ij = (x_i - y_j) ** 2
    assert hasattr(D_ij, "_shape") and D_ij._shape == (40, 30, 3) and D_ij.shape == (40, 30, 3)
    assert D_ij.sum(2)._shape == (40, 30, 1) and D_ij.sum(2).shape == (40, 30)
    assert x_i._shape == (40, 1, 3) and y_j._shape == (1, 30, 3)
    assert D_ij.ndim == 3 and D_ij.nbatchdims == 0 and D_ij.dim() == 3
    assert D_ij.dtype == "float64" and Vi(x.float()).dtype == "float32"
    assert D_ij.tools is torchtools and Vi(np.ones((3, 2))).tools.__name__ == "numpytools"
    assert D_ij.__GenericLazyTensor__ and D_ij.ni == 40 and D_ij.nj == 30
    assert len(D_ij.variables) == 2 and D_ij.symbolic_variables == ()
    assert Vi(0, 3).symbolic_variables == ((0, 3, 0),)
    assert torchtools.dtypename(torchtools.dtype(x)) == "float64"
    np.testing.assert_allclose(t(torchtools.sqdist(x, y)), t(torch.cdist(x, y) ** 2), rtol=1e-9)
    # settable backend, used by the reductions
    K = (-D_ij.sum(2)).exp()
    K.backend = "CPU"
    np.testing.assert_allclose(t(K.sum(1)), t(torch.exp(-torch.cdist(x, y) ** 2).sum(1))[:, None],
                               **tol(x.dtype))


def test_complex_lazytensor():
    rng = np.random.default_rng(2)
    z = rng.standard_normal((6, 2)) + 1j * rng.standard_normal((6, 2))
    w = rng.standard_normal((5, 2)) + 1j * rng.standard_normal((5, 2))
    z_i, w_j = LazyTensor(z[:, None, :]), LazyTensor(w[None, :, :])
    assert isinstance(z_i, ComplexLazyTensor) and isinstance(z_i, LazyTensor)
    prod = z_i * w_j
    assert isinstance(prod, ComplexLazyTensor)
    np.testing.assert_allclose(prod.sum(1), (z[:, None] * w[None]).sum(1), rtol=1e-12)
    np.testing.assert_allclose(prod.sum(-1).sum(0), (z[:, None] * w[None]).sum((0, 2))[:, None],
                               rtol=1e-12)
    assert not isinstance(prod.real, ComplexLazyTensor) and not isinstance(prod.abs(),
                                                                             ComplexLazyTensor)
    x = rng.standard_normal((6, 1))
    e = Vi(x).exp1j()
    assert isinstance(e, ComplexLazyTensor)
    np.testing.assert_allclose((e * Vj(np.ones((3, 1)))).sum(1)[:, 0], 3 * np.exp(1j * x[:, 0]),
                               rtol=1e-12)
    promoted = ComplexLazyTensor(x[:, None, :])
    assert promoted.is_complex and isinstance(promoted, ComplexLazyTensor)
    assert LazyTensor(x[:, None, :], is_complex=True).is_complex


# ---------------------------------------------------------------------- gradients

def test_gradient_of_an_absent_variable_is_zero(pts):
    x, y = pts
    e = torch.randn(30, 1, dtype=torch.float64)
    g = Vj(y).sqnorm2().grad(Vi(x), Vj(e)).sum(0)
    assert g.shape == (30, 3) and not g.any()
    # nested Grad: Grad(Grad(x + y, x, e), x, e2) = 0 (the inner one no longer has x)
    e2 = torch.randn(40, 3, dtype=torch.float64)
    inner = (Vi(x) + Vj(y)).grad(Vi(x), Vi(e2))
    assert not inner.grad(Vi(x), Vi(e2)).sum(1).any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_one_tensor_for_two_aliases_gradients(dtype):
    """Kinv(x, x, b): the gradient with respect to x counts both aliases once (it came back
    2x too large in KernelSolve); Genred and LazyTensor likewise."""
    g = torch.Generator().manual_seed(3)
    x = torch.rand(25, 2, generator=g, dtype=dtype).requires_grad_()
    b = torch.randn(25, 1, generator=g, dtype=dtype)
    alpha = 0.5
    Kinv = lm.KernelSolve("Exp(-SqDist(x, y) * IntInv(2)) * b", ["x = Vi(2)", "y = Vj(2)",
                                                              "b = Vj(1)"], "b", axis=1)
    a = Kinv(x, x, b, alpha=alpha, eps=1e-10 if dtype == torch.float64 else 1e-6)
    gx, = torch.autograd.grad((a ** 2).sum(), x)
    xd = x.detach().double().requires_grad_()
    Kd = torch.exp(-torch.cdist(xd, xd) ** 2 / 2)
    ad = torch.linalg.solve(Kd + alpha * torch.eye(25, dtype=torch.float64), b.double())
    gd, = torch.autograd.grad((ad ** 2).sum(), xd)
    np.testing.assert_allclose(t(a), t(ad), rtol=1e-3 if dtype == torch.float32 else 1e-8,
                               atol=1e-4 if dtype == torch.float32 else 1e-9)
    np.testing.assert_allclose(t(gx), t(gd), rtol=2e-3 if dtype == torch.float32 else 1e-7,
                               atol=2e-3 if dtype == torch.float32 else 1e-8)
    # LazyTensor.solve with the same tensor as x_i and x_j
    K = (-Vi(x).sqdist(Vj(x)) / 2).exp()
    eps = 1e-10 if dtype == torch.float64 else 1e-6
    gl, = torch.autograd.grad((K.solve(b, alpha=alpha, precond=None, eps=eps) ** 2).sum(), x)
    np.testing.assert_allclose(t(gl), t(gd), rtol=2e-3 if dtype == torch.float32 else 1e-7,
                               atol=2e-3 if dtype == torch.float32 else 1e-8)
    # Genred with x for both aliases, and torch.func.grad of it
    gauss = lm.Genred("Exp(-SqDist(x, y)) * b", ["x = Vi(2)", "y = Vj(2)", "b = Vj(1)"], axis=1)
    out = gauss(x, x, b)
    gg, = torch.autograd.grad((out ** 2).sum(), x)
    dense = torch.exp(-torch.cdist(xd, xd) ** 2) @ b.double()
    gdd, = torch.autograd.grad((dense ** 2).sum(), xd)
    np.testing.assert_allclose(t(gg), t(gdd), **tol(dtype))
    gf = torch.func.grad(lambda z: (gauss(z, z, b) ** 2).sum())(x.detach())
    np.testing.assert_allclose(t(gf), t(gdd), **tol(dtype))


def test_hessian_through_a_nonlinear_function_of_the_output():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(5, 2, generator=g, dtype=torch.float64)
    y = torch.randn(6, 2, generator=g, dtype=torch.float64)

    def red(z):
        return (-(Vi(z) - Vj(y)).sqnorm2()).exp().sum(1)

    def dense(z):
        return torch.exp(-((z[:, None] - y[None]) ** 2).sum(-1)).sum(1, keepdim=True)

    for outer in (lambda r: (r ** 2).sum(), lambda r: r.log().sum()):
        H = torch.func.hessian(lambda z: outer(red(z)))(x)
        Hd = torch.func.hessian(lambda z: outer(dense(z)))(x)
        np.testing.assert_allclose(t(H), t(Hd), rtol=1e-9, atol=1e-11)


# ---------------------------------------------------------------------- solve

def test_solve_with_a_lazytensor_right_hand_side(pts):
    x, _ = pts
    b = torch.randn(40, 2, dtype=torch.float64)
    K = (-Vi(x).sqdist(Vj(x)) / 2).exp()
    S = torch.exp(-torch.cdist(x, x) ** 2 / 2) + 0.1 * torch.eye(40, dtype=torch.float64)
    want = torch.linalg.solve(S, b)
    for rhs in (Vi(b), b):
        np.testing.assert_allclose(t(K.solve(rhs, alpha=0.1, eps=1e-10)), t(want), rtol=1e-7,
                                   atol=1e-9)
    # Vj(b): Σ_i K_ij a_i = b_j, the transposed system (an asymmetric K shows the difference)
    y = x + 0.05
    A = (-Vi(x).sqdist(Vj(y)) / 2).exp() + (-Vi(x).sqdist(Vj(x)) / 2).exp()
    Ad = torch.exp(-torch.cdist(x, y) ** 2 / 2) + torch.exp(-torch.cdist(x, x) ** 2 / 2)
    np.testing.assert_allclose(
        t(A.solve(Vj(b), alpha=1.0, eps=1e-10)),
        t(torch.linalg.solve(Ad.T + torch.eye(40, dtype=torch.float64), b)), rtol=1e-6, atol=1e-8)
    # a symbolic right-hand side: a solver called with the data, and call=False
    solver = K.solve(Vi(0, 2), alpha=0.1, eps=1e-10)
    np.testing.assert_allclose(t(solver(b)), t(want), rtol=1e-7, atol=1e-9)
    later = K.solve(Vi(b), alpha=0.1, eps=1e-10, call=False)
    np.testing.assert_allclose(t(later()), t(want), rtol=1e-7, atol=1e-9)


# ---------------------------------------------------------------------- tutorials' usage

def test_kmeans_tutorial():
    """pykeops' K-means: argmin of the distances to the centroids, then averages."""
    g = torch.Generator().manual_seed(5)
    x = torch.rand(300, 2, generator=g, dtype=torch.float64)
    c = x[:8].clone()
    cd = c.clone()
    x_i = LazyTensor(x.view(300, 1, 2))
    for _ in range(5):
        c_j = LazyTensor(c.view(1, 8, 2))
        labels = ((x_i - c_j) ** 2).sum(-1).argmin(dim=1).long().view(-1)
        labels_d = torch.cdist(x, cd).argmin(1)
        assert torch.equal(labels, labels_d)
        for cc, lab in ((c, labels), (cd, labels_d)):
            cc.zero_().scatter_add_(0, lab[:, None].repeat(1, 2), x)
            cc /= torch.bincount(lab, minlength=8).type_as(cc).view(8, 1)
    np.testing.assert_allclose(t(c), t(cd), rtol=1e-12)


def test_knn_classification_tutorial():
    g = torch.Generator().manual_seed(6)
    train, test = torch.rand(200, 2, generator=g), torch.rand(50, 2, generator=g)
    labels = (train[:, 0] > train[:, 1]).long()
    X_i, X_j = LazyTensor(test[:, None, :]), LazyTensor(train[None, :, :])
    D_ij = ((X_i - X_j) ** 2).sum(-1)
    ind_knn = D_ij.argKmin(5, dim=1)
    want = torch.cdist(test, train).topk(5, 1, largest=False).indices
    assert torch.equal(ind_knn, want)
    pred = labels[ind_knn].float().mean(1) > 0.5
    assert torch.equal(pred, labels[want].float().mean(1) > 0.5)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_rbf_interpolation_tutorial_numpy(dtype):
    """KernelSolve (numpy) as in pykeops' interpolation tutorial."""
    rng = np.random.default_rng(7)
    x = rng.random((60, 1)).astype(dtype)
    b = (x + 0.5 * np.sin(6 * x)).astype(dtype)
    g = np.array([0.5 / 0.1 ** 2], dtype=dtype)
    Kinv = lm.KernelSolve("Exp(- g * SqDist(x,y)) * b", ["x = Vi(1)", "y = Vj(1)", "b = Vj(1)",
                                                        "g = Pm(1)"], "b", axis=1)
    a = Kinv(x, x, b, g, alpha=1.0)
    S = np.exp(-g[0] * (x - x.T) ** 2) + np.eye(60)
    np.testing.assert_allclose(a, np.linalg.solve(S.astype(np.float64), b), rtol=1e-3,
                               atol=1e-4 if dtype == np.float32 else 1e-8)


def test_log_domain_sinkhorn_tutorial():
    """Entropic OT by LogSumExp iterations, as pykeops' and GeomLoss' online code writes it."""
    g = torch.Generator().manual_seed(8)
    x, y = torch.rand(30, 2, generator=g, dtype=torch.float64), torch.rand(20, 2, generator=g,
                                                                            dtype=torch.float64)
    a, b = torch.full((30,), 1 / 30, dtype=torch.float64), torch.full((20,), 1 / 20,
                                                                       dtype=torch.float64)
    eps = 0.1
    C_ij = ((LazyTensor(x[:, None, :]) - LazyTensor(y[None, :, :])) ** 2).sum(-1) / 2
    C = torch.cdist(x, y) ** 2 / 2
    f, g_ = torch.zeros(30, dtype=torch.float64), torch.zeros(20, dtype=torch.float64)
    fd, gd = f.clone(), g_.clone()
    for _ in range(10):
        g_j = LazyTensor(g_[None, :, None])
        f = -eps * ((g_j - C_ij) / eps + LazyTensor(b.log()[None, :, None])).logsumexp(1).view(-1)
        f_i = LazyTensor(f[:, None, None])
        g_ = -eps * ((f_i - C_ij) / eps + LazyTensor(a.log()[:, None, None])).logsumexp(0).view(-1)
        fd = -eps * torch.logsumexp((gd[None] - C) / eps + b.log()[None], 1)
        gd = -eps * torch.logsumexp((fd[:, None] - C) / eps + a.log()[:, None], 0)
    np.testing.assert_allclose(t(f), t(fd), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(t(g_), t(gd), rtol=1e-10, atol=1e-12)


def test_block_sparse_reduction_as_pykeops_examples_build_it():
    """grid_cluster -> cluster_ranges_centroids -> sort_clusters -> from_matrix, then
    ``K.ranges = ...`` and a ``.sum(2)``-style formula, against the dense masked sum."""
    from lazymat.torch.cluster import (cluster_ranges_centroids, from_matrix, grid_cluster,
                                       sort_clusters)

    g = torch.Generator().manual_seed(9)
    x = torch.rand(400, 2, generator=g, dtype=torch.float64)
    y = torch.rand(300, 2, generator=g, dtype=torch.float64)
    b = torch.randn(300, 1, generator=g, dtype=torch.float64)
    eps = 0.05
    x_labels, y_labels = grid_cluster(x, eps), grid_cluster(y, eps)
    x_ranges, x_centroids, _ = cluster_ranges_centroids(x, x_labels)
    y_ranges, y_centroids, _ = cluster_ranges_centroids(y, y_labels)
    x, x_labels = sort_clusters(x, x_labels)
    (y, b), y_labels = sort_clusters((y, b), y_labels)
    sigma = 0.05
    D = ((x_centroids[:, None, :] - y_centroids[None, :, :]) ** 2).sum(2)
    keep = D < (4 * sigma) ** 2
    ranges_ij = from_matrix(x_ranges, y_ranges, keep)
    x_i, y_j = LazyTensor(x[:, None, :]), LazyTensor(y[None, :, :])
    K_ij = (-((x_i - y_j) ** 2).sum(2) / (2 * sigma ** 2)).exp()
    K_ij.ranges = ranges_ij
    out = K_ij @ b
    mask = keep[x_labels][:, y_labels]
    dense = (torch.exp(-torch.cdist(x, y) ** 2 / (2 * sigma ** 2)) * mask) @ b
    np.testing.assert_allclose(t(out), t(dense), rtol=1e-10, atol=1e-12)


def test_genred_options_and_geomloss_formula():
    g = torch.Generator().manual_seed(10)
    x, y = torch.rand(20, 3, generator=g), torch.rand(25, 3, generator=g)
    h = torch.rand(25, 1, generator=g)
    lse = lm.generic_logsumexp("( B - (P * (SqDist(X,Y) / IntCst(2)) ) )", "A = Vi(1)",
                               "X = Vi(3)", "Y = Vj(3)", "B = Vj(1)", "P = Pm(1)")
    eps_inv = torch.tensor([10.0])
    want = torch.logsumexp(h.T - eps_inv * torch.cdist(x, y) ** 2 / 2, 1, keepdim=True)
    np.testing.assert_allclose(t(lse(x, y, h, eps_inv)), t(want), rtol=1e-5, atol=1e-6)
    gauss = lm.Genred("Exp(-SqDist(x, y)) * b", ["x = Vi(3)", "y = Vj(3)", "b = Vj(1)"],
                      axis=1, dtype_acc="float64", sum_scheme="kahan_scheme", enable_chunks=False,
                      use_fast_math=False)
    ref = torch.exp(-torch.cdist(x, y) ** 2) @ h
    np.testing.assert_allclose(t(gauss(x, y, h, backend="CPU", device_id=-1)), t(ref), rtol=1e-5)
    again = pickle.loads(pickle.dumps(gauss))
    np.testing.assert_allclose(t(again(x, y, h)), t(ref), rtol=1e-5)
    old = lm.Genred("Exp(-SqDist(x, y)) * b", ["x = Vx(3)", "y = Vy(3)", "b = Vy(1)"], axis=1)
    np.testing.assert_allclose(t(old(x, y, h)), t(ref), rtol=1e-5)
    K = (-Vi(x).sqdist(Vj(y))).exp()
    np.testing.assert_allclose(t(K.sum(1, use_double_acc=True, backend="CPU")),
                               t(torch.exp(-torch.cdist(x, y) ** 2).sum(1, keepdim=True)),
                               rtol=1e-5)


# ---------------------------------------------------------------------- scipy

def _gaussian(n=300, dtype=np.float64):
    x = np.random.default_rng(11).random((n, 2)).astype(dtype)
    K = (-Vi(x).sqdist(Vj(x)) * 4).exp()
    Kd = np.exp(-4 * ((x[:, None] - x[None]) ** 2).sum(-1))
    return x, K, Kd


def test_scipy_aslinearoperator_eigsh_and_cg():
    x, K, Kd = _gaussian()
    op = sla.aslinearoperator(K)
    assert op.shape == (300, 300) and op.dtype == np.float64
    v = np.random.default_rng(12).standard_normal(300)
    np.testing.assert_allclose(op.matvec(v), Kd @ v, rtol=1e-10)
    np.testing.assert_allclose(op.rmatvec(v), Kd.T @ v, rtol=1e-10)
    V = np.random.default_rng(13).standard_normal((300, 3))
    np.testing.assert_allclose(op.matmat(V), Kd @ V, rtol=1e-10)
    np.testing.assert_allclose(op.matvec(np.ones(300, dtype=np.int8)), Kd.sum(1), rtol=1e-10)
    top = sla.eigsh(op, k=5, which="LM", return_eigenvectors=False)
    np.testing.assert_allclose(np.sort(top), np.linalg.eigvalsh(Kd)[-5:], rtol=1e-8)
    S = sla.aslinearoperator(K) + 0.5 * sla.aslinearoperator(sla.LinearOperator(
        (300, 300), matvec=lambda u: u, dtype=np.float64))
    sol, info = sla.cg(S, v, rtol=1e-10, maxiter=2000)
    assert info == 0
    np.testing.assert_allclose(sol, np.linalg.solve(Kd + 0.5 * np.eye(300), v), rtol=1e-6,
                               atol=1e-8)


def test_scipy_operator_of_a_torch_and_a_float32_lazytensor():
    x, _, Kd = _gaussian(120)
    xt = torch.from_numpy(x).float()
    op = sla.aslinearoperator((-Vi(xt).sqdist(Vj(xt)) * 4).exp())
    assert op.dtype == np.float32
    v = np.random.default_rng(14).standard_normal(120)
    out = op.matvec(v)
    assert isinstance(out, np.ndarray)
    np.testing.assert_allclose(out, Kd @ v, rtol=1e-4, atol=1e-4)
    top = sla.eigsh(op, k=3, return_eigenvectors=False)
    np.testing.assert_allclose(np.sort(top), np.linalg.eigvalsh(Kd)[-3:], rtol=1e-4)


# ---------------------------------------------------------------------- the switch

def _run(code: str, env: dict | None = None, cwd: str | None = None) -> subprocess.CompletedProcess:
    full = dict(os.environ, PYTHONPATH=os.path.abspath(SRC) + os.pathsep + (cwd or ""),
                **(env or {}))
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, env=full, timeout=240, cwd=cwd)


@no_real_pykeops
def test_install_as_pykeops_gives_the_pykeops_modules(tmp_path):
    r = _run("""
        import lazymat
        lazymat.install_as_pykeops()
        import pykeops, pykeops.torch, pykeops.numpy, pykeops.config
        from pykeops.torch import LazyTensor, Vi, Vj, Pm, Genred, KernelSolve, generic_sum
        from pykeops.torch import ComplexLazyTensor
        from pykeops.torch.cluster import grid_cluster, from_matrix, swap_axes
        from pykeops.numpy import LazyTensor as NLT
        from pykeops.numpy.cluster import sort_clusters
        from pykeops.numpy.utils import numpytools, IsGpuAvailable
        from pykeops.torch.utils import torchtools
        from pykeops.common.lazy_tensor import GenericLazyTensor
        import torch
        assert LazyTensor is lazymat.LazyTensor and GenericLazyTensor is lazymat.LazyTensor
        assert pykeops.__version__.startswith("2.3") and pykeops.torch is pykeops.torch
        assert pykeops.config.torch_found and not pykeops.config.gpu_available
        pykeops.set_verbose(False)
        assert pykeops.test_torch_bindings() and pykeops.test_numpy_bindings()
        report = pykeops.check_health()
        assert report["pykeops"] == "lazymat", report
        x = torch.rand(10, 3)
        print(float(((LazyTensor(x[:, None]) - LazyTensor(x[None])) ** 2).sum(2).sum(1).sum()))
        lazymat.uninstall_as_pykeops()
        import sys; assert "pykeops" not in sys.modules
    """, env={"LAZYMAT_CACHE_DIR": str(tmp_path)})
    assert r.returncode == 0, r.stderr
    assert "is working!" in r.stdout and "lazymat" in r.stdout


def test_the_switch_never_shadows_a_real_pykeops_silently(tmp_path):
    fake = tmp_path / "pykeops"
    fake.mkdir()
    (fake / "__init__.py").write_text("__version__ = '2.3'\nREAL = True\n")
    r = _run("""
        import lazymat
        try:
            lazymat.install_as_pykeops()
        except RuntimeError as e:
            print("refused:", e)
        import pykeops; assert getattr(pykeops, "REAL", False)
        print(lazymat.check_health(verbose=False)["pykeops"])
    """, cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert "refused" in r.stdout and "force=True" in r.stdout and "pykeops 2.3" in r.stdout
    forced = _run("""
        import lazymat
        lazymat.install_as_pykeops(force=True)
        import pykeops; assert not hasattr(pykeops, "REAL")
        print(lazymat.check_health(verbose=False)["pykeops"])
    """, cwd=str(tmp_path))
    assert forced.returncode == 0 and forced.stdout.strip().endswith("lazymat"), forced.stderr


@no_real_pykeops
def test_the_shim_defers_to_lazymat_when_the_variable_is_set(tmp_path):
    shims = tmp_path / "shims"
    r = _run(f"import lazymat.pykeops_compat as c; print(c.write_shim({str(shims)!r}))")
    assert r.returncode == 0 and r.stdout.strip().endswith("__init__.py"), r.stderr
    code = """
        try:
            import pykeops.torch, lazymat
            print(pykeops.torch.LazyTensor is lazymat.LazyTensor,
                  lazymat.check_health(verbose=False)["pykeops"])
        except ImportError as e:
            print("ImportError", e)
    """
    on = _run(code, env={"LAZYMAT_AS_PYKEOPS": "1"}, cwd=str(shims))
    assert on.returncode == 0 and on.stdout.split() == ["True", "lazymat"], on.stderr
    off = _run(code, cwd=str(shims))
    assert off.returncode == 0 and "LAZYMAT_AS_PYKEOPS=1" in off.stdout, off.stderr
    # never over a real pykeops
    real = tmp_path / "real" / "pykeops"
    real.mkdir(parents=True)
    (real / "__init__.py").write_text("__version__ = '2.3'\n")
    refused = _run(f"import lazymat.pykeops_compat as c; c.write_shim({str(real.parent)!r})")
    assert refused.returncode != 0 and "real pykeops" in refused.stderr


@no_real_pykeops
def test_the_environment_variable_turns_the_switch_on(tmp_path):
    r = _run("""
        import lazymat, pykeops.torch
        print(pykeops.torch.LazyTensor is lazymat.LazyTensor)
    """, env={"LAZYMAT_AS_PYKEOPS": "1"})
    assert r.returncode == 0 and r.stdout.strip() == "True", r.stderr
    off = _run("""
        import lazymat, sys
        print("pykeops" not in sys.modules)
    """)
    assert off.returncode == 0 and off.stdout.strip() == "True", off.stderr
