"""No import cycles among gpushare's own modules.

Every import counts: module level, inside functions, and under `if TYPE_CHECKING:`. An import of
`pkg.mod` (or `from pkg import mod` where `mod` is a module) is an edge to `pkg.mod`;
`from pkg import name` is an edge to the package `pkg` itself. Implicit parent-package imports
are not edges, so a package's `__init__` may re-export its own submodules.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("sharing", "plugin", "mps_daemon")


def module_names(root: Path, packages: tuple[str, ...]) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of the packages under root."""
    found: dict[str, Path] = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def _absolute(module: str, node: ast.ImportFrom, is_package: bool) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".")
    if not is_package:
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def imports_of(module: str, source: str, known: set[str], is_package: bool) -> set[str]:
    """The project modules that one module's source imports, anywhere in it."""
    targets: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            targets.update(a.name for a in node.names if a.name in known)
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(module, node, is_package)
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                if sub in known:
                    targets.add(sub)
                elif base in known:
                    targets.add(base)
    targets.discard(module)
    return targets


def import_graph(root: Path, packages: tuple[str, ...]) -> dict[str, set[str]]:
    """Module -> the project modules it imports."""
    files = module_names(root, packages)
    known = set(files)
    return {
        name: imports_of(name, path.read_text(), known, path.name == "__init__.py")
        for name, path in files.items()
    }


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0

    def visit(start: str) -> None:
        nonlocal counter
        work = [(start, iter(sorted(graph.get(start, ()))))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))

    for name in sorted(graph):
        if name not in index:
            visit(name)
    return found


def test_project_has_no_import_cycles():
    found = cycles(import_graph(ROOT, PACKAGES))
    assert found == [], "import cycles: " + "; ".join(" <-> ".join(c) for c in found)


def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        pytest.param(
            {"pkg/__init__.py": "", "pkg/a.py": "from pkg.b import x\n",
             "pkg/b.py": "from pkg.a import y\n"},
            [["pkg.a", "pkg.b"]], id="module-level cycle",
        ),
        pytest.param(
            {"pkg/__init__.py": "", "pkg/a.py": "def f():\n    from pkg import b\n",
             "pkg/b.py": "import pkg.a\n"},
            [["pkg.a", "pkg.b"]], id="function-level import closes a cycle",
        ),
        pytest.param(
            {"pkg/__init__.py": "", "pkg/a.py": "from typing import TYPE_CHECKING\n"
             "if TYPE_CHECKING:\n    from .c import z\n",
             "pkg/b.py": "from .a import y\n", "pkg/c.py": "from pkg.b import q\n"},
            [["pkg.a", "pkg.b", "pkg.c"]], id="relative TYPE_CHECKING import, three modules",
        ),
        pytest.param(
            {"pkg/__init__.py": "from pkg.a import x\n", "pkg/a.py": "from pkg.b import y\n",
             "pkg/b.py": "import os\n"},
            [], id="package re-exporting its submodules is no cycle",
        ),
        pytest.param(
            {"pkg/__init__.py": "from pkg.a import x\n", "pkg/a.py": "from pkg import helper\n"},
            [["pkg", "pkg.a"]], id="submodule importing a name from its package's __init__",
        ),
        pytest.param(
            {"pkg/__init__.py": "", "pkg/sub/__init__.py": "from . import m\n",
             "pkg/sub/m.py": "from .. import other\n", "pkg/other.py": "import pkg.sub\n"},
            [["pkg.other", "pkg.sub", "pkg.sub.m"]], id="relative imports across packages",
        ),
    ],
)
def test_cycle_finder_on_a_temporary_package(tmp_path, files, expected):
    _write(tmp_path, files)
    assert cycles(import_graph(tmp_path, ("pkg",))) == expected


def _code_map_folders(readme: str) -> set[str]:
    section = readme.split("## Code map", 1)[1].split("\n## ", 1)[0]
    return {
        line.split("`", 2)[1].rstrip("/")
        for line in section.splitlines()
        if line.startswith("| `")
    }


def _project_folders() -> set[str]:
    """Top-level folders that are tracked, and every Python package below the code packages."""
    top = {
        p.name for p in ROOT.iterdir()
        if p.is_dir() and not p.name.startswith(".") and not p.name.endswith(".egg-info")
        and p.name not in {"build", "dist", "__pycache__"}
    }
    packages = {
        str(init.parent.relative_to(ROOT))
        for package in PACKAGES
        for init in (ROOT / package).rglob("__init__.py")
    }
    return top | packages


def test_readme_code_map_names_every_folder_and_only_real_ones():
    listed = _code_map_folders((ROOT / "README.md").read_text())
    assert sorted(f for f in listed if not (ROOT / f).is_dir()) == [], "listed but missing"
    assert sorted(_project_folders() - listed) == [], "folders missing from the README code map"
