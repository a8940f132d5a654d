"""The import layers (DESIGN: 'a check in CI keeps it so'), read from the source's AST:

- media/ imports nothing of bridge/ or carriers/;
- a carrier imports carriers/*, media/ and, of the application, only the shared call model
  (bridge.calls) and bridge.tasks; bridge.config only for type annotations (under TYPE_CHECKING);
- the application (bridge/) reaches carriers only through the interface, the registry and the
  settings base (carriers.base, carriers.registry, carriers.settings).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# package -> the layers it is restricted in -> (modules allowed at run time, allowed under TYPE_CHECKING)
RULES: dict[str, dict[str, tuple[set[str], set[str]]]] = {
    "media": {"bridge": (set(), set()), "carriers": (set(), set())},
    "carriers": {"bridge": ({"bridge.calls", "bridge.tasks"}, {"bridge.config"})},
    "bridge": {"carriers": ({"carriers.base", "carriers.registry", "carriers.settings"}, set())},
}
LAYERS = ("bridge", "carriers", "media")


def _imports(tree: ast.AST) -> Iterator[tuple[str, int, bool]]:
    """(module, line, under TYPE_CHECKING) for every absolute import in the module."""

    def walk(node: ast.AST, typing_only: bool) -> Iterator[tuple[str, int, bool]]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                for stmt in child.body:
                    yield from walk_stmt(stmt, True)
                for stmt in child.orelse:
                    yield from walk_stmt(stmt, typing_only)
            else:
                yield from walk_stmt(child, typing_only)

    def walk_stmt(node: ast.AST, typing_only: bool) -> Iterator[tuple[str, int, bool]]:
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno, typing_only
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module in LAYERS:  # `from bridge import calls` names the module
                for alias in node.names:
                    yield f"{node.module}.{alias.name}", node.lineno, typing_only
            else:
                yield node.module, node.lineno, typing_only
        if not isinstance(node, ast.If) or "TYPE_CHECKING" not in ast.unparse(node.test):
            yield from walk(node, typing_only)

    yield from walk(tree, False)


def _allowed(module: str, allowed: set[str]) -> bool:
    return any(module == a or module.startswith(a + ".") for a in allowed)


def violations(package: str) -> list[str]:
    rules = RULES[package]
    found = []
    for path in sorted((ROOT / package).rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        for module, line, under_type_checking in _imports(tree):
            top = module.split(".")[0]
            if top not in rules:
                continue
            runtime, typing_only = rules[top]
            if _allowed(module, runtime) or (under_type_checking and _allowed(module, typing_only)):
                continue
            found.append(f"{path.relative_to(ROOT)}:{line}: {package} must not import {module}")
    return found


def test_media_imports_nothing_of_bridge_or_carriers() -> None:
    assert violations("media") == []


def test_carriers_import_only_the_shared_call_model_of_the_application() -> None:
    assert violations("carriers") == []


def test_the_application_reaches_carriers_only_through_base_registry_and_settings() -> None:
    assert violations("bridge") == []


def test_the_check_sees_a_violation(tmp_path: Path) -> None:
    """The walker finds imports at any depth and tells TYPE_CHECKING ones apart."""
    source = ("from typing import TYPE_CHECKING\nfrom bridge.calls import CallRecord\n"
              "if TYPE_CHECKING:\n    from bridge.config import Settings\n"
              "def f():\n    from bridge.manager import CallManager\n    import media.clock\n")
    found = {(m, typing_only) for m, _, typing_only in _imports(ast.parse(source))}
    assert ("bridge.manager", False) in found and ("media.clock", False) in found
    assert ("bridge.config", True) in found and ("bridge.calls", False) in found
    runtime, _ = RULES["carriers"]["bridge"]
    assert not _allowed("bridge.manager", runtime) and _allowed("bridge.calls.x", runtime)


# Modules kept pure (sans-I/O): only these imports, at run time or under TYPE_CHECKING.
PURE: dict[str, set[str]] = {
    "bridge/inbound_policy.py": {"__future__", "collections.abc"},
}


def test_pure_modules_import_nothing_with_io() -> None:
    found = []
    for rel, allowed in PURE.items():
        tree = ast.parse((ROOT / rel).read_text(encoding="utf-8"), rel)
        found += [f"{rel}:{line}: imports {module}" for module, line, _ in _imports(tree)
                  if not _allowed(module, allowed)]
    assert found == []


def test_the_manager_parts_stay_small() -> None:
    """The manager is a façade over parts with one job each (bridge/manager.py lists them)."""
    parts = ["manager", "manager_core", "carrier_host", "call_api", "turns", "answering", "lifecycle", "recovery",
             "fanout", "inbound_policy"]
    sizes = {p: len((ROOT / "bridge" / f"{p}.py").read_text(encoding="utf-8").splitlines()) for p in parts}
    assert max(sizes.values()) <= 400, sizes
