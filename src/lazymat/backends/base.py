"""The contract between ``plan`` and the backends: a :class:`Launch` in, arrays out.

``plan`` checks a request, orients it (the kernel always reduces over j: an axis=0 request
has its i and j swapped) and builds one ``Launch``; the backend named in :data:`REGISTRY`
runs it. A new backend is one module with ``unavailable_reason()`` and ``run(launch)``, plus
one line in ``REGISTRY``.

What ``run(launch)`` returns: a tuple with one array per entry of ``launch.shapes`` (the
reduction's finalized outputs for ``store="output"``, its raw state for ``store="state"``),
each of shape ``batch + (M,) + shape`` or any shape with those elements in that order
(``plan`` reshapes); the library and device of ``launch.like``; int64 for "index" entries.
``M`` or ``N`` is never 0 (``plan`` answers those itself).

A backend may also offer ``bind(launch, result_shapes)``: a function that reruns the launch
on other arrays of the same layout with nothing recomputed (the small calls' fast path, see
``plan.bind``), or None when that launch takes the general path.

>>> sorted(REGISTRY)
['cpu', 'cuda', 'dask', 'reference']
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass
from typing import Any, Protocol, Sequence

from ..formula import Node, variables
from ..reductions import ReductionDef


class once:
    """A property computed on first use and then kept in the instance (like
    ``functools.cached_property``, without its lock: a launch is built and read by one
    thread, and this is on the path of every call)."""

    def __init__(self, fn: Any) -> None:
        self.fn, self.name, self.__doc__ = fn, fn.__name__, fn.__doc__

    def __get__(self, obj: Any, owner: Any = None) -> Any:
        if obj is None:
            return self
        value = obj.__dict__[self.name] = self.fn(obj)
        return value


@dataclass(frozen=True, eq=False)
class Launch:
    """One reduction ready to run: ``red`` of ``formula`` (and ``weight``) over j.

    ``formula`` and ``weight`` are oriented: category 0 is the output index (M rows),
    category 1 the reduced one (N columns). ``arrays`` are the inputs by argument position
    (leading batch dims broadcast to ``batch``; ``offsets`` is then the (nbatch, nargs)
    int64 table of each batch's element offset in each array, else None). ``ranges`` is the
    oriented block-sparse triple (ranges_i, slices_i, redranges_j) of int64 numpy arrays, or
    None. ``xp`` is the array library, ``like`` an array of the data's library, dtype and
    device. ``store``: "output" (finalized outputs) or "state" (the raw partial state).

    The derived facts (``roots``, ``shapes``, ``key``, ...) are computed once per launch.
    """

    red: ReductionDef
    formula: Node
    weight: Node | None
    K: int | None
    dtype: str  # "float32" or "float64"
    accumulation: tuple[str, str]  # the sums' C accumulator type and scheme
    arrays: Sequence[Any]
    M: int
    N: int
    batch: tuple[int, ...]
    offsets: Any
    ranges: tuple[Any, Any, Any] | None
    xp: Any
    like: Any
    store: str = "output"

    @once
    def roots(self) -> list[Node]:
        """The formula, then the weight if any: what kernels and the reference evaluate."""
        return [self.formula] if self.weight is None else [self.formula, self.weight]

    @property
    def wdim(self) -> int | None:
        return None if self.weight is None else self.weight.dim

    @once
    def nbatch(self) -> int:
        return math.prod(self.batch)

    @once
    def shapes(self) -> list[tuple[str, tuple[int, ...]]]:
        """(kind, per-row shape) of each array ``run`` returns, in the store's order."""
        if self.store == "state":
            return self.red.state(self.formula.dim, self.K, self.wdim)
        return self.red.outputs(self.formula.dim, self.K, self.wdim)

    @property
    def fills(self) -> tuple:
        """What each returned array holds for a row that saw no column."""
        return self.red.state_fill if self.store == "state" else self.red.identity

    def array_dtype(self, kind: str) -> Any:
        """The dtype argument of ``xp.empty``/``xp.full`` for an array of this kind: int64
        indices, the data's dtype (None) for values, the accumulator's for "acc" states."""
        if kind == "index":
            return self.xp.int64
        if kind == "acc":
            return getattr(self.xp.module, "float32" if self.accumulation[0] == "float"
                           else "float64")
        return None

    @once
    def arg_dims(self) -> tuple[tuple[int, int], ...]:
        """(dim, category) of every argument position; unused ones are (1, 2)."""
        dims = [(1, 2)] * len(self.arrays)
        for r in self.roots:
            for v in variables(r):
                pos, dim, cat = v.params
                dims[pos] = (dim, cat)
        return tuple(dims)

    @once
    def key(self) -> tuple:
        """What determines the kernel (a cache key, cheap to build on every call)."""
        return (self.red.name, self.formula, self.weight, self.K, self.dtype, len(self.arrays),
                self.accumulation, self.store)

    @property
    def spec(self) -> Any:
        """The ``KernelSpec`` of this launch (what the C renderers are given)."""
        from ..codegen.c_like import KernelSpec

        extra = {} if self.store == "output" else {"store": self.store}
        return KernelSpec(self.red, self.formula, self.weight, self.K, self.dtype,
                          self.arg_dims, self.accumulation, **extra)


class Backend(Protocol):
    """What ``plan`` needs of a backend."""

    name: str

    def unavailable_reason(self) -> str | None:
        """Why this backend cannot run here (None when it can)."""

    def run(self, launch: Launch) -> tuple:
        """The arrays of ``launch.shapes`` (see the module docstring)."""


class Registered:
    """A backend module, imported on first use (importing lazymat stays cheap and torch-free).

    ``run`` looks the module's ``run`` up at each call, so a test may wrap it.
    """

    __slots__ = ("name", "module_name", "_module")

    def __init__(self, name: str, module_name: str) -> None:
        self.name, self.module_name, self._module = name, module_name, None

    def module(self) -> Any:
        if self._module is None:
            self._module = importlib.import_module(self.module_name, __package__)
        return self._module

    def unavailable_reason(self) -> str | None:
        return self.module().unavailable_reason()

    def run(self, launch: Launch) -> tuple:
        return (self._module or self.module()).run(launch)

    def bind(self, launch: Launch, result_shapes: list) -> Any:
        """The module's ``bind(launch, result_shapes)``, or None if it has none."""
        bind = getattr(self._module or self.module(), "bind", None)
        return None if bind is None else bind(launch, result_shapes)

    def __repr__(self) -> str:
        return f"<backend {self.name!r} ({self.module_name})>"


#: Every backend, by the name users pass as ``backend=``.
REGISTRY: dict[str, Backend] = {
    "reference": Registered("reference", ".reference"),
    "cpu": Registered("cpu", ".cpu"),
    "cuda": Registered("cuda", ".cuda"),
    "dask": Registered("dask", ".dask"),
}
