"""Drift from real agents: two ``fedge-agent run`` processes serve a packaged model,
one receives shifted inputs, and the coordinator service scores them.

The whole path: packaging computes the reference profile from 2000 calibration rows,
the service verifies and stores the artifact and deploys it; each agent validates
and summarises what ``POST /v1/predict`` sends it and reports the summaries in its
telemetry over mosquitto; the service's ingest hands them to the drift monitor,
which scores them against the stored manifest's profile.
"""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from compress.families import init_weights
from compress.keys import SigningKey
from compress.onnx_export import export_onnx
from coordinator.delivery.packaging import PackageRequest, package_model
from coordinator.service.fleet_service import FleetService, ServiceSettings
from coordinator.service.operations import CLI_ACTOR, DeployRequest
from tests.fleet_support import (
    CLASSES,
    FEATURES,
    AgentProcess,
    Mosquitto,
    free_port,
    public_key_file,
    wait_for,
)
from tests.service_support import running_service

pytestmark = pytest.mark.slow

DEVICES = ("calm", "shifted")
ROWS = 1200
"""Inputs each device serves (with 2000 reference rows: 750 effective rows)."""


@pytest.fixture
def broker_users() -> list[str]:
    return list(DEVICES)


def package(directory: Path, key: SigningKey) -> Path:
    rng = np.random.default_rng(0)
    model = directory / "sensor.onnx"
    model.write_bytes(export_onnx("mlp", init_weights("mlp", [FEATURES, 32, CLASSES], rng)))
    out = directory / "sensor-v1.fedge"
    request = PackageRequest(
        model_path=model, name="sensor", version=1, keys=[key], out=out, quantize="int8",
        calibration=rng.random((2000, FEATURES), dtype=np.float32),
        expires_in=timedelta(days=30),
    )  # fmt: skip
    package_model(request, now=datetime.now(UTC))
    return out


def predict(port: int, rows: np.ndarray) -> None:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/predict",
        data=json.dumps({"inputs": rows.tolist()}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        answer: Any = json.loads(response.read())
    assert len(answer["labels"]) == len(rows)


@pytest.fixture
def service(tmp_path: Path, broker: Mosquitto, signing_key: SigningKey) -> Iterator[FleetService]:
    settings = ServiceSettings(telemetry_flush_s=0.2, accept_wait_s=1.0)
    with running_service(tmp_path, broker, signing_key, settings) as instance:
        yield instance


def test_real_agents_shifted_inputs_raise_drift_and_the_calm_ones_do_not(
    tmp_path: Path, broker: Mosquitto, signing_key: SigningKey, service: FleetService
) -> None:
    trust = public_key_file(tmp_path / "keys", signing_key)
    ports = {device: free_port() for device in DEVICES}
    agents = [
        AgentProcess(broker, device, tmp_path / device, trust, http_port=ports[device])
        for device in DEVICES
    ]
    try:
        wait_for(lambda: sum(d.online for d in service.devices()) == len(DEVICES),
                 what="both agents online")  # fmt: skip
        row = service.upload_artifact(package(tmp_path, signing_key).read_bytes(), actor=CLI_ACTOR)
        assert row.manifest["reference"]["rows"] == 2000
        view = service.deploy(DeployRequest(row.sha256, timeout_s=60), actor=CLI_ACTOR)
        deployment_id = view.result.deployment_id
        wait_for(lambda: service.deployment(deployment_id).done, 60.0, what="the deployment")
        assert service.deployment(deployment_id).result.succeeded

        rng = np.random.default_rng(1)
        for _ in range(ROWS // 300):
            predict(ports["calm"], rng.random((300, FEATURES), dtype=np.float32))
            shifted = rng.random((300, FEATURES), dtype=np.float32)
            shifted[:, : FEATURES // 2] = 0.5 + 0.5 * shifted[:, : FEATURES // 2]
            predict(ports["shifted"], shifted)

        def scored() -> bool:
            return {(s.device_id, s.n) for s in service.drift() if s.device_id} == {
                ("calm", ROWS),
                ("shifted", ROWS),
            }

        wait_for(scored, 30.0, what="every input served to be scored")
    finally:
        for agent in agents:
            agent.stop()
    scores = {s.device_id: s for s in service.drift()}
    assert scores["shifted"].severity == "major"
    assert {f.index for f in scores["shifted"].top} <= set(range(FEATURES // 2))
    assert scores["calm"].severity == "none"
    assert scores[None].devices == ("shifted", "calm")
