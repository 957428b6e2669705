"""The hub as the rest of the coordinator sees it: a small :class:`typing.Protocol`.

Every part that talks to devices (one-shot deliveries, the rollout manager, the
federated grid and runs, the service) needs the same few things from the link:
the fleet view built from the devices' statuses, a way to hear device messages,
a way to send a command to one device, and payloads served as chunks. They take a
:class:`Hub`, so they run against either implementation:

* :class:`~coordinator.link.hub.MqttHub`: one MQTT connection to the fleet's broker;
* :class:`~coordinator.link.memory.MemoryHub`: the in-memory twin, for tests: a
  test says what devices send and reads what the hub published.

Both are held to one contract test (``tests/test_hub_contract.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from coordinator.link.fleet import DeviceRecord
from edge_agent.protocol import Envelope, Limits, Message

__all__ = ["ConnectListener", "Hub", "Listener"]

Listener = Callable[[str, Envelope, int], None]
"""Sees every device message the hub decodes: ``(device_id, envelope, payload
bytes)``; called after the hub applied it to the fleet view, on the thread that
received it (the MQTT link's network thread), outside the hub's lock: keep it quick,
never block. Listeners are called in the order they were added."""

ConnectListener = Callable[[], None]
"""Called after every (re)connection to the broker, on the network thread."""


class Hub(Protocol):
    """The coordinator's link to the fleet (see the module docstring)."""

    @property
    def chunk_size(self) -> int:
        """Bytes per chunk of a served payload."""
        ...

    @property
    def limits(self) -> Limits:
        """The protocol limits messages are encoded and decoded with."""
        ...

    def start(self, timeout: float = 10.0) -> None:
        """Connect and load the fleet's retained statuses.

        Raises:
            BrokerError: no connection within ``timeout`` seconds.
        """
        ...

    def stop(self) -> None:
        """Stop serving chunks and disconnect (idempotent)."""
        ...

    def sync_fleet(self) -> None:
        """Wait until the statuses the broker holds have arrived."""
        ...

    def fleet(self) -> list[DeviceRecord]:
        """Every device seen, sorted by id."""
        ...

    def device(self, device_id: str) -> DeviceRecord | None:
        """One device's record, or None if no status of it was seen."""
        ...

    def add_listener(self, listener: Listener) -> None:
        """Let ``listener`` see every decoded device message."""
        ...

    def remove_listener(self, listener: Listener) -> None:
        """Stop calling ``listener`` (no error if it was not added)."""
        ...

    def add_connect_listener(self, listener: ConnectListener) -> None:
        """Call ``listener`` after every (re)connection."""
        ...

    def remove_connect_listener(self, listener: ConnectListener) -> None:
        """Stop calling ``listener`` (no error if it was not added)."""
        ...

    def send(self, device_id: str, message: Message, *, msg_id: str | None = None) -> int:
        """Send a command to one device.

        Returns:
            The encoded message's size in bytes, or 0 if it could not go out
            (disconnected).
        """
        ...

    def publish_retained(self, name: str, message: Message) -> int:
        """Publish a message on the broadcast topic ``name``, retained by the broker.

        Returns:
            The encoded message's size in bytes, or 0 if it could not go out
            (disconnected).
        """
        ...

    def serve_payload(self, payload: bytes) -> str:
        """Answer chunk requests for ``payload`` until :meth:`withdraw_payload`.

        Returns:
            The transfer id (the payload's sha256).
        """
        ...

    def withdraw_payload(self, transfer_id: str) -> None:
        """Stop serving a payload given to :meth:`serve_payload`."""
        ...

    def push_payload(self, transfer_id: str, device_ids: list[str]) -> bool:
        """Send every chunk of a served payload once (broadcast for two or more devices).

        Returns:
            False if the connection was lost before everything went out.
        """
        ...

    def bytes_sent(self, transfer_id: str) -> int:
        """Encoded bytes of the chunks of ``transfer_id`` sent so far."""
        ...
