"""Detection of the system C++ compiler and of the flags it accepts.

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
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

from .. import config
from ..errors import CompileError
from .paths import cache_dir

__all__ = ["CompilerInfo", "compiler_info", "BASE_FLAGS", "NO_COMPILER_MESSAGE",
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
    "no C++ compiler found: looked for $CXX, g++, clang++; "
    "install one or use backend='reference'"
)

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

    @property
    def identity(self) -> str:
        """What the cache key depends on besides the source and the flags."""
        return f"{os.path.realpath(self.path)}\n{self.version}"

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


def run_command(cmd: list[str], timeout: float | None) -> subprocess.CompletedProcess:
    """Run ``cmd`` capturing its output as text; raise :class:`CommandTimeout` past
    ``timeout`` seconds (None: no limit). The command runs in its own process group so that
    a timeout or a Ctrl-C kills the compiler's children too.

    Example::

        >>> run_command(["true"], 10).returncode  # doctest: +SKIP
        0
    """
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            errors="replace", start_new_session=os.name == "posix")
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
# Keyed by ($CXX, $CXXFLAGS) so that tests or users changing them mid-process are honoured.
_memo: dict[tuple[str | None, str | None], CompilerInfo | None] = config.memo(
    "compile.compiler.info", maxsize=16)


def _find_compiler() -> list[str] | None:
    """``$CXX`` (which may hold a wrapper such as ``ccache g++``), else g++, else clang++.

    An explicit ``$CXX`` that cannot be found raises: silently compiling with another
    compiler (or none) is not what its user asked for."""
    env = os.environ.get("CXX", "").strip()
    if env:
        words = shlex.split(env)
        path = shutil.which(words[0]) if words else None
        if path is None:
            raise CompileError(f"CXX={env!r}: {words[0] if words else env!r} is not an "
                               "executable found on PATH; fix CXX or unset it to let lazymat "
                               "look for g++ and clang++")
        return [path, *words[1:]]
    for name in ("g++", "clang++"):
        path = shutil.which(name)
        if path:
            return [path]
    return None


def _explicit_cxx_error(cmd: list[str], why: str) -> CompileError:
    return CompileError(f"CXX={os.environ.get('CXX', '').strip()!r} does not work as a C++ "
                        f"compiler ({why}); command: {shlex.join(cmd)}. Fix CXX, or unset it "
                        "to let lazymat look for g++ and clang++")


def _version(cmd: list[str]) -> str | None:
    try:
        res = run_command([*cmd, "--version"], 60)
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


def _try_compile(cmd: list[str], flags: list[str], load: bool) -> bool:
    with tempfile.TemporaryDirectory(prefix="lazymat-probe-") as tmp:
        src = Path(tmp) / "probe.cpp"
        out = Path(tmp) / "probe.so"
        src.write_text(_PROBE_SOURCE)
        try:
            res = run_command([*cmd, *flags, "-x", "c++", str(src), "-o", str(out)],
                              compile_timeout())
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


def _probe(cmd: list[str], base: list[str]) -> dict[str, bool]:
    """Which of -march=native and -fopenmp the compiler accepts (one compile when both work),
    and whether it compiles a loadable library at all ("works")."""
    if _try_compile(cmd, base + ["-march=native", "-fopenmp"], load=True):
        return {"march_native": True, "openmp": True, "works": True}
    march = _try_compile(cmd, base + ["-march=native"], load=False)
    omp_flags = base + (["-march=native"] if march else []) + ["-fopenmp"]
    openmp = _try_compile(cmd, omp_flags, load=True)
    works = march or openmp or _try_compile(cmd, base, load=True)
    return {"march_native": march, "openmp": openmp, "works": works}


def _probe_cached(cmd: list[str], version: str, base: list[str]) -> dict[str, bool]:
    """`_probe`, stored as JSON in the cache directory so later processes skip it."""
    key = hashlib.sha256(
        "\0".join([shlex.join(cmd), version, shlex.join(base), cpu_tag()]).encode()
    ).hexdigest()[:24]
    path: Path | None = None
    try:
        path = cache_dir() / f"compiler-{key}.json"
        data = json.loads(path.read_text())
        if all(isinstance(data.get(k), bool) for k in ("march_native", "openmp", "works")):
            return data
    except (OSError, ValueError, AttributeError):
        pass
    result = _probe(cmd, base)
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

    Raises :class:`~lazymat.errors.CompileError` when ``$CXX`` is set but does not work
    (not found, ``--version`` fails, or it cannot build a library): an explicit choice is
    never silently replaced by another compiler or by the reference backend.

    Example::

        >>> info = compiler_info()
        >>> print(info.path, info.openmp)  # doctest: +SKIP
        /usr/bin/g++-12 True
    """
    env_key = (os.environ.get("CXX"), os.environ.get("CXXFLAGS"))
    if env_key in _memo:
        return _memo[env_key]
    with _lock:
        if env_key in _memo:
            return _memo[env_key]
        info: CompilerInfo | None = None
        explicit = bool((env_key[0] or "").strip())
        try:
            cmd = _find_compiler()
            version = _version(cmd) if cmd else None
            if cmd and version is None and explicit:
                raise _explicit_cxx_error(cmd, "'--version' failed")
            if cmd and version is not None:
                extra = cmd[1:] + shlex.split(env_key[1] or "")
                base = extra + BASE_FLAGS
                caps = _probe_cached(cmd[:1], version, base)
                if not caps["works"]:
                    if explicit:
                        raise _explicit_cxx_error(cmd, "it cannot build a shared library")
                    raise CompileError("no working compiler")  # caught below: as if none
                flags = extra + BASE_FLAGS[:1]
                if caps["march_native"]:
                    flags.append("-march=native")
                if caps["openmp"]:
                    flags.append("-fopenmp")
                flags += BASE_FLAGS[1:]
                info = CompilerInfo(
                    path=cmd[0], version=version, flags=flags, openmp=caps["openmp"]
                )
        except CompileError:
            if explicit:
                raise  # not memoized: fixing CXX mid-process is honoured
            info = None
        except Exception:  # noqa: BLE001 - a failed detection means no compiler
            info = None
        _memo[env_key] = info
        return info
