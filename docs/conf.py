"""Sphinx configuration of the lazymat docs.

``make docs`` builds them without running the gallery (``-D plot_gallery=0``, fast, warnings
are errors, every internal reference checked with ``-n``); ``make docs-full`` runs the
gallery scripts too (``LAZYMAT_GALLERY_SIZE`` picks their size, ``full`` by default).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

# The repository; a copy of docs/ elsewhere (tests/test_docs.py builds one) names it.
ROOT = Path(os.environ.get("LAZYMAT_DOCS_ROOT") or Path(__file__).resolve().parents[1])
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "docs" / "_ext"))
sys.path.insert(0, str(ROOT / "examples"))  # the gallery scripts import examples/_gallery.py
os.environ.setdefault("MPLBACKEND", "Agg")

import lazymat  # noqa: E402

project = "lazymat"
author = "the lazymat authors"
copyright = "2026, the lazymat authors"
release = version = lazymat.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx_gallery.gen_gallery",
    "lazymat_docs",
]

exclude_patterns = ["_build", "auto_examples/*.ipynb", "auto_examples/*.py",
                    "auto_examples/*.zip", "auto_examples/*.json", "auto_examples/*.md5"]
templates_path: list[str] = []
html_theme = "furo"
html_title = f"lazymat {release}"
html_static_path = ["_static"]
html_css_files = ["lazymat.css"]
pygments_style = "friendly"

# autodoc: signatures as written, type hints in the signature only, members in source order
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_typehints_format = "short"
autodoc_preserve_defaults = True
autodoc_inherit_docstrings = False
napoleon_google_docstring = True
napoleon_numpy_docstring = True

# Internal references must resolve (-n); names of other libraries and of the standard library
# cannot without network access (no intersphinx), so only they are ignored.
nitpicky = True
nitpick_ignore_regex = [
    # the array adapters, the C renderers and the compiler layer are not documented here
    (r"py:.*", r"lazymat\.(arraylib|codegen|compile)\..*"),
    # private types in public signatures (lazymat.local's grid) are not documented
    (r"py:.*", r"lazymat\..*\._[A-Za-z]\w*"),
    (r"py:.*", r"(typing|collections|fractions|numpy|np|torch|jax|jnp|dask|da|scipy|pathlib|types)"
               r"(\..*)?"),
    (r"py:.*", r"(int|float|str|bool|complex|dict|list|tuple|set|object|type|bytes|None|"
               r"Any|Callable|Sequence|Iterable|Mapping|ValueError|TypeError|RuntimeError|"
               r"Exception|UserWarning|Warning|ImportError|os\.PathLike|Path|ModuleType|"
               r"array|Array|Tensor|ndarray|dtype)"),
]

def _drop_stale_gallery_pages() -> None:
    """sphinx-gallery keeps the pages of scripts that were renamed or deleted (and Sphinx then
    warns that they are in no toctree): remove what no ``examples/*.py`` script makes."""
    out = Path(__file__).parent / "auto_examples"
    if not out.is_dir():
        return
    # the execution-time tables list every script seen before: sphinx-gallery rewrites them
    for table in (out / "sg_execution_times.rst", out.parent / "sg_execution_times.rst"):
        table.unlink(missing_ok=True)
    scripts = {p.stem for p in (ROOT / "examples").glob("*.py")}
    for path in list(out.glob("*")) + list(out.glob("images/**/*")):
        stem = path.name.split(".")[0].removeprefix("sphx_glr_")
        if path.is_file() and stem.startswith("plot_") and not any(
                stem == s or stem.startswith(s + "_") for s in scripts):
            path.unlink()


_drop_stale_gallery_pages()

# sphinx-gallery: examples/plot_*.py -> auto_examples/. make docs passes plot_gallery=0 (the
# pages are made from the scripts' text, nothing runs); make docs-full runs them.
sphinx_gallery_conf = {
    "examples_dirs": str(ROOT / "examples"),
    "gallery_dirs": "auto_examples",
    "filename_pattern": r"/plot_",
    "ignore_pattern": r"(__init__|_gallery|demo)\.py$",
    "within_subsection_order": "FileNameSortKey",
    "download_all_examples": False,
    "remove_config_comments": True,
    "abort_on_example_error": True,
    "image_scrapers": ("matplotlib",),
    "matplotlib_animations": False,
    "show_memory": False,
    "plot_gallery": "True",
}
