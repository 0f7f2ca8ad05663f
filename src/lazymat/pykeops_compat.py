"""The opt-in drop-in switch: ``lazymat.install_as_pykeops()`` makes ``import pykeops`` (and
``pykeops.torch``, ``pykeops.numpy``, their ``cluster`` and ``utils``, ``pykeops.config``,
``pykeops.common.lazy_tensor``) resolve to lazymat, so libraries written for pykeops
(GeomLoss, GPyTorch's ``gpytorch.kernels.keops``, ...) run on lazymat unchanged.

It never shadows a real pykeops silently: if one is installed (or already imported) it
raises, unless ``force=True`` says so explicitly. The environment variable
``LAZYMAT_AS_PYKEOPS=1`` turns the switch on when lazymat is imported (same rules;
``LAZYMAT_AS_PYKEOPS=force`` shadows an installed pykeops); for programs that never import
lazymat, ``python -m lazymat.pykeops_compat --shim`` writes a tiny ``pykeops`` package
that defers to lazymat when that variable is set (and fails to import otherwise).
``check_health()`` reports which one is active.

>>> import lazymat
>>> lazymat.install_as_pykeops()  # doctest: +SKIP
>>> from pykeops.torch import LazyTensor  # doctest: +SKIP
>>> LazyTensor.__module__  # doctest: +SKIP
'lazymat.lazy_tensor'
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys
import types
from typing import Any

from .config import __version__
from .pykeops_detect import MARK as _MARK
from .pykeops_detect import active, find_real, is_shim

#: the pykeops release whose public behaviour lazymat follows
PYKEOPS_VERSION = "2.3"
_verbose = os.environ.get("PYKEOPS_VERBOSE", "1") != "0"


def install_as_pykeops(force: bool = False) -> None:
    """Make ``import pykeops`` resolve to lazymat (for this process). Raises RuntimeError
    when a real pykeops is installed or imported, unless ``force=True``.

    >>> import lazymat
    >>> lazymat.install_as_pykeops()  # doctest: +SKIP
    >>> import pykeops; pykeops.check_health()  # doctest: +SKIP
    """
    current = sys.modules.get("pykeops")
    if current is not None and getattr(current, _MARK, False):
        return  # already on
    if not force:
        if current is not None and not getattr(current, "__lazymat_shim_file__", False):
            raise RuntimeError("install_as_pykeops: the real pykeops is already imported "
                               f"({getattr(current, '__file__', '?')}); lazymat will not "
                               "replace it silently: call install_as_pykeops(force=True) "
                               "before anything imports pykeops")
        real = find_real()
        if real is not None:
            raise RuntimeError(f"install_as_pykeops: a real pykeops is installed ({real}); "
                               "lazymat will not shadow it silently: pass force=True (or "
                               "LAZYMAT_AS_PYKEOPS=force) to use lazymat under its name")
    for name in [n for n in sys.modules if n == "pykeops" or n.startswith("pykeops.")]:
        del sys.modules[name]
    for name, module in _modules().items():
        sys.modules[name] = module
    # parent.child attributes, as a real import would set them
    for name, module in _modules().items():
        if "." in name:
            parent, child = name.rsplit(".", 1)
            setattr(sys.modules[parent], child, module)


def uninstall_as_pykeops() -> None:
    """Undo :func:`install_as_pykeops` (a later ``import pykeops`` finds the real one, if
    any).

    >>> import sys, lazymat
    >>> if "pykeops" not in sys.modules:  # the switch is off: nothing to undo
    ...     lazymat.uninstall_as_pykeops()
    """
    mod = sys.modules.get("pykeops")
    if mod is None or not getattr(mod, _MARK, False):
        return
    for name in [n for n in sys.modules if n == "pykeops" or n.startswith("pykeops.")]:
        del sys.modules[name]
    _cache.clear()


_cache: dict[str, types.ModuleType] = {}


def _module(name: str, doc: str, **attrs: Any) -> types.ModuleType:
    mod = types.ModuleType(name, doc)
    mod.__dict__.update(attrs)
    setattr(mod, _MARK, True)
    mod.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=True)
    mod.__path__ = []  # a package: its submodules come from sys.modules
    return mod


def _modules() -> dict[str, types.ModuleType]:
    if _cache:
        return _cache
    from . import lazy_tensor
    from . import numpy as lm_numpy
    from lazymat.numpy import cluster as np_cluster
    from lazymat.numpy import utils as np_utils

    top = _module("pykeops", "lazymat, under pykeops' name (lazymat.install_as_pykeops()).",
                  __version__=f"{PYKEOPS_VERSION}+lazymat.{__version__}",
                  set_verbose=set_verbose, clean_pykeops=clean_pykeops,
                  check_health=check_health, set_build_folder=set_build_folder,
                  get_build_folder=get_build_folder, default_device_id=0,
                  test_numpy_bindings=test_numpy_bindings,
                  test_torch_bindings=test_torch_bindings, verbose=_verbose,
                  __file__=__file__)
    cfg = _module("pykeops.config", "pykeops.config's detection flags, from lazymat.",
                  numpy_found=True, torch_found=_torch_found(), gpu_available=_gpu(),
                  __file__=__file__)
    common = _module("pykeops.common", "pykeops.common: the shared LazyTensor classes.")
    lazy = _module("pykeops.common.lazy_tensor", "pykeops' generic LazyTensor classes.",
                   GenericLazyTensor=lazy_tensor.LazyTensor,
                   ComplexGenericLazyTensor=lazy_tensor.ComplexLazyTensor)
    mods = {"pykeops": top, "pykeops.config": cfg, "pykeops.common": common,
            "pykeops.common.lazy_tensor": lazy, "pykeops.numpy": lm_numpy,
            "pykeops.numpy.cluster": np_cluster, "pykeops.numpy.utils": np_utils}
    if _torch_found():
        from lazymat import torch as lm_torch
        from lazymat.torch import cluster as t_cluster
        from lazymat.torch import utils as t_utils

        mods.update({"pykeops.torch": lm_torch, "pykeops.torch.cluster": t_cluster,
                     "pykeops.torch.utils": t_utils})
    _cache.update(mods)
    return _cache


def _torch_found() -> bool:
    return importlib.util.find_spec("torch") is not None


def _gpu() -> bool:
    from lazymat.numpy.utils import IsGpuAvailable

    return IsGpuAvailable()


# ---------------------------------------------------------------------- pykeops' top level

def set_verbose(value: bool) -> None:
    """pykeops.set_verbose: lazymat's verbose mode (what is compiled, and how long it took).

    >>> set_verbose(False)  # LAZYMAT_VERBOSE=0 from now on
    """
    global _verbose
    _verbose = bool(value)
    os.environ["LAZYMAT_VERBOSE"] = "1" if value else "0"
    top = sys.modules.get("pykeops")
    if top is not None and getattr(top, _MARK, False):
        top.verbose = _verbose


def clean_pykeops(recompile_jit_binaries: bool = True) -> None:
    """pykeops.clean_pykeops: empty lazymat's kernel cache (there are no JIT binders to
    rebuild).

    >>> clean_pykeops()  # doctest: +SKIP
    """
    from .health import cache_clear

    cache_clear()


def check_health(config_type: str = "all") -> dict:
    """pykeops.check_health: lazymat's health report (it says that lazymat is what ``import
    pykeops`` gives).

    >>> import contextlib, io
    >>> with contextlib.redirect_stdout(io.StringIO()):  # the report is printed, too
    ...     report = check_health()
    >>> "cache_dir" in report
    True
    """
    from . import health

    return health.check_health(True)


def get_build_folder() -> str:
    """The compile cache directory (``LAZYMAT_CACHE_DIR``).

    >>> os.path.isabs(get_build_folder())
    True
    """
    from . import health

    return str(health.check_health(False).get("cache_dir", ""))


def set_build_folder(path: str | None = None) -> None:
    """Point the compile cache at ``path`` (``LAZYMAT_CACHE_DIR``), for kernels compiled
    from now on; None restores the default.

    >>> before = os.environ.get("LAZYMAT_CACHE_DIR")
    >>> set_build_folder("/tmp/my-kernels")  # kernels compiled from now on go there
    >>> os.environ["LAZYMAT_CACHE_DIR"]
    '/tmp/my-kernels'
    >>> set_build_folder(before)  # back (None: the default folder)
    """
    if path is None:
        os.environ.pop("LAZYMAT_CACHE_DIR", None)
    else:
        os.environ["LAZYMAT_CACHE_DIR"] = os.fspath(path)


def _bindings_test(library: str) -> bool:
    """pykeops' install test: Genred("SqNorm2(x - y)") summed over i, on small float32
    data, against numpy; prints the verdict (no exception), as pykeops does."""
    import numpy as np

    from .genred import Genred

    x = np.arange(9, dtype=np.float32).reshape(3, 3) / 4
    y = np.arange(6, dtype=np.float32).reshape(2, 3) / 4
    want = ((x[:, None, :] - y[None]) ** 2).sum(-1).sum(0)
    f = Genred("SqNorm2(x - y)", ["x = Vi(3)", "y = Vj(3)"], axis=0)
    if library == "torch":
        import torch

        got = f(torch.from_numpy(x), torch.from_numpy(y)).numpy().reshape(-1)
    else:
        got = f(x, y).reshape(-1)
    ok = bool(np.allclose(got, want, rtol=1e-5))
    print(f"pyKeOps (lazymat) with {library} bindings "
          + ("is working!" if ok else f"outputs wrong values: {got} instead of {want}"))
    return ok


def test_numpy_bindings() -> bool:
    """pykeops.test_numpy_bindings: one small Genred, checked (prints the verdict).

    >>> test_numpy_bindings()
    pyKeOps (lazymat) with numpy bindings is working!
    True
    """
    return _bindings_test("numpy")


def test_torch_bindings() -> bool:
    """pykeops.test_torch_bindings: the same with torch tensors.

    >>> test_torch_bindings()
    pyKeOps (lazymat) with torch bindings is working!
    True
    """
    return _bindings_test("torch")


_SHIM = '''"""lazymat's pykeops shim (written by ``python -m lazymat.pykeops_compat --shim``).

With LAZYMAT_AS_PYKEOPS=1 in the environment, ``import pykeops`` gives lazymat; without it
the import fails as if pykeops were not installed (libraries then take their fallbacks).
"""
import os

if os.environ.get("LAZYMAT_AS_PYKEOPS", "").strip().lower() not in ("1", "true", "yes", "on",
                                                                    "force"):
    raise ImportError("this pykeops is lazymat's shim: set LAZYMAT_AS_PYKEOPS=1 to use lazymat "
                      "under pykeops' name")
__lazymat_shim_file__ = True  # lazymat may replace this module
import lazymat.pykeops_compat

lazymat.pykeops_compat.install_as_pykeops(force=True)  # replaces this module
'''


def write_shim(directory: str | None = None) -> str:
    """Write the tiny ``pykeops`` package that defers to lazymat when ``LAZYMAT_AS_PYKEOPS=1``
    into ``directory`` (default: the site-packages lazymat is installed in); returns its
    path. Refuses where a real pykeops is installed.

    >>> write_shim("/tmp/shims")  # doctest: +SKIP
    '/tmp/shims/pykeops/__init__.py'
    """
    import sysconfig

    directory = os.fspath(directory or sysconfig.get_paths()["purelib"])
    target = os.path.join(directory, "pykeops")
    init = os.path.join(target, "__init__.py")
    if os.path.exists(target):
        with open(init, encoding="utf-8") if os.path.exists(init) else open(os.devnull) as f:
            if "lazymat's pykeops shim" not in f.read():
                raise RuntimeError(f"write_shim: a real pykeops is installed at {target}; "
                                   f"lazymat will not replace it")
    os.makedirs(target, exist_ok=True)
    with open(init, "w", encoding="utf-8") as f:
        f.write(_SHIM)
    return init


def install_from_environment() -> None:
    """The ``LAZYMAT_AS_PYKEOPS`` variable: "1" turns the switch on, "force" shadows a real
    pykeops too; anything else (or unset) does nothing. ``import lazymat`` calls it.

    >>> os.environ.get("LAZYMAT_AS_PYKEOPS") is None and install_from_environment() is None
    True
    """
    value = os.environ.get("LAZYMAT_AS_PYKEOPS", "").strip().lower()
    if value in ("1", "true", "yes", "on"):
        install_as_pykeops()
    elif value == "force":
        install_as_pykeops(force=True)


if __name__ == "__main__":  # python -m lazymat.pykeops_compat --shim [DIRECTORY]
    args = sys.argv[1:]
    if not args or args[0] != "--shim":
        sys.exit("usage: python -m lazymat.pykeops_compat --shim [DIRECTORY]")
    print(write_shim(args[1] if len(args) > 1 else None))
