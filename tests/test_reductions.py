"""Every reduction × both axes × float32/float64: compiled CPU vs reference vs dense numpy.

Formulas (variables: x = Vi(3), y = Vj(3), b = Vj(2), c = Vi(2)):
    FV = x * y - x        vector (dim 3): per-component reductions
    F1 = <x, y>           scalar: K-reductions with D = 1, LogSumExp, SumSoftMaxWeight
    G  = b * c            weight (dim 2) of LogSumExp / SumSoftMaxWeight

"int" data is integer-valued (exact in float32, lots of ties): index outputs are
compared exactly against numpy's first-index-on-ties answer. On "normal" data
index outputs are checked through the values they point at.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import pytest
from conftest import TORCH, as64, assert_close, check_index, check_type, requires_torch, to_lib

import lazymat as lm
from lazymat.formula import Var, apply
from lazymat.plan import Request, run
from lazymat.reductions import REDUCTIONS

X, Y, B, C = Var(0, 3, 0), Var(1, 3, 1), Var(2, 2, 1), Var(3, 2, 0)
FV = X * Y - X
F1 = apply("Scalprod", X, Y)
G = B * C


@dataclass(frozen=True)
class Case:
    red: str
    formula: object
    K: int | None = None
    weight: object = None
    positive_weight: bool = False

    @property
    def id(self) -> str:
        name = self.red + (f"K{self.K}" if self.K else "")
        if self.formula is F1 and self.red not in ("LogSumExp", "SumSoftMaxWeight"):
            name += "-D1"
        if self.weight is not None and self.red == "LogSumExp":
            name += "-w"
        return name


CASES = [
    Case("Sum", FV), Case("Min", FV), Case("Max", FV), Case("ArgMin", FV), Case("ArgMax", FV),
    Case("Min_ArgMin", FV), Case("Max_ArgMax", FV),
    Case("KMin", FV, K=1), Case("KMin", FV, K=4),
    Case("ArgKMin", FV, K=1), Case("ArgKMin", FV, K=4),
    Case("KMin_ArgKMin", FV, K=1), Case("KMin_ArgKMin", FV, K=4),
    Case("KMin_ArgKMin", F1, K=4), Case("ArgKMin", F1, K=4),
    Case("LogSumExp", F1), Case("LogSumExp", F1, weight=G, positive_weight=True),
    Case("SumSoftMaxWeight", F1, weight=G),
]
BY_ID = {c.id: c for c in CASES}


def test_cases_cover_every_reduction():
    assert {c.red for c in CASES} == set(REDUCTIONS)


# --------------------------------------------------------------------------- data and oracle

def make_data(M: int, N: int, dtype: str, kind: str, positive_weight: bool, seed: int = 0):
    rng = np.random.default_rng(seed)
    if kind == "int":
        x = rng.integers(-2, 3, (M, 3)).astype(float)
        y = rng.integers(-2, 3, (N, 3)).astype(float)
    else:
        x, y = rng.standard_normal((M, 3)), rng.standard_normal((N, 3))
        if M > 2:
            x[2] = x[0]  # repeated rows
        if N > 2:
            y[2] = y[0]
    if positive_weight:
        b, c = rng.uniform(0.5, 2, (N, 2)), rng.uniform(0.5, 2, (M, 2))
    else:
        b, c = rng.standard_normal((N, 2)), rng.standard_normal((M, 2))
    return [a.astype(dtype) for a in (x, y, b, c)]


def dense_fg(case: Case, arrays, axis: int, terms: bool = False):
    """F (L_out, L_red, D) and G (L_out, L_red, E) in float64, the reduced index second.

    With ``terms``: also the magnitude of the terms F is computed from (|x y| + |x| for
    FV), which bounds its rounding error (x y - x cancels when y ~ 1).
    """
    x, y, b, c = (as64(a) for a in arrays)
    if case.formula is FV:
        F = x[:, None, :] * y[None, :, :] - x[:, None, :]
        T = np.abs(x[:, None, :]) * (np.abs(y[None, :, :]) + 1)
    else:
        F = (x[:, None, :] * y[None, :, :]).sum(-1, keepdims=True)
        T = np.abs(x[:, None, :] * y[None, :, :]).sum(-1, keepdims=True)
    Gd = b[None, :, :] * c[:, None, :] if case.weight is not None else None
    if axis == 0:
        F, T = F.transpose(1, 0, 2), T.transpose(1, 0, 2)
        Gd = Gd.transpose(1, 0, 2) if Gd is not None else None
    return (F, Gd, T) if terms else (F, Gd)


def oracle(case: Case, F: np.ndarray, Gd: np.ndarray | None):
    """Dense outputs (values float64, indices int64) of the reduction over axis 1."""
    K = case.K
    red = case.red
    if red == "Sum":
        return (F.sum(1),)
    if red in ("Min", "Max", "ArgMin", "ArgMax", "Min_ArgMin", "Max_ArgMax"):
        v = F.min(1) if "Min" in red else F.max(1)
        i = F.argmin(1) if "Min" in red else F.argmax(1)
        return {"Min": (v,), "Max": (v,), "ArgMin": (i,), "ArgMax": (i,),
                "Min_ArgMin": (v, i), "Max_ArgMax": (v, i)}[red]
    if K is not None:
        order = np.argsort(F, axis=1, kind="stable")[:, :K, :]
        v = np.take_along_axis(F, order, 1)
        if F.shape[-1] == 1:
            v, order = v[..., 0], order[..., 0]
        return {"KMin": (v,), "ArgKMin": (order,), "KMin_ArgKMin": (v, order)}[red]
    m = F.max(1, keepdims=True)
    e = np.exp(F - m)
    if red == "LogSumExp":
        s = e.sum(1) if Gd is None else (e * Gd).sum(1)
        return (m[:, 0, :] + np.log(s),)
    return ((e * Gd).sum(1) / e.sum(1),)


def magnitude(case: Case, T: np.ndarray, Gd: np.ndarray | None):
    """What the absolute tolerance of each value output is scaled by (T: term sizes)."""
    if case.red == "Sum":
        return T.sum(1)
    if case.red == "SumSoftMaxWeight":
        return (np.abs(Gd).max() + 1.0) * (T.max() + 1.0)
    return T.max() + 1.0


def compute(case: Case, arrays, axis: int, backend: str, lib: str = "numpy", dtype="float64"):
    arrs = [to_lib(a, lib, dtype) for a in arrays]
    req = Request(case.red, case.formula, axis=axis, K=case.K, weight=case.weight)
    return run(req, arrs, backend=backend)


def kinds(case: Case) -> list[str]:
    return [k for k, _ in REDUCTIONS[case.red].outputs(case.formula.dim, case.K,
                                                          2 if case.weight is not None else None)]


def check_outputs(case: Case, got: tuple, arrays, axis: int, dtype: str, kind: str,
                  lib: str = "numpy", label: str = ""):
    F, Gd, T = dense_fg(case, arrays, axis, terms=True)
    want = oracle(case, F, Gd)
    assert len(got) == len(want)
    mag = magnitude(case, T, Gd)
    for k, g, w in zip(kinds(case), got, want):
        assert tuple(g.shape) == w.shape, f"{label}: shape {tuple(g.shape)} != {w.shape}"
        if k == "value":
            check_type(g, lib, dtype)
            assert_close(g, w, dtype, mag=mag, err_msg=label)
            continue
        check_index(g, lib)
        gi = np.asarray(g.numpy() if lib == "torch" else g)
        if kind == "int":
            np.testing.assert_array_equal(gi, w, err_msg=f"{label}: first index on ties")
        else:
            # Near-ties may legitimately differ in float32: check the values pointed at.
            L = F.shape[1]
            assert ((gi >= 0) & (gi < L)).all(), f"{label}: index out of range"
            idx = gi if gi.ndim == 3 else gi.reshape(gi.shape + (1,) * (3 - gi.ndim))
            if case.K is not None and F.shape[-1] == 1:
                idx = gi[..., None]
            if case.red in ("ArgKMin", "KMin_ArgKMin"):
                assert all(len(set(r)) == len(r) for r in np.moveaxis(idx, 1, -1).reshape(
                    -1, idx.shape[1])), f"{label}: repeated indices"
                picked = np.take_along_axis(F, idx, 1)
                ref = np.sort(F, 1)[:, :case.K, :]
            else:
                picked = np.take_along_axis(F, idx.reshape(idx.shape[0], 1, -1), 1)[:, 0, :]
                ref = F.min(1) if "Min" in case.red else F.max(1)
            assert_close(picked, ref, dtype, mag=T.max() + 1.0,
                         err_msg=f"{label}: value at the returned index")


# --------------------------------------------------------------------------- main grid

SIZES = [(1, 7), (7, 1000), (1000, 7)]


@pytest.mark.parametrize("kind", ["normal", "int"])
@pytest.mark.parametrize("size", SIZES, ids=[f"{m}x{n}" for m, n in SIZES])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_reduction(case, axis, dtype, size, kind):
    M, N = size
    arrays = make_data(M, N, dtype, kind, case.positive_weight, seed=M + 3 * N + axis)
    reduced = N if axis == 1 else M
    for backend in ("cpu", "reference"):
        if case.K is not None and case.K > reduced:
            with pytest.raises(lm.ShapeError, match="larger than"):
                compute(case, arrays, axis, backend, dtype=dtype)
            continue
        got = compute(case, arrays, axis, backend, dtype=dtype)
        check_outputs(case, got, arrays, axis, dtype, kind, label=f"{backend} {case.id}")


BIG_CASES = ["Sum", "ArgMin", "Max_ArgMax", "KMin_ArgKMinK4", "LogSumExp-w", "SumSoftMaxWeight"]
BIG_SIZES = [(4097, 33), (33, 4097)]


@pytest.mark.parametrize("size", BIG_SIZES, ids=[f"{m}x{n}" for m, n in BIG_SIZES])
@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("case_id", BIG_CASES)
def test_reduction_big(case_id, axis, size):
    case = BY_ID[case_id]
    M, N = size
    for kind, dtype in (("normal", "float32"), ("int", "float64")):
        arrays = make_data(M, N, dtype, kind, case.positive_weight, seed=11)
        for backend in ("cpu", "reference"):
            got = compute(case, arrays, axis, backend, dtype=dtype)
            check_outputs(case, got, arrays, axis, dtype, kind, label=f"{backend} {case.id}")


TORCH_CASES = ["Sum", "Min_ArgMin", "Max", "ArgMax", "KMin_ArgKMinK4", "KMin_ArgKMinK4-D1",
               "LogSumExp", "LogSumExp-w", "SumSoftMaxWeight"]


@requires_torch
@pytest.mark.parametrize("kind", ["normal", "int"])
@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("case_id", TORCH_CASES)
def test_reduction_torch(case_id, axis, kind):
    case = BY_ID[case_id]
    dtype = "float32"
    arrays = make_data(7, 1000, dtype, kind, case.positive_weight, seed=5)
    for backend in ("cpu", "reference"):
        got = compute(case, arrays, axis, backend, lib="torch", dtype=dtype)
        check_outputs(case, got, arrays, axis, dtype, kind, lib="torch",
                      label=f"torch {backend} {case.id}")


# --------------------------------------------------------------------------- ties, explicitly

@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("axis", [0, 1])
def test_first_index_on_ties_across_tiles(axis, dtype, backend):
    """The minimum -1 sits at 70, 130 and 900 (different tiles): ArgMin gives 70."""
    L = 1000
    v = np.zeros((L, 1))
    v[[900, 130, 70]] = -1.0
    v[[5, 600]] = 1.0  # the maximum 1 is at 5 and 600
    other = np.zeros((3, 1))
    red_var, out_var = (Var(1, 1, 1), Var(0, 1, 0)) if axis == 1 else (Var(0, 1, 0),
                                                                       Var(1, 1, 1))
    f = red_var + out_var
    arrays = [other.astype(dtype), v.astype(dtype)] if axis == 1 else [v.astype(dtype),
                                                                       other.astype(dtype)]

    def go(red, K=None):
        return run(Request(red, f, axis=axis, K=K), arrays, backend=backend)

    (i,) = go("ArgMin")
    np.testing.assert_array_equal(i, [[70]] * 3)
    (i,) = go("ArgMax")
    np.testing.assert_array_equal(i, [[5]] * 3)
    vals, idx = go("Min_ArgMin")
    np.testing.assert_array_equal(idx, [[70]] * 3)
    np.testing.assert_array_equal(vals, [[-1.0]] * 3)
    (i,) = go("ArgKMin", K=5)
    np.testing.assert_array_equal(i, [[70, 130, 900, 0, 1]] * 3)
    kv, ki = go("KMin_ArgKMin", K=4)
    np.testing.assert_array_equal(ki, [[70, 130, 900, 0]] * 3)
    np.testing.assert_array_equal(kv, [[-1, -1, -1, 0]] * 3)


@pytest.mark.parametrize("K", [65, 100])
@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_large_K(backend, K):
    """K above the CPU tile width (64) and K = N."""
    arrays = make_data(37, 100, "float64", "int", False, seed=2)
    case = Case("KMin_ArgKMin", F1, K=K)
    got = compute(case, arrays, 1, backend)
    check_outputs(case, got, arrays, 1, "float64", "int", label=f"{backend} K={K}")


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_all_equal_values(backend):
    """Every j ties: ArgMin 0, ArgKMin 0..K-1 for every component."""
    x = np.arange(6.0).reshape(2, 3)
    y = np.ones((50, 3))
    f = X - X + Y
    outs = run(Request("ArgKMin", f, axis=1, K=4), [x, y], backend=backend)
    np.testing.assert_array_equal(outs[0], np.broadcast_to(np.arange(4)[None, :, None],
                                                           (2, 4, 3)))
    (i,) = run(Request("ArgMin", f, axis=1), [x, y], backend=backend)
    np.testing.assert_array_equal(i, np.zeros((2, 3), np.int64))


@pytest.mark.parametrize("red", ["ArgMin", "ArgKMin", "ArgMax"])
def test_argmin_of_infinite_values(red):
    x = np.zeros((3, 1))
    y = np.full((5, 1), -np.inf if red == "ArgMax" else np.inf)
    f = Var(0, 1, 0) + Var(1, 1, 1)
    K = 2 if red == "ArgKMin" else None
    (cpu,) = run(Request(red, f, axis=1, K=K), [x, y], backend="cpu")
    (ref,) = run(Request(red, f, axis=1, K=K), [x, y], backend="reference")
    np.testing.assert_array_equal(ref, cpu)
    assert (cpu >= 0).all()


# --------------------------------------------------------------------------- LogSumExp specifics

@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_logsumexp_is_stable_for_large_values(dtype, backend):
    """F up to ±~1000: exp would overflow without the running max."""
    rng = np.random.default_rng(3)
    x, y = rng.standard_normal((9, 3)) * 10, rng.standard_normal((500, 3)) * 10
    x, y = x.astype(dtype), y.astype(dtype)
    F = as64(x) @ as64(y).T
    assert np.abs(F).max() > 500
    m = F.max(1, keepdims=True)
    want = m + np.log(np.exp(F - m).sum(1, keepdims=True))
    (got,) = run(Request("LogSumExp", F1, axis=1), [x, y], backend=backend)
    assert np.isfinite(got).all()
    assert_close(got, want, dtype, mag=np.abs(F).max())


@pytest.mark.parametrize("red", ["LogSumExp", "SumSoftMaxWeight"])
@pytest.mark.parametrize("backend", [
    "cpu", "reference"])
def test_logsumexp_of_minus_infinity(backend, red):
    """Rows whose F_ij are all -inf (log of 0: a mask) -> LogSumExp -inf, softmax 0."""
    s = np.array([[-1.0], [5.0], [-2.0]])  # row 1 has positive values
    t = np.array([[1.0], [2.0], [3.0], [0.5]])
    b = np.ones((4, 2))
    Si, Tj, Bj = Var(0, 1, 0), Var(1, 1, 1), Var(2, 2, 1)
    f = apply("Log", apply("ReLU", Si - Tj))  # log(max(s - t, 0)): -inf where s <= t
    w = Bj if red == "SumSoftMaxWeight" else None
    (got,) = run(Request(red, f, axis=1, weight=w), [s, t, b], backend=backend)
    if red == "LogSumExp":
        with np.errstate(divide="ignore"):
            want = np.log(np.maximum(s - t.T, 0).sum(1, keepdims=True))
        np.testing.assert_allclose(got, want, rtol=1e-12)
        assert np.isneginf(got[[0, 2]]).all()
    else:
        np.testing.assert_allclose(got, [[0, 0], [1, 1], [0, 0]], rtol=1e-12)


# --------------------------------------------------------------------------- empty inputs

IDENTITY = {"Sum": [0.0], "Min": [np.inf], "Max": [-np.inf], "ArgMin": [-1], "ArgMax": [-1],
            "Min_ArgMin": [np.inf, -1], "Max_ArgMax": [-np.inf, -1], "LogSumExp": [-np.inf],
            "SumSoftMaxWeight": [0.0]}


def _expected_shapes(case: Case, L: int):
    out = []
    for kind, shape in REDUCTIONS[case.red].outputs(case.formula.dim, case.K,
                                                     2 if case.weight is not None else None):
        if case.K is not None and shape[-1] == 1:
            shape = shape[:-1]
        out.append((kind, (L,) + shape))
    return out


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_nothing_to_reduce(case, axis, backend):
    """The reduced index has length 0: the identity (K-reductions: K > 0 rows is an error)."""
    L = 5
    M, N = (L, 0) if axis == 1 else (0, L)
    arrays = make_data(M, N, "float64", "normal", False)
    if case.K is not None:
        with pytest.raises(lm.ShapeError, match="larger than"):
            compute(case, arrays, axis, backend)
        return
    got = compute(case, arrays, axis, backend)
    for (kind, shape), g, fill in zip(_expected_shapes(case, L), got, IDENTITY[case.red]):
        assert g.shape == shape
        if kind == "index":
            check_index(g)
        else:
            check_type(g, "numpy", "float64")
        np.testing.assert_array_equal(g, np.full(shape, fill))


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_no_output_rows(case, axis, backend):
    """The output index has length 0: empty outputs of the right shape and dtype."""
    M, N = (0, 7) if axis == 1 else (7, 0)
    arrays = make_data(M, N, "float32", "normal", False)
    got = compute(case, arrays, axis, backend, dtype="float32")
    for (kind, shape), g in zip(_expected_shapes(case, 0), got):
        assert g.shape == shape
        if kind == "index":
            check_index(g)
        else:
            check_type(g, "numpy", "float32")


@requires_torch
def test_empty_torch():
    x = TORCH.zeros((4, 3), dtype=TORCH.float32)
    y = TORCH.zeros((0, 3), dtype=TORCH.float32)
    v, i = run(Request("Min_ArgMin", FV, axis=1), [x, y], backend="cpu")
    check_type(v, "torch", "float32")
    check_index(i, "torch")
    assert v.shape == (4, 3) and bool(TORCH.isposinf(v).all()) and bool((i == -1).all())
    (s,) = run(Request("Sum", FV, axis=0), [x, y], backend="cpu")
    assert s.shape == (0, 3) and s.dtype == TORCH.float32


# --------------------------------------------------------------------------- out=

@pytest.mark.parametrize("lib", ["numpy", pytest.param("torch", marks=requires_torch)])
@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_out_writes_into_preallocated(lib, backend):
    arrays = make_data(6, 40, "float64", "int", False)
    arrs = [to_lib(a, lib, "float64") for a in arrays]
    F, _ = dense_fg(Case("Sum", FV), arrays, 1)
    zeros = (lambda shape, dt: np.zeros(shape, dt)) if lib == "numpy" else (
        lambda shape, dt: TORCH.zeros(shape, dtype=getattr(TORCH, dt)))

    out = zeros((6, 3), "float64")
    res = run(Request("Sum", FV, axis=1), arrs, backend=backend, out=out)
    assert res[0] is out
    np.testing.assert_allclose(as64(out), F.sum(1), rtol=1e-12)

    out = zeros((40, 3), "float64")
    (res,) = run(Request("Max", FV, axis=0), arrs, backend=backend, out=out)
    assert res is out
    np.testing.assert_array_equal(as64(out), F.max(0))

    out = zeros((6, 3), "int64")
    (res,) = run(Request("ArgMin", FV, axis=1), arrs, backend=backend, out=out)
    assert res is out
    np.testing.assert_array_equal(as64(out), F.argmin(1))

    out = zeros((6, 2, 3), "float64")
    (res,) = run(Request("KMin", FV, axis=1, K=2), arrs, backend=backend, out=out)
    assert res is out
    np.testing.assert_array_equal(as64(out), np.sort(F, 1)[:, :2])

    # via the LazyTensor front end
    x, y = arrs[0], arrs[1]
    out = zeros((6, 3), "float64")
    res = (lm.Vi(x) * lm.Vj(y) - lm.Vi(x)).sum(dim=1, out=out, backend=backend)
    assert res is out
    np.testing.assert_allclose(as64(out), F.sum(1), rtol=1e-12)


def test_out_wrong_dtype():
    arrays = make_data(6, 40, "float64", "int", False)
    with pytest.raises(lm.DtypeError, match="float32"):
        run(Request("Sum", FV, axis=1), arrays, out=np.zeros((6, 3), np.float32))
    with pytest.raises(lm.ShapeError, match=r"\(6, 2\)"):
        run(Request("Sum", FV, axis=1), arrays, out=np.zeros((6, 2)))


# --------------------------------------------------------------------------- float32 accuracy

def test_float32_gaussian_sum_accuracy_1e6_terms():
    """Σ_j exp(-|x_i - y_j|²/2) over N = 1e6 in float32: relative error <= 1e-5."""
    rng = np.random.default_rng(0)
    M, N = 64, 10**6
    x = (rng.standard_normal((M, 3)) * 0.5).astype(np.float32)
    y = rng.standard_normal((N, 3)).astype(np.float32)
    t0 = time.perf_counter()
    got = (-lm.Vi(x).sqdist(lm.Vj(y)) / 2).exp().sum(dim=1, backend="cpu")
    elapsed = time.perf_counter() - t0
    assert got.dtype == np.float32 and got.shape == (M, 1)
    x64, y64 = x.astype(np.float64), y.astype(np.float64)
    want = np.zeros(M)
    yy = (y64 ** 2).sum(1)
    xx = (x64 ** 2).sum(1)
    for j0 in range(0, N, 125_000):
        sl = slice(j0, j0 + 125_000)
        d2 = xx[:, None] + yy[None, sl] - 2 * x64 @ y64[sl].T
        want += np.exp(-np.maximum(d2, 0) / 2).sum(1)
    rel = np.abs(got[:, 0] - want) / want
    assert rel.max() <= 1e-5, f"max relative error {rel.max():.2e}"
    assert elapsed < 30, elapsed


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_large_dimension_gaussian_sum(dtype):
    """D = 1000: the tile over D keeps working (no failure, no crawl) and stays accurate."""
    import lazymat as lm

    rng = np.random.default_rng(8)
    x = (rng.standard_normal((50, 1000)) / 30).astype(dtype)
    y = (rng.standard_normal((70, 1000)) / 30).astype(dtype)
    b = rng.random((70, 2)).astype(dtype)
    got = (-lm.Vi(x).sqdist(lm.Vj(y))).exp() @ b
    x64, y64 = x.astype(np.float64), y.astype(np.float64)
    want = np.exp(-((x64[:, None] - y64[None]) ** 2).sum(-1)) @ b.astype(np.float64)
    np.testing.assert_allclose(got, want, rtol=1e-5 if dtype == "float32" else 1e-12)


@pytest.mark.parametrize("dtype_acc", ["auto", "float32", "float64"])
@pytest.mark.parametrize("sum_scheme", ["auto", "block_sum", "direct_sum", "kahan_scheme"])
def test_accumulation_options(dtype_acc, sum_scheme):
    """KeOps' dtype_acc / sum_scheme choose the kernel's accumulation; all stay accurate on
    200,000 float32 terms, and a float32 direct sum is measurably the least accurate."""
    import lazymat as lm

    rng = np.random.default_rng(4)
    x = rng.standard_normal((8, 3)).astype(np.float32)
    y = rng.standard_normal((200_000, 3)).astype(np.float32)
    got = (-lm.Vi(x).sqdist(lm.Vj(y))).exp().sum(dim=1, dtype_acc=dtype_acc,
                                                  sum_scheme=sum_scheme)
    x64, y64 = x.astype(np.float64), y.astype(np.float64)
    want = np.exp(-((x64[:, None] - y64[None]) ** 2).sum(-1)).sum(1, keepdims=True)
    err = np.abs(got - want).max() / np.abs(want).max()
    assert err < (1e-3 if (dtype_acc, sum_scheme) == ("float32", "direct_sum") else 1e-5)
    g = lm.Genred("Exp(-SqDist(x,y))", ["x=Vi(3)", "y=Vj(3)"], axis=1, dtype_acc=dtype_acc,
                  sum_scheme=sum_scheme)
    np.testing.assert_allclose(g(x, y), got, rtol=1e-6)
    # the LogSumExp family sums the same way (with a running max)
    F = -((x64[:, None] - y64[None]) ** 2).sum(-1) / 4
    lse = (-lm.Vi(x).sqdist(lm.Vj(y)) / 4).logsumexp(dim=1, dtype_acc=dtype_acc,
                                                     sum_scheme=sum_scheme)
    m = F.max(1, keepdims=True)
    want_lse = m + np.log(np.exp(F - m).sum(1, keepdims=True))
    loose = (dtype_acc, sum_scheme) == ("float32", "direct_sum")
    assert np.abs(lse - want_lse).max() < (1e-3 if loose else 3e-6)
    soft = (-lm.Vi(x).sqdist(lm.Vj(y)) / 4).sumsoftmaxweight(
        lm.Vj(y), dim=1, dtype_acc=dtype_acc, sum_scheme=sum_scheme)
    p = np.exp(F - m)
    want_soft = (p @ y64) / p.sum(1, keepdims=True)
    assert np.abs(soft - want_soft).max() < (1e-3 if loose else 1e-5)


def test_accumulation_option_errors():
    import lazymat as lm

    x = np.zeros((3, 2))
    with pytest.raises(lm.DtypeError, match="float32"):
        lm.Vi(x).sqdist(lm.Vj(x)).sum(dim=1, dtype_acc="float32")
    with pytest.raises(lm.ShapeError, match="conflicts"):
        lm.Vi(x).sqdist(lm.Vj(x)).sum(dim=1, use_double_acc=True, dtype_acc="float32")
    with pytest.raises(lm.ShapeError, match="sum_scheme"):
        lm.Vi(x).sqdist(lm.Vj(x)).sum(dim=1, sum_scheme="bogus")


# --------------------------------------------------------------------------- column splits

@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_kmin_of_rows_that_see_fewer_than_K_columns(backend):
    """With ranges a row may see fewer than K columns: the empty slots are (+inf, -1)."""
    arrays = make_data(5, 30, "float64", "normal", False, seed=2)
    keep = np.array([[False, True, False]])
    ranges = lm.from_matrix(np.array([[0, 5]]), np.array([[0, 10], [10, 12], [12, 30]]), keep)
    v, i = run(Request("KMin_ArgKMin", FV, K=4), arrays, backend=backend, ranges=ranges)
    assert v.shape == i.shape == (5, 4, 3)
    assert np.isinf(v[:, 2:]).all() and (i[:, 2:] == -1).all()
    assert np.isin(i[:, :2], [10, 11]).all()
