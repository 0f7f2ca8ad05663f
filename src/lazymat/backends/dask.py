"""Dask backend: reductions over dask arrays, one task per (row block, column block).

Each task runs one block of the symbolic matrix with the single-machine backends (CPU, or
CUDA on a GPU worker) and returns the reduction's raw partial state; the states of one row
block merge along the columns with the reduction's own ``merge`` in a tree (``split_every``
at a time, adjacent parts, so the first index wins ties as on one machine), then
``finalize`` gives the outputs. Index states are made global by the block's first column.
A task carries a :class:`BlockJob` (formula, reduction, options: small and picklable), never
a compiled kernel: each worker compiles (or loads from the shared cache) its kernels once.
``plan`` sends here every call with a dask array among its operands, and ``backend="dask"``
calls on numpy arrays (chunked here).

The result is a lazy dask array whose row chunks are those of the output variables (split
so that a task stays under about a second); nothing runs before ``.compute()``/``.persist()``.

>>> import numpy as np, dask.array as da, lazymat as lm
>>> x = da.from_array(np.random.rand(1000, 3), chunks=300)
>>> s = (-lm.Vi(x).sqdist(lm.Vj(x))).exp().sum(dim=1)   # a dask array
>>> s.shape, s.chunks[0]
((1000, 1), (300, 300, 300, 100))

Options (``dask.config.set({"lazymat.split-every": 4})``), read when the graph is built:

- ``lazymat.pairs-per-task`` (2**28): the size of a block, in (i, j) pairs;
- ``lazymat.rows-per-task`` / ``lazymat.columns-per-task`` (None: wide blocks, 2048 rows
  or more when N is small, and the columns the pairs allow);
- ``lazymat.split-every`` (8): how many column parts one merge task combines;
- ``lazymat.worker-backend`` ("auto": CUDA on workers that own a GPU, as dask-cuda's, else
  CPU; or "cpu", "cuda", "reference");
- ``lazymat.threads-per-task`` (1: each worker thread runs a single-threaded kernel).
"""

from __future__ import annotations

import math
import os
import pickle
import sys
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from .. import config, reductions
from ..arraylib import NUMPY, is_dask
from ..errors import ShapeError
from ..formula import Node, variables
from . import launch as abi
from .base import REGISTRY, Launch

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


# --------------------------------------------------------------------------- what a task runs

@dataclass(frozen=True)
class BlockJob:
    """Everything a task carries (pickled into every task: small, no lambda, no handle):
    the oriented reduction of a :class:`Launch` (category 0 = output rows, reduced over
    category 1) without its arrays, and the single-machine backend the workers use.
    """

    reduction: str
    formula: Node
    weight: Node | None
    K: int | None
    dtype: str
    accumulation: tuple[str, str]
    batch: tuple[int, ...]
    store: str = "output"  # what the graph returns: finalized outputs or the merged state
    backend: str = "auto"
    threads: int | None = None

    @property
    def red(self) -> Any:
        return reductions.get(self.reduction)

    def launch(self, arrays: Sequence[Any], m: int, n: int, store: str) -> Launch:
        """The single-machine launch of one block (m output rows, n columns)."""
        weight = self.weight
        arrays = [np.ascontiguousarray(a) for a in arrays]
        offsets = None
        if self.batch:
            used = {v.params[0]: (v.params[1], v.params[2])
                    for root in (self.formula, weight) if root is not None
                    for v in variables(root)}
            offsets = abi.batch_offsets(arrays, [used.get(p) for p in range(len(arrays))],
                                        self.batch)
        like = arrays[0] if arrays else np.empty(1, dtype=self.dtype)
        return Launch(self.red, self.formula, weight, self.K, self.dtype,
                      self.accumulation, arrays, m, n, self.batch, offsets, None, NUMPY, like,
                      store)


def state_layout(job: BlockJob) -> list[tuple[str, tuple[int, ...]]]:
    """(kind, per-row shape) of each array of a block's raw state, as ``block_state`` gives
    it: the reduction's ``state``."""
    red, fdim, wdim = job.red, job.formula.dim, (job.weight.dim if job.weight else None)
    return list(red.state(fdim, job.K, wdim))


def block_state(job: BlockJob, arrays: Sequence[Any], m: int, n: int) -> tuple:
    """The raw state of one block (indices local to the block), each array of shape
    (nbatch * m,) + its per-row shape, in the order of :func:`state_layout`: the kernel's
    raw-state store."""
    rows = math.prod(job.batch) * m
    backend = REGISTRY[_worker_backend(job.backend)]
    state = backend.run(job.launch(arrays, m, n, "state"))
    return tuple(np.asarray(p).reshape((rows,) + s)
                 for p, (_, s) in zip(state, state_layout(job)))


def _worker_backend(wanted: str) -> str:
    """The single-machine backend of a task: "auto" is CUDA on a worker given a GPU (as
    dask-cuda's workers are, through CUDA_VISIBLE_DEVICES) when the CUDA backend can run,
    else the CPU backend (the reference one without a compiler)."""
    if wanted != "auto":
        return wanted
    if os.environ.get("CUDA_VISIBLE_DEVICES", "").strip() not in ("", "-1"):
        if REGISTRY["cuda"].unavailable_reason() is None:
            return "cuda"
    return "cpu" if REGISTRY["cpu"].unavailable_reason() is None else "reference"


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
    """Index states (int64 arrays) shifted by the block's first column; -1 (no column) stays.
    """
    def shift(a: np.ndarray) -> np.ndarray:
        return np.where(a >= 0, a + j0, a) if a.dtype.kind == "i" and j0 else a

    return tuple(shift(a) for a in state)


def merge_task(job: BlockJob, states: list) -> Any:
    """The state of adjacent column parts (in column order, indices already global)."""
    with np.errstate(all="ignore"):
        return abi.combine(job.red, NUMPY, states, None, job.K)


def finalize_task(job: BlockJob, state: Any, m: int, which: int | None = None) -> Any:
    """The outputs (or, for store="state", the state) of one row block, shaped
    batch + (m,) + their per-row shape; output ``which`` alone when given."""
    if job.store == "state":
        outs, shapes = state, state_layout(job)
    else:
        with np.errstate(all="ignore"):
            outs = abi.finalize(job.red, NUMPY, state, np.empty(0, dtype=job.dtype))
        shapes = job.red.outputs(job.formula.dim, job.K,
                                 job.weight.dim if job.weight else None)
    outs = tuple(np.asarray(o).reshape(job.batch + (m,) + s) for o, (_, s) in zip(outs, shapes))
    return outs if which is None else outs[which]


# --------------------------------------------------------------------------- the graph

def run(launch: Launch) -> tuple:
    """The launch as lazy dask arrays, one per entry of ``launch.shapes``, each of shape
    batch + (M,) + its per-row shape, row-chunked (see the module docstring)."""
    reason = unavailable_reason()
    if reason is not None:
        raise ShapeError(f"backend='dask' cannot run: {reason}")
    if launch.ranges is not None:
        raise ShapeError("block-sparse ranges are not supported with dask arrays: the dask "
                         "backend already cuts the work into blocks. Reduce without ranges, "
                         "or compute each cluster's reduction with numpy arrays")
    if any(is_dask(a) and any(math.isnan(c) for c in a.shape) for a in launch.arrays):
        raise ShapeError("a dask operand has unknown chunk sizes: call "
                         ".compute_chunk_sizes() on it first")
    cats = [cat for _, cat in launch.arg_dims]
    out_chunks, red_chunks = _task_chunks(launch, cats)
    dask_arrays = {}
    for p, a in enumerate(launch.arrays):
        chunks = {0: out_chunks, 1: red_chunks}.get(cats[p])
        if is_dask(a) or chunks is not None:
            dask_arrays[p] = _rechunked(a, chunks)
    job = BlockJob(launch.red.name, launch.formula, launch.weight, launch.K, launch.dtype,
                   launch.accumulation, launch.batch, launch.store,
                   backend=str(_option("worker-backend")), threads=_option("threads-per-task"))
    kinds = [kind for kind, _ in launch.shapes]
    dtypes = [np.dtype(np.int64) if k == "index" else
              np.dtype("float32" if k == "acc" and launch.accumulation[0] == "float" else
                       "float64" if k == "acc" else launch.dtype) for k in kinds]
    return _build(job, launch.arrays, dask_arrays, cats, out_chunks, red_chunks,
                  [s for _, s in launch.shapes], dtypes)


_MIN_ROWS = 2048


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


def _task_chunks(launch: Launch, cats: list[int]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Row chunks of the output side (the user's, split to the task size) and of the reduced
    side (uniform, at least K columns each)."""
    M, N = launch.M, launch.N
    pairs = int(_option("pairs-per-task"))
    user = next((a.chunks[-2] for a, c in zip(launch.arrays, cats) if c == 0 and is_dask(a)),
                (M,))
    # Wide blocks: enough rows to fill the kernel's lanes, as many columns as the pairs
    # allow. Moving a block costs far less than computing it (2048 x 131072 points of
    # D = 3 are 1.6 MB for 2.7e8 pairs), and fewer column parts mean fewer merges and, for
    # the K-min family, fewer restarts of each row's sorted list.
    row_cap = _option("rows-per-task") or max(_MIN_ROWS, pairs // max(N, 1))
    out_chunks = _split(user, int(row_cap))
    cols = _option("columns-per-task") or max(1, pairs // max(out_chunks))
    return out_chunks, _uniform(N, int(min(cols, N)), int(launch.K or 1))


def _rechunked(a: Any, row_chunks: tuple[int, ...] | None) -> Any:
    """``a`` as a dask array: batch and feature dims in one chunk, rows in ``row_chunks``
    (a parameter: one chunk)."""
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
    if cat == 2:
        return (a.name,) + (0,) * a.ndim
    return (a.name,) + (0,) * (a.ndim - 2) + (r, 0)


def _build(job: BlockJob, arrays: Sequence[Any], dask_arrays: dict[int, Any], cats: list[int],
           out_chunks: tuple[int, ...], red_chunks: tuple[int, ...],
           shapes: list[tuple[int, ...]], dtypes: list[Any]) -> tuple:
    import operator

    import dask.array as da
    from dask.base import tokenize
    from dask.highlevelgraph import HighLevelGraph

    red = job.reduction
    token = tokenize(pickle.dumps(job), sorted((p, a.name) for p, a in dask_arrays.items()),
                     out_chunks, red_chunks)
    block_name, merge_name = f"lazymat-{red}-block-{token}", f"lazymat-{red}-merge-{token}"
    # One output: the finalize tasks are its chunks; more: a finalize task per row block
    # and one pick per output chunk.
    several = len(shapes) > 1
    final_name = f"lazymat-{red}-finalize-{token}" if several else f"lazymat-{red}-{token}"
    nb = len(job.batch)

    def chunk_key(name: str, k: int, i: int) -> tuple:
        return (name,) + (0,) * nb + (i,) + (0,) * len(shapes[k])

    split_every = max(2, int(_option("split-every")))
    starts = np.concatenate([[0], np.cumsum(red_chunks)]).astype(int).tolist()
    layer: dict[tuple, Any] = {}
    levels, merges = 0, 0
    for i, m in enumerate(out_chunks):
        current = []
        for j, n in enumerate(red_chunks):
            args = [_block_key(dask_arrays[p], cats[p], i if cats[p] == 0 else j)
                    if p in dask_arrays else np.asarray(arrays[p]) for p in range(len(arrays))]
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
        if several:
            layer[(final_name, i)] = (finalize_task, job, current[0], m)
        else:
            layer[chunk_key(final_name, 0, i)] = (finalize_task, job, current[0], m, 0)
    if config.verbose():
        print(f"[lazymat] dask {red}: {len(out_chunks)} x {len(red_chunks)} block tasks "
              f"(rows <= {max(out_chunks)}, columns <= {max(red_chunks)}, "
              f"{max(out_chunks) * max(red_chunks):.2e} pairs each), {merges} merge tasks in "
              f"{levels} level(s) (split_every {split_every}), {len(out_chunks)} finalize "
              f"tasks; worker backend {job.backend}", file=sys.stderr)
    base = HighLevelGraph.from_collections(final_name, layer,
                                           dependencies=list(dask_arrays.values()))
    outs = []
    for k, (shape, dtype) in enumerate(zip(shapes, dtypes)):
        out_name, graph = final_name, base
        if several:
            out_name = f"lazymat-{red}-{token}" if k == 0 else f"lazymat-{red}-{k}-{token}"
            picks = {chunk_key(out_name, k, i): (operator.getitem, (final_name, i), k)
                     for i in range(len(out_chunks))}
            graph = HighLevelGraph({**base.layers, out_name: picks},
                                   {**base.dependencies, out_name: {final_name}})
        chunks = tuple((b,) for b in job.batch) + (out_chunks,) + tuple((s,) for s in shape)
        outs.append(da.Array(graph, out_name, chunks,
                             meta=np.empty((0,) * len(chunks), dtype=dtype)))
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
