"""The Python side of the kernel ABI, written once for every compiled backend.

A kernel reduces the rows of *tasks*: ``(i_start, i_end, range)`` triples, each block of at
most ``lanes`` rows of one output range; ``slices[range]`` is the end (in ``redranges``) of
that range's column intervals, ``redranges`` the ``[j_start, j_end)`` intervals. A call
without block-sparse ranges has one output range of all rows and one interval of all
columns. ``offsets`` is the (nbatch, nargs) table of element offsets of each batch in each
array. When the columns are cut into parts (few rows, many columns), each part's raw state
comes back and :func:`combine` merges them with the reduction's own ``merge``.

>>> tasks(np.array([[0, 5]]), lanes=4).tolist()
[[0, 4, 0], [4, 5, 0]]
"""

from __future__ import annotations

import math
import os
from typing import Any, Sequence

import numpy as np

from .. import config


def tasks(ranges_i: np.ndarray, lanes: int) -> np.ndarray:
    """(start, end, range) of every block of at most ``lanes`` rows of every output range."""
    starts, ends = ranges_i[:, 0].astype(np.int64), ranges_i[:, 1].astype(np.int64)
    counts = np.maximum(0, (ends - starts + lanes - 1) // lanes)
    which = np.repeat(np.arange(len(starts), dtype=np.int64), counts)
    first = np.repeat(np.cumsum(counts) - counts, counts)
    i0 = starts[which] + (np.arange(counts.sum(), dtype=np.int64) - first) * lanes
    return np.ascontiguousarray(np.stack([i0, np.minimum(i0 + lanes, ends[which]), which], 1))


def dense_ranges(M: int, N: int, column_start: int = 0) -> tuple[np.ndarray, np.ndarray,
                                                                  np.ndarray]:
    """The (ranges_i, slices_i, redranges_j) triple of all rows against the columns
    ``[column_start, N)``."""
    return (np.array([[0, M]], np.int64), np.array([1], np.int64),
            np.array([[column_start, N]], np.int64))


def layout(ranges: tuple[Any, Any, Any], lanes: int) -> tuple:
    """(ntasks, pointers to tasks, slices, redranges, the arrays that own the memory)."""
    arrays = (tasks(np.asarray(ranges[0], np.int64), lanes),
              np.ascontiguousarray(ranges[1], dtype=np.int64),
              np.ascontiguousarray(ranges[2], dtype=np.int64))
    return (len(arrays[0]),) + tuple(a.ctypes.data for a in arrays) + (arrays,)


def ranged_columns(arrays: tuple[np.ndarray, np.ndarray, np.ndarray]) -> int:
    """The columns all tasks of a :func:`layout` reduce together (its ``arrays``: tasks,
    slices, redranges): the work of a block-sparse call, per row of a task.

    >>> ranged_columns(layout((np.array([[0, 5]]), np.array([1]), np.array([[2, 9]])), 4)[-1])
    14
    """
    tasks_, slices, redranges = arrays
    if len(tasks_) == 0 or len(slices) == 0:
        return 0
    lengths = np.concatenate([[0], np.cumsum(redranges[:, 1] - redranges[:, 0])])
    per_range = lengths[slices] - lengths[np.concatenate([[0], slices[:-1]])]
    return int(per_range[tasks_[:, 2]].sum())


_dense_layouts: dict[tuple, tuple] = config.memo("backends.launch.dense_layouts", maxsize=256)


def dense_layout(M: int, N: int, lanes: int, columns: tuple[int, int] | None = None) -> tuple:
    """:func:`layout` without ranges (memoized: it is on the path of every call); ``columns``
    = (start, end) restricts it to those columns."""
    key = (M, N, lanes, columns)
    found = _dense_layouts.get(key)
    if found is None:
        c0, c1 = columns if columns is not None else (0, N)
        found = _dense_layouts[key] = layout(dense_ranges(M, c1, c0), lanes)
    return found


_zero_offsets: dict[int, np.ndarray] = config.memo("backends.launch.zero_offsets", maxsize=256)


def zero_offsets(nargs: int) -> np.ndarray:
    """The offsets table of a call without batch dims (memoized; keep it alive while the
    kernel runs)."""
    zeros = _zero_offsets.get(nargs)
    if zeros is None:
        zeros = _zero_offsets[nargs] = np.zeros(max(1, nargs), dtype=np.int64)
    return zeros


def batch_offsets(arrays: Sequence[Any], arg_dims: Sequence[tuple[int, int] | None],
                  batch: tuple[int, ...]) -> np.ndarray:
    """(prod(batch), len(arrays)) element offsets of each batch in each array (0 along
    broadcast dims), for contiguous arrays; ``arg_dims`` the (dim, category) of each
    argument, None for an unused one (category 2, a parameter, has one inner dim; the
    others two).

    >>> batch_offsets([np.zeros((2, 3, 1)), np.zeros((1,))], [(1, 0), (1, 2)], (2,)).tolist()
    [[0, 0], [3, 0]]
    """
    nbatch = math.prod(batch)
    offsets = np.zeros((nbatch, max(1, len(arrays))), dtype=np.int64)
    if not batch:
        return offsets
    grid = np.indices(batch).reshape(len(batch), -1)  # (ndims, nbatch) batch multi-indices
    for pos, dims in enumerate(arg_dims):
        if dims is None:
            continue
        shape = tuple(arrays[pos].shape)
        n_inner = 1 if dims[1] == 2 else 2
        inner = shape[len(shape) - n_inner:]
        own = (1,) * (len(batch) - (len(shape) - n_inner)) + shape[:len(shape) - n_inner]
        stride, total = [], math.prod(inner)
        for d in reversed(own):
            stride.append(0 if d == 1 else total)
            total *= d
        offsets[:, pos] = (np.array(stride[::-1], dtype=np.int64)[:, None] * grid).sum(0)
    return offsets


#: Below this many pairs a reduction runs on one thread: waking threads costs more.
SMALL_PAIRS = 1 << 15


_threads_started = False  # this process ran a kernel on several OpenMP threads
_single_threaded = False  # a fork() child of such a process


def _after_fork_in_child() -> None:
    # libgomp's thread pool does not survive fork(): a parallel region in the child would wait
    # forever for threads that only exist in the parent. Like torch, the child of a process
    # that started threads runs its kernels on one thread.
    global _single_threaded
    _single_threaded = _single_threaded or _threads_started


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def num_threads(pairs: int | None = None) -> int:
    """Threads for a reduction: LAZYMAT_NUM_THREADS, OMP_NUM_THREADS or the usable cores;
    one for a tiny problem, and one in a fork() child of a process that ran threaded
    kernels (OpenMP is not fork-safe)."""
    global _threads_started
    if pairs is not None and pairs < SMALL_PAIRS:
        return 1
    n = config.threads_setting() or config.cores()
    if n > 1:
        if _single_threaded:
            return 1
        _threads_started = True
    return n


def column_parts(N: int, parts: int) -> list[tuple[int, int]]:
    """``parts`` consecutive column intervals of (nearly) equal size covering [0, N).

    >>> column_parts(10, 3)
    [(0, 3), (3, 6), (6, 10)]
    """
    edges = [N * p // parts for p in range(parts + 1)]
    return list(zip(edges[:-1], edges[1:]))


def _is_index(xp: Any, a: Any) -> bool:
    dtype = a.dtype
    return not (dtype.is_floating_point if xp.name == "torch" else dtype.kind == "f")


def combine(red: Any, xp: Any, states: Sequence[Any], column_starts: Sequence[int] | None,
            K: int | None) -> Any:
    """The state of ``red`` over all columns from the states of consecutive column parts.

    ``states[p]`` is part p's state as ``red.merge`` takes it (a tuple of arrays in
    ``red.state(...)`` order, the same rows in every part); parts are in column order.
    ``column_starts[p]`` is part p's first column when its indices count from its own
    start (a Dask task on a slice of y): they are made global first (-1, "none seen",
    stays). None when the indices are global already (a kernel given the part's columns
    as an interval). Adjacent parts are merged in a tree (log2 rounds, each one vectorised
    over all pairs of the round), so ``merge``'s "the second holds larger j" stays true and
    the first index wins ties.

    >>> from lazymat.arraylib import NUMPY
    >>> from lazymat.reductions import REDUCTIONS
    >>> parts = [(np.array([[1.0]]), np.array([[0]])), (np.array([[0.5]]), np.array([[0]]))]
    >>> v, i = combine(REDUCTIONS["Min_ArgMin"], NUMPY, parts, [0, 10], None)
    >>> v.tolist(), i.tolist()
    ([[0.5]], [[10]])
    """
    bare = not isinstance(states[0], (tuple, list))  # a state of one array, not in a tuple
    parts = [(s,) if bare else tuple(s) for s in states]
    if column_starts is not None:
        parts = [tuple(xp.where(a >= 0, a + start, a) if start and _is_index(xp, a) else a
                       for a in s) for s, start in zip(parts, column_starts)]
    # (parts, rows, ...) arrays: one merge call per round for all pairs of that round.
    stacked = tuple(xp.concat([xp.expand_dims(s[k], 0) for s in parts], 0)
                    for k in range(len(parts[0])))
    count = len(parts)
    while count > 1:
        pairs, odd = count // 2, count % 2
        first = tuple(_rows(a[0:2 * pairs:2]) for a in stacked)
        second = tuple(_rows(a[1:2 * pairs:2]) for a in stacked)
        merged = red.merge(xp, first[0] if bare else first, second[0] if bare else second,
                           K=K)
        merged = (merged,) if bare else tuple(merged)
        merged = tuple(m.reshape((pairs,) + tuple(a.shape[1:])) for m, a in zip(merged, stacked))
        if odd:  # the last part waits for the next round
            merged = tuple(xp.concat([m, a[count - 1:count]], 0)
                           for m, a in zip(merged, stacked))
        stacked, count = merged, pairs + odd
    return stacked[0][0] if bare else tuple(a[0] for a in stacked)


def merge_parts(launch: Any, parts: Sequence[Sequence[Any]]) -> tuple:
    """What a backend returns for ``launch`` from the raw states its kernels stored for
    consecutive column parts (``parts[p][k]``: state array k of part p, ``batch + (M,) +
    shape``, indices global): the merged state for ``store="state"``, else the finalized
    outputs, values in the data's dtype (a sum's state is its accumulator, double)."""
    stored = launch.red.state(launch.formula.dim, launch.K, launch.wdim)
    states = [tuple(a.reshape((-1,) + shape) for a, (_, shape) in zip(part, stored))
              for part in parts]  # rows first: merge rules work on rows
    state = combine(launch.red, launch.xp, states, None, launch.K)
    if launch.store == "state":
        return state
    return finalize(launch.red, launch.xp, state, launch.like)


def _rows(a: Any) -> Any:
    """(pairs, rows, ...) -> (pairs * rows, ...): every pair's rows side by side."""
    return a.reshape((-1,) + tuple(a.shape[2:]))


def finalize(red: Any, xp: Any, state: Any, like: Any) -> tuple:
    """The outputs of ``red`` from a merged state, values in ``like``'s dtype (sums' states
    are in the accumulator's type, double by default).

    >>> import numpy as np
    >>> from lazymat.arraylib import NUMPY
    >>> from lazymat.reductions import REDUCTIONS
    >>> finalize(REDUCTIONS["Sum"], NUMPY, (np.ones((2, 1)),), np.zeros(1, np.float32))[0].dtype
    dtype('float32')
    """
    return tuple(o if kind == "index" else xp.cast(o, like)
                 for o, kind in zip(red.finalize(xp, state), red.output_kinds))
