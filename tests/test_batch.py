"""Batch dimensions: every reduction over broadcast leading dims against a loop over the batch."""

from __future__ import annotations

import numpy as np
import pytest

import lazymat as lm
from lazymat import autograd
from lazymat.formula import SqDist, Var, make
from lazymat.plan import Request, run

rng = np.random.default_rng(21)
x, y, b, p = Var(0, 3, 0), Var(1, 3, 1), Var(2, 2, 1), Var(3, 1, 2)
GAUSS = make("Exp", (-SqDist(x, y) * p,)) * b
SCALAR = -SqDist(x, y) * p

# (reduction, formula, weight, K)
CASES = [("Sum", GAUSS, None, None), ("Min", GAUSS, None, None), ("Max_ArgMax", GAUSS, None, None),
         ("ArgKMin", GAUSS, None, 3), ("KMin_ArgKMin", SCALAR, None, 2),
         ("LogSumExp", SCALAR, None, None), ("LogSumExp", SCALAR, b, None),
         ("SumSoftMaxWeight", SCALAR, b, None)]


def data(dtype):
    # batch shapes (2, 1), (3,), (2, 3), (2, 1): broadcast to (2, 3)
    X = rng.standard_normal((2, 1, 7, 3))
    Y = rng.standard_normal((3, 9, 3))
    B = rng.random((2, 3, 9, 2)) + 0.1  # positive: weights of LogSumExp
    P = rng.random((2, 1, 1)) + 0.5
    return [a.astype(dtype) for a in (X, Y, B, P)]


def loop(req, arrays):
    X, Y, B, P = arrays
    outs = [run(req, [X[i, 0], Y[j], B[i, j], P[i, 0]], backend="reference")
            for i in range(2) for j in range(3)]
    return [np.stack([o[k] for o in outs]).reshape((2, 3) + outs[0][k].shape)
            for k in range(len(outs[0]))]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}{'-w' if c[2] else ''}" for c in CASES])
def test_batched_reduction_matches_loop(case, axis, dtype):
    name, formula, weight, K = case
    arrays = data(dtype)
    req = Request(name, formula, axis=axis, K=K, weight=weight)
    want = loop(req, arrays)
    for backend in ("cpu", "reference"):
        got = run(req, arrays, backend=backend)
        for g, w in zip(got, want):
            assert g.shape == w.shape
            if g.dtype == np.int64:
                np.testing.assert_array_equal(g, w)
            else:
                np.testing.assert_allclose(g, w, rtol=1e-5 if dtype == "float32" else 1e-12,
                                           atol=1e-6)


def test_batch_mismatch_names_the_operands():
    X, Y, B, P = data("float64")
    with pytest.raises(lm.ShapeError, match="batch dims do not broadcast"):
        run(Request("Sum", GAUSS, axis=1), [X, Y[:2], B, P])


def test_batched_gradients():
    torch = pytest.importorskip("torch")
    X, Y, B, P = (torch.tensor(a, requires_grad=True) for a in data("float64"))
    X, Y, B, P = X[:, :, :4], Y[:, :5], B[:, :, :5], P
    for name, formula, weight, K in CASES:
        if name.startswith("Arg") or name == "Max_ArgMax":
            continue
        for axis in (0, 1):
            def fn(*a):
                req = Request(name, formula, axis=axis, K=K, weight=weight)
                return autograd.run(req, list(a))[0]
            assert torch.autograd.gradcheck(fn, (X, Y, B, P)), (name, axis)


def test_lazytensor_batch_layouts_and_dims():
    """pykeops layout (..., M, 1, D) / (..., 1, N, D) / (..., 1, 1, D), reductions over
    dim = nbatch and nbatch + 1, results of shape batch + (rows, D)."""
    X = rng.standard_normal((2, 3, 7, 1, 3))
    Y = rng.standard_normal((1, 3, 1, 9, 3))
    B = rng.standard_normal((2, 1, 1, 9, 2))
    S = rng.random((2, 3, 1, 1, 1)) + 0.5
    xi, yj, bj, s = lm.LazyTensor(X), lm.LazyTensor(Y), lm.LazyTensor(B), lm.LazyTensor(S)
    K = (-xi.sqdist(yj) * s).exp()
    assert K.shape == (2, 3, 7, 9) and K.nbatchdims == 2
    d = ((X[..., :, :, :] - Y) ** 2).sum(-1)  # (2, 3, 7, 9)
    Kd = np.exp(-d * S[..., 0])
    np.testing.assert_allclose((K * bj).sum(dim=3), Kd @ B[:, :, 0], rtol=1e-12)
    over_i = (Kd[..., None] * B[:, :, 0][..., None, :, :]).sum(-3)  # (2, 3, 9, 2)
    np.testing.assert_allclose((K * bj).sum(dim=2), over_i, rtol=1e-12)
    np.testing.assert_allclose(K @ np.ones((9,)), Kd.sum(-1), rtol=1e-12)
    np.testing.assert_array_equal(xi.sqdist(yj).argmin(dim=3)[..., 0], d.argmin(-1))
    np.testing.assert_allclose(K.dense(), Kd, rtol=1e-12)
    with pytest.raises(lm.ShapeError, match="dim must be 2"):
        K.sum(dim=1)


def test_lazytensor_ranges_and_dense():
    from test_ranges import block_problem, masked_dense

    arrays, ranges, mask = block_problem(7)
    X, Y, B = arrays
    K = (-lm.Vi(X).sqdist(lm.Vj(Y))).exp()
    from test_ranges import GAUSS as ranges_gauss

    want = masked_dense("Sum", ranges_gauss, None, None, arrays, mask, 1)[0]
    np.testing.assert_allclose((K * lm.Vj(B)).sum(dim=1, ranges=ranges), want, rtol=1e-12)
    K.ranges = ranges
    np.testing.assert_allclose(K @ B, want, rtol=1e-12)
    # the transpose uses the other half of the 6-tuple
    np.testing.assert_allclose(K.t() @ np.ones((37, 1)), (np.exp(-((X[:, None] - Y[None]) ** 2)
                               .sum(-1)) * mask).sum(0)[:, None], rtol=1e-12)
    np.testing.assert_allclose(lm.Vi(X[:4]).sqdist(lm.Vj(Y[:5])).dense(),
                               ((X[:4, None] - Y[None, :5]) ** 2).sum(-1), rtol=1e-12)

