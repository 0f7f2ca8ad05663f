"""The few array functions lazymat needs, for numpy, torch and jax.

The reference backend and the front ends are written once against this small
namespace (``xp``) so numpy arrays stay numpy and torch tensors stay torch, on
their device. It is generic array plumbing only: an op's own math lives in its
registration (``formula/ops/``), which calls ``xp.module`` (numpy or torch itself)
where both libraries spell a function alike.

>>> import numpy as np
>>> xp = lib_of(np.zeros(3))
>>> xp.name
'numpy'
"""

from __future__ import annotations

import sys

from typing import Any

import numpy as np

from .errors import DtypeError


class NumpyLib:
    name = "numpy"
    module = np
    exp, log, maximum, minimum = np.exp, np.log, np.maximum, np.minimum
    where = staticmethod(np.where)

    @staticmethod
    def cast(a: Any, like: Any) -> Any:
        return np.asarray(a).astype(like.dtype, copy=False)

    @staticmethod
    def sum(a, axis, keepdims=False):
        return np.sum(a, axis=axis, keepdims=keepdims)

    @staticmethod
    def amin(a, axis, keepdims=False):
        return np.min(a, axis=axis, keepdims=keepdims)

    @staticmethod
    def amax(a, axis, keepdims=False):
        return np.max(a, axis=axis, keepdims=keepdims)

    @staticmethod
    def argmin(a, axis, keepdims=False):
        return np.argmin(a, axis=axis, keepdims=keepdims)

    @staticmethod
    def argmax(a, axis, keepdims=False):
        return np.argmax(a, axis=axis, keepdims=keepdims)

    @staticmethod
    def concat(arrays, axis):
        return np.concatenate(arrays, axis=axis)

    @staticmethod
    def broadcast_to(a, shape):
        return np.broadcast_to(a, shape)

    @staticmethod
    def stable_argsort(a, axis):
        return np.argsort(a, axis=axis, kind="stable")

    @staticmethod
    def take_along(a, idx, axis):
        return np.take_along_axis(a, idx, axis=axis)

    @staticmethod
    def arange(n, like):
        return np.arange(n, dtype=np.int64)

    @staticmethod
    def full(shape, value, like, dtype=None):
        return np.full(shape, value, dtype=like.dtype if dtype is None else dtype)

    @staticmethod
    def empty(shape, like, dtype=None):
        return np.empty(shape, dtype=like.dtype if dtype is None else dtype)

    @staticmethod
    def int64_like(a):
        return np.asarray(a, dtype=np.int64)

    int64 = np.int64

    @staticmethod
    def expand_dims(a, axis):
        return np.expand_dims(a, axis)

    @staticmethod
    def to_float64(a):
        return np.asarray(a, dtype=np.float64)

    @staticmethod
    def isneginf(a):
        return np.isneginf(a)

    @staticmethod
    def errstate():
        return np.errstate(all="ignore")

    @staticmethod
    def einsum(subscripts, *operands):
        return np.einsum(subscripts, *operands)


class TorchLib:
    name = "torch"

    def __init__(self) -> None:
        import torch

        self.torch = self.module = torch
        self.exp, self.log, self.maximum, self.minimum, self.where = (
            torch.exp, torch.log, torch.maximum, torch.minimum, torch.where)
        self.int64 = torch.int64

    def cast(self, a, like):
        return a.to(like.dtype)

    def sum(self, a, axis, keepdims=False):
        return self.torch.sum(a, dim=axis, keepdim=keepdims)

    def amin(self, a, axis, keepdims=False):
        return self.torch.amin(a, dim=axis, keepdim=keepdims)

    def amax(self, a, axis, keepdims=False):
        return self.torch.amax(a, dim=axis, keepdim=keepdims)

    def argmin(self, a, axis, keepdims=False):
        return self.torch.argmin(a, dim=axis, keepdim=keepdims)

    def argmax(self, a, axis, keepdims=False):
        return self.torch.argmax(a, dim=axis, keepdim=keepdims)

    def concat(self, arrays, axis):
        return self.torch.cat(list(arrays), dim=axis)

    def broadcast_to(self, a, shape):
        return a.expand(*shape)

    def stable_argsort(self, a, axis):
        return self.torch.sort(a, dim=axis, stable=True).indices

    def take_along(self, a, idx, axis):
        return self.torch.take_along_dim(a, idx, dim=axis)

    def arange(self, n, like):
        return self.torch.arange(n, dtype=self.torch.int64, device=like.device)

    def full(self, shape, value, like, dtype=None):
        return self.torch.full(shape, value, dtype=like.dtype if dtype is None else dtype,
                               device=like.device)

    def empty(self, shape, like, dtype=None):
        return self.torch.empty(shape, dtype=like.dtype if dtype is None else dtype,
                                device=like.device)

    def int64_like(self, a):
        return a.to(self.torch.int64)

    def expand_dims(self, a, axis):
        return a.unsqueeze(axis)

    def to_float64(self, a):
        return a.to(self.torch.float64)

    def isneginf(self, a):
        return self.torch.isneginf(a)

    def errstate(self):
        import contextlib

        return contextlib.nullcontext()

    def einsum(self, subscripts, *operands):
        return self.torch.einsum(subscripts, *operands)


class JaxLib(NumpyLib):
    """jax.numpy under the numpy names (jax arrays and tracers: the reference backend then
    traces into jit, grad and vmap like any jax code). Indices are int64 with
    ``jax_enable_x64``, else jax's int32."""

    name = "jax"

    def __init__(self) -> None:
        import jax.numpy as jnp

        self.jnp = self.module = jnp
        for name in ("exp", "log", "maximum", "minimum", "where", "isneginf", "einsum",
                     "expand_dims", "broadcast_to"):
            setattr(self, name, getattr(jnp, name))
        self.int64 = jnp.int64

    def cast(self, a, like):
        return self.jnp.asarray(a).astype(like.dtype)

    def sum(self, a, axis, keepdims=False):
        return self.jnp.sum(a, axis=axis, keepdims=keepdims)

    def amin(self, a, axis, keepdims=False):
        return self.jnp.min(a, axis=axis, keepdims=keepdims)

    def amax(self, a, axis, keepdims=False):
        return self.jnp.max(a, axis=axis, keepdims=keepdims)

    def argmin(self, a, axis, keepdims=False):
        return self.jnp.argmin(a, axis=axis, keepdims=keepdims)

    def argmax(self, a, axis, keepdims=False):
        return self.jnp.argmax(a, axis=axis, keepdims=keepdims)

    def concat(self, arrays, axis):
        return self.jnp.concatenate(list(arrays), axis=axis)

    def stable_argsort(self, a, axis):
        return self.jnp.argsort(a, axis=axis, stable=True)

    def take_along(self, a, idx, axis):
        return self.jnp.take_along_axis(a, idx, axis=axis)

    def arange(self, n, like):
        return self.jnp.arange(n, dtype=self._index_dtype())

    def full(self, shape, value, like, dtype=None):
        if dtype is self.jnp.int64:
            dtype = self._index_dtype()
        return self.jnp.full(shape, value, dtype=like.dtype if dtype is None else dtype)

    def empty(self, shape, like, dtype=None):
        return self.full(shape, 0, like, dtype)

    def int64_like(self, a):
        return self.jnp.asarray(a).astype(self._index_dtype())

    def to_float64(self, a):
        return self.jnp.asarray(a, dtype=self.jnp.float64)

    def _index_dtype(self):
        import jax

        return self.jnp.int64 if jax.config.jax_enable_x64 else self.jnp.int32


NUMPY = NumpyLib()
_torch_lib: TorchLib | None = None
_jax_lib: JaxLib | None = None


_torch_types: dict[type, bool] = {}


def is_torch(a: Any) -> bool:
    t = type(a)
    known = _torch_types.get(t)
    if known is None:
        # torch's own subclasses too: FakeTensor, FunctionalTensor (torch.compile's tracing)
        known = _torch_types[t] = (t.__module__.startswith("torch") and (
            t.__name__ in ("Tensor", "Parameter") or issubclass(t, sys.modules["torch"].Tensor)))
    return known


def to_numpy(a: Any) -> np.ndarray:
    """A numpy view or copy of an array (torch tensors are detached and moved to the CPU).

    >>> to_numpy([1.0, 2.0]).tolist()
    [1.0, 2.0]
    """
    return a.detach().cpu().numpy() if is_torch(a) else np.asarray(a)


def like(a: np.ndarray, ref: Any) -> Any:
    """The numpy array ``a`` in ``ref``'s library (and device, for torch).

    >>> like(np.zeros(2), np.ones(3)).shape
    (2,)
    """
    if is_torch(ref):
        import torch

        return torch.from_numpy(np.ascontiguousarray(a)).to(ref.device)
    return a


_jax_types: dict[type, bool] = {}


def is_jax(a: Any) -> bool:
    """Whether ``a`` is a jax array or tracer (jax is imported only when one is seen)."""
    t = type(a)
    known = _jax_types.get(t)
    if known is None:
        known = False
        if t.__module__.startswith(("jax", "jaxlib")):
            import jax

            known = isinstance(a, jax.Array)
        _jax_types[t] = known
    return known


def is_array(a: Any) -> bool:
    """Whether ``a`` is an array of a library lazymat knows (numpy, torch, jax)."""
    return isinstance(a, np.ndarray) or is_torch(a) or is_jax(a)


def is_dask(a: Any) -> bool:
    """Whether ``a`` is a dask array (without importing dask)."""
    t = type(a)
    return t.__name__ == "Array" and t.__module__.startswith("dask.")


def lib_of(a: Any) -> NumpyLib | TorchLib | JaxLib:
    """The adapter for the library that holds ``a`` (numpy's for dask arrays, whose chunks
    are numpy arrays and which numpy's functions dispatch to)."""
    global _torch_lib, _jax_lib
    if is_torch(a):
        if _torch_lib is None:
            _torch_lib = TorchLib()
        return _torch_lib
    if isinstance(a, np.ma.MaskedArray):  # its mask would be silently ignored
        raise DtypeError("numpy masked arrays are not supported (the mask would be "
                         "ignored): pass a.filled(value), or select the unmasked rows")
    if isinstance(a, np.ndarray) or is_dask(a):
        return NUMPY
    if is_jax(a):
        if _jax_lib is None:
            _jax_lib = JaxLib()
        return _jax_lib
    raise DtypeError(f"expected a numpy array, a torch tensor or a jax array, got "
                     f"{type(a).__name__}")
