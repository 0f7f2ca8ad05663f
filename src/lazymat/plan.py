"""From a reduction request and its arrays to outputs: checks, backend choice, launch.

Every front end (LazyTensor, Genred, KernelSolve, the autograd glue) ends here. A call is
checked once (all user errors are raised here *before* anything is compiled, naming the
operand and the shapes), oriented once (the kernel always reduces over j: axis=0 swaps i
and j), made into one :class:`~lazymat.backends.base.Launch` (:func:`prepare`) and run by the
backend :data:`~lazymat.backends.base.REGISTRY` names (:func:`execute`).

>>> import numpy as np
>>> from lazymat.formula import Var, SqDist
>>> req = Request("Sum", SqDist(Var(0, 1, 0), Var(1, 1, 1)), axis=1)
>>> run(req, [np.zeros((2, 1)), np.ones((3, 1))], names=["x", "y"])[0].ravel().tolist()
[3.0, 3.0]
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, replace
from typing import Any, Sequence

import numpy as np

from . import config, reductions
from .arraylib import is_dask, is_torch, lib_of
from .backends import launch as abi
from .backends.base import REGISTRY, Launch
from .errors import CudaUnavailableError, DtypeError, ShapeError
from .formula import I_CAT, J_CAT, P_CAT, Node, Var, substitute, variables
from .reductions import ReductionDef

#: What ``backend=`` accepts besides the names in REGISTRY (and KeOps' "GPU", "GPU_1D", ...:
#: "cuda").
AUTO = "auto"
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


_ACC_OPTIONS = ("auto", "float32", "float64")
_SUM_SCHEMES = ("auto", "direct_sum", "block_sum", "kahan_scheme")
# KeOps options: dtype_acc, use_double_acc and sum_scheme choose how sums accumulate; the others
# lazymat accepts and does not need (it has no chunk modes to toggle, device_id is taken from the
# inputs, the dtype from the data).
_ACCEPTED = ("dtype_acc", "use_double_acc", "sum_scheme", "enable_chunks", "use_fast_math",
             "rec_multVar_highdim", "device_id", "dtype", "cuda_type")


def accumulation_options(options: dict[str, Any]) -> dict[str, str]:
    """The Request fields for KeOps' accumulation options (use_double_acc = float64).

    >>> accumulation_options({"use_double_acc": True})
    {'dtype_acc': 'float64', 'sum_scheme': 'auto'}
    """
    dtype_acc = options.get("dtype_acc", "auto")
    if options.get("use_double_acc"):
        if dtype_acc not in ("auto", "float64"):
            raise ShapeError(f"use_double_acc=True conflicts with dtype_acc={dtype_acc!r}")
        dtype_acc = "float64"
    return {"dtype_acc": dtype_acc, "sum_scheme": options.get("sum_scheme", "auto")}


def check_options(where: str, options: dict[str, Any]) -> None:
    """KeOps' accumulation and compilation options: checked, then handled as documented."""
    unknown = [k for k in options if k not in _ACCEPTED]
    if unknown:
        raise TypeError(f"{where}: unexpected keyword argument(s) {', '.join(unknown)}")
    if options.get("dtype_acc", "auto") not in _ACC_OPTIONS:
        raise ShapeError(f"dtype_acc must be one of {_ACC_OPTIONS}, got {options['dtype_acc']!r}")
    if options.get("sum_scheme", "auto") not in _SUM_SCHEMES:
        raise ShapeError(f"sum_scheme must be one of {_SUM_SCHEMES}, got "
                         f"{options['sum_scheme']!r}")


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
    if isinstance(req.axis, bool) or req.axis not in (0, 1):
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


_swapped: dict[Node, Node] = config.memo("plan.swapped", maxsize=1024)


def swap_categories(f: Node) -> Node:
    """``f`` with its i- and j-variables exchanged (an axis=0 reduction, oriented).

    >>> swap_categories(Var(0, 3, 0)).params
    (0, 3, 1)
    """
    found = _swapped.get(f)
    if found is not None:
        return found
    mapping = {}
    for v in variables(f):
        pos, dim, cat = v.params
        if cat in (I_CAT, J_CAT):
            mapping[v] = Var(pos, dim, J_CAT if cat == I_CAT else I_CAT)
    found = _swapped[f] = substitute(f, mapping)
    return found


_warned: set[str] = set()  # the fallback warnings already given (once per process each)
# backend name -> REGISTRY[name].unavailable_reason(), looked up once per process
_reasons: dict[str, str | None] = config.memo("plan.unavailable_reasons", maxsize=None)


def unavailable_reason(backend: str) -> str | None:
    """Why a registered backend cannot run here (None when it can); looked up once."""
    if backend not in _reasons:
        _reasons[backend] = REGISTRY[backend].unavailable_reason()
    return _reasons[backend]


def cuda_unavailable_reason() -> str | None:
    """Why the CUDA backend cannot run (None when it can); looked up once per process."""
    return unavailable_reason("cuda")


def choose_backend(backend: str, first: Any) -> str:
    """The name in ``REGISTRY`` of the backend that runs a call on ``first``'s device.

    "auto" is CUDA for CUDA tensors and the compiled CPU backend otherwise, or (with one
    warning per process) the reference backend when that one cannot run here.
    """
    name = str(backend).lower()
    if name.startswith("gpu"):  # KeOps' names: "GPU", "GPU_1D", "GPU_2D"
        name = "cuda"
    if name != AUTO and name not in REGISTRY:
        raise ShapeError(f"unknown backend {backend!r}; choose one of "
                         f"{', '.join((AUTO, *REGISTRY))}")
    device = _device(first)
    if name == AUTO:
        return _automatic(device)
    if name == "cpu" and device != "cpu":
        raise DtypeError(f"backend='cpu' needs CPU arrays, got a tensor on {device}")
    if name == "cuda":
        reason = unavailable_reason("cuda")
        if reason is not None:
            raise CudaUnavailableError(f"backend='cuda' cannot run here: {reason}. "
                                       "lazymat.check_health() tells more.")
        if device != "cpu" and not device.startswith("cuda"):
            raise DtypeError(f"backend='cuda' needs CUDA tensors or CPU arrays, got a "
                             f"tensor on {device}")
    return name


def _automatic(device: str) -> str:
    if device == "cpu":
        wanted, fallback_reason = "cpu", None
    else:
        wanted, fallback_reason = "cuda", (None if device.startswith("cuda") else "not CUDA")
    reason = fallback_reason or unavailable_reason(wanted)
    if reason is None:
        return wanted
    if wanted not in _warned:
        where = "CPU arrays" if device == "cpu" else f"tensors on {device}"
        warnings.warn(f"lazymat: {where} but the {wanted.upper()} backend cannot run "
                      f"({reason}); using the slow reference backend. "
                      "lazymat.check_health() tells more.", RuntimeWarning, stacklevel=4)
        _warned.add(wanted)
    return "reference"


@dataclass(frozen=True, eq=False)
class Prepared:
    """A checked call, ready to run: the launch and the backend that runs it.

    ``sizes`` are the request's (M, N) (before orientation), ``like`` an array of the
    caller's library, dtype and device (float16/bfloat16 data run in float32: ``half``).
    """

    launch: Launch
    backend: str
    sizes: tuple[int, int]
    like: Any
    half: bool = False

    @property
    def result_shapes(self) -> list[tuple[int, ...]]:
        """The shape of each array :func:`execute` returns."""
        launch = self.launch
        lead = launch.batch + (launch.M,)
        if launch.store == "state":
            return [lead + shape for _, shape in launch.shapes]
        return [lead + _squeezed(shape, launch.red) for _, shape in launch.shapes]


def prepare(req: Request, arrays: Sequence[Any], *, names: Sequence[str] | None = None,
            backend: str = "auto", sizes: tuple[int | None, int | None] = (None, None),
            like: Any = None, ranges: Sequence[Any] | None = None,
            store: str = "output") -> Prepared:
    """Check a call, orient it and pick its backend (nothing is compiled yet).

    ``sizes`` gives M and N when no i- (or j-) variable is left in the formula (else 1);
    ``like`` the library and dtype when no array is left at all; ``ranges`` the KeOps
    block-sparse 6-tuple (ranges_i, slices_i, redranges_j, ranges_j, slices_j, redranges_i);
    ``store="state"`` asks for the reduction's raw partial state instead of its outputs
    (what column splits and distributed runs merge).
    """
    check_request(req)
    if store not in ("output", "state"):
        raise ShapeError(f"store must be 'output' or 'state', got {store!r}")
    names = list(names) if names is not None else [f"argument {k}" for k in range(len(arrays))]
    M, N, batch, dtype, xp = _validate(req, arrays, names, sizes, like)
    like = arrays[0] if arrays else like
    red = req.definition
    if red.needs_k and req.K > (N if req.axis == 1 else M):
        raise ShapeError(f"{red.name}: K = {req.K} is larger than the number of "
                         f"{'columns N' if req.axis == 1 else 'rows M'} = "
                         f"{N if req.axis == 1 else M} being reduced")
    # dask arrays anywhere: lazy dask results, one task per block (backends/dask.py)
    which = "dask" if any(is_dask(a) for a in arrays) else choose_backend(backend, like)
    half = dtype in _HALF_DTYPES
    data, data_like = arrays, like
    if half:  # reduced in float32, returned in the data's dtype
        data = [_widen(a) for a in arrays]
        data_like, dtype = _widen(like), "float32"
    formula, weight, rows, cols = req.formula, req.weight, M, N
    if req.axis == 0:
        formula = swap_categories(formula)
        weight = swap_categories(weight) if weight is not None else None
        rows, cols = N, M
    oriented_ranges = _check_ranges(ranges, req.axis, rows, cols) if ranges is not None else None
    offsets = None
    if batch and which != "reference":
        by_pos = _arguments(req)
        arg_dims = [by_pos[p].params[1:] if p in by_pos else None for p in range(len(arrays))]
        offsets = abi.batch_offsets(data, arg_dims, batch)
    launch = Launch(red, formula, weight, req.K, dtype, req.accumulation(dtype), data, rows,
                    cols, batch, offsets, oriented_ranges, xp, data_like, store)
    return Prepared(launch, which, (M, N), like, half)


def reformulate(prepared: Prepared, req: Request) -> Prepared:
    """``prepared`` with ``req``'s formula: a call over the same arguments, reduction and axis
    (autograd's forward that also reduces Jacobian sums), oriented without checking the
    arrays again.

    The new formula may use only the variables ``prepared``'s formula has, with the same
    dims; the reduction, weight and axis are ``prepared``'s.
    """
    check_request(req)
    formula = req.formula if req.axis == 1 else swap_categories(req.formula)
    return replace(prepared, launch=replace(prepared.launch, formula=formula))


def execute(prepared: Prepared, out: Any = None) -> tuple:
    """Run a prepared call: a tuple of outputs (values and/or int64 indices), or of state
    arrays for ``store="state"``; ``out=`` receives the first one."""
    launch, like = prepared.launch, prepared.like
    if out is not None and launch.store != "output":
        raise ShapeError("out= receives an output: it cannot be used with store='state'")
    shapes = prepared.result_shapes
    if out is not None:
        _check_out(out, shapes[0], like, launch.shapes[0][0])
    if launch.M == 0 or launch.N == 0 or 0 in launch.batch:
        xp = launch.xp
        outs = tuple(xp.full(shape, fill, like=launch.like,
                             dtype=xp.int64 if kind == "index" else None)
                     for shape, (kind, _), fill in zip(shapes, launch.shapes, launch.fills))
    else:
        outs = tuple(o.reshape(shape) for o, shape
                     in zip(REGISTRY[prepared.backend].run(launch), shapes))
    if prepared.half:
        outs = tuple(o if kind != "value" else
                     (o.to(like.dtype) if is_torch(o) else o.astype(like.dtype))
                     for o, (kind, _) in zip(outs, launch.shapes))
    if out is not None:
        out[...] = outs[0]
        return (out,) + outs[1:]
    return outs


def run(req: Request, arrays: Sequence[Any], *, names: Sequence[str] | None = None,
        backend: str = "auto", out: Any = None,
        sizes: tuple[int | None, int | None] = (None, None), like: Any = None,
        ranges: Sequence[Any] | None = None, store: str = "output") -> tuple:
    """Run a reduction (:func:`prepare` then :func:`execute`); returns a tuple of outputs
    (values and/or int64 indices), or the raw state arrays for ``store="state"``."""
    return execute(prepare(req, arrays, names=names, backend=backend, sizes=sizes, like=like,
                           ranges=ranges, store=store), out)


# ------------------------------------------------------------ bound calls (small calls' fast path)

def layout_key(arrays: Sequence[Any]) -> tuple | None:
    """What a bound call checks of its arrays: the (shape, strides, dtype) of each, when all
    are plain numpy arrays (else None: the call takes the general path).

    >>> layout_key([np.zeros((2, 3))])
    (((2, 3), (24, 8), dtype('float64')),)
    """
    key = []
    for a in arrays:
        if type(a) is not np.ndarray:
            return None
        key.append((a.shape, a.strides, a.dtype))
    return tuple(key)


def bind(prepared: Prepared) -> Any:
    """``rerun(arrays)``: the prepared call run again on arrays of the same :func:`layout_key`
    with nothing checked or recomputed but their addresses (a list of outputs, or None when
    the backend's conditions changed: then take the general path). None when this call has
    no fast path (empty, half precision, dask, the reference backend, ranges...).

    Front ends keep these by layout key (:func:`remember`): a repeated call with the same
    layout skips validation, orientation and the launch set-up, and a call with any other
    layout takes the general path, whose checks raise the usual errors.
    """
    launch = prepared.launch
    if (prepared.half or prepared.backend == "dask" or launch.M == 0 or launch.N == 0
            or 0 in launch.batch):
        return None
    return REGISTRY[prepared.backend].bind(launch, prepared.result_shapes)


#: Bound calls kept per front-end object (different layouts of one Genred or LazyTensor).
BOUND_PER_OBJECT = 8


def remember(calls: dict, key: tuple, rerun: Any) -> None:
    """Store a bound call in a front end's dict (the oldest one goes when it is full)."""
    if rerun is None:
        return
    if len(calls) >= BOUND_PER_OBJECT:
        del calls[next(iter(calls))]
    calls[key] = rerun


def _widen(a: Any) -> Any:
    if is_dask(a):
        return a.astype(np.float32)  # stays lazy
    return a.float() if is_torch(a) else np.asarray(a, dtype=np.float32)


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
    # Overlapping column intervals of one output range would count their columns twice.
    group = np.repeat(np.arange(len(slices)), np.diff(slices, prepend=0))
    iv = cols[:len(group)]
    nonempty = iv[:, 1] > iv[:, 0]
    group, iv = group[nonempty], iv[nonempty]
    order = np.lexsort((iv[:, 0], group))
    group, iv = group[order], iv[order]
    clash = np.nonzero((group[1:] == group[:-1]) & (iv[1:, 0] < iv[:-1, 1]))[0]
    if len(clash):
        k = clash[0]
        raise ShapeError(f"{names[2]} intervals {iv[k].tolist()} and {iv[k + 1].tolist()} of "
                         f"output range {group[k]} ({names[0]}[{group[k]}]) overlap: their "
                         "columns would be counted twice")
    return rows, slices, cols


def _squeezed(shape: tuple[int, ...], red: ReductionDef) -> tuple[int, ...]:
    # K-reductions give (M, K, D); like KeOps, (M, K) when D = 1.
    return shape[:-1] if red.needs_k and shape[-1] == 1 else shape


def _check_out_target(out: Any, like: Any) -> None:
    """out= must be an array of the inputs' library and device that can be written."""
    if not (is_torch(out) or isinstance(out, np.ndarray)):
        raise DtypeError(f"out= must be a numpy array or a torch tensor, got "
                         f"{type(out).__name__}")
    if isinstance(out, np.ma.MaskedArray):
        raise DtypeError("out= is a numpy masked array: pass a plain numpy array")
    if isinstance(out, np.ndarray) and not out.flags.writeable:
        raise DtypeError("out= is a read-only numpy array")
    if is_torch(out):
        if out.requires_grad:
            raise DtypeError("out= requires grad: autograd cannot record a write into it")
        if is_torch(like) and out.device != like.device:
            raise DtypeError(f"out= is on {out.device} but the inputs are on {like.device}")


def _check_out(out: Any, shape: tuple[int, ...], like: Any, kind: str) -> None:
    _check_out_target(out, like)
    if lib_of(out) is not lib_of(like):
        raise DtypeError(f"out= is a {lib_of(out).name} array but the inputs are "
                         f"{lib_of(like).name} arrays")
    if tuple(out.shape) != shape:
        raise ShapeError(f"out= has shape {tuple(out.shape)} but the result has shape {shape}")
    want = "int64" if kind == "index" else _dtype_name(like)
    if _dtype_name(out) != want:
        raise DtypeError(f"out= has dtype {_dtype_name(out)} but the result has dtype {want}")
