"""The service's import graph: no cycles between its modules or its subpackages, and each subpackage
imports only the rooms below it.

Every import counts, function-level ones included: a function-level import hides a cycle from Python's
import machinery, not from the design. Modules are read with ``ast`` (nothing is imported).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator, Mapping
from pathlib import Path

SERVICE = Path(__file__).resolve().parents[2] / "service"

# The rooms, lowest first, and what each may import. A top-level module is a room of its own.
CORE = {"settings", "job_status", "versions", "formatting"}
ALLOWED: dict[str, set[str]] = {
    **{module: set() for module in CORE},
    "sandbox": CORE,
    "store": CORE | {"sandbox"},
    "inspection": CORE | {"sandbox"},
    "jobs": CORE | {"sandbox", "store", "inspection"},
    "api": CORE | {"sandbox", "store", "inspection"},
    "dashboard": CORE | {"store", "api"},
    "app": CORE | {"sandbox", "store", "inspection", "jobs", "api", "dashboard"},
    "cli": CORE | {"sandbox", "store", "inspection", "jobs", "api", "dashboard", "app"},
}


def module_names() -> dict[str, Path]:
    """service.x.y -> its file, for every module of the package."""
    names = {}
    for path in SERVICE.rglob("*.py"):
        parts = path.relative_to(SERVICE.parent).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


def imported(tree: ast.AST, modules: Mapping[str, Path]) -> Iterator[str]:
    """The service modules a module imports, at any depth of its code."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # ``from service.x import y``: y is a module of its own, or a name in service.x
            candidates = [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in candidates:
            while name not in modules and "." in name:
                name = name.rsplit(".", 1)[0]
            if name in modules and name != "service":
                yield name


def _ancestors(module: str) -> set[str]:
    """A module's packages: imported before it, whatever it imports (no edge of the design)."""
    parts = module.split(".")
    return {".".join(parts[:end]) for end in range(1, len(parts))}


def import_graph() -> dict[str, set[str]]:
    modules = module_names()
    return {
        name: set(imported(ast.parse(path.read_text(), str(path)), modules)) - {name} - _ancestors(name)
        for name, path in modules.items()
    }


def room(module: str) -> str:
    """service.jobs.executor -> jobs; service.settings -> settings; service -> service."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def room_graph(graph: Mapping[str, set[str]]) -> dict[str, set[str]]:
    rooms: dict[str, set[str]] = {}
    for module, targets in graph.items():
        rooms.setdefault(room(module), set()).update(room(target) for target in targets if room(target) != room(module))
    return rooms


def find_cycle(graph: Mapping[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as [a, b, ..., a], or None."""
    state: dict[str, str] = {}
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "open":
                return [*path[path.index(target) :], target]
            if target not in state and (cycle := visit(target)) is not None:
                return cycle
        state[node] = "done"
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)) is not None:
            return cycle
    return None


def test_the_graph_sees_function_level_imports():
    """The reader itself: a function-level import is an edge."""
    tree = ast.parse("def f():\n    from service.jobs import executor\n    import service.store.db\n")
    modules = {name: Path() for name in ("service.jobs", "service.jobs.executor", "service.store", "service.store.db")}
    assert set(imported(tree, modules)) == {"service.jobs.executor", "service.store.db"}
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_module_imports_itself_back():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_no_cycle_between_rooms():
    cycle = find_cycle(room_graph(import_graph()))
    assert cycle is None, "cycle between subpackages: " + " -> ".join(cycle or [])


def test_each_room_imports_only_the_rooms_below_it():
    graph = import_graph()
    rooms = room_graph(graph)
    assert set(rooms) - {"service"} <= set(ALLOWED), f"rooms without a place in ALLOWED: {set(rooms) - set(ALLOWED)}"
    wrong = {
        f"{module} imports {target}"
        for module, targets in graph.items()
        for target in targets
        if room(target) != room(module) and room(target) not in ALLOWED.get(room(module), set())
    }
    assert not wrong, sorted(wrong)


# Outside the store, sqlalchemy appears only for what is not a query: these and no more.
SQLALCHEMY_OUTSIDE_THE_STORE = {
    "service.api.errors",  # DataError (a NUL byte PostgreSQL cannot store) answered 422
    "service.cli.commands",  # make_url, to print a database URL without its password
}


def test_only_the_store_layer_queries_the_database():
    """ORM queries go through service.store (SqlStore): no other module imports sqlalchemy to build them."""
    users = set()
    for name, path in module_names().items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            modules = (
                [alias.name for alias in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            if any(module.split(".")[0] == "sqlalchemy" for module in modules):
                users.add(name)
    assert {name for name in users if room(name) != "store"} == SQLALCHEMY_OUTSIDE_THE_STORE


def test_the_store_never_reaches_up():
    """The store serves the API, the dashboard, the jobs and the CLI; it imports none of them."""
    assert not room_graph(import_graph())["store"] & {"api", "dashboard", "cli", "jobs", "app"}
