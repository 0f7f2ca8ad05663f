"""pykeops-style ``torchtools``: array helpers that code written for pykeops touches
(``x.tools``, ``from pykeops.torch.utils import torchtools``).

>>> import torch
>>> torchtools.dtypename(torch.float32)
'float32'
"""

from __future__ import annotations

from typing import Any

import torch

from ..genred import Genred
from ..solve import KernelSolve


class torchtools:  # noqa: N801  (pykeops' name)
    """Static helpers over torch tensors, one per name pykeops' torchtools has.

    >>> torchtools.sqdist(torch.zeros(1, 2), torch.ones(3, 2)).tolist()
    [[2.0, 2.0, 2.0]]
    """

    arraytype = torch.Tensor
    float_types = [float]
    arrayname = "torch"
    Genred = Genred
    KernelSolve = KernelSolve

    norm = torch.norm
    arange = torch.arange

    @staticmethod
    def is_tensor(x): return isinstance(x, torch.Tensor)
    @staticmethod
    def copy(x): return x.clone()
    @staticmethod
    def exp(x): return torch.exp(x)
    @staticmethod
    def log(x): return torch.log(x)
    @staticmethod
    def sqrt(x): return torch.sqrt(x)
    @staticmethod
    def power(x, p): return x ** p
    @staticmethod
    def sum(x, axis): return x.sum(dim=axis)
    @staticmethod
    def arraysum(x, axis=None): return x.sum() if axis is None else x.sum(dim=axis)
    @staticmethod
    def sort(x): return torch.sort(x)
    @staticmethod
    def unique(x, return_index=False): return torch.unique(x)
    @staticmethod
    def numpy(x): return x.detach().cpu().numpy()
    @staticmethod
    def repeat(x, *args): return x.repeat(*args)
    @staticmethod
    def rand(m, n, dtype=None, device="cpu"):
        return torch.rand(m, n, dtype=_dtype(dtype), device=device)
    @staticmethod
    def randn(m, n, dtype=None, device="cpu"):
        return torch.randn(m, n, dtype=_dtype(dtype), device=device)
    @staticmethod
    def zeros(shape, dtype=None, device="cpu", requires_grad=False):
        return torch.zeros(shape, dtype=_dtype(dtype), device=device, requires_grad=requires_grad)
    @staticmethod
    def empty(shape, dtype=None, device="cpu", requires_grad=False):
        return torch.empty(shape, dtype=_dtype(dtype), device=device, requires_grad=requires_grad)
    @staticmethod
    def eye(n, dtype=None, device="cpu"): return torch.eye(n, dtype=_dtype(dtype), device=device)
    @staticmethod
    def array(x, dtype=None, device="cpu"):
        return torch.tensor(x, dtype=_dtype(dtype), device=device)
    @staticmethod
    def cat(x, dim): return torch.cat(x, dim)
    @staticmethod
    def view(x, s): return x.view(s)
    @staticmethod
    def transpose(x): return x.t()
    @staticmethod
    def long(x): return x.long()
    @staticmethod
    def size(x): return x.numel()
    @staticmethod
    def tile(*args): return torch.tile(*args)
    @staticmethod
    def solve(A, b): return torch.linalg.solve(A, b)
    @staticmethod
    def contiguous(x): return x.contiguous()
    @staticmethod
    def dtype(x): return x.dtype if hasattr(x, "dtype") else torch.get_default_dtype()
    @staticmethod
    def dtypename(dtype): return str(dtype).replace("torch.", "")
    @staticmethod
    def device(x): return x.device if isinstance(x, torch.Tensor) else None
    @staticmethod
    def device_dict(x): return {"cat": x.device.type, "index": x.device.index}
    @staticmethod
    def device_type_index(x): return x.device.type, x.device.index
    @staticmethod
    def detect_complex(x):
        return isinstance(x, complex) or (isinstance(x, torch.Tensor) and x.is_complex())
    @staticmethod
    def get_pointer(x): return x.data_ptr()
    @staticmethod
    def is_contiguous(x): return x.is_contiguous()
    @staticmethod
    def sqdist(x, y): return ((x[:, None, :] - y[None, :, :]) ** 2).sum(-1)


def _dtype(name: Any) -> Any:
    if name is None or isinstance(name, torch.dtype):
        return name
    return getattr(torch, str(name))


__all__ = ["torchtools"]
