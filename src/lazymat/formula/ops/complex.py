"""Complex ops, each defined once (like the real ones), on interleaved (re, im) pairs.

A complex formula of D components is a real formula of dim 2D holding
``re_0, im_0, re_1, im_1, ...``, as in KeOps; a complex scalar (dim 2)
broadcasts against a complex vector. The VJPs use the real-pair convention:
the cotangent of a holomorphic f(a) is g·conj(f'(a)).

>>> from lazymat.formula import Var
>>> z = Var(0, 4, 0)                    # 2 complex components
>>> apply("ComplexAbs", z).dim
2
"""

from __future__ import annotations

from ...errors import ShapeError
from ..node import Const, Node, apply, register, register_macro
from .base import call


def _pairs(a):
    return a.reshape(tuple(a.shape[:-1]) + (a.shape[-1] // 2, 2))


def _join(xp, re, im):
    """Interleave real and imaginary parts of the same shape into (..., 2D)."""
    out = xp.concat([xp.expand_dims(re, -1), xp.expand_dims(im, -1)], -1)
    return out.reshape(tuple(out.shape[:-2]) + (out.shape[-2] * 2,))


def _parts(a):
    p = _pairs(a)
    return p[..., 0], p[..., 1]


def _even(name: str, d: int) -> int:
    if d % 2:
        raise ShapeError(f"{name} needs a complex operand (an even dim: interleaved re, im), "
                         f"got dim {d}")
    return d // 2


def _complex_binary_dim(name, dims, params):
    da, db = (_even(name, d) for d in dims)
    if da != db and 1 not in (da, db):
        raise ShapeError(f"{name}: complex dims {da} and {db} do not broadcast")
    return 2 * max(da, db)


def _unary_dim(factor_in, factor_out):
    def rule(name, dims, params):
        d = dims[0]
        if factor_in == 2:
            d = _even(name, d)
        return d * factor_out
    return rule


def _component(ctx, i, k, part):
    """C expression of the real (part 0) or imaginary (part 1) part of complex component k of
    argument i, broadcasting a complex scalar."""
    scalar = ctx.node.args[i].dim == 2
    return ctx.arg(i, str(part) if scalar else f"2 * {k} + {part}")


def _binary_render(body):
    def render(ctx, node):
        T, D = ctx.T, node.dim // 2
        return [f"for (int k = 0; k < {D}; k++) {{ "
                f"{T} ar = {_component(ctx, 0, 'k', 0)}, ai = {_component(ctx, 0, 'k', 1)}, "
                f"br = {_component(ctx, 1, 'k', 0)}, bi = {_component(ctx, 1, 'k', 1)}; "
                f"{body(T)} {ctx.out('2 * k')} = re; {ctx.out('2 * k + 1')} = im; }}"]
    return render


def _summed_if_scalar(arg: Node, c: Node) -> Node:
    """The cotangent of a complex scalar that was broadcast: summed over components."""
    return call("ComplexSum", c) if arg.dim == 2 and c.dim > 2 else c


# --------------------------------------------------------------------------- products


def _mult_ref(xp, p, a, b):
    (ar, ai), (br, bi) = _parts(a), _parts(b)
    return _join(xp, ar * br - ai * bi, ar * bi + ai * br)


register("ComplexMult", 2, _mult_ref, dims=_complex_binary_dim,
         render=_binary_render(lambda T: f"{T} re = ar * br - ai * bi, im = ar * bi + ai * br;"),
         doc="complex product (a complex scalar broadcasts)",
         vjp=lambda n, g: (
             _summed_if_scalar(n.args[0], call("ComplexMult", g, call("Conj", n.args[1]))),
             _summed_if_scalar(n.args[1], call("ComplexMult", g, call("Conj", n.args[0])))))


def _div_ref(xp, p, a, b):
    (ar, ai), (br, bi) = _parts(a), _parts(b)
    den = br * br + bi * bi
    return _join(xp, (ar * br + ai * bi) / den, (ai * br - ar * bi) / den)


register("ComplexDivide", 2, _div_ref, dims=_complex_binary_dim,
         render=_binary_render(lambda T: f"{T} den = br * br + bi * bi, "
                                         f"re = (ar * br + ai * bi) / den, "
                                         f"im = (ai * br - ar * bi) / den;"),
         doc="complex quotient a / b",
         vjp=lambda n, g: (
             _summed_if_scalar(n.args[0], call("ComplexDivide", g, call("Conj", n.args[1]))),
             _summed_if_scalar(n.args[1], -call("ComplexMult", g, call(
                 "Conj", call("ComplexDivide", n, n.args[1]))))))


def _realscal_dim(name, dims, params):
    df, da = dims[0], _even(name, dims[1])
    if df not in (1, da):
        raise ShapeError(f"{name}: the real factor has dim {df}, the complex operand {da} "
                         f"components")
    return 2 * da


def _realscal_ref(xp, p, f, a):
    ar, ai = _parts(a)
    return _join(xp, f * ar, f * ai)


register("ComplexRealScal", 2, _realscal_ref, dims=_realscal_dim, render=lambda ctx, node: [
                f"for (int k = 0; k < {node.dim // 2}; k++) {{ {ctx.T} f = {ctx.arg(0, 'k')}; "
                f"{ctx.out('2 * k')} = f * {ctx.arg(1, '2 * k')}; "
                f"{ctx.out('2 * k + 1')} = f * {ctx.arg(1, '2 * k + 1')}; }}"],
         doc="real factor (dim 1 or D) times complex vector", vjp=lambda n, g: (
         _sum_if(n.args[0], call("ComplexReal", call("ComplexMult", g, call("Conj", n.args[1])))),
         call("ComplexRealScal", n.args[0], g)))


def _sum_if(arg: Node, c: Node) -> Node:
    return call("Sum", c) if arg.dim == 1 and c.dim > 1 else c


# --------------------------------------------------------------------------- unary


def _exp_ref(xp, p, a):
    ar, ai = _parts(a)
    e = xp.exp(ar)
    return _join(xp, e * xp.module.cos(ai), e * xp.module.sin(ai))


# sin and cos at once for float32 data: the angle is reduced modulo π/2 in double (three-part
# Cody-Waite: exact to ~1e-16 far beyond |t| = 10⁶, where float's own rounding is ≥ 0.06),
# then two float minimax polynomials on [-π/4, π/4] (cephes' sinf/cosf: ≤ 1 ulp) and the
# quadrant's swap and signs by selects: no branch, no table, it vectorizes (libmvec's sinf and
# cosf are two calls, each reducing the angle again). A double argument lets the caller pass
# an exact phase (the product of two floats is exact in double). Double data keeps libm.
_SINCOS_HELPER = """LM_INLINE void lm_sincosf(double t, float& s, float& c) {
#ifdef LM_NATIVE_EXP
  s = LM_F(sin)((float)t); c = LM_F(cos)((float)t);
#else
  double n = LM_BD(rint)(t * 0.63661977236758134308);
  n = (n == n && n < 4.0e15 && n > -4.0e15) ? n : 0.0;
  double rd = t - n * 1.57079632673412561417;
  rd = rd - n * 6.07710050650619224932e-11;
  rd = rd - n * 2.02226624879595063154e-21;
  const float r = (float)rd, r2 = r * r;
  const float sp = r + r * r2 * (-1.6666654611e-1f + r2 * (8.3321608736e-3f
                                                        + r2 * -1.9515295891e-4f));
  const float cp = 1.0f - 0.5f * r2 + r2 * r2 * (4.166664568298827e-2f + r2 * (
      -1.388731625493765e-3f + r2 * 2.443315711809948e-5f));
  const long long q = (long long)n;
  const float s1 = (q & 1) ? cp : sp, c1 = (q & 1) ? sp : cp;
  s = (q & 2) ? -s1 : s1;
  c = ((q + 1) & 2) ? -c1 : c1;
  s = t == t ? s : (float)t; c = t == t ? c : (float)t;
#endif
}
LM_INLINE void lm_sincos(float t, float& s, float& c) { lm_sincosf((double)t, s, c); }
LM_INLINE void lm_sincos(double t, double& s, double& c) { s = lm_sin(t); c = lm_cos(t); }"""


def _exp_render(ctx, node):
    return [f"for (int k = 0; k < {node.dim // 2}; k++) {{ "
            f"{ctx.T} e = lm_exp({ctx.arg(0, '2 * k')}), s, c; "
            f"lm_sincos({ctx.arg(0, '2 * k + 1')}, s, c); "
            f"{ctx.out('2 * k')} = e * c; {ctx.out('2 * k + 1')} = e * s; }}"]


register("ComplexExp", 1, _exp_ref, dims=_unary_dim(1, 1), complex_result=True,
         render=_exp_render, c_helper=_SINCOS_HELPER, libm=(("sin", 1), ("cos", 1)),
         doc="complex exponential", vjp=lambda n, g: (call("ComplexMult", g, call("Conj", n)),))


def _exp1j_ref(xp, p, f):
    return _join(xp, xp.module.cos(f), xp.module.sin(f))


def _exp1j_render(ctx, node):
    f = node.args[0]
    if ctx.T == "float" and f.op == "Mult":
        # a phase x·ω formed in double is exact: float32 sums keep the phase's accuracy
        a, b = (ctx.em.expr(g, "k") for g in f.args)
        return [f"for (int k = 0; k < {node.dim // 2}; k++) {{ float s, c; "
                f"lm_sincosf((double){a} * (double){b}, s, c); "
                f"{ctx.out('2 * k')} = c; {ctx.out('2 * k + 1')} = s; }}"]
    return [f"for (int k = 0; k < {node.dim // 2}; k++) {{ {ctx.T} s, c; "
            f"lm_sincos({ctx.arg(0, 'k')}, s, c); "
            f"{ctx.out('2 * k')} = c; {ctx.out('2 * k + 1')} = s; }}"]


register("ComplexExp1j", 1, _exp1j_ref, dims=_unary_dim(1, 2), render=_exp1j_render,
         doc="exp(i f) for a real f (dim D -> complex D)",
         vjp=lambda n, g: (call("ComplexImag", call("ComplexMult", g, call("Conj", n))),))


def _conj_ref(xp, p, a):
    ar, ai = _parts(a)
    return _join(xp, ar, -ai)


register("Conj", 1, _conj_ref, dims=_unary_dim(2, 2), complex_result=True,
         render=lambda ctx, node: [
         f"for (int k = 0; k < {node.dim // 2}; k++) {{ "
         f"{ctx.out('2 * k')} = {ctx.arg(0, '2 * k')}; "
         f"{ctx.out('2 * k + 1')} = -{ctx.arg(0, '2 * k + 1')}; }}"], doc="complex conjugate",
         vjp=lambda n, g: (call("Conj", g),))


def _part_op(name: str, part: int, embed: str):
    register(name, 1, lambda xp, p, a: _parts(a)[part], dims=_unary_dim(2, 1), complex_result=False,
             render=lambda ctx, node: [f"for (int k = 0; k < {node.dim}; k++) "
             f"{ctx.out('k')} = {ctx.arg(0, f'2 * k + {part}')};"],
             doc=f"{'real' if part == 0 else 'imaginary'} parts",
             vjp=lambda n, g: (call(embed, g),))


def _embed_op(name: str, part: int, back: str):
    def ref(xp, p, f):
        zero = f * 0
        return _join(xp, f, zero) if part == 0 else _join(xp, zero, f)

    register(name, 1, ref, dims=_unary_dim(1, 2),
             render=lambda ctx, node: [f"for (int k = 0; k < {node.dim // 2}; k++) {{ "
             f"{ctx.out(f'2 * k + {part}')} = {ctx.arg(0, 'k')}; "
             f"{ctx.out(f'2 * k + {1 - part}')} = ({ctx.T})0; }}"],
             doc=f"a real vector as the {'real' if part == 0 else 'imaginary'} part",
             vjp=lambda n, g: (call(back, g),))


_part_op("ComplexReal", 0, "Real2Complex")
_part_op("ComplexImag", 1, "Imag2Complex")
_embed_op("Real2Complex", 0, "ComplexReal")
_embed_op("Imag2Complex", 1, "ComplexImag")


def _modulus(name: str, squared: bool):
    def ref(xp, p, a):
        ar, ai = _parts(a)
        s = ar * ar + ai * ai
        return s if squared else xp.module.sqrt(s)

    def vjp(n, g):
        a = n.args[0]
        if squared:
            return (call("ComplexRealScal", g * 2, a),)
        # d|a| = (re, im) / |a|, 0 at a = 0 (as Sqrt's subgradient)
        return (call("ComplexRealScal", g * call("Rsqrt", call("ComplexSquareAbs", a)), a),)

    register(name, 1, ref, dims=_unary_dim(2, 1), complex_result=False, render=lambda ctx, node: [
                    f"for (int k = 0; k < {node.dim}; k++) {{ {ctx.T} re = "
                    f"{ctx.arg(0, '2 * k')}, im = {ctx.arg(0, '2 * k + 1')}; "
                    f"{ctx.out('k')} = " + ("re * re + im * im" if squared else
                                            "lm_sqrt(re * re + im * im)") + "; }"],
             doc="|a|²" if squared else "|a|", vjp=vjp)
_modulus("ComplexAbs", False)
_modulus("ComplexSquareAbs", True)


def _angle_ref(xp, p, a):
    ar, ai = _parts(a)
    return xp.module.arctan2(ai, ar)


register("ComplexAngle", 1, _angle_ref, dims=_unary_dim(2, 1), complex_result=False,
         render=lambda ctx, node: [f"for (int k = 0; k < {node.dim}; k++) {ctx.out('k')} = "
         f"lm_atan2({ctx.arg(0, '2 * k + 1')}, {ctx.arg(0, '2 * k')});"],
         doc="argument atan2(im, re)",
         vjp=lambda n, g: (call("ComplexRealScal", g / call("ComplexSquareAbs", n.args[0]),
         call("ComplexMult", call("Imag2Complex", Const(1)), n.args[0])),))


def _csum_ref(xp, p, a):
    ar, ai = _parts(a)
    return _join(xp, xp.sum(ar, -1, keepdims=True), xp.sum(ai, -1, keepdims=True))


def _csum_dim(name, dims, params):
    _even(name, dims[0])
    return 2


register("ComplexSum", 1, _csum_ref, dims=_csum_dim, complex_result=True, render=lambda ctx, node: [
                f"{ctx.T} re = 0, im = 0;",
                f"for (int k = 0; k < {node.args[0].dim // 2}; k++) {{ "
                f"re += {ctx.arg(0, '2 * k')}; im += {ctx.arg(0, '2 * k + 1')}; }}",
                f"{ctx.out(0)} = re; {ctx.out(1)} = im;"],
         doc="sum of the complex components (a complex scalar)",
         vjp=lambda n, g: (call("ComplexSumT", g, params=(n.args[0].dim // 2,)),))


def _csumt_dim(name, dims, params):
    if dims[0] != 2:
        raise ShapeError(f"{name} needs a complex scalar (dim 2), got dim {dims[0]}")
    return 2 * params[0]


def _csumt_ref(xp, p, a):
    ar, ai = _parts(a)
    ones = xp.cast(xp.arange(p[0], like=a) * 0 + 1, a)
    return _join(xp, ar * ones, ai * ones)


register("ComplexSumT", 1, _csumt_ref, dims=_csumt_dim,
         render=lambda ctx, node: [f"for (int k = 0; k < {node.params[0]}; k++) {{ "
         f"{ctx.out('2 * k')} = {ctx.arg(0, 0)}; "
         f"{ctx.out('2 * k + 1')} = {ctx.arg(0, 1)}; }}"],
         doc="a complex scalar repeated D times (adjoint of ComplexSum)",
         vjp=lambda n, g: (call("ComplexSum", g),))


# --------------------------------------------------------------------------- composites


def _broadcast_pair(a: Node, b: Node) -> tuple[Node, Node]:
    da, db = a.dim // 2, b.dim // 2
    if da == 1 and db > 1:
        a = call("ComplexSumT", a, params=(db,))
    elif db == 1 and da > 1:
        b = call("ComplexSumT", b, params=(da,))
    return a, b


def ComplexAdd(a: Node, b: Node) -> Node:
    """a + b for complex formulas (a complex scalar broadcasts)."""
    _complex_binary_dim("ComplexAdd", [a.dim, b.dim], ())
    a, b = _broadcast_pair(a, b)
    return a + b


def ComplexSubtract(a: Node, b: Node) -> Node:
    """a − b for complex formulas (a complex scalar broadcasts)."""
    _complex_binary_dim("ComplexSubtract", [a.dim, b.dim], ())
    a, b = _broadcast_pair(a, b)
    return a - b


register_macro("ComplexAdd", ComplexAdd)
register_macro("ComplexSubtract", ComplexSubtract)
__all__ = ["ComplexAdd", "ComplexSubtract", "apply"]
