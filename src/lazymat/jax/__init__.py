"""lazymat for JAX: LazyTensor, Vi/Vj/Pm and Genred over jax.Arrays, returning jax.Arrays.

The reductions run the compiled CPU kernels inside XLA programs (an XLA FFI custom call,
no copy, no Python on the call) and work under ``jax.jit``, ``jax.grad``/``jax.vjp`` (to
any order, ``jax.hessian`` included: each derivative is another lazymat reduction of a
symbolic derivative formula), ``jax.jvp``/``jax.jacfwd`` and ``jax.vmap`` (the mapped
axis becomes a batch dim).

>>> import jax, jax.numpy as jnp
>>> from lazymat.jax import Vi, Vj
>>> x, y = jnp.zeros((3, 2)), jnp.ones((4, 2))
>>> def energy(x):
...     return (-Vi(x).sqdist(Vj(y))).exp().sum(dim=1).sum()
>>> jax.jit(jax.grad(energy))(x).shape
(3, 2)

Limits: real data only (no complex LazyTensors), no ``out=``;
integer outputs (ArgMin...) are int64 with ``jax_enable_x64`` and int32 without; on CUDA
the FFI handler (``ffi.CUDA_HANDLER_SOURCE``) is compile-tested but has not been run on a
GPU yet.
"""

from __future__ import annotations

from typing import Any, Sequence

try:
    import jax
    import jax.numpy as jnp
except ImportError as e:  # pragma: no cover - jax is an optional dependency
    raise ImportError(f"lazymat.jax needs jax ({e}): pip install 'lazymat[jax]'") from None
import numpy as np

from .. import genred as _genred
from .. import lazy_tensor as _lazy_tensor
from .. import plan
from ..arraylib import is_jax
from ..errors import CudaUnavailableError, DtypeError, ShapeError
from . import ffi
from .primitive import Call, Ranges, bind, check_sizes

__all__ = ["LazyTensor", "Vi", "Vj", "Pm", "Genred", "generic_sum", "generic_logsumexp",
           "generic_argmin", "generic_argkmin", "run", "ffi_unavailable_reason"]

_BACKENDS = ("auto", "cpu", "reference", "cuda")


def ffi_unavailable_reason() -> str | None:
    """Why the XLA FFI fast path cannot be used here (None when it can).

    >>> reason = ffi_unavailable_reason()  # e.g. no compiler, or LAZYMAT_JAX_FFI=0
    >>> reason is None or isinstance(reason, str)
    True
    """
    return ffi.unavailable_reason()


def _to_jax(a: Any) -> Any:
    if isinstance(a, np.ndarray):
        return jnp.asarray(a)
    return a


def run(req: plan.Request, arrays: Sequence[Any], *, names: Sequence[str] | None = None,
        backend: str = "auto", out: Any = None,
        sizes: tuple[int | None, int | None] = (None, None), like: Any = None,
        ranges: Sequence[Any] | None = None) -> tuple:
    """``plan.run`` for jax arrays (numpy arrays are converted): a tuple of jax arrays,
    traceable by jit, grad, jvp and vmap. LazyTensor and Genred reductions call it.

    >>> from lazymat.formula import Var
    >>> req = plan.Request("Sum", Var(0, 1, 0) * Var(1, 1, 1), axis=1)
    >>> run(req, [jnp.ones((2, 1)), jnp.full((3, 1), 2.0)])[0].ravel().tolist()
    [6.0, 6.0]
    """
    if out is not None:
        raise DtypeError("out= is not supported by lazymat.jax: jax arrays are immutable")
    arrays = [_to_jax(a) for a in arrays]
    like = _to_jax(like)
    first = arrays[0] if arrays else like
    if first is not None and not is_jax(first):
        raise DtypeError(f"lazymat.jax needs jax arrays, got a {type(first).__name__}")
    M, N, _, dtype = plan.validate(req, arrays, names, sizes, like)
    backend = str(backend).lower()
    if backend.startswith("gpu"):
        backend = "cuda"
    if backend not in _BACKENDS:
        raise ShapeError(f"unknown backend {backend!r}; choose one of {', '.join(_BACKENDS)}")
    if backend == "cuda" and jax.default_backend() != "gpu":
        raise CudaUnavailableError("backend='cuda' needs jax with a GPU")
    half = dtype in ("float16", "bfloat16")
    if half:  # reduced in float32, returned in the data's dtype
        arrays = [a.astype(jnp.float32) for a in arrays]
    if ranges is not None and backend == "reference":
        raise ShapeError("lazymat.jax: block-sparse ranges= need the compiled backend, not "
                         "backend='reference'")
    call = Call(req, (M, N), "float32" if half else dtype, backend,
                tuple(names) if names is not None else (),
                Ranges(ranges) if ranges is not None else None)
    call.oriented_ranges()  # the ranges' errors now, before compiling
    check_sizes(call)
    outs = bind(call, arrays)
    if half:
        outs = [o.astype(dtype) if jnp.issubdtype(o.dtype, jnp.floating) else o for o in outs]
    return tuple(outs)


class LazyTensor(_lazy_tensor.LazyTensor):
    """lazymat's LazyTensor whose reductions are jax operations (see the module doc).

    >>> x = LazyTensor(jnp.zeros((3, 1, 2)))  # pykeops' layout: an i-variable
    >>> y = LazyTensor(jnp.ones((1, 4, 2)))
    >>> ((x - y) ** 2).sum(-1).sum(dim=1).ravel().tolist()
    [8.0, 8.0, 8.0]
    """

    _run = staticmethod(run)

    def __init__(self, x: Any = None, axis: int | None = None):
        x = _to_jax(x)
        if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.complexfloating):
            raise DtypeError("lazymat.jax takes real arrays (complex LazyTensors are "
                             "numpy/torch only)")
        super().__init__(x, axis)


def Vi(x: Any, dim: int | None = None) -> LazyTensor:
    """An i-indexed variable x_i from an (..., M, D) array; ``Vi(index, dim)``: symbolic.

    >>> Vi(jnp.zeros((3, 2))).sqdist(Vj(jnp.ones((4, 2)))).min(dim=1).ravel().tolist()
    [2.0, 2.0, 2.0]
    """
    return LazyTensor(_lazy_tensor.Vi(_checked(x), dim))


def Vj(x: Any, dim: int | None = None) -> LazyTensor:
    """A j-indexed variable y_j from an (..., N, D) array; ``Vj(index, dim)``: symbolic.

    >>> y = jnp.array([[0.0], [3.0]])
    >>> Vi(jnp.array([[1.0]])).sqdist(Vj(y)).argmin(dim=1).ravel().tolist()
    [0]
    """
    return LazyTensor(_lazy_tensor.Vj(_checked(x), dim))


def Pm(x: Any, dim: int | None = None) -> LazyTensor:
    """A parameter from a float or an (..., D) array; ``Pm(index, dim)``: symbolic.

    >>> K = (-Pm(jnp.array([2.0])) * Vi(jnp.zeros((2, 1))).sqdist(Vj(jnp.zeros((3, 1))))).exp()
    >>> K.sum(dim=1).ravel().tolist()
    [3.0, 3.0]
    """
    return LazyTensor(_lazy_tensor.Pm(_checked(x), dim))


def _checked(x: Any) -> Any:
    x = _to_jax(x)
    if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.complexfloating):
        raise DtypeError("lazymat.jax takes real arrays (complex LazyTensors are "
                         "numpy/torch only)")
    return x


class Genred(_genred.Genred):
    """``Genred(formula, aliases, reduction_op=..., axis=...)`` called with jax arrays.

    >>> import jax.numpy as jnp
    >>> g = Genred("SqDist(x, y)", ["x = Vi(1)", "y = Vj(1)"], reduction_op="Sum", axis=1)
    >>> g(jnp.zeros((2, 1)), jnp.ones((3, 1))).ravel().tolist()
    [3.0, 3.0]
    """

    _run = staticmethod(run)


def generic_sum(formula: str, output: str, *aliases: str, **kwargs: Any) -> Genred:
    """:func:`lazymat.generic_sum` for jax arrays.

    >>> f = generic_sum("SqDist(x, y)", "a = Vi(1)", "x = Vi(1)", "y = Vj(1)")
    >>> f(jnp.zeros((2, 1)), jnp.ones((3, 1))).ravel().tolist()
    [3.0, 3.0]
    """
    return _genred.generic("Sum", formula, output, aliases, kwargs, Genred)


def generic_logsumexp(formula: str, output: str, *aliases: str, **kwargs: Any) -> Genred:
    """:func:`lazymat.generic_logsumexp` for jax arrays.

    >>> f = generic_logsumexp("-SqDist(x, y)", "a = Vi(1)", "x = Vi(1)", "y = Vj(1)")
    >>> [round(float(v), 4) for v in f(jnp.zeros((1, 1)), jnp.zeros((4, 1))).ravel()]
    [1.3863]
    """
    return _genred.generic("LogSumExp", formula, output, aliases, kwargs, Genred)


def generic_argmin(formula: str, output: str, *aliases: str, **kwargs: Any) -> Genred:
    """:func:`lazymat.generic_argmin` for jax arrays.

    >>> f = generic_argmin("SqDist(x, y)", "a = Vi(1)", "x = Vi(1)", "y = Vj(1)")
    >>> f(jnp.array([[0.0], [5.0]]), jnp.array([[4.0], [1.0]])).ravel().tolist()
    [1, 0]
    """
    return _genred.generic("ArgMin", formula, output, aliases, kwargs, Genred)


def generic_argkmin(formula: str, output: str, *aliases: str, **kwargs: Any) -> Genred:
    """:func:`lazymat.generic_argkmin` for jax arrays (K is the output alias's dim).

    >>> f = generic_argkmin("SqDist(x, y)", "a = Vi(2)", "x = Vi(1)", "y = Vj(1)")
    >>> f(jnp.zeros((1, 1)), jnp.array([[4.0], [1.0], [6.0]])).tolist()
    [[1, 0]]
    """
    return _genred.generic("ArgKMin", formula, output, aliases, kwargs, Genred)
