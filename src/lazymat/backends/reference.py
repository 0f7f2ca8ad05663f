"""Reference backend: the formula evaluated with numpy or torch on dense blocks.

It is the test oracle and the fallback when no compiler exists. Blocks of
rows x columns are sized so that the dense intermediates stay under
``MEMORY_BUDGET`` bytes whatever M and N are; the partial states of the
column blocks are combined with the reduction's own ``merge`` rule.
"""

from __future__ import annotations

import itertools
from typing import Any, Sequence

from ..formula import OPS, Node, variables, walk
from ..reductions import ReductionDef

MEMORY_BUDGET = 256 * 2**20
MAX_ROWS = 2048


def evaluate(roots: list[Node], arrays: Sequence[Any], rows: slice, cols: slice, xp: Any,
             like: Any) -> list[Any]:
    """Values of the formulas on a block: arrays of shape (rows, cols, dim)."""
    values: dict[int, Any] = {}
    for r in roots:
        for node in walk(r):
            if id(node) in values:
                continue
            if node.op == "Var":
                pos, dim, cat = node.params
                a = arrays[pos]
                if cat == 0:
                    v = a[rows][:, None, :]
                elif cat == 1:
                    v = a[cols][None, :, :]
                else:
                    v = a.reshape((1, 1, dim))
            elif node.op == "Const":
                v = xp.full((1, 1, node.dim), float(node.value), like=like)
            else:
                v = OPS[node.op].ref(xp, node.params, *[values[id(a)] for a in node.args])
            values[id(node)] = v
    return [values[id(r)] for r in roots]


def _block_sizes(roots: list[Node], M: int, N: int, itemsize: int) -> tuple[int, int]:
    per_pair = max(1, sum(n.dim for r in roots for n in walk(r))) * itemsize * 2
    rows = max(1, min(M, MAX_ROWS))
    cols = max(1, min(N, MEMORY_BUDGET // (per_pair * rows)))
    return rows, cols


def run(red: ReductionDef, formula: Node, weight: Node | None, K: int | None,
        arrays: Sequence[Any], M: int, N: int, xp: Any, like: Any,
        batch: tuple[int, ...] = (), ranges: tuple[Any, Any, Any] | None = None) -> tuple:
    """Outputs of ``red`` over j of ``formula`` (categories already oriented: 0 = output),
    one batch after the other."""
    if batch:
        per_batch = [_run_one(red, formula, weight, K, sliced, M, N, xp, like, ranges)
                     for sliced in batch_slices([formula, weight], arrays, batch)]
        return tuple(stack_batches(xp, [p[k] for p in per_batch], batch)
                     for k in range(len(per_batch[0])))
    return _run_one(red, formula, weight, K, arrays, M, N, xp, like, ranges)


def batch_slices(roots: Sequence[Node | None], arrays: Sequence[Any], batch: tuple[int, ...]):
    """The arrays of each batch in turn (row-major over the batch dims)."""
    inner = {v.params[0]: (1 if v.params[2] == 2 else 2)
             for r in roots if r is not None for v in variables(r)}
    for index in itertools.product(*[range(b) for b in batch]):
        yield _batch_slice(arrays, index, inner)


def stack_batches(xp: Any, parts: list[Any], batch: tuple[int, ...]) -> Any:
    """One array of shape batch + part shape from the per-batch parts."""
    stacked = xp.concat([xp.expand_dims(p, 0) for p in parts], 0)
    return stacked.reshape(batch + tuple(parts[0].shape))


def _batch_slice(arrays: Sequence[Any], index: tuple[int, ...], inner: dict[int, int]
                 ) -> list[Any]:
    """Each used array at one batch index (index 0 along its broadcast dims)."""
    out = list(arrays)
    for pos, n_inner in inner.items():
        a = arrays[pos]
        own = tuple(a.shape[:a.ndim - n_inner])
        if own:
            mine = index[len(index) - len(own):]
            out[pos] = a[tuple(i if d != 1 else 0 for i, d in zip(mine, own))]
    return out


def _run_one(red: ReductionDef, formula: Node, weight: Node | None, K: int | None,
             arrays: Sequence[Any], M: int, N: int, xp: Any, like: Any,
             ranges: tuple[Any, Any, Any] | None = None) -> tuple:
    roots = [formula] + ([weight] if weight is not None else [])
    rows_per, cols_per = _block_sizes(roots, M, N, like.dtype.itemsize)
    if ranges is None:
        blocks = [((0, M), [(0, N)])]
    else:  # block-sparse: each output range with its own column intervals
        ranges_i, slices, redranges = ranges
        blocks = [((int(ranges_i[c][0]), int(ranges_i[c][1])),
                   [(int(a), int(b)) for a, b in redranges[(slices[c - 1] if c else 0):slices[c]]])
                  for c in range(len(ranges_i))]
    pieces: list[tuple[int, tuple]] = []
    with xp.errstate():
        for (start, stop), intervals in blocks:
            for i0 in range(start, stop, rows_per):
                rows = slice(i0, min(stop, i0 + rows_per))
                state = None
                for js, je in intervals:
                    for j0 in range(js, je, cols_per):
                        block = _block(red, roots, arrays, rows, slice(j0, min(je, j0 + cols_per)),
                                       xp, like, K)
                        state = block if state is None else red.merge(xp, state, block, K=K)
                if state is not None:
                    pieces.append((i0, red.finalize(xp, state)))
    if ranges is None and pieces:
        return tuple(xp.concat([p[k] for _, p in pieces], 0) for k in range(len(pieces[0][1])))
    # Rows outside every range (or with no column at all) hold the reduction's identity.
    wdim = weight.dim if weight is not None else None
    outs = [xp.full((M,) + shape, fill, like=like, dtype=xp.int64 if kind == "index" else None)
            for (kind, shape), fill in zip(red.outputs(formula.dim, K, wdim), red.identity)]
    for i0, piece in pieces:
        for out, part in zip(outs, piece):
            out[i0:i0 + part.shape[0]] = part
    return tuple(outs)


def _block(red: ReductionDef, roots: list[Node], arrays: Sequence[Any], rows: slice, cols: slice,
           xp: Any, like: Any, K: int | None) -> Any:
    """The reduction state of one dense block of rows × columns."""
    m, n = rows.stop - rows.start, cols.stop - cols.start
    vals = evaluate(roots, arrays, rows, cols, xp, like)
    f = xp.broadcast_to(vals[0], (m, n, roots[0].dim))
    g = xp.broadcast_to(vals[1], (m, n, roots[1].dim)) if len(roots) > 1 else None
    return red.block(xp, f, g, cols.start, K=K)
