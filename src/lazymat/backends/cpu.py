"""CPU backend: render the kernel, compile it (cached), launch it through ctypes.

ctypes releases the GIL during the call; the kernel threads with OpenMP.
"""

from __future__ import annotations

import ctypes
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
        return "no C++ compiler found (looked for $CXX, g++, clang++)"
    return None


def kernel_for(spec: KernelSpec) -> Any:
    """The compiled kernel function for a spec (the compile cache makes repeats cheap)."""
    from ..compile import load_library

    lib = load_library(render(spec), name=f"{spec.reduction.name}_{spec.dtype}")
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


def run(launch: Launch) -> tuple:
    """The arrays of ``launch.shapes``, each of shape ``batch + (M,) + shape``."""
    key = launch.key
    fn = kernels.get(key)
    if fn is None:
        fn = kernels[key] = kernel_for(launch.spec)
    xp, like, lead = launch.xp, launch.like, launch.batch + (launch.M,)
    lanes = LANES[launch.dtype]
    if launch.ranges is None:  # one output range of all rows, one interval of all columns
        layout = abi.dense_layout(launch.M, launch.N, lanes)
        outs = [xp.empty(lead + shape, like=like, dtype=xp.int64 if kind == "index" else None)
                for kind, shape in launch.shapes]
    else:  # rows outside every range hold the identity
        layout = abi.layout(launch.ranges, lanes)
        outs = [xp.full(lead + shape, fill, like=like,
                        dtype=xp.int64 if kind == "index" else None)
                for (kind, shape), fill in zip(launch.shapes, launch.fills)]
    _call(fn, launch, layout, outs, abi.num_threads(launch.nbatch * launch.M * launch.N))
    return tuple(outs)


def _call(fn: Any, launch: Launch, layout: tuple, outs: list, threads: int) -> None:
    """One kernel call: the ABI's arguments from the launch, the layout and the outputs."""
    keep: list = []
    arrays = launch.arrays
    ptrs = (ctypes.c_void_p * max(1, len(arrays)))(*[pointer(a, keep) for a in arrays])
    offsets = abi.zero_offsets(len(arrays)) if launch.offsets is None else launch.offsets
    out_ptrs = (ctypes.c_void_p * max(1, len(outs)))(*[pointer(o, keep) for o in outs])
    ntasks, tasks_ptr, slices_ptr, redranges_ptr, _ = layout
    fn(launch.M, launch.N, launch.nbatch, offsets.ctypes.data, ntasks, tasks_ptr, slices_ptr,
       redranges_ptr, ptrs, out_ptrs, threads)
