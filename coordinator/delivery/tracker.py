"""Per-device progress of one deployment: a pure state machine.

Workflow (the adapter around it does the I/O and owns the clock):

1. The coordinator resolves a :class:`~coordinator.link.fleet.Target` against the fleet,
   sends a ``deploy`` to the online devices and builds a :class:`DeploymentTracker`
   with the online and offline ids. Online devices start :attr:`DeviceState.PENDING`,
   offline ones :attr:`DeviceState.OFFLINE`.
2. Each agent answers with ``install_status`` events carrying the deployment id;
   the adapter passes them to :meth:`DeploymentTracker.on_status`. Presence changes
   from the fleet go to :meth:`~DeploymentTracker.on_offline` and
   :meth:`~DeploymentTracker.on_online`; when ``on_online`` returns True the caller
   resends the deploy (the agent resumes the transfer from the chunks it holds).
3. The caller waits until :attr:`~DeploymentTracker.settled`, or until its deadline,
   when :meth:`~DeploymentTracker.expire` marks everything still moving
   :attr:`DeviceState.TIMED_OUT`; then it reports :meth:`~DeploymentTracker.result`.

Transition rules for a device's reports (messages can be duplicated, and events
can be processed out of order with presence changes):

* While in progress (pending, accepted, downloading, verifying, installing) a
  report moves the device forward or to any outcome; a report of an earlier stage
  is stale and ignored, and so is a download report holding fewer chunks of the
  same transfer than already reported.
* ``installed`` is proof that the model runs on the device, so it overrides an
  earlier ``failed``, ``rejected``, ``rolled_back`` or our own ``timed_out``: the agent retried (the
  deploy was resent, or the agent resumed by itself) and this time it worked, or the
  answer simply arrived after the deadline. Once installed, only ``rolled_back``
  (the post-install health check failed, or the install was undone) changes the
  state; a later ``failed`` or ``rejected`` comes from a duplicate deploy and leaves
  the installed model in place.
* ``rolled_back`` (the model failed to load or its health check, and the previous
  one kept serving; the version was never committed, so a retry may work) behaves
  like ``failed``.
* ``timed_out`` is the coordinator's guess; any outcome the device reports later
  replaces it. Stages reported after it are ignored (the deadline has passed).
* ``offline`` leaves only through :meth:`~DeploymentTracker.on_online` (back to
  pending, the deploy is resent) or through an outcome report; stage reports that
  were sent before the device dropped are ignored.
* A report repeating the current state refreshes its details (chunks, version,
  error, reason); a report changing nothing returns False and keeps ``updated_at``.

Outcomes: a deployment is *settled* when every device has an outcome or is offline,
and *succeeded* when it is settled, at least one device installed the model and
every device is installed or offline (offline devices get the model when they come
back, by the resend above).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Any

from edge_agent.protocol import InstallStatus

__all__ = [
    "IN_PROGRESS_STATES",
    "SETTLED_STATES",
    "TERMINAL_STATES",
    "DeployResult",
    "DeploymentTracker",
    "DeviceProgress",
    "DeviceState",
    "admits",
]


class DeviceState(StrEnum):
    """Where one device stands in a deployment."""

    PENDING = "pending"
    """The deploy was sent; no answer yet."""
    ACCEPTED = "accepted"
    DOWNLOADING = "downloading"
    VERIFYING = "verifying"
    INSTALLING = "installing"
    INSTALLED = "installed"
    FAILED = "failed"
    REJECTED = "rejected"
    ROLLED_BACK = "rolled_back"
    OFFLINE = "offline"
    """Offline when targeted, or went offline before finishing."""
    TIMED_OUT = "timed_out"
    """Still in progress when the caller's deadline passed."""


IN_PROGRESS_STATES: tuple[DeviceState, ...] = (
    DeviceState.PENDING,
    DeviceState.ACCEPTED,
    DeviceState.DOWNLOADING,
    DeviceState.VERIFYING,
    DeviceState.INSTALLING,
)
"""States in which a device is still working, in the order they are reached."""

TERMINAL_STATES: frozenset[DeviceState] = frozenset(
    {
        DeviceState.INSTALLED,
        DeviceState.FAILED,
        DeviceState.REJECTED,
        DeviceState.ROLLED_BACK,
        DeviceState.TIMED_OUT,
    }
)
"""Outcomes."""

SETTLED_STATES: frozenset[DeviceState] = TERMINAL_STATES | {DeviceState.OFFLINE}
"""States a caller that waits for the deployment need not wait on."""

_RANK: Mapping[DeviceState, int] = {s: i for i, s in enumerate(IN_PROGRESS_STATES)}


@dataclass(frozen=True)
class DeviceProgress:
    """One device's progress in a deployment.

    Attributes:
        device_id: The device.
        state: Where it stands.
        chunks_held: Chunks of the transfer the device holds (last report).
        chunks_total: Chunks in the transfer (0 until reported).
        version: Model version as last reported by the device, or None.
        error_code: The device's error code on failure (or None).
        reason: Free-text explanation from the device, or from the coordinator on
            a timeout (or None).
        updated_at: Coordinator clock (unix seconds) of the last change.
    """

    device_id: str
    state: DeviceState
    chunks_held: int = 0
    chunks_total: int = 0
    version: int | None = None
    error_code: str | None = None
    reason: str | None = None
    updated_at: float = 0.0

    def to_json(self) -> dict[str, Any]:
        """Give a JSON-able dict of every field (``state`` as its string value)."""
        return {
            "device_id": self.device_id,
            "state": str(self.state),
            "chunks_held": self.chunks_held,
            "chunks_total": self.chunks_total,
            "version": self.version,
            "error_code": self.error_code,
            "reason": self.reason,
            "updated_at": self.updated_at,
        }


def _counts(devices: Iterable[DeviceProgress]) -> dict[DeviceState, int]:
    counts = dict.fromkeys(DeviceState, 0)
    for device in devices:
        counts[device.state] += 1
    return counts


@dataclass(frozen=True)
class DeployResult:
    """The outcome of a deployment, as reported to the operator.

    Attributes:
        deployment_id: The deployment.
        model: Model name.
        version: Model version deployed.
        succeeded: See :attr:`DeploymentTracker.succeeded`.
        devices: Every targeted device's progress, sorted by id.
    """

    deployment_id: str
    model: str
    version: int
    succeeded: bool
    devices: tuple[DeviceProgress, ...]

    def counts(self) -> dict[DeviceState, int]:
        """Give the number of devices in each state (every state, zeros included)."""
        return _counts(self.devices)

    def to_json(self) -> dict[str, Any]:
        """Give a JSON-able dict: the fields, ``counts`` by state name, and devices."""
        return {
            "deployment_id": self.deployment_id,
            "model": self.model,
            "version": self.version,
            "succeeded": self.succeeded,
            "counts": {str(k): v for k, v in self.counts().items()},
            "devices": [d.to_json() for d in self.devices],
        }


def admits(current: DeviceState, new: DeviceState) -> bool:
    """Tell whether a device-reported ``new`` state may replace ``current``."""
    if current in _RANK:
        return new in TERMINAL_STATES or _RANK[new] >= _RANK[current]
    if current in (DeviceState.OFFLINE, DeviceState.TIMED_OUT):
        return new in TERMINAL_STATES
    if current is DeviceState.INSTALLED:
        return new in (DeviceState.INSTALLED, DeviceState.ROLLED_BACK)
    # FAILED, REJECTED, ROLLED_BACK: a retry (the deploy resent) may still install.
    return new in (current, DeviceState.INSTALLED)


class DeploymentTracker:
    """Follows every targeted device through one deployment (not thread-safe).

    Args:
        deployment_id: The deployment id the devices' reports carry.
        model: Model name being deployed.
        version: Model version being deployed.
        online: Devices that were online when targeted (the deploy was sent).
        offline: Devices that were offline when targeted.
        now: The coordinator's current time, unix seconds.

    Raises:
        ValueError: A device is listed both online and offline.
    """

    def __init__(
        self,
        *,
        deployment_id: str,
        model: str,
        version: int,
        online: Iterable[str],
        offline: Iterable[str],
        now: float,
    ) -> None:
        self.deployment_id = deployment_id
        self.model = model
        self.version = version
        online_ids = list(dict.fromkeys(online))
        offline_ids = list(dict.fromkeys(offline))
        both = sorted(set(online_ids) & set(offline_ids))
        if both:
            raise ValueError(f"devices listed both online and offline: {', '.join(both)}")
        self._devices: dict[str, DeviceProgress] = {}
        for device_id in online_ids:
            self._devices[device_id] = DeviceProgress(
                device_id, DeviceState.PENDING, updated_at=now
            )
        for device_id in offline_ids:
            self._devices[device_id] = DeviceProgress(
                device_id, DeviceState.OFFLINE, updated_at=now
            )

    def _set(self, new: DeviceProgress, now: float) -> bool:
        old = self._devices[new.device_id]
        if replace(new, updated_at=old.updated_at) == old:
            return False
        self._devices[new.device_id] = replace(new, updated_at=now)
        return True

    def on_status(self, device_id: str, status: InstallStatus, now: float) -> bool:
        """Apply a device's ``install_status`` report (rules in the module docstring).

        Args:
            device_id: The reporting device (the envelope's sender).
            status: The report.
            now: The coordinator's current time, unix seconds.

        Returns:
            True if the device's progress changed. Reports for another deployment,
            from devices not targeted, stale or duplicate ones return False.
        """
        if status.deployment_id != self.deployment_id:
            return False
        current = self._devices.get(device_id)
        if current is None:
            return False
        new_state = DeviceState(str(status.state))
        if not admits(current.state, new_state):
            return False
        if (
            new_state is DeviceState.DOWNLOADING
            and current.state is DeviceState.DOWNLOADING
            and status.chunks_total == current.chunks_total
            and status.chunks_held < current.chunks_held
        ):
            return False
        reported_chunks = status.chunks_total > 0
        return self._set(
            replace(
                current,
                state=new_state,
                chunks_held=status.chunks_held if reported_chunks else current.chunks_held,
                chunks_total=status.chunks_total if reported_chunks else current.chunks_total,
                version=current.version if status.version is None else status.version,
                error_code=status.error_code,
                reason=status.reason,
            ),
            now,
        )

    def on_offline(self, device_id: str, now: float) -> bool:
        """Note that a device went offline: an unfinished one becomes OFFLINE.

        Args:
            device_id: The device.
            now: The coordinator's current time, unix seconds.

        Returns:
            True if the device was targeted and still in progress.
        """
        current = self._devices.get(device_id)
        if current is None or current.state not in _RANK:
            return False
        return self._set(replace(current, state=DeviceState.OFFLINE), now)

    def on_online(self, device_id: str, now: float) -> bool:
        """Note that a device came online: an OFFLINE one becomes PENDING again.

        Args:
            device_id: The device.
            now: The coordinator's current time, unix seconds.

        Returns:
            True if the device was OFFLINE; the caller must then resend the deploy.
        """
        current = self._devices.get(device_id)
        if current is None or current.state is not DeviceState.OFFLINE:
            return False
        return self._set(replace(current, state=DeviceState.PENDING), now)

    def expire(self, now: float, deadline: float, *, dropped_out: Iterable[str] = ()) -> list[str]:
        """Give up on devices still in progress once the deadline has passed.

        Args:
            now: The coordinator's current time, unix seconds.
            deadline: When to give up, unix seconds.
            dropped_out: Devices that were online when targeted; if they are
                OFFLINE now (they went away mid-deployment and did not come back),
                they time out too instead of counting as "offline".

        Returns:
            The ids of the devices marked TIMED_OUT, sorted; empty before the
            deadline.
        """
        if now < deadline:
            return []
        expired = []
        gone = set(dropped_out)
        for device_id in sorted(self._devices):
            current = self._devices[device_id]
            if current.state in SETTLED_STATES and not (
                current.state is DeviceState.OFFLINE and device_id in gone
            ):
                continue
            self._set(
                replace(
                    current,
                    state=DeviceState.TIMED_OUT,
                    error_code=None,
                    reason=f"still {current.state} at the deadline",
                ),
                now,
            )
            expired.append(device_id)
        return expired

    def get(self, device_id: str) -> DeviceProgress | None:
        """Give one device's progress, or None if it was not targeted."""
        return self._devices.get(device_id)

    @property
    def settled(self) -> bool:
        """Whether every device has an outcome or is offline."""
        return all(d.state in SETTLED_STATES for d in self._devices.values())

    @property
    def succeeded(self) -> bool:
        """Whether settled, installed somewhere, and installed or offline everywhere."""
        states = [d.state for d in self._devices.values()]
        return DeviceState.INSTALLED in states and all(
            s in (DeviceState.INSTALLED, DeviceState.OFFLINE) for s in states
        )

    def progress(self) -> list[DeviceProgress]:
        """Give every device's progress, sorted by device id."""
        return [self._devices[k] for k in sorted(self._devices)]

    def counts(self) -> dict[DeviceState, int]:
        """Give the number of devices in each state (every state, zeros included)."""
        return _counts(self._devices.values())

    def result(self) -> DeployResult:
        """Give the current outcome as a value."""
        return DeployResult(
            deployment_id=self.deployment_id,
            model=self.model,
            version=self.version,
            succeeded=self.succeeded,
            devices=tuple(self.progress()),
        )

    def summary(self) -> dict[str, Any]:
        """Give a JSON-able summary: :meth:`DeployResult.to_json` plus ``settled``."""
        return {**self.result().to_json(), "settled": self.settled}
