"""BSpline: the B-spline basis functions at a point (Cox-de Boor recursion).

>>> from lazymat.formula import Var, apply
>>> apply("BSpline", Var(0, 6, 2), Var(1, 1, 0), 2).dim
3
"""

from __future__ import annotations

from ...errors import ShapeError
from ..node import Node, register


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


register("BSpline", 2, _bspline_ref, dims=_bspline_dim, int_params=(2,), render=_bspline_render,
         doc="BSpline(knots, x, order): the K - order - 1 B-spline basis functions of "
         "degree `order` with the K (non-decreasing) knots, at the scalar x (Cox-de Boor "
         "recursion; order 0: 1 on [t_k, t_k+1), half-open, so all are 0 at the last "
         "knot). Not differentiable, as in KeOps", vjp=_bspline_vjp)


