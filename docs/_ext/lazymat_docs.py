"""Sphinx directives that write parts of the docs from the code, so they cannot drift.

- ``.. lazymat-op-table::`` — every formula op of ``lazymat.formula.OPS`` and
  ``lazymat.formula.MACROS``, grouped by the module that registers it, with its formula-string
  call, what it computes (the registry's ``doc``) and its LazyTensor method;
- ``.. lazymat-reduction-table::`` — every reduction of ``lazymat.reductions.REDUCTIONS``
  (outputs, K, weight, identity, gradient rule), its aliases and its LazyTensor methods;
- ``.. lazymat-api:: module`` — an autodoc entry for every name of ``module.__all__``
  (names documented elsewhere, e.g. ``lazymat.numpy.LazyTensor is lazymat.LazyTensor``,
  become links to that entry);
- ``.. lazymat-results:: path.md`` — a benchmark result file of ``benchmarks/results/``
  (markdown headings, paragraphs, pipe tables and images) rendered as reST.

Also: LazyTensor methods without a docstring (one-line wrappers such as ``exp``) get one from
the registry entry of the op or reduction they build (``autodoc-process-docstring``).
"""

from __future__ import annotations

import functools
import importlib
import inspect
import os
import re
from pathlib import Path

from docutils import nodes
from docutils.parsers.rst import directives
from docutils.statemachine import StringList
from sphinx.util.docutils import SphinxDirective

ROOT = Path(os.environ.get("LAZYMAT_DOCS_ROOT") or Path(__file__).resolve().parents[2])

# --------------------------------------------------------------------------- registries


#: how the docs show an operator method of LazyTensor
_OPERATORS = {"__add__": "x + y", "__sub__": "x - y", "__mul__": "x * y", "__truediv__": "x / y",
              "__neg__": "-x", "__pow__": "x ** y", "__or__": "x | y", "__lt__": "x < y",
              "__gt__": "x > y", "__le__": "x <= y", "__ge__": "x >= y", "__eq__": "x == y",
              "__ne__": "x != y", "__matmul__": "K @ v"}


@functools.lru_cache(maxsize=None)
def _method_targets() -> dict[str, list[tuple[str, str]]]:
    """LazyTensor method name -> the ("op" | "reduction", registry name) it builds, read from
    the methods' source (``self._unary("Exp")``, ``self._reduce("KMin", ...)``; a method that
    builds a complex op for complex values lists both) and the ops' declared ``method``."""
    from lazymat import LazyTensor
    from lazymat.formula import MACROS, OPS
    from lazymat.reductions import REDUCTIONS

    found: dict[str, list[tuple[str, str]]] = {}
    for name, value in vars(LazyTensor).items():
        if name.startswith("_") and name not in _OPERATORS:
            continue
        fn = value.fget if isinstance(value, property) else value
        if not callable(fn):
            continue
        try:
            source = inspect.getsource(fn)
        except (OSError, TypeError):
            continue
        m = re.search(r'_reduce\("(\w+)"|_inner_or_reduce\("\w+", "(\w+)"', source)
        if m:
            found[name] = [("reduction", m.group(1) or m.group(2))]
            continue
        calls = re.findall(r'_(?:unary|combine|calculus)\(([^)]*)', source)
        names = [n for call in calls for n in re.findall(r'"(\w+)"', call)
                 if n in OPS or n in MACROS]
        if names and name != "__matmul__":
            found[name] = [("op", n) for n in dict.fromkeys(names)]
        elif name == "__matmul__":
            found[name] = [("reduction", "Sum")]
    for op in OPS.values():
        if op.method and op.method not in found:
            found[op.method] = [("op", op.name)]
    assert all(key in REDUCTIONS for targets in found.values() for kind, key in targets
               if kind == "reduction")
    return found


def _methods_by_target() -> dict[tuple[str, str], list[str]]:
    out: dict[tuple[str, str], list[str]] = {}
    for method, targets in sorted(_method_targets().items()):
        for target in targets:
            out.setdefault(target, []).append(method)
    return out


def _show_method(method: str) -> str:
    return f"``{_OPERATORS[method]}``" if method in _OPERATORS else f"``.{method}()``"


_MODULE_TITLES = {
    "elementwise": "Elementwise (dim-1 operands broadcast)",
    "structural": "Vectors: components, concatenation, products",
    "tensordot": "Tensors",
    "bspline": "B-splines",
    "softdtw": "Soft-DTW",
    "complex": "Complex numbers (interleaved re, im pairs)",
    "composite": "Norms and distances (composite ops)",
    "autodiff": "Symbolic derivatives",
    "base": "Elementwise (dim-1 operands broadcast)",
}


def _group(module: str) -> str:
    return _MODULE_TITLES.get(module.rsplit(".", 1)[-1], module)


def _op_call(name: str) -> str:
    """How a formula string calls op ``name``: ``Round(f, n)``, ``Grad(f, v, gradin)``."""
    from lazymat.formula import MACROS, OPS, int_param_slots

    if name in MACROS:
        params = list(inspect.signature(MACROS[name]).parameters.values())
        return f"{name}(" + ", ".join(p.name if p.default is inspect.Parameter.empty
                                      else f"[{p.name}]" for p in params) + ")"
    op = OPS[name]
    slots = set(int_param_slots(name))
    letters = iter("fghk")
    n_args = (op.arity or 0) + len(slots)
    args = [f"n{k}" if k in slots else next(letters) for k in range(n_args)]
    if len([a for a in args if a.startswith("n")]) == 1:
        args = ["n" if a.startswith("n") else a for a in args]
    return f"{name}(" + ", ".join(args) + ")"


def _op_rows() -> list[tuple[str, str, str, str]]:
    """(group, call, description, methods) for every op and macro, registration order."""
    from lazymat.formula import MACROS, OPS

    methods = _methods_by_target()
    rows = []
    for name, op in OPS.items():
        if name in MACROS:  # a checked builder of the same name: the macro's row says it
            continue
        rows.append((_group(op.ref.__module__), _op_call(name), op.doc,
                     methods.get(("op", name), [])))
    for name, build in MACROS.items():
        doc = (inspect.getdoc(build) or "").split("\n\n")[0].replace("\n", " ")
        if not doc and name in OPS:
            doc = OPS[name].doc
        module = build.__module__
        rows.append((_group(module), _op_call(name), doc, methods.get(("op", name), [])))
    return rows


def _cell(text: str) -> str:
    """A table cell: registry text is plain, so escape what reST would read as markup."""
    text = " ".join(str(text).split())
    return re.sub(r"([*`|_\\])", r"\\\1", text) if text else ""


def _literal(text: str) -> str:
    return f"``{text}``"


def _list_table(header: list[str], rows: list[list[str]], widths: str | None = None
                ) -> list[str]:
    lines = [".. list-table::", "   :header-rows: 1", "   :class: lazymat-table"]
    if widths:
        lines.append(f"   :widths: {widths}")
    lines.append("")
    for row in [header] + rows:
        for k, cell in enumerate(row):
            lines.append(("   * - " if k == 0 else "     - ") + (cell or "\u2014"))
    lines.append("")
    return lines


class _RstDirective(SphinxDirective):
    """A directive that writes reST lines and parses them in place."""

    def rst(self) -> list[str]:
        raise NotImplementedError

    def run(self) -> list[nodes.Node]:
        container = nodes.container()
        self.state.nested_parse(StringList(self.rst(), source=self.get_source_info()[0]),
                                self.content_offset, container)
        return container.children


class OpTable(_RstDirective):
    """Every formula op, grouped by the module that registers it."""

    def rst(self) -> list[str]:
        self.env.note_dependency(str(ROOT / "src" / "lazymat" / "formula" / "ops"))
        groups: dict[str, list[list[str]]] = {}
        for group, call, doc, methods in _op_rows():
            groups.setdefault(group, []).append(
                [_literal(call), _cell(doc),
                 ", ".join(_show_method(m) for m in methods)])
        lines: list[str] = []
        for group, rows in groups.items():
            lines += [f".. rubric:: {group}", ""]
            lines += _list_table(["formula string", "computes", "LazyTensor"], rows, "30 50 20")
        return lines


class ReductionTable(_RstDirective):
    """Every reduction: outputs, K, weight, identity, gradient, spellings."""

    def rst(self) -> list[str]:
        from lazymat.reductions import ALIASES, REDUCTIONS

        methods = _methods_by_target()
        aliases: dict[str, list[str]] = {}
        for alias, name in ALIASES.items():
            aliases.setdefault(name, []).append(alias)
        rows = []
        for name, red in REDUCTIONS.items():
            outputs = " + ".join("int64 index" if k == "index" else "value"
                                 for k in red.output_kinds)
            shape = red.out_shape(3, 5 if red.needs_k else None, 2)
            if red.cotangents is not None:
                grad = "yes (a reduction of the symbolic VJP)"
            elif red.selects_with is not None:
                grad = "yes, at the selected pairs (O(M·K))"
            else:
                grad = "none (integer output)"
            if red.tangents is not None or red.selects_with is not None:
                grad += "; forward mode too"
            extra = []
            if red.needs_k:
                extra.append("needs K (``opt_arg``)")
            if red.weight != "none":
                extra.append(f"weight G ({red.weight}, ``formula2``)")
            if red.scalar_formula:
                extra.append("F of dim 1")
            identity = ", ".join("-1" if v == -1 else {float("inf"): "+inf",
                                                       float("-inf"): "-inf"}.get(v, f"{v:g}")
                                 for v in red.identity)
            meths = ", ".join(_show_method(m) for m in methods.get(("reduction", name), []))
            rows.append([_literal(name), _cell(red.doc), outputs + f", shape per row "
                         f"{shape} for F of dim 3" + (", K = 5" if red.needs_k else "")
                         + (", G of dim 2" if red.weight != "none" else ""),
                         "; ".join(extra), identity, grad,
                         ", ".join(_literal(a) for a in sorted(aliases.get(name, []))),
                         meths])
        return _list_table(["reduction_op", "computes", "outputs", "needs", "empty row",
                            "gradient", "also spelt", "LazyTensor"], rows,
                           "12 20 16 12 8 14 8 10")


class Api(_RstDirective):
    """autodoc entries for every name of a module's ``__all__``."""

    required_arguments = 1
    option_spec = {"skip": directives.unchanged, "documented-in": directives.unchanged,
                   "names": directives.unchanged, "optional": directives.flag}

    def rst(self) -> list[str]:
        module_name = self.arguments[0]
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if "optional" in self.options and e.name == module_name:
                return []
            raise
        skip = set((self.options.get("skip") or "").split())
        elsewhere = [importlib.import_module(m)
                     for m in (self.options.get("documented-in") or "").split()]
        lines: list[str] = [f".. currentmodule:: {module_name}", ""]
        links, submodules = [], []
        names = (self.options["names"].split() if "names" in self.options
                 else module.__all__)
        for name in names:
            if name in skip:
                continue
            obj = getattr(module, name)
            home = next((m for m in elsewhere if getattr(m, name, None) is obj), None)
            if home is not None:
                role = "class" if inspect.isclass(obj) else "func"
                links.append(f":{role}:`{name} <{home.__name__}.{name}>`")
                continue
            if inspect.ismodule(obj):  # a public submodule (lazymat.local): its own members
                submodules.append(obj.__name__)
            elif inspect.isclass(obj) and issubclass(obj, BaseException):
                lines += [f".. autoexception:: {name}", "   :show-inheritance:", ""]
            elif inspect.isclass(obj):
                lines += [f".. autoclass:: {name}", "   :members:", "   :undoc-members:",
                          "   :show-inheritance:", ""]
                if obj.__init__ is not object.__init__ and obj.__call__ is not type.__call__:
                    lines[-2:-2] = ["   :special-members: __call__"]
            elif callable(obj):
                lines += [f".. autofunction:: {name}", ""]
            else:
                lines += [f".. autodata:: {name}", "   :annotation:", ""]
        for sub in submodules:
            lines += [f".. rubric:: ``{sub}``", "", f".. automodule:: {sub}", "   :members:",
                      "   :undoc-members:", "", f".. currentmodule:: {module_name}", ""]
        if links:
            lines = ["Same objects as in :mod:`lazymat`: " + ", ".join(links) + ".", ""] + lines
        if "optional" in self.options:  # a module that may be absent: its own heading here
            # (no module target: lazymat.precompile is also the name of a function)
            lines = [f".. rubric:: ``{module_name}``", "", f".. automodule:: {module_name}",
                     "   :no-members:", "   :no-index:", ""] + lines
        return lines


# --------------------------------------------------------------------------- benchmark files

_TABLE_ROW = re.compile(r"^\|.*\|\s*$")
_IMAGE = re.compile(r"^!\[([^\]]*)\]\(([^)]+)\)\s*$")
_HEADING = re.compile(r"^(#+)\s+(.*)$")


def _md_inline(text: str) -> str:
    """Markdown inline code, bold and links to reST; other markup characters escaped."""
    parts = re.split(r"(`[^`]+`)", text)
    out = []
    for p in parts:
        if p.startswith("`") and p.endswith("`") and len(p) > 1:
            out.append(f"``{p[1:-1]}``")
            continue
        p = re.sub(r"([|\\_])", r"\\\1", p)
        p = re.sub(r"\*\*([^*]+)\*\*", r"**\1**", p)
        out.append(re.sub(r"(?<!\*)\*(?!\*)", r"\\*", p))
    return "".join(out)


def _stray(lines: list[str], k: int) -> bool:
    """Whether line k is text printed inside a table (a peer's warning): non-blank lines
    followed by more rows of the table."""
    m = k
    while m < len(lines) and lines[m].strip() and not _TABLE_ROW.match(lines[m]):
        if _HEADING.match(lines[m]) or _IMAGE.match(lines[m]):
            return False
        m += 1
    return m > k and m < len(lines) and bool(_TABLE_ROW.match(lines[m]))


def markdown_to_rst(text: str, image_dir: str) -> list[str]:
    """The subset of markdown the benchmark scripts write: headings (as rubrics), paragraphs,
    pipe tables (lines of a table that are not rows, such as a warning a peer printed, are
    dropped) and images (paths relative to ``image_dir``)."""
    lines = text.splitlines()
    out: list[str] = []
    k = 0
    while k < len(lines):
        line = lines[k].rstrip()
        if _TABLE_ROW.match(line):
            tables: list[list[list[str]]] = [[]]
            while k < len(lines) and (_TABLE_ROW.match(lines[k]) or _stray(lines, k)):
                if _TABLE_ROW.match(lines[k]):
                    cells = [c.strip() for c in lines[k].strip()[1:-1].split("|")]
                    if not all(re.fullmatch(r":?-+:?", c) for c in cells):
                        tables[-1].append([_md_inline(c) for c in cells])
                    elif len(tables[-1]) > 1:  # a second table right below: its header row
                        tables.append([tables[-1].pop()])
                k += 1
            for rows in tables:
                width = max(len(r) for r in rows)
                rows = [r + [""] * (width - len(r)) for r in rows]
                out += _list_table(rows[0], rows[1:])
            continue
        m = _HEADING.match(line)
        if m:
            out += [f".. rubric:: {_md_inline(m.group(2))}", ""]
        elif _IMAGE.match(line):
            alt, path = _IMAGE.match(line).groups()
            out += [f".. image:: {image_dir}/{path}", f"   :alt: {alt}", "   :width: 520px", ""]
        elif line.strip():
            paragraph = [line]
            while (k + 1 < len(lines) and lines[k + 1].strip()
                   and not _TABLE_ROW.match(lines[k + 1]) and not _HEADING.match(lines[k + 1])
                   and not _IMAGE.match(lines[k + 1])):
                k += 1
                paragraph.append(lines[k].rstrip())
            out += [_md_inline(" ".join(paragraph)), ""]
        k += 1
    return out


class Results(_RstDirective):
    """A markdown file of ``benchmarks/results/`` as reST."""

    required_arguments = 1

    def rst(self) -> list[str]:
        path = ROOT / "benchmarks" / "results" / self.arguments[0]
        self.env.note_dependency(str(path))
        here = Path(self.env.doc2path(self.env.docname)).parent
        return markdown_to_rst(path.read_text(encoding="utf-8"),
                               os.path.relpath(path.parent, here))


# --------------------------------------------------------------------------- method docstrings

def _fill_method_docstring(app, what, name, obj, options, lines) -> None:
    """A LazyTensor method without a docstring gets the line of what it builds."""
    generated = "_op_method" in getattr(obj, "__qualname__", "")
    if (lines and not generated) or what not in ("method", "property") or not name.startswith(
            ("lazymat.LazyTensor.", "lazymat.ComplexLazyTensor.")):
        return
    from lazymat.formula import MACROS, OPS
    from lazymat.reductions import REDUCTIONS

    method = name.rsplit(".", 1)[-1]
    if "_op_method" in getattr(obj, "__qualname__", ""):  # "Tanh: tanh(a)": registry text
        lines[:] = []
    targets = _method_targets().get(method)
    if not targets:
        return
    kind, key = targets[-1]
    if kind == "reduction":
        red = REDUCTIONS[key]
        what = _cell(red.doc).rstrip(".")
        lines += [f"The ``{key}`` reduction: {what}. ``dim=1`` reduces over j, "
                  f"``dim=0`` over i; see :ref:`reductions`."]
    else:
        doc = OPS[key].doc if key in OPS else (inspect.getdoc(MACROS[key]) or "").split(
            "\n\n")[0]
        doc = _cell(doc).rstrip(".")
        lines += [f"The formula op ``{_op_call(key)}``" + (f": {doc}" if doc else "")
                  + "; see :ref:`ops`."]


def _skip_foreign_member(app, what, name, obj, skip, options):
    """Members that are other libraries' functions (``numpytools.exp is numpy.exp``) are
    theirs to document."""
    fn = obj.__func__ if isinstance(obj, (staticmethod, classmethod)) else obj
    if what == "class" and inspect.isclass(fn):  # a class held by a class: documented itself
        return True
    module = getattr(fn, "__module__", None) or ""
    if what == "class" and callable(fn) and module and not module.startswith("lazymat"):
        return True
    return None


def _napoleon_for_callables_only(app) -> None:
    """Napoleon reads a property's or attribute's first line ``text: more`` as ``type:
    description``; lazymat's attribute docs are prose, so napoleon sees functions and
    classes only (where it turns Google/NumPy sections into fields)."""
    for listener in app.events.listeners.get("autodoc-process-docstring", []):
        handler = listener.handler
        if getattr(handler, "__module__", "") == "sphinx.ext.napoleon":
            def only_callables(app, what, name, obj, options, lines, _inner=handler):
                if what not in ("attribute", "data", "property"):
                    _inner(app, what, name, obj, options, lines)

            app.disconnect(listener.id)
            app.connect("autodoc-process-docstring", only_callables, listener.priority)


def _public_short_names(app, env, node, contnode):
    """A bare name in a docstring (``ShapeError`` in a submodule, ``Entry`` beside the function
    that takes it) is lazymat's public object of that name, else the one documented object
    whose dotted name ends with it."""
    import lazymat

    target = node.get("reftarget", "")
    if node.get("refdomain") != "py" or not target or "." in target:
        return None
    domain = env.get_domain("py")
    if target in lazymat.__all__:
        full = f"lazymat.{target}"
    else:
        found = [name for name in domain.objects if name.endswith("." + target)
                 and name.startswith("lazymat.")]
        if len(found) != 1:
            return None
        full = found[0]
    return domain.resolve_xref(env, node["refdoc"], app.builder, node["reftype"], full, node,
                               contnode)


def setup(app):
    app.connect("missing-reference", _public_short_names)
    app.setup_extension("sphinx.ext.napoleon")
    _napoleon_for_callables_only(app)
    app.connect("autodoc-skip-member", _skip_foreign_member)
    app.add_directive("lazymat-op-table", OpTable)
    app.add_directive("lazymat-reduction-table", ReductionTable)
    app.add_directive("lazymat-api", Api)
    app.add_directive("lazymat-results", Results)
    app.connect("autodoc-process-docstring", _fill_method_docstring)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
