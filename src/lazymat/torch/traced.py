"""LazyTensor code inside ``torch.compile``: what ``Vi(x)``, ``K.exp()``, ``K.sum(dim=1)``...
build while Dynamo traces.

Formula nodes are interned Python objects that Dynamo cannot trace (``type.__new__``, their
C ``__hash__``), and a variable is named by ``id`` of its array, which Dynamo would guard on.
So, while Dynamo traces, ``LazyTensor(...)`` gives a :class:`TracedLazyTensor`: an int
token and the tensors, in order. Every formula-building method runs, once at trace time
and outside Dynamo (``torch._dynamo.assume_constant_result``), on a *shadow*: an ordinary
LazyTensor over small placeholder tensors of the same dtype, rank and inner dims. A
reduction registers the shadow's request with :mod:`lazymat.torch.ops` and the compiled
graph holds one ``lazymat::reduce`` call on the real tensors: no graph break, the same
checks and formulas as eager code, and sizes M and N stay symbolic (no recompilation when
N changes).

Limits: complex LazyTensors, block-sparse ``ranges``, ``out=``, symbolic variables
(``Vi(0, 3)``) and LazyTensors built outside the compiled function are eager-only.

>>> import torch, lazymat as lm
>>> type(lm.Vi(torch.zeros(3, 2))).__name__  # eager code: an ordinary LazyTensor
'LazyTensor'

Inside ``torch.compile(f, fullgraph=True)``, the same ``lm.Vi(x)`` is a TracedLazyTensor
and ``f``'s graph holds ``torch.ops.lazymat.reduce`` (tests/test_torch_compile.py).
"""

from __future__ import annotations

import copy
import itertools
import operator
import re
from typing import Any

import torch

from .. import autograd
from ..errors import LazymatError, ShapeError
from ..formula import I_CAT, J_CAT, P_CAT
from ..lazy_tensor import LazyTensor
from . import ops

_shadows: dict[int, tuple[LazyTensor, list]] = {}  # token -> (shadow, its arrays in order)
_tokens = itertools.count(1)
_building = [False]  # True while a shadow is built: LazyTensor(...) is then an ordinary one


def new() -> LazyTensor:
    """The object ``LazyTensor(...)`` makes while Dynamo traces (lazy_tensor.py's hook)."""
    return object.__new__(LazyTensor if _building[0] else TracedLazyTensor)


def _unsupported(what: str) -> LazymatError:
    return LazymatError(f"{what} is not supported inside torch.compile (lazymat runs it "
                        "eagerly only): build it outside the compiled function's reductions, "
                        "or wrap that code in torch.compiler.disable")


class TracedLazyTensor(LazyTensor):
    """A LazyTensor while Dynamo traces: a shadow's token and the real tensors it stands for.

    Users never make one by name: ``Vi(x)`` inside a compiled function returns it.
    """

    def __init__(self, x: Any = None, axis: int | None = None, is_complex: bool = False):
        if is_complex:
            raise _unsupported("a complex LazyTensor")
        if isinstance(x, TracedLazyTensor):
            self._token, self._tensors = x._token, x._tensors
        elif isinstance(x, LazyTensor):
            raise _unsupported("a LazyTensor built outside the compiled function")
        elif isinstance(x, torch.Tensor):
            if x.is_complex():
                raise _unsupported("a complex LazyTensor")
            if axis in (0, 1) and x.ndim == 0:
                raise ShapeError(f"{'Vi' if axis == 0 else 'Vj'} needs an (n, D) or (n,) "
                                 "array, got a 0-d tensor: use Pm(x) for a parameter")
            cat, arr = _layout(x, axis)
            # the shadow's placeholder: same dtype and inner dims, sizes 1 kept (they choose
            # layouts and broadcasting), every other size 2
            pattern = tuple([1 if s == 1 else 2 for s in arr.shape[:-1]]) + (
                operator.index(arr.shape[-1]),)  # the inner dim D is part of the formula
            self._token, self._tensors = _shadow_leaf(cat, pattern, arr.dtype), (arr,)
        elif isinstance(x, (int, float)) and not isinstance(x, bool):
            self._token, self._tensors = _shadow_value(_constant(x)), ()
        elif isinstance(x, tuple):
            raise _unsupported("a symbolic variable (Vi(index, dim))")
        else:
            raise ShapeError(f"cannot make a LazyTensor from a {type(x).__name__}")
        self.ranges, self.is_complex = None, False

    @classmethod
    def _traced(cls, token: int, tensors: tuple) -> "TracedLazyTensor":
        lt = object.__new__(cls)
        lt._token, lt._tensors, lt.ranges, lt.is_complex = token, tensors, None, False
        return lt

    def _eager(self) -> LazyTensor:
        """The ordinary LazyTensor this one stands for: its shadow's formula on the real
        tensors. Used when a TracedLazyTensor reaches code that runs eagerly (a frame Dynamo
        gave up on after it built this one)."""
        shadow, arrays = _shadows[self._token]
        real = {id(a): t for a, t in zip(arrays, self._tensors)}
        leaves = {}
        for key, leaf in shadow._leaves.items():
            leaf = copy.copy(leaf)
            if leaf.array is not None:
                leaf.array = leaf.source = real[id(leaf.array)]
            leaves[key] = leaf
        return LazyTensor._make(shadow.formula, leaves, None, False)

    # ------------------------------------------------------------------ description
    @property
    def ndim(self) -> int:
        return _shadow_facts(self._token)[0]

    @property
    def nbatchdims(self) -> int:
        return _shadow_facts(self._token)[1]

    @property
    def batch_shape(self) -> tuple:
        slots = _shadow_facts(self._token)[3]
        shapes = [self._tensors[k].shape[:-1 if cat == P_CAT else -2] for k, cat in slots]
        return tuple(torch.broadcast_shapes(*shapes)) if shapes else ()

    def _size(self, cat: int) -> Any:
        k = _shadow_facts(self._token)[2][cat]
        return 1 if k is None else self._tensors[k].shape[-2]

    @property
    def ni(self) -> Any:
        return self._size(I_CAT) if _shadow_facts(self._token)[2][I_CAT] is not None else None

    @property
    def nj(self) -> Any:
        return self._size(J_CAT) if _shadow_facts(self._token)[2][J_CAT] is not None else None

    @property
    def dtype(self) -> str | None:
        return str(self._tensors[0].dtype).replace("torch.", "") if self._tensors else None

    def __repr__(self) -> str:
        return f"TracedLazyTensor(token={self._token})"

    # ------------------------------------------------------------------ reductions
    def _reduce(self, name: str, dim: Any, K: Any = None, weight: Any = None,
                backend: str = "auto", out: Any = None, axis: Any = None, ranges: Any = None,
                call: bool = True, other: Any = None, **options: Any):
        if not autograd.compiling():
            return self._eager()._reduce(name, dim, K=K, weight=_eager(weight),
                                         backend=backend, out=out, axis=axis, ranges=ranges,
                                         call=call, other=_eager(other), **options)
        if out is not None:
            raise _unsupported("out=")
        if ranges is not None:
            raise _unsupported("block-sparse ranges")
        if not call:
            raise _unsupported("call=False")
        operands = [self]
        w = None
        if weight is not None or other is not None:
            if weight is not None and other is not None:
                raise ShapeError(f"{name}: give the weight once, as weight= or other=")
            w = _spec(weight if weight is not None else other, operands)
        if axis is not None:
            dim = axis
        found = _shadow_reduce(name, _constant(dim), _constant(K), w, str(backend),
                               tuple(sorted((k, _constant(v)) for k, v in options.items())),
                               tuple([o._token for o in operands]))
        key, arguments, sizes = found
        first = None
        for o in operands:
            for t in o._tensors:
                first = t if first is None else first
        arrays = [operands[a[1]]._tensors[a[2]] if a[0] == "t" else
                  torch.tensor(a[1], dtype=first.dtype, device=first.device) for a in arguments]
        rows = tuple([None if s is None else s[1] if s[0] == "c" else
                      operands[s[1]]._tensors[s[2]].shape[-2] for s in sizes])
        outs = ops.call(key, arrays, rows)
        return outs[0] if len(outs) == 1 else outs

    def __matmul__(self, v: Any, **kw):
        if not autograd.compiling():
            return self._eager().__matmul__(v, **kw)
        if not isinstance(v, torch.Tensor):
            raise ShapeError(f"K @ v needs an array v, got {type(v).__name__}")
        vector = v.ndim == 1
        result = (self * LazyTensor(v.reshape(-1, 1) if vector else v, axis=1)).sum(
            dim=self.nbatchdims + 1, **kw)
        return result.reshape(result.shape[:-1]) if vector else result


def _eager(v: Any) -> Any:
    return v._eager() if isinstance(v, TracedLazyTensor) else v


def _eager_only(name: str):
    def method(self: TracedLazyTensor, *args: Any, **kwargs: Any) -> Any:
        if autograd.compiling():
            raise _unsupported(f"LazyTensor.{name}")
        return getattr(self._eager(), name)(*[_eager(a) for a in args],
                                            **{k: _eager(v) for k, v in kwargs.items()})

    method.__name__ = name
    return method


for _name in ("solve", "matvec", "rmatvec", "matmat", "rmatmat", "dense", "bound"):
    setattr(TracedLazyTensor, _name, _eager_only(_name))


def _built(name: str):
    """A formula-building method run on the shadow (at trace time); the result's tensors
    picked from the operands'."""
    def method(self: TracedLazyTensor, *args: Any, **kwargs: Any) -> LazyTensor:
        if not autograd.compiling():
            return getattr(self._eager(), name)(*[_eager(a) for a in args],
                                                **{k: _eager(v) for k, v in kwargs.items()})
        operands = [self]
        specs = tuple([_spec(a, operands) for a in args])
        named = tuple([(k, _spec(v, operands)) for k, v in kwargs.items()])
        token, picks = _shadow_call(name, tuple([o._token for o in operands]), specs, named)
        return TracedLazyTensor._traced(token, tuple([operands[o]._tensors[k]
                                                      for o, k in picks]))

    method.__name__ = name
    return method


# The funnels every building method goes through, and the methods that read the formula.
for _name in ("_unary", "_combine", "t", "_calculus"):
    setattr(TracedLazyTensor, _name, _built(_name))


def _spec(v: Any, operands: list) -> tuple:
    """An argument as a trace-time constant: ("lazy", operand index) or ("const", value)."""
    if isinstance(v, LazyTensor) or isinstance(v, torch.Tensor):
        operands.append(v if isinstance(v, TracedLazyTensor) else LazyTensor(v))
        return ("lazy", len(operands) - 1)
    return ("const", _constant(v))


def _constant(v: Any) -> Any:
    """``v`` as a trace-time constant: Python numbers that Dynamo keeps symbolic (float
    arguments, sizes under dynamic shapes) specialized, as eager code bakes them into the
    formula (a new value recompiles)."""
    if isinstance(v, bool) or v is None or isinstance(v, str):
        return v
    if isinstance(v, int):
        return operator.index(v)
    if isinstance(v, float):
        return float.fromhex(v.hex())
    if isinstance(v, (tuple, list)):
        return type(v)([_constant(u) for u in v])
    return v


def _layout(x: torch.Tensor, axis: int | None) -> tuple[int, torch.Tensor]:
    """(category, array) of a tensor given to LazyTensor, as lazy_tensor's ``_leaf`` reads
    it (pykeops' (M, 1, D) / (1, N, D) / (1, 1, D) layouts included)."""
    nd = x.ndim
    if nd == 0:
        return P_CAT, x.reshape(1)
    if nd == 1:
        return (I_CAT if axis == 0 else J_CAT, x.reshape(-1, 1)) if axis in (0, 1) \
            else (P_CAT, x)
    if axis in (0, 1):
        return (I_CAT if axis == 0 else J_CAT), x
    if nd == 2:
        raise ShapeError(f"a 2-D array of shape {tuple(x.shape)} needs axis=0 (i-variable) or "
                         "axis=1 (j-variable); or use Vi(x) / Vj(x)")
    a, b = x.shape[-3] == 1, x.shape[-2] == 1
    if a and b:
        return P_CAT, x.reshape(tuple(x.shape[:-3]) + (x.shape[-1],))
    if b:
        return I_CAT, x.squeeze(-2)
    if a:
        return J_CAT, x.squeeze(-3)
    raise ShapeError(f"an array of shape {tuple(x.shape)} must be (..., M, 1, D), "
                     "(..., 1, N, D) or (..., 1, 1, D)")


# ---------------------------------------------------------------------- trace-time work
# Each runs once per trace, outside Dynamo, on constants only; it returns constants.

def _store(shadow: LazyTensor) -> int:
    token = next(_tokens)
    _shadows[token] = (shadow, [leaf.array for leaf in shadow._leaves.values()
                                if leaf.array is not None])
    return token


class _Building:
    def __enter__(self):
        self.before, _building[0] = _building[0], True

    def __exit__(self, *exc):
        _building[0] = self.before


@torch._dynamo.assume_constant_result
def _shadow_leaf(cat: int, pattern: tuple, dtype: torch.dtype) -> int:
    with _Building():
        if cat == P_CAT:
            shape = pattern if len(pattern) == 1 else pattern[:-1] + (1, 1, pattern[-1])
            return _store(LazyTensor(torch.zeros(shape, dtype=dtype)))
        return _store(LazyTensor(torch.zeros(pattern, dtype=dtype), axis=cat))


@torch._dynamo.assume_constant_result
def _shadow_value(x: float) -> int:
    with _Building():
        return _store(LazyTensor(x))


@torch._dynamo.assume_constant_result
def _shadow_facts(token: int) -> tuple:
    """(ndim, nbatchdims, {cat: index of the tensor that gives its size}, ((index, cat), ...)
    of the tensors with batch dims)."""
    shadow, arrays = _shadows[token]
    first: dict[int, int | None] = {I_CAT: None, J_CAT: None}
    batched = []
    for leaf in shadow._leaves.values():
        k = next((k for k, a in enumerate(arrays) if a is leaf.array), None)
        if leaf.cat in first and first[leaf.cat] is None and k is not None:
            first[leaf.cat] = k
        if k is not None and leaf.batch:
            batched.append((k, leaf.cat))
    return shadow.ndim, shadow.nbatchdims, first, tuple(batched)


def _real(spec: tuple, operands: list) -> Any:
    return operands[spec[1]] if spec[0] == "lazy" else spec[1]


def _where(array: Any, operands: list) -> tuple[int, int] | None:
    for o, shadow in enumerate(operands):
        for k, a in enumerate(_shadows_arrays(shadow)):
            if a is array:
                return o, k
    return None


def _shadows_arrays(shadow: LazyTensor) -> list:
    return [leaf.array for leaf in shadow._leaves.values() if leaf.array is not None]


@torch._dynamo.assume_constant_result
def _shadow_call(name: str, tokens: tuple, args: tuple, kwargs: tuple) -> tuple:
    operands = [_shadows[t][0] for t in tokens]
    with _Building():
        result = getattr(operands[0], name)(*[_real(a, operands) for a in args],
                                            **{k: _real(v, operands) for k, v in kwargs})
    if result.is_complex:
        raise _unsupported("a complex LazyTensor")
    token = _store(result)
    return token, tuple(_where(a, operands) for a in _shadows[token][1])


@torch._dynamo.assume_constant_result
def _shadow_reduce(name: str, dim: Any, K: Any, weight: tuple | None, backend: str,
                   options: tuple, tokens: tuple) -> tuple:
    """(key, where each argument comes from, where M and N come from) of a reduction."""
    operands = [_shadows[t][0] for t in tokens]
    if operands[0].is_complex:
        raise _unsupported("a reduction of complex values")
    captured: list = []

    def capture(req, arrays, *, names=None, backend="auto", out=None, sizes=(None, None),
                like=None, ranges=None):
        captured.append((req, list(arrays), list(names), backend))
        return (None,) * ops.Entry(req, req, (), backend).visible

    shadow = operands[0]
    shadow._run = capture  # this shadow's reduction is recorded, not run
    try:
        with _Building():
            shadow._reduce(name, dim, K=K, weight=None if weight is None else
                           _real(weight, operands), backend=backend, **dict(options))
    finally:
        del shadow._run
    if not captured:
        raise _unsupported("a reduction of symbolic variables")
    req, arrays, names, backend = captured[0]
    # the shapes in the names are the placeholders': the errors name the operand only
    names = [re.sub(r" \(shape \([^)]*\)\)", "", name) for name in names]
    arguments = []
    for a in arrays:
        found = _where(a, operands)
        arguments.append(("t",) + found if found is not None else ("c", a.tolist()))
    sizes = []
    leaves = [leaf for s in operands for leaf in s._leaves.values()]
    for cat in (I_CAT, J_CAT):
        leaf = next((leaf for leaf in leaves if leaf.cat == cat), None)
        if leaf is None:
            sizes.append(None)
        elif leaf.array is None:
            sizes.append(("c", 1))
        else:
            sizes.append(("t",) + _where(leaf.array, operands))
    return ops.register(req, names, backend), tuple(arguments), tuple(sizes)
