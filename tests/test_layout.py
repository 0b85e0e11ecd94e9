"""The package's layout: no import cycles, imports only downward through the layers, no file over 400 lines.

Imports are read from the source (function-level ones included) together with modules named in strings
(importlib.import_module("basis_train..."), monkeypatch targets and the like), which a plain import scan
misses: that is how a cycle between the CLI and the experiments once hid."""

import ast
from pathlib import Path

import basis_train

ROOT = Path(basis_train.__file__).parent
MAX_LINES = 400

# cli -> experiments -> fleet -> training / reporting -> core -> data: a module imports only from its
# own layer or the ones below. The top-level helpers (fsutil, torch_floor) and the package itself sit
# with data, at the bottom: they import nothing of the package.
LAYERS = {"cli": 5, "experiments": 4, "fleet": 3, "training": 2, "reporting": 2, "core": 1, "data": 0}
BOTTOM = 0

def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _launched(tree: ast.AST) -> set[int]:
    """ids of the string constants that follow "-m" in a list: a module run as a child process
    (the grids launch `python -m basis_train.cli`), a process boundary rather than an import."""
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.List, ast.Tuple)):
            for a, b in zip(node.elts, node.elts[1:]):
                if isinstance(a, ast.Constant) and a.value == "-m" and isinstance(b, ast.Constant):
                    ids.add(id(b))
    return ids


def _string_target(text: str, known: set[str]) -> str | None:
    """The basis_train module a string names: "pkg.mod", "pkg.mod:attr" or "pkg.mod.attr"."""
    if not text.startswith("basis_train."):
        return None
    name = text.split(":")[0]
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def _imports(path: Path, known: set[str]) -> set[str]:
    found = set()
    tree = ast.parse(path.read_text())
    launched = _launched(tree)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in launched:
            names = [t] if (t := _string_target(node.value, known)) else []
        else:
            names = []
        found |= {n for n in names if n in known}
    return found


def import_graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in ROOT.rglob("*.py")}
    return {name: _imports(path, set(files)) - {name} for name, path in files.items()}


def layer_of(module: str) -> int:
    parts = module.split(".")
    return LAYERS.get(parts[1], BOTTOM) if len(parts) > 1 else BOTTOM


def upward_imports(graph: dict[str, set[str]]) -> set[tuple[str, str]]:
    return {(a, b) for a, targets in graph.items() for b in targets if layer_of(b) > layer_of(a)}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = 2
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_graph_sees_lazy_and_string_imports(tmp_path):
    src = tmp_path / "m.py"
    src.write_text("import importlib\n\ndef f():\n    from basis_train.core import model\n"
                   "    importlib.import_module('basis_train.cli.train')\n"
                   "    return ['python', '-m', 'basis_train.cli']\n")
    known = {"basis_train.core.model", "basis_train.core", "basis_train.cli.train", "basis_train.cli"}
    assert _imports(src, known) == {"basis_train.core", "basis_train.core.model", "basis_train.cli.train"}


def test_no_import_cycles():
    graph = import_graph()
    assert "basis_train.training.config" in graph["basis_train.cli.train"]  # the graph sees imports at all
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_fleet_uses_only_public_names_of_core_and_training():
    private = []
    for path in (ROOT / "fleet").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(
                    ("basis_train.core", "basis_train.training")):
                private += [f"{path.name}: {node.module}.{a.name}" for a in node.names if a.name.startswith("_")]
    assert not private, private


def test_imports_go_only_down_the_layers():
    assert layer_of("basis_train.cli.train") > layer_of("basis_train.experiments.compare") > layer_of(
        "basis_train.fleet.loop") > layer_of("basis_train.training.train") > layer_of("basis_train.core.model") > layer_of(
        "basis_train.data.corpus") == layer_of("basis_train.fsutil")
    upward = sorted(upward_imports(import_graph()))
    assert not upward, "upward imports: " + "; ".join(f"{a} -> {b}" for a, b in upward)


def test_no_file_over_400_lines():
    long = {str(p.relative_to(ROOT)): n for p in ROOT.rglob("*.py") if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"over {MAX_LINES} lines: {long}"
