"""The scripts' modules import only downwards: no module reaches, through its imports, back to itself."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"
MODULES = sorted(path.stem for path in SCRIPTS.glob("*.py"))


def imports(module: str) -> set[str]:
    """The project's modules that `module` imports, at its top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse((SCRIPTS / f"{module}.py").read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module.split(".")[0])
    return found & set(MODULES) - {module}


def circle_from(start: str, graph: dict[str, set[str]]) -> list[str]:
    """A chain of imports from `start` back to itself, or [] when there is none."""
    paths = [[start]]
    seen = set()
    while paths:
        path = paths.pop()
        for name in sorted(graph[path[-1]]):
            if name == start:
                return [*path, start]
            if name not in seen:
                seen.add(name)
                paths.append([*path, name])
    return []


def test_no_module_imports_itself_back() -> None:
    graph = {module: imports(module) for module in MODULES}
    circles = [" -> ".join(chain) for module in MODULES if (chain := circle_from(module, graph))]
    assert circles == []


def test_the_circle_finder_finds_a_circle() -> None:
    assert circle_from("a", {"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert circle_from("a", {"a": {"b"}, "b": {"c"}, "c": set()}) == []


@pytest.mark.parametrize("module", ["output", "config", "clap_configs", "cluster_state", "cluster", "aws",
                                    "aws_account", "aws_launch", "aws_nodes", "role", "run_logs"])
def test_each_shared_module_imports_alone(module: str) -> None:
    done = subprocess.run([sys.executable, "-c", f"import {module}"], cwd=SCRIPTS, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
