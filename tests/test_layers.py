"""The package's imports flow one way (docs/architecture.md): read from the source, function-level
imports included, so a lazy import cannot hide a circle."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "ablate"
RUN_LOOP = {"ablate.grid", "ablate.workers", "ablate.rounds", "ablate.search", "ablate.scheduling",
            "ablate.runner", "ablate.engine"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """{module: the ablate modules it imports anywhere in its source}."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("ablate"):
                # `from ablate import grid` imports the module ablate.grid; `from ablate.grid import x` the module
                found |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                          for a in node.names}
            elif isinstance(node, ast.Import):
                found |= {a.name for a in node.names if a.name.startswith("ablate")}
        graph[name] = {m for m in found if m in modules and m != name}
    return graph


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph[todo.pop()] - seen:
            seen.add(nxt)
            todo.append(nxt)
    return seen


def test_the_graph_reader_sees_lazy_imports_and_the_known_edges():
    graph = import_graph()
    assert "ablate.tracking" in graph["ablate.grid"]
    assert "ablate.scheduling" in graph["ablate.workers"]
    assert "ablate.grid_summary" in graph["ablate.workers"]  # imported inside close_parent_if_over


def test_no_module_reaches_itself():
    graph = import_graph()
    circles = sorted(name for name in graph if name in reachable(graph, name))
    assert circles == []


def test_nothing_under_report_imports_the_run_loop():
    graph = import_graph()
    for name in graph:
        if name.startswith("ablate.report"):
            assert reachable(graph, name) & RUN_LOOP == set(), name


def test_the_adaptive_rule_and_the_findings_are_pure():
    """The stopping rule and what it decides run without a store or a worker: the loop is ablate.rounds."""
    graph = import_graph()
    for name in ("ablate.adaptive", "ablate.sequential", "ablate.family", "ablate.findings", "ablate.budgets"):
        assert reachable(graph, name) & (RUN_LOOP | {"ablate.tracking", "ablate.rounds"}) == set(), name


def test_search_is_apart_from_the_grid_queue_loop():
    graph = import_graph()
    assert "ablate.search" not in reachable(graph, "ablate.grid")
    assert "ablate.grid" not in reachable(graph, "ablate.workers")


# The same job for each data format (its files located, its class names listed): one name per job.
SAME_JOB_PER_FORMAT = {"locate", "class_names"}


def test_no_two_modules_define_a_public_name_for_different_things():
    """A class or function name is defined in one module of the package (issue 23: two `Verdict`
    classes, two `evaluate`, two `format_value` had to be told apart by their module)."""
    where: dict[str, list[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and not node.name.startswith("_"):
                where.setdefault(node.name, []).append(module_name(path))
    twice = {name: modules for name, modules in where.items() if len(modules) > 1 and name not in SAME_JOB_PER_FORMAT}
    assert not twice, twice
    assert sorted(where["locate"]) == ["ablate.data.coco", "ablate.data.voc"]
