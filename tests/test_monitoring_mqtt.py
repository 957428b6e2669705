"""Monitoring end to end: a real ``fedge-agent run`` process serving a packaged model
validates what it is sent and reports window summaries that the coordinator's hub
decodes, over mosquitto.

The artifact's reference profile comes from packaging (its calibration rows). The
test sends valid rows and refused ones over ``POST /v1/predict``, then adds up the
summaries the hub hears: the feature counts equal the bins of the rows sent, the
class counts the predicted labels, and the refusals their reasons.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
import pytest

from compress.artifact import read_artifact_unverified
from compress.keys import SigningKey
from compress.profile import bin_counts, features
from coordinator.delivery.deliveries import Artifact
from coordinator.link.fleet import Target
from edge_agent.protocol import (
    Channel,
    Envelope,
    InvalidCounts,
    TelemetryBatch,
    TelemetryRecord,
    WindowSummary,
    device_topic,
    encode,
)
from tests.fleet_support import (
    CLASSES,
    FEATURES,
    AgentProcess,
    Mosquitto,
    coordinator,
    free_port,
    make_artifact,
    open_deliveries,
    password,
    post_json,
    public_key_file,
    wait_for,
)
from tests.test_protocol_messages import record

pytestmark = pytest.mark.slow

DEVICE = "pi-1"
HOSTILE = "pi-2"


@pytest.fixture
def broker_users() -> list[str]:
    return [DEVICE, HOSTILE]


def test_agent_summaries_reach_the_coordinator_and_match_the_inputs(
    tmp_path: Path, broker: Mosquitto, signing_key: SigningKey
) -> None:
    trust = public_key_file(tmp_path / "keys", signing_key)
    port = free_port()
    agent = AgentProcess(broker, DEVICE, tmp_path / DEVICE, trust, http_port=port)
    coord = coordinator(broker)
    records: list[TelemetryRecord] = []
    lock = threading.Lock()

    def on_message(device_id: str, envelope: Envelope, _size: int) -> None:
        if device_id == DEVICE and isinstance(envelope.message, TelemetryBatch):
            with lock:
                records.extend(envelope.message.records)

    coord.add_listener(on_message)
    try:
        wait_for(lambda: any(r.device_id == DEVICE and r.online for r in coord.fleet()),
                 what="the agent online")  # fmt: skip
        path = make_artifact(tmp_path, signing_key, version=1)
        profile = read_artifact_unverified(path)[0].manifest.reference
        assert profile is not None
        with open_deliveries(coord) as ops:
            deployment = ops.deploy(Artifact.load(path), Target.parse("all"))
            assert ops.wait(deployment, timeout=30).succeeded

        rng = np.random.default_rng(5)
        sent = [rng.random((n, FEATURES), dtype=np.float32) for n in (1, 4, 16, 9)]
        labels: list[int] = []
        for rows in sent:
            status, answer = post_json(port, "/v1/predict", {"inputs": rows.tolist()})
            assert status == 200, answer
            labels.extend(answer["labels"])
        # an explanation runs the model on 18 rows but is neither a prediction nor
        # summarised: telemetry counts it as an explanation
        status, answer = post_json(port, "/v1/explain", {"inputs": sent[0].tolist()})
        assert status == 200, answer
        assert answer["baseline"] == "median"
        assert len(answer["attributions"]) == FEATURES
        assert answer["label"] == labels[0]
        refused = {
            "out_of_range": [[50.0] * FEATURES],
            "shape": [[0.5] * (FEATURES - 1)],
            "dtype": [[1e39] * FEATURES],  # overflows float32
        }
        for reason, inputs in refused.items():
            status, answer = post_json(port, "/v1/predict", {"inputs": inputs})
            assert status == 422
            assert answer["error"]["code"] == "invalid_input"
            assert answer["error"]["reason"] == reason
        rows_sent = np.concatenate(sent)

        def summaries() -> list[Any]:
            with lock:
                return [r.summary for r in records if r.summary is not None]

        def complete() -> bool:
            got = summaries()
            with lock:
                explained = sum(r.explanations for r in records)
            return (
                sum(s.n for s in got) == len(rows_sent)
                and sum(s.invalid.total for s in got) == 3
                and explained == 1
            )

        wait_for(complete, timeout=20, what="summaries of every input sent")
        got = summaries()
        with lock:
            assert all(r.model == "digits" and r.version == 1 for r in records if r.summary)
            assert sum(r.predictions for r in records) == len(sent)
        counts = sum(s.feature_counts() for s in got)
        np.testing.assert_array_equal(counts, bin_counts(profile.edge_array(), features(rows_sent)))
        classes = np.sum([s.classes for s in got], axis=0)
        np.testing.assert_array_equal(classes, np.bincount(labels, minlength=CLASSES))
        assert sum(sum(s.confidence) for s in got) == len(rows_sent)
        for reason in refused:
            assert sum(getattr(s.invalid, reason) for s in got) == 1
        assert "refused an input to digits (out_of_range)" in agent.log_text()
    finally:
        coord.stop()
        agent.stop()


def _publish(broker: Mosquitto, device_id: str, payload: bytes) -> None:
    """Publish one telemetry payload as ``device_id`` (QoS 1, acknowledged)."""
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"{device_id}-raw")
    client.username_pw_set(device_id, password(device_id))
    client.connect("127.0.0.1", broker.port)
    client.loop_start()
    try:
        info = client.publish(device_topic(device_id, Channel.TELEMETRY), payload, qos=1)
        info.wait_for_publish(timeout=10)
        assert info.is_published()
    finally:
        client.disconnect()
        client.loop_stop()


def test_a_hostile_summary_is_dropped_without_affecting_other_devices(
    broker: Mosquitto, caplog: pytest.LogCaptureFixture
) -> None:
    summary = WindowSummary.from_arrays(
        n=3, features=[[3] + [0] * 9] * 2, confidence=None, classes=None, invalid=InvalidCounts()
    )
    good = encode(TelemetryBatch(seq=0, records=(record(summary=summary),)),
                  sender=DEVICE, sent_at=1.0)  # fmt: skip
    hostile = encode(TelemetryBatch(seq=0, records=(record(summary=summary),)),
                     sender=HOSTILE, sent_at=1.0).replace(b'"n":3', b'"n":7')  # fmt: skip
    coord = coordinator(broker)
    heard: list[str] = []
    coord.add_listener(
        lambda device_id, envelope, _size: (
            heard.append(device_id) if isinstance(envelope.message, TelemetryBatch) else None
        )
    )
    try:
        with caplog.at_level(logging.WARNING, logger="coordinator.link.base"):
            _publish(broker, HOSTILE, hostile)
            _publish(broker, DEVICE, good)
            wait_for(lambda: DEVICE in heard, what="the good device's telemetry")
        assert HOSTILE not in heard
        assert f"{HOSTILE}/telemetry: bad_summary" in caplog.text
        assert "sums to" in caplog.text
    finally:
        coord.stop()
