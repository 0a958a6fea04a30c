"""The shape of the package (design.md §3): no import cycle in devicemodel/, no module
over 600 lines, nothing outside tests/ importing tests.

The imports are read with ``ast``, every one of them: module level, inside functions
(lazy imports) and under ``if TYPE_CHECKING:`` alike, because a cycle a type checker or
a reader has to untangle is a cycle whether Python happens to survive it or not.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from tests.support.import_graph import cycles
from tests.support.import_graph import import_graph as walk_imports

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "devicemodel"
MAX_LINES = 600


def import_graph() -> dict[str, set[str]]:
    return walk_imports(ROOT, "devicemodel")


def test_the_walk_sees_every_kind_of_import() -> None:
    """The walk itself: relative and absolute, package and submodule, lazy and
    TYPE_CHECKING imports all become edges (else the cycle test could not fail)."""
    graph = import_graph()
    assert "devicemodel.hsm.base" in graph["devicemodel.hsm.sim"]  # from .base import
    assert "devicemodel.hsm.abi" in graph["devicemodel.irq.backend"]  # from ..hsm import abi
    assert "devicemodel.vmm.vm" in graph["devicemodel.lspci"]  # inside a function
    assert "devicemodel.context" in graph["devicemodel.pci.device"]  # under TYPE_CHECKING
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycle_in_devicemodel() -> None:
    found = cycles(import_graph())
    assert not found, "import cycles (the modules of each):\n" + "\n".join(
        " -> ".join(c) for c in found)


def _sizes() -> list[tuple[str, int]]:
    return [(str(p.relative_to(ROOT)), len(p.read_text().splitlines()))
            for p in sorted(PACKAGE.rglob("*.py"))]


@pytest.mark.parametrize("path,lines", _sizes(), ids=lambda v: v if isinstance(v, str) else "")
def test_no_module_over_600_lines(path: str, lines: int) -> None:
    assert lines <= MAX_LINES, f"{path}: {lines} lines; split it by concern"


#: not the project's code: version control, caches, build output
SKIP_DIRS = {".git", ".hypothesis", ".pytest_cache", ".ruff_cache", ".benchmarks",
             "__pycache__", ".venv", "build", "dist"}
_IMPORTS_TESTS = re.compile(r"^\s*(from\s+tests(\.|\s)|import\s+tests\b)", re.MULTILINE)


def test_nothing_outside_tests_imports_tests() -> None:
    offenders = []
    for path in sorted(ROOT.rglob("*")):
        rel = path.relative_to(ROOT)
        if not path.is_file() or rel.parts[0] == "tests" or any(
                part in SKIP_DIRS or part.endswith(".egg-info") for part in rel.parts):
            continue
        if path.suffix == ".py":
            tree = ast.parse(path.read_text(), str(path))
            for node in ast.walk(tree):
                names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                         else [node.module or ""] if isinstance(node, ast.ImportFrom)
                         and not node.level else [])
                if any(n == "tests" or n.startswith("tests.") for n in names):
                    offenders.append(f"{rel}:{node.lineno}")
        elif path.suffix in (".sh", "") and path.stat().st_size < 1 << 20:
            try:
                text = path.read_text()
            except UnicodeDecodeError:
                continue
            for m in _IMPORTS_TESTS.finditer(text):
                offenders.append(f"{rel}:{text.count(chr(10), 0, m.start()) + 1}")
    assert not offenders, "product code importing tests: " + ", ".join(offenders)
