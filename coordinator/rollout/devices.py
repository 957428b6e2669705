"""A device's place and progress in a staged rollout, and the artifact rolled out.

The rollout engine keeps one :class:`DeviceInRollout` per device of the target: its
stage, presence, install progress, a rollout-level :class:`Marker` (waiting,
reverting, ...), its health samples and the times of its deploys. Each change makes
a new frozen value; the adapter persists :class:`RolloutDeviceState` per device. Pure values:
no I/O.

Device reports follow the rules of :mod:`coordinator.delivery.tracker`
(:func:`~coordinator.delivery.tracker.admits`): stage reports
only move a device forward; ``installed`` overrides ``failed``, ``rejected``,
``rolled_back`` and ``timed_out`` (a retry worked, or the answer was late); once
installed, only ``rolled_back`` changes the state; an offline or timed-out
device leaves only through an outcome. States the coordinator assigns itself
(``pending``, ``offline``, ``timed_out``) are ignored as reports. Reports from
devices whose stage is not released yet, and events for devices that are not part
of the rollout, are ignored. An unhealthy verdict is final for the device.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Any, Literal, TypeAlias

from coordinator.delivery.tracker import IN_PROGRESS_STATES, TERMINAL_STATES, DeviceState
from coordinator.errors import RolloutError
from coordinator.rollout.health import (
    BASELINE_WINDOWS,
    HealthSample,
    combine_baseline,
    samples_from_json,
)

__all__ = [
    "FAILURES",
    "REPORTABLE",
    "DeviceInRollout",
    "DeviceStatus",
    "Marker",
    "RolloutArtifact",
    "RolloutDeviceState",
    "opt_float",
    "sorted_ids",
]

_SHA256_RE = re.compile(r"[0-9a-f]{64}")


class Marker(StrEnum):
    """Rollout-level device states, on top of :class:`DeviceState`."""

    WAITING = "waiting"
    """The device's stage is not released yet."""
    UNHEALTHY = "unhealthy"
    """Installed, then a telemetry window failed the health policy (derived)."""
    REVERTING = "reverting"
    """Installed; a rollback is requested (sent when online)."""
    REVERTED = "reverted"
    """The device reported that it rolled back."""
    REVERT_FAILED = "revert_failed"
    """The device answered the rollback with a failure."""


DeviceStatus: TypeAlias = DeviceState | Marker
"""What a device shows: a :class:`Marker` if one applies, else its install state."""

FAILURES = frozenset(
    {DeviceState.FAILED, DeviceState.REJECTED, DeviceState.ROLLED_BACK, DeviceState.TIMED_OUT}
)
"""Install outcomes that count as a failed report."""
REPORTABLE = frozenset(IN_PROGRESS_STATES[1:]) | (TERMINAL_STATES - {DeviceState.TIMED_OUT})
"""Install states a device may report (the rest the coordinator assigns itself)."""


def sorted_ids(device_ids: Iterable[str]) -> tuple[str, ...]:
    """The distinct ids, sorted (as actions list them)."""
    return tuple(sorted(set(device_ids)))


def opt_float(value: object) -> float | None:
    """A JSON number as a float (None stays None).

    Raises:
        TypeError: not a number.
    """
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"not a number: {value!r}")
    return float(value)


@dataclass(frozen=True)
class RolloutArtifact:
    """Identity of the artifact rolled out.

    Attributes:
        model: Model name.
        version: Model version (>= 0).
        sha256: Lowercase hex sha256 of the model file.

    Raises:
        RolloutError: A value is malformed.
    """

    model: str
    version: int
    sha256: str

    def __post_init__(self) -> None:
        """Validate the values."""
        if not isinstance(self.model, str) or not self.model:
            raise RolloutError(f"bad artifact: model name {self.model!r}")
        if isinstance(self.version, bool) or not isinstance(self.version, int) or self.version < 0:
            raise RolloutError(f"bad artifact: version {self.version!r}")
        if not isinstance(self.sha256, str) or _SHA256_RE.fullmatch(self.sha256) is None:
            raise RolloutError(f"bad artifact: sha256 {self.sha256!r} is not 64 lowercase hex")

    def to_json(self) -> dict[str, Any]:
        """Give a JSON-able dict of every field."""
        return {"model": self.model, "version": self.version, "sha256": self.sha256}


@dataclass(frozen=True)
class DeviceInRollout:
    """One device's place and progress in a rollout.

    Attributes:
        device_id: The device.
        stage: Index of its stage (0 = canary).
        online: Presence, as last told.
        install: Install progress (meaningless while :attr:`marker` is WAITING).
        marker: WAITING, REVERTING, REVERTED, REVERT_FAILED, or None.
        health_ok: A healthy window of the new version arrived after install.
        health_failed: A window of the new version failed the health policy.
        released_at: When it was first sent the deploy, or None.
        deployed_at: When it was last sent the deploy (the install timeout counts
            from here), or None.
        installed_at: When it last reported ``installed``, or None.
        baseline_windows: Its latest qualifying windows of the version it served
            before, oldest first, at most :data:`BASELINE_WINDOWS` (see
            :attr:`baseline`).
        last_health: Latest qualifying window of the rollout's version, or None.
        detail: Error code, health verdict or timeout explanation, or None.
        updated_at: Coordinator clock of the last change.
    """

    device_id: str
    stage: int
    online: bool
    install: DeviceState = DeviceState.PENDING
    marker: Marker | None = Marker.WAITING
    health_ok: bool = False
    health_failed: bool = False
    released_at: float | None = None
    deployed_at: float | None = None
    installed_at: float | None = None
    baseline_windows: tuple[HealthSample, ...] = ()
    last_health: HealthSample | None = None
    detail: str | None = None
    updated_at: float = 0.0

    def released(self, now: float) -> DeviceInRollout:
        """Its stage released at ``now``: sent the deploy if online, else ``offline``."""
        if self.online:
            return replace(
                self,
                marker=None,
                install=DeviceState.PENDING,
                released_at=now,
                deployed_at=now,
            )
        return replace(self, marker=None, install=DeviceState.OFFLINE)

    def gone_offline(self) -> DeviceInRollout:
        """It went offline: still installing, it becomes ``offline``."""
        install = self.install
        if self.marker is None and install in IN_PROGRESS_STATES:
            install = DeviceState.OFFLINE
        return replace(self, online=False, install=install)

    def with_baseline_window(self, sample: HealthSample) -> DeviceInRollout:
        """A window of the version it served before added to its baseline (the
        last :data:`BASELINE_WINDOWS` of that version are kept)."""
        kept = [w for w in self.baseline_windows if w.version == sample.version]
        return replace(self, baseline_windows=(*kept[-(BASELINE_WINDOWS - 1) :], sample))

    @property
    def baseline(self) -> HealthSample | None:
        """Its health on the version it served before: :attr:`baseline_windows`
        combined (:func:`combine_baseline`), or None without any."""
        return combine_baseline(self.baseline_windows) if self.baseline_windows else None

    @property
    def status(self) -> DeviceStatus:
        """The marker if any, ``unhealthy`` if installed and unhealthy, else install."""
        if self.marker is not None:
            return self.marker
        if self.health_failed and self.install is DeviceState.INSTALLED:
            return Marker.UNHEALTHY
        return self.install

    def verdict(self, *, require_health: bool) -> Literal["ok", "failed"] | None:
        """Give the device's report for judging its stage, or None if it has none."""
        if self.marker is Marker.WAITING:
            return None
        if self.health_failed or self.install in FAILURES:
            return "failed"
        if self.install is DeviceState.INSTALLED and (self.health_ok or not require_health):
            return "ok"
        return None

    def to_json(self) -> dict[str, Any]:
        """Give a JSON-able dict of every field."""
        return {
            "device_id": self.device_id,
            "stage": self.stage,
            "online": self.online,
            "install": str(self.install),
            "marker": None if self.marker is None else str(self.marker),
            "health_ok": self.health_ok,
            "health_failed": self.health_failed,
            "released_at": self.released_at,
            "deployed_at": self.deployed_at,
            "installed_at": self.installed_at,
            "baseline_windows": [w.to_json() for w in self.baseline_windows],
            "last_health": None if self.last_health is None else self.last_health.to_json(),
            "detail": self.detail,
            "updated_at": self.updated_at,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> DeviceInRollout:
        """Rebuild from :meth:`to_json`."""
        marker = data["marker"]
        windows = data.get("baseline_windows")
        if windows is None:  # saved before the windows were kept: one window, "baseline"
            windows = [] if data["baseline"] is None else [data["baseline"]]
        return cls(
            device_id=str(data["device_id"]),
            stage=int(data["stage"]),
            online=bool(data["online"]),
            install=DeviceState(data["install"]),
            marker=None if marker is None else Marker(marker),
            health_ok=bool(data["health_ok"]),
            health_failed=bool(data["health_failed"]),
            released_at=opt_float(data["released_at"]),
            deployed_at=opt_float(data["deployed_at"]),
            installed_at=opt_float(data["installed_at"]),
            baseline_windows=tuple(samples_from_json(windows)),
            last_health=HealthSample.from_json(data["last_health"]),
            detail=None if data["detail"] is None else str(data["detail"]),
            updated_at=float(data["updated_at"]),
        )


@dataclass(frozen=True)
class RolloutDeviceState:
    """What the service persists per device of a rollout.

    Attributes:
        stage: Stage index.
        state: :attr:`DeviceInRollout.status`.
        detail: :attr:`DeviceInRollout.detail`.
        updated_at: :attr:`DeviceInRollout.updated_at`.
    """

    stage: int
    state: DeviceStatus
    detail: str | None
    updated_at: float
