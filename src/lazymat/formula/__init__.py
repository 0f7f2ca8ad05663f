"""The symbolic language: hash-consed formula nodes, the op registry, autodiff, the parser.

Layout: ``node.py`` (Node, OpDef registry, text form), ``ops/`` (every op's
registration), ``autodiff.py`` (VJPs from the ops' rules), ``parser.py``
(KeOps formula strings). Importing this package registers every op.
"""

from .autodiff import diff, divergence, grad, grad_matrix, laplacian
from .node import (
                   CAT_NAMES,
                   DEP_I,
                   DEP_J,
                   I_CAT,
                   J_CAT,
                   MAX_DIM,
                   MAX_INT_PARAM,
                   P_CAT,
                   Const,
                   Node,
                   Var,
                   as_node,
                   int_param_slots,
                   make,
                   register,
                   register_macro,
                   substitute,
                   to_string,
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

__all__ = [
    "CAT_NAMES", "DEP_I", "DEP_J", "I_CAT", "J_CAT", "P_CAT", "MAX_DIM", "MAX_INT_PARAM",
    "Const", "Node", "Var", "as_node", "int_param_slots", "make", "register", "register_macro",
    "substitute", "to_string", "variables", "walk", "grad", "diff", "divergence", "grad_matrix",
    "laplacian", "MACROS", "OPS", "OpDef", "apply",
    "Elem", "Extract", "IntInv", "Norm2", "Normalize", "OneHot", "Pow", "Scalprod", "SqDist",
    "SqNorm2", "SqNormDiag", "SqNormIso", "SymSqNorm", "WeightedSqDist", "WeightedSqNorm",
]
