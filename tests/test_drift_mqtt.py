"""Drift end to end in the service: a signed artifact with a reference profile is
uploaded, devices publish telemetry with window summaries over a real mosquitto, and
the service scores them (``Operations.drift``, ``/metrics`` figures).

The devices are raw MQTT clients logged in as themselves (the agent's summary
keeping is tested on the device side); what they publish is the wire form an agent
sends.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt
import paho.mqtt.client as mqtt
import pytest

from compress.keys import SigningKey
from compress.manifest import TensorSpec
from compress.profile import BINS, profile_from_data
from coordinator.errors import NotFoundError
from coordinator.service.fleet_service import FleetService, ServiceSettings
from coordinator.service.operations import CLI_ACTOR
from edge_agent.protocol import (
    DEFAULT_LIMITS,
    PROTOCOL_VERSION,
    Channel,
    InvalidCounts,
    WindowSummary,
    device_topic,
    encode,
    encode_frame,
    new_message_id,
)
from tests.conftest import ArtifactFactory
from tests.drift_support import agent_summary, summary_batch
from tests.fleet_support import Mosquitto, password, wait_for
from tests.service_support import running_service

pytestmark = pytest.mark.slow

D, K = 64, 10
DEVICES = ("calm", "shifted", "evil", "garbled")
WEIGHTS = np.random.default_rng(7).normal(size=(D, K)).astype(np.float32)


@pytest.fixture
def broker_users() -> Sequence[str]:
    return DEVICES


def data(n: int, rng: np.random.Generator, *, shifted: bool = False) -> npt.NDArray[np.float32]:
    x = rng.normal(size=(n, D)).astype(np.float32)
    if shifted:
        x[:, : D // 2] = 1.5 * x[:, : D // 2] + 1.0
    return x


class Device:
    """A raw MQTT client logged in as one device."""

    def __init__(self, broker: Mosquitto, device_id: str) -> None:
        self.device_id = device_id
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=device_id)
        self.client.username_pw_set(device_id, password(device_id))
        self.client.connect("127.0.0.1", broker.port)
        self.client.loop_start()

    def send(self, summary: WindowSummary, seq: int, *, corrupt: bool = False) -> None:
        batch = summary_batch(
            summary, seq=seq, model="sensor", version=2, start=10.0 * seq, end=10.0 * seq + 10
        )
        payload = encode(batch, sender=self.device_id, sent_at=time.time())
        if corrupt:  # the summary's cells no longer add up: the wire decoder refuses it
            data, body = batch._to_wire(DEFAULT_LIMITS)
            data["records"][0]["summary"]["counts"] = data["records"][0]["summary"]["counts"][::-1]
            header = {"v": PROTOCOL_VERSION, "type": batch.TYPE, "id": new_message_id(),
                      "sender": self.device_id, "sent_at": time.time(), "data": data}  # fmt: skip
            payload = encode_frame(header, body)
        info = self.client.publish(device_topic(self.device_id, Channel.TELEMETRY), payload, qos=1)
        info.wait_for_publish(10)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def service(tmp_path: Path, broker: Mosquitto, signing_key: SigningKey) -> Iterator[FleetService]:
    settings = ServiceSettings(telemetry_flush_s=0.1)
    with running_service(tmp_path, broker, signing_key, settings) as instance:
        yield instance


def test_the_service_scores_summaries_from_mqtt_telemetry(
    service: FleetService,
    broker: Mosquitto,
    artifact_file: ArtifactFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING)
    x_ref = data(3000, np.random.default_rng(0))
    profile = profile_from_data(x_ref, x_ref @ WEIGHTS, "classification")
    artifact = artifact_file(
        name="sensor", version=2, inputs=(TensorSpec("input", (None, D)),), reference=profile
    )
    row = service.upload_artifact(artifact.read_bytes(), actor=CLI_ACTOR)
    assert row.manifest["reference"] == profile.to_dict()

    def summarise(x: npt.NDArray[np.float32]) -> WindowSummary:
        return agent_summary(profile, x, x @ WEIGHTS, classes=K, invalid=InvalidCounts(nan=1))

    devices = {device_id: Device(broker, device_id) for device_id in DEVICES}
    rng = np.random.default_rng(1)
    try:
        for seq in range(3):
            devices["calm"].send(summarise(data(300, rng)), seq)
            devices["shifted"].send(summarise(data(300, rng, shifted=True)), seq)
            wrong = WindowSummary.from_arrays(10, np.full((3, BINS), 1), None, None,
                                              InvalidCounts())  # fmt: skip
            devices["evil"].send(wrong, seq)
            devices["garbled"].send(summarise(data(300, rng)), seq, corrupt=True)

        def scored() -> bool:
            return {(s.device_id, s.windows) for s in service.drift() if s.device_id} == {
                ("calm", 3),
                ("shifted", 3),
            }

        wait_for(scored, 20.0, what="both devices' three windows to be scored")
    finally:
        for device in devices.values():
            device.close()
    scores = {s.device_id: s for s in service.drift()}
    assert scores["shifted"].severity == "major"
    assert {f.index for f in scores["shifted"].top} <= set(range(D // 2))
    assert scores["calm"].severity == "none"
    assert scores["calm"].invalid == {"nan": 3}
    assert scores[None].devices[0] == "shifted"
    assert [s.device_id for s in service.drift(device_id="calm")] == ["calm"]
    with pytest.raises(NotFoundError):
        service.drift(device_id="ghost")
    figures = service.metrics()
    assert figures.drift_psi == {("sensor", 2): scores[None].psi_max}
    assert figures.drift_devices == {("sensor", 2, "none"): 1, ("sensor", 2, "major"): 1}
    assert figures.drift_rejected == {"wrong_features": 3}
    assert "garbled" not in scores
    dropped = [r.getMessage() for r in caplog.records if "dropped a message" in r.getMessage()]
    assert len(dropped) == 3
    assert all("devices/garbled/telemetry" in message for message in dropped)
