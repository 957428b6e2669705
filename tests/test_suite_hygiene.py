"""The suite's own rules: tests wait for events, not for fixed times.

A test that sleeps a fixed time to let something happen is slow when the machine
is idle and flaky when it is busy; one that sleeps to prove something did NOT
happen proves it only for that long. Tests wait with ``tests.fleet_support.wait_for``
(a polling loop that ends at the awaited event) and prove what must not happen on
the pure engines with a fake clock. What remains of fixed sleeps (pacing a client
that trickles bytes, say) is counted here and must stay under :data:`BUDGET_S`.
"""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).parent
BUDGET_S = 3.0
WAITERS = {"fleet_support.py": "wait_for"}
"""The shared wait helper of each file: its polling sleep is not a fixed sleep."""


def sleeps_in(source: str, *, waiter: str | None = None) -> list[tuple[int, float | None]]:
    """Every ``sleep(...)`` / ``x.sleep(...)`` call: (line, seconds; None if not a literal).

    Calls inside the function named ``waiter`` are left out.
    """
    found: list[tuple[int, float | None]] = []

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef) and child.name == waiter:
                continue
            if isinstance(child, ast.Call) and _is_sleep(child.func) and child.args:
                found.append((child.lineno, _seconds(child.args[0])))
            visit(child)

    visit(ast.parse(source))
    return sorted(found, key=lambda item: item[0])


def _is_sleep(func: ast.expr) -> bool:
    name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
    return name == "sleep"


def _seconds(arg: ast.expr) -> float | None:
    try:
        value = ast.literal_eval(arg)
    except ValueError:
        return None
    return float(value) if isinstance(value, int | float) else None


def fixed_sleeps() -> dict[str, list[tuple[int, float | None]]]:
    """The fixed sleeps of every Python file under tests/, by file name."""
    found = {}
    for path in sorted(TESTS.glob("*.py")):
        sleeps = sleeps_in(path.read_text(), waiter=WAITERS.get(path.name))
        if sleeps:
            found[path.name] = sleeps
    return found


def test_fixed_sleeps_in_tests_total_under_the_budget() -> None:
    found = fixed_sleeps()
    unknown = {name: [line for line, s in sleeps if s is None] for name, sleeps in found.items()}
    assert not any(unknown.values()), f"sleeps of a computed time (count them): {unknown}"
    total = sum(s or 0.0 for sleeps in found.values() for _line, s in sleeps)
    assert total < BUDGET_S, f"{total:.2f} s of fixed sleeps: {found}"


def test_the_count_sees_every_form_of_sleep_but_the_wait_helper() -> None:
    source = """
import time
from time import sleep

def wait_for(condition):
    while not condition():
        time.sleep(0.02)

def test_something():
    time.sleep(0.2)
    sleep(0.1)
    time.sleep(0.5 * 3)
    asyncio.sleep(0.5)
    threading.Event().wait(9)
"""
    assert sleeps_in(source, waiter="wait_for") == [(10, 0.2), (11, 0.1), (12, None), (13, 0.5)]
    assert (7, 0.02) in sleeps_in(source)
