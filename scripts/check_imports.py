"""Print repnet's import graph and fail on a cycle or an upward import.

Every ``import`` / ``from ... import`` in ``src/repnet`` counts, at module level or inside a
function. A module's layer is the first entry of ``LAYERS`` its dotted name starts with (lower =
more basic); a module may import only modules of its own layer or lower ones. Exit status 1 on
any cycle or upward import, 0 otherwise.

    python scripts/check_imports.py            # the graph, then the verdict
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PKG = "repnet"

#: (prefix, layer): foundations at 0, then backbones / data, the memory ops, methods, the model
#: builder, the training core, the workflows on top of it, and the command line.
LAYERS = [
    ("repnet.errors", 0), ("repnet.registry", 0), ("repnet.storage", 0), ("repnet.keyvalue", 0),
    ("repnet.backbones", 1), ("repnet.data", 1),
    ("repnet.memory", 2), ("repnet.int8", 2),
    ("repnet.methods", 3),
    ("repnet.api", 4), ("repnet.tinytl_reference", 5),
    ("repnet.config", 5), ("repnet.loop", 5), ("repnet.executorch_training", 5), ("repnet.executorch_passes", 5),
    ("repnet.executorch_kernels", 5),
    ("repnet.plots", 5), ("repnet.profiling", 5),
    ("repnet.training", 6), ("repnet.export", 6), ("repnet.hyblearn", 6), ("repnet.fedcore", 6),
    ("repnet.planner", 6),
    ("repnet.continual", 7), ("repnet.flower_app", 7), ("repnet.reproduce", 7),
    ("repnet.federated", 8), ("repnet.demo", 8),
    ("repnet.commands", 9), ("repnet.cli", 9),
    ("repnet", 10),  # the package's __init__: re-exports
]


def layer(mod: str) -> int:
    for prefix, n in LAYERS:
        if mod == prefix or mod.startswith(prefix + "."):
            return n
    raise SystemExit(f"check_imports: module {mod} has no layer in LAYERS")


def module_name(path: Path) -> str:
    rel = path.relative_to(SRC).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports_of(path: Path, mod: str) -> set[str]:
    is_pkg = path.name == "__init__.py"
    base = mod.split(".") if is_pkg else mod.split(".")[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                root = base[: len(base) - (node.level - 1)]
                target = ".".join(root + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            # `from . import loop` names the submodule, not the package
            names = ([target] if node.module else []) + [f"{target}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            if name == PKG or name.startswith(PKG + "."):
                found.add(name)
    return found


def main() -> int:
    files = sorted((SRC / PKG).rglob("*.py"))
    modules = {module_name(p): p for p in files}
    graph: dict[str, set[str]] = {}
    for mod, path in modules.items():
        deps = set()
        for name in imports_of(path, mod):
            while name not in modules and "." in name:  # `from .x import y`: y may be a name, not a module
                name = name.rsplit(".", 1)[0]
            if name in modules and name != mod:
                deps.add(name)
        graph[mod] = deps
    upward = [(m, d) for m, ds in graph.items() for d in ds
              if layer(d) > layer(m) and not (m == PKG or d.startswith(m + "."))]
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
    for m in sorted(graph):
        print(f"{m} [{layer(m)}] -> {', '.join(sorted(graph[m])) or '-'}")
    print(f"\n{len(graph)} modules; {len(cycles)} cycles; {len(upward)} upward imports")
    for c in cycles:
        print("cycle: " + " -> ".join(c))
    for m, d in sorted(upward):
        print(f"upward: {m} [{layer(m)}] imports {d} [{layer(d)}]")
    return 1 if cycles or upward else 0


if __name__ == "__main__":
    sys.exit(main())
