"""Raw partial states: every reduction's state over column parts merges to the whole.

For every reduction × both axes × float32/float64 (× with/without a weight where
it applies) × the cpu and reference backends: the reduced index is cut into
1, 2, 3 and 7 uneven parts (a part of one column, an empty part, parts smaller
than K, boundaries inside and at the edge of a 64-column tile); each part's raw
state comes from ``plan.run(..., store="state")`` (block-sparse ranges keep
only that part's columns, so indices are already global); the states are merged
left to right with the reduction's ``merge`` and finalized. The result equals
the unsplit run bit for bit for Min/Max/Arg*/KMin (integer data: many ties, the
first index wins) and to rounding for the sums.
"""

from __future__ import annotations

import numpy as np
import pytest

import lazymat as lm
from lazymat.arraylib import NUMPY
from lazymat.formula import Var, apply
from lazymat.plan import Request, run
from lazymat.reductions import REDUCTIONS

X, Y, B, C = Var(0, 3, 0), Var(1, 3, 1), Var(2, 2, 1), Var(3, 2, 0)
FV = X * Y - X  # vector (dim 3)
F1 = apply("Scalprod", X, Y)  # scalar
G = B * C  # weight (dim 2)

M, N = 9, 150
EDGES = {1: [0, N], 2: [0, 61, N], 3: [0, 1, 70, N],
         7: [0, 5, 5, 64, 65, 100, 149, N]}  # uneven: one empty, one-column parts

CASES = [("Sum", FV, None, None), ("Min", FV, None, None), ("Max", FV, None, None),
         ("ArgMin", FV, None, None), ("ArgMax", FV, None, None),
         ("Min_ArgMin", FV, None, None), ("Max_ArgMax", FV, None, None),
         ("KMin", FV, 4, None), ("ArgKMin", FV, 4, None), ("KMin_ArgKMin", FV, 4, None),
         ("KMin_ArgKMin", F1, 4, None), ("LogSumExp", F1, None, None),
         ("LogSumExp", F1, None, G), ("SumSoftMaxWeight", F1, None, G)]
IDS = [f"{r}{'K' + str(k) if k else ''}{'-D1' if f is F1 and k else ''}{'-w' if w else ''}"
       for r, f, k, w in CASES]
EXACT = {"Min", "Max", "ArgMin", "ArgMax", "Min_ArgMin", "Max_ArgMax", "KMin", "ArgKMin",
         "KMin_ArgKMin"}


def test_cases_cover_every_reduction():
    assert {c[0] for c in CASES} == set(REDUCTIONS)


def make_data(axis: int, dtype: str, seed: int = 0):
    """x (rows, 3), y (columns, 3), b (columns, 2), c (rows, 2): integer-valued x and y
    (exact products, lots of ties), positive weights; axis 0 swaps the two lengths."""
    rng = np.random.default_rng(seed)
    rows, cols = (M, N) if axis == 1 else (N, M)
    x = rng.integers(-2, 3, (rows, 3)).astype(float)
    y = rng.integers(-2, 3, (cols, 3)).astype(float)
    b, c = rng.uniform(0.5, 2, (cols, 2)), rng.uniform(0.5, 2, (rows, 2))
    return [a.astype(dtype) for a in (x, y, b, c)]


def part_ranges(axis: int, lo: int, hi: int):
    """Ranges keeping only the reduced indices [lo, hi) (for every output row)."""
    parts = np.array([[0, lo], [lo, hi], [hi, N]])
    whole = np.array([[0, M]])
    if axis == 1:
        return lm.from_matrix(whole, parts, np.array([[False, True, False]]))
    return lm.from_matrix(parts, whole, np.array([[False], [True], [False]]))


def merged(red, states, K):
    state = states[0]
    for s in states[1:]:
        state = red.merge(NUMPY, state, s, K=K)
    return red.finalize(NUMPY, state)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_split_states_merge_to_the_whole(case, axis, dtype, backend):
    name, formula, K, weight = case
    red = REDUCTIONS[name]
    arrays = make_data(axis, dtype, seed=axis + 7 * len(name))
    req = Request(name, formula, axis=axis, K=K, weight=weight)
    want = run(req, arrays, backend=backend)
    wdim = weight.dim if weight is not None else None
    layout = red.state(formula.dim, K, wdim)
    for count, edges in EDGES.items():
        states = []
        for lo, hi in zip(edges[:-1], edges[1:]):
            state = run(req, arrays, backend=backend, ranges=part_ranges(axis, lo, hi),
                        store="state")
            assert len(state) == len(layout)
            for a, (kind, shape) in zip(state, layout):
                assert tuple(a.shape) == (M,) + shape, (kind, a.shape, shape)
                if kind == "index":
                    assert a.dtype == np.int64
                elif kind == "value" or backend == "cpu":
                    assert a.dtype == (np.float64 if kind == "acc" else np.dtype(dtype)), kind
            if lo == hi:  # a part without columns holds the state of a row that saw none
                for a, fill in zip(state, red.state_fill):
                    np.testing.assert_array_equal(a, np.full(a.shape, fill))
            states.append(tuple(state))
        got = merged(red, states, K)
        label = f"{name} axis={axis} {dtype} {backend}: {count} parts"
        assert len(got) == len(want), label
        for g, w in zip(got, want):
            g = np.asarray(g).reshape(w.shape)
            if name in EXACT:
                np.testing.assert_array_equal(g, w, err_msg=label)
            else:
                rtol = 2e-6 if dtype == "float32" else 1e-13
                np.testing.assert_allclose(g.astype(np.float64), w, rtol=rtol,
                                           atol=rtol * np.abs(w).max(), err_msg=label)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_the_empty_state_finalizes_to_the_identity(case):
    name, formula, K, weight = case
    red = REDUCTIONS[name]
    wdim = weight.dim if weight is not None else None
    state = tuple(np.full((2,) + shape, fill, dtype=np.int64 if kind == "index" else None)
                  for (kind, shape), fill in zip(red.state(formula.dim, K, wdim),
                                                 red.state_fill))
    for out, fill in zip(red.finalize(NUMPY, state), red.identity):
        np.testing.assert_array_equal(out, np.full(out.shape, fill))


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("name", ["Min_ArgMin", "KMin_ArgKMin", "LogSumExp",
                                  "SumSoftMaxWeight"])
def test_states_of_parts_with_nan_merge_to_the_whole(name, backend):
    """The NaN rule survives a split: the first NaN's index, NaN sorted after +inf, NaN rows
    of the LogSumExp family (a part with a NaN, another with +inf)."""
    red = REDUCTIONS[name]
    K = 3 if red.needs_k else None
    a = np.array([[0.0], [1.0], [np.inf], [-np.inf]])
    c = np.array([[2.0], [np.nan], [np.inf], [0.0], [np.nan], [-1.0], [np.inf], [np.nan]])
    w = np.linspace(0.5, 2.0, 16).reshape(8, 2)
    f = Var(0, 1, 0) + Var(1, 1, 1)
    req = Request(name, f, K=K, weight=Var(2, 2, 1) if name == "SumSoftMaxWeight" else None)
    want = run(req, [a, c, w], backend=backend)
    for edges in ([0, 1, 3, 8], [0, 4, 5, 8], [0, 2, 2, 6, 8]):
        states = []
        for lo, hi in zip(edges[:-1], edges[1:]):
            rng = lm.from_matrix(np.array([[0, 4]]), np.array([[0, lo], [lo, hi], [hi, 8]]),
                                 np.array([[False, True, False]]))
            states.append(tuple(run(req, [a, c, w], backend=backend, ranges=rng,
                                    store="state")))
        for g, wv in zip(merged(red, states, K), want):
            np.testing.assert_array_equal(np.asarray(g).reshape(wv.shape), wv,
                                          err_msg=f"{name} {edges}")


@pytest.mark.parametrize("case", [c for c in CASES if c[0] in ("Sum", "LogSumExp",
                                                               "SumSoftMaxWeight", "Min_ArgMin")],
                         ids=lambda c: c[0] + ("-w" if c[3] is not None else ""))
def test_cpu_column_split_keeps_the_data_dtype(case, monkeypatch):
    """A CPU column split merges states in the accumulator's type (double sums): its
    outputs come back in the data's dtype, as the unsplit run's do."""
    from lazymat.backends import cpu, launch

    name, formula, K, weight = case
    arrays = make_data(1, "float32")
    req = Request(name, formula, K=K, weight=weight)
    whole = run(req, arrays, backend="cpu")
    monkeypatch.setenv("LAZYMAT_NUM_THREADS", "3")
    monkeypatch.setattr(cpu, "SPLIT_MIN_COLUMNS", 40)
    monkeypatch.setattr(launch, "SMALL_PAIRS", 1)
    split = run(req, arrays, backend="cpu")
    for s, w in zip(split, whole):
        assert s.dtype == w.dtype, name
        np.testing.assert_allclose(s, w, rtol=2e-6, atol=2e-6 * np.abs(w).max())
