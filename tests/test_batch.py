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
