"""Automatic differentiation: symbolic VJPs of every op, torch autograd of every reduction.

What is checked, in float64 with small sizes (gradcheck calls the reductions
many times; every kernel compiles once, then comes from the disk cache):

1. every differentiable op of ``test_ops.ROWS`` through a Sum reduction:
   ``gradcheck`` w.r.t. all six inputs, ``gradgradcheck`` for a subset;
2. every reduction x both axes x (i-, j-variable, parameter): gradcheck and
   gradgradcheck (selection reductions per component, LogSumExp/SoftMax weights);
3. up to third order on the Gaussian kernel sum against dense torch;
4. Hypothesis: random formula trees vs torch autograd through the reference
   backend's dense (differentiable) evaluation;
5. finite subgradients at 0 (Sqrt, Rsqrt, Norm2, Normalize);
6. Min/Max/KMin gradients against dense torch ``min``/``max``/``topk``;
7. errors, arg-reductions without gradients, no work for inputs without grad;
8. gradient dtypes, and symbolic calculus for numpy users.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import TORCH, requires_torch
from test_ops import NAMES, ROWS, variables

import lazymat as lm
from lazymat.formula import Const, Var, apply, diff, divergence, grad, laplacian, make
from lazymat.plan import Request

pytestmark = requires_torch

if TORCH is not None:
    import torch

    from lazymat.autograd import run

M, N = 5, 6  # small: gradcheck runs each reduction once per input component (x2)


# --------------------------------------------------------------------------- helpers

def _t(a, dtype=None, grad=True):
    """numpy -> torch float64 (or dtype) leaf tensor."""
    t = torch.tensor(np.asarray(a), dtype=dtype or torch.float64)
    return t.requires_grad_(grad)


def _draw(rng: np.random.Generator, kind: str, shape: tuple) -> np.ndarray:
    """Data in a row's domain, moved away from the points where the op has no derivative.

    ``int``/``int1`` domains exist in test_ops to create ties and zeros on purpose: here
    they become normal data; ``posz`` (zeros in a sqrt) becomes strictly positive.
    """
    if kind in ("normal", "int", "int1"):
        return rng.standard_normal(shape)
    if kind in ("pos", "posz"):
        return rng.uniform(0.5, 2.0, shape)
    if kind == "nonzero":
        return rng.uniform(0.5, 2.0, shape) * rng.choice([-1.0, 1.0], shape)
    if kind == "small":
        return rng.uniform(-1.5, 1.5, shape)
    raise ValueError(kind)


def row_tensors(row, seed: int = 0, m: int = M, n: int = N) -> list:
    rng = np.random.default_rng(seed)
    shapes = {"x": (m, 3), "y": (n, 3), "s": (m, 1), "t": (n, 1), "p": (row.pdim,),
              "w": (m, 9)}
    data = {k: _draw(rng, row.dom.get(k, "normal"), shapes[k]) for k in NAMES}
    if row.op == "Clamp" and row.variant == "bcast":
        # Clamp(x, lo=s, hi=t) for lo < hi (the usual case; lo > hi is tested on its own)
        data["s"] = -np.abs(data["s"]) - 0.1
        data["t"] = np.abs(data["t"]) + 0.1
    return [_t(data[k]) for k in NAMES]


def sum_fn(F, sizes=(M, N), axis: int = 1):
    """tensors -> Σ_j F (axis 1) through lazymat, differentiable.

    ``sizes`` is passed explicitly: see test_backward_without_sizes_* for what happens
    without it (gradient formulas that lost every j-variable).
    """
    def fn(*arrays):
        return run(Request("Sum", F, axis=axis), list(arrays), sizes=sizes)

    return fn


def _grads(out, inputs, **kw):
    gs = torch.autograd.grad(out, inputs, allow_unused=True, **kw)
    return [torch.zeros_like(i) if g is None else g for g, i in zip(gs, inputs)]


def assert_allclose(got, want, rtol=1e-9, atol=1e-9, msg=""):
    got, want = got.detach(), want.detach()
    assert got.shape == want.shape, f"{msg}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol, msg=lambda m: f"{msg}\n{m}")


# --------------------------------------------------------------------------- 1. every op

# Ops whose derivative is zero almost everywhere: nothing for gradcheck to check.
PIECEWISE_CONSTANT = {"LessThan", "LessOrEqual", "Equal", "NotEqual", "Sign", "Step",
                      "ArgMin", "ArgMax", "OneHot", "Floor", "Round", "DiffClampInt"}
# Variants that only differ from another row by data on the kinks (ties, zeros) or kept
# off the jumps ("frac"): with normal data they would duplicate that row (the kinks
# themselves: section 5).
KINK_VARIANTS = {"ReLU-int", "Norm2-int", "Normalize-zeros", "ClampInt-int", "SinXDivX-zeros",
                 "Mod-const"}
# Not differentiable, as in KeOps (their VJPs raise: tested in section 7).
NOT_DIFFERENTIABLE = {"BSpline", "GradSoftDTW_SqDist"}
# Rows with an argument that has no derivative (gamma of SoftDTW_SqDist) but requires grad here.
NO_GRADIENT_IN_SOME_INPUT = {"SoftDTW_SqDist-gamma_i"}
DIFF_ROWS = [r for r in ROWS if r.op not in PIECEWISE_CONSTANT | NOT_DIFFERENTIABLE
             and r.id not in KINK_VARIANTS | NO_GRADIENT_IN_SOME_INPUT]

GRADGRAD_IDS = {"Exp", "Log", "Sqrt", "Powf", "Pow", "Divide", "Sin", "Normalize", "SqDist",
                "Norm2", "MatVecMult", "TensorProd", "Concat", "Extract", "Min",
                "WeightedSqNorm-sym", "Clamp", "Atan2", "SinXDivX", "Acos", "TensorDot-3d",
                "Kron-rank2"}
GRADGRAD_ROWS = [r for r in DIFF_ROWS if r.id in GRADGRAD_IDS]


def test_gradgrad_subset_is_complete():
    assert {r.id for r in GRADGRAD_ROWS} == GRADGRAD_IDS
    assert len(DIFF_ROWS) > 60


@pytest.mark.parametrize("row", DIFF_ROWS, ids=[r.id for r in DIFF_ROWS])
def test_op_gradcheck(row):
    F = row.build(variables(row.pdim))
    inputs = row_tensors(row, seed=11)
    assert torch.autograd.gradcheck(sum_fn(F), inputs, eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("row", GRADGRAD_ROWS, ids=[r.id for r in GRADGRAD_ROWS])
def test_op_gradgradcheck(row):
    F = row.build(variables(row.pdim))
    inputs = row_tensors(row, seed=12, m=4, n=5)
    assert torch.autograd.gradgradcheck(sum_fn(F, sizes=(4, 5)), inputs, eps=1e-6,
                                        atol=1e-5, rtol=1e-4)


def test_clamp_gradient_matches_its_forward_when_lo_exceeds_hi():
    """Clamp(a, lo, hi) = min(max(a, lo), hi): for lo > hi the value is hi, whatever a."""
    x, s, t = Var(0, 1, 0), Var(1, 1, 0), Var(2, 1, 1)
    F = apply("Clamp", x, s, t)
    X = _t([[0.0], [3.0], [1.5]])
    S = _t([[2.0], [2.0], [2.0]])  # lo
    T = _t([[1.0]])  # hi < lo
    out, = run(Request("Sum", F, axis=1), [X, S, T])
    assert out.detach().ravel().tolist() == [1.0, 1.0, 1.0]
    gx, gs, gt = torch.autograd.grad(out.sum(), [X, S, T])
    # The value is hi everywhere: d/dhi = 1 per row, nothing for a or lo.
    assert gt.item() == 3.0, (gx, gs, gt)
    assert gs.abs().sum().item() == 0.0, (gx, gs, gt)
    assert gx.abs().sum().item() == 0.0, (gx, gs, gt)


# --------------------------------------------------------------------------- 2. reductions

def _reduction_data(seed=5, m=M, n=N):
    rng = np.random.default_rng(seed)
    return (_t(rng.standard_normal((m, 3)), grad=False), _t(rng.standard_normal((n, 3)),
                                                            grad=False),
            _t(rng.uniform(0.5, 1.5, (1,)), grad=False))


def _scalar(X, Y, P):
    return -X.sqdist(Y) * P + (X * Y).sum(-1)


def _vector(X, Y, P):
    return (X - Y) * P + (X * Y).sin()


REDUCTION_CASES = {
    "Sum": lambda X, Y, P, d: _vector(X, Y, P).sum(dim=d),
    "LogSumExp": lambda X, Y, P, d: _scalar(X, Y, P).logsumexp(dim=d),
    "LogSumExp-weight": lambda X, Y, P, d: _scalar(X, Y, P).logsumexp(
        dim=d, weight=((X - Y) * P).sin().exp()),
    "SumSoftMaxWeight": lambda X, Y, P, d: _scalar(X, Y, P).sumsoftmaxweight(
        Y * P + X.sin(), dim=d),
    "Min": lambda X, Y, P, d: _vector(X, Y, P).min(dim=d),
    "Max": lambda X, Y, P, d: _vector(X, Y, P).max(dim=d),
    "Min_ArgMin": lambda X, Y, P, d: _vector(X, Y, P).min_argmin(dim=d)[0],
    "Max_ArgMax": lambda X, Y, P, d: _vector(X, Y, P).max_argmax(dim=d)[0],
    "KMin": lambda X, Y, P, d: _vector(X, Y, P).Kmin(3, dim=d),
    "KMin_ArgKMin": lambda X, Y, P, d: _vector(X, Y, P).Kmin_argKmin(3, dim=d)[0],
}


def _reduction_fn(name, axis, wrt):
    x, y, p = _reduction_data()
    which = {"i": 0, "j": 1, "p": 2}[wrt]
    base = [x, y, p]

    def fn(v):
        args = list(base)
        args[which] = v
        X, Y, P = lm.Vi(args[0]), lm.Vj(args[1]), lm.Pm(args[2])
        return REDUCTION_CASES[name](X, Y, P, axis)

    return fn, base[which].detach().clone().requires_grad_(True)


@pytest.mark.parametrize("wrt", ["i", "j", "p"])
@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("name", list(REDUCTION_CASES))
def test_reduction_gradcheck(name, axis, wrt):
    fn, v = _reduction_fn(name, axis, wrt)
    out = fn(v)
    assert out.requires_grad and out.dtype == torch.float64
    assert torch.autograd.gradcheck(fn, (v,), eps=1e-6, atol=1e-6, rtol=1e-5)
    assert torch.autograd.gradgradcheck(fn, (v,), eps=1e-6, atol=1e-5, rtol=1e-4)


def test_reduction_data_has_no_near_ties():
    """Selections (Min, KMin) are only differentiable away from ties: keep a margin."""
    x, y, p = _reduction_data()
    F = (x[:, None, :] - y[None, :, :]) * p + torch.sin(x[:, None, :] * y[None, :, :])
    for axis in (0, 1):
        srt = F.sort(dim=axis).values
        gaps = srt.diff(dim=axis)[:4] if axis == 0 else srt.diff(dim=axis)[:, :4]
        assert gaps.min().item() > 1e-3


# --------------------------------------------------------------------------- 3. high order

def _gauss_lazymat(x, y, b, s):
    K = (-lm.Vi(x).sqdist(lm.Vj(y)) / lm.Pm(s) ** 2).exp()
    return (K * lm.Vj(b)).sum(dim=1)


def _gauss_dense(x, y, b, s):
    d2 = ((x[:, None, :] - y[None, :, :]) ** 2).sum(-1)
    return torch.exp(-d2 / s ** 2) @ b


def _three_orders(fn, inputs, dirs):
    """1st, 2nd and 3rd derivatives of <fn(inputs), c>, contracted with fixed directions."""
    c, u, w = dirs
    out = fn(*inputs)
    g1 = _grads((out * c).sum(), inputs, create_graph=True)
    h1 = sum((g * d).sum() for g, d in zip(g1, u))
    g2 = _grads(h1, inputs, create_graph=True)
    h2 = sum((g * d).sum() for g, d in zip(g2, w))
    g3 = _grads(h2, inputs, retain_graph=True)
    # grad of the grad-sum, literally: d/d(inputs) Σ ∂<out, c>/∂x
    g2x = _grads(g1[0].sum(), inputs)
    return out, g1, g2, g3, g2x


def test_gaussian_kernel_third_order_matches_dense_torch():
    rng = np.random.default_rng(7)
    x, y = _t(rng.standard_normal((M, 3))), _t(rng.standard_normal((N, 3)))
    b, s = _t(rng.standard_normal((N, 2))), _t([1.3])
    c = torch.tensor(rng.standard_normal((M, 2)))
    u = [torch.tensor(rng.standard_normal(t.shape)) for t in (x, y, b, s)]
    w = [torch.tensor(rng.standard_normal(t.shape)) for t in (x, y, b, s)]
    got = _three_orders(_gauss_lazymat, [x, y, b, s], (c, u, w))
    want = _three_orders(_gauss_dense, [x, y, b, s], (c, u, w))
    assert_allclose(got[0], want[0], msg="forward")
    for order, (gs, ws) in enumerate(zip(got[1:], want[1:]), start=1):
        for name, g, wv in zip("xybs", gs, ws):
            assert_allclose(g, wv, msg=f"order {order if order < 4 else '2 (literal)'}, "
                                       f"d/d{name}")


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_issue_example_gaussian_kernel_sum_gradients(dtype):
    """The issue's example (benchmarks/autodiff.py) at small sizes: a = exp(-|x-y|²/2) @ b,
    gradient of sum(a²) with respect to x, y and b."""
    dt = getattr(torch, dtype)
    g = torch.Generator().manual_seed(0)
    n = 40
    x, y = torch.randn(n, 3, generator=g, dtype=dt), torch.randn(n, 3, generator=g, dtype=dt)
    b = torch.rand(n, 1, generator=g, dtype=dt)
    for t in (x, y, b):
        t.requires_grad_(True)
    a = (-lm.Vi(x).sqdist(lm.Vj(y)) / 2).exp() @ b
    got = torch.autograd.grad((a * a).sum(), [x, y, b])
    d = ((x[:, None, :] - y[None, :, :]) ** 2).sum(-1)
    ad = torch.exp(-d / 2) @ b
    want = torch.autograd.grad((ad * ad).sum(), [x, y, b])
    tol = 1e-4 if dtype == "float32" else 1e-10
    for name, gv, wv in zip("xyb", got, want):
        assert gv.dtype == dt
        assert_allclose(gv, wv, rtol=tol, atol=tol * float(wv.abs().max()), msg=f"d/d{name}")


# --------------------------------------------------------------------------- 4. hypothesis

from hypothesis import HealthCheck, Phase, example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


def _fit_equal(draw, a, b):
    """Make a and b the same dim by extracting components of the longer one."""
    if a.dim == b.dim:
        return a, b
    d = min(a.dim, b.dim)

    def cut(f):
        if f.dim == d:
            return f
        start = draw(st.integers(0, f.dim - d))
        return make("Extract", (f,), (start, d))

    return cut(a), cut(b)


def _fit_broadcast(draw, a, b):
    """Make a and b broadcast (equal dims, or one of dim 1)."""
    if a.dim == b.dim or a.dim == 1 or b.dim == 1:
        return a, b
    if draw(st.booleans()):
        return make("Sum", (a,)), b
    return _fit_equal(draw, a, b)


UNARY = ["Sin", "Cos", "Square", "ExpSin", "SqrtSq1", "LogSq1", "Sum", "Abs", "Min", "Max",
         "Extract"]
BINARY = ["Add", "Subtract", "Mult", "DivSq1", "Scalprod", "SqDist", "Concat"]


def _sq1(a):
    return apply("Square", a) + 1


@st.composite
def random_formulas(draw, broadcast_add: bool):
    """(F, dims, axis): a tree of depth <= 4 over x_i, y_j and a parameter p.

    ``broadcast_add``: Add/Subtract may combine a dim-1 operand with a dim-D one (else
    they get equal dims; Mult and Divide always broadcast).
    """
    di, dj, dp = draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(st.integers(1, 3))
    leaves = [Var(0, di, 0), Var(1, dj, 1), Var(2, dp, 2)]

    def build(depth):
        if depth == 0 or (depth < 4 and draw(st.integers(0, 3)) == 0):  # the root is an op
            return draw(st.sampled_from(leaves))
        op = draw(st.sampled_from(UNARY + BINARY))
        a = build(depth - 1)
        if op in UNARY:
            if op == "ExpSin":
                return apply("Exp", apply("Sin", a))
            if op == "SqrtSq1":
                return apply("Sqrt", _sq1(a))
            if op == "LogSq1":
                return apply("Log", _sq1(a))
            if op == "Extract":
                start = draw(st.integers(0, a.dim - 1))
                return make("Extract", (a,), (start, draw(st.integers(1, a.dim - start))))
            return apply(op, a)
        b = build(depth - 1)
        if op in ("Add", "Subtract"):
            a, b = (_fit_broadcast if broadcast_add else _fit_equal)(draw, a, b)
            return apply(op, a, b)
        if op == "Mult":
            return apply(op, *_fit_broadcast(draw, a, b))
        if op == "DivSq1":
            a, b = _fit_broadcast(draw, a, b)
            return apply("Divide", a, _sq1(b))
        if op in ("Scalprod", "SqDist"):
            return apply(op, *_fit_equal(draw, a, b))
        out = apply("Concat", a, b)
        return out if out.dim <= 6 else apply("Sum", out)

    F = build(4)
    return F, (di, dj, dp), draw(st.sampled_from([0, 1]))


def _check_against_dense(F, dims, axis, seed=0):
    from lazymat.arraylib import lib_of
    from lazymat.formula.evaluate import evaluate

    di, dj, dp = dims
    m, n = 4, 5
    rng = np.random.default_rng(seed)
    X, Y = _t(rng.standard_normal((m, di))), _t(rng.standard_normal((n, dj)))
    P = _t(rng.standard_normal((dp,)))
    inputs = [X, Y, P]
    out, = run(Request("Sum", F, axis=axis), inputs, sizes=(m, n))
    dense = evaluate([F], inputs, slice(None), slice(None), lib_of(X), X)[0]
    dense = dense.expand(m, n, F.dim).sum(axis)
    C = torch.tensor(rng.standard_normal(dense.shape))
    assert_allclose(out, dense, msg=f"forward of {F!r}")
    got = _grads((out * C).sum(), inputs)
    want = _grads((dense * C).sum(), inputs)
    for name, g, w in zip(("x_i", "y_j", "p"), got, want):
        assert_allclose(g, w, msg=f"d/d{name} of Sum_{'ij'[axis]} {F!r}")


def _examples_of(make_cases):
    def decorate(test):
        for case in reversed(make_cases()):
            test = example(case)(test)
        return test

    return decorate


_HYP = settings(max_examples=60, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _examples():
    """Hand-written cases of the rarer ops (Min/Max of components, Concat, Scalprod)."""
    x3, y3, p1 = Var(0, 3, 0), Var(1, 3, 1), Var(2, 1, 2)
    x2, y2, p2 = Var(0, 2, 0), Var(1, 2, 1), Var(2, 2, 2)
    return [
        (apply("Min", apply("Concat", x3 * y3, p1)) * apply("Sqrt", _sq1(apply("SqDist", x3,
                                                                                 y3))),
         (3, 3, 1), 1),
        (apply("Max", apply("Extract", apply("Concat", apply("Sin", x2), apply("Cos", y2 * p2)),
                            1, 3)) * apply("Scalprod", x2, y2), (2, 2, 2), 0),
        (apply("Divide", apply("Abs", x3 - y3), _sq1(p1)) * apply("Exp", apply("Sin", y3)),
         (3, 3, 1), 1),
    ]


@_HYP
@given(random_formulas(broadcast_add=False))
@_examples_of(_examples)
def test_random_formulas_match_dense_torch(case):
    _check_against_dense(*case)


def _broadcast_examples():
    """What this strategy found first: Sum(Log(y²+1) + p + (Min(y) - p)²), d/dy wrong."""
    x1, y3, p1 = Var(0, 1, 0), Var(1, 3, 1), Var(2, 1, 2)
    inner = apply("Log", _sq1(y3)) + p1
    return [(apply("Sum", inner + apply("Square", apply("Min", y3) - p1)), (1, 3, 1), 1),
            (apply("Sum", apply("Sin", x1 * y3) - x1 * p1), (1, 3, 1), 0)]


@settings(_HYP, phases=[Phase.explicit, Phase.generate])  # no shrinking (each candidate
@given(random_formulas(broadcast_add=True))                # compiles kernels)
@_examples_of(_broadcast_examples)
def test_random_formulas_with_broadcast_add_match_dense_torch(case):
    _check_against_dense(*case)


def test_grad_of_broadcast_add_under_sum():
    """d/ds Σ_k (s + x_k) = D (= 3): the symbolic gradient says 1."""
    x, s = Var(0, 3, 0), Var(1, 1, 0)
    for op in ("Add", "Subtract"):
        g = grad(apply("Sum", apply(op, s, x)), s, Const(1))
        assert g.is_const and float(g.value) == 3.0, (op, g)


# --------------------------------------------------------------------------- 5. kinks at 0

def test_norm2_and_normalize_have_finite_subgradients_at_zero():
    rng = np.random.default_rng(3)
    x, y = rng.standard_normal((M, 3)), rng.standard_normal((N, 3))
    x[0] = y[2]  # |x_0 - y_2| = 0
    x[3] = y[0]
    for build in (lambda X, Y: (X - Y).norm2(), lambda X, Y: (X - Y).normalize(),
                  lambda X, Y: X.sqdist(Y).sqrt(), lambda X, Y: (X - Y).norm2() * Y.sum(-1)):
        X, Y = _t(x), _t(y)
        out = build(lm.Vi(X), lm.Vj(Y)).sum(dim=1)
        assert torch.isfinite(out).all()
        gx, gy = torch.autograd.grad(out.sum(), [X, Y], create_graph=True)
        assert torch.isfinite(gx).all() and torch.isfinite(gy).all()
        # second order stays finite too
        hx, hy = _grads(gx.sum() + gy.sum(), [X, Y])
        assert torch.isfinite(hx).all() and torch.isfinite(hy).all()
    # The subgradient is 0 at the zero pairs: d/dx Σ_j |x - y_j| = Σ_{j: x != y_j} unit(x - y_j)
    X, Y = _t(x), _t(y)
    (gx,) = torch.autograd.grad((lm.Vi(X) - lm.Vj(Y)).norm2().sum(dim=1).sum(), [X])
    d = x[:, None, :] - y[None, :, :]
    r = np.sqrt((d ** 2).sum(-1, keepdims=True))
    want = np.where(r > 0, d / np.where(r > 0, r, 1), 0).sum(1)
    assert_allclose(gx, torch.tensor(want), msg="Norm2 subgradient")


def test_sqrt_and_rsqrt_of_exact_zeros_give_finite_gradients():
    rng = np.random.default_rng(4)
    x = rng.uniform(0.5, 2.0, (M, 3))
    x[1, 0] = x[2, :] = 0.0
    t = rng.uniform(0.5, 2.0, (N, 1))
    for op in ("Sqrt", "Rsqrt"):
        X, T = _t(x), _t(t)
        F = apply(op, Var(0, 3, 0) * Var(1, 1, 1))
        out, = run(Request("Sum", F, axis=1), [X, T])
        gx, gt = torch.autograd.grad(out.sum(), [X, T], create_graph=True)
        assert torch.isfinite(gx).all() and torch.isfinite(gt).all(), op
        assert (gx[x == 0] == 0).all(), (op, gx)  # the subgradient convention: 0 at 0
        hx, ht = _grads((gx * gx).sum() + gt.sum(), [X, T])
        assert torch.isfinite(hx).all() and torch.isfinite(ht).all(), op


# --------------------------------------------------------------------------- 6. vs dense

def _dense_vector(x, y, p):
    return (x[:, None, :] - y[None, :, :]) * p + torch.sin(x[:, None, :] * y[None, :, :])


SELECTIONS = {
    "Min": (lambda F, d: F.min(dim=d), lambda D, d: D.min(dim=d).values),
    "Max": (lambda F, d: F.max(dim=d), lambda D, d: D.max(dim=d).values),
    "Min_ArgMin": (lambda F, d: F.min_argmin(dim=d)[0], lambda D, d: D.min(dim=d).values),
    # (M, K, D) for lazymat; topk gives K along the reduced axis
    "KMin": (lambda F, d: F.Kmin(3, dim=d),
             lambda D, d: torch.topk(D, 3, dim=d, largest=False).values.movedim(d, 1)),
    "KMin_ArgKMin": (lambda F, d: F.Kmin_argKmin(3, dim=d)[0],
                     lambda D, d: torch.topk(D, 3, dim=d, largest=False).values.movedim(d, 1)),
}


@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("name", list(SELECTIONS))
def test_selection_gradients_match_dense_torch(name, axis):
    lazy, dense = SELECTIONS[name]
    rng = np.random.default_rng(21)
    m, n = 7, 9
    x, y, p = _t(rng.standard_normal((m, 3))), _t(rng.standard_normal((n, 3))), _t([0.8])
    inputs = [x, y, p]
    got = lazy(_vector(lm.Vi(x), lm.Vj(y), lm.Pm(p)), axis)
    want = dense(_dense_vector(x, y, p), axis)
    assert_allclose(got, want, msg="values")
    C = torch.tensor(rng.standard_normal(want.shape))
    g1 = _grads((got * C).sum(), inputs, create_graph=True)
    w1 = _grads((want * C).sum(), inputs, create_graph=True)
    for nm, g, w in zip("xyp", g1, w1):
        assert_allclose(g, w, msg=f"d/d{nm}")
    # second order through the gathered pairs
    g2 = _grads(sum((g * g).sum() for g in g1), inputs)
    w2 = _grads(sum((w * w).sum() for w in w1), inputs)
    for nm, g, w in zip("xyp", g2, w2):
        assert_allclose(g, w, msg=f"second order d/d{nm}")


def test_scalar_kmin_gradient_matches_dense_topk():
    """D = 1: KMin returns (M, K), the KeOps layout."""
    rng = np.random.default_rng(22)
    x, y = _t(rng.standard_normal((7, 3))), _t(rng.standard_normal((9, 3)))
    got = lm.Vi(x).sqdist(lm.Vj(y)).Kmin(4, dim=1)
    D = ((x[:, None, :] - y[None, :, :]) ** 2).sum(-1)
    want = torch.topk(D, 4, dim=1, largest=False).values
    assert got.shape == want.shape == (7, 4)
    C = torch.tensor(rng.standard_normal((7, 4)))
    for nm, g, w in zip("xy", _grads((got * C).sum(), [x, y]), _grads((want * C).sum(), [x, y])):
        assert_allclose(g, w, msg=f"d/d{nm}")


# --------------------------------------------------------------------------- 7. bad input

X3, Y3, E1, E2 = Var(0, 3, 0), Var(1, 3, 1), Var(2, 1, 0), Var(3, 2, 0)


def test_grad_with_respect_to_a_non_variable_is_a_shape_error():
    with pytest.raises(lm.ShapeError, match="variable"):
        grad(apply("Exp", X3), X3 * 2, Const(1, 3))
    with pytest.raises(lm.ShapeError, match="variable"):
        diff(apply("Exp", X3), X3 + Y3, Y3)
    with pytest.raises(lm.ShapeError, match="variable"):
        lm.Genred("Grad(Exp(x), x*2, e)", ["x=Vi(3)", "e=Vi(3)"], axis=1)
    x = torch.randn(3, 3, dtype=torch.float64)
    with pytest.raises(lm.ShapeError, match="variable"):
        lm.Vi(x).exp().grad(lm.Vi(x) * 2, lm.Vi(x))


def test_grad_with_a_cotangent_of_the_wrong_dim_is_a_shape_error():
    with pytest.raises(lm.ShapeError, match="dim 2"):
        grad(X3 * Y3, X3, E2)
    with pytest.raises(lm.ShapeError, match="dim 2"):
        lm.Genred("Grad(x*y, x, e)", ["x=Vi(3)", "y=Vj(3)", "e=Vi(2)"], axis=1)
    with pytest.raises(lm.ShapeError):
        diff(X3 * Y3, X3, E2)  # direction of the wrong dim
    with pytest.raises(lm.ShapeError):
        divergence(apply("Sum", X3 * Y3), X3)  # dim 1 field, dim 3 variable
    with pytest.raises(lm.ShapeError):
        laplacian(X3 * Y3, X3)  # not scalar
    # a dim-1 cotangent broadcasts (KeOps convention): no error
    assert grad(X3 * Y3, X3, E1).dim == 3


def test_grad_of_a_formula_without_the_variable():
    # Symbolic level: zero (of the variable's dim), as in KeOps.
    g = grad(apply("Exp", X3), Y3, Const(1, 3))
    assert g.is_const and g.value == 0 and g.dim == 3
    # User-facing (strings, LazyTensor): zero too, as in pykeops (nested Grad relies on it).
    x, y = torch.randn(3, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    e = torch.randn(3, 3, dtype=torch.float64)
    g = lm.Genred("Grad(Exp(x), y, e)", ["x=Vi(3)", "y=Vj(3)", "e=Vi(3)"], axis=1)(x, y, e)
    assert g.shape == (3, 3) and not g.any()
    lazy = lm.Vi(x).exp().grad(lm.Vj(y), lm.Vi(e)).sum(dim=1)
    assert lazy.shape == (3, 3) and not lazy.any()
    # d/dx of d/dx (x·y) in direction e: the inner gradient (y·e) no longer has x -> 0
    nested = lm.Genred("Grad(Grad((x|y), x, e), x, e)", ["x=Vi(3)", "y=Vj(3)", "e=Vi(1)"],
                       axis=1)(x, y, e[:, :1])
    assert nested.shape == (3, 3) and not nested.any()


def test_arg_reductions_have_no_gradient():
    rng = np.random.default_rng(8)
    x, y = _t(rng.standard_normal((M, 3))), _t(rng.standard_normal((N, 3)))
    D = lm.Vi(x).sqdist(lm.Vj(y))
    for idx in (D.argmin(dim=1), D.argKmin(2, dim=1), D.min_argmin(dim=1)[1],
                D.Kmin_argKmin(2, dim=0)[1], D.argmax(dim=0)):
        assert idx.dtype == torch.int64
        assert not idx.requires_grad
        with pytest.raises(RuntimeError, match="does not require grad"):
            idx.float().sum().backward()
    # the values of Min_ArgMin are differentiable, its indices are not
    v, i = D.min_argmin(dim=1)
    assert v.requires_grad and not i.requires_grad


@pytest.mark.parametrize("wanted,forward_kernels,new_kernels", [
    ("x", 1, 0), ("y", 0, 1), ("b", 0, 1), ("yb", 0, 1), ("xb", 1, 1), ("", 0, 0)])
def test_inputs_without_grad_cost_nothing(monkeypatch, wanted, forward_kernels, new_kernels):
    """One backward reduction per category of wanted inputs, none for the others; the
    i-variable's Jacobian sums ride in the forward (its own kernel, no backward pass)."""
    from lazymat.backends import cpu

    monkeypatch.setattr(cpu, "kernels", {})  # this test's kernels only (they load from disk)
    rng = np.random.default_rng(9)
    tensors = {"x": _t(rng.standard_normal((M, 4)), grad="x" in wanted),
               "y": _t(rng.standard_normal((N, 4)), grad="y" in wanted),
               "b": _t(rng.standard_normal((N, 2)), grad="b" in wanted)}

    def forward():
        return (-lm.Vi(tensors["x"]).sqdist(lm.Vj(tensors["y"])) / 3).exp() @ tensors["b"]

    with torch.no_grad():
        forward()
    assert len(cpu.kernels) == 1
    a = forward()
    assert len(cpu.kernels) == 1 + forward_kernels
    assert a.requires_grad == bool(wanted)
    if wanted:
        a.pow(2).sum().backward()
    assert len(cpu.kernels) == 1 + forward_kernels + new_kernels, list(cpu.kernels)
    for name, t in tensors.items():
        if name in wanted:
            assert t.grad is not None and t.grad.shape == t.shape
        else:
            assert t.grad is None


# ------------------------------------------------- backward of a formula that loses a category

def test_backward_without_sizes_genred_i_gradient():
    rng = np.random.default_rng(10)
    s, y = _t(rng.standard_normal((4, 1))), _t(rng.standard_normal((5, 3)), grad=False)
    out = lm.Genred("s + y", ["s=Vi(1)", "y=Vj(3)"], axis=1)(s, y)
    (gs,) = torch.autograd.grad(out.sum(), [s])
    assert_allclose(gs, torch.full((4, 1), 15.0, dtype=torch.float64))  # N * D


def test_backward_without_sizes_genred_j_gradient():
    rng = np.random.default_rng(10)
    x, y = _t(rng.standard_normal((4, 3)), grad=False), _t(rng.standard_normal((5, 3)))
    out = lm.Genred("x + y", ["x=Vi(3)", "y=Vj(3)"], axis=1)(x, y)
    (gy,) = torch.autograd.grad(out.sum(), [y])
    assert_allclose(gy, torch.full((5, 3), 4.0, dtype=torch.float64))  # M


def test_backward_with_sizes_and_through_lazytensor():
    """The same two gradients where the sizes are known (LazyTensor passes them)."""
    rng = np.random.default_rng(10)
    s, x, y = (_t(rng.standard_normal((4, 1))), _t(rng.standard_normal((4, 3))),
               _t(rng.standard_normal((5, 3))))
    out = (lm.Vi(s) + lm.Vj(y)).sum(dim=1)
    (gs,) = torch.autograd.grad(out.sum(), [s])
    assert_allclose(gs, torch.full((4, 1), 15.0, dtype=torch.float64))
    out = (lm.Vi(x) + lm.Vj(y)).sum(dim=1)
    (gy,) = torch.autograd.grad(out.sum(), [y])
    assert_allclose(gy, torch.full((5, 3), 4.0, dtype=torch.float64))
    out, = run(Request("Sum", Var(0, 1, 0) + Var(1, 3, 1), axis=1), [s, y], sizes=(4, 5))
    (gs,) = torch.autograd.grad(out.sum(), [s])
    assert_allclose(gs, torch.full((4, 1), 15.0, dtype=torch.float64))


# --------------------------------------------------------------------------- 8. dtypes, numpy

@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("reduction", ["sum", "logsumexp", "min", "Kmin"])
def test_gradients_have_the_inputs_dtype(dtype, reduction):
    dt = getattr(torch, dtype)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(M, 3, generator=g, dtype=dt, requires_grad=True)
    y = torch.randn(N, 3, generator=g, dtype=dt, requires_grad=True)
    p = torch.rand(1, generator=g, dtype=dt, requires_grad=True)
    F = -lm.Vi(x).sqdist(lm.Vj(y)) * lm.Pm(p)
    out = {"sum": lambda: F.sum(dim=1), "logsumexp": lambda: F.logsumexp(dim=0),
           "min": lambda: F.min(dim=1), "Kmin": lambda: F.Kmin(2, dim=0)}[reduction]()
    assert out.dtype == dt
    grads = torch.autograd.grad(out.sum(), [x, y, p])
    for t, gr in zip((x, y, p), grads):
        assert isinstance(gr, torch.Tensor)
        assert gr.dtype == dt and gr.shape == t.shape and gr.device == t.device
        assert torch.isfinite(gr).all()


def test_numpy_users_get_symbolic_gradients():
    rng = np.random.default_rng(12)
    x, y = rng.standard_normal((M, 3)), rng.standard_normal((N, 3))
    b, e = rng.standard_normal((N, 1)), rng.standard_normal((M, 1))
    g = lm.Genred("Grad(Exp(-SqDist(x,y)) * b, x, e)",
                  ["x=Vi(3)", "y=Vj(3)", "b=Vj(1)", "e=Vi(1)"], axis=1)
    out = g(x, y, b, e)
    assert isinstance(out, np.ndarray) and out.dtype == np.float64 and out.shape == (M, 3)
    d = x[:, None, :] - y[None, :, :]
    k = np.exp(-(d ** 2).sum(-1, keepdims=True))
    want = (e[:, None, :] * b[None, :, :] * k * (-2) * d).sum(1)
    np.testing.assert_allclose(out, want, rtol=1e-10, atol=1e-12)
    # float32 as well, and the LazyTensor spelling gives the same
    out32 = g(*(a.astype(np.float32) for a in (x, y, b, e)))
    assert out32.dtype == np.float32
    np.testing.assert_allclose(out32, want, rtol=1e-4, atol=1e-5)
    X, Y = lm.Vi(x), lm.Vj(y)
    lt = ((-X.sqdist(Y)).exp() * lm.Vj(b)).grad(X, lm.Vi(e)).sum(dim=1)
    np.testing.assert_allclose(lt, want, rtol=1e-10, atol=1e-12)


def test_numpy_laplacian_and_divergence_strings():
    rng = np.random.default_rng(13)
    x, y = rng.standard_normal((M, 3)), rng.standard_normal((N, 3))
    d = x[:, None, :] - y[None, :, :]
    r2 = (d ** 2).sum(-1, keepdims=True)
    k = np.exp(-r2)
    lap = lm.Genred("Laplacian(Exp(-SqDist(x,y)), x)", ["x=Vi(3)", "y=Vj(3)"], axis=1)(x, y)
    np.testing.assert_allclose(lap, ((4 * r2 - 6) * k).sum(1), rtol=1e-10, atol=1e-12)
    div = lm.Genred("Divergence((x-y) * Exp(-SqDist(x,y)), x)", ["x=Vi(3)", "y=Vj(3)"],
                    axis=0)(x, y)
    np.testing.assert_allclose(div, ((3 - 2 * r2) * k).sum(0), rtol=1e-10, atol=1e-12)



# --------------------------------------------------------------------------- 9. no derivative

def test_bspline_is_not_differentiable():
    knots, x, w = Var(0, 6, 1), Var(1, 1, 0), Var(2, 3, 0)
    F = apply("BSpline", knots, x, 2)
    for v in (x, knots):
        with pytest.raises(lm.ShapeError, match="not differentiable in KeOps either"):
            grad(F, v, Const(1, 3))
    # Only a path through BSpline to the variable raises: other variables are fine.
    assert grad(apply("Sum", F) * w, w, Const(1, 3)).dim == 3
    # The same through torch autograd (an error, not a silent zero gradient).
    rng = np.random.default_rng(30)
    K = _t(np.sort(rng.uniform(-2, 2, (N, 6)), -1), grad=False)
    X = _t(rng.uniform(-1, 1, (M, 1)))
    out, = run(Request("Sum", F, axis=1), [K, X], sizes=(M, N))
    with pytest.raises(lm.ShapeError, match="not differentiable in KeOps either"):
        out.sum().backward()
    with pytest.raises(lm.ShapeError, match="not differentiable in KeOps either"):
        lm.Vj(K).bspline(lm.Vi(X), 2).sum(dim=1).sum().backward()


def test_softdtw_is_not_differentiable_in_gamma():
    x, y, s = Var(0, 4, 0), Var(1, 3, 1), Var(2, 1, 0)
    F = apply("SoftDTW_SqDist", x, y, s)
    with pytest.raises(lm.ShapeError, match="not differentiable with respect to gamma"):
        grad(F, s, Const(1))
    with pytest.raises(lm.ShapeError, match="not differentiable with respect to gamma"):
        grad(apply("SoftDTW_SqDist", x, y, s * 2 + 1) + s, s, Const(1))  # gamma a formula
    # gamma shared with x: the error too (not a partial gradient)
    with pytest.raises(lm.ShapeError, match="not differentiable with respect to gamma"):
        grad(apply("SoftDTW_SqDist", s, y, s), s, Const(1))
    # A gamma that depends on the variable only elsewhere is fine: x and y are differentiable.
    assert grad(F, x, Const(1)).dim == 4 and grad(F, y, Const(1)).dim == 3


def test_softdtw_gradient_with_a_variable_gamma():
    """The gamma_i row (left out of test_op_gradcheck): gradcheck in x and y, gamma fixed."""
    row = next(r for r in ROWS if r.id == "SoftDTW_SqDist-gamma_i")
    F = row.build(variables(row.pdim))
    inputs = row_tensors(row, seed=13)
    inputs[NAMES.index("s")].requires_grad_(False)
    assert torch.autograd.gradcheck(sum_fn(F), inputs, eps=1e-6, atol=1e-6, rtol=1e-5)
    with pytest.raises(lm.ShapeError, match="not differentiable with respect to gamma"):
        inputs[NAMES.index("s")].requires_grad_(True)
        sum_fn(F)(*inputs)[0].sum().backward()


def test_softdtw_has_no_second_derivative():
    x, y = Var(0, 4, 0), Var(1, 3, 1)
    g1 = grad(apply("SoftDTW_SqDist", x, y, Const(1)), x, Const(1))
    with pytest.raises(lm.ShapeError, match="second derivatives of SoftDTW_SqDist"):
        grad(apply("Sum", g1), y, Const(1))
    # Diff (a VJP of a VJP in the cotangent, linear) needs no second derivative.
    assert diff(apply("SoftDTW_SqDist", x, y, Const(1)), x, Var(2, 4, 0)).dim == 1


def _softdtw_dense(x, y, gamma):
    """Soft-DTW of every pair (x_i, y_j), in plain torch (autograd-differentiable)."""
    n, m = x.shape[1], y.shape[1]
    inf = torch.tensor(float("inf"), dtype=x.dtype)
    R = [[inf] * (m + 1) for _ in range(n + 1)]
    R[0][0] = torch.zeros((), dtype=x.dtype)
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            prev = torch.stack(torch.broadcast_tensors(R[i - 1][j - 1], R[i - 1][j],
                                                       R[i][j - 1]))
            cost = (x[:, None, i - 1] - y[None, :, j - 1]) ** 2
            R[i][j] = cost - gamma * torch.logsumexp(-prev / gamma, 0)
    return R[n][m]


def test_softdtw_lazytensor_gradient_matches_dense_torch():
    rng = np.random.default_rng(31)
    x, y = _t(rng.standard_normal((M, 5))), _t(rng.standard_normal((N, 4)))
    got = lm.Vi(x).softdtw_sqdist(lm.Vj(y), 0.7).sum(dim=1)
    want = _softdtw_dense(x, y, 0.7).sum(1, keepdim=True)
    assert_allclose(got, want, msg="values")
    c = torch.tensor(rng.standard_normal((M, 1)))
    for name, g, w in zip("xy", _grads((got * c).sum(), [x, y]), _grads((want * c).sum(), [x, y])):
        assert_allclose(g, w, msg=f"d/d{name}")
