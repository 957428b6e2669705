"""The in-process fleet's waits (:mod:`coordinator.sim.local_fleet`), against a MemoryHub.

``wait_eligible`` returns once the hub sees enough online devices with training data,
and raises :class:`RunError` when they do not come within the timeout.
"""

from __future__ import annotations

import threading

import pytest

from coordinator.errors import RunError
from coordinator.link.memory import MemoryHub
from coordinator.sim.local_fleet import LocalFleet
from edge_agent.protocol import Status


def _status(examples: int, *, online: bool = True) -> Status:
    return Status(online=online, agent_version="0.1.0", train_examples=examples)


def test_wait_eligible_returns_once_enough_devices_can_train() -> None:
    hub = MemoryHub()
    hub.receive("d0", _status(10))
    hub.receive("d1", _status(0))  # online, no data
    hub.receive("d2", _status(5, online=False))
    timer = threading.Timer(0.1, lambda: hub.receive("d3", _status(7)))
    timer.start()
    try:
        LocalFleet([]).wait_eligible(hub, 2, timeout=10.0)
    finally:
        timer.cancel()
    assert sorted(r.device_id for r in hub.fleet() if r.can_train) == ["d0", "d3"]


def test_wait_eligible_raises_when_too_few_come() -> None:
    hub = MemoryHub()
    hub.receive("d0", _status(10))
    hub.receive("d1", _status(0))
    with pytest.raises(RunError, match=r"fewer than 2 devices with data came online in 0\.2 s"):
        LocalFleet([]).wait_eligible(hub, 2, timeout=0.2)
