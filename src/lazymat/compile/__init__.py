"""Compile generated C++ into shared libraries, cached on disk by content hash.

Example::

    >>> from lazymat.compile import load_library
    >>> lib = load_library('extern "C" int lm_answer(void) { return 42; }')
    >>> lib.lm_answer()
    42
"""

from __future__ import annotations

from .cache import LIBRARY_VERSION, cache_clear, cache_dir, load_library, stats
from .compiler import CompilerInfo, compiler_info

__all__ = [
    "CompilerInfo",
    "LIBRARY_VERSION",
    "cache_clear",
    "cache_dir",
    "compiler_info",
    "load_library",
    "stats",
]
