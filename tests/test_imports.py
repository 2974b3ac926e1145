"""The import graph of the project's packages: no cycles between modules or packages, layers import one way
(activations ← sae ← training, analysis ← their commands), and no function-local first-party imports.

Read from the source with `ast`, so it sees every import, at the top of a file or inside a function.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("activations", "sae", "training", "analysis")
# Which packages each package may import (besides itself). training and analysis are siblings; the command
# modules (PKG/commands/) are the top of their package and may import what their package may.
MAY_IMPORT = {
    "activations": set(),
    "sae": {"activations"},
    "training": {"activations", "sae"},
    "analysis": {"activations", "sae"},
}
# sae/cli.py finds the commands through the `saelab.commands` entry points; it imports no command.


@dataclass(frozen=True)
class Import:
    importer: str  # dotted module name
    imported: str  # dotted module name (first-party)
    local: bool  # inside a function or class body rather than at module level
    line: int


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def project_modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def first_party_imports() -> list[Import]:
    """Every import of a project module, with whether it sits inside a function (or class)."""
    modules = project_modules()
    found: list[Import] = []
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        top_level = {id(node) for node in tree.body}
        for node in ast.walk(tree):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(
                        package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                    )
                # `from pkg import mod` imports the module pkg.mod when it is one
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            for target in targets:
                if target.split(".")[0] in PACKAGES:
                    found.append(
                        Import(name, target, id(node) not in top_level and not _in_top_if(node, tree), node.lineno)
                    )
    return found


def _in_top_if(node: ast.AST, tree: ast.Module) -> bool:
    """True for an import inside a module-level `if TYPE_CHECKING:` / try block (still a module import)."""
    for top in tree.body:
        if isinstance(top, (ast.If, ast.Try)) and any(child is node for child in ast.walk(top)):
            return True
    return False


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan), i.e. the import cycles."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def _resolve(name: str, modules: dict[str, Path]) -> str:
    """The project module an import names (a name imported from a package's __init__ is that package)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name


def module_graph() -> dict[str, set[str]]:
    modules = project_modules()
    edges: dict[str, set[str]] = {name: set() for name in modules}
    for imp in first_party_imports():
        target = _resolve(imp.imported, modules)
        if target and target != imp.importer:
            edges[imp.importer].add(target)
    return edges


def package_graph() -> dict[str, set[str]]:
    """Edges between (sub)packages: a module's package imports the package of each module it imports."""
    modules = project_modules()
    edges: dict[str, set[str]] = {}

    def package_of(module: str) -> str:
        return module if modules[module].name == "__init__.py" else module.rpartition(".")[0]

    for importer, targets in module_graph().items():
        for target in targets:
            a, b = package_of(importer), package_of(target)
            if a != b and not b.startswith(a + ".") and not a.startswith(b + "."):
                edges.setdefault(a, set()).add(b)
    return edges


def test_no_module_cycles():
    assert cycles(module_graph()) == []


def top_package_graph() -> dict[str, set[str]]:
    """Edges between the four top-level packages."""
    edges: dict[str, set[str]] = {}
    for importer, targets in module_graph().items():
        for target in targets:
            a, b = importer.split(".")[0], target.split(".")[0]
            if a != b:
                edges.setdefault(a, set()).add(b)
    return edges


def test_no_package_cycles():
    assert cycles(package_graph()) == []
    assert cycles(top_package_graph()) == []


def test_layers_import_one_way():
    wrong = sorted(
        f"{imp.importer} imports {imp.imported} (line {imp.line})"
        for imp in first_party_imports()
        if (a := imp.importer.split(".")[0]) != (b := imp.imported.split(".")[0]) and b not in MAY_IMPORT[a]
    )
    assert wrong == []


def test_no_function_local_first_party_imports():
    local = sorted(f"{imp.importer}:{imp.line} imports {imp.imported}" for imp in first_party_imports() if imp.local)
    assert local == []


def test_every_module_imports_on_its_own():
    """Each module imports first in a clean slate of project modules (no order in which imports must happen)."""
    script = (
        "import importlib, sys\n"
        f"for name in {sorted(project_modules())!r}:\n"
        f"    for loaded in [m for m in sys.modules if m.split('.')[0] in {PACKAGES!r}]:\n"
        "        del sys.modules[loaded]\n"
        "    importlib.import_module(name)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


def test_the_checks_can_fail():
    """The cycle finder sees a planted cycle and no cycle where there is none."""
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
