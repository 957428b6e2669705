"""A user's own PyTorch model, in a directory that is not part of fedge, federated end to end.

``fedge simulate --model nets.small:tiny_cnn --dataset digits.npz`` run as a new process
from that directory: the factory is imported from the current directory (as ``python
-m`` would), trained by real agents over the embedded broker, exported, quantized,
signed and rolled out.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from sklearn.datasets import load_digits

FEDGE = Path(sys.executable).parent / "fedge"
"""The ``fedge`` console script of this environment."""

MODEL_CODE = '''
"""A user's CNN factory: fedge calls it with the keyword arguments it declares."""
import torch
from torch import nn


def tiny_cnn(input_shape, num_outputs):
    channels = input_shape[0]
    return nn.Sequential(
        nn.Conv2d(channels, 8, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(8 * (input_shape[1] // 2) * (input_shape[2] // 2), num_outputs),
    )
'''


@pytest.mark.slow
def test_a_model_written_outside_fedge_federates_end_to_end(tmp_path: Path) -> None:
    project = tmp_path / "my-project"
    (project / "nets").mkdir(parents=True)
    (project / "nets" / "__init__.py").write_text("")
    (project / "nets" / "small.py").write_text(MODEL_CODE)
    digits = load_digits()
    x = (digits.images[:600] / 16.0).astype(np.float32)[:, None, :, :]
    np.savez(project / "digits.npz", x=x, y=digits.target[:600])

    # Nothing of the test's environment points at the project: the factory must be found
    # because fedge puts the current directory on the import path.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    command = [
        str(FEDGE), "simulate",
        "--model", "nets.small:tiny_cnn", "--dataset", "digits.npz",
        "--agents", "3", "--rounds", "3", "--epochs", "1", "--partition", "iid",
        "--out", "run", "--json",
    ]  # fmt: skip
    done = subprocess.run(
        command, cwd=project, env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((project / "run" / "report.json").read_text())
    assert report["model"] == "nets.small:tiny_cnn"
    assert report["task"] == "classification"
    assert report["rounds_ok"] == 3
    assert report["final_metrics"]["accuracy"] > 0.5  # ten classes: chance is 0.1
    assert report["centralized_metrics"]["accuracy"] > 0.5
    assert report["rollout"]["all_serving"] is True
    assert (project / report["artifact"]).is_file()  # paths are relative to the directory
    weights = np.load(project / report["weights"])
    assert any(np.asarray(weights[name]).ndim == 4 for name in weights.files)  # conv kernels
