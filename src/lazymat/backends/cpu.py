"""CPU backend: render the kernel, compile it (cached), launch it through ctypes.

ctypes releases the GIL during the call; the kernel threads with OpenMP.
"""

from __future__ import annotations

import ctypes
import math
from typing import Any, Sequence

import numpy as np

from ..codegen.cpu import KernelSpec, render
from ..formula import Node, variables
from ..reductions import ReductionDef

_kernels: dict[tuple, Any] = {}  # per process: (reduction, formula, ...) -> kernel function
_ARGTYPES = [ctypes.c_longlong, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_void_p,
             ctypes.c_longlong, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
             ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
LANES = {"float32": 16, "float64": 8}


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
        offsets: Any = None, ranges: tuple[Any, Any, Any] | None = None) -> tuple:
    """``ranges``: (ranges_i, slices_i, redranges_j) as int64 numpy arrays, or None."""
    from ..plan import num_threads

    key = (red.name, formula, weight, K, dtype, len(arrays))
    fn = _kernels.get(key)
    if fn is None:
        roots = [formula] + ([weight] if weight is not None else [])
        fn = _kernels[key] = kernel_for(
            KernelSpec(red, formula, weight, K, dtype, _arg_dims(roots, len(arrays))))
    keep: list = []
    ptrs = (ctypes.c_void_p * max(1, len(arrays)))(*[_pointer(a, keep) for a in arrays])
    if ranges is None:  # one output range of all rows, one interval of all columns
        ranges = (np.array([[0, M]], np.int64), np.array([1], np.int64),
                  np.array([[0, N]], np.int64))
        outs = [xp.empty(batch + (M,) + shape, like=like,
                         dtype=xp.int64 if kind == "index" else None) for kind, shape in shapes]
    else:  # rows outside every range hold the identity
        outs = [xp.full(batch + (M,) + shape, fill, like=like,
                        dtype=xp.int64 if kind == "index" else None)
                for (kind, shape), fill in zip(shapes, red.identity)]
    tasks = _tasks(ranges[0], LANES[dtype])
    slices = np.ascontiguousarray(ranges[1], dtype=np.int64)
    redranges = np.ascontiguousarray(ranges[2], dtype=np.int64)
    values = [o for (kind, _), o in zip(shapes, outs) if kind == "value"]
    indices = [o for (kind, _), o in zip(shapes, outs) if kind == "index"]
    nbatch = math.prod(batch)
    if offsets is None:
        offsets = np.zeros((nbatch, max(1, len(arrays))), dtype=np.int64)
    fn(M, N, nbatch, offsets.ctypes.data, len(tasks), tasks.ctypes.data, slices.ctypes.data,
       redranges.ctypes.data, ptrs, _pointer(values[0], keep) if values else None,
       _pointer(indices[0], keep) if indices else None, num_threads(nbatch * M * N))
    return tuple(outs)
