"""The house rules of the package layout, checked on the source with ``ast`` (nothing of the project is imported).

1. Import directions: core <- library.sd <- networks <- library.data <- {library.train, library.eval} <-
   library.demo. Core = the top-level modules of ``library/`` (errors, fileio, config, cli, runtime, privacy,
   workers, ``__init__``); train and eval never import each other; only library.demo (and scripts, bench,
   tests) import library.demo. Imports inside functions count too: a lazy import is still a dependency.
2. No import cycle among the modules of library/ and networks/ (imports run at import time).
3. No module of library/ or networks/ over MAX_MODULE_LINES lines, no function over MAX_FUNCTION_LINES.
4. No ``sys.path`` edit in any Python file of the repository (the project is installed, editable).
5. No test module marks all its tests slow (a module-level ``pytestmark``): run alone under pytest.ini's default
   ``-m "not slow"`` it would collect nothing, exit status 5, a failure for a CI that runs one file at a time.

Each test lists every violation it finds.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("library", "networks")
MAX_MODULE_LINES = 450
MAX_FUNCTION_LINES = 80

# Which layers each layer may import (besides itself). "core" = library/*.py at the top level.
ALLOWED = {
    "core": {"core"},
    "sd": {"core", "sd"},
    "networks": {"core", "sd", "networks"},
    "data": {"core", "sd", "networks", "data"},
    "train": {"core", "sd", "networks", "data", "train"},
    "eval": {"core", "sd", "networks", "data", "eval"},
    "demo": {"core", "sd", "networks", "data", "train", "eval", "demo"},
}
SUBPACKAGES = ("sd", "data", "train", "eval", "demo")
# Folders that hold no source of the repository (virtualenvs, caches, run outputs, build products).
SKIP_DIRS = {"runs", "build", "dist", "node_modules", "__pycache__", "shared"}


@dataclass(frozen=True)
class Import:
    target: str  # dotted module name
    line: int
    module_level: bool  # executed when the importing module is imported


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _package_modules() -> dict[str, Path]:
    modules = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            if "__pycache__" not in path.parts:
                modules[_module_name(path)] = path
    return modules


MODULES = _package_modules()


def _layer(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] == "networks":
        return "networks"
    if parts[0] != "library":
        return None
    if len(parts) > 1 and parts[1] in SUBPACKAGES:
        return parts[1]
    return "core"


def _resolve_from(node: ast.ImportFrom, module: str, path: Path) -> str:
    if not node.level:
        return node.module or ""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    base = package[: len(package) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(path: Path) -> list[Import]:
    """Every import of ``path`` naming a project module, with whether it runs at import time."""
    module = _module_name(path)
    found: list[Import] = []

    def visit(node: ast.AST, module_level: bool) -> None:
        if isinstance(node, ast.Import):
            found.extend(Import(alias.name, node.lineno, module_level) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            source = _resolve_from(node, module, path)
            for alias in node.names:
                sub = f"{source}.{alias.name}"
                found.append(Import(sub if sub in MODULES else source, node.lineno, module_level))
        for child in ast.iter_child_nodes(node):
            runs_now = module_level and not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(node, ast.If) and _is_type_checking(node) and child in node.body:
                runs_now = False
            visit(child, runs_now)

    visit(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)), True)
    return [imp for imp in found if imp.target.split(".")[0] in PACKAGES]


def _rel(path: Path) -> str:
    return str(path.relative_to(REPO))


def test_layers_import_only_downwards():
    violations = []
    for module, path in MODULES.items():
        layer = _layer(module)
        for imp in _imports(path):
            target_layer = _layer(imp.target)
            if target_layer is not None and target_layer not in ALLOWED[layer]:
                violations.append(f"{_rel(path)}:{imp.line}: {layer} imports {imp.target} ({target_layer})")
    assert not violations, "imports against the layer order:\n" + "\n".join(violations)


def _strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm (iterative, so deep graphs cannot hit the recursion limit)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                components.append(sorted(component))
    return components


def test_no_import_cycles():
    graph: dict[str, set[str]] = {module: set() for module in MODULES}
    for module, path in MODULES.items():
        for imp in _imports(path):
            if imp.module_level and imp.target in MODULES and imp.target != module:
                graph[module].add(imp.target)
    cycles = [c for c in _strongly_connected(graph) if len(c) > 1]
    assert not cycles, "import cycles (module-level imports):\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_module_and_function_sizes():
    violations = []
    for path in MODULES.values():
        text = path.read_text(encoding="utf-8")
        n_lines = len(text.splitlines())
        if n_lines > MAX_MODULE_LINES:
            violations.append(f"{_rel(path)}: module has {n_lines} lines (max {MAX_MODULE_LINES})")
        for node in ast.walk(ast.parse(text, filename=str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    violations.append(f"{_rel(path)}:{node.lineno}: function {node.name} has {length} lines "
                                      f"(max {MAX_FUNCTION_LINES})")
    assert not violations, "too large:\n" + "\n".join(violations)


def _repo_python_files() -> list[Path]:
    files = []
    for path in sorted(REPO.rglob("*.py")):
        parts = path.relative_to(REPO).parts[:-1]
        if any(p.startswith(".") or p in SKIP_DIRS or p.endswith(".egg-info") for p in parts):
            continue
        files.append(path)
    return files


def _is_sys_path(node: ast.AST) -> bool:
    return (isinstance(node, ast.Attribute) and node.attr == "path" and isinstance(node.value, ast.Name)
            and node.value.id == "sys")


def _sys_path_edits(tree: ast.AST) -> list[int]:
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and _is_sys_path(node.func.value):
            lines.append(node.lineno)  # sys.path.insert / append / extend / remove ...
        elif isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign, ast.Delete)):
            targets = node.targets if isinstance(node, (ast.Assign, ast.Delete)) else [node.target]
            for target in targets:
                if _is_sys_path(target) or (isinstance(target, ast.Subscript) and _is_sys_path(target.value)):
                    lines.append(node.lineno)
        elif isinstance(node, ast.ImportFrom) and node.module == "sys" and any(a.name == "path" for a in node.names):
            lines.append(node.lineno)  # `from sys import path` only serves to edit it
    return lines


def test_no_sys_path_edits():
    files = _repo_python_files()
    assert any(p.name == "test_architecture.py" for p in files)  # the walk does see the repository
    violations = [f"{_rel(path)}:{line}" for path in files
                  for line in _sys_path_edits(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))]
    assert not violations, "sys.path edited (install the project with `pip install -e .` instead):\n" + "\n".join(
        violations)


def _marks_module_slow(tree: ast.Module) -> bool:
    """Whether a module-level ``pytestmark`` (a mark or a list of them) includes ``slow``."""
    return any(isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "pytestmark"
                                                    for t in node.targets)
               and any(isinstance(n, ast.Attribute) and n.attr == "slow" for n in ast.walk(node.value))
               for node in tree.body)


def test_no_test_module_is_slow_as_a_whole():
    tests = sorted((REPO / "tests").glob("test_*.py"))
    assert tests  # the glob does see the tests
    violations = [_rel(path) for path in tests if _marks_module_slow(ast.parse(path.read_text(encoding="utf-8")))]
    assert not violations, ("every test marked slow, so `pytest -m 'not slow' FILE` collects nothing (exit 5): mark "
                            "the slow tests one by one and add a fast one (a check of their flags, say):\n"
                            + "\n".join(violations))


@pytest.mark.parametrize("source, expected", [
    ("pytestmark = pytest.mark.slow\n", True),
    ("pytestmark = [pytest.mark.cuda, pytest.mark.slow]\n", True),
    ("pytestmark = pytest.mark.cuda\n", False),
    ("@pytest.mark.slow\ndef test_x():\n    pass\n", False),
])
def test_slow_module_detector(source, expected):
    assert _marks_module_slow(ast.parse(source)) == expected


@pytest.mark.parametrize("source, expected", [
    ("import sys\nsys.path.insert(0, 'x')\n", [2]),
    ("import sys\nsys.path[:0] = ['x']\n", [2]),
    ("import sys\nsys.path += ['x']\n", [2]),
    ("import sys\nprint(sys.path)\n", []),
])
def test_sys_path_detector(source, expected):
    assert _sys_path_edits(ast.parse(source)) == expected


def test_cycle_finder():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert [c for c in _strongly_connected(graph) if len(c) > 1] == [["a", "b", "c"]]
