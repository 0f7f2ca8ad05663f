"""lazymat.jax against dense jax.numpy: every reduction family, jit, grad (to second order),
jvp/jacfwd, vmap, batch dims, Genred strings, the FFI fast path and its fallbacks."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

jax = pytest.importorskip("jax")
jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402

import lazymat  # noqa: E402
import lazymat.jax as lj  # noqa: E402
from lazymat.jax import Genred, Pm, Vi, Vj  # noqa: E402

DTYPES = ("float32", "float64")
J = jax.jit
TOL = {"float32": 2e-5, "float64": 1e-11}


def close(a, b, dtype="float64", scale=None):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    s = scale if scale is not None else max(1.0, float(np.abs(b).max(initial=0)))
    np.testing.assert_allclose(a, b, rtol=TOL[dtype], atol=TOL[dtype] * s)


def data(dtype, M=6, N=9, D=3, E=2, seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.random((M, D)), dtype)
    y = jnp.asarray(rng.random((N, D)), dtype)
    b = jnp.asarray(rng.standard_normal((N, E)), dtype)
    return x, y, b


def sqd(x, y):
    return ((x[..., :, None, :] - y[..., None, :, :]) ** 2).sum(-1)


# The reductions as (lazymat on Vi(x), Vj(y), Vj(b); the same with jax.numpy).
FAMILIES = {
    "Sum": (lambda x, y, b: ((-Vi(x).sqdist(Vj(y))).exp() * Vj(b)).sum(dim=1),
            lambda x, y, b: jnp.exp(-sqd(x, y)) @ b),
    "Sum_axis0": (lambda x, y, b: (-Vi(x).sqdist(Vj(y))).exp().sum(dim=0),
                  lambda x, y, b: jnp.exp(-sqd(x, y)).sum(0)[:, None]),
    "Min": (lambda x, y, b: Vi(x).sqdist(Vj(y)).min(dim=1),
            lambda x, y, b: sqd(x, y).min(1, keepdims=True)),
    "KMin": (lambda x, y, b: Vi(x).sqdist(Vj(y)).Kmin(3, dim=1),
             lambda x, y, b: -jax.lax.top_k(-sqd(x, y), 3)[0]),
    "LogSumExp": (lambda x, y, b: (-Vi(x).sqdist(Vj(y))).logsumexp(dim=1),
                  lambda x, y, b: jax.scipy.special.logsumexp(-sqd(x, y), 1)[:, None]),
    "LogSumExp_weight": (
        lambda x, y, b: (-Vi(x).sqdist(Vj(y))).logsumexp(dim=1, weight=Vj(b).exp()),
        lambda x, y, b: jax.scipy.special.logsumexp(-sqd(x, y)[..., None], 1,
                                                    b=jnp.exp(b)[None])),
    "SumSoftMaxWeight": (lambda x, y, b: (-Vi(x).sqdist(Vj(y))).sumsoftmaxweight(Vj(b), dim=1),
                         lambda x, y, b: jax.nn.softmax(-sqd(x, y), 1) @ b),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_reduction_matches_dense(family, dtype):
    x, y, b = data(dtype)
    ours, dense = FAMILIES[family]
    out = ours(x, y, b)
    assert isinstance(out, jax.Array) and out.dtype == jnp.dtype(dtype)
    close(out, dense(x, y, b), dtype)
    close(jax.jit(ours)(x, y, b), dense(x, y, b), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_index_reductions(dtype):
    x, y, _ = data(dtype)
    D2 = sqd(x, y)
    ij = Vi(x).sqdist(Vj(y))
    np.testing.assert_array_equal(ij.argmin(dim=1).ravel(), jnp.argmin(D2, 1))
    np.testing.assert_array_equal(ij.argKmin(4, dim=1), jnp.argsort(D2, 1)[:, :4])
    np.testing.assert_array_equal(jax.jit(lambda x: Vi(x).sqdist(Vj(y)).argKmin(4, dim=0))(x),
                                  jnp.argsort(D2, 0)[:4].T)
    values, indices = ij.Kmin_argKmin(2, dim=1)
    close(values, jnp.sort(D2, 1)[:, :2], dtype)
    np.testing.assert_array_equal(indices, jnp.argsort(D2, 1)[:, :2])
    assert indices.dtype == jnp.int64
    value, index = ij.min_argmin(dim=1)
    close(value, D2.min(1, keepdims=True), dtype)
    np.testing.assert_array_equal(index.ravel(), jnp.argmin(D2, 1))


def _loss(f):
    return lambda *args: (f(*args) ** 2).sum()


@pytest.mark.parametrize("family", ["Sum", "Sum_axis0", "Min", "KMin", "LogSumExp",
                                    "LogSumExp_weight", "SumSoftMaxWeight"])
def test_grad_matches_dense(family):
    x, y, b = data("float64")
    ours, dense = FAMILIES[family]
    argnums = (0, 1) if family in ("Min", "KMin", "Sum_axis0", "LogSumExp") else (0, 1, 2)
    got = jax.jit(jax.grad(_loss(ours), argnums))(x, y, b)
    want = jax.jit(jax.grad(_loss(dense), argnums))(x, y, b)
    for g, w in zip(got, want):
        close(g, w)


@pytest.mark.parametrize("factor", [True, False])
def test_grad_reduces_only_what_varies_with_the_reduced_index(monkeypatch, factor):
    """The transpose reduces Σ_i g e and Σ_i g e x for ∂y, ∂b (formula/factor.py, as torch's
    backward), with batch dims and a parameter; FACTOR_SUMS = False reduces the whole VJP."""
    from lazymat.jax import primitive

    calls = []
    monkeypatch.setattr(lazymat.autograd, "FACTOR_SUMS", factor)
    real = primitive.factor_sum
    monkeypatch.setattr(primitive, "factor_sum", lambda *a: calls.append(real(*a)) or calls[-1])
    rng = np.random.default_rng(4)
    x, y = jnp.asarray(rng.random((2, 5, 3))), jnp.asarray(rng.random((2, 7, 3)))
    b, s = jnp.asarray(rng.standard_normal((2, 7, 1))), jnp.asarray([0.7])

    def ours(x, y, b, s):
        return ((-Vi(x).sqdist(Vj(y)) * Pm(s)).exp() * Vj(b)).sum(dim=2)

    def dense(x, y, b, s):
        return jnp.exp(-sqd(x, y) * s[0]) @ b

    got = jax.grad(_loss(ours), (0, 1, 2, 3))(x, y, b, s)
    want = jax.grad(_loss(dense), (0, 1, 2, 3))(x, y, b, s)
    for g, w in zip(got, want):
        close(g, w)
    assert any(c is not None for c in calls) == factor


def test_grad_float32_and_vjp():
    x, y, b = data("float32")
    ours, dense = FAMILIES["Sum"]
    close(jax.grad(_loss(ours))(x, y, b), jax.grad(_loss(dense))(x, y, b), "float32")
    out, pullback = jax.vjp(lambda b: ours(x, y, b), b)
    ct = jnp.ones_like(out)
    close(pullback(ct)[0], jax.vjp(lambda b: dense(x, y, b), b)[1](ct)[0], "float32")


def test_second_order():
    x, y, b = data("float64", M=4, N=5)
    ours, dense = FAMILIES["Sum"]
    # (everything under jit: eager jax compiles each small op of the dense oracle apart)
    close(J(jax.hessian(_loss(ours)))(x, y, b), J(jax.hessian(_loss(dense)))(x, y, b))
    lse, lse_dense = FAMILIES["LogSumExp"]
    # jacfwd of grad (forward over reverse), and grad of grad
    close(J(jax.jacfwd(jax.grad(_loss(lse))))(x, y, b), J(jax.hessian(_loss(lse_dense)))(x, y, b))
    gg = J(jax.grad(lambda y: jax.grad(_loss(ours))(x, y, b).sum()))
    close(gg(y), J(jax.grad(lambda y: jax.grad(_loss(dense))(x, y, b).sum()))(y))
    # Mixed second derivatives across i- and j-variables and a parameter
    s = jnp.asarray([0.7])
    f = lambda x, y, s: ((-Vi(x).sqdist(Vj(y)) * Pm(s)).exp().sum(dim=1) ** 2).sum()  # noqa
    g = lambda x, y, s: ((jnp.exp(-sqd(x, y) * s[0]).sum(1)) ** 2).sum()  # noqa
    close(J(jax.jacrev(jax.grad(f, 2), 0))(x, y, s), J(jax.jacrev(jax.grad(g, 2), 0))(x, y, s))


def test_jvp_and_jacfwd():
    x, y, b = data("float64")
    tx, ty = jnp.ones_like(x), jnp.full_like(y, 0.5)
    for family in ("Sum", "Min", "KMin", "SumSoftMaxWeight"):
        ours, dense = FAMILIES[family]
        _, t1 = jax.jvp(lambda x, y: ours(x, y, b), (x, y), (tx, ty))
        t2 = J(lambda x, y: jax.jvp(lambda x, y: dense(x, y, b), (x, y), (tx, ty))[1])(x, y)
        close(t1, t2)
    ours, dense = FAMILIES["LogSumExp"]
    close(J(jax.jacfwd(lambda x: ours(x, y, b)))(x), J(jax.jacfwd(lambda x: dense(x, y, b)))(x))


def test_vmap_becomes_batch_dims():
    rng = np.random.default_rng(1)
    xs = jnp.asarray(rng.random((4, 6, 3)))
    ys = jnp.asarray(rng.random((4, 9, 3)))
    _, y, b = data("float64")
    for family in ("Sum", "KMin", "SumSoftMaxWeight"):
        ours, dense = FAMILIES[family]
        close(jax.vmap(ours, (0, None, None))(xs, y, b), J(jax.vmap(dense, (0, None, None)))(
            xs, y, b))
        close(J(jax.vmap(ours, (0, 0, None)))(xs, ys, b),
              J(jax.vmap(dense, (0, 0, None)))(xs, ys, b))
    ours, dense = FAMILIES["Sum"]
    # mapped along a non-leading axis, nested vmap, and the vmap of a gradient
    close(jax.vmap(ours, (1, None, None))(jnp.moveaxis(xs, 0, 1), y, b),
          J(jax.vmap(dense, (0, None, None)))(xs, y, b))
    nested = jax.vmap(jax.vmap(ours, (0, None, None)), (None, 0, None))
    close(J(nested)(xs, ys, b), J(jax.vmap(jax.vmap(dense, (0, None, None)), (None, 0, None)))(
        xs, ys, b))
    close(J(jax.vmap(jax.grad(_loss(ours)), (0, None, None)))(xs, y, b),
          J(jax.vmap(jax.grad(_loss(dense)), (0, None, None)))(xs, y, b))


def test_vmap_over_lazymat_batch_dims():
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.random((3, 2, 5, 2)))  # vmapped axis 0, lazymat batch dim 2
    y = jnp.asarray(rng.random((2, 7, 2)))
    f = lambda x, y: (-Vi(x).sqdist(Vj(y))).exp().sum(dim=2)  # noqa: E731
    g = lambda x, y: jnp.exp(-sqd(x, y)).sum(-1)[..., None]  # noqa: E731
    close(f(x[0], y), J(g)(x[0], y))
    close(J(jax.vmap(f, (0, None)))(x, y), J(jax.vmap(g, (0, None)))(x, y))
    close(J(jax.grad(lambda y: (f(x[0], y) ** 2).sum()))(y),
          J(jax.grad(lambda y: (g(x[0], y) ** 2).sum()))(y))


@pytest.mark.parametrize("dtype", DTYPES)
def test_genred_strings(dtype):
    x, y, b = data(dtype)
    gauss = Genred("Exp(-SqDist(x, y)) * b", ["x = Vi(3)", "y = Vj(3)", "b = Vj(2)"],
                   reduction_op="Sum", axis=1)
    close(gauss(x, y, b), jnp.exp(-sqd(x, y)) @ b, dtype)
    close(jax.jit(gauss)(x, y, b), jnp.exp(-sqd(x, y)) @ b, dtype)
    if dtype == "float64":
        close(jax.grad(lambda x: gauss(x, y, b).sum())(x),
              jax.grad(lambda x: (jnp.exp(-sqd(x, y)) @ b).sum())(x))
    knn = lj.generic_argkmin("SqDist(x, y)", "a = Vi(3)", "x = Vi(3)", "y = Vj(3)")
    np.testing.assert_array_equal(knn(x, y), jnp.argsort(sqd(x, y), 1)[:, :3])
    lse = lj.generic_logsumexp("-SqDist(x, y)", "a = Vj(1)", "x = Vi(3)", "y = Vj(3)")
    close(lse(x, y), jax.scipy.special.logsumexp(-sqd(x, y), 0)[:, None], dtype)
    # symbolic variables: the reduction is a function of the arrays
    sym = (-Vi(0, 3).sqdist(Vj(1, 3))).exp().sum(dim=1)
    close(jax.jit(sym)(x, y), jnp.exp(-sqd(x, y)).sum(1, keepdims=True), dtype)


def test_block_sparse_ranges():
    """KeOps' ranges: the same 6-tuple serves the reduction, its gradients (reductions over
    i and over j) and its tangents; rows outside every range hold the identity."""
    from lazymat.ranges import from_matrix

    x, y, b = data("float64")
    keep = np.array([[1, 0, 1], [0, 0, 0]], bool)  # row block 1 sees no column
    ranges = from_matrix(np.array([[0, 3], [3, 6]]), np.array([[0, 3], [3, 6], [6, 9]]), keep)
    mask = jnp.asarray(np.repeat(np.repeat(keep, 3, 0), 3, 1))

    def ours(x, y, b):
        return ((-Vi(x).sqdist(Vj(y))).exp() * Vj(b)).sum(dim=1, ranges=ranges)

    def dense(x, y, b):
        return jnp.where(mask, jnp.exp(-sqd(x, y)), 0) @ b

    close(J(ours)(x, y, b), dense(x, y, b))
    for g, w in zip(J(jax.grad(_loss(ours), (0, 1, 2)))(x, y, b),
                    J(jax.grad(_loss(dense), (0, 1, 2)))(x, y, b)):
        close(g, w)
    close(jax.jvp(lambda x: ours(x, y, b), (x,), (jnp.ones_like(x),))[1],
          J(lambda x: jax.jvp(lambda x: dense(x, y, b), (x,), (jnp.ones_like(x),))[1])(x))
    got = Vi(x).sqdist(Vj(y)).min(dim=1, ranges=ranges)
    want = jnp.where(mask, sqd(x, y), jnp.inf).min(1, keepdims=True)
    close(jnp.where(jnp.isinf(want), 0, got), jnp.where(jnp.isinf(want), 0, want))
    assert bool(jnp.all(jnp.isinf(got[3:])))
    with pytest.raises(lazymat.ShapeError, match="ranges"):
        Vi(x).sqdist(Vj(y)).sum(dim=1, ranges=ranges[:3])


def test_fast_path_is_an_ffi_call():
    x, y, b = data("float32")
    text = jax.jit(FAMILIES["Sum"][0]).lower(x, y, b).as_text()
    assert "lazymat_cpu" in text and "callback" not in text


def test_reference_backend_and_float_parameters():
    x, y, b = data("float64")
    f = lambda x, y: (-Vi(x).sqdist(Vj(y)) * 0.5).exp().sum(dim=1, backend="reference")  # noqa
    want = jnp.exp(-0.5 * sqd(x, y)).sum(1, keepdims=True)
    close(f(x, y), want)
    text = jax.jit(f).lower(x, y).as_text()
    assert "lazymat_cpu" not in text and "callback" not in text
    close(jax.grad(lambda x: f(x, y).sum())(x), jax.grad(lambda x: want.sum() * 0 + jnp.exp(
        -0.5 * sqd(x, y)).sum())(x))


def test_pure_callback_fallback(monkeypatch):
    x, y, b = data("float64")
    monkeypatch.setenv("LAZYMAT_JAX_FFI", "0")
    jax.clear_caches()
    f = lambda x: (-Vi(x).sqdist(Vj(y)) * 0.25).exp().sum(dim=1)  # noqa: E731
    with pytest.warns(RuntimeWarning, match="pure_callback"):
        text = jax.jit(f).lower(x).as_text()
    assert "lazymat_cpu" not in text and "callback" in text
    close(jax.jit(f)(x), jnp.exp(-0.25 * sqd(x, y)).sum(1, keepdims=True))
    close(jax.grad(lambda x: f(x).sum())(x),
          jax.grad(lambda x: jnp.exp(-0.25 * sqd(x, y)).sum())(x))
    monkeypatch.delenv("LAZYMAT_JAX_FFI")
    jax.clear_caches()


def test_half_precision_and_empty():
    x, y, b = data("float32")
    out = FAMILIES["Sum"][0](x.astype(jnp.float16), y.astype(jnp.float16), b.astype(jnp.float16))
    assert out.dtype == jnp.float16
    np.testing.assert_allclose(np.asarray(out, np.float32), FAMILIES["Sum"][1](x, y, b),
                               rtol=2e-2, atol=2e-2)
    empty = Vi(x).sqdist(Vj(y[:0])).min(dim=1)
    assert empty.shape == (6, 1) and bool(jnp.all(jnp.isinf(empty)))


def test_errors_before_compiling():
    x, y, _ = data("float64")
    with pytest.raises(lazymat.ShapeError, match="dim"):
        Vi(x).sqdist(Vj(y[:, :2])).sum(dim=1)
    with pytest.raises(lazymat.DtypeError, match="int"):
        Vi(x.astype(jnp.int32)).sqdist(Vj(y.astype(jnp.int32))).sum(dim=1)
    with pytest.raises(lazymat.DtypeError, match="float32"):
        Vi(x).sqdist(Vj(y.astype(jnp.float32))).sum(dim=1)
    with pytest.raises(lazymat.ShapeError, match="larger"):
        Vi(x).sqdist(Vj(y)).Kmin(20, dim=1)
    with pytest.raises(lazymat.DtypeError, match="immutable"):
        Vi(x).sqdist(Vj(y)).sum(dim=1, out=jnp.zeros((6, 1)))


def test_without_x64_indices_are_int32_and_exact():
    """jax's default (no x64): float32 results, int32 indices (the kernel's int64 come back
    through int32 pairs)."""
    code = textwrap.dedent("""
        import numpy as np, jax, jax.numpy as jnp
        from lazymat.jax import Vi, Vj
        rng = np.random.default_rng(0)
        x = jnp.asarray(rng.random((50, 2)), jnp.float32)
        y = jnp.asarray(rng.random((300, 2)), jnp.float32)
        d = ((x[:, None] - y[None]) ** 2).sum(-1)
        idx = jax.jit(lambda x: Vi(x).sqdist(Vj(y)).argKmin(3, dim=1))(x)
        assert idx.dtype == jnp.int32, idx.dtype
        assert (np.asarray(idx) == np.argsort(np.asarray(d), 1, kind="stable")[:, :3]).all()
        g = jax.grad(lambda x: Vi(x).sqdist(Vj(y)).min(dim=1).sum())(x)
        want = jax.grad(lambda x: ((x[:, None] - y[None]) ** 2).sum(-1).min(1).sum())(x)
        assert np.allclose(g, want, atol=1e-5), abs(g - want).max()
        print("ok")
    """)
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=240, env=env)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-2000:]


def test_cuda_lowering_and_handler_build():
    """Without a GPU: the CUDA lowering is an FFI call on XLA's stream (exported for
    "cuda"), its handler library builds, and the kernel it names compiles with NVRTC."""
    from jax import export

    from lazymat.codegen import cuda as codegen
    from lazymat.compile import nvrtc
    from lazymat.jax import ffi

    x, y, _ = data("float32", M=300, N=200)
    f = lambda x, y: Vi(x).sqdist(Vj(y)).argKmin(3, dim=1)  # noqa: E731
    exported = export.export(jax.jit(f), platforms=["cuda"], disabled_checks=[
        export.DisabledSafetyCheck.custom_call(ffi.CUDA_TARGET)])(x, y)
    text = exported.mlir_module()
    assert "custom_call @lazymat_cuda" in text and "callback" not in text
    lib = ffi.build_handler(ffi.CUDA_HANDLER_SOURCE, "jax_ffi_cuda_handler")
    assert lib.lm_jax_cuda and lib.lm_jax_cuda_register
    if not nvrtc.available():
        pytest.skip("NVRTC is not installed")
    from lazymat.formula import SqDist, Var
    from lazymat.reductions import REDUCTIONS

    spec = codegen.KernelSpec(REDUCTIONS["ArgKMin"], SqDist(Var(0, 3, 0), Var(1, 3, 1)), None,
                              3, "float32", ((3, 0), (3, 1)))
    name = "lm_argkmin_float32"
    source = codegen.render(spec, name=name, block=codegen.BLOCK)
    assert f"kernel = {ffi.kernel_id(source)} " in text  # the kernel the call names
    assert nvrtc.compile_cubin(source, arch="sm_90", name=f"{name}.cu")


def _jax_gpu() -> bool:
    try:
        return bool(jax.devices("gpu"))
    except RuntimeError:
        return False


@pytest.mark.gpu
@pytest.mark.skipif(not _jax_gpu(), reason="jax sees no GPU")
def test_cuda_ffi_on_gpu():
    gpu = jax.devices("gpu")[0]
    x, y, b = (jax.device_put(a, gpu) for a in data("float32", M=1000, N=700))
    for family in ("Sum", "KMin", "LogSumExp", "SumSoftMaxWeight"):
        ours, dense = FAMILIES[family]
        assert "lazymat_cuda" in jax.jit(ours).lower(x, y, b).as_text()
        close(jax.jit(ours)(x, y, b), dense(x, y, b), "float32")
    close(jax.jit(jax.grad(_loss(FAMILIES["Sum"][0])))(x, y, b),
          jax.grad(_loss(FAMILIES["Sum"][1]))(x, y, b), "float32")
