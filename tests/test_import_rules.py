"""Who may import whom: the floors of the house, read from the package's own import statements.

The ground floor (`harness/common`) is spoken by every stage and imports none; the child (`harness/cell`) imports
only the ground floor, the zoo and the engine adapter; planning (`harness/plan`) never reaches into the run or the
analysis; only the policies and the child talk to the engine adapter; and no two packages import each other,
however far round. Imports are read with `ast`, function-level and `TYPE_CHECKING` ones included, so a lazy
import counts like any other. (Which modules may pull in torch is tests/test_contract.py's rule.)
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "harness"

GROUND = "common"
ROOT = "harness"  # the package itself: REPO, nothing else
STAGES = ("policy", "plan", "run", "cell", "analyze")

KNOWN_EXCEPTIONS: dict[tuple[str, str], str] = {}
"""Imports that break a rule below, each with why it is still there: the test fails once one is gone, so the
list cannot outlive its reason."""


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """The harness modules `path` imports, anywhere in the file (a relative import resolved against it)."""
    out: set[str] = set()
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            out.add(base)
            out.update(f"{base}.{a.name}" for a in node.names)  # `from harness import cli` imports a module
    return {m for m in out if m == ROOT or m.startswith(f"{ROOT}.")}


MODULES = {_module_name(p) for p in PACKAGE.rglob("*.py")}
EDGES = {(_module_name(p), m) for p in sorted(PACKAGE.rglob("*.py")) for m in _imports(p) if m in MODULES}


def _room(module: str) -> str:
    """The package (or top-level module) a module belongs to: harness.plan.scenario -> plan, harness.cli -> cli."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ROOT


def _broken(rule) -> list[str]:
    return sorted(f"{a} -> {b}" for a, b in EDGES if (a, b) not in KNOWN_EXCEPTIONS and rule(_room(a), _room(b)))


def test_the_rules_read_the_whole_package() -> None:
    assert {"harness.common.contract", "harness.policy", "harness.cell.worker"} <= MODULES
    assert ("harness.cell.worker", "harness.common.contract") in EDGES
    assert ("harness.common.records", "harness.common.contract") in EDGES


def test_the_ground_floor_imports_no_stage() -> None:
    assert not _broken(lambda a, b: a == GROUND and b not in (GROUND, ROOT))


def test_the_child_imports_only_the_ground_floor_the_zoo_and_the_engine_adapter() -> None:
    assert not _broken(lambda a, b: a == "cell" and b not in ("cell", GROUND, ROOT, "models", "engine"))


def test_planning_imports_neither_the_run_nor_the_analysis() -> None:
    assert not _broken(lambda a, b: a == "plan" and b in ("run", "analyze"))


def test_only_the_policies_and_the_child_talk_to_the_engine_adapter() -> None:
    assert not _broken(lambda a, b: b == "engine" and a not in ("engine", "policy", "cell"))


def test_the_engine_adapter_and_the_zoo_import_no_stage() -> None:
    assert not _broken(lambda a, b: a in ("engine", "models") and b in STAGES)


def test_no_two_packages_import_each_other() -> None:
    """No circle of packages, however long: each strongly connected group of rooms is one room."""
    graph: dict[str, set[str]] = {}
    for a, b in EDGES:
        if (a, b) not in KNOWN_EXCEPTIONS and _room(a) != _room(b):
            graph.setdefault(_room(a), set()).add(_room(b))

    def reaches(start: str, goal: str) -> bool:
        seen, todo = set(), [start]
        while todo:
            for nxt in graph.get(todo.pop(), ()):
                if nxt == goal:
                    return True
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return False

    circles = sorted(f"{a} -> {b} -> ... -> {a}" for a in graph for b in graph[a] if reaches(b, a))
    assert not circles, circles


def test_every_known_exception_is_still_there() -> None:
    assert set(KNOWN_EXCEPTIONS) <= EDGES, "drop the exceptions the code no longer needs"



SCENARIO = "harness.plan.scenario"
SCENARIO_LAYERS = ("types", "fields", "cells", "expect", "read", "discover")
"""harness.plan.scenario's modules, each importing only those before it (the package's docstring): no circle."""


def _scenario_layer(module: str) -> int:
    """A module's place in SCENARIO_LAYERS; the package itself (its re-exports) comes after them all."""
    return len(SCENARIO_LAYERS) if module == SCENARIO else SCENARIO_LAYERS.index(module.removeprefix(f"{SCENARIO}."))


def test_the_scenario_modules_import_only_those_above_them() -> None:
    assert {f"{SCENARIO}.{m}" for m in SCENARIO_LAYERS} == {m for m in MODULES if m.startswith(f"{SCENARIO}.")}
    inside = [(a, b) for a, b in EDGES if a.startswith(f"{SCENARIO}.") and b.startswith(SCENARIO)]
    assert ("harness.plan.scenario.read", "harness.plan.scenario.expect") in inside
    upward = sorted(f"{a} -> {b}" for a, b in inside if _scenario_layer(b) >= _scenario_layer(a))
    assert not upward, upward
