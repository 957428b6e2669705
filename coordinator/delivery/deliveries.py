"""One-shot deployments and rollbacks, built on a :class:`~coordinator.link.port.Hub`.

:class:`Deliveries` sends one artifact (or a rollback) to a target and follows every
device to an outcome through a :class:`~coordinator.delivery.tracker.DeploymentTracker`.
It uses only the hub's public API: it listens to device messages and reconnections,
sends commands and serves the payload. Workflow::

    with MqttHub(HubConfig(broker)) as hub, Deliveries(hub) as deliveries:
        delivery = deliveries.deploy(Artifact.load(path), Target.parse("tag:camera"))
        result = deliveries.wait(delivery, timeout=120, on_change=redraw)

Delivering one artifact:

1. ``deploy`` resolves the target against the hub's fleet and sends one ``deploy``
   command (the signed manifest plus the transfer's sizes) to every targeted
   online device; offline ones are tracked as offline and get the command again
   when their status says they are back.
2. Each agent checks the manifest and answers ``accepted`` or ``rejected`` (with
   the reason) before anything is downloaded. Once every device answered (or
   ``accept_wait_s`` passed), the hub pushes the payload once (broadcast chunks
   when two or more devices accepted, the device's own ``chunks`` topic when one
   did) and serves what devices miss for as long as the delivery is tracked.
3. ``install_status`` reports move the device through the tracker; a status saying
   the artifact runs on the device counts as ``installed`` (the report may have been
   sent while the hub was disconnected); ``wait`` returns when every device has an
   outcome or the timeout expires, and forgets the delivery.
4. With an announcer (:meth:`Deliveries.announce_with`, the service's fleet
   statement publisher), it hears of each deploy and rollback once the target is
   resolved and before any command goes out.
5. After a lost connection, deploys are sent again to the devices still in
   progress (a resent deploy is answered ``installed`` or resumes the transfer);
   rollbacks are not (a second one would go back further).

Only the ``coordinator`` MQTT user may publish commands and chunks (the broker ACL);
agents check the manifest's signatures themselves, so delivering an artifact needs
no signing key.
"""

from __future__ import annotations

import io
import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol

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
from coordinator.lifecycle import Closeable
from coordinator.link.fleet import DeviceRecord, Target
from coordinator.link.port import Hub
from edge_agent.protocol import (
    Deploy,
    Envelope,
    InstallState,
    InstallStatus,
    Message,
    Rollback,
    Status,
    chunk_count,
    new_message_id,
    sha256_hex,
)

__all__ = ["ACCEPT_WAIT_S", "Announcer", "Artifact", "Deliveries", "Delivery"]

logger = logging.getLogger(__name__)

ACCEPT_WAIT_S = 3.0
"""Default wait for every device's accept/reject before the payload is pushed anyway
(late devices pull what they missed)."""


class Announcer(Protocol):
    """Hears of a deploy or rollback just before its commands go out (see
    :meth:`Deliveries.announce_with`); may raise to stop it."""

    def before_deploy(self, manifest: Manifest) -> None:
        """An artifact with this (unverified) manifest is about to be deployed."""
        ...

    def before_rollback(self, model: str) -> None:
        """Devices are about to be asked to roll ``model`` back."""
        ...


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


class Deliveries(Closeable):
    """One-shot deployments and rollbacks over a hub (see the module docstring;
    thread-safe).

    It listens to the hub from construction until :meth:`close`.
    """

    def __init__(
        self,
        hub: Hub,
        *,
        accept_wait_s: float = ACCEPT_WAIT_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """Listen to ``hub`` (started or not).

        Raises:
            CoordinatorError: a non-positive ``accept_wait_s``.
        """
        if accept_wait_s <= 0:
            raise CoordinatorError("timeouts must be positive")
        self.hub = hub
        self._accept_wait_s = accept_wait_s
        self._clock = clock
        self._cond = threading.Condition(threading.RLock())
        self._deliveries: dict[str, Delivery] = {}
        self._online: dict[str, bool] = {}  # as last seen here, to notice a comeback
        self._change_count = 0  # bumped on every change a waiter may want to see
        self._announcer: Announcer | None = None
        hub.add_listener(self._on_message)
        hub.add_connect_listener(self._on_reconnect)

    def announce_with(self, announcer: Announcer | None) -> None:
        """Tell ``announcer`` before every deploy and rollback is sent (None: nobody).

        The service's fleet statement publisher
        (:class:`~coordinator.delivery.fleet_statement.StatementPublisher`) names
        each deployed artifact this way, so devices that install only what the
        fleet statement names accept it.
        """
        self._announcer = announcer

    def close(self) -> None:
        """Stop listening to the hub (idempotent); tracked deliveries stay as they are."""
        self.hub.remove_listener(self._on_message)
        self.hub.remove_connect_listener(self._on_reconnect)

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
        size, chunk_size = len(artifact.payload), self.hub.chunk_size
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
        records = self._select(target)
        announcer = self._announcer
        if announcer is not None:  # before any command: devices check the statement
            if artifact is not None:
                announcer.before_deploy(artifact.manifest)
            else:
                announcer.before_rollback(model)
        with self._cond:
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
            self._online.update((r.device_id, r.online) for r in records)
            if artifact is not None:
                self.hub.serve_payload(artifact.payload)
        logger.info(
            "%s %s to %d device(s) (%d offline)",
            command.TYPE, tracker.deployment_id, len(online), len(offline),
        )  # fmt: skip
        for device_id in online:
            self._send_command(delivery, device_id)
        return delivery

    def _select(self, target: Target) -> list[DeviceRecord]:
        """The targeted devices, online or not.

        Raises:
            TargetError: it names unknown devices, or matches none.
        """
        known = self.hub.fleet()
        unknown = target.missing(known)
        if unknown:
            raise TargetError(f"unknown device(s): {', '.join(unknown)} (see fedge fleet)")
        records = target.select(known)
        if not records:
            raise TargetError(f"no device matches {target.describe()}")
        return records

    def _send_command(self, delivery: Delivery, device_id: str) -> None:
        msg_id = new_message_id()
        if isinstance(delivery.command, Rollback):
            # The agent reports a rollback under "rollback-<command id>".
            delivery.msg_ids[f"rollback-{msg_id}"] = device_id
        self.hub.send(device_id, delivery.command, msg_id=msg_id)

    def _await_answers(self, delivery: Delivery) -> None:
        deadline = time.monotonic() + self._accept_wait_s
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
        if not self.hub.push_payload(artifact.transfer_id, takers):
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
            on_change: Called (under this object's lock; keep it quick) with the
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
                self.hub.withdraw_payload(artifact.transfer_id)

    # ------------------------------------------------------------ incoming messages

    def _changed(self) -> None:
        self._change_count += 1
        self._cond.notify_all()

    def _on_message(self, device_id: str, envelope: Envelope, _size: int) -> None:
        message = envelope.message
        if isinstance(message, Status):
            record = self.hub.device(device_id)
            if record is not None:
                self._on_status(record, self._clock())
        elif isinstance(message, InstallStatus):
            self._on_install_status(device_id, message, self._clock())

    def _on_status(self, record: DeviceRecord, now: float) -> None:
        device_id = record.device_id
        with self._cond:
            was_online = self._online.get(device_id, False)
            self._online[device_id] = record.online
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
        with self._cond:
            delivery = self._deliveries.get(status.deployment_id)
            if delivery is None:  # a rollback answer, under the id of the command we sent
                delivery = self._rollback_ids().get(status.deployment_id)
                if delivery is not None:
                    status = replace(status, deployment_id=delivery.deployment_id)
            if delivery is None:
                logger.debug("install status for unknown deployment %s", status.deployment_id)
                return
            if status.state in (
                InstallState.REJECTED, InstallState.FAILED, InstallState.ROLLED_BACK
            ):  # fmt: skip
                logger.info(
                    "%s: %s %s: %s", device_id, status.state, status.error_code, status.reason
                )
            if delivery.tracker.on_status(device_id, status, now):
                self._changed()

    def _rollback_ids(self) -> dict[str, Delivery]:
        return {
            command_id: delivery
            for delivery in self._deliveries.values()
            for command_id in delivery.msg_ids
        }


def _runs(record: DeviceRecord, delivery: Delivery) -> bool:
    """Whether a device's status shows the delivery's artifact installed."""
    artifact = delivery.artifact
    return artifact is not None and any(
        (m.name, m.version, m.sha256)
        == (delivery.tracker.model, delivery.tracker.version, artifact.transfer_id)
        for m in record.models
    )


def _new_id(prefix: str) -> str:
    return f"{prefix[:40]}-{uuid.uuid4().hex[:12]}"
