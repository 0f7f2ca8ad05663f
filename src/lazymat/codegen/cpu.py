"""The CPU target: lane-vectorized, tiled, OpenMP-threaded reduction kernels.

Rows are processed in blocks of LANES (the SIMD lanes: the compiler vectorizes
every loop over ``l``); columns in tiles of TJ, small enough for the tile
buffers to stay in L1. Each materialized node of the formula is one stage over
the whole tile (distances, then exp, then accumulate), which keeps dependency
chains short. Nodes that depend on the row only are computed once per block,
on parameters only once per block of rows (parameters may differ by batch).

The skeleton is :mod:`lazymat.codegen.scaffold` (the kernel ABI is documented there);
this module declares what is particular to the CPU.

>>> from lazymat.formula import Var, SqDist
>>> from lazymat.reductions import REDUCTIONS
>>> spec = KernelSpec(REDUCTIONS["Sum"], SqDist(Var(0, 2, 0), Var(1, 2, 1)), None, None,
...                   "float64", ((2, 0), (2, 1)))
>>> "#pragma omp parallel" in render(spec)
True
"""

from __future__ import annotations

from .c_like import KernelSpec, has_vector_math, prelude
from .scaffold import Kernel, Target, indent, kernel_lines

__all__ = ["CPU", "CPU_CLANG", "KernelSpec", "LANES", "render"]

L1_BUDGET = 16 * 1024  # bytes of tile buffers per thread we aim to keep in L1
LANES = {"float32": 16, "float64": 8}  # rows per block: two AVX2 registers
MAX_TJ = 64


class CpuTarget(Target):
    name = "cpu"
    lanes = LANES
    simd = "#pragma omp simd"
    defines = ("#define LM_PRAGMA(x) _Pragma(#x)",
               "#define LM_SIMD LM_PRAGMA(omp simd)",
               "#define LM_SIMD_OR(v) LM_PRAGMA(omp simd reduction(|:v))",
               "#define INFINITY_T ((T)LM_INF_F)")
    max_pass = MAX_TJ
    pass_budget = L1_BUDGET
    thread_indent = 2

    def row_of_lane(self, kern: Kernel) -> str:
        return "(i0 + (l < nl ? l : nl - 1))"

    def head(self, kern: Kernel, name: str) -> list[str]:
        return [f"typedef {kern.T} T;",
                f"#define LANES {kern.lanes}",
                f"#define TJ {kern.tj}",
                f'{self.kernel} void {name}(i64 M, i64 N, i64 nbatch, const i64* offsets, '
                "i64 ntasks, const i64* tasks, const i64* slices, const i64* redranges, "
                "void** args, void** outs, int threads) {"]

    def open_threads(self, kern: Kernel) -> list[str]:
        lines = ["#pragma omp parallel num_threads(threads) if(threads > 1)", "{"]
        if kern.heap_bytes:  # one block per thread for the large buffers, outside the loop
            lines += [f"  char* lm_heap = (char*)malloc({kern.heap_bytes});",
                      "  if (!lm_heap) __builtin_trap();  // sizes were checked before compiling"]
        return lines

    def close_threads(self, kern: Kernel) -> list[str]:
        return (["  free(lm_heap);"] if kern.heap_bytes else []) + ["}"]

    def task_loop(self, kern: Kernel) -> list[str]:
        return ["#pragma omp for schedule(dynamic, 1)",
                "for (i64 task = 0; task < nbatch * ntasks; task++) {",
                "  const i64 b = task / ntasks, t = task % ntasks;",
                "  const i64 i0 = tasks[3 * t], c = tasks[3 * t + 2];"]

    def rows(self, kern: Kernel) -> list[str]:
        return ["const int nl = tasks[3 * t + 1] - i0 < LANES ? "
                "(int)(tasks[3 * t + 1] - i0) : LANES;"]

    def store_rows(self, kern: Kernel, store: list[str]) -> list[str]:
        return ["for (int l = 0; l < nl; l++) {", "  const i64 row = i0 + l;",
                *indent(store, 2), "}"]


class CpuClangTarget(CpuTarget):
    """The CPU for clang (zig's, Apple's): long sums over components with the lane loop
    innermost, which clang's vectorizer needs (9x faster at D = 64 with zig's clang)."""

    inner_lanes = "LM_SIMD for (int l = 0; l < LANES; l++)"


CPU = CpuTarget()
CPU_CLANG = CpuClangTarget()

#: malloc/free without <stdlib.h> (no headers: the cold compile stays fast).
_HEAP = ('extern "C" void* malloc(__SIZE_TYPE__ size);', 'extern "C" void free(void* p);')


def render(spec: KernelSpec, clang: bool = False) -> str:
    """C++ source of the kernel for ``spec`` (readable: the formula is in its header);
    ``clang``: shaped for clang's vectorizer (:class:`CpuClangTarget`)."""
    target = CPU_CLANG if clang else CPU
    return "\n".join([*target.defines, prelude(has_vector_math()), *_HEAP,
                      *kernel_lines(spec, target, "lm_kernel")]) + "\n"
