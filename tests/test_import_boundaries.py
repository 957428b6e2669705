"""A light agent and a light compress, measured at run time.

DESIGN.md: the agent imports and runs without flwr, fastapi, typer, onnx or scikit-learn;
compress loads only numpy and cryptography when imported. The static direction of imports
(compress <- edge_agent <- coordinator, and the rooms inside each package) is checked by the
import-linter contracts in pyproject.toml: see tests/test_import_contracts.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ["flwr", "fastapi", "typer", "onnx", "sklearn", "rich", "uvicorn", "amqtt"]


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
