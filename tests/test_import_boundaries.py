"""The three floors: compress <- edge_agent <- coordinator, and a light agent.

DESIGN.md: nothing in ``compress`` imports the other two; nothing in ``edge_agent``
imports ``coordinator``; the agent imports and runs without flwr, fastapi, typer, onnx
or scikit-learn.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ["flwr", "fastapi", "typer", "onnx", "sklearn", "rich", "uvicorn", "amqtt"]
FORBIDDEN = {
    "compress": {"edge_agent", "coordinator"},
    "edge_agent": {"coordinator"},
}


def test_edge_agent_imports_without_heavy_dependencies() -> None:
    code = (
        "import importlib, json, pkgutil, sys\n"
        "import edge_agent\n"
        "for m in pkgutil.walk_packages(edge_agent.__path__, 'edge_agent.'):\n"
        "    importlib.import_module(m.name)\n"
        f"print(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    assert json.loads(out.stdout) == []


def test_compress_imports_only_numpy_and_cryptography_eagerly() -> None:
    code = (
        "import importlib, json, pkgutil, sys\n"
        "import compress\n"
        "for m in pkgutil.walk_packages(compress.__path__, 'compress.'):\n"
        "    importlib.import_module(m.name)\n"
        "heavy = ['onnx', 'onnxruntime', 'flatbuffers', 'ai_edge_litert', 'edge_agent',"
        " 'coordinator', 'paho']\n"
        "print(json.dumps(sorted(m for m in heavy if m in sys.modules)))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    assert json.loads(out.stdout) == []


def _imported_packages(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_imports_point_downwards_only(package: str) -> None:
    offenders = {
        str(path.relative_to(ROOT)): sorted(_imported_packages(path) & FORBIDDEN[package])
        for path in (ROOT / package).rglob("*.py")
        if _imported_packages(path) & FORBIDDEN[package]
    }
    assert offenders == {}
