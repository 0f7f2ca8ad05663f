"""The kernel skeleton, written once; ``codegen/cpu.py`` and ``codegen/cuda.py`` declare
what differs between the targets (a :class:`Target`: lanes, pragmas, barrier, shared memory,
qualifiers, how a thread finds its rows).

A kernel reduces, for every (batch, task) pair, one *task*: a block of rows of one output
range, over the column intervals of that range, and stores the result. Its body is the
same on every target:

1. decode the task (batch ``b``, task ``t``, first row ``i0``, range ``c``) and find this
   thread's rows (the CPU: a block of ``LANES`` rows, one per SIMD lane; CUDA: one row per
   thread of a block);
2. nodes of the parameters (level 0), then copy the rows of the i-variables, then nodes of
   the row (level 1);
3. the reduction's ``c_decl``; for each column interval, tiles of ``JT`` columns (CUDA
   stages a tile of the j-variables, and the nodes of the columns only, in shared memory),
   walked in stage passes of at most ``TJ`` columns: each materialized node of the pairs is
   one stage over the pass (with an unroll-and-jam loop for long dot products), then the
   reduction's ``c_tile``;
4. the store: ``c_store`` (finalized outputs) or ``c_state_store`` (raw state).

Buffers that scale with D, formula dims or K are placed by :meth:`Kernel.array`: on the
thread's stack (CPU) or in registers/local memory (CUDA) while small; beyond
``STACK_BUDGET`` the largest go to one heap allocation per CPU thread (made once, outside
the pair loop); a size no target can serve raises :class:`~lazymat.ShapeError` before
anything is compiled.

The kernel ABI (the Python side is ``lazymat.backends``)
--------------------------------------------------------
CPU (one exported function per library)::

    extern "C" void lm_kernel(i64 M, i64 N, i64 nbatch, const i64* offsets, i64 ntasks,
        const i64* tasks, const i64* slices, const i64* redranges, void** args, void** outs,
        int threads)

CUDA (one ``__global__`` function ``NAME`` per kernel of a module; pointers by value, so a
launch uploads nothing)::

    namespace NAME_scope { struct Args { const void* p[nargs]; };
                           struct Outs { void* p[nouts]; }; }
    extern "C" __global__ void NAME(i64 M, i64 N, i64 nbatch, i64 nsplit, i64 chunk,
        const i64* offsets, i64 ntasks, const i64* tasks, const i64* slices,
        const i64* redranges, NAME_scope::Args args, NAME_scope::Outs outs)

(``i64`` is ``long long``; on CUDA every pointer is device memory.)

- ``args[v]`` points at the contiguous data of variable ``v``; batch ``b`` reads it at
  ``args[v] + offsets[b * nargs + v]`` elements (offsets are 0 along broadcast batch dims).
- A task ``t`` is the rows ``[tasks[3t], tasks[3t+1])`` of output range ``c = tasks[3t+2]``
  (at most ``LANES`` rows on the CPU, ``BLOCK`` on CUDA: build the tasks with that count),
  reduced over the column intervals ``redranges[2q], redranges[2q+1]`` for ``q`` in
  ``[slices[c-1], slices[c])`` (``slices[-1]`` = 0). Without ranges: one range of all rows,
  one interval ``[0, N)``.
- ``outs[k]`` is array k of ``KernelSpec.stored``: the reduction's outputs
  (``store="output"``) or its raw partial state (``store="state"``); each is contiguous,
  batch-major, ``nbatch * M`` rows of its width (C type by kind: "value" T, "acc" the
  accumulator, "index" long long). Rows outside every range are not written.
- CPU: ``threads`` OpenMP threads share the (batch, task) pairs.
- CUDA: launch with ``blockDim = (BLOCK, 1, 1)`` (in the kernel's header comment) and any
  number of blocks, at most ``65535 * 32`` (a grid-stride loop covers the
  ``nsplit * nbatch * ntasks`` triples). With ``nsplit > 1`` the columns are also cut into
  parts of ``chunk`` columns: part ``s`` reduces ``[s * chunk, (s + 1) * chunk)`` only and
  writes its rows after those of part ``s - 1`` (``nsplit * nbatch * M`` rows in all), for
  the caller to merge (store the state to merge exactly). ``nsplit = 1, chunk = N`` is the
  plain reduction.

>>> from lazymat.formula import Var, SqDist
>>> from lazymat.reductions import REDUCTIONS
>>> from lazymat.codegen import cpu
>>> spec = KernelSpec(REDUCTIONS["Min"], SqDist(Var(0, 2, 0), Var(1, 2, 1)), None, None,
...                   "float32", ((2, 0), (2, 1)))
>>> "for (i64 j0 = redranges[2 * q]" in cpu.render(spec)
True
"""

from __future__ import annotations

import math
import os
from typing import Mapping

from ..errors import ShapeError
from ..formula import Node, to_string, walk
from .c_like import Emitter, KernelSpec, ReductionContext, output_pointers

__all__ = ["Kernel", "KernelSpec", "STACK_BUDGET", "Target", "TileNodes", "fit", "indent",
           "kernel_lines"]

#: Bytes of per-thread buffers a CPU thread keeps on its stack; larger buffers go to its heap.
STACK_BUDGET = 256 * 1024


def describe(root: Node, limit: int = 400) -> str:
    """The formula as text for a kernel's header, or its node count when the text would be
    longer than ``limit`` nodes (a formula with shared subtrees prints exponentially)."""
    size: dict[int, int] = {}
    nodes = walk(root)
    for n in nodes:
        size[id(n)] = 1 + sum(size[id(a)] for a in n.args)
    if size[id(root)] > limit:
        return f"a formula of {len(nodes)} distinct nodes"
    return to_string(root)


def indent(lines: list[str], n: int) -> list[str]:
    return [" " * n + s for s in lines]


def fit(largest: int, cost: int, budget: int) -> int:
    """The largest power-of-two fraction of ``largest`` (at least 1) whose ``cost`` each
    stays within ``budget``: the tile-size search of every target."""
    n = largest
    while n > 1 and n * cost > budget:
        n //= 2
    return n


class TileNodes:
    """Pair nodes a target computes for a whole staged tile at once (CUDA's tensor-core dot
    products, ``codegen/cuda_mma.py``), returned by :meth:`Target.tile_nodes`. The skeleton
    does not stage or copy the variables read only below them, gives their shared memory
    room when it sizes the tiles, runs :meth:`tile` after staging each tile, and reads a node
    at a pair with :meth:`value`."""

    nodes: frozenset[int] = frozenset()  # ids of the nodes computed per tile
    variables: frozenset[int] = frozenset()  # positions of the variables the tile code reads
    shared_bytes = 0  # bytes of shared memory whatever the tile's width...
    column_bytes = 0  # ...and per column of the tile
    min_columns = 1  # the narrowest tile the code handles (a wider one is a multiple of it)

    def shared(self, kern: "Kernel") -> list[str]:
        """Declarations of the shared arrays (at the top of the kernel)."""
        return []

    def tile(self, kern: "Kernel") -> list[str]:
        """Statements run by the whole block once per tile (``jb``, ``nj`` in scope)."""
        return []

    def value(self, kern: "Kernel", node: Node) -> str:
        """The C expression of ``node`` at the thread's row and column ``jt + jj``."""
        raise NotImplementedError


class Target:
    """What a target declares; ``codegen/cpu.py`` (``CPU``) and ``codegen/cuda.py``
    (``CUDA``) subclass it, overriding attributes and the few lines only a target knows
    (tinygrad's C-style renderers are the model). The skeleton asks for nothing else."""

    name = "target"
    lanes: Mapping[str, int] = {"float32": 1, "float64": 1}  # rows per thread, by dtype
    simd: str | None = None  # the line that vectorizes a loop over the lanes
    #: None, or the one-line header of a vectorized lane loop that an op with a long loop over
    #: components (Sum) puts innermost (clang vectorizes innermost loops only; GCC vectorizes
    #: the outer ``omp simd`` lane loop, which is faster there).
    inner_lanes: str | None = None
    #: C macros the reductions' pieces use: LM_SIMD (before a lane loop), LM_SIMD_OR(v) (the
    #: same with an OR-reduction of v), INFINITY_T (+inf of the kernel's T); the prelude
    #: (``TARGET_MACROS``) defines the rest (LM_INF_F, LM_NAN_F, ... used by c_number).
    defines: tuple[str, ...] = ()
    kernel: str = 'extern "C"'  # qualifiers of the kernel function
    args, outs = "args", "outs"  # C arrays of the input and output pointers
    first_row = "b * M"  # the first output row of the current batch (and part)
    max_pass = 1  # the most columns in one stage pass
    pass_budget = 0  # bytes of one pass's pair buffers (L1 on the CPU, registers on CUDA)
    # How a block of threads shares a tile of columns (shared None: each reads in place).
    shared: str | None = None  # qualifier of block-shared memory
    barrier: str | None = None  # block-wide barrier
    thread: str | None = None  # this thread's index in its block
    shared_budget = 0  # bytes of one tile in shared memory
    tile_shared_budget = 0  # the same, with a target's TileNodes (which leave it room)
    block = 1  # threads per block
    max_row_copy: int | None = None  # longer i-variable rows are read in place (None: copy)
    heap = True  # large per-thread buffers may go to the heap (else: an error beyond...)
    local_limit: int | None = None  # ...this many bytes per thread (None: from memory)
    column_parts = False  # the kernel takes nsplit/chunk and reduces one part of the columns
    thread_indent = 0  # the per-thread code's indentation inside open_threads

    def pass_cost(self, kern: "Kernel", numbers: int) -> int:
        """What one column of a pass costs against ``pass_budget``, holding ``numbers``
        numbers per pair (default: bytes over the thread's lanes)."""
        return numbers * kern.lanes * kern.size

    def row_of_lane(self, kern: "Kernel") -> str:
        """The row that lane ``l`` loads (the last row repeats past the task's end)."""
        raise NotImplementedError

    def head(self, kern: "Kernel", name: str) -> list[str]:
        """The kernel's constants and the opening of its signature."""
        raise NotImplementedError

    def open_threads(self, kern: "Kernel") -> list[str]:
        return []

    def close_threads(self, kern: "Kernel") -> list[str]:
        return []

    def task_loop(self, kern: "Kernel") -> list[str]:
        """Opens the loop over this thread's (batch, task) pairs: defines b, i0, c."""
        raise NotImplementedError

    def rows(self, kern: "Kernel") -> list[str]:
        """Defines ``nl``, the task's row count (and on CUDA the thread's ``row``)."""
        raise NotImplementedError

    def store_rows(self, kern: "Kernel", store: list[str]) -> list[str]:
        """``store`` for each row the thread owns (``row``: the row of lane ``l``)."""
        raise NotImplementedError

    def tail(self, kern: "Kernel", name: str) -> list[str]:
        return []

    def tile_nodes(self, kern: "Kernel") -> TileNodes | None:
        """The pair nodes this target computes per tile (None: every node by the formula)."""
        return None


class Kernel:
    """Where each variable, node and buffer of one kernel lives, for one target."""

    def __init__(self, spec: KernelSpec, target: Target):
        self.spec, self.target = spec, target
        self.T = "float" if spec.dtype == "float32" else "double"
        self.size = 4 if self.T == "float" else 8
        self.lanes = target.lanes[spec.dtype]
        self.lane = "l" if self.lanes > 1 else "0"
        self.roots = [spec.formula] + ([spec.weight] if spec.weight is not None else [])
        self.arrays: dict[str, tuple[str, tuple[int, ...]]] = {}
        self.heap: dict[str, int] = {}  # name -> byte offset in the thread's heap block
        self.heap_bytes = 0
        self.tiles = target.tile_nodes(self) if target.shared is not None else None
        self._layout()
        if self.tiles is not None and self.jt < self.tiles.min_columns:
            self.tiles = None  # the tile code needs tiles that wide: none then
            self._layout()

    def _layout(self) -> None:
        """Which variables are copied or staged, and the tile and pass widths."""
        target, tiles = self.target, self.tiles
        tiled = tiles.nodes if tiles is not None else frozenset()
        self.reachable = _reachable(self.roots, tiled)
        found = [n for n in self.reachable.values() if n.op == "Var"]
        self.used = sorted({v.params[0] for v in found}
                           | (tiles.variables if tiles is not None else set()))
        dims = {v.params[0]: v.params[1:] for v in found}
        self.i_vars = [(v, d) for v, (d, c) in sorted(dims.items()) if c == 0
                       and (target.max_row_copy is None or d <= target.max_row_copy)]
        self.j_vars = [(v, d) for v, (d, c) in sorted(dims.items()) if c == 1]
        self.staged = False
        self.em = _KernelEmitter(self.roots, self.T, self)
        self.jt = self.tj = 1
        if target.shared is not None:  # stage j-tiles when one column fits the budget
            per_column = (sum(d for _, d in self.j_vars)
                          + sum(n.dim for n in self.em.at_level(2))) * self.size
            budget = target.shared_budget
            if tiles is not None:
                per_column += tiles.column_bytes
                budget = target.tile_shared_budget - tiles.shared_bytes
            self.staged = per_column <= budget
            if tiles is not None and fit(target.block, per_column, budget) < tiles.min_columns:
                self.staged = False  # wide j-variables: read in place, the tile code staged
                per_column = tiles.column_bytes
            self.jt = fit(target.block, per_column, budget) \
                if self.staged or tiles is not None else target.block
        per_pair = sum(n.dim for n in self.em.at_level(3)) + 2
        if not self.staged and target.shared is not None:
            per_pair += sum(n.dim for n in self.em.at_level(2))
        self.tj = fit(target.max_pass, target.pass_cost(self, per_pair), target.pass_budget)
        if target.shared is None:
            self.jt = self.tj  # one stage pass per tile

    # ------------------------------------------------------------------ buffers
    def number(self, d: int | str) -> int:
        """The value of a buffer dim (an int, or the constants LANES / TJ)."""
        return {"LANES": self.lanes, "TJ": self.tj}.get(d, d) if isinstance(d, str) else d

    def array(self, ctype: str, name: str, *dims: int | str) -> str:
        """Declaration of a per-thread buffer ``ctype name[dims...]`` (see the module
        docstring for where it lives); recorded on the first rendering pass."""
        shape = tuple(self.number(d) for d in dims)
        self.arrays[name] = (ctype, shape)
        spelled = "".join(f"[{d}]" for d in dims)
        if name not in self.heap:
            return f"{ctype} {name}{spelled};"
        rest = "".join(f"[{d}]" for d in dims[1:])
        return (f"{ctype} (*{name}){rest} = ({ctype} (*){rest})(lm_heap + "
                f"{self.heap[name]});")

    def place(self) -> None:
        """Decide which recorded buffers go to the heap (largest first, until the rest fits
        ``STACK_BUDGET``), or raise :class:`ShapeError` when the target cannot hold them."""
        sizes = {name: math.prod(shape) * _SIZES.get(ctype, self.size)
                 for name, (ctype, shape) in self.arrays.items()}
        total = sum(sizes.values())
        what = (f"{self.spec.reduction.name} of a dim-{self.spec.formula.dim} formula"
                + (f" with K = {self.spec.K}" if self.spec.K else ""))
        limit = self.target.local_limit
        if not self.target.heap:
            if limit is not None and total > limit:
                raise ShapeError(
                    f"{what}: the {self.target.name} kernel would need {_kib(total)} of "
                    f"per-thread buffers (the limit is {_kib(limit)}); use backend='cpu' or "
                    "a smaller D/K")
            return
        stack, offset = total, 0
        for name in sorted(sizes, key=lambda n: -sizes[n]):
            if stack <= STACK_BUDGET:
                break
            self.heap[name] = offset
            offset += -(-sizes[name] // 64) * 64  # 64-byte aligned
            stack -= sizes[name]
        limit = limit if limit is not None else _memory_per_thread()
        if offset > limit:
            raise ShapeError(f"{what}: each CPU thread would need {_kib(offset)} of buffers "
                             f"(the limit is {_kib(limit)}, from the machine's memory)")
        self.heap_bytes = offset


_SIZES = {"float": 4, "double": 8, "long long": 8, "int": 4, "i64": 8}


def _kib(n: int) -> str:
    return f"{n / 1024:.0f} KiB" if n < 1 << 30 else f"{n / (1 << 30):.1f} GiB"


def _reachable(roots: list[Node], stop: frozenset[int]) -> dict[int, Node]:
    """id -> node of the nodes of ``roots``, not looking below the nodes in ``stop``."""
    seen: dict[int, Node] = {}
    pending = list(roots)
    while pending:
        n = pending.pop()
        if id(n) not in seen:
            seen[id(n)] = n
            if id(n) not in stop:
                pending += n.args
    return seen


def _memory_per_thread() -> int:
    """Half the machine's memory shared by its cores: what one thread's buffers may take."""
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        memory = 8 << 30
    return memory // (2 * (os.cpu_count() or 1))


class _KernelEmitter(Emitter):
    """The Emitter with the kernel's buffer layout: ``name[k][jj][lane]``; nodes of the
    columns staged in a shared tile are ``name[k][jt + jj]``."""

    def __init__(self, roots: list[Node], T: str, kernel: Kernel):
        self.kernel = kernel
        spec, red = kernel.spec, kernel.spec.reduction
        read_once = red.fuses is not None and red.fuses(
            spec.formula.dim, spec.accumulation[1],
            bool(kernel.target.inner_lanes) and kernel.lanes > 1)
        super().__init__(roots, T, self._variable, read_once=read_once)

    def _variable(self, node: Node, k: str) -> str:
        kern = self.kernel
        index, dim, cat = node.params
        if cat == 0:
            if any(v == index for v, _ in kern.i_vars):
                return f"xv{index}[{k}][{kern.lane}]"
            return f"a{index}[row * {dim} + {k}]"  # long rows: read in place
        if cat == 1:
            if kern.staged:
                return f"ys{index}[(jt + jj) * {dim} + {k}]"
            return f"a{index}[(j0 + jj) * {dim} + {k}]"
        return f"a{index}[{k}]"

    def lanes_innermost(self) -> bool:
        return bool(self.kernel.target.inner_lanes) and self.kernel.lanes > 1

    def at_level(self, level: int) -> list[Node]:
        # Nodes only below a target's tile nodes are not computed.
        return [n for n in super().at_level(level) if id(n) in self.kernel.reachable]

    def jam_width(self, node: Node) -> int:
        tiles = self.kernel.tiles
        return 1 if tiles is not None and id(node) in tiles.nodes else super().jam_width(node)

    def expr(self, node: Node, k: int | str) -> str:
        tiles = self.kernel.tiles
        if tiles is not None and id(node) in tiles.nodes and id(node) not in self.materialized:
            return tiles.value(self.kernel, node)
        return super().expr(node, k)

    def body(self, node: Node, copies: int = 1) -> list[str]:
        tiles = self.kernel.tiles
        if tiles is not None and id(node) in tiles.nodes:
            return [f"{{ {self.access(node, 0)} = {tiles.value(self.kernel, node)}; }}"]
        return super().body(node, copies)

    def inner_lane_loop(self, node: Node) -> str | None:
        if self.lanes_innermost() and self.jam_width(node) > 1:
            return self.kernel.target.inner_lanes
        return None

    def access(self, node: Node, k: int | str) -> str:
        k = 0 if node.dim == 1 else k
        name = self.materialized[id(node)]
        if node.deps == 2 and self.kernel.staged:
            return f"{name}[{k}][jt + jj]"
        jj = "jj" if node.deps & 2 else "0"
        lane = self.kernel.lane if node.deps & 1 else "0"
        return f"{name}[{k}][{jj}][{lane}]"


# --------------------------------------------------------------------------- the skeleton

def lane_loop(kern: Kernel, body: list[str], simd: bool = True) -> list[str]:
    """``body`` for every lane of the thread's rows (vectorized on a SIMD target)."""
    if kern.lanes == 1:
        return body
    pragma = [kern.target.simd] if simd and kern.target.simd else []
    return pragma + ["for (int l = 0; l < LANES; l++)"] + indent(body, 2)


def stage(kern: Kernel, node: Node, tj: int | str) -> list[str]:
    """Statements computing ``node`` on the ``tj`` columns of the current stage pass, with
    an unroll-and-jam loop (several columns at once: independent accumulation chains) for
    the ops that can."""
    em = kern.em
    width = em.jam_width(node)
    lanes = node.deps & 1 and em.inner_lane_loop(node) is None  # else inside the op's loops
    lines: list[str] = []
    start = "0"
    if width > 1 and (isinstance(tj, str) or width <= tj):
        body = em.body(node, width)
        lines += [f"for (int jj = 0; jj + {width} <= tj; jj += {width}) {{",
                  *indent(lane_loop(kern, body) if lanes else body, 2), "}"]
        start = f"tj - tj % {width}"
    body = em.body(node)
    lines += [f"for (int jj = {start}; jj < tj; jj++) {{",
              *indent(lane_loop(kern, body) if lanes else body, 2), "}"]
    return lines


def _buffers(kern: Kernel) -> list[str]:
    """Declarations of the per-thread buffers of the rows and of the nodes."""
    em = kern.em
    lines = [kern.array(kern.T, f"xv{v}", d, "LANES") for v, d in kern.i_vars]
    for lv in (0, 1, 2, 3):
        if lv == 2 and kern.staged:
            continue  # in the shared tile
        for n in em.at_level(lv):
            lines.append(kern.array(kern.T, em.materialized[id(n)], n.dim,
                                    "TJ" if n.deps & 2 else 1, "LANES" if n.deps & 1 else 1))
    return lines


def kernel_lines(spec: KernelSpec, target: Target, name: str) -> list[str]:
    """The kernel ``name`` for ``spec`` on ``target`` (the prelude and the target's
    ``defines`` come before it, once per translation unit)."""
    kern = Kernel(spec, target)
    em, T = kern.em, kern.T
    red = spec.reduction
    store = red.c_state_store if spec.store == "state" else red.c_store
    rc = ReductionContext(spec, em, T, array=kern.array)
    _buffers(kern)  # record every buffer, then place them
    red.c_decl(rc)
    kern.place()
    decls = _buffers(kern)
    reduction_decl = red.c_decl(rc)

    nargs = len(spec.arg_dims)
    level0 = [s for n in em.at_level(0) for s in em.body(n)]
    load = [f"for (int k = 0; k < {d}; k++)"
            + (" for (int l = 0; l < LANES; l++)" if kern.lanes > 1 else "")
            + f" xv{v}[k][{kern.lane}] = a{v}[{target.row_of_lane(kern)} * {d} + k];"
            for v, d in kern.i_vars]
    level1 = [s for n in em.at_level(1) for s in lane_loop(kern, em.body(n))]

    shared: list[str] = []
    level2: list[str] = []  # nodes of the columns only, in a pass
    stage_tile: list[str] = []  # the block's copy of a tile to shared memory
    if kern.staged:
        shared = [f"{target.shared} T ys{v}[{kern.jt * d}];" for v, d in kern.j_vars]
        shared += [f"{target.shared} T {em.materialized[id(n)]}[{n.dim}][JT];"
                   for n in em.at_level(2)]
        stage_tile = [f"{target.barrier}  // every thread is done with the previous tile"]
        stage_tile += [f"for (int e = {target.thread}; e < nj * {d}; e += BLOCK) "
                       f"ys{v}[e] = a{v}[jb * {d} + e];" for v, d in kern.j_vars]
        stage_tile.append(target.barrier)
        if em.at_level(2):  # once per column, by the block
            stage_tile += [f"for (int jc = {target.thread}; jc < nj; jc += BLOCK) {{",
                           "  const int jt = 0, jj = jc;",
                           *indent([s for n in em.at_level(2) for s in em.body(n)], 2),
                           "}", target.barrier]
    else:
        for n in em.at_level(2):
            level2 += stage(kern, n, "tj")
    if kern.tiles is not None:  # the target's own per-tile work, after the staging
        shared += kern.tiles.shared(kern)
        stage_tile += kern.tiles.tile(kern)

    def stage_pass(width: int | str) -> list[str]:
        body = list(level2)
        for n in em.at_level(3):
            body += stage(kern, n, width)
        return body + red.c_tile(rc)

    # Column intervals (clipped to this part's columns when the target cuts parts).
    if target.column_parts:
        first = "redranges[2 * q] > jlo ? redranges[2 * q] : jlo"
        jend = "redranges[2 * q + 1] < jhi ? redranges[2 * q + 1] : jhi"
    else:
        first, jend = "redranges[2 * q]", "redranges[2 * q + 1]"
    if kern.jt == kern.tj and not kern.staged and kern.tiles is None:  # a tile is one pass
        tiles = [f"for (i64 j0 = {first}; j0 < jend; j0 += TJ) {{",
                 "  const int tj = jend - j0 < TJ ? (int)(jend - j0) : TJ;",
                 *indent(stage_pass("tj"), 2), "}"]
    else:  # tiles of JT columns, passes of TJ (a constant: buffers in registers), then 1
        def one_pass(width: int) -> list[str]:
            return ["{", f"  const int tj = {width};", "  const i64 j0 = jb + jt;",
                    "  (void)j0;", *indent(stage_pass(width), 2), "}"]
        passes = ["int jt = 0;", "for (; jt + TJ <= nj; jt += TJ)",
                  *indent(one_pass(kern.tj), 2)]
        if kern.tj > 1:
            passes += ["for (; jt < nj; jt++)", *indent(one_pass(1), 2)]
        tiles = [f"for (i64 jb = {first}; jb < jend; jb += JT) {{",
                 "  const int nj = jend - jb < JT ? (int)(jend - jb) : JT;",
                 *indent(stage_tile, 2), *indent(passes, 2), "}"]

    outputs = output_pointers(spec, T, target.outs, target.first_row)
    task = [
        *target.task_loop(kern),
        *[f"  const T* a{v} = base{v} + offsets[b * {nargs} + {v}];" for v in kern.used],
        *indent(outputs, 2),
        *indent(level0, 2),
        *indent(target.rows(kern), 2),
        *indent(load, 2),
        *indent(level1, 2),
        *indent(reduction_decl, 2),
        "  for (i64 q = c ? slices[c - 1] : 0; q < slices[c]; q++) {",
        f"    const i64 jend = {jend};",
        *indent(tiles, 4),
        "  }",
        *indent(target.store_rows(kern, store(rc)), 2),
        "}",
    ]
    header = [f"// lazymat kernel {name}: {red.name} over j of {describe(spec.formula)}"]
    if spec.weight is not None:
        header.append(f"// weight: {describe(spec.weight)}")
    rows = kern.lanes if target.shared is None else target.block
    header.append(f"// {target.name}, dtype {spec.dtype}, K = {spec.K}, {rows} rows per block, "
                  f"tiles of {kern.jt} columns{' in shared memory' if kern.staged else ''}, "
                  f"{kern.tj} per stage pass, accumulation {' '.join(spec.accumulation)}, "
                  f"stores the {spec.store}"
                  + (f", {kern.heap_bytes} bytes of heap per thread" if kern.heap_bytes else ""))
    inner = 2 + target.thread_indent
    return [*header,
            *target.head(kern, name),
            *indent(shared, 2),
            *[f"  const T* base{v} = (const T*){target.args}[{v}];" for v in kern.used],
            "  (void)N;",
            *indent(target.open_threads(kern), 2),
            *indent(decls, inner),
            *indent(task, inner),
            *indent(target.close_threads(kern), 2),
            "}",
            *target.tail(kern, name)]
