"""Elementwise ops: component k of the result depends on component k of each argument.

Each op is one :func:`~lazymat.formula.node.register` call holding its reference
evaluation (numpy and torch), its C template and the C helper it needs, its
integer parameter slots, its folding, simplification and VJP.

>>> from lazymat.formula import Var, apply
>>> apply("Tanh", Var(0, 3, 0)).dim
3
"""

from __future__ import annotations

import math
from fractions import Fraction

from ...errors import ShapeError
from ..node import Const, Node, existing, is_one, is_zero, make, register, register_macro
from .base import by_lib, call, exact_fold, float_fold, no_gradient, with_dim

__all__ = ["Pow", "IntInv"]


def _cast_bool(xp, cond, like):
    return xp.cast(cond, like)


def _safe_nonzero(xp, a):
    """``a`` with its zeros replaced by ones (for x / x-style ops defined apart at 0)."""
    return xp.where(a == 0, a * 0 + 1, a)


def _libm(lm: str, name: str, args: int = 1) -> str:
    """The C helper ``lm(x)`` calling the libm function ``name``, for float and double."""
    names = ", ".join("xyz"[:args])
    return "\n".join(f"LM_INLINE {T} {lm}({', '.join(f'{T} {v}' for v in names.split(', '))}) "
                     f"{{ return {spell}({name})({names}); }}"
                     for T, spell in (("float", "LM_F"), ("double", "LM_D")))


# --------------------------------------------------------------------------- simplifications

def _simplify_add(args, params, dim):
    a, b = args
    if is_zero(b):
        return with_dim(a, dim)
    if is_zero(a):
        return with_dim(b, dim)
    return None


def _simplify_sub(args, params, dim):
    a, b = args
    if is_zero(b):
        return with_dim(a, dim)
    if is_zero(a) and b.dim == dim:
        return make("Minus", (b,))
    return None


def _scale(n: Node) -> bool:
    """An exact scalar constant (a factor that may move through a product exactly)."""
    return n.is_const and n.dim == 1 and isinstance(n.value, Fraction)


def _simplify_mult(args, params, dim):
    a, b = args
    if is_zero(a) or is_zero(b):
        return Const(0, dim)
    if is_one(a):
        return with_dim(b, dim)
    if is_one(b):
        return with_dim(a, dim)
    # Exact scalar factors gather in front, where they combine (gradients are full of
    # (x * 1/2) * 2 and -(c * x)): c1 * (c2 * x) = (c1 c2) * x, x * c = c * x,
    # c * -x = (-c) * x, (c * x) * y = c * (x * y).
    if _scale(b) and not a.is_const:
        return make("Mult", (b, a))
    if _scale(a) and not b.is_const and b.dim == dim:
        if b.op == "Mult" and _scale(b.args[0]):
            return with_dim(make("Mult", (Const(a.value * b.args[0].value), b.args[1])), dim)
        if b.op == "Minus":
            return make("Mult", (Const(-a.value), b.args[0]))
    for first, second in ((a, b), (b, a)):
        if first.op == "Mult" and _scale(first.args[0]) and not second.is_const:
            return make("Mult", (first.args[0], make("Mult", (first.args[1], second))))
    # a * b built before as b * a: the same node (one temporary in the kernel)
    swapped = existing("Mult", (b, a))
    if swapped is not None:
        return swapped
    return None


def _simplify_div(args, params, dim):
    a, b = args
    if is_one(b):
        return with_dim(a, dim)
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
    if a.op == "Mult" and _scale(a.args[0]):  # -(c * x) = (-c) * x
        return make("Mult", (Const(-a.args[0].value), a.args[1]))
    return None


# --------------------------------------------------------------------------- arithmetic

register("Add", 2, lambda xp, p, a, b: a + b, c="({0} + {1})",
         fold=exact_fold(lambda a, b: a + b), simplify=_simplify_add, doc="a + b",
         vjp=lambda n, g: (g, g))
register("Subtract", 2, lambda xp, p, a, b: a - b, c="({0} - {1})",
         fold=exact_fold(lambda a, b: a - b), simplify=_simplify_sub, doc="a - b",
         vjp=lambda n, g: (g, -g))
register("Mult", 2, lambda xp, p, a, b: a * b, c="({0} * {1})",
         fold=exact_fold(lambda a, b: a * b), simplify=_simplify_mult, doc="a * b",
         vjp=lambda n, g: (g * n.args[1], g * n.args[0]))
register("Divide", 2, lambda xp, p, a, b: a / b, c="({0} / {1})",
         fold=exact_fold(lambda a, b: a / b), simplify=_simplify_div, doc="a / b",
         vjp=lambda n, g: (g / n.args[1], -(g * n) / n.args[1]))
register("Minus", 1, lambda xp, p, a: -a, c="(-{0})", fold=exact_fold(lambda a: -a),
         simplify=_simplify_minus, doc="-a", vjp=lambda n, g: (-g,), complex_result=True)

# --------------------------------------------------------------------------- exp and log

# Our own exp on the CPU: range reduction by ln 2 (two constants), a polynomial, and the
# exponent set by integer addition; it vectorizes, has no slow path for large negative
# arguments, and gives 0 below the smallest normal number. A target that defines
# LM_NATIVE_EXP (CUDA: a few instructions around the hardware exp2) uses its own.
_EXP_HELPER = """LM_INLINE float lm_exp(float x) {
#ifdef LM_NATIVE_EXP
  return LM_F(exp)(x);
#else
  float xc = x < -87.5f ? -87.5f : (x > 88.75f ? 88.75f : x);
  float n = LM_BF(rint)(xc * 1.44269504088896341f);
  float r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  int bits = LM_AS_INT(p) + (int)((unsigned)(int)n << 23);
  float y = LM_AS_FLOAT(bits);
  y = x < -87.33654f ? 0.0f : y;
  y = x > 88.72283f ? LM_INF_F : y;
  return x != x ? x : y;
#endif
}

LM_INLINE double lm_exp(double x) {
#ifdef LM_NATIVE_EXP
  return LM_D(exp)(x);
#else
  const double c[14] = {TAYLOR};
  double xc = x < -708.0 ? -708.0 : (x > 709.7 ? 709.7 : x);
  double n = LM_BD(rint)(xc * 1.4426950408889634);
  double r = xc - n * 6.93147180369123816490e-01;
  r = r - n * 1.90821492927058770002e-10;
  double p = c[0];
  for (int q = 1; q < 14; q++) p = p * r + c[q];
  long long bits = LM_AS_I64(p) + (long long)((unsigned long long)(long long)n << 52);
  double y = LM_AS_DOUBLE(bits);
  y = x < -708.0 ? 0.0 : y;
  y = x > 709.78 ? LM_INF_D : y;
  return x != x ? x : y;
#endif
}""".replace("TAYLOR", ", ".join(repr(1.0 / math.factorial(n)) for n in range(13, -1, -1)))

register("Exp", 1, lambda xp, p, a: xp.module.exp(a), c="lm_exp({0})",
         c_helper=_EXP_HELPER, fold=float_fold(math.exp), doc="exp(a)",
         vjp=lambda n, g: (g * n,))
register("Log", 1, lambda xp, p, a: xp.module.log(a), c="lm_log({0})",
         c_helper=_libm("lm_log", "log"), libm=(("log", 1),), fold=float_fold(math.log),
         doc="natural log", vjp=lambda n, g: (g / n.args[0],))
register("Sqrt", 1, lambda xp, p, a: xp.module.sqrt(a), c="lm_sqrt({0})",
         c_helper="LM_INLINE float lm_sqrt(float x) { return LM_BF(sqrt)(x); }\n"
                  "LM_INLINE double lm_sqrt(double x) { return LM_BD(sqrt)(x); }",
         fold=float_fold(math.sqrt), doc="square root",
         # Rsqrt(0) = 0: a finite subgradient at 0 instead of inf * 0 = NaN.
         vjp=lambda n, g: (g * call("Rsqrt", n.args[0]) * Fraction(1, 2),))
register("Rsqrt", 1,
         lambda xp, p, a: xp.where(a == 0, a * 0,
                                   1 / xp.module.sqrt(xp.where(a == 0, a * 0 + 1, a))),
         c="lm_rsqrt({0})",
         c_helper="LM_INLINE float lm_rsqrt(float x) "
                  "{ return x == 0.0f ? 0.0f : 1.0f / LM_BF(sqrt)(x); }\n"
                  "LM_INLINE double lm_rsqrt(double x) "
                  "{ return x == 0.0 ? 0.0 : 1.0 / LM_BD(sqrt)(x); }",
         fold=float_fold(lambda a: 0.0 if a == 0 else 1 / math.sqrt(a)),
         doc="1/sqrt(a), 0 at a = 0", vjp=lambda n, g: (g * n * n * n * Fraction(-1, 2),))
register("Inv", 1, lambda xp, p, a: 1 / a, c="(({T})1 / {0})", fold=exact_fold(lambda a: 1 / a),
         doc="1/a", vjp=lambda n, g: (-(g * n * n),))
register("Square", 1, lambda xp, p, a: a * a, c="({0} * {0})",
         fold=exact_fold(lambda a: a * a), doc="a*a", vjp=lambda n, g: (g * n.args[0] * 2,))
register("Abs", 1, lambda xp, p, a: xp.module.abs(a), c="lm_abs({0})",
         c_helper="LM_INLINE float lm_abs(float x) { return LM_BF(fabs)(x); }\n"
                  "LM_INLINE double lm_abs(double x) { return LM_BD(fabs)(x); }",
         fold=exact_fold(abs), doc="|a|", vjp=lambda n, g: (g * call("Sign", n.args[0]),))
register("Sign", 1, lambda xp, p, a: xp.module.sign(a),
         c="({0} != {0} ? {0} : ({T})({0} > 0) - ({T})({0} < 0))",  # NaN stays NaN
         fold=exact_fold(lambda a: (a > 0) - (a < 0)), doc="-1, 0 or 1", vjp=no_gradient)
register("Step", 1, lambda xp, p, a: _cast_bool(xp, a >= 0, a), c="(({T})({0} >= 0))",
         fold=exact_fold(lambda a: int(a >= 0)), doc="1 where a >= 0 else 0", vjp=no_gradient)
register("ReLU", 1, lambda xp, p, a: xp.where(a > 0, a, a * 0),
         c="({0} > 0 || {0} != {0} ? {0} : ({T})0)",  # NaN stays NaN, as in numpy
         fold=exact_fold(lambda a: max(a, 0)), doc="max(a, 0)",
         vjp=lambda n, g: (g * call("LessThan", 0, n.args[0]),))
register("Sin", 1, lambda xp, p, a: xp.module.sin(a), c="lm_sin({0})",
         c_helper=_libm("lm_sin", "sin"), libm=(("sin", 1),), fold=float_fold(math.sin),
         doc="sin(a), a in radians (the C library's, vectorized where it has one)", vjp=lambda n, g: (g * call("Cos", n.args[0]),))
register("Cos", 1, lambda xp, p, a: xp.module.cos(a), c="lm_cos({0})",
         c_helper=_libm("lm_cos", "cos"), libm=(("cos", 1),), fold=float_fold(math.cos),
         doc="cos(a), a in radians (the C library's, vectorized where it has one)", vjp=lambda n, g: (-(g * call("Sin", n.args[0])),))
register("Powf", 2, lambda xp, p, a, b: a ** b, c="lm_pow({0}, {1})",
         c_helper=_libm("lm_pow", "pow", 2), libm=(("pow", 2),), fold=float_fold(math.pow),
         doc="a**b with a real exponent",
         vjp=lambda n, g: (g * n.args[1] * call("Powf", n.args[0], n.args[1] - 1),
                           g * n * call("Log", n.args[0])))

_CLAMP_HELPER = """template <typename F> LM_INLINE F lm_clamp(F x, F lo, F hi) {
  x = x < lo ? lo : x; return x > hi ? hi : x;
}"""


def _clamp_vjp(g: Node, a: Node, lo: Node, hi: Node) -> tuple[Node, Node, Node]:
    # min(max(a, lo), hi): correct even for lo > hi, where the output is hi everywhere.
    lo_ok = call("LessOrEqual", lo, hi)
    return (g * call("LessOrEqual", lo, a) * call("LessOrEqual", a, hi),
            g * call("LessThan", a, lo) * lo_ok,
            g * (1 - call("LessOrEqual", a, hi) * lo_ok))


register("Clamp", 3, lambda xp, p, a, lo, hi: xp.minimum(xp.maximum(a, lo), hi),
         c="lm_clamp({0}, {1}, {2})", c_helper=_CLAMP_HELPER,
         fold=exact_fold(lambda a, lo, hi: min(max(a, lo), hi)), doc="min(max(a, lo), hi)",
         vjp=lambda n, g: _clamp_vjp(g, *n.args))
register("IfElse", 3, lambda xp, p, c, a, b: xp.where(c >= 0, a, b), c="({0} >= 0 ? {1} : {2})",
         fold=exact_fold(lambda c, a, b: a if c >= 0 else b), doc="a where c >= 0 else b",
         vjp=lambda n, g: (None, g * call("Step", n.args[0]),
                           g * (1 - call("Step", n.args[0]))))
for _name, _sym, _py in (("LessThan", "<", lambda a, b: a < b),
                         ("LessOrEqual", "<=", lambda a, b: a <= b),
                         ("Equal", "==", lambda a, b: a == b),
                         ("NotEqual", "!=", lambda a, b: a != b)):
    register(_name, 2, (lambda op: lambda xp, p, a, b: _cast_bool(xp, op(a, b), a + b))(_py),
             c="(({T})({0} %s {1}))" % _sym,
             fold=(lambda op: exact_fold(lambda a, b: int(op(a, b))))(_py),
             doc=f"1 where a {_sym} b else 0", vjp=no_gradient)


# --------------------------------------------------------------------------- integer powers

def _pow_ref(xp, p, a):
    return a ** p[0] if p[0] >= 0 else 1 / a ** (-p[0])


register("Pow", 1, _pow_ref, c="lm_powi({0}, {p0})",
         c_helper="""template <typename F> LM_INLINE F lm_powi(F x, long long n) {
  F base = n < 0 ? (F)1 / x : x; F r = 1;
  unsigned long long e = n < 0 ? 0ULL - (unsigned long long)n : (unsigned long long)n;
  while (e) { if (e & 1) r *= base; base *= base; e >>= 1; }
  return r;
}""",
         int_params=(1,),
         fold=exact_fold(lambda a, n: Fraction(a) ** n if isinstance(a, Fraction)
                         else float(a) ** n),
         doc="a**n for an integer n",
         vjp=lambda n, g: (g * n.params[0] * Pow(n.args[0], n.params[0] - 1),))


def Pow(f: Node, n: int) -> Node:
    """f**n for an integer n (Square for 2, f for 1, ones for 0)."""
    n = int(n)
    if n == 0:
        return Const(1, f.dim)
    if n == 2:
        return make("Square", (f,))
    if n == 1:
        return f
    return make("Pow", (f,), (n,))


def IntInv(n: int) -> Node:
    """The exact constant 1/n."""
    return Const(Fraction(1, int(n)))


register_macro("Pow", Pow, int_params=(1,))
register_macro("IntInv", IntInv, int_params=(0,))

# --------------------------------------------------------------------------- KeOps' math ops

register("Acos", 1, lambda xp, p, a: xp.module.arccos(a), c="lm_acos({0})",
         c_helper=_libm("lm_acos", "acos"), libm=(("acos", 1),), fold=float_fold(math.acos),
         doc="arccos(a)",
         vjp=lambda n, g: (-(g * call("Rsqrt", 1 - call("Square", n.args[0]))),))
register("Asin", 1, lambda xp, p, a: xp.module.arcsin(a), c="lm_asin({0})",
         c_helper=_libm("lm_asin", "asin"), libm=(("asin", 1),), fold=float_fold(math.asin),
         doc="arcsin(a)",
         vjp=lambda n, g: (g * call("Rsqrt", 1 - call("Square", n.args[0])),))
register("Atan", 1, lambda xp, p, a: xp.module.arctan(a), c="lm_atan({0})",
         c_helper=_libm("lm_atan", "atan"), libm=(("atan", 1),), fold=float_fold(math.atan),
         doc="arctan(a)", vjp=lambda n, g: (g / (1 + call("Square", n.args[0])),))


def _atan2_vjp(g: Node, a: Node, b: Node) -> tuple[Node, Node]:
    r2 = call("Square", a) + call("Square", b)
    return (g * b / r2, -(g * a) / r2)


register("Atan2", 2, lambda xp, p, a, b: xp.module.arctan2(a, b), c="lm_atan2({0}, {1})",
         c_helper=_libm("lm_atan2", "atan2", 2), libm=(("atan2", 2),),
         fold=float_fold(math.atan2), doc="atan2(a, b): the angle of the point (b, a)",
         vjp=lambda n, g: _atan2_vjp(g, *n.args))
register("Floor", 1, lambda xp, p, a: xp.module.floor(a), c="lm_floor({0})",
         c_helper="LM_INLINE float lm_floor(float x) { return LM_BF(floor)(x); }\n"
                  "LM_INLINE double lm_floor(double x) { return LM_BD(floor)(x); }",
         fold=exact_fold(math.floor), doc="floor(a)", vjp=no_gradient)
register("Mod", 3, lambda xp, p, a, n, d: a - n * xp.module.floor((a - d) / n),
         c="lm_mod({0}, {1}, {2})",
         c_helper="template <typename F> LM_INLINE F lm_mod(F x, F n, F d) "
                  "{ return x - n * lm_floor((x - d) / n); }",
         fold=exact_fold(lambda a, n, d: a - n * math.floor((a - d) / n)),
         doc="a - n floor((a - d) / n): a modulo n, in [d, d + n)",
         vjp=lambda n, g: (g, -(g * call("Floor", (n.args[0] - n.args[2]) / n.args[1])), None))
register("XLogX", 1,
         lambda xp, p, a: xp.where(a == 0, a * 0, a * xp.module.log(_safe_nonzero(xp, a))),
         c="lm_xlogx({0})",
         c_helper="template <typename F> LM_INLINE F lm_xlogx(F x) "
                  "{ return x == (F)0 ? (F)0 : x * lm_log(x); }",
         fold=exact_fold(lambda a: 0 if a == 0 else float(a) * math.log(a)),
         doc="a log(a), 0 at a = 0", vjp=lambda n, g: (g * (call("Log", n.args[0]) + 1),))


def _sinxdivx_derivative(a: Node) -> Node:
    # (cos a - sin(a)/a) / a, 0 at a = 0: the divisor is a + [a == 0] (1 at 0, where the
    # numerator is 0), so no 0/0 appears, at any order.
    return (call("Cos", a) - call("SinXDivX", a)) / (a + call("Equal", a, 0))


register("SinXDivX", 1,
         lambda xp, p, a: xp.where(a == 0, a * 0 + 1,
                                   xp.module.sin(_safe_nonzero(xp, a)) / _safe_nonzero(xp, a)),
         c="lm_sinxdivx({0})",
         c_helper="template <typename F> LM_INLINE F lm_sinxdivx(F x) "
                  "{ return x == (F)0 ? (F)1 : lm_sin(x) / x; }",
         fold=exact_fold(lambda a: 1 if a == 0 else math.sin(a) / float(a)),
         doc="sin(a)/a, 1 at a = 0", vjp=lambda n, g: (g * _sinxdivx_derivative(n.args[0]),))


# --------------------------------------------------------------------------- integer parameters

def _round_ref(xp, p, a):
    s = 10.0 ** abs(p[0])
    rint = xp.module.round if xp.name == "torch" else xp.module.rint  # both: ties to even
    return rint(a / s) * s if p[0] < 0 else rint(a * s) / s


def _round_fold(a, d):
    if isinstance(a, Fraction):
        return round(a, d)  # exact (half to even, as rint)
    s = 10.0 ** abs(d)
    return round(a / s) * s if d < 0 else round(a * s) / s


register("Round", 1, _round_ref, c="lm_round_dec({0}, {p0})",
         c_helper="""LM_INLINE float lm_round(float x) { return LM_BF(rint)(x); }
LM_INLINE double lm_round(double x) { return LM_BD(rint)(x); }
template <typename F> LM_INLINE F lm_round_dec(F x, long long d) {
  if (d > 400) return x;  // more decimals than any F holds (10**d would overflow)
  if (d < -400) return lm_round(x * (F)0);  // 0 with x's sign, NaN for NaN/inf
  F s = lm_powi((F)10, d < 0 ? -d : d);
  return d < 0 ? lm_round(x / s) * s : lm_round(x * s) / s;
}""",
         int_params=(1,), fold=exact_fold(_round_fold),
         doc="a rounded to d decimals (d an integer, may be negative; ties to even)",
         vjp=no_gradient)
register("ClampInt", 1, lambda xp, p, a: xp.module.clip(a, p[0], p[1]),
         c="lm_clamp({0}, ({T}){p0}, ({T}){p1})", int_params=(1, 2),
         fold=exact_fold(lambda a, lo, hi: min(max(a, lo), hi)),
         doc="min(max(a, lo), hi) for integers lo and hi",
         vjp=lambda n, g: (g * call("DiffClampInt", n.args[0], params=n.params),))
register("DiffClampInt", 1, lambda xp, p, a: _cast_bool(xp, (a >= p[0]) & (a <= p[1]), a),
         c="(({T})({0} >= ({T}){p0} && {0} <= ({T}){p1}))", int_params=(1, 2),
         fold=exact_fold(lambda a, lo, hi: int(lo <= a <= hi)),
         doc="1 where lo <= a <= hi else 0 (the derivative of ClampInt)", vjp=no_gradient)


def _sumt_dim(name, dims, params):
    if dims[0] != 1:
        raise ShapeError(f"SumT needs a scalar (dim 1) formula, got dim {dims[0]}")
    if params[0] < 1:
        raise ShapeError(f"SumT needs a dim >= 1, got {params[0]}")
    return params[0]


# SumT is elementwise (component k of the output is the operand's only component), so it
# is inlined in C, and the autodiff engine sums its cotangent: the VJP of SumT is Sum.
register("SumT", 1, lambda xp, p, a: xp.concat([a] * p[0], -1), dims=_sumt_dim, c="{0}",
         int_params=(1,), fold=lambda values, params: values[0],
         simplify=lambda args, params, dim: args[0] if dim == 1 else None,
         doc="the scalar a repeated d times (the adjoint of Sum)", vjp=lambda n, g: (g,))


# --------------------------------------------------------------------------- activations and
# special functions: libm (vector versions from libmvec where it has them) or our lm_exp

register("Sinh", 1, lambda xp, p, a: xp.module.sinh(a), c="lm_sinh({0})",
         c_helper=_libm("lm_sinh", "sinh"), libm=(("sinh", 1),), fold=float_fold(math.sinh),
         method="sinh", doc="sinh(a)", vjp=lambda n, g: (g * call("Cosh", n.args[0]),))
register("Cosh", 1, lambda xp, p, a: xp.module.cosh(a), c="lm_cosh({0})",
         c_helper=_libm("lm_cosh", "cosh"), libm=(("cosh", 1),), fold=float_fold(math.cosh),
         method="cosh", doc="cosh(a)", vjp=lambda n, g: (g * call("Sinh", n.args[0]),))
register("Tanh", 1, lambda xp, p, a: xp.module.tanh(a), c="lm_tanh({0})",
         c_helper=_libm("lm_tanh", "tanh"), libm=(("tanh", 1),), fold=float_fold(math.tanh),
         method="tanh", doc="tanh(a)",
         # 1 / cosh² rather than 1 - tanh²: accurate in the tails too (cosh = inf gives 0).
         vjp=lambda n, g: (g * call("Square", call("Inv", call("Cosh", n.args[0]))),))
register("Expm1", 1, lambda xp, p, a: xp.module.expm1(a), c="lm_expm1({0})",
         c_helper=_libm("lm_expm1", "expm1"), libm=(("expm1", 1),),
         fold=float_fold(math.expm1), method="expm1", doc="exp(a) - 1, accurate near 0",
         vjp=lambda n, g: (g * call("Exp", n.args[0]),))
register("Log1p", 1, lambda xp, p, a: xp.module.log1p(a), c="lm_log1p({0})",
         c_helper=_libm("lm_log1p", "log1p"), libm=(("log1p", 1),),
         fold=float_fold(math.log1p), method="log1p", doc="log(1 + a), accurate near 0",
         vjp=lambda n, g: (g / (1 + n.args[0]),))


def _sigmoid_ref(m, a):
    e = m.exp(-m.abs(a))  # never overflows: e <= 1
    s = 1 / (1 + e)
    return m.where(a >= 0, s, e * s)


def _sigmoid_fold(a):
    e = math.exp(-abs(a))
    return 1 / (1 + e) if a >= 0 else e / (1 + e)


register("Sigmoid", 1, by_lib(numpy=_sigmoid_ref, torch=lambda m, a: m.sigmoid(a)),
         c="lm_sigmoid({0})",
         c_helper="""template <typename F> LM_INLINE F lm_sigmoid(F x) {
  F e = lm_exp(-lm_abs(x)), s = (F)1 / ((F)1 + e);
  return x >= (F)0 ? s : e * s;
}""",
         fold=float_fold(_sigmoid_fold), method="sigmoid",
         doc="1 / (1 + exp(-a)), from exp(-|a|): accurate in both tails",
         # σ(a) σ(-a), not σ(1 - σ): accurate in both tails.
         vjp=lambda n, g: (g * n * call("Sigmoid", -n.args[0]),))


def _softplus_ref(xp, p, a):
    m = xp.module
    return xp.where(a > 0, a, 0) + m.log1p(m.exp(-m.abs(a)))


register("Softplus", 1, _softplus_ref, c="lm_softplus({0})",
         c_helper="""template <typename F> LM_INLINE F lm_softplus(F x) {
  return (x > (F)0 ? x : (F)0) + lm_log1p(lm_exp(-lm_abs(x)));
}""",
         fold=float_fold(lambda a: max(a, 0.0) + math.log1p(math.exp(-abs(a)))),
         method="softplus",
         doc="log(1 + exp(a)) as max(a, 0) + log1p(exp(-|a|)): no overflow for large a, "
             "accurate for very negative a",
         vjp=lambda n, g: (g * call("Sigmoid", n.args[0]),))


def _numpy_erf(m, a):
    try:
        from scipy.special import erf
    except ImportError:  # scipy is optional: math.erf per element (the reference only)
        return m.frompyfunc(math.erf, 1, 1)(a).astype(a.dtype)
    return erf(a)


register("Erf", 1, by_lib(numpy=_numpy_erf, torch=lambda m, a: m.erf(a)), c="lm_erf({0})",
         c_helper=_libm("lm_erf", "erf"), libm=(("erf", 1),), fold=float_fold(math.erf),
         method="erf", doc="the error function 2/√π ∫_0^a exp(-t²) dt",
         vjp=lambda n, g: (g * (2 / math.sqrt(math.pi)) * call("Exp", -call("Square",
                                                                            n.args[0])),))
