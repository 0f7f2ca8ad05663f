"""Compile kernels ahead of time into a cache directory (Docker images, shared file
systems, CI), so that later processes find them there and compile nothing.

Each entry is run once, on small made-up arrays, through the same front end a user calls
(:class:`lazymat.Genred`), so that exactly the kernels those calls need are compiled: the
plain one, the one a call with few rows and many columns uses (its columns cut into one
part per thread), and with ``grad=True`` (torch) the backward pass's. Kernels depend on
the formula, the reduction, the dtype and the dims, not on M, N or the batch shape.

The cache is valid where the compiler (path and version) and the CPU model are the same:
build it with the compiler and on the kind of machine that will use it. A directory that
users cannot write to is then read as is (see :mod:`lazymat.compile.paths`).

Example::

    >>> import lazymat
    >>> report = lazymat.precompile([("Exp(-SqDist(x, y)) * b",
    ...                               ["x = Vi(3)", "y = Vj(3)", "b = Vj(1)"], "Sum", 1)],
    ...                             cache_dir="/tmp/lazymat-warm", dtypes=["float32"])
    >>> report["cache_dir"]  # doctest: +SKIP
    '/tmp/lazymat-warm'
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from . import config
from .errors import LazymatError

__all__ = ["Entry", "precompile", "load_spec", "main"]

#: Rows and columns of the made-up arrays: the plain call (enough row blocks for every
#: thread) and the column-split call (one row; enough pairs for two threads, columns for two
#: parts).
PLAIN_SIZES = (256, 64)
SPLIT_SIZES = (1, 1 << 15)


@dataclass(frozen=True)
class Entry:
    """One reduction to compile: a Genred's arguments (same defaults: Sum, axis 0), and
    optionally its own dtypes, backends and whether to compile its gradient (torch, every
    variable).

    Example::

        >>> Entry("SqDist(x, y)", ("x = Vi(3)", "y = Vj(3)"), "ArgKMin", 1, K=5).reduction
        'ArgKMin'
    """

    formula: str
    aliases: tuple[str, ...]
    reduction: str = "Sum"
    axis: int = 0  # Genred's default
    K: int | None = None
    formula2: str | None = None
    dtypes: tuple[str, ...] | None = None
    backends: tuple[str, ...] | None = None
    grad: bool | None = None
    options: dict = field(default_factory=dict)  # other Genred keywords (dtype_acc, ...)


def _entry(item: Any) -> Entry:
    """An :class:`Entry` from an Entry, a dict of its fields, a ``(formula, aliases[,
    reduction[, axis]])`` tuple or a :class:`lazymat.Genred`."""
    if isinstance(item, Entry):
        return item
    if isinstance(item, dict):
        known = {k: item[k] for k in Entry.__dataclass_fields__ if k in item}
        extra = {k: v for k, v in item.items() if k not in Entry.__dataclass_fields__}
        if "formula" not in known or "aliases" not in known:
            raise LazymatError(f"precompile entry {item!r}: needs 'formula' and 'aliases'")
        for key in ("aliases", "dtypes", "backends"):
            if known.get(key) is not None:
                known[key] = tuple([known[key]] if isinstance(known[key], str) else known[key])
        options = {**(known.pop("options", None) or {}), **extra}
        return Entry(**known, options=options)
    if isinstance(item, (tuple, list)) and 2 <= len(item) <= 4 and isinstance(item[0], str):
        formula, aliases, *rest = item
        return Entry(formula, tuple(aliases), *rest)
    if all(hasattr(item, a) for a in ("formula_string", "aliases", "reduction_op", "axis")):
        return Entry(item.formula_string, tuple(item.aliases), item.reduction_op, item.axis,
                     getattr(item, "opt_arg", None), getattr(item, "formula2_string", None),
                     options=dict(getattr(item, "options", {})))
    raise LazymatError(f"precompile entry {item!r}: give (formula, aliases[, reduction[, "
                       "axis]]), a dict with 'formula' and 'aliases', an Entry or a Genred")


@contextmanager
def _environment(**values: str | None) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in values}
    try:
        for k, v in values.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _arrays(entry: Entry, M: int, N: int, dtype: str, backend: str, grad: bool
            ) -> list[Any]:
    """Made-up inputs for ``entry``: positive values (Log, Sqrt and Pow stay finite)."""
    import numpy as np

    from .formula.parser import parse_alias

    rng = np.random.default_rng(0)
    by_pos: dict[int, tuple[int, int]] = {}
    for k, text in enumerate(entry.aliases):
        _, pos, dim, cat = parse_alias(text)
        by_pos[k if pos is None else pos] = (dim, cat)
    arrays = []
    for pos in range(max(by_pos) + 1 if by_pos else 0):
        dim, cat = by_pos.get(pos, (1, 2))
        rows = {0: M, 1: N}.get(cat)
        if entry.axis == 0 and rows is not None:  # axis 0 reduces over i: i is the long side
            rows = {0: N, 1: M}[cat]
        shape = (dim,) if rows is None else (rows, dim)
        arrays.append((0.5 + rng.random(shape)).astype(dtype))
    if backend == "cpu" and not grad:
        return arrays
    import torch

    device = "cuda" if backend == "cuda" else "cpu"
    return [torch.tensor(a, device=device, requires_grad=grad) for a in arrays]


def _run(entry: Entry, dtype: str, backend: str, grad: bool) -> None:
    from .genred import Genred

    routine = Genred(entry.formula, list(entry.aliases), entry.reduction, entry.axis,
                     opt_arg=entry.K, formula2=entry.formula2, **entry.options)
    for M, N in (PLAIN_SIZES, SPLIT_SIZES):
        arrays = _arrays(entry, M, N, dtype, backend, grad)
        outs = routine(*arrays, backend=backend)
        if grad:
            outs = outs if isinstance(outs, tuple) else (outs,)
            import torch

            values = [o for o in outs if o.dtype.is_floating_point and o.requires_grad]
            if values:
                inputs = [a for a in arrays if a.requires_grad]
                torch.autograd.grad(sum(v.sum() for v in values), inputs, allow_unused=True)


def precompile(entries: Iterable[Any], *, cache_dir: str | os.PathLike[str] | None = None,
               dtypes: Sequence[str] = ("float32", "float64"),
               backends: Sequence[str] = ("cpu",), grad: bool = False,
               verbose: bool = False) -> dict[str, Any]:
    """Compile the kernels of ``entries`` into ``cache_dir`` (default: the cache in use).

    ``entries``: ``(formula, aliases[, reduction[, axis]])`` tuples, dicts of
    :class:`Entry`'s fields (``K``, ``formula2``, per-entry ``dtypes``/``backends``/``grad``
    and other Genred keywords), :class:`Entry` objects or :class:`lazymat.Genred` objects.
    ``backends``: "cpu" and/or "cuda" (the cubins of this machine's GPUs). ``grad``: also
    compile the gradient kernels (torch) of the entries that do not say otherwise.

    Returns ``{"cache_dir", "compiled", "found", "seconds", "kernels"}``: kernels compiled
    now, found already in the cache, and one line per entry, dtype and backend.

    Example::

        >>> precompile([("SqDist(x, y)", ["x = Vi(2)", "y = Vj(2)"], "Min", 1)],
        ...            dtypes=["float64"])["compiled"] >= 0
        True
    """
    from .compile import stats
    from .compile.paths import cache_dir as resolved_dir

    items = [_entry(e) for e in entries]
    target = os.fspath(Path(cache_dir).expanduser().resolve()) if cache_dir is not None \
        else os.environ.get("LAZYMAT_CACHE_DIR")
    lines, t0 = [], time.perf_counter()
    before = (stats["compiles"] + stats["rebuilds"], stats["disk_hits"])
    # Two threads: the column-split kernel is chosen only where a call has several.
    with _environment(LAZYMAT_CACHE_DIR=target, LAZYMAT_NUM_THREADS="2",
                      LAZYMAT_VERBOSE="1" if verbose else os.environ.get("LAZYMAT_VERBOSE")):
        config.clear_all()  # loaded kernels (of another directory) must not stand in
        directory = resolved_dir()
        for entry in items:
            for backend in entry.backends or tuple(backends):
                if backend not in ("cpu", "cuda"):
                    raise LazymatError(f"precompile: backend {backend!r} is not 'cpu' or "
                                       "'cuda'")
                for dtype in entry.dtypes or tuple(dtypes):
                    want_grad = grad if entry.grad is None else entry.grad
                    start = stats["compiles"] + stats["rebuilds"]
                    _run(entry, dtype, backend, want_grad)
                    made = stats["compiles"] + stats["rebuilds"] - start
                    lines.append(f"{entry.reduction}({entry.formula}) axis={entry.axis} "
                                 f"{dtype} {backend}{' +grad' if want_grad else ''}: "
                                 f"{made} compiled")
                    if verbose:
                        print(f"[lazymat] precompile {lines[-1]}", file=sys.stderr,
                              flush=True)
    config.clear_all()  # back to the caller's cache directory and settings
    return {"cache_dir": str(directory),
            "compiled": stats["compiles"] + stats["rebuilds"] - before[0],
            "found": stats["disk_hits"] - before[1],
            "seconds": round(time.perf_counter() - t0, 3), "kernels": lines}


def load_spec(path_or_module: str) -> dict[str, Any]:
    """The precompile spec of a ``.json`` file (a list of entries, or an object with
    ``entries`` and optional ``dtypes``, ``backends``, ``grad``), a ``.py`` file or a module
    name (``PRECOMPILE``: such a list or object; optional ``DTYPES``, ``BACKENDS``,
    ``GRAD``).

    Example::

        >>> load_spec("myproject.kernels")  # doctest: +SKIP
        {'entries': [...], 'dtypes': ['float32']}
    """
    path = Path(path_or_module)
    if path.suffix == ".json":
        data = json.loads(path.read_text())
    else:
        if path.suffix == ".py":
            found = importlib.util.spec_from_file_location("lazymat_precompile_spec", path)
            if found is None or found.loader is None:
                raise LazymatError(f"cannot load {path}")
            module = importlib.util.module_from_spec(found)
            found.loader.exec_module(module)
        else:
            module = importlib.import_module(path_or_module)
        if not hasattr(module, "PRECOMPILE"):
            raise LazymatError(f"{path_or_module} defines no PRECOMPILE list")
        data = module.PRECOMPILE
        if not isinstance(data, dict):
            data = {"entries": data}
            for key in ("dtypes", "backends", "grad"):
                if hasattr(module, key.upper()):
                    data[key] = getattr(module, key.upper())
    if not isinstance(data, dict):
        data = {"entries": data}
    if "entries" not in data:
        raise LazymatError(f"{path_or_module}: no 'entries' in the precompile spec")
    return data


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m lazymat precompile SPEC [--cache-dir DIR] [--dtype D ...] [--backend B
    ...] [--grad] [-q]``: see :func:`load_spec` and :func:`precompile`."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m lazymat precompile",
                                     description="Compile lazymat kernels into a cache "
                                                 "directory ahead of time.")
    parser.add_argument("spec", help="a .json or .py file, or a module name, holding the "
                                     "entries (PRECOMPILE)")
    parser.add_argument("--cache-dir", help="where to put them (default: LAZYMAT_CACHE_DIR, "
                                            "else ~/.cache/lazymat)")
    parser.add_argument("--dtype", action="append", help="float32, float64 (repeatable; "
                                                         "default: the spec's, else both)")
    parser.add_argument("--backend", action="append", help="cpu, cuda (repeatable)")
    parser.add_argument("--grad", action="store_true", help="also the gradients (torch)")
    parser.add_argument("-q", "--quiet", action="store_true")
    args = parser.parse_args(argv)
    spec = load_spec(args.spec)
    report = precompile(spec["entries"], cache_dir=args.cache_dir,
                        dtypes=args.dtype or spec.get("dtypes") or ("float32", "float64"),
                        backends=args.backend or spec.get("backends") or ("cpu",),
                        grad=args.grad or bool(spec.get("grad", False)),
                        verbose=not args.quiet)
    if not args.quiet:
        print(f"lazymat precompile: {report['compiled']} kernels compiled, "
              f"{report['found']} already there, in {report['cache_dir']} "
              f"({report['seconds']:.1f} s)")
    return 0
