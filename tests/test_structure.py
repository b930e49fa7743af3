"""The layout keeps its shape: a thin entry file, no import cycle inside the package, no
function too long to read at once, and the entry module imported only by its own tests."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "snoo_train"
ENTRY = "snoo_train.train"
MAX_FUNCTION_LINES = 60
# The tests of the entry point itself (and this file) may import it.
ENTRY_TESTS = {"test_train.py", "test_configs.py", "test_structure.py"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Every module `path` imports, at any depth of the file, except under `if TYPE_CHECKING:`
    (annotations only). `from pkg import name` counts `pkg.name` when that is a module."""
    tree = ast.parse(path.read_text())
    skip = {
        id(n)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and getattr(node.test, "id", getattr(node.test, "attr", None)) == "TYPE_CHECKING"
        for n in ast.walk(node)
    }
    found = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
    return found


def package_modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def test_the_entry_file_is_thin():
    lines = len((PACKAGE / "train.py").read_text().splitlines())
    assert lines < 150, f"snoo_train/train.py has {lines} lines: the library belongs in snoo_train/trainer/"


def test_no_import_cycle_inside_the_package():
    modules = package_modules()
    graph = {name: sorted(m for m in imports(path) if m in modules and m != name) for name, path in modules.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for dep in graph[name]:
            if state.get(dep) == 1:
                cycles.append(path[path.index(dep):] + [dep] if dep in path else [name, dep])
            elif dep not in state:
                visit(dep, path + [dep])
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_no_function_is_too_long():
    long = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({length} lines)")
    assert not long, long


def test_only_the_entry_tests_import_the_entry_module():
    offenders = [
        str(path.relative_to(REPO))
        for folder in ("bench", "tests")
        for path in (REPO / folder).rglob("*.py")
        if path.name not in ENTRY_TESTS and ENTRY in imports(path)
    ]
    assert not offenders, f"import the library (snoo_train.trainer, snoo_train.configs), not {ENTRY}: {offenders}"
    library = [name for name, path in package_modules().items() if name not in (ENTRY, "snoo_train.cli") and ENTRY in imports(path)]
    assert not library, f"the library imports its entry point: {library}"


def test_the_cycle_check_sees_a_cycle(tmp_path, monkeypatch):
    # A positive control: two modules that import each other are reported.
    pkg = tmp_path / "snoo_train"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("import snoo_train.b\n")
    (pkg / "b.py").write_text("def f():\n    from snoo_train import a\n")
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", pkg)
    with pytest.raises(AssertionError, match="import cycles") as reported:
        test_no_import_cycle_inside_the_package()
    assert "snoo_train.a" in str(reported.value) and "snoo_train.b" in str(reported.value)
