"""Genred and generic_*: KeOps formula strings against the equivalent LazyTensor expressions."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

import lazymat as lm
from lazymat import compile as lmc

rng = np.random.default_rng(7)
X = rng.standard_normal((37, 3))
Y = rng.standard_normal((53, 3))
B = rng.standard_normal((53, 2))
P = np.array([0.7])

ALIASES = ["x = Vi(3)", "y = Vj(3)", "b = Vj(2)", "p = Pm(1)"]

# (formula string, reduction, axis, opt_arg, formula2, the same thing as a LazyTensor call)
CASES = [
    ("Exp(-SqDist(x, y) * p) * b", "Sum", 1, None, None,
     lambda x, y, b, p: ((-x.sqdist(y) * p).exp() * b).sum(dim=1)),
    ("Exp(-SqDist(x, y) * p) * b", "Sum", 0, None, None,
     lambda x, y, b, p: ((-x.sqdist(y) * p).exp() * b).sum(dim=0)),
    ("SqDist(x,y)", "Min", 1, None, None, lambda x, y, b, p: x.sqdist(y).min(dim=1)),
    ("SqDist(x,y)", "ArgMin", 0, None, None, lambda x, y, b, p: x.sqdist(y).argmin(dim=0)),
    ("SqDist(x,y)", "KMin", 1, 4, None, lambda x, y, b, p: x.sqdist(y).Kmin(4, dim=1)),
    ("SqDist(x,y)", "ArgKMin", 1, 4, None, lambda x, y, b, p: x.sqdist(y).argKmin(4, dim=1)),
    ("(x|y) - p", "Max_ArgMax", 1, None, None, lambda x, y, b, p: ((x | y) - p).max_argmax(dim=1)),
    ("-SqDist(x,y)", "LogSumExp", 1, None, None,
     lambda x, y, b, p: (-x.sqdist(y)).logsumexp(dim=1)),
    ("-SqDist(x,y)", "LogSumExp", 1, None, "Exp(b)",
     lambda x, y, b, p: (-x.sqdist(y)).logsumexp(dim=1, weight=b.exp())),
    ("-SqDist(x,y)", "SumSoftMaxWeight", 0, None, "b",
     lambda x, y, b, p: (-x.sqdist(y)).sumsoftmaxweight(b, dim=0)),
    ("Elem(x,0) * Extract(y, 1, 2) + Pow(Elem(b,1), 3)", "Sum", 1, None, None,
     lambda x, y, b, p: (x[0] * y[1:3] + b[1] ** 3).sum(dim=1)),
    ("IfElse(Elem(x,0) - Elem(y,0), Abs(x - y), Square(x) / 2)", "Sum", 1, None, None,
     lambda x, y, b, p: (x[0] - y[0]).ifelse((x - y).abs(), x.square() / 2).sum(dim=1)),
]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("case", CASES, ids=[f"{c[1]}-{c[2]}-{c[0]}" for c in CASES])
def test_genred_matches_lazytensor(case, dtype):
    formula, red, axis, opt_arg, formula2, lazy = case
    args = [a.astype(dtype) for a in (X, Y, B, P)]
    g = lm.Genred(formula, ALIASES, reduction_op=red, axis=axis, opt_arg=opt_arg,
                  formula2=formula2)
    got = g(*args)
    want = lazy(lm.Vi(args[0]), lm.Vj(args[1]), lm.Vj(args[2]), lm.Pm(args[3]))
    got, want = (got if isinstance(got, tuple) else (got,)), (
        want if isinstance(want, tuple) else (want,))
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert a.shape == b.shape and a.dtype == b.dtype
        np.testing.assert_allclose(a, b, rtol=1e-5 if dtype == "float32" else 1e-12, atol=1e-6)


def test_explicit_positions_and_var_in_formula():
    g = lm.Genred("SqDist(x, y) * Var(2, 1, 1)", ["y = Vj(1, 3)", "x = Vi(0, 3)"],
                  reduction_op="Sum", axis=1)
    w = rng.random((53, 1))
    got = g(X, Y, w)
    want = (((X[:, None] - Y[None]) ** 2).sum(-1) * w[:, 0]).sum(1, keepdims=True)
    np.testing.assert_allclose(got, want, rtol=1e-12)


def test_generic_shortcuts():
    s = lm.generic_sum("Exp(-SqDist(x,y))", "a = Vi(1)", "x = Vi(3)", "y = Vj(3)")
    d = ((X[:, None] - Y[None]) ** 2).sum(-1)
    np.testing.assert_allclose(s(X, Y), np.exp(-d).sum(1, keepdims=True), rtol=1e-12)
    t = lm.generic_sum("Exp(-SqDist(x,y))", "a = Vj(1)", "x = Vi(3)", "y = Vj(3)")
    np.testing.assert_allclose(t(X, Y), np.exp(-d).sum(0)[:, None], rtol=1e-12)
    lse = lm.generic_logsumexp("-SqDist(x,y)", "a = Vi(1)", "x = Vi(3)", "y = Vj(3)")
    m = (-d).max(1, keepdims=True)
    np.testing.assert_allclose(lse(X, Y), m + np.log(np.exp(-d - m).sum(1, keepdims=True)),
                               rtol=1e-12)
    am = lm.generic_argmin("SqDist(x,y)", "a = Vi(1)", "x = Vi(3)", "y = Vj(3)")
    np.testing.assert_array_equal(am(X, Y)[:, 0], d.argmin(1))
    ak = lm.generic_argkmin("SqDist(x,y)", "a = Vi(5)", "x = Vi(3)", "y = Vj(3)")
    np.testing.assert_array_equal(ak(X, Y), np.argsort(d, 1, kind="stable")[:, :5])


def test_genred_pickles_and_runs_after_unpickling():
    g = lm.Genred("Exp(-SqDist(x,y)) * b", ALIASES[:3], reduction_op="Sum", axis=1)
    h = pickle.loads(pickle.dumps(g))
    np.testing.assert_allclose(h(X, Y, B), g(X, Y, B), rtol=1e-15)


def test_keops_backend_spelling_and_torch():
    torch = pytest.importorskip("torch")
    g = lm.Genred("SqDist(x,y)", ["x = Vi(3)", "y = Vj(3)"], reduction_op="Min", axis=1)
    xt, yt = torch.from_numpy(X).float(), torch.from_numpy(Y).float()
    out = g(xt, yt, backend="CPU")
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32
    np.testing.assert_allclose(out.numpy(), g(X, Y, backend="reference"), rtol=1e-5)


@pytest.mark.parametrize("formula, aliases, kwargs, error, fragment", [
    ("Exp(x +)", ["x = Vi(3)"], {}, lm.FormulaSyntaxError, "position"),
    ("Epx(x)", ["x = Vi(3)"], {}, lm.FormulaSyntaxError, "Exp"),
    ("x + z", ["x = Vi(3)"], {}, lm.FormulaSyntaxError, "z"),
    ("x + y", ["x = Vi(3)", "y = Vj(2)"], {}, lm.ShapeError, "dims"),
    ("x", ["x = Vi(3)", "y = Vj(3)"], {"reduction_op": "Smu"}, lm.ShapeError, "unknown reduction"),
    ("x", ["x = Vi(3)"], {"axis": 2}, lm.ShapeError, "axis"),
    ("x", ["x = Vi(3)"], {"reduction_op": "KMin"}, lm.ShapeError, "K"),
    ("x", ["x = Vi(3)"], {"reduction_op": "KMin", "opt_arg": float("inf")}, lm.ShapeError,
     "finite"),
    ("x", ["x = Vi(3)"], {"reduction_op": "LogSumExp"}, lm.ShapeError, "scalar"),
    ("x", ["x = Vi(1)"], {"reduction_op": "SumSoftMaxWeight"}, lm.ShapeError, "weight"),
    ("x", ["x = Vi(3)", "x = Vj(3)"], {}, lm.FormulaSyntaxError, "twice"),
    ("x", "x = Vi(3)", {}, lm.FormulaSyntaxError, "list"),
])
def test_bad_genred_construction(formula, aliases, kwargs, error, fragment):
    before = lmc.stats["compiles"]
    with pytest.raises(error, match=fragment):
        lm.Genred(formula, aliases, **kwargs)
    assert lmc.stats["compiles"] == before


def test_bad_genred_call_names_the_alias():
    g = lm.Genred("SqDist(x,y)", ["x = Vi(3)", "y = Vj(3)"], reduction_op="Sum", axis=1)
    before = lmc.stats["compiles"]
    with pytest.raises(lm.ShapeError, match=r"y = Vj\(3\).*\(53, 2\)"):
        g(X, Y[:, :2])
    with pytest.raises(lm.ShapeError, match="takes 2 arrays"):
        g(X)
    with pytest.raises(lm.DtypeError, match="float32"):
        g(X, Y.astype(np.float32))
    with pytest.raises(lm.ShapeError, match="K = 60 is larger"):
        lm.Genred("SqDist(x,y)", ["x = Vi(3)", "y = Vj(3)"], reduction_op="ArgKMin", axis=1,
                  opt_arg=60)(X, Y)
    assert lmc.stats["compiles"] == before
