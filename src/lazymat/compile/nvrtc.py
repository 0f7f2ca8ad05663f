"""Compile CUDA C source to a cubin with NVRTC (``cuda-bindings``: no CUDA toolkit needed).

Install with ``pip install 'lazymat[cuda]'`` (``cuda-bindings`` and the NVRTC
library wheel). Cubins are cached with the CPU's kernels (``cache_dir()``, by
:func:`lazymat.compile.cache.ensure_artifact`: lock, atomic install, checksum),
keyed by the source, the NVRTC version, the architecture, the options and the
lazymat version.

Example::

    >>> from lazymat.compile import nvrtc
    >>> if nvrtc.available():  # doctest: +SKIP
    ...     cubin = nvrtc.compile_cubin('extern "C" __global__ void k(float* a) { a[0] = 1; }')
    ...     cubin[:4]
    b'\\x7fELF'
"""

from __future__ import annotations

import hashlib
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from .. import config
from ..errors import CompileError

__all__ = ["available", "version", "compile_cubin", "DEFAULT_ARCH", "OPTIONS"]

#: Architecture used when none is given (H100); a launcher passes the device's own.
DEFAULT_ARCH = "sm_90"
#: Options always passed. No fast-math: results must match the CPU backend to rounding.
OPTIONS: tuple[str, ...] = ("-std=c++17",)
_LOG_LINES = 40
_ELF = b"\x7fELF"

_module: Any = None
_memo: dict[str, bytes] = config.memo("compile.nvrtc.cubins", maxsize=256)


def _nvrtc() -> Any:
    """The ``cuda.bindings.nvrtc`` module, or None when it (or its library) is missing."""
    global _module
    if _module is None:
        try:
            from cuda.bindings import nvrtc

            err, _, _ = nvrtc.nvrtcVersion()  # loads libnvrtc: fails here if it is missing
            _module = nvrtc if err == nvrtc.nvrtcResult.NVRTC_SUCCESS else False
        except Exception:  # noqa: BLE001 - ImportError, or a library that does not load
            _module = False
    return _module or None


def available() -> bool:
    """Whether NVRTC can be used (``cuda-bindings`` importable and libnvrtc loadable)."""
    return _nvrtc() is not None


def version() -> tuple[int, int] | None:
    """NVRTC's (major, minor), or None when unavailable."""
    nvrtc = _nvrtc()
    if nvrtc is None:
        return None
    _, major, minor = nvrtc.nvrtcVersion()
    return int(major), int(minor)


def _check(result: Any, what: str) -> Any:
    """Unpack a cuda-bindings ``(err, *values)`` tuple, raising on an error code."""
    nvrtc = _nvrtc()
    err, *values = result if isinstance(result, tuple) else (result,)
    if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        raise CompileError(f"NVRTC {what} failed: {err!r}")
    return values[0] if len(values) == 1 else values


def compile_cubin(source: str, *, arch: str = DEFAULT_ARCH, name: str = "lazymat.cu",
                  options: Sequence[str] = (), cache: bool = True) -> bytes:
    """The cubin (ELF bytes) of CUDA C ``source`` for ``arch`` (e.g. ``"sm_90"``).

    Raises :class:`~lazymat.errors.CompileError` when NVRTC is missing or the source
    does not compile; the message holds the options, the log and the source's path.
    """
    nvrtc = _nvrtc()
    if nvrtc is None:
        raise CompileError("NVRTC is not available: pip install 'lazymat[cuda]' "
                           "(cuda-bindings and nvidia-cuda-nvrtc)")
    opts = [f"--gpu-architecture={arch}", *OPTIONS, *options]
    from .cache import LIBRARY_VERSION, ensure_artifact

    key = hashlib.sha256("\0".join([source, repr(version()), *opts, LIBRARY_VERSION])
                         .encode()).hexdigest()[:32]
    found = _memo.get(key)
    if found is not None:
        return found
    if not cache:
        data = _compile(source, name, opts, "(not saved: cache=False)")
    else:
        def build(src: Path, out: Path) -> None:
            out.write_bytes(_compile(source, name, opts, str(src)))

        path = ensure_artifact(key, source, build, name=name, source_suffix=".cu",
                               suffix=".cubin")
        data = path.read_bytes()
        if not data.startswith(_ELF):  # a valid checksum of something else: rebuild once
            data = ensure_artifact(key, source, build, name=name, source_suffix=".cu",
                                   suffix=".cubin", force=True).read_bytes()
    _memo[key] = data
    return data


def _compile(source: str, name: str, opts: list[str], where: str) -> bytes:
    """NVRTC's cubin of ``source``; ``where`` the source's path, for the error message."""
    nvrtc = _nvrtc()
    t0 = time.perf_counter()
    prog = _check(nvrtc.nvrtcCreateProgram(source.encode(), name.encode(), 0, [], []),
                  "program creation")
    try:
        result = nvrtc.nvrtcCompileProgram(prog, len(opts), [o.encode() for o in opts])
        err = result[0] if isinstance(result, tuple) else result
        if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            size = _check(nvrtc.nvrtcGetProgramLogSize(prog), "log size")
            log = b" " * size
            _check(nvrtc.nvrtcGetProgramLog(prog, log), "log")
            tail = "\n".join(log.decode(errors="replace").strip().splitlines()[-_LOG_LINES:])
            raise CompileError(f"NVRTC compilation of {name!r} failed ({err!r})\n"
                               f"options: {' '.join(opts)}\nsource: {where}\n"
                               f"log (last {_LOG_LINES} lines):\n{tail}")
        size = _check(nvrtc.nvrtcGetCUBINSize(prog), "cubin size")
        data = b" " * size
        _check(nvrtc.nvrtcGetCUBIN(prog, data), "cubin")
    finally:
        nvrtc.nvrtcDestroyProgram(prog)
    if config.verbose():
        print(f"[lazymat] NVRTC {name} ({opts[0]}) ... {time.perf_counter() - t0:.2f} s",
              file=sys.stderr, flush=True)
    return data
