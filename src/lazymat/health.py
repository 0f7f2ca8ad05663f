"""What lazymat can use on this machine: compiler, OpenMP, cache dir, torch, CUDA.

It sits at the top of the package: it asks the compile layer and every backend of the
registry, and nothing imports it (``lazymat.check_health`` loads it on first call).

>>> report = health_report()
>>> sorted(report)[:2]
['cache_dir', 'cache_writable']
"""

from __future__ import annotations

import tempfile
from typing import Any

from . import config
from .backends.base import REGISTRY
from .compile import cache_dir, compiler_info, nvrtc


def health_report() -> dict[str, Any]:
    """What lazymat can use here; never raises.

    Keys: compiler (``"<path> (<version>), <where it came from>, <threads>"`` or None),
    openmp, threads ("OpenMP", "Python thread pool" or None without a compiler), cache_dir,
    cache_writable, torch (version or None), cuda (whether torch sees a GPU),
    cuda_backend ("ready: <GPUs>, NVRTC <version>" or why it cannot run), numpy.
    """
    from .errors import CompileError

    try:
        info = compiler_info()
        compiler = info.description if info else None
    except CompileError as e:  # an explicit $LAZYMAT_CXX / $CXX that does not work: say why
        info, compiler = None, f"unusable: {e}"
    from .backends.cpu import threads_inside

    threads = None if info is None else "OpenMP" if threads_inside() else "Python thread pool"
    report: dict[str, Any] = {"compiler": compiler, "openmp": bool(info and info.openmp),
                              "threads": threads}
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
        report["cache_dir"] = str(config.cache_dir_setting())
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
    from .pykeops_detect import active

    report["pykeops"] = active()  # what `import pykeops` gives: lazymat, a real one, none
    return report


def _cuda_backend_report() -> str:
    try:
        reason = REGISTRY["cuda"].unavailable_reason()
        if reason is not None:
            return f"unavailable: {reason}"
        import torch

        gpus = ", ".join(f"{k}: {torch.cuda.get_device_name(k)} (sm_"
                         f"{''.join(map(str, torch.cuda.get_device_capability(k)))})"
                         for k in range(torch.cuda.device_count()))
        return f"ready: {gpus}; NVRTC {'.'.join(map(str, nvrtc.version() or ()))}"
    except Exception as e:  # noqa: BLE001 - a health report never raises
        return f"unavailable: {e}"


def check_health(verbose: bool = True) -> dict:
    """Report what lazymat can use here (see :func:`health_report`); print it when
    ``verbose``.

    >>> check_health(verbose=False)["openmp"] in (True, False)
    True
    """
    report = health_report()
    if verbose:
        print("lazymat", config.__version__)
        for key, value in report.items():
            print(f"  {key:15s} {value}")
        if report.get("compiler") is None:
            print("  -> no C++ compiler: reductions use the slow reference backend. "
                  "`pip install lazymat[compiler]` (zig), install g++, or set LAZYMAT_CXX.")
    return report


def cache_clear() -> None:
    """Delete every compiled kernel of the cache directory (see ``LAZYMAT_CACHE_DIR``) and
    empty every in-process memo (``config.clear_all``: loaded CPU and CUDA kernels, layouts,
    compiler facts, ...)."""
    from .compile import cache_clear as clear_disk

    clear_disk()
    config.clear_all()
