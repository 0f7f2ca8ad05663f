"""CUDA backend: kernels from ``codegen/cuda.py``, compiled by NVRTC for the GPU's own
architecture, launched with cuda-bindings on torch's current stream of the inputs' device.

``LAZYMAT_TENSOR_CORES`` (``off``, ``tf32``, ``3xtf32``; :func:`lazymat.config.tensor_cores`)
chooses whether float32 dot products and squared distances of dim >= 16 run on tensor
cores (``codegen/cuda_mma.py``); it is read on every call and is part of the kernel's key.

Nothing synchronises and no data goes through the host: the launch is queued on
``torch.cuda.current_stream(device)`` like a torch op, outputs are torch tensors
allocated on that stream, the array pointers travel by value in the kernel's
parameters, and the small tables of a call with ranges or batch dims (tasks,
intervals, offsets) are copied from pinned memory on the same stream. The GIL is
not held while the kernel runs (a launch only queues it). Each device has its own
loaded modules (its primary context, the one torch uses).

>>> import torch, lazymat as lm  # doctest: +SKIP
>>> x = torch.rand(10**6, 3, device="cuda")  # doctest: +SKIP
>>> (-lm.Vi(x).sqdist(lm.Vj(x))).exp().sum(1).device  # reduced on the GPU  # doctest: +SKIP
device(type='cuda', index=0)
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import replace
from typing import Any, Sequence

import numpy as np

from .. import config
from ..codegen import cuda as codegen
from ..codegen.cuda import KernelSpec, render
from ..errors import CompileError, CudaUnavailableError
from . import launch as abi
from .base import Launch

_lock = threading.Lock()
# (kernel key, device index) -> CUfunction
_functions: dict[tuple, Any] = config.memo("backends.cuda.functions", maxsize=1024)
_modules: list[Any] = []  # loaded modules, kept alive for the process
_contexts: dict[int, Any] = {}  # device index -> its primary context
# (device, M, N, nargs, block) -> _table() without ranges
_dense: dict[tuple, tuple] = config.memo("backends.cuda.dense_tables", maxsize=256)
# torch's raw stream handle -> the CUstream object
_streams: dict[int, Any] = config.memo("backends.cuda.streams", maxsize=256)
_driver_module: Any = None
#: Blocks of one launch (a grid-stride loop covers more tasks).
MAX_GRID = 65535 * 32
#: When rows give fewer blocks than this per multiprocessor, the columns are cut into parts
#: (of at least MIN_CHUNK columns) reduced by separate blocks, then combined.
BLOCKS_PER_SM = 4
MIN_CHUNK = 1024


def _driver() -> Any:
    """``cuda.bindings.driver``, initialised; raises :class:`CudaUnavailableError` saying
    what was missing."""
    global _driver_module
    if _driver_module is None:
        try:
            from cuda.bindings import driver
        except ImportError as e:
            raise CudaUnavailableError(
                "the CUDA backend needs cuda-bindings (looked for the Python module "
                f"cuda.bindings: {e}); pip install 'lazymat[cuda]'") from None
        try:
            result = driver.cuInit(0)
        except Exception as e:  # noqa: BLE001 - libcuda.so missing: no driver installed
            raise CudaUnavailableError(f"the CUDA driver library (libcuda.so) could not be "
                                       f"loaded: {e}") from None
        err = result[0] if isinstance(result, tuple) else result
        if int(err) != 0:
            raise CudaUnavailableError(f"cuInit failed: {_error_name(driver, err)} (no GPU, "
                                       "or the driver does not match?)")
        _driver_module = driver
    return _driver_module


def _error_name(driver: Any, err: Any) -> str:
    try:
        _, name = driver.cuGetErrorName(err)
        return name.decode() if isinstance(name, bytes) else str(name)
    except Exception:  # noqa: BLE001
        return repr(err)


def _check(result: Any, what: str) -> Any:
    """Unpack a cuda-bindings ``(err, *values)`` result, raising on an error code."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise RuntimeError(f"CUDA {what} failed: {_error_name(_driver_module, err)}")
    return values[0] if len(values) == 1 else values


def unavailable_reason() -> str | None:
    """Why the CUDA backend cannot run here (None when it can): torch with CUDA, a GPU,
    cuda-bindings, the driver and NVRTC are each looked for."""
    try:
        import torch
    except ImportError:
        return "torch is not installed (the CUDA backend works on torch CUDA tensors)"
    if not torch.cuda.is_available():
        return f"torch {torch.__version__} sees no CUDA GPU"
    try:
        _driver()
    except CudaUnavailableError as e:
        return str(e)
    from ..compile import nvrtc

    if not nvrtc.available():
        return ("NVRTC is not available (looked for cuda.bindings.nvrtc and libnvrtc); "
                "pip install 'lazymat[cuda]'")
    return None


def _context(index: int) -> Any:
    ctx = _contexts.get(index)
    if ctx is None:
        driver = _driver()
        device = _check(driver.cuDeviceGet(index), f"cuDeviceGet({index})")
        ctx = _contexts[index] = _check(driver.cuDevicePrimaryCtxRetain(device),
                                        "cuDevicePrimaryCtxRetain")
    return ctx


_archs: dict[int, str] = config.memo("backends.cuda.archs", maxsize=None)


def _arch(index: int) -> str:
    arch = _archs.get(index)
    if arch is None:
        import torch

        major, minor = torch.cuda.get_device_capability(index)
        arch = _archs[index] = f"sm_{major}{minor}"
    return arch


def _function(key: tuple, spec: KernelSpec, index: int, block: int, tensor_cores: str) -> Any:
    """The kernel of ``spec`` loaded on device ``index`` (compiled once per architecture)."""
    fn = _functions.get((key, index))
    if fn is not None:
        return fn
    from ..compile import nvrtc

    name = f"lm_{spec.reduction.name.lower()}_{spec.dtype}"
    if not nvrtc.available():
        raise CompileError("the CUDA backend needs NVRTC: pip install 'lazymat[cuda]'")
    source = render(spec, name=name, block=block, tensor_cores=tensor_cores)
    cubin = nvrtc.compile_cubin(source, arch=_arch(index), name=f"{name}.cu")
    driver = _driver()
    with _lock:
        fn = _functions.get((key, index))
        if fn is None:
            _check(driver.cuCtxSetCurrent(_context(index)), "cuCtxSetCurrent")
            module = _check(driver.cuModuleLoadData(cubin), "cuModuleLoadData")
            _modules.append(module)
            fn = _functions[(key, index)] = _check(
                driver.cuModuleGetFunction(module, name.encode()), "cuModuleGetFunction")
    return fn


_multiprocessors: dict[int, int] = config.memo("backends.cuda.multiprocessors", maxsize=None)


def _block_size(M: int, index: int) -> int:
    """Threads per block (= rows per task): ``codegen.BLOCK``, or half of it when there are
    too few rows to give every multiprocessor two blocks (one thread reduces one row, so
    small M would leave most of the GPU idle). Read per call: a benchmark can change it."""
    sms = _multiprocessors.get(index)
    if sms is None:
        import torch

        sms = _multiprocessors[index] = torch.cuda.get_device_properties(
            index).multi_processor_count
    block = codegen.BLOCK
    return block if M >= 2 * block * sms or block < 64 else block // 2


def _upload(table: np.ndarray, device: Any) -> Any:
    """An int64 table on the device, copied on the current stream from pinned memory
    (torch keeps the pinned buffer until the copy is done)."""
    import torch

    host = torch.from_numpy(np.ascontiguousarray(table, dtype=np.int64).reshape(-1))
    return host.pin_memory().to(device, non_blocking=True)


def _table(ranges: Sequence[Any], nargs: int, device: Any, block: int) -> tuple[Any, int, tuple]:
    """(tensor, ntasks, pointers to zero offsets, tasks, slices, redranges) on the device,
    for ``ranges`` = (ranges_i, slices_i, redranges_j)."""
    tasks = abi.tasks(np.asarray(ranges[0], np.int64), block)
    parts = [np.zeros(max(1, nargs), np.int64), tasks.reshape(-1),
             np.asarray(ranges[1], np.int64).reshape(-1),
             np.asarray(ranges[2], np.int64).reshape(-1)]
    table = _upload(np.concatenate(parts), device)
    starts = np.cumsum([0] + [8 * len(p) for p in parts[:-1]])
    return table, len(tasks), tuple(table.data_ptr() + int(s) for s in starts)


def _dense_table(index: int, M: int, N: int, nargs: int, device: Any, block: int) -> tuple:
    """The table of a call without ranges (memoized per device and sizes: every call needs
    it), and the stream it was made on."""
    key = (index, M, N, nargs, block)
    found = _dense.get(key)
    if found is None:
        import torch

        found = _dense[key] = (*_table(abi.dense_ranges(M, N), nargs, device, block),
                               torch.cuda.current_stream(index).cuda_stream)
    return found


def _parts(blocks: int, N: int, index: int) -> int:
    """How many parts to cut the columns into: 1, or a power of two when ``blocks`` would
    leave multiprocessors idle (each part's raw state is stored, then merged)."""
    want = BLOCKS_PER_SM * _multiprocessors[index]
    parts = 1
    while blocks * parts < want and N >= 2 * parts * MIN_CHUNK:
        parts *= 2
    return parts


def run(launch: Launch) -> tuple:
    """The arrays of ``launch.shapes`` on the device of ``launch.like`` (torch CUDA tensors);
    numpy data goes to the current GPU and its results come back."""
    if launch.xp.name != "torch":
        return _run_from_host(launch)
    import torch

    device = launch.like.device
    current = torch.cuda.current_device()
    index = device.index if device.index is not None else current
    with torch.cuda.device(index) if index != current else contextlib.nullcontext():
        return _run_on(launch, torch, device, index)


def _run_from_host(launch: Launch) -> tuple:
    import torch

    from ..arraylib import lib_of

    device = torch.device("cuda", torch.cuda.current_device())
    arrays = [torch.from_numpy(np.ascontiguousarray(a)).to(device) for a in launch.arrays]
    like = arrays[0] if arrays else torch.from_numpy(np.asarray(launch.like)).to(device)
    outs = run(replace(launch, arrays=arrays, like=like, xp=lib_of(like)))
    return tuple(o.cpu().numpy() for o in outs)


def _run_on(launch: Launch, torch: Any, device: Any, index: int) -> tuple:
    M, N, nargs = launch.M, launch.N, len(launch.arrays)
    block = _block_size(M, index)
    torch_stream = torch.cuda.current_stream(index)
    stream = torch_stream.cuda_stream
    if launch.ranges is None:
        table, ntasks, pointers, made_on = _dense_table(index, M, N, nargs, device, block)
        if made_on != stream:  # keep its memory until this stream is done with it
            table.record_stream(torch_stream)
    else:  # made on this stream: torch's allocator orders its reuse after the kernel
        table, ntasks, pointers = _table(launch.ranges, nargs, device, block)
    offsets_ptr, tasks_ptr, slices_ptr, redranges_ptr = pointers
    if launch.offsets is not None:  # batch dims: per-array offsets of every batch
        batch_table = _upload(launch.offsets, device)
        offsets_ptr = batch_table.data_ptr()
    nbatch = launch.nbatch
    parts = _parts(nbatch * ntasks, N, index)
    # Cut columns: every part stores its raw state, merged below.
    stored = replace(launch, store="state") if parts > 1 else launch
    shapes = stored.shapes
    fn = _kernel(stored, block, index)
    lead = ((parts,) if parts > 1 else ()) + launch.batch + (M,)
    tensors = [a if a.is_contiguous() else a.contiguous() for a in launch.arrays]
    dtypes = {"index": torch.int64, "value": launch.like.dtype, "acc": stored.array_dtype("acc")}
    if launch.ranges is None:
        outs = [torch.empty(lead + shape, device=device, dtype=dtypes[kind])
                for kind, shape in shapes]
    else:  # rows outside every range hold the identity (or the empty state)
        outs = [torch.full(lead + shape, fill, device=device, dtype=dtypes[kind])
                for (kind, shape), fill in zip(shapes, stored.fills)]
    # Every parameter is 8 bytes (the Args and Outs structs are nargs and nouts pointers):
    # one buffer holds them all, and the driver gets the address of each.
    buffer = np.array([M, N, nbatch, parts, -(-N // parts), offsets_ptr, ntasks, tasks_ptr,
                       slices_ptr, redranges_ptr, *[t.data_ptr() for t in tensors]]
                      + [0] * (len(tensors) == 0)
                      + [o.data_ptr() for o in outs], dtype=np.uint64)
    base, nargs = buffer.ctypes.data, max(1, len(tensors))
    where = np.array([base + 8 * k for k in range(11)] + [base + 8 * (10 + nargs)],
                     dtype=np.uint64)
    grid = max(1, min(parts * nbatch * ntasks, MAX_GRID))
    driver = _driver_module
    handle = _streams.get(stream)
    if handle is None:
        handle = _streams[stream] = driver.CUstream(stream)
    _check(driver.cuCtxSetCurrent(_contexts[index]), "cuCtxSetCurrent")
    _check(driver.cuLaunchKernel(fn, grid, 1, 1, block, 1, 1, 0, handle,
                                 where.ctypes.data, 0), "cuLaunchKernel")
    if parts == 1:
        return tuple(outs)
    # The kernel's indices are global (each part reduces its own columns of [0, N)).
    return abi.merge_parts(launch, [[o[p] for o in outs] for p in range(parts)])


def _kernel(launch: Launch, block: int, index: int) -> Any:
    # The tensor-core mode is read per call (an environment change takes effect) and is
    # part of the key: it changes the source.
    tensor_cores = config.tensor_cores()
    if tensor_cores != "off" and int(_arch(index)[3:].rstrip("af")) < 80:  # mma.sync: sm_80+
        tensor_cores = "off"
    key = launch.key + (block, tensor_cores)
    fn = _functions.get((key, index))
    if fn is None:
        fn = _function(key, launch.spec, index, block, tensor_cores)
    return fn
