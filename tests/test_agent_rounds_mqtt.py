"""A real agent over mosquitto while it trains: the worker stays responsive, stop never hangs.

An in-process agent (its own network loop, as on a device) takes a train task whose
trainer is held at a gate (a plugged-in trainer registered with ``register_trainer``:
no sleeps). While the training waits on the agent's training thread, the agent's
worker still answers a rollback command and keeps publishing telemetry; once the gate
opens, the update report arrives. An agent stopped during a training stops anyway.
The agent's retained status lists the PyTorch models its owner allowed; it trains a
zoo CNN on image data and refuses a model spec it does not allow (this one needs the
torch trainer).
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from compress.families import init_weights
from coordinator.link.hub import MqttHub
from edge_agent.agent import Agent
from edge_agent.config.agent import TrainingConfig
from edge_agent.protocol import (
    Envelope,
    ErrorReport,
    InstallState,
    InstallStatus,
    Message,
    Rollback,
    Status,
    TaskAction,
    TrainTask,
    UpdateReport,
    encode_arrays,
)
from edge_agent.training.model_spec import ZOO_MODULE, torch_available
from edge_agent.training.participant import STOP_TIMEOUT_S
from tests.fleet_support import CLASSES, FEATURES, InProcessFleet, Mosquitto, coordinator, wait_for
from tests.training_support import HOLD_S, Gate

pytestmark = pytest.mark.slow

DEVICE = "pi-1"
OWN_SPEC = "owner_models.nets:tiny_net"


@pytest.fixture
def broker_users() -> list[str]:
    return [DEVICE]


class Heard:
    """Everything the coordinator hears from the device (the hub's listener)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._messages: list[Message] = []

    def __call__(self, device_id: str, envelope: Envelope, _size: int) -> None:
        if device_id == DEVICE:
            with self._lock:
                self._messages.append(envelope.message)

    def of(self, kind: type[Any]) -> list[Any]:
        with self._lock:
            return [m for m in self._messages if isinstance(m, kind)]


@pytest.fixture
def sample_shape() -> tuple[int, ...]:
    """One local example's shape (rows of FEATURES unless a test says otherwise)."""
    return (FEATURES,)


@pytest.fixture
def device(
    tmp_path: Path, broker: Mosquitto, fleet: InProcessFleet, sample_shape: tuple[int, ...]
) -> Iterator[tuple[Agent, MqttHub, Heard]]:
    shard = tmp_path / "shard"
    shard.mkdir()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((40, *sample_shape)).astype(np.float32)
    np.savez(shard / "local.npz", x=x, y=rng.integers(0, CLASSES, 40))
    heard = Heard()
    hub = coordinator(broker)
    hub.add_listener(heard)  # before the agent starts: its first status is heard
    try:
        agent = fleet.start(
            DEVICE, private_loop=True, training=TrainingConfig(data=shard, models=(OWN_SPEC,))
        )
        wait_for(lambda: heard.of(Status), what="the device's status")
        yield agent, hub, heard
    finally:
        hub.stop()


def send_task(hub: MqttHub, family: str, weights: dict[str, Any], **fields: Any) -> TrainTask:
    """A train task for ``weights``, sent with its weights pushed to the device."""
    index, body = encode_arrays(weights)
    transfer_id = hub.serve_payload(body)
    task = TrainTask(
        round_id="r1",
        task_id=uuid.uuid4().hex,
        action=TaskAction.TRAIN,
        model="m",
        family=family,
        weights_transfer_id=transfer_id,
        weights_size=len(body),
        weights_index=index,
        chunk_size=hub.chunk_size,
        codec="fp32",
        deadline=time.time() + 600,
        config={"epochs": 1, "batch_size": 8, "lr": 0.05, "seed": 1},
        **fields,
    )
    assert hub.send(DEVICE, task) > 0
    assert hub.push_payload(transfer_id, [DEVICE])
    return task


def start_gated_training(hub: MqttHub, gate: Gate) -> TrainTask:
    weights = init_weights("softmax", [FEATURES, CLASSES], np.random.default_rng(1))
    task = send_task(hub, "gated", weights)
    assert gate.started.wait(HOLD_S), "the training never started"
    return task


def test_the_worker_answers_commands_and_sends_telemetry_while_training_runs(
    device: tuple[Agent, MqttHub, Heard], gate: Gate
) -> None:
    agent, hub, heard = device
    task = start_gated_training(hub, gate)

    hub.send(DEVICE, Rollback(model="digits", reason="while it trains"))
    answer = wait_for(
        lambda: [s for s in heard.of(InstallStatus) if s.error_code == "not_installed"],
        what="the rollback's answer during training",
    )
    assert answer[0].state is InstallState.FAILED
    telemetry = agent.telemetry_published
    wait_for(lambda: agent.telemetry_published > telemetry, what="telemetry during training")
    assert not gate.release.is_set()
    assert heard.of(UpdateReport) == []  # still training

    gate.release.set()
    reports = wait_for(lambda: heard.of(UpdateReport), what="the update report")
    assert [r.task_id for r in reports] == [task.task_id]


def test_stopping_the_agent_during_a_training_does_not_wait_for_it(
    device: tuple[Agent, MqttHub, Heard], gate: Gate
) -> None:
    agent, hub, heard = device
    start_gated_training(hub, gate)
    started = time.monotonic()
    agent.stop()
    assert time.monotonic() - started < HOLD_S / 2  # the held training was abandoned
    assert wait_for(lambda: any(not s.online for s in heard.of(Status)), what="offline status")
    gate.release.set()
    assert heard.of(UpdateReport) == []


def test_the_status_lists_the_models_the_owner_allowed(
    device: tuple[Agent, MqttHub, Heard],
) -> None:
    _, _, heard = device
    status = heard.of(Status)[-1]
    if torch_available():
        assert OWN_SPEC in status.train_models
        assert f"{ZOO_MODULE}:small_cnn" in status.train_models
        assert list(status.train_models) == sorted(status.train_models)
    else:
        assert status.train_models == ()
    assert STOP_TIMEOUT_S < HOLD_S / 2


@pytest.mark.parametrize("sample_shape", [(1, 8, 8)])
def test_an_agent_trains_a_zoo_cnn_and_refuses_an_unknown_model(
    device: tuple[Agent, MqttHub, Heard],
) -> None:
    from edge_agent.training.torch_models import initial_weights  # noqa: PLC0415 - needs torch

    _, hub, heard = device
    args: dict[str, int | float | str | bool] = {"input_shape": "1,8,8", "num_outputs": CLASSES}
    weights = initial_weights(
        "zoo:small_cnn", task="classification", input_shape=(1, 8, 8), num_outputs=CLASSES, seed=0
    )
    refused = send_task(
        hub, "torch", dict(weights), model_spec="evil_models.payload:build", model_args=args
    )
    error = wait_for(lambda: heard.of(ErrorReport), what="the refusal")[0]
    assert (error.code, error.ref) == ("unknown_model", refused.task_id)

    task = send_task(hub, "torch", dict(weights), model_spec="zoo:small_cnn", model_args=args)
    report = wait_for(lambda: heard.of(UpdateReport), what="the torch update")[0]
    assert report.task_id == task.task_id
    assert report.num_examples == 32  # 40 examples, 20 % held out
    assert [a.ref for a in heard.of(ErrorReport)] == [refused.task_id]
