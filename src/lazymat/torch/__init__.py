"""pykeops-style import path: ``from lazymat.torch import LazyTensor, Genred``.

Importing it checks that torch is installed; the classes are the same as for
numpy: results follow the library, device and dtype of the inputs.
"""

import torch as _torch  # noqa: F401  (fail here, clearly, when torch is missing)

from ..genred import Genred, generic_argkmin, generic_argmin, generic_logsumexp, generic_sum
from ..lazy_tensor import ComplexLazyTensor, LazyTensor, Pm, Vi, Vj
from ..lazy_tensor import LazyVar as Var
from ..solve import KernelSolve

__all__ = ["LazyTensor", "ComplexLazyTensor", "Vi", "Vj", "Pm", "Var", "Genred", "generic_sum", "generic_logsumexp",
           "generic_argmin", "generic_argkmin", "KernelSolve"]
