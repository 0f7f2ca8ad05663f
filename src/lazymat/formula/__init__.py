"""The symbolic language: hash-consed formula nodes and the op table."""

from . import complex_ops  # noqa: F401  (registers the complex ops)
from .autodiff import diff, divergence, grad, grad_matrix, laplacian
from .node import (
                   CAT_NAMES,
                   DEP_I,
                   DEP_J,
                   I_CAT,
                   J_CAT,
                   P_CAT,
                   Const,
                   Node,
                   Var,
                   as_node,
                   make,
                   substitute,
                   variables,
                   walk,
)
from .ops import (
                   MACROS,
                   OPS,
                   Elem,
                   Extract,
                   IntInv,
                   Norm2,
                   Normalize,
                   OneHot,
                   OpDef,
                   Pow,
                   Scalprod,
                   SqDist,
                   SqNorm2,
                   SqNormDiag,
                   SqNormIso,
                   SymSqNorm,
                   WeightedSqDist,
                   WeightedSqNorm,
                   apply,
)
from .printing import to_string

__all__ = [
    "CAT_NAMES", "DEP_I", "DEP_J", "I_CAT", "J_CAT", "P_CAT", "Const", "Node", "Var", "as_node",
    "make", "substitute", "variables", "walk", "grad", "diff", "divergence", "grad_matrix",
    "laplacian", "MACROS", "OPS", "OpDef", "apply", "to_string",
    "Elem", "Extract", "IntInv", "Norm2", "Normalize", "OneHot", "Pow", "Scalprod", "SqDist",
    "SqNorm2", "SqNormDiag", "SqNormIso", "SymSqNorm", "WeightedSqDist", "WeightedSqNorm",
]
