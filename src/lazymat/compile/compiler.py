"""Detection of the C++ compiler and of the flags it accepts.

The compiler, in this order: ``$LAZYMAT_CXX``, ``$CXX`` (either may hold a wrapper such as
``ccache g++``; ``LAZYMAT_CXX=zig`` asks for the pip toolchain), ``g++``, ``clang++``, then
zig's clang from the ``ziglang`` wheel (``pip install lazymat[compiler]``), which needs no
system headers, linker or libc development files. zig ships no OpenMP runtime: its kernels
are threaded by the CPU backend's pool of Python threads instead.

The probe (does ``-march=native`` work, does ``-fopenmp`` link and load) costs
a couple of compiler runs, so its result is memoized per process and stored on
disk keyed by the compiler identity: later processes pay one ``--version`` call.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

from .. import config
from ..errors import CompileError
from .paths import cache_dirs, trusted_owners, unsafe_reason

__all__ = ["CompilerInfo", "compiler_info", "zig_command", "BASE_FLAGS", "NO_COMPILER_MESSAGE",
           "compile_timeout", "run_command", "CommandTimeout"]

#: Flags always passed (after ``$CXXFLAGS``); ``-march=native`` and ``-fopenmp``
#: are added when the probe shows the compiler accepts them.
BASE_FLAGS: list[str] = [
    "-O3",
    "-fPIC",
    "-shared",
    "-fno-math-errno",
    "-fno-trapping-math",
    "-ffp-contract=fast",
    "-Werror=overflow",  # a constant that does not fit its type is an error, not a warning
]

NO_COMPILER_MESSAGE = (
    "no C++ compiler found: looked for $LAZYMAT_CXX, $CXX, g++, clang++ and the ziglang "
    "package; `pip install lazymat[compiler]` (or install g++), or use backend='reference'"
)

#: Bump when the probe's results change meaning: older JSON files are ignored.
_PROBE_VERSION = "2"

_PROBE_SOURCE = """\
extern "C" int lm_probe(int n) {
    int s = 0;
#pragma omp parallel for reduction(+:s)
    for (int i = 0; i < n; ++i) s += i;
    return s;
}
"""


@dataclass(frozen=True)
class CompilerInfo:
    """The compiler lazymat uses and the flags it passes.

    Example::

        >>> info = compiler_info()
        >>> info.openmp if info else None  # doctest: +SKIP
        True
    """

    path: str
    version: str
    flags: list[str] = field(default_factory=list)
    openmp: bool = False
    #: where it came from: "LAZYMAT_CXX", "CXX", "PATH" (g++ or clang++) or "ziglang"
    source: str = "PATH"
    #: environment variables the compiler runs with (zig: its cache where $HOME is read-only)
    env: tuple[tuple[str, str], ...] = ()

    @property
    def environment(self) -> dict[str, str] | None:
        """The compiler's environment (None: this process's)."""
        return {**os.environ, **dict(self.env)} if self.env else None

    @property
    def identity(self) -> str:
        """What the cache key depends on besides the source and the flags."""
        return f"{os.path.realpath(self.path)}\n{self.version}"

    @property
    def description(self) -> str:
        """One line for verbose mode and ``check_health()``: what, where from, threads.

        Example::

            >>> compiler_info().description  # doctest: +SKIP
            '/usr/bin/g++ (g++ (Debian 12.2.0-14) 12.2.0), found on PATH, with OpenMP'
        """
        where = {"LAZYMAT_CXX": "from $LAZYMAT_CXX", "CXX": "from $CXX", "PATH": "found on PATH",
                 "ziglang": "the ziglang package (no g++/clang++ found)"}.get(self.source,
                                                                           self.source)
        if self.source == "ziglang" and os.environ.get("LAZYMAT_CXX", "").strip():
            where = "the ziglang package (from $LAZYMAT_CXX)"
        threads = "with OpenMP" if self.openmp else "no OpenMP (threads: a pool of Python threads)"
        return f"{self.path} ({self.version}), {where}, {threads}"

    def command(self, src: str | os.PathLike[str], out: str | os.PathLike[str]) -> list[str]:
        """Full command line compiling ``src`` into the shared library ``out``."""
        return [self.path, *self.flags, "-x", "c++", os.fspath(src), "-o", os.fspath(out)]


def compile_timeout() -> float | None:
    """Seconds a compiler run may take (``$LAZYMAT_COMPILE_TIMEOUT``, see :mod:`lazymat.config`;
    None: no limit). Read at every compile, so it can be changed at run time.

    Example::

        >>> os.environ["LAZYMAT_COMPILE_TIMEOUT"] = "60"; compile_timeout()
        60.0
        >>> del os.environ["LAZYMAT_COMPILE_TIMEOUT"]
    """
    return config.compile_timeout()


class CommandTimeout(Exception):
    """A command ran past its timeout and was killed (with its child processes)."""


def _kill(proc: subprocess.Popen) -> None:
    """Kill ``proc`` and what it started: g++ runs cc1plus and as, which hold our pipes."""
    try:
        if os.name == "posix":
            os.killpg(proc.pid, 9)
        else:  # pragma: no cover - Windows: no process groups here
            proc.kill()
    except OSError:
        pass
    try:
        proc.communicate(timeout=10)
    except (subprocess.SubprocessError, OSError):
        pass


def run_command(cmd: list[str], timeout: float | None,
                env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run ``cmd`` capturing its output as text; raise :class:`CommandTimeout` past
    ``timeout`` seconds (None: no limit). The command runs in its own process group so that
    a timeout or a Ctrl-C kills the compiler's children too.

    Example::

        >>> run_command(["true"], 10).returncode  # doctest: +SKIP
        0
    """
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            errors="replace", start_new_session=os.name == "posix", env=env)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill(proc)
        raise CommandTimeout(f"{timeout:g} s") from None
    except BaseException:  # Ctrl-C: the compiler is in its own group, so kill it ourselves
        _kill(proc)
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


_lock = threading.Lock()


def _after_fork_in_child() -> None:
    global _lock
    _lock = threading.Lock()  # a thread of the parent may have held it (probing) at the fork


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
# Keyed by ($LAZYMAT_CXX, $CXX, $CXXFLAGS, $PATH): tests or users changing them mid-process
# are honoured.
_memo: dict[tuple[str | None, ...], CompilerInfo | None] = config.memo(
    "compile.compiler.info", maxsize=16)


ZIG_NAMES = ("zig", "ziglang")  # values of $LAZYMAT_CXX that ask for the pip toolchain


def zig_command() -> list[str] | None:
    """``[zig, "c++"]`` from the ``ziglang`` wheel (None when it is not installed). On Linux
    the kernels link no C++ runtime (``-nostdlib``, plus ``-lm``): ``zig c++`` would build
    libc++ from source at its first use (minutes); the kernels only use libm and malloc.

    Example::

        >>> zig_command()  # doctest: +SKIP
        ['/venv/lib/python3.11/site-packages/ziglang/zig', 'c++', '-nostdlib', '-lc', '-lm']
    """
    import importlib.util

    try:
        found = importlib.util.find_spec("ziglang")
    except (ImportError, ValueError):
        return None
    if found is None or not found.submodule_search_locations:
        return None
    for folder in found.submodule_search_locations:
        for name in ("zig", "zig.exe"):
            path = Path(folder) / name
            if path.is_file() and os.access(path, os.X_OK):
                extra = ["-nostdlib", "-lc", "-lm"] if sys.platform.startswith("linux") else []
                return [str(path), "c++", *extra]
    return None


def _zig_env() -> tuple[tuple[str, str], ...]:
    """zig keeps a cache ($ZIG_GLOBAL_CACHE_DIR, else ~/.cache/zig) and fails without one:
    where that is not writable (a read-only $HOME), a private directory under the temp dir."""
    if os.environ.get("ZIG_GLOBAL_CACHE_DIR", "").strip():
        return ()
    xdg = os.environ.get("XDG_CACHE_HOME", "").strip()
    try:
        usual = (Path(xdg) if xdg else Path.home() / ".cache") / "zig"
        usual.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=usual):
            return ()
    except (OSError, RuntimeError):  # RuntimeError: no home directory at all
        pass
    uid = os.getuid() if hasattr(os, "getuid") else "user"
    fallback = Path(tempfile.gettempdir()) / f"lazymat-zig-{uid}"
    try:
        fallback.mkdir(mode=0o700, exist_ok=True)
    except OSError:
        pass
    if unsafe_reason(fallback, trusted_owners()) is not None:  # zig runs what it caches
        fallback = Path(tempfile.mkdtemp(prefix="lazymat-zig-"))
    return (("ZIG_GLOBAL_CACHE_DIR", str(fallback)), ("ZIG_LOCAL_CACHE_DIR", str(fallback)))


def _zig_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"zig {version('ziglang')}"
    except PackageNotFoundError:
        return "zig"


def _requested() -> tuple[str, str] | None:
    """(variable, value) of the compiler asked for: ``$LAZYMAT_CXX``, else ``$CXX``."""
    for name in ("LAZYMAT_CXX", "CXX"):
        value = os.environ.get(name, "").strip()
        if value:
            return name, value
    return None


def _find_compiler() -> tuple[list[str], str] | None:
    """(command, where it came from): ``$LAZYMAT_CXX``, ``$CXX`` (may hold a wrapper such as
    ``ccache g++``), else g++, else clang++, else zig from the ziglang package.

    An explicit choice that cannot be found raises: silently compiling with another
    compiler (or none) is not what its user asked for."""
    asked = _requested()
    if asked:
        name, env = asked
        if name == "LAZYMAT_CXX" and env.lower() in ZIG_NAMES:
            zig = zig_command()
            if zig is None:
                raise CompileError(f"LAZYMAT_CXX={env!r} asks for zig, but the ziglang "
                                   "package is not installed: `pip install lazymat[compiler]`")
            return zig, "ziglang"
        words = shlex.split(env)
        path = shutil.which(words[0]) if words else None
        if path is None:
            raise CompileError(f"{name}={env!r}: {words[0] if words else env!r} is not an "
                               f"executable found on PATH; fix {name} or unset it to let "
                               "lazymat look for g++, clang++ and zig")
        return [path, *words[1:]], name
    for name in ("g++", "clang++"):
        path = shutil.which(name)
        if path:
            return [path], "PATH"
    zig = zig_command()
    return (zig, "ziglang") if zig else None


def _explicit_cxx_error(cmd: list[str], why: str) -> CompileError:
    name, value = _requested() or ("CXX", "")
    return CompileError(f"{name}={value!r} does not work as a C++ "
                        f"compiler ({why}); command: {shlex.join(cmd)}. Fix {name}, or unset it "
                        "to let lazymat look for g++, clang++ and zig")


def _version(cmd: list[str], env: dict[str, str] | None = None) -> str | None:
    try:
        res = run_command([*cmd, "--version"], 60, env)
    except (OSError, CommandTimeout):
        return None
    if res.returncode != 0:
        return None
    lines = res.stdout.strip().splitlines()
    return lines[0].strip() if lines else "unknown"


def cpu_tag() -> str:
    """Machine and CPU model: ``-march=native`` binaries are only valid on the same CPU."""
    tag = platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            wanted = {"model name", "flags", "Features", "CPU part"}
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in wanted:
                    tag += "|" + value.strip()
                    wanted.discard(key.strip())
                if not line.strip():  # first processor block only
                    break
    except OSError:
        pass
    return tag


def _try_compile(cmd: list[str], flags: list[str], load: bool,
                 env: dict[str, str] | None = None) -> bool:
    with tempfile.TemporaryDirectory(prefix="lazymat-probe-") as tmp:
        src = Path(tmp) / "probe.cpp"
        out = Path(tmp) / "probe.so"
        src.write_text(_PROBE_SOURCE)
        try:
            res = run_command([*cmd, *flags, "-x", "c++", str(src), "-o", str(out)],
                              compile_timeout(), env)
        except (OSError, CommandTimeout):
            return False
        if res.returncode != 0 or not out.exists():
            return False
        if load:
            # Linking can succeed while the OpenMP runtime cannot be loaded.
            try:
                ctypes.CDLL(str(out)).lm_probe(10)
            except (OSError, AttributeError):
                return False
        return True


def _probe(cmd: list[str], base: list[str], openmp_runtime: bool = True,
           env: dict[str, str] | None = None) -> dict[str, bool]:
    """Which of -march=native and -fopenmp the compiler accepts (one compile when both work),
    whether it compiles a loadable library at all ("works"), and, without OpenMP, whether
    ``-fopenmp-simd`` keeps the kernels' ``omp simd`` loops vectorized ("openmp_simd").
    ``openmp_runtime`` False (zig: none shipped) skips the -fopenmp tries."""
    def works_with(flags: list[str], load: bool) -> bool:
        return _try_compile(cmd, base + flags, load=load, env=env)

    if openmp_runtime and works_with(["-march=native", "-fopenmp"], True):
        return {"march_native": True, "openmp": True, "works": True, "openmp_simd": False}
    march = works_with(["-march=native"], False)
    arch = ["-march=native"] if march else []
    openmp = openmp_runtime and works_with(arch + ["-fopenmp"], True)
    simd = not openmp and works_with(arch + ["-fopenmp-simd"], True)
    works = march or openmp or simd or works_with([], True)
    return {"march_native": march, "openmp": openmp, "works": works, "openmp_simd": simd}


_PROBE_KEYS = ("march_native", "openmp", "works", "openmp_simd")


def _probe_cached(cmd: list[str], version: str, base: list[str],
                  openmp_runtime: bool = True, env: dict[str, str] | None = None
                  ) -> dict[str, bool]:
    """`_probe`, stored as JSON in the cache directory so later processes skip it (a
    read-only pre-populated cache's record is used too)."""
    key = hashlib.sha256(
        "\0".join([shlex.join(cmd), version, shlex.join(base), cpu_tag(), _PROBE_VERSION,
                   str(openmp_runtime)]).encode()
    ).hexdigest()[:24]
    path: Path | None = None
    try:
        dirs = cache_dirs()
        path = dirs.write / f"compiler-{key}.json"
        for directory in (dirs.write, *dirs.read):
            try:
                data = json.loads((directory / path.name).read_text())
            except (OSError, ValueError):
                continue
            if isinstance(data, dict) and all(isinstance(data.get(k), bool)
                                              for k in _PROBE_KEYS):
                return data
    except (OSError, ValueError, AttributeError):
        pass
    result = _probe(cmd, base, openmp_runtime, env)
    if path is not None:
        try:
            fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
            with os.fdopen(fd, "w") as f:
                json.dump(result, f)
            os.replace(tmp, path)
        except OSError:
            pass  # the probe result is only an optimisation
    return result


def compiler_info() -> CompilerInfo | None:
    """The C++ compiler in use and its flags, or ``None`` when none is found.

    Raises :class:`~lazymat.errors.CompileError` when ``$LAZYMAT_CXX`` or ``$CXX`` is set but
    does not work (not found, ``--version`` fails, or it cannot build a library): an explicit
    choice is never silently replaced by another compiler or by the reference backend.

    Example::

        >>> info = compiler_info()
        >>> print(info.path, info.openmp)  # doctest: +SKIP
        /usr/bin/g++-12 True
    """
    env_key = (os.environ.get("LAZYMAT_CXX"), os.environ.get("CXX"),
               os.environ.get("CXXFLAGS"), os.environ.get("PATH"))
    if env_key in _memo:
        return _memo[env_key]
    with _lock:
        if env_key in _memo:
            return _memo[env_key]
        info: CompilerInfo | None = None
        explicit = _requested() is not None
        try:
            found = _find_compiler()
            cmd, source = found if found else (None, "")
            extra_env = _zig_env() if source == "ziglang" else ()
            env = {**os.environ, **dict(extra_env)} if extra_env else None
            version = _version(cmd, env) if cmd else None
            if cmd and version is None and explicit:
                raise _explicit_cxx_error(cmd, "'--version' failed")
            if cmd and version is not None:
                zig = source == "ziglang"
                if zig:
                    version = f"{_zig_version()}, {version}"
                extra = cmd[1:] + shlex.split(env_key[2] or "")
                base = extra + BASE_FLAGS
                caps = _probe_cached(cmd[:1], version, base, openmp_runtime=not zig, env=env)
                if not caps["works"]:
                    if explicit:
                        raise _explicit_cxx_error(cmd, "it cannot build a shared library")
                    raise CompileError("no working compiler")  # caught below: as if none
                flags = extra + BASE_FLAGS[:1]
                if caps["march_native"]:
                    flags.append("-march=native")
                if caps["openmp"]:
                    flags.append("-fopenmp")
                elif caps["openmp_simd"]:  # the kernels' `omp simd` loops, without threads
                    flags.append("-fopenmp-simd")
                flags += BASE_FLAGS[1:]
                info = CompilerInfo(path=cmd[0], version=version, flags=flags,
                                    openmp=caps["openmp"], source=source, env=extra_env)
        except CompileError:
            if explicit:
                raise  # not memoized: fixing CXX mid-process is honoured
            info = None
        except Exception:  # noqa: BLE001 - a failed detection means no compiler
            info = None
        _memo[env_key] = info
        if info is not None and config.verbose():
            print(f"[lazymat] C++ compiler: {info.description}", file=sys.stderr, flush=True)
        return info
