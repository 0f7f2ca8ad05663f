"""Formula nodes (immutable, hash-consed), the op registry and the text form.

Two structurally equal formulas are the *same* Python object, so identity is
equality, dictionaries keyed by nodes are cheap, and a common sub-expression
is evaluated once by every backend. Every op is one :class:`OpDef` in
:data:`OPS`, added by one :func:`register` call (the ops live in
``formula/ops/``); composite ops (formulas of primitive ones) are
:func:`register_macro` calls. Nothing here imports the ops: the registry is
filled when ``lazymat.formula`` is imported.

Limits (a :class:`ShapeError` naming the limit, before anything is allocated or
compiled): a node's dim is at most :data:`MAX_DIM`, an integer parameter fits a
C ``int`` (:data:`MAX_INT_PARAM`).

>>> from lazymat.formula import Var
>>> x = Var(0, 3, 0)
>>> (x + x) is (x + x)
True
"""

from __future__ import annotations

import atexit
import weakref
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Callable

from ..errors import ShapeError

I_CAT, J_CAT, P_CAT = 0, 1, 2
CAT_NAMES = {I_CAT: "Vi", J_CAT: "Vj", P_CAT: "Pm"}

# Dependency bits: which of the two reduced indices a node's value varies with.
DEP_I, DEP_J = 1, 2

#: The largest dim of a formula node (variables, constants, every op's result): far above
#: real use (a 4096 x 4096 image flattened is 2**24), far below what would exhaust memory
#: in a dim rule or overflow the C kernels' ``int`` indices.
MAX_DIM = 2**24
#: Integer op parameters (Pow's exponent, Round's decimals, ClampInt's bounds, ...) are
#: rendered as C ``int``: at most this in absolute value.
MAX_INT_PARAM = 2**31 - 1

_interned: "weakref.WeakValueDictionary[tuple, Node]" = weakref.WeakValueDictionary()
# Emptied at exit, before modules are torn down: a node dying then would run the dict's
# removal callback, whose key comparison (Fraction.__eq__) needs modules already gone.
atexit.register(_interned.clear)


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
        return to_string(self)

    # Identity is structural equality thanks to interning.
    __hash__ = object.__hash__

    def __eq__(self, other: object) -> bool:  # pragma: no cover - identity
        return self is other

    def __reduce__(self):
        # Re-intern on unpickling so identity semantics survive pickling. The formula goes
        # as a flat list (children first), so pickling never recurses per level.
        order = walk(self)
        index = {id(n): k for k, n in enumerate(order)}
        return (_rebuild, (tuple((n.op, tuple(index[id(a)] for a in n.args), n.params)
                                 for n in order),))

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


def _rebuild(flat: tuple) -> Node:
    built: list[Node] = []
    for op, args, params in flat:
        built.append(make(op, tuple(built[k] for k in args), params))
    return built[-1]


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
        node = _new("Var", (), (int(index), _checked_dim("a variable", dim), int(cat)),
                    int(dim), _cat_deps(cat))
    elif op == "Const":
        value, dim = params
        dim = _checked_dim("a constant", dim)
        node = _new("Const", (), (_normalize_number(value), dim), dim, 0)
        if node.params != params:
            return make("Const", (), node.params)
    else:
        node = _build(op, args, params)
    _interned[key] = node
    return node


def _checked_dim(what: str, dim: Any) -> int:
    dim = int(dim)
    if not 1 <= dim <= MAX_DIM:
        raise ShapeError(f"{what} needs a dim from 1 to {MAX_DIM:,} (lazymat.formula.MAX_DIM), "
                         f"got {dim:,}")
    return dim


def _check_params(op: str, params: tuple) -> None:
    for p in params:
        for v in (p if isinstance(p, tuple) else (p,)):
            if isinstance(v, int) and not -MAX_INT_PARAM <= v <= MAX_INT_PARAM:
                raise ShapeError(f"{op}: the integer parameter {v:,} is out of range (at most "
                                 f"{MAX_INT_PARAM:,} in absolute value, a C int)")


def _build(op: str, args: tuple[Node, ...], params: tuple) -> Node:
    opdef = OPS.get(op)
    if opdef is None:
        raise KeyError(op)
    if opdef.arity is not None and len(args) != opdef.arity:
        raise ShapeError(f"{op} takes {opdef.arity} formula arguments, got {len(args)}")
    _check_params(op, params)
    dim = opdef.dim_rule(op, [a.dim for a in args], params)
    if not 1 <= dim <= MAX_DIM:
        raise ShapeError(f"{op}: the result would have dim {dim:,}; formulas are limited to "
                         f"dims from 1 to {MAX_DIM:,} (lazymat.formula.MAX_DIM)")
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
    _checked_dim("a variable", dim)
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


def existing(op: str, args: tuple[Node, ...], params: tuple = ()) -> Node | None:
    """The node already built for ``op(*args, *params)``, or None (simplifications use it
    to share ``b * a`` with an ``a * b`` built before: one kernel temporary, not two)."""
    return _interned.get((op, args, params))


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


# --------------------------------------------------------------------------- the op registry

@dataclass(frozen=True)
class OpDef:
    """All the facts of one op (build it with :func:`register`).

    ``ref(xp, params, *arrays)`` evaluates it on numpy or torch arrays (last axis = dim;
    ``xp`` is :func:`lazymat.arraylib.lib_of`'s adapter, ``xp.module`` the library).
    An elementwise op has a C template ``c`` (``{0} {1}`` .. its arguments, ``{T}`` the
    type, ``{p0} ..`` its integer parameters); a structural one a ``render(ctx, node)``
    giving C statements. ``c_helper`` is C text the op needs in every kernel's prelude
    (see :func:`lazymat.codegen.c_like.prelude` for its dialect), calling the libm
    functions ``libm`` ((name, number of arguments), spelled ``LM_F(name)``/``LM_D(name)``).
    ``int_params`` are the positions, among a formula string's call arguments, of the
    integer literals (``Round(x, 2)``: (1,)). ``fold(values, params)`` computes the op on
    constants (Fractions stay exact; None: cannot). ``vjp(node, g)`` gives one cotangent
    formula (or None) per argument. ``method`` names the LazyTensor method of a unary op;
    ``complex_result`` says whether a unary op keeps (True) or drops (False) a complex
    LazyTensor's complex values (None: not defined on complex LazyTensors).
    """

    name: str
    arity: int | None
    dim_rule: Callable[[str, list[int], tuple], int]
    ref: Callable[..., Any]
    c: str | None = None
    render: Callable[..., list[str]] | None = None
    jam: bool = False  # the renderer can do several columns at once (ctx.copies)
    fold: Callable[[list, tuple], Any] | None = None
    simplify: Callable[[tuple, tuple, int], Node | None] | None = None
    doc: str = ""
    vjp: Callable[[Node, Node], tuple[Node | None, ...]] | None = None
    c_helper: str = ""
    libm: tuple[tuple[str, int], ...] = ()
    int_params: tuple[int, ...] = ()
    method: str | None = None
    complex_result: bool | None = None

    @property
    def elementwise(self) -> bool:
        """Component k of the result depends on component k of each argument only (the C
        template is inlined per component; dim-1 arguments broadcast)."""
        return self.c is not None


#: Every primitive op by name, in registration order (the order of the prelude's helpers).
OPS: dict[str, OpDef] = {}
#: Composite ops (functions building a formula of primitive ones) by name.
MACROS: dict[str, Callable[..., Node]] = {}
_MACRO_INT_PARAMS: dict[str, tuple[int, ...]] = {}


def broadcast_dims(name: str, dims: list[int], params: tuple) -> int:
    """The elementwise dim rule: every operand has the result's dim or dim 1."""
    out = max(dims)
    for d in dims:
        if d != 1 and d != out:
            raise ShapeError(
                f"{name}: operand dims {dims} do not broadcast (each must be 1 or {out})")
    return out


def register(name: str, arity: int | None, ref: Callable[..., Any], *,
             dims: Callable[[str, list[int], tuple], int] | None = None,
             c: str | None = None, render: Callable[..., list[str]] | None = None,
             **facts: Any) -> OpDef:
    """Add an op: the one way to do it (see :class:`OpDef` for the facts).

    >>> op = register("Twice", 1, lambda xp, p, a: 2 * a, c="(2 * {0})",
    ...               vjp=lambda n, g: (g * 2,), doc="2a")  # doctest: +SKIP

    An op is elementwise when it has a C template ``c`` (its dim rule defaults to
    broadcasting), structural when it has a ``render`` (and then needs ``dims``).
    """
    if name in OPS:
        raise ValueError(f"the op {name!r} is already registered")
    if (c is None) == (render is None):
        raise ValueError(f"{name}: give exactly one of c (elementwise) and render")
    if dims is None:
        if c is None:
            raise ValueError(f"{name}: a structural op needs a dim rule")
        dims = broadcast_dims
    op = OpDef(name, arity, dims, ref, c=c, render=render, **facts)
    OPS[name] = op
    return op


def register_macro(name: str, build: Callable[..., Node], int_params: tuple[int, ...] = ()
                   ) -> Callable[..., Node]:
    """Add a composite op ``name(*args) = build(*args)``; ``int_params`` as for ops.

    A macro may share its name with a primitive op (Extract, OneHot, Pow): it is then the
    checked builder that :func:`apply` and the parser call."""
    if name in MACROS:
        raise ValueError(f"the macro {name!r} is already registered")
    MACROS[name] = build
    _MACRO_INT_PARAMS[name] = tuple(int_params)
    return build


def int_param_slots(name: str) -> tuple[int, ...]:
    """Which call arguments of op or macro ``name`` are integer literals in formula strings."""
    if name in MACROS:
        return _MACRO_INT_PARAMS[name]
    op = OPS.get(name)
    return op.int_params if op is not None else ()


def apply(name: str, *args: Any) -> Node:
    """Build ``name(*args)`` for a primitive or composite op by name.

    Formula arguments come first, integer parameters last (as in KeOps strings).
    """
    if name in MACROS:
        return MACROS[name](*args)
    opdef = OPS.get(name)
    if opdef is None:
        raise KeyError(name)
    nodes = tuple(as_node(a) for a in args[: opdef.arity])
    return make(name, nodes, tuple(args[opdef.arity:]))


# --------------------------------------------------------------------------- text form

def const_to_string(value, dim: int) -> str:
    """A constant in the syntax the Genred parser reads back."""
    if isinstance(value, Fraction):
        text = (f"IntCst({value.numerator})" if value.denominator == 1
                else f"RatCst({value.numerator},{value.denominator})")
    else:
        text = repr(float(value))
    return text if dim == 1 else f"SumT({text},{dim})"


def _param_to_string(p) -> str:
    """An integer parameter, or a list parameter (TensorDot's shapes) as ``[2, 3]``."""
    if isinstance(p, tuple):
        return "[" + ", ".join(str(v) for v in p) + "]"
    return str(p)


def to_string(root: Node) -> str:
    """A formula in the syntax the Genred parser reads back.

    Written from an explicit stack (any depth), piece by piece: the text of a long chain
    is built once, not once per level.

    >>> to_string(make("Sum", (make("Square", (Var(0, 3, 0),)),)))
    'Sum(Square(Var(0,3,0)))'
    """
    out: list[str] = []
    stack: list[Node | str] = [root]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            out.append(item)
        elif item.op == "Var":
            i, d, c = item.params
            out.append(f"Var({i},{d},{c})")
        elif item.op == "Const":
            out.append(const_to_string(item.params[0], item.params[1]))
        else:
            out.append(f"{item.op}(")
            parts: list[Node | str] = list(item.args) + [_param_to_string(p)
                                                         for p in item.params]
            stack.append(")")
            for k in range(len(parts) - 1, -1, -1):
                stack.append(parts[k])
                if k:
                    stack.append(", ")
    return "".join(out)
