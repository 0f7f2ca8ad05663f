"""Sums over the reduced index with the factors that do not depend on it taken out.

A Sum is linear: for F_ij = Σ_t o_t(i) c_t(i, j), Σ_j F_ij = Σ_t o_t(i) Σ_j c_t(i, j). The
kernel then reduces only the distinct c_t (the *columns*) and the o_t are applied after the
reduction, on the rows of the output. Gradients are where this pays: the ∂x_i of a Gaussian
sum, Σ_j -e_ij b_j (x_i - y_j) = -x_i Σ_j e_ij b_j + Σ_j e_ij b_j y_j, needs beside the
forward's own column Σ_j e_ij b_j only the cheap product e_ij b_j y_j; the pair-level
difference x_i - y_j is gone.

:func:`factor_sum` splits formulas this way (or says it does not pay: None), and its
:class:`Factored` holds the columns to reduce and, per formula, the *combine*: a formula of the
output-index variables, the parameters and the reduced columns (one more output-index
variable). Only Sums may be split: min, max or log-sum-exp are not linear.

Floating point: with |x| much larger than |x - y|, x·Σ e − Σ e y cancels. The inputs' own
rounding already costs Σ e (x - y) as much (x - y of float32 numbers near c is off by c·eps),
so the split loses a constant factor, not digits: the Gaussian sum's float32 gradients,
offset c = 0, 10, 100, 1000, relative error 1.2e-7, 1.8e-6, 1.7e-5, 1.7e-4 split against
5.4e-8, 4.5e-7, 3.6e-6, 2.9e-5 whole (``autograd.FACTOR_SUMS = False`` keeps them whole).

>>> from lazymat.formula import Var, I_CAT, J_CAT
>>> x, y, b = Var(0, 3, I_CAT), Var(1, 3, J_CAT), Var(2, 1, J_CAT)
>>> e = make("Exp", (-make("Sum", (make("Square", (x - y,)),)),))
>>> f = factor_sum([e * b, e * b * (x - y)], "Sum", J_CAT, 3)
>>> f.columns.dim, f.combines[1].deps   # Σ e b and Σ e b y; x·R - R on the rows
(4, 1)
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from typing import Sequence

from .node import DEP_I, DEP_J, I_CAT, J_CAT, OPS, Const, Node, Var, make, walk

#: The most products one formula may expand into: a product of sums is multiplied out, and
#: past this many terms the factor stays whole (one column) instead.
MAX_TERMS = 32

# One product: (coefficient, factors outside the sum, factors inside the sum).
_Term = tuple  # (Fraction | float, tuple[Node, ...], tuple[Node, ...])


@dataclass(frozen=True)
class Factored:
    """Σ_j of each input formula as ``combine(Σ_j columns)``.

    ``columns`` is the concatenation of the distinct factors to reduce; ``result`` the
    variable that stands for their reduction (category: the output index) in ``combines``,
    one formula per input, of the same dim, with no dependence on the reduced index.
    """

    columns: Node
    result: Node
    combines: tuple[Node, ...]


def factor_sum(formulas: Sequence[Node], reduction: str, reduced_cat: int, result_position: int
               ) -> Factored | None:
    """Split Σ over the index of ``reduced_cat`` (I_CAT or J_CAT) of each formula into columns
    to reduce and a combine (:class:`Factored`); ``result_position`` is the argument position of
    the reduced columns in the combines. None when the reduction is not a Sum, when no factor
    comes out, or when the columns would be more than the formulas' own (it would not pay)."""
    if reduction != "Sum" or reduced_cat not in (I_CAT, J_CAT):
        return None
    inside = DEP_J if reduced_cat == J_CAT else DEP_I
    outside = DEP_I if reduced_cat == J_CAT else DEP_J
    order = {id(n): k for k, n in enumerate(_walk_all(formulas))}  # a stable factor order

    def rank(n: Node) -> int:  # a factor made here (1 / d) ranks after the formulas' nodes
        return order.setdefault(id(n), len(order))
    expanded = []
    for f in formulas:
        terms = _terms(f, inside, outside)
        if any(not inner for _, _, inner in terms):
            return None  # a term constant in j: its sum is a count, left to the kernel
        expanded.append(terms)
    if not any(outer for terms in expanded for _, outer, _ in terms):
        return None
    # A column multiplies its factors most shared first, scalars first: (e_ij b_j) y_j reuses
    # the e_ij b_j of another column, and a scalar product is computed once, not per component.
    shared: dict[int, int] = {}
    for terms in expanded:
        for _, _, inner in terms:
            for n in set(inner):
                shared[id(n)] = shared.get(id(n), 0) + 1

    def product(inner: tuple[Node, ...]) -> Node:
        return _product(sorted(inner, key=lambda n: (-shared[id(n)], n.dim, rank(n))))

    columns: dict[Node, int] = {}  # column node -> first component in the reduced result
    width = 0
    for terms in expanded:
        for _, _, inner in terms:
            node = product(inner)
            if node not in columns:
                columns[node], width = width, width + node.dim
    if width > sum(f.dim for f in formulas):
        return None
    out_cat = J_CAT if reduced_cat == I_CAT else I_CAT
    result = Var(result_position, width, out_cat)
    combines = []
    for f, terms in zip(formulas, expanded):
        total = None
        for coef, outer, inner in terms:
            if coef == 0:
                continue
            column = product(inner)
            part = make("Extract", (result,), (columns[column], column.dim))
            for o in sorted(outer, key=rank):
                part = o * part
            if coef != 1:
                part = Const(coef) * part
            total = part if total is None else total + part
        if total is None:
            return None  # every term is 0: no row of the reduction to combine
        if total.dim != f.dim:
            total = total * Const(1, f.dim)
        combines.append(total)
    return Factored(_concat(list(columns)), result, tuple(combines))


def _terms(n: Node, inside: int, outside: int) -> list[_Term]:
    """``n`` as a sum of products, each with its factors split by dependence on the reduced
    index; a node that is not a sum, difference, negation or product (or that would expand
    into too many terms) is one factor."""
    if not n.deps & inside:
        if n.is_const and n.dim == 1:
            return [(n.value, (), ())]
        if _evaluable_outside(n):
            return [(Fraction(1), (n,), ())]
        return [(Fraction(1), (), (n,))]
    whole = [(Fraction(1), (), (n,))]
    if not n.deps & outside:
        return whole  # varies with the reduced index only: nothing to take out
    if n.op == "Add":
        terms = _terms(n.args[0], inside, outside) + _terms(n.args[1], inside, outside)
    elif n.op == "Subtract":
        terms = _terms(n.args[0], inside, outside) + _negated(
            _terms(n.args[1], inside, outside))
    elif n.op == "Minus":
        terms = _negated(_terms(n.args[0], inside, outside))
    elif n.op == "Mult":
        left, right = (_terms(a, inside, outside) for a in n.args)
        if len(left) * len(right) > MAX_TERMS:
            return whole
        terms = [(ca * cb, oa + ob, ia + ib) for ca, oa, ia in left for cb, ob, ib in right]
    elif n.op == "Divide" and not n.args[1].deps & inside and _evaluable_outside(n.args[1]):
        inverse = make("Divide", (Const(1), n.args[1]))
        terms = [(c, o + (inverse,), i) for c, o, i in _terms(n.args[0], inside, outside)]
    else:
        return whole
    return terms if len(terms) <= MAX_TERMS else whole


def _negated(terms: list[_Term]) -> list[_Term]:
    return [(-c, o, i) for c, o, i in terms]


#: Structural ops whose array rules act on the last axis only, whatever the leading ones.
_ROW_OPS = frozenset({"Var", "Const", "Sum", "Extract", "Concat"})


def _evaluable_outside(n: Node) -> bool:
    """Whether a factor can be computed on the output's rows (:func:`evaluate_rows`): made of
    variables, constants, elementwise ops (their array rules broadcast) and :data:`_ROW_OPS`."""
    return all(m.op in _ROW_OPS or OPS[m.op].elementwise for m in walk(n))


def _product(factors: list[Node]) -> Node:
    out = factors[0]
    for f in factors[1:]:
        out = out * f
    return out


def _concat(nodes: list[Node]) -> Node:
    out = nodes[0]
    for n in nodes[1:]:
        out = make("Concat", (out, n))
    return out


def _walk_all(roots: Sequence[Node]) -> list[Node]:
    seen: set[int] = set()
    out = []
    for r in roots:
        for n in walk(r):
            if id(n) not in seen:
                seen.add(id(n))
                out.append(n)
    return out
