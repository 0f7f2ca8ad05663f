"""The contract between plan and the backends: one Launch, the REGISTRY, raw states, column
splits merged with ``launch.combine``, and the settings and memos of ``config``."""

from __future__ import annotations

import numpy as np
import pytest

import lazymat as lm
from lazymat import config, plan
from lazymat.arraylib import NUMPY
from lazymat.backends import base, cpu, launch
from lazymat.compile import compiler_info
from lazymat.formula import Var
from lazymat.plan import Request, run
from lazymat.reductions import REDUCTIONS

HAVE_CXX = compiler_info() is not None
needs_cxx = pytest.mark.skipif(not HAVE_CXX, reason="no C++ compiler")

X, Y, B = Var(0, 3, 0), Var(1, 3, 1), Var(2, 2, 1)


def _case(name: str):
    """(formula, weight, K) of a reduction on x (i, dim 3), y (j, dim 3), b (j, dim 2)."""
    from lazymat.formula import SqDist, make

    d = SqDist(X, Y)
    if name in ("LogSumExp", "SumSoftMaxWeight"):
        return -d, B, None
    if name.startswith(("KMin", "ArgKMin")):
        return make("Concat", (d, make("Extract", (X - Y,), (0, 1)))), None, 3
    return make("Concat", (d, make("Extract", (X - Y,), (1, 1)))), None, None


def _data(M: int, N: int, dtype: str, seed: int = 0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((M, 3)).astype(dtype), rng.standard_normal((N, 3)).astype(dtype),
            (rng.random((N, 2)) + 0.1).astype(dtype)]


def _close(got, want, dtype, what):
    assert len(got) == len(want), what
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and g.shape == w.shape, what
        if g.dtype.kind == "i":
            np.testing.assert_array_equal(g, w, err_msg=what)
        else:
            tol = 1e-4 if dtype == "float32" else 1e-10
            np.testing.assert_allclose(g, w, rtol=tol, atol=tol, err_msg=what)


# --------------------------------------------------------------------------- the registry

class _Recorder:
    """A backend that records its Launch and answers with the reference backend."""

    name = "recorder"

    def __init__(self) -> None:
        self.launches: list[base.Launch] = []

    def unavailable_reason(self):
        return None

    def run(self, launch_: base.Launch) -> tuple:
        self.launches.append(launch_)
        return base.REGISTRY["reference"].run(launch_)


def test_a_new_backend_is_one_registry_entry(monkeypatch):
    recorder = _Recorder()
    monkeypatch.setitem(base.REGISTRY, "recorder", recorder)
    x, y, b = _data(4, 6, "float64")
    f, w, K = _case("LogSumExp")
    got = run(Request("LogSumExp", f, weight=w, axis=0), [x, y, b], backend="recorder")
    want = run(Request("LogSumExp", f, weight=w, axis=0), [x, y, b], backend="reference")
    np.testing.assert_allclose(got[0], want[0])
    (seen,) = recorder.launches
    # Oriented once: axis=0 reduces over i, so the launch's rows are y's and i <-> j swapped.
    assert (seen.M, seen.N) == (6, 4) and seen.store == "output"
    cats = {v.params[0]: v.params[2] for r in seen.roots for v in lm.formula.variables(r)}
    assert cats == {0: 1, 1: 0, 2: 0}
    assert seen.roots == [seen.formula, seen.weight]
    assert seen.key == seen.key and seen.spec.store == "output"


def test_unknown_backend_names_the_registered_ones():
    x, y, _ = _data(2, 3, "float64")
    with pytest.raises(lm.ShapeError, match="auto, reference, cpu, cuda"):
        run(Request("Sum", X - Y), [x, y], backend="tpu")


def test_the_autograd_path_checks_a_call_once(monkeypatch):
    torch = pytest.importorskip("torch")
    calls = []
    real = plan.prepare
    monkeypatch.setattr(plan, "prepare", lambda *a, **k: calls.append(1) or real(*a, **k))
    x = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    y = torch.randn(7, 3, dtype=torch.float64)
    out = lm.Vi(x).sqdist(lm.Vj(y)).sum(dim=1, backend="reference")
    assert len(calls) == 1
    out.sum().backward()
    want = 2 * (x.detach()[:, None, :] - y[None]).sum(1)
    assert torch.allclose(x.grad, want)


# --------------------------------------------------------------------------- raw states

@pytest.mark.parametrize("name", sorted(REDUCTIONS))
@pytest.mark.parametrize("axis", [0, 1])
def test_states_of_column_slices_combine_to_the_whole(name, axis):
    """Each part sees only its slice of the reduced variables (its indices count from 0, as
    a Dask task's do): ``combine`` makes them global with ``column_starts``, merges, and
    ``finalize`` gives the unsplit result, bit for bit for the selections."""
    red = REDUCTIONS[name]
    f, w, K = _case(name)
    M, N = 5, 23
    x, y, b = _data(M, N, "float64", seed=3)
    if axis == 0:  # reduce over i: the sliced variable is x
        x, y, b = _data(N, M, "float64", seed=3)
    req = Request(name, f, K=K, weight=w, axis=axis)
    want = run(req, [x, y, b], backend="reference")
    edges = [0, 4, 7, 13, N]  # uneven parts, each with at least K columns
    states = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        arrays = [x, y[lo:hi], b[lo:hi]] if axis == 1 else [x[lo:hi], y, b]
        states.append(run(req, arrays, backend="reference", store="state"))
    state = launch.combine(red, NUMPY, states, edges[:-1], K)
    got = [o.reshape(t.shape) for o, t in zip(red.finalize(NUMPY, state), want)]
    _close(got, want, "float64", f"{name} axis={axis}")


def test_state_store_refuses_out():
    x, y, _ = _data(2, 3, "float64")
    with pytest.raises(lm.ShapeError, match="store='state'"):
        run(Request("Sum", X - Y), [x, y], backend="reference", store="state",
            out=np.zeros((2, 3)))


def test_combine_keeps_the_first_index_on_ties():
    red = REDUCTIONS["Min_ArgMin"]
    parts = [(np.array([[1.0], [2.0]]), np.array([[3], [-1]])) for _ in range(5)]
    v, i = launch.combine(red, NUMPY, parts, [0, 10, 20, 30, 40], None)
    assert v.tolist() == [[1.0], [2.0]]
    assert i.tolist() == [[3], [-1]]  # the first part's; -1 (none seen) stays -1


# --------------------------------------------------------------------------- CPU splits

@needs_cxx
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name", sorted(REDUCTIONS))
def test_cpu_splits_the_columns_of_few_rows(name, dtype, monkeypatch):
    """Few rows, many columns: one column part per thread, each storing its raw state,
    merged with ``launch.combine``; the same result as one part."""
    f, w, K = _case(name)
    arrays = _data(5, 900, dtype, seed=1)
    req = Request(name, f, K=K, weight=w)
    whole = run(req, arrays, backend="cpu")
    monkeypatch.setenv("LAZYMAT_NUM_THREADS", "3")
    monkeypatch.setattr(cpu, "SPLIT_MIN_COLUMNS", 100)
    monkeypatch.setattr(launch, "SMALL_PAIRS", 1)
    merged = []
    real = launch.combine
    monkeypatch.setattr(launch, "combine", lambda *a: merged.append(len(a[2])) or real(*a))
    split = run(req, arrays, backend="cpu")
    assert merged == [3]
    _close(split, whole, dtype, f"{name} {dtype}")
    _close(split, run(req, arrays, backend="reference"), dtype, f"{name} {dtype} vs reference")


@needs_cxx
@pytest.mark.parametrize("python_threads", [False, True])
def test_column_parts_run_on_openmp_threads_when_the_kernels_have_them(python_threads,
                                                                       monkeypatch):
    """The parts of a split share one OpenMP region (Python threads would compete with the
    OpenMP workers spinning after a region); LAZYMAT_PYTHON_THREADS or no OpenMP: Python
    threads."""
    monkeypatch.setenv("LAZYMAT_NUM_THREADS", "2")
    monkeypatch.setenv("LAZYMAT_PYTHON_THREADS", "1" if python_threads else "")
    monkeypatch.setattr(cpu, "SPLIT_MIN_COLUMNS", 100)
    monkeypatch.setattr(launch, "SMALL_PAIRS", 1)
    regions = []
    real = cpu.call_parts
    monkeypatch.setattr(cpu, "call_parts", lambda *a: regions.append(1) or real(*a))
    arrays = _data(5, 900, "float64", seed=2)[:2]
    req = Request("Sum", X - Y)
    _close(run(req, arrays, backend="cpu"), run(req, arrays, backend="reference"), "float64",
           "split")
    assert regions == ([] if python_threads or not cpu.threads_inside() else [1])


@needs_cxx
def test_cpu_does_not_split_many_rows(monkeypatch):
    monkeypatch.setenv("LAZYMAT_NUM_THREADS", "2")
    monkeypatch.setattr(cpu, "SPLIT_MIN_COLUMNS", 10)
    monkeypatch.setattr(launch, "SMALL_PAIRS", 1)
    merged = []
    monkeypatch.setattr(launch, "combine", lambda *a: merged.append(1))
    run(Request("Sum", X - Y), _data(200, 50, "float64")[:2], backend="cpu")
    assert merged == []


# --------------------------------------------------------------------------- config

@pytest.mark.parametrize("value,expected", [("", False), ("0", False), ("false", False),
                                            (" No ", False), ("off", False), ("1", True),
                                            ("true", True), ("yes", True)])
def test_one_rule_for_flags(value, expected, monkeypatch):
    monkeypatch.setenv("LAZYMAT_VERBOSE", value)
    assert config.verbose() is expected


@pytest.mark.parametrize("lazymat_threads,omp,expected", [("3", "5", 3), ("", "5", 5),
                                                          ("x", "2", 2), ("0", "", None)])
def test_thread_settings(lazymat_threads, omp, expected, monkeypatch):
    monkeypatch.setenv("LAZYMAT_NUM_THREADS", lazymat_threads)
    monkeypatch.setenv("OMP_NUM_THREADS", omp)
    assert config.threads_setting() == expected
    assert launch.num_threads(1 << 30) == (expected or config.cores())
    assert launch.num_threads(10) == 1


def test_memos_are_capped_and_cleared_together():
    memo = config.memo("tests.backends.capped", maxsize=3)
    for k in range(5):
        memo[k] = k
    assert list(memo) == [2, 3, 4]  # the oldest went first
    assert "tests.backends.capped" in config.registered()
    assert {"backends.cpu.kernels", "plan.signatures", "compile.cache.libraries"} <= set(
        config.registered())
    config.clear_all()
    assert len(memo) == 0


def test_cache_clear_empties_every_memo(tmp_path, monkeypatch):
    monkeypatch.setenv("LAZYMAT_CACHE_DIR", str(tmp_path))
    memo = config.memo("tests.backends.cleared", maxsize=None)
    memo["x"] = 1
    lm.cache_clear()
    assert len(memo) == 0


def test_the_version_lives_in_one_place():
    from lazymat.compile import LIBRARY_VERSION

    assert lm.__version__ == config.__version__ == LIBRARY_VERSION
