"""docs/security.md cannot rot: every test and module it names exists.

The security page tells, for each threat, which test shows the defence
(``tests/test_x.py::test_name``) and which module implements it
(``compress/trust.py``). A renamed or deleted test would leave the page claiming
evidence that no longer runs, so this check reads the page as text and, for each
reference, the named file: the test file must exist and define a function of
that name (``def`` or ``async def``, at module level or in a class), and every
module path must be a file of the repository. It imports nothing of fedge and
runs no test. It also checks that every threat row names at least one test, and
that the threats of the list in issue 17 are all still on the page.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "security.md"

TEST_REF = re.compile(r"\btests/([A-Za-z0-9_/]+\.py)::([A-Za-z_][A-Za-z0-9_]*)")
MODULE_REF = re.compile(r"`((?:compress|edge_agent|coordinator|docs)/[A-Za-z0-9_/]+\.(?:py|md))`")
THREAT_ROW = re.compile(r"^\| \*\*(?P<threat>[^*]+)\*\*(?P<rest>.*)$", re.MULTILINE)

THREATS = (
    "Arbitrary software",
    "Rollback",
    "Indefinite freeze",
    "Endless data",
    "Extraneous dependencies",
    "Mix-and-match",
    "Wrong software",
    "Key compromise",
    "Fast-forward",
    "Client-id takeover",
    "Cross-device publish/subscribe",
    "Anonymous brokers",
    "Session theft",
    "DNS rebinding of the agent's local API",
    "Inflated example counts",
    "Large or scaled updates",
    "Sign flipping",
    "BatchNorm statistics poisoning",
    "Model replacement",
    "Eval-metric lies",
)


def defines(source: str, name: str) -> bool:
    """Whether ``source`` defines a function ``name`` (at any indentation)."""
    pattern = rf"^[ \t]*(?:async[ \t]+)?def[ \t]+{re.escape(name)}[ \t]*\("
    return re.search(pattern, source, re.MULTILINE) is not None


def broken_references(text: str, root: Path) -> list[str]:
    """Every reference in ``text`` to a test or module that does not exist under ``root``."""
    broken: list[str] = []
    sources: dict[str, str | None] = {}
    for match in TEST_REF.finditer(text):
        file, name = match.groups()
        if file not in sources:
            path = root / "tests" / file
            sources[file] = path.read_text() if path.is_file() else None
        source = sources[file]
        if source is None:
            broken.append(f"tests/{file}::{name}: no such file")
        elif not defines(source, name):
            broken.append(f"tests/{file}::{name}: no such test")
    for match in MODULE_REF.finditer(text):
        if not (root / match.group(1)).is_file():
            broken.append(f"{match.group(1)}: no such file")
    return broken


def rows_without_tests(text: str) -> list[str]:
    """The threats of the page's tables whose row names no test."""
    return [m["threat"] for m in THREAT_ROW.finditer(text) if not TEST_REF.search(m["rest"])]


def threats_of(text: str) -> list[str]:
    """The threat names the page's tables list, in order."""
    return [m["threat"] for m in THREAT_ROW.finditer(text)]


def test_every_referenced_test_and_module_exists() -> None:
    text = DOC.read_text()
    assert len(TEST_REF.findall(text)) >= 60, "the page's test references were not found"
    assert broken_references(text, ROOT) == []


def test_every_threat_row_names_a_test() -> None:
    text = DOC.read_text()
    assert rows_without_tests(text) == []


def test_the_threat_list_of_issue_17_is_on_the_page() -> None:
    listed = threats_of(DOC.read_text())
    missing = [threat for threat in THREATS if not any(t.startswith(threat) for t in listed)]
    assert missing == []


def test_the_readme_and_the_architecture_notes_link_to_the_page() -> None:
    assert "(docs/security.md)" in (ROOT / "README.md").read_text()
    assert "(security.md)" in (ROOT / "docs" / "architecture.md").read_text()


def test_invented_tests_and_modules_are_reported(tmp_path: Path) -> None:
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_a.py").write_text(
        "def test_real() -> None: ...\n"
        "class TestGroup:\n"
        "    async def test_in_a_class(self) -> None: ...\n"
        "# def test_commented_out\n"
        "def test_real_with_a_longer_name() -> None: ...\n"
    )
    (tmp_path / "compress").mkdir()
    (tmp_path / "compress" / "trust.py").write_text("")
    text = (
        "`tests/test_a.py::test_real`, `tests/test_a.py::test_in_a_class`, "
        "`tests/test_a.py::test_invented`, `tests/test_a.py::test_commented_out`, "
        "`tests/test_a.py::test_real_with`, `tests/test_gone.py::test_x`, "
        "`compress/trust.py`, `compress/gone.py`"
    )
    assert broken_references(text, tmp_path) == [
        "tests/test_a.py::test_invented: no such test",
        "tests/test_a.py::test_commented_out: no such test",
        "tests/test_a.py::test_real_with: no such test",
        "tests/test_gone.py::test_x: no such file",
        "compress/gone.py: no such file",
    ]


def test_a_threat_row_without_a_test_is_reported() -> None:
    text = (
        "| Threat | Today | Shown by | Not done |\n"
        "|---|---|---|---|\n"
        "| **Rollback** | counters | `tests/test_a.py::test_real` | - |\n"
        "| **Indefinite freeze** | nothing | - | all |\n"
    )
    assert threats_of(text) == ["Rollback", "Indefinite freeze"]
    assert rows_without_tests(text) == ["Indefinite freeze"]
