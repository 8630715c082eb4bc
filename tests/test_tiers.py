"""The fast tier stays fast: a test that starts a child process carries the `subprocess` mark
or another that implies `slow` (itself or through conftest.FILE_MARKS), so
`pytest -m "not slow"` leaves it out."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from conftest import FILE_MARKS, SLOW_MARKS

TESTS = Path(__file__).resolve().parent
SPAWNS = ("subprocess.", "Popen", "sys.executable")


def _spawning_tests(tree: ast.Module) -> dict[str, ast.FunctionDef]:
    """Test functions that start a process, directly or through a helper of their module."""
    functions = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}
    spawners = {name for name, f in functions.items() if any(s in ast.unparse(f) for s in SPAWNS)}
    grown = True
    while grown:
        grown = False
        for name, function in functions.items():
            used = {n.id for n in ast.walk(function) if isinstance(n, ast.Name)}
            if name not in spawners and used & spawners:
                spawners.add(name)
                grown = True
    return {name: functions[name] for name in spawners if name.startswith("test_")}


def _marks(nodes: list[ast.expr]) -> set[str]:
    """Names of the ``pytest.mark.NAME`` among ``nodes`` (decorators, a pytestmark value)."""
    texts = [ast.unparse(n) for node in nodes for n in ast.walk(node)]
    return {t.removeprefix("pytest.mark.").split("(")[0] for t in texts
            if t.startswith("pytest.mark.") and t.count(".") == 2}  # fmt: skip


def _module_marks(path: Path, tree: ast.Module) -> set[str]:
    """conftest.FILE_MARKS of the file and its own ``pytestmark``."""
    values = [n.value for n in tree.body if isinstance(n, ast.Assign)
              and any(isinstance(t, ast.Name) and t.id == "pytestmark" for t in n.targets)]  # fmt: skip
    return set(FILE_MARKS.get(path.name, ())) | _marks(values)


def test_every_test_that_starts_a_process_is_out_of_the_fast_tier():
    unmarked = []
    for path in sorted(set(TESTS.glob("test_*.py")) - {Path(__file__).resolve()}):
        tree = ast.parse(path.read_text())
        module_marks = _module_marks(path, tree)
        for name, function in _spawning_tests(tree).items():
            if not (module_marks | _marks(function.decorator_list)) & {"slow", *SLOW_MARKS}:
                unmarked.append(f"{path.name}::{name}")
    assert not unmarked, f"mark these @pytest.mark.subprocess: {unmarked}"


def test_the_slow_marks_are_registered(pytestconfig):
    registered = {line.split(":")[0] for line in pytestconfig.getini("markers")}
    assert {"slow", *SLOW_MARKS} <= registered
    assert {m for marks in FILE_MARKS.values() for m in marks} <= set(SLOW_MARKS)


@pytest.mark.parametrize("source, expected", [
    ("import subprocess\ndef _go():\n    subprocess.run(['x'])\ndef test_a():\n    _go()\n"
     "def test_b():\n    pass\n", {"test_a"}),
    ("def test_c(tmp_path):\n    import sys\n    print(sys.executable)\n", {"test_c"}),
])  # fmt: skip
def test_the_scan_follows_helpers(source, expected):
    assert set(_spawning_tests(ast.parse(source))) == expected
