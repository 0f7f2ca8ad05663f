"""Reliability (issue 11): fork safety, Ctrl-C, overlapping ranges, KernelSolve with NaN and
stagnation, small input holes. Tests that could hang or kill the interpreter run in a
subprocess with a timeout."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

import lazymat as lm
from lazymat.compile import compiler_info

SRC = str(Path(lm.__file__).parents[1])
needs_openmp = pytest.mark.skipif(not (compiler_info() and compiler_info().openmp),
                                  reason="needs a C++ compiler with OpenMP")


def run_python(code: str, timeout: float, **env: str) -> subprocess.CompletedProcess:
    full = dict(os.environ, PYTHONPATH=SRC, **env)
    return subprocess.run([sys.executable, "-c", code], env=full, capture_output=True,
                          text=True, timeout=timeout)


# --------------------------------------------------------------------------- item 3: fork

_FORK = """
import multiprocessing as mp, numpy as np, lazymat as lm
rng = np.random.default_rng(0)
x, y = rng.random((2000, 3)), rng.random((2000, 3))

def reduce(_):
    return float((-lm.Vi(x).sqdist(lm.Vj(y))).exp().sum(1, backend="cpu").sum())

parent = reduce(0)  # 4e6 pairs on 2 OpenMP threads: libgomp's pool now exists
with mp.get_context("fork").Pool(2) as pool:
    children = pool.map(reduce, range(4))
print(parent, *children)
"""


@needs_openmp
def test_fork_pool_after_a_threaded_reduction_does_not_hang():
    try:
        res = run_python(_FORK, timeout=120, LAZYMAT_NUM_THREADS="2")
    except subprocess.TimeoutExpired:
        pytest.fail("a fork-pool worker hung after the parent ran a threaded reduction")
    assert res.returncode == 0, res.stderr[-3000:]
    values = [float(v) for v in res.stdout.split()]
    assert len(values) == 5
    np.testing.assert_allclose(values[1:], values[0], rtol=1e-12)


def test_fork_child_runs_single_threaded_only_after_threads():
    from lazymat.backends import launch

    code = ("import os, lazymat.backends.launch as p\n"
            "before = p.num_threads(10**9)\n"
            "pid = os.fork()\n"
            "if pid == 0:\n"
            "    print('child', p.num_threads(10**9), flush=True); os._exit(0)\n"
            "os.waitpid(pid, 0); print('parent', before, p.num_threads(10**9))\n")
    res = run_python(code, timeout=60, LAZYMAT_NUM_THREADS="3")
    assert res.returncode == 0, res.stderr
    assert sorted(res.stdout.split("\n")[:2]) == ["child 1", "parent 3 3"]
    assert launch.num_threads(10) == 1


# --------------------------------------------------------------------------- item 12: Ctrl-C

_LONG = """
import numpy as np, lazymat as lm, sys, time
rng = np.random.default_rng(0)
small = rng.random((100, 3))
(-lm.Vi(small).sqdist(lm.Vj(small))).exp().sum(1, backend="cpu")  # compile first
x = rng.random((400_000, 3))
print("ready", flush=True)
t0 = time.time()
try:
    (-lm.Vi(x).sqdist(lm.Vj(x))).exp().sum(1, backend="cpu")  # 1.6e11 pairs: minutes
except KeyboardInterrupt:
    print(f"interrupted {time.time() - t0:.2f}", flush=True)
    sys.exit(3)
print("finished", flush=True)
"""


@pytest.mark.skipif(compiler_info() is None or not hasattr(signal, "SIGINT"),
                    reason="needs a C++ compiler and SIGINT")
def test_ctrl_c_interrupts_a_long_reduction():
    proc = subprocess.Popen([sys.executable, "-c", _LONG], env=dict(os.environ, PYTHONPATH=SRC),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(1.5)  # inside the kernel by now
        proc.send_signal(signal.SIGINT)
        t0 = time.time()
        try:
            out, err = proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            pytest.fail("Ctrl-C did not interrupt the reduction within 15 s")
        assert proc.returncode == 3, (out, err[-2000:])
        assert out.startswith("interrupted")
        assert time.time() - t0 < 10
    finally:
        proc.kill()
        proc.wait()


# --------------------------------------------------------------------------- item 11: ranges

def _ranges(intervals):
    ranges_i = np.array([[0, 1]], np.int64)
    slices_i = np.array([len(intervals)], np.int64)
    redranges_j = np.array(intervals, np.int64).reshape(-1, 2)
    return (ranges_i, slices_i, redranges_j, redranges_j[:1], slices_i[:1] * 0 + 1, ranges_i)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("intervals", [[[0, 6], [4, 10]], [[4, 10], [0, 6]], [[0, 10], [2, 3]],
                                       [[0, 2], [5, 9], [8, 10]]])
def test_overlapping_column_intervals_are_refused(backend, intervals):
    x, y = np.zeros((1, 1)), np.ones((10, 1))
    K = lm.Vi(x) * 0 + lm.Vj(y)
    with pytest.raises(lm.ShapeError, match=r"redranges_j intervals .* overlap"):
        K.sum(1, ranges=_ranges(intervals), backend=backend)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_touching_or_empty_column_intervals_are_fine(backend):
    x, y = np.zeros((1, 1)), np.ones((10, 1))
    K = lm.Vi(x) * 0 + lm.Vj(y)
    out = K.sum(1, ranges=_ranges([[5, 10], [3, 3], [0, 5], [3, 3]]), backend=backend)
    assert out.ravel().tolist() == [10.0]


# --------------------------------------------------------------------------- item 10: solve

def _gauss(x, gamma=10.0):
    return (-lm.Vi(x).sqdist(lm.Vj(x)) * gamma).exp()


@pytest.mark.parametrize("where", ["b", "points"])
def test_kernel_solve_refuses_nan(where):
    rng = np.random.default_rng(0)
    x, b = rng.random((200, 2)), rng.random((200, 1))
    (b if where == "b" else x)[17, 0] = np.nan
    with pytest.raises(lm.errors.NonFiniteError, match="NaN or inf"):
        _gauss(x).solve(b, alpha=0.1)


def test_conjugate_gradient_refuses_inf():
    from lazymat.solve import conjugate_gradient

    b = np.ones((3, 1))
    b[1] = np.inf
    with pytest.raises(ValueError, match="NaN or inf"):
        conjugate_gradient(lambda v: v, b, 1.0, 1e-8)
    with pytest.raises(ValueError, match="NaN or inf"):
        conjugate_gradient(lambda v: v * np.nan, np.ones((3, 1)), 1.0, 1e-8)


def test_ill_conditioned_solve_stops_early_with_the_best_iterate():
    rng = np.random.default_rng(0)
    n = 400
    x, b = rng.random((n, 2)), rng.random((n, 1))
    info: dict = {}
    t0 = time.time()
    with pytest.warns(lm.ConvergenceWarning, match="without progress"):
        a = _gauss(x).solve(b, alpha=1e-12, info=info)
    assert info["iterations"] <= 4 * 100, info  # 10·n = 4000 before stagnation was detected
    residual = 1e-12 * a + _gauss(x) @ a - b
    assert (residual ** 2).sum() <= (b ** 2).sum()  # never worse than a = 0
    assert np.isfinite(a).all()
    assert time.time() - t0 < 120


# --------------------------------------------------------------------------- item 12: inputs

def test_masked_arrays_are_refused():
    x = np.ma.masked_array(np.random.rand(5, 2), mask=np.zeros((5, 2), bool))
    y = np.random.rand(4, 2)
    with pytest.raises(lm.DtypeError, match="masked"):
        lm.Vi(x).sqdist(lm.Vj(y)).sum(1)
    with pytest.raises(lm.DtypeError, match="masked"):
        lm.Vi(y).sqdist(lm.Vj(x)).sum(1)
    g = lm.Genred("SqDist(x, y)", ["x = Vi(2)", "y = Vj(2)"], reduction_op="Sum", axis=1)
    with pytest.raises(lm.DtypeError, match="masked"):
        g(x, y)


def test_bool_axes_are_refused():
    x = np.random.rand(5, 2)
    with pytest.raises(lm.ShapeError, match="True"):
        lm.Vi(x).sqdist(lm.Vj(x)).sum(dim=True)
    with pytest.raises(lm.ShapeError, match="True"):
        lm.Genred("SqDist(x, y)", ["x = Vi(2)", "y = Vj(2)"], reduction_op="Sum", axis=True)


@pytest.mark.parametrize("make", [lm.Vi, lm.Vj])
def test_variables_of_scalars_are_refused(make):
    with pytest.raises(lm.ShapeError, match="Pm"):
        make(np.array(1.5))
    with pytest.raises(lm.ShapeError, match="Pm"):
        make(1.5)


@pytest.fixture
def no_compute(monkeypatch):
    """Fail if a backend runs: the checks must come before any work."""
    from lazymat.backends import cpu, reference

    def boom(*args, **kwargs):
        raise AssertionError("computed before checking out=")

    monkeypatch.setattr(cpu, "run", boom)
    monkeypatch.setattr(reference, "run", boom)


@pytest.mark.parametrize("dtype", ["float32", "float64", "float16"])
def test_bad_out_fails_before_computing(no_compute, dtype):
    x = np.random.rand(5, 2).astype(dtype)
    K = lm.Vi(x).sqdist(lm.Vj(x))
    read_only = np.zeros((5, 1), dtype)
    read_only.flags.writeable = False
    with pytest.raises(lm.DtypeError, match="read-only"):
        K.sum(1, out=read_only)
    with pytest.raises(lm.DtypeError, match="out="):
        K.sum(1, out=[[0.0]] * 5)
    with pytest.raises(lm.DtypeError, match="out="):
        K.sum(1, out=np.ma.masked_array(np.zeros((5, 1), dtype)))


def test_out_requiring_grad_fails_before_computing(no_compute):
    torch = pytest.importorskip("torch")
    x = torch.rand(5, 2, dtype=torch.float64)
    out = torch.zeros(5, 1, dtype=torch.float64, requires_grad=True)
    with pytest.raises(lm.DtypeError, match="requires grad"):
        lm.Vi(x).sqdist(lm.Vj(x)).sum(1, out=out)


def test_good_out_still_works():
    x = np.random.rand(5, 2)
    out = np.zeros((5, 1))
    K = lm.Vi(x).sqdist(lm.Vj(x))
    assert K.sum(1, out=out) is out
    np.testing.assert_allclose(out, ((x[:, None] - x[None]) ** 2).sum((1, 2))[:, None])


def test_explicit_cxx_that_does_not_work_is_an_error_not_a_fallback(monkeypatch):
    x = np.random.rand(5, 2)
    monkeypatch.setenv("CXX", "false")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no silent fallback to the reference backend
        with pytest.raises(lm.CompileError, match="CXX='false'"):
            (lm.Vi(x).sqdist(lm.Vj(x)) + 0.123456).sum(1, backend="cpu")
