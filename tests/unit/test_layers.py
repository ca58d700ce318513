"""The architecture's guard, read from the source: every first-party module belongs to one layer,
imports only the layers its own may use (``ALLOWED``), and takes part in no import circle.
Imports inside functions and ``if TYPE_CHECKING`` blocks count like the others: a circle through
a function-level import is still a circle, only a later one.

The direction, bottom to top (docs/architecture.md draws it)::

    ground (legion/*.py) <- engine <- state, arbitration, agent <- service <- actors, serve_app
                                                                  <- evaluation <- legion_cli
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("legion", "actors", "legion_cli")
MODULES = ("serve_app",)

# The shared ground: the modules directly in legion/ that every layer may use. A new module there
# has to be placed here on purpose (the test fails until it is).
GROUND = frozenset(
    {
        "legion",
        "legion.config",
        "legion.errors",
        "legion.messages",
        "legion.db",
        "legion.metrics",
        "legion.logging_setup",
        "legion.streaming",
        "legion.keys",
        "legion.profile",
        "legion.chat_formats",
        "legion.progress",
    }
)
SUBPACKAGES = ("engine", "state", "arbitration", "service", "evaluation")
SERVING = frozenset({"ground", "engine", "state", "arbitration", "agent", "service"})
ALLOWED: dict[str, frozenset[str]] = {
    "ground": frozenset({"ground"}),
    "engine": frozenset({"ground", "engine"}),
    "state": frozenset({"ground", "engine", "state"}),
    "arbitration": frozenset({"ground", "engine", "arbitration"}),
    "agent": frozenset({"ground", "engine", "agent"}),
    "service": frozenset({"ground", "engine", "state", "arbitration", "service"}),
    "evaluation": SERVING | {"evaluation"},
    # The Ray shells and the ingress serve: they never load the eval harness.
    "actors": SERVING | {"actors"},
    "serve_app": SERVING | {"actors", "serve_app"},
    "legion_cli": SERVING | {"evaluation", "actors", "serve_app", "legion_cli"},
}


def layer(module: str) -> str | None:
    """The layer ``module`` belongs to, or ``None`` for a module in legion/ no layer claims."""
    parts = module.split(".")
    if parts[0] != "legion":
        return parts[0]
    if module in GROUND:
        return "ground"
    if module == "legion.agent":
        return "agent"
    if len(parts) > 1 and parts[1] in SUBPACKAGES:
        return parts[1]
    return None


def modules(root: Path = ROOT) -> dict[str, Path]:
    found = {m: root / f"{m}.py" for m in MODULES if (root / f"{m}.py").exists()}
    for pkg in PACKAGES:
        for path in (root / pkg).rglob("*.py"):
            parts = path.relative_to(root).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


def _resolve(name: str, known: dict[str, Path]) -> str | None:
    # The longest first-party module that ``name`` names (``legion.x.y`` may be a function y of x).
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def imports(module: str, path: Path, known: dict[str, Path]) -> set[str]:
    """Every first-party module ``module`` imports, wherever the import statement stands."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if (target := _resolve(alias.name, known)) is not None:
                    out.add(target)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                target = _resolve(f"{base}.{alias.name}", known) or _resolve(base, known)
                if target is not None:
                    out.add(target)
    out.discard(module)
    return out


def graph(root: Path = ROOT) -> dict[str, set[str]]:
    known = modules(root)
    return {name: imports(name, path, known) for name, path in known.items()}


def violations(g: dict[str, set[str]]) -> list[str]:
    """Each import against the allowed direction, and each module no layer claims."""
    out = [f"{m} is in no layer: put it in a subpackage or add it to GROUND" for m in g if layer(m) is None]
    for m, targets in sorted(g.items()):
        own = layer(m)
        if own is None:
            continue
        for t in sorted(targets):
            if (theirs := layer(t)) is not None and theirs not in ALLOWED[own]:
                out.append(f"{m} ({own}) imports {t} ({theirs}); {own} may import {sorted(ALLOWED[own])}")
    return out


def cycle(g: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def walk(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(g.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (found := walk(nxt)) is not None:
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(g):
        if node not in state and (found := walk(node)) is not None:
            return found
    return None


# ------------------------------------------------------------------------------- the tree


def test_every_import_follows_the_allowed_direction():
    assert violations(graph()) == []


def test_no_import_circle_function_level_imports_included():
    g = graph()
    assert cycle(g) is None, " -> ".join(cycle(g) or [])


def test_every_layer_has_modules():
    # A layer that lost all its modules (or a typo in SUBPACKAGES) would make the guard vacuous.
    seen = {layer(m) for m in graph()}
    assert set(ALLOWED) <= seen


def _fresh_interpreter_modules(code: str) -> list[str]:
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300, check=True
    )
    return out.stdout.split()


def test_loading_the_arbitration_layer_loads_nothing_of_evaluation():
    # Every module of legion.arbitration (the Arbiter, every strategy), in a fresh interpreter.
    code = textwrap.dedent(
        """
        import importlib, pkgutil, sys
        import legion.arbitration as pkg
        for info in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
            importlib.import_module(info.name)
        from legion.arbitration.strategies import build_strategy, strategy_names
        print("loaded:" + ",".join(sorted(m for m in sys.modules if m.startswith("legion.arbitration"))))
        print(*sorted(m for m in sys.modules if m.startswith("legion.evaluation")))
        """
    )
    out = _fresh_interpreter_modules(code)
    loaded = out[0].removeprefix("loaded:").split(",")
    assert "legion.arbitration.arbiter" in loaded and "legion.arbitration.strategies.learned" in loaded
    assert out[1:] == []


def test_loading_the_serving_path_loads_nothing_of_evaluation():
    # What an agent actor and the ingress's pipeline load (Ray-free modules; serve_app needs Ray).
    code = textwrap.dedent(
        """
        import sys
        import legion.agent, legion.service.pipeline, legion.service.http, legion.service.completions
        import legion.state.vectorstore, legion.state.ingest, legion.config
        print("loaded")
        print(*sorted(m for m in sys.modules if m.startswith("legion.evaluation")))
        """
    )
    assert _fresh_interpreter_modules(code) == ["loaded"]


# ---------------------------------------------------------------------------- the checker


def _copy_tree(tmp_path: Path) -> Path:
    root = tmp_path / "tree"
    for pkg in PACKAGES:
        shutil.copytree(ROOT / pkg, root / pkg, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for m in MODULES:
        shutil.copy(ROOT / f"{m}.py", root / f"{m}.py")
    return root


def test_the_checker_finds_an_upward_import_even_inside_a_function(tmp_path):
    root = _copy_tree(tmp_path)
    assert violations(graph(root)) == []
    trust = root / "legion" / "arbitration" / "trust.py"
    trust.write_text(
        trust.read_text()
        + "\n\ndef _later():\n    from legion.evaluation.calibrate import fit\n\n    return fit\n"
    )
    found = violations(graph(root))
    assert found == [
        "legion.arbitration.trust (arbitration) imports legion.evaluation.calibrate (evaluation); "
        f"arbitration may import {sorted(ALLOWED['arbitration'])}"
    ]


def test_the_checker_finds_a_circle_through_a_function_level_import(tmp_path):
    root = _copy_tree(tmp_path)
    errors = root / "legion" / "errors.py"
    errors.write_text(errors.read_text() + "\n\ndef _later():\n    import legion.config\n")
    found = cycle(graph(root))
    assert found is not None and found[0] == found[-1] and {"legion.config", "legion.errors"} <= set(found)


def test_the_checker_places_every_module():
    assert layer("legion.engine.llama") == "engine" and layer("legion.config") == "ground"
    assert layer("legion.agent") == "agent" and layer("legion.surprise") is None
    assert violations({"legion.surprise": set()}) == [
        "legion.surprise is in no layer: put it in a subpackage or add it to GROUND"
    ]


def test_the_circle_finder_finds_circles():
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None
