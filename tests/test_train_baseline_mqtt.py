"""The deployed-model gate over a real federated run: mosquitto and three agents.

A well-trained model (four rounds) is packaged and deployed; a run of one round at a
tiny learning rate then produces a clearly worse model, and ``fedge train --package
--baseline`` refuses to sign it (exit 1, both figures, nothing written); with
``--allow-worse`` it is packaged (v2). A four-round run measured against that weak
artifact is packaged, deployed and served. The gate's other cases run without a
broker in tests/test_train_baseline.py.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from compress.keys import PRIVATE_KEY_NAME
from coordinator.cli.app import app
from coordinator.delivery.deliveries import Artifact
from coordinator.link.fleet import Target
from tests.federated_support import FederatedFleet, device_ids
from tests.fleet_support import Mosquitto, open_deliveries, password

pytestmark = pytest.mark.slow

AGENTS = 3


@pytest.fixture(scope="module")
def module_broker_users() -> list[str]:
    return device_ids(AGENTS)


@pytest.fixture(scope="module")
def fleet(
    module_broker: Mosquitto, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[FederatedFleet]:
    running = FederatedFleet.start(module_broker, tmp_path_factory.mktemp("gate"), AGENTS)
    yield running
    running.stop()


def fedge_train(fleet: FederatedFleet, tmp_path: Path, *args: str) -> tuple[int, str]:
    test_file = tmp_path / "test.npz"
    if not test_file.exists():
        np.savez(test_file, x=fleet.test_set.x, y=fleet.test_set.y)
    secret = tmp_path / "coordinator.password"
    secret.write_text(password("coordinator"))
    result = CliRunner().invoke(app, [
        "train", "--broker", fleet.broker.url, "--password-file", str(secret),
        "--model", "gate-digits", "--family", "mlp", "--hidden", "64",
        "--clients-per-round", str(AGENTS), "--min-clients", str(AGENTS),
        "--round-timeout", "30", "--eval-data", str(test_file),
        "--key", str(fleet.trust.parent / PRIVATE_KEY_NAME), "--json", *args,
    ])  # fmt: skip
    return result.exit_code, " ".join(result.output.split())


def test_a_worse_federated_model_is_not_signed_and_a_better_one_is_deployed(
    fleet: FederatedFleet, tmp_path: Path
) -> None:
    trust = ("--baseline-trust", str(fleet.trust))
    deployed = tmp_path / "deployed.fedge"
    code, output = fedge_train(fleet, tmp_path, "--rounds", "4", "--epochs", "2",
                               "--package", str(deployed))  # fmt: skip
    assert code == 0, output
    assert "no deployed baseline compared" in output

    one_round = ("--rounds", "1", "--epochs", "1", "--lr", "0.0005")
    worse = tmp_path / "worse.fedge"
    code, output = fedge_train(fleet, tmp_path, *one_round, "--package", str(worse),
                               "--baseline", str(deployed), *trust, "--version", "2")  # fmt: skip
    assert code == 1
    assert "the new model is worse than the deployed one: new model accuracy" in output
    assert "deployed gate-digits v1 (accuracy" in output
    assert not worse.exists()

    code, output = fedge_train(fleet, tmp_path, *one_round, "--package", str(worse),
                               "--baseline", str(deployed), *trust, "--allow-worse",
                               "--version", "2")  # fmt: skip
    assert code == 0, output
    assert "worse than (--allow-worse) the deployed gate-digits v1" in output

    better = tmp_path / "better.fedge"
    code, output = fedge_train(fleet, tmp_path, "--rounds", "4", "--epochs", "2",
                               "--package", str(better), "--baseline", str(worse), *trust,
                               "--version", "3")  # fmt: skip
    assert code == 0, output
    summary = json.loads(output[output.index("{") :])
    assert "no worse than the deployed gate-digits v2" in summary["artifact"]
    with open_deliveries(fleet.hub) as ops:
        delivery = ops.deploy(Artifact.load(better), Target.parse("device:dev00"))
        assert ops.wait(delivery, timeout=30).succeeded
    prediction = fleet.agents[0].predict(fleet.test_set.x[:20])
    assert (prediction.model, prediction.version) == ("gate-digits", 3)
