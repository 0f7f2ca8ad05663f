"""Fuzzing (issue 11): random formula trees × reductions × dtypes × {cpu, reference}, forward
and backward, with NaN/inf sprinkled in; random and mutated Genred strings. Nothing but
lazymat errors may come out, nothing may crash, and the backends agree.

Each fuzz run is a hypothesis loop in a subprocess (``python tests/test_fuzz.py <kind> <n>
<derandomize>``) so that a segfault or a hang fails a test instead of killing pytest; the
child prints every case before running it, so the last line names a crashing one.
``make test`` runs a small derandomized budget (its kernels stay in the compile cache),
``make test-slow`` a long random one.

Cases whose data hold NaN/inf must agree too (the NaN rule of issue 11 item 8): the same
NaN and ±inf entries on both backends, equal finite values; ``nan_known`` lists the ops whose
NaN disagreement is a known, reported bug (skipped until fixed).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve()
SRC = str(HERE.parents[1] / "src")

# --------------------------------------------------------------------------- the subprocess


def _worker(kind: str, examples: int, derandomize: bool) -> None:  # noqa: C901 - one script
    import warnings

    import numpy as np
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    import lazymat as lm

    warnings.simplefilter("ignore")  # overflow warnings of the reference backend, fallbacks
    from lazymat.compile import compiler_info

    have_cpu = compiler_info() is not None
    # Known NaN disagreements, reported to their owners and skipped here until fixed:
    nan_known: tuple[str, ...] = ()

    def say(*parts: object) -> None:
        print(*parts, file=sys.stderr, flush=True)

    # Unary ops as templates; the dim is kept. Smooth ones only where backends are compared:
    # a Floor or a comparison flips on a rounding difference.
    smooth = ["Exp({})", "Sin({})", "Cos({})", "Abs({})", "Square({})", "-({})", "Atan({})",
              "Log(Square({}) + 1)", "Sqrt(Abs({}))", "Inv(Square({}) + 0.5)", "ReLU({})",
              "SinXDivX({})", "Pow({}, 3)", "Exp(-Square({}))", "XLogX(Abs({}) + 1)"]
    rough = ["Log({})", "Sqrt({})", "Inv({})", "Rsqrt({})", "Floor({})", "Sign({})",
             "Step({})", "Round({}, 2)", "Acos({})", "Asin({})", "Powf(Abs({}), 0.5)",
             "ClampInt({}, -1, 1)"]
    binary = ["({} + {})", "({} - {})", "({} * {})", "({} / {})"]

    def trees(ops: list[str], dim: int, depth: int) -> st.SearchStrategy:
        """Formula strings of dim ``dim`` over x = Vi(D), y = Vj(D), p = Pm(D), s = Pm(1)."""
        leaves = ["x", "y", "p"] if dim > 1 else ["s", "0.5", "2", "Sum(x)", "Sum(y)",
                                                    "SqDist(x, y)", "(x | y)", "Norm2(p)"]
        leaf = st.sampled_from(leaves)
        if depth == 0:
            return leaf
        sub = trees(ops, dim, depth - 1)
        one = trees(ops, 1, depth - 1)
        options = [leaf,
                   st.tuples(st.sampled_from(ops), sub).map(lambda t: t[0].format(t[1])),
                   st.tuples(st.sampled_from(binary), sub, sub).map(lambda t: t[0].format(*t[1:]))]
        if dim > 1:  # broadcasting a scalar against a vector
            options.append(st.tuples(st.sampled_from(binary), sub, one)
                           .map(lambda t: t[0].format(*t[1:])))
        return st.one_of(*options)

    reductions = ["Sum", "LogSumExp", "Min", "Max", "ArgMin", "ArgMax", "Min_ArgMin",
                  "Max_ArgMax", "KMin", "ArgKMin", "KMin_ArgKMin", "SumSoftMaxWeight"]
    scalar_only = set(reductions) - {"Sum", "SumSoftMaxWeight"}
    with_k = {"KMin", "ArgKMin", "KMin_ArgKMin"}

    @st.composite
    def cases(draw):
        D = draw(st.sampled_from([1, 2, 3]))
        red = draw(st.sampled_from(reductions))
        finite = draw(st.booleans())
        ops = smooth if finite or draw(st.booleans()) else smooth + rough
        fdim = 1 if red in scalar_only else draw(st.sampled_from([1, D]))
        formula = draw(trees(ops, fdim, draw(st.integers(1, 3))))
        formula2 = draw(trees(ops, D, 1)) if red == "SumSoftMaxWeight" else None
        M, N = draw(st.integers(1, 7)), draw(st.integers(3, 40))
        K = draw(st.integers(1, 3)) if red in with_k else None
        dtype = draw(st.sampled_from(["float32", "float64"]))
        axis = draw(st.sampled_from([0, 1]))
        seed = draw(st.integers(0, 2**31))
        holes = [] if finite else draw(st.lists(
            st.tuples(st.sampled_from("xyp"), st.integers(0, 10**6),
                      st.sampled_from([np.nan, np.inf, -np.inf, 0.0])), min_size=1, max_size=4))
        return dict(D=D, red=red, formula=formula, formula2=formula2, M=M, N=N, K=K,
                    dtype=dtype, axis=axis, seed=seed, holes=holes)

    def data(case):
        rng = np.random.default_rng(case["seed"])
        D, M, N, dt = case["D"], case["M"], case["N"], case["dtype"]
        arrays = {"x": rng.uniform(-1.5, 1.5, (M, D)), "y": rng.uniform(-1.5, 1.5, (N, D)),
                  "p": rng.uniform(-1.5, 1.5, (D,)), "s": rng.uniform(0.5, 1.5, (1,))}
        for name, at, value in case["holes"]:
            a = arrays[name].reshape(-1)
            a[at % a.size] = value
        return [arrays[k].astype(dt) for k in "xyps"]

    def run(case, backend, arrays):
        aliases = [f"x = Vi({case['D']})", f"y = Vj({case['D']})", f"p = Pm({case['D']})",
                   "s = Pm(1)"]
        g = lm.Genred(case["formula"], aliases, reduction_op=case["red"], axis=case["axis"],
                      opt_arg=case["K"], formula2=case["formula2"])
        out = g(*arrays, backend=backend)
        return out if isinstance(out, tuple) else (out,)

    def outcome(case, backend, arrays):
        try:
            return run(case, backend, arrays), None
        except lm.LazymatError as e:
            return None, e

    def close(a, b, dtype, scale):
        rtol = 2e-3 if dtype == "float32" else 1e-8
        return np.allclose(a, b, rtol=rtol, atol=rtol * scale, equal_nan=True)

    def check_forward(case):
        arrays = data(case)
        ref, ref_err = outcome(case, "reference", arrays)
        if not have_cpu:
            return
        cpu, cpu_err = outcome(case, "cpu", arrays)
        if ref_err is not None or cpu_err is not None:
            # Mistakes of the request (dims, K) are found before any backend runs: both agree.
            assert type(ref_err) is type(cpu_err), (ref_err, cpu_err)
            assert not isinstance(cpu_err, lm.CompileError), cpu_err
            return
        cols = case["N"] if case["axis"] == 1 else case["M"]
        for r, c in zip(ref, cpu):
            assert r.shape == c.shape and r.dtype == c.dtype, (r.shape, c.shape, r.dtype, c.dtype)
            if r.dtype == np.int64 and not case["holes"]:
                assert ((c >= 0) & (c < cols)).all(), c
        texts = case["formula"] + (case["formula2"] or "")
        if case["holes"] and any(op in texts for op in nan_known):
            return
        values = [(r, c) for r, c in zip(ref, cpu) if r.dtype != np.int64]
        if not values:
            return
        if not case["holes"] and not all(np.isfinite(r).all() for r, _ in values):
            return  # overflow inside the formula: where it happens depends on the order
        if case["holes"]:  # the NaN rule: the same NaN/inf pattern, equal finite values
            for r, c in values:
                assert (np.isnan(r) == np.isnan(c)).all() and (np.isinf(r) == np.isinf(c)).all()\
                    and (r[np.isinf(r)] == c[np.isinf(c)]).all(), (r, c)
            values = [(np.where(np.isfinite(r), r, 0), np.where(np.isfinite(c), c, 0))
                      for r, c in values]
        if case["red"] in ("ArgMin", "ArgMax", "ArgKMin"):
            return  # ties: the index may differ; Min_ArgMin & co compare the values
        scale = max(1.0, max(float(np.abs(r).max()) for r, _ in values))
        if case["red"] == "Sum":  # cancellation: compare to the sum of |terms|
            scale *= cols
        for r, c in values:
            assert close(c, r, case["dtype"], scale), (r, c)

    def check_backward(case):
        import torch

        arrays = data(case)
        case = dict(case, red="Sum" if case["red"] != "LogSumExp" else "LogSumExp", K=None,
                    formula2=None, dtype="float64")
        grads = {}
        for backend in ("reference", "cpu") if have_cpu else ("reference",):
            ts = [torch.tensor(a, dtype=torch.float64, requires_grad=True) for a in arrays]
            try:
                (out,) = run(case, backend, ts)
                out.sum().backward()
            except lm.LazymatError as e:
                grads[backend] = type(e)
                continue
            grads[backend] = [t.grad for t in ts]
        if len(grads) < 2 or case["holes"]:
            return
        ref, cpu = grads["reference"], grads["cpu"]
        if not isinstance(ref, list) or not isinstance(cpu, list):
            assert ref == cpu, (ref, cpu)
            return
        for r, c in zip(ref, cpu):
            if r is None or c is None:
                assert r is None and c is None
                continue
            r, c = r.numpy(), c.numpy()
            if not np.isfinite(r).all():
                continue
            scale = max(1.0, float(np.abs(r).max())) * max(case["M"], case["N"])
            assert np.allclose(c, r, rtol=1e-7, atol=1e-7 * scale, equal_nan=True), (r, c)

    valid_strings = ["Exp(-SqDist(x, y) * s)", "Sum(Square(x - y))", "(x | y) * Sin(p)",
                     "Log(Sum(Exp(x)) + 1) / Norm2(y)", "SqDist(x, y) + Pow(s, 3)",
                     "Exp(-(x - y) * (x - y))", "Elem(x, 0) * Sum(p)", "Concat(x, y)",
                     "IfElse(s - 1, x, y)", "Extract(Concat(x, y), 1, 2)", "Max(x) - Min(y)",
                     "SumT(s, 2)", "TensorProd(x, y)", "Clamp(x, s, s + 1)", "Sign(x) * y"]
    tokens = ["x", "y", "p", "s", "(", ")", ",", "+", "-", "*", "/", "|", "^", "**", "1",
              "0.5", "2", "-3", "1e3", "Exp", "Sum", "SqDist", "Elem", "Vi", "Pm", "Pow",
              "Concat", "IfElse", "Extract", "SumT", "Zero", "IntCst", " ", "[", "]", "=",
              "lambda", "__import__", "'", '"', "\\", "\n", "\x00", "é", "Inv", "Sqrt"]

    @st.composite
    def strings(draw):
        if draw(st.booleans()):  # a valid formula, mutated
            text = list(draw(st.sampled_from(valid_strings)))
            for _ in range(draw(st.integers(1, 4))):
                at = draw(st.integers(0, len(text)))
                op = draw(st.sampled_from(["insert", "delete", "replace"]))
                piece = draw(st.sampled_from(tokens))
                if op == "insert" or not text:
                    text[at:at] = [piece]
                elif op == "delete":
                    del text[at % len(text)]
                else:
                    text[at % len(text)] = piece
            return "".join(text)
        return "".join(draw(st.lists(st.sampled_from(tokens), max_size=20)))

    def check_string(text, backend, dtype):
        rng = np.random.default_rng(0)
        arrays = [rng.random((4, 2)).astype(dtype), rng.random((5, 2)).astype(dtype),
                  rng.random(2).astype(dtype), rng.random(1).astype(dtype)]
        try:
            g = lm.Genred(text, ["x = Vi(2)", "y = Vj(2)", "p = Pm(2)", "s = Pm(1)"],
                          reduction_op="Sum", axis=1)
            out = g(*arrays, backend=backend)
        except lm.LazymatError:
            return
        assert out.ndim == 2  # (rows of x, or 1 when the formula does not use x: see the report)

    common = dict(max_examples=examples, deadline=None, derandomize=derandomize,
                  database=None, suppress_health_check=list(HealthCheck), print_blob=True)

    if kind == "trees":
        @settings(**common)
        @given(cases())
        def fuzz(case):
            say("case:", case)
            check_forward(case)

        fuzz()
    elif kind == "backward":
        @settings(**common)
        @given(cases())
        def fuzz(case):
            say("case:", case)
            check_backward(case)

        fuzz()
    elif kind == "strings":
        @settings(**common)
        @given(strings(), st.sampled_from(["reference", "cpu"] if have_cpu else ["reference"]),
               st.sampled_from(["float32", "float64"]))
        def fuzz(text, backend, dtype):
            say("string:", repr(text), backend, dtype)
            check_string(text, backend, dtype)

        fuzz()
    else:
        raise SystemExit(f"unknown fuzz kind {kind!r}")


def run_worker(kind: str, examples: int, derandomize: bool, timeout: float) -> None:
    env = dict(os.environ, PYTHONPATH=SRC, LAZYMAT_NUM_THREADS="1")
    try:
        res = subprocess.run([sys.executable, str(HERE), kind, str(examples),
                              str(int(derandomize))], env=env, capture_output=True, text=True,
                             timeout=timeout)
    except subprocess.TimeoutExpired as e:
        tail = (e.stderr or b"")[-3000:]
        pytest.fail(f"fuzz {kind} hung (> {timeout} s); last lines:\n"
                    f"{tail.decode(errors='replace') if isinstance(tail, bytes) else tail}")
    if res.returncode != 0:
        how = (f"died of signal {-res.returncode}" if res.returncode < 0
               else f"failed (exit code {res.returncode})")
        pytest.fail(f"fuzz {kind} {how}; last lines:\n{res.stderr[-6000:]}")


# --------------------------------------------------------------------------- the tests

pytest.importorskip("hypothesis")


@pytest.mark.parametrize("kind, examples", [("trees", 40), ("backward", 12), ("strings", 150)])
def test_fuzz_small(kind, examples):
    run_worker(kind, examples, derandomize=True, timeout=500)


@pytest.mark.slow
@pytest.mark.parametrize("kind, examples", [("trees", 600), ("backward", 150),
                                            ("strings", 3000)])
def test_fuzz_long(kind, examples):
    run_worker(kind, examples, derandomize=False, timeout=3000)


# Inputs that crashed or exhausted the process (issue 11 items 2, 4 and 5, owned by the
# scaffold and ops helpers): each runs in a subprocess, and must end in a lazymat error or a result.
_CRASHERS = {
    "D=150000": ("import numpy as np, lazymat as lm\n"
                 "x = np.random.rand(3, 150000).astype('float32')\n"
                 "(lm.Vi(x) * lm.Vj(x)).sum(-1).sum(1, backend='cpu')", "item 2 (scaffold)"),
    "SumT 1e6": ("import numpy as np, lazymat as lm\n"
                 "g = lm.Genred('SumT(x, 1000000)', ['x = Vi(1)'], reduction_op='Sum', axis=1)\n"
                 "g(np.ones((2, 1)), backend='cpu')", "item 2 (scaffold)"),
    "argKmin K=60000": ("import numpy as np, lazymat as lm\n"
                        "x = np.random.rand(4, 1).astype('float32')\n"
                        "y = np.random.rand(60000, 1).astype('float32')\n"
                        "lm.Vi(x).sqdist(lm.Vj(y)).argKmin(60000, dim=1, backend='cpu')",
                        "item 2 (scaffold)"),
    "Vi(2**40)": ("import numpy as np, lazymat as lm\n"
                  "g = lm.Genred('x', ['x = Vi(1099511627776, 1)'], reduction_op='Sum', axis=1)\n"
                  "g(np.ones((2, 1)))", None),
    "Zero(2**62)": ("import numpy as np, lazymat as lm\n"
                    "g = lm.Genred('Zero(4611686018427387904) + x', ['x = Vi(1)'], "
                    "reduction_op='Sum', axis=1)\n"
                    "g(np.ones((2, 1)), backend='cpu')", None),
    "SumT 2**62": ("import numpy as np, lazymat as lm\n"
                   "g = lm.Genred('SumT(x, 4611686018427387904)', ['x = Vi(1)'], "
                   "reduction_op='Sum', axis=1)\n"
                   "g(np.ones((2, 1)), backend='cpu')", None),
    "400 Gaussians": ("import numpy as np, lazymat as lm\n"
                      "x = np.random.rand(5, 2)\n"
                      "K = sum((-lm.Vi(x).sqdist(lm.Vj(x)) * (1 + k / 400)).exp() "
                      "for k in range(400))\n"
                      "K.sum(1, backend='cpu')", "item 4 (scaffold)"),
    "Sin 1000 deep": ("import numpy as np, lazymat as lm\n"
                      "f = lm.Vi(np.random.rand(5, 1)) - lm.Vj(np.random.rand(6, 1))\n"
                      "for _ in range(1000):\n"
                      "    f = f.sin()\n"
                      "f.sum(1, backend='cpu')", "item 4 (scaffold)"),
}

_CRASH_WRAPPER = """
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, (8 << 30, 8 << 30))  # runaway allocations fail fast
import lazymat as lm
try:
    exec(sys.argv[1])
except lm.CompileError:
    raise  # a size the kernel cannot serve is a ShapeError before compiling
except lm.LazymatError as e:
    print("lazymat error:", type(e).__name__, str(e)[:200])
"""


# Items 2 and 4 (owner given) take a minute or more on 2 cores: slow (tests/test_scaffold.py
# covers them in `make test` at smaller sizes); item 5's (owner None) run in `make test`.
@pytest.mark.parametrize("name", [
    pytest.param(name, marks=[pytest.mark.slow] if owner else [])
    for name, (_, owner) in _CRASHERS.items()])
def test_known_crashers_end_in_a_lazymat_error_or_a_result(name, request):
    code, _ = _CRASHERS[name]
    env = dict(os.environ, PYTHONPATH=SRC, LAZYMAT_NUM_THREADS="1")
    try:
        res = subprocess.run([sys.executable, "-c", _CRASH_WRAPPER, code], env=env,
                             capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{name}: hung for 120 s")
    assert res.returncode == 0, (f"{name}: exit code {res.returncode}\n{res.stderr[-2000:]}")


if __name__ == "__main__":
    _worker(sys.argv[1], int(sys.argv[2]), bool(int(sys.argv[3])))
