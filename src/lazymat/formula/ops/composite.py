"""Composite ops: formulas of primitive ones (squared distances, norms, weighted norms).

>>> from lazymat.formula import Var
>>> SqDist(Var(0, 3, 0), Var(1, 3, 1)).op
'Sum'
"""

from __future__ import annotations

from ...errors import ShapeError
from ..node import Node, make, register_macro

__all__ = ["SqNorm2", "Scalprod", "SqDist", "Norm2", "Normalize", "SqNormIso", "SqNormDiag",
           "SymSqNorm", "WeightedSqNorm", "WeightedSqDist", "Factorize"]


def SqNorm2(f: Node) -> Node:
    """Σ_k f_k²."""
    return make("Sum", (make("Square", (f,)),))


def Scalprod(f: Node, g: Node) -> Node:
    """Dot product ⟨f, g⟩ (same dims)."""
    if f.dim != g.dim:
        raise ShapeError(f"Scalprod needs operands of the same dim, got {f.dim} and {g.dim}")
    return make("Sum", (make("Mult", (f, g)),))


def SqDist(f: Node, g: Node) -> Node:
    """‖f − g‖²."""
    return SqNorm2(make("Subtract", (f, g)))


def Norm2(f: Node) -> Node:
    """‖f‖ = √(Σ_k f_k²)."""
    return make("Sqrt", (SqNorm2(f),))


def Normalize(f: Node) -> Node:
    """f / ‖f‖, 0 where f = 0."""
    return make("Mult", (make("Rsqrt", (SqNorm2(f),)), f))


def SqNormIso(s: Node, f: Node) -> Node:
    """s ‖f‖² for a scalar s (an isotropic weighted norm)."""
    return make("Mult", (s, SqNorm2(f)))


def SqNormDiag(s: Node, f: Node) -> Node:
    """Σ_k s_k f_k² for s of f's dim (a diagonal weighted norm)."""
    return make("Sum", (make("Mult", (s, make("Square", (f,)))),))


def SymSqNorm(a: Node, f: Node) -> Node:
    """Σ_kl A_kl f_k f_l with A a flattened D×D matrix."""
    return Scalprod(make("MatVecMult", (a, f)), f)


def WeightedSqNorm(s: Node, f: Node) -> Node:
    """SqNormIso, SqNormDiag or SymSqNorm depending on s.dim (1, D or D²)."""
    if s.dim == 1:
        return SqNormIso(s, f)
    if s.dim == f.dim:
        return SqNormDiag(s, f)
    if s.dim == f.dim * f.dim:
        return SymSqNorm(s, f)
    raise ShapeError(f"WeightedSqNorm: weight dim {s.dim} must be 1, {f.dim} or {f.dim ** 2} "
                     f"for a formula of dim {f.dim}")


def WeightedSqDist(s: Node, f: Node, g: Node) -> Node:
    """WeightedSqNorm(s, f − g)."""
    return WeightedSqNorm(s, make("Subtract", (f, g)))


def Factorize(f: Node, g: Node) -> Node:
    """KeOps' Factorize(f, g): compute g once inside f. Formulas are hash-consed, so every
    repeated sub-formula is already one node, computed once by every backend: f itself."""
    return f


for _name in __all__:
    register_macro(_name, globals()[_name])
