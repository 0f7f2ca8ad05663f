"""The package's import graph keeps its layers: no cycles, nothing below calls up, no module
uses another's private names (tests included).

The layers, top first (a module may import its own layer and the ones below it):

====  ===========================================================================
7     ``lazymat`` (the public API), ``lazymat.health`` (nothing imports them) and
      ``lazymat.pykeops_compat`` (the shim that presents the package as pykeops)
6     front ends, side by side: lazy_tensor, genred, solve, ranges, preconditioners,
      the pykeops-style subpackages (numpy/, torch/, pykeops/), jax, dask front ends
5     autograd: the torch glue around ``plan`` (front ends call it, it calls plan)
4     plan: checks, orientation, the Launch, the backend choice
3     backends/: base (Launch, REGISTRY), launch (the kernel ABI), reference, cpu, cuda, ...
2     codegen/ and compile/ (compile imports only config and errors)
1     reductions, formula/, arraylib
0     config, errors
====  ===========================================================================

Imports inside functions count (a lazy import is still a dependency); ``TYPE_CHECKING``
blocks do not. Known violations in other helpers' files are listed in ``ALLOWED`` with the
helper who removes them; an entry that no longer occurs fails too, so the list only shrinks.
"""

from __future__ import annotations

import ast
import functools
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "lazymat"
TESTS = ROOT / "tests"

#: (layer, module prefix): the longest matching prefix gives a module's layer.
LAYERS = [
    (7, "lazymat"), (7, "lazymat.health"),
    (6, "lazymat.lazy_tensor"), (6, "lazymat.genred"), (6, "lazymat.solve"),
    (6, "lazymat.ranges"), (6, "lazymat.preconditioners"), (6, "lazymat.numpy"),
    (6, "lazymat.torch"), (6, "lazymat.pykeops"), (6, "lazymat.jax"), (6, "lazymat.dask"),
    (5, "lazymat.autograd"),
    (4, "lazymat.plan"),
    (3, "lazymat.backends"),
    (2, "lazymat.codegen"), (2, "lazymat.compile"),
    (1, "lazymat.reductions"), (1, "lazymat.formula"), (1, "lazymat.arraylib"),
    (0, "lazymat.config"), (0, "lazymat.errors"), (0, "lazymat.pykeops_detect"),
]

#: What compile/ may import besides itself.
COMPILE_MAY_IMPORT = ("lazymat.config", "lazymat.errors")

#: Known violations: (kind, where, what) -> the helper who removes it. Must shrink to empty.
ALLOWED: dict[tuple[str, str, str], str] = {
}


def _layer(module: str) -> int:
    best = None
    for layer, prefix in LAYERS:
        if module == prefix or module.startswith(prefix + "."):
            if best is None or len(prefix) > len(best[1]):
                best = (layer, prefix)
    assert best is not None, f"{module} has no layer: add it to LAYERS in tests/test_layout.py"
    return best[0]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(p): p for p in sorted(SRC.rglob("*.py"))}


def _is_package(module: str) -> bool:
    return MODULES.get(module, Path()).name == "__init__.py"


@dataclass(frozen=True)
class Import:
    source: str  # the importing module (or test file)
    target: str  # the lazymat module imported
    names: tuple[str, ...]  # the names taken from it (from-imports)
    line: int


def _resolve(module: str, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    package = module if _is_package(module) else module.rpartition(".")[0]
    for _ in range(node.level - 1):
        package = package.rpartition(".")[0]
    return f"{package}.{node.module}" if node.module else package


def _type_checking_lines(tree: ast.AST) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for sub in node.body:
                for inner in ast.walk(sub):
                    if hasattr(inner, "lineno"):
                        lines.add(inner.lineno)
    return lines


def _imports(source: str, path: Path) -> tuple[list[Import], dict[str, str]]:
    """The lazymat imports of a file, and the names it binds to lazymat modules."""
    tree = ast.parse(path.read_text(), str(path))
    skip = _type_checking_lines(tree)
    found: list[Import] = []
    bound: dict[str, str] = {}  # local name -> the lazymat module it is
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in skip:
            continue
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "lazymat" or alias.name.startswith("lazymat."):
                    found.append(Import(source, alias.name, (), node.lineno))
                    if alias.asname:
                        bound[alias.asname] = alias.name
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(source, node)
            if not (target == "lazymat" or target.startswith("lazymat.")):
                continue
            names = []
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                if sub in MODULES:  # a submodule: the edge goes to it
                    found.append(Import(source, sub, (), node.lineno))
                    bound[alias.asname or alias.name] = sub
                else:
                    names.append(alias.name)
            if names or not node.names:
                found.append(Import(source, target, tuple(names), node.lineno))
    return found, bound


def _private_uses(where: str, path: Path, imports: list[Import], bound: dict[str, str]
                  ) -> list[tuple[str, str, str]]:
    """``from m import _x`` and ``m._x`` (also ``setattr(m, "_x", ...)``) on another
    lazymat module."""
    def private(name: str) -> bool:
        return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))

    uses = []
    for imp in imports:
        for name in imp.names:
            if private(name) and imp.target != imp.source:
                uses.append(("private", where, f"{imp.target}.{name}"))
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                and node.value.id in bound and private(node.attr)):
            uses.append(("private", where, f"{bound[node.value.id]}.{node.attr}"))
        if (isinstance(node, ast.Call) and len(node.args) >= 2
                and isinstance(node.args[0], ast.Name) and node.args[0].id in bound
                and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str)
                and private(node.args[1].value)
                and ast.unparse(node.func).split(".")[-1] in ("setattr", "getattr")):
            uses.append(("private", where, f"{bound[node.args[0].id]}.{node.args[1].value}"))
    return sorted(set(uses))


def _graph() -> dict[str, list[Import]]:
    graph = {}
    for module, path in MODULES.items():
        imports, _ = _imports(module, path)
        graph[module] = [i for i in imports if i.target in MODULES and i.target != module]
    return graph


def _cycles(graph: dict[str, list[Import]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for imp in graph[v]:
            w = imp.target
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


@functools.lru_cache(maxsize=1)
def _violations() -> list[tuple[str, str, str]]:
    graph = _graph()
    found: list[tuple[str, str, str]] = []
    for component in _cycles(graph):
        found.append(("cycle", component[0], " <-> ".join(component)))
    for module, imports in graph.items():
        for imp in imports:
            if _is_package(imp.target) and module.startswith(imp.target + "."):
                continue  # a submodule using its own package's re-exports: not upward
            if _layer(imp.target) > _layer(module):
                found.append(("upward", module, imp.target))
            if module.startswith("lazymat.compile") and not (
                    imp.target.startswith("lazymat.compile")
                    or imp.target in COMPILE_MAY_IMPORT):
                found.append(("compile-imports", module, imp.target))
    for module, path in MODULES.items():
        imports, bound = _imports(module, path)
        found += _private_uses(module, path, imports, bound)
    for path in sorted(TESTS.glob("*.py")):
        imports, bound = _imports(f"tests.{path.stem}", path)
        found += _private_uses(f"tests/{path.name}", path, imports, bound)
    return sorted(set(found))


def _describe(v: tuple[str, str, str]) -> str:
    kind, where, what = v
    return {"cycle": f"import cycle: {what}",
            "upward": f"{where} imports {what}, a higher layer",
            "compile-imports": f"{where} imports {what} (compile/ imports only config, errors)",
            "private": f"{where} uses the private name {what}"}[kind]


def test_every_module_has_a_layer():
    for module in MODULES:
        _layer(module)


def test_no_cycles_no_upward_imports_no_private_names():
    found = _violations()
    new = [v for v in found if v not in ALLOWED]
    assert not new, "layering violations:\n" + "\n".join(map(_describe, new))


def test_the_allow_list_only_holds_what_still_occurs():
    found = set(_violations())
    stale = [v for v in ALLOWED if v not in found]
    assert not stale, "fixed, remove from ALLOWED: " + ", ".join(map(str, stale))


def test_the_checker_sees_cycles_and_upward_imports():
    """The checker itself: a made-up graph with a cycle, and the layer of a low module."""
    graph = {"a": [Import("a", "b", (), 1)], "b": [Import("b", "a", (), 1)], "c": []}
    assert _cycles(graph) == [["a", "b"]]
    assert _layer("lazymat.backends.cpu") > _layer("lazymat.compile.cache")
    assert _layer("lazymat.plan") > _layer("lazymat.backends.cpu")


def test_nothing_imports_health():
    # Only the top: the public package and the shim that presents it as pykeops.
    graph = _graph()
    users = [m for m, imports in graph.items() for i in imports if i.target == "lazymat.health"
             and m not in ("lazymat", "lazymat.pykeops_compat")]
    assert users == []
