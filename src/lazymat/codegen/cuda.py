"""The CUDA scaffold: one thread per output row, j-tiles staged in shared memory.

The formula is rendered by the same :class:`~lazymat.codegen.c_like.Emitter` as
on the CPU, and the reduction by the same C code (``reductions.py``), with one
lane per thread (``LANES = 1``); only the scaffold and a few spellings differ:

- a block of ``BLOCK`` threads reduces one *task*: at most ``BLOCK`` consecutive
  rows of one output range, thread ``x`` owning row ``i0 + x`` (threads past the
  end of the task compute a copy of the last row, so that every thread reaches
  every ``__syncthreads()``, and store nothing);
- the columns of each reduction interval are walked in tiles of ``JT`` columns:
  the block copies the tile of every j-variable into ``__shared__`` memory
  (coalesced), computes the nodes that depend on j only (e.g. ``|y_j|²``) once
  per column into shared memory, then every thread runs the stages of the
  formula and the reduction's ``c_tile`` over the tile, ``TJ`` columns at a time
  (``TJ`` is a compile-time constant, so the stage buffers stay in registers);
- nodes of the parameters or of the row are computed once per task, as on the
  CPU, and the thread copies its row of each i-variable to registers (rows
  longer than ``MAX_ROW_REGISTERS`` are read in place); the prelude's math
  helpers are ``__device__`` functions.

When one column of the staged data does not fit the shared-memory budget
(huge dims), j-variables are read from global memory and j-only nodes computed
per thread, as in the CPU kernel.

Every kernel has the CPU kernel's signature, except that the array pointers are
passed by value (structs of ``nargs`` and of ``nouts`` pointers, so a launch uploads
nothing) and there is no thread count::

    namespace NAME_scope { struct Args { const void* p[nargs]; };
                           struct Outs { void* p[nouts]; }; }
    extern "C" __global__ void NAME(i64 M, i64 N, i64 nbatch, i64 nsplit, i64 chunk,
        const i64* offsets, i64 ntasks, const i64* tasks, const i64* slices,
        const i64* redranges, NAME_scope::Args args, NAME_scope::Outs outs)

(``i64`` is ``long long``.) Every pointer is device memory. The launch uses
``blockDim = (BLOCK, 1, 1)`` (the value rendered into the kernel's header comment
and ``BLOCK`` constant) and any number of blocks (a grid-stride loop covers the
``nsplit * nbatch * ntasks`` triples of (part, batch, task); at most ``65535 * 32``,
never 0). Tasks, slices, redranges and offsets mean what they
mean on the CPU, except that the tasks are blocks of at most ``BLOCK`` rows (build
them with ``BLOCK`` in place of the CPU's lane count). Batch ``b`` reads variable
``v`` at ``args.p[v] + offsets[b * nargs + v]`` and writes its M output rows after
those of batch ``b - 1``. With ``nsplit > 1`` the columns are also cut into parts of
``chunk`` columns: part ``s`` reduces the columns ``[s * chunk, (s + 1) * chunk)`` only
and writes its outputs after those of part ``s - 1`` (``nsplit * nbatch * M`` rows in
all), for the caller to combine (the reduction's ``split_with``/``state_of``/``merge``):
this gives a GPU enough blocks when M is small. ``nsplit = 1, chunk = N`` is the plain
reduction. :mod:`lazymat.backends.cuda` launches them.

>>> from lazymat.formula import Var, SqDist, apply
>>> from lazymat.reductions import REDUCTIONS
>>> f = apply("Exp", -SqDist(Var(0, 3, 0), Var(1, 3, 1)))
>>> spec = KernelSpec(REDUCTIONS["Sum"], f, None, None, "float32", ((3, 0), (3, 1)))
>>> 'extern "C" __global__' in render(spec, name="lm_gauss")
True
"""

from __future__ import annotations

import re
from typing import Mapping

from ..formula import Node, to_string, variables
from .c_like import Emitter, KernelSpec, ReductionContext, output_pointers, prelude

__all__ = ["BLOCK", "KernelSpec", "render", "render_module", "cuda_prelude"]

#: Threads per block = rows per task.
BLOCK = 128
#: Bytes of shared memory a block may use for its tile (the static limit is 48 KiB).
SHARED_BUDGET = 32 * 1024
#: At most this many columns per stage pass, and about this many registers for their buffers.
MAX_TJ = 4
REGISTER_BUDGET = 48
#: An i-variable of at most this dim is copied to a per-thread array once per task (registers,
#: or local memory, whose accesses are coalesced across a warp); longer ones are read in place,
#: where each thread reads its own row: a strided access, a cache line per thread.
MAX_ROW_REGISTERS = 128

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


# --------------------------------------------------------------------------- spellings

#: ``__builtin_bit_cast(type, x)`` -> the CUDA intrinsic reinterpreting x as ``type``.
_BIT_CASTS = {"int": "__float_as_int", "float": "__int_as_float",
              "long long": "__double_as_longlong", "double": "__longlong_as_double"}
_BIT_CAST = re.compile(r"__builtin_bit_cast\(\s*(int|float|long long|double)\s*,\s*")
#: GCC builtins with no CUDA equivalent name: spelled as bit patterns.
_SPECIAL = {
    re.compile(r'__builtin_inff\(\s*\)'): "__int_as_float(0x7f800000)",
    re.compile(r'__builtin_inf\(\s*\)'): "__longlong_as_double(0x7ff0000000000000LL)",
    re.compile(r'__builtin_nanf\(\s*""\s*\)'): "__int_as_float(0x7fffffff)",
    re.compile(r'__builtin_nan\(\s*""\s*\)'): "__longlong_as_double(0x7ff8000000000000LL)",
}
#: GCC math builtins whose CUDA device function has the same name without the prefix.
_MATH = {f"{name}{suffix}" for suffix in ("", "f") for name in (
    "sqrt", "fabs", "rint", "floor", "ceil", "trunc", "round", "exp", "exp2", "log", "log2",
    "sin", "cos", "tan", "pow", "acos", "asin", "atan", "atan2", "sinh", "cosh", "tanh",
    "fmin", "fmax", "fma", "copysign", "hypot", "cbrt", "erf", "expm1", "log1p")}
_BUILTIN = re.compile(r"__builtin_(\w+)")
_OMP_PRAGMA = re.compile(r"^\s*#\s*pragma\s+omp\b.*$\n?", re.M)


def _cuda_spelling(source: str) -> str:
    """The CPU C text in CUDA spelling: GCC builtins -> CUDA device functions, no OpenMP."""
    source = _OMP_PRAGMA.sub("", source)
    source = _BIT_CAST.sub(lambda m: _BIT_CASTS[m.group(1)] + "(", source)
    for pattern, text in _SPECIAL.items():
        source = pattern.sub(text, source)

    def math(m: re.Match) -> str:
        if m.group(1) not in _MATH:
            raise ValueError(f"the CUDA renderer has no spelling for __builtin_{m.group(1)} "
                             "(add it to lazymat.codegen.cuda._MATH or _SPECIAL)")
        return m.group(1)

    return _BUILTIN.sub(math, source)


def cuda_prelude() -> str:
    """The C prelude (lm_exp & co, float and double overloads) as ``__device__`` functions."""
    return _cuda_spelling(prelude(target="cuda"))


# --------------------------------------------------------------------------- planning

class _Plan:
    """Where each variable and node lives in the CUDA kernel (see the module docstring)."""

    def __init__(self, spec: KernelSpec, block: int):
        self.T = "float" if spec.dtype == "float32" else "double"
        self.size = 4 if self.T == "float" else 8
        self.block = block
        self.roots = roots = [spec.formula] + ([spec.weight] if spec.weight is not None else [])
        self.j_vars = sorted({n.params[0]: n.params[1] for r in roots for n in variables(r)
                              if n.params[2] == 1}.items())
        self.staged = True
        em = _ThreadEmitter(roots, self.T, self.var_access, shared=True)
        per_column = (sum(d for _, d in self.j_vars)
                      + sum(n.dim for n in em.at_level(2))) * self.size
        jt = block
        while jt > 1 and jt * per_column > SHARED_BUDGET:
            jt //= 2
        if per_column > SHARED_BUDGET:  # not even one column: global memory, as on the CPU
            self.staged, jt = False, block  # (then a tile only groups stage passes)
        self.jt = jt
        self.em = em if self.staged else _ThreadEmitter(roots, self.T, self.var_access, False)
        per_pair = sum(n.dim for n in self.em.at_level(3)) + 2
        if not self.staged:
            per_pair += sum(n.dim for n in self.em.at_level(2))
        tj = MAX_TJ
        while tj > 1 and tj * per_pair > REGISTER_BUDGET:
            tj //= 2
        self.tj = tj

    def var_access(self, node: Node, k: str) -> str:
        index, dim, cat = node.params
        if cat == 0:
            if dim <= MAX_ROW_REGISTERS:
                return f"xv{index}[{k}][0]"
            return f"a{index}[row * {dim} + {k}]"  # long rows: read in place (L1)
        if cat == 1:
            if self.staged:
                return f"ys{index}[(jt + jj) * {dim} + {k}]"
            return f"a{index}[(j0 + jj) * {dim} + {k}]"
        return f"a{index}[{k}]"


class _ThreadEmitter(Emitter):
    """Buffers of one lane (``[k][jj][0]``); with ``shared``, the nodes of the columns only
    (level 2) live in the block's shared tile, ``[k][column]``."""

    def __init__(self, roots: list[Node], T: str, var_access, shared: bool):
        super().__init__(roots, T, var_access)
        self.shared = shared

    def access(self, node: Node, k: int | str) -> str:
        k = 0 if node.dim == 1 else k
        name = self.materialized[id(node)]
        if node.deps == 2 and self.shared:
            return f"{name}[{k}][jt + jj]"
        return f"{name}[{k}][{'jj' if node.deps & 2 else '0'}][0]"


# --------------------------------------------------------------------------- rendering

def _indent(lines: list[str], n: int) -> list[str]:
    return [" " * n + s for s in lines]


def _stage(em: Emitter, node: Node, tj: int) -> list[str]:
    """Statements computing ``node`` on the ``tj`` columns of the current stage pass."""
    width = em.jam_width(node)
    lines: list[str] = []
    start = "0"
    if 1 < width <= tj:  # several columns at once: independent accumulation chains
        lines += [f"for (int jj = 0; jj + {width} <= tj; jj += {width})"]
        lines += _indent(em.body(node, width), 2)
        start = f"tj - tj % {width}"
    lines += [f"for (int jj = {start}; jj < tj; jj++)"] + _indent(em.body(node), 2)
    return lines


def _kernel(spec: KernelSpec, name: str, block: int) -> list[str]:
    if not _NAME.match(name):
        raise ValueError(f"kernel name {name!r} is not a C identifier")
    plan = _Plan(spec, block)
    em, T, tj, jt = plan.em, plan.T, plan.tj, plan.jt
    rc = ReductionContext(spec, em, T)
    red = spec.reduction
    nargs = len(spec.arg_dims)
    used = sorted({v.params[0] for r in plan.roots for v in variables(r)})
    i_vars = [(v, d) for v, (d, c) in enumerate(spec.arg_dims)
              if c == 0 and v in used and d <= MAX_ROW_REGISTERS]
    outputs = _indent(output_pointers(spec, T, "outs.p", "(part * nbatch + b) * M"), 4)
    store = red.c_state_store if spec.store == "state" else red.c_store

    header = [f"// lazymat CUDA kernel {name}: {red.name} over j of {to_string(spec.formula)}"]
    if spec.weight is not None:
        header.append(f"// weight: {to_string(spec.weight)}")
    header.append(f"// dtype {spec.dtype}, K = {spec.K}; launch with blockDim.x = {block} "
                  f"(rows per task); tiles of {jt} columns in "
                  f"{'shared' if plan.staged else 'global'} memory, {tj} per stage pass")

    # Per-thread buffers: parameters, the row, and the pairs of one stage pass.
    decls = [f"T xv{v}[{d}][LANES];" for v, d in i_vars]
    decls += [em.declaration(n, tj, 1) for lv in (0, 1, 3) for n in em.at_level(lv)]
    shared: list[str] = []
    level2: list[str] = []
    if plan.staged:
        shared = [f"__shared__ T ys{v}[{jt * d}];" for v, d in plan.j_vars]
        shared += [f"__shared__ T {em.materialized[id(n)]}[{n.dim}][JT];"
                   for n in em.at_level(2)]
        for n in em.at_level(2):
            level2 += em.body(n)
    else:
        decls += [em.declaration(n, tj, 1) for n in em.at_level(2)]
        for n in em.at_level(2):
            level2 += _stage(em, n, tj)

    level0 = [s for n in em.at_level(0) for s in em.body(n)]
    level1 = [s for n in em.at_level(1) for s in em.body(n)]

    def stage_pass(width: int) -> list[str]:
        """One pass over ``width`` columns starting at ``jt`` of the tile (``j0`` globally)."""
        body = [f"const int tj = {width};", "const i64 j0 = jb + jt;", "(void)j0;"]
        if not plan.staged:
            body += level2
        for n in em.at_level(3):
            body += _stage(em, n, width)
        return ["{"] + _indent(body + red.c_tile(rc), 2) + ["}"]

    if plan.staged:
        load = ["__syncthreads();  // every thread is done with the previous tile"]
        load += [f"for (int e = threadIdx.x; e < nj * {d}; e += BLOCK) "
                 f"ys{v}[e] = a{v}[jb * {d} + e];" for v, d in plan.j_vars]
        load.append("__syncthreads();")
        if level2:  # nodes of the columns only: once per column, by the block
            load += ["for (int jc = threadIdx.x; jc < nj; jc += BLOCK) {",
                     "  const int jt = 0, jj = jc;"] + _indent(level2, 2) + ["}",
                                                                          "__syncthreads();"]
    else:
        load = []
    passes = ["int jt = 0;", "for (; jt + TJ <= nj; jt += TJ)"] + _indent(stage_pass(tj), 2)
    if tj > 1:
        passes += ["for (; jt < nj; jt++)"] + _indent(stage_pass(1), 2)

    body = [
        *_indent(shared, 2),
        *[f"  const T* base{v} = (const T*)args.p[{v}];" for v in used],
        "  (void)N;",
        *_indent(decls, 2),
        "  for (i64 task = blockIdx.x; task < nsplit * nbatch * ntasks; task += gridDim.x) {",
        "    const i64 part = task / (nbatch * ntasks), bt = task % (nbatch * ntasks);",
        "    const i64 b = bt / ntasks, t = bt % ntasks;",
        "    const i64 jlo = part * chunk, jhi = jlo + chunk;  // this part's columns",
        "    const i64 i0 = tasks[3 * t], c = tasks[3 * t + 2];",
        "    const int nl = (int)(tasks[3 * t + 1] - i0);",
        "    const bool active = (int)threadIdx.x < nl;",
        "    const i64 row = i0 + (active ? (int)threadIdx.x : nl - 1);",
        *[f"    const T* a{v} = base{v} + offsets[b * {nargs} + {v}];" for v in used],
        *outputs,
        *_indent(level0, 4),
        *[f"    for (int k = 0; k < {d}; k++) xv{v}[k][0] = a{v}[row * {d} + k];"
          for v, d in i_vars],
        *_indent(level1, 4),
        *_indent(red.c_decl(rc), 4),
        "    for (i64 q = c ? slices[c - 1] : 0; q < slices[c]; q++) {",
        "      const i64 jend = redranges[2 * q + 1] < jhi ? redranges[2 * q + 1] : jhi;",
        "      for (i64 jb = redranges[2 * q] > jlo ? redranges[2 * q] : jlo; jb < jend;",
        "           jb += JT) {",
        "        const int nj = jend - jb < JT ? (int)(jend - jb) : JT;",
        *_indent(load, 8),
        *_indent(passes, 8),
        "      }",
        "    }",
        "    if (active)",
        "      for (int l = 0; l < LANES; l++) {",
        *_indent(store(rc), 8),
        "      }",
        "  }",
    ]
    return [
        *header,
        f"namespace {name}_scope {{",
        f"typedef {T} T;",
        "constexpr int LANES = 1;  // one row per thread",
        f"constexpr int BLOCK = {block};  // threads per block = rows per task",
        f"constexpr int JT = {jt};  // columns per tile",
        f"constexpr int TJ = {tj};  // columns per stage pass",
        f"struct Args {{ const void* p[{max(1, nargs)}]; }};  // by value: no upload per call",
        f"struct Outs {{ void* p[{max(1, len(spec.stored))}]; }};",
        f'extern "C" __global__ void __launch_bounds__(BLOCK) {name}(',
        "    i64 M, i64 N, i64 nbatch, i64 nsplit, i64 chunk, const i64* __restrict__ offsets,",
        "    i64 ntasks,",
        "    const i64* __restrict__ tasks, const i64* __restrict__ slices,",
        "    const i64* __restrict__ redranges, Args args, Outs outs) {",
        *body,
        "}",
        f"}}  // namespace {name}_scope",
    ]


def render_module(kernels: Mapping[str, KernelSpec], block: int = BLOCK) -> str:
    """CUDA source of one translation unit holding a kernel per ``name -> spec``
    (one prelude; each kernel's constants in its own namespace).

    >>> from lazymat.formula import Var, SqDist
    >>> from lazymat.reductions import REDUCTIONS
    >>> f = SqDist(Var(0, 2, 0), Var(1, 2, 1))
    >>> src = render_module({f"k_{t}": KernelSpec(REDUCTIONS["Min"], f, None, None, t,
    ...                      ((2, 0), (2, 1))) for t in ("float32", "float64")})
    >>> src.count('extern "C" __global__')
    2
    """
    lines = ["// lazymat CUDA module (one thread per output row)", cuda_prelude(),
             "#define INFINITY_T ((T)__builtin_inf())"]
    for name, spec in kernels.items():
        lines += [""] + _kernel(spec, name, block)
    return _cuda_spelling("\n".join(lines)) + "\n"


def render(spec: KernelSpec, name: str = "lm_kernel", block: int = BLOCK) -> str:
    """CUDA source of the kernel for ``spec``, a ``extern "C" __global__`` function ``name``
    launched with ``block`` threads per block (see the module docstring)."""
    return render_module({name: spec}, block)
