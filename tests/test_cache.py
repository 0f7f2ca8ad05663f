"""The compile cache: reuse, concurrency, corruption, fallback dir, errors, clearing."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from lazymat.compile import cache as cache_mod
from lazymat.compile import cache_clear, cache_dir, compiler_info, load_library
from lazymat.health import health_report
from lazymat.errors import CompileError

pytestmark = pytest.mark.skipif(compiler_info() is None, reason="no C++ compiler")


def fresh_source(value: int = 42) -> str:
    """A source never seen before (the uuid comment forces a new cache key)."""
    return f'// test {uuid.uuid4()}\nextern "C" int lm_answer(void) {{ return {value}; }}\n'


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    directory = tmp_path / "cache"
    monkeypatch.setenv("LAZYMAT_CACHE_DIR", str(directory))
    monkeypatch.delenv("LAZYMAT_VERBOSE", raising=False)
    return directory


def test_second_load_compiles_nothing() -> None:
    src = fresh_source(7)
    before = cache_mod.stats["compiles"]
    assert load_library(src).lm_answer() == 7
    assert cache_mod.stats["compiles"] == before + 1
    assert load_library(src).lm_answer() == 7
    assert cache_mod.stats["compiles"] == before + 1

    # A cold process memo still finds the entry on disk.
    cache_mod.forget_loaded()
    assert load_library(src).lm_answer() == 7
    assert cache_mod.stats["compiles"] == before + 1
    names = sorted(p.suffix for p in cache_dir().iterdir() if not p.name.startswith("compiler-"))
    assert names == [".cpp", ".lock", ".ok", ".so"]


_CHILD = """
import sys, time
from lazymat.compile import cache, load_library
src, start = sys.argv[1], float(sys.argv[2])
while time.time() < start:
    time.sleep(0.005)
print(load_library(src).lm_answer(), cache.stats["compiles"])
"""


def test_two_processes_compile_once(tmp_path: Path) -> None:
    # Big enough that the compilations would overlap without the lock.
    body = "".join(f"extern \"C\" int lm_f{i}(int x) {{ return x * {i}; }}\n" for i in range(300))
    src = fresh_source() + body
    env = dict(os.environ, PYTHONPATH=str(Path(cache_mod.__file__).parents[2]))
    start = str(time.time() + 0.5)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _CHILD, src, start],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        answer, compiles = out.split()
        results.append((int(answer), int(compiles)))
    assert [r[0] for r in results] == [42, 42]
    assert sorted(r[1] for r in results) == [0, 1]


def test_truncated_library_is_rebuilt() -> None:
    src = fresh_source(11)
    # Build without loading: truncating a library this process has mapped would crash it.
    so = cache_mod.library_path(src)
    with open(so, "r+b") as f:
        f.truncate(so.stat().st_size // 2)
    cache_mod.forget_loaded()
    rebuilds = cache_mod.stats["rebuilds"]
    assert load_library(src).lm_answer() == 11
    assert cache_mod.stats["rebuilds"] == rebuilds + 1


def test_missing_ok_marker_is_rebuilt() -> None:
    src = fresh_source(12)
    so = cache_mod.library_path(src)
    so.with_suffix(".ok").unlink()
    rebuilds = cache_mod.stats["rebuilds"]
    assert load_library(src).lm_answer() == 12
    assert cache_mod.stats["rebuilds"] == rebuilds + 1


def test_unwritable_cache_dir_falls_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # We may run as root, where chmod 555 does not stop writes: a path under a
    # regular file can never be created, whoever we are.
    afile = tmp_path / "afile"
    afile.write_text("not a directory")
    bad = afile / "cache"
    monkeypatch.setenv("LAZYMAT_CACHE_DIR", str(bad))
    with pytest.warns(RuntimeWarning, match="cannot be created") as record:
        directory = cache_dir()
    message = str(record[0].message)
    assert str(bad) in message and str(directory) in message
    assert directory != bad
    assert load_library(fresh_source(13)).lm_answer() == 13
    assert health_report()["cache_dir"] == str(directory)


def test_syntax_error_raises_compile_error() -> None:
    src = fresh_source() + 'extern "C" int broken(void) { return 1 +; }\n'
    with pytest.raises(CompileError) as excinfo:
        load_library(src, name="broken")
    message = str(excinfo.value)
    info = compiler_info()
    assert info is not None
    assert info.path in message or "g++" in message
    match = re.search(r"^source: (.+\.cpp)$", message, re.MULTILINE)
    assert match, message
    cpp = Path(match.group(1))
    assert cpp.exists() and cpp.read_text() == src
    assert "error" in message  # the compiler's own diagnostics are included


def test_cache_clear_empties_dir() -> None:
    src = fresh_source(14)
    assert load_library(src).lm_answer() == 14
    assert any(cache_dir().iterdir())
    cache_clear()
    # lock files stay: removing one another process holds would let two hold the entry
    assert [p for p in cache_dir().iterdir() if not p.name.endswith(".lock")] == []
    compiles = cache_mod.stats["compiles"]
    assert load_library(src).lm_answer() == 14
    assert cache_mod.stats["compiles"] == compiles + 1


def test_cache_clear_spares_compiles_in_flight() -> None:
    """A concurrent cache_clear must not fail another process's compile half-way."""
    import os
    import time

    fresh = cache_dir() / "lm_x.so.abc.tmp"
    stale = cache_dir() / "lm_y.so.def.tmp"
    fresh.write_bytes(b"in progress")
    stale.write_bytes(b"left by a killed process")
    old = time.time() - 10 * 24 * 3600
    os.utime(stale, (old, old))
    cache_clear()
    assert fresh.exists() and not stale.exists()


def test_health_report_keys() -> None:
    report = health_report()
    assert set(report) == {"compiler", "openmp", "threads", "cache_dir", "cache_writable",
                           "torch", "cuda", "cuda_backend", "numpy", "pykeops"}
    assert report["cache_writable"] is True
    assert isinstance(report["openmp"], bool)


# --------------------------------------------------------------------------- safety (issue 11)

_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0 and hasattr(os, "fork")
needs_root = pytest.mark.skipif(not _ROOT, reason="needs root (to act as two users) and fork")
NOBODY, VICTIM = 65534, 4321


def in_child(fn, uid: int | None = None, timeout: float = 120):
    """fn() in a forked child (as ``uid`` if given); its repr-able result, or the error."""
    import pickle

    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        code = 1
        try:
            os.close(read)
            if uid is not None:
                os.setgroups([])
                os.setgid(uid)
                os.setuid(uid)
            try:
                result = ("ok", fn())
            except BaseException as e:  # noqa: BLE001 - reported to the parent
                result = ("error", f"{type(e).__name__}: {e}")
            with os.fdopen(write, "wb") as f:
                pickle.dump(result, f)
            code = 0
        finally:
            os._exit(code)
    os.close(write)
    deadline = time.time() + timeout
    with os.fdopen(read, "rb") as f:
        data = b""
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                data += f.read()
                break
            if time.time() > deadline:
                os.kill(pid, 9)
                os.waitpid(pid, 0)
                pytest.fail(f"child timed out after {timeout} s")
            time.sleep(0.02)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, f"child died: {status}"
    kind, value = pickle.loads(data)
    assert kind == "ok", value
    return value


_PLANTED = """
#include <stdio.h>
extern "C" __attribute__((constructor)) void lm_planted(void) {
    FILE *f = fopen("%s", "w"); if (f) { fputs("pwned", f); fclose(f); }
}
extern "C" int lm_answer(void) { return 666; }
"""


def shared_tmp() -> Path:
    """A fresh sticky world-writable directory, like /tmp."""
    import tempfile

    directory = Path(tempfile.mkdtemp(prefix="lazymat-test-tmp-"))
    directory.chmod(0o1777)
    return directory


def unwritable_dir(tmp_path: Path) -> Path:
    afile = tmp_path / "afile"
    afile.write_text("a file: nothing can be created below it, even by root")
    return afile / "cache"


@needs_root
@pytest.mark.parametrize("victim", [0, VICTIM], ids=["root", "user"])
def test_planted_kernel_in_predictable_fallback_is_refused(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, victim: int) -> None:
    import shutil
    import tempfile
    import warnings

    src = fresh_source(42)
    # The attacker predicts the file name: the key hashes public facts only.
    monkeypatch.setenv("LAZYMAT_CACHE_DIR", str(tmp_path / "scratch"))
    name = cache_mod.library_path(src).name
    planted_so = cache_mod.library_path(_PLANTED % (tmp_path / "pwned") + f"// {uuid.uuid4()}")
    payload = planted_so.read_bytes()
    tmp = shared_tmp()
    try:
        target = tmp / f"lazymat-{victim}"

        def plant() -> None:  # as nobody: another local user
            import hashlib

            target.mkdir(mode=0o777)
            target.chmod(0o777)
            (target / name).write_bytes(payload)
            digest = hashlib.sha256(payload).hexdigest()
            Path(target / name).with_suffix(".ok").write_text(f"{len(payload)} {digest}\n")

        in_child(plant, uid=NOBODY)
        assert target.stat().st_uid == NOBODY
        (tmp_path / "victim").mkdir()
        (tmp_path / "victim").chmod(0o777)
        monkeypatch.setenv("LAZYMAT_CACHE_DIR", str(unwritable_dir(tmp_path / "victim")))

        def victim_run():
            tempfile.tempdir = str(tmp)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                answer = load_library(src).lm_answer()
            return answer, str(cache_dir()), [str(w.message) for w in caught]

        answer, used, messages = in_child(victim_run, uid=victim or None)
        assert answer == 42
        assert not (tmp_path / "pwned").exists(), "the planted library ran"
        assert Path(used) != target and Path(used).parent == tmp
        assert any(f"owned by uid {NOBODY}" in m and used in m for m in messages), messages
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def test_group_writable_cache_dir_is_refused(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    monkeypatch.setenv("LAZYMAT_CACHE_DIR", str(shared))
    with pytest.warns(RuntimeWarning, match="group- or world-writable"):
        directory = cache_dir()
    assert directory != shared
    assert load_library(fresh_source(21)).lm_answer() == 21
    assert not any(shared.iterdir())


def test_symlinked_cache_dir_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    link = tmp_path / "link"
    link.symlink_to(real)
    monkeypatch.setenv("LAZYMAT_CACHE_DIR", str(link))
    with pytest.warns(RuntimeWarning, match="symbolic link"):
        assert cache_dir() not in (link, real)


@needs_root
def test_read_only_prepopulated_cache_is_read(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil
    import tempfile
    import warnings

    tmp = shared_tmp()  # traversable by the user, unlike pytest's tmp_path
    shared = tmp / "shared"
    monkeypatch.setenv("LAZYMAT_CACHE_DIR", str(shared))
    old, new = fresh_source(31), fresh_source(32)
    assert load_library(old).lm_answer() == 31  # the admin's warm-up, as root
    shared.chmod(0o755)
    for p in shared.iterdir():
        p.chmod(0o644)
    try:
        def user_run():
            tempfile.tempdir = str(tmp)
            cache_mod.forget_loaded()  # a fresh process: the parent loaded ``old``
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                compiles = cache_mod.stats["compiles"]
                a = load_library(old).lm_answer()
                after_old = cache_mod.stats["compiles"] - compiles
                messages_old = [str(w.message) for w in caught]
                b = load_library(new).lm_answer()
                after_new = cache_mod.stats["compiles"] - compiles
            return (a, b, after_old, after_new, messages_old, [str(w.message) for w in caught],
                    str(cache_dir()))

        a, b, after_old, after_new, messages_old, messages, used = in_child(user_run, VICTIM)
        assert (a, b) == (31, 32)
        assert after_old == 0, "the pre-built kernel was compiled again"
        assert after_new == 1
        assert messages_old == []  # using the shared cache is silent ...
        assert any("read-only" in m and used in m for m in messages), (messages, used)
        assert Path(used).parent == tmp
        assert not any(p.name.startswith(Path(cache_mod.library_path(new)).stem)
                       for p in shared.iterdir() if p.suffix == ".so")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


_TRUNCATE = """
import hashlib, sys
from lazymat.compile import cache
src = sys.argv[1]
so = cache.library_path(src)
data = so.read_bytes()
cut = data[: len(data) // 2]
so.write_bytes(cut)  # and a record that matches the truncated file
so.with_suffix(".ok").write_text(f"{len(cut)} {hashlib.sha256(cut).hexdigest()}\\n")
print(cache.load_library(src).lm_f3(2), cache.stats["rebuilds"])
"""


def test_truncated_library_with_matching_record_is_rebuilt(tmp_path: Path) -> None:
    # Without the ELF check dlopen maps past the end of the file: SIGBUS, in a subprocess.
    body = "".join(f'extern "C" int lm_f{i}(int x) {{ return x * {i}; }}\n' for i in range(200))
    env = dict(os.environ, PYTHONPATH=str(Path(cache_mod.__file__).parents[2]))
    res = subprocess.run([sys.executable, "-c", _TRUNCATE, fresh_source() + body], env=env,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, (res.returncode, res.stderr[-2000:])
    assert res.stdout.split() == ["6", "1"]


@pytest.mark.parametrize("suffix", [".so", ".ok", ".lock", ".cpp"])
def test_entry_file_that_is_a_directory_is_rebuilt(suffix: str) -> None:
    src = fresh_source(41)
    so = cache_mod.library_path(src)
    path = so.with_suffix(suffix)
    if path.exists():
        path.unlink()
    path.mkdir()
    (path / "inside").write_text("x")
    if suffix in (".cpp", ".lock"):
        so.unlink()  # only a rebuild rewrites the source and takes the lock
    cache_mod.forget_loaded()
    assert load_library(src).lm_answer() == 41
    if suffix != ".lock":
        assert path.is_file()


def test_stale_temp_files_are_swept() -> None:
    directory = cache_dir()  # left by a killed process, before this one compiled here
    old = directory / "0123.so.abcd.tmp"
    young = directory / "4567.so.efgh.tmp"
    for p in (old, young):
        p.write_bytes(b"half a library")
    os.utime(old, (time.time() - 7 * 24 * 3600,) * 2)
    assert load_library(fresh_source(52)).lm_answer() == 52  # a compile sweeps
    assert not old.exists()
    assert young.exists()  # may belong to a compile running right now


def test_compile_timeout_kills_the_compiler(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    info = compiler_info()
    assert info is not None
    slow = tmp_path / "slow-cxx"
    # A compiler whose child process hangs (and holds the output pipes) on marked sources.
    slow.write_text("#!/bin/sh\nfor a in \"$@\"; do case \"$a\" in *.cpp) "
                    "if grep -q LM_HANG \"$a\"; then sleep 30 & wait; fi;; esac; done\n"
                    f"exec {info.path} \"$@\"\n")
    slow.chmod(0o755)
    monkeypatch.setenv("CXX", str(slow))
    monkeypatch.setenv("LAZYMAT_COMPILE_TIMEOUT", "1.5")
    t0 = time.time()
    with pytest.raises(CompileError, match=r"timed out after 1\.5 s") as excinfo:
        load_library(fresh_source() + "// LM_HANG\n", name="hang")
    assert time.time() - t0 < 20
    assert f"command: {slow}" in str(excinfo.value)
    assert "LAZYMAT_COMPILE_TIMEOUT" in str(excinfo.value)
    assert load_library(fresh_source(61)).lm_answer() == 61  # the lock was released


_HOLDER = """
import fcntl, os, socket, sys, time
path = sys.argv[1]
f = open(path, "a+")
fcntl.flock(f.fileno(), fcntl.LOCK_EX)
f.truncate(0)
# Holding it since long ago, as a process stopped (kill -STOP) mid-compile would.
f.write(f"{os.getpid()} {time.time() - 100000:.3f} {socket.gethostname()}\\n"); f.flush()
print("held", flush=True)
time.sleep(120)
"""

_WAITER = """
import sys
from lazymat.compile import cache
print(cache.load_library(sys.argv[1]).lm_answer(), cache.stats["takeovers"])
"""


def test_lock_of_a_stuck_holder_is_taken_over(tmp_path: Path) -> None:
    src = fresh_source(71)
    lock = cache_mod.library_path(src).with_suffix(".lock")
    for p in lock.parent.glob(lock.stem + ".*"):
        if p != lock:
            p.unlink()  # the entry is gone: the waiter must compile, hence lock
    env = dict(os.environ, PYTHONPATH=str(Path(cache_mod.__file__).parents[2]))
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(lock)], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        res = subprocess.run([sys.executable, "-c", _WAITER, src], env=env, capture_output=True,
                             text=True, timeout=60)
        assert res.returncode == 0, res.stderr[-2000:]
        assert res.stdout.split() == ["71", "1"]
    finally:
        holder.kill()
        holder.wait()


_FAKE_MSVCRT = """
import fcntl as _fcntl, os, sys, types
msvcrt = types.ModuleType("msvcrt")
msvcrt.LK_NBLCK, msvcrt.LK_UNLCK = 2, 0
def locking(fd, mode, nbytes):
    pos = os.lseek(fd, 0, os.SEEK_CUR)
    op = _fcntl.LOCK_UN if mode == 0 else _fcntl.LOCK_EX | _fcntl.LOCK_NB
    try:
        _fcntl.lockf(fd, op, nbytes, pos, 0)
    except BlockingIOError as e:
        raise PermissionError(13, "locked") from e
msvcrt.locking = locking
sys.modules["msvcrt"] = msvcrt
"""

_NO_FCNTL = """
import sys
from lazymat.compile import cache  # first: the stdlib's subprocess tests for msvcrt too
mode = sys.argv.pop(1)
if mode == "msvcrt":
    exec(FAKE)
if mode != "fcntl":
    sys.modules["fcntl"] = None  # import fcntl now raises ImportError: as on Windows
assert cache.lock_kind() == mode, cache.lock_kind()
"""


@pytest.mark.parametrize("kind", ["fcntl", "msvcrt", "file"])
def test_two_processes_compile_once_with_each_lock_kind(kind: str) -> None:
    # msvcrt is simulated (this is not Windows): locking() mapped onto POSIX record locks.
    body = "".join(f"extern \"C\" int lm_f{i}(int x) {{ return x * {i}; }}\n" for i in range(300))
    src = fresh_source() + body
    env = dict(os.environ, PYTHONPATH=str(Path(cache_mod.__file__).parents[2]))
    child = (f"FAKE = {_FAKE_MSVCRT!r}\n" + _NO_FCNTL + _CHILD)
    start = str(time.time() + 1.0)
    procs = [subprocess.Popen([sys.executable, "-c", child, kind, src, start], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        answer, compiles = out.split()
        results.append((int(answer), int(compiles)))
    assert [r[0] for r in results] == [42, 42]
    assert sorted(r[1] for r in results) == [0, 1]
    lock = next(cache_dir().glob("*.lock"), None)
    if kind == "file":
        assert lock is None  # a lock file exists only while held


def test_lock_file_of_a_dead_process_is_taken_over(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "fcntl", None)
    monkeypatch.setitem(sys.modules, "msvcrt", None)
    assert cache_mod.lock_kind() == "file"
    src = fresh_source(81)
    so = cache_mod.library_path(src)
    for p in so.parent.glob(so.stem + ".*"):
        p.unlink()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    import socket

    so.with_suffix(".lock").write_text(f"{dead} {time.time():.3f} {socket.gethostname()}\n")
    takeovers = cache_mod.stats["takeovers"]
    cache_mod.forget_loaded()
    assert load_library(src).lm_answer() == 81
    assert cache_mod.stats["takeovers"] == takeovers + 1
    assert not so.with_suffix(".lock").exists()


def test_explicit_cxx_that_does_not_work_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    for cxx, why in (("/nonexistent/g++", "not an executable"), ("false", "--version")):
        monkeypatch.setenv("CXX", cxx)
        with pytest.raises(CompileError, match=why) as excinfo:
            compiler_info()
        assert f"CXX={cxx!r}" in str(excinfo.value)
        with pytest.raises(CompileError, match="CXX="):
            load_library(fresh_source())
        assert health_report()["compiler"].startswith("unusable: CXX=")


_FORK_WHILE_COMPILING = """
import os, threading, time, uuid
from lazymat.compile import cache
slow = "".join(f'extern "C" int lm_f{i}(int x) {{ return x * {i}; }}\\n' for i in range(3000))
t = threading.Thread(target=cache.load_library, args=(f"// {uuid.uuid4()}\\n" + slow,))
t.start()
time.sleep(0.3)  # the thread now holds the cache's lock, compiling
pid = os.fork()
if pid == 0:
    src = f'// {uuid.uuid4()}\\nextern "C" int lm_answer(void) {{ return 5; }}\\n'
    os.write(1, str(cache.load_library(src).lm_answer()).encode())
    os._exit(0)
_, status = os.waitpid(pid, 0)
t.join()
print("", os.waitstatus_to_exitcode(status))
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_fork_while_another_thread_compiles() -> None:
    env = dict(os.environ, PYTHONPATH=str(Path(cache_mod.__file__).parents[2]))
    try:
        res = subprocess.run([sys.executable, "-c", _FORK_WHILE_COMPILING], env=env,
                             capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail("the forked child waited forever for the cache lock of a parent's thread")
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.split() == ["5", "0"]


def test_install_retries_a_busy_target(monkeypatch: pytest.MonkeyPatch) -> None:
    # Windows refuses to replace a library another process has loaded: retried, not fatal.
    real, calls = os.replace, []

    def busy_twice(src, dst):
        calls.append(dst)
        if str(dst).endswith(".so") and len([c for c in calls if str(c).endswith(".so")]) <= 2:
            raise PermissionError(13, "in use")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", busy_twice)
    assert load_library(fresh_source(91)).lm_answer() == 91
    assert sum(str(c).endswith(".so") for c in calls) == 3
