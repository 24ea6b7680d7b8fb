"""The package layers hold: the import-linter contracts of pyproject.toml pass, and no two packages of
``consistentee`` import each other, directly or round a longer circle, counting lazy imports inside functions
(a cycle hidden behind a function-level import or a module ``__getattr__`` is still a cycle)."""

from __future__ import annotations

import ast
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "consistentee"

#: part -> imported part -> where ("consistentee.exits.learned:32"), for every import between two parts.
Edges = dict[str, dict[str, list[str]]]


def _module_name(path: Path, root: Path) -> tuple[list[str], bool]:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        return parts[:-1], True
    return parts, False


def _imported(node: ast.AST, module: list[str], is_package: bool) -> list[str]:
    """The absolute names an import statement names (``from x import y`` gives ``x.y`` as well as ``x``)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if not isinstance(node, ast.ImportFrom):
        return []
    if node.level:
        base = module if is_package else module[:-1]
        base = base[: len(base) - (node.level - 1)]
        source = ".".join([*base, *([node.module] if node.module else [])])
    else:
        source = node.module or ""
    return [source, *(f"{source}.{alias.name}" for alias in node.names)]


def package_imports(package_dir: Path) -> Edges:
    """Every import between the top-level parts (subpackages and modules) of the package at ``package_dir``.

    The root ``__init__`` is no part: Python runs it before any submodule anyway."""
    name = package_dir.name
    parts = {p.stem for p in package_dir.iterdir() if p.suffix == ".py" and p.stem != "__init__"}
    parts |= {p.name for p in package_dir.iterdir() if (p / "__init__.py").is_file()}
    edges: Edges = defaultdict(lambda: defaultdict(list))
    for path in sorted(package_dir.rglob("*.py")):
        module, is_package = _module_name(path, package_dir)
        if len(module) < 2:
            continue
        source = module[1]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            targets = {t.split(".")[1] for t in _imported(node, module, is_package)
                       if t.split(".")[0] == name and t.count(".") >= 1}
            for target in sorted(targets & parts - {source}):
                edges[source][target].append(f"{'.'.join(module)}:{node.lineno}")
    return edges


def import_cycles(edges: Edges) -> list[list[str]]:
    """The strongly connected components of more than one part (Tarjan), each sorted: empty means no cycle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in edges.get(node, {}):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
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

    for node in sorted(set(edges) | {t for targets in edges.values() for t in targets}):
        if node not in index:
            visit(node)
    return found


def _describe(edges: Edges, component: list[str]) -> str:
    lines = [" <-> ".join(component)]
    for a in component:
        for b in component:
            if b in edges.get(a, {}):
                lines.append(f"  {a} -> {b}: {', '.join(edges[a][b][:5])}")
    return "\n".join(lines)


def test_no_import_cycle_between_packages():
    edges = package_imports(PACKAGE)
    assert edges, "found no imports at all: is PACKAGE right?"
    cycles = import_cycles(edges)
    assert not cycles, "packages that import each other:\n" + "\n".join(_describe(edges, c) for c in cycles)


def test_import_linter_contracts_hold():
    lint_imports = Path(sys.executable).with_name("lint-imports")
    assert lint_imports.is_file(), "import-linter is missing: pip install -e '.[dev]'"
    done = subprocess.run([str(lint_imports), "--no-cache"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 broken" in done.stdout


def test_the_cycle_check_sees_lazy_and_relative_imports(tmp_path):
    root = tmp_path / "pkg"
    for sub in ("low", "high"):
        (root / sub).mkdir(parents=True)
        (root / sub / "__init__.py").write_text("")
    (root / "__init__.py").write_text("from pkg.high import thing\n")
    (root / "high" / "thing.py").write_text("from ..low import base\n")
    (root / "low" / "base.py").write_text("def late():\n    from pkg.high.thing import x\n    return x\n")
    edges = package_imports(root)
    assert edges["high"]["low"] == ["pkg.high.thing:1"] and edges["low"]["high"] == ["pkg.low.base:2"]
    assert import_cycles(edges) == [["high", "low"]]
    (root / "low" / "base.py").write_text("X = 1\n")
    assert import_cycles(package_imports(root)) == []
