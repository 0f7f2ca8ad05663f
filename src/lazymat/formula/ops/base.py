"""What op definitions share: dim rules, folding wrappers, small formula and array tools.

>>> call("Exp", 0).value
Fraction(1, 1)
"""

from __future__ import annotations

from typing import Any, Callable

from ...errors import ShapeError
from ..node import Node, as_node, broadcast_dims, make

__all__ = ["broadcast_dims", "scalar_dim", "exact_fold", "float_fold", "call", "no_gradient",
           "with_dim", "bcast_lead", "by_lib", "NoGradient"]


def scalar_dim(name: str, dims: list[int], params: tuple) -> int:
    """The dim rule of reductions over the components (Sum, Min, ...): dim 1."""
    return 1


def exact_fold(fn: Callable) -> Callable[[list, tuple], Any]:
    """A folding rule from a Python function of the values and parameters (exact on
    Fractions); None where Python raises (1/0, log(-1), overflow)."""
    def fold(values: list, params: tuple):
        try:
            return fn(*values, *params)
        except (ArithmeticError, ValueError, OverflowError):
            return None

    return fold


def float_fold(fn: Callable) -> Callable[[list, tuple], Any]:
    """As :func:`exact_fold`, for functions of floats (math.exp & co)."""
    return exact_fold(lambda *v: fn(*[float(x) for x in v]))


def call(op: str, *args: Any, params: tuple = ()) -> Node:
    """``op(*args)``, Python numbers becoming constants (for writing VJPs)."""
    return make(op, tuple(as_node(a) for a in args), params)


def no_gradient(node: Node, g: Node) -> tuple[None, ...]:
    """Piecewise-constant ops (comparisons, Sign, Step, Arg*, OneHot) have zero derivative."""
    return (None,) * len(node.args)


def with_dim(node: Node, dim: int) -> Node | None:
    """``node`` if it already has the result's dim (a simplification must not change dims)."""
    return node if node.dim == dim else None


def bcast_lead(xp, arrays):
    """Broadcast arrays over every axis but the last (needed before a concat)."""
    nd = max(a.ndim for a in arrays)
    lead = [1] * (nd - 1)
    for a in arrays:
        for k, s in enumerate(a.shape[:-1]):
            lead[k] = max(lead[k], s)
    return [xp.broadcast_to(a, tuple(lead) + (a.shape[-1],)) for a in arrays]


def by_lib(numpy: Callable[..., Any], torch: Callable[..., Any]) -> Callable[..., Any]:
    """A reference evaluation ``(xp, params, *arrays)`` from one function of the arrays per
    library, where numpy and torch spell the op differently (``xp.module`` is the library
    of the arrays).

    >>> import numpy as np
    >>> from lazymat.arraylib import NUMPY
    >>> by_lib(numpy=lambda m, a: m.rint(a), torch=lambda m, a: m.round(a))(NUMPY, (), np.ones(1))
    array([1.])
    """
    def ref(xp, params, *arrays):
        return (torch if xp.name == "torch" else numpy)(xp.module, *arrays)

    return ref


class NoGradient(Node):
    """A cotangent that raises as soon as the autodiff engine uses it: for an argument an op
    has no derivative for, reached only when that argument depends on the differentiated
    variable (otherwise the engine drops it unseen)."""

    __slots__ = ("message",)

    def __init__(self, message: str):
        self.message = message

    def __getattr__(self, name: str):  # every Node field (dim, op, args ...) is unset
        if name.startswith("__"):  # copy, pickle & co. probing for hooks
            raise AttributeError(name)
        raise ShapeError(self.message)

    def __repr__(self) -> str:
        return f"<no gradient: {self.message}>"
