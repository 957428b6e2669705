"""Opening the state database and running the service inside a CLI process.

* :func:`open_store` opens the SQLite store the way a service runs it: claimed by
  this process and every commit fsynced (``fedge coordinator serve`` and the CLI's
  ``--broker`` mode both use it).
* :func:`local_service` is the CLI's in-process ``--broker`` mode: it opens the
  store, starts a :class:`~coordinator.service.fleet_service.FleetService` on it,
  flushes the retained statuses into the store, hands the service to the command
  and stops and closes everything on exit.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from compress.keys import load_public_key
from compress.signing import TrustedKeys
from coordinator.link.hub import HubConfig, MqttHub
from coordinator.service.fleet_service import FleetService
from coordinator.service.store import Store
from edge_agent.config.agent import BrokerConfig
from edge_agent.protocol import DEFAULT_CHUNK_BYTES

__all__ = ["local_service", "open_store"]


def open_store(db: Path, artifact_dir: Path | None = None) -> Store:
    """Open the state database the way a service runs it: claimed, every commit fsynced.

    The process claims the database (:mod:`coordinator.service.store.owner`): a second
    service, or a CLI command in ``--broker`` mode, on the same file would resume
    and drive the same rollouts. With ``synchronous=FULL`` what the service
    acknowledged (an upload, a rollout, an operator's action and its audit line)
    survives a power cut too, not only a killed process; the cost, an fsync per
    commit, is small next to the network round trips each commit answers.

    Raises:
        DatabaseInUseError: another coordinator process runs this database.
        StoreError: the database cannot be opened.
    """
    return Store.open(db, artifact_dir=artifact_dir, synchronous="FULL", owner=True)


@contextmanager
def local_service(
    broker: BrokerConfig,
    *,
    db: Path,
    trust: Sequence[Path] = (),
    threshold: int = 1,
    timeout: float = 10.0,
    chunk_size: int = DEFAULT_CHUNK_BYTES,
) -> Iterator[FleetService]:
    """The CLI's in-process ``--broker`` mode: a started service, stopped on exit.

    State lives in ``db`` like the long-running service's, so a rollout started
    here is resumed by whichever process opens that database next. ``chunk_size``
    is the hub's (the payload's bytes per chunk).

    Raises:
        StoreError: the database cannot be opened.
        BrokerError: the broker cannot be reached.
        CompressError: a trusted key cannot be read, or a bad threshold.
    """
    trusted = (
        TrustedKeys.of([load_public_key(path) for path in trust], threshold) if trust else None
    )
    store = open_store(db)
    try:
        service = FleetService(
            store, MqttHub(HubConfig(broker=broker, chunk_size=chunk_size)), trusted
        )
        service.start(timeout)
        try:
            service.ingest.flush()  # the retained statuses, stored before the command reads
            yield service
        finally:
            service.stop()
    finally:
        store.close()
