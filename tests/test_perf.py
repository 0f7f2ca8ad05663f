"""Performance contracts that can fail without a stopwatch: kernels compiled once per formula
(every Python float a parameter), the bound-call cache of small calls, fused backward passes.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import requires_torch, sqdist

from lazymat import Pm, Vi, Vj
from lazymat.backends import cpu as cpu_backend
from lazymat.compile import stats
from lazymat.formula import variables

# ------------------------------------------------------------- every Python float is a parameter

#: one formula per way a Python float enters: each must compile once for all of FLOATS
FLOAT_CASES = {
    "mul": lambda x, y, c: (-(Vi(x).sqdist(Vj(y))) * c).exp(),
    "rmul": lambda x, y, c: c * Vi(x).sqdist(Vj(y)),
    "add": lambda x, y, c: Vi(x).sqdist(Vj(y)) + c,
    "rsub": lambda x, y, c: c - Vi(x).sqdist(Vj(y)),
    "div": lambda x, y, c: Vi(x).sqdist(Vj(y)) / c,
    "pow": lambda x, y, c: Vi(x).sqdist(Vj(y)) ** c,
    "clamp": lambda x, y, c: Vi(x).sqdist(Vj(y)).clamp(-1.0, c),
    "pm": lambda x, y, c: Vi(x).sqdist(Vj(y)) * Pm(c),
}
FLOATS = (0.3, 1.0, 2.0, 3.0, -1.0, 2.5)


@pytest.mark.parametrize("case", sorted(FLOAT_CASES))
def test_integer_valued_floats_are_parameters(case):
    rng = np.random.default_rng(0)
    x, y = rng.uniform(0.5, 1.5, (7, 3)), rng.uniform(0.5, 1.5, (5, 3))
    D = sqdist(x, y)[:, :, None]
    dense = {"mul": lambda c: np.exp(-D * c), "rmul": lambda c: c * D, "add": lambda c: D + c,
             "rsub": lambda c: c - D, "div": lambda c: D / c, "pow": lambda c: D ** c,
             "clamp": lambda c: np.clip(D, -1.0, c), "pm": lambda c: D * c}[case]
    make = FLOAT_CASES[case]
    make(x, y, 0.7).sum(dim=1, backend="cpu")  # the one compile (or a cache hit)
    n_kernels, n_compiles = len(cpu_backend.kernels), stats["compiles"]
    for c in FLOATS:
        got = make(x, y, c).sum(dim=1, backend="cpu")
        np.testing.assert_allclose(got, dense(c).sum(1), rtol=1e-12, atol=1e-12)
    assert len(cpu_backend.kernels) == n_kernels, f"{case}: a float compiled a new kernel"
    assert stats["compiles"] == n_compiles


def test_python_ints_stay_exact_constants():
    # Documented: ints are constants of the formula (x * 1 simplifies away, x * 2 is its own
    # formula); floats are parameters even when integer-valued.
    x = Vi(np.ones((3, 2)))
    assert (x * 1).formula is x.formula
    assert (x * 2).formula is not (x * 3).formula
    for c in (1.0, 2.0, -3.0, 0.0):
        cats = sorted(v.params[2] for v in variables((x * c).formula))
        assert cats == [0, 2], c  # x and one parameter, nothing folded
    # two different floats of equal value stay two parameters (else the formula changes)
    f = x.clamp(-1.0, -1.0).formula
    assert sorted(v.params[2] for v in variables(f)) == [0, 2, 2]


@requires_torch
def test_float_parameter_in_a_loop_torch():
    import torch

    x = torch.rand(6, 2, dtype=torch.float64)
    y = torch.rand(4, 2, dtype=torch.float64)
    K = lambda eps: (-(Vi(x).sqdist(Vj(y))) / (2.0 * eps)).exp().sum(dim=1, backend="cpu")
    K(0.25)
    n_kernels = len(cpu_backend.kernels)
    for eps in (0.5, 1.0, 1.5, 2.0):  # 2*eps lands on integers
        d = ((x[:, None] - y[None]) ** 2).sum(-1)
        torch.testing.assert_close(K(eps), torch.exp(-d / (2 * eps)).sum(1, keepdim=True))
    assert len(cpu_backend.kernels) == n_kernels


# ------------------------------------------------------------------ small calls: bound calls

def _gauss_data(rng, M=9, N=7, dtype="float64"):
    return (rng.standard_normal((M, 3)).astype(dtype), rng.standard_normal((N, 3)).astype(dtype),
            rng.standard_normal((N, 1)).astype(dtype))


def _dense_gauss(x, y, b):
    return np.exp(-sqdist(x, y) / 2) @ b


def _count_prepares(monkeypatch):
    """How many calls took the general path (plan.prepare: validation, orientation, set-up)."""
    import lazymat.plan as plan

    calls = [0]
    real = plan.prepare

    def counting(*a, **k):
        calls[0] += 1
        return real(*a, **k)

    monkeypatch.setattr(plan, "prepare", counting)
    return calls


GAUSS = ("Exp(-SqDist(x,y)/IntCst(2))*b", ["x=Vi(3)", "y=Vj(3)", "b=Vj(1)"])


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_genred_repeated_calls_are_bound_and_correct(monkeypatch, dtype):
    from lazymat import Genred

    rng = np.random.default_rng(1)
    g = Genred(*GAUSS, reduction_op="Sum", axis=1)
    prepares = _count_prepares(monkeypatch)
    tol = 1e-5 if dtype == "float32" else 1e-12
    for _ in range(4):  # new arrays (same layout) each call: the results follow the data
        x, y, b = _gauss_data(rng, dtype=dtype)
        got = g(x, y, b, backend="cpu")
        assert got.dtype == np.dtype(dtype) and got.shape == (9, 1)
        np.testing.assert_allclose(got, _dense_gauss(x, y, b), rtol=tol, atol=tol)
    assert prepares[0] == 1
    # another layout (more rows) is bound once more
    x, y, b = _gauss_data(rng, M=20, dtype=dtype)
    for _ in range(2):
        np.testing.assert_allclose(g(x, y, b, backend="cpu"), _dense_gauss(x, y, b),
                                   rtol=tol, atol=tol)
    assert prepares[0] == 2


def test_bound_call_errors_are_the_general_ones():
    import lazymat as lm
    from lazymat import Genred

    rng = np.random.default_rng(2)
    x, y, b = _gauss_data(rng)
    bound, fresh = Genred(*GAUSS, axis=1), Genred(*GAUSS, axis=1)
    bound(x, y, b)
    bound(x, y, b)
    bad_calls = [
        (x, y[:, :2], b),                 # wrong dim
        (x, y, b[:5]),                    # N mismatch
        (x, y.astype(np.float32), b),     # mixed dtypes
        (x.astype(np.int64), y, b),       # integer data
        (x, y),                           # an argument missing
    ]
    for args in bad_calls:
        with pytest.raises((lm.ShapeError, lm.DtypeError)) as e_bound:
            bound(*args)
        with pytest.raises(type(e_bound.value)) as e_fresh:
            fresh(*args)
        assert str(e_bound.value) == str(e_fresh.value)
    # non-contiguous or Fortran-ordered data (other strides): the general path, right results
    xf, yt = np.asfortranarray(x), np.ascontiguousarray(np.concatenate([y, y], 1))[:, ::2]
    np.testing.assert_allclose(bound(xf, yt, b), _dense_gauss(x, yt, b), rtol=1e-12)
    np.testing.assert_allclose(bound(x, y, b), _dense_gauss(x, y, b), rtol=1e-12)


def test_lazytensor_repeated_reductions_are_bound(monkeypatch):
    import lazymat as lm

    rng = np.random.default_rng(3)
    x, y, b = _gauss_data(rng)
    K = (-Vi(x).sqdist(Vj(y)) / 2.0).exp()
    Kb = K * Vj(b)
    prepares = _count_prepares(monkeypatch)
    for _ in range(3):
        np.testing.assert_allclose(Kb.sum(1), _dense_gauss(x, y, b), rtol=1e-12)
        i = Kb.argmin(dim=1)
        np.testing.assert_array_equal(i.ravel(), np.argmin(np.exp(-sqdist(x, y) / 2)
                                                           * b.T, 1))
    assert prepares[0] == 2
    for _ in range(3):  # K @ v: v changes (values and object), its layout does not
        v = rng.standard_normal(7)
        got = K @ v
        assert got.shape == (9,)
        np.testing.assert_allclose(got, np.exp(-sqdist(x, y) / 2) @ v, rtol=1e-12)
        V = rng.standard_normal((7, 2))
        np.testing.assert_allclose(K @ V, np.exp(-sqdist(x, y) / 2) @ V, rtol=1e-12)
    assert prepares[0] == 4
    # a bad v after binding: the usual error
    with pytest.raises(lm.ShapeError, match="K @ v: K has N = 7"):
        K @ rng.standard_normal(5)
    # an operand reshaped in place after binding: not the bound call
    x.shape = (3, 9)
    with pytest.raises(lm.ShapeError):
        Kb.sum(1)


def test_lazytensor_matmul_with_v_inside_k():
    rng = np.random.default_rng(4)
    y = rng.standard_normal((6, 1))
    K = Vi(y) * Vj(y)  # K @ y: y is also K's j-variable (one argument, not two)
    for _ in range(2):
        np.testing.assert_allclose(K @ y, (y @ y.T) @ y, rtol=1e-12)
    z = rng.standard_normal((6, 1))
    np.testing.assert_allclose(K @ z, (y @ y.T) @ z, rtol=1e-12)


def test_bound_calls_from_threads_at_once():
    # the arguments' pointer tables are per call: threads sharing a bound call stay apart
    import threading

    from lazymat import Genred

    g = Genred(*GAUSS, axis=1)
    rng = np.random.default_rng(5)
    data = [_gauss_data(rng, M=64, N=64) for _ in range(4)]
    g(*data[0])
    errors = []

    def work(k):
        x, y, b = data[k]
        want = _dense_gauss(x, y, b)
        for _ in range(30):
            got = g(x, y, b)
            if not np.allclose(got, want, rtol=1e-12):
                errors.append(k)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
