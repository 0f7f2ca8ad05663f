"""The documentation: every docstring example runs, every public name has one, the Sphinx
site builds with no warning and no broken internal reference.

The doctests run in this process, one test per module of ``src/lazymat`` (a module whose
optional dependency is missing, such as jax, is skipped, and so is a docstring whose example
imports a package that is not installed); the ``>>>`` examples of the docs' pages run too. The HTML build runs
``sphinx-build -W --keep-going -n`` in a subprocess without running the gallery
(``plot_gallery=0``, as ``make docs``); it skips when Sphinx, sphinx-gallery or the theme is
not installed (``pip install -e '.[docs]'``).
"""

from __future__ import annotations

import doctest
import html
import importlib
import importlib.util
import inspect
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "lazymat"

#: modules of the package, by name, found without importing them (jax is imported by the test)
MODULES = sorted(
    ".".join(("lazymat",) + p.relative_to(SRC).with_suffix("").parts).removesuffix(".__init__")
    for p in SRC.rglob("*.py") if p.name != "__main__.py")

#: docstring examples that take seconds (a solve on 3000 points, to show the Schwarz
#: preconditioner), run by `make test-slow`: docstring -> its module
SLOW_DOCTESTS = {"lazymat.lazy_tensor.LazyTensor.solve": "lazymat.lazy_tensor",
                 "lazymat.solve.KernelSystem": "lazymat.solve"}

FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


def _import(name: str):
    """Import a module of lazymat; skip when an optional dependency of it (torch, jax, dask,
    ...) is not installed."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] == "lazymat":
            raise
        pytest.skip(f"{name} needs {e.name}, which is not installed")


def _missing_import(test: doctest.DocTest) -> str | None:
    """The first package an example imports that is not installed (its docstring is skipped:
    lazymat runs without torch, scipy or jax)."""
    for example in test.examples:
        for line in example.source.splitlines():
            line = line.strip()
            if line.startswith("import "):
                names = [part.split()[0] for part in line[7:].split(";")[0].split(",")]
            elif line.startswith("from ") and " import " in line:
                names = [line[5:].split()[0]]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if importlib.util.find_spec(top) is None:
                    return top
    return None


def _run_doctests(name: str, slow: bool) -> int:
    module = _import(name)
    runner = doctest.DocTestRunner(optionflags=FLAGS)
    ran = 0
    for test in doctest.DocTestFinder().find(module, name):
        if not test.examples or (test.name in SLOW_DOCTESTS) != slow or _missing_import(test):
            continue
        out: list[str] = []
        result = runner.run(test, out=out.append)
        assert result.failed == 0, f"doctest {test.name} failed:\n" + "".join(out)
        ran += result.attempted
    return ran


def test_examples_of_missing_packages_are_skipped():
    parser = doctest.DocTestParser()
    test = parser.get_doctest(">>> import numpy as np, not_a_package_xyz.sub as s\n", {}, "t",
                              None, 0)
    assert _missing_import(test) == "not_a_package_xyz"
    assert _missing_import(parser.get_doctest(">>> from numpy import ones\n", {}, "t", None,
                                              0)) is None


@pytest.mark.parametrize("name", MODULES)
def test_doctests(name):
    _run_doctests(name, slow=False)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(set(SLOW_DOCTESTS.values())))
def test_slow_doctests(name):
    assert _run_doctests(name, slow=True) > 0


def test_slow_doctests_exist():
    """The slow list names real docstrings (a renamed one would silently stop running)."""
    found = set()
    for name in set(SLOW_DOCTESTS.values()):
        found |= {t.name for t in doctest.DocTestFinder().find(_import(name), name)
                  if t.examples}
    assert set(SLOW_DOCTESTS) <= found, set(SLOW_DOCTESTS) - found


#: pages of docs/ whose ``>>>`` examples run (the others show code in code-blocks)
PAGES = sorted(str(p.relative_to(ROOT / "docs")) for p in (ROOT / "docs").rglob("*.rst")
               if "_build" not in p.parts and "auto_examples" not in p.parts
               and ">>>" in p.read_text(encoding="utf-8"))


@pytest.mark.parametrize("page", PAGES)
def test_page_examples(page):
    """The guide's examples are doctests too (torch examples need torch)."""
    text = (ROOT / "docs" / page).read_text(encoding="utf-8")
    if "import torch" in text:
        pytest.importorskip("torch")
    result = doctest.testfile(str(ROOT / "docs" / page), module_relative=False,
                              optionflags=FLAGS, verbose=False, report=True)
    assert result.failed == 0 and result.attempted > 0


# --------------------------------------------------------------------------- public names

#: public modules -> names to check (their __all__, or a list where a module has none)
PUBLIC = {
    "lazymat": None, "lazymat.numpy": None, "lazymat.torch": None, "lazymat.jax": None,
    "lazymat.numpy.utils": None, "lazymat.torch.utils": None,
    "lazymat.pykeops_compat": ["install_as_pykeops", "uninstall_as_pykeops", "check_health",
                               "clean_pykeops", "set_verbose", "set_build_folder",
                               "get_build_folder", "test_torch_bindings",
                               "test_numpy_bindings", "install_from_environment",
                               "write_shim", "active", "find_real", "is_shim"],
}


@pytest.mark.parametrize("module_name", list(PUBLIC))
def test_public_names_have_examples(module_name):
    """Every public function and class has a docstring with a ``>>>`` example."""
    module = _import(module_name)
    objects = [(name, getattr(module, name)) for name in PUBLIC[module_name] or module.__all__]
    for name, obj in list(objects):  # a public submodule (lazymat.local): its names too
        if inspect.ismodule(obj):
            objects += [(f"{name}.{n}", getattr(obj, n)) for n in getattr(obj, "__all__", ())]
    missing = [name for name, obj in objects
               if (inspect.isfunction(obj) or inspect.isclass(obj))
               and ">>>" not in (inspect.getdoc(obj) or "")]
    assert not missing, f"{module_name}: no docstring example for {missing}"


def test_every_op_and_reduction_has_a_doc():
    """The op and reduction tables of the docs are generated from the registries: an entry
    without its ``doc`` text would be an empty row."""
    from lazymat.formula import OPS
    from lazymat.reductions import REDUCTIONS

    assert not [name for name, op in OPS.items() if not op.doc]
    assert not [name for name, red in REDUCTIONS.items() if not red.doc]


# --------------------------------------------------------------------------- the HTML build

def _build_docs(tmp_path: Path) -> tuple[int, str, Path]:
    """``sphinx-build -W --keep-going -n -b html -D plot_gallery=0`` of a copy of docs/ (the
    gallery writes its pages into the source folder: a copy keeps parallel test workers and
    a developer's ``make docs`` apart): (return code, warnings and errors, HTML folder)."""
    src = tmp_path / "docs"
    shutil.copytree(ROOT / "docs", src, ignore=shutil.ignore_patterns(
        "_build", "auto_examples", "sg_execution_times.rst", "__pycache__"))
    env = dict(os.environ, LAZYMAT_DOCS_ROOT=str(ROOT),
               PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-n", "-E", "-q", "-b", "html",
         "-D", "plot_gallery=0", "-d", str(tmp_path / "doctrees"), str(src),
         str(tmp_path / "html")],
        capture_output=True, text=True, timeout=900, env=env, cwd=tmp_path)
    return proc.returncode, proc.stdout + proc.stderr, tmp_path / "html"


def _text(path: Path) -> str:
    return html.unescape(re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", path.read_text())))


def test_docs_build(tmp_path):
    """One build (a single test, so parallel workers never build twice), then what it must
    hold: no warning (broken references included), every page, every public name of
    ``lazymat``, every op, macro and reduction in the Genred page's tables (made from the
    registries), the benchmark figures, a page per gallery script (made from its text)."""
    for name in ("sphinx", "sphinx_gallery", "furo"):
        pytest.importorskip(name, reason=f"{name} is not installed (pip install -e '.[docs]')")
    import lazymat
    from lazymat.formula import MACROS, OPS
    from lazymat.reductions import REDUCTIONS

    rc, log, html_dir = _build_docs(tmp_path)
    assert rc == 0 and "WARNING" not in log and "ERROR" not in log, log[-5000:]
    pages = ["index", "getting_started", "guide/lazytensor", "guide/genred", "guide/solve",
             "guide/gpu", "guide/guarantees", "guide/pykeops", "guide/jax", "guide/dask",
             "guide/torch_compile", "how_it_works", "performance", "changelog",
             "api/lazymat", "api/numpy_torch", "api/jax", "api/pykeops", "api/internals",
             "auto_examples/index"]
    assert not [p for p in pages if not (html_dir / f"{p}.html").is_file()]

    api = (html_dir / "api" / "lazymat.html").read_text()
    assert not [n for n in lazymat.__all__ if f'id="lazymat.{n}"' not in api
                and f'id="module-lazymat.{n}"' not in api]

    tables = _text(html_dir / "guide" / "genred.html")
    assert not [n for n in list(OPS) + list(MACROS) + list(REDUCTIONS)
                if f"{n}(" not in tables and f" {n} " not in tables]

    figures = {p.name for p in (ROOT / "benchmarks" / "results").glob("*.png")}
    assert figures and figures <= {p.name for p in (html_dir / "_images").iterdir()}

    scripts = sorted(p.stem for p in (ROOT / "examples").glob("plot_*.py"))
    assert not [s for s in scripts if not (html_dir / "auto_examples" / f"{s}.html").is_file()]


def test_genred_page_syntax_parses():
    """The syntax the Genred page describes by hand (the ops come from the registry): every
    constant, variable spelling and operator it lists parses, with Python's precedence."""
    import numpy as np

    from lazymat import Genred

    formula = ("IntCst(2) * RatCst(1, 2) * IntInv(4) + Zero(1) + 0.5 * (x | Vj(1, 2))"
               " - Var(2, 1, 2) ** 2 + (Pm(2, 1) < 1) + (Elem(x, 0) >= Elem(y, 0))")
    f = Genred(formula, ["x = Vi(2)", "y = Vj(2)", "p = Pm(1)"], axis=1)
    x, y, p = np.ones((3, 2)), np.full((4, 2), 2.0), np.array([3.0])
    # each pair: 2 * 1/2 * 1/4 + 0 + 0.5 * <x, y> - p ** 2 + (p < 1) + (x0 >= y0), 4 pairs
    assert np.allclose(f(x, y, p), 4 * (0.25 + 0.5 * 4 - 9 + 0 + 0))


# --------------------------------------------------------------------------- the converter

def test_benchmark_markdown_to_rst():
    """The performance page's converter: headings, paragraphs, tables (a stray line inside a
    table, such as a peer's warning, is dropped), images."""
    sys.path.insert(0, str(ROOT / "docs" / "_ext"))
    try:
        pytest.importorskip("sphinx")
        from lazymat_docs import markdown_to_rst
    finally:
        sys.path.pop(0)
    md = ("## Title\n\nSome `code` and a_b.\n\n| a | b |\n|---|---|\n| 1 | 2 |\n"
          "UserWarning: noise\n  warnings.warn(\n| 3 | 4 |\n\n![plot](x.png)\n")
    rst = "\n".join(markdown_to_rst(md, "/imgs"))
    assert ".. rubric:: Title" in rst and "Some ``code`` and a\\_b." in rst
    assert ".. list-table::" in rst and "noise" not in rst
    assert rst.count("   * - ") == 3 and "     - 4" in rst
    assert ".. image:: /imgs/x.png" in rst
    two = "\n".join(markdown_to_rst("| a |\n|---|\n| 1 |\n| b |\n|---|\n| 2 |\n", "/i"))
    assert two.count(".. list-table::") == 2 and "   * - b" in two
