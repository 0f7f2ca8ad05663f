"""The user-facing LazyTensor API against dense numpy: methods, libraries, errors."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import (
    TORCH,
    as64,
    assert_close,
    check_index,
    check_type,
    requires_torch,
    sqdist,
    to_lib,
    to_np,
)

import lazymat as lm
from lazymat import LazyTensor, Pm, Vi, Vj
from lazymat.backends import cpu as cpu_backend
from lazymat.compile import stats

M, N = 6, 9


@pytest.fixture
def data():
    return make_data()


def make_data():
    rng = np.random.default_rng(42)
    d = {
        "x": rng.standard_normal((M, 3)), "y": rng.standard_normal((N, 3)),
        "xp": rng.uniform(0.5, 2.0, (M, 3)), "yp": rng.uniform(0.5, 2.0, (N, 3)),
        "xi": rng.integers(-2, 3, (M, 3)).astype(float),
        "yi": rng.integers(-2, 3, (N, 3)).astype(float),
        "s": rng.standard_normal((M, 1)), "t": rng.standard_normal((N, 1)),
        "p": rng.standard_normal(3),
    }
    d["x"][1] = d["x"][0]
    return d


def _i(a):
    return a[:, None, :]


def _j(a):
    return a[None, :, :]


def check_sum(lt, F, dtype="float64", lib="numpy"):
    """``lt.sum(dim=1)`` and ``lt.sum(dim=0)`` against the dense (M, N, D) F."""
    F = np.broadcast_to(F, F.shape[:2] + (F.shape[-1],))
    for dim in (1, 0):
        got = lt.sum(dim=dim)
        check_type(got, lib, dtype)
        mag = np.abs(F).sum(dim)
        assert_close(got, F.sum(dim), dtype, mag=mag, err_msg=f"sum(dim={dim})")


# --------------------------------------------------------------------------- the issue's example

@pytest.mark.parametrize("lib", ["numpy", pytest.param("torch", marks=requires_torch)])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_issue_example(lib, dtype):
    rng = np.random.default_rng(0)
    x0, y0, b0 = rng.standard_normal((50, 3)), rng.standard_normal((80, 3)), \
        rng.standard_normal((80, 2))
    x, y, b = (to_lib(a, lib, dtype) for a in (x0, y0, b0))
    b1 = b[:, 0]
    x_i, y_j, b_j = Vi(x), Vj(y), Vj(b)

    D = sqdist(x, y)
    Kd = np.exp(-D / 2)
    bd = as64(b)

    K_ij = (-x_i.sqdist(y_j) / 2).exp()
    assert K_ij.shape == (50, 80)

    a = (K_ij * b_j).sum(dim=1)
    check_type(a, lib, dtype)
    assert_close(a, Kd @ bd, dtype, mag=Kd @ np.abs(bd))

    a = K_ij @ b
    check_type(a, lib, dtype)
    assert a.shape == (50, 2)
    assert_close(a, Kd @ bd, dtype, mag=Kd @ np.abs(bd))

    a = K_ij @ b1
    check_type(a, lib, dtype)
    assert a.shape == (50,)
    assert_close(a, Kd @ bd[:, 0], dtype, mag=Kd @ np.abs(bd[:, 0]))

    D_ij = x_i.sqdist(y_j)
    idx = D_ij.argKmin(K=10, dim=1)
    check_index(idx, lib)
    assert idx.shape == (50, 10)
    if dtype == "float64":
        np.testing.assert_array_equal(to_np(idx), np.argsort(D, 1, kind="stable")[:, :10])
    else:  # float32 near-ties: check the distances the indices point at
        assert_close(np.take_along_axis(D, to_np(idx), 1), np.sort(D, 1)[:, :10], dtype)

    idx = K_ij.argKmin(K=10, dim=1)  # the smallest kernel values: the farthest points
    assert idx.shape == (50, 10)
    assert_close(np.take_along_axis(Kd, to_np(idx), 1), np.sort(Kd, 1)[:, :10], dtype)

    lse = (-D_ij / 2).logsumexp(dim=1)
    check_type(lse, lib, dtype)
    assert lse.shape == (50, 1)
    assert_close(lse, np.log(Kd.sum(1, keepdims=True)), dtype, mag=D.max())

    # the same over i
    a = (K_ij * Vi(x[:, :2])).sum(dim=0)
    assert a.shape == (80, 2)
    assert_close(a, Kd.T @ as64(x)[:, :2], dtype, mag=Kd.T @ np.abs(as64(x)[:, :2]))


@pytest.mark.parametrize("lib", ["numpy", pytest.param("torch", marks=requires_torch)])
def test_pykeops_spellings(lib, data):
    x, y = to_lib(data["x"], lib), to_lib(data["y"], lib)
    x_i, y_j = LazyTensor(x[:, None, :]), LazyTensor(y[None, :, :])
    assert x_i.shape == (M, 1, 3) and y_j.shape == (1, N, 3)
    D_ij = ((x_i - y_j) ** 2).sum(-1)  # pykeops: .sum(-1) is the inner sum, a LazyTensor
    assert isinstance(D_ij, LazyTensor) and D_ij.shape == (M, N)
    D = sqdist(x, y)
    np.testing.assert_allclose(to_np(D_ij.sum(dim=1)), D.sum(1, keepdims=True), rtol=1e-12)
    np.testing.assert_allclose(to_np(D_ij.sum(axis=1)), D.sum(1, keepdims=True), rtol=1e-12)
    np.testing.assert_allclose(to_np(D_ij.sum_reduction(dim=0)), D.sum(0)[:, None], rtol=1e-12)
    np.testing.assert_array_equal(to_np(D_ij.argmin(dim=1)), D.argmin(1)[:, None])
    np.testing.assert_array_equal(to_np(D_ij.argKmin_reduction(K=3, dim=1)),
                                  np.argsort(D, 1, kind="stable")[:, :3])
    v, i = D_ij.Kmin_argKmin(3, dim=0)
    np.testing.assert_allclose(to_np(v), np.sort(D, 0)[:3].T, rtol=1e-12)
    np.testing.assert_array_equal(to_np(i), np.argsort(D, 0, kind="stable")[:3].T)
    v, i = D_ij.min_argmin(dim=1)
    np.testing.assert_allclose(to_np(v), D.min(1, keepdims=True), rtol=1e-12)
    np.testing.assert_array_equal(to_np(i), D.argmin(1)[:, None])
    v, i = D_ij.max_argmax(dim=0)
    np.testing.assert_allclose(to_np(v), D.max(0)[:, None], rtol=1e-12)
    np.testing.assert_array_equal(to_np(i), D.argmax(0)[:, None])
    np.testing.assert_allclose(to_np(D_ij.max(dim=1)), D.max(1, keepdims=True), rtol=1e-12)
    np.testing.assert_allclose(to_np(D_ij.min(dim=0)), D.min(0)[:, None], rtol=1e-12)
    # a (1, 1, D) array is a parameter
    p = LazyTensor(to_lib(data["p"], lib)[None, None, :])
    np.testing.assert_allclose(to_np((x_i * p - y_j).sum(dim=1)),
                               (_i(data["x"]) * data["p"] - _j(data["y"])).sum(1), rtol=1e-12)


# --------------------------------------------------------------------------- every method

def _methods(d):
    """(name, lazy builder, dense oracle) for every LazyTensor method."""
    x, y, xp, yp, xi, yi, s, t, p = (d[k] for k in ("x", "y", "xp", "yp", "xi", "yi", "s",
                                                    "t", "p"))
    X, Y, XP, YP, XI, YI = Vi(x), Vj(y), Vi(xp), Vj(yp), Vi(xi), Vj(yi)
    S, T = Vi(s), Vj(t)
    x_, y_, xp_, yp_, xi_, yi_, s_, t_ = (_i(x), _j(y), _i(xp), _j(yp), _i(xi), _j(yi), _i(s),
                                          _j(t))

    def sqn(f):
        return (f ** 2).sum(-1, keepdims=True)

    return [
        ("exp", lambda: (X - Y).exp(), np.exp(x_ - y_)),
        ("log", lambda: (XP * YP).log(), np.log(xp_ * yp_)),
        ("sqrt", lambda: (XP * YP).sqrt(), np.sqrt(xp_ * yp_)),
        ("rsqrt", lambda: (XP * YP).rsqrt(), 1 / np.sqrt(xp_ * yp_)),
        ("inv", lambda: (XP + YP).inv(), 1 / (xp_ + yp_)),
        ("sin", lambda: (X * Y).sin(), np.sin(x_ * y_)),
        ("cos", lambda: (X * Y).cos(), np.cos(x_ * y_)),
        ("abs", lambda: (X - Y).abs(), np.abs(x_ - y_)),
        ("abs()", lambda: abs(X - Y), np.abs(x_ - y_)),
        ("neg", lambda: -(X * Y), -(x_ * y_)),
        ("sign", lambda: (XI - YI).sign(), np.sign(xi_ - yi_)),
        ("step", lambda: (XI - YI).step(), (xi_ - yi_ >= 0) * 1.0),
        ("relu", lambda: (X - Y).relu(), np.maximum(x_ - y_, 0)),
        ("square", lambda: (X - Y).square(), (x_ - y_) ** 2),
        ("power", lambda: (XP * YP).power(1.5), (xp_ * yp_) ** 1.5),
        ("pow_int3", lambda: (X - Y) ** 3, (x_ - y_) ** 3),
        ("pow_int2", lambda: (X - Y) ** 2, (x_ - y_) ** 2),
        ("pow_neg", lambda: (XP + YP) ** -2, (xp_ + yp_) ** -2.0),
        ("pow_half", lambda: (XP * YP) ** 0.5, np.sqrt(xp_ * yp_)),
        ("pow_mhalf", lambda: (XP * YP) ** -0.5, 1 / np.sqrt(xp_ * yp_)),
        ("pow_float", lambda: (XP * YP) ** 2.5, (xp_ * yp_) ** 2.5),
        ("pow_lazy", lambda: XP ** T, xp_ ** t_),
        ("sqdist", lambda: X.sqdist(Y), sqn(x_ - y_)),
        ("sqnorm2", lambda: (X - Y).sqnorm2(), sqn(x_ - y_)),
        ("norm2", lambda: (X - Y).norm2(), np.sqrt(sqn(x_ - y_))),
        ("norm", lambda: (X - Y).norm(dim=-1), np.sqrt(sqn(x_ - y_))),
        ("normalize", lambda: (X - Y).normalize(), (x_ - y_) / np.sqrt(sqn(x_ - y_))),
        ("weightedsqnorm_iso", lambda: (X - Y).weightedsqnorm(T ** 2), t_ ** 2 * sqn(x_ - y_)),
        ("weightedsqnorm_diag", lambda: (X - Y).weightedsqnorm(Pm(p ** 2)),
         ((p ** 2) * (x_ - y_) ** 2).sum(-1, keepdims=True)),
        ("weightedsqnorm_float", lambda: (X - Y).weightedsqnorm(0.25), 0.25 * sqn(x_ - y_)),
        ("weightedsqdist", lambda: X.weightedsqdist(Y, Vi(xp)),
         (xp_ * (x_ - y_) ** 2).sum(-1, keepdims=True)),
        ("clamp_float", lambda: (X - Y).clamp(-0.5, 0.7), np.clip(x_ - y_, -0.5, 0.7)),
        ("clamp_lazy", lambda: X.clamp(S, T), np.minimum(np.maximum(x_, s_), t_)),
        ("ifelse", lambda: (X - Y).ifelse(X, Y * 2), np.where(x_ - y_ >= 0, x_, 2 * y_)),
        ("concat", lambda: X.concat(T), np.concatenate(
            [np.broadcast_to(x_, (M, N, 3)), np.broadcast_to(t_, (M, N, 1))], -1)),
        ("elem", lambda: (X * Y).elem(1), (x_ * y_)[..., 1:2]),
        ("elem_neg", lambda: (X * Y).elem(-1), (x_ * y_)[..., 2:3]),
        ("extract", lambda: (X * Y).extract(1, 2), (x_ * y_)[..., 1:3]),
        ("getitem", lambda: (X - Y)[0], (x_ - y_)[..., 0:1]),
        ("getitem_neg", lambda: (X - Y)[-2], (x_ - y_)[..., 1:2]),
        ("getitem_slice", lambda: (X - Y)[1:3], (x_ - y_)[..., 1:3]),
        ("getitem_tuple", lambda: (X - Y)[:, :, 0:2], (x_ - y_)[..., 0:2]),
        ("one_hot", lambda: (XI[0] - YI[1]).one_hot(4),
         (np.rint(xi_[..., :1] - yi_[..., 1:2]) == np.arange(4)) * 1.0),
        ("dot", lambda: X | Y, (x_ * y_).sum(-1, keepdims=True)),
        ("lt", lambda: XI < YI, (xi_ < yi_) * 1.0),
        ("gt", lambda: XI > YI, (xi_ > yi_) * 1.0),
        ("le", lambda: XI <= YI, (xi_ <= yi_) * 1.0),
        ("ge", lambda: XI >= YI, (xi_ >= yi_) * 1.0),
        ("eq", lambda: XI == YI, (xi_ == yi_) * 1.0),
        ("ne", lambda: XI != YI, (xi_ != yi_) * 1.0),
        ("gt_float", lambda: (X - Y) > 0.5, (x_ - y_ > 0.5) * 1.0),
        ("inner_sum", lambda: (X * Y).sum(), (x_ * y_).sum(-1, keepdims=True)),
        ("inner_min", lambda: (X * Y).min(), (x_ * y_).min(-1, keepdims=True)),
        ("inner_max", lambda: (X * Y).max(-1), (x_ * y_).max(-1, keepdims=True)),
        ("inner_argmin", lambda: (XI - YI).argmin(), np.argmin(
            np.broadcast_to(xi_ - yi_, (M, N, 3)), -1)[..., None] * 1.0),
        ("inner_argmax", lambda: (XI - YI).argmax(), np.argmax(
            np.broadcast_to(xi_ - yi_, (M, N, 3)), -1)[..., None] * 1.0),
        ("arith_scalars", lambda: 2 * X - Y / 4 + 1 - 0.5 * Y * 3,
         2 * x_ - y_ / 4 + 1 - 0.5 * y_ * 3),
        ("rsub_rdiv", lambda: 1.5 - X / (2.5 / YP), 1.5 - x_ / (2.5 / yp_)),
        ("radd_rmul_float", lambda: 0.3 + X * 1.7 - Y, 0.3 + x_ * 1.7 - y_),
        ("param_array", lambda: (X - Y) * Pm(p), (x_ - y_) * p),
        ("param_float", lambda: (X - Y) * Pm(0.25) + Pm(p[:1]), (x_ - y_) * 0.25 + p[0]),
        ("transpose", lambda: (X * Y.concat(T)[0:3]).t().t(), x_ * y_),
    ]


def _method_ids():
    return [name for name, _, _ in _methods(make_data())]


@pytest.mark.parametrize("name", _method_ids())
def test_method_against_dense(name, data):
    table = {n: (build, F) for n, build, F in _methods(data)}
    build, F = table[name]
    lt = build()
    assert isinstance(lt, LazyTensor)
    F = np.broadcast_to(np.asarray(F, dtype=np.float64), (M, N, np.shape(F)[-1]))
    assert lt.shape == ((M, N) if F.shape[-1] == 1 else (M, N, F.shape[-1]))
    check_sum(lt, F)
    assert (lt.sum(dim=1, backend="reference").shape == (M, F.shape[-1]))
    assert_close(lt.sum(dim=1, backend="reference"), F.sum(1), "float64",
                 mag=np.abs(F).sum(1))


def test_transpose(data):
    x, y = data["x"], data["y"]
    K = (Vi(x) - Vj(y)).exp() * Vj(data["t"])
    F = np.exp(_i(x) - _j(y)) * _j(data["t"])
    for KT in (K.t(), K.T):
        assert KT.shape == (N, M, 3)
        assert_close(KT.sum(dim=1), F.sum(0), "float64", mag=np.abs(F).sum(0))
        assert_close(KT.sum(dim=0), F.sum(1), "float64", mag=np.abs(F).sum(1))
        np.testing.assert_array_equal(KT.argmin(dim=1), F.argmin(0))


@pytest.mark.parametrize("lib", ["numpy", pytest.param("torch", marks=requires_torch)])
def test_same_array_as_i_and_j(lib, data):
    """x_i and x_j of one array (the usual self-interaction), and its transpose."""
    x0, s0 = data["x"], data["s"]
    x, s = to_lib(x0, lib), to_lib(s0, lib)
    K = (-Vi(x).sqdist(Vj(x))).exp() * Vj(s) - Vi(s)
    F = np.exp(-sqdist(x0, x0))[..., None] * _j(s0) - _i(s0)
    assert K.shape == (M, M)
    check_sum(K, F, lib=lib)
    assert_close(K.t().sum(dim=1), F.sum(0), "float64", mag=np.abs(F).sum(0))
    assert_close(K.T.sum(dim=0), F.sum(1), "float64", mag=np.abs(F).sum(1))
    np.testing.assert_array_equal(to_np(K.t().argmax(dim=1)), F.argmax(0))


def test_one_dimensional_arrays(data):
    """Vi/Vj of a 1-D array: a variable of dim 1; Pm of a 1-D array: a parameter."""
    s, t, p = data["s"][:, 0], data["t"][:, 0], data["p"]
    K = (Vi(s) - Vj(t)).abs() * Pm(p)
    assert K.shape == (M, N, 3)
    F = np.abs(s[:, None, None] - t[None, :, None]) * p
    check_sum(K, F)
    K = (Vi(s) - Vj(t)).square()
    assert K.shape == (M, N)
    np.testing.assert_allclose(K @ np.ones(N), ((s[:, None] - t[None]) ** 2).sum(1), rtol=1e-12)


@pytest.mark.parametrize("lib", ["numpy", pytest.param("torch", marks=requires_torch)])
def test_matvec_rmatvec(lib, data):
    x, y = to_lib(data["x"], lib), to_lib(data["y"], lib)
    rng = np.random.default_rng(1)
    v, w = rng.standard_normal(N), rng.standard_normal((M, 2))
    K = (-Vi(x).sqdist(Vj(y))).exp()
    Kd = np.exp(-sqdist(data["x"], data["y"]))
    r = K.matvec(to_lib(v, lib))
    check_type(r, lib, "float64")
    np.testing.assert_allclose(to_np(r), Kd @ v, rtol=1e-12)
    r = K.rmatvec(to_lib(w, lib))
    assert r.shape == (N, 2)
    np.testing.assert_allclose(to_np(r), Kd.T @ w, rtol=1e-12)
    r = K.rmatvec(to_lib(w[:, 0], lib))
    assert r.shape == (N,)
    np.testing.assert_allclose(to_np(r), Kd.T @ w[:, 0], rtol=1e-12)


def test_description(data):
    X, Y = Vi(data["x"]), Vj(data["y"])
    K = X.sqdist(Y)
    assert K.shape == (M, N) and K.ndim == 1 and len(K) == M
    V = X - Y
    assert V.shape == (M, N, 3) and V.ndim == 3
    assert "LazyTensor" in repr(K)


# ------------------------------------------------------------------- constants are parameters

def test_float_constants_do_not_recompile(data):
    x, y = data["x"], data["y"]
    D = sqdist(x, y)

    def run(c):
        return (Vi(x).sqdist(Vj(y)) * c).exp().sum(dim=1, backend="cpu")

    np.testing.assert_allclose(run(-0.5), np.exp(-0.5 * D).sum(1, keepdims=True), rtol=1e-12)
    n_kernels, n_compiles = len(cpu_backend.kernels), stats["compiles"]
    for c in (-0.7, 0.25, -1.5e-3):
        np.testing.assert_allclose(run(c), np.exp(c * D).sum(1, keepdims=True), rtol=1e-12)
    assert len(cpu_backend.kernels) == n_kernels
    assert stats["compiles"] == n_compiles

    # a clamp bound and a real exponent too (one float per formula)
    xp, yp, s = data["xp"], data["yp"], data["s"]
    (Vi(xp) * Vj(yp)).clamp(Vi(s), 0.9).sum(dim=1, backend="cpu")
    ((Vi(xp) * Vj(yp)) ** 1.5).sum(dim=1, backend="cpu")
    n_kernels = len(cpu_backend.kernels)
    r = (Vi(xp) * Vj(yp)).clamp(Vi(s), 0.8).sum(dim=1, backend="cpu")
    np.testing.assert_allclose(r, np.minimum(np.maximum(_i(xp) * _j(yp), _i(s)), 0.8).sum(1),
                               rtol=1e-12)
    r = ((Vi(xp) * Vj(yp)) ** 2.5).sum(dim=1, backend="cpu")
    np.testing.assert_allclose(r, ((_i(xp) * _j(yp)) ** 2.5).sum(1), rtol=1e-12)
    assert len(cpu_backend.kernels) == n_kernels


def test_same_arrays_new_lazytensors_no_new_kernel(data):
    x, y = data["x"], data["y"]
    (Vi(x) * Vj(y)).sum(dim=1, backend="cpu")
    n_kernels, n_compiles = len(cpu_backend.kernels), stats["compiles"]
    for _ in range(3):
        r = (Vi(x) * Vj(y)).sum(dim=1, backend="cpu")
    np.testing.assert_allclose(r, (_i(x) * _j(y)).sum(1), rtol=1e-12)
    assert len(cpu_backend.kernels) == n_kernels and stats["compiles"] == n_compiles


def test_equal_formulas_share_a_kernel_whatever_the_arrays():
    rng = np.random.default_rng(5)
    a, b = rng.standard_normal((4, 3)), rng.standard_normal((4, 3))
    n_kernels = len(cpu_backend.kernels)
    (Vi(a) * Vj(b) * 7919).sum(dim=1, backend="cpu")  # a formula no other test uses
    assert len(cpu_backend.kernels) == n_kernels + 1
    r = (Vi(b) * Vj(a) * 7919).sum(dim=1, backend="cpu")  # the same formula x_i * y_j * 7919
    np.testing.assert_allclose(r, (_i(b) * _j(a)).sum(1) * 7919, rtol=1e-12)
    assert len(cpu_backend.kernels) == n_kernels + 1


def test_changing_two_float_constants_no_new_kernel(data):
    K = Vi(data["xp"]) * Vj(data["yp"])
    K.clamp(0.0123, 0.0456).sum(dim=1, backend="cpu")
    n_kernels = len(cpu_backend.kernels)
    r = K.clamp(0.0078, 0.0123).sum(dim=1, backend="cpu")
    np.testing.assert_allclose(r, np.clip(_i(data["xp"]) * _j(data["yp"]), 0.0078, 0.0123).sum(1),
                               rtol=1e-12)
    assert len(cpu_backend.kernels) == n_kernels


# --------------------------------------------------------------------------- non-contiguous inputs

@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_non_contiguous_numpy(backend):
    rng = np.random.default_rng(7)
    wide = rng.standard_normal((M, 6))
    yT = rng.standard_normal((3, N))
    p = rng.standard_normal(6)
    b = rng.standard_normal((2 * N, 2))[::2]
    variants = {
        "x": [wide[:, ::2], np.asfortranarray(wide[:, ::2]), wide[::-1][::-1, ::2]],
        "y": [yT.T, np.ascontiguousarray(yT.T)[::-1][::-1]],
    }
    x0, y0 = np.ascontiguousarray(wide[:, ::2]), np.ascontiguousarray(yT.T)
    p0, b0 = np.ascontiguousarray(p[::2]), np.ascontiguousarray(b)
    assert not variants["x"][0].flags.c_contiguous and not variants["y"][0].flags.c_contiguous

    def go(x, y, pp, bb):
        K = (-(Vi(x) * Pm(pp)).sqdist(Vj(y))).exp()
        return ((K * Vj(bb)).sum(dim=1, backend=backend),
                (K * Vj(bb)).sum(dim=0, backend=backend),
                K.argKmin(3, dim=1, backend=backend))

    want = go(x0, y0, p0, b0)
    D = sqdist(x0 * p0, y0)
    np.testing.assert_allclose(want[0], np.exp(-D) @ b0, rtol=1e-12)
    for x in variants["x"]:
        for y in variants["y"]:
            got = go(x, y, p[::2], b)
            for g, w in zip(got, want):
                np.testing.assert_array_equal(g, w)


@requires_torch
@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_non_contiguous_torch(backend):
    torch = TORCH
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, M, generator=g, dtype=torch.float32).t()
    y = torch.randn(N, 6, generator=g, dtype=torch.float32)[:, 1::2]
    assert not x.is_contiguous() and not y.is_contiguous()

    def go(a, b):
        K = (Vi(a) * Vj(b)).sin()
        return K.sum(dim=1, backend=backend), K.min_argmin(dim=0, backend=backend)

    got = go(x, y)
    want = go(x.contiguous(), y.contiguous())
    check_type(got[0], "torch", "float32")
    assert torch.equal(got[0], want[0])
    assert torch.equal(got[1][0], want[1][0]) and torch.equal(got[1][1], want[1][1])
    F = np.sin(_i(x.double().numpy()) * _j(y.double().numpy()))
    assert_close(got[0], F.sum(1), "float32", mag=np.abs(F).sum(1))


# --------------------------------------------------------------------------- errors

X100 = np.zeros((100, 3))
Y80 = np.ones((80, 3))


def test_dim_mismatch(no_compile):
    with pytest.raises(lm.ShapeError) as e:
        Vi(X100) + Vj(np.zeros((80, 2)))
    assert "dim 3" in str(e.value) and "dim 2" in str(e.value)
    with pytest.raises(lm.ShapeError, match="dim"):
        Vi(X100).sqdist(Vj(np.zeros((80, 2))))
    with pytest.raises(lm.ShapeError, match="dim"):
        Vi(X100) | Vj(np.zeros((80, 2)))
    with pytest.raises(lm.ShapeError):
        Vi(X100).concat(Vj(Y80)).elem(6)
    no_compile.assert_none()


def test_different_row_counts(no_compile):
    with pytest.raises(lm.ShapeError) as e:
        Vi(X100) + Vi(np.zeros((50, 3)))
    assert "100" in str(e.value) and "50" in str(e.value)
    with pytest.raises(lm.ShapeError) as e:
        (Vj(Y80) - Vj(np.zeros((70, 3)))).sum(dim=1)
    assert "80" in str(e.value) and "70" in str(e.value)
    with pytest.raises(lm.ShapeError) as e:  # through the weight of a reduction
        (Vi(X100) | Vj(Y80)).sumsoftmaxweight(Vj(np.ones((70, 2))), dim=1)
    assert "80" in str(e.value) and "70" in str(e.value)
    with pytest.raises(lm.ShapeError) as e:
        (Vi(X100) | Vj(Y80)) @ np.ones(70)
    assert "80" in str(e.value) and "(70,)" in str(e.value)
    no_compile.assert_none()


@pytest.mark.parametrize("call", [
    lambda K: K.sum(dim=3), lambda K: K.sum(dim=-2), lambda K: K.min(dim=3),
    lambda K: K.argmin(dim=-3), lambda K: K.Kmin(3), lambda K: K.argKmin(3, dim=None),
    lambda K: K.Kmin_argKmin(3, dim=2), lambda K: K.logsumexp(), lambda K: K.min_argmin(),
    lambda K: K.logsumexp(dim=None), lambda K: K.sumsoftmaxweight(Vj(Y80), dim=5),
], ids=["sum3", "sum-2", "min3", "argmin-3", "Kmin-None", "argKmin-None", "Kmin_argKmin2",
        "lse-default", "min_argmin-default", "lse-None", "ssmw5"])
def test_bad_dim(call, no_compile):
    K = Vi(X100).sqdist(Vj(Y80))
    with pytest.raises(lm.ShapeError, match="dim"):
        call(K)
    no_compile.assert_none()


def test_mixed_dtypes(no_compile):
    with pytest.raises(lm.DtypeError) as e:
        (Vi(X100.astype(np.float32)) - Vj(Y80)).sum(dim=1)
    msg = str(e.value)
    assert "float32" in msg and "float64" in msg and "(80, 3)" in msg
    with pytest.raises(lm.DtypeError, match="float32"):
        (Vi(X100) * Pm(np.ones(3, np.float32)) - Vj(Y80)).sum(dim=1)
    no_compile.assert_none()


@requires_torch
def test_mixed_libraries(no_compile):
    with pytest.raises(lm.DtypeError) as e:
        (Vi(X100) - Vj(TORCH.from_numpy(Y80))).sum(dim=1)
    msg = str(e.value)
    assert "numpy" in msg and "torch" in msg
    with pytest.raises(lm.DtypeError, match="torch"):
        (Vi(TORCH.from_numpy(X100)) - Vj(Y80)).sum(dim=0)
    no_compile.assert_none()


@pytest.mark.parametrize("dt,word", [("int64", "int64"), ("int32", "int32")])
# complex: tests/test_complex.py; float16 is computed in float32 (tests/test_cuda_runtime.py)
def test_unsupported_dtypes(dt, word, no_compile):
    bad = Y80.astype(dt)
    with pytest.raises(lm.DtypeError) as e:
        (Vi(X100) - Vj(bad)).sum(dim=1)
    assert word in str(e.value) and "(80, 3)" in str(e.value)
    with pytest.raises(lm.DtypeError, match=word):
        (Vi(X100.astype(dt)) - Vj(bad)).sum(dim=1)
    no_compile.assert_none()


@requires_torch
def test_unsupported_torch_dtype(no_compile):
    with pytest.raises(lm.DtypeError, match="int64"):
        (Vi(TORCH.zeros(5, 3, dtype=TORCH.int64)) - Vj(TORCH.zeros(4, 3))).sum(dim=1)
    no_compile.assert_none()


@pytest.mark.parametrize("K", [81, 1000, float("inf"), float("nan"), 2.5, 0, -1, True, "3",
                               None], ids=str)
def test_bad_K(K, no_compile):
    D = Vi(X100).sqdist(Vj(Y80))
    with pytest.raises(lm.ShapeError, match="K"):
        D.argKmin(K, dim=1)
    no_compile.assert_none()


def test_K_larger_than_the_reduced_size(no_compile):
    D = Vi(X100).sqdist(Vj(Y80))
    with pytest.raises(lm.ShapeError) as e:
        D.Kmin(81, dim=1)
    assert "81" in str(e.value) and "80" in str(e.value)
    with pytest.raises(lm.ShapeError) as e:
        D.Kmin_argKmin(101, dim=0)
    assert "101" in str(e.value) and "100" in str(e.value)
    no_compile.assert_none()
    # the largest valid K works
    assert D.argKmin(80, dim=1).shape == (100, 80)


def test_bad_backend(no_compile):
    D = Vi(X100).sqdist(Vj(Y80))
    with pytest.raises(lm.LazymatError) as e:
        D.sum(dim=1, backend="fastest")
    assert isinstance(e.value, ValueError) and "fastest" in str(e.value)
    if lm.plan.cuda_unavailable_reason() is not None:  # KeOps' "gpu" is our "cuda"
        with pytest.raises(lm.LazymatError, match="backend='cuda' cannot run here"):
            D.sum(dim=1, backend="gpu")
    with pytest.raises(lm.DtypeError, match="float16 but"):  # half data mixed with float64
        (Vi(X100) - Vj(Y80.astype("float16"))).sum(dim=1)
    no_compile.assert_none()


def test_two_dimensional_array_with_a_lazytensor(no_compile):
    for combine in (lambda: Vi(X100) + Y80, lambda: Y80 * Vi(X100), lambda: Vi(X100) - Y80,
                    lambda: Y80 / Vi(X100), lambda: Vi(X100).sqdist(Y80)):
        with pytest.raises(lm.ShapeError) as e:
            combine()
        assert "(80, 3)" in str(e.value)
    no_compile.assert_none()


def test_bad_arrays(no_compile):
    with pytest.raises(lm.ShapeError, match=r"\(2, 3, 4\)"):
        LazyTensor(np.zeros((2, 3, 4)))
    with pytest.raises(lm.ShapeError, match="batch dims do not broadcast"):
        Vi(np.zeros((2, 3, 4))) + Vj(np.zeros((3, 5, 4)))  # batch dims 2 and 3
    with pytest.raises(lm.ShapeError, match="axis"):
        LazyTensor(X100)
    with pytest.raises(lm.ShapeError):
        Vi(np.zeros((5, 0)))
    with pytest.raises(lm.ShapeError, match="scalar"):
        (Vi(X100) - Vj(Y80)).logsumexp(dim=1)
    with pytest.raises(lm.ShapeError, match="scalar"):
        (Vi(X100) - Vj(Y80)).sumsoftmaxweight(Vj(Y80), dim=1)
    with pytest.raises(lm.ShapeError, match=r"\(3, 80\)"):
        Vi(X100).sqdist(Vj(Y80)) @ np.ones((3, 80))  # v of the wrong orientation
    with pytest.raises(lm.ShapeError):
        (Vi(X100) - Vj(Y80)) @ np.ones(80)  # K must be scalar-valued
    with pytest.raises(TypeError, match="bogus"):
        Vi(X100).sqdist(Vj(Y80)).sum(dim=1, bogus=3)
    no_compile.assert_none()


def test_out_wrong_shape_before_compiling(no_compile):
    D = (Vi(X100) - Vj(Y80)).abs().sin()  # any formula
    with pytest.raises(lm.ShapeError) as e:
        D.sum(dim=1, out=np.zeros((100, 2)))
    assert "(100, 2)" in str(e.value) and "(100, 3)" in str(e.value)
    no_compile.assert_none()


def test_out_wrong_shape_message():
    D = Vi(X100) - Vj(Y80)
    with pytest.raises(lm.ShapeError) as e:
        D.sum(dim=1, out=np.zeros((100, 2)), backend="reference")
    assert "(100, 2)" in str(e.value) and "(100, 3)" in str(e.value)
    with pytest.raises(lm.DtypeError, match="float32"):
        D.sum(dim=1, out=np.zeros((100, 3), np.float32), backend="reference")


# ------------------------------------------------------------------- simplifications keep M, N

def test_simplified_away_variable_keeps_its_size():
    x, y = np.ones((5, 3)), np.arange(12.0).reshape(4, 3)
    r = (Vi(x) * 0 + Vj(y)).sum(dim=1)
    assert r.shape == (5, 3)
    np.testing.assert_allclose(r, np.broadcast_to(y.sum(0), (5, 3)))


def test_zero_formula_reduces_to_zeros():
    x, y = np.ones((5, 3)), np.ones((4, 3))
    r = (Vi(x) * Vj(y) * 0).sum(dim=1)
    np.testing.assert_array_equal(r, np.zeros((5, 3)))


# --------------------------------------------------------------------------- symbolic variables

def test_symbolic_variables_make_a_callable_reduction(rng):
    """KeOps' Vi(index, dim): the reduction waits for its arrays, given by index."""
    x, y, b = rng.standard_normal((6, 3)), rng.standard_normal((9, 3)), rng.standard_normal((9, 2))
    want = (lm.Vj(b) * (-lm.Vi(x).sqdist(lm.Vj(y))).exp()).sum(dim=1)
    red = (lm.Vj(2, 2) * (-lm.Vi(0, 3).sqdist(lm.Vj(1, 3))).exp()).sum(dim=1)
    assert isinstance(red, lm.lazy_tensor.SymbolicReduction)
    np.testing.assert_allclose(red(x, y, b), want, rtol=1e-12)
    np.testing.assert_allclose(red(x, y, 2 * b), 2 * want, rtol=1e-12)  # reusable
    # KeOps' tuple spelling, mixed with data, a symbolic parameter given as a float
    mixed = (lm.LazyTensor((0, 3, 1)) - lm.Vi(x)).abs().sum(-1) * lm.Pm(1, 1)
    out = mixed.logsumexp(dim=1)(y, 0.5)
    direct = (0.5 * (lm.Vj(y) - lm.Vi(x)).abs().sum(-1)).logsumexp(dim=1)
    np.testing.assert_allclose(out, direct, rtol=1e-12)
    # weights may be symbolic too; keyword options apply at the call
    soft = lm.Vi(0, 3).sqdist(lm.Vj(1, 3)).sumsoftmaxweight(lm.Vj(2, 2), dim=1)
    np.testing.assert_allclose(soft(x, y, b, backend="reference"),
                               lm.Vi(x).sqdist(lm.Vj(y)).sumsoftmaxweight(lm.Vj(b), dim=1),
                               rtol=1e-10)


def test_call_false_defers_the_reduction(rng):
    x = rng.standard_normal((5, 2))
    red = lm.Vi(x).sqdist(lm.Vj(x)).sum(dim=1, call=False)
    assert isinstance(red, lm.lazy_tensor.SymbolicReduction)
    np.testing.assert_allclose(red(), lm.Vi(x).sqdist(lm.Vj(x)).sum(dim=1))


@requires_torch
def test_symbolic_reduction_is_differentiable():
    import torch

    x = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    y = torch.randn(7, 3, dtype=torch.float64)
    red = (-lm.Vi(0, 3).sqdist(lm.Vj(1, 3))).exp().sum(dim=1)
    assert torch.autograd.gradcheck(lambda x: red(x, y), (x,))


def test_symbolic_variable_errors(rng, no_compile):
    x = rng.standard_normal((5, 3))
    red = lm.Vi(0, 3).sqdist(lm.Vj(1, 3)).sum(dim=1)
    with pytest.raises(lm.ShapeError, match=r"Vj\(1, 3\) but was called with 1 array"):
        red(x)
    with pytest.raises(lm.ShapeError, match=r"Vj\(1, 3\): argument 1 has shape \(5, 2\)"):
        red(x, x[:, :2])
    with pytest.raises(lm.ShapeError, match="needs its dim"):
        lm.Vi(0)
    with pytest.raises(lm.ShapeError, match="symbolic"):
        lm.Vi(0, 1) @ np.ones(3)
    with pytest.raises(lm.ShapeError, match="symbolic variable"):
        lm.Vi(0, 3).sqdist(lm.Vj(x)).dense()
    with pytest.raises(lm.ShapeError, match="index >= 0"):
        lm.Vi(-1, 3)


def test_solve_for_a_symbolic_variable(rng):
    """KeOps' K.solve(b, var=Vj(index, dim)): the formula is linear in the variable."""
    x = rng.random((60, 2))
    b = rng.standard_normal((60, 2))
    a_j = lm.Vj(1, 2)
    K = (-lm.Vi(x).sqdist(lm.Vj(x)) * 5).exp() * a_j
    a = K.solve(b, var=a_j, alpha=0.3, eps=1e-10)
    dense = np.exp(-5 * ((x[:, None] - x[None]) ** 2).sum(-1)) + 0.3 * np.eye(60)
    np.testing.assert_allclose(a, np.linalg.solve(dense, b), rtol=1e-7, atol=1e-8)
    with pytest.raises(lm.ShapeError, match="symbolic j-variable"):
        K.solve(b, var=lm.Vi(0, 2))
    with pytest.raises(lm.ShapeError, match=r"needs b of shape \(N, 2\)"):
        K.solve(b[:, :1], var=a_j)
