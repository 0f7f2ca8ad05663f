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


# --------------------------------------------------------------- preconditioned, block-sparse
X2 = rng.random((700, 2))
B2 = rng.standard_normal((700, 2))
G2 = 300.0  # sigma about 0.04: K is local, many eigenvalues above alpha


def gauss2(x, g=G2):
    return np.exp(-g * ((x[:, None] - x[None]) ** 2).sum(-1))


@pytest.mark.parametrize("precond, truncate", [("schwarz", True), ("schwarz", False),
                                               (None, True), ({"block_size": 50,
                                                               "overlap": 0.4}, True)])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_fast_solve_matches_dense(precond, truncate, dtype):
    x, b = X2.astype(dtype), B2.astype(dtype)
    K = (-lm.Vi(x).sqdist(lm.Vj(x)) * G2).exp()
    eps = 1e-9 if dtype == "float64" else 1e-5
    info = {}
    a = K.solve(b, alpha=0.05, eps=eps, precond=precond, truncate=truncate, info=info)
    assert a.dtype == np.dtype(dtype) and a.shape == B2.shape
    dense = gauss2(X2)
    want = np.linalg.solve(dense + 0.05 * np.eye(len(X2)), B2)
    np.testing.assert_allclose(a, want, atol=(1e-7 if dtype == "float64" else 1e-3)
                               * np.abs(want).max())
    residual = 0.05 * a.astype(np.float64) + dense @ a.astype(np.float64) - B2
    assert (residual ** 2).sum() < residual.size * eps ** 2
    assert ("precond_blocks" in info) == (precond is not None)
    if truncate:
        assert 0 < info["kept"] < 0.8  # some blocks of K were skipped


def test_preconditioner_cuts_iterations():
    K = (-lm.Vi(X2).sqdist(lm.Vj(X2)) * G2).exp()
    plain, fast = {}, {}
    K.solve(B2, alpha=0.01, eps=1e-8, precond=None, truncate=False, info=plain)
    K.solve(B2, alpha=0.01, eps=1e-8, precond={"block_size": 64}, info=fast)
    assert fast["precond_blocks"] > 1
    assert fast["iterations"] * 2 < plain["iterations"], (fast, plain)


def test_schwarz_works_for_other_kernels():
    # A Cauchy kernel: not Gaussian, so no truncation, but the points are found for Schwarz.
    K = 1 / (1 + lm.Vi(X2).sqdist(lm.Vj(X2)) * 100)
    info = {}
    a = K.solve(B2, alpha=0.5, eps=1e-10, precond="schwarz", info=info)
    dense = 1 / (1 + 100 * ((X2[:, None] - X2[None]) ** 2).sum(-1))
    want = np.linalg.solve(dense + 0.5 * np.eye(len(X2)), B2)
    np.testing.assert_allclose(a, want, atol=1e-8 * np.abs(want).max())
    assert "kept" not in info
    with pytest.raises(lm.ShapeError, match="Gaussian"):
        K.solve(B2, alpha=0.5, truncate=True)


@pytest.mark.parametrize("make, gamma, weight", [
    (lambda x, y: (-lm.Vi(x).sqdist(lm.Vj(y)) * 7.5).exp(), 7.5, 1.0),
    (lambda x, y: (lm.Vi(x).sqdist(lm.Vj(y)) * -2.0).exp() * 3, 2.0, 3.0),
    (lambda x, y: 0.5 * (-lm.Vi(x).sqdist(lm.Vj(y)) / 0.25).exp(), 4.0, 0.5),
    (lambda x, y: (-((lm.Vi(x) - lm.Vj(y)) ** 2).sum() * lm.Pm(np.array([1.5]))).exp(),
     1.5, 1.0),
    (lambda x, y: (lm.Vi(x).sqdist(lm.Vj(y)) * 2.0).exp(), None, None),  # grows
    (lambda x, y: (-lm.Vi(x).sqdist(lm.Vj(y))).exp() * lm.Vi(x[:, :1]), None, None),
])
def test_gaussian_detection(make, gamma, weight):
    from lazymat.solve import gaussian_kernel

    x = X2[:50]
    K = make(x, x)
    f, arrays = K.bound()
    found = gaussian_kernel(f, arrays)
    if gamma is None:
        assert found is None
    else:
        assert found is not None and found[:2] == pytest.approx((gamma, weight))
    other = make(x, x.copy() + 1)  # different points as i and j: never a Gaussian of x
    f, arrays = other.bound()
    assert gaussian_kernel(f, arrays) is None


def test_kernelsolve_fast_path_matches_dense():
    for formula, aliases, axis in [
            ("Exp(-SqDist(x, y) * g) * a",
             ["x = Vi(2)", "y = Vj(2)", "a = Vj(2)", "g = Pm(1)"], 1),
            ("a * Exp(-g * SqDist(x, y))",
             ["x = Vj(2)", "y = Vi(2)", "a = Vi(2)", "g = Pm(1)"], 0)]:
        ks = lm.KernelSolve(formula, aliases, "a", axis=axis)
        info = {}
        a = ks(X2, X2, B2, np.array([G2]), alpha=0.05, eps=1e-10, precond="schwarz",
               truncate=True, info=info)
        want = np.linalg.solve(gauss2(X2) + 0.05 * np.eye(len(X2)), B2)
        np.testing.assert_allclose(a, want, atol=1e-8 * np.abs(want).max())
        assert info["kept"] < 0.8 and info["precond_blocks"] >= 1
    ks = lm.KernelSolve("Exp(-SqDist(x, y)) * a + a", ["x = Vi(2)", "y = Vj(2)", "a = Vj(1)"],
                        "a", axis=1)
    with pytest.raises(lm.ShapeError, match="precond and truncate"):
        ks(X2, X2, B2[:, :1], alpha=0.5, precond="schwarz")


def test_fast_solve_gradients_match_dense_torch():
    torch = pytest.importorskip("torch")
    x = torch.tensor(X2[:300], requires_grad=True)
    b = torch.tensor(B2[:300], requires_grad=True)
    g = torch.tensor([G2], dtype=torch.float64, requires_grad=True)

    def ours(x, b, g):
        K = (-lm.Vi(x).sqdist(lm.Vj(x)) * lm.Pm(g)).exp()
        return K.solve(b, alpha=0.05, eps=1e-12, precond={"block_size": 64}, truncate=True)

    def dense(x, b, g):
        K = torch.exp(-g * ((x[:, None] - x[None]) ** 2).sum(-1))
        return torch.linalg.solve(K + 0.05 * torch.eye(len(x), dtype=x.dtype), b)

    mine = torch.autograd.grad((ours(x, b, g) ** 3).sum(), [x, b, g])
    want = torch.autograd.grad((dense(x, b, g) ** 3).sum(), [x, b, g])
    for m, w in zip(mine, want):
        np.testing.assert_allclose(m.numpy(), w.numpy(), rtol=1e-6, atol=1e-8 * w.abs().max())
    xs, bs = x[:60].detach().requires_grad_(), b[:60, :1].detach().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda x, b: (-lm.Vi(x).sqdist(lm.Vj(x)) * 50).exp().solve(
            b, alpha=0.1, eps=1e-13, precond={"block_size": 16}, truncate=True), (xs, bs))


def test_fast_solve_torch_float32():
    torch = pytest.importorskip("torch")
    x, b = torch.tensor(X2, dtype=torch.float32), torch.tensor(B2, dtype=torch.float32)
    a = (-lm.Vi(x).sqdist(lm.Vj(x)) * G2).exp().solve(b, alpha=0.05, eps=1e-5,
                                                        precond="schwarz", truncate=True)
    assert a.dtype == torch.float32
    want = np.linalg.solve(gauss2(X2) + 0.05 * np.eye(len(X2)), B2)
    np.testing.assert_allclose(a.numpy(), want, atol=1e-3 * np.abs(want).max())


def test_fast_solve_warns_and_reports_progress(monkeypatch, capsys):
    K = (-lm.Vi(X2).sqdist(lm.Vj(X2)) * G2).exp()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        K.solve(B2, alpha=1e-6, max_iter=2, precond="schwarz", truncate=True)
    assert any(issubclass(w.category, lm.ConvergenceWarning) for w in caught)
    monkeypatch.setenv("LAZYMAT_VERBOSE", "1")
    K.solve(B2, alpha=0.01, eps=1e-8, precond={"block_size": 64}, truncate=True)
    err = capsys.readouterr().err
    assert "iteration 10" in err and "exact K" in err


def test_fast_solve_errors():
    K = (-lm.Vi(X2).sqdist(lm.Vj(X2)) * G2).exp()
    with pytest.raises(lm.ShapeError, match="precond must be"):
        K.solve(B2, alpha=0.1, precond="jacobi")
    with pytest.raises(lm.ShapeError, match="unknown Schwarz option"):
        K.solve(B2, alpha=0.1, precond={"blocksize": 10})
    with pytest.raises(lm.ShapeError, match="truncate must be"):
        K.solve(B2, alpha=0.1, truncate="yes")
    with pytest.raises(lm.ShapeError, match="alpha > 0"):
        K.solve(B2, alpha=0.0, precond="schwarz")
    two = (-lm.Vi(X2).sqdist(lm.Vj(X2 + 1))).exp()  # different points: no geometry to use
    with pytest.raises(lm.ShapeError, match="points"):
        two.solve(B2, alpha=0.1, precond="schwarz")
    ranged = (-lm.Vi(X2).sqdist(lm.Vj(X2))).exp()
    labels = lm.grid_cluster(X2, 0.5)
    ranges, _, _ = lm.cluster_ranges_centroids(X2, labels)
    ranged.ranges = lm.from_matrix(ranges, ranges, np.ones((len(ranges),) * 2, bool))
    with pytest.raises(lm.ShapeError, match="without ranges"):
        ranged.solve(B2, alpha=0.1, truncate=True)


def test_float32_precision_floor_warns_quickly():
    x, b = X2.astype("float32"), B2.astype("float32")
    K = (-lm.Vi(x).sqdist(lm.Vj(x)) * G2).exp()
    info = {}
    with pytest.warns(lm.ConvergenceWarning, match="Float32"):
        a = K.solve(b, alpha=0.05, eps=1e-11, info=info, precond="schwarz")
    assert info["rounds"] <= 3 and a.dtype == np.float32  # stops at the floor, keeps the best


def test_schwarz_memory_cap(monkeypatch):
    import lazymat.preconditioners as pre
    import lazymat.solve as solve_module

    monkeypatch.setattr(pre, "MAX_BYTES", 10_000)
    monkeypatch.setattr(solve_module, "AUTO_MIN_ROWS", 100)
    K = (-lm.Vi(X2).sqdist(lm.Vj(X2)) * G2).exp()
    with pytest.raises(lm.ShapeError, match="GB of block factors"):
        K.solve(B2, alpha=0.05, precond="schwarz")
    info = {}  # "auto" goes on without it (still block-sparse)
    a = K.solve(B2, alpha=0.05, eps=1e-9, info=info)
    assert "precond_blocks" not in info and info["kept"] < 1
    want = np.linalg.solve(gauss2(X2) + 0.05 * np.eye(len(X2)), B2)
    np.testing.assert_allclose(a, want, atol=1e-7 * np.abs(want).max())


def test_schwarz_keeps_float32_inverses():
    """float64 data, float32 block inverses (half the memory), the same tight solution."""
    K = (-lm.Vi(X2).sqdist(lm.Vj(X2)) * G2).exp()
    info: dict = {}
    a = K.solve(B2, alpha=0.05, eps=1e-11, precond={"block_size": 64}, info=info)
    sizes_mb = info["precond_mbytes"]
    assert a.dtype == np.float64
    want = np.linalg.solve(gauss2(X2) + 0.05 * np.eye(len(X2)), B2)
    np.testing.assert_allclose(a, want, atol=1e-9 * np.abs(want).max())
    # 4 bytes per entry of each (<= precond_max_block)² block
    assert sizes_mb <= info["precond_blocks"] * info["precond_max_block"] ** 2 * 4 / 1e6


# ------------------------------------------- refinements on a loose K, packed Schwarz factors
X3 = np.random.default_rng(5).random((1500, 3))
B3 = np.random.default_rng(6).standard_normal((1500, 2))
G3 = 1 / (2 * 0.06 ** 2)  # about 40 neighbours within 3 sigma: the loose K keeps fewer pairs


def gauss3(x, g=G3):
    return np.exp(-g * ((x[:, None] - x[None]) ** 2).sum(-1))


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_loose_refinements_match_dense(dtype, monkeypatch):
    """CG on the loose block-sparse K between refinements: the exact-K criterion still holds
    and the solution is the dense one; the loose K keeps fewer pairs than the tight one."""
    import lazymat.solve as solve_module

    monkeypatch.setattr(solve_module, "LOOSE_MIN_ROWS", 1000)
    x, b = X3.astype(dtype), B3.astype(dtype)
    K = (-lm.Vi(x).sqdist(lm.Vj(x)) * G3).exp()
    eps = 1e-9 if dtype == "float64" else 1e-5
    info: dict = {}
    with warnings.catch_warnings():
        warnings.simplefilter("error", lm.ConvergenceWarning)  # converges: SPD for CG
        a = K.solve(b, alpha=0.1, eps=eps, precond={"block_size": 128}, truncate=True,
                    info=info)
    dense = gauss3(X3)
    want = np.linalg.solve(dense + 0.1 * np.eye(len(X3)), B3)
    np.testing.assert_allclose(a, want, atol=(1e-7 if dtype == "float64" else 1e-3)
                               * np.abs(want).max())
    residual = 0.1 * a.astype(np.float64) + dense @ a.astype(np.float64) - B3
    assert (residual ** 2).sum() < residual.size * eps ** 2
    assert info["options"]["loose_truncation"] == lm.solve.LOOSE_TRUNCATION
    assert info["kept_loose"] < info["kept"] and info["refinements"] >= 2
    assert info["residual"] < info["target"]


def test_loose_refinements_off_and_bad_setting(monkeypatch):
    import lazymat.solve as solve_module

    K = (-lm.Vi(X3).sqdist(lm.Vj(X3)) * G3).exp()
    monkeypatch.setattr(solve_module, "LOOSE_MIN_ROWS", 1000)
    info: dict = {}
    K.solve(B3[:, :1], alpha=0.1, eps=1e-9, truncate=True, info=info)
    assert info["refinements"] > 0
    monkeypatch.setattr(solve_module, "LOOSE_MIN_ROWS", 2000)  # too few points: off
    info = {}
    K.solve(B3[:, :1], alpha=0.1, eps=1e-9, truncate=True, info=info)
    assert info["refinements"] == 0 and info["options"]["loose_truncation"] is None
    monkeypatch.setattr(solve_module, "LOOSE_MIN_ROWS", 1000)
    monkeypatch.setattr(solve_module, "LOOSE_TRUNCATION", None)
    info: dict = {}
    a = K.solve(B3, alpha=0.1, eps=1e-9, precond={"block_size": 128}, truncate=True,
                info=info)
    assert info["refinements"] == 0 and info["options"]["loose_truncation"] is None
    want = np.linalg.solve(gauss3(X3) + 0.1 * np.eye(len(X3)), B3)
    np.testing.assert_allclose(a, want, atol=1e-7 * np.abs(want).max())
    monkeypatch.setattr(solve_module, "LOOSE_TRUNCATION", 1.5)
    with pytest.raises(ValueError, match="LOOSE_TRUNCATION must be"):
        K.solve(B3, alpha=0.1, truncate=True)
    monkeypatch.setattr(solve_module, "LOOSE_TRUNCATION", 0.05)
    with pytest.raises(lm.ShapeError, match="block_size must be an integer"):
        K.solve(B3, alpha=0.1, precond={"block_size": 0})
    with pytest.raises(lm.ShapeError, match="block_size must be an integer"):
        K.solve(B3, alpha=0.1, precond={"block_size": 12.5})


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_packed_schwarz_is_the_dense_block_sum(dtype):
    """The packed Cholesky blocks apply Σ_k R_kᵀ (α·Id + K_kk)⁻¹ R_k exactly (to the factor's
    precision), symmetrically, in half a square of memory per block."""
    pytest.importorskip("scipy")
    from lazymat.preconditioners import SchwarzPreconditioner, kd_order

    perm, leaves = kd_order(X3, 200)
    x = X3[perm]
    dense = gauss3(x)
    P = SchwarzPreconditioner(lambda i: dense[np.ix_(i, i)], x, leaves, 0.1,
                              like=x.astype(dtype))
    assert all(f.ndim == 1 and f.dtype == np.dtype(dtype) for _, f in P.blocks)
    assert P.nbytes == sum(m * (m + 1) // 2 for m in P.sizes) * np.dtype(dtype).itemsize
    r = B3.astype(np.float64)
    want = np.zeros_like(r)
    for idx, _ in P.blocks:
        want[idx] += np.linalg.solve(dense[np.ix_(idx, idx)] + 0.1 * np.eye(len(idx)), r[idx])
    got = P(r)
    tol = 1e-10 if dtype == "float64" else 1e-3
    np.testing.assert_allclose(got, want, atol=tol * np.abs(want).max())
    u, v = B3[:, :1], B3[:, 1:]
    assert abs(_dot(u, P(v)) - _dot(P(u), v)) < 10 * tol * abs(_dot(u, P(v)))
    assert _dot(u, P(u)) > 0 and _dot(v, P(v)) > 0


def _dot(a, b):
    return float((a * b).sum())


def test_iterations_flat_with_blocks_sized_to_the_kernel():
    """Blocks of a fixed physical size (points per block ∝ N): the iterations do not grow
    from N to 2N; the preconditioned spectrum depends on how much of each point's kernel
    neighbourhood its blocks hold, not on N."""
    its = []
    for n in (1000, 2000):
        x = np.random.default_rng(n).random((n, 3))
        b = np.random.default_rng(1).standard_normal((n, 1))
        K = (-lm.Vi(x).sqdist(lm.Vj(x)) * G3).exp()
        info: dict = {}
        K.solve(b, alpha=0.1, eps=1e-6, precond={"block_size": n // 8, "overlap": 0.25},
                truncate=False, info=info)
        its.append(info["iterations"])
    assert its[1] <= its[0] + 1, its


def test_info_records_the_schwarz_options_and_auto_thins_the_overlap(monkeypatch):
    import lazymat.preconditioners as pre
    import lazymat.solve as solve_module

    monkeypatch.setattr(solve_module, "AUTO_MIN_ROWS", 100)
    K = (-lm.Vi(X3).sqdist(lm.Vj(X3)) * G3).exp()
    info: dict = {}
    K.solve(B3, alpha=0.1, info=info)
    assert info["options"]["schwarz"] == {"block_size": 256, "overlap": 0.25}
    need = info["precond_mbytes"] * 1e6
    monkeypatch.setattr(pre, "MAX_BYTES", 0.9 * need)  # 0.25 does not fit, 0.1 does
    info = {}
    a = K.solve(B3, alpha=0.1, eps=1e-9, info=info)
    assert info["options"]["schwarz"] == {"block_size": 256, "overlap": 0.1}
    assert info["precond_mbytes"] * 1e6 < 0.9 * need
    want = np.linalg.solve(gauss3(X3) + 0.1 * np.eye(len(X3)), B3)
    np.testing.assert_allclose(a, want, atol=1e-7 * np.abs(want).max())
    info = {}  # the same options given back reproduce the solve
    K.solve(B3, alpha=0.1, eps=1e-9, precond=dict(block_size=256, overlap=0.1), info=info)
    assert info["options"]["schwarz"] == {"block_size": 256, "overlap": 0.1}
