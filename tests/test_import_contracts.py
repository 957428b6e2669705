"""The import contracts of pyproject.toml (``lint-imports``, run by .ci/run) catch what they name.

Each test copies the three packages' sources to a temporary folder beside the project's
pyproject.toml and runs import-linter there: the clean copy keeps every contract, and one
added import per contract breaks exactly that contract (non-zero exit, the contract named as
BROKEN). The clean run also shows what the contracts allow: the agent imports onnxruntime
(only ``onnx`` is forbidden), and the known exceptions listed in the contracts still exist.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("compress", "edge_agent", "coordinator")
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"

# contract name -> (module file to edit, the forbidden line appended to it)
VIOLATIONS = {
    "floors: coordinator -> edge_agent -> compress": (
        "edge_agent/errors.py",
        "import coordinator",
    ),
    "coordinator rooms": (
        "coordinator/link/__init__.py",
        "import coordinator.service",
    ),
    "edge_agent rooms": (
        "edge_agent/errors.py",
        "import edge_agent.protocol",
    ),
    "pure engines import no adapter": (
        "coordinator/rollout/policy.py",
        "import paho.mqtt.client",
    ),
    "the agent stays light: no flwr, fastapi, typer, onnx, sklearn, torch": (
        "edge_agent/errors.py",
        "import onnx",
    ),
}


def _contract_names() -> list[str]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return [contract["name"] for contract in config["tool"]["importlinter"]["contracts"]]


def _copy_project(target: Path) -> Path:
    for package in PACKAGES:
        shutil.copytree(
            ROOT / package,
            target / package,
            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
        )
    shutil.copy(ROOT / "pyproject.toml", target / "pyproject.toml")
    return target


def _lint_imports(project: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(project)}
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache", "--config", str(project / "pyproject.toml")],
        capture_output=True,
        text=True,
        cwd=project,
        env=env,
        check=False,
        timeout=120,
    )


@pytest.fixture(scope="module")
def clean_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _copy_project(tmp_path_factory.mktemp("clean"))


def test_every_contract_has_a_violation_case() -> None:
    assert sorted(VIOLATIONS) == sorted(_contract_names())


def test_the_project_keeps_every_contract(clean_copy: Path) -> None:
    result = _lint_imports(clean_copy)
    assert result.returncode == 0, result.stdout + result.stderr
    for name in _contract_names():
        assert f"{name} KEPT" in result.stdout


@pytest.mark.parametrize("contract", sorted(VIOLATIONS))
def test_a_forbidden_import_breaks_its_contract(
    contract: str, clean_copy: Path, tmp_path: Path
) -> None:
    project = tmp_path / "project"
    shutil.copytree(clean_copy, project)
    module, line = VIOLATIONS[contract]
    with (project / module).open("a") as source:
        source.write(f"\n{line}  # the violation under test\n")

    result = _lint_imports(project)

    assert result.returncode != 0
    assert f"{contract} BROKEN" in result.stdout
    broken = [name for name in _contract_names() if f"{name} BROKEN" in result.stdout]
    assert broken == [contract]
