"""The XLA FFI handler that calls lazymat's compiled CPU kernels from inside XLA programs.

One generic handler, ``lm_jax_cpu``, serves every kernel. Its attributes say which
kernel to call (``kernel``: an id that :func:`register_kernel` associates with the
kernel's function pointer in a table of the handler library, so a stale id from a
cached executable gives an error, never a jump to a dead address) and the launch
(M, N, nbatch, threads, lanes). Its buffers are the batch offsets table, the
block-sparse tables (empty: one range of all rows, one interval of all columns,
built by the handler), the data arrays, and the outputs, which XLA allocates and the
kernel writes in place: no copy, no Python, no GIL on the call.

int64 tables and index outputs travel as int32 pairs (``(..., 2)``), so that they keep
their 64 bits when jax runs without ``jax_enable_x64``.

The handler is C++17 against ``jax.ffi.include_dir()``, compiled once by lazymat's
compiler settings into the compile cache.

>>> from lazymat.jax.ffi import unavailable_reason
>>> unavailable_reason() is None  # doctest: +SKIP
True
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shlex
import subprocess
from pathlib import Path
from typing import Any

import numpy as np

TARGET = "lazymat_cpu"
CUDA_TARGET = "lazymat_cuda"

HANDLER_SOURCE = r"""
// lazymat: the XLA FFI handler of lazymat.jax (one for every compiled CPU kernel).
#include <cstdint>
#include <mutex>
#include <unordered_map>
#include <vector>
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
typedef long long i64;
// The kernel ABI: outs[k] is output k of the kernel's store, batch-major.
typedef void (*lm_kernel_fn)(i64 M, i64 N, i64 nbatch, const i64* offsets, i64 ntasks,
                             const i64* tasks, const i64* slices, const i64* redranges,
                             void** args, void** outs, int threads);
static std::mutex lm_lock;
static std::unordered_map<int64_t, void*>& lm_kernels() {
  static std::unordered_map<int64_t, void*> table;
  return table;
}

extern "C" int lm_jax_register(int64_t id, void* fn) {
  std::lock_guard<std::mutex> guard(lm_lock);
  lm_kernels()[id] = fn;
  return (int)lm_kernels().size();
}

static ffi::Error lm_cpu_call(int64_t kernel, int64_t M, int64_t N, int64_t nbatch,
                              int64_t threads, int64_t lanes, int64_t nargs, int64_t ntasks,
                              int64_t nslices, ffi::AnyBuffer offsets, ffi::AnyBuffer ranges,
                              ffi::RemainingArgs args, ffi::RemainingRets rets) {
  void* fn = nullptr;
  {
    std::lock_guard<std::mutex> guard(lm_lock);
    auto it = lm_kernels().find(kernel);
    if (it != lm_kernels().end()) fn = it->second;
  }
  if (!fn)
    return ffi::Error(ffi::ErrorCode::kNotFound,
                      "lazymat: kernel not loaded in this process (a cached executable?)");
  // Data arrays, then (with ranges) the outputs filled with the identity, which XLA aliases
  // to the results: rows outside every range keep it.
  if ((int64_t)args.size() < nargs)
    return ffi::Error::InvalidArgument("lazymat: wrong number of data arrays");
  std::vector<void*> in(nargs > 0 ? nargs : 1, nullptr), out(rets.size() + 1, nullptr);
  for (int64_t k = 0; k < nargs; k++) {
    auto a = args.get<ffi::AnyBuffer>(k);
    if (a.has_error()) return a.error();
    in[k] = a.value().untyped_data();
  }
  for (size_t k = 0; k < rets.size(); k++) {
    auto r = rets.get<ffi::AnyBuffer>(k);
    if (r.has_error()) return r.error();
    out[k] = r.value()->untyped_data();
  }
  const i64* off = (const i64*)offsets.untyped_data();
  std::vector<i64> dense_tasks, dense_slices, dense_red;
  const i64 *tasks, *slices, *redranges;
  if (ntasks < 0) {  // no ranges: blocks of `lanes` rows, one interval of all columns
    for (i64 i0 = 0; i0 < M; i0 += lanes) {
      dense_tasks.push_back(i0);
      dense_tasks.push_back(i0 + lanes < M ? i0 + lanes : M);
      dense_tasks.push_back(0);
    }
    dense_slices.push_back(1);
    dense_red.push_back(0);
    dense_red.push_back(N);
    ntasks = (int64_t)(dense_tasks.size() / 3);
    tasks = dense_tasks.data(), slices = dense_slices.data(), redranges = dense_red.data();
  } else {  // tasks (3 per task), slices, redranges (2 per interval), one after the other
    tasks = (const i64*)ranges.untyped_data();
    slices = tasks + 3 * ntasks;
    redranges = slices + nslices;
  }
  ((lm_kernel_fn)fn)(M, N, nbatch, off, ntasks, tasks, slices, redranges, in.data(),
                     out.data(), (int)threads);
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    lm_jax_cpu, lm_cpu_call,
    ffi::Ffi::Bind()
        .Attr<int64_t>("kernel").Attr<int64_t>("M").Attr<int64_t>("N")
        .Attr<int64_t>("nbatch").Attr<int64_t>("threads").Attr<int64_t>("lanes")
        .Attr<int64_t>("nargs").Attr<int64_t>("ntasks").Attr<int64_t>("nslices")
        .Arg<ffi::AnyBuffer>().Arg<ffi::AnyBuffer>()
        .RemainingArgs().RemainingRets());
"""

CUDA_HANDLER_SOURCE = r"""
// lazymat: the XLA FFI handler of lazymat.jax on CUDA GPUs (one for every compiled kernel).
// Host code only: it launches the NVRTC-compiled kernel on XLA's stream with the driver's
// cuLaunchKernel, whose address lm_jax_cuda_init receives (no CUDA headers or libraries
// are needed to build it).
#include <cstdint>
#include <mutex>
#include <unordered_map>
#include <vector>
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
typedef long long i64;
typedef struct CUfunc_st* CUfunction;
typedef struct CUstream_st* CUstream;
typedef int (*lm_launch_fn)(CUfunction f, unsigned gx, unsigned gy, unsigned gz, unsigned bx,
                            unsigned by, unsigned bz, unsigned shared, CUstream stream,
                            void** params, void** extra);

static std::mutex lm_lock;
static lm_launch_fn lm_launch = nullptr;
static std::unordered_map<int64_t, std::unordered_map<int64_t, CUfunction>>& lm_functions() {
  static std::unordered_map<int64_t, std::unordered_map<int64_t, CUfunction>> table;
  return table;
}

extern "C" void lm_jax_cuda_init(void* launch) { lm_launch = (lm_launch_fn)launch; }

extern "C" int lm_jax_cuda_register(int64_t id, int64_t device, void* fn) {
  std::lock_guard<std::mutex> guard(lm_lock);
  lm_functions()[id][device] = (CUfunction)fn;
  return (int)lm_functions().size();
}

static ffi::Error lm_cuda_call(CUstream stream, int32_t device, int64_t kernel, int64_t M,
                               int64_t N, int64_t nbatch, int64_t ntasks, int64_t nslices,
                               int64_t nargs, int64_t block, int64_t grid,
                               ffi::AnyBuffer offsets, ffi::AnyBuffer table,
                               ffi::RemainingArgs args, ffi::RemainingRets rets) {
  CUfunction fn = nullptr;
  {
    std::lock_guard<std::mutex> guard(lm_lock);
    auto it = lm_functions().find(kernel);
    if (it != lm_functions().end()) {
      auto on = it->second.find(device);
      if (on != it->second.end()) fn = on->second;
    }
  }
  if (!fn || !lm_launch)
    return ffi::Error(ffi::ErrorCode::kNotFound,
                      "lazymat: kernel not loaded on this GPU in this process");
  // Data arrays, then (with ranges) the outputs filled with the identity, which XLA aliases
  // to the results: rows outside every range keep it.
  if ((int64_t)args.size() < nargs)
    return ffi::Error::InvalidArgument("lazymat: wrong number of data arrays");
  // The kernel's parameters: ten scalars and pointers, then the Args and Outs structs
  // (nargs and nouts pointers each, by value), every one 8 bytes.
  std::vector<void*> in(nargs > 0 ? nargs : 1, nullptr), out(rets.size() + 1, nullptr);
  for (int64_t k = 0; k < nargs; k++) {
    auto a = args.get<ffi::AnyBuffer>(k);
    if (a.has_error()) return a.error();
    in[k] = a.value().untyped_data();
  }
  for (size_t k = 0; k < rets.size(); k++) {
    auto r = rets.get<ffi::AnyBuffer>(k);
    if (r.has_error()) return r.error();
    out[k] = r.value()->untyped_data();
  }
  i64 m = M, n = N, nb = nbatch, nsplit = 1, chunk = N, nt = ntasks;
  const i64* off = (const i64*)offsets.untyped_data();
  const i64* tasks = (const i64*)table.untyped_data();
  const i64* slices = tasks + 3 * ntasks;
  const i64* redranges = slices + nslices;
  void* params[] = {&m, &n, &nb, &nsplit, &chunk, &off, &nt, &tasks, &slices, &redranges,
                    in.data(), out.data()};
  int err = lm_launch(fn, (unsigned)grid, 1, 1, (unsigned)block, 1, 1, 0, stream, params,
                      nullptr);
  if (err != 0)
    return ffi::Error(ffi::ErrorCode::kInternal, "lazymat: cuLaunchKernel failed");
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    lm_jax_cuda, lm_cuda_call,
    ffi::Ffi::Bind()
        .Ctx<ffi::PlatformStream<CUstream>>().Ctx<ffi::DeviceOrdinal>()
        .Attr<int64_t>("kernel").Attr<int64_t>("M").Attr<int64_t>("N")
        .Attr<int64_t>("nbatch").Attr<int64_t>("ntasks").Attr<int64_t>("nslices")
        .Attr<int64_t>("nargs").Attr<int64_t>("block").Attr<int64_t>("grid")
        .Arg<ffi::AnyBuffer>().Arg<ffi::AnyBuffer>()
        .RemainingArgs().RemainingRets());
"""

_state: dict[str, Any] = {}  # "lib": the loaded handler library, "reason": why none


def _build(include: str):
    def build(src: Path, out: Path) -> None:
        from ..compile import compiler_info

        info = compiler_info()
        # The kernels' flags, but C++17 (the FFI headers need it) and the FFI include dir.
        cmd = [info.path, *[f for f in info.flags if not f.startswith("-std=")], "-std=c++17",
               "-I", include, "-x", "c++", str(src), "-o", str(out)]
        res = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if res.returncode != 0:
            tail = "\n".join((res.stderr or res.stdout).strip().splitlines()[-20:])
            raise RuntimeError(f"compiling the XLA FFI handler failed\ncommand: "
                               f"{shlex.join(cmd)}\nsource: {src}\n{tail}")
    return build


def build_handler(source: str, name: str) -> ctypes.CDLL:
    """Compile (once, into the compile cache) and load a handler library."""
    import jax
    import jaxlib

    from ..compile import compiler_info
    from ..compile.cache import ensure_artifact

    info = compiler_info()
    if info is None:
        raise RuntimeError("no C++ compiler found")
    include = jax.ffi.include_dir()
    if not (Path(include) / "xla" / "ffi" / "api" / "ffi.h").exists():
        raise RuntimeError(f"no XLA FFI headers under {include}")
    key = hashlib.sha256("\n".join([source, info.identity, shlex.join(info.flags), include,
                                    jaxlib.__version__]).encode()).hexdigest()[:32]
    return ctypes.CDLL(str(ensure_artifact(key, source, _build(include), name=name)))


def _load() -> Any:
    """The CPU handler library, compiled (cached) and registered with XLA on first use."""
    if "lib" in _state or "reason" in _state:
        return _state.get("lib")
    try:
        import jax

        lib = build_handler(HANDLER_SOURCE, "jax_ffi_handler")
        lib.lm_jax_register.argtypes = [ctypes.c_int64, ctypes.c_void_p]
        lib.lm_jax_register.restype = ctypes.c_int
        jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.lm_jax_cpu), platform="cpu")
        _state["lib"] = lib
    except Exception as e:  # noqa: BLE001 - any failure means: use the fallback
        _state["reason"] = f"{type(e).__name__}: {e}"
    return _state.get("lib")


def unavailable_reason() -> str | None:
    """Why the FFI path cannot be used here (None when it can). ``LAZYMAT_JAX_FFI=0`` turns
    it off (the kernels are then called through jax.pure_callback)."""
    if os.environ.get("LAZYMAT_JAX_FFI", "1").strip() == "0":
        return "turned off by LAZYMAT_JAX_FFI=0"
    _load()
    return _state.get("reason")


_ids: dict[int, int] = {}  # kernel address -> registered id


def register_kernel(fn: Any, source: str) -> int:
    """The handler's id for a compiled kernel (its source's hash, stable across processes)."""
    address = ctypes.cast(fn, ctypes.c_void_p).value
    kid = _ids.get(address)
    if kid is None:
        kid = kernel_id(source)
        _load().lm_jax_register(kid, address)
        _ids[address] = kid
    return kid


def kernel_id(source: str) -> int:
    """A kernel's id in the handlers' tables: its source's hash (stable across processes)."""
    return int.from_bytes(hashlib.sha256(source.encode()).digest()[:8], "little") >> 1


# ---------------------------------------------------------------------- CUDA

_cuda: dict[str, Any] = {}  # "lib", "reason", "driver"; (id, device) -> loaded function


def _load_cuda() -> Any:
    """The CUDA handler library, registered with XLA's CUDA platform (needs a GPU, the
    driver and cuda-bindings; built with the host compiler, no CUDA toolkit)."""
    if "lib" in _cuda or "reason" in _cuda:
        return _cuda.get("lib")
    try:
        import jax
        from cuda.bindings import driver

        if int(driver.cuInit(0)[0]) != 0:
            raise RuntimeError("cuInit failed (no GPU or no driver)")
        lib = build_handler(CUDA_HANDLER_SOURCE, "jax_ffi_cuda_handler")
        lib.lm_jax_cuda_register.argtypes = [ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
        lib.lm_jax_cuda_init.argtypes = [ctypes.c_void_p]
        libcuda = ctypes.CDLL("libcuda.so.1")
        lib.lm_jax_cuda_init(ctypes.cast(libcuda.cuLaunchKernel, ctypes.c_void_p).value)
        jax.ffi.register_ffi_target(CUDA_TARGET, jax.ffi.pycapsule(lib.lm_jax_cuda),
                                    platform="CUDA")
        _cuda.update(lib=lib, driver=driver, libcuda=libcuda)
    except Exception as e:  # noqa: BLE001 - any failure means: use the fallback
        _cuda["reason"] = f"{type(e).__name__}: {e}"
    return _cuda.get("lib")


def cuda_unavailable_reason() -> str | None:
    """Why the CUDA FFI path cannot be used here (None when it can)."""
    if os.environ.get("LAZYMAT_JAX_FFI", "1").strip() == "0":
        return "turned off by LAZYMAT_JAX_FFI=0"
    _load_cuda()
    return _cuda.get("reason")


def load_cuda_kernel(source: str, name: str, devices: list[tuple[int, str]]) -> int:
    """Compile ``source`` with NVRTC for each (device ordinal, sm_XY) and register its
    function ``name`` with the CUDA handler; returns the kernel's id."""
    from ..compile import nvrtc

    kid = kernel_id(source)
    driver, lib = _cuda["driver"], _load_cuda()
    for ordinal, arch in devices:
        if (kid, ordinal) in _cuda:
            continue
        cubin = nvrtc.compile_cubin(source, arch=arch, name=f"{name}.cu")
        err, device = driver.cuDeviceGet(ordinal)
        err, ctx = driver.cuDevicePrimaryCtxRetain(device)  # the context XLA uses
        if int(err) != 0:
            raise RuntimeError(f"cuDevicePrimaryCtxRetain({ordinal}) failed: {err}")
        driver.cuCtxSetCurrent(ctx)
        err, module = driver.cuModuleLoadData(cubin)
        if int(err) != 0:
            raise RuntimeError(f"cuModuleLoadData failed: {err}")
        err, fn = driver.cuModuleGetFunction(module, name.encode())
        if int(err) != 0:
            raise RuntimeError(f"cuModuleGetFunction({name}) failed: {err}")
        lib.lm_jax_cuda_register(kid, ordinal, int(fn))
        _cuda[(kid, ordinal)] = (module, fn)  # kept alive for the process
    return kid


def int64_table(a: np.ndarray) -> np.ndarray:
    """An int64 array as int32 pairs (what the handler reads back as int64)."""
    a = np.ascontiguousarray(a, dtype=np.int64).reshape(-1)
    return a.view(np.int32).reshape(-1, 2) if a.size else np.zeros((0, 2), np.int32)
