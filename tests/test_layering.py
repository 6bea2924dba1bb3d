"""The package's import graph, read from the source (every import: top level, inside functions, under
TYPE_CHECKING): no module circle, and each folder imports only the layers below it."""
from __future__ import annotations

import ast
from pathlib import Path

from tests.support import ROOT

PACKAGE = ROOT / "glm_tp"

# config at the bottom; kernels <- parallel <- model <- checkpoints; text <- engine (which runs the model)
# <- frontends <- server; cli on top. "glm_tp" is the package's own __init__ (the public names).
_MODEL = {"config", "kernels", "parallel", "model"}
_ENGINE = _MODEL | {"text", "engine"}
ALLOWED: dict[str, set[str]] = {
    "config": set(),
    "kernels": {"config"},
    "parallel": {"config", "kernels"},
    "model": {"config", "kernels", "parallel"},
    "checkpoints": _MODEL,
    "text": {"config"},
    "engine": _MODEL | {"text"},
    "frontends": _ENGINE,
    "server": _ENGINE | {"frontends"},
    "dev": _MODEL | {"checkpoints", "text"},
    "glm_tp": _MODEL | {"checkpoints"},
    "generate": {"cli"},  # the `python -m glm_tp.generate` entry point
}
ONLY_FROM_CLI = ("cli", "dev")


def module_names() -> dict[str, Path]:
    names = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


def _imported(module: str, path: Path, node: ast.AST, names: dict[str, Path]) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if not isinstance(node, ast.ImportFrom):
        return []
    base = node.module or ""
    if node.level:  # relative: from the module's package, one level up per extra dot
        package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
        base = ".".join(package[:len(package) - node.level + 1] + ([base] if base else []))
    # `from pkg import mod` imports the module; `from mod import name` the module holding the name
    return [f"{base}.{alias.name}" if f"{base}.{alias.name}" in names else base for alias in node.names]


def import_graph() -> dict[str, set[str]]:
    """module -> the glm_tp modules it imports (a package's __init__ only when it is named itself)."""
    names = module_names()
    graph = {}
    for module, path in names.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            found.update(n for n in _imported(module, path, node, names) if n in names and n != module)
        graph[module] = found
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as a path (first module repeated at the end), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start)):
            return found
    return None


def layer(module: str) -> str:
    """A module's folder under glm_tp (a top-level module is its own layer; the package itself "glm_tp")."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "glm_tp"


def test_the_graph_reader_sees_lazy_and_type_checking_imports():
    graph = import_graph()
    assert "glm_tp.kernels.cpu" in graph["glm_tp.kernels.quant"]  # inside a function (numba is optional)
    assert "glm_tp.config" in graph["glm_tp.kernels.quant"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_module_imports_itself_in_a_circle():
    assert find_cycle(import_graph()) is None


def test_each_folder_imports_only_the_layers_below_it():
    wrong = sorted(f"{a} -> {b}" for a, targets in import_graph().items() for b in targets
                   if layer(a) != layer(b) and layer(a) != "cli" and layer(b) not in ALLOWED[layer(a)])
    assert wrong == []


def test_only_the_command_line_imports_cli_and_dev():
    wrong = sorted(f"{a} -> {b}" for a, targets in import_graph().items() for b in targets
                   if layer(b) in ONLY_FROM_CLI and layer(a) not in ("cli", "generate") and layer(a) != layer(b))
    assert wrong == []


def test_kernels_cpu_and_formats_are_leaves():
    graph = import_graph()
    assert graph["glm_tp.kernels.formats"] == set()
    assert graph["glm_tp.kernels.cpu"] == {"glm_tp.kernels.formats"}
