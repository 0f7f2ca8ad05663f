"""From a reduction request and its arrays to outputs: checks, backend choice, launch.

Every front end (LazyTensor, Genred) ends here. All user errors are raised
here *before* anything is compiled, naming the operand and the shapes.

>>> import numpy as np
>>> from lazymat.formula import Var, SqDist
>>> req = Request("Sum", SqDist(Var(0, 1, 0), Var(1, 1, 1)), axis=1)
>>> run(req, [np.zeros((2, 1)), np.ones((3, 1))], names=["x", "y"])[0].ravel().tolist()
[3.0, 3.0]
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from . import config, reductions
from .arraylib import is_torch, lib_of
from .errors import CudaUnavailableError, DtypeError, ShapeError
from .formula import I_CAT, J_CAT, P_CAT, Node, Var, substitute, variables
from .reductions import ReductionDef

BACKENDS = ("auto", "cpu", "cuda", "reference")  # and KeOps' "GPU", "GPU_1D"...: "cuda"
#: float16 and bfloat16 data are reduced in float32 and the results returned in their dtype.
_HALF_DTYPES = ("float16", "bfloat16")
_FLOAT_DTYPES = ("float32", "float64") + _HALF_DTYPES


@dataclass(frozen=True)
class Request:
    """A reduction of a formula: ``reduction`` over j (axis=1) or over i (axis=0).

    Variables are ``Var(position, dim, cat)`` with cat 0 = i, 1 = j, 2 = parameter.
    """

    reduction: str
    formula: Node
    axis: int = 1
    K: int | None = None
    weight: Node | None = None
    dtype_acc: str = "auto"  # "auto", "float32" or "float64" (sums)
    sum_scheme: str = "auto"  # "auto", "block_sum", "direct_sum" or "kahan_scheme" (Sum)

    @property
    def definition(self) -> ReductionDef:
        return reductions.get(self.reduction)

    def accumulation(self, dtype: str) -> tuple[str, str]:
        """The C accumulator type and scheme of the kernel's sums. The default (auto) is
        block sums into double: at least as accurate as any of KeOps' schemes, at no cost."""
        if self.dtype_acc == "float32" and dtype == "float64":
            raise DtypeError("dtype_acc='float32' cannot accumulate float64 data")
        acc = "float" if self.dtype_acc == "float32" else "double"
        scheme = {"auto": "block", "block_sum": "block", "direct_sum": "direct",
                  "kahan_scheme": "kahan"}[self.sum_scheme]
        return acc, scheme


_dtype_names: dict[Any, str] = config.memo("plan.dtype_names", maxsize=None)


def _dtype_name(a: Any) -> str:
    dt = a.dtype
    name = _dtype_names.get(dt)  # str(dtype) costs microseconds; this is on every call
    if name is None:
        name = _dtype_names[dt] = str(dt).replace("torch.", "")
    return name


def _device(a: Any) -> str:
    return str(a.device) if is_torch(a) else "cpu"


def check_request(req: Request) -> None:
    """Checks that need no data: reduction name, axis, K, formula dims."""
    try:
        red = req.definition
    except KeyError:
        raise ShapeError(f"unknown reduction {req.reduction!r}; known: "
                         f"{', '.join(sorted(reductions.REDUCTIONS))}") from None
    if req.axis not in (0, 1):
        raise ShapeError(f"axis/dim must be 0 (reduce over i) or 1 (reduce over j), "
                         f"got {req.axis!r}")
    if red.needs_k:
        K = req.K
        if isinstance(K, float) and not math.isfinite(K):
            raise ShapeError(f"{red.name} needs a finite integer K, got {K!r}")
        if not isinstance(K, (int, np.integer)) or isinstance(K, bool) or K < 1:
            raise ShapeError(f"{red.name} needs an integer K >= 1, got {K!r}")
    if red.scalar_formula and req.formula.dim != 1:
        raise ShapeError(f"{red.name} needs a scalar formula (dim 1), got dim {req.formula.dim}")
    if red.weight == "required" and req.weight is None:
        raise ShapeError(f"{red.name} needs a weight formula (formula2 / weight=)")
    if red.weight == "none" and req.weight is not None:
        raise ShapeError(f"{red.name} takes no weight formula")


_signatures: dict[tuple, dict[int, Node]] = config.memo("plan.signatures", maxsize=1024)


def _arguments(req: Request) -> dict[int, Node]:
    """The variable at each argument position (memoized per formula)."""
    key = (req.formula, req.weight)
    by_pos = _signatures.get(key)
    if by_pos is not None:
        return by_pos
    by_pos = {}
    for v in variables(req.formula) + (variables(req.weight) if req.weight is not None else ()):
        pos, dim, cat = v.params
        if pos in by_pos and by_pos[pos] is not v:
            raise ShapeError(f"argument {pos} is used with two signatures: "
                             f"{_sig(by_pos[pos])} and {_sig(v)}")
        by_pos[pos] = v
    _signatures[key] = by_pos
    return by_pos


def _validate(req: Request, arrays: Sequence[Any], names: Sequence[str],
              sizes: tuple[int | None, int | None], like: Any):
    """Check the arrays against the formula's variables; return (M, N, batch, dtype, xp).

    Variables may have leading batch dims, broadcast as in numpy: an i-variable is
    (..., M, D), a j-variable (..., N, D), a parameter (..., D).
    """
    by_pos = _arguments(req)
    if by_pos and max(by_pos) >= len(arrays):
        raise ShapeError(f"the formula uses argument {max(by_pos)} "
                         f"({names[max(by_pos)] if max(by_pos) < len(names) else '?'}) "
                         f"but only {len(arrays)} arrays were given")
    if not arrays and like is None:
        raise ShapeError("a reduction needs at least one array (to know M, N and the dtype)")
    first = arrays[0] if arrays else like
    xp = lib_of(first)
    dtype, device = _dtype_name(first), _device(first)
    if dtype not in _FLOAT_DTYPES:
        _check_array(first, names[0] if arrays else "the data", xp, dtype, device, names)
    # Fast path (every call): same type and dtype object, numpy or same device.
    t, dt0 = type(first), first.dtype
    numpy_arrays = xp.name == "numpy"
    for a, name in zip(arrays, names):
        if type(a) is not t or a.dtype is not dt0 or not (numpy_arrays or _device(a) == device):
            _check_array(a, name, xp, dtype, device, names)
    seen: dict[int, tuple[int, str]] = {}
    batch: tuple[int, ...] = ()
    batch_from: list[tuple[str, tuple[int, ...]]] = []
    for pos, v in sorted(by_pos.items()):
        _, dim, cat = v.params
        a, name = arrays[pos], names[pos]
        shape = tuple(a.shape)
        if cat == P_CAT:
            if not shape or shape[-1] != dim:
                raise ShapeError(f"{name} is a parameter of dim {dim}: expected shape ({dim},) "
                                 f"(with batch dims: (..., {dim})), got {shape}")
            batch = _broadcast_batch(batch, shape[:-1], name, batch_from)
            continue
        if len(shape) < 2 or shape[-1] != dim:
            raise ShapeError(f"{name} is {'an i' if cat == I_CAT else 'a j'}-variable of dim "
                             f"{dim}: expected shape (n, {dim}) (with batch dims: "
                             f"(..., n, {dim})), got {shape}")
        batch = _broadcast_batch(batch, shape[:-2], name, batch_from)
        shape = shape[-2:]
        if cat in seen and seen[cat][0] != shape[0]:
            other = seen[cat][1]
            letter = "M" if cat == I_CAT else "N"
            raise ShapeError(f"{name} has {shape[0]} rows but {other} has {seen[cat][0]}: "
                             f"all {'i' if cat == I_CAT else 'j'}-variables must share {letter}")
        seen.setdefault(cat, (shape[0], name))
    M = seen.get(I_CAT, (sizes[0] or 1, ""))[0]
    N = seen.get(J_CAT, (sizes[1] or 1, ""))[0]
    return M, N, batch, dtype, xp


def _broadcast_batch(batch: tuple[int, ...], dims: tuple[int, ...], name: str,
                     seen: list[tuple[str, tuple[int, ...]]]) -> tuple[int, ...]:
    """numpy broadcasting of batch dims, with an error naming the operands."""
    if not dims and not batch:
        return batch
    n = max(len(batch), len(dims))
    a, b = (1,) * (n - len(batch)) + batch, (1,) * (n - len(dims)) + dims
    out = []
    for x, y in zip(a, b):
        if x != y and x != 1 and y != 1:
            described = ", ".join(f"{nm} {d}" for nm, d in seen + [(name, dims)])
            raise ShapeError(f"batch dims do not broadcast: {described}")
        out.append(max(x, y))
    seen.append((name, dims))
    return tuple(out)


def validate(req: Request, arrays: Sequence[Any], names: Sequence[str] | None = None,
             sizes: tuple[int | None, int | None] = (None, None), like: Any = None
             ) -> tuple[int, int, tuple[int, ...], str]:
    """The checks of :func:`run`, without running: (M, N, batch dims, dtype name).

    Front ends that run reductions their own way (lazymat.jax) raise the same errors.
    """
    check_request(req)
    names = list(names) if names is not None else [f"argument {k}" for k in range(len(arrays))]
    M, N, batch, dtype, _ = _validate(req, arrays, names, sizes, like)
    return M, N, batch, dtype


def batch_offsets(arrays: Sequence[Any], by_pos: dict[int, Node], batch: tuple[int, ...]
                  ) -> np.ndarray:
    """(prod(batch), len(arrays)) element offsets of each batch in each array (0 along
    broadcast dims), for contiguous arrays."""
    nbatch = math.prod(batch)
    offsets = np.zeros((nbatch, max(1, len(arrays))), dtype=np.int64)
    if not batch:
        return offsets
    grid = np.indices(batch).reshape(len(batch), -1)  # (ndims, nbatch) batch multi-indices
    for pos, v in by_pos.items():
        shape = tuple(arrays[pos].shape)
        inner = shape[-1:] if v.params[2] == P_CAT else shape[-2:]
        own = (1,) * (len(batch) - (len(shape) - len(inner))) + shape[:len(shape) - len(inner)]
        stride, total = [], math.prod(inner)
        for d in reversed(own):
            stride.append(0 if d == 1 else total)
            total *= d
        offsets[:, pos] = (np.array(stride[::-1], dtype=np.int64)[:, None] * grid).sum(0)
    return offsets


def _check_array(a: Any, name: str, xp: Any, dtype: str, device: str,
                 names: Sequence[str]) -> None:
    """The slow path of the checks: raises the error that explains the mismatch."""
    if lib_of(a) is not xp:
        raise DtypeError(f"{name} is a {lib_of(a).name} array but {names[0]} is a "
                         f"{xp.name} array: do not mix libraries")
    dt = _dtype_name(a)
    if dt not in _FLOAT_DTYPES:
        kind = "complex" if "complex" in dt else "integer" if "int" in dt else dt
        raise DtypeError(f"{name} has dtype {dt}: lazymat needs floating-point data "
                         f"({kind} arrays are not supported here); convert it with "
                         f".astype/.to(float32 or float64; float16 and bfloat16 are "
                         f"computed in float32)")
    if dt != dtype:
        raise DtypeError(f"{name} has dtype {dt} but {names[0]} has dtype {dtype}: "
                         f"all arrays of a reduction must share one dtype")
    if _device(a) != device:
        raise DtypeError(f"{name} is on device {_device(a)} but {names[0]} is on {device}")


def _sig(v: Node) -> str:
    pos, dim, cat = v.params
    return f"Var({pos},{dim},{cat})"


def _swap_categories(f: Node) -> Node:
    mapping = {}
    for v in variables(f):
        pos, dim, cat = v.params
        if cat in (I_CAT, J_CAT):
            mapping[v] = Var(pos, dim, J_CAT if cat == I_CAT else I_CAT)
    return substitute(f, mapping)


_warned: set[str] = set()  # the fallback warnings already given (once per process each)
# memo of backends.cuda.unavailable_reason()
_cuda_reason: dict[str, str | None] = config.memo("plan.cuda_reason", maxsize=None)


def cuda_unavailable_reason() -> str | None:
    """Why the CUDA backend cannot run (None when it can); looked up once per process."""
    if "cuda" not in _cuda_reason:
        from .backends import cuda

        _cuda_reason["cuda"] = cuda.unavailable_reason()
    return _cuda_reason["cuda"]


def choose_backend(backend: str, xp: Any, first: Any) -> str:
    """"cpu", "cuda" or "reference" for the backend asked for and the data's device.

    "auto" is CUDA for CUDA tensors (the reference backend, with a warning, when the CUDA
    backend cannot run) and the compiled CPU backend otherwise.
    """
    backend = str(backend).lower()
    if backend.startswith("gpu"):  # KeOps' names: "GPU", "GPU_1D", "GPU_2D"
        backend = "cuda"
    if backend not in BACKENDS:
        raise ShapeError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    on_gpu = _device(first) != "cpu"
    if backend == "cpu" and on_gpu:
        raise DtypeError(f"backend='cpu' needs CPU arrays, got a tensor on {_device(first)}")
    if backend == "cuda":
        reason = cuda_unavailable_reason()
        if reason is not None:
            raise CudaUnavailableError(f"backend='cuda' cannot run here: {reason}. "
                                       "lazymat.check_health() tells more.")
        if on_gpu and not _device(first).startswith("cuda"):
            raise DtypeError(f"backend='cuda' needs CUDA tensors or CPU arrays, got a "
                             f"tensor on {_device(first)}")
        return "cuda"
    if backend != "auto":
        return backend
    if on_gpu:
        reason = cuda_unavailable_reason() if _device(first).startswith("cuda") else "not CUDA"
        if reason is None:
            return "cuda"
        if "gpu" not in _warned:
            warnings.warn(f"lazymat: tensors on {_device(first)} but the CUDA backend cannot "
                          f"run ({reason}); using the slow reference backend. "
                          "lazymat.check_health() tells more.", RuntimeWarning, stacklevel=3)
            _warned.add("gpu")
        return "reference"
    if not _have_compiler():
        if "compiler" not in _warned:
            warnings.warn("lazymat: no C++ compiler found (looked for $CXX, g++, clang++); "
                          "using the slow reference backend. lazymat.check_health() tells more.",
                          RuntimeWarning, stacklevel=3)
            _warned.add("compiler")
        return "reference"
    return "cpu"


def _have_compiler() -> bool:
    from .compile import compiler_info  # memoized there

    return compiler_info() is not None


def run(req: Request, arrays: Sequence[Any], *, names: Sequence[str] | None = None,
        backend: str = "auto", out: Any = None,
        sizes: tuple[int | None, int | None] = (None, None), like: Any = None,
        ranges: Sequence[Any] | None = None) -> tuple:
    """Run a reduction; returns a tuple of outputs (values and/or int64 indices).

    ``sizes`` gives M and N when no i- (or j-) variable is left in the formula (else 1);
    ``like`` the library and dtype when no array is left at all; ``ranges`` the KeOps
    block-sparse 6-tuple (ranges_i, slices_i, redranges_j, ranges_j, slices_j, redranges_i).
    """
    check_request(req)
    names = list(names) if names is not None else [f"argument {k}" for k in range(len(arrays))]
    M, N, batch, dtype, xp = _validate(req, arrays, names, sizes, like)
    like = arrays[0] if arrays else like
    if dtype in _HALF_DTYPES:
        return _run_half(req, arrays, names, backend, out, sizes, like, ranges)
    red = req.definition
    if red.needs_k and req.K > (N if req.axis == 1 else M):
        raise ShapeError(f"{red.name}: K = {req.K} is larger than the number of "
                         f"{'columns N' if req.axis == 1 else 'rows M'} = "
                         f"{N if req.axis == 1 else M} being reduced")
    formula, weight = req.formula, req.weight
    if req.axis == 0:
        formula = _swap_categories(formula)
        weight = _swap_categories(weight) if weight is not None else None
        M, N = N, M
    oriented_ranges = _check_ranges(ranges, req.axis, M, N) if ranges is not None else None
    which = choose_backend(backend, xp, like)
    wdim = weight.dim if weight is not None else None
    shapes = red.out_dims(formula.dim, req.K, wdim)
    if out is not None:
        _check_out(out, batch + (M,) + _squeezed(shapes[0][1], red), like, shapes[0][0])
    if M == 0 or N == 0 or 0 in batch:
        outs = tuple(
            xp.full(batch + (M,) + shape, fill, like=like,
                    dtype=xp.int64 if kind == "index" else None)
            for (kind, shape), fill in zip(shapes, red.identity))
    elif which == "reference":
        from .backends import reference

        outs = reference.run(red, formula, weight, req.K, arrays, M, N, xp, like, batch,
                             oriented_ranges)
    else:
        offsets = batch_offsets(arrays, _arguments(req), batch) if batch else None
        args = (red, formula, weight, req.K, arrays, M, N, dtype, xp, shapes, like, batch,
                offsets, oriented_ranges, req.accumulation(dtype))
        if which == "cpu":
            from .backends import cpu

            outs = cpu.run(*args)
        else:
            outs = _run_cuda(args)
    outs = tuple(o.reshape(batch + (M,) + _squeezed(shape, red))
                 for o, (_, shape) in zip(outs, shapes))
    if out is not None:
        out[...] = outs[0]
        return (out,) + outs[1:]
    return outs


def _run_cuda(args: tuple) -> tuple:
    """The CUDA backend; numpy arrays go to the current GPU and their results come back."""
    from .backends import cuda

    xp, like = args[8], args[10]
    if xp.name == "torch":
        return cuda.run(*args)
    import torch

    device = torch.device("cuda", torch.cuda.current_device())
    arrays = [torch.from_numpy(np.ascontiguousarray(a)).to(device) for a in args[4]]
    like = arrays[0] if arrays else torch.from_numpy(np.asarray(like)).to(device)
    outs = cuda.run(*args[:4], arrays, *args[5:8], lib_of(like), args[9], like, *args[11:])
    return tuple(o.cpu().numpy() for o in outs)


def _run_half(req: Request, arrays: Sequence[Any], names: Sequence[str], backend: str,
              out: Any, sizes: tuple[int | None, int | None], like: Any,
              ranges: Sequence[Any] | None) -> tuple:
    """float16/bfloat16 data: reduce in float32, return the values in the data's dtype."""
    def widen(a: Any) -> Any:
        return a.float() if is_torch(a) else np.asarray(a, dtype=np.float32)

    outs = run(req, [widen(a) for a in arrays], names=names, backend=backend, sizes=sizes,
               like=widen(like), ranges=ranges)
    outs = tuple(o if _dtype_name(o) == "int64" else
                 (o.to(like.dtype) if is_torch(o) else o.astype(like.dtype)) for o in outs)
    if out is not None:
        _check_out(out, tuple(outs[0].shape), like, "index" if _dtype_name(outs[0]) == "int64"
                   else "value")
        out[...] = outs[0]
        return (out,) + outs[1:]
    return outs


def check_ranges(ranges: Sequence[Any], axis: int, M: int, N: int
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The block-sparse 6-tuple checked: (ranges_i, slices_i, redranges_j) of this axis as
    int64 numpy arrays (M output rows and N reduced columns, already oriented)."""
    return _check_ranges(ranges, axis, M, N)


_RANGE_NAMES = ("ranges_i", "slices_i", "redranges_j", "ranges_j", "slices_j", "redranges_i")


def _check_ranges(ranges: Sequence[Any], axis: int, M: int, N: int
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The three arrays of the 6-tuple that serve this axis, checked, as int64 numpy arrays.

    M is the number of output rows and N of reduced columns (already oriented).
    """
    if len(ranges) != 6:
        raise ShapeError(f"ranges must be the 6-tuple {_RANGE_NAMES}, got {len(ranges)} items")
    picked = (0, 1, 2) if axis == 1 else (3, 4, 5)
    out = []
    for k in picked:
        a = ranges[k]
        a = a.detach().cpu().numpy() if is_torch(a) else np.asarray(a)
        if a.dtype.kind not in "iu":
            raise DtypeError(f"{_RANGE_NAMES[k]} must hold integers, got dtype {a.dtype}")
        out.append(np.ascontiguousarray(a, dtype=np.int64))
    rows, slices, cols = out
    names = [_RANGE_NAMES[k] for k in picked]
    if rows.ndim != 2 or rows.shape[1] != 2 or cols.ndim != 2 or cols.shape[1] != 2:
        raise ShapeError(f"{names[0]} and {names[2]} must have shape (n, 2), got "
                         f"{rows.shape} and {cols.shape}")
    if slices.shape != (len(rows),):
        raise ShapeError(f"{names[1]} must have one entry per row of {names[0]} "
                         f"({len(rows)}), got shape {slices.shape}")
    for arr, name, limit in ((rows, names[0], M), (cols, names[2], N)):
        if len(arr) and (arr.min() < 0 or arr[:, 1].max() > limit
                         or (arr[:, 0] > arr[:, 1]).any()):
            raise ShapeError(f"{name} holds intervals outside [0, {limit}] or reversed ones")
    if len(slices) and (np.diff(slices).min(initial=0) < 0 or slices[0] < 0
                        or slices[-1] > len(cols)):
        raise ShapeError(f"{names[1]} must be non-decreasing end positions in {names[2]} "
                         f"(at most {len(cols)})")
    order = np.argsort(rows[:, 0], kind="stable")
    if (rows[order][1:, 0] < rows[order][:-1, 1]).any():
        raise ShapeError(f"the output ranges of {names[0]} overlap")
    return rows, slices, cols


def _squeezed(shape: tuple[int, ...], red: ReductionDef) -> tuple[int, ...]:
    # K-reductions give (M, K, D); like KeOps, (M, K) when D = 1.
    return shape[:-1] if red.needs_k and shape[-1] == 1 else shape


def _check_out(out: Any, shape: tuple[int, ...], like: Any, kind: str) -> None:
    if lib_of(out) is not lib_of(like):
        raise DtypeError(f"out= is a {lib_of(out).name} array but the inputs are "
                         f"{lib_of(like).name} arrays")
    if tuple(out.shape) != shape:
        raise ShapeError(f"out= has shape {tuple(out.shape)} but the result has shape {shape}")
    want = "int64" if kind == "index" else _dtype_name(like)
    if _dtype_name(out) != want:
        raise DtypeError(f"out= has dtype {_dtype_name(out)} but the result has dtype {want}")


def num_threads(pairs: int | None = None) -> int:
    """Threads for a reduction: LAZYMAT_NUM_THREADS, OMP_NUM_THREADS or the usable cores;
    one for a tiny problem, where waking threads costs more than the work."""
    if pairs is not None and pairs < 1 << 15:
        return 1
    return config.threads_setting() or config.cores()
