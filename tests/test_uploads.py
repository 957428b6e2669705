"""Chunked uploads from devices: bounded memory, fixed chunk size, per-device budget.

The attack (issue 17, item 6): an upload sent in 1-byte chunks held ~112x its
declared size in coordinator memory (a dict of one-byte ``bytes`` objects). Now
the first chunk fixes the chunk size, which must be at least 4 KiB; chunks go into
one preallocated buffer of the declared size; a device's uploads in flight stay
within a byte budget. Each refusal is an :class:`UploadRefusedError`, logged and
counted, and the report naming the upload is rejected with its reason.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, RecordDict

from compress.codecs import encode_update, parse_codec
from coordinator.errors import UpdateRejectedError, UploadRefusedError
from coordinator.federated.grid import MqttGrid
from coordinator.federated.tasks import GridSettings, node_id_of
from coordinator.federated.update_check import UPDATE_ARRAY
from coordinator.federated.uploads import (
    BUDGET_FACTOR,
    MIN_UPLOAD_CHUNK_BYTES,
    UploadReceiver,
)
from coordinator.link.hub import MqttHub
from coordinator.link.memory import MemoryHub
from coordinator.link.port import Hub
from edge_agent.protocol import (
    Channel,
    Chunk,
    Status,
    UpdateReport,
    chunk_count,
    device_topic,
    encode,
    encode_arrays,
    sha256_hex,
)
from edge_agent.protocol import (
    Message as WireMessage,
)
from tests.fleet_support import Mosquitto, coordinator, password, wait_for

LIMIT = 1 << 20


def chunks_of(payload: bytes, chunk_size: int) -> list[Chunk]:
    transfer_id = sha256_hex(payload)
    return [
        Chunk.from_payload(payload, i, chunk_size=chunk_size, transfer_id=transfer_id)
        for i in range(chunk_count(len(payload), chunk_size))
    ]


def payload_of(size: int, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes()


# ----------------------------------------------------------------- the receiver


def test_an_honest_upload_is_reassembled_and_held_at_its_declared_size() -> None:
    payload = payload_of(50_000)
    uploads = UploadReceiver()
    for chunk in reversed(chunks_of(payload, MIN_UPLOAD_CHUNK_BYTES)):  # any order
        uploads.receive("dev1", chunk, limit=LIMIT)
    held = uploads.held_bytes("dev1")
    assert len(payload) <= held <= len(payload) * 1.001
    assert bytes(uploads.take("dev1", sha256_hex(payload))) == payload
    assert uploads.held_bytes() == 0
    assert not uploads.refusals


def test_one_byte_chunks_are_refused_and_hold_nothing(caplog: pytest.LogCaptureFixture) -> None:
    payload = payload_of(20_000)
    uploads = UploadReceiver()
    first, *rest = chunks_of(payload, 1)
    with caplog.at_level(logging.WARNING), pytest.raises(UploadRefusedError) as info:
        uploads.receive("dev1", first, limit=LIMIT)
    assert info.value.reason == "upload_chunk_size"
    assert "upload_chunk_size" in caplog.text
    assert "dev1" in caplog.text
    for chunk in rest[:2000]:  # the rest is dropped quietly, and never held
        uploads.receive("dev1", chunk, limit=LIMIT)
    assert uploads.held_bytes() == 0
    assert uploads.refusals == {"upload_chunk_size": 1}
    with pytest.raises(UploadRefusedError, match="upload_chunk_size"):
        uploads.take("dev1", sha256_hex(payload))


def test_a_small_payload_may_travel_as_one_short_chunk() -> None:
    payload = payload_of(100)
    uploads = UploadReceiver()
    [chunk] = chunks_of(payload, 64 * 1024)
    uploads.receive("dev1", chunk, limit=LIMIT)
    assert bytes(uploads.take("dev1", sha256_hex(payload))) == payload


def test_a_chunk_size_changed_mid_upload_drops_the_upload() -> None:
    payload = payload_of(3 * 8192)
    uploads = UploadReceiver()
    uploads.receive("dev1", chunks_of(payload, 8192)[0], limit=LIMIT)
    with pytest.raises(UploadRefusedError) as info:
        uploads.receive("dev1", chunks_of(payload, 4096)[3], limit=LIMIT)
    assert info.value.reason == "upload_chunk_size"
    assert uploads.held_bytes() == 0


def test_an_upload_larger_than_the_model_allows_is_refused() -> None:
    payload = payload_of(3 * 4096)
    uploads = UploadReceiver()
    with pytest.raises(UploadRefusedError) as info:
        uploads.receive("dev1", chunks_of(payload, 4096)[0], limit=2 * 4096)
    assert info.value.reason == "oversized"
    assert uploads.held_bytes() == 0


def test_a_device_cannot_hold_more_than_its_budget_in_flight() -> None:
    size = 40_000
    uploads = UploadReceiver()  # default budget: 4 largest updates
    for seed in range(BUDGET_FACTOR):
        uploads.receive("dev1", chunks_of(payload_of(size, seed), 4096)[0], limit=size)
    with pytest.raises(UploadRefusedError) as info:
        uploads.receive("dev1", chunks_of(payload_of(size, 99), 4096)[0], limit=size)
    assert info.value.reason == "upload_budget"
    assert uploads.held_bytes("dev1") <= BUDGET_FACTOR * size * 1.001
    # another device has its own budget
    uploads.receive("dev2", chunks_of(payload_of(size, 99), 4096)[0], limit=size)
    assert uploads.refusals == {"upload_budget": 1}


def test_a_configured_budget_is_kept() -> None:
    uploads = UploadReceiver(budget_bytes=10_000)
    with pytest.raises(UploadRefusedError, match="budget 10000"):
        uploads.receive("dev1", chunks_of(payload_of(12_000), 4096)[0], limit=LIMIT)


def test_an_incomplete_upload_is_malformed() -> None:
    payload = payload_of(3 * 4096)
    uploads = UploadReceiver()
    uploads.receive("dev1", chunks_of(payload, 4096)[0], limit=LIMIT)
    with pytest.raises(UpdateRejectedError) as info:
        uploads.take("dev1", sha256_hex(payload))
    assert info.value.reason == "malformed"
    assert not isinstance(info.value, UploadRefusedError)


def test_the_budget_must_be_positive() -> None:
    with pytest.raises(ValueError, match="positive"):
        UploadReceiver(budget_bytes=0)


# ---------------------------------------------------------------- in the grid


def _grid_with_task(hub: MemoryHub) -> tuple[MqttGrid, str, dict[str, np.ndarray]]:
    hub.start()
    hub.receive("dev1", Status(online=True, agent_version="1"))
    settings = GridSettings(model="m", family="softmax", codec=parse_codec("fp32"), gather_s=0.01)
    grid = MqttGrid(hub, settings)
    task_id, weights = _train_task(grid, 1)
    return grid, task_id, weights


def _train_task(grid: MqttGrid, round_no: int) -> tuple[str, dict[str, np.ndarray]]:
    """Open a phase with one train task for dev1."""
    grid.begin_phase(round_no, ["dev1"], time.time() + 60)
    weights = {"W": np.zeros((64, 64), np.float32), "b": np.zeros(64, np.float32)}
    content = RecordDict(
        {
            "arrays": ArrayRecord({k: Array(v) for k, v in weights.items()}),
            "config": ConfigRecord({}),
        }
    )
    message = Message(content, dst_node_id=node_id_of("dev1"), message_type=MessageType.TRAIN)
    [task_id] = grid.push_messages([message])
    return task_id, weights


def _update_body(weights: dict[str, np.ndarray]) -> tuple[bytes, tuple]:  # type: ignore[type-arg]
    delta = {k: np.full_like(v, 0.01) for k, v in weights.items()}
    encoded = encode_update(delta, parse_codec("fp32"), rng=np.random.default_rng(0))
    update = np.frombuffer(encoded.payload, dtype=np.uint8)
    index, body = encode_arrays({UPDATE_ARRAY: update})
    return bytes(body), index


def _report(task_id: str, body: bytes, index: tuple, round_no: int = 1) -> UpdateReport:  # type: ignore[type-arg]
    return UpdateReport(
        round_id=f"r{round_no}",
        task_id=task_id,
        num_examples=10,
        codec="fp32",
        metrics={},
        upload_transfer_id=sha256_hex(body),
        upload_index=index,
    )


def test_the_one_byte_chunk_attack_on_the_grid_holds_nothing_and_is_rejected() -> None:
    hub = MemoryHub()
    grid, task_id, weights = _grid_with_task(hub)
    try:
        body, index = _update_body(weights)
        for chunk in chunks_of(body, 1)[:3000]:
            hub.receive("dev1", chunk)
        assert grid.pull_messages([task_id]) == []  # drains the queue
        assert grid.uploads.held_bytes() == 0
        assert grid.uploads.refusals == {"upload_chunk_size": 1}
        hub.receive("dev1", _report(task_id, body, index))
        assert grid.pull_messages([task_id]) == []
        assert grid.end_phase().rejected == {"upload_chunk_size": 1}
    finally:
        grid.close()
        hub.stop()


def test_an_honest_upload_on_the_grid_becomes_a_reply() -> None:
    hub = MemoryHub()
    grid, task_id, weights = _grid_with_task(hub)
    try:
        body, index = _update_body(weights)
        for chunk in chunks_of(body, 4096):
            hub.receive("dev1", chunk)
        grid.pull_messages([task_id])
        held = grid.uploads.held_bytes("dev1")
        assert len(body) <= held <= len(body) * 1.001
        hub.receive("dev1", _report(task_id, body, index))
        [reply] = grid.pull_messages([task_id])
        new = reply.content.array_records["arrays"]["W"].numpy()
        assert np.allclose(new, 0.01)
        assert grid.uploads.held_bytes() == 0
        assert not grid.uploads.refusals
    finally:
        grid.close()
        hub.stop()


# ------------------------------------------------- over a real mosquitto broker


@pytest.fixture
def broker_users() -> Sequence[str]:
    return ("dev1",)


class Device:
    """A raw MQTT client logged in as dev1: it publishes whatever the test says."""

    def __init__(self, broker: Mosquitto) -> None:
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="dev1")
        self.client.username_pw_set("dev1", password("dev1"))
        self.client.connect("127.0.0.1", broker.port)
        self.client.loop_start()

    def send(self, messages: Sequence[WireMessage]) -> None:
        infos = [
            self.client.publish(
                device_topic("dev1", Channel.EVENTS),
                encode(message, sender="dev1", sent_at=time.time()),
                qos=1,
            )
            for message in messages
        ]
        for info in infos:
            info.wait_for_publish(10)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def mqtt_grid(broker: Mosquitto) -> Iterator[tuple[MqttGrid, Hub, Device]]:
    hub: MqttHub = coordinator(broker)
    settings = GridSettings(model="m", family="softmax", codec=parse_codec("fp32"), gather_s=0.01)
    grid = MqttGrid(hub, settings)
    device = Device(broker)
    try:
        yield grid, hub, device
    finally:
        device.close()
        grid.close()
        hub.stop()


def test_over_mosquitto_one_byte_chunks_are_refused_and_an_honest_upload_still_counts(
    mqtt_grid: tuple[MqttGrid, Hub, Device], caplog: pytest.LogCaptureFixture
) -> None:
    grid, _hub, device = mqtt_grid
    task_id, weights = _train_task(grid, 1)
    body, index = _update_body(weights)
    with caplog.at_level(logging.WARNING, logger="coordinator.federated.uploads"):
        device.send([*chunks_of(body, 1)[:2000], _report(task_id, body, index)])

        def rejected() -> bool:
            grid.pull_messages([task_id])
            return bool(grid.stats.rejected)

        wait_for(rejected, what="the report rejected")
    assert grid.stats.rejected == {"upload_chunk_size": 1}
    assert grid.uploads.refusals == {"upload_chunk_size": 1}
    assert grid.uploads.held_bytes() == 0
    assert "refused: chunks of 1 bytes (at least 4096)" in caplog.text
    grid.end_phase()

    # Normal operation is unaffected: the next round's honest upload becomes a reply.
    task_id, weights = _train_task(grid, 2)
    device.send([*chunks_of(body, 64 * 1024), _report(task_id, body, index, round_no=2)])
    replies: list[Message] = []
    wait_for(lambda: replies.extend(grid.pull_messages([task_id])) or replies, what="a reply")
    assert np.allclose(replies[0].content.array_records["arrays"]["W"].numpy(), 0.01)
    assert grid.uploads.refusals == {"upload_chunk_size": 1}
