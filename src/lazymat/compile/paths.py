"""Where compiled kernels live, and which directories are safe to load code from.

A kernel library is code lazymat will run, so a cache directory must be one no other
user can write to: a real directory (not a symlink), owned by the current user, not
group- or world-writable. The preferred directory is ``$LAZYMAT_CACHE_DIR``, else
``$XDG_CACHE_HOME/lazymat``, else ``~/.cache/lazymat``. When it cannot be used:

- it is ours (or root's) but read-only, e.g. an admin-built cache on a shared file
  system: its kernels are still *loaded*, new ones go to a writable fallback;
- otherwise it is ignored, with a warning saying why.

The fallback is ``<tempdir>/lazymat-<uid>`` if that passes the same checks, else a fresh
``mkdtemp`` directory (another user may have planted the predictable one).

Example::

    >>> cache_dirs().write  # doctest: +SKIP
    PosixPath('/home/me/.cache/lazymat')
"""

from __future__ import annotations

import os
import stat
import tempfile
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

from .. import config

__all__ = ["CacheDirs", "cache_dirs", "cache_dir", "unsafe_reason", "trusted_owners",
           "take_pending_warning", "forget"]


@dataclass(frozen=True)
class CacheDirs:
    """``write``: where new kernels go (ours, private). ``read``: read-only directories
    whose valid kernels are used too (searched after ``write``)."""

    write: Path
    read: tuple[Path, ...] = ()


# Not in config's memo registry: cache_clear() must not resolve (and warn) again.
_dirs: dict[tuple[Path, str], CacheDirs] = {}
_pending: dict[Path, str] = {}  # write dir -> warning to give at its first compile
_lock = threading.Lock()


def _after_fork_in_child() -> None:
    global _lock
    _lock = threading.Lock()  # a thread of the parent may have held it at the fork


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _uid() -> int | None:
    return os.getuid() if hasattr(os, "getuid") else None


def trusted_owners(read_only: bool = False) -> frozenset[int] | None:
    """Owners whose files lazymat loads: ourselves, and root for read-only caches
    (root can run code as anyone anyway). None where there are no uids (Windows)."""
    uid = _uid()
    if uid is None:
        return None
    return frozenset({uid, 0}) if read_only else frozenset({uid})


def unsafe_reason(path: Path, owners: frozenset[int] | None, *, directory: bool = True
                  ) -> str | None:
    """Why ``path`` must not be trusted (None if it is fine): checked with ``lstat``, so a
    symlink is refused rather than followed.

    Example::

        >>> unsafe_reason(Path("/tmp"), trusted_owners())  # doctest: +SKIP
        'is group- or world-writable (mode 1777)'
    """
    try:
        st = os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return "does not exist and cannot be created" if directory else "does not exist"
    except OSError as e:
        return f"cannot be inspected ({e.strerror})"
    if stat.S_ISLNK(st.st_mode):
        return "is a symbolic link"
    if directory and not stat.S_ISDIR(st.st_mode):
        return "is not a directory"
    if not directory and not stat.S_ISREG(st.st_mode):
        return "is not a regular file"
    if owners is not None:  # POSIX: ownership and permission bits mean something
        if st.st_uid not in owners:
            return f"is owned by uid {st.st_uid}, not by this user (uid {_uid()})"
        if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            return f"is group- or world-writable (mode {stat.S_IMODE(st.st_mode):o})"
    return None


def _preferred_dir() -> Path:
    return config.cache_dir_setting()


def _writable(path: Path) -> bool:
    """Really try: ``os.access`` says yes to root on a read-only mount or a chmod 555 dir."""
    try:
        with tempfile.TemporaryFile(dir=path):
            pass
        return True
    except OSError:
        return False


def _make(path: Path) -> None:
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError:
        pass  # inspected next: "does not exist" or "is not a directory"


def _private_ok(path: Path) -> str | None:
    """Why ``path`` cannot hold our new kernels (None when it can)."""
    reason = unsafe_reason(path, trusted_owners())
    if reason is None and not _writable(path):
        reason = "is not writable"
    return reason


def _resolve(preferred: Path) -> tuple[CacheDirs, str | None, bool]:
    """(the dirs, a warning or None, whether to hold the warning until the first compile)."""
    _make(preferred)
    reason = _private_ok(preferred)
    if reason is None:
        return CacheDirs(preferred), None, False
    read: tuple[Path, ...] = ()
    if (unsafe_reason(preferred, trusted_owners(read_only=True)) is None
            and os.access(preferred, os.R_OK | os.X_OK)):
        read = (preferred,)
        reason = "is read-only"
    uid = _uid()
    usual = Path(tempfile.gettempdir()) / f"lazymat-{uid if uid is not None else 'user'}"
    _make(usual)
    fallback, fallback_reason, note = usual, _private_ok(usual), ""
    if fallback_reason is not None:
        fallback = Path(tempfile.mkdtemp(prefix="lazymat-"))  # 0700, ours, unpredictable
        note = (f" (the usual fallback {usual} {fallback_reason}; kernels compiled now are "
                "not kept across processes)")
    used = "; its kernels are still used" if read else ""
    if "writable (mode" in reason:  # ours, but others could plant kernels in it
        used = f" (run `chmod go-w {preferred}` if only you should write there)"
    message = (f"lazymat cache directory {preferred} {reason}{used}; new kernels go to "
               f"{fallback}{note} (set LAZYMAT_CACHE_DIR to choose another)")
    # A read-only shared cache is a deliberate setup: say so only if it lacks a kernel.
    return CacheDirs(fallback, read), message, bool(read) and fallback_reason is None


def cache_dirs() -> CacheDirs:
    """The cache directories in use (resolved once per preferred directory and process).

    Example::

        >>> isinstance(cache_dirs().write, Path)
        True
    """
    preferred = _preferred_dir()
    key = (preferred, tempfile.gettempdir())
    found = _dirs.get(key)
    if found is not None:
        return found
    with _lock:
        if key not in _dirs:
            dirs, message, defer = _resolve(preferred)
            if message is not None:
                if defer:
                    _pending[dirs.write] = message
                else:
                    warnings.warn(message, RuntimeWarning, stacklevel=3)
            _dirs[key] = dirs
        return _dirs[key]


def cache_dir() -> Path:
    """The directory new kernels are written to (after any fallback).

    Example::

        >>> cache_dir()  # doctest: +SKIP
        PosixPath('/home/me/.cache/lazymat')
    """
    return cache_dirs().write


def take_pending_warning(write: Path) -> str | None:
    """The held-back warning for ``write`` (once): the cache build path gives it."""
    with _lock:
        return _pending.pop(write, None)


def forget() -> None:
    """Resolve the directories again at the next call (tests; a changed environment)."""
    with _lock:
        _dirs.clear()
        _pending.clear()
