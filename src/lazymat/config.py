"""lazymat's settings and its in-process memos, in one place.

Settings come from the environment, each parsed here by one rule:

- ``LAZYMAT_VERBOSE``: a flag (see :func:`env_flag`): print what is compiled and how long it
  took, and the solver's iterations.
- ``LAZYMAT_NUM_THREADS``, else ``OMP_NUM_THREADS``: threads of a CPU reduction (a positive
  integer; anything else means "the usable cores").
- ``LAZYMAT_CACHE_DIR``, else ``$XDG_CACHE_HOME/lazymat``, else ``~/.cache/lazymat``: the
  compiled kernels.
- ``LAZYMAT_COMPILE_TIMEOUT``: seconds a compiler run may take (default 600; 0 = no limit).
- ``LAZYMAT_TENSOR_CORES``: ``off`` (default), ``tf32`` or ``3xtf32``: whether CUDA kernels
  compute float32 dot products and squared distances of dim >= 16 on tensor cores, and how
  accurately (see :func:`tensor_cores`).

They are read when used (a dictionary lookup), so a change of ``os.environ`` takes effect.

Every module-level cache of lazymat is a :class:`Memo` made by :func:`memo` (or a function
wrapped by :func:`memoize`): it has a name and a size cap, and :func:`clear_all` empties all
of them (``lazymat.cache_clear()`` calls it).

>>> from lazymat import config
>>> squares = config.memo("doc.squares", maxsize=2)
>>> squares[3] = 9
>>> config.clear_all(); len(squares)
0
"""

from __future__ import annotations

import functools
import itertools
import os
from pathlib import Path
from typing import Any, Callable, TypeVar

#: The version of lazymat: ``lazymat.__version__``, the package metadata (pyproject reads it)
#: and part of every compile cache key.
__version__ = "0.1.0"
VERSION = __version__

# ---------------------------------------------------------------------------------------
# The memo registry

class Memo(dict):
    """A named, size-capped dict registered for :func:`clear_all`.

    Reads are plain dict reads (``memo.get(key)``: no cost on hot paths). A store into a
    full memo first drops its oldest entries (an eighth of them), so a memo never grows past
    ``maxsize``.
    """

    __slots__ = ("name", "maxsize")

    def __init__(self, name: str, maxsize: int | None = None) -> None:
        super().__init__()
        self.name, self.maxsize = name, maxsize

    def __setitem__(self, key: Any, value: Any) -> None:
        if self.maxsize is not None and len(self) >= self.maxsize and key not in self:
            # The oldest eighth goes at once: finding the oldest entry skips the slots of the
            # ones deleted before it, and one at a time that costs microseconds per store.
            for old in list(itertools.islice(iter(self), max(1, self.maxsize // 8))):
                self.pop(old, None)  # (another thread may have dropped it)
        super().__setitem__(key, value)

    def setdefault(self, key: Any, default: Any = None) -> Any:
        if key not in self:
            self[key] = default
        return self[key]

    def __repr__(self) -> str:
        return f"Memo({self.name!r}, {len(self)}/{self.maxsize or 'unbounded'} entries)"


#: name -> the function that empties it. A name registered again (a reloaded module) replaces
#: the old entry.
_REGISTRY: dict[str, Callable[[], None]] = {}


def memo(name: str, maxsize: int | None = 1024) -> Memo:
    """A new module-level cache called ``name`` ("module.what"), emptied by :func:`clear_all`.

    Use it only for facts that can be recomputed: a cleared memo is refilled on demand.
    ``maxsize=None`` for caches bounded by nature (one entry per device, per dtype, ...).

    >>> kernels = memo("doc.kernels", maxsize=256)
    >>> kernels.get(("Sum", "float32")) is None
    True
    """
    cache = Memo(name, maxsize)
    _REGISTRY[name] = cache.clear
    return cache


F = TypeVar("F", bound=Callable[..., Any])


def memoize(name: str, maxsize: int | None = 1024) -> Callable[[F], F]:
    """``functools.lru_cache`` registered under ``name`` for :func:`clear_all`.

    >>> @memoize("doc.double", maxsize=8)
    ... def double(x): return 2 * x
    >>> double(4)
    8
    """
    def wrap(fn: F) -> F:
        cached = functools.lru_cache(maxsize=maxsize)(fn)
        _REGISTRY[name] = cached.cache_clear
        return cached  # type: ignore[return-value]
    return wrap


def register(name: str, clear: Callable[[], None]) -> None:
    """Register the ``clear`` function of a cache that is neither a :class:`Memo` nor a
    :func:`memoize` function (a flag, a lazily imported module)."""
    _REGISTRY[name] = clear


def registered() -> list[str]:
    """The names of every registered memo (for tests and diagnostics)."""
    return sorted(_REGISTRY)


def clear_all() -> None:
    """Empty every registered memo (``lazymat.cache_clear()`` calls it)."""
    for clear in list(_REGISTRY.values()):
        clear()


# ---------------------------------------------------------------------------------------
# Settings

_FALSE = frozenset(("", "0", "false", "no", "off"))


def env_flag(name: str) -> bool:
    """The one rule for boolean variables: unset, empty, ``0``, ``false``, ``no`` and ``off``
    (any case, spaces ignored) are false; anything else (``1``, ``true``, ``yes``) is true.

    >>> import os; os.environ["LAZYMAT_DOC_FLAG"] = " False "
    >>> env_flag("LAZYMAT_DOC_FLAG")
    False
    """
    return os.environ.get(name, "").strip().lower() not in _FALSE


def verbose() -> bool:
    """Whether ``LAZYMAT_VERBOSE`` asks for messages (compiles, solver iterations)."""
    return env_flag("LAZYMAT_VERBOSE")


def threads_setting() -> int | None:
    """The threads asked for by ``LAZYMAT_NUM_THREADS`` (else ``OMP_NUM_THREADS``); None when
    neither holds a positive integer.

    >>> import os; os.environ["LAZYMAT_NUM_THREADS"] = "3"
    >>> threads_setting()
    3
    >>> del os.environ["LAZYMAT_NUM_THREADS"]
    """
    for name in ("LAZYMAT_NUM_THREADS", "OMP_NUM_THREADS"):
        value = os.environ.get(name, "").strip()
        if value:
            try:
                n = int(value)
            except ValueError:
                continue
            if n >= 1:
                return n
    return None


@memoize("config.cores", maxsize=1)
def cores() -> int:
    """The CPU cores this process may run on (its affinity mask), looked up once."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def cache_dir_setting() -> Path:
    """The cache directory asked for (``compile.cache_dir()`` falls back to a temp dir when
    it is not writable): ``$LAZYMAT_CACHE_DIR``, else ``$XDG_CACHE_HOME/lazymat``, else
    ``~/.cache/lazymat``."""
    env = os.environ.get("LAZYMAT_CACHE_DIR", "").strip()
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME", "").strip()
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "lazymat"


def compile_timeout() -> float | None:
    """Seconds one compiler run may take (``LAZYMAT_COMPILE_TIMEOUT``, default 600); None
    for no limit (0 or a negative value)."""
    value = os.environ.get("LAZYMAT_COMPILE_TIMEOUT", "").strip()
    try:
        seconds = float(value) if value else 600.0
    except ValueError:
        seconds = 600.0
    return seconds if seconds > 0 else None




#: The values of ``LAZYMAT_TENSOR_CORES``, the first being the default.
TENSOR_CORE_MODES = ("off", "tf32", "3xtf32")


def tensor_cores() -> str:
    """``LAZYMAT_TENSOR_CORES`` (any case, spaces ignored; unset or empty: ``"off"``): whether
    the CUDA backend computes the float32 dot products and squared distances of an i- and a
    j-variable of dim >= 16 with tensor-core MMAs. ``"tf32"``: one MMA on TF32 operands
    (about 1e-3 relative error per product); ``"3xtf32"``: three MMAs on split operands,
    float32-like dot products. Either way a squared distance is ``|x|^2 + |y|^2 - 2<x, y>``
    (clamped at 0): its error is relative to ``|x|^2 + |y|^2``, not to the distance
    (``lazymat.codegen.cuda_mma`` has the details). Another value raises a ValueError that
    names the allowed ones.

    >>> import os; os.environ["LAZYMAT_TENSOR_CORES"] = " 3xTF32 "
    >>> tensor_cores()
    '3xtf32'
    >>> del os.environ["LAZYMAT_TENSOR_CORES"]; tensor_cores()
    'off'
    """
    value = os.environ.get("LAZYMAT_TENSOR_CORES", "").strip().lower() or "off"
    if value not in TENSOR_CORE_MODES:
        raise ValueError(f"LAZYMAT_TENSOR_CORES must be one of "
                         f"{', '.join(TENSOR_CORE_MODES)}, got "
                         f"{os.environ['LAZYMAT_TENSOR_CORES']!r}")
    return value
