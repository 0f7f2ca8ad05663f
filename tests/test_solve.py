"""KernelSolve and LazyTensor.solve: conjugate gradient against dense solves, gradients, errors."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import lazymat as lm

rng = np.random.default_rng(11)
X = rng.random((120, 2))
B = rng.standard_normal((120, 2))


def dense_kernel(x, g=10.0):
    return np.exp(-g * ((x[:, None] - x[None]) ** 2).sum(-1))


@pytest.mark.parametrize("dtype, tol", [("float32", 1e-3), ("float64", 1e-8)])
def test_lazytensor_solve_matches_dense(dtype, tol):
    x, b = X.astype(dtype), B.astype(dtype)
    K = (-lm.Vi(x).sqdist(lm.Vj(x)) * 10).exp()
    a = K.solve(b, alpha=0.5, eps=1e-10 if dtype == "float64" else 1e-6)
    want = np.linalg.solve(dense_kernel(X) + 0.5 * np.eye(len(X)), B)
    assert a.dtype == np.dtype(dtype) and a.shape == B.shape
    np.testing.assert_allclose(a, want, atol=tol * np.abs(want).max())
    a1 = K.solve(b[:, 0], alpha=0.5)
    assert a1.shape == (120,)


def test_kernelsolve_string_api_matches_dense():
    ks = lm.KernelSolve("Exp(-SqDist(x, y) * g) * a",
                        ["x = Vi(2)", "y = Vj(2)", "a = Vj(2)", "g = Pm(1)"], "a", axis=1)
    a = ks(X, X, B, np.array([10.0]), alpha=0.5, eps=1e-10)
    want = np.linalg.solve(dense_kernel(X) + 0.5 * np.eye(len(X)), B)
    np.testing.assert_allclose(a, want, atol=1e-8)
    residual = 0.5 * a + dense_kernel(X) @ a - B
    assert np.abs(residual).max() < 1e-8


def test_solve_warns_instead_of_hanging():
    K = (-lm.Vi(X).sqdist(lm.Vj(X)) * 10).exp()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        K.solve(B, alpha=1e-6, max_iter=3)
    assert any(issubclass(w.category, lm.ConvergenceWarning) for w in caught)


def test_solve_gradients_match_dense_torch():
    torch = pytest.importorskip("torch")
    x = torch.tensor(X[:40], requires_grad=True)
    b = torch.tensor(B[:40], requires_grad=True)
    g = torch.tensor([10.0], dtype=torch.float64, requires_grad=True)

    def ours(x, b, g):
        return (-lm.Vi(x).sqdist(lm.Vj(x)) * lm.Pm(g)).exp().solve(b, alpha=0.3, eps=1e-13)

    def dense(x, b, g):
        K = torch.exp(-g * ((x[:, None] - x[None]) ** 2).sum(-1))
        return torch.linalg.solve(K + 0.3 * torch.eye(len(x), dtype=x.dtype), b)

    mine = torch.autograd.grad((ours(x, b, g) ** 3).sum(), [x, b, g])
    want = torch.autograd.grad((dense(x, b, g) ** 3).sum(), [x, b, g])
    for m, w in zip(mine, want):
        np.testing.assert_allclose(m.numpy(), w.numpy(), rtol=1e-7, atol=1e-9)


def test_solve_errors():
    K = (-lm.Vi(X).sqdist(lm.Vj(X[:50]))).exp()
    with pytest.raises(lm.ShapeError, match="square"):
        K.solve(B[:50])
    with pytest.raises(lm.ShapeError, match="scalar"):
        (lm.Vi(X) - lm.Vj(X)).solve(B)
    with pytest.raises(lm.ShapeError, match="not one of the aliases"):
        lm.KernelSolve("Exp(-SqDist(x,y)) * a", ["x = Vi(2)", "y = Vj(2)", "a = Vj(1)"], "b")
