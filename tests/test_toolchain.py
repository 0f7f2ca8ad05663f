"""Issue 16: kernels where no system compiler exists (zig from the ziglang wheel), threads
without OpenMP (a pool of Python threads sharing the kernel calls), warm caches ahead of
time (``lazymat.precompile``, ``python -m lazymat precompile``) read from a read-only
directory. The lock fallbacks (no fcntl: msvcrt, lock files) are tested in test_cache.py.

Every case that changes PATH, the compiler or the cache runs in a subprocess with a timeout.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import lazymat as lm
from lazymat.compile import compiler_info, load_library
from lazymat.errors import CompileError

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
COMPILER_PREFIXES = ("g++", "gcc", "clang", "c++", "cc")


def _env(**changes: str | None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), env.get("PYTHONPATH", "")])
    for key in ("CXX", "LAZYMAT_CXX", "CXXFLAGS", "LAZYMAT_VERBOSE", "LAZYMAT_PYTHON_THREADS"):
        env.pop(key, None)
    for key, value in changes.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def _run(script: str, env: dict[str, str], timeout: float = 240,
         prefix: list[str] | None = None) -> subprocess.CompletedProcess:
    res = subprocess.run([*(prefix or []), sys.executable, "-c", textwrap.dedent(script)],
                         env=env, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, f"exit {res.returncode}\n{res.stdout}\n{res.stderr[-4000:]}"
    return res


def _no_compiler_path(tmp_path: Path) -> str:
    """A PATH of links to every program of the current PATH except C/C++ compilers."""
    bare = tmp_path / "bin"
    bare.mkdir()
    for folder in os.environ.get("PATH", "").split(os.pathsep):
        try:
            names = os.listdir(folder)
        except OSError:
            continue
        for name in names:
            tool = name.rsplit("-", 2)[-1] if name.count("-") >= 2 else name  # x86_64-..-g++
            if name.startswith(COMPILER_PREFIXES) or tool.startswith(COMPILER_PREFIXES):
                continue
            try:
                (bare / name).symlink_to(Path(folder) / name)
            except OSError:
                pass  # a name already linked from an earlier folder
    for c in ("g++", "clang++", "c++", "gcc", "clang", "cc"):
        assert shutil.which(c, path=str(bare)) is None
    return str(bare)


# The representative set: Sum, LogSumExp, ArgKMin, a complex formula, a gradient; the
# sizes reach the thread pool (several tasks, a column split, batches cut apart).
CASES = r"""
import numpy as np, torch, lazymat as lm
from lazymat.compile import stats

rng = np.random.default_rng(0)
def close(a, b, dtype):
    tol = 1e-4 if dtype == "float32" else 1e-10
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=tol, atol=tol)

for dtype in ("float32", "float64"):
    x, y = rng.random((600, 3)).astype(dtype), rng.random((800, 3)).astype(dtype)
    b = rng.random((800, 2)).astype(dtype)
    gauss = lm.Genred("Exp(-SqDist(x, y)) * b", ["x = Vi(3)", "y = Vj(3)", "b = Vj(2)"],
                      "Sum", 1)
    close(gauss(x, y, b, backend="cpu"), gauss(x, y, b, backend="reference"), dtype)
    x16, y16 = rng.random((600, 19)).astype(dtype) / 4, rng.random((800, 19)).astype(dtype) / 4
    gauss16 = lm.Genred("Exp(-SqDist(x, y))", ["x = Vi(19)", "y = Vj(19)"], "Sum", 1)
    close(gauss16(x16, y16, backend="cpu"), gauss16(x16, y16, backend="reference"), dtype)
    lse = lm.Genred("-SqDist(x, y)", ["x = Vi(3)", "y = Vj(3)"], "LogSumExp", 1)
    close(lse(x, y, backend="cpu"), lse(x, y, backend="reference"), dtype)
    few, many = x[:3], rng.random((40000, 3)).astype(dtype)  # column split: parts merged
    close(lse(few, many, backend="cpu"), lse(few, many, backend="reference"), dtype)
    v = rng.random((800, 10)).astype(dtype)  # weighted sums: 8 components at a time, then 2
    soft = lm.Genred("-SqDist(x, y)", ["x = Vi(3)", "y = Vj(3)", "v = Vj(10)"],
                     "SumSoftMaxWeight", 1, formula2="v")
    close(soft(x, y, v, backend="cpu"), soft(x, y, v, backend="reference"), dtype)
    knn = lm.Genred("SqDist(x, y)", ["x = Vi(3)", "y = Vj(3)"], "ArgKMin", 1, opt_arg=4)
    assert (knn(x, y, backend="cpu") == knn(x, y, backend="reference")).all()
    assert (knn(few, many, backend="cpu") == knn(few, many, backend="reference")).all()

z, w = rng.random((600, 2)), rng.random((800, 2))
cplx = lm.Genred("ComplexMult(ComplexExp(z), w)", ["z = Vi(2)", "w = Vj(2)"], "Sum", 1)
close(cplx(z, w, backend="cpu"), cplx(z, w, backend="reference"), "float64")
xb, yb = rng.random((20, 8, 3)), rng.random((20, 4096, 3))  # 20 batches of one task each
Kb = (-lm.Vi(xb).sqdist(lm.Vj(yb))).exp()
close(Kb.sum(2, backend="cpu"), Kb.sum(2, backend="reference"), "float64")

xt = torch.tensor(rng.random((600, 3)), requires_grad=True)
yt = torch.tensor(rng.random((800, 3)))
bt = torch.tensor(rng.random((800, 1)))
grads = []
for backend in ("cpu", "reference"):
    K = (-lm.Vi(xt).sqdist(lm.Vj(yt))).exp() * lm.Vj(bt)
    (g,) = torch.autograd.grad(K.sum(1, backend=backend).pow(2).sum(), [xt])
    grads.append(g)
close(grads[0], grads[1], "float64")
import threading
pool = [t.name for t in threading.enumerate() if t.name.startswith("lazymat-cpu")]
"""


def test_zig_compiles_everything_without_a_system_compiler(tmp_path: Path) -> None:
    pytest.importorskip("ziglang")
    home = tmp_path / "home"  # a file: no ~/.cache/zig can be made (a read-only $HOME)
    home.write_text("")
    env = _env(PATH=_no_compiler_path(tmp_path), LAZYMAT_CACHE_DIR=str(tmp_path / "cache"),
               LAZYMAT_NUM_THREADS="2", HOME=str(home), XDG_CACHE_HOME=None,
               ZIG_GLOBAL_CACHE_DIR=None, TMPDIR=str(tmp_path))
    res = _run(CASES + r"""
import json
from lazymat.compile import compiler_info
info = compiler_info()
report = lm.check_health(verbose=False)
print(json.dumps({"source": info.source, "openmp": info.openmp, "flags": info.flags,
                  "compiles": stats["compiles"], "env": dict(info.env),
                  "compiler": report["compiler"], "threads": report["threads"],
                  "pool": pool}))
""", env)
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["source"] == "ziglang" and "zig" in out["compiler"]
    assert out["openmp"] is False and out["threads"] == "Python thread pool"
    assert "-O3" in out["flags"] and "-fopenmp" not in out["flags"]
    assert out["pool"], "the Python thread pool never ran"
    assert out["compiles"] >= 10  # compiled here, by zig: not the reference backend
    assert out["env"]["ZIG_GLOBAL_CACHE_DIR"].startswith(str(tmp_path))  # zig's own cache


def test_python_thread_pool_with_the_system_compiler_matches(tmp_path: Path) -> None:
    """The no-OpenMP threading path on any compiler (LAZYMAT_PYTHON_THREADS), 2 threads."""
    if compiler_info() is None:
        pytest.skip("no compiler")
    env = _env(LAZYMAT_NUM_THREADS="2", LAZYMAT_PYTHON_THREADS="1")
    res = _run(CASES + r"""
ranges_x = np.array([[0, 200], [200, 600]]); ranges_y = np.array([[0, 100], [300, 800]])
x, y = rng.random((600, 3)), rng.random((800, 3))
K = (-lm.Vi(x).sqdist(lm.Vj(y))).exp()
r = (ranges_x, np.array([1, 2]), ranges_y, ranges_y, np.array([1, 2]), ranges_x)
close(K.sum(1, backend="cpu", ranges=r), K.sum(1, backend="reference", ranges=r), "float64")
assert lm.check_health(verbose=False)["threads"] == "Python thread pool"
print(len(pool))
""", env)
    assert int(res.stdout.strip().splitlines()[-1]) >= 1, "the Python thread pool never ran"


def test_lazymat_cxx_comes_first_and_must_work(monkeypatch: pytest.MonkeyPatch) -> None:
    system = shutil.which("g++") or shutil.which("clang++")
    if system is None:
        pytest.skip("no system compiler")
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    monkeypatch.setenv("LAZYMAT_CXX", system)
    assert compiler_info().source == "LAZYMAT_CXX"  # $CXX (broken) is not looked at
    assert "from $LAZYMAT_CXX" in lm.check_health(verbose=False)["compiler"]
    monkeypatch.setenv("LAZYMAT_CXX", "/nonexistent/zz++")
    with pytest.raises(CompileError, match="LAZYMAT_CXX"):
        compiler_info()
    assert "unusable" in lm.check_health(verbose=False)["compiler"]


def test_the_compiler_is_part_of_the_cache_key(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("ziglang")
    if compiler_info() is None or compiler_info().source == "ziglang":
        pytest.skip("needs a system compiler besides zig")
    from lazymat.compile.cache import library_path

    source = 'extern "C" int lm_answer(void) { return 16; }\n'
    system = library_path(source)
    monkeypatch.setenv("LAZYMAT_CXX", "zig")
    info = compiler_info()
    assert info.source == "ziglang" and "zig" in info.version and not info.openmp
    assert "ziglang" in info.description
    zig = library_path(source)
    assert zig != system and load_library(source).lm_answer() == 16


# ----------------------------------------------------------------------------- precompile

SPEC = [
    ["Exp(-SqDist(x, y)) * b", ["x = Vi(3)", "y = Vj(3)", "b = Vj(1)"], "Sum", 1],
    {"formula": "SqDist(x, y)", "aliases": ["x = Vi(2)", "y = Vj(2)"], "reduction": "ArgKMin",
     "axis": 1, "K": 3, "grad": False},
]

USE = r"""
import sys, numpy as np, torch, lazymat as lm
from lazymat.compile import stats, cache_dir
rng = np.random.default_rng(1)
gauss = lm.Genred("Exp(-SqDist(x, y)) * b", ["x = Vi(3)", "y = Vj(3)", "b = Vj(1)"], "Sum", 1)
knn = lm.Genred("SqDist(x, y)", ["x = Vi(2)", "y = Vj(2)"], "ArgKMin", 1, opt_arg=3)
for M, N in ((500, 300), (2, 40000)):  # the plain kernels, then the column-split ones
    x = torch.tensor(rng.random((M, 3)), requires_grad=True)
    y, b = torch.tensor(rng.random((N, 3))), torch.tensor(rng.random((N, 1)))
    out = gauss(x, y, b, backend="cpu")
    torch.autograd.grad(out.sum(), [x])
    knn(rng.random((M, 2)), rng.random((N, 2)), backend="cpu")
print(stats["compiles"], stats["rebuilds"], stats["disk_hits"], cache_dir())
"""


def _read_only_prefix(directory: Path) -> list[str] | None:
    """How to run a process that sees ``directory`` read-only: as root (chmod does not stop
    root), in a mount namespace with a read-only bind mount; else after chmod a-w."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        for p in [directory, *directory.iterdir()]:
            p.chmod(0o555 if p.is_dir() else 0o444)
        return []
    unshare = shutil.which("unshare")
    if unshare is None:
        return None
    probe = subprocess.run([unshare, "-m", "sh", "-c",
                            f"mount --bind -o ro '{directory}' '{directory}' && "
                            f"! touch '{directory}/probe' 2>/dev/null"],
                           capture_output=True, timeout=30)
    if probe.returncode != 0:
        return None
    return [unshare, "-m", "sh", "-c",
            f"mount --bind -o ro '{directory}' '{directory}' && exec \"$0\" \"$@\""]


def test_precompile_fills_a_cache_a_read_only_process_uses(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    if compiler_info() is None:
        pytest.skip("no compiler")
    warm = tmp_path / "warm"
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"entries": SPEC, "dtypes": ["float64"]}))
    env = _env(LAZYMAT_CACHE_DIR=str(tmp_path / "elsewhere"))
    res = subprocess.run([sys.executable, "-m", "lazymat", "precompile", str(spec),
                          "--cache-dir", str(warm), "--grad"],
                         env=env, capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stderr[-4000:]
    assert "kernels compiled" in res.stdout
    kernels = list(warm.glob("*.so"))
    assert len(kernels) >= 5, res.stderr  # plain + split for both, and the gradient's
    prefix = _read_only_prefix(warm)
    if prefix is None:
        pytest.skip("cannot make a directory read-only for root here (no unshare)")
    env = _env(LAZYMAT_CACHE_DIR=str(warm), LAZYMAT_NUM_THREADS="2", LAZYMAT_VERBOSE="1",
               TMPDIR=str(tmp_path))
    res = _run(USE, env, prefix=prefix)
    compiles, rebuilds, hits, used = res.stdout.split()
    assert (int(compiles), int(rebuilds)) == (0, 0), res.stderr
    assert int(hits) >= 4  # every kernel those calls need, none compiled
    assert Path(used) != warm, "the read-only cache should not be the write directory"
    assert "compiling" not in res.stderr and "probe" not in res.stderr
    assert sorted(warm.glob("*.so")) == sorted(kernels)


def test_precompile_in_process_and_spec_files(tmp_path: Path) -> None:
    if compiler_info() is None:
        pytest.skip("no compiler")
    from lazymat.precompile import load_spec

    module = tmp_path / "kernels.py"
    module.write_text(f"PRECOMPILE = {SPEC[:1]!r}\nDTYPES = ['float32']\n")
    spec = load_spec(str(module))
    assert spec["dtypes"] == ["float32"] and len(spec["entries"]) == 1
    first = lm.precompile(spec["entries"], cache_dir=tmp_path / "c", dtypes=spec["dtypes"])
    again = lm.precompile(spec["entries"], cache_dir=tmp_path / "c", dtypes=spec["dtypes"])
    assert first["compiled"] >= 2 and again["compiled"] == 0 and again["found"] >= 2
    assert first["cache_dir"] == str((tmp_path / "c").resolve())
    with pytest.raises(lm.LazymatError, match="formula"):
        lm.precompile([{"aliases": ["x = Vi(1)"]}])
    with pytest.raises(lm.LazymatError, match="backend"):
        lm.precompile([SPEC[0]], backends=["tpu"])
