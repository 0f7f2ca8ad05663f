"""CUDA code generation, without a GPU.

1. Every op (a Sum over each row of ``tests/test_ops.py``) and every reduction
   (over a Gaussian-like formula) renders to CUDA C that compiles, in float32
   and float64, with NVRTC (when ``cuda-bindings`` is importable) and with
   ``nvcc -arch=sm_90 --cubin`` (when on PATH). Kernels are batched: one
   translation unit per (group, dtype), all compiled concurrently once per
   session; a kernel whose unit fails is recompiled alone for its own error.
2. The scaffold's semantics (threads = rows, shared-memory tiles, barriers,
   stage passes, batch offsets, block-sparse ranges) are checked by running the
   *same CUDA source* on the CPU: a small shim maps a block's threads onto an
   OpenMP team (``__syncthreads`` = ``omp barrier``, ``__shared__`` = one static
   array for the team), and the result is compared with the reference backend.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import os
import pickle
import re
import shutil
import subprocess
import threading
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_close
from test_ops import ROWS, make_data, reduce_sum, variables

from lazymat.codegen import cuda
from lazymat.codegen.cpu import KernelSpec
from lazymat.compile import compiler_info, load_library, nvrtc
from lazymat.formula import Const, Scalprod, SqDist, Var, apply, make
from lazymat.formula import variables as formula_variables
from lazymat.plan import Request, run
from lazymat.reductions import REDUCTIONS
from lazymat.reductions import get as get_reduction

NVCC = shutil.which("nvcc")
HAVE_NVRTC = nvrtc.available()
_HOST = compiler_info()
HAVE_EMULATION = _HOST is not None and _HOST.openmp
if not (NVCC or HAVE_NVRTC or HAVE_EMULATION):
    pytest.skip("neither nvcc, NVRTC nor an OpenMP C++ compiler is available",
                allow_module_level=True)

ARCH = "sm_90"
DTYPES = ("float32", "float64")
COMPILERS = [pytest.param("nvrtc", marks=pytest.mark.skipif(not HAVE_NVRTC,
                                                            reason="NVRTC not importable")),
             pytest.param("nvcc", marks=pytest.mark.skipif(NVCC is None,
                                                           reason="nvcc not on PATH"))]
requires_emulation = pytest.mark.skipif(not HAVE_EMULATION,
                                        reason="no C++ compiler with OpenMP")


# --------------------------------------------------------------------------- the kernels

def arg_dims(roots, nargs: int) -> tuple[tuple[int, int], ...]:
    dims = [(1, 2)] * nargs
    for r in roots:
        for v in formula_variables(r):
            pos, dim, cat = v.params
            dims[pos] = (dim, cat)
    return tuple(dims)


def spec_of(reduction: str, formula, weight=None, K=None, dtype="float32", nargs=None):
    roots = [formula] + ([weight] if weight is not None else [])
    if nargs is None:
        nargs = 1 + max(v.params[0] for r in roots for v in formula_variables(r))
    return KernelSpec(get_reduction(reduction), formula, weight, K, dtype, arg_dims(roots, nargs))


x, y, b, p = Var(0, 3, 0), Var(1, 3, 1), Var(2, 2, 1), Var(3, 1, 2)
GAUSS = make("Exp", (-SqDist(x, y) * p,)) * b  # dim 2: per-pair, per-column and parameter
SCALAR = -SqDist(x, y) * p


def reduction_case(name: str):
    """(formula, weight, K) exercising reduction ``name``."""
    red = REDUCTIONS[name]
    weight = b if red.weight != "none" else None
    return (SCALAR if red.scalar_formula else GAUSS), weight, (3 if red.needs_k else None)


# Scaffold corner cases: a long dot product (jam), a j-variable too large for the shared tile
# (global memory), one that leaves few columns per tile, a formula of parameters and j only
# per pair, an unused argument.
xl, yl = Var(0, 9, 0), Var(1, 9, 1)
SCAFFOLD = {
    "jam": ("Sum", Scalprod(xl, yl) * apply("SqNorm2", yl), None, None, 2),
    "huge_dim": ("Min_ArgMin", SqDist(Var(0, 8200, 0), Var(1, 8200, 1)), None, None, 2),
    "wide_dim": ("LogSumExp", -SqDist(Var(0, 1500, 0), Var(1, 1500, 1)), Var(2, 2, 1), None, 3),
    "unused_arg": ("KMin_ArgKMin", SqDist(x, y), None, 2, 4),
    "constant": ("Sum", Const(2) * x + apply("Sin", y) * p, None, None, 4),
}


def _groups() -> dict[tuple[str, str], dict[str, KernelSpec]]:
    groups: dict[tuple[str, str], dict[str, KernelSpec]] = {}
    for dtype in DTYPES:
        ops = groups[("ops", dtype)] = {}
        for k, row in enumerate(ROWS):
            f = row.build(variables(row.pdim))
            ops[f"op{k}_{dtype}"] = KernelSpec(REDUCTIONS["Sum"], f, None, None, dtype,
                                               arg_dims([f], 6))
        reds = groups[("reductions", dtype)] = {}
        for name in REDUCTIONS:
            f, w, K = reduction_case(name)
            reds[f"red_{name}_{dtype}"] = spec_of(name, f, w, K, dtype)
        for case, (name, f, w, K, nargs) in SCAFFOLD.items():
            reds[f"case_{case}_{dtype}"] = spec_of(name, f, w, K, dtype, nargs)
    return groups


GROUPS = _groups()
GROUP_OF = {name: key for key, kernels in GROUPS.items() for name in kernels}


# --------------------------------------------------------------------------- compiling

def _nvcc(source: str, path: Path) -> tuple[bool, str, bytes]:
    path.write_text(source)
    cubin = path.with_suffix(".cubin")
    res = subprocess.run([NVCC, f"-arch={ARCH}", "--cubin", "-std=c++17", "-o", str(cubin),
                          str(path)], capture_output=True, text=True)
    ok = res.returncode == 0 and cubin.exists()
    return ok, res.stdout + res.stderr, cubin.read_bytes() if ok else b""


def _nvrtc(source: str, path: Path) -> tuple[bool, str, bytes]:
    try:
        return True, "", nvrtc.compile_cubin(source, arch=ARCH, name=path.name)
    except Exception as e:  # noqa: BLE001 - CompileError: reported by the test
        return False, str(e), b""


class Builds:
    """Compiles every translation unit with every available compiler, concurrently, once per
    test run: the results (ok, log, cubin) are files in ``directory``, which pytest-xdist's
    workers share; a unit's lock file makes the first worker to reach it build it while the
    others wait for its result instead of compiling it again."""

    def __init__(self, directory: Path):
        self.dir, self.results, self.lock = directory, {}, threading.Lock()
        self.started = False

    def _build(self, compiler: str, key: tuple[str, str]) -> None:
        source = cuda.render_module(GROUPS[key])
        stem = f"{compiler}_{key[0]}_{key[1]}"
        path = self.dir / f"{stem}.cu"
        digest = hashlib.sha256(f"{compiler}\0{source}".encode()).hexdigest()[:16]
        done = self.dir / f"{stem}.{digest}.result"
        with open(self.dir / f"{stem}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # another worker building it: wait for it
            if not done.exists():
                ok, log, cubin = (_nvcc if compiler == "nvcc" else _nvrtc)(source, path)
                tmp = done.with_suffix(f".tmp{os.getpid()}")
                tmp.write_bytes(pickle.dumps((ok, log, cubin)))
                tmp.replace(done)
        self.results[(compiler, key)] = pickle.loads(done.read_bytes())

    def get(self, compiler: str, key: tuple[str, str]) -> tuple[bool, str, bytes]:
        with self.lock:
            if not self.started:
                self.started = True
                compilers = [c for c, ok in (("nvrtc", HAVE_NVRTC), ("nvcc", NVCC)) if ok]
                # The longest units first: two cores stay busy until the end.
                jobs = sorted(((c, k) for c in compilers for k in GROUPS),
                              key=lambda job: job[1][0] != "ops")
                threads = [threading.Thread(target=self._build, args=job) for job in jobs]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
        return self.results[(compiler, key)]


@pytest.fixture(scope="session")
def builds(tmp_path_factory) -> Builds:
    # Under xdist every worker has its own basetemp; their parent is this run's, shared.
    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    directory = shared / "cuda-builds"
    directory.mkdir(exist_ok=True)
    return Builds(directory)


def check_compiles(builds: Builds, compiler: str, name: str) -> None:
    key = GROUP_OF[name]
    ok, log, cubin = builds.get(compiler, key)
    if ok:
        assert name.encode() + b"\0" in cubin, f"{name} is not in the cubin of {key}"
        return
    # The unit failed: this kernel alone, for its own error (or a pass if another broke it).
    path = builds.dir / f"{compiler}_{name}.cu"
    source = cuda.render(GROUPS[key][name], name=name)
    ok, log, _ = (_nvcc if compiler == "nvcc" else _nvrtc)(source, path)
    assert ok, f"{compiler} fails on {name} ({path}):\n{log[-4000:]}"


OP_NAMES = [(f"op{k}", row.id) for k, row in enumerate(ROWS)]


@pytest.mark.parametrize("compiler", COMPILERS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op", OP_NAMES, ids=[i for _, i in OP_NAMES])
def test_every_op_compiles(builds, compiler, dtype, op):
    check_compiles(builds, compiler, f"{op[0]}_{dtype}")


@pytest.mark.parametrize("compiler", COMPILERS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", list(REDUCTIONS))
def test_every_reduction_compiles(builds, compiler, dtype, reduction):
    check_compiles(builds, compiler, f"red_{reduction}_{dtype}")


@pytest.mark.parametrize("compiler", COMPILERS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(SCAFFOLD))
def test_scaffold_cases_compile(builds, compiler, dtype, case):
    check_compiles(builds, compiler, f"case_{case}_{dtype}")


@pytest.mark.skipif(NVCC is None, reason="nvcc not on PATH")
@pytest.mark.parametrize("dtype", DTYPES)
def test_scaffold_compiles_without_warnings(builds, dtype):
    """The reduction kernels (the scaffold and every reduction's C) are warning-free."""
    ok, log, _ = builds.get("nvcc", ("reductions", dtype))
    assert ok, log[-4000:]
    assert "warning" not in log, log[-4000:]


# --------------------------------------------------------------------------- the source

def test_source_is_cuda_spelled():
    f, w, K = reduction_case("LogSumExp")
    src = cuda.render(spec_of("LogSumExp", f, w, K, "float64"), name="lm_lse")
    assert 'extern "C" __global__ void __launch_bounds__(BLOCK) lm_lse(' in src
    assert "#pragma omp" not in src and "__builtin_" not in src
    assert "__syncthreads();" in src and "__shared__ T ys1[" in src and "typedef double T;" in src
    assert "#define LM_INLINE __device__ __forceinline__" in src
    assert "// lazymat kernel lm_lse: LogSumExp over j of" in src  # readable header


def test_cpu_prelude_is_untouched():
    from lazymat.codegen.c_like import prelude

    before = prelude(False)
    cuda.cuda_prelude()
    assert prelude(False) == before and "__device__" not in before


def test_module_holds_distinct_kernels():
    kernels = GROUPS[("reductions", "float32")]
    src = cuda.render_module(kernels)
    assert src.count('extern "C" __global__') == len(kernels)
    assert src.count("LM_INLINE float lm_exp(float x)") == 1
    with pytest.raises(ValueError, match="not a C identifier"):
        cuda.render(next(iter(kernels.values())), name="bad-name")


def test_kernels_come_from_one_scaffold():
    """The CPU and CUDA kernels are the same skeleton: the reduction's pieces and every
    stage appear in both, spelled for each target by its declared attributes only."""
    from lazymat.codegen import cpu as cpu_codegen

    f, w, K = reduction_case("KMin_ArgKMin")
    spec = spec_of("KMin_ArgKMin", f, w, K, "float32")
    gpu, host = cuda.render(spec, name="lm_k"), cpu_codegen.render(spec)
    for text in (gpu, host):
        assert "LM_SIMD_OR(pass)" in text and "for (i64 q = c ? slices[c - 1] : 0;" in text
    assert "#define LM_SIMD_OR(v)\n" in gpu and "omp" not in gpu
    assert "#pragma omp simd" in host and "__syncthreads" not in host


# --------------------------------------------------------------------------- running on the CPU

SHIM = r"""
// CUDA on the CPU, for tests: a block's threads are an OpenMP team.
#include <math.h>
#include <string.h>
#include <omp.h>
#define __global__
#define __device__
#define __forceinline__ inline __attribute__((always_inline))
#define __launch_bounds__(n)
#define __shared__ static
#define __syncthreads() _Pragma("omp barrier")
struct lm_dim3 { unsigned x; };
static thread_local lm_dim3 threadIdx;
static const lm_dim3 blockIdx = {0}, gridDim = {1};
static inline int __float_as_int(float v) { int r; memcpy(&r, &v, 4); return r; }
static inline float __int_as_float(int v) { float r; memcpy(&r, &v, 4); return r; }
static inline long long __double_as_longlong(double v) { long long r; memcpy(&r, &v, 8); return r; }
static inline double __longlong_as_double(long long v) { double r; memcpy(&r, &v, 8); return r; }
"""

HOST = r"""
static int lm_team_ok = 1;
static i64 lm_nsplit = 1;  // column parts: the outputs then hold nsplit * nbatch * M rows
extern "C" int lm_emulation_ok(void) { return lm_team_ok; }
extern "C" void lm_set_split(i64 nsplit) { lm_nsplit = nsplit; }
extern "C" void lm_kernel(i64 M, i64 N, i64 nbatch, const i64* offsets, i64 ntasks,
                          const i64* tasks, const i64* slices, const i64* redranges,
                          void** args, void** outs, int threads) {
  (void)threads;
  omp_set_dynamic(0);
  #pragma omp parallel num_threads(%(block)d)
  {
    if (omp_get_num_threads() != %(block)d) { lm_team_ok = 0; }
    else {
      threadIdx.x = omp_get_thread_num();
      lm_cuda_scope::Args by_value;  // the kernel takes the pointers by value
      memcpy(by_value.p, args, sizeof by_value.p);
      lm_cuda_scope::Outs outs_by_value;
      memcpy(outs_by_value.p, outs, sizeof outs_by_value.p);
      lm_cuda_scope::lm_cuda(M, N, nbatch, lm_nsplit, (N + lm_nsplit - 1) / lm_nsplit, offsets,
                             ntasks, tasks, slices, redranges, by_value, outs_by_value);
    }
  }
}
"""


def emulate_with(monkeypatch, source_of, name: str) -> list:
    """Make the CPU backend load ``source_of(spec)`` (a CUDA kernel under the shim, with its
    HOST entry point) for every kernel; returns the libraries loaded, whose
    ``lm_emulation_ok()`` the caller checks at the end."""
    from lazymat.backends import cpu

    libs = []

    def kernel_for(spec: KernelSpec):
        lib = load_library(source_of(spec), name=f"{name}_{spec.reduction.name}")
        libs.append(lib)
        fn = lib.lm_kernel
        fn.argtypes, fn.restype = cpu.ARGTYPES, None
        return fn

    monkeypatch.setattr(cpu, "kernels", {})
    monkeypatch.setattr(cpu, "kernel_for", kernel_for)
    return libs


@pytest.fixture
def emulate(monkeypatch):
    """Make the CPU backend run the CUDA kernel (blocks of the CPU's lane count of threads,
    so that its tasks fill whole blocks)."""
    from lazymat.backends import cpu

    def source_of(spec: KernelSpec) -> str:
        block = cpu.LANES[spec.dtype]
        return SHIM + cuda.render(spec, name="lm_cuda", block=block) + HOST % {"block": block}

    libs = emulate_with(monkeypatch, source_of, "cuda_emulation")
    yield
    assert all(lib.lm_emulation_ok() for lib in libs), "OpenMP gave a team of the wrong size"


def _compare(got, want, dtype):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == w.dtype, (g.shape, w.shape, g.dtype, w.dtype)
        if g.dtype == np.int64:
            np.testing.assert_array_equal(g, w)
        else:
            with np.errstate(invalid="ignore"):  # inf - inf in the identity rows
                assert_close(g, w, dtype)


def _ranges(M: int, N: int, rng) -> tuple:
    from lazymat.ranges import from_matrix

    def clusters(n, parts):
        ends = np.cumsum(parts)
        assert ends[-1] == n
        return np.stack([ends - np.array(parts), ends], 1)

    ri, rj = clusters(M, [5, 17, 1, 14]), clusters(N, [10, 3, 20, 12])
    keep = rng.random((4, 4)) < 0.6
    keep[0, :] = False  # rows with nothing to reduce: the identity
    return from_matrix(ri, rj, keep)


@requires_emulation
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", list(REDUCTIONS))
def test_reduction_runs_like_reference(emulate, reduction, dtype):
    """Batch dims and block-sparse ranges, with partial tiles and stage passes."""
    rng = np.random.default_rng(7)
    M, N = 37, 45
    arrays = [rng.standard_normal((2, M, 3)), rng.standard_normal((2, N, 3)),
              rng.random((1, N, 2)) + 0.1, rng.random((2, 1)) + 0.5]
    arrays = [a.astype(dtype) for a in arrays]
    f, w, K = reduction_case(reduction)
    req = Request(reduction, f, K=K, weight=w)
    for ranges in (None, _ranges(M, N, rng)):
        _compare(run(req, arrays, backend="cpu", ranges=ranges),
                 run(req, arrays, backend="reference", ranges=ranges), dtype)


EMULATED_ROWS = ["Exp-levels", "Exp-param_j", "Kron-rank2", "Diff", "Laplacian"]


@requires_emulation
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("row", [r for r in ROWS if r.id in EMULATED_ROWS],
                         ids=lambda r: r.id)
def test_op_row_runs_like_reference(emulate, row, dtype):
    """Nodes of every level: parameters, rows, columns (in the shared tile), pairs."""
    data = make_data(row, 13, 33, dtype, seed=5)
    got = reduce_sum(row, data, "cpu", dtype=dtype)
    want = reduce_sum(row, data, "reference", dtype=dtype)
    _compare([got], [want], dtype)


def scaffold_arrays(case: str, M: int, N: int) -> tuple[list[np.ndarray], str]:
    """Random numpy arrays for the variables of SCAFFOLD[case] (M rows, N columns), and
    their dtype."""
    name, f, w, K, nargs = SCAFFOLD[case]
    rng = np.random.default_rng(3)
    arrays = []
    for pos in range(nargs):
        found = [v for r in (f, w) if r is not None for v in formula_variables(r)
                 if v.params[0] == pos]
        dim, cat = found[0].params[1:] if found else (1, 2)
        rows = {0: (M,), 1: (N,), 2: ()}[cat]
        arrays.append(rng.random(rows + (dim,)) + (0.1 if cat == 1 else 0))
    dtype = "float32" if case == "huge_dim" else "float64"
    return [a.astype(dtype) for a in arrays], dtype


@requires_emulation
@pytest.mark.parametrize("case", list(SCAFFOLD))
def test_scaffold_case_runs_like_reference(emulate, case):
    name, f, w, K, _ = SCAFFOLD[case]
    arrays, dtype = scaffold_arrays(case, 19, 23)
    req = Request(name, f, K=K, weight=w)
    _compare(run(req, arrays, backend="cpu"), run(req, arrays, backend="reference"), dtype)


def test_emulation_shim_is_kept_in_sync():
    """The shim defines every CUDA name the renderer uses."""
    f, w, K = reduction_case("KMin_ArgKMin")
    src = cuda.render(spec_of("KMin_ArgKMin", f, w, K, "float64"))
    used = set(re.findall(r"\b(__\w+__|__\w+|threadIdx|blockIdx|gridDim)\b", src))
    defined = set(re.findall(r"\b(__\w+__|__\w+|threadIdx|blockIdx|gridDim)\b", SHIM))
    missing = used - defined - {"__restrict__"}
    assert not missing, f"the CPU shim lacks {sorted(missing)}"


@requires_emulation
@pytest.mark.parametrize("reduction", list(REDUCTIONS))
def test_split_columns_run_like_reference(reduction):
    """``nsplit`` column parts, each kernel part storing its raw state (``store="state"``),
    merged in column order with the reduction's ``merge`` and finalized, equal the
    reduction."""
    import ctypes

    from lazymat.arraylib import NUMPY
    from lazymat.backends import cpu, launch

    red = REDUCTIONS[reduction]
    f, w, K = reduction_case(reduction)
    spec = dataclasses.replace(spec_of(reduction, f, w, K, "float64", nargs=4), store="state")
    block, nsplit, M, N = 8, 3, 21, 50
    source = SHIM + cuda.render(spec, name="lm_cuda", block=block) + HOST % {"block": block}
    lib = load_library(source, name=f"cuda_emulation_split_{reduction}")
    lib.lm_set_split(nsplit)
    fn = lib.lm_kernel
    fn.argtypes, fn.restype = cpu.ARGTYPES, None
    rng = np.random.default_rng(4)
    arrays = [rng.standard_normal((M, 3)), rng.standard_normal((N, 3)),
              rng.random((N, 2)) + 0.1, rng.random(1) + 0.5]
    shapes = spec.stored  # value: T, acc: double, index: long long
    outs = [np.full((nsplit, M) + shape, -7, dtype=np.int64 if kind == "index" else np.float64)
            for kind, shape in shapes]
    ntasks, tasks, slices, redranges, _ = launch.dense_layout(M, N, block)
    ptrs = (ctypes.c_void_p * 4)(*[a.ctypes.data for a in arrays])
    out_ptrs = (ctypes.c_void_p * len(outs))(*[o.ctypes.data for o in outs])
    fn(M, N, 1, launch.zero_offsets(4).ctypes.data, ntasks, tasks, slices, redranges, ptrs,
       out_ptrs, 1)
    assert lib.lm_emulation_ok()
    state = None
    for part in range(nsplit):
        s = tuple(o[part] for o in outs)
        state = s if state is None else red.merge(NUMPY, state, s, K=K)
    got = red.finalize(NUMPY, state)
    want = run(Request(reduction, f, K=K, weight=w), arrays, backend="reference")
    for g, wt in zip(got, want):
        np.testing.assert_allclose(g.reshape(wt.shape), wt, rtol=1e-12, atol=1e-12)
