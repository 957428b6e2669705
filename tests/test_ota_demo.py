"""examples/ota_demo.sh works end to end: broker, two agents, deploy, rollback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_ota_demo_deploys_predicts_and_rolls_back(tmp_path: Path) -> None:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("FEDGE_BROKER", None)
    out = subprocess.run(
        ["bash", "examples/ota_demo.sh", str(tmp_path / "demo")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=280,
        check=False,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert '"labels":[' in out.stdout  # the HTTP prediction
    assert "rolled_back" in out.stdout
    assert out.stdout.rstrip().endswith("}")  # GET /v1/model after the rollback
    assert '"version":1' in out.stdout.rstrip().splitlines()[-1]
    marker = str(tmp_path / "demo").encode()
    leftovers = [
        proc.name
        for proc in Path("/proc").iterdir()
        if proc.name.isdigit() and marker in _cmdline(proc)
    ]
    assert leftovers == [], "the demo must stop what it started"


def _cmdline(proc: Path) -> bytes:
    try:
        return (proc / "cmdline").read_bytes()
    except OSError:  # the process ended meanwhile
        return b""
