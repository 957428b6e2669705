"""examples/quickstart.sh works end to end: train, export, quantize, sign, verify."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from compress.artifact import read_artifact_unverified

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_quickstart_trains_packages_and_verifies(tmp_path: Path) -> None:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    out = subprocess.run(
        ["bash", "examples/quickstart.sh", str(tmp_path / "qs")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "verified: digits v1 (onnx, int8-dynamic" in out.stdout
    signed, payload = read_artifact_unverified(tmp_path / "qs" / "digits-v1.fedge")
    manifest = signed.manifest
    assert manifest.quantization == "int8-dynamic"
    assert int(manifest.metadata["fp32_bytes"]) / len(payload) >= 3.5
    assert float(manifest.metadata["accuracy"]) >= 0.95
