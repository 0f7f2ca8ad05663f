"""pykeops-style import path: ``from lazymat.numpy import LazyTensor, Genred``.

The classes are the same as for torch: lazymat picks the library from the data.
"""

from ..genred import Genred, generic_argkmin, generic_argmin, generic_logsumexp, generic_sum
from ..lazy_tensor import LazyTensor, Pm, Vi, Vj
from ..solve import KernelSolve

__all__ = ["LazyTensor", "Vi", "Vj", "Pm", "Genred", "generic_sum", "generic_logsumexp",
           "generic_argmin", "generic_argkmin", "KernelSolve"]
