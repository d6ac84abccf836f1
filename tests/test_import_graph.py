"""The house's import rules: no import circles among our modules, and `core` never imports `bots`."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("core", "bots")


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, known: set[str]) -> set[str]:
    """Modules of ours imported anywhere in the file: `if TYPE_CHECKING:` blocks and imports deferred into
    functions included, since a circle hidden in type hints or a lazy import is still a circle in the
    design."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: set[str] = set()
    for item in ast.walk(tree):
        names: list[str] = []
        if isinstance(item, ast.Import):
            names = [alias.name for alias in item.names]
        elif isinstance(item, ast.ImportFrom) and item.module and item.level == 0:
            names = [item.module] + [f"{item.module}.{alias.name}" for alias in item.names]
        found.update(name for name in names if name in known)
    return found


def _graph() -> dict[str, set[str]]:
    paths = [path for package in PACKAGES for path in (ROOT / package).rglob("*.py")]
    known = {_module_name(path) for path in paths}
    return {_module_name(path): _imports(path, known) - {_module_name(path)} for path in paths}


def test_no_import_circles() -> None:
    graph = _graph()
    circles: list[list[str]] = []
    state: dict[str, int] = {}

    def visit(module: str, trail: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph.get(module, ())):
            if target.startswith(f"{module}."):  # a package importing its own submodules
                continue
            if state.get(target) == 1:
                circles.append(
                    [*trail[trail.index(target) :], target] if target in trail else [module, target]
                )
            elif target not in state:
                visit(target, [*trail, target])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert circles == []


def test_core_never_imports_bots() -> None:
    offenders = {
        module: sorted(target for target in targets if target.startswith("bots"))
        for module, targets in _graph().items()
        if module.startswith("core")
    }
    assert {module: targets for module, targets in offenders.items() if targets} == {}
