"""Structural ops: a small C renderer each (reductions over the components, slices,
placements, one-hot vectors, matrix-vector products) and their composites.

>>> from lazymat.formula import Var
>>> Extract(Var(0, 5, 0), 1, 3).dim
3
"""

from __future__ import annotations

from ...errors import ShapeError
from ..node import Const, Node, is_zero, make, register, register_macro
from .base import bcast_lead, call, no_gradient, scalar_dim

__all__ = ["Elem", "Extract", "OneHot"]


def _sum_render(ctx, node):
    # ctx.copies > 1: that many consecutive columns at once, independent chains of adds.
    n, copies = node.args[0].dim, range(ctx.copies)
    if ctx.lanes:  # the lane loop innermost: one accumulator per lane and column
        L = ctx.lanes
        adds = " ".join(f"s{u}[l] += {ctx.arg(0, 'k', u)};" for u in copies)
        return [f"{ctx.T} " + ", ".join(f"s{u}[LANES]" for u in copies) + ";",
                f"{L} {{ " + " ".join(f"s{u}[l] = 0;" for u in copies) + " }",
                f"for (int k = 0; k < {n}; k++) {L} {{ {adds} }}",
                f"{L} {{ " + " ".join(f"{ctx.out(0, u)} = s{u}[l];" for u in copies) + " }"]
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


register("Sum", 1, lambda xp, p, a: xp.sum(a, -1, keepdims=True), dims=scalar_dim,
         render=_sum_render, simplify=_sum_simplify, jam=True, doc="sum of the components (dim 1)",
         vjp=lambda n, g: (g,))  # broadcast to the operand's dim by the engine


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
        where = call("ArgMin" if better == "<" else "ArgMax", n.args[0])
        return (g * OneHot(where, n.args[0].dim),)

    register(name, 1, ref, dims=scalar_dim, render=render, simplify=simplify,
             doc=f"{'index of the' if want_index else 'the'} "
             f"{'smallest' if better == '<' else 'largest'} component (dim 1)",
             vjp=no_gradient if want_index else vjp)


_extremum("Min", "<", False)
_extremum("Max", ">", False)
_extremum("ArgMin", "<", True)
_extremum("ArgMax", ">", True)


def _concat_render(ctx, node):
    d0, d1 = node.args[0].dim, node.args[1].dim
    return [f"for (int k = 0; k < {d0}; k++) {ctx.out('k')} = {ctx.arg(0, 'k')};",
            f"for (int k = 0; k < {d1}; k++) {ctx.out(f'{d0} + k')} = {ctx.arg(1, 'k')};"]


register("Concat", 2, lambda xp, p, a, b: xp.concat(bcast_lead(xp, [a, b]), -1),
         dims=lambda n, d, p: d[0] + d[1], render=_concat_render, doc="concatenation [a, b]",
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


register("Extract", 1, lambda xp, p, a: a[..., p[0]:p[0] + p[1]], dims=_extract_dim,
         int_params=(1, 2), complex_result=True, render=_extract_render, simplify=_extract_simplify,
         doc="components [start:start+d]",
         vjp=lambda n, g: (_embed(g, n.params[0], n.args[0].dim),))


def _embed(g: Node, start: int, dim: int) -> Node:
    """g placed at ``start`` in a zero vector of length ``dim`` (the adjoint of Extract)."""
    before, after = start, dim - start - g.dim
    out = g if before == 0 else call("Concat", Const(0, before), g)
    return out if after == 0 else call("Concat", out, Const(0, after))


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


register("ElemT", 1, lambda xp, p, a: _place(xp, a, p[1], p[0]), dims=_elemt_dim, int_params=(1, 2),
         render=_placed_render(lambda p: p[1]), simplify=_placed_simplify,
         doc="the scalar a at position m of a zero vector of length n (the adjoint of Elem)",
         vjp=lambda n, g: (Elem(g, n.params[1]),))


def _extractt_dim(name, dims, params):
    start, d = params
    if start < 0 or start + dims[0] > d:
        raise ShapeError(f"ExtractT: cannot place a formula of dim {dims[0]} at position "
                         f"{start} of a vector of length {d}")
    return d


register("ExtractT", 1, lambda xp, p, a: _place(xp, a, p[0], p[1]), dims=_extractt_dim,
         int_params=(1, 2), render=_placed_render(lambda p: p[0]), simplify=_placed_simplify,
         doc="a at components [start:start+a.dim] of a zero vector of length d "
         "(the adjoint of Extract)", vjp=lambda n, g: (Extract(g, n.params[0], n.args[0].dim),))


def _onehot_dim(name, dims, params):
    if dims[0] != 1:
        raise ShapeError(f"OneHot needs a scalar (dim 1) formula, got dim {dims[0]}")
    if params[0] < 1:
        raise ShapeError(f"OneHot needs a length >= 1, got {params[0]}")
    return params[0]


def _onehot_ref(xp, p, a):
    positions = xp.cast(xp.arange(p[0], like=a), a)
    rint = xp.module.round if xp.name == "torch" else xp.module.rint  # ties to even
    return xp.cast(rint(a) == positions, a)


register("OneHot", 1, _onehot_ref, dims=_onehot_dim, int_params=(1,),
         render=lambda ctx, node: [f"{ctx.T} r = lm_round({ctx.arg(0, 0)});",
         f"for (int k = 0; k < {node.params[0]}; k++) "
         f"{ctx.out('k')} = ({ctx.T})(r == k);"],
         doc="one-hot vector of length D at position round(a)", vjp=no_gradient)


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


register("MatVecMult", 2, _matvec_ref, dims=_matvec_dim, render=_matvec_render,
         doc="row-major matrix (dim m*n) times vector (dim n)",
         vjp=lambda n, g: (call("TensorProd", g, n.args[1]), call("VecMatMult", g, n.args[0])))


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


register("VecMatMult", 2, _vecmat_ref, dims=_vecmat_dim, render=_vecmat_render,
         doc="vector (dim m) times row-major matrix (dim m*n)",
         vjp=lambda n, g: (call("MatVecMult", n.args[1], g), call("TensorProd", n.args[0], g)))


def _tensorprod_ref(xp, p, a, b):
    a, b = bcast_lead(xp, [a, b])
    out = xp.expand_dims(a, -1) * xp.expand_dims(b, -2)
    return out.reshape(tuple(out.shape[:-2]) + (a.shape[-1] * b.shape[-1],))


def _tensorprod_render(ctx, node):
    m, n = node.args[0].dim, node.args[1].dim
    return [f"for (int r = 0; r < {m}; r++) for (int c = 0; c < {n}; c++) "
            f"{ctx.out(f'r * {n} + c')} = {ctx.arg(0, 'r')} * {ctx.arg(1, 'c')};"]


register("TensorProd", 2, _tensorprod_ref, dims=lambda name, d, p: d[0] * d[1],
         render=_tensorprod_render, doc="outer product a b^T, row-major (dim m*n)",
         vjp=lambda n, g: (call("MatVecMult", g, n.args[1]), call("VecMatMult", n.args[0], g)))


def Elem(f: Node, m: int) -> Node:
    """Component m of f (dim 1)."""
    return make("Extract", (f,), (int(m), 1))


def Extract(f: Node, start: int, d: int) -> Node:
    return make("Extract", (f,), (int(start), int(d)))


def OneHot(f: Node, d: int) -> Node:
    return make("OneHot", (f,), (int(d),))


register_macro("Elem", Elem, int_params=(1,))
register_macro("Extract", Extract, int_params=(1, 2))
register_macro("OneHot", OneHot, int_params=(1,))
