"""Performance contracts that can fail without a stopwatch: kernels compiled once per formula
(every Python float a parameter), the bound-call cache of small calls, fused backward passes.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import count_prepares, requires_torch, sqdist

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


GAUSS = ("Exp(-SqDist(x,y)/IntCst(2))*b", ["x=Vi(3)", "y=Vj(3)", "b=Vj(1)"])


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_genred_repeated_calls_are_bound_and_correct(monkeypatch, dtype):
    from lazymat import Genred

    rng = np.random.default_rng(1)
    g = Genred(*GAUSS, reduction_op="Sum", axis=1)
    prepares = count_prepares(monkeypatch)
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
    lm.config.clear_all()  # calls an earlier test bound (shared by all LazyTensors) count 0
    prepares = count_prepares(monkeypatch)
    for _ in range(3):
        np.testing.assert_allclose(Kb.sum(1), _dense_gauss(x, y, b), rtol=1e-12)
        i = Kb.argmin(dim=1)
        np.testing.assert_array_equal(i.ravel(), np.argmin(np.exp(-sqdist(x, y) / 2)
                                                           * b.T, 1))
    assert prepares[0] == 4  # each bound on its second call
    for _ in range(3):  # K @ v: v changes (values and object), its layout does not
        v = rng.standard_normal(7)
        got = K @ v
        assert got.shape == (9,)
        np.testing.assert_allclose(got, np.exp(-sqdist(x, y) / 2) @ v, rtol=1e-12)
        V = rng.standard_normal((7, 2))
        np.testing.assert_allclose(K @ V, np.exp(-sqdist(x, y) / 2) @ V, rtol=1e-12)
    assert prepares[0] == 8
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


# ------------------------------------------------------- gradients in fewer passes (issue 17.2)

def _count_executes(monkeypatch):
    import lazymat.plan as plan

    calls = []
    real = plan.execute

    def counting(prepared, out=None):
        calls.append(prepared.launch.formula.dim)
        return real(prepared, out)

    monkeypatch.setattr(plan, "execute", counting)
    return calls


def _torch_gauss(x, y, b, s=None):
    import torch

    d = ((x[..., :, None, :] - y[..., None, :, :]) ** 2).sum(-1)
    K = torch.exp(-d / 2 if s is None else -d * s)
    return K @ b


@requires_torch
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_gradient_xyb_in_two_passes(monkeypatch, dtype):
    import torch

    dt = getattr(torch, dtype)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(30, 3, generator=g, dtype=dt), torch.randn(20, 3, generator=g, dtype=dt)
    b = torch.rand(20, 1, generator=g, dtype=dt)
    leaves = [t.clone().requires_grad_(True) for t in (x, y, b)]
    passes = _count_executes(monkeypatch)
    a = (-Vi(leaves[0]).sqdist(Vj(leaves[1])) / 2).exp() @ leaves[2]
    got = torch.autograd.grad((a * a).sum(), leaves)
    # the forward with x's Jacobian sums (1 + 3 columns), one backward over i for y and b
    assert passes == [4, 4]
    ref = [t.clone().requires_grad_(True) for t in (x, y, b)]
    want = torch.autograd.grad((_torch_gauss(*ref) ** 2).sum(), ref)
    tol = dict(rtol=2e-4, atol=2e-5) if dtype == "float32" else dict(rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(a.detach(), _torch_gauss(x, y, b), **tol)
    for u, w in zip(got, want):
        torch.testing.assert_close(u, w, **tol)


@requires_torch
def test_gradient_jacobian_sums_axis0_batch_and_parameter():
    import torch

    dt = torch.float64
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 6, 2, generator=g, dtype=dt, requires_grad=True)
    y = torch.randn(2, 5, 2, generator=g, dtype=dt, requires_grad=True)
    b = torch.randn(2, 6, 2, generator=g, dtype=dt, requires_grad=True)  # E = 2
    s = torch.tensor([0.7], dtype=dt, requires_grad=True)
    # axis 0 (reduce over i, the output index is j): y and s go into the forward
    K = (-Vi(x).sqdist(Vj(y)) * Pm(s)).exp() * Vi(b)
    out = K.sum(dim=1)  # batch dim 0, then i: (2, 5, 2)
    w = torch.randn(out.shape, generator=g, dtype=dt)
    got = torch.autograd.grad((out * w).sum(), [x, y, b, s])
    d = ((x[:, :, None] - y[:, None]) ** 2).sum(-1)
    ref = (torch.exp(-d * s)[..., None] * b[:, :, None]).sum(1)
    want = torch.autograd.grad((ref * w).sum(), [x, y, b, s])
    torch.testing.assert_close(out, ref)
    for u, v in zip(got, want):
        torch.testing.assert_close(u, v)


@requires_torch
def test_gradient_higher_order_skips_the_forward_sums():
    import torch

    dt = torch.float64
    g = torch.Generator().manual_seed(2)
    x = torch.randn(5, 2, generator=g, dtype=dt, requires_grad=True)
    y = torch.randn(4, 2, generator=g, dtype=dt, requires_grad=True)
    b = torch.randn(4, 1, generator=g, dtype=dt, requires_grad=True)
    fn = lambda x, y, b: (-Vi(x).sqdist(Vj(y)) / 2).exp() @ b
    assert torch.autograd.gradcheck(fn, (x, y, b))
    assert torch.autograd.gradgradcheck(fn, (x, y, b))


def test_solve_info_records_the_options_used():
    rng = np.random.default_rng(6)
    x = rng.standard_normal((40, 2))
    b = rng.standard_normal((40, 1))
    K = (-Vi(x).sqdist(Vj(x))).exp()
    info = {}
    a = K.solve(b, alpha=0.5, eps=1e-8, info=info)
    np.testing.assert_allclose(0.5 * a + np.exp(-sqdist(x, x)) @ a, b, atol=1e-6)
    assert info["options"] == {"alpha": 0.5, "eps": 1e-8, "max_iter": info["options"]["max_iter"],
                               "dtype": "float64", "precond": None, "truncate": False}
    assert isinstance(info["options"]["max_iter"], int) and info["options"]["max_iter"] > 0
    info = {}
    K.solve(b, alpha=0.5, precond="schwarz", truncate=True, info=info)
    assert info["options"]["precond"] == "schwarz" and info["options"]["truncate"] is True


# -------------------------------------------------------- the complex exponential (issue 17.8)

def test_float32_sincos_against_float64():
    rng = np.random.default_rng(7)
    t = np.concatenate([rng.uniform(-4, 4, 200), rng.uniform(-1e4, 1e4, 200),
                        [0.0, np.pi / 4, np.pi / 2, -np.pi, 1e5, -3e5]]).astype(np.float32)
    one = np.ones((1, 1), np.float32)
    want = np.exp(1j * t.astype(np.float64))
    for lt in (Vi(t[:, None]).exp1j() * Vj(one),  # sincos of a float32 angle
               (Vi(t[:, None]) * Vj(one)).exp1j(),  # a phase formed in double
               (Vi(t[:, None]) * 1j).exp() * Vj(one)):  # ComplexExp
        got = np.asarray(lt.sum(dim=1, backend="cpu")).ravel()
        np.testing.assert_allclose(got.real, want.real, atol=3e-7, rtol=0)
        np.testing.assert_allclose(got.imag, want.imag, atol=3e-7, rtol=0)
    nan = Vi(np.array([[np.nan]], np.float32)).exp1j() * Vj(one)
    assert np.isnan(np.asarray(nan.sum(dim=1, backend="cpu"))).all()


def test_float32_fourier_sum_keeps_the_phase_exact():
    rng = np.random.default_rng(8)
    M = N = 300
    x = rng.uniform(-np.pi, np.pi, (M, 1)).astype(np.float32)
    w = rng.uniform(-2000, 2000, (N, 1)).astype(np.float32)
    c = rng.standard_normal((N, 1)).astype(np.float32)
    want = np.exp(1j * x.astype(np.float64) * w.astype(np.float64).T) @ c.astype(np.float64)
    got = ((Vi(x) * Vj(w)).exp1j() * Vj(c)).sum(dim=1, backend="cpu")
    err = np.abs(np.asarray(got).ravel() - want.ravel()).max() / np.abs(want).max()
    assert err < 2e-6  # a phase formed in float32 gives ~1e-4 here


def test_bound_call_read_only_and_tiny_arrays():
    from lazymat import Genred

    rng = np.random.default_rng(9)
    g = Genred(*GAUSS, axis=1)
    for M in (1, 1, 5, 5):
        x, y, b = _gauss_data(rng, M=M, N=1)
        for a in (x, y, b):
            a.setflags(write=False)  # the addresses come another way for read-only data
        np.testing.assert_allclose(g(x, y, b), _dense_gauss(x, y, b), rtol=1e-12)
