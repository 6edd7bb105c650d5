"""The package's import graph (docs/architecture.md): no cycles, no import from a lower stage into a
higher one, and every module importable on its own, with or without the optional extras.

The graph is read from the source with ``ast``: every import statement, those inside functions
included, so an import made late to dodge a cycle still counts.
"""
from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import tomllib

import pytest

from .conftest import ROOT

PACKAGE = ROOT / "foldship"
# Stages in import order: a module may import its own stage and the stages before it.
STAGES = {"models": 0, "data": 0, "compress": 1, "exporters": 2, "validators": 3, "pipeline": 4, "sweep": 5}
# Top-level modules that any stage may import; they import no stage themselves.
LEAVES = {"foldship.errors", "foldship.files", "foldship.progress", "foldship._lazy"}
# The package itself and the command line sit above every stage.
ENTRY_POINTS = {"foldship", "foldship.__main__", "foldship.cli"}


def package_modules() -> dict[str, tuple]:
    """Every module of the package: dotted name -> (file, whether it is a package's __init__)."""
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        modules[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return modules


def import_graph(modules: dict[str, tuple]) -> dict[str, set[str]]:
    """module -> the package's modules it imports anywhere in its file (relative imports resolved;
    ``from package import name`` counts as the submodule when ``name`` is one)."""
    graph = {}
    for name, (path, is_package) in modules.items():
        package = name if is_package else name.rpartition(".")[0]
        imported = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                imported.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[:len(package.split(".")) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module
                imported.update(f"{target}.{alias.name}" if f"{target}.{alias.name}" in modules else target
                                for alias in node.names)
        graph[name] = {m for m in imported if m in modules and m != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path that starts and ends at the same module, or None."""
    state: dict[str, str] = {}  # "open" while on the current path, "done" once every import below is explored
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = "open"
        path.append(module)
        for imported in sorted(graph.get(module, ())):
            if state.get(imported) == "open":
                return path[path.index(imported):] + [imported]
            if imported not in state and (cycle := visit(imported)):
                return cycle
        path.pop()
        state[module] = "done"
        return None

    for module in sorted(graph):
        if module not in state and (cycle := visit(module)):
            return cycle
    return None


def place(module: str) -> str | int:
    """A module's place in the layering: its stage's rank, "leaf" or "entry"."""
    parts = module.split(".")
    if len(parts) > 1 and parts[1] in STAGES:
        return STAGES[parts[1]]
    if module in LEAVES:
        return "leaf"
    if module in ENTRY_POINTS:
        return "entry"
    raise AssertionError(f"{module} is in no stage: put it in a stage's package, or name it a leaf or an entry "
                         f"point here and in docs/architecture.md")


def layering_violations(graph: dict[str, set[str]]) -> list[str]:
    """Every import that goes up the stages, or from a leaf into a stage."""
    found = []
    for module, imported in sorted(graph.items()):
        importer = place(module)
        for target in sorted(imported):
            placed = place(target)
            if importer == "entry" or placed == "leaf":
                continue
            if importer == "leaf" or placed == "entry" or placed > importer:
                found.append(f"{module} imports {target}")
    return found


def test_the_checker_finds_a_cycle_and_an_upward_import():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None
    graph = {"foldship.models.spec": {"foldship.errors"}, "foldship.compress.budget": {"foldship.models.spec"},
             "foldship.models.registry": {"foldship.validators.latency"}, "foldship.validators.latency": set(),
             "foldship.errors": {"foldship.models.spec"}, "foldship.data.cache": {"foldship.cli"},
             "foldship.cli": {"foldship.sweep.run"}, "foldship.sweep.run": set()}
    assert layering_violations(graph) == ["foldship.data.cache imports foldship.cli",
                                          "foldship.errors imports foldship.models.spec",
                                          "foldship.models.registry imports foldship.validators.latency"]
    with pytest.raises(AssertionError, match="foldship.helpers is in no stage"):
        layering_violations({"foldship.helpers": set()})


def test_relative_imports_resolve_inside_functions_too():
    graph = import_graph(package_modules())
    # A function-level ``from . import exported, onnx_in, user_code`` in models/registry.py.
    assert {"foldship.models.exported", "foldship.models.onnx_in", "foldship.models.user_code"} <= \
        graph["foldship.models.registry"]
    assert "foldship.models.spec" in graph["foldship.data.presets"]  # ``from ..models.spec import``


def test_import_graph_has_no_cycle():
    cycle = find_cycle(import_graph(package_modules()))
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_module_imports_a_higher_stage():
    assert layering_violations(import_graph(package_modules())) == []


# Imports every module named on stdin from a fresh state (no foldship module loaded), first with the
# optional extras missing (a None entry in sys.modules: import fails and find_spec answers None, as for
# a package that is not installed), then as installed; prints {module: error} as JSON.
ISOLATED_IMPORTS = """
import importlib, json, sys, traceback

modules, optional = json.load(sys.stdin)

def import_each(label):
    failed = {}
    for module in modules:
        for loaded in [m for m in sys.modules if m == "foldship" or m.startswith("foldship.")]:
            del sys.modules[loaded]
        try:
            importlib.import_module(module)
        except BaseException as exc:
            failed[f"{module} ({label})"] = traceback.format_exception_only(exc)[-1].strip()
    return failed

sys.modules.update(dict.fromkeys(optional))
failed = import_each("without optional extras")
for name in optional:
    del sys.modules[name]
failed |= import_each("as installed")
print(json.dumps(failed))
"""


def optional_modules() -> list[str]:
    """Top-level module names of pyproject's optional extras (the dev tools apart)."""
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    return sorted({requirement.split("==")[0].replace("-", "_") for extra, requirements in extras.items()
                   if extra != "dev" for requirement in requirements})


def test_every_module_imports_in_isolation_without_and_with_the_optional_extras():
    modules = sorted(package_modules())
    env = os.environ | {"PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-c", ISOLATED_IMPORTS], input=json.dumps([modules, optional_modules()]),
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert done.returncode == 0, done.stderr
    failed = json.loads(done.stdout.strip().splitlines()[-1])
    assert failed == {}, "\n".join(f"{module}: {error}" for module, error in failed.items())
