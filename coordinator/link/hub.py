"""The operator side of over-the-air delivery: one object the CLI (and later the
long-running service) drives.

:class:`Coordinator` holds one MQTT connection as the ``coordinator`` user and
keeps a :class:`~coordinator.link.fleet.Fleet` from the agents' retained status
messages. Workflow::

    with Coordinator(CoordinatorConfig(broker)) as coordinator:   # connects, syncs fleet
        records = coordinator.fleet()
        run = coordinator.deploy(Artifact.load(path), Target.parse("tag:camera"))
        result = coordinator.wait(run, timeout=120, on_change=redraw)

Delivering one artifact:

1. ``deploy`` resolves the target against the fleet and sends one ``deploy``
   command (the signed manifest plus the transfer's sizes) to every targeted
   online device; offline ones are tracked as offline and get the command again
   when their status says they are back.
2. Each agent checks the manifest and answers ``accepted`` or ``rejected`` (with
   the reason) before anything is downloaded. Once every device answered (or
   ``accept_wait_s`` passed), the payload goes out once: as broadcast chunks on
   ``fedge/v1/broadcast/<transfer_id>`` when two or more devices accepted, on the
   device's own ``chunks`` topic when one did.
3. Whatever a device missed (broker restart, agent restart, a late accept) it asks
   for with ``chunk_request``; a sender thread answers, once on the broadcast topic
   for chunks several devices want, else to the device alone
   (:mod:`coordinator.link.chunk_sender`).
4. ``install_status`` reports move the device through the
   :class:`~coordinator.delivery.tracker.DeploymentTracker`; ``wait`` returns when every
   device has an outcome or the timeout expires.

Only the ``coordinator`` MQTT user may publish commands and chunks (the broker ACL);
agents check the manifest's signatures themselves, so the coordinator needs no
signing key to deliver an artifact. Incoming messages are decoded strictly; what
fails is logged and dropped.
"""

from __future__ import annotations

import io
import logging
import re
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import TracebackType
from typing import Self

from compress.artifact import read_artifact_raw, read_payload, read_signed_manifest
from compress.manifest import Manifest
from compress.signing import SignedManifest
from coordinator.delivery.tracker import (
    IN_PROGRESS_STATES,
    DeploymentTracker,
    DeployResult,
    DeviceState,
)
from coordinator.errors import CoordinatorError, TargetError
from coordinator.link.chunk_sender import ChunkRequestItem, ChunkSender, PlannedSend
from coordinator.link.fleet import DeviceRecord, Fleet, Target
from edge_agent.config.agent import BrokerConfig
from edge_agent.errors import ProtocolError
from edge_agent.protocol import (
    COORDINATOR_SENDER,
    DEFAULT_CHUNK_BYTES,
    DEFAULT_LIMITS,
    ROOT,
    Channel,
    ChunkRequest,
    Deploy,
    DeviceTopic,
    Envelope,
    InstallState,
    InstallStatus,
    Limits,
    Message,
    Rollback,
    Status,
    broadcast_topic,
    check_route,
    chunk_count,
    coordinator_subscriptions,
    decode,
    device_topic,
    encode,
    new_message_id,
    parse_topic,
    sha256_hex,
)
from edge_agent.transport.mqtt import MqttLink

__all__ = [
    "SESSION_NAME_RE",
    "Artifact",
    "Coordinator",
    "CoordinatorConfig",
    "Delivery",
    "Listener",
    "session_client_id",
]

logger = logging.getLogger(__name__)

SESSION_NAME_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")
"""What :attr:`CoordinatorConfig.session` may be (it is also an MQTT topic level)."""


def session_client_id(session: str | None) -> str:
    """``coordinator:<session>`` for a persistent session, else ``coordinator:<random>``.

    No device id has a colon, so no device can take the coordinator's client id
    (and with it the coordinator's connection and session).
    """
    return f"{COORDINATOR_SENDER}:{session if session is not None else uuid.uuid4().hex[:12]}"


Listener = Callable[[str, Envelope, int], None]
"""Sees every device message the coordinator decodes: ``(device_id, envelope,
payload bytes)``; called on the MQTT link's network thread, outside the coordinator's lock
(keep it quick, never block)."""

SYNC_PREFIX = f"{ROOT}/coordinator/sync"
MAX_CHUNKS_PER_REQUEST = 64
"""Chunks served for one chunk request (bounds what one device can make us queue)."""


@dataclass(frozen=True)
class CoordinatorConfig:
    """How the coordinator connects and delivers.

    Attributes:
        broker: The fleet's broker; the username should be ``coordinator``.
        chunk_size: Bytes per chunk (at most the protocol's 128 KiB ceiling).
        accept_wait_s: How long to wait for every device's accept/reject before the
            payload is pushed anyway (late devices pull what they missed).
        sync_timeout_s: How long to wait for the retained statuses after connecting.
        limits: Protocol limits.
        session: None (default): a fresh client id and a clean session, for
            short-lived processes. A name: the client id ``coordinator:<name>``
            (no device id has a colon, so no device can take it over) with a
            persistent session, for the long-running service: what devices send while it is
            down or restarting (telemetry, presence, install reports) waits in the
            broker (up to its per-client queue, mosquitto's ``max_queued_messages``)
            and arrives when it is back. One process at a time per name: a second
            connection with it takes the session over.
    """

    broker: BrokerConfig
    chunk_size: int = DEFAULT_CHUNK_BYTES
    accept_wait_s: float = 3.0
    sync_timeout_s: float = 5.0
    limits: Limits = DEFAULT_LIMITS
    session: str | None = None

    def __post_init__(self) -> None:
        """Check the values.

        Raises:
            CoordinatorError: a chunk size outside 1..limits.max_chunk_bytes, or
                non-positive timeouts.
        """
        if not 1 <= self.chunk_size <= self.limits.max_chunk_bytes:
            raise CoordinatorError(
                f"chunk size must be 1..{self.limits.max_chunk_bytes} bytes, got {self.chunk_size}"
            )
        if self.accept_wait_s <= 0 or self.sync_timeout_s <= 0:
            raise CoordinatorError("timeouts must be positive")
        if self.session is not None and SESSION_NAME_RE.fullmatch(self.session) is None:
            raise CoordinatorError(
                f"bad session name {self.session[:40]!r}: 1-64 letters, digits, '.', '_' or '-'"
            )


@dataclass(frozen=True)
class Artifact:
    """A signed artifact as sent: the signed manifest blob and the payload.

    The coordinator does not need to trust it (agents decide); :attr:`payload_matches`
    tells whether the payload is the one the manifest describes.
    """

    signed: SignedManifest
    payload: bytes
    transfer_id: str = field(init=False)

    def __post_init__(self) -> None:
        """Hash the payload once (it names the transfer)."""
        object.__setattr__(self, "transfer_id", sha256_hex(self.payload))

    @classmethod
    def load(cls, path: Path) -> Artifact:
        """Read an artifact file (container and manifest form checked; signatures
        and payload are for the devices to judge).

        Raises:
            CompressError: not a readable fedge artifact.
        """
        signed, payload = read_artifact_raw(path)
        return cls(signed, payload)

    @classmethod
    def from_bytes(cls, data: bytes) -> Artifact:
        """Parse an artifact held in memory (as stored by the service; checks like
        :meth:`load`).

        Raises:
            CompressError: not a fedge artifact, or its payload does not match.
        """
        stream = io.BytesIO(data)
        signed = read_signed_manifest(stream)
        return cls(signed, read_payload(stream, signed.manifest))

    @property
    def manifest(self) -> Manifest:
        """The (unverified) manifest."""
        return self.signed.manifest

    @property
    def payload_matches(self) -> bool:
        """Whether the payload's length and sha256 are the manifest's."""
        manifest = self.manifest
        return manifest.length == len(self.payload) and manifest.sha256 == self.transfer_id


@dataclass
class Delivery:
    """One deployment (or rollback) in flight: its tracker and what to resend."""

    tracker: DeploymentTracker
    command: Message
    artifact: Artifact | None
    msg_ids: dict[str, str] = field(default_factory=dict)
    targeted_online: set[str] = field(default_factory=set)

    def dropped_out(self) -> list[str]:
        """Devices sent the command that are offline now (they may come back)."""
        return [
            p.device_id
            for p in self.tracker.progress()
            if p.state is DeviceState.OFFLINE and p.device_id in self.targeted_online
        ]

    @property
    def deployment_id(self) -> str:
        """The id devices report progress under."""
        return self.tracker.deployment_id


class Coordinator:
    """Fleet view, deployments and rollbacks over one MQTT connection (thread-safe)."""

    def __init__(self, config: CoordinatorConfig, *, clock: Callable[[], float] = time.time):
        """Prepare (nothing connects until :meth:`start`)."""
        self.config = config
        self._clock = clock
        self._cond = threading.Condition(threading.RLock())
        self._fleet = Fleet()
        self._deliveries: dict[str, Delivery] = {}
        self._transfers: dict[str, Artifact] = {}
        self._blobs: dict[str, bytes] = {}  # payloads served for other parts (round weights)
        self._listeners: list[Listener] = []
        # A persistent session keeps its subscriptions: its sync topic stays the same.
        self._sync_topic = f"{SYNC_PREFIX}/{config.session or uuid.uuid4().hex}"
        self._synced = threading.Event()
        self._dropped = 0
        self._change_count = 0  # bumped on every change a waiter may want to see
        self._link = MqttLink(
            config.broker,
            client_id=session_client_id(config.session),
            clean_session=config.session is None,
            subscriptions=(*coordinator_subscriptions(), self._sync_topic),
            on_message=self._on_message,
            on_connect=self._on_reconnect,
        )
        self._sender = ChunkSender(
            self._link,
            self._payload_of,
            chunk_size=config.chunk_size,
            limits=config.limits,
            clock=clock,
        )

    # ------------------------------------------------------------------ lifecycle

    def start(self, timeout: float = 10.0) -> None:
        """Connect and load the fleet's retained statuses.

        Raises:
            BrokerError: no connection within ``timeout`` seconds.
        """
        self._link.connect(timeout)
        self._sender.start()
        self.sync_fleet()

    def stop(self) -> None:
        """Stop serving chunks and disconnect (idempotent)."""
        self._sender.stop()
        self._link.stop()

    def __enter__(self) -> Self:
        """Start; see :meth:`start`."""
        self.start()
        return self

    def __exit__(
        self,
        _type: type[BaseException] | None,
        _value: BaseException | None,
        _tb: TracebackType | None,
    ) -> None:
        """Stop."""
        self.stop()

    def sync_fleet(self) -> None:
        """Wait until the retained statuses delivered on subscribing have arrived.

        The broker sends retained messages right after the subscription; a message
        this client publishes to its own sync topic afterwards arrives after them.
        """
        self._synced.clear()
        self._link.publish(self._sync_topic, b"sync")
        if not self._synced.wait(self.config.sync_timeout_s):
            logger.warning("fleet sync timed out; the device list may be incomplete")

    @property
    def dropped_messages(self) -> int:
        """Messages received and dropped as malformed or misrouted."""
        return self._dropped

    # ---------------------------------------------------------------------- fleet

    def fleet(self) -> list[DeviceRecord]:
        """Every device seen, sorted by id."""
        with self._cond:
            return self._fleet.records()

    # ------------------------------------------------------------------- deploys

    def deploy(
        self, artifact: Artifact, target: Target, *, deployment_id: str | None = None
    ) -> Delivery:
        """Send an artifact to the targeted devices (see the module docstring).

        Returns:
            The delivery; pass it to :meth:`wait`.

        Raises:
            TargetError: no device matches the target, or it names unknown devices.
        """
        manifest = artifact.manifest
        deployment_id = deployment_id or _new_id(f"{manifest.name}-v{manifest.version}")
        size, chunk_size = len(artifact.payload), self.config.chunk_size
        command = Deploy(
            deployment_id=deployment_id,
            transfer_id=artifact.transfer_id,
            total_size=size,
            chunk_size=chunk_size,
            chunk_count=chunk_count(size, chunk_size),
            manifest=artifact.signed.to_bytes(),
        )
        delivery = self._begin(target, command, artifact, manifest.name, manifest.version)
        self._await_answers(delivery)
        self._push(delivery)
        return delivery

    def rollback(self, target: Target, model: str, *, reason: str = "") -> Delivery:
        """Ask the targeted devices to go back to their previous good model.

        Raises:
            TargetError: no device matches the target.
        """
        command = Rollback(model=model, reason=reason or "requested by the operator")
        return self._begin(target, command, None, model, 0, deployment_id=_new_id("rollback"))

    def _begin(
        self,
        target: Target,
        command: Message,
        artifact: Artifact | None,
        model: str,
        version: int,
        *,
        deployment_id: str | None = None,
    ) -> Delivery:
        with self._cond:
            known = self._fleet.records()
            unknown = target.missing(known)
            if unknown:
                raise TargetError(f"unknown device(s): {', '.join(unknown)} (see fedge fleet)")
            records = target.select(known)
            if not records:
                raise TargetError(f"no device matches {target.describe()}")
            online = [r.device_id for r in records if r.online]
            offline = [r.device_id for r in records if not r.online]
            tracker = DeploymentTracker(
                deployment_id=deployment_id or str(getattr(command, "deployment_id", "")),
                model=model,
                version=version,
                online=online,
                offline=offline,
                now=self._clock(),
            )
            delivery = Delivery(tracker, command, artifact, targeted_online=set(online))
            self._deliveries[tracker.deployment_id] = delivery
            if artifact is not None:
                self._transfers[artifact.transfer_id] = artifact
        logger.info(
            "%s %s to %d device(s) (%d offline)",
            command.TYPE, tracker.deployment_id, len(online), len(offline),
        )  # fmt: skip
        for device_id in online:
            self._send_command(delivery, device_id)
        return delivery

    def _send_command(self, delivery: Delivery, device_id: str) -> None:
        msg_id = new_message_id()
        if isinstance(delivery.command, Rollback):
            # The agent reports a rollback under "rollback-<command id>".
            delivery.msg_ids[f"rollback-{msg_id}"] = device_id
        self.send(device_id, delivery.command, msg_id=msg_id)

    def _await_answers(self, delivery: Delivery) -> None:
        deadline = time.monotonic() + self.config.accept_wait_s
        with self._cond:
            while any(p.state is DeviceState.PENDING for p in delivery.tracker.progress()):
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)

    def _push(self, delivery: Delivery) -> None:
        artifact = delivery.artifact
        assert artifact is not None
        with self._cond:
            takers = [
                p.device_id
                for p in delivery.tracker.progress()
                if p.state in (DeviceState.ACCEPTED, DeviceState.DOWNLOADING)
            ]
        logger.info("pushing %d bytes to %d device(s)", len(artifact.payload), len(takers))
        if not self.push_payload(artifact.transfer_id, takers):
            logger.warning("disconnected while sending chunks; devices will ask again")

    def wait(
        self,
        delivery: Delivery,
        *,
        timeout: float,
        on_change: Callable[[DeploymentTracker], None] | None = None,
        until: Callable[[DeploymentTracker], bool] | None = None,
    ) -> DeployResult:
        """Wait until every targeted device has an outcome, or the timeout.

        A device that was online when targeted and went offline meanwhile is waited
        for (it may be rebooting); devices still in progress, or still away, at the
        timeout become ``timed_out``. The delivery
        is forgotten afterwards (late chunk requests for it are ignored).

        Args:
            delivery: From :meth:`deploy` or :meth:`rollback`.
            timeout: Seconds to wait.
            on_change: Called (under the coordinator's lock; keep it quick) with the
                tracker whenever a device's progress changed, and once at the start.
            until: Stop waiting as soon as this is true (default: every device
                settled); devices not settled then are *not* marked timed out.

        Returns:
            The outcome per device.
        """
        deadline = time.monotonic() + timeout
        tracker = delivery.tracker
        with self._cond:
            seen = -1
            while True:
                version = self._change_count
                if on_change is not None and version != seen:
                    on_change(tracker)
                seen = version
                if (tracker.settled and not delivery.dropped_out()) or (
                    until is not None and until(tracker)
                ):
                    break
                if time.monotonic() >= deadline:
                    now = self._clock()
                    tracker.expire(now, now, dropped_out=delivery.dropped_out())
                    break
                self._cond.wait(min(0.5, max(0.0, deadline - time.monotonic())))
            if on_change is not None:
                on_change(tracker)
            self.forget(delivery)
            return tracker.result()

    def tracked(self) -> list[str]:
        """The deployment ids of the deliveries still tracked (not yet forgotten)."""
        with self._cond:
            return sorted(self._deliveries)

    def forget(self, delivery: Delivery) -> None:
        """Stop tracking a delivery and serving its chunks."""
        with self._cond:
            self._deliveries.pop(delivery.deployment_id, None)
            artifact = delivery.artifact
            if artifact is not None and not any(
                d.artifact is not None and d.artifact.transfer_id == artifact.transfer_id
                for d in self._deliveries.values()
            ):
                self._transfers.pop(artifact.transfer_id, None)
                self._sender.forget(artifact.transfer_id)

    # ------------------------------------------------ the link, for other parts

    def add_listener(self, listener: Listener) -> None:
        """Let ``listener`` see every decoded device message (see :data:`Listener`)."""
        with self._cond:
            self._listeners.append(listener)

    def remove_listener(self, listener: Listener) -> None:
        """Stop calling ``listener`` (no error if it was not added)."""
        with self._cond:
            if listener in self._listeners:
                self._listeners.remove(listener)

    def serve_payload(self, payload: bytes) -> str:
        """Answer chunk requests for ``payload`` until :meth:`withdraw_payload`.

        Returns:
            The transfer id (the payload's sha256).
        """
        transfer_id = sha256_hex(payload)
        with self._cond:
            self._blobs[transfer_id] = payload
        return transfer_id

    def withdraw_payload(self, transfer_id: str) -> None:
        """Stop serving a payload given to :meth:`serve_payload`."""
        with self._cond:
            self._blobs.pop(transfer_id, None)
        self._sender.forget(transfer_id)

    def send(self, device_id: str, message: Message, *, msg_id: str | None = None) -> int:
        """Send a command to one device's ``cmd`` topic.

        Args:
            device_id: The device.
            message: The command.
            msg_id: The envelope's id (default: a fresh one).

        Returns:
            The MQTT payload's size in bytes, or 0 if it could not go out
            (disconnected).
        """
        payload = encode(
            message,
            sender=COORDINATOR_SENDER,
            sent_at=self._clock(),
            msg_id=msg_id,
            limits=self.config.limits,
        )
        if not self._link.publish(device_topic(device_id, Channel.CMD), payload):
            logger.warning("could not send %s to %s (disconnected)", message.TYPE, device_id)
            return 0
        return len(payload)

    def push_payload(self, transfer_id: str, device_ids: list[str]) -> bool:
        """Publish every chunk of a served payload once: on its broadcast topic for
        two or more devices, on the device's ``chunks`` topic for one.

        Returns:
            False if the connection was lost before everything went out.
        """
        payload = self._payload_of(transfer_id)
        if payload is None or not device_ids:
            return True
        topic = (
            broadcast_topic(transfer_id)
            if len(device_ids) > 1
            else device_topic(device_ids[0], Channel.CHUNKS)
        )
        count = chunk_count(len(payload), self.config.chunk_size)
        return self._sender.publish(PlannedSend(topic, transfer_id, i) for i in range(count))

    def bytes_sent(self, transfer_id: str) -> int:
        """MQTT payload bytes of the chunks of ``transfer_id`` published so far."""
        return self._sender.bytes_sent(transfer_id)

    # ------------------------------------------------------------ incoming messages

    def _changed(self) -> None:
        self._change_count += 1
        self._cond.notify_all()

    def _on_message(self, topic: str, payload: bytes, retained: bool = False) -> None:
        if topic == self._sync_topic:
            self._synced.set()
            return
        try:
            where = parse_topic(topic)
            if not isinstance(where, DeviceTopic):
                raise ProtocolError(f"unexpected topic {topic[:80]!r}")
            if where.channel is Channel.STATUS and not payload:
                with self._cond:
                    self._fleet.clear(where.device_id)
                    self._changed()
                return
            envelope = decode(payload, self.config.limits)
            check_route(envelope, topic)
        except ProtocolError as exc:
            self._dropped += 1
            logger.warning("dropped a message on %s: %s: %s", topic[:120], exc.code, exc)
            return
        with self._cond:
            self._handle(where.device_id, envelope, retained=retained)
            listeners = list(self._listeners)
        for listener in listeners:
            try:
                listener(where.device_id, envelope, len(payload))
            except Exception:
                logger.exception("a message listener failed (continuing)")

    def _handle(self, device_id: str, envelope: Envelope, *, retained: bool = False) -> None:
        message, now = envelope.message, self._clock()
        if isinstance(message, Status):
            # A retained status is as old as it says (bounded by now), not "just seen".
            seen = min(now, envelope.sent_at) if retained else now
            self._on_status(device_id, message, envelope.sent_at, seen)
            return
        self._fleet.touch(device_id, now)
        if isinstance(message, InstallStatus):
            self._on_install_status(device_id, message, now)
        elif isinstance(message, ChunkRequest):
            self._on_chunk_request(device_id, message)

    def _on_status(self, device_id: str, status: Status, sent_at: float, now: float) -> None:
        before = self._fleet.get(device_id)
        record = self._fleet.update_status(device_id, status, sent_at=sent_at, now=now)
        was_online = before is not None and before.online
        for delivery in list(self._deliveries.values()):
            if not record.online:
                delivery.tracker.on_offline(device_id, now)
            elif not was_online and delivery.tracker.on_online(device_id, now):
                logger.info("%s is back: resending %s", device_id, delivery.deployment_id)
                delivery.targeted_online.add(device_id)
                self._send_command(delivery, device_id)
            if delivery.artifact is not None and _runs(record, delivery):
                # The status says the model runs there: as good as an "installed"
                # report (which may have been sent while we were disconnected).
                installed = InstallStatus(
                    deployment_id=delivery.deployment_id,
                    state=InstallState.INSTALLED,
                    model=delivery.tracker.model,
                    version=delivery.tracker.version,
                )
                delivery.tracker.on_status(device_id, installed, now)
        self._changed()

    def _on_reconnect(self) -> None:
        """After a lost connection, resend deploys to devices still in progress.

        What they reported while we were away is lost with a clean session (with
        a persistent one the broker kept it); either way a resent deploy is
        answered "installed" or resumes the transfer. Rollbacks are not
        resent: a second one would go back further.
        """
        with self._cond:
            for delivery in self._deliveries.values():
                if not isinstance(delivery.command, Deploy):
                    continue
                for progress in delivery.tracker.progress():
                    if progress.state in IN_PROGRESS_STATES:
                        self._send_command(delivery, progress.device_id)

    def _on_install_status(self, device_id: str, status: InstallStatus, now: float) -> None:
        delivery = self._deliveries.get(status.deployment_id)
        if delivery is None:  # a rollback answer, under the id of the command we sent
            delivery = self._rollback_ids().get(status.deployment_id)
            if delivery is not None:
                status = _relabel(status, delivery.deployment_id)
        if delivery is None:
            logger.debug("install status for unknown deployment %s", status.deployment_id)
            return
        if status.state in (InstallState.REJECTED, InstallState.FAILED, InstallState.ROLLED_BACK):
            logger.info("%s: %s %s: %s", device_id, status.state, status.error_code, status.reason)
        if delivery.tracker.on_status(device_id, status, now):
            self._changed()

    def _rollback_ids(self) -> dict[str, Delivery]:
        return {
            command_id: delivery
            for delivery in self._deliveries.values()
            for command_id in delivery.msg_ids
        }

    def _on_chunk_request(self, device_id: str, request: ChunkRequest) -> None:
        payload = self._payload_locked(request.transfer_id)
        if payload is None:
            logger.info("%s asked for chunks of unknown transfer %s", device_id,
                        request.transfer_id[:12])  # fmt: skip
            return
        count = chunk_count(len(payload), self.config.chunk_size)
        indices = sorted({i for i in request.indices if 0 <= i < count})[:MAX_CHUNKS_PER_REQUEST]
        self._sender.request(ChunkRequestItem(device_id, request.transfer_id, tuple(indices)))

    def _payload_of(self, transfer_id: str) -> bytes | None:
        with self._cond:
            return self._payload_locked(transfer_id)

    def _payload_locked(self, transfer_id: str) -> bytes | None:
        artifact = self._transfers.get(transfer_id)
        return artifact.payload if artifact is not None else self._blobs.get(transfer_id)


def _runs(record: DeviceRecord, delivery: Delivery) -> bool:
    """Whether a device's status shows the delivery's artifact installed."""
    artifact = delivery.artifact
    return artifact is not None and any(
        (m.name, m.version, m.sha256)
        == (delivery.tracker.model, delivery.tracker.version, artifact.transfer_id)
        for m in record.models
    )


def _relabel(status: InstallStatus, deployment_id: str) -> InstallStatus:
    return replace(status, deployment_id=deployment_id)


def _new_id(prefix: str) -> str:
    return f"{prefix[:40]}-{uuid.uuid4().hex[:12]}"
