"""Formula nodes: immutable and hash-consed.

Two structurally equal formulas are the *same* Python object, so identity is
equality, dictionaries keyed by nodes are cheap, and a common sub-expression
is evaluated once by every backend.

>>> from lazymat.formula import Var
>>> x = Var(0, 3, 0)
>>> (x + x) is (x + x)
True
"""

from __future__ import annotations

import weakref
from fractions import Fraction
from typing import Any

from ..errors import ShapeError

I_CAT, J_CAT, P_CAT = 0, 1, 2
CAT_NAMES = {I_CAT: "Vi", J_CAT: "Vj", P_CAT: "Pm"}

# Dependency bits: which of the two reduced indices a node's value varies with.
DEP_I, DEP_J = 1, 2

_interned: "weakref.WeakValueDictionary[tuple, Node]" = weakref.WeakValueDictionary()


class Node:
    """One node of a formula: an op name, child nodes, static params and a dim.

    Build nodes with :func:`make` (or the operators), never directly.
    """

    __slots__ = ("op", "args", "params", "dim", "deps", "__weakref__")

    op: str
    args: tuple["Node", ...]
    params: tuple
    dim: int
    deps: int

    def __repr__(self) -> str:
        from .printing import to_string

        return to_string(self)

    # Identity is structural equality thanks to interning.
    __hash__ = object.__hash__

    def __eq__(self, other: object) -> bool:  # pragma: no cover - identity
        return self is other

    def __reduce__(self):
        # Re-intern on unpickling so identity semantics survive pickling.
        return (_rebuild, (self.op, self.args, self.params))

    # Operator sugar for building formulas in Python (tests, parser, autodiff).
    def __add__(self, other: Any) -> "Node":
        return make("Add", (self, as_node(other)))

    def __radd__(self, other: Any) -> "Node":
        return make("Add", (as_node(other), self))

    def __sub__(self, other: Any) -> "Node":
        return make("Subtract", (self, as_node(other)))

    def __rsub__(self, other: Any) -> "Node":
        return make("Subtract", (as_node(other), self))

    def __mul__(self, other: Any) -> "Node":
        return make("Mult", (self, as_node(other)))

    def __rmul__(self, other: Any) -> "Node":
        return make("Mult", (as_node(other), self))

    def __truediv__(self, other: Any) -> "Node":
        return make("Divide", (self, as_node(other)))

    def __rtruediv__(self, other: Any) -> "Node":
        return make("Divide", (as_node(other), self))

    def __neg__(self) -> "Node":
        return make("Minus", (self,))

    @property
    def is_const(self) -> bool:
        return self.op == "Const"

    @property
    def value(self) -> Fraction | float:
        """The value of a constant node."""
        return self.params[0]


def _rebuild(op: str, args: tuple, params: tuple) -> Node:
    return make(op, args, params)


def _new(op: str, args: tuple[Node, ...], params: tuple, dim: int, deps: int) -> Node:
    node = object.__new__(Node)
    node.op, node.args, node.params, node.dim, node.deps = op, args, params, dim, deps
    return node


def make(op: str, args: tuple[Node, ...], params: tuple = ()) -> Node:
    """Build (or find) the node ``op(*args, *params)``, simplified.

    Raises ShapeError when the operands' dims do not fit the op.
    """
    args = tuple(a if type(a) is Node else as_node(a) for a in args)
    params = tuple(params)
    key = (op, args, params)
    found = _interned.get(key)  # the request, simplified or not, seen before
    if found is not None:
        return found
    if op == "Var":
        index, dim, cat = params
        node = _new("Var", (), (int(index), int(dim), int(cat)), int(dim), _cat_deps(cat))
    elif op == "Const":
        value, dim = params
        node = _new("Const", (), (_normalize_number(value), int(dim)), int(dim), 0)
        if node.params != params:
            return make("Const", (), node.params)
    else:
        node = _build(op, args, params)
    _interned[key] = node
    return node


def _build(op: str, args: tuple[Node, ...], params: tuple) -> Node:
    opdef = _ops()[op]
    if opdef.arity is not None and len(args) != opdef.arity:
        raise ShapeError(f"{op} takes {opdef.arity} formula arguments, got {len(args)}")
    dim = opdef.dim_rule(op, [a.dim for a in args], params)
    if opdef.simplify is not None:
        simpler = opdef.simplify(args, params, dim)
        if simpler is not None:
            return simpler
    if args and opdef.fold is not None and all(a.op == "Const" for a in args):
        folded = opdef.fold([a.params[0] for a in args], params)
        if folded is not None:
            return Const(folded, dim)
    deps = 0
    for a in args:
        deps |= a.deps
    return _new(op, args, params, dim, deps)


_OPS: dict | None = None


def _ops() -> dict:
    global _OPS
    if _OPS is None:
        from .ops import OPS

        _OPS = OPS
    return _OPS


def _cat_deps(cat: int) -> int:
    return {I_CAT: DEP_I, J_CAT: DEP_J, P_CAT: 0}.get(cat, 0)


def _normalize_number(value: Any) -> Fraction | float:
    if isinstance(value, bool):
        return Fraction(int(value))
    if isinstance(value, (int, Fraction)):
        return Fraction(value)
    value = float(value)
    if value != value:  # one shared NaN object: NaN != NaN, but interning compares identity first
        return _NAN
    if value.is_integer() and abs(value) < 2**53:
        return Fraction(int(value))
    return value


_NAN = float("nan")


def Var(index: int, dim: int, cat: int) -> Node:
    """A variable: position ``index`` in the argument list, ``dim`` components,
    category 0 (i-indexed), 1 (j-indexed) or 2 (parameter)."""
    if int(dim) < 1:
        raise ShapeError(f"a variable needs dim >= 1, got {dim}")
    if int(cat) not in (I_CAT, J_CAT, P_CAT):
        raise ShapeError(f"a variable's category is 0 (i), 1 (j) or 2 (parameter), got {cat}")
    return make("Var", (), (index, dim, cat))


def Const(value: Any, dim: int = 1) -> Node:
    """A constant vector whose ``dim`` components all equal ``value``."""
    return make("Const", (), (value, dim))


def as_node(x: Any) -> Node:
    """Wrap Python numbers as constants; pass nodes through."""
    if isinstance(x, Node):
        return x
    if isinstance(x, (int, float, Fraction)) and not isinstance(x, complex):
        return Const(x, 1)
    raise TypeError(f"cannot use {type(x).__name__} {x!r} in a formula")


def is_zero(node: Node) -> bool:
    return node.is_const and node.value == 0


def is_one(node: Node) -> bool:
    return node.is_const and node.value == 1


def walk(root: Node) -> list[Node]:
    """All nodes of a formula, children before parents, each once."""
    order: list[Node] = []
    seen: set[int] = set()
    stack: list[tuple[Node, bool]] = [(root, False)]
    while stack:
        node, expanded = stack.pop()
        if id(node) in seen:
            continue
        if expanded:
            seen.add(id(node))
            order.append(node)
            continue
        stack.append((node, True))
        for a in reversed(node.args):
            if id(a) not in seen:
                stack.append((a, False))
    return order


_variables_memo: "weakref.WeakKeyDictionary[Node, tuple[Node, ...]]" = weakref.WeakKeyDictionary()


def variables(root: Node) -> tuple[Node, ...]:
    """The Var nodes of a formula, sorted by (index, category); memoized per node."""
    vs = _variables_memo.get(root)
    if vs is None:
        vs = tuple(sorted((n for n in walk(root) if n.op == "Var"),
                          key=lambda v: (v.params[0], v.params[2])))
        _variables_memo[root] = vs
    return vs


def substitute(root: Node, mapping: dict[Node, Node]) -> Node:
    """Replace nodes (usually variables) everywhere in a formula."""
    memo: dict[Node, Node] = dict(mapping)
    for node in walk(root):
        if node in memo:
            continue
        if not node.args:
            memo[node] = node
            continue
        new_args = tuple(memo[a] for a in node.args)
        memo[node] = node if new_args == node.args else make(node.op, new_args, node.params)
    return memo[root]
