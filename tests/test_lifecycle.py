"""``with obj:`` on the coordinator's long-lived objects (:mod:`coordinator.lifecycle`).

A Startable starts on entering; every kind lets go on leaving, whether the block ends
normally or raises (the exception propagates); the block gets the object itself.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from coordinator.delivery.deliveries import Deliveries
from coordinator.lifecycle import Closeable, Startable, Stoppable
from coordinator.link.hub import MqttHub
from coordinator.link.memory import MemoryHub
from coordinator.service.store import Store
from coordinator.sim.embedded_broker import EmbeddedBroker
from coordinator.sim.local_fleet import LocalFleet


class Calls:
    """Records the lifecycle calls made on it."""

    def __init__(self) -> None:
        self.calls: list[str] = []


class Engine(Calls, Startable):
    def start(self) -> None:
        self.calls.append("start")

    def stop(self) -> None:
        self.calls.append("stop")


class Running(Calls, Stoppable):
    def stop(self) -> None:
        self.calls.append("stop")


class Handle(Calls, Closeable):
    def close(self) -> None:
        self.calls.append("close")


@pytest.mark.parametrize(
    ("kind", "expected"),
    [(Engine, ["start", "stop"]), (Running, ["stop"]), (Handle, ["close"])],
)
def test_with_gives_the_object_and_lets_go_at_the_end(
    kind: type[Calls], expected: list[str]
) -> None:
    obj = kind()
    with obj as entered:  # type: ignore[attr-defined]
        assert entered is obj
        assert obj.calls == expected[:-1]
    assert obj.calls == expected


@pytest.mark.parametrize(("kind", "last"), [(Engine, "stop"), (Running, "stop"), (Handle, "close")])
def test_an_exception_in_the_block_lets_go_and_propagates(kind: type[Calls], last: str) -> None:
    obj = kind()
    with pytest.raises(KeyError, match="boom"), obj:  # type: ignore[attr-defined]
        raise KeyError("boom")
    assert obj.calls[-1] == last


def test_a_sub_class_must_say_how_it_lets_go() -> None:
    class Nothing(Stoppable):
        pass

    with pytest.raises(TypeError, match="stop"):
        Nothing()  # type: ignore[abstract]


@pytest.mark.parametrize(
    ("cls", "kind"),
    [
        (MqttHub, Startable),
        (EmbeddedBroker, Startable),
        (LocalFleet, Stoppable),
        (Deliveries, Closeable),
        (Store, Closeable),
    ],
)
def test_the_coordinators_resources_use_the_one_implementation(cls: type, kind: type) -> None:
    assert issubclass(cls, kind)
    assert cls.__exit__ is kind.__exit__
    assert cls.__enter__ is kind.__enter__


def test_a_store_and_deliveries_close_on_leaving(tmp_path: Path) -> None:
    with Store.open(":memory:", artifact_dir=tmp_path) as store:
        pass
    with pytest.raises(Exception, match="closed"):
        store.devices()
    hub = MemoryHub()
    with Deliveries(hub):
        assert hub._listeners  # listening from construction on
    assert not hub._listeners
