"""Check repnet's import graph: no cycle, no upward import, no private name used across modules.

A module's floor is the floor of the top-level entry of ``src/repnet`` it lives in (a module, or a
package and everything under it): :data:`FLOORS` lists the top-level entries only, so a file added
inside an existing package needs no edit here; a new top-level entry must be given a floor (the
check fails until it is). A module may import its own floor and the floors below; inside one
package, modules may import each other (cycles are still refused). Every ``import`` counts, at
module level or inside a function.

A name starting with ``_`` (not a dunder) is private to its module: importing one from another
repnet module (``from repnet.x import _y``), or reading one through an imported repnet module
(``x._y``), fails the check - in ``src/``, ``tests/``, ``benchmarks/`` and ``scripts/`` alike.

    python scripts/check_imports.py            # the graph, then the verdict (exit 1 on any violation)
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
PKG = "repnet"
#: Trees whose private-name use is checked besides src/ (they import repnet like a user).
CLIENT_TREES = ("tests", "benchmarks", "scripts")

#: Floors, bottom to top: the top-level entries of src/repnet (modules and packages) on each.
FLOORS = [
    ("foundations", ("errors", "registry", "keyvalue", "limits", "storage", "optim")),
    ("models: backbones and data", ("backbones", "data")),
    ("memory engine", ("memory",)),
    ("methods", ("methods",)),
    ("model builder", ("api",)),
    ("runtimes", ("runtime",)),
    ("training config", ("config",)),
    ("training", ("training",)),
    ("workflows", ("continual", "federated", "export", "reproduce", "demo", "proviot")),
    ("command line", ("commands", "cli", "flower_app")),
]


def top_entry(mod: str) -> str | None:
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 else None


def floor(mod: str) -> int:
    """The floor of module ``mod`` (the package's ``__init__`` is above everything)."""
    top = top_entry(mod)
    if top is None:
        return len(FLOORS)
    for n, (_, names) in enumerate(FLOORS):
        if top in names:
            return n
    raise SystemExit(f"check_imports: src/repnet/{top} has no floor: add it to FLOORS in {Path(__file__).name}")


def module_name(path: Path, base: Path = SRC) -> str:
    rel = path.relative_to(base).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def resolve(node: ast.ImportFrom, mod: str, is_pkg: bool) -> str:
    """The absolute module a ``from ... import`` names."""
    if not node.level:
        return node.module or ""
    base = mod.split(".") if is_pkg else mod.split(".")[:-1]
    root = base[: len(base) - (node.level - 1)]
    return ".".join(root + ([node.module] if node.module else []))


class FileScan:
    """The repnet imports of one file, and its uses of private names of other repnet modules."""

    def __init__(self, path: Path, mod: str, modules: set[str], root: Path = ROOT):
        self.path, self.mod, self.root = path, mod, root
        is_pkg = path.name == "__init__.py"
        tree = ast.parse(path.read_text(), str(path))
        self.imports: set[str] = set()
        self.private: list[str] = []
        aliases: dict[str, str] = {}  # local name -> repnet module it is bound to
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    if a.name == PKG or a.name.startswith(PKG + "."):
                        self.imports.add(a.name)
                        aliases[a.asname or a.name.split(".")[0]] = a.name if a.asname else PKG
                        self._check_dotted(a.name, node.lineno)
            elif isinstance(node, ast.ImportFrom):
                target = resolve(node, mod, is_pkg) if mod else (node.module or "")
                if not (target == PKG or target.startswith(PKG + ".")):
                    continue
                if node.module:  # (`from . import loop` names the submodule, not the package)
                    self.imports.add(target)
                self._check_dotted(target, node.lineno)
                for a in node.names:
                    full = f"{target}.{a.name}"
                    if full in modules:
                        self.imports.add(full)
                        aliases[a.asname or a.name] = full
                    elif is_private(a.name) and target != mod:
                        self.private.append(f"{self.where(node.lineno)} imports {a.name} from {target}")
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and is_private(node.attr):
                owner = _dotted(node.value)
                if owner is None:
                    continue
                head, _, rest = owner.partition(".")
                if head in aliases:
                    target = aliases[head] + (f".{rest}" if rest else "")
                    if target in modules and target != mod:
                        self.private.append(f"{self.where(node.lineno)} uses {target}.{node.attr}")

    def where(self, line: int) -> str:
        return f"{self.path.relative_to(self.root)}:{line}"

    def _check_dotted(self, name: str, line: int) -> None:
        bad = [p for p in name.split(".") if is_private(p)]
        if bad:
            self.private.append(f"{self.where(line)} imports private module {name}")


def _dotted(node: ast.AST) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        inner = _dotted(node.value)
        return f"{inner}.{node.attr}" if inner else None
    return None


def scan(src: Path = SRC, clients=CLIENT_TREES, root: Path = ROOT):
    """``(graph, private uses)`` of the package under ``src`` and of the client trees under ``root``."""
    files = sorted((src / PKG).rglob("*.py"))
    modules = {module_name(p, src): p for p in files}
    names = set(modules)
    graph: dict[str, set[str]] = {}
    private: list[str] = []
    for mod, path in modules.items():
        fs = FileScan(path, mod, names, root)
        deps = set()
        for name in fs.imports:
            while name not in modules and "." in name:  # `from .x import y`: y may be a name, not a module
                name = name.rsplit(".", 1)[0]
            if name in modules and name != mod:
                deps.add(name)
        graph[mod] = deps
        private += fs.private
    for tree in clients:
        for path in sorted((root / tree).rglob("*.py")) if (root / tree).is_dir() else []:
            if path.resolve() == Path(__file__).resolve():
                continue
            private += FileScan(path, "", names, root).private
    return graph, private


def violations(graph: dict[str, set[str]]) -> tuple[list, list]:
    """``(cycles, upward imports)`` of an import graph (every module must have a floor)."""
    for m in graph:
        floor(m)
    upward = [(m, d) for m, ds in graph.items() for d in ds
              if floor(d) > floor(m) and not (m == PKG or d.startswith(m + "."))]
    cycles, state, stack = [], {}, []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(graph[m]):
            if m.startswith(d + ".") or d == PKG:  # a submodule importing its own package's __init__
                continue
            if state.get(d) == 1:
                cycles.append(stack[stack.index(d):] + [d])
            elif d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    return cycles, upward


def main() -> int:
    graph, private = scan()
    cycles, upward = violations(graph)
    for m in sorted(graph):
        print(f"{m} [{floor(m)}] -> {', '.join(sorted(graph[m])) or '-'}")
    print()
    for c in cycles:
        print("cycle: " + " -> ".join(c))
    for m, d in sorted(upward):
        print(f"upward: {m} [{floor(m)}] imports {d} [{floor(d)}]")
    for p in private:
        print(f"private: {p}")
    print(f"{len(graph)} modules; {len(cycles)} cycles; {len(upward)} upward imports; {len(private)} private names "
          "used across modules")
    return 1 if cycles or upward or private else 0


if __name__ == "__main__":
    sys.exit(main())
