"""The package layout stays what the README's layout section describes: one concern per
package, no import cycles, and an engine that does not depend on the server or the world."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import dreambooth

PACKAGE = Path(dreambooth.__file__).parent
# The engine: everything a user of train/generate/export needs. serve/ and world/ build on it.
ENGINE = ("dreambooth.train", "dreambooth.formats", "dreambooth.config", "dreambooth.models",
          "dreambooth.families", "dreambooth.generate", "dreambooth.images", "dreambooth.files",
          "dreambooth.seeding", "dreambooth.tiny", "dreambooth.prompts")


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports, at the top or inside functions."""
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(("dreambooth", *path.relative_to(PACKAGE).with_suffix("").parts))
        modules[name.removesuffix(".__init__")] = path
    graph = {}
    for name, path in modules.items():
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("dreambooth"):
                for alias in node.names:
                    full = f"{node.module}.{alias.name}"
                    imported.add(full if full in modules else node.module)
            elif isinstance(node, ast.Import):
                imported.update(a.name for a in node.names if a.name.startswith("dreambooth"))
        graph[name] = {module for module in imported if module in modules and module != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in graph[node]:
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                other = stack.pop()
                on_stack.discard(other)
                component.append(other)
                if other == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return found


def test_no_import_cycle():
    assert cycles(import_graph()) == []


def test_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_engine_does_not_depend_on_serve_or_world():
    graph = import_graph()
    engine = [name for name in graph if name.startswith(ENGINE)]
    assert len(engine) > 15
    wrong = {name: sorted(m for m in graph[name]
                          if m.startswith(("dreambooth.serve", "dreambooth.world")))
             for name in engine}
    assert {name: modules for name, modules in wrong.items() if modules} == {}


def test_importing_the_package_loads_nothing_else():
    code = ("import sys, dreambooth; "
            "print(sorted(m for m in sys.modules if m.startswith(('dreambooth', 'torch'))))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True).stdout
    assert loaded.strip() == "['dreambooth']"
