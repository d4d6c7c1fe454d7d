"""The house: imports in src/ point down the layers, never in a circle (every import counts, also inside
functions and under TYPE_CHECKING)."""

from __future__ import annotations

import ast
from pathlib import Path

from src.params import REPO_ROOT


def import_graph(package: Path) -> dict[str, set[str]]:
    """Module name -> the package's modules it imports (a module's own parent packages left out)."""
    root = package.parent
    modules = {".".join(p.relative_to(root).with_suffix("").parts).removesuffix(".__init__"): p
               for p in package.rglob("*.py")}
    edges: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                targets = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            else:
                continue
            for target in targets:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name and not name.startswith(target + "."):
                    edges[name].add(target)
    return edges


def modules_in_circles(edges: dict[str, set[str]]) -> list[str]:
    def reachable(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for nxt in edges[todo.pop()]:
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen

    return sorted(m for m in edges if m in reachable(m))


def test_no_import_circle_in_src():
    assert modules_in_circles(import_graph(REPO_ROOT / "src")) == []


def test_a_circle_is_found_even_through_a_function_level_import(tmp_path):
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "low.py").write_text("def f():\n    from pkg.high import g\n")
    (package / "high.py").write_text("from pkg import low\n")
    (package / "leaf.py").write_text("import pkg.low\n")
    assert modules_in_circles(import_graph(package)) == ["pkg.high", "pkg.low"]
