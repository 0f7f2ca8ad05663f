"""CPU backend: render the kernel, compile it (cached), launch it through ctypes.

ctypes releases the GIL during the call; the kernel threads with OpenMP.
"""

from __future__ import annotations

import ctypes
import math
from typing import Any, Sequence

import numpy as np

from .. import config
from ..codegen.cpu import LANES, KernelSpec, render
from ..formula import Node, variables
from ..reductions import ReductionDef

# (reduction, formula, ...) -> kernel function
_kernels: dict[tuple, Any] = config.memo("backends.cpu.kernels", maxsize=1024)
_ARGTYPES = [ctypes.c_longlong, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_void_p,
             ctypes.c_longlong, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
             ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]


def kernel_for(spec: KernelSpec) -> Any:
    """The compiled kernel function for a spec (the compile cache makes repeats cheap)."""
    from ..compile import load_library

    lib = load_library(render(spec), name=f"{spec.reduction.name}_{spec.dtype}")
    fn = lib.lm_kernel
    fn.argtypes, fn.restype = _ARGTYPES, None
    return fn


def _arg_dims(roots: list[Node], n_args: int) -> tuple[tuple[int, int], ...]:
    dims = [(1, 2)] * n_args  # unused arguments: passed, never read
    for r in roots:
        for v in variables(r):
            pos, dim, cat = v.params
            dims[pos] = (dim, cat)
    return tuple(dims)


def _pointer(a: Any, keep: list) -> int:
    if isinstance(a, np.ndarray):
        a = np.ascontiguousarray(a)
        keep.append(a)
        return a.ctypes.data
    a = a.detach()
    if not a.is_contiguous():
        a = a.contiguous()
    keep.append(a)
    return a.data_ptr()


def _layout(tasks: np.ndarray, slices: Any, redranges: Any) -> tuple:
    """(ntasks, pointers to tasks, slices, redranges, the arrays that own the memory)."""
    arrays = (tasks, np.ascontiguousarray(slices, dtype=np.int64),
              np.ascontiguousarray(redranges, dtype=np.int64))
    return (len(tasks),) + tuple(a.ctypes.data for a in arrays) + (arrays,)


_dense_layouts: dict[tuple[int, int, int], tuple] = config.memo("backends.cpu.dense_layouts",
                                                                maxsize=256)
_zero_offsets: dict[int, np.ndarray] = config.memo("backends.cpu.zero_offsets", maxsize=256)


def _dense_layout(M: int, N: int, lanes: int) -> tuple:
    """The layout without ranges (cached: it is on the path of every call)."""
    key = (M, N, lanes)
    layout = _dense_layouts.get(key)
    if layout is None:
        ranges_i = np.array([[0, M]], np.int64)
        layout = _dense_layouts[key] = _layout(_tasks(ranges_i, lanes), [1], [[0, N]])
    return layout


def _no_offsets(nargs: int) -> int:
    """Pointer to zero offsets for a call without batch dims."""
    zeros = _zero_offsets.get(nargs)
    if zeros is None:
        zeros = _zero_offsets[nargs] = np.zeros(max(1, nargs), dtype=np.int64)
    return zeros.ctypes.data


def _tasks(ranges_i: np.ndarray, lanes: int) -> np.ndarray:
    """(start, end, range) of every block of at most ``lanes`` rows of every output range."""
    starts, ends = ranges_i[:, 0].astype(np.int64), ranges_i[:, 1].astype(np.int64)
    counts = np.maximum(0, (ends - starts + lanes - 1) // lanes)
    which = np.repeat(np.arange(len(starts), dtype=np.int64), counts)
    first = np.repeat(np.cumsum(counts) - counts, counts)
    i0 = starts[which] + (np.arange(counts.sum(), dtype=np.int64) - first) * lanes
    return np.ascontiguousarray(np.stack([i0, np.minimum(i0 + lanes, ends[which]), which], 1))


def run(red: ReductionDef, formula: Node, weight: Node | None, K: int | None,
        arrays: Sequence[Any], M: int, N: int, dtype: str, xp: Any,
        shapes: list[tuple[str, tuple[int, ...]]], like: Any, batch: tuple[int, ...] = (),
        offsets: Any = None, ranges: tuple[Any, Any, Any] | None = None,
        accumulation: tuple[str, str] = ("double", "block")) -> tuple:
    """``ranges``: (ranges_i, slices_i, redranges_j) as int64 numpy arrays, or None."""
    from ..plan import num_threads

    key = (red.name, formula, weight, K, dtype, len(arrays), accumulation)
    fn = _kernels.get(key)
    if fn is None:
        roots = [formula] + ([weight] if weight is not None else [])
        fn = _kernels[key] = kernel_for(
            KernelSpec(red, formula, weight, K, dtype, _arg_dims(roots, len(arrays)),
                       accumulation))
    keep: list = []
    ptrs = (ctypes.c_void_p * max(1, len(arrays)))(*[_pointer(a, keep) for a in arrays])
    if ranges is None:  # one output range of all rows, one interval of all columns
        layout = _dense_layout(M, N, LANES[dtype])
        outs = [xp.empty(batch + (M,) + shape, like=like,
                         dtype=xp.int64 if kind == "index" else None) for kind, shape in shapes]
    else:  # rows outside every range hold the identity
        layout = _layout(_tasks(ranges[0], LANES[dtype]), ranges[1], ranges[2])
        outs = [xp.full(batch + (M,) + shape, fill, like=like,
                        dtype=xp.int64 if kind == "index" else None)
                for (kind, shape), fill in zip(shapes, red.identity)]
    out_ptrs = (ctypes.c_void_p * max(1, len(outs)))(*[_pointer(o, keep) for o in outs])
    nbatch = math.prod(batch)
    offsets_ptr = _no_offsets(len(arrays)) if offsets is None else offsets.ctypes.data
    ntasks, tasks_ptr, slices_ptr, redranges_ptr, _ = layout
    fn(M, N, nbatch, offsets_ptr, ntasks, tasks_ptr, slices_ptr, redranges_ptr,
       ptrs, out_ptrs, num_threads(nbatch * M * N))
    return tuple(outs)
