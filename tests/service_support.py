"""A coordinator service on a real broker, for the MQTT tests of the service.

:func:`open_service` starts a :class:`~coordinator.service.fleet_service.FleetService`
the way ``fedge coordinator serve`` does, on the test's Mosquitto (logged in as the
``coordinator`` user), with its state database in the test's directory and the
test's signing key as the one trusted key. :func:`running_service` does the same
and stops the service and closes its store when the test is done.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from compress.keys import SigningKey
from compress.signing import TrustedKeys
from coordinator.link.hub import HubConfig, MqttHub
from coordinator.service.fleet_service import FleetService, ServiceSettings
from coordinator.service.store import Store
from tests.fleet_support import Mosquitto


def open_service(
    tmp_path: Path,
    broker: Mosquitto,
    signing_key: SigningKey,
    settings: ServiceSettings,
    *,
    session: str | None = None,
) -> FleetService:
    """A started service with its database at ``tmp_path/coordinator.db`` (the caller
    stops it and closes its store)."""
    store = Store.open(tmp_path / "coordinator.db")
    hub = MqttHub(HubConfig(broker=broker.broker("coordinator"), session=session))
    service = FleetService(store, hub, TrustedKeys.of([signing_key.public_key]), settings=settings)
    service.start()
    return service


@contextmanager
def running_service(
    tmp_path: Path, broker: Mosquitto, signing_key: SigningKey, settings: ServiceSettings
) -> Iterator[FleetService]:
    """:func:`open_service`, stopped and its store closed on exit."""
    service = open_service(tmp_path, broker, signing_key, settings)
    try:
        yield service
    finally:
        service.stop()
        service.store.close()
