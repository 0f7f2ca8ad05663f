"""lazymat: reductions of symbolic matrices, compiled on the fly.

>>> import numpy as np, lazymat as lm
>>> x, y = np.random.randn(1000, 3), np.random.randn(2000, 3)
>>> K = (-lm.Vi(x).sqdist(lm.Vj(y)) / 2).exp()
>>> K.sum(dim=1).shape
(1000, 1)
"""

from __future__ import annotations

from .config import __version__
from .errors import (CompileError, DtypeError, FormulaSyntaxError, LazymatError, NonFiniteError,
                     ShapeError)
from . import local
from .genred import Genred, generic_argkmin, generic_argmin, generic_logsumexp, generic_sum
from . import lazy_tensor
from .lazy_tensor import ComplexLazyTensor, LazyTensor, Pm, Vi, Vj
from .precompile import precompile  # the function; the module is in sys.modules
from .pykeops_compat import install_as_pykeops, uninstall_as_pykeops
from .ranges import (
    cluster_centroids,
    cluster_ranges,
    cluster_ranges_centroids,
    from_matrix,
    grid_cluster,
    sort_clusters,
    swap_axes,
)
from .solve import ConvergenceWarning, KernelSolve

__all__ = [
    "LazyTensor", "ComplexLazyTensor", "Vi", "Vj", "Pm", "install_as_pykeops",
    "uninstall_as_pykeops", "Genred", "generic_sum", "generic_logsumexp",
    "generic_argmin", "generic_argkmin", "KernelSolve", "ConvergenceWarning", "cache_clear",
    "check_health", "precompile", "grid_cluster", "sort_clusters", "cluster_ranges",
    "cluster_centroids",
    "cluster_ranges_centroids", "from_matrix", "swap_axes",
    "LazymatError", "ShapeError", "DtypeError", "FormulaSyntaxError", "CompileError",
    "NonFiniteError", "local",
    "__version__",
]


def cache_clear() -> None:
    """Delete every compiled kernel of the cache directory (see ``LAZYMAT_CACHE_DIR``) and
    empty every in-process memo (:func:`lazymat.health.cache_clear`). The next call of each
    formula compiles it again.

    >>> import lazymat as lm
    >>> lm.cache_clear()  # doctest: +SKIP
    """
    from .health import cache_clear as clear

    clear()


def check_health(verbose: bool = True) -> dict:
    """Report what lazymat can use here: compiler, OpenMP, cache dir, torch, CUDA
    (:func:`lazymat.health.check_health`).

    >>> report = check_health(verbose=False)
    >>> sorted(report)[:2]
    ['cache_dir', 'cache_writable']
    """
    from .health import check_health as check

    return check(verbose)


def _traced_lazy_tensor():
    """What LazyTensor(...) makes while torch.compile traces (lazymat/torch/traced.py)."""
    from .torch.traced import new

    return new()


lazy_tensor.COMPILED.append(_traced_lazy_tensor)


def _switch_from_environment() -> None:
    from .pykeops_compat import install_from_environment

    install_from_environment()


_switch_from_environment()  # LAZYMAT_AS_PYKEOPS=1: `import pykeops` gives lazymat
