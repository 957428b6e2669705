"""examples/federated_demo.sh works end to end: data, broker, agents, train, deploy."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_ota_demo import _cmdline

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_federated_demo_trains_packages_deploys_and_predicts(tmp_path: Path) -> None:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("FEDGE_BROKER", None)
    out_dir = tmp_path / "demo"
    out = subprocess.run(
        ["bash", "examples/federated_demo.sh", str(out_dir)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=280,
        check=False,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    report = json.loads((out_dir / "train.json").read_text())
    assert report["rounds_ok"] == 15
    assert report["final_accuracy"] >= 0.85
    assert (out_dir / "digits-v1.fedge").stat().st_size > 0
    assert '"labels":[' in out.stdout  # the HTTP prediction by the trained model
    assert "WARNING" not in out.stderr  # no Flower chatter without -v
    marker = str(out_dir).encode()
    leftovers = [
        proc.name
        for proc in Path("/proc").iterdir()
        if proc.name.isdigit() and marker in _cmdline(proc)
    ]
    assert leftovers == [], "the demo must stop what it started"
