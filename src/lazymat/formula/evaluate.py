"""Dense evaluation of formulas with numpy or torch: the values F(p, x_i, y_j) of a block.

The reference backend reduces these blocks; front ends use them for dense views of a
LazyTensor and for the blocks of a preconditioner.

>>> import numpy as np
>>> from lazymat.arraylib import NUMPY
>>> from lazymat.formula import SqDist, Var
>>> f = SqDist(Var(0, 1, 0), Var(1, 1, 1))
>>> x, y = np.array([[0.0], [1.0]]), np.array([[2.0]])
>>> evaluate([f], [x, y], slice(None), slice(None), NUMPY, x)[0].ravel().tolist()
[4.0, 1.0]
"""

from __future__ import annotations

import itertools
from typing import Any, Iterator, Sequence

from .node import I_CAT, J_CAT, P_CAT, Node, variables, walk
from .ops import OPS


def evaluate(roots: Sequence[Node], arrays: Sequence[Any], rows: Any, cols: Any, xp: Any,
             like: Any) -> list[Any]:
    """Values of the formulas on a block: arrays of shape (rows, cols, dim), broadcastable
    (a root that does not depend on i has 1 row, ...). ``rows``/``cols`` index the i- and
    j-variables (slices or index arrays)."""
    def leaf(node: Node) -> Any:
        if node.op == "Const":
            return xp.full((1, 1, node.dim), float(node.value), like=like)
        pos, dim, cat = node.params
        a = arrays[pos]
        if cat == I_CAT:
            return a[rows][:, None, :]
        if cat == J_CAT:
            return a[cols][None, :, :]
        return a.reshape((1, 1, dim))
    return _values(roots, xp, leaf)


def _values(roots: Sequence[Node], xp: Any, leaf: Any) -> list[Any]:
    """The roots' values by their ops' array rules, ``leaf(node)`` giving those of the
    variables and constants; a node shared by several roots is computed once."""
    values: dict[int, Any] = {}
    for r in roots:
        for node in walk(r):
            if id(node) in values:
                continue
            if node.op in ("Var", "Const"):
                v = leaf(node)
            else:
                v = OPS[node.op].ref(xp, node.params, *[values[id(a)] for a in node.args])
            values[id(node)] = v
    return [values[id(r)] for r in roots]


def batch_slices(roots: Sequence[Node | None], arrays: Sequence[Any], batch: tuple[int, ...]
                 ) -> Iterator[list[Any]]:
    """The arrays of each batch in turn (row-major over the batch dims): each used array at
    one batch index, index 0 along its broadcast dims."""
    inner = {v.params[0]: (1 if v.params[2] == P_CAT else 2)
             for r in roots if r is not None for v in variables(r)}
    for index in itertools.product(*[range(b) for b in batch]):
        out = list(arrays)
        for pos, n_inner in inner.items():
            a = arrays[pos]
            own = tuple(a.shape[:a.ndim - n_inner])
            if own:
                mine = index[len(index) - len(own):]
                out[pos] = a[tuple(i if d != 1 else 0 for i, d in zip(mine, own))]
        yield out


def stack_batches(xp: Any, parts: list[Any], batch: tuple[int, ...]) -> Any:
    """One array of shape batch + part shape from the per-batch parts."""
    stacked = xp.concat([xp.expand_dims(p, 0) for p in parts], 0)
    return stacked.reshape(batch + tuple(parts[0].shape))


def evaluate_rows(roots: Sequence[Node], arrays: Sequence[Any], xp: Any, like: Any
                  ) -> list[Any]:
    """Values of formulas that do not vary with the reduced index, on the output's rows:
    arrays of shape (..., rows, dim), the batch dims broadcast. A variable of the output index
    is its array (..., rows, dim), a parameter (..., dim) counts for every row (the combines of
    :func:`lazymat.formula.factor.factor_sum`: elementwise ops, Sum, Extract and Concat)."""
    def leaf(node: Node) -> Any:
        if node.op == "Const":
            return xp.full((1, node.dim), float(node.value), like=like)
        a = arrays[node.params[0]]
        return a[..., None, :] if node.params[2] == P_CAT else a
    return _values(roots, xp, leaf)
