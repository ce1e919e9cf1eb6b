"""The package's shape: layers import only leftwards, no cycles, no private names across modules, no
hidden function-level imports, a light ``import etbench`` and a packaging list that ships every layer."""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "benchmark" / "etbench"
LAYERS = ["core", "schema", "task", "models", "mech", "metrics", "training", "scoring", "publish", "api", "cli"]
#: Modules allowed to import etbench modules inside functions (each such import carries a comment saying why).
LAZY_OK = {"etbench.cli", "etbench.api"}


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _layer(module: str) -> int | None:
    parts = module.split(".")
    if len(parts) < 2:
        return None  # the package root: etbench/__init__.py (lazy API table, imports nothing at load)
    return LAYERS.index(parts[1]) if parts[1] in LAYERS else None


def _imports(path: Path):
    """(imported module, names, function-level?) for every etbench import in a file."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    nested = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for inner in ast.walk(node):
                if isinstance(inner, (ast.Import, ast.ImportFrom)):
                    nested.add(id(inner))
    type_checking = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for inner in ast.walk(node):
                type_checking.add(id(inner))
    for node in ast.walk(tree):
        if id(node) in type_checking:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("etbench"):
            names = [a.name for a in node.names]
            if node.module == "etbench":  # `from etbench import models` is a submodule import
                for name in names:
                    yield f"etbench.{name}", [], id(node) in nested
            else:
                yield node.module, names, id(node) in nested
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("etbench"):
                    yield alias.name, [], id(node) in nested


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_go_leftwards_only(module):
    own = _layer(module)
    for target, _, _ in _imports(MODULES[module]):
        if target == "etbench" or target.endswith("__version__"):
            continue
        their = _layer(target)
        assert own is None or their is None or their <= own, (
            f"{module} ({LAYERS[own]}) imports {target} ({LAYERS[their]}), a layer to its right")


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_private_names_across_modules(module):
    for target, names, _ in _imports(MODULES[module]):
        private = [n for n in names if n.startswith("_") and n != "__version__"]
        assert not private, f"{module} imports private {private} from {target}"


@pytest.mark.parametrize("module", sorted(set(MODULES) - LAZY_OK - {"etbench"}))
def test_no_function_level_internal_imports(module):
    lazy = [target for target, _, nested in _imports(MODULES[module]) if nested]
    assert not lazy, f"{module} imports {lazy} inside a function: import at the top, or say why"


def test_import_graph_has_no_cycle():
    graph = {m: set() for m in MODULES}
    for module, path in MODULES.items():
        for target, _, _ in _imports(path):
            if target in graph and target != module:
                graph[module].add(target)
    state: dict[str, int] = {}

    def visit(node, trail):
        state[node] = 1
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join(trail + [node, nxt]))
            if nxt not in state:
                visit(nxt, trail + [node])
        state[node] = 2

    for module in graph:
        if module not in state:
            visit(module, [])


def test_every_subpackage_is_packaged():
    declared = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {_module_name(p.parent / "__init__.py") for p in PACKAGE.rglob("__init__.py")}
    assert found <= declared, f"not in pyproject's packages list: {sorted(found - declared)}"


def test_layer_checker_sees_a_planted_violation(tmp_path):
    """The checks above can fail: an upward and a private import in a planted file are both found."""
    bad = tmp_path / "bad.py"
    bad.write_text("from etbench.publish.report import _p\n\ndef f():\n    from etbench.cli import main\n")
    found = list(_imports(bad))
    assert ("etbench.publish.report", ["_p"], False) in found
    assert ("etbench.cli", ["main"], True) in found


def test_import_etbench_and_help_do_not_load_torch():
    code = ("import sys, etbench; assert 'torch' not in sys.modules; etbench.Scorecard; etbench.compare; "
            "import etbench.cli, etbench.publish.leaderboard; assert 'torch' not in sys.modules, 'torch loaded'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_public_api_names_resolve_lazily():
    import etbench

    for name in etbench.__all__:
        assert getattr(etbench, name) is not None
    with pytest.raises(AttributeError):
        etbench.not_a_public_name  # noqa: B018
