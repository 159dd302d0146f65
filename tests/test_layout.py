"""The layout of the tests: test modules never import each other or a conftest.py.

Shared fixtures live in the nearest common conftest.py, where pytest finds them without an import;
shared plain code (model builders, exact-Hessian helpers, request helpers, constants) lives in helper
modules that are not test modules: tests/models.py, tests/payloads.py, tests/pt2_archives.py,
tests/values.py, tests/<area>/helpers.py... bench/ reuses those helpers under the same rule.
"""

from __future__ import annotations

import ast
import functools
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCES = sorted([*(ROOT / "tests").rglob("*.py"), *(ROOT / "bench").rglob("*.py")])
# Import statements as text (parenthesised and backslash-continued ones whole): only a file where one
# of them names something like a test module or a conftest is parsed (parsing everything takes seconds).
IMPORT_TEXT = re.compile(
    r"^[ \t]*(?:from[ \t]+\S+[ \t]+)?import\b[ \t]*(?:\([^)]*\)|(?:[^\\\n]|\\[\s\S])*)", re.MULTILINE
)


@functools.cache
def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def _module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported_modules(path: Path, root: Path = ROOT) -> Iterator[tuple[int, str]]:
    """(line, dotted module) for every import in the file, nested ones included; for ``from a import b``
    both ``a`` and ``a.b`` (b may be a submodule)."""
    package = _module_name(path, root).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    for node in ast.walk(_tree(path)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            yield node.lineno, module
            for alias in node.names:
                yield node.lineno, f"{module}.{alias.name}"


def _test_module_or_conftest(module: str) -> str | None:
    """The test module or conftest that ``module`` is or lies in, if any (``tests.a.test_b.x``: ``tests.a.test_b``)."""
    parts = module.split(".")
    if parts[0] != "tests":
        return None
    for index, part in enumerate(parts[1:], start=1):
        if part.startswith("test_") or part == "conftest":
            return ".".join(parts[: index + 1])
    return None


def _offending_imports(path: Path, root: Path = ROOT) -> set[tuple[int, str]]:
    statements = IMPORT_TEXT.findall(path.read_text())
    if not any("test_" in statement or "conftest" in statement for statement in statements):
        return set()
    return {
        (line, offending)
        for line, module in _imported_modules(path, root)
        if (offending := _test_module_or_conftest(module)) is not None
    }


SPELLINGS = [
    ("import tests.area.test_one\n", {"tests.area.test_one"}),
    ("from tests.area.test_two import helper\n", {"tests.area.test_two"}),
    ("from tests.area import test_three\n", {"tests.area.test_three"}),
    ("from tests.area import (\n    helpers,\n    test_four,\n)\n", {"tests.area.test_four"}),
    ("from tests.area import \\\n    test_five\n", {"tests.area.test_five"}),
    ("from .test_six import fixture\n", {"tests.area.test_six"}),
    ("from . import conftest\n", {"tests.area.conftest"}),
    ("def f():\n    from tests.conftest import builder\n", {"tests.conftest"}),
    # an imported test function would be collected, and run, twice: refused too
    ("from tests.area.helpers import test_like_name\n", {"tests.area.helpers.test_like_name"}),
    ("from tests.models import tiny_onnx_model\nfrom tests.area import helpers\n", set()),
    ('CODE = "from tests.area.test_one import x"\n', set()),  # in a string: not an import
]


@pytest.mark.parametrize("source, refused", SPELLINGS)
def test_the_scan_sees_every_spelling_of_such_an_import(tmp_path, source: str, refused: set[str]) -> None:
    (tmp_path / "tests" / "area").mkdir(parents=True)
    probe = tmp_path / "tests" / "area" / "probe.py"
    probe.write_text(source)
    assert {module for _, module in _offending_imports(probe, tmp_path)} == refused


def test_no_module_imports_a_test_module_or_a_conftest() -> None:
    found = [
        f"{path.relative_to(ROOT)}:{line}: imports {module}"
        for path in SOURCES
        for line, module in sorted(_offending_imports(path))
    ]
    assert not found, "move what is shared to a conftest.py (fixtures) or a helper module:\n" + "\n".join(found)


def _is_fixture(decorator: ast.expr) -> bool:
    """``@pytest.fixture``, ``@pytest.fixture(...)``, ``@fixture``."""
    target = decorator.func if isinstance(decorator, ast.Call) else decorator
    return (isinstance(target, ast.Attribute) and target.attr == "fixture") or (
        isinstance(target, ast.Name) and target.id == "fixture"
    )


def test_fixtures_are_defined_only_in_conftest_and_test_modules() -> None:
    """A fixture in a helper module would have to be imported to be found: it belongs in a conftest.py."""
    found = []
    for path in SOURCES:
        if path.name == "conftest.py" or path.name.startswith("test_"):
            continue
        for node in ast.walk(_tree(path)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and any(
                _is_fixture(decorator) for decorator in node.decorator_list
            ):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {node.name}")
    assert not found, "\n".join(found)


def _readme_layout_paths() -> set[str]:
    """The paths README's layout table names (its first column, backquoted)."""
    text = (ROOT / "README.md").read_text()
    table = text[text.index("## Layout") :].split("\n## ", 1)[0]
    return set(re.findall(r"^\| `([^`]+)` \|", table, flags=re.MULTILINE))


def test_the_readme_layout_table_names_every_folder_and_only_those() -> None:
    root = ROOT
    named = _readme_layout_paths()
    tops = {"sensitivity/", "planner/", "service/", "migrations/", "docker/", "bench/", "tests/"}
    rooms = {f"service/{p.name}/" for p in (root / "service").iterdir() if (p / "__init__.py").exists()}
    folders = {path for path in named if path.endswith("/")}
    assert folders == tops | rooms
    assert all((root / path).exists() for path in named), sorted(p for p in named if not (root / p).exists())


def _imported_packages(path: Path) -> set[str]:
    """The top-level packages a module imports, at any depth of its code."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


@pytest.mark.parametrize(("package", "never"), [("sensitivity", {"planner", "service"}), ("planner", {"service"})])
def test_the_libraries_import_only_what_is_below_them(package: str, never: set[str]) -> None:
    """sensitivity <- planner <- service, never back (CONTRIBUTING.md's layout): no cycle between them."""
    offenders = {
        str(path.relative_to(ROOT)): sorted(_imported_packages(path) & never)
        for path in sorted((ROOT / package).rglob("*.py"))
        if _imported_packages(path) & never
    }
    assert offenders == {}
