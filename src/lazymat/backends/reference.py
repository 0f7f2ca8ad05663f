"""Reference backend: the formula evaluated with numpy or torch on dense blocks.

It is the test oracle and the fallback when no compiler exists. Blocks of
rows x columns are sized so that the dense intermediates stay under
``MEMORY_BUDGET`` bytes whatever M and N are; the partial states of the
column blocks are combined with the reduction's own ``merge`` rule.
"""

from __future__ import annotations

from typing import Any, Sequence

from ..formula import Node, walk
from ..formula.evaluate import batch_slices, evaluate, stack_batches
from .base import Launch

MEMORY_BUDGET = 256 * 2**20
MAX_ROWS = 2048


def unavailable_reason() -> str | None:
    """Never: numpy (or torch, for torch data) is all it needs."""
    return None


def _block_sizes(roots: list[Node], M: int, N: int, itemsize: int) -> tuple[int, int]:
    per_pair = max(1, sum(n.dim for r in roots for n in walk(r))) * itemsize * 2
    rows = max(1, min(M, MAX_ROWS))
    cols = max(1, min(N, MEMORY_BUDGET // (per_pair * rows)))
    return rows, cols


def run(launch: Launch) -> tuple:
    """The arrays of ``launch.shapes``, one batch after the other."""
    if launch.batch:
        per_batch = [_run_one(launch, sliced)
                     for sliced in batch_slices(launch.roots, launch.arrays, launch.batch)]
        return tuple(stack_batches(launch.xp, [p[k] for p in per_batch], launch.batch)
                     for k in range(len(per_batch[0])))
    return _run_one(launch, launch.arrays)


def _run_one(launch: Launch, arrays: Sequence[Any]) -> tuple:
    red, xp, like, K, M, N = launch.red, launch.xp, launch.like, launch.K, launch.M, launch.N
    roots = launch.roots
    rows_per, cols_per = _block_sizes(roots, M, N, like.dtype.itemsize)
    if launch.ranges is None:
        blocks = [((0, M), [(0, N)])]
    else:  # block-sparse: each output range with its own column intervals
        ranges_i, slices, redranges = launch.ranges
        blocks = [((int(ranges_i[c][0]), int(ranges_i[c][1])),
                   [(int(a), int(b)) for a, b in redranges[(slices[c - 1] if c else 0):slices[c]]])
                  for c in range(len(ranges_i))]
    final = launch.store == "output"
    pieces: list[tuple[int, tuple]] = []
    with xp.errstate():
        for (start, stop), intervals in blocks:
            for i0 in range(start, stop, rows_per):
                rows = slice(i0, min(stop, i0 + rows_per))
                state = None
                for js, je in intervals:
                    for j0 in range(js, je, cols_per):
                        block = _block(launch, arrays, rows, slice(j0, min(je, j0 + cols_per)))
                        state = block if state is None else red.merge(xp, state, block, K=K)
                if state is not None:
                    pieces.append((i0, red.finalize(xp, state) if final else state))
    if launch.ranges is None and pieces:
        return tuple(xp.concat([p[k] for _, p in pieces], 0) for k in range(len(pieces[0][1])))
    # Rows outside every range (or with no column at all) hold the reduction's identity.
    outs = [xp.full((M,) + shape, fill, like=like, dtype=xp.int64 if kind == "index" else None)
            for (kind, shape), fill in zip(launch.shapes, launch.fills)]
    for i0, piece in pieces:
        for out, part in zip(outs, piece):
            out[i0:i0 + part.shape[0]] = part
    return tuple(outs)


def _block(launch: Launch, arrays: Sequence[Any], rows: slice, cols: slice) -> Any:
    """The reduction state of one dense block of rows × columns."""
    m, n = rows.stop - rows.start, cols.stop - cols.start
    roots = launch.roots
    vals = evaluate(roots, arrays, rows, cols, launch.xp, launch.like)
    f = launch.xp.broadcast_to(vals[0], (m, n, roots[0].dim))
    g = launch.xp.broadcast_to(vals[1], (m, n, roots[1].dim)) if len(roots) > 1 else None
    return launch.red.block(launch.xp, f, g, cols.start, K=launch.K)
