"""Helpers of the enrollment tests: a served API with enrollment, a key set, a device.

* :func:`keyset_file` writes a signed version-1 key set (``[enrollment] keyset``).
* :func:`settings_for` gives the ``[enrollment]`` settings for a :class:`Mosquitto`
  started from ``fedge broker config`` (its password file and pid file).
* :func:`served_api` serves the real API app (over ``ops``, with an
  :class:`EnrollmentDesk` on ``store``) with uvicorn on 127.0.0.1 and yields its URL
  and an operator token.
* :func:`enroll_cli` runs ``fedge-agent enroll`` as a separate process.
* :func:`device_client` connects a paho client with an enrolled device's password.
"""

from __future__ import annotations

import queue
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt

from compress.keys import SigningKey
from compress.keyset import KeySet, sign_keyset
from coordinator.service.api import ApiConfig, create_app
from coordinator.service.api.auth_limits import AuthLimits
from coordinator.service.enrollment import DeviceCa, EnrollmentDesk, EnrollmentSettings
from coordinator.service.operations import Actor, Operations
from coordinator.service.store import Store
from coordinator.service.tokens import Role
from tests.api_support import serve
from tests.fleet_support import TIMEOUT, Mosquitto

FLEET = "lab.eu-1"


def keyset_file(directory: Path, key: SigningKey) -> Path:
    """A signed version-1 key set of ``key`` (threshold 1), valid for a year."""
    now = datetime.now(UTC)
    keyset = KeySet(1, (key.public_key,), 1, now - timedelta(days=1), now + timedelta(days=365))
    path = directory / "keyset.json"
    directory.mkdir(parents=True, exist_ok=True)
    path.write_bytes(sign_keyset(keyset, [key]).to_bytes())
    return path


def settings_for(broker: Mosquitto, keyset: Path, **changes: Any) -> EnrollmentSettings:
    """``[enrollment]`` for a broker from ``fedge broker config`` (``generated=True``)."""
    fields: dict[str, Any] = {
        "broker_url": broker.url,
        "password_file": broker.directory / "passwd",
        "broker_pid_file": broker.directory / "mosquitto.pid",
        "keyset": keyset,
        "fleet": FLEET,
    }
    fields.update(changes)
    return EnrollmentSettings(**fields)


@dataclass(frozen=True)
class Served:
    """A served API: its URL, an operator and a viewer token, the desk."""

    url: str
    operator: str
    viewer: str
    desk: EnrollmentDesk


@contextmanager
def served_api(
    ops: Operations,
    store: Store,
    settings: EnrollmentSettings,
    *,
    limits: AuthLimits | None = None,
    forget: Callable[[str], object] | None = None,
    ca: DeviceCa | None = None,
) -> Iterator[Served]:
    """Serve the API with enrollment on 127.0.0.1 (see the module docstring)."""
    _row, operator = store.add_token("ops", Role.OPERATOR, 1.0)
    _row, viewer = store.add_token("view", Role.VIEWER, 1.0)

    def authenticate(token: str) -> Actor | None:
        row = store.authenticate(token, time.time())
        return None if row is None else Actor(row.token_id, row.role)

    def audit_failure(failure: Any) -> None:
        store.audit(
            f"client:{failure.address}", Role.VIEWER, "auth.fail", "",
            detail={"reason": failure.reason, "path": failure.path}, at=1.0,
        )  # fmt: skip

    desk = EnrollmentDesk(store, settings, forget=forget, ca=ca)
    config = ApiConfig(auth_limits=limits or AuthLimits())
    app = create_app(
        ops,
        authenticate=authenticate,
        config=config,
        on_auth_failure=audit_failure,
        enrollment=desk,
    )
    with serve(app) as url:
        yield Served(url, operator, viewer, desk)


def enroll_cli(
    url: str, token: str, device_id: str, out: Path, *extra: str
) -> subprocess.CompletedProcess[str]:
    """``fedge-agent enroll`` in a separate process (``extra``: more of its flags)."""
    return subprocess.run(
        [sys.executable, "-m", "edge_agent.cli", "enroll", "--token", token,
         "--coordinator", url, "--device-id", device_id, "--out", str(out), *extra],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def device_password(out: Path) -> str:
    """The broker password ``fedge-agent enroll`` made in ``out``."""
    return (out / "broker.password").read_text().strip()


class DeviceClient:
    """A paho client (MQTT 3.1.1) logged in with a username and password.

    ``connected`` is the CONNACK's verdict (False without one: a refused TLS
    handshake); ``received`` queues what arrives.
    """

    def __init__(
        self, port: int, username: str, secret: str, *, tls: tuple[Path, Path, Path] | None = None
    ) -> None:
        """Connect (``tls``: CA, client certificate and key, for mutual TLS)."""
        self.received: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self._acks: queue.Queue[Any] = queue.Queue()
        self.disconnects: queue.Queue[Any] = queue.Queue()
        self.mqtt = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=username, protocol=mqtt.MQTTv311
        )
        self.mqtt.username_pw_set(username, secret)
        if tls is not None:
            ca, cert, key = tls
            self.mqtt.tls_set(ca_certs=str(ca), certfile=str(cert), keyfile=str(key))
        self.mqtt.on_connect = lambda _c, _u, _f, reason, _p: self._acks.put(reason)
        self.mqtt.on_subscribe = lambda _c, _u, _mid, reasons, _p: self._acks.put(reasons)
        self.mqtt.on_disconnect = lambda *args: self.disconnects.put(args[3])
        self.mqtt.on_message = lambda _c, _u, msg: self.received.put((msg.topic, msg.payload))
        self.mqtt.connect("127.0.0.1", port)
        self.mqtt.loop_start()
        try:
            self.connected = not self._acks.get(timeout=TIMEOUT).is_failure
        except queue.Empty:  # no CONNACK: the TLS handshake failed
            self.connected = False
        if not self.connected:
            self.mqtt.loop_stop()

    def subscribe(self, *filters: str) -> list[bool]:
        """Subscribe at QoS 1; per filter, whether the broker granted it."""
        self.mqtt.subscribe([(topic, 1) for topic in filters])
        return [not reason.is_failure for reason in self._acks.get(timeout=TIMEOUT)]

    def publish(self, topic: str, payload: bytes) -> None:
        """Publish at QoS 1 and wait for the broker's acknowledgement."""
        self.mqtt.publish(topic, payload, qos=1).wait_for_publish(TIMEOUT)

    def close(self) -> None:
        """Disconnect."""
        self.mqtt.disconnect()
        self.mqtt.loop_stop()
