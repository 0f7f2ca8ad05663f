"""Complex numbers: complex LazyTensors, every complex op, the NUFFT, gradients."""

from __future__ import annotations

import numpy as np
import pytest

import lazymat as lm
from lazymat import autograd
from lazymat.formula import OPS, Var, apply, make
from lazymat.plan import Request, run

rng = np.random.default_rng(17)
Z = rng.standard_normal((6, 3)) + 1j * rng.standard_normal((6, 3))
Y = rng.standard_normal((7, 3)) + 1j * rng.standard_normal((7, 3))
S = rng.standard_normal((7, 1)) + 1j * rng.standard_normal((7, 1))
R = rng.standard_normal((7, 3))

# (name, LazyTensor builder, numpy oracle of the (M, N, ...) matrix)
CASES = [
    ("mult", lambda z, y, s, r: z * y, lambda: Z[:, None] * Y[None]),
    ("mult_scalar", lambda z, y, s, r: z * s, lambda: Z[:, None] * S[None]),
    ("div", lambda z, y, s, r: z / y, lambda: Z[:, None] / Y[None]),
    ("add_sub", lambda z, y, s, r: z + y - s, lambda: Z[:, None] + Y[None] - S[None]),
    ("real_times_complex", lambda z, y, s, r: r * z, lambda: R[None] * Z[:, None]),
    ("real_plus_complex", lambda z, y, s, r: r + z, lambda: R[None] + Z[:, None]),
    ("exp", lambda z, y, s, r: (z - y).exp(), lambda: np.exp(Z[:, None] - Y[None])),
    ("conj", lambda z, y, s, r: (z * y).conj(), lambda: np.conj(Z[:, None] * Y[None])),
    ("exp1j", lambda z, y, s, r: (z.real - y.imag).exp1j(),
     lambda: np.exp(1j * (Z.real[:, None] - Y.imag[None]))),
    ("real2complex", lambda z, y, s, r: r.real2complex() * z, lambda: R[None] * Z[:, None]),
    ("imag2complex", lambda z, y, s, r: r.imag2complex() + z, lambda: 1j * R[None] + Z[:, None]),
    ("abs", lambda z, y, s, r: (z * y).abs(), lambda: np.abs(Z[:, None] * Y[None])),
    ("real", lambda z, y, s, r: (z * y).real, lambda: (Z[:, None] * Y[None]).real),
    ("imag", lambda z, y, s, r: (z * y).imag, lambda: (Z[:, None] * Y[None]).imag),
    ("angle", lambda z, y, s, r: (z * y).angle(), lambda: np.angle(Z[:, None] * Y[None])),
    ("inner_sum", lambda z, y, s, r: (z * y).sum(), lambda: (Z[:, None] * Y[None]).sum(-1,
                                                                                      keepdims=True)),
]


@pytest.mark.parametrize("lib", ["numpy", "torch"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_complex_lazytensor_sum_matches_numpy(case, lib):
    name, build, oracle = case
    arrays = [Z, Y, S, R]
    if lib == "torch":
        torch = pytest.importorskip("torch")
        arrays = [torch.tensor(a) for a in arrays]
    z, y, s, r = lm.Vi(arrays[0]), lm.Vj(arrays[1]), lm.Vj(arrays[2]), lm.Vj(arrays[3])
    for backend in ("cpu", "reference"):
        got = build(z, y, s, r).sum(dim=1, backend=backend)
        got = got.numpy() if lib == "torch" else got
        want = oracle().sum(1)
        want = want if want.ndim == 2 else want[:, None]
        assert got.dtype == want.dtype, (got.dtype, want.dtype)
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [np.complex64, np.complex128])
def test_nonuniform_fourier_transform(dtype):
    """f̂(ω_i) = Σ_j exp(i⟨ω_i, x_j⟩) f_j against numpy."""
    real = np.float32 if dtype == np.complex64 else np.float64
    w, x = rng.standard_normal((300, 2)), rng.standard_normal((500, 2))
    f = (rng.standard_normal(500) + 1j * rng.standard_normal(500)).astype(dtype)
    fh = ((lm.Vi(w.astype(real)) | lm.Vj(x.astype(real))).exp1j() * lm.Vj(f[:, None])).sum(dim=1)
    want = np.exp(1j * (w @ x.T)) @ f.astype(np.complex128)
    assert fh.dtype == dtype and fh.shape == (300, 1)
    tol = 1e-5 if dtype == np.complex64 else 1e-12
    np.testing.assert_allclose(fh[:, 0], want, rtol=tol, atol=tol * np.abs(want).max())


def test_complex_ops_gradcheck():
    """Every complex op through a Sum reduction, by torch.autograd.gradcheck."""
    torch = pytest.importorskip("torch")
    z, w, s, r = Var(0, 4, 0), Var(1, 4, 1), Var(2, 2, 1), Var(3, 2, 1)
    args = [torch.randn(4, 4, dtype=torch.float64, requires_grad=True),
            torch.randn(5, 4, dtype=torch.float64, requires_grad=True),
            torch.randn(5, 2, dtype=torch.float64, requires_grad=True),
            torch.randn(5, 2, dtype=torch.float64, requires_grad=True)]
    formulas = {
        "ComplexMult": apply("ComplexMult", s, z), "ComplexDivide": apply("ComplexDivide", z, w),
        "ComplexExp": apply("ComplexExp", z), "Conj": apply("Conj", apply("ComplexMult", z, w)),
        "ComplexAbs": apply("ComplexAbs", z - w), "ComplexSquareAbs": apply(
            "ComplexSquareAbs", z - w), "ComplexAngle": apply("ComplexAngle", z + w),
        "ComplexSum": apply("ComplexSum", apply("ComplexMult", z, w)),
        "ComplexExp1j": apply("ComplexExp1j", apply("ComplexReal", z)),
        "ComplexReal": apply("ComplexReal", apply("ComplexMult", z, w)),
        "ComplexImag": apply("ComplexImag", apply("ComplexMult", z, w)),
        "Real2Complex": apply("ComplexMult", apply("Real2Complex", r), z),
        "Imag2Complex": apply("ComplexMult", apply("Imag2Complex", r), z),
        "ComplexRealScal": apply("ComplexRealScal", make("Extract", (r,), (0, 1)), z),
        "ComplexSumT": apply("ComplexMult", make("ComplexSumT", (s,), (2,)), z),
        "ComplexAdd": apply("ComplexAdd", z, s), "ComplexSubtract": apply("ComplexSubtract", s, w),
    }
    complex_ops = {n for n in OPS if n.startswith("Complex") or n in (
        "Conj", "Real2Complex", "Imag2Complex")}
    assert complex_ops <= set(formulas), complex_ops - set(formulas)
    for name, f in formulas.items():
        def fn(*a):
            return autograd.run(Request("Sum", f, axis=1), list(a))[0]

        assert torch.autograd.gradcheck(fn, tuple(args)), name
        # compiled against reference
        got = run(Request("Sum", f, axis=1), [a.detach() for a in args], backend="cpu")[0]
        ref = run(Request("Sum", f, axis=1), [a.detach() for a in args], backend="reference")[0]
        np.testing.assert_allclose(got.numpy(), ref.numpy(), rtol=1e-12, atol=1e-12)


def test_complex_gradients_through_the_front_end():
    torch = pytest.importorskip("torch")
    zt = torch.tensor(Z, requires_grad=True)
    yt = torch.tensor(Y, requires_grad=True)
    out = (lm.Vi(zt) * lm.Vj(yt)).exp().sum(dim=1)
    g = torch.autograd.grad((out.abs() ** 2).sum(), [zt, yt])
    z2, y2 = (t.detach().clone().requires_grad_(True) for t in (zt, yt))
    o2 = torch.exp(z2[:, None] * y2[None]).sum(1)
    g2 = torch.autograd.grad((o2.abs() ** 2).sum(), [z2, y2])
    for a, b in zip(g, g2):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-10)


def test_complex_errors():
    z = lm.Vi(Z)
    with pytest.raises(lm.DtypeError, match="only sums"):
        (z * lm.Vj(Y)).min(dim=1)
    assert (z * lm.Vj(Y)).abs().min(dim=1).shape == (6, 3)  # real again after abs()
    with pytest.raises(lm.DtypeError, match="not defined for complex"):
        z.sqrt()
    with pytest.raises(lm.DtypeError, match="real LazyTensor"):
        z.exp1j()
