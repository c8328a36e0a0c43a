"""The package's architecture holds: each layer imports only the layers below it, no module imports one that
imports it back, and every file can be read in one sitting (docs/configuration.md, "Layout")."""

import ast
from collections import defaultdict
from pathlib import Path

import locallearn

PACKAGE = Path(locallearn.__file__).parent

# Bottom to top; a module may import its own layer and the ones before it.
LAYERS = [
    ("locallearn", "locallearn.errors", "locallearn.atomic", "locallearn.config"),
    ("locallearn.model", "locallearn.data"),
    ("locallearn.analysis",),
    ("locallearn.training",),
    ("locallearn.build",),
    ("locallearn.pipeline",),
    ("locallearn.checks",),
    ("locallearn.cli", "locallearn.rundir"),
    ("locallearn.runner",),
    ("locallearn.measure", "locallearn.probing", "locallearn.evaluate", "locallearn.main", "locallearn.api",
     "locallearn.__main__"),
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def layer(module: str) -> int:
    """The layer of the longest prefix of ``module`` that LAYERS names."""
    best = max(((i, len(name)) for i, names in enumerate(LAYERS) for name in names
                if module == name or module.startswith(name + ".")), key=lambda x: x[1])
    return best[0]


def imports() -> dict[str, set[str]]:
    """Every module's imports of other package modules, at any depth of the file (lazy imports included)."""
    edges = defaultdict(set)
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("locallearn"):
                targets = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            edges[name] |= {t for t in targets if t in MODULES and t != name}
    return edges


def test_every_module_has_a_layer():
    assert all(isinstance(layer(m), int) for m in MODULES)


def test_no_layer_imports_a_layer_above_it():
    upward = sorted(f"{m} -> {t}" for m, ts in imports().items() for t in ts if layer(t) > layer(m))
    assert not upward, upward


def test_no_module_imports_one_that_imports_it_back():
    edges, state, cycles = imports(), {}, []

    def visit(module, stack):
        state[module] = "open"
        stack.append(module)
        for target in sorted(edges[module]):
            if state.get(target) == "open":
                cycles.append(" -> ".join(stack[stack.index(target):] + [target]))
            elif target not in state:
                visit(target, stack)
        stack.pop()
        state[module] = "done"

    for module in sorted(MODULES):
        if module not in state:
            visit(module, [])
    assert not cycles, cycles


def test_every_file_is_short_enough_to_read_in_one_sitting():
    lines = {name: len(path.read_text(encoding="utf-8").splitlines()) for name, path in MODULES.items()}
    long = {name: n for name, n in lines.items() if n > 300}
    assert not long, long
