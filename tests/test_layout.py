"""Import rules between the top-level folders that the packaging relies on."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_OURS = {"iiot", "iiot_common", "protocols", "device_profiles", "edge_agent", "gateway"}
_OURS |= {"simulators", "tests", "bench"}


def _imported_roots(path: Path) -> set[str]:
    roots: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


@pytest.mark.parametrize("path", sorted((ROOT / "bench").glob("*.py")), ids=lambda p: p.name)
def test_benchmarks_run_without_the_test_suite(path: Path) -> None:
    assert "tests" not in _imported_roots(path), f"{path.name} imports from tests/"


@pytest.mark.parametrize("path", sorted((ROOT / "iiot_common").glob("*.py")), ids=lambda p: p.name)
def test_iiot_common_imports_no_other_iiot_package(path: Path) -> None:
    ours = _imported_roots(path) & (_OURS - {"iiot_common"})
    assert not ours, f"iiot_common/{path.name} imports {sorted(ours)}"
