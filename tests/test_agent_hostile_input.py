"""Property test: nothing an agent receives can make its message handling raise.

The agent is built (by the suite's ``InProcessFleet``, on the module's broker) but
not started: messages go straight to its handler, as the worker thread would pass
them. Inputs are random bytes and valid
coordinator messages (deploy, chunk, rollback) mangled by truncation, bit flips and
wrong topics. Whatever arrives, the handler returns, the agent keeps its model,
and nothing is staged unless a deploy with a trusted manifest got through intact.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from compress.keys import generate_signing_key
from coordinator.delivery.deliveries import Artifact
from edge_agent.agent import Agent
from edge_agent.protocol import (
    Channel,
    Chunk,
    Deploy,
    Rollback,
    broadcast_topic,
    chunk_count,
    device_topic,
    encode,
)
from tests.fleet_support import (
    FEATURES,
    InProcessFleet,
    Mosquitto,
    make_artifact,
    public_key_file,
)

DEVICE = "dev-0"


@pytest.fixture(scope="module")
def module_broker_users() -> list[str]:
    return [DEVICE]


@pytest.fixture(scope="module")
def world(
    module_broker: Mosquitto, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Agent, list[bytes]]]:
    """An unstarted agent serving v1, and valid coordinator messages to mangle."""
    directory = tmp_path_factory.mktemp("hostile")
    key = generate_signing_key()
    trust = public_key_file(directory / "keys", key)
    devices = InProcessFleet(module_broker, directory / "agents", trust)
    agent = devices.build(DEVICE, private_loop=True)  # never started
    try:
        v1 = Artifact.load(make_artifact(directory, key, version=1))
        v2 = Artifact.load(make_artifact(directory, key, version=2, hidden=256))
        agent.updates.restore()
        valid = []
        for artifact in (v1, v2):
            deploy = Deploy(
                deployment_id="d",
                transfer_id=artifact.transfer_id,
                total_size=len(artifact.payload),
                chunk_size=1024,
                chunk_count=chunk_count(len(artifact.payload), 1024),
                manifest=artifact.signed.to_bytes(),
            )
            valid.append(encode(deploy, sender="coordinator", sent_at=0.0))
            chunk = Chunk.from_payload(artifact.payload, 0, chunk_size=1024)
            valid.append(encode(chunk, sender="coordinator", sent_at=0.0))
        valid.append(encode(Rollback(model="digits"), sender="coordinator", sent_at=0.0))
        # Install v1 the normal way, so there is a model to keep serving.
        agent._on_message(device_topic(DEVICE, Channel.CMD), valid[0])
        agent._on_message(device_topic(DEVICE, Channel.CHUNKS), encode(
            Chunk.from_payload(v1.payload, 0, chunk_size=1024), sender="coordinator", sent_at=0.0
        ))  # fmt: skip
        for index in range(1, chunk_count(len(v1.payload), 1024)):
            chunk = Chunk.from_payload(v1.payload, index, chunk_size=1024)
            agent._on_message(
                broadcast_topic(v1.transfer_id), encode(chunk, sender="coordinator", sent_at=0.0)
            )
        assert agent.model is not None
        assert agent.model.version == 1
        yield agent, valid
    finally:
        agent.updates.close()
        devices.stop()


TOPICS = [
    device_topic(DEVICE, Channel.CMD),
    device_topic(DEVICE, Channel.CHUNKS),
    device_topic("dev-9", Channel.CMD),
    device_topic(DEVICE, Channel.EVENTS),
    "fedge/v1/broadcast/" + "0" * 64,
    "fedge/v1/devices/dev-0",
    "elsewhere/entirely",
]


@st.composite
def hostile(draw: st.DrawFn, valid: list[bytes]) -> bytes:
    kind = draw(st.sampled_from(["random", "truncate", "flip", "splice"]))
    if kind == "random":
        return draw(st.binary(max_size=2048))
    base = draw(st.sampled_from(valid))
    rng = random.Random(draw(st.integers(0, 2**32 - 1)))
    if kind == "truncate":
        return base[: rng.randrange(len(base))]
    data = bytearray(base)
    if kind == "flip":
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        return bytes(data)
    other = draw(st.sampled_from(valid))
    cut = rng.randrange(min(len(data), len(other)))
    return bytes(data[:cut] + other[cut:])


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_no_input_breaks_the_agent(world: tuple[Agent, list[bytes]], data: st.DataObject) -> None:
    agent, valid = world
    payload = data.draw(hostile(valid))
    topic = data.draw(st.sampled_from(TOPICS))

    agent._on_message(topic, payload)  # must return, whatever the input

    assert agent.model is not None
    prediction = agent.predict(np.zeros(FEATURES, dtype=np.float32))
    assert prediction.model == "digits"
    staging = agent.config.data_dir / "staging"
    transfer = agent.updates.transfer
    if transfer is not None:  # only a deploy whose signed manifest verified may stage
        assert transfer.staged.directory.parent == staging
        assert transfer.manifest.version in (1, 2)


def test_random_bytes_are_counted_as_dropped(world: tuple[Agent, list[bytes]]) -> None:
    agent, _ = world
    before = agent.counters.dropped
    agent._on_message(device_topic(DEVICE, Channel.CMD), b"\x00" * 40)
    agent._on_message(device_topic("dev-9", Channel.CMD), b"FEDG")
    assert agent.counters.dropped == before + 2
