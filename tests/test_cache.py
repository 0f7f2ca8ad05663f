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
    cache_mod._memo.clear()
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
    so = cache_mod._ensure_entry(src)
    with open(so, "r+b") as f:
        f.truncate(so.stat().st_size // 2)
    cache_mod._memo.clear()
    rebuilds = cache_mod.stats["rebuilds"]
    assert load_library(src).lm_answer() == 11
    assert cache_mod.stats["rebuilds"] == rebuilds + 1


def test_missing_ok_marker_is_rebuilt() -> None:
    src = fresh_source(12)
    so = cache_mod._ensure_entry(src)
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
    with pytest.warns(RuntimeWarning, match="not writable") as record:
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
    assert list(cache_dir().iterdir()) == []
    compiles = cache_mod.stats["compiles"]
    assert load_library(src).lm_answer() == 14
    assert cache_mod.stats["compiles"] == compiles + 1


def test_health_report_keys() -> None:
    report = health_report()
    assert set(report) == {"compiler", "openmp", "cache_dir", "cache_writable", "torch", "cuda",
                           "cuda_backend", "numpy"}
    assert report["cache_writable"] is True
    assert isinstance(report["openmp"], bool)
