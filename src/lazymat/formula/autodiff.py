"""Symbolic differentiation of formulas, built from each op's VJP rule.

``grad(f, v, g)`` is the vector-Jacobian product gᵀ ∂f/∂v: a new formula of
dim ``v.dim``, which every backend can evaluate and which can be
differentiated again (any order).

>>> from lazymat.formula import Var, SqDist
>>> x, y = Var(0, 3, 0), Var(1, 3, 1)
>>> grad(SqDist(x, y), x, Const(1)).dim
3
"""

from __future__ import annotations

import inspect
import itertools

from ..errors import ShapeError
from .node import OPS, Const, Node, make, register_macro, walk

_placeholders = itertools.count(1)


def _check_var(v: Node, what: str) -> None:
    if v.op != "Var":
        raise ShapeError(f"{what}: can only differentiate with respect to a variable, "
                         f"got {v!r}")


def grad(f: Node, v: Node, gradin: Node) -> Node:
    """gradinᵀ ∂f/∂v (dim v.dim); 0 if f does not depend on v."""
    _check_var(v, "Grad")
    if gradin.dim != f.dim:
        if gradin.dim != 1:
            raise ShapeError(f"Grad: the cotangent has dim {gradin.dim} but the formula has "
                             f"dim {f.dim}")
        gradin = gradin * Const(1, f.dim)
    # A cotangent of dim 1 for a node of dim D stands for (c, ..., c): elementwise rules
    # broadcast it, so gradients through Sum(...) stay compact.
    order = walk(f)
    depends: set[int] = set()
    for n in order:
        if n is v or any(id(a) in depends for a in n.args):
            depends.add(id(n))
    if id(f) not in depends:
        return Const(0, v.dim)
    cotangent: dict[int, Node] = {id(f): gradin}
    for n in reversed(order):
        g = cotangent.get(id(n))
        if g is None or not n.args:
            continue
        opdef = OPS[n.op]
        if opdef.vjp is None:
            raise ShapeError(f"{n.op} has no derivative")
        if g.dim != n.dim and not opdef.elementwise:
            g = g * Const(1, n.dim)  # a broadcast cotangent, expanded for a structural rule
        rule = opdef.vjp
        for a, c in zip(n.args, rule(n, g)):
            if c is None or id(a) not in depends:
                continue
            if opdef.elementwise and a.dim == 1 and n.dim > 1:  # a broadcast operand
                c = make("Sum", (c,)) if c.dim > 1 else c * n.dim  # (c, ..., c) sums to D c
            previous = cotangent.get(id(a))
            cotangent[id(a)] = c if previous is None else previous + c
    out = cotangent.get(id(v), Const(0, v.dim))
    return out if out.dim == v.dim else out * Const(1, v.dim)


def _placeholder(dim: int) -> Node:
    # A negative position can never be an argument: the variable is purely symbolic.
    return make("Var", (), (-next(_placeholders), dim, 2))


def diff(f: Node, v: Node, u: Node) -> Node:
    """The directional derivative (∂f/∂v) u (dim f.dim), as the VJP of a VJP."""
    _check_var(v, "Diff")
    if u.dim != v.dim:
        raise ShapeError(f"Diff: the direction has dim {u.dim} but the variable has dim {v.dim}")
    e = _placeholder(f.dim)
    # grad(f, v, e) is linear in e, so its gradient in e no longer contains e.
    return grad(make("Sum", (grad(f, v, e) * u,)), e, Const(1))


def basis(k: int, dim: int) -> Node:
    """The k-th standard basis vector of length dim."""
    return Const(1) if dim == 1 else make("OneHot", (Const(k),), (dim,))


def grad_matrix(f: Node, v: Node) -> Node:
    """The transposed Jacobian, flattened: [∂f/∂v]ᵀ row k = grad(f, v, e_k) (dim f.dim·v.dim)."""
    _check_var(v, "GradMatrix")
    rows = [grad(f, v, basis(k, f.dim)) for k in range(f.dim)]
    out = rows[0]
    for r in rows[1:]:
        out = make("Concat", (out, r))
    return out


def divergence(f: Node, v: Node) -> Node:
    """Σ_k ∂f_k/∂v_k, for f of the same dim as v."""
    _check_var(v, "Divergence")
    if f.dim != v.dim:
        raise ShapeError(f"Divergence: the formula has dim {f.dim} but the variable has dim "
                         f"{v.dim}")
    terms = [make("Extract", (grad(f, v, basis(k, f.dim)),), (k, 1)) for k in range(f.dim)]
    out = terms[0]
    for t in terms[1:]:
        out = out + t
    return out


def laplacian(f: Node, v: Node) -> Node:
    """Σ_k ∂²f/∂v_k² for a scalar f."""
    if f.dim != 1:
        raise ShapeError(f"Laplacian needs a scalar formula, got dim {f.dim}")
    return divergence(grad(f, v, Const(1)), v)


def _requires_variable(fn):
    """The user-facing form: v must be a variable; a formula without it has derivative zero,
    as in KeOps (nested ``Grad(Grad(x + y, x, e), x, e2)`` relies on it)."""

    def checked(f: Node, v: Node, *rest: Node) -> Node:
        _check_var(v, fn.__name__)
        return fn(f, v, *rest)

    checked.__name__ = checked.__qualname__ = fn.__name__
    checked.__doc__ = fn.__doc__
    checked.__signature__ = inspect.signature(fn)
    return checked


# KeOps formula-string names of the symbolic calculus.
for _name, _fn in (("Grad", grad), ("Diff", diff), ("GradMatrix", grad_matrix),
                   ("Divergence", divergence), ("Laplacian", laplacian)):
    register_macro(_name, _requires_variable(_fn))
