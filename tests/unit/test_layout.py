"""The code's layout as a newcomer meets it: no module imports itself back through others."""

import ast
import importlib
import tomllib

from hacer.settings import PROJECT_DIR

FIRST_PARTY = ("hacer", "ops", "scripting", "bridge", "runner", "recorder", "api", "scheduler", "emulator")


def imports_of(path) -> set[str]:
    """The first-party modules a file imports, at its top or inside a function alike."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
        if isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names = [node.module]
        found.update(name for name in names if name.split(".")[0] in FIRST_PARTY)
    return found


def module_graph() -> dict[str, set[str]]:
    graph = {}
    for folder in FIRST_PARTY:
        for path in (PROJECT_DIR / folder).glob("*.py"):
            name = f"{folder}.{path.stem}" if path.stem != "__init__" else folder
            graph[name] = imports_of(path)
    return graph


def test_no_module_imports_itself_back():
    graph = module_graph()
    circles = []

    def visit(module: str, path: list[str]) -> None:
        for imported in sorted(graph.get(module, ())):
            if imported == path[0]:
                circles.append(" -> ".join([*path, imported]))
            elif imported not in path and imported > path[0]:  # each circle once, from its least module
                visit(imported, [*path, imported])

    for module in sorted(graph):
        visit(module, [module])
    assert circles == []


def test_the_graph_sees_imports_inside_functions():
    graph = module_graph()
    assert "hacer.automations" in graph["hacer.schemas"]  # at the top
    assert "ops.asyncapi" in graph["ops.schemadoc"]  # inside a function


def test_the_project_table_installs_every_folder_and_the_hacer_command():
    project = tomllib.loads((PROJECT_DIR / "pyproject.toml").read_text())
    included = project["tool"]["setuptools"]["packages"]["find"]["include"]
    assert sorted(f"{folder}*" for folder in FIRST_PARTY) == sorted(included)
    module, function = project["project"]["scripts"]["hacer"].split(":")
    assert callable(getattr(importlib.import_module(module), function))
    assert project["tool"]["setuptools"]["dynamic"]["dependencies"]["file"] == ["requirements.txt"]


def test_no_class_passes_300_lines():
    # A part's main class wires small parts with one job each; a class this long is doing several.
    too_long = {}
    for folder in FIRST_PARTY:
        for path in (PROJECT_DIR / folder).glob("*.py"):
            for node in ast.parse(path.read_text()).body:
                if isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno >= 300:
                    too_long[f"{folder}/{path.name}:{node.name}"] = node.end_lineno - node.lineno + 1
    assert too_long == {}
