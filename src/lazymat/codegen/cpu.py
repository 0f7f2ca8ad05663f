"""The CPU scaffold: lane-vectorized, tiled, OpenMP-threaded reduction kernels.

Rows are processed in blocks of LANES (the SIMD lanes: the compiler vectorizes
every loop over ``l``); columns in tiles of TJ, small enough for the tile
buffers to stay in L1. Each materialized node of the formula is one stage over
the whole tile (distances, then exp, then accumulate), which keeps dependency
chains short. Nodes that depend on the row only are computed once per block,
on parameters only once per call.

Every kernel has the same C signature::

    void lm_kernel(i64 M, i64 N, i64 nbatch, const i64* offsets, i64 ntasks,
                   const i64* tasks, const i64* slices, const i64* redranges, void** args,
                   void** outs, int threads)

where ``args[v]`` points at the contiguous data of variable ``v``; batch ``b``
reads variable ``v`` at ``args[v] + offsets[b * nargs + v]`` (offsets are 0
along broadcast batch dims) and writes its M rows of output ``k`` at ``outs[k]`` after those of
batch ``b - 1`` (``KernelSpec.stored``: the reduction's outputs, or its raw state). The threads share the (batch, task) pairs; a task is a block of at
most LANES rows ``[tasks[3t], tasks[3t+1])`` of one output range ``c =
tasks[3t+2]``, reduced over the column intervals ``redranges[slices[c-1] ..
slices[c]]`` (block-sparse ranges; without them, one range of all rows and
one interval of all columns).
"""

from __future__ import annotations

from ..formula import Node, to_string
from .c_like import (Emitter, KernelSpec, ReductionContext, has_vector_math, output_pointers,
                     prelude)

L1_BUDGET = 16 * 1024  # bytes of tile buffers per thread we aim to keep in L1
LANES = {"float32": 16, "float64": 8}  # rows per block: two AVX2 registers
MAX_TJ = 64


def _var_access(node: Node, k: str) -> str:
    index, dim, cat = node.params
    if cat == 0:
        return f"xv{index}[{k}][l]"
    if cat == 1:
        return f"a{index}[(j0 + jj) * {dim} + {k}]"
    return f"a{index}[{k}]"


def _indent(lines: list[str], n: int) -> list[str]:
    return [" " * n + s for s in lines]


def render(spec: KernelSpec) -> str:
    """C++ source of the kernel for ``spec`` (readable: the formula is in its header)."""
    T = "float" if spec.dtype == "float32" else "double"
    lanes = LANES[spec.dtype]
    roots = [spec.formula] + ([spec.weight] if spec.weight is not None else [])
    em = Emitter(roots, T, _var_access)
    size = 4 if T == "float" else 8
    per_pair = sum(n.dim for n in em.at_level(3)) * lanes * size + 2 * lanes * size
    tj = MAX_TJ
    while tj > 1 and tj * per_pair > L1_BUDGET:
        tj //= 2
    rc = ReductionContext(spec, em, T)
    red = spec.reduction
    store = red.c_state_store if spec.store == "state" else red.c_store

    header = [f"// lazymat kernel: {red.name} over j of {to_string(spec.formula)}"]
    if spec.weight is not None:
        header.append(f"// weight: {to_string(spec.weight)}")
    header += [f"// dtype {spec.dtype}, K = {spec.K}, lanes {lanes}, tile {tj}, accumulation "
               f"{' '.join(spec.accumulation)}",
               f"typedef {T} T;",
               f"#define LANES {lanes}",
               f"#define TJ {tj}",
               "#define INFINITY_T ((T)__builtin_inf())"]

    nargs = len(spec.arg_dims)
    bases = [f"const T* base{v} = (const T*)args[{v}];" for v in range(nargs)]
    args = [f"const T* a{v} = base{v} + offsets[b * {nargs} + {v}];" for v in range(nargs)]
    i_vars = [(v, d) for v, (d, c) in enumerate(spec.arg_dims) if c == 0]

    # Parameter-level nodes are computed per block of rows: parameters may differ by batch.
    level0 = []
    for n in em.at_level(0):
        level0 += em.body(n)

    thread_decls = [f"T xv{v}[{d}][LANES];" for v, d in i_vars]
    thread_decls += [em.declaration(n, tj, lanes) for lv in (0, 1, 2, 3) for n in em.at_level(lv)]

    load = [f"for (int k = 0; k < {d}; k++) for (int l = 0; l < LANES; l++) "
            f"xv{v}[k][l] = a{v}[(i0 + (l < nl ? l : nl - 1)) * {d} + k];" for v, d in i_vars]
    level1 = []
    for n in em.at_level(1):
        level1 += ["#pragma omp simd", "for (int l = 0; l < LANES; l++)"] + _indent(em.body(n), 2)
    level2 = []
    for n in em.at_level(2):
        level2 += ["for (int jj = 0; jj < tj; jj++)"] + _indent(em.body(n), 2)
    level3 = []
    for n in em.at_level(3):
        width = em.jam_width(n)
        start = "0"
        if width > 1:  # several columns at once: independent accumulation chains
            level3 += [f"for (int jj = 0; jj + {width} <= tj; jj += {width}) {{",
                       "  #pragma omp simd", "  for (int l = 0; l < LANES; l++)"]
            level3 += _indent(em.body(n, width), 4) + ["}"]
            start = f"tj - tj % {width}"
        level3 += [f"for (int jj = {start}; jj < tj; jj++) {{", "  #pragma omp simd",
                   "  for (int l = 0; l < LANES; l++)"] + _indent(em.body(n), 4) + ["}"]

    lines = header + [prelude(has_vector_math()),
                      'extern "C" void lm_kernel(i64 M, i64 N, i64 nbatch, const i64* offsets, '
                      "i64 ntasks, const i64* tasks, const i64* slices, const i64* redranges, "
                      "void** args, void** outs, int threads) {",
                      *_indent(bases, 2),
                      "  (void)N;",
                      "  #pragma omp parallel num_threads(threads)",
                      "  {",
                      *_indent(thread_decls, 4),
                      "    #pragma omp for schedule(dynamic, 1)",
                      "    for (i64 task = 0; task < nbatch * ntasks; task++) {",
                      "      const i64 b = task / ntasks, t = task % ntasks;",
                      "      const i64 i0 = tasks[3 * t], c = tasks[3 * t + 2];",
                      *_indent(args, 6),
                      *_indent(output_pointers(spec, T, "outs", "b * M"), 6),
                      *_indent(level0, 6),
                      "      const int nl = tasks[3 * t + 1] - i0 < LANES ? "
                      "(int)(tasks[3 * t + 1] - i0) : LANES;",
                      *_indent(load, 6),
                      *_indent(level1, 6),
                      *_indent(red.c_decl(rc), 6),
                      "      for (i64 q = c ? slices[c - 1] : 0; q < slices[c]; q++) {",
                      "        const i64 jend = redranges[2 * q + 1];",
                      "        for (i64 j0 = redranges[2 * q]; j0 < jend; j0 += TJ) {",
                      "          const int tj = jend - j0 < TJ ? (int)(jend - j0) : TJ;",
                      *_indent(level2, 10),
                      *_indent(level3, 10),
                      *_indent(red.c_tile(rc), 10),
                      "        }",
                      "      }",
                      "      for (int l = 0; l < nl; l++) {",
                      "        const i64 row = i0 + l;",
                      *_indent(store(rc), 8),
                      "      }",
                      "    }",
                      "  }",
                      "}"]
    return "\n".join(lines) + "\n"
