"""Which pykeops ``import pykeops`` gives (lazymat's shim, a real one, or none), found
without importing anything: what :mod:`lazymat.health` reports and what
:mod:`lazymat.pykeops_compat` checks before it presents lazymat under pykeops' name.

>>> active() in ("lazymat", "none") or active().startswith("pykeops")
True
"""

from __future__ import annotations

import importlib.machinery
import sys

#: the attribute that marks lazymat's stand-in pykeops modules
MARK = "__lazymat_shim__"


def active() -> str:
    """Which library ``import pykeops`` gives: "lazymat", "pykeops <version>" (the real one,
    installed or imported), or "none".

    >>> active() in ("lazymat", "none") or active().startswith("pykeops")
    True
    """
    mod = sys.modules.get("pykeops")
    if mod is not None:
        if getattr(mod, MARK, False):
            return "lazymat"
        return f"pykeops {getattr(mod, '__version__', '?')}"
    real = find_real()
    return f"pykeops (installed, not imported: {real})" if real else "none"


def find_real() -> str | None:
    """The location of an installed pykeops, searched on sys.path without importing it.

    >>> find_real() is None or find_real().endswith(".py") or "pykeops" in find_real()
    True
    """
    spec = importlib.machinery.PathFinder.find_spec("pykeops")
    if spec is None or is_shim(spec.origin):
        return None
    return spec.origin or ", ".join(spec.submodule_search_locations or []) or "?"


def is_shim(path: str | None) -> bool:
    """Whether a pykeops file is the shim :func:`lazymat.pykeops_compat.write_shim` wrote.

    >>> is_shim(__file__), is_shim(None)
    (False, False)
    """
    try:
        with open(path or "", encoding="utf-8") as f:
            return "lazymat's pykeops shim" in f.read(200)
    except OSError:
        return False
