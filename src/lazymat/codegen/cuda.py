"""The CUDA target: one thread per output row, j-tiles staged in shared memory.

The skeleton is :mod:`lazymat.codegen.scaffold` (the kernel ABI is documented there), the
same as on the CPU: the formula is rendered by the same Emitter and the reduction by the
same C code (``reductions.py``), with one row per thread (``LANES = 1``). What this module
declares:

- a block of ``BLOCK`` threads reduces one *task*: at most ``BLOCK`` consecutive rows of one
  output range, thread ``x`` owning row ``i0 + x`` (threads past the end of the task compute
  a copy of the last row, so that every thread reaches every ``__syncthreads()``, and store
  nothing);
- the columns of each interval are walked in tiles of ``JT`` columns: the block copies the
  tile of every j-variable into ``__shared__`` memory (coalesced), computes the nodes that
  depend on j only (e.g. ``|y_j|^2``) once per column into shared memory, then every thread
  runs the stages of the formula and the reduction's ``c_tile`` over the tile, ``TJ``
  columns at a time (``TJ`` is a compile-time constant, so the stage buffers stay in
  registers); when one column of the staged data does not fit the shared-memory budget
  (huge dims), j-variables are read from global memory;
- a thread copies its row of each i-variable of at most ``MAX_ROW_REGISTERS`` numbers to
  registers; longer rows are read in place;
- per-thread buffers (registers or local memory) above ``LOCAL_LIMIT`` bytes raise a
  ShapeError before compiling (a launch would fail on the local memory it reserves for
  every resident thread);
- a grid-stride loop covers the (part, batch, task) triples; with ``nsplit > 1`` each part
  reduces ``chunk`` columns (small M: enough blocks for the GPU);
- with ``tensor_cores`` "tf32" or "3xtf32", the float32 dot products and squared distances
  of an i- and a j-variable of dim >= 16 are computed per tile by tensor-core MMAs
  (:mod:`lazymat.codegen.cuda_mma`, which documents the accuracy of each mode); the
  default "off" computes every pair by the formula.

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

from . import cuda_mma
from .c_like import KernelSpec, prelude
from .scaffold import Kernel, Target, TileNodes, indent, kernel_lines

__all__ = ["BLOCK", "CUDA", "KernelSpec", "render", "render_module", "cuda_prelude"]

#: Threads per block = rows per task.
BLOCK = 128
#: Bytes of shared memory a block may use for its tile (the static limit is 48 KiB).
SHARED_BUDGET = 32 * 1024
#: The same with tensor-core tiles, which take their own room within it (48 KiB static).
TILE_SHARED_BUDGET = 46 * 1024
#: At most this many columns per stage pass, and about this many registers for their buffers.
MAX_TJ = 4
REGISTER_BUDGET = 48
#: An i-variable of at most this dim is copied to a per-thread array once per task (registers,
#: or local memory, whose accesses are coalesced across a warp); longer ones are read in place,
#: where each thread reads its own row: a strided access, a cache line per thread.
MAX_ROW_REGISTERS = 128
#: Bytes of per-thread buffers (registers and local memory) a kernel may declare.
LOCAL_LIMIT = 32 * 1024

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class CudaTarget(Target):
    name = "cuda"
    lanes = {"float32": 1, "float64": 1}
    defines = ("#define LM_SIMD",
               "#define LM_SIMD_OR(v)",
               "#define INFINITY_T ((T)LM_INF_F)")
    kernel = 'extern "C" __global__ void __launch_bounds__(BLOCK)'
    args, outs = "args.p", "outs.p"
    first_row = "(part * nbatch + b) * M"
    max_pass = MAX_TJ
    pass_budget = REGISTER_BUDGET
    shared, barrier, thread = "__shared__", "__syncthreads();", "threadIdx.x"
    shared_budget = SHARED_BUDGET
    tile_shared_budget = TILE_SHARED_BUDGET
    max_row_copy = MAX_ROW_REGISTERS
    heap = False
    local_limit = LOCAL_LIMIT
    column_parts = True

    def __init__(self, block: int = BLOCK, tensor_cores: str = "off"):
        self.block = block
        self.tensor_cores = cuda_mma.check_mode(tensor_cores)

    def tile_nodes(self, kern: Kernel) -> TileNodes | None:
        return cuda_mma.gram_tiles(kern, self.tensor_cores)

    def pass_cost(self, kern: Kernel, numbers: int) -> int:
        return numbers  # about a register each

    def row_of_lane(self, kern: Kernel) -> str:
        return "row"

    def head(self, kern: Kernel, name: str) -> list[str]:
        nargs, nouts = len(kern.spec.arg_dims), len(kern.spec.stored)
        return [f"namespace {name}_scope {{",
                f"typedef {kern.T} T;",
                "constexpr int LANES = 1;  // one row per thread",
                f"constexpr int BLOCK = {self.block};  // threads per block = rows per task",
                f"constexpr int JT = {kern.jt};  // columns per tile",
                f"constexpr int TJ = {kern.tj};  // columns per stage pass",
                f"struct Args {{ const void* p[{max(1, nargs)}]; }};  // by value: no upload",
                f"struct Outs {{ void* p[{max(1, nouts)}]; }};",
                f"{self.kernel} {name}(",
                "    i64 M, i64 N, i64 nbatch, i64 nsplit, i64 chunk, "
                "const i64* __restrict__ offsets,",
                "    i64 ntasks, const i64* __restrict__ tasks, const i64* __restrict__ slices,",
                "    const i64* __restrict__ redranges, Args args, Outs outs) {"]

    def task_loop(self, kern: Kernel) -> list[str]:
        return ["for (i64 task = blockIdx.x; task < nsplit * nbatch * ntasks; "
                "task += gridDim.x) {",
                "  const i64 part = task / (nbatch * ntasks), bt = task % (nbatch * ntasks);",
                "  const i64 b = bt / ntasks, t = bt % ntasks;",
                "  const i64 jlo = part * chunk, jhi = jlo + chunk;  // this part's columns",
                "  const i64 i0 = tasks[3 * t], c = tasks[3 * t + 2];"]

    def rows(self, kern: Kernel) -> list[str]:
        return ["const int nl = (int)(tasks[3 * t + 1] - i0);",
                "const bool active = (int)threadIdx.x < nl;",
                "const i64 row = i0 + (active ? (int)threadIdx.x : nl - 1);"]

    def store_rows(self, kern: Kernel, store: list[str]) -> list[str]:
        return ["if (active)", "  for (int l = 0; l < LANES; l++) {", *indent(store, 4), "  }"]

    def tail(self, kern: Kernel, name: str) -> list[str]:
        return [f"}}  // namespace {name}_scope"]


CUDA = CudaTarget()


def cuda_prelude() -> str:
    """The C prelude (every op's helper, float and double overloads) as ``__device__``
    functions: the ops' target-neutral helpers under CUDA's macros."""
    return prelude(target="cuda")


# --------------------------------------------------------------------------- rendering

def render_module(kernels: Mapping[str, KernelSpec], block: int = BLOCK,
                  tensor_cores: str = "off") -> str:
    """CUDA source of one translation unit holding a kernel per ``name -> spec``
    (one prelude; each kernel's constants in its own namespace), with ``tensor_cores``
    one of ``cuda_mma.MODES`` ("off", "tf32", "3xtf32").

    >>> from lazymat.formula import Var, SqDist
    >>> from lazymat.reductions import REDUCTIONS
    >>> f = SqDist(Var(0, 2, 0), Var(1, 2, 1))
    >>> src = render_module({f"k_{t}": KernelSpec(REDUCTIONS["Min"], f, None, None, t,
    ...                      ((2, 0), (2, 1))) for t in ("float32", "float64")})
    >>> src.count('extern "C" __global__')
    2
    """
    target = (CUDA if block == BLOCK and tensor_cores == "off"
              else CudaTarget(block, tensor_cores))
    body = []
    for name, spec in kernels.items():
        if not _NAME.match(name):
            raise ValueError(f"kernel name {name!r} is not a C identifier")
        body += [""] + kernel_lines(spec, target, name)
    mma = [cuda_mma.MMA_HELPERS] if any("lm_mma_tf32(" in s for s in body) else []
    lines = ["// lazymat CUDA module (one thread per output row)", *target.defines,
             cuda_prelude(), *mma]
    return "\n".join(lines + body) + "\n"


def render(spec: KernelSpec, name: str = "lm_kernel", block: int = BLOCK,
           tensor_cores: str = "off") -> str:
    """CUDA source of the kernel for ``spec``, a ``extern "C" __global__`` function ``name``
    launched with ``block`` threads per block (see :mod:`lazymat.codegen.scaffold`), with
    ``tensor_cores`` "off", "tf32" or "3xtf32" (:mod:`lazymat.codegen.cuda_mma`)."""
    return render_module({name: spec}, block, tensor_cores)
