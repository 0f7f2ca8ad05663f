"""One NaN/inf rule on every backend (numpy's and torch's; README "NaN and inf").

Every reduction × where the NaN or inf is (first, middle, last column, both sides
of a tile boundary, across the reference backend's column blocks, a whole row,
±inf, NaN next to +inf, NaN in a weight) × both dtypes × both axes: the CPU
backend, the reference backend (with its usual blocks and with small ones) and
an oracle written with numpy/torch all agree, NaN positions and indices exactly.

The formula is F_ij = a_i + c_j: ``a`` (one value per output row) holds the
whole-row cases (a NaN row, a +inf row, a -inf row), ``c`` (one value per
reduced column) the placements. Component 1 of the vector formula is clean, so
each output also checks that a NaN elsewhere does not leak.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import TORCH, assert_close, requires_torch
from test_cuda_codegen import emulate, requires_emulation  # noqa: F401 (a fixture)

from lazymat.backends import reference
from lazymat.formula import Var, make
from lazymat.plan import Request, run
from lazymat.reductions import REDUCTIONS

NAN, INF = np.nan, np.inf
M, N = 21, 150  # two CPU row blocks; tiles of at most 64 columns

# The reduced columns that hold the special values, by case.
PLACEMENTS = {
    "first": {0: NAN},
    "middle": {75: NAN},
    "last": {N - 1: NAN},
    "tile_edge": {63: NAN, 64: NAN},  # the last column of a tile and the first of the next
    "after_tile": {64: NAN},  # a NaN only in the second tile (a first tile of numbers)
    "two_blocks": {20: NAN, 130: NAN},  # several reference column blocks apart
    "posinf": {10: INF, 90: INF},
    "neginf": {5: -INF, 140: -INF},
    "nan_and_inf": {30: INF, 100: NAN, 120: -INF},
    "clean": {},
    "nan_weight": {},  # a NaN in a weight column (weighted reductions)
}

CASES = [("Sum", None), ("Min", None), ("Max", None), ("ArgMin", None), ("ArgMax", None),
         ("Min_ArgMin", None), ("Max_ArgMax", None), ("KMin", 3), ("ArgKMin", 3),
         ("KMin_ArgKMin", 3), ("KMin_ArgKMin", 1), ("LogSumExp", None), ("LogSumExp-w", None),
         ("SumSoftMaxWeight", None)]


def test_cases_cover_every_reduction():
    assert {name.split("-")[0] for name, _ in CASES} == set(REDUCTIONS)


def make_data(placement: str, dtype: str, seed: int = 0):
    """(a (M, D), c (N, D), w (N, 2)): F = a_i + c_j, weights w_j (positive)."""
    rng = np.random.default_rng(seed)
    a = rng.integers(-3, 4, (M, 2)).astype(float)  # small integers: ties, exact in float32
    c = rng.integers(-3, 4, (N, 2)).astype(float)
    a[3, 0], a[8, 0], a[17, 0] = NAN, INF, -INF  # whole rows (component 0)
    for j, v in PLACEMENTS[placement].items():
        c[j, 0] = v
    w = rng.uniform(0.5, 2.0, (N, 2))
    if placement == "nan_weight":
        w[70, 0] = NAN
    return a.astype(dtype), c.astype(dtype), w.astype(dtype)


def request(name: str, K, axis: int):
    red = name.split("-")[0]
    scalar = REDUCTIONS[red].scalar_formula
    D = 1 if scalar else 2
    rows, cols = (0, 1) if axis == 1 else (1, 0)  # categories of a and c
    a, c = Var(0, 2, rows), Var(1, 2, cols)
    if scalar:
        a, c = make("Extract", (a,), (0, 1)), make("Extract", (c,), (0, 1))
    weight = Var(2, 2, cols) if (name == "LogSumExp-w" or red == "SumSoftMaxWeight") else None
    return Request(red, a + c, axis=axis, K=K, weight=weight), D


# --------------------------------------------------------------------------- the oracle

def oracle(name: str, K, F: np.ndarray, W: np.ndarray | None) -> tuple:
    """The rule, from numpy (sorts, min/max, argmin/argmax) and torch (logsumexp) when
    installed: F (M, N, D) and W (M, N, E) in float64, reduced over axis 1."""
    red = name.split("-")[0]
    if red == "Sum":
        return (F.sum(1),)
    if red in ("Min", "Max", "ArgMin", "ArgMax", "Min_ArgMin", "Max_ArgMax"):
        small = "Min" in red
        v, i = (F.min(1), F.argmin(1)) if small else (F.max(1), F.argmax(1))
        return {"Min": (v,), "Max": (v,), "ArgMin": (i,), "ArgMax": (i,),
                "Min_ArgMin": (v, i), "Max_ArgMax": (v, i)}[red]
    if K is not None:  # NaN sorted last, as numpy's sort (and torch.topk) do
        order = np.argsort(F, axis=1, kind="stable")[:, :K, :]
        v = np.take_along_axis(F, order, 1)
        if F.shape[-1] == 1:
            v, order = v[..., 0], order[..., 0]
        return {"KMin": (v,), "ArgKMin": (order,), "KMin_ArgKMin": (v, order)}[red]
    with np.errstate(all="ignore"):
        if red == "LogSumExp":
            G = F if W is None else F + np.log(W)  # log Σ exp(F) W, W > 0
            if TORCH is not None:
                return (TORCH.logsumexp(TORCH.from_numpy(G), 1).numpy(),)
            m = G.max(1, keepdims=True)
            safe = np.where(np.isfinite(m), m, 0)
            return ((safe + np.log(np.exp(G - safe).sum(1, keepdims=True)))[:, 0, :],)
        # SumSoftMaxWeight: NaN rows NaN; +inf rows the mean of W at their +inf entries;
        # rows of -inf (a mask hiding everything) 0; else softmax(F) · W.
        f = F[..., 0]
        out = np.empty((F.shape[0], W.shape[-1]))
        for r in range(F.shape[0]):
            if np.isnan(f[r]).any():
                out[r] = NAN
            elif np.isposinf(f[r]).any():
                out[r] = W[r][np.isposinf(f[r])].mean(0)
            elif np.isneginf(f[r]).all():
                out[r] = np.where(np.isnan(W[r]).any(0), NAN, 0.0)
            else:
                p = np.exp(f[r] - f[r].max())
                out[r] = (p[:, None] * W[r]).sum(0) / p.sum()
        return (out,)


def dense(name: str, arrays, axis: int):
    a, c, w = (np.asarray(x, dtype=np.float64) for x in arrays)
    if REDUCTIONS[name.split("-")[0]].scalar_formula:
        a, c = a[:, :1], c[:, :1]
    with np.errstate(all="ignore"):
        F = a[:, None, :] + c[None, :, :]  # (M, N, D): rows a, columns c, whatever the axis
    W = np.broadcast_to(w[None, :, :], (M, N, 2)) if ("-w" in name or "Soft" in name) else None
    return F, W


def check(got: tuple, want: tuple, dtype: str, label: str):
    assert len(got) == len(want), label
    for g, w in zip(got, want):
        g = np.asarray(g)
        assert g.shape == w.shape, f"{label}: shape {g.shape} != {w.shape}"
        if g.dtype == np.int64:
            np.testing.assert_array_equal(g, w, err_msg=f"{label}: indices")
            continue
        gw = g.astype(np.float64)
        np.testing.assert_array_equal(np.isnan(gw), np.isnan(w), err_msg=f"{label}: NaN")
        np.testing.assert_array_equal(np.isposinf(gw), np.isposinf(w), err_msg=f"{label}: +inf")
        np.testing.assert_array_equal(np.isneginf(gw), np.isneginf(w), err_msg=f"{label}: -inf")
        finite = np.isfinite(w)
        assert_close(gw[finite], w[finite], dtype, mag=np.abs(w[finite]).max(initial=1.0) + 1,
                     err_msg=label)


# --------------------------------------------------------------------------- the matrix

def _cases_for(placement: str):
    if placement == "nan_weight":
        return [c for c in CASES if c[0] in ("LogSumExp-w", "SumSoftMaxWeight")]
    return CASES


MATRIX = [(p, c) for p in PLACEMENTS for c in _cases_for(p)]


@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("placement,case", MATRIX,
                         ids=[f"{p}-{c[0]}{c[1] or ''}" for p, c in MATRIX])
def test_one_rule(placement, case, dtype, axis, monkeypatch):
    name, K = case
    arrays = make_data(placement, dtype, seed=len(placement))
    req, _ = request(name, K, axis)
    want = oracle(name, K, *dense(name, arrays, axis))
    label = f"{name} {placement} {dtype} axis={axis}"
    check(run(req, list(arrays), backend="cpu"), want, dtype, "cpu: " + label)
    check(run(req, list(arrays), backend="reference"), want, dtype, "reference: " + label)
    # Small reference blocks: NaN and inf in any column block, not only the first one.
    monkeypatch.setattr(reference, "MEMORY_BUDGET", 4096)
    monkeypatch.setattr(reference, "MAX_ROWS", 4)
    check(run(req, list(arrays), backend="reference"), want, dtype,
          "reference (small blocks): " + label)


@requires_emulation
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}{c[1] or ''}" for c in CASES])
def test_one_rule_on_cuda(case, dtype, emulate):  # noqa: F811
    """The CUDA kernel (run on the CPU by the emulation shim) follows it too: the same C
    pieces in the CUDA scaffold, every placement, over j and over i."""
    name, K = case
    for placement in PLACEMENTS:
        if (placement, case) not in MATRIX:
            continue
        arrays = make_data(placement, dtype, seed=len(placement))
        for axis in (0, 1):
            req, _ = request(name, K, axis)
            want = oracle(name, K, *dense(name, arrays, axis))
            check(run(req, list(arrays), backend="cpu"), want, dtype,
                  f"cuda: {name} {placement} {dtype} axis={axis}")


@requires_torch
@pytest.mark.parametrize("name,K", [("Min_ArgMin", None), ("KMin_ArgKMin", 3),
                                    ("LogSumExp", None), ("SumSoftMaxWeight", None)])
def test_one_rule_on_torch(name, K):
    """The reference backend on torch tensors follows it too (torch's own sort/argmin)."""
    arrays = make_data("nan_and_inf", "float64")
    req, _ = request(name, K, 1)
    want = oracle(name, K, *dense(name, arrays, 1))
    got = run(req, [TORCH.from_numpy(a) for a in arrays], backend="reference")
    check(tuple(g.numpy() for g in got), want, "float64", f"torch reference: {name}")


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_kmin_puts_nan_after_infinity(backend):
    """KMin's order: numbers, +inf, NaN (first index first), then empty slots."""
    x = np.zeros((1, 1))
    y = np.array([[NAN], [INF], [2.0], [NAN], [-INF]])
    f = Var(0, 1, 0) + Var(1, 1, 1)
    v, i = run(Request("KMin_ArgKMin", f, K=5), [x, y], backend=backend)
    np.testing.assert_array_equal(i[0], [4, 2, 1, 0, 3])
    np.testing.assert_array_equal(v[0], [-INF, 2.0, INF, NAN, NAN])


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_kmin_nan_before_empty_slots(backend):
    """With ranges a row may see fewer than K columns: a NaN it saw comes before the empty
    slots (+inf, -1), the +inf it saw too, across two column intervals."""
    import lazymat as lm

    x = np.zeros((2, 1))
    y = np.array([[5.0], [NAN], [0.0], [INF], [1.0], [7.0]])
    f = Var(0, 1, 0) + Var(1, 1, 1)
    keep = np.array([[False, True, False, True]])
    ranges = lm.from_matrix(np.array([[0, 2]]), np.array([[0, 1], [1, 2], [2, 3], [3, 6]]),
                            keep)
    v, i = run(Request("KMin_ArgKMin", f, K=6), [x, y], backend=backend, ranges=ranges)
    np.testing.assert_array_equal(i[0], [4, 5, 3, 1, -1, -1])
    np.testing.assert_array_equal(v[0], [1.0, 7.0, INF, NAN, INF, INF])
