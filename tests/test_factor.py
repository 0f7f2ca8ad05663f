"""Sums with the factors that do not vary with the reduced index taken out (formula/factor.py),
and the gradients that use them (autograd.py), against dense numpy and torch."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import TORCH as torch  # None without torch: those tests skip
from conftest import requires_torch

import lazymat as lm
from lazymat import autograd
from lazymat.arraylib import NUMPY
from lazymat.formula import I_CAT, J_CAT, P_CAT, Const, Var, grad, make, variables
from lazymat.formula.evaluate import evaluate, evaluate_rows
from lazymat.formula.factor import MAX_TERMS, factor_sum

x, y, b = Var(0, 3, I_CAT), Var(1, 3, J_CAT), Var(2, 1, J_CAT)
p = Var(3, 3, P_CAT)
e = make("Exp", (-make("Sum", (make("Square", (x - y,)),)) / 2,))


def _arrays(rng, M=7, N=9):
    return [rng.standard_normal((M, 3)), rng.standard_normal((N, 3)),
            rng.standard_normal((N, 1)), rng.standard_normal(3)]


def _check(formulas, arrays, reduced_cat=J_CAT):
    """Σ over the reduced index of each formula, densely, against its combine of the reduced
    columns; returns the Factored."""
    split = factor_sum(formulas, "Sum", reduced_cat, len(arrays))
    assert split is not None
    axis = 1 if reduced_cat == J_CAT else 0
    dense = [v.sum(axis) for v in evaluate(formulas, arrays, slice(None), slice(None), NUMPY,
                                           arrays[0])]
    reduced = evaluate([split.columns], arrays, slice(None), slice(None), NUMPY,
                       arrays[0])[0].sum(axis)
    got = evaluate_rows(split.combines, list(arrays) + [reduced], NUMPY, reduced)
    for f, g, w in zip(formulas, got, dense):
        assert split.combines[formulas.index(f)].dim == f.dim
        np.testing.assert_allclose(np.broadcast_to(g, w.shape), w, rtol=1e-12, atol=1e-12)
    for c in split.combines:  # nothing left that varies with the reduced index
        assert not c.deps & (2 if reduced_cat == J_CAT else 1)
    return split


def test_gaussian_jacobian_reduces_e_b_and_e_b_y_only():
    F = e * b
    jac = grad(F, x, Const(1))
    split = _check([F, jac], _arrays(np.random.default_rng(0)))
    # the forward's own column and e b y: the pair-level x - y is gone
    assert split.columns is make("Concat", (F, F * y))
    assert x not in variables(split.combines[0])  # F itself: its column as is
    assert x in variables(split.combines[1])  # -x Σ e b + Σ e b y


def test_backward_over_i_reduces_g_e_and_g_e_x():
    G = Var(4, 1, I_CAT)
    F = e * b
    dy, db = grad(F, y, G), grad(F, b, G)
    rng = np.random.default_rng(1)
    arrays = _arrays(rng) + [rng.standard_normal((7, 1))]
    split = _check([dy, db], arrays, reduced_cat=I_CAT)
    assert split.columns.dim == 4  # Σ_i G e x_i (3) and Σ_i G e (1): b_j and y_j come out
    assert {v.params[0] for v in variables(split.combines[0])} >= {1, 2}


def test_parameters_constants_and_divisions_come_out():
    F = e * b * (x - y) * p / (p * p + 1) * 3 - Const(2) * e * b * x
    split = _check([e * b, F], _arrays(np.random.default_rng(2)))
    assert split.columns.dim == 4  # e b, e b y


def test_params_with_batch_dims_on_the_rows():
    rng = np.random.default_rng(3)
    F = e * b
    jac = grad(F * p, x, Const(1))
    split = factor_sum([F * p, jac], "Sum", J_CAT, 4)
    R = rng.standard_normal((2, 7, split.columns.dim))  # batch 2, M = 7: the reduced columns
    xs, ps = rng.standard_normal((2, 7, 3)), rng.standard_normal((2, 3))
    got = evaluate_rows(split.combines, [xs, None, None, ps, R], NUMPY, R)
    assert [g.shape for g in got] == [(2, 7, 3), (2, 7, 3)]
    ref = evaluate_rows(split.combines, [xs[1], None, None, ps[1], R[1]], NUMPY, R)
    np.testing.assert_allclose(got[1][1], ref[1])


@pytest.mark.parametrize("reduction", ["LogSumExp", "Max", "Min", "KMin", "SumSoftMaxWeight"])
def test_only_sums_are_split(reduction):
    assert factor_sum([e * b, grad(e * b, x, Const(1))], reduction, J_CAT, 3) is None


def test_no_split_when_nothing_comes_out():
    both = make("Exp", (make("Sum", (x * y,)),))  # every factor varies with i and j
    assert factor_sum([both * b], "Sum", J_CAT, 3) is None
    assert factor_sum([e * b], "Sum", J_CAT, 3) is None  # e b: one column, nothing outside


def test_no_split_when_it_would_reduce_more_columns():
    # Σ e (x - y) alone: 3 columns; split, Σ e and Σ e y: 4
    assert factor_sum([e * (x - y)], "Sum", J_CAT, 3) is None


def test_no_split_of_a_term_constant_in_the_reduced_index():
    # Σ_j x_i is N x_i (or the count of a range): left to the kernel
    assert factor_sum([x + e * y * x], "Sum", J_CAT, 3) is None


def test_terms_that_cancel_or_vanish():
    F = e * b
    _check([F, F * (x - y) - F * (x - y)], _arrays(np.random.default_rng(8)))  # 0, computed
    assert factor_sum([F, F * x * 0], "Sum", J_CAT, 3) is None  # a constant 0: left whole


def test_long_products_of_sums_stay_whole():
    F = e
    for k in range(6):  # (x + y)^6 multiplied out would be 64 terms
        F = F * (x + y)
    split = factor_sum([F * b, grad(F * b, b, Const(1))], "Sum", J_CAT, 3)
    assert split is None or len(split.columns.args) <= MAX_TERMS
    if split is not None:
        _check([F * b, grad(F * b, b, Const(1))], _arrays(np.random.default_rng(4)))


# ------------------------------------------------------------------ gradients, end to end


def _dense_gauss(x, y, b, s, axis):
    d = ((x[..., :, None, :] - y[..., None, :, :]) ** 2).sum(-1)
    K = torch.exp(-d * s)
    return K @ b if axis == 1 else K.transpose(-1, -2) @ b


@requires_torch
@pytest.mark.parametrize("E", [1, 2])
@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("factor", [False, True])
def test_gaussian_gradients_batch_params_both_axes(monkeypatch, factor, dtype, axis, E):
    dtype = getattr(torch, dtype)
    monkeypatch.setattr(autograd, "FACTOR_SUMS", factor)
    splits = []

    def spy(*args):
        splits.append(factor_sum(*args))
        return splits[-1]

    monkeypatch.setattr(autograd, "factor_sum", spy)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 1, 30, 3, generator=g, dtype=dtype).requires_grad_(True)
    y = torch.randn(1, 3, 40, 3, generator=g, dtype=dtype).requires_grad_(True)
    nb = 40 if axis == 1 else 30
    b = torch.randn(2, 3, nb, E, generator=g, dtype=dtype).requires_grad_(True)
    s = torch.tensor([0.6], dtype=dtype, requires_grad=True)
    B = lm.Vj(b) if axis == 1 else lm.Vi(b)
    K = (-lm.Vi(x).sqdist(lm.Vj(y)) * lm.Pm(s)).exp()
    out = (K * B).sum(dim=axis + 2)  # after the 2 batch dims
    w = torch.randn(out.shape, generator=g, dtype=dtype)
    got = torch.autograd.grad((out * w).sum(), [x, y, b, s])
    want = torch.autograd.grad((_dense_gauss(x, y, b, s, axis) * w).sum(), [x, y, b, s])
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-10,
                                                                            atol=1e-11)
    for u, v in zip(got, want):
        torch.testing.assert_close(u, v, **tol)
    # split: the forward with the Jacobian sums of the output-index variables and s, and the
    # backward of the others. With E = 2 the component sums of b_k e (x - y) share no column
    # with F's: splitting would reduce more columns, so it declines.
    assert len(splits) == (2 if factor else 0)
    assert all(splits) if E == 1 else not any(splits[:1])


@requires_torch
@pytest.mark.parametrize("reduction", ["LogSumExp", "SumSoftMaxWeight"])
def test_weighted_reductions_gradients(reduction):
    # their backward is a Sum, which is split; their forward is not
    g = torch.Generator().manual_seed(6)
    dt = torch.float64
    x = torch.randn(20, 2, generator=g, dtype=dt, requires_grad=True)
    y = torch.randn(25, 2, generator=g, dtype=dt, requires_grad=True)
    v = torch.randn(25, 3, generator=g, dtype=dt, requires_grad=True)
    F = -lm.Vi(x).sqdist(lm.Vj(y))
    if reduction == "LogSumExp":
        out = F.logsumexp(dim=1, weight=lm.Vj(v).exp())
        d = -((x[:, None] - y[None]) ** 2).sum(-1)
        ref = torch.logsumexp(d[..., None] + v[None], dim=1)
    else:
        out = F.sumsoftmaxweight(lm.Vj(v), dim=1)
        d = -((x[:, None] - y[None]) ** 2).sum(-1)
        ref = torch.softmax(d, 1) @ v
    w = torch.randn(out.shape, generator=g, dtype=dt)
    got = torch.autograd.grad((out * w).sum(), [x, y, v])
    want = torch.autograd.grad((ref * w).sum(), [x, y, v])
    for u, r in zip(got, want):
        torch.testing.assert_close(u, r)


@requires_torch
def test_gradients_with_ranges_and_second_order():
    from lazymat.ranges import cluster_ranges, from_matrix

    g = torch.Generator().manual_seed(7)
    dt = torch.float64
    x = torch.randn(12, 2, generator=g, dtype=dt, requires_grad=True)
    y = torch.randn(10, 2, generator=g, dtype=dt, requires_grad=True)
    b = torch.randn(10, 1, generator=g, dtype=dt, requires_grad=True)
    lx = torch.tensor([0] * 5 + [1] * 7)
    ly = torch.tensor([0] * 4 + [1] * 6)
    ranges = from_matrix(cluster_ranges(lx.numpy()), cluster_ranges(ly.numpy()), np.eye(2))
    K = (-lm.Vi(x).sqdist(lm.Vj(y)) / 2).exp()
    out = (K * lm.Vj(b)).sum(dim=1, ranges=ranges)
    mask = (lx[:, None] == ly[None]).to(dt)
    ref = (torch.exp(-((x[:, None] - y[None]) ** 2).sum(-1) / 2) * mask) @ b
    torch.testing.assert_close(out, ref)
    gx = torch.autograd.grad((out ** 2).sum(), x, create_graph=True)[0]
    rx = torch.autograd.grad((ref ** 2).sum(), x, create_graph=True)[0]
    torch.testing.assert_close(gx, rx)
    second = torch.autograd.grad(gx.sum(), [y, b])
    want = torch.autograd.grad(rx.sum(), [y, b])
    for u, r in zip(second, want):
        torch.testing.assert_close(u, r)
