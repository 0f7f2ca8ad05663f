"""Content-addressed cache of compiled kernels.

An entry is ``<key>.cpp`` (the source, for users to read), ``<key>.so`` and
``<key>.ok`` (size and sha256 of the .so, written last); a CUDA kernel's is
``<key>.cu``, ``<key>.cubin`` and ``<key>.ok`` (see :func:`ensure_artifact`). The key hashes the
source, the compiler identity and flags, the CPU and the lazymat version, so
a stale or foreign binary is never reused. Builds go to a temp file that is
renamed into place, under an ``flock`` so that concurrent processes compile a
new source once.
"""

from __future__ import annotations

import ctypes
import fcntl
import hashlib
import os
import shlex
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from .. import config
from ..errors import CompileError
from .compiler import NO_COMPILER_MESSAGE, CompilerInfo, compiler_info, cpu_tag

__all__ = ["LIBRARY_VERSION", "load_library", "ensure_artifact", "cache_dir", "cache_clear",
           "stats"]

#: Part of every cache key: ``lazymat.__version__`` (both come from ``config.VERSION``).
LIBRARY_VERSION = config.VERSION

#: Counters for tests and diagnostics: compiles (fresh sources), rebuilds
#: (corrupt entries), disk_hits (valid entry found on disk), memo_hits.
stats: dict[str, int] = {"compiles": 0, "rebuilds": 0, "disk_hits": 0, "memo_hits": 0}

_SUFFIXES = (".cpp", ".so", ".cu", ".cubin", ".ok", ".lock", ".tmp", ".json")
_STDERR_LINES = 40

_memo: dict[str, ctypes.CDLL] = config.memo("compile.cache.libraries", maxsize=None)
# preferred dir -> dir in use, so the fallback warns once (not in the registry: cache_clear
# must not warn again)
_dirs: dict[Path, Path] = {}
_cpu: str | None = None
_thread_lock = threading.RLock()


def _preferred_dir() -> Path:
    return config.cache_dir_setting()


def _writable(path: Path) -> bool:
    """Really try: ``os.access`` says yes to root on a read-only mount or a chmod 555 dir."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
        return True
    except OSError:
        return False


def cache_dir() -> Path:
    """The directory holding compiled kernels (after falling back to a temp dir if needed).

    ``$LAZYMAT_CACHE_DIR``, else ``$XDG_CACHE_HOME/lazymat``, else ``~/.cache/lazymat``.

    Example::

        >>> cache_dir()  # doctest: +SKIP
        PosixPath('/home/me/.cache/lazymat')
    """
    preferred = _preferred_dir()
    found = _dirs.get(preferred)
    if found is not None:
        return found
    with _thread_lock:
        if preferred in _dirs:
            return _dirs[preferred]
        found = preferred
        if not _writable(preferred):
            found = Path(tempfile.gettempdir()) / f"lazymat-{os.getuid()}"
            try:
                found.mkdir(mode=0o700, parents=True, exist_ok=True)
            except OSError:
                pass  # surfaces as a clear OSError at build time
            warnings.warn(
                f"lazymat cache directory {preferred} is not writable; "
                f"using {found} instead (set LAZYMAT_CACHE_DIR to choose another)",
                RuntimeWarning,
                stacklevel=2,
            )
        _dirs[preferred] = found
        return found


def _key(source: str, info: CompilerInfo) -> str:
    global _cpu
    if _cpu is None:
        _cpu = cpu_tag()
    parts = [source, info.identity, shlex.join(info.flags), _cpu, LIBRARY_VERSION]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:32]


def _verbose() -> bool:
    return config.verbose()


def _log(msg: str) -> None:
    print(f"[lazymat] {msg}", file=sys.stderr, flush=True)


def _file_digest(path: Path) -> tuple[int, str]:
    data = path.read_bytes()
    return len(data), hashlib.sha256(data).hexdigest()


def _entry_valid(so: Path, ok: Path) -> bool:
    try:
        size_s, digest = ok.read_text().split()
        if so.stat().st_size != int(size_s):  # cheap check before hashing
            return False
        return _file_digest(so) == (int(size_s), digest)
    except (OSError, ValueError):
        return False


def _atomic_write(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        _unlink(Path(tmp))
        raise


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


@contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    # The thread lock too: flock on a fresh fd does exclude other threads, but
    # serialising in-process avoids piling up blocked fds.
    with _thread_lock, open(lock_path, "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _compile(info: CompilerInfo, src: Path, out: Path, name: str) -> None:
    """Compile ``src`` into the shared library ``out``."""
    cmd = info.command(src, str(out))
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    except OSError as e:
        raise CompileError(
            f"could not run the C++ compiler: {e}\ncommand: {shlex.join(cmd)}\nsource: {src}"
        ) from e
    if res.returncode != 0 or os.path.getsize(out) == 0:
        tail = "\n".join((res.stderr or res.stdout or "").strip().splitlines()[-_STDERR_LINES:])
        raise CompileError(
            f"C++ compilation of {name!r} failed (exit code {res.returncode})\n"
            f"command: {shlex.join(cmd)}\n"
            f"source: {src}\n"
            f"compiler output (last {_STDERR_LINES} lines):\n{tail}"
        )


def _ensure_entry(source: str, name: str = "kernel", *, force: bool = False) -> Path:
    """Path of a valid ``.so`` for ``source``, compiling it if needed (does not load it)."""
    info = compiler_info()
    if info is None:
        raise CompileError(NO_COMPILER_MESSAGE)
    return _ensure_entry_for(source, name, info, _key(source, info), force=force)


def _ensure_entry_for(
    source: str, name: str, info: CompilerInfo, key: str, *, force: bool = False
) -> Path:
    return ensure_artifact(key, source, lambda src, out: _compile(info, src, out, name),
                           name=name, force=force)


def ensure_artifact(key: str, source: str, build: Callable[[Path, Path], None], *,
                    name: str = "kernel", source_suffix: str = ".cpp", suffix: str = ".so",
                    force: bool = False) -> Path:
    """Path of the valid cached artifact ``<key><suffix>`` built from ``source``.

    A missing or corrupt entry is rebuilt under the entry's lock: ``source`` is written
    to ``<key><source_suffix>`` (for users to read, and for error messages), then
    ``build(source_path, temp_path)`` writes the artifact to a temp file, renamed into
    place; ``<key>.ok`` (size and sha256) is written last. The CPU's shared libraries
    and the CUDA backend's cubins both live here.

    Example::

        >>> def build(src, out): out.write_bytes(src.read_bytes().upper())
        >>> ensure_artifact("0" * 32, "hello", build, suffix=".txt").read_text()  # doctest: +SKIP
        'HELLO'
    """
    base = cache_dir() / key
    src, out, ok = (base.with_suffix(s) for s in (source_suffix, suffix, ".ok"))
    if not force and _entry_valid(out, ok):
        stats["disk_hits"] += 1
        return out
    with _locked(base.with_suffix(".lock")):
        # Another process may have built it while we waited for the lock.
        if not force and _entry_valid(out, ok):
            stats["disk_hits"] += 1
            return out
        corrupt = force or out.exists() or ok.exists()
        if corrupt:
            stats["rebuilds"] += 1
            if _verbose():
                _log(f"rebuilding corrupt cache entry {name} ({out})")
        _unlink(ok)  # first, so that a crash below never leaves a valid-looking entry
        _unlink(out)
        _atomic_write(src, source)
        fd, tmp = tempfile.mkstemp(dir=base.parent, prefix=out.name + ".", suffix=".tmp")
        os.close(fd)
        t0 = time.perf_counter()
        try:
            build(src, Path(tmp))
            os.replace(tmp, out)
        finally:
            _unlink(Path(tmp))
        stats["compiles"] += 1
        if _verbose():
            _log(f"compiling {name} -> {src} ... {time.perf_counter() - t0:.2f} s")
        size, digest = _file_digest(out)
        _atomic_write(ok, f"{size} {digest}\n")
    return out


def load_library(source: str, *, name: str = "kernel") -> ctypes.CDLL:
    """Compile C++ ``source`` into a shared library (or reuse the cached one) and load it.

    A second call with the same source in the same process is a dict lookup.
    Raises :class:`~lazymat.errors.CompileError` if there is no compiler or it fails.

    Example::

        >>> lib = load_library('extern "C" int f(void) { return 42; }')
        >>> lib.f()
        42
    """
    info = compiler_info()
    if info is None:
        raise CompileError(NO_COMPILER_MESSAGE)
    key = _key(source, info)
    lib = _memo.get(key)
    if lib is not None:
        stats["memo_hits"] += 1
        return lib
    so = _ensure_entry_for(source, name, info, key)
    try:
        lib = ctypes.CDLL(str(so))
    except OSError:
        # Valid checksum but unloadable (e.g. written by a broken toolchain): rebuild once.
        so = _ensure_entry_for(source, name, info, key, force=True)
        try:
            lib = ctypes.CDLL(str(so))
        except OSError as e:
            raise CompileError(f"cannot load compiled kernel {so} "
                               f"(source {so.with_suffix('.cpp')}): {e}") from e
    _memo[key] = lib
    return lib


def cache_clear() -> None:
    """Delete every cache entry on disk and forget the in-process memo.

    Libraries already loaded stay valid for the rest of the process.

    Example::

        >>> cache_clear()
    """
    with _thread_lock:
        _memo.clear()
        directory = cache_dir()
        try:
            entries = list(directory.iterdir())
        except OSError:
            return
        for path in entries:
            if path.is_file() and path.name.endswith(_SUFFIXES):
                _unlink(path)
