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

__all__ = ["CompilerInfo", "compiler_info", "BASE_FLAGS", "NO_COMPILER_MESSAGE"]

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


_lock = threading.Lock()
# Keyed by ($CXX, $CXXFLAGS) so that tests or users changing them mid-process are honoured.
_memo: dict[tuple[str | None, str | None], CompilerInfo | None] = {}


def _find_compiler() -> list[str] | None:
    """``$CXX`` (which may hold a wrapper such as ``ccache g++``), else g++, else clang++."""
    candidates: list[list[str]] = []
    env = os.environ.get("CXX", "").strip()
    if env:
        candidates.append(shlex.split(env))
    candidates += [["g++"], ["clang++"]]
    for words in candidates:
        if not words:
            continue
        path = shutil.which(words[0])
        if path:
            return [path, *words[1:]]
    return None


def _version(cmd: list[str]) -> str | None:
    try:
        res = subprocess.run(
            [*cmd, "--version"], capture_output=True, text=True, timeout=60, check=False
        )
    except (OSError, subprocess.SubprocessError):
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
            res = subprocess.run(
                [*cmd, *flags, "-x", "c++", str(src), "-o", str(out)],
                capture_output=True,
                timeout=120,
                check=False,
            )
        except (OSError, subprocess.SubprocessError):
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
    """Which of -march=native and -fopenmp the compiler accepts (one compile when both work)."""
    if _try_compile(cmd, base + ["-march=native", "-fopenmp"], load=True):
        return {"march_native": True, "openmp": True}
    march = _try_compile(cmd, base + ["-march=native"], load=False)
    omp_flags = base + (["-march=native"] if march else []) + ["-fopenmp"]
    return {"march_native": march, "openmp": _try_compile(cmd, omp_flags, load=True)}


def _probe_cached(cmd: list[str], version: str, base: list[str]) -> dict[str, bool]:
    """`_probe`, stored as JSON in the cache directory so later processes skip it."""
    key = hashlib.sha256(
        "\0".join([shlex.join(cmd), version, shlex.join(base), cpu_tag()]).encode()
    ).hexdigest()[:24]
    path: Path | None = None
    try:
        from .cache import cache_dir  # late import: cache imports this module

        path = cache_dir() / f"compiler-{key}.json"
        data = json.loads(path.read_text())
        if isinstance(data.get("march_native"), bool) and isinstance(data.get("openmp"), bool):
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
    """The C++ compiler in use and its flags, or ``None`` when there is none (never raises).

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
        try:
            cmd = _find_compiler()
            version = _version(cmd) if cmd else None
            if cmd and version is not None:
                extra = cmd[1:] + shlex.split(env_key[1] or "")
                base = extra + BASE_FLAGS
                caps = _probe_cached(cmd[:1], version, base)
                flags = extra + BASE_FLAGS[:1]
                if caps["march_native"]:
                    flags.append("-march=native")
                if caps["openmp"]:
                    flags.append("-fopenmp")
                flags += BASE_FLAGS[1:]
                info = CompilerInfo(
                    path=cmd[0], version=version, flags=flags, openmp=caps["openmp"]
                )
        except Exception:  # noqa: BLE001 - detection must never raise
            info = None
        _memo[env_key] = info
        return info
