"""Small calls (issue 17.4): a LazyTensor built anew on every call finds the bound call of
an earlier one with the same formula and layout. These tests check that the shared bound
calls follow the data and are left whenever the call differs: shapes, dtypes, strides,
Python float values, options, backends, thread counts, autograd."""

import numpy as np
import pytest
from conftest import count_prepares, sqdist

import lazymat as lm
from lazymat import config


def dense(x, y, b, s=0.5):
    return np.exp(-sqdist(x.astype(np.float64), y.astype(np.float64)) * s) @ b


def gauss(x, y, b):
    return (-lm.Vi(x).sqdist(lm.Vj(y)) / 2).exp() @ b


def data(rng, M=13, N=11, D=3, dtype="float64"):
    return (rng.standard_normal((M, D)).astype(dtype), rng.standard_normal((N, D)).astype(dtype),
            rng.standard_normal((N, 1)).astype(dtype))


@pytest.fixture
def prepares(monkeypatch):
    """The number of plan.prepare calls (the general path), from a clean slate of memos."""
    config.clear_all()
    return count_prepares(monkeypatch)


def tol(dtype):
    return dict(rtol=2e-5, atol=2e-5) if dtype == "float32" else dict(rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_built_each_call_is_bound_and_follows_the_data(prepares, dtype):
    rng = np.random.default_rng(0)
    for k in range(5):  # new arrays (values and objects) of one layout
        x, y, b = data(rng, dtype=dtype)
        got = gauss(x, y, b)
        assert got.dtype == np.dtype(dtype) and got.shape == (13, 1)
        np.testing.assert_allclose(got, dense(x, y, b), **tol(dtype))
    assert prepares[0] == 2  # the general path twice (the second call binds)


def test_shape_change_takes_the_general_path(prepares):
    rng = np.random.default_rng(1)
    for M, N, D in [(13, 11, 3), (13, 11, 3), (13, 11, 3), (20, 11, 3), (13, 7, 3), (13, 11, 2)]:
        x, y, b = data(rng, M, N, D)
        np.testing.assert_allclose(gauss(x, y, b), dense(x, y, b), rtol=1e-12, atol=1e-12)
    # bad shapes after binding: the usual errors, before anything runs
    x, y, b = data(rng)
    with pytest.raises(lm.ShapeError, match="K @ v: K has N = 11"):
        gauss(x, y, b[:5])
    with pytest.raises(lm.ShapeError, match="sqdist"):
        (-lm.Vi(x).sqdist(lm.Vj(y[:, :2])) / 2).exp() @ b
    with pytest.raises(lm.ShapeError, match="Vi variables with different M"):
        ((lm.Vi(x) - lm.Vi(x[:4])).sum() * lm.Vj(b)).sum(dim=1)


def test_dtype_change_takes_the_general_path(prepares):
    rng = np.random.default_rng(2)
    x, y, b = data(rng)
    for dtype in ["float64", "float64", "float64", "float32", "float32", "float64"]:
        xx, yy, bb = (a.astype(dtype) for a in (x, y, b))
        got = gauss(xx, yy, bb)
        assert got.dtype == np.dtype(dtype)
        np.testing.assert_allclose(got, dense(x, y, b), **tol(dtype))
    with pytest.raises(lm.DtypeError, match="dtype"):
        gauss(x, y, b.astype(np.float32))
    with pytest.raises(lm.DtypeError, match="integer"):
        gauss(x, y, b.astype(np.int64))


def test_non_contiguous_and_read_only_arrays(prepares):
    rng = np.random.default_rng(3)
    x, y, b = data(rng)
    for _ in range(3):
        gauss(x, y, b)
    wide = np.repeat(x, 2, axis=1)[:, ::2]  # strided, same values and shape
    fortran = np.asfortranarray(y)
    for _ in range(3):
        np.testing.assert_allclose(gauss(wide, fortran, b), dense(x, y, b), rtol=1e-12)
        np.testing.assert_allclose(gauss(x, y, b), dense(x, y, b), rtol=1e-12)
    frozen = [a.copy() for a in (x, y, b)]
    for a in frozen:
        a.setflags(write=False)
    for _ in range(3):
        np.testing.assert_allclose(gauss(*frozen), dense(x, y, b), rtol=1e-12)


def test_python_float_values_are_read_on_every_call(prepares):
    rng = np.random.default_rng(4)
    x, y, b = data(rng)
    for s in [0.5, 0.5, 0.25, 2.0, 1e-3, 0.5]:
        got = (-lm.Vi(x).sqdist(lm.Vj(y)) * s).exp() @ b
        np.testing.assert_allclose(got, dense(x, y, b, s), rtol=1e-12, atol=1e-12)
    assert prepares[0] == 2  # one kernel, one bound call, for every value
    # two floats of equal value stay two parameters
    for c in [0.5, 0.5, 0.75]:
        got = ((-lm.Vi(x).sqdist(lm.Vj(y)) * 0.5).exp() * c).sum(dim=1)
        np.testing.assert_allclose(got, c * dense(x, y, np.ones((11, 1))), rtol=1e-12)


def test_options_and_backends_are_part_of_the_call(prepares):
    rng = np.random.default_rng(5)
    x, y, b = data(rng, dtype="float32")
    want = dense(x, y, b)
    K = lambda: (-lm.Vi(x).sqdist(lm.Vj(y)) / 2).exp() * lm.Vj(b)  # noqa: E731
    for _ in range(3):
        np.testing.assert_allclose(K().sum(dim=1), want, rtol=2e-5)
    before = prepares[0]
    for _ in range(3):  # an option: the general path, every time
        np.testing.assert_allclose(K().sum(dim=1, dtype_acc="float32"), want, rtol=2e-5)
        np.testing.assert_allclose(K().sum(dim=1, sum_scheme="kahan_scheme"), want, rtol=2e-5)
    assert prepares[0] == before + 6
    for _ in range(3):  # another backend, reduction or axis: its own call
        np.testing.assert_allclose(K().sum(dim=1, backend="reference"), want, rtol=2e-5)
        np.testing.assert_allclose(K().sum(dim=0).ravel(),
                                   (np.exp(-sqdist(x, y) / 2) * b.T).sum(0), rtol=2e-5)
        np.testing.assert_array_equal(K().argmin(dim=1).ravel(),
                                      np.argmin(np.exp(-sqdist(x, y) / 2) * b.T, 1))
    with pytest.raises(TypeError, match="unexpected keyword"):
        K().sum(dim=1, bogus=1)
    with pytest.raises(lm.ShapeError, match="dim must be"):
        K().sum(dim=3)


def test_operand_reshaped_in_place_after_binding(prepares):
    rng = np.random.default_rng(6)
    x, y, b = data(rng, M=12)
    for _ in range(3):
        gauss(x, y, b)
    x.shape = (4, 9)
    with pytest.raises(lm.ShapeError):
        gauss(x, y, b)


def test_thread_count_change_rebinds(prepares, monkeypatch):
    rng = np.random.default_rng(7)
    x, y, b = data(rng, M=300, N=300, dtype="float64")  # above the one-thread size
    want = dense(x, y, b)
    for threads in ["1", "1", "1", "2", "2", "1"]:
        monkeypatch.setenv("LAZYMAT_NUM_THREADS", threads)
        np.testing.assert_allclose(gauss(x, y, b), want, rtol=1e-12)
    assert prepares[0] >= 4  # each change of the thread count left the bound call


def test_torch_tensors_keep_autograd(prepares):
    torch = pytest.importorskip("torch")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(13, 3, generator=g, dtype=torch.float64)
    y = torch.randn(11, 3, generator=g, dtype=torch.float64)
    b = torch.randn(11, 1, generator=g, dtype=torch.float64)
    for _ in range(3):
        xg = x.clone().requires_grad_(True)
        out = gauss(xg, y, b)
        out.sum().backward()
        xd = x.clone().requires_grad_(True)
        d = ((xd[:, None, :] - y[None, :, :]) ** 2).sum(-1)
        ref = torch.exp(-d / 2) @ b
        ref.sum().backward()
        torch.testing.assert_close(out, ref)
        torch.testing.assert_close(xg.grad, xd.grad)


def test_pykeops_layouts_and_leaves_the_formula_lost(prepares):
    rng = np.random.default_rng(8)
    for _ in range(4):
        x, y, b = data(rng)
        x_i, y_j = lm.LazyTensor(x[:, None, :]), lm.LazyTensor(y[None, :, :])
        got = (-((x_i - y_j) ** 2).sum(-1) / 2).exp() @ b
        np.testing.assert_allclose(got, dense(x, y, b), rtol=1e-12, atol=1e-12)
        # x * 0 leaves the formula, its M stays: the output has x's rows
        lost = (lm.Vi(x).sum() * 0 + lm.Vj(b)).sum(dim=1)
        np.testing.assert_allclose(lost, np.full((13, 1), b.sum()), rtol=1e-12)
        with pytest.raises(lm.ShapeError, match="different M"):
            (lm.Vi(x).sum() * 0 + lm.Vi(x[:5]).sum() * lm.Vj(b)).sum(dim=1)
