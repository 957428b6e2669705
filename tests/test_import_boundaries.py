"""A light agent and a light compress, measured at run time.

DESIGN.md: the agent imports and runs without flwr, fastapi, typer, onnx, scikit-learn or
torch (PyTorch is imported only when a torch model is trained: tests/torch_probe.py
follows an agent from its start to its first torch task); compress loads only numpy and
cryptography when imported. The static direction of imports
(compress <- edge_agent <- coordinator, and the rooms inside each package) is checked by the
import-linter contracts in pyproject.toml: see tests/test_import_contracts.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

from edge_agent.training.model_spec import ZOO_MODULE, torch_available
from tests.fleet_support import free_port

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ["flwr", "fastapi", "typer", "onnx", "sklearn", "rich", "uvicorn", "amqtt", "torch"]


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


def probe(tmp_path: Path, *extra: str) -> dict[str, Any]:
    """Run tests/torch_probe.py in a fresh interpreter; its JSON findings."""
    out = subprocess.run(
        [sys.executable, "-m", "tests.torch_probe", str(tmp_path), str(free_port()), *extra],
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    found: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return found


def test_an_agent_starts_and_trains_numpy_rounds_without_importing_torch(tmp_path: Path) -> None:
    found = probe(tmp_path)
    assert found["after_start"] is False
    assert found["refusal"] == "unknown_model"
    assert found["after_refusal"] is False
    assert found["numpy"] == "update_report"
    assert found["after_numpy_round"] is False
    if torch_available():  # listed without importing it
        assert "owner_models.nets:tiny_net" in found["train_models"]
        assert f"{ZOO_MODULE}:dense_autoencoder" in found["train_models"]
    else:
        assert found["train_models"] == []


def test_a_torch_task_is_what_imports_torch(tmp_path: Path) -> None:
    from edge_agent.training.torch_models import initial_weights  # noqa: PLC0415 - needs torch

    weights = initial_weights(
        "zoo:dense_autoencoder", task="reconstruction", input_shape=(6,), num_outputs=0, seed=0
    )
    weights_file = tmp_path / "autoencoder.npz"
    np.savez(weights_file, **{name: np.asarray(a, np.float32) for name, a in weights.items()})
    found = probe(tmp_path / "probe", str(weights_file))
    assert found["after_numpy_round"] is False
    assert found["torch"] == "eval_report"
    assert "reconstruction_error" in found["torch_metrics"]
    assert found["after_torch_task"] is True
