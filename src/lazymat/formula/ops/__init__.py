"""Every formula op, each defined once with all of its facts (see :class:`OpDef`).

An op is one :func:`~lazymat.formula.node.register` call in one of these modules
plus one row in ``tests/test_ops.py``; a composite op is one
:func:`~lazymat.formula.node.register_macro` call. The modules are imported in
this order, which is the order of their C helpers in a kernel's prelude (a
helper may call the helpers of the modules and ops before it).

>>> from lazymat.formula import Var
>>> f = SqDist(Var(0, 3, 0), Var(1, 3, 1))
>>> f.dim
1
"""

from __future__ import annotations

import importlib

from ..node import MACROS, OPS, OpDef, apply, register, register_macro

#: The modules that register ops, in the order of their C helpers.
MODULES = ("elementwise", "structural", "tensordot", "bspline", "softdtw", "complex",
           "composite")
for _module in MODULES:
    importlib.import_module(f"{__name__}.{_module}")

from .composite import (  # noqa: E402  (after the registrations above)
    Factorize,
    Norm2,
    Normalize,
    Scalprod,
    SqDist,
    SqNorm2,
    SqNormDiag,
    SqNormIso,
    SymSqNorm,
    WeightedSqDist,
    WeightedSqNorm,
)
from .elementwise import IntInv, Pow  # noqa: E402
from .structural import Elem, Extract, OneHot  # noqa: E402
from .tensordot import TENSORDOT_UNROLL_LIMIT, Kron, TensorDot  # noqa: E402

__all__ = ["MODULES", "MACROS", "OPS", "OpDef", "apply", "register", "register_macro", "Elem",
           "Extract", "Factorize", "IntInv", "Kron", "Norm2", "Normalize", "OneHot", "Pow",
           "Scalprod", "SqDist", "SqNorm2", "SqNormDiag", "SqNormIso", "SymSqNorm",
           "TENSORDOT_UNROLL_LIMIT", "TensorDot", "WeightedSqDist", "WeightedSqNorm"]
