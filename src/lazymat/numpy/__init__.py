"""pykeops-style import path: ``from lazymat.numpy import LazyTensor, Genred``.

The classes are the same as for torch: lazymat picks the library from the data.
"""

from ..genred import Genred, generic_argkmin, generic_argmin, generic_logsumexp, generic_sum
from ..lazy_tensor import ComplexLazyTensor, LazyTensor, Pm, Vi, Vj
from ..lazy_tensor import LazyVar as Var
from ..solve import KernelSolve

__all__ = ["LazyTensor", "ComplexLazyTensor", "Vi", "Vj", "Pm", "Var", "Genred", "generic_sum", "generic_logsumexp",
           "generic_argmin", "generic_argkmin", "KernelSolve"]
