"""Dask backend: reductions over dask arrays, one task per (row block, column block).

Each task runs one block of the symbolic matrix with the single-machine backends (CPU, or
CUDA on a GPU worker) and returns the reduction's raw partial state; the states of one row
block merge along the columns with the reduction's own ``merge`` in a tree (``split_every``
at a time, adjacent parts, so the first index wins ties as on one machine), then
``finalize`` gives the outputs. Index states are made global by the block's first column.
A task carries the request (formula, reduction, options: small and picklable), never a
compiled kernel: each worker compiles (or loads from the shared cache) its kernels once.

The result is a lazy dask array whose row chunks are those of the output variables (split
so that a task stays under about a second); nothing runs before ``.compute()``/``.persist()``.

>>> import numpy as np, dask.array as da, lazymat as lm
>>> x = da.from_array(np.random.rand(1000, 3), chunks=300)
>>> s = (-lm.Vi(x).sqdist(lm.Vj(x))).exp().sum(dim=1)   # a dask array
>>> s.shape, s.chunks[0]
((1000, 1), (300, 300, 300, 100))

Options (``dask.config.set({"lazymat.split-every": 4})``), read when the graph is built:

- ``lazymat.pairs-per-task`` (2**28): the size of a block, in (i, j) pairs;
- ``lazymat.rows-per-task`` / ``lazymat.columns-per-task`` (None: from pairs-per-task);
- ``lazymat.split-every`` (8): how many column parts one merge task combines;
- ``lazymat.worker-backend`` ("auto": CUDA on workers that own a GPU, as dask-cuda's, else
  CPU; or "cpu", "cuda", "reference");
- ``lazymat.threads-per-task`` (1: each worker thread runs a single-threaded kernel).
"""

from __future__ import annotations

import math
import operator
import os
import pickle
import sys
from dataclasses import dataclass, replace
from typing import Any, Sequence

import numpy as np

from .. import config, plan
from ..arraylib import NUMPY, is_dask, is_torch
from ..errors import DtypeError, ShapeError
from ..formula import I_CAT, J_CAT, P_CAT, variables

name = "dask"

_DEFAULTS = {"pairs-per-task": 2**28, "rows-per-task": None, "columns-per-task": None,
             "split-every": 8, "worker-backend": "auto", "threads-per-task": None}


def unavailable_reason() -> str | None:
    """Why this backend cannot run here (None when it can)."""
    try:
        import dask.array  # noqa: F401
    except ImportError:
        return "dask is not installed (pip install 'lazymat[dask]')"
    return None


def _option(key: str) -> Any:
    import dask

    return dask.config.get(f"lazymat.{key}", _DEFAULTS[key])


def _verbose() -> bool:
    return config.verbose()


# --------------------------------------------------------------------------- what a task runs

@dataclass(frozen=True)
class BlockJob:
    """Everything a task of one reduction carries (pickled into every task: keep it small).

    ``out_cat`` is the category of the output rows (I_CAT when reducing over j);
    ``state_shapes`` the per-row shape of each raw state array; ``trailing`` the per-row
    shape of each output as the single-machine call returns it.
    """

    req: plan.Request
    out_cat: int
    batch: tuple[int, ...]
    state_shapes: tuple[tuple[int, ...], ...]
    trailing: tuple[tuple[int, ...], ...]
    backend: str = "auto"
    threads: int | None = None


def _store_state_supported() -> bool:
    import inspect

    return "store" in inspect.signature(plan.run).parameters


_HAS_STATE_STORE = _store_state_supported()


def block_state(job: BlockJob, arrays: Sequence[Any], m: int, n: int) -> tuple:
    """The raw state of one block (m output rows, n reduced columns, indices local to the
    block), each array of shape (nbatch * m,) + its state shape.

    This is the one place that knows how a block's state is obtained: the kernel's raw-state
    store when ``plan.run`` has one, else the outputs of a reduction whose outputs hold the
    state (Min_ArgMin for Min, ...), turned into it by the reduction's ``state_of``.
    """
    req, red = job.req, job.req.definition
    sizes = (m, n) if job.out_cat == I_CAT else (n, m)
    rows = math.prod(job.batch) * m
    run = _block_runner(job.backend)
    if _HAS_STATE_STORE:
        state = run(req, arrays, sizes, store="state")
    elif red.split_with is not None:
        twin = replace(req, reduction=red.split_with)
        outs = run(twin, arrays, sizes)
        shapes = [s for _, s in twin.definition.out_dims(req.formula.dim, req.K, _wdim(req))]
        outs = tuple(o.reshape((rows,) + s) for o, s in zip(outs, shapes))
        state = red.state_of(NUMPY, outs)
    else:  # SumSoftMaxWeight: with L = log Σ_j exp(F), (L, 1, Σ_j exp(F - L) G) is its state
        lse = run(replace(req, reduction="LogSumExp", weight=None), arrays, sizes)[0]
        soft = run(req, arrays, sizes)[0]
        lse = lse.reshape(rows, 1)
        state = (lse, np.ones_like(lse), soft.reshape((rows,) + job.state_shapes[2]))
    parts = state if isinstance(state, tuple) else (state,)
    parts = tuple(np.asarray(p).reshape((rows,) + s) for p, s in zip(parts, job.state_shapes))
    return parts if isinstance(state, tuple) else parts[0]


def _block_runner(backend: str):
    def run(req: plan.Request, arrays: Sequence[Any], sizes: tuple[int, int],
            **store: str) -> tuple:
        return plan.run(req, list(arrays), backend=_worker_backend(backend), sizes=sizes,
                        like=None if arrays else np.zeros(1), **store)
    return run


def _worker_backend(wanted: str) -> str:
    """The single-machine backend of a task: "auto" is CUDA on a worker given a GPU (as
    dask-cuda's workers are, through CUDA_VISIBLE_DEVICES) when the CUDA backend can run."""
    if wanted != "auto":
        return wanted
    if os.environ.get("CUDA_VISIBLE_DEVICES", "").strip() not in ("", "-1"):
        if plan.cuda_unavailable_reason() is None:
            return "cuda"
    return "auto"


def _set_threads(job: BlockJob) -> None:
    """Kernel threads per task: one by default, since each of a worker's threads runs its
    own task (so a worker with T threads keeps T cores busy and no more, as dask sizes its
    workers); ``lazymat.threads-per-task`` raises it for workers with one thread and many
    cores. Set once per worker process (the environment is the per-process knob the CPU
    backend reads); the user's LAZYMAT_NUM_THREADS wins, and outside a distributed worker
    nothing is changed."""
    if "LAZYMAT_NUM_THREADS" in os.environ:
        return
    try:
        from distributed import get_worker

        get_worker()
    except (ImportError, ValueError):
        return
    os.environ["LAZYMAT_NUM_THREADS"] = str(max(1, int(job.threads or 1)))


def block_task(job: BlockJob, arrays: list, m: int, n: int, j0: int) -> Any:
    """A task: the state of a block, its indices made global (j0 = its first column)."""
    _set_threads(job)
    return globalize(block_state(job, arrays, m, n), j0)


def globalize(state: Any, j0: int) -> Any:
    """Index states (int64 arrays) shifted by the block's first column; -1 (no column) stays."""
    def shift(a: np.ndarray) -> np.ndarray:
        return np.where(a >= 0, a + j0, a) if a.dtype.kind == "i" and j0 else a

    return tuple(shift(a) for a in state) if isinstance(state, tuple) else shift(state)


def merge_task(job: BlockJob, states: list) -> Any:
    """States of adjacent column parts, left to right (the left one has smaller j)."""
    red = job.req.definition
    merged = states[0]
    with np.errstate(all="ignore"):
        for s in states[1:]:
            merged = red.merge(NUMPY, merged, s, K=job.req.K)
    return merged


def finalize_task(job: BlockJob, state: Any, m: int, which: int | None = None) -> Any:
    """The outputs of one row block, shaped batch + (m,) + their trailing shape (output
    ``which`` alone when given)."""
    with np.errstate(all="ignore"):
        outs = job.req.definition.finalize(NUMPY, state)
    outs = tuple(np.asarray(o).reshape(job.batch + (m,) + t) for o, t in zip(outs, job.trailing))
    return outs if which is None else outs[which]


def _wdim(req: plan.Request) -> int | None:
    return req.weight.dim if req.weight is not None else None


# --------------------------------------------------------------------------- the graph

def run(req: plan.Request, arrays: Sequence[Any], *, names: Sequence[str] | None = None,
        backend: str = "auto", out: Any = None,
        sizes: tuple[int | None, int | None] = (None, None), like: Any = None,
        ranges: Sequence[Any] | None = None) -> tuple:
    """The reduction as lazy dask arrays (one per output), from dask and/or numpy arrays.

    Checks everything the single-machine call checks, before anything runs.
    """
    reason = unavailable_reason()
    if reason is not None:
        raise ShapeError(f"backend='dask' cannot run: {reason}")
    import dask.array as da

    plan.check_request(req)
    arrays = list(arrays)
    names = list(names) if names is not None else [f"argument {k}" for k in range(len(arrays))]
    if out is not None:
        raise DtypeError("out= cannot be used with dask arrays: the result is a new lazy "
                         "dask array (assign it with da.store or .compute())")
    if ranges is not None:
        raise ShapeError("block-sparse ranges are not supported with dask arrays: the dask "
                         "backend already cuts the work into blocks. Reduce without ranges, "
                         "or compute each cluster's reduction with numpy arrays")
    for a, nm in zip(arrays, names):
        if is_torch(a):
            raise DtypeError(f"{nm} is a torch tensor but other operands are dask arrays: "
                             f"torch tensors are not dask chunks; pass a numpy array "
                             f"(.numpy()) or a dask array")
        if is_dask(a) and any(math.isnan(c) for c in a.shape):
            raise ShapeError(f"{nm} is a dask array of unknown shape {a.shape}: call "
                             f".compute_chunk_sizes() first")
    cats = _categories(req, len(arrays))
    worker_backend = "auto" if str(backend).lower() in ("auto", "dask") else str(backend)
    out_cat = I_CAT if req.axis == 1 else J_CAT
    red_cat = J_CAT if out_cat == I_CAT else I_CAT
    rows = {c: _rows_of(arrays, names, cats, c, sizes) for c in (I_CAT, J_CAT)}
    M, N = rows[out_cat], rows[red_cat]
    red = req.definition
    if red.needs_k and isinstance(req.K, (int, np.integer)) and req.K > N:
        raise ShapeError(f"{red.name}: K = {req.K} is larger than the number of "
                         f"{'columns N' if req.axis == 1 else 'rows M'} = {N} being reduced")
    probe_rows = {out_cat: 1, red_cat: max(1, int(req.K or 1))}
    probe = plan.run(req, [_stand_in(a, cats[p], probe_rows) for p, a in enumerate(arrays)],
                     names=names, backend="reference",
                     sizes=(probe_rows[I_CAT], probe_rows[J_CAT]),
                     like=_stand_in(like, P_CAT, {}) if like is not None else None)
    batch = tuple(probe[0].shape[:probe[0].ndim - 1 - _trailing_ndim(req)])
    trailing = tuple(tuple(o.shape[len(batch) + 1:]) for o in probe)
    if M == 0 or N == 0 or 0 in batch:  # the identity (or nothing): no task to run
        full = plan.run(req, [_stand_in(a, cats[p], rows) for p, a in enumerate(arrays)],
                        names=names, backend="reference", sizes=(rows[I_CAT], rows[J_CAT]),
                        like=probe[0])
        return tuple(da.from_array(o) for o in full)

    out_chunks, red_chunks = _task_chunks(arrays, cats, out_cat, red_cat, M, N, req)
    dask_arrays = {}
    for p, a in enumerate(arrays):
        chunks = {out_cat: out_chunks, red_cat: red_chunks}.get(cats[p])
        if is_dask(a) or chunks is not None:
            dask_arrays[p] = _rechunked(a, chunks)
    job = BlockJob(req, out_cat, batch, _state_shapes(req), trailing,
                   backend=worker_backend, threads=_option("threads-per-task"))
    return _build(job, arrays, dask_arrays, cats, out_chunks, red_chunks, probe)


def _categories(req: plan.Request, n: int) -> list[int]:
    """The category of each argument position (an unused one counts as a parameter)."""
    cats = [P_CAT] * n
    for root in (req.formula, req.weight):
        if root is not None:
            for v in variables(root):
                pos, _, cat = v.params
                if pos < n:
                    cats[pos] = cat
    return cats


def _rows_of(arrays: Sequence[Any], names: Sequence[str], cats: list[int], cat: int,
             sizes: tuple[int | None, int | None]) -> int:
    seen: tuple[int, str] | None = None
    for a, nm, c in zip(arrays, names, cats):
        if c != cat or len(a.shape) < 2:
            continue
        if seen is not None and int(a.shape[-2]) != seen[0]:
            letter = "M" if cat == I_CAT else "N"
            raise ShapeError(f"{nm} has {int(a.shape[-2])} rows but {seen[1]} has {seen[0]}: "
                             f"all {'i' if cat == I_CAT else 'j'}-variables must share {letter}")
        seen = seen or (int(a.shape[-2]), nm)
    return seen[0] if seen is not None else (sizes[cat] or 1)


def _stand_in(a: Any, cat: int, rows: dict[int, int]) -> np.ndarray:
    """A zero numpy array like ``a`` with ``rows[cat]`` rows (zero strides: no memory)."""
    shape = tuple(int(s) for s in a.shape)
    if cat in rows and len(shape) >= 2:
        shape = shape[:-2] + (rows[cat], shape[-1])
    return np.broadcast_to(np.zeros((), dtype=a.dtype), shape)


def _trailing_ndim(req: plan.Request) -> int:
    """How many dims of an output follow its row dim: (D,); (K, D) for the K-min family,
    (K,) when D = 1 (as the single-machine call squeezes it)."""
    return 2 if req.definition.needs_k and req.formula.dim != 1 else 1


def _state_shapes(req: plan.Request) -> tuple[tuple[int, ...], ...]:
    red, fdim, K, wdim = req.definition, req.formula.dim, req.K, _wdim(req)
    if _HAS_STATE_STORE:
        return tuple(s for _, s in red.state(fdim, K, wdim))
    if red.split_with is not None:
        shapes = [s for _, s in
                  replace(req, reduction=red.split_with).definition.out_dims(fdim, K, wdim)]
        if red.name == "LogSumExp":  # (max, Σ exp, Σ exp·G), each per component
            return (shapes[0],) * 3
        return tuple(shapes)
    return ((1,), (1,), (wdim,))  # SumSoftMaxWeight: (max, Σ exp, Σ exp·G)


def _split(chunks: Sequence[int], cap: int) -> tuple[int, ...]:
    """Each chunk cut into near-equal pieces of at most ``cap`` rows."""
    out: list[int] = []
    for c in chunks:
        k = max(1, -(-c // cap))
        out += [c // k + (1 if r < c % k else 0) for r in range(k)]
    return tuple(x for x in out if x > 0)


def _uniform(n: int, size: int, minimum: int) -> tuple[int, ...]:
    """n rows in chunks of ``size``; a last chunk under ``minimum`` joins the previous one."""
    size = max(size, minimum, 1)
    chunks = [size] * (n // size) + ([n % size] if n % size else [])
    if len(chunks) > 1 and chunks[-1] < minimum:
        chunks[-2] += chunks.pop()
    return tuple(chunks)


def _task_chunks(arrays: Sequence[Any], cats: list[int], out_cat: int, red_cat: int,
                 M: int, N: int, req: plan.Request) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Row chunks of the output side (the user's, split to size) and of the reduced side."""
    pairs = int(_option("pairs-per-task"))
    user = next((a.chunks[-2] for a, c in zip(arrays, cats) if c == out_cat and is_dask(a)),
                (M,))
    row_cap = _option("rows-per-task") or max(math.isqrt(pairs), pairs // max(N, 1))
    out_chunks = _split(user, int(row_cap))
    cols = _option("columns-per-task") or max(1, pairs // max(out_chunks))
    red_chunks = _uniform(N, int(min(cols, N)), int(req.K or 1))
    return out_chunks, red_chunks


def _rechunked(a: Any, row_chunks: tuple[int, ...] | None) -> Any:
    """``a`` as a dask array: batch and feature dims in one chunk, rows in ``row_chunks``
    (a parameter: one chunk)."""
    import dask.array as da

    shape = tuple(int(s) for s in a.shape)
    chunks = tuple((s,) for s in shape)
    if row_chunks is not None:
        chunks = chunks[:-2] + (row_chunks,) + chunks[-1:]
    if is_dask(a):
        return a if a.chunks == chunks else a.rechunk(chunks)
    return _from_numpy(a, chunks)


def _from_numpy(a: np.ndarray, chunks: tuple) -> Any:
    """A numpy operand as a dask array; with a distributed client, persisted on the workers
    and remembered (by content) so that repeated reductions (CG iterations) ship it once."""
    import dask.array as da
    from dask.base import tokenize

    arr = da.from_array(np.asarray(a), chunks=chunks, name=f"lazymat-input-{tokenize(a, chunks)}")
    client = _client()
    if client is None:
        return arr
    key = (arr.name, id(client))
    hit = _persisted.get(key)
    if hit is None:
        hit = _persisted[key] = client.persist(arr)
    return hit


# numpy operands persisted on the cluster, by content (the oldest dropped first)
_persisted = config.memo("dask.persisted", maxsize=8)


def _client() -> Any:
    if "distributed" not in sys.modules:
        return None
    from distributed import default_client

    try:
        return default_client()
    except ValueError:
        return None


def _block_key(a: Any, cat: int, r: int) -> tuple:
    """The key of row chunk ``r`` of a rechunked operand (batch and feature dims: chunk 0)."""
    if cat == P_CAT:
        return (a.name,) + (0,) * a.ndim
    return (a.name,) + (0,) * (a.ndim - 2) + (r, 0)


def _build(job: BlockJob, arrays: list, dask_arrays: dict[int, Any], cats: list[int],
           out_chunks: tuple[int, ...], red_chunks: tuple[int, ...], probe: tuple) -> tuple:
    import dask.array as da
    from dask.base import tokenize
    from dask.highlevelgraph import HighLevelGraph

    req, out_cat = job.req, job.out_cat
    red = req.definition.name
    token = tokenize(pickle.dumps(job), sorted((p, a.name) for p, a in dask_arrays.items()),
                     out_chunks, red_chunks)
    block_name, merge_name = f"lazymat-{red}-block-{token}", f"lazymat-{red}-merge-{token}"
    out_names = [f"lazymat-{red}-{token}"] + [f"lazymat-{red}-indices-{token}"] * (len(probe) > 1)
    # One output: the finalize tasks are its chunks; more: a finalize task per row block
    # and one pick per output chunk.
    final_name = out_names[0] if len(probe) == 1 else f"lazymat-{red}-finalize-{token}"
    nb = len(job.batch)

    def chunk_key(name: str, k: int, i: int) -> tuple:
        return (name,) + (0,) * nb + (i,) + (0,) * len(job.trailing[k])

    split_every = max(2, int(_option("split-every")))
    starts = np.concatenate([[0], np.cumsum(red_chunks)]).astype(int).tolist()
    layer: dict[tuple, Any] = {}
    levels, merges = 0, 0
    for i, m in enumerate(out_chunks):
        current = []
        for j, n in enumerate(red_chunks):
            args = []
            for p in range(len(arrays)):
                if p in dask_arrays:
                    r = i if cats[p] == out_cat else j
                    args.append(_block_key(dask_arrays[p], cats[p], r))
                else:
                    args.append(np.asarray(arrays[p]))
            key = (block_name, i, j)
            layer[key] = (block_task, job, args, m, n, starts[j])
            current.append(key)
        level = 0
        while len(current) > 1:
            level += 1
            merged = []
            for g in range(0, len(current), split_every):
                key = (merge_name, level, i, g // split_every)
                layer[key] = (merge_task, job, current[g:g + split_every])
                merged.append(key)
            current = merged
            merges += len(merged)
        levels = max(levels, level)
        if len(probe) == 1:
            layer[chunk_key(final_name, 0, i)] = (finalize_task, job, current[0], m, 0)
        else:
            layer[(final_name, i)] = (finalize_task, job, current[0], m)
    if _verbose():
        print(f"[lazymat] dask {red} over {'j' if out_cat == I_CAT else 'i'}: "
              f"{len(out_chunks)} x {len(red_chunks)} block tasks (rows <= {max(out_chunks)}, "
              f"columns <= {max(red_chunks)}, "
              f"{max(out_chunks) * max(red_chunks):.2e} pairs each), {merges} merge tasks in "
              f"{levels} level(s) (split_every {split_every}), {len(out_chunks)} finalize "
              f"tasks; worker backend {job.backend}", file=sys.stderr)
    base = HighLevelGraph.from_collections(final_name, layer,
                                           dependencies=list(dask_arrays.values()))
    outs = []
    for k, o in enumerate(probe):
        out_name, graph = final_name, base
        if len(probe) > 1:
            out_name = out_names[min(k, 1)] if k < 2 else f"lazymat-{red}-{k}-{token}"
            picks = {chunk_key(out_name, k, i): (operator.getitem, (final_name, i), k)
                     for i in range(len(out_chunks))}
            graph = HighLevelGraph({**base.layers, out_name: picks},
                                   {**base.dependencies, out_name: {final_name}})
        chunks = (tuple((b,) for b in job.batch) + (out_chunks,)
                  + tuple((s,) for s in job.trailing[k]))
        outs.append(da.Array(graph, out_name, chunks,
                             meta=np.empty((0,) * len(chunks), dtype=o.dtype)))
    return tuple(outs)


def persist(*arrays: Any) -> tuple:
    """The arrays, with the dask ones persisted (computed and kept on the workers, or in
    memory without a cluster) in one call; others returned as they are."""
    lazy = [k for k, a in enumerate(arrays) if is_dask(a)]
    if not lazy:
        return arrays
    import dask

    done = dask.persist(*[arrays[k] for k in lazy])
    out = list(arrays)
    for k, a in zip(lazy, done):
        out[k] = a
    return tuple(out)


def uses_dask(arrays: Sequence[Any]) -> bool:
    """Whether any operand is a dask array (then the dask backend runs the reduction)."""
    return any(is_dask(a) for a in arrays)


