"""TensorDot (generic tensor contraction) and Kron, on row-major flattened tensors.

>>> from lazymat.formula import Var
>>> TensorDot(Var(0, 6, 0), Var(1, 3, 1), [2, 3], [3], [1], [0]).dim
2
"""

from __future__ import annotations

import functools
import itertools
import math
import operator
from dataclasses import dataclass
from typing import Any

from ...errors import ShapeError
from ..node import Const, Node, as_node, is_zero, make, register, register_macro

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


register("TensorDot", 2, _tensordot_ref, dims=_tensordot_dim, int_params=(2, 3, 4, 5, 6),
         render=_tensordot_render, fold=lambda values, params: (values[0] * values[1]
         * math.prod(_tensordot_layout(params).contdims)), simplify=_tensordot_simplify,
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


register_macro("TensorDot", TensorDot, int_params=(2, 3, 4, 5, 6))
register_macro("Kron", Kron, int_params=(2, 3))
