"""The package's layout, read from its source: no import circle, and each floor imports only
from the floors below it.

The graph is built with `ast`, without importing anything. An edge is every import a module
makes, at its top or inside a function (a function's import still ties the two modules
together); an import under `if TYPE_CHECKING:` is left out (it never runs: it names a type
for annotations only). `from pytest_minictr import Name` of a name the package exports lazily
(its `_EXPORTS`, PEP 562) is an edge to the module that defines it. A package's `__init__` is
a node where it is named (`from pytest_minictr.host import cgroups`), not for each of its
submodules: Python runs it first, but counting that would make a circle of every `__init__`
that re-exports.

The floors, bottom up:
- the top level (`errors`, `keywords`, `validate`, `spec`, `confinement`, `sizes`, `ports`,
  `protocol`, `native`): shared values and checks, importing nothing of the package but each
  other, except what `TOP_MAY_REACH` lists, with its reason;
- `caller/`, `launcher/`, `container/`, `host/`, `forwarder/`: never a front end;
- the front ends (`plugin/`, `cli/`, `rootfs/`, `doctor/`, `grading/`) on top.
`pytest_minictr/__init__.py` (the public names, loaded on first use) and `__main__.py` (the
`python -m` entry, which runs the CLI) are the package's doors, not its bottom floor.

The native core's `#include "..."` graph has no circle either.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest_minictr

PACKAGE = "pytest_minictr"
ROOT = Path(pytest_minictr.__file__).parent
DOORS = {PACKAGE, f"{PACKAGE}.__main__"}
LOWER_FLOORS = ("caller", "launcher", "container", "host", "forwarder")
FRONT_ENDS = ("plugin", "cli", "doctor", "grading")
# What the top level may import from above it, and why. Both are imported inside a function,
# for their cost (glob, shutil, bz2, lzma), and import nothing above the top level themselves.
TOP_MAY_REACH = {
    f"{PACKAGE}.keywords": {
        f"{PACKAGE}.rootfs.recipe": "the marker's recipe= is checked against the recipes "
                                    "the rootfs builder can find",
        f"{PACKAGE}.rootfs.cache": "a spec without a command takes the default command a "
                                   "built rootfs declares",
    },
}


def module_names() -> dict[str, Path]:
    names = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = (PACKAGE, *path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names[".".join(parts)] = path
    return names


MODULES = module_names()


def lazy_exports() -> dict[str, str]:
    """The package's `_EXPORTS`: name -> the module that defines it."""
    tree = ast.parse((ROOT / "__init__.py").read_text())
    for node in tree.body:
        if isinstance(node, (ast.Assign, ast.AnnAssign)) and "_EXPORTS" in ast.unparse(
                node.targets[0] if isinstance(node, ast.Assign) else node.target):
            exports = ast.literal_eval(node.value)
            return {name: f"{PACKAGE}.{module}" for module, names in exports.items()
                    for name in names}
    raise AssertionError("pytest_minictr/__init__.py has no _EXPORTS")


EXPORTS = lazy_exports()


def is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


class Imports(ast.NodeVisitor):
    """The package modules one module imports, anywhere in it but under TYPE_CHECKING."""

    def __init__(self, module: str, is_package: bool):
        self.module = module
        self.package = module if is_package else module.rpartition(".")[0]
        self.found: set[str] = set()

    def visit_If(self, node: ast.If) -> None:
        if is_type_checking(node.test):
            for child in node.orelse:
                self.visit(child)
        else:
            self.generic_visit(node)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            if alias.name.split(".")[0] == PACKAGE:
                self.found.add(existing(alias.name))

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        base = self.absolute(node)
        if base.split(".")[0] != PACKAGE:
            return
        for alias in node.names:
            name = f"{base}.{alias.name}"
            if name in MODULES:
                self.found.add(name)
            elif base == PACKAGE and alias.name in EXPORTS:
                self.found.add(EXPORTS[alias.name])
            else:
                self.found.add(existing(base))

    def absolute(self, node: ast.ImportFrom) -> str:
        if not node.level:
            return node.module or ""
        base = self.package.rsplit(".", node.level - 1)[0] if node.level > 1 else self.package
        return f"{base}.{node.module}" if node.module else base


def existing(name: str) -> str:
    """The module `name` names (a name inside a module: that module)."""
    while name not in MODULES:
        assert "." in name, f"no module of the package is named {name}"
        name = name.rpartition(".")[0]
    return name


def import_graph() -> dict[str, set[str]]:
    graph = {}
    for module, path in MODULES.items():
        imports = Imports(module, path.name == "__init__.py")
        imports.visit(ast.parse(path.read_text(), str(path)))
        graph[module] = imports.found - {module}
    return graph


GRAPH = import_graph()


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One circle (a path back to its start) in each strongly connected set of nodes."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(node: str) -> None:  # Tarjan's algorithm
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            members = set()
            while True:
                member = stack.pop()
                members.add(member)
                if member == node:
                    break
            if len(members) > 1 or node in graph.get(node, ()):
                found.append(path_back(graph, node, members))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def path_back(graph: dict[str, set[str]], start: str, members: set[str]) -> list[str]:
    """The shortest way from `start` back to itself, through `members` only."""
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for target in sorted(graph.get(node, ()) & members):
                if target == start:
                    return [*paths[node], start]
                if target not in paths:
                    paths[target] = [*paths[node], target]
                    following.append(target)
        frontier = following
    raise AssertionError(f"{start} is in no circle")


def floor_of(module: str) -> str:
    """'top', a folder's name ('caller', 'plugin'...), or 'door'."""
    if module in DOORS:
        return "door"
    path = MODULES[module].relative_to(ROOT)
    return path.parts[0] if len(path.parts) > 1 else "top"


def test_the_graph_is_read_whole():
    # a sample of edges each kind of import makes, so that an empty graph cannot pass
    assert f"{PACKAGE}.spec" in GRAPH[f"{PACKAGE}.keywords"]                # from x import y
    assert f"{PACKAGE}.rootfs.cache" in GRAPH[f"{PACKAGE}.keywords"]        # in a function
    assert f"{PACKAGE}.host.cgroups.base" in GRAPH[f"{PACKAGE}.host.cgroups"]  # relative
    assert f"{PACKAGE}.doctor.host" not in GRAPH[f"{PACKAGE}.doctor.places"]  # TYPE_CHECKING
    assert len(GRAPH) > 60


def test_no_import_circle():
    found = [" -> ".join(name.removeprefix(f"{PACKAGE}.") for name in circle)
             for circle in circles(GRAPH)]
    assert found == [], "import circles:\n" + "\n".join(found)


def test_a_circle_is_found_and_named():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"e"}}
    assert circles(graph) == [["a", "b", "c", "a"], ["e", "e"]]


def test_the_top_level_imports_only_the_top_level():
    reaching = {(module, target) for module, targets in GRAPH.items()
                if floor_of(module) == "top" for target in targets
                if floor_of(target) != "top"
                and target not in TOP_MAY_REACH.get(module, {})}
    assert reaching == set()


def test_what_the_top_level_may_reach_stays_at_the_bottom():
    for allowed in TOP_MAY_REACH.values():
        for target in allowed:
            above = {t for t in GRAPH[target] if floor_of(t) != "top"}
            assert above == set(), f"{target} imports {above}: it must stay a leaf"


def test_validate_imports_nothing_of_container_or_rootfs():
    assert {t for t in GRAPH[f"{PACKAGE}.validate"] if floor_of(t) in ("container", "rootfs")} \
        == set()


def test_no_lower_floor_imports_a_front_end():
    reaching = {(module, target) for module, targets in GRAPH.items()
                if floor_of(module) in LOWER_FLOORS for target in targets
                if floor_of(target) in FRONT_ENDS or target in DOORS}
    assert reaching == set()


NATIVE = ROOT / "container" / "native"
INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"', re.MULTILINE)


def test_the_native_core_has_no_include_circle():
    sources = {path.name: path for pattern in ("*.c", "*.h") for path in NATIVE.glob(pattern)}
    assert "minictr_init.h" in sources
    graph = {}
    for name, path in sources.items():
        included = set(INCLUDE.findall(path.read_text()))
        assert included <= set(sources), f"{name} includes {included - set(sources)}"
        graph[name] = included
    assert circles(graph) == []
