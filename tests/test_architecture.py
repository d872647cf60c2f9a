"""The package's module structure: imports go one way, and the command line sits on top.

Every module of ``src/niconv`` is parsed (not imported), so imports inside
functions count as much as those at the top of a file: a function-level import
hides a cycle from Python until the function runs, not from the design.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "niconv"


def _modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package (a package by its ``__init__``)."""
    found = {}
    for path in sorted((SRC / PACKAGE).rglob("*.py")):
        parts = path.relative_to(SRC).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _face_sources(modules: dict[str, Path]) -> dict[str, str]:
    """Names the package's ``__init__`` re-exports -> the module they come from.

    ``from niconv import nifti_to_numpy`` depends on the converter module, not on
    the package; a name the ``__init__`` defines itself (``__version__``) depends
    on nothing, as Python sets it before the ``__init__`` imports anything.
    """
    tree = ast.parse(modules[PACKAGE].read_text(encoding="utf-8"))
    sources = {}
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module:
            for alias in node.names:
                sources[alias.asname or alias.name] = f"{PACKAGE}.{node.module}"
    return sources


def import_graph() -> dict[str, set[str]]:
    """Module -> the package's modules it imports anywhere in its file (function bodies included)."""
    modules = _modules()
    face = _face_sources(modules)

    def owner(name: str) -> str | None:
        # the module itself, or the package holding it: 'niconv.ops.crop.crop' -> 'niconv.ops.crop'
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for module, path in modules.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                # 'from a import b': b is a module of a, or a name defined in a
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules
                           else face.get(alias.name, "") if base == PACKAGE else base for alias in node.names]
            else:
                continue
            deps.update(o for t in targets if (o := owner(t)) and o.startswith(PACKAGE) and o != PACKAGE)
        deps.discard(module)
        graph[module] = deps
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as ``[a, b, ..., a]``, or None if the graph has none."""
    state: dict[str, str] = {}  # module -> "open" while on the path, "done" once all it imports is checked
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = "open"
        path.append(m)
        for d in sorted(graph.get(m, ())):
            if state.get(d) == "open":
                return path[path.index(d):] + [d]
            if d not in state and (cycle := visit(d)):
                return cycle
        path.pop()
        state[m] = "done"
        return None

    for m in sorted(graph):
        if m not in state and (cycle := visit(m)):
            return cycle
    return None


def test_the_graph_sees_imports_inside_functions():
    graph = import_graph()
    # both are imported only inside functions of the command line
    assert {"niconv.runner", "niconv.info"} <= graph["niconv.cli"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_modules_import_each_other_without_a_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_only_the_entry_point_imports_the_command_line():
    importers = sorted(m for m, deps in import_graph().items() if "niconv.cli" in deps)
    assert importers == ["niconv.__main__"]


@pytest.mark.parametrize("module", sorted(set(_modules()) - {"niconv.cli"}))
def test_command_handlers_live_in_the_command_line(module):
    tree = ast.parse(_modules()[module].read_text(encoding="utf-8"))
    handlers = [n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)
                and (n.name.startswith("cmd_") or n.name in ("main", "add_arguments", "build_parser"))]
    assert handlers == [], f"{module} defines command-line handlers; they belong in niconv.cli"
