"""The package has no import cycles, between modules or between subpackages; no module imports another's
private names. Imports are read from the source (function-level ones included; ``if TYPE_CHECKING:`` blocks,
which never run, left out)."""

from __future__ import annotations

import ast
import os
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def _modules() -> dict[str, Path]:
    mods = {}
    for path in (SRC / "patchscopes").rglob("*.py"):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = path
    return mods


def _imports(name: str, path: Path, mods: dict[str, Path]) -> set[tuple[str, str]]:
    """(module imported, name taken from it or '') for each runtime import inside the package."""
    tree = ast.parse(path.read_text())
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(sub) for sub in ast.walk(node))
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            out.update((a.name, "") for a in node.names if a.name in mods)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            for alias in node.names:
                if f"{base}.{alias.name}" in mods:
                    out.add((f"{base}.{alias.name}", ""))
                elif base in mods:
                    out.add((base, alias.name))
    return {(m, n) for m, n in out if m != name}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in list(graph):
        if v not in index:
            visit(v)
    return found


def _graph() -> tuple[dict[str, Path], dict[str, set[tuple[str, str]]]]:
    mods = _modules()
    return mods, {m: _imports(m, p, mods) for m, p in mods.items()}


def test_no_module_import_cycles() -> None:
    _, imports = _graph()
    assert _cycles({m: {i for i, _ in edges} for m, edges in imports.items()}) == []


def test_no_subpackage_import_cycles() -> None:
    mods, imports = _graph()

    def unit(m: str) -> str:  # a subpackage, or a top-level module on its own
        if mods[m].name == "__init__.py":
            return m
        parent = m.rsplit(".", 1)[0]
        return m if parent == "patchscopes" else parent

    graph: dict[str, set[str]] = {}
    for m, edges in imports.items():
        graph.setdefault(unit(m), set()).update(unit(i) for i, _ in edges if unit(i) != unit(m))
    assert _cycles(graph) == []


def test_no_private_names_imported_across_modules() -> None:
    _, imports = _graph()
    private = sorted(f"{m} imports {n} from {i}" for m, edges in imports.items() for i, n in edges if n.startswith("_"))
    assert private == []


def test_importing_the_plotting_modules_leaves_the_matplotlib_backend_alone():
    """A notebook's inline backend survives ``import patchscopes`` and every module that draws."""
    import subprocess
    import sys

    code = (
        "import matplotlib, patchscopes, patchscopes.plots, patchscopes.circuits.figures, patchscopes.relations.report, "
        "patchscopes.evals.next_token, patchscopes.server.exports; print(matplotlib.get_backend())"
    )
    env = {**os.environ, "MPLBACKEND": "svg"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "svg"
