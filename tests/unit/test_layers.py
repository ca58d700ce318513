"""The layers, read from the source: the Ray-free core (``legion/``) never imports the Ray
shells (``actors``), the HTTP layer (``serve_app``) or the command (``legion_cli``), and no
first-party module takes part in an import circle."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("legion", "actors", "legion_cli")
MODULES = ("serve_app",)
UPPER = ("actors", "serve_app", "legion_cli")


def _modules() -> dict[str, Path]:
    found = {m: ROOT / f"{m}.py" for m in MODULES}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


def _resolve(name: str, known: dict[str, Path]) -> str | None:
    # The longest first-party module that ``name`` names (``legion.x.y`` may be a function y of x).
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def _imports(module: str, path: Path, known: dict[str, Path], top_level: bool) -> set[str]:
    """First-party modules ``module`` imports: all of them, or only those run at import time
    (outside functions and ``if TYPE_CHECKING`` blocks)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if top_level and isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
                continue
            if top_level and isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            if isinstance(child, ast.Import):
                for alias in child.names:
                    if (target := _resolve(alias.name, known)) is not None:
                        out.add(target)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = package.split(".")
                    anchor = anchor[: len(anchor) - (child.level - 1)]
                    base = ".".join([*anchor, base] if base else anchor)
                for alias in child.names:
                    target = _resolve(f"{base}.{alias.name}", known) or _resolve(base, known)
                    if target is not None:
                        out.add(target)
            visit(child)

    visit(tree)
    out.discard(module)
    return out


def test_the_core_never_imports_the_layers_above_it():
    known = _modules()
    wrong = [
        f"{name} imports {target}"
        for name, path in known.items()
        if name.split(".")[0] == "legion"
        for target in _imports(name, path, known, top_level=False)
        if target.split(".")[0] in UPPER
    ]
    assert wrong == []


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def walk(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (found := walk(nxt)) is not None:
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := walk(node)) is not None:
            return found
    return None


def test_no_import_circle():
    known = _modules()
    graph = {name: _imports(name, path, known, top_level=True) for name, path in known.items()}
    assert _cycle(graph) is None, " -> ".join(_cycle(graph) or [])


def test_the_circle_finder_finds_circles():
    # The checker itself: a circle through three modules is found, a tree is not.
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None
