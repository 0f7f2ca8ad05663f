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

import functools
import itertools
import math
import operator
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
        if not want_index:
            return [f"{ctx.T} m = {ctx.arg(0, 0)};",
                    f"for (int k = 1; k < {n}; k++) {{ {ctx.T} v = {ctx.arg(0, 'k')}; "
                    f"if (v {better} m) m = v; }}",
                    f"{ctx.out(0)} = m;"]
        return [f"{ctx.T} m = {ctx.arg(0, 0)}; int a = 0;",
                f"for (int k = 1; k < {n}; k++) {{ {ctx.T} v = {ctx.arg(0, 'k')}; "
                f"if (v {better} m) {{ m = v; a = k; }} }}",
                f"{ctx.out(0)} = ({ctx.T})a;"]

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


# --------------------------------------------------------------------------- tensor algebra

#: TensorDot's C code is one unrolled sum of products per output component when there are
#: at most this many products in all; above, loops over the axes with strides computed at
#: codegen time.
TENSORDOT_UNROLL_LIMIT = 4096


def _int_tuple(value: Any, what: str) -> tuple[int, ...]:
    """A list parameter as a tuple of ints (a lone int is a list of one, as in pykeops)."""
    if isinstance(value, bool):
        raise ShapeError(f"{what} must be a list of integers, got {value!r}")
    try:
        return (operator.index(value),)
    except TypeError:
        pass
    try:
        items = tuple(value)
    except TypeError:
        raise ShapeError(f"{what} must be a list of integers, got {value!r}") from None
    out = []
    for v in items:
        if isinstance(v, bool):
            raise ShapeError(f"{what} must be a list of integers, got {value!r}")
        try:
            out.append(operator.index(v))
        except TypeError:
            raise ShapeError(f"{what} must be a list of integers, got {value!r}") from None
    return tuple(out)


def _tensordot_params(params: tuple) -> tuple:
    """TensorDot's canonical parameters: (dimsa, dimsb, conta, contb) as tuples of ints, plus
    the permutation only when it is not the identity."""
    if len(params) not in (4, 5):
        raise ShapeError(f"TensorDot takes 4 or 5 integer lists after its two formulas "
                         f"(dimsa, dimsb, conta, contb[, permute]), got {len(params)}")
    names = ("dimsa", "dimsb", "conta", "contb", "permute")
    out = [_int_tuple(p, f"TensorDot: {n}") for n, p in zip(names, params)
           if not (n == "permute" and p is None)]
    if len(out) == 5 and out[4] == tuple(range(len(out[4]))):
        out.pop()
    return tuple(out)


@dataclass(frozen=True)
class _TensorDotLayout:
    dimsa: tuple[int, ...]
    dimsb: tuple[int, ...]
    conta: tuple[int, ...]
    contb: tuple[int, ...]
    permute: tuple[int, ...]  # kept axis p (a's then b's) goes to output axis permute[p]
    keepa: tuple[int, ...]  # a's axes that are not contracted, in order
    keepb: tuple[int, ...]
    outshape: tuple[int, ...]
    contdims: tuple[int, ...]


@functools.lru_cache(maxsize=256)
def _tensordot_layout(params: tuple) -> _TensorDotLayout:
    """Checked shapes and axes of TensorDot(a, b, *params) (params canonical or not)."""
    dimsa, dimsb, conta, contb, *rest = _tensordot_params(params)
    for name, dims in (("dimsa", dimsa), ("dimsb", dimsb)):
        if any(d < 1 for d in dims):
            raise ShapeError(f"TensorDot: {name} {list(dims)} must hold sizes >= 1")
    if len(conta) != len(contb):
        raise ShapeError(f"TensorDot: conta {list(conta)} and contb {list(contb)} must pair "
                         f"up the contracted axes (same length)")
    for name, cont, dims in (("conta", conta, dimsa), ("contb", contb, dimsb)):
        if any(not 0 <= c < len(dims) for c in cont) or len(set(cont)) != len(cont):
            raise ShapeError(f"TensorDot: {name} {list(cont)} must list distinct axes of a "
                             f"tensor of shape {list(dims)}")
    for ca, cb in zip(conta, contb):
        if dimsa[ca] != dimsb[cb]:
            raise ShapeError(f"TensorDot: axis {ca} of a (size {dimsa[ca]}) cannot be "
                             f"contracted with axis {cb} of b (size {dimsb[cb]})")
    keepa = tuple(k for k in range(len(dimsa)) if k not in conta)
    keepb = tuple(k for k in range(len(dimsb)) if k not in contb)
    nkeep = len(keepa) + len(keepb)
    permute = rest[0] if rest else tuple(range(nkeep))
    if sorted(permute) != list(range(nkeep)):
        raise ShapeError(f"TensorDot: permute {list(permute)} must be a permutation of "
                         f"0..{nkeep - 1} (the {nkeep} axes left after the contraction)")
    kept = [dimsa[k] for k in keepa] + [dimsb[k] for k in keepb]
    outshape = [0] * nkeep
    for p, q in enumerate(permute):
        outshape[q] = kept[p]
    return _TensorDotLayout(dimsa, dimsb, conta, contb, tuple(permute), keepa, keepb,
                            tuple(outshape), tuple(dimsa[c] for c in conta))


def _tensordot_dim(name, dims, params):
    lay = _tensordot_layout(params)
    for which, d, shape in (("a", dims[0], lay.dimsa), ("b", dims[1], lay.dimsb)):
        if d != math.prod(shape):
            raise ShapeError(f"TensorDot: {which} has dim {d} but its shape {list(shape)} "
                             f"holds {math.prod(shape)} components")
    return math.prod(lay.outshape)


def _row_major_strides(shape: tuple[int, ...]) -> list[int]:
    return [math.prod(shape[k + 1:]) for k in range(len(shape))]


def _tensordot_loops(lay: _TensorDotLayout):
    """The loop axes (kept axes in a-then-b order, then contracted axes): per axis its size
    and its stride in a, in b and in the output (0 where the axis is not one of theirs)."""
    sa, sb = _row_major_strides(lay.dimsa), _row_major_strides(lay.dimsb)
    so = _row_major_strides(lay.outshape)
    la = len(lay.keepa)
    axes = []
    for p, k in enumerate(lay.keepa):
        axes.append((lay.dimsa[k], sa[k], 0, so[lay.permute[p]]))
    for q, k in enumerate(lay.keepb):
        axes.append((lay.dimsb[k], 0, sb[k], so[lay.permute[la + q]]))
    for ca, cb in zip(lay.conta, lay.contb):
        axes.append((lay.dimsa[ca], sa[ca], sb[cb], 0))
    return axes


def _tensordot_terms(lay: _TensorDotLayout) -> list[list[tuple[int, int]]]:
    """For each output component, the (a index, b index) pairs of its sum of products."""
    axes = _tensordot_loops(lay)
    terms: list[list[tuple[int, int]]] = [[] for _ in range(math.prod(lay.outshape))]
    for idx in itertools.product(*[range(n) for n, *_ in axes]):
        ia = sum(i * s for i, (_, s, _, _) in zip(idx, axes))
        ib = sum(i * s for i, (_, _, s, _) in zip(idx, axes))
        io = sum(i * s for i, (_, _, _, s) in zip(idx, axes))
        terms[io].append((ia, ib))
    return terms


_LETTERS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"


def _tensordot_ref(xp, p, a, b):
    lay = _tensordot_layout(p)
    la, nkeep = len(lay.keepa), len(lay.permute)
    if nkeep + len(lay.conta) > len(_LETTERS):
        raise ShapeError("TensorDot: too many axes for the reference evaluation")
    kept, cont = _LETTERS[:nkeep], _LETTERS[nkeep:]
    sub_a = [""] * len(lay.dimsa)
    sub_b = [""] * len(lay.dimsb)
    for p_, k in enumerate(lay.keepa):
        sub_a[k] = kept[p_]
    for q, k in enumerate(lay.keepb):
        sub_b[k] = kept[la + q]
    for c, (ca, cb) in enumerate(zip(lay.conta, lay.contb)):
        sub_a[ca] = sub_b[cb] = cont[c]
    sub_o = [""] * nkeep
    for p_, q in enumerate(lay.permute):
        sub_o[q] = kept[p_]
    A = a.reshape(tuple(a.shape[:-1]) + lay.dimsa)
    B = b.reshape(tuple(b.shape[:-1]) + lay.dimsb)
    out = xp.einsum(f"...{''.join(sub_a)},...{''.join(sub_b)}->...{''.join(sub_o)}", A, B)
    lead = tuple(out.shape[:out.ndim - nkeep])
    return out.reshape(lead + (math.prod(lay.outshape),))


def _tensordot_render(ctx, node):
    lay = _tensordot_layout(node.params)
    da, db, T = node.args[0].dim, node.args[1].dim, ctx.T
    lines = [f"{T} td_a[{da}], td_b[{db}];",
             f"for (int k = 0; k < {da}; k++) td_a[k] = {ctx.arg(0, 'k')};",
             f"for (int k = 0; k < {db}; k++) td_b[k] = {ctx.arg(1, 'k')};"]
    if node.dim * math.prod(lay.contdims) <= TENSORDOT_UNROLL_LIMIT:
        for o, pairs in enumerate(_tensordot_terms(lay)):
            total = " + ".join(f"td_a[{i}] * td_b[{j}]" for i, j in pairs)
            lines.append(f"{ctx.out(o)} = {total};")
        return lines
    axes = _tensordot_loops(lay)

    def index(which: int) -> str:
        parts = [f"v{t} * {ax[which]}" for t, ax in enumerate(axes) if ax[which]]
        return " + ".join(parts) or "0"

    loops = " ".join(f"for (int v{t} = 0; v{t} < {n}; v{t}++)" for t, (n, *_) in enumerate(axes))
    return lines + [
        f"{T} td_o[{node.dim}];",
        f"for (int k = 0; k < {node.dim}; k++) td_o[k] = ({T})0;",
        f"{loops} td_o[{index(3)}] += td_a[{index(1)}] * td_b[{index(2)}];",
        f"for (int k = 0; k < {node.dim}; k++) {ctx.out('k')} = td_o[k];"]


def _tensordot_simplify(args, params, dim):
    canonical = _tensordot_params(params)
    if canonical != params:
        return make("TensorDot", args, canonical)
    if is_zero(args[0]) or is_zero(args[1]):
        return Const(0, dim)
    return None


def _tensordot_vjp(n: Node, g: Node) -> tuple[Node, Node]:
    # Output axis permute[p] is kept axis p. The cotangent of a contracts g's axes that come
    # from b with b's kept axes; what is left (g's axes from a, in output order, then b's
    # contracted axes, in b's order) is moved back to a's axes. Likewise for b.
    lay = _tensordot_layout(n.params)
    a, b = n.args
    la, lb, nc = len(lay.keepa), len(lay.keepb), len(lay.conta)
    perm = lay.permute
    ga = TensorDot(g, b, lay.outshape, lay.dimsb, [perm[la + q] for q in range(lb)], lay.keepb,
                   [lay.keepa[p] for p in sorted(range(la), key=lambda p: perm[p])]
                   + [lay.conta[k] for k in sorted(range(nc), key=lambda k: lay.contb[k])])
    gb = TensorDot(g, a, lay.outshape, lay.dimsa, [perm[p] for p in range(la)], lay.keepa,
                   [lay.keepb[q] for q in sorted(range(lb), key=lambda q: perm[la + q])]
                   + [lay.contb[k] for k in sorted(range(nc), key=lambda k: lay.conta[k])])
    return ga, gb


_structural("TensorDot", 2, _tensordot_dim, _tensordot_ref, _tensordot_render,
            fold=lambda values, params: (values[0] * values[1]
                                         * math.prod(_tensordot_layout(params).contdims)),
            simplify=_tensordot_simplify,
            doc="TensorDot(a, b, dimsa, dimsb, conta, contb[, permute]): a and b are row-major "
                "tensors of shapes dimsa and dimsb; axes conta of a are contracted with axes "
                "contb of b; the remaining axes (a's, then b's) are output in that order, or "
                "kept axis p at output axis permute[p] (the KeOps convention); row-major output",
            vjp=_tensordot_vjp)


def TensorDot(a: Any, b: Any, dimsa: Any, dimsb: Any, conta: Any, contb: Any,
              permute: Any = None) -> Node:
    """Generic tensor contraction (see ``OPS['TensorDot'].doc``); lists may be any int
    sequences (a lone int is a list of one)."""
    params = (dimsa, dimsb, conta, contb) + (() if permute is None else (permute,))
    return make("TensorDot", (as_node(a), as_node(b)), _tensordot_params(params))


def Kron(a: Any, b: Any, dimsa: Any, dimsb: Any) -> Node:
    """Kronecker product of two row-major tensors of the same rank (np.kron): TensorDot
    without contraction, the axes interleaved."""
    dimsa, dimsb = _int_tuple(dimsa, "Kron: dimsa"), _int_tuple(dimsb, "Kron: dimsb")
    if len(dimsa) != len(dimsb):
        raise ShapeError(f"Kron needs two tensors of the same rank, got shapes {list(dimsa)} "
                         f"and {list(dimsb)}")
    r = len(dimsa)
    return TensorDot(a, b, dimsa, dimsb, (), (),
                     tuple(range(0, 2 * r, 2)) + tuple(range(1, 2 * r, 2)))


# --------------------------------------------------------------------------- B-splines

def _bspline_dim(name, dims, params):
    if len(params) != 1:
        raise ShapeError(f"BSpline takes one integer parameter (the order), got {len(params)}")
    order = params[0]
    if isinstance(order, bool) or not isinstance(order, int):
        raise ShapeError(f"BSpline: the order must be an integer, got {order!r}")
    knots, x = dims
    if x != 1:
        raise ShapeError(f"BSpline is sampled at a scalar (dim 1), got dim {x}")
    if order < 0:
        raise ShapeError(f"BSpline: the order must be >= 0, got {order}")
    if knots < order + 2:
        raise ShapeError(f"BSpline of order {order} needs at least {order + 2} knots, got "
                         f"{knots}")
    return knots - order - 1


def _bspline_ref(xp, p, t, x):
    order, K = p[0], t.shape[-1]
    b = xp.cast((t[..., :-1] <= x) & (x < t[..., 1:]), t)
    for k in range(1, order + 1):
        nb = K - 1 - k
        ti, tik = t[..., :nb], t[..., k:k + nb]
        ti1, tik1 = t[..., 1:1 + nb], t[..., k + 1:k + 1 + nb]
        w1 = xp.where(ti < tik, (x - ti) / xp.where(ti < tik, tik - ti, tik * 0 + 1), ti * 0)
        w2 = xp.where(ti1 < tik1, (x - ti1) / xp.where(ti1 < tik1, tik1 - ti1, tik1 * 0 + 1),
                      ti1 * 0)
        b = w1 * b[..., :nb] + (1 - w2) * b[..., 1:nb + 1]
    return b


def _bspline_render(ctx, node):
    K, order, T = node.args[0].dim, node.params[0], ctx.T
    return [
        f"const {T} bs_x = {ctx.arg(1, 0)}; {T} bs_t[{K}], bs_b[{K - 1}];",
        f"for (int k = 0; k < {K}; k++) bs_t[k] = {ctx.arg(0, 'k')};",
        f"for (int k = 0; k < {K - 1}; k++) "
        f"bs_b[k] = ({T})(bs_t[k] <= bs_x && bs_x < bs_t[k + 1]);",
        f"for (int r = 1; r <= {order}; r++) for (int k = 0; k < {K - 1} - r; k++) {{",
        f"  {T} w1 = bs_t[k] < bs_t[k + r] ? (bs_x - bs_t[k]) / (bs_t[k + r] - bs_t[k]) : ({T})0;",
        f"  {T} w2 = bs_t[k + 1] < bs_t[k + r + 1] ? "
        f"(bs_x - bs_t[k + 1]) / (bs_t[k + r + 1] - bs_t[k + 1]) : ({T})0;",
        f"  bs_b[k] = w1 * bs_b[k] + (({T})1 - w2) * bs_b[k + 1]; }}",
        f"for (int k = 0; k < {node.dim}; k++) {ctx.out('k')} = bs_b[k];"]


def _bspline_vjp(n: Node, g: Node):
    raise ShapeError("BSpline is not differentiable in KeOps either: detach its knots and "
                     "its sampling point (or do not ask for gradients through it)")


_structural("BSpline", 2, _bspline_dim, _bspline_ref, _bspline_render,
            doc="BSpline(knots, x, order): the K - order - 1 B-spline basis functions of "
                "degree `order` with the K (non-decreasing) knots, at the scalar x (Cox-de Boor "
                "recursion; order 0: 1 on [t_k, t_k+1), half-open, so all are 0 at the last "
                "knot). Not differentiable, as in KeOps",
            vjp=_bspline_vjp)


# --------------------------------------------------------------------------- soft-DTW

class _NoGradient(Node):
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


def _softdtw_dim(out_dim: Callable[[int, int], int]):
    def rule(name, dims, params):
        if params:
            raise ShapeError(f"{name} takes no integer parameters, got {list(params)}")
        if dims[2] != 1:
            raise ShapeError(f"{name}: gamma must be a scalar (dim 1), got dim {dims[2]}")
        return out_dim(dims[0], dims[1])

    return rule


def _softdtw_table(xp, x, y, gamma):
    """R[i][j]: the soft-DTW value of x[:i+1] and y[:j+1] (arrays over the leading axes),
    and the cost function."""
    n, m = x.shape[-1], y.shape[-1]
    gam = gamma[..., 0]

    def cost(i, j):
        d = x[..., i] - y[..., j]
        return d * d

    R: list[list[Any]] = [[None] * m for _ in range(n)]
    for i in range(n):
        for j in range(m):
            c = cost(i, j)
            if i == 0 and j == 0:
                R[i][j] = c
            elif i == 0:
                R[i][j] = c + R[0][j - 1]
            elif j == 0:
                R[i][j] = c + R[i - 1][0]
            else:
                a, b, d = R[i - 1][j - 1], R[i - 1][j], R[i][j - 1]
                mn = xp.minimum(xp.minimum(a, b), d)
                R[i][j] = c + mn - gam * xp.log(xp.exp((mn - a) / gam) + xp.exp((mn - b) / gam)
                                                + xp.exp((mn - d) / gam))
    return R, cost


def _softdtw_ref(xp, p, x, y, gamma):
    R, _ = _softdtw_table(xp, x, y, gamma)
    return xp.expand_dims(R[-1][-1], -1)


def _grad_softdtw_ref(xp, p, x, y, gamma):
    n, m = x.shape[-1], y.shape[-1]
    R, cost = _softdtw_table(xp, x, y, gamma)
    gam = gamma[..., 0]
    # E[i][j] = dR[n-1][m-1] / dR[i][j], backwards over the successors of (i, j); a successor
    # on the first row or column has a single predecessor (derivative 1).
    E: list[list[Any]] = [[None] * m for _ in range(n)]
    for i in reversed(range(n)):
        for j in reversed(range(m)):
            if i == n - 1 and j == m - 1:
                E[i][j] = xp.full(tuple(R[i][j].shape), 1, like=R[i][j])
                continue
            e = 0
            if i + 1 < n:
                e = e + E[i + 1][j] * (1 if j == 0 else xp.exp(
                    (R[i + 1][j] - cost(i + 1, j) - R[i][j]) / gam))
            if j + 1 < m:
                e = e + E[i][j + 1] * (1 if i == 0 else xp.exp(
                    (R[i][j + 1] - cost(i, j + 1) - R[i][j]) / gam))
            if i + 1 < n and j + 1 < m:
                e = e + E[i + 1][j + 1] * xp.exp((R[i + 1][j + 1] - cost(i + 1, j + 1)
                                                  - R[i][j]) / gam)
            E[i][j] = e
    gx = [sum(2 * (x[..., i] - y[..., j]) * E[i][j] for j in range(m)) for i in range(n)]
    gy = [sum(-2 * (x[..., i] - y[..., j]) * E[i][j] for i in range(n)) for j in range(m)]
    return xp.concat(_bcast_lead(xp, [xp.expand_dims(v, -1) for v in gx + gy]), -1)


def _softdtw_loads(ctx, n: int, m: int) -> list[str]:
    return [f"{ctx.T} dtw_x[{n}], dtw_y[{m}];",
            f"for (int k = 0; k < {n}; k++) dtw_x[k] = {ctx.arg(0, 'k')};",
            f"for (int k = 0; k < {m}; k++) dtw_y[k] = {ctx.arg(1, 'k')};",
            f"const {ctx.T} dtw_g = {ctx.arg(2, 0)};"]


def _softdtw_render(ctx, node):
    # Column by column: dtw_r[i] holds R[i][j - 1], then R[i][j].
    n, m, T = node.args[0].dim, node.args[1].dim, ctx.T
    return _softdtw_loads(ctx, n, m) + [
        f"{T} dtw_r[{n}], dtw_acc = 0;",
        f"for (int i = 0; i < {n}; i++) {{ {T} d = dtw_x[i] - dtw_y[0]; dtw_acc += d * d; "
        f"dtw_r[i] = dtw_acc; }}",
        f"for (int j = 1; j < {m}; j++) {{",
        f"  {T} d = dtw_x[0] - dtw_y[j]; {T} diag = dtw_r[0]; dtw_r[0] += d * d; "
        f"{T} up = dtw_r[0];",
        f"  for (int i = 1; i < {n}; i++) {{",
        "    d = dtw_x[i] - dtw_y[j];",
        f"    {T} v = d * d + lm_softmin3(diag, up, dtw_r[i], dtw_g);",
        "    diag = dtw_r[i]; dtw_r[i] = v; up = v; } }",
        f"{ctx.out(0)} = dtw_r[{n - 1}];"]


def _grad_softdtw_render(ctx, node):
    n, m, T = node.args[0].dim, node.args[1].dim, ctx.T
    R = lambda i, j: f"dtw_R[({i}) * {m} + ({j})]"  # noqa: E731
    E = lambda i, j: f"dtw_E[({i}) * {m} + ({j})]"  # noqa: E731
    return _softdtw_loads(ctx, n, m) + [
        f"{T} dtw_R[{n * m}], dtw_E[{n * m}], dtw_gx[{n}], dtw_gy[{m}];",
        f"for (int i = 0; i < {n}; i++) for (int j = 0; j < {m}; j++) {{",
        f"  {T} d = dtw_x[i] - dtw_y[j]; d = d * d;",
        f"  {R('i', 'j')} = i == 0 && j == 0 ? d : i == 0 ? d + {R(0, 'j - 1')} : "
        f"j == 0 ? d + {R('i - 1', 0)} : "
        f"d + lm_softmin3({R('i - 1', 'j - 1')}, {R('i - 1', 'j')}, {R('i', 'j - 1')}, dtw_g); }}",
        f"for (int k = 0; k < {n}; k++) dtw_gx[k] = 0;",
        f"for (int k = 0; k < {m}; k++) dtw_gy[k] = 0;",
        f"for (int i = {n - 1}; i >= 0; i--) for (int j = {m - 1}; j >= 0; j--) {{",
        f"  {T} e = i == {n - 1} && j == {m - 1} ? ({T})1 : ({T})0, d;",
        f"  if (i + 1 < {n}) {{ d = dtw_x[i + 1] - dtw_y[j]; e += {E('i + 1', 'j')} * "
        f"(j == 0 ? ({T})1 : lm_exp(({R('i + 1', 'j')} - d * d - {R('i', 'j')}) / dtw_g)); }}",
        f"  if (j + 1 < {m}) {{ d = dtw_x[i] - dtw_y[j + 1]; e += {E('i', 'j + 1')} * "
        f"(i == 0 ? ({T})1 : lm_exp(({R('i', 'j + 1')} - d * d - {R('i', 'j')}) / dtw_g)); }}",
        f"  if (i + 1 < {n} && j + 1 < {m}) {{ d = dtw_x[i + 1] - dtw_y[j + 1]; "
        f"e += {E('i + 1', 'j + 1')} * lm_exp(({R('i + 1', 'j + 1')} - d * d - {R('i', 'j')}) "
        f"/ dtw_g); }}",
        f"  {E('i', 'j')} = e; d = dtw_x[i] - dtw_y[j];",
        "  dtw_gx[i] += 2 * d * e; dtw_gy[j] -= 2 * d * e; }",
        f"for (int k = 0; k < {n}; k++) {ctx.out('k')} = dtw_gx[k];",
        f"for (int k = 0; k < {m}; k++) {ctx.out(f'{n} + k')} = dtw_gy[k];"]


def _softdtw_vjp(n: Node, g: Node):
    x, y, gamma = n.args
    G = make("GradSoftDTW_SqDist", (x, y, gamma))
    return (Extract(G, 0, x.dim) * g, Extract(G, x.dim, y.dim) * g,
            _NoGradient("SoftDTW_SqDist is not differentiable with respect to gamma (KeOps has "
                        "no such gradient either): keep gamma constant or detach it"))


def _grad_softdtw_vjp(n: Node, g: Node):
    raise ShapeError("second derivatives of SoftDTW_SqDist are not implemented (KeOps has "
                     "none either): GradSoftDTW_SqDist is not differentiable")


_structural("SoftDTW_SqDist", 3, _softdtw_dim(lambda n, m: 1), _softdtw_ref, _softdtw_render,
            doc="SoftDTW_SqDist(x, y, gamma): soft-DTW discrepancy between the series x (length "
                "x.dim) and y (length y.dim) with the cost (x_i - y_j)^2 and the smoothing "
                "gamma > 0 (a scalar): R[0][0] = 0, R[i][0] = R[0][j] = inf, R[i][j] = "
                "cost(i, j) + softmin_gamma(R[i-1][j-1], R[i-1][j], R[i][j-1]), value R[n][m] "
                "(dim 1). Differentiable in x and y (through GradSoftDTW_SqDist, once), not in "
                "gamma (an error if gamma depends on the differentiated variable, as in KeOps)",
            vjp=_softdtw_vjp)
_structural("GradSoftDTW_SqDist", 3, _softdtw_dim(lambda n, m: n + m), _grad_softdtw_ref,
            _grad_softdtw_render,
            doc="GradSoftDTW_SqDist(x, y, gamma): the gradient of SoftDTW_SqDist(x, y, gamma) "
                "with respect to x, then y (dim x.dim + y.dim); not differentiable",
            vjp=_grad_softdtw_vjp)


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


def Factorize(f: Node, g: Node) -> Node:
    """KeOps' Factorize(f, g): compute g once inside f. Formulas are hash-consed, so every
    repeated sub-formula is already one node, computed once by every backend: f itself."""
    return f


MACROS: dict[str, Callable[..., Node]] = {
    "SqNorm2": SqNorm2, "Scalprod": Scalprod, "SqDist": SqDist, "Norm2": Norm2,
    "Normalize": Normalize, "SqNormIso": SqNormIso, "SqNormDiag": SqNormDiag,
    "SymSqNorm": SymSqNorm, "WeightedSqNorm": WeightedSqNorm, "WeightedSqDist": WeightedSqDist,
    "Elem": Elem, "Extract": Extract, "OneHot": OneHot, "Pow": Pow, "IntInv": IntInv,
    "TensorDot": TensorDot, "Kron": Kron, "Factorize": Factorize,
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
