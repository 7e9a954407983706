"""The package's layering, read from the source: imports point down the layer order, and no two modules import
each other (directly or round a longer loop). docs/architecture.md names every module."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "mambaout"
# bottom first; a module may import its own layer and the layers below it
LAYERS = [
    "utils",
    "kernels",
    "data",
    "weights",
    "models",
    "training",
    "inference",
    "deploy",
    "dense",
    "analysis",
    "cli",
]


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(("mambaout", *parts)).removesuffix(".__init__")


def _imports(path: Path) -> set[str]:
    """Every mambaout module `path` imports, at module level or inside a function."""
    mod = _module_name(path)
    pkg = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(pkg.split(".")[: len(pkg.split(".")) - node.level + 1] + ([base] if base else []))
            if base.startswith("mambaout"):
                for alias in node.names:  # `from mambaout.data import image` imports a module, not a name
                    sub = f"{base}.{alias.name}"
                    found.add(sub if _exists(sub) else base)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("mambaout")}
    found.discard(mod)
    return found


def _exists(mod: str) -> bool:
    rel = Path(*mod.split(".")[1:])
    return (SRC / rel).with_suffix(".py").is_file() or (SRC / rel / "__init__.py").is_file()


def _layer(mod: str) -> int | None:
    parts = mod.split(".")
    if len(parts) == 1:
        return LAYERS.index("cli")  # the package root re-exports the public API: only the CLI imports it
    return LAYERS.index(parts[1]) if parts[1] in LAYERS else None


MODULES = {_module_name(p): p for p in sorted(SRC.rglob("*.py"))}
GRAPH = {m: _imports(p) for m, p in MODULES.items()}


def test_every_module_sits_in_a_layer():
    loose = [m for m in MODULES if _layer(m) is None and m not in ("mambaout.__main__",)]
    assert not loose, f"modules outside the layer folders {LAYERS}: {loose}"


@pytest.mark.parametrize("mod", sorted(MODULES))
def test_imports_point_down(mod):
    here = _layer(mod)
    if here is None:
        return
    up = sorted(t for t in GRAPH[mod] if (_layer(t) or 0) > here)
    assert not up, f"{mod} (layer {LAYERS[here] if here < len(LAYERS) else 'root'}) imports upward: {up}"


def test_no_import_cycles():
    # Tarjan's strongly connected components over every import, lazy ones included: a component of more than one
    # module is a cycle.
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in GRAPH.get(v, ()):
            if w not in GRAPH:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in GRAPH:
        if v not in index:
            visit(v)
    # a package's __init__ re-exporting its own modules is not a cycle unless a module imports the __init__ back
    assert not cycles, f"import cycles: {cycles}"


def test_lowest_layer_holds_no_command_line_code():
    for mod, path in MODULES.items():
        if _layer(mod) in (0, 1):  # utils, kernels
            tree = ast.parse(path.read_text())
            names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import | ast.ImportFrom) for a in n.names}
            mods = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
            assert "argparse" not in names | mods, f"{mod} imports argparse: command-line code belongs in mambaout.cli"


def test_architecture_doc_names_every_module():
    doc = (SRC.parents[1] / "docs" / "architecture.md").read_text()
    rows = {line.split("`")[1] for line in doc.splitlines() if line.startswith("| `")}
    missing = [str(p.relative_to(SRC)) for p in MODULES.values() if str(p.relative_to(SRC)) not in rows]
    assert not missing, f"docs/architecture.md does not name: {missing}"


def test_no_function_is_longer_than_100_lines():
    # A longer function does several things; split it where they part (docstring and decorators count).
    long = []
    for path in sorted(SRC.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                start = min([node.lineno, *(d.lineno for d in node.decorator_list)])
                if node.end_lineno - start + 1 > 100:
                    long.append(f"{path.relative_to(SRC)}:{node.lineno} {node.name} ({node.end_lineno - start + 1})")
    assert not long, "functions over 100 lines: " + ", ".join(long)
