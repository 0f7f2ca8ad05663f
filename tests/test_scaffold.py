"""The kernel skeleton's limits: large buffers, deep and long formulas, big constants.

Cases that crashed the interpreter before (stack overflows) run in a subprocess with a
timeout and a small stack, so that a regression fails one test instead of killing pytest.
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import textwrap
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

import lazymat as lm
from lazymat.codegen import cpu, cuda
from lazymat.codegen.c_like import MAX_INLINE_DEPTH, Emitter, KernelSpec, c_int, c_number
from lazymat.codegen.scaffold import STACK_BUDGET, Kernel
from lazymat.compile import compiler_info, load_library
from lazymat.errors import CompileError, ShapeError
from lazymat.formula import Var, apply, make, walk
from lazymat.reductions import REDUCTIONS

HAVE_CXX = compiler_info() is not None
requires_cxx = pytest.mark.skipif(not HAVE_CXX, reason="no C++ compiler")
SRC = str(Path(lm.__file__).resolve().parents[1])


def run_isolated(code: str, stack_kib: int | None = 1024, timeout: float = 300) -> str:
    """Run ``code`` in a fresh interpreter (stack limited to ``stack_kib`` for the process
    and, through it, for its OpenMP threads); its stdout, or a failure with its stderr."""
    def limit_stack():
        if stack_kib is not None:
            resource.setrlimit(resource.RLIMIT_STACK, (stack_kib * 1024, stack_kib * 1024))

    env = dict(os.environ, PYTHONPATH=SRC, OMP_NUM_THREADS="2")
    env.pop("OMP_STACKSIZE", None)
    res = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                         text=True, timeout=timeout, env=env, preexec_fn=limit_stack)
    assert res.returncode == 0, f"exit {res.returncode}:\n{res.stderr[-3000:]}"
    return res.stdout


def spec(name, formula, K=None, dtype="float32", arg_dims=None):
    from lazymat.formula import variables

    dims = [(1, 2)] * (1 + max(v.params[0] for v in variables(formula)))
    for v in variables(formula):
        dims[v.params[0]] = (v.params[1], v.params[2])
    return KernelSpec(REDUCTIONS[name], formula, None, K, dtype, tuple(arg_dims or dims))


# --------------------------------------------------------------------------- buffers (item 2)

def test_large_buffers_go_to_the_heap():
    small = Kernel(spec("KMin", apply("SqNorm2", Var(0, 3, 0) - Var(1, 3, 1)), K=10), cpu.CPU)
    cpu.render(small.spec)
    big_spec = spec("ArgKMin", apply("SqNorm2", Var(0, 3, 0) - Var(1, 3, 1)), K=60_000)
    src = cpu.render(big_spec)
    assert "malloc(" in src
    assert "long long (*ki)[60000][LANES] = (long long (*)[60000][LANES])(lm_heap" in src
    assert "(lm_heap" not in cpu.render(small.spec)  # small kernels: unchanged, on the stack
    wide = cpu.render(spec("Sum", apply("SqNorm2", Var(0, 150_000, 0) - Var(1, 150_000, 1))))
    assert "float (*xv0)[LANES] = (float (*)[LANES])(lm_heap" in wide
    assert STACK_BUDGET <= 1 << 20


def test_buffers_beyond_memory_are_a_shape_error():
    huge = spec("KMin", apply("SqNorm2", Var(0, 3, 0) - Var(1, 3, 1)), K=10**10)
    with pytest.raises(ShapeError, match="each CPU thread would need"):
        cpu.render(huge)


def test_cuda_buffers_beyond_local_memory_are_a_shape_error():
    f = apply("SqNorm2", Var(0, 3, 0) - Var(1, 3, 1))
    cuda.render(spec("ArgKMin", f, K=100))
    with pytest.raises(ShapeError, match="per-thread buffers"):
        cuda.render(spec("ArgKMin", f, K=60_000))
    with pytest.raises(ShapeError, match="per-thread buffers"):  # a 150,000-dim row node
        cuda.render(spec("Sum", apply("Exp", Var(0, 150_000, 0)) * Var(1, 1, 1)))


@requires_cxx
def test_large_dims_and_k_run_with_a_small_stack():
    """D = 20,000, SumT(x, 20,000) and ArgKMin K = 6,000 each need more than the 1 MiB
    stack the child gets (they segfaulted when the buffers lived on the stack)."""
    out = run_isolated("""
        import numpy as np, lazymat as lm
        rng = np.random.default_rng(0)
        x, y = rng.random((5, 20000), dtype=np.float32), rng.random((7, 20000), dtype=np.float32)
        got = lm.Vi(x).sqdist(lm.Vj(y)).sum(1)
        want = ((x[:, None] - y[None]) ** 2).sum(-1).sum(1, keepdims=True)
        assert np.allclose(got, want, rtol=1e-4), (got, want)
        s = lm.Genred("SumT(x, 20000) * y", ["x = Vi(1)", "y = Vj(1)"], reduction_op="Sum",
                      axis=1)(x[:, :1].copy(), y[:, :1].copy())
        assert s.shape == (5, 20000) and np.allclose(s, x[:, :1] * y[:, 0].sum(), rtol=1e-5)
        a = rng.random((3, 1), dtype=np.float32)
        b = rng.permutation(6100).astype(np.float32)[:, None]
        idx = lm.Vi(a).sqdist(lm.Vj(b)).argKmin(6000, dim=1)
        want = np.argsort(((a - b.T) ** 2), axis=1, kind="stable")[:, :6000]
        assert (np.asarray(idx) == want).all()
        print("ok")
    """)
    assert out.strip() == "ok"


@requires_cxx
def test_issue_sizes_run():
    """The sizes of the issue at the default stack: D = 150,000 and SumT(x, 10**6)."""
    out = run_isolated("""
        import numpy as np, lazymat as lm
        rng = np.random.default_rng(1)
        x, y = rng.random((3, 150000), dtype=np.float32), rng.random((4, 150000), dtype=np.float32)
        got = lm.Vi(x).sqdist(lm.Vj(y)).min(1)
        want = ((x[:, None].astype(np.float64) - y[None]) ** 2).sum(-1).min(1, keepdims=True)
        assert np.allclose(got, want, rtol=1e-4), (got, want)
        s = lm.Genred("SumT(x, 1000000) * y", ["x = Vi(1)", "y = Vj(1)"], reduction_op="Sum",
                      axis=1)(x[:2, :1].copy(), y[:3, :1].copy())
        assert s.shape == (2, 1000000)
        assert np.allclose(s, x[:2, :1] * y[:3, 0].sum(), rtol=1e-5)
        print("ok")
    """, stack_kib=None)
    assert out.strip() == "ok"


# --------------------------------------------------------------------------- formulas (item 4)

def test_inline_depth_is_bounded():
    f = Var(0, 1, 0)
    for _ in range(1000):
        f = apply("Sin", f)
    em = Emitter([f], "float", lambda v, k: "x")
    assert len(em.materialized) >= 1000 // (MAX_INLINE_DEPTH + 1)
    for n in em.at_level(1):  # each statement stays short: no node nests deeper
        assert em.body(n)[0].count("lm_sin(") <= MAX_INLINE_DEPTH + 1


def test_a_sum_of_few_components_reads_each_value_once():
    # [e b, e b y]: one loop over the columns folds the 4 components, and e b y is computed
    # where it is read (no buffer); a Max reads its values as before
    x, y, b = Var(0, 3, 0), Var(1, 3, 1), Var(2, 1, 1)
    eb = apply("Exp", -apply("SqDist", x, y)) * b
    f = make("Concat", (eb, eb * y))
    dims = ((3, 0), (3, 1), (1, 1))
    src = cpu.render(KernelSpec(REDUCTIONS["Sum"], f, None, None, "float32", dims))
    assert "s0 += " in src and "s3 += " in src
    assert "float t2[" not in src  # t0: the distances, t1: e b
    src = cpu.render(KernelSpec(REDUCTIONS["Max"], f, None, None, "float32", dims))
    assert "s3 += " not in src and "float t2[" in src


@requires_cxx
def test_deep_and_long_formulas_compile_and_run():
    """Sin nested 1,000 deep and a sum of 400 Gaussians built in a loop (RecursionError
    before) agree with numpy."""
    out = run_isolated("""
        import numpy as np, lazymat as lm
        rng = np.random.default_rng(2)
        x, y = rng.random((9, 2)), rng.random((11, 2))
        f = lm.Vi(x)[0]
        for _ in range(1000):
            f = f.sin()
        got = (f * lm.Vj(y)[0]).sum(1)
        v = x[:, 0]
        for _ in range(1000):
            v = np.sin(v)
        assert np.allclose(got[:, 0], v * y[:, 0].sum(), rtol=1e-10), (got, v)
        xi, yj = lm.Vi(x), lm.Vj(y)
        g = 0
        for s in np.linspace(0.5, 2.0, 400):
            g = g + (-xi.sqdist(yj) / float(s)).exp()
        got = g.sum(1)
        d2 = ((x[:, None] - y[None]) ** 2).sum(-1)
        want = sum(np.exp(-d2 / s) for s in np.linspace(0.5, 2.0, 400)).sum(1)
        assert np.allclose(got[:, 0], want, rtol=1e-10), (got, want)
        print("ok")
    """, stack_kib=None)
    assert out.strip() == "ok"


def _long_formula(n: int):
    """A formula of about ``n`` distinct nodes (a chain of Sin/Add over two variables)."""
    x, y = Var(0, 1, 0), Var(1, 1, 1)
    f = x
    for k in range(n // 3):
        f = apply("Sin", f + y * Fraction(k + 1, 7))
    return f


@pytest.mark.slow  # minutes of gcc on 2 busy cores
@requires_cxx
def test_ten_thousand_nodes_compile():
    f = _long_formula(10_000)
    assert len(walk(f)) >= 9_000
    src = cpu.render(spec("Sum", f, dtype="float64"))
    assert len(src) < 10_000_000
    out = run_isolated(f"""
        import sys, resource, time, numpy as np
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_scaffold import _long_formula
        from lazymat.plan import Request, run
        f = _long_formula(10_000)
        x, y = np.random.default_rng(3).random((5, 1)), np.random.default_rng(4).random((6, 1))
        req = Request("Sum", f)
        t = time.perf_counter()
        got = run(req, [x, y], backend="cpu")[0]
        took = time.perf_counter() - t
        want = run(req, [x, y], backend="reference")[0]
        assert np.allclose(got, want, rtol=1e-9), (got, want)
        rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss // 1024
        print(f"{{took:.1f}} s, compiler {{rss}} MiB")
    """, stack_kib=None, timeout=600)
    seconds, rss = float(out.split()[0]), int(out.split()[3])
    assert seconds < 300 and rss < 2048, out  # compile and run; the compiler's peak memory


@pytest.mark.slow
def test_hundred_thousand_nodes_render_in_bounded_memory():
    """The source of a 10**5-node formula is rendered in linear size and memory."""
    import tracemalloc

    f = _long_formula(100_000)
    tracemalloc.start()
    src = cpu.render(spec("Sum", f, dtype="float64"))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert len(src) < 60_000_000 and peak < 1 << 30, (len(src), peak)


# --------------------------------------------------------------------------- constants (item 9)

@pytest.mark.parametrize("value", [2**64, 10**30, 10**20, Fraction(10**30, 7),
                                   Fraction(1, 3 * 10**25), -(2**70), 10**400])
@pytest.mark.parametrize("T", ["float", "double"])
def test_big_constants_are_exact_literals(value, T):
    text = c_number(Fraction(value), T)
    if "LM_INF" in text:
        assert abs(Fraction(value)) > Fraction(float(np.finfo(np.float32 if T == "float"
                                                              else np.float64).max))
        return
    want = np.float32(float(Fraction(value))) if T == "float" else float(Fraction(value))
    number = float(text[len(f"(({T})"):-1])
    assert number == want


@requires_cxx
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_big_integer_constants_compute(dtype):
    x = np.array([[0.5], [1.5], [-2.0]], dtype)
    y = np.ones((2, 1), dtype)
    cases = {"x * IntCst(18446744073709551616)": x * 2.0**64,
             "x * IntCst(1000000000000000000000000000000)": x * 1e30,
             "x * IntCst(100000000000000000000)": x * 1e20,
             "x * RatCst(1000000000000000000000000000000, 7)": x * (1e30 / 7),
             "Pow(x, 2147483647)": np.where(np.abs(x) < 1, 0.0, np.sign(x) * np.inf),
             "Pow(x, -2147483647)": np.where(np.abs(x) < 1, np.sign(x) * np.inf, 0.0),
             "Round(x, 2147483647)": x}
    for formula, want in cases.items():
        got = lm.Genred(formula, ["x = Vi(1)", "y = Vj(1)"], reduction_op="Max", axis=1,
                        dtype=dtype)(x, y, backend="cpu")
        np.testing.assert_allclose(got, want.astype(dtype), rtol=1e-6, err_msg=formula)


def test_integer_parameters_beyond_c_are_refused():
    """Beyond a C int, an op's integer parameter is refused when the formula is built; the
    renderer refuses anything beyond 64 bits itself."""
    for params in ((2**32,), (2**70,)):
        with pytest.raises(ShapeError, match="out of range"):
            make("Pow", (Var(0, 1, 0),), params)
    with pytest.raises(ShapeError, match="beyond the 64-bit range"):
        c_int(2**70, "Pow")
    assert c_int(2**40, "Pow") == "1099511627776LL" and c_int(-7, "Pow") == "-7"


@requires_cxx
def test_compiler_overflow_warnings_are_errors():
    with pytest.raises(CompileError):
        load_library('extern "C" int lm_overflow(void) { int x = 4294967296LL; return x; }',
                     name="overflow_check")
