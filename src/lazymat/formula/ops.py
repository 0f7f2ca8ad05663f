"""Every formula op, each defined once with all of its facts.

An op's entry holds: its arity, its dim rule, its reference evaluation on
arrays (numpy or torch through ``xp``), its C code (an elementwise template or
a small renderer, shared by every C-like backend), its constant folding and its
simplification rule. Composite ops (SqDist, Normalize, ...) are defined as
formulas of primitive ones in ``MACROS``.

Adding an op = one ``_elementwise(...)`` or ``_structural(...)`` call here and
one row in ``tests/test_ops.py``.

>>> from lazymat.formula import Var
>>> f = SqDist(Var(0, 3, 0), Var(1, 3, 1))
>>> f.dim
1
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from fractions import Fraction
from typing import Any, Callable

from ..errors import ShapeError
from .node import Const, Node, as_node, is_one, is_zero, make


@dataclass(frozen=True)
class OpDef:
    name: str
    arity: int | None
    dim_rule: Callable[[str, list[int], tuple], int]
    ref: Callable[..., Any]  # (xp, params, *arrays) -> array with last axis = dim
    c: str | None = None  # elementwise C template: {0} {1} .. args, {T} type, {p0} .. params
    render: Callable[..., list[str]] | None = None  # structural C renderer (ctx, node)
    jam: bool = False  # the renderer can do several columns at once (ctx.copies)
    fold: Callable[[list, tuple], Any] | None = None
    simplify: Callable[[tuple, tuple, int], Node | None] | None = None
    elementwise: bool = False
    doc: str = ""
    # vjp(node, g) -> one cotangent formula (or None: no dependence) per formula argument,
    # each of the node's dim; the autodiff engine sums it for an argument of dim 1.
    vjp: Callable[[Node, Node], tuple[Node | None, ...]] | None = None


OPS: dict[str, OpDef] = {}


# --------------------------------------------------------------------------- dim rules

def _broadcast_dims(name: str, dims: list[int], params: tuple) -> int:
    out = max(dims)
    for d in dims:
        if d != 1 and d != out:
            raise ShapeError(
                f"{name}: operand dims {dims} do not broadcast (each must be 1 or {out})")
    return out


def _scalar_dim(name: str, dims: list[int], params: tuple) -> int:
    return 1


# --------------------------------------------------------------------------- folding helpers

def _exact_or_float(fn: Callable) -> Callable[[list, tuple], Any]:
    def fold(values: list, params: tuple):
        try:
            return fn(*values, *params)
        except (ArithmeticError, ValueError, OverflowError):
            return None

    return fold


def _float_fold(fn: Callable) -> Callable[[list, tuple], Any]:
    return _exact_or_float(lambda *v: fn(*[float(x) for x in v]))


def _elementwise(name: str, arity: int, ref: Callable, c: str, fold=None, simplify=None,
                 doc: str = "", vjp=None) -> None:
    OPS[name] = OpDef(name, arity, _broadcast_dims, ref, c=c, fold=fold, simplify=simplify,
                      elementwise=True, doc=doc, vjp=vjp)


def _structural(name: str, arity: int | None, dim_rule, ref, render, fold=None, simplify=None,
                doc: str = "", vjp=None) -> None:
    OPS[name] = OpDef(name, arity, dim_rule, ref, render=render, fold=fold, simplify=simplify,
                      doc=doc, vjp=vjp)


def _m(op: str, *args: Any, params: tuple = ()) -> Node:
    return make(op, tuple(as_node(a) for a in args), params)


def _no_gradient(node: Node, g: Node) -> tuple[None, ...]:
    """Piecewise-constant ops (comparisons, Sign, Step, Arg*, OneHot) have zero derivative."""
    return (None,) * len(node.args)


def _with_dim(node: Node, dim: int) -> Node | None:
    """``node`` if it already has the result's dim (a simplification must not change dims)."""
    return node if node.dim == dim else None


def _cast_bool(xp, cond, like):
    return xp.cast(cond, like)


# --------------------------------------------------------------------------- simplifications

def _simplify_add(args, params, dim):
    a, b = args
    if is_zero(b):
        return _with_dim(a, dim)
    if is_zero(a):
        return _with_dim(b, dim)
    return None


def _simplify_sub(args, params, dim):
    a, b = args
    if is_zero(b):
        return _with_dim(a, dim)
    if is_zero(a) and b.dim == dim:
        return make("Minus", (b,))
    return None


def _simplify_mult(args, params, dim):
    a, b = args
    if is_zero(a) or is_zero(b):
        return Const(0, dim)
    if is_one(a):
        return _with_dim(b, dim)
    if is_one(b):
        return _with_dim(a, dim)
    return None


def _simplify_div(args, params, dim):
    a, b = args
    if is_one(b):
        return _with_dim(a, dim)
    if is_zero(a) and not b.is_const:
        return Const(0, dim)
    if b.is_const and isinstance(b.value, Fraction) and b.value != 0 and not a.is_const:
        # An exact constant divisor becomes an exact multiplier (one mul per pair, not a div).
        return make("Mult", (Const(1 / b.value, b.dim), a))
    return None


def _simplify_minus(args, params, dim):
    (a,) = args
    if a.op == "Minus":
        return a.args[0]
    return None


# --------------------------------------------------------------------------- elementwise ops

_elementwise("Add", 2, lambda xp, p, a, b: a + b, "({0} + {1})",
             _exact_or_float(lambda a, b: a + b), _simplify_add, "a + b",
             vjp=lambda n, g: (g, g))
_elementwise("Subtract", 2, lambda xp, p, a, b: a - b, "({0} - {1})",
             _exact_or_float(lambda a, b: a - b), _simplify_sub, "a - b",
             vjp=lambda n, g: (g, -g))
_elementwise("Mult", 2, lambda xp, p, a, b: a * b, "({0} * {1})",
             _exact_or_float(lambda a, b: a * b), _simplify_mult, "a * b",
             vjp=lambda n, g: (g * n.args[1], g * n.args[0]))
_elementwise("Divide", 2, lambda xp, p, a, b: a / b, "({0} / {1})",
             _exact_or_float(lambda a, b: a / b), _simplify_div, "a / b",
             vjp=lambda n, g: (g / n.args[1], -(g * n) / n.args[1]))
_elementwise("Minus", 1, lambda xp, p, a: -a, "(-{0})",
             _exact_or_float(lambda a: -a), _simplify_minus, "-a",
             vjp=lambda n, g: (-g,))
_elementwise("Exp", 1, lambda xp, p, a: xp.exp(a), "lm_exp({0})", _float_fold(math.exp),
             doc="exp(a)", vjp=lambda n, g: (g * n,))
_elementwise("Log", 1, lambda xp, p, a: xp.log(a), "lm_log({0})", _float_fold(math.log),
             doc="natural log", vjp=lambda n, g: (g / n.args[0],))
_elementwise("Sqrt", 1, lambda xp, p, a: xp.sqrt(a), "lm_sqrt({0})", _float_fold(math.sqrt),
             doc="square root",
             # Rsqrt(0) = 0: a finite subgradient at 0 instead of inf * 0 = NaN.
             vjp=lambda n, g: (g * _m("Rsqrt", n.args[0]) * Fraction(1, 2),))
_elementwise(
    "Rsqrt", 1,
    lambda xp, p, a: xp.where(a == 0, a * 0, 1 / xp.sqrt(xp.where(a == 0, a * 0 + 1, a))),
    "lm_rsqrt({0})", _float_fold(lambda a: 0.0 if a == 0 else 1 / math.sqrt(a)),
    doc="1/sqrt(a), 0 at a = 0",
    vjp=lambda n, g: (g * n * n * n * Fraction(-1, 2),))
_elementwise("Inv", 1, lambda xp, p, a: 1 / a, "(({T})1 / {0})",
             _exact_or_float(lambda a: 1 / a), doc="1/a", vjp=lambda n, g: (-(g * n * n),))
_elementwise("Square", 1, lambda xp, p, a: a * a, "({0} * {0})",
             _exact_or_float(lambda a: a * a), doc="a*a",
             vjp=lambda n, g: (g * n.args[0] * 2,))
_elementwise("Abs", 1, lambda xp, p, a: xp.abs(a), "lm_abs({0})", _exact_or_float(abs),
             doc="|a|", vjp=lambda n, g: (g * _m("Sign", n.args[0]),))
_elementwise("Sign", 1, lambda xp, p, a: xp.sign(a), "(({T})({0} > 0) - ({T})({0} < 0))",
             _exact_or_float(lambda a: (a > 0) - (a < 0)), doc="-1, 0 or 1",
             vjp=_no_gradient)
_elementwise("Step", 1, lambda xp, p, a: _cast_bool(xp, a >= 0, a), "(({T})({0} >= 0))",
             _exact_or_float(lambda a: int(a >= 0)), doc="1 where a >= 0 else 0",
             vjp=_no_gradient)
_elementwise("ReLU", 1, lambda xp, p, a: xp.where(a > 0, a, a * 0), "({0} > 0 ? {0} : ({T})0)",
             _exact_or_float(lambda a: max(a, 0)), doc="max(a, 0)",
             vjp=lambda n, g: (g * _m("LessThan", 0, n.args[0]),))
_elementwise("Sin", 1, lambda xp, p, a: xp.sin(a), "lm_sin({0})", _float_fold(math.sin),
             vjp=lambda n, g: (g * _m("Cos", n.args[0]),))
_elementwise("Cos", 1, lambda xp, p, a: xp.cos(a), "lm_cos({0})", _float_fold(math.cos),
             vjp=lambda n, g: (-(g * _m("Sin", n.args[0])),))
_elementwise("Powf", 2, lambda xp, p, a, b: xp.power(a, b), "lm_pow({0}, {1})",
             _float_fold(math.pow), doc="a**b with a real exponent",
             vjp=lambda n, g: (g * n.args[1] * _m("Powf", n.args[0], n.args[1] - 1),
                               g * n * _m("Log", n.args[0])))
_elementwise("Clamp", 3, lambda xp, p, a, lo, hi: xp.minimum(xp.maximum(a, lo), hi),
             "lm_clamp({0}, {1}, {2})", _exact_or_float(lambda a, lo, hi: min(max(a, lo), hi)),
             doc="min(max(a, lo), hi)",
             vjp=lambda n, g: _clamp_vjp(g, *n.args))


def _clamp_vjp(g: Node, a: Node, lo: Node, hi: Node) -> tuple[Node, Node, Node]:
    # min(max(a, lo), hi): correct even for lo > hi, where the output is hi everywhere.
    lo_ok = _m("LessOrEqual", lo, hi)
    return (g * _m("LessOrEqual", lo, a) * _m("LessOrEqual", a, hi),
            g * _m("LessThan", a, lo) * lo_ok,
            g * (1 - _m("LessOrEqual", a, hi) * lo_ok))
_elementwise("IfElse", 3, lambda xp, p, c, a, b: xp.where(c >= 0, a, b),
             "({0} >= 0 ? {1} : {2})", _exact_or_float(lambda c, a, b: a if c >= 0 else b),
             doc="a where c >= 0 else b",
             vjp=lambda n, g: (None, g * _m("Step", n.args[0]),
                               g * (1 - _m("Step", n.args[0]))))
for _name, _sym, _py in (("LessThan", "<", lambda a, b: a < b),
                         ("LessOrEqual", "<=", lambda a, b: a <= b),
                         ("Equal", "==", lambda a, b: a == b),
                         ("NotEqual", "!=", lambda a, b: a != b)):
    _elementwise(_name, 2,
                 (lambda op: lambda xp, p, a, b: _cast_bool(xp, op(a, b), a + b))(_py),
                 "(({T})({0} %s {1}))" % _sym,
                 (lambda op: _exact_or_float(lambda a, b: int(op(a, b))))(_py),
                 doc=f"1 where a {_sym} b else 0", vjp=_no_gradient)


# Pow has an integer parameter, so it has its own dim rule but renders elementwise.
def _pow_ref(xp, p, a):
    return a ** p[0] if p[0] >= 0 else 1 / a ** (-p[0])


OPS["Pow"] = OpDef("Pow", 1, _broadcast_dims, _pow_ref, c="lm_powi({0}, {p0})",
                   fold=_exact_or_float(lambda a, n: Fraction(a) ** n if isinstance(a, Fraction)
                                        else float(a) ** n),
                   elementwise=True, doc="a**n for an integer n",
                   vjp=lambda n, g: (g * n.params[0] * Pow(n.args[0], n.params[0] - 1),))


def _safe_nonzero(xp, a):
    """``a`` with its zeros replaced by ones (for x / x-style ops defined apart at 0)."""
    return xp.where(a == 0, a * 0 + 1, a)


_elementwise("Acos", 1, lambda xp, p, a: xp.arccos(a), "lm_acos({0})", _float_fold(math.acos),
             doc="arccos(a)",
             vjp=lambda n, g: (-(g * _m("Rsqrt", 1 - _m("Square", n.args[0]))),))
_elementwise("Asin", 1, lambda xp, p, a: xp.arcsin(a), "lm_asin({0})", _float_fold(math.asin),
             doc="arcsin(a)",
             vjp=lambda n, g: (g * _m("Rsqrt", 1 - _m("Square", n.args[0])),))
_elementwise("Atan", 1, lambda xp, p, a: xp.arctan(a), "lm_atan({0})", _float_fold(math.atan),
             doc="arctan(a)",
             vjp=lambda n, g: (g / (1 + _m("Square", n.args[0])),))
_elementwise("Atan2", 2, lambda xp, p, a, b: xp.arctan2(a, b), "lm_atan2({0}, {1})",
             _float_fold(math.atan2), doc="atan2(a, b): the angle of the point (b, a)",
             vjp=lambda n, g: _atan2_vjp(g, *n.args))


def _atan2_vjp(g: Node, a: Node, b: Node) -> tuple[Node, Node]:
    r2 = _m("Square", a) + _m("Square", b)
    return (g * b / r2, -(g * a) / r2)


_elementwise("Floor", 1, lambda xp, p, a: xp.floor(a), "lm_floor({0})",
             _exact_or_float(math.floor), doc="floor(a)", vjp=_no_gradient)
_elementwise("Mod", 3, lambda xp, p, a, n, d: a - n * xp.floor((a - d) / n),
             "lm_mod({0}, {1}, {2})",
             _exact_or_float(lambda a, n, d: a - n * math.floor((a - d) / n)),
             doc="a - n floor((a - d) / n): a modulo n, in [d, d + n)",
             vjp=lambda n, g: (g, -(g * _m("Floor", (n.args[0] - n.args[2]) / n.args[1])),
                               None))
_elementwise("XLogX", 1,
             lambda xp, p, a: xp.where(a == 0, a * 0, a * xp.log(_safe_nonzero(xp, a))),
             "lm_xlogx({0})",
             _exact_or_float(lambda a: 0 if a == 0 else float(a) * math.log(a)),
             doc="a log(a), 0 at a = 0",
             vjp=lambda n, g: (g * (_m("Log", n.args[0]) + 1),))
_elementwise("SinXDivX", 1,
             lambda xp, p, a: xp.where(a == 0, a * 0 + 1,
                                       xp.sin(_safe_nonzero(xp, a)) / _safe_nonzero(xp, a)),
             "lm_sinxdivx({0})",
             _exact_or_float(lambda a: 1 if a == 0 else math.sin(a) / float(a)),
             doc="sin(a)/a, 1 at a = 0",
             vjp=lambda n, g: (g * _sinxdivx_derivative(n.args[0]),))


def _sinxdivx_derivative(a: Node) -> Node:
    # (cos a - sin(a)/a) / a, 0 at a = 0: the divisor is a + [a == 0] (1 at 0, where the
    # numerator is 0), so no 0/0 appears, at any order.
    return (_m("Cos", a) - _m("SinXDivX", a)) / (a + _m("Equal", a, 0))


# Round and ClampInt have integer parameters, like Pow: elementwise with {p0} {p1} in C.
def _round_ref(xp, p, a):
    s = 10.0 ** abs(p[0])
    return xp.rint(a / s) * s if p[0] < 0 else xp.rint(a * s) / s


def _round_fold(a, d):
    if isinstance(a, Fraction):
        return round(a, d)  # exact (half to even, as rint)
    s = 10.0 ** abs(d)
    return round(a / s) * s if d < 0 else round(a * s) / s


OPS["Round"] = OpDef("Round", 1, _broadcast_dims, _round_ref, c="lm_round_dec({0}, {p0})",
                     fold=_exact_or_float(_round_fold), elementwise=True,
                     doc="a rounded to d decimals (d an integer, may be negative; "
                         "ties to even)", vjp=_no_gradient)
OPS["ClampInt"] = OpDef(
    "ClampInt", 1, _broadcast_dims, lambda xp, p, a: xp.clip(a, p[0], p[1]),
    c="lm_clamp({0}, ({T}){p0}, ({T}){p1})",
    fold=_exact_or_float(lambda a, lo, hi: min(max(a, lo), hi)), elementwise=True,
    doc="min(max(a, lo), hi) for integers lo and hi",
    vjp=lambda n, g: (g * _m("DiffClampInt", n.args[0], params=n.params),))
OPS["DiffClampInt"] = OpDef(
    "DiffClampInt", 1, _broadcast_dims,
    lambda xp, p, a: _cast_bool(xp, (a >= p[0]) & (a <= p[1]), a),
    c="(({T})({0} >= ({T}){p0} && {0} <= ({T}){p1}))",
    fold=_exact_or_float(lambda a, lo, hi: int(lo <= a <= hi)), elementwise=True,
    doc="1 where lo <= a <= hi else 0 (the derivative of ClampInt)", vjp=_no_gradient)


def _sumt_dim(name, dims, params):
    if dims[0] != 1:
        raise ShapeError(f"SumT needs a scalar (dim 1) formula, got dim {dims[0]}")
    if params[0] < 1:
        raise ShapeError(f"SumT needs a dim >= 1, got {params[0]}")
    return params[0]


# SumT is elementwise (component k of the output is the operand's only component), so it
# is inlined in C, and the autodiff engine sums its cotangent: the VJP of SumT is Sum.
OPS["SumT"] = OpDef("SumT", 1, _sumt_dim, lambda xp, p, a: xp.concat([a] * p[0], -1),
                    c="{0}", fold=lambda values, params: values[0],
                    simplify=lambda args, params, dim: args[0] if dim == 1 else None,
                    elementwise=True, doc="the scalar a repeated d times (the adjoint of Sum)",
                    vjp=lambda n, g: (g,))


# --------------------------------------------------------------------------- structural ops

def _sum_render(ctx, node):
    # ctx.copies > 1: that many consecutive columns at once, independent chains of adds.
    n, copies = node.args[0].dim, range(ctx.copies)
    adds = " ".join(f"s{u} += {ctx.arg(0, 'k', u)};" for u in copies)
    return [f"{ctx.T} " + ", ".join(f"s{u} = 0" for u in copies) + ";",
            f"for (int k = 0; k < {n}; k++) {{ {adds} }}",
            *[f"{ctx.out(0, u)} = s{u};" for u in copies]]


def _sum_simplify(args, params, dim):
    (a,) = args
    if a.dim == 1:
        return a
    if a.is_const:
        return Const(a.value * a.dim, 1)
    return None


_structural("Sum", 1, _scalar_dim, lambda xp, p, a: xp.sum(a, -1, keepdims=True), _sum_render,
            simplify=_sum_simplify, doc="sum of the components (dim 1)",
            vjp=lambda n, g: (g,))  # broadcast to the operand's dim by the engine
OPS["Sum"] = replace(OPS["Sum"], jam=True)


def _extremum(name: str, better: str, want_index: bool):
    def render(ctx, node):
        n = node.args[0].dim
        return [f"{ctx.T} m = {ctx.arg(0, 0)}; int a = 0;",
                f"for (int k = 1; k < {n}; k++) {{ {ctx.T} v = {ctx.arg(0, 'k')}; "
                f"if (v {better} m) {{ m = v; a = k; }} }}",
                f"{ctx.out(0)} = " + (f"({ctx.T})a;" if want_index else "m;")]

    if want_index:
        pick = "argmin" if better == "<" else "argmax"

        def ref(xp, p, a):
            return xp.cast(getattr(xp, pick)(a, -1, keepdims=True), a)
    else:
        pick = "amin" if better == "<" else "amax"

        def ref(xp, p, a):
            return getattr(xp, pick)(a, -1, keepdims=True)

    def simplify(args, params, dim):
        if args[0].dim == 1:
            return Const(0, 1) if want_index else args[0]
        return None

    def vjp(n, g):
        # The gradient flows to the selected component only.
        where = _m("ArgMin" if better == "<" else "ArgMax", n.args[0])
        return (g * OneHot(where, n.args[0].dim),)

    _structural(name, 1, _scalar_dim, ref, render, simplify=simplify,
                doc=f"{'index of the' if want_index else 'the'} "
                    f"{'smallest' if better == '<' else 'largest'} component (dim 1)",
                vjp=_no_gradient if want_index else vjp)


_extremum("Min", "<", False)
_extremum("Max", ">", False)
_extremum("ArgMin", "<", True)
_extremum("ArgMax", ">", True)


def _bcast_lead(xp, arrays):
    """Broadcast arrays over every axis but the last (needed before a concat)."""
    nd = max(a.ndim for a in arrays)
    lead = [1] * (nd - 1)
    for a in arrays:
        for k, s in enumerate(a.shape[:-1]):
            lead[k] = max(lead[k], s)
    return [xp.broadcast_to(a, tuple(lead) + (a.shape[-1],)) for a in arrays]


def _concat_render(ctx, node):
    d0, d1 = node.args[0].dim, node.args[1].dim
    return [f"for (int k = 0; k < {d0}; k++) {ctx.out('k')} = {ctx.arg(0, 'k')};",
            f"for (int k = 0; k < {d1}; k++) {ctx.out(f'{d0} + k')} = {ctx.arg(1, 'k')};"]


_structural("Concat", 2, lambda n, d, p: d[0] + d[1],
            lambda xp, p, a, b: xp.concat(_bcast_lead(xp, [a, b]), -1), _concat_render,
            doc="concatenation [a, b]",
            vjp=lambda n, g: (Extract(g, 0, n.args[0].dim),
                              Extract(g, n.args[0].dim, n.args[1].dim)))


def _extract_dim(name, dims, params):
    start, d = params
    if start < 0 or d < 1 or start + d > dims[0]:
        raise ShapeError(f"{name}: cannot take components [{start}:{start + d}] "
                         f"of a formula of dim {dims[0]}")
    return d


def _extract_render(ctx, node):
    start, d = node.params
    return [f"for (int k = 0; k < {d}; k++) {ctx.out('k')} = {ctx.arg(0, f'{start} + k')};"]


def _extract_simplify(args, params, dim):
    (a,) = args
    if params[0] == 0 and params[1] == a.dim:
        return a
    if a.is_const:
        return Const(a.value, dim)
    return None


_structural("Extract", 1, _extract_dim, lambda xp, p, a: a[..., p[0]:p[0] + p[1]],
            _extract_render, simplify=_extract_simplify, doc="components [start:start+d]",
            vjp=lambda n, g: (_embed(g, n.params[0], n.args[0].dim),))


def _embed(g: Node, start: int, dim: int) -> Node:
    """g placed at ``start`` in a zero vector of length ``dim`` (the adjoint of Extract)."""
    before, after = start, dim - start - g.dim
    out = g if before == 0 else _m("Concat", Const(0, before), g)
    return out if after == 0 else _m("Concat", out, Const(0, after))


def _zeros(xp, a, d: int):
    """Zeros of shape a.shape[:-1] + (d,), a's dtype and device."""
    return xp.full(tuple(a.shape[:-1]) + (d,), 0, like=a)


def _place(xp, a, start: int, dim: int):
    """``a`` at ``start`` in a zero vector of length ``dim`` (the last axis)."""
    parts = [a]
    if start > 0:
        parts.insert(0, _zeros(xp, a, start))
    if dim - start - a.shape[-1] > 0:
        parts.append(_zeros(xp, a, dim - start - a.shape[-1]))
    return xp.concat(parts, -1) if len(parts) > 1 else a


def _elemt_dim(name, dims, params):
    n, m = params
    if dims[0] != 1:
        raise ShapeError(f"ElemT needs a scalar (dim 1) formula, got dim {dims[0]}")
    if n < 1 or not 0 <= m < n:
        raise ShapeError(f"ElemT: cannot place a scalar at position {m} of a vector of "
                         f"length {n}")
    return n


def _placed_simplify(args, params, dim):
    (a,) = args
    if a.dim == dim:  # then placed at 0: nothing to pad
        return a
    if is_zero(a):
        return Const(0, dim)
    return None


def _placed_render(start_of):
    def render(ctx, node):
        start, d = start_of(node.params), node.args[0].dim
        return [f"for (int k = 0; k < {node.dim}; k++) {ctx.out('k')} = ({ctx.T})0;",
                f"for (int k = 0; k < {d}; k++) {ctx.out(f'{start} + k')} = {ctx.arg(0, 'k')};"]

    return render


_structural("ElemT", 1, _elemt_dim, lambda xp, p, a: _place(xp, a, p[1], p[0]),
            _placed_render(lambda p: p[1]), simplify=_placed_simplify,
            doc="the scalar a at position m of a zero vector of length n (the adjoint of Elem)",
            vjp=lambda n, g: (Elem(g, n.params[1]),))


def _extractt_dim(name, dims, params):
    start, d = params
    if start < 0 or start + dims[0] > d:
        raise ShapeError(f"ExtractT: cannot place a formula of dim {dims[0]} at position "
                         f"{start} of a vector of length {d}")
    return d


_structural("ExtractT", 1, _extractt_dim, lambda xp, p, a: _place(xp, a, p[0], p[1]),
            _placed_render(lambda p: p[0]), simplify=_placed_simplify,
            doc="a at components [start:start+a.dim] of a zero vector of length d "
                "(the adjoint of Extract)",
            vjp=lambda n, g: (Extract(g, n.params[0], n.args[0].dim),))


def _onehot_dim(name, dims, params):
    if dims[0] != 1:
        raise ShapeError(f"OneHot needs a scalar (dim 1) formula, got dim {dims[0]}")
    if params[0] < 1:
        raise ShapeError(f"OneHot needs a length >= 1, got {params[0]}")
    return params[0]


def _onehot_ref(xp, p, a):
    positions = xp.cast(xp.arange(p[0], like=a), a)
    return xp.cast(xp.rint(a) == positions, a)


_structural("OneHot", 1, _onehot_dim, _onehot_ref,
            lambda ctx, node: [f"{ctx.T} r = lm_round({ctx.arg(0, 0)});",
                               f"for (int k = 0; k < {node.params[0]}; k++) "
                               f"{ctx.out('k')} = ({ctx.T})(r == k);"],
            doc="one-hot vector of length D at position round(a)", vjp=_no_gradient)


def _matvec_dim(name, dims, params):
    da, db = dims
    if da % db != 0:
        raise ShapeError(f"MatVecMult: matrix dim {da} is not a multiple of vector dim {db}")
    return da // db


def _matvec_ref(xp, p, a, b):
    n = b.shape[-1]
    m = a.shape[-1] // n
    mat = a.reshape(tuple(a.shape[:-1]) + (m, n))
    return xp.sum(mat * xp.expand_dims(b, -2), -1)


def _matvec_render(ctx, node):
    n = node.args[1].dim
    return [f"for (int r = 0; r < {node.dim}; r++) {{ {ctx.T} s = 0;",
            f"  for (int c = 0; c < {n}; c++) s += {ctx.arg(0, f'r * {n} + c')} * "
            f"{ctx.arg(1, 'c')};",
            f"  {ctx.out('r')} = s; }}"]


_structural("MatVecMult", 2, _matvec_dim, _matvec_ref, _matvec_render,
            doc="row-major matrix (dim m*n) times vector (dim n)",
            vjp=lambda n, g: (_m("TensorProd", g, n.args[1]), _m("VecMatMult", g, n.args[0])))


def _vecmat_dim(name, dims, params):
    db, da = dims
    if da % db != 0:
        raise ShapeError(f"VecMatMult: matrix dim {da} is not a multiple of vector dim {db}")
    return da // db


def _vecmat_ref(xp, p, b, a):
    m = b.shape[-1]
    n = a.shape[-1] // m
    mat = a.reshape(tuple(a.shape[:-1]) + (m, n))
    return xp.sum(mat * xp.expand_dims(b, -1), -2)


def _vecmat_render(ctx, node):
    m, n = node.args[0].dim, node.dim
    return [f"for (int c = 0; c < {n}; c++) {{ {ctx.T} s = 0;",
            f"  for (int r = 0; r < {m}; r++) s += {ctx.arg(0, 'r')} * "
            f"{ctx.arg(1, f'r * {n} + c')};",
            f"  {ctx.out('c')} = s; }}"]


_structural("VecMatMult", 2, _vecmat_dim, _vecmat_ref, _vecmat_render,
            doc="vector (dim m) times row-major matrix (dim m*n)",
            vjp=lambda n, g: (_m("MatVecMult", n.args[1], g), _m("TensorProd", n.args[0], g)))


def _tensorprod_ref(xp, p, a, b):
    a, b = _bcast_lead(xp, [a, b])
    out = xp.expand_dims(a, -1) * xp.expand_dims(b, -2)
    return out.reshape(tuple(out.shape[:-2]) + (a.shape[-1] * b.shape[-1],))


def _tensorprod_render(ctx, node):
    m, n = node.args[0].dim, node.args[1].dim
    return [f"for (int r = 0; r < {m}; r++) for (int c = 0; c < {n}; c++) "
            f"{ctx.out(f'r * {n} + c')} = {ctx.arg(0, 'r')} * {ctx.arg(1, 'c')};"]


_structural("TensorProd", 2, lambda name, d, p: d[0] * d[1], _tensorprod_ref,
            _tensorprod_render, doc="outer product a b^T, row-major (dim m*n)",
            vjp=lambda n, g: (_m("MatVecMult", g, n.args[1]), _m("VecMatMult", n.args[0], g)))


# --------------------------------------------------------------------------- composite ops

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
    return make("Sqrt", (SqNorm2(f),))


def Normalize(f: Node) -> Node:
    """f / ‖f‖, 0 where f = 0."""
    return make("Mult", (make("Rsqrt", (SqNorm2(f),)), f))


def SqNormIso(s: Node, f: Node) -> Node:
    return make("Mult", (s, SqNorm2(f)))


def SqNormDiag(s: Node, f: Node) -> Node:
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
    return WeightedSqNorm(s, make("Subtract", (f, g)))


def Elem(f: Node, m: int) -> Node:
    return make("Extract", (f,), (int(m), 1))


def Extract(f: Node, start: int, d: int) -> Node:
    return make("Extract", (f,), (int(start), int(d)))


def OneHot(f: Node, d: int) -> Node:
    return make("OneHot", (f,), (int(d),))


def Pow(f: Node, n: int) -> Node:
    n = int(n)
    if n == 0:
        return Const(1, f.dim)
    if n == 2:
        return make("Square", (f,))
    if n == 1:
        return f
    return make("Pow", (f,), (n,))


def IntInv(n: int) -> Node:
    return Const(Fraction(1, int(n)))


MACROS: dict[str, Callable[..., Node]] = {
    "SqNorm2": SqNorm2, "Scalprod": Scalprod, "SqDist": SqDist, "Norm2": Norm2,
    "Normalize": Normalize, "SqNormIso": SqNormIso, "SqNormDiag": SqNormDiag,
    "SymSqNorm": SymSqNorm, "WeightedSqNorm": WeightedSqNorm, "WeightedSqDist": WeightedSqDist,
    "Elem": Elem, "Extract": Extract, "OneHot": OneHot, "Pow": Pow, "IntInv": IntInv,
}


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
