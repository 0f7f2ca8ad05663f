"""One JAX primitive for every lazymat reduction, with its rules in JAX's tables.

``reduce_p.bind(*arrays, call=Call(...))`` returns the reduction's outputs. Its rules:

- abstract eval: output shapes and dtypes from the request (nothing is computed);
- lowering: an XLA FFI custom call of the compiled CPU kernel (``ffi.py``); a
  ``pure_callback`` of the kernel where FFI is unavailable; the reference backend on
  jax.numpy for ``backend="reference"`` or without a compiler;
- JVP: the tangent is *another reduction*: Sum of the directional derivative dF of the
  formula (built symbolically by ``formula.diff``) for Sum, the softmax-weighted sums
  for LogSumExp and SumSoftMaxWeight, dF at the selected pairs for Min/Max/KMin;
- transpose: the tangent reductions are Sums linear in the tangent arrays; their
  transpose is again a Sum per argument category of ``formula.grad`` (the symbolic VJP);
- batching: the mapped axis becomes the outermost batch dim.

Every rule produces reductions of the same primitive, so the rules compose to any order:
``jax.grad(jax.grad(f))``, ``jax.hessian``, ``jax.jacfwd(jax.grad(f))``, ``jax.vmap``.

>>> import jax.numpy as jnp
>>> from lazymat.formula import Var, SqDist
>>> from lazymat.plan import Request
>>> call = Call(Request("Sum", SqDist(Var(0, 1, 0), Var(1, 1, 1))), (2, 3), "float32")
>>> x, y = jnp.zeros((2, 1), jnp.float32), jnp.ones((3, 1), jnp.float32)
>>> reduce_p.bind(x, y, call=call)[0].ravel().tolist()
[3.0, 3.0]
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, replace
from functools import partial
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

from .. import autograd, plan, reductions
from ..backends import launch as abi
from ..backends.base import Launch
from ..compile import compiler_info
from ..arraylib import lib_of
from ..errors import ShapeError
from ..formula import I_CAT, J_CAT, P_CAT, Node, Var, diff, grad, make, substitute, variables
from ..formula.evaluate import evaluate_rows
from ..formula.factor import factor_sum
from . import ffi


class Ranges:
    """KeOps' block-sparse 6-tuple (ranges_i, slices_i, redranges_j, ranges_j, slices_j,
    redranges_i) as a static, hashable value: numpy arrays compared by content. The same
    tuple serves reductions over i and over j, so derivatives keep the forward's sparsity."""

    def __init__(self, arrays: Sequence[Any]):
        try:
            self.arrays = tuple(np.asarray(a) for a in arrays)
        except jax.errors.TracerArrayConversionError:
            raise ShapeError("ranges= must be concrete arrays (known when tracing), not "
                             "traced values") from None
        self._key = tuple((a.dtype.str, a.shape, a.tobytes()) for a in self.arrays)

    def __hash__(self) -> int:
        return hash(self._key)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Ranges) and self._key == other._key


@dataclass(frozen=True)
class Call:
    """The static description of one reduction (the primitive's only parameter).

    ``req``: the request, its variables numbered 0..n-1 as the arrays; ``sizes``: (M, N),
    the numbers of i and of j (needed when a formula has no i- or no j-variable);
    ``dtype``: the data's; ``backend``: "auto", "cpu", "cuda" or "reference";
    ``ranges``: block-sparse ranges or None.
    """

    req: plan.Request
    sizes: tuple[int, int]
    dtype: str
    backend: str = "auto"
    names: tuple[str, ...] = ()
    ranges: Ranges | None = None

    def oriented_ranges(self) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """(ranges_i, slices_i, redranges_j) of the oriented reduction, or None."""
        if self.ranges is None:
            return None
        _, _, M, N = self.oriented()
        return plan.check_ranges(self.ranges.arrays, self.req.axis, M, N)

    @property
    def red(self) -> reductions.ReductionDef:
        return self.req.definition

    def oriented(self) -> tuple[Node, Node | None, int, int]:
        """(F, W, M, N) with category 0 the output index: the kernel always reduces over j."""
        F, W = self.req.formula, self.req.weight
        M, N = self.sizes
        if self.req.axis == 0:
            F, W, M, N = _swap(F), (_swap(W) if W is not None else None), N, M
        return F, W, M, N

    def launch(self, arrays: Sequence[Any], batch: tuple[int, ...]) -> Launch:
        """The backends' Launch of this call on (traced) jax arrays."""
        F, W, M, N = self.oriented()
        like = arrays[0] if arrays else jnp.zeros((1,), self.dtype)
        by_pos = _by_position(F, W)
        arg_dims = [by_pos[p].params[1:] if p in by_pos else None for p in range(len(arrays))]
        offsets = abi.batch_offsets(arrays, arg_dims, batch) if batch else None
        return Launch(self.red, F, W, self.req.K, self.dtype,
                      self.req.accumulation(self.dtype), list(arrays), M, N, batch, offsets,
                      self.oriented_ranges(), lib_of(like), like)

    def with_request(self, req: plan.Request, names: Sequence[str] = ()) -> "Call":
        return replace(self, req=req, names=tuple(names))


def _swap(f: Node) -> Node:
    mapping = {v: Var(v.params[0], v.params[1], 1 - v.params[2])
               for v in variables(f) if v.params[2] in (I_CAT, J_CAT)}
    return substitute(f, mapping)


def _by_position(*roots: Node | None) -> dict[int, Node]:
    return {v.params[0]: v for r in roots if r is not None for v in variables(r)}


def _inner(v: Node) -> int:
    """Trailing dims of a variable's array that are not batch dims."""
    return 1 if v.params[2] == P_CAT else 2


def _batch(call: Call, shapes: Sequence[tuple[int, ...]]) -> tuple[int, ...]:
    by_pos = _by_position(call.req.formula, call.req.weight)
    lead = [tuple(shapes[p][:len(shapes[p]) - _inner(v)]) for p, v in by_pos.items()]
    return tuple(np.broadcast_shapes(*lead)) if lead else ()


def _squeezed(shape: tuple[int, ...], red: reductions.ReductionDef) -> tuple[int, ...]:
    # K-reductions give (M, K, D); like KeOps, (M, K) when D = 1.
    return shape[:-1] if red.needs_k and shape[-1] == 1 else shape


def index_dtype() -> Any:
    return jnp.int64 if jax.config.jax_enable_x64 else jnp.int32


def _out_avals(call: Call, shapes: Sequence[tuple[int, ...]]) -> list[tuple[tuple, Any]]:
    F, W, M, _ = call.oriented()
    batch = _batch(call, shapes)
    red = call.red
    out = []
    for kind, shape in red.outputs(F.dim, call.req.K, W.dim if W is not None else None):
        dtype = index_dtype() if kind == "index" else np.dtype(call.dtype)
        out.append((batch + (M,) + _squeezed(shape, red), dtype))
    return out


reduce_p = Primitive("lazymat_reduce")
reduce_p.multiple_results = True


def _abstract_eval(*avals, call: Call):
    return [jax.core.ShapedArray(shape, dtype)
            for shape, dtype in _out_avals(call, [a.shape for a in avals])]


reduce_p.def_abstract_eval(_abstract_eval)


@partial(jax.jit, static_argnames="call")
def _jitted(*arrays, call: Call):
    return reduce_p.bind(*arrays, call=call)


reduce_p.def_impl(lambda *arrays, call: _jitted(*arrays, call=call))


def bind(call: Call, arrays: Sequence[Any]) -> list[Any]:
    """The reduction of ``call`` on ``arrays``, its variables first renumbered to the
    arrays it uses (so equal formulas share kernels and no unused array is passed)."""
    req = call.req
    used = sorted(_by_position(req.formula, req.weight))
    if used != list(range(len(arrays))):
        mapping = {}
        for new, old in enumerate(used):
            for v in variables(req.formula) + (variables(req.weight) if req.weight is not None
                                               else ()):
                if v.params[0] == old:
                    mapping[v] = Var(new, v.params[1], v.params[2])
        F = substitute(req.formula, mapping)
        W = substitute(req.weight, mapping) if req.weight is not None else None
        names = [call.names[p] if p < len(call.names) else f"argument {p}" for p in used]
        call = call.with_request(replace(req, formula=F, weight=W), names)
        arrays = [arrays[p] for p in used]
    return reduce_p.bind(*arrays, call=call)


# ---------------------------------------------------------------------- lowering

_warned: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=2)


def _identity(call: Call, shapes) -> list[Any]:
    return [jnp.full(shape, fill, dtype) for (shape, dtype), fill
            in zip(_out_avals(call, shapes), call.red.identity)]


def _lower_impl(*arrays, call: Call, platform: str) -> list[Any]:
    """What the primitive computes, as jax code (FFI call, callback or jax.numpy)."""
    shapes = [tuple(a.shape) for a in arrays]
    F, W, M, N = call.oriented()
    batch = _batch(call, shapes)
    if M == 0 or N == 0 or 0 in batch:
        return _identity(call, shapes)
    backend = call.backend
    if backend == "reference":
        return _reference(call, arrays, batch)
    if compiler_info() is None:
        _warn_once("compiler", "lazymat.jax: no C++ compiler found (looked for $CXX, g++, "
                   "clang++); using the slow reference backend. lazymat.check_health() tells "
                   "more.")
        return _reference(call, arrays, batch) if call.ranges is None else _callback(call,
                                                                                     arrays)
    if platform == "cpu":
        reason = ffi.unavailable_reason()
        if reason is None:
            return _ffi_cpu(call, arrays, batch)
        _warn_once("ffi", f"lazymat.jax: the XLA FFI handler is unavailable ({reason}); "
                   "calling the compiled kernels through jax.pure_callback (a copy per call)")
    if platform == "cuda":
        gpus = [(d.local_hardware_id, "sm_" + str(d.compute_capability).replace(".", ""))
                for d in jax.local_devices(backend="gpu")] if _has_gpu() else []
        reason = ffi.cuda_unavailable_reason() if gpus else None
        if reason is None and call.ranges is not None:
            reason = "block-sparse ranges are not implemented in it"
        if reason is None:  # (without GPUs here: lowered for another process, as jax.export)
            return _ffi_cuda(call, arrays, batch, gpus)
        _warn_once("ffi_cuda", f"lazymat.jax: the CUDA FFI handler is unavailable ({reason})"
                   "; calling the CPU kernels through jax.pure_callback (host copies)")
    return _callback(call, arrays)


def _has_gpu() -> bool:
    try:
        return bool(jax.local_devices(backend="gpu"))
    except RuntimeError:  # no GPU backend in this jaxlib
        return False


def _reference(call: Call, arrays, batch) -> list[Any]:
    from ..backends import reference

    outs = reference.run(call.launch(arrays, batch))
    return [o.reshape(shape).astype(dtype)
            for o, (shape, dtype) in zip(outs, _out_avals(call, [a.shape for a in arrays]))]


def _callback(call: Call, arrays) -> list[Any]:
    """The compiled kernel through jax.pure_callback: host arrays in and out."""
    avals = _out_avals(call, [a.shape for a in arrays])

    def host(*xs):
        outs = plan.run(call.req, [np.asarray(x) for x in xs], names=list(call.names) or None,
                        sizes=call.sizes, like=np.zeros((1,), call.dtype),
                        ranges=call.ranges.arrays if call.ranges is not None else None)
        return tuple(np.asarray(o).astype(dtype).reshape(shape)
                     for o, (shape, dtype) in zip(outs, avals))

    shapes = tuple(jax.ShapeDtypeStruct(shape, dtype) for shape, dtype in avals)
    return list(jax.pure_callback(host, shapes, *arrays, vmap_method="sequential"))


_kernels: dict[Any, int] = {}


def _kernel(launch: Launch) -> int:
    """The handler's id of the compiled CPU kernel of a launch."""
    hit = _kernels.get(launch.key)
    if hit is None:
        from ..backends.cpu import kernel_for
        from ..codegen.cpu import render

        spec = launch.spec
        hit = _kernels[launch.key] = ffi.register_kernel(kernel_for(spec), render(spec))
    return hit


def _results(launch: Launch) -> list[Any]:
    """The FFI call's outputs: (nbatch * M, width), indices as int32 pairs."""
    return [jax.ShapeDtypeStruct((launch.nbatch * launch.M, math.prod(shape))
                                 + ((2,) if kind == "index" else ()),
                                 np.int32 if kind == "index" else np.dtype(launch.dtype))
            for kind, shape in launch.shapes]


def _ffi_cpu(call: Call, arrays, batch) -> list[Any]:
    from ..codegen.cpu import LANES

    launch = call.launch(arrays, batch)
    M, N, nbatch, nargs = launch.M, launch.N, launch.nbatch, len(arrays)
    kid = _kernel(launch)
    offsets = launch.offsets if batch else np.zeros((1, max(1, nargs)), np.int64)
    kinds = [kind for kind, _ in launch.shapes]
    results = _results(launch)
    if launch.ranges is None:  # the handler makes the one range of all rows and columns
        table, ntasks, nslices, filled = np.zeros(0, np.int64), -1, 0, []
    else:  # rows outside every range keep the identity: outputs given filled, aliased
        rows, slices, cols = launch.ranges
        tasks = abi.tasks(rows, LANES[call.dtype])
        table = np.concatenate([tasks.reshape(-1), slices, cols.reshape(-1)])
        ntasks, nslices = len(tasks), len(slices)
        filled = [jnp.full(r.shape, -1 if kind == "index" else fill, r.dtype)
                  for r, kind, fill in zip(results, kinds, launch.fills)]
    first = 2 + nargs
    raw = jax.ffi.ffi_call(ffi.TARGET, results, input_output_aliases={
        first + k: k for k in range(len(filled))} or None)(
        jnp.asarray(ffi.int64_table(offsets)), jnp.asarray(ffi.int64_table(table)), *arrays,
        *filled, kernel=np.int64(kid), M=np.int64(M), N=np.int64(N),
        nbatch=np.int64(nbatch), threads=np.int64(abi.num_threads(nbatch * M * N)),
        lanes=np.int64(LANES[call.dtype]), nargs=np.int64(nargs), ntasks=np.int64(ntasks),
        nslices=np.int64(nslices))
    return _finish(call, arrays, kinds, raw)


def _ffi_cuda(call: Call, arrays, batch, gpus: list[tuple[int, str]]) -> list[Any]:
    """The NVRTC-compiled CUDA kernel as an XLA FFI call on XLA's stream (one part: the
    columns are not split; the tables are constants that XLA keeps on the device)."""
    from ..codegen import cuda as codegen

    launch = call.launch(arrays, batch)
    M, N, nbatch, nargs = launch.M, launch.N, launch.nbatch, len(arrays)
    block = codegen.BLOCK
    name = f"lm_{call.red.name.lower()}_{call.dtype}"
    source = codegen.render(launch.spec, name=name, block=block)
    kid = ffi.load_cuda_kernel(source, name, gpus) if gpus else ffi.kernel_id(source)
    offsets = launch.offsets if batch else np.zeros((1, max(1, nargs)), np.int64)
    tasks = abi.tasks(np.array([[0, M]], np.int64), block)
    table = np.concatenate([tasks.reshape(-1), [1, 0, N]])
    kinds = [kind for kind, _ in launch.shapes]
    results = _results(launch)
    raw = jax.ffi.ffi_call(ffi.CUDA_TARGET, results)(
        jnp.asarray(ffi.int64_table(offsets)), jnp.asarray(ffi.int64_table(table)), *arrays,
        kernel=np.int64(kid), M=np.int64(M), N=np.int64(N), nbatch=np.int64(nbatch),
        ntasks=np.int64(len(tasks)), nslices=np.int64(1), nargs=np.int64(nargs),
        block=np.int64(block), grid=np.int64(max(1, min(nbatch * len(tasks), 65535 * 32))))
    return _finish(call, arrays, kinds, raw)


def _finish(call: Call, arrays, kinds: list[str], raw) -> list[Any]:
    """The FFI call's outputs in the reduction's shapes (index int32 pairs made indices)."""
    final = []
    for r, kind, (shape, dtype) in zip(raw, kinds, _out_avals(call, [a.shape for a in arrays])):
        if kind == "index":
            r = (jax.lax.bitcast_convert_type(r, jnp.int64) if jax.config.jax_enable_x64
                 else r[..., 0])  # little-endian: the low word holds any index below 2**31
        final.append(r.reshape(shape))
    return final


for _platform in ("cpu", "cuda", "rocm"):
    mlir.register_lowering(
        reduce_p, mlir.lower_fun(partial(_lower_impl, platform=_platform),
                                 multiple_results=True), platform=_platform)


# ---------------------------------------------------------------------- forward mode

def _zero_tangent(x: Any) -> Any:
    return ad.Zero(jax.typeof(x).to_tangent_aval())


def _directional(roots: Sequence[Node | None], tangents: Sequence[Any], first: int,
                 renamed=None) -> tuple[list[Node | None], list[Any]]:
    """(Σ_v Diff(root, v, t_v) for each root, the tangent arrays): t_v are new variables
    from position ``first`` on; ``renamed(v, t)`` gives the variable that replaces v and the
    array of its tangent."""
    extra, tvs = [], {}
    for v in sorted({v for r in roots if r is not None for v in variables(r)},
                    key=lambda v: v.params):
        t = tangents[v.params[0]]
        if t is None:
            continue
        target, array = renamed(v, t) if renamed is not None else (v, t)
        tvs[v] = Var(first + len(extra), target.params[1], target.params[2])
        extra.append(array)
    out = []
    for r in roots:
        d = None
        for v, tv in tvs.items():
            if r is not None and v in variables(r):
                term = diff(r, v, tv)
                d = term if d is None else d + term
        out.append(d)
    return out, extra


def _jvp(primals, tangents, *, call: Call):
    red = call.red
    ts = [None if type(t) is ad.Zero else t for t in tangents]
    if red.cotangents is not None:
        outs = reduce_p.bind(*primals, call=call)
        T = _sum_like_tangent(call, primals, outs[0], ts)
        return outs, [T if T is not None else _zero_tangent(outs[0])]
    if red.selects_with is None:  # ArgMin, ArgKMin...: integer outputs, no derivative
        outs = reduce_p.bind(*primals, call=call)
        return outs, [_zero_tangent(o) for o in outs]
    twin = call.with_request(replace(call.req, reduction=red.selects_with), call.names)
    values, indices = reduce_p.bind(*primals, call=twin)
    T = _selection_tangent(call, primals, values, indices, ts)
    T = T if T is not None else _zero_tangent(values)
    if red.name != red.selects_with:
        return [values], [T]
    return [values, indices], [T, _zero_tangent(indices)]


ad.primitive_jvps[reduce_p] = _jvp


def _sum_like_tangent(call: Call, arrays, O, tangents) -> Any:
    """One Sum reduction, linear in the tangents, of each reduction's own rule
    ``red.tangents``: Sum → Σ dF; LogSumExp → Σ e^(F-O) (W dF + dW); SumSoftMaxWeight →
    Σ e^(F-L) (dF (W - O) + dW), L its log-normalizer."""
    red, F, W = call.red, call.req.formula, call.req.weight
    n = len(arrays)
    (dF, dW), extra = _directional((F, W), tangents, n)
    if dF is None and dW is None:
        return None
    out_cat = I_CAT if call.req.axis == 1 else J_CAT

    def saved(array: Any, dim: int) -> Node:  # an output, as a variable of the output index
        extra.append(array)
        return Var(n + len(extra) - 1, dim, out_cat)

    dF = dF if dF is not None else F * 0  # only the weight has a tangent
    Lv = None
    if red.needs_log_normalizer:  # SumSoftMaxWeight: O = Σ p W with p = exp(F - L)
        L, = bind(call.with_request(plan.Request("LogSumExp", F, axis=call.req.axis),
                                    call.names), arrays)
        Lv = saved(L.reshape(O.shape[:-1] + (1,)), 1)
    T = red.tangents(F, W, dF, dW, saved(O, O.shape[-1]), Lv)  # reductions.py's rule
    tangent_call = call.with_request(plan.Request("Sum", T, axis=call.req.axis))
    out, = bind(tangent_call, list(arrays) + extra)
    return out.reshape(O.shape)


def _gather(y: Any, sel: Any) -> Any:
    """Rows sel (..., M) of a reduced-index variable y (..., N, D), batch dims broadcast."""
    batch = tuple(np.broadcast_shapes(tuple(sel.shape[:-1]), tuple(y.shape[:-2])))
    y = jnp.broadcast_to(y, batch + tuple(y.shape[-2:]))
    sel = jnp.broadcast_to(sel, batch + tuple(sel.shape[-1:]))
    return jnp.take_along_axis(y, sel[..., None], axis=-2)


def _selection_tangent(call: Call, arrays, values, indices, tangents) -> Any:
    """The tangent of each selected value: dF at its pair (i, j*), with the reduced-index
    variables and their tangents gathered at j* (a Sum over a single column)."""
    F, _, M, _ = call.oriented()
    if all(t is None for t in tangents):
        return None
    n, D = len(arrays), F.dim
    per_row = 2 if call.red.needs_k and D > 1 else 1
    batch = tuple(indices.shape[:indices.ndim - 1 - per_row])
    idx = indices.reshape(batch + (M, -1, D))
    j_vars = sorted((v for v in variables(F) if v.params[2] == J_CAT), key=lambda v: v.params)
    oriented = call.with_request(plan.Request("Sum", F, axis=1), call.names)
    slots = []
    for r in range(idx.shape[-2]):
        row = []
        for k in range(D):
            sel = idx[..., r, k]
            valid = sel >= 0
            sel = jnp.maximum(sel, 0)
            gathered = {v: Var(n + q, v.params[1], I_CAT) for q, v in enumerate(j_vars)}
            extra = [_gather(arrays[v.params[0]], sel) for v in j_vars]

            def renamed(v: Node, t: Any) -> tuple[Node, Any]:
                return (gathered[v], _gather(t, sel)) if v in gathered else (v, t)

            Fk = make("Extract", (F,), (k, 1))
            (dFk,), tangent_arrays = _directional((Fk,), tangents, n + len(extra), renamed)
            if dFk is None:
                row.append(jnp.zeros(batch + (M,), values.dtype))
                continue
            req = plan.Request("Sum", substitute(dFk, gathered), axis=1)
            part, = bind(replace(oriented, req=req, sizes=(M, 1), ranges=None),
                         list(arrays) + extra + tangent_arrays)
            row.append(jnp.where(valid, part[..., 0], 0))
        slots.append(jnp.stack(row, -1))
    return jnp.stack(slots, -2).reshape(values.shape)


# ---------------------------------------------------------------------- reverse mode

def _shape_like(g: Any, shape: tuple[int, ...]) -> Any:
    """g summed over the batch dims along which an array of ``shape`` was broadcast."""
    extra = g.ndim - len(shape)
    if extra > 0:
        g = g.sum(tuple(range(extra)))
    dims = tuple(k for k, (gd, d) in enumerate(zip(g.shape, shape)) if d == 1 and gd != 1)
    if dims:
        g = g.sum(dims, keepdims=True)
    return g.reshape(shape)


def _concat(nodes: list[Node]) -> Node:
    out = nodes[0]
    for n in nodes[1:]:
        out = make("Concat", (out, n))
    return out


def _transpose(cts, *args, call: Call):
    """The transpose of a Sum linear in its undefined arguments: per category of those, one
    Sum of the VJP formulas grad(F, v, G) (G: the output's cotangent as a variable)."""
    ct = cts[0]
    n = len(args)
    if type(ct) is ad.Zero:
        return [None] * n
    if call.req.reduction != "Sum":
        raise NotImplementedError(f"lazymat: {call.req.reduction} is not linear")
    F, axis = call.req.formula, call.req.axis
    out_cat = I_CAT if axis == 1 else J_CAT
    linear = [p for p in range(n) if ad.is_undefined_primal(args[p])]
    by_pos = _by_position(F)
    G = Var(n, ct.shape[-1], out_cat)
    ct = ct.reshape(ct.shape[:-1] + (G.params[1],))
    arrays = [None if ad.is_undefined_primal(a) else a for a in args] + [ct]
    result: list[Any] = [None] * n
    for cats, red_axis in (((out_cat, P_CAT), axis), ((1 - out_cat,), 1 - axis)):
        group = [p for p in linear if p in by_pos and by_pos[p].params[2] in cats]
        if not group:
            continue
        formulas = [grad(F, by_pos[p], G) for p in group]
        total = _concat(formulas)
        if any(p in linear for p in _by_position(total)):
            raise NotImplementedError("lazymat: a tangent reduction that is not linear in its "
                                      "tangents (please report)")
        # Only the factors that vary with the reduced index are reduced (as torch's backward)
        split = (factor_sum(formulas, "Sum", J_CAT if red_axis == 1 else I_CAT, len(arrays))
                 if autograd.FACTOR_SUMS else None)
        g, = bind(call.with_request(
            plan.Request("Sum", total if split is None else split.columns, axis=red_axis),
            list(call.names) + ["the output cotangent"]), arrays)
        if split is None:
            parts, start = [], 0
            for f in formulas:
                parts.append(g[..., start:start + f.dim])
                start += f.dim
        else:
            parts = evaluate_rows(split.combines, arrays + [g], lib_of(g), g)
        for p, part in zip(group, parts):
            if by_pos[p].params[2] == P_CAT:
                part = part.sum(-2)
            shape = tuple(args[p].aval.shape)
            result[p] = _shape_like(part, shape).astype(args[p].aval.dtype)
    return result


ad.primitive_transposes[reduce_p] = _transpose


# ---------------------------------------------------------------------- batching

def _batching(args, dims, *, call: Call):
    """vmap: the mapped axis becomes the outermost batch dim (unmapped arrays broadcast)."""
    by_pos = _by_position(call.req.formula, call.req.weight)
    own = {p: args[p].ndim - (d is not None) - _inner(by_pos[p])
           for p, d in enumerate(dims)}
    depth = max(own.values(), default=0)
    moved = []
    for p, (a, d) in enumerate(zip(args, dims)):
        if d is not None:
            a = jnp.moveaxis(a, d, 0)
            a = a.reshape((a.shape[0],) + (1,) * (depth - own[p]) + tuple(a.shape[1:]))
        moved.append(a)
    outs = reduce_p.bind(*moved, call=call)
    return outs, [0] * len(outs)


batching.primitive_batchers[reduce_p] = _batching


def check_sizes(call: Call) -> None:
    red = call.red
    _, _, _, N = call.oriented()
    if red.needs_k and call.req.K > N:
        raise ShapeError(f"{red.name}: K = {call.req.K} is larger than the number of "
                         f"{'columns N' if call.req.axis == 1 else 'rows M'} = {N} being "
                         f"reduced")
