"""Content-addressed cache of compiled kernels.

An entry is ``<key>.cpp`` (the source, for users to read), ``<key>.so`` and
``<key>.ok`` (size and sha256 of the .so, written last); a CUDA kernel's is
``<key>.cu``, ``<key>.cubin`` and ``<key>.ok`` (see :func:`ensure_artifact`). The key hashes the
source, the compiler identity and flags, the CPU and the lazymat version, so
a stale or foreign binary is never reused.

Safety rules (a kernel is code this process runs):

- the directories come from :mod:`lazymat.compile.paths`, which refuses any that another
  user could write to;
- an entry is used only if its file is a regular file (``lstat``), its size and sha256
  match the ``.ok`` record and, for ELF files, every segment lies inside the file (a
  truncated library would die with SIGBUS in ``dlopen``); anything else is rebuilt,
  including a ``.so``/``.ok``/``.lock`` that is a directory;
- builds go to a temp file renamed into place, under a per-entry lock (``fcntl.flock``,
  ``msvcrt.locking`` on Windows, else an ``O_EXCL`` lock file) so that concurrent processes
  compile a new source once; a holder whose process is gone or that held the lock longer
  than the compile timeout is taken over; temp files older than that are swept away.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shlex
import shutil
import socket
import stat
import struct
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
from .compiler import (NO_COMPILER_MESSAGE, CommandTimeout, CompilerInfo, compile_timeout,
                       compiler_info, cpu_tag, run_command)
from .paths import cache_dir, cache_dirs, take_pending_warning, trusted_owners

__all__ = ["LIBRARY_VERSION", "load_library", "library_path", "ensure_artifact", "cache_dir",
           "cache_clear", "forget_loaded", "stats", "lock_kind"]

#: Part of every cache key: ``lazymat.__version__`` (both come from ``config.VERSION``).
LIBRARY_VERSION = config.VERSION

#: Counters for tests and diagnostics: compiles (fresh sources), rebuilds
#: (corrupt entries), disk_hits (valid entry found on disk), memo_hits, takeovers (stale
#: locks taken over).
stats: dict[str, int] = {"compiles": 0, "rebuilds": 0, "disk_hits": 0, "memo_hits": 0,
                         "takeovers": 0}

_SUFFIXES = (".cpp", ".so", ".cu", ".cubin", ".ok", ".lock", ".tmp", ".json")
_STDERR_LINES = 40
#: A lock held this much longer than the compile timeout belongs to a stuck process.
_LOCK_MARGIN = 30.0

_memo: dict[str, ctypes.CDLL] = config.memo("compile.cache.libraries", maxsize=None)
_cpu: str | None = None
_thread_lock = threading.RLock()
_swept: set[Path] = set()  # directories whose stale temp files were swept by this process


def _after_fork_in_child() -> None:
    # A fork while another thread held the lock (compiling) would leave the child's copy held
    # forever; the child has no such thread, so it starts with a fresh lock.
    global _thread_lock
    _thread_lock = threading.RLock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


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


def _elf_complete(data: bytes) -> bool:
    """Whether every program segment and the section table of an ELF image lie inside it
    (True for non-ELF data: only ELF is mapped by segments here)."""
    if not data.startswith(b"\x7fELF"):
        return True
    try:
        wide, order = data[4] == 2, "<" if data[5] == 1 else ">"
        if wide:
            phoff, shoff = struct.unpack_from(order + "QQ", data, 0x20)
            phentsize, phnum, shentsize, shnum = struct.unpack_from(order + "HHHH", data, 0x36)
        else:
            phoff, shoff = struct.unpack_from(order + "II", data, 0x1C)
            phentsize, phnum, shentsize, shnum = struct.unpack_from(order + "HHHH", data, 0x2A)
        size = len(data)
        if phoff + phnum * phentsize > size or shoff + shnum * shentsize > size:
            return False
        for k in range(phnum):
            at = phoff + k * phentsize
            if wide:
                offset, filesz = struct.unpack_from(order + "Q", data, at + 8)[0], \
                    struct.unpack_from(order + "Q", data, at + 32)[0]
            else:
                offset, filesz = struct.unpack_from(order + "I", data, at + 4)[0], \
                    struct.unpack_from(order + "I", data, at + 16)[0]
            if offset + filesz > size:
                return False
        return True
    except (struct.error, IndexError):
        return False


def _record(data: bytes) -> str:
    return f"{len(data)} {hashlib.sha256(data).hexdigest()}\n"


def _entry_valid(out: Path, ok: Path, owners: frozenset[int] | None = None,
                 check_owner: bool = False) -> bool:
    """Whether ``out`` is a complete artifact matching its ``.ok`` record.

    ``check_owner`` (entries of a read-only cache): the file must also belong to one of
    ``owners`` and not be writable by others."""
    from .paths import unsafe_reason

    try:
        st = os.lstat(out)
        if not stat.S_ISREG(st.st_mode):
            return False
        if check_owner and unsafe_reason(out, owners, directory=False) is not None:
            return False
        size_s, digest = ok.read_text().split()
        if st.st_size != int(size_s):  # cheap check before hashing
            return False
        data = out.read_bytes()
        return _record(data) == f"{size_s} {digest}\n" and _elf_complete(data)
    except (OSError, ValueError):
        return False


def _remove(path: Path) -> None:
    """Remove a file, or a directory where a file should be (a broken or hostile entry)."""
    try:
        if stat.S_ISDIR(os.lstat(path).st_mode):
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink()
    except FileNotFoundError:
        pass
    except PermissionError:  # Windows: a library another process has loaded
        pass


def _replace(tmp: Path, dst: Path) -> None:
    """``os.replace``, retried briefly where the target is busy (Windows sharing rules)."""
    for attempt in range(20):
        try:
            os.replace(tmp, dst)
            return
        except PermissionError:
            if attempt == 19:
                raise
            _remove(dst)
            time.sleep(0.05)


def _atomic_write(path: Path, text: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        _remove(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        _replace(Path(tmp), path)
    except BaseException:
        _remove(Path(tmp))
        raise


def _lock_age() -> float:
    timeout = compile_timeout()
    return (timeout if timeout is not None else 3600.0) + _LOCK_MARGIN


def _sweep_temp_files(directory: Path) -> None:
    """Delete ``*.tmp`` files older than a compile could run: left by a killed process."""
    if directory in _swept:
        return
    _swept.add(directory)
    cutoff = time.time() - _lock_age()
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return
    for entry in entries:
        try:
            if entry.name.endswith(".tmp") and entry.stat(follow_symlinks=False).st_mtime < cutoff:
                _remove(Path(entry.path))
        except OSError:
            pass


# --- locking -------------------------------------------------------------------------------

def lock_kind() -> str:
    """How entry locks are taken here: "fcntl" (POSIX), "msvcrt" (Windows) or "file"
    (an ``O_EXCL`` lock file, where neither module exists).

    Example::

        >>> lock_kind()  # doctest: +SKIP
        'fcntl'
    """
    try:
        import fcntl  # noqa: F401

        return "fcntl"
    except ImportError:
        pass
    try:
        import msvcrt  # noqa: F401

        return "msvcrt"
    except ImportError:
        return "file"


def _try_lock(kind: str, fd: int) -> bool:
    if kind == "fcntl":
        import fcntl

        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except (BlockingIOError, PermissionError):
            return False
    import msvcrt

    try:
        os.lseek(fd, 0, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        return True
    except OSError:
        return False


def _unlock(kind: str, fd: int) -> None:
    if kind == "fcntl":
        import fcntl

        fcntl.flock(fd, fcntl.LOCK_UN)
    else:
        import msvcrt

        os.lseek(fd, 0, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)


_HOST = socket.gethostname()


def _holder_text() -> bytes:
    return f"{os.getpid()} {time.time():.3f} {_HOST}\n".encode()


def _holder_gone(text: str, waited: float) -> bool:
    """Whether the holder recorded in a lock (``"pid time host"``) is gone or stuck."""
    parts = text.split()
    if len(parts) != 3:  # just created, or unreadable (Windows locks are mandatory)
        return waited > _lock_age()
    pid_s, since_s, host = parts
    try:
        pid, since = int(pid_s), float(since_s)
    except ValueError:
        return waited > _lock_age()
    if time.time() - since > _lock_age():
        return True
    if host == _HOST and os.name == "posix":  # os.kill(pid, 0) kills on Windows
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except OSError:
            pass
    return False


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def _read_fd(fd: int) -> str:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        return os.read(fd, 200).decode(errors="replace")
    except OSError:  # Windows: the holder's locked byte cannot be read
        return ""


def _write_holder(fd: int) -> None:
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, _holder_text())


def _take_over(path: Path, expected: os.stat_result | None) -> None:
    """Remove a stale lock file (if it is still the one examined) so a new one can be made."""
    try:
        now = os.lstat(path)
        if expected is None or (now.st_ino, now.st_dev) == (expected.st_ino, expected.st_dev):
            _remove(path)
            stats["takeovers"] += 1
            if _verbose():
                _log(f"taking over the stale lock {path}")
    except OSError:
        pass


def _acquire(path: Path) -> tuple[str, int]:
    """Block until this process holds the lock ``path``; returns (kind, fd)."""
    kind = lock_kind()
    start, delay = time.monotonic(), 0.005
    while True:
        if os.path.isdir(path) and not os.path.islink(path):
            _remove(path)
        waited = time.monotonic() - start
        if kind == "file":
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
                _write_holder(fd)
                return kind, fd
            except FileExistsError:
                try:
                    seen = os.lstat(path)
                except OSError:
                    continue
                if _holder_gone(_read(path), waited):
                    _take_over(path, seen)
                    continue
        else:
            fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
            if _try_lock(kind, fd):
                try:
                    same = os.path.samestat(os.fstat(fd), os.stat(path))
                except OSError:
                    same = False
                if same:  # not a file a taker-over has just unlinked
                    _write_holder(fd)
                    return kind, fd
                _unlock(kind, fd)
            elif _holder_gone(_read_fd(fd), waited):
                _take_over(path, os.fstat(fd))
            os.close(fd)
        time.sleep(delay)
        delay = min(0.2, delay * 1.5)


def _release(path: Path, kind: str, fd: int) -> None:
    try:
        if kind == "file":
            if _read(path) == _read_fd(fd):  # still ours, not a taker-over's
                _remove(path)
        else:
            os.ftruncate(fd, 0)  # no stale holder record for the next waiter to misread
            _unlock(kind, fd)
    finally:
        os.close(fd)


@contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    # The thread lock too: other threads of this process wait on it instead of polling.
    with _thread_lock:
        kind, fd = _acquire(lock_path)
        try:
            yield
        finally:
            _release(lock_path, kind, fd)


# --- building ------------------------------------------------------------------------------

def _compile(info: CompilerInfo, src: Path, out: Path, name: str) -> None:
    """Compile ``src`` into the shared library ``out``."""
    cmd = info.command(src, str(out))
    timeout = compile_timeout()
    try:
        res = run_command(cmd, timeout, info.environment)
    except OSError as e:
        raise CompileError(
            f"could not run the C++ compiler: {e}\ncommand: {shlex.join(cmd)}\nsource: {src}"
        ) from e
    except CommandTimeout:
        raise CompileError(
            f"C++ compilation of {name!r} timed out after {timeout:g} s and was killed "
            f"(set LAZYMAT_COMPILE_TIMEOUT to allow longer, 0 for no limit)\n"
            f"command: {shlex.join(cmd)}\nsource: {src}") from None
    if res.returncode != 0 or os.path.getsize(out) == 0:
        tail = "\n".join((res.stderr or res.stdout or "").strip().splitlines()[-_STDERR_LINES:])
        raise CompileError(
            f"C++ compilation of {name!r} failed (exit code {res.returncode})\n"
            f"command: {shlex.join(cmd)}\n"
            f"source: {src}\n"
            f"compiler output (last {_STDERR_LINES} lines):\n{tail}"
        )


def library_path(source: str, name: str = "kernel", *, force: bool = False) -> Path:
    """Path of a valid ``.so`` for ``source``, compiling it if needed (does not load it).

    Example::

        >>> library_path('extern "C" int f(void) { return 1; }').suffix
        '.so'
    """
    info = compiler_info()
    if info is None:
        raise CompileError(NO_COMPILER_MESSAGE)
    return _ensure_entry_for(source, name, info, _key(source, info), force=force)


def _ensure_entry_for(
    source: str, name: str, info: CompilerInfo, key: str, *, force: bool = False
) -> Path:
    return ensure_artifact(key, source, lambda src, out: _compile(info, src, out, name),
                           name=name, force=force)


def _find_valid(key: str, suffix: str) -> Path | None:
    """A valid entry in the writable directory, else in a read-only one."""
    dirs = cache_dirs()
    base = dirs.write / key
    if _entry_valid(base.with_suffix(suffix), base.with_suffix(".ok")):
        return base.with_suffix(suffix)
    owners = trusted_owners(read_only=True)
    for directory in dirs.read:
        base = directory / key
        if _entry_valid(base.with_suffix(suffix), base.with_suffix(".ok"), owners, True):
            return base.with_suffix(suffix)
    return None


def ensure_artifact(key: str, source: str, build: Callable[[Path, Path], None], *,
                    name: str = "kernel", source_suffix: str = ".cpp", suffix: str = ".so",
                    force: bool = False) -> Path:
    """Path of the valid cached artifact ``<key><suffix>`` built from ``source``.

    A missing or corrupt entry is rebuilt under the entry's lock: ``source`` is written
    to ``<key><source_suffix>`` (for users to read, and for error messages), then
    ``build(source_path, temp_path)`` writes the artifact to a temp file, renamed into
    place; ``<key>.ok`` (size and sha256) is written last. The CPU's shared libraries
    and the CUDA backend's cubins both live here. ``force`` rebuilds a valid-looking
    entry (one that failed to load).

    Example::

        >>> def build(src, out): out.write_bytes(src.read_bytes().upper())
        >>> ensure_artifact("0" * 32, "hello", build, suffix=".txt").read_text()  # doctest: +SKIP
        'HELLO'
    """
    if not force:
        found = _find_valid(key, suffix)
        if found is not None:
            stats["disk_hits"] += 1
            return found
    directory = cache_dir()
    base = directory / key
    src, out, ok = (base.with_suffix(s) for s in (source_suffix, suffix, ".ok"))
    with _locked(base.with_suffix(".lock")):
        # Another process may have built it while we waited for the lock.
        if not force and _entry_valid(out, ok):
            stats["disk_hits"] += 1
            return out
        message = take_pending_warning(directory)
        if message is not None:
            warnings.warn(message, RuntimeWarning, stacklevel=2)
        _sweep_temp_files(directory)
        corrupt = force or os.path.lexists(out) or os.path.lexists(ok)
        if corrupt:
            stats["rebuilds"] += 1
            if _verbose():
                _log(f"rebuilding corrupt cache entry {name} ({out})")
        _remove(ok)  # first, so that a crash below never leaves a valid-looking entry
        _remove(out)
        _atomic_write(src, source)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=out.name + ".", suffix=".tmp")
        os.close(fd)
        t0 = time.perf_counter()
        try:
            build(src, Path(tmp))
            data = Path(tmp).read_bytes()
            _replace(Path(tmp), out)
        finally:
            _remove(Path(tmp))
        stats["compiles"] += 1
        if _verbose():
            _log(f"compiling {name} -> {src} ... {time.perf_counter() - t0:.2f} s")
        _atomic_write(ok, _record(data))
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


def forget_loaded() -> None:
    """Forget the in-process memo of loaded libraries (the next load looks at the disk).

    Example::

        >>> forget_loaded()
    """
    with _thread_lock:
        _memo.clear()


def cache_clear() -> None:
    """Delete every cache entry on disk (of the writable directory) and forget the
    in-process memo.

    Libraries already loaded stay valid for the rest of the process. Lock files and the
    temporary files of compiles still running (in other processes) stay: removing them
    would let two processes hold one entry's lock, or fail a compile half-way.

    Example (not run by the doctests: it would empty the cache other tests compile into)::

        >>> cache_clear()  # doctest: +SKIP
    """
    with _thread_lock:
        _memo.clear()
        directory = cache_dir()
        try:
            entries = list(directory.iterdir())
        except OSError:
            return
        cutoff = time.time() - _lock_age()
        for path in entries:
            if not path.name.endswith(_SUFFIXES) or path.name.endswith(".lock"):
                continue
            try:
                if path.name.endswith(".tmp") and path.lstat().st_mtime >= cutoff:
                    continue  # another process is compiling into it
            except OSError:
                continue
            _remove(path)

