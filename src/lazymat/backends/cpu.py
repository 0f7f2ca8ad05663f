"""CPU backend: render the kernel, compile it (cached), launch it through ctypes.

ctypes releases the GIL during the call; the kernel threads with OpenMP. Built without
OpenMP (zig's clang, Apple clang), it runs on one thread per call, and a small pool of
Python threads shares the calls instead: the (batch, task) pairs are cut into slices, each
slice one kernel call on its share of the tasks pointer (or of the batches), taken in turn
by whichever thread is free (the dynamic schedule of the OpenMP build).
"""

from __future__ import annotations

import ctypes
import itertools
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any

import numpy as np

from .. import config
from ..codegen.cpu import LANES, KernelSpec, render
from . import launch as abi
from .base import Launch

#: The kernels loaded in this process, by ``Launch.key``.
kernels: dict[tuple, Any] = config.memo("backends.cpu.kernels", maxsize=1024)
ARGTYPES = [ctypes.c_longlong, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_void_p,
            ctypes.c_longlong, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
            ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]


def unavailable_reason() -> str | None:
    """Why compiled CPU kernels cannot run here: no C++ compiler (None when one is found)."""
    from ..compile import compiler_info

    if compiler_info() is None:
        return ("no C++ compiler found (looked for $LAZYMAT_CXX, $CXX, g++, clang++, "
                "the ziglang package)")
    return None


def _clang() -> bool:
    """Whether the compiler is a clang (zig's included): its kernels are shaped for it."""
    from ..compile import compiler_info

    info = compiler_info()
    return bool(info and "clang" in info.version.lower())


def threads_inside() -> bool:
    """Whether the kernels thread themselves (OpenMP); else the Python pool threads them
    (also with OpenMP when ``LAZYMAT_PYTHON_THREADS`` is set: tests, comparisons).

    >>> threads_inside() in (True, False)
    True
    """
    from ..compile import compiler_info

    if config.env_flag("LAZYMAT_PYTHON_THREADS"):
        return False
    info = compiler_info()
    return bool(info and info.openmp)


def kernel_for(spec: KernelSpec) -> Any:
    """The compiled kernel function for a spec (the compile cache makes repeats cheap)."""
    from ..compile import load_library

    lib = load_library(render(spec, clang=_clang()), name=f"{spec.reduction.name}_{spec.dtype}")
    fn = lib.lm_kernel
    fn.argtypes, fn.restype = ARGTYPES, None
    return fn


def pointer(a: Any, keep: list) -> int:
    """The address of a contiguous copy of ``a`` (numpy or CPU torch), kept alive in ``keep``."""
    if isinstance(a, np.ndarray):
        a = np.ascontiguousarray(a)
        keep.append(a)
        return a.ctypes.data
    a = a.detach()
    if not a.is_contiguous():
        a = a.contiguous()
    keep.append(a)
    return a.data_ptr()


#: Column splits (few rows, many columns): a part has at least this many columns, and the
#: rows give fewer than SPLIT_BLOCKS_PER_THREAD blocks of LANES rows per thread.
SPLIT_MIN_COLUMNS = 4096
SPLIT_BLOCKS_PER_THREAD = 4


def _kernel(launch: Launch) -> Any:
    key = launch.key
    fn = kernels.get(key)
    if fn is None:
        fn = kernels[key] = kernel_for(launch.spec)
    return fn


def run(launch: Launch) -> tuple:
    """The arrays of ``launch.shapes``, each of shape ``batch + (M,) + shape``.

    When the rows are too few to keep every thread busy, the columns are cut into one part
    per thread instead: each thread's kernel stores its part's raw state, and the states
    are merged with the reduction's ``merge`` (``launch.combine``).
    """
    fn = _kernel(launch)
    xp, like, lead = launch.xp, launch.like, launch.batch + (launch.M,)
    lanes = LANES[launch.dtype]
    threads = abi.num_threads(launch.nbatch * launch.M * launch.N)
    if launch.ranges is None:  # one output range of all rows, one interval of all columns
        parts = _column_parts(launch, threads, lanes)
        if parts > 1:
            return _run_split(launch, parts, lanes)
        layout = abi.dense_layout(launch.M, launch.N, lanes)
        outs = [xp.empty(lead + shape, like=like, dtype=launch.array_dtype(kind))
                for kind, shape in launch.shapes]
    else:  # rows outside every range hold the identity
        layout = abi.layout(launch.ranges, lanes)
        outs = [xp.full(lead + shape, fill, like=like, dtype=launch.array_dtype(kind))
                for (kind, shape), fill in zip(launch.shapes, launch.fills)]
        # Chunks by the pairs the ranges keep, not by N: a sparse call is one kernel call.
        threads = abi.num_threads(launch.nbatch * lanes * abi.ranged_columns(layout[-1]))
        columns = -(-abi.ranged_columns(layout[-1]) // max(1, layout[0]))
        _call(fn, launch, layout, outs, threads, columns, pool=not threads_inside())
        return tuple(outs)
    _call(fn, launch, layout, outs, threads, pool=not threads_inside())
    return tuple(outs)


def bind(launch: Launch, result_shapes: list[tuple[int, ...]]) -> Any:
    """A function ``rerun(arrays)`` that runs ``launch`` again on other numpy arrays of the
    same layout (shapes, strides, dtypes: the caller checks them), or None when this launch
    takes the general path (ranges, a column split, non-contiguous data, torch, raw states).

    ``rerun`` returns the outputs in ``result_shapes``, or None when the thread count it was
    bound with no longer holds (the caller then runs the general path). Everything but the
    arrays' addresses is computed here once: the small calls' fast path.
    """
    if (launch.ranges is not None or launch.store != "output" or launch.xp.name != "numpy"
            or not all(isinstance(a, np.ndarray) and a.flags.c_contiguous
                       for a in launch.arrays)):
        return None
    lanes = LANES[launch.dtype]
    pairs = launch.nbatch * launch.M * launch.N
    threads = abi.num_threads(pairs)
    if _column_parts(launch, threads, lanes) > 1:
        return None
    layout = abi.dense_layout(launch.M, launch.N, lanes)
    ntasks, tasks_ptr, slices_ptr, redranges_ptr, owners = layout
    if ntasks > _chunk(launch, threads):
        return None  # a long reduction: chunked calls, so that Ctrl-C is answered
    if (threads > 1 and not threads_inside()
            and len(_slices(launch.nbatch, ntasks, threads, lanes * launch.N)) > 1):
        return None  # no OpenMP: the Python pool shares the call out (the general path)
    fn = _kernel(launch)
    offsets = abi.zero_offsets(len(launch.arrays)) if launch.offsets is None else launch.offsets
    like_dtype = launch.like.dtype
    outs = [(shape, np.int64 if kind == "index" else like_dtype)
            for (kind, _), shape in zip(launch.shapes, result_shapes)]
    Inputs = ctypes.c_void_p * max(1, len(launch.arrays))
    Outputs = ctypes.c_void_p * max(1, len(outs))
    head = (ctypes.c_longlong(launch.M), ctypes.c_longlong(launch.N),
            ctypes.c_longlong(launch.nbatch), ctypes.c_void_p(offsets.ctypes.data),
            ctypes.c_longlong(ntasks), ctypes.c_void_p(tasks_ptr),
            ctypes.c_void_p(slices_ptr), ctypes.c_void_p(redranges_ptr))
    c_threads = ctypes.c_int(threads)
    empty, recheck = np.empty, pairs >= abi.SMALL_PAIRS  # small calls always run on one thread
    from_buffer, addressof = _c_char.from_buffer, _addressof
    single = outs[0] if len(outs) == 1 else None

    def rerun(arrays: Any) -> list | None:
        if recheck and abi.num_threads(pairs) != threads:
            return None
        if single is not None:  # (most reductions: one output, one allocation)
            results = [empty(*single)]
        else:
            results = [empty(shape, dtype) for shape, dtype in outs]
        try:  # (_address, inlined: this is the whole cost of a small call besides the kernel)
            inputs = Inputs(*[addressof(from_buffer(a)) for a in arrays])
        except (TypeError, ValueError):  # read-only or empty arrays
            inputs = Inputs(*[_address(a) for a in arrays])
        fn(*head, inputs, Outputs(*[addressof(from_buffer(o)) for o in results]), c_threads)
        return results

    rerun.owners = (owners, offsets)  # the layout's and offsets' memory, alive while bound
    return rerun


_c_char, _addressof = ctypes.c_char, ctypes.addressof


def _address(a: np.ndarray) -> int:
    """The data address of a C-contiguous numpy array: through the buffer protocol (numpy's
    ``a.ctypes.data`` builds an object and costs microseconds), ``a.ctypes`` for a read-only
    or empty one."""
    try:
        return _addressof(_c_char.from_buffer(a))
    except (TypeError, ValueError):
        return a.ctypes.data


def _column_parts(launch: Launch, threads: int, lanes: int) -> int:
    """1, or the number of column parts when the row blocks cannot feed ``threads``."""
    if threads < 2:
        return 1
    blocks = launch.nbatch * -(-launch.M // lanes)
    if blocks >= SPLIT_BLOCKS_PER_THREAD * threads:
        return 1
    return max(1, min(threads, launch.N // SPLIT_MIN_COLUMNS))


def _run_split(launch: Launch, parts: int, lanes: int) -> tuple:
    """The columns cut into ``parts`` intervals, each reduced by one thread into its raw
    state (ctypes releases the GIL), then merged in column order."""
    stored = replace(launch, store="state")
    fn = _kernel(stored)
    xp, like, lead = launch.xp, launch.like, launch.batch + (launch.M,)
    shapes = stored.shapes
    columns = abi.column_parts(launch.N, parts)
    outs = [[xp.empty(lead + shape, like=like, dtype=stored.array_dtype(kind))
             for kind, shape in shapes] for _ in columns]

    if threads_inside():
        layouts = [abi.dense_layout(launch.M, launch.N, lanes, c) for c in columns]
        call_parts(fn, stored, layouts, outs)
        return abi.merge_parts(launch, outs)

    def work(p: int) -> None:
        layout = abi.dense_layout(launch.M, launch.N, lanes, columns[p])
        _call(fn, stored, layout, outs[p], 1)

    errors: list[BaseException] = []

    def guarded(p: int) -> None:
        try:
            work(p)
        except BaseException as e:  # noqa: BLE001 - raised again in the caller's thread
            errors.append(e)

    helpers = [threading.Thread(target=guarded, args=(p,), daemon=True)
               for p in range(1, parts)]
    for t in helpers:
        t.start()
    guarded(0)
    for t in helpers:
        t.join()
    if errors:
        raise errors[0]
    # The kernel's indices are global: each part reduces its own columns of [0, N).
    return abi.merge_parts(launch, outs)


#: Runs the column parts of a split on OpenMP's threads, one kernel call (itself on one
#: thread) per part. On Python threads the parts would compete with the OpenMP workers that
#: spin after every parallel region (libgomp's default wait policy): a 64 x 320,000 sum ran
#: at 0.73x a plain OpenMP loop so, 0.98-1.02x in one region (benchmarks/contention.py).
PARTS_SOURCE = r"""
typedef long long i64;
typedef void (*lm_kernel_t)(i64, i64, i64, const i64*, i64, const i64*, const i64*,
                            const i64*, void**, void**, int);
extern "C" void lm_run_parts(void* kernel, int parts, i64 M, i64 N, i64 nbatch,
                             const i64* offsets, const i64* ntasks, void** tasks,
                             void** slices, void** redranges, void** args, void** outs,
                             int nouts) {
  lm_kernel_t k = (lm_kernel_t)kernel;
  #pragma omp parallel for num_threads(parts) schedule(dynamic, 1)
  for (int p = 0; p < parts; p++)
    k(M, N, nbatch, offsets, ntasks[p], (const i64*)tasks[p], (const i64*)slices[p],
      (const i64*)redranges[p], args, outs + (i64)p * nouts, 1);
}
"""


@config.memoize("backends.cpu.parts_launcher", maxsize=None)
def _parts_launcher() -> Any:
    from ..compile import load_library

    fn = load_library(PARTS_SOURCE, name="run_parts").lm_run_parts
    fn.argtypes = [ctypes.c_void_p, ctypes.c_int] + [ctypes.c_longlong] * 3 + \
        [ctypes.c_void_p] * 7 + [ctypes.c_int]
    fn.restype = None
    return fn


def call_parts(fn: Any, launch: Launch, layouts: list[tuple], outs: list[list]) -> None:
    """One kernel call per column part (``layouts[p]``, into ``outs[p]``), all in one
    OpenMP region: the parts of a split."""
    keep: list = []
    arrays = launch.arrays
    ptrs = (ctypes.c_void_p * max(1, len(arrays)))(*[pointer(a, keep) for a in arrays])
    offsets = abi.zero_offsets(len(arrays)) if launch.offsets is None else launch.offsets
    parts, nouts = len(layouts), len(outs[0])
    ntasks, tasks, slices, redranges = zip(*[layout[:4] for layout in layouts])
    counts = np.asarray(ntasks, dtype=np.int64)
    Pointers = ctypes.c_void_p * parts
    out_ptrs = (ctypes.c_void_p * max(1, parts * nouts))(
        *[pointer(o, keep) for part in outs for o in part])
    _parts_launcher()(ctypes.cast(fn, ctypes.c_void_p), parts, launch.M, launch.N,
                      launch.nbatch, offsets.ctypes.data, counts.ctypes.data,
                      Pointers(*tasks), Pointers(*slices), Pointers(*redranges), ptrs,
                      out_ptrs, nouts)


def _call(fn: Any, launch: Launch, layout: tuple, outs: list, threads: int,
          columns: int | None = None, pool: bool = False) -> None:
    """One kernel call: the ABI's arguments from the launch, the layout and the outputs
    (``columns``: the columns a task reduces on average, N without ranges).

    ``pool``: the kernel has no OpenMP, so ``threads`` Python threads share its slices."""
    keep: list = []
    arrays = launch.arrays
    ptrs = (ctypes.c_void_p * max(1, len(arrays)))(*[pointer(a, keep) for a in arrays])
    offsets = abi.zero_offsets(len(arrays)) if launch.offsets is None else launch.offsets
    out_addrs = [pointer(o, keep) for o in outs]
    ntasks, tasks_ptr, slices_ptr, redranges_ptr, _ = layout
    nbatch, M = launch.nbatch, launch.M
    per_task = launch.N if columns is None else columns
    slices = _slices(nbatch, ntasks, threads, LANES[launch.dtype] * per_task) \
        if pool and threads > 1 else []
    if len(slices) > 1:
        # bytes of one batch's rows in each output, and of one batch's offsets row
        out_step = [o.nbytes // nbatch for o in outs]
        off_step = offsets.strides[0] if offsets.ndim == 2 else 0

        def call(part: tuple[int, int, int, int]) -> None:
            b0, b1, t0, t1 = part
            out_ptrs = (ctypes.c_void_p * max(1, len(outs)))(
                *[a + b0 * step for a, step in zip(out_addrs, out_step)])
            fn(M, launch.N, b1 - b0, offsets.ctypes.data + b0 * off_step, t1 - t0,
               tasks_ptr + TASK_BYTES * t0, slices_ptr, redranges_ptr, ptrs, out_ptrs, 1)

        share(call, slices, threads)
        return
    out_ptrs = (ctypes.c_void_p * max(1, len(outs)))(*out_addrs)
    # Long reductions run in chunks of tasks: Python handles a pending Ctrl-C between them.
    chunk = _chunk(launch, threads, columns)
    for start in range(0, ntasks, chunk):
        fn(M, launch.N, nbatch, offsets.ctypes.data, min(chunk, ntasks - start),
           tasks_ptr + TASK_BYTES * start, slices_ptr, redranges_ptr, ptrs, out_ptrs,
           threads if not pool else 1)


def _chunk(launch: Launch, threads: int, columns: int | None = None) -> int:
    """Tasks per kernel call (``columns``: the columns a task reduces on average, N without
    ranges)."""
    per_task = launch.N if columns is None else columns
    return max(16 * threads, CHUNK_PAIRS // max(1, LANES[launch.dtype] * per_task
                                                * launch.nbatch))


#: Pairs (i, j) per kernel call of a long reduction (~0.05-0.5 s): the Ctrl-C latency. A
#: column split (few rows) is one call per part: it answers when its parts are done.
CHUNK_PAIRS = 1 << 27
TASK_BYTES = 3 * 8  # a task is (start, end, range) in int64 (launch.tasks)
#: Slices per thread of the Python pool: more than one, so that a thread slowed down (a busy
#: machine, uneven ranges) leaves its share to the others; but each slice at least
#: MIN_SLICE_PAIRS pairs (tens of microseconds), so that the calls' cost stays small.
SLICES_PER_THREAD = 8
MIN_SLICE_PAIRS = 1 << 16


def _slices(nbatch: int, ntasks: int, threads: int, pairs_per_task: int
            ) -> list[tuple[int, int, int, int]]:
    """(batch start, batch end, task start, task end) of the slices of one call: tasks
    (every batch at once) when there are enough of them, else batches (every task).

    >>> _slices(1, 100, 2, 1 << 16)[:2]
    [(0, 1, 0, 7), (0, 1, 7, 14)]
    """
    wanted = min(SLICES_PER_THREAD * threads, nbatch * ntasks * pairs_per_task // MIN_SLICE_PAIRS)
    if wanted < 2:
        return [(0, nbatch, 0, ntasks)]
    if ntasks >= min(wanted, nbatch) or nbatch == 1:
        per = -(-ntasks // wanted)
        per = min(per, max(1, CHUNK_PAIRS // max(1, pairs_per_task * nbatch)))
        return [(0, nbatch, t, min(t + per, ntasks)) for t in range(0, ntasks, per)]
    per = max(1, -(-nbatch // wanted))
    return [(b, min(b + per, nbatch), 0, ntasks) for b in range(0, nbatch, per)]


_executor: ThreadPoolExecutor | None = None
_executor_size = 0
_executor_lock = threading.Lock()


def _after_fork_in_child() -> None:
    global _executor, _executor_size, _executor_lock
    # The parent's pool threads do not exist in the child: start a new pool there.
    _executor, _executor_size, _executor_lock = None, 0, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _pool(workers: int) -> ThreadPoolExecutor:
    global _executor, _executor_size
    with _executor_lock:
        if _executor is None or _executor_size < workers:
            if _executor is not None:
                _executor.shutdown(wait=False)
            _executor = ThreadPoolExecutor(workers, thread_name_prefix="lazymat-cpu")
            _executor_size = workers
        return _executor


def share(work: Any, parts: list, threads: int) -> None:
    """``work(part)`` for every part, on ``threads`` threads (this one and pool threads),
    each taking the next part when it is free. Returns when every part is done, also when
    one raised (then the first error is raised here): the parts write into arrays that must
    outlive them.

    >>> done = []; share(done.append, [1, 2, 3], 2); sorted(done)
    [1, 2, 3]
    """
    count, stop, errors = itertools.count(), [False], []

    def drain() -> None:
        while not stop[0]:
            k = next(count)  # atomic: each part is taken once
            if k >= len(parts):
                return
            try:
                work(parts[k])
            except BaseException as e:  # noqa: BLE001 - raised again in the caller's thread
                errors.append(e)
                stop[0] = True

    helpers = min(threads, len(parts)) - 1
    futures = [_pool(helpers).submit(drain) for _ in range(helpers)] if helpers > 0 else []
    try:
        drain()
    except BaseException as e:  # Ctrl-C between two parts: stop the helpers, then raise
        stop[0] = True
        errors.insert(0, e)
    finally:
        for f in futures:
            while True:
                try:
                    f.result()
                    break
                except KeyboardInterrupt:  # wait anyway: the helpers write into our arrays
                    stop[0] = True
                    errors.append(KeyboardInterrupt())
    if errors:
        raise errors[0]
