"""The house rules that span files: no import cycle (function-level imports counted), `latentflow/flow/` imports
nothing of ours but itself and `latentflow/errors.py`, every rename of a finished file goes through
`latentflow/io.py`, and the tree passes ruff."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).parents[1]
SKIPPED = {".venv", ".git", "tests", "build", "dist", "runs", "node_modules"}


def project_files() -> list[Path]:
    """Every .py file of the project outside tests/, relative to the repository."""
    files = []
    for path in sorted(REPO.rglob("*.py")):
        relative = path.relative_to(REPO)
        if not any(part in SKIPPED or part.startswith(".") for part in relative.parts[:-1]):
            files.append(relative)
    return files


def module_name(relative: Path) -> str:
    parts = list(relative.with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    if parts and parts[0] == "pipelines":  # installed as latentflow.pipelines
        parts = ["latentflow", *parts]
    return ".".join(parts)


def import_graph() -> dict[str, set[str]]:
    """file -> the project files it imports, at module level or inside functions (packages' __init__ excluded
    as targets, as importing a submodule runs them only for their own re-exports)."""
    files = project_files()
    modules = {module_name(f): str(f) for f in files}
    modules.update({name.removeprefix("latentflow."): path for name, path in modules.items()
                    if name.startswith("latentflow.pipelines")})  # `from pipelines import ...` in a checkout
    graph: dict[str, set[str]] = {str(f): set() for f in files}
    for relative in files:
        tree = ast.parse((REPO / relative).read_text())
        package = module_name(relative) if relative.name == "__init__.py" else module_name(relative).rpartition(".")[0]
        for node in ast.walk(tree):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*parts, base]) if base else ".".join(parts)
                names = [f"{base}.{alias.name}" for alias in node.names] + [base]
            for name in names:
                while name and name not in modules:
                    name = name.rpartition(".")[0]
                target = modules.get(name)
                if target and target != str(relative) and not target.endswith("__init__.py"):
                    graph[str(relative)].add(target)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of files, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return stack[stack.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_walk_finds_a_planted_cycle() -> None:
    assert find_cycle({"a.py": {"b.py"}, "b.py": {"c.py"}, "c.py": {"a.py"}}) == ["a.py", "b.py", "c.py", "a.py"]
    assert find_cycle({"a.py": {"b.py"}, "b.py": set()}) is None


def test_the_walk_sees_function_level_imports() -> None:
    graph = import_graph()
    assert "pipelines/pipeline_latentflow.py" in graph["latentflow/export.py"]  # imported inside functions only
    assert "latentflow/flow/solvers.py" in graph["pipelines/pipeline_latentflow.py"]


def test_no_import_cycle_between_project_files() -> None:
    assert find_cycle(import_graph()) is None


def test_flow_imports_nothing_of_ours_but_itself_and_errors() -> None:
    leaks = {(source, target) for source, targets in import_graph().items() if source.startswith("latentflow/flow/")
             for target in targets if not (target.startswith("latentflow/flow/") or target == "latentflow/errors.py")}
    assert not leaks


def renames(source: str) -> list[int]:
    """Lines that rename a file: os.replace / os.rename / Path.replace / Path.rename (one argument; str.replace
    takes two)."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            name, owner = node.func.attr, node.func.value
            is_os = isinstance(owner, ast.Name) and owner.id == "os"
            if name in ("replace", "rename") and (is_os or len(node.args) == 1):
                lines.append(node.lineno)
    return lines


def test_the_rename_finder_tells_file_renames_from_string_replaces() -> None:
    assert renames("os.replace(a, b)\npath.rename(c)\ntemporary.replace(target)\n") == [1, 2, 3]
    assert renames("text.replace('a', 'b')\n") == []


def test_only_io_and_the_shard_writer_rename_files() -> None:
    allowed = {"latentflow/io.py", "latentflow/data/writer.py"}
    offenders = {str(relative): found for relative in project_files() if str(relative) not in allowed
                 and (found := renames((REPO / relative).read_text()))}
    assert not offenders


@pytest.mark.skipif(shutil.which("ruff", path=str(Path(sys.executable).parent)) is None, reason="ruff not installed")
def test_the_tree_passes_ruff() -> None:
    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent))
    result = subprocess.run([ruff, "check", str(REPO)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-3000:]
