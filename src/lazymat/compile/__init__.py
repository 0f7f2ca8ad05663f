"""Compile generated C++ into shared libraries, cached on disk by content hash.

Example::

    >>> from lazymat.compile import load_library
    >>> lib = load_library('extern "C" int lm_answer(void) { return 42; }')
    >>> lib.lm_answer()
    42
"""

from __future__ import annotations

from typing import Any

from .cache import LIBRARY_VERSION, cache_clear, cache_dir, load_library, stats
from .compiler import CompilerInfo, compiler_info

__all__ = [
    "CompilerInfo",
    "LIBRARY_VERSION",
    "cache_clear",
    "cache_dir",
    "compiler_info",
    "health_report",
    "load_library",
    "stats",
]


def health_report() -> dict[str, Any]:
    """What lazymat can use on this machine; never raises.

    Keys: compiler (``"<path> (<version>)"`` or None), openmp, cache_dir,
    cache_writable, torch (version or None), cuda (whether torch sees a GPU),
    cuda_backend ("ready: <GPUs>, NVRTC <version>" or why it cannot run), numpy.

    Example::

        >>> health_report()["openmp"]  # doctest: +SKIP
        True
    """
    import os
    import tempfile

    from ..errors import CompileError

    try:
        info = compiler_info()
        compiler = f"{info.path} ({info.version})" if info else None
    except CompileError as e:  # an explicit $CXX that does not work: say why
        info, compiler = None, f"unusable: {e}"
    report: dict[str, Any] = {"compiler": compiler, "openmp": bool(info and info.openmp)}
    try:
        directory = cache_dir()
        report["cache_dir"] = str(directory)
        try:
            with tempfile.TemporaryFile(dir=directory):
                pass
            report["cache_writable"] = True
        except OSError:
            report["cache_writable"] = False
    except Exception:  # noqa: BLE001
        report["cache_dir"] = os.environ.get("LAZYMAT_CACHE_DIR", "")
        report["cache_writable"] = False
    try:
        import torch

        report["torch"] = str(torch.__version__)
        report["cuda"] = bool(torch.cuda.is_available())
    except Exception:  # noqa: BLE001 - torch is optional
        report["torch"] = None
        report["cuda"] = False
    report["cuda_backend"] = _cuda_backend_report()
    try:
        import numpy

        report["numpy"] = str(numpy.__version__)
    except Exception:  # noqa: BLE001
        report["numpy"] = None
    return report


def _cuda_backend_report() -> str:
    try:
        from ..backends.cuda import unavailable_reason
        from . import nvrtc

        reason = unavailable_reason()
        if reason is not None:
            return f"unavailable: {reason}"
        import torch

        gpus = ", ".join(f"{k}: {torch.cuda.get_device_name(k)} (sm_"
                         f"{''.join(map(str, torch.cuda.get_device_capability(k)))})"
                         for k in range(torch.cuda.device_count()))
        return f"ready: {gpus}; NVRTC {'.'.join(map(str, nvrtc.version() or ()))}"
    except Exception as e:  # noqa: BLE001 - a health report never raises
        return f"unavailable: {e}"
