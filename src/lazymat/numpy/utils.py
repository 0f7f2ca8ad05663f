"""pykeops-style ``numpytools``: array helpers that code written for pykeops touches
(``x.tools``, ``from pykeops.numpy.utils import numpytools``), plus the test helpers of
``pykeops.numpy.utils`` (``squared_distances``, ``np_kernel``, ...).

>>> import numpy as np
>>> numpytools.dtypename(numpytools.dtype(np.zeros(2)))
'float64'
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..genred import Genred
from ..solve import KernelSolve


class numpytools:  # noqa: N801  (pykeops' name)
    """Static helpers over numpy arrays, one per name pykeops' numpytools has.

    >>> numpytools.sqdist(np.zeros((1, 2)), np.ones((3, 2))).tolist()
    [[2.0, 2.0, 2.0]]
    """

    arraytype = np.ndarray
    float_types = [float, np.float16, np.float32, np.float64]
    arrayname = "numpy"
    Genred = Genred
    KernelSolve = KernelSolve

    norm = np.linalg.norm
    arange = np.arange
    repeat = np.repeat
    numpy = np.asarray

    @staticmethod
    def is_tensor(x): return isinstance(x, np.ndarray)
    @staticmethod
    def copy(x): return np.copy(x)
    @staticmethod
    def exp(x): return np.exp(x)
    @staticmethod
    def log(x): return np.log(x)
    @staticmethod
    def sqrt(x): return np.sqrt(x)
    @staticmethod
    def power(x, p): return x ** p
    @staticmethod
    def sum(x, axis): return np.sum(x, axis=axis)
    @staticmethod
    def arraysum(x, axis=None): return np.sum(x, axis=axis)
    @staticmethod
    def sort(x): return np.sort(x), np.argsort(x)
    @staticmethod
    def unique(x, return_index=False): return np.unique(x, return_index=return_index)
    @staticmethod
    def rand(m, n, dtype=None, device=None): return np.random.rand(m, n).astype(dtype or "float64")
    @staticmethod
    def randn(m, n, dtype=None, device=None):
        return np.random.randn(m, n).astype(dtype or "float64")
    @staticmethod
    def zeros(shape, dtype=None, device=None, requires_grad=None):
        return np.zeros(shape, dtype=dtype or "float64")
    @staticmethod
    def empty(shape, dtype=None, device=None, requires_grad=None):
        return np.empty(shape, dtype=dtype or "float64")
    @staticmethod
    def eye(n, dtype=None, device=None): return np.eye(n, dtype=dtype or "float64")
    @staticmethod
    def array(x, dtype=None, device=None): return np.array(x, dtype=dtype)
    @staticmethod
    def cat(x, dim): return np.concatenate(x, axis=dim)
    @staticmethod
    def view(x, s): return np.reshape(x, s)
    @staticmethod
    def transpose(x): return x.T
    @staticmethod
    def long(x): return x.astype("int64")
    @staticmethod
    def size(x): return x.size
    @staticmethod
    def tile(*args): return np.tile(*args)
    @staticmethod
    def solve(A, b): return np.linalg.solve(A, b)
    @staticmethod
    def contiguous(x): return np.ascontiguousarray(x)
    @staticmethod
    def dtype(x): return x.dtype if hasattr(x, "dtype") else np.asarray(x).dtype
    @staticmethod
    def dtypename(dtype): return np.dtype(dtype).name
    @staticmethod
    def device(x): return "cpu"
    @staticmethod
    def device_dict(x): return {"cat": "cpu"}
    @staticmethod
    def device_type_index(x): return "cpu", None
    @staticmethod
    def detect_complex(x):
        return isinstance(x, complex) or (isinstance(x, np.ndarray) and x.dtype.kind == "c")
    @staticmethod
    def get_pointer(x): return x.__array_interface__["data"][0]
    @staticmethod
    def is_contiguous(x): return bool(x.flags.c_contiguous)
    @staticmethod
    def sqdist(x, y): return squared_distances(x, y)


def IsGpuAvailable() -> bool:  # noqa: N802  (pykeops' name)
    """Whether lazymat can run on a GPU here (CUDA through torch).

    >>> IsGpuAvailable() in (True, False)
    True
    """
    try:
        import torch

        return bool(torch.cuda.is_available())
    except ImportError:
        return False


def squared_distances(x: Any, y: Any) -> Any:
    """‖x_i - y_j‖² as a dense (M, N) array.

    >>> squared_distances(np.zeros((2, 3)), np.ones((1, 3))).tolist()
    [[3.0], [3.0]]
    """
    return ((x[:, None, :] - y[None, :, :]) ** 2).sum(-1)


def differences(x: Any, y: Any) -> Any:
    """x_i - y_j as a dense (D, M, N) array (pykeops' layout).

    >>> differences(np.zeros((2, 3)), np.ones((4, 3))).shape
    (3, 2, 4)
    """
    return x.T[:, :, None] - y.T[:, None, :]


def np_kernel(x: Any, y: Any, s: float, kernel: str) -> Any:
    """The dense kernel matrix of pykeops' tests: gaussian, laplacian, cauchy or
    inverse_multiquadric.

    >>> np_kernel(np.zeros((1, 1)), np.ones((2, 1)), 1.0, "cauchy").tolist()
    [[0.5, 0.5]]
    """
    sq = squared_distances(x, y)
    if kernel == "gaussian":
        return np.exp(-sq / (s * s))
    if kernel == "laplacian":
        return np.exp(-np.sqrt(sq) / s)
    if kernel == "cauchy":
        return 1.0 / (1 + sq / (s * s))
    if kernel == "inverse_multiquadric":
        return np.sqrt(1.0 / (1 + sq / (s * s)))
    raise ValueError(f"unknown kernel {kernel!r}")


def log_sum_exp(mat: Any, axis: int = 0) -> Any:
    """A stable log Σ exp along ``axis`` (pykeops' test helper).

    >>> log_sum_exp(np.array([[1000.0, 1000.0]]), axis=1).round(4).tolist()
    [1000.6931]
    """
    top = mat.max(axis=axis, keepdims=True)
    return np.log(np.exp(mat - top).sum(axis=axis)) + top.squeeze(axis)


__all__ = ["numpytools", "IsGpuAvailable", "squared_distances", "differences", "np_kernel",
           "log_sum_exp"]
