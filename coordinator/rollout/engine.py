"""Staged rollouts of a signed model to a fleet: a pure engine that returns actions.

The engine holds the whole state of one rollout and decides; the adapter around it
(the coordinator service) does the I/O: it feeds the engine with events and the
current time, executes the :data:`Action` values the engine returns (MQTT
``deploy`` and ``rollback`` commands, audit-log lines) and saves
:meth:`Rollout.snapshot` after every call that changed something, so a killed
service restarts with :meth:`Rollout.restore` and finishes the rollout. There is
no clock, thread or randomness in here: every method that needs the time takes
``now`` (unix seconds), and the stage order comes from a seed kept in the state.

Workflow:

1. The service resolves the target and builds a :class:`Rollout` with the devices,
   those online, the artifact, a :class:`~coordinator.rollout.policy.RolloutPolicy`
   and a seed. The devices are shuffled with the seed (deterministically) and cut
   into stages: the canary first, then the waves
   (:meth:`~coordinator.rollout.policy.RolloutPolicy.stage_sizes`). Devices
   online at creation come first, so the canary is made of devices that can
   answer whenever the target has enough of them.
2. :meth:`Rollout.start` releases the canary: ``Deploy`` to its online devices.
3. The adapter forwards install reports (:meth:`Rollout.on_install_status`),
   telemetry windows (:meth:`Rollout.on_health`), presence changes
   (:meth:`Rollout.on_online`, :meth:`Rollout.on_offline`) and devices that join
   the target (:meth:`Rollout.add_device`), and calls :meth:`Rollout.tick`
   every few seconds.
4. :meth:`Rollout.tick` times out silent devices and judges the current stage:
   once its soak time has passed, enough devices reported and its failure rate is
   at most ``max_failure``, the next stage is released, or the rollout
   *completes* after the last one. Operators :meth:`~Rollout.pause`,
   :meth:`~Rollout.resume` and :meth:`~Rollout.abort`.
5. After a restart, :meth:`Rollout.resume_after_restart` re-sends what may have
   been lost.

Rollout states (:class:`RolloutState`): ``created`` → ``running`` (by ``start``)
⇄ ``paused``; then one of the final states ``completed``, ``halted`` (the failure
threshold was exceeded) or ``aborted`` (by the operator). A halted rollout never
releases another stage and cannot resume (fix the cause and start a new rollout;
devices that already run the version answer the new deploy "installed" at once);
it can still be aborted, to roll back the earlier stages too. ``abort`` is
accepted in every state but ``completed``, and repeating it is a no-op (except
that ``rollback=True`` then still rolls back what was not). ``pause`` of a paused
and ``resume`` of a running rollout are no-ops.

Judging a stage. A device of the released stage has *reported* when it is
``installed`` (and, with ``health.require_health``, a healthy telemetry window
arrived) — a success — or ``failed``, ``rejected``, ``rolled_back``,
``timed_out`` or ``unhealthy`` — a failure. Offline devices that have not
reported count for neither. The stage's failure rate is failures over reports,
of the current stage only (earlier stages were judged already).

* At any moment while running or paused: when the failures already exceed
  ``max_failure`` times the whole stage's size, no later report can save the stage
  and the rollout halts at once.
* In :meth:`~Rollout.tick` while running: when ``soak_s`` has passed since the
  stage was released (or since a device joined it, see below) and at least
  ``min(min_reports, stage size)`` devices reported, the stage passes if its
  failure rate is at most ``max_failure``; if not, the engine waits while online
  devices of the stage may still report (in progress, or installed and waiting for
  health), and halts once none may.
* A stage never passes on fewer reports: one whose devices are all offline waits
  for them (they are deployed as they come back, see catch-up below). Online
  devices go first in the stage order, so only the last stages can be made of
  offline devices alone.

On a halt with ``rollback_on_halt``, the devices of the halted stage that
installed the new version (healthy or not) get ``Rollback`` and are marked
``reverting``; they become ``reverted`` when they report ``rolled_back`` (or
``revert_failed`` when they report ``failed``/``rejected``: the device had nothing
to go back to, or could not). Devices of that stage still installing are not sent
a rollback (it would undo their *previous* model): they get one when they report
``installed``. Earlier stages keep the new version unless the operator aborts with
``rollback=True``. Installed devices that are offline are rolled back when they
come online. A ``Rollback`` is re-sent when a ``reverting`` device reconnects and
by :meth:`~Rollout.resume_after_restart`; an agent that already went back answers
the second one ``failed`` ("no previous model"), which shows as
``revert_failed``.

Device reports follow the rules of :mod:`coordinator.delivery.tracker`: stage reports
only move a device forward; ``installed`` overrides ``failed``, ``rejected``,
``rolled_back`` and ``timed_out`` (a retry worked, or the answer was late); once
installed, only ``rolled_back`` changes the state; an offline or timed-out
device leaves only through an outcome. States the coordinator assigns itself
(``pending``, ``offline``, ``timed_out``) are ignored as reports. Reports from
devices whose stage is not released yet, and events for devices that are not part
of the rollout, are ignored. An unhealthy verdict is final for the device.

Presence and catch-up. Devices offline when their stage is released are
``offline``; when they come online (and the rollout is running, paused or
completed) they get ``Deploy`` — so do released devices that were ``offline`` or
``timed_out`` and reconnect. Pausing stops new stages, not these catch-ups. An
online device with no outcome ``install_timeout_s`` after its last ``Deploy``
becomes ``timed_out``.

Late devices (:meth:`~Rollout.add_device`): while the canary is the current stage
(or before the start) a newcomer joins the first wave, so the canary stays what
was planned; afterwards it joins the current stage and is deployed at once if
online, and the stage's soak restarts from then (catch-ups of offline devices do
not restart it). A single-stage rollout puts newcomers in the canary. Halted and
aborted rollouts take no newcomers; a completed one deploys to them.

Health (:meth:`~Rollout.on_health`): telemetry windows of another version of the
model update the device's baseline (its last :data:`BASELINE_WINDOWS` windows with
enough calls, combined by :func:`combine_baseline`); windows
of the rollout's version from an installed device are judged against it (see
:class:`~coordinator.rollout.policy.HealthPolicy`).
"""

from __future__ import annotations

import logging
import math
import random
import re
import statistics
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Any, Literal, TypeAlias

from coordinator.delivery.tracker import IN_PROGRESS_STATES, DeviceState
from coordinator.errors import RolloutError
from coordinator.rollout.policy import RolloutPolicy
from edge_agent.protocol import is_valid_device_id

__all__ = [
    "BASELINE_WINDOWS",
    "FORMAT",
    "Action",
    "Deploy",
    "DeviceRow",
    "DeviceStatus",
    "HealthSample",
    "Marker",
    "Rollback",
    "Rollout",
    "RolloutArtifact",
    "RolloutDevice",
    "RolloutState",
    "StageReleased",
    "StateChanged",
    "combine_baseline",
]

logger = logging.getLogger(__name__)

FORMAT = 1
"""Version of the :meth:`Rollout.snapshot` layout."""

_EPS = 1e-9
_SHA256_RE = re.compile(r"[0-9a-f]{64}")


class RolloutState(StrEnum):
    """Where a rollout stands (transitions in the module docstring)."""

    CREATED = "created"
    """Built, not started."""
    RUNNING = "running"
    """A stage is released and watched."""
    PAUSED = "paused"
    """No new stage is released; released devices continue."""
    HALTED = "halted"
    """A stage failed; final, except for ``abort``."""
    ABORTED = "aborted"
    """Stopped by the operator; final."""
    COMPLETED = "completed"
    """Every stage released and passed; final (offline devices still catch up)."""


_FINAL = frozenset({RolloutState.HALTED, RolloutState.ABORTED, RolloutState.COMPLETED})
_DEPLOYING = frozenset({RolloutState.RUNNING, RolloutState.PAUSED, RolloutState.COMPLETED})
_JUDGING = frozenset({RolloutState.RUNNING, RolloutState.PAUSED})


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

_FAILURES = frozenset(
    {DeviceState.FAILED, DeviceState.REJECTED, DeviceState.ROLLED_BACK, DeviceState.TIMED_OUT}
)
_OUTCOMES = _FAILURES | {DeviceState.INSTALLED}
_RANK: Mapping[DeviceState, int] = {s: i for i, s in enumerate(IN_PROGRESS_STATES)}
_REPORTABLE = frozenset(IN_PROGRESS_STATES[1:]) | (_OUTCOMES - {DeviceState.TIMED_OUT})


def _admits(current: DeviceState, new: DeviceState) -> bool:
    """Tell whether a reported ``new`` install state may replace ``current``.

    The rules of :class:`coordinator.delivery.tracker.DeploymentTracker`.
    """
    if current in _RANK:
        return new in _OUTCOMES or _RANK[new] >= _RANK[current]
    if current in (DeviceState.OFFLINE, DeviceState.TIMED_OUT):
        return new in _OUTCOMES
    if current is DeviceState.INSTALLED:
        return new in (DeviceState.INSTALLED, DeviceState.ROLLED_BACK)
    return new in (current, DeviceState.INSTALLED)


def _ids(device_ids: Iterable[str]) -> tuple[str, ...]:
    return tuple(sorted(set(device_ids)))


def _exceeds(failed: int, total: int, share: float) -> bool:
    """Tell whether ``failed`` is more than ``share`` of ``total`` (float-noise safe)."""
    return failed > share * total + _EPS


# --------------------------------------------------------------------------- actions


@dataclass(frozen=True)
class Deploy:
    """Send the rollout's artifact to these devices (sorted ids)."""

    device_ids: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        """Give ``{"type": "deploy", "device_ids": [...]}``."""
        return {"type": "deploy", "device_ids": list(self.device_ids)}


@dataclass(frozen=True)
class Rollback:
    """Send a rollback of the rollout's model to these devices (sorted ids)."""

    device_ids: tuple[str, ...]
    reason: str

    def to_json(self) -> dict[str, Any]:
        """Give ``{"type": "rollback", "device_ids": [...], "reason": ...}``."""
        return {"type": "rollback", "device_ids": list(self.device_ids), "reason": self.reason}


@dataclass(frozen=True)
class StateChanged:
    """The rollout changed state (for the audit log and the UI)."""

    old: RolloutState
    new: RolloutState
    reason: str

    def to_json(self) -> dict[str, Any]:
        """Give ``{"type": "state_changed", "old": ..., "new": ..., "reason": ...}``."""
        return {
            "type": "state_changed",
            "old": str(self.old),
            "new": str(self.new),
            "reason": self.reason,
        }


@dataclass(frozen=True)
class StageReleased:
    """A stage was released: every device of it, online or not (sorted ids)."""

    stage: int
    device_ids: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        """Give ``{"type": "stage_released", "stage": i, "device_ids": [...]}``."""
        return {"type": "stage_released", "stage": self.stage, "device_ids": list(self.device_ids)}


Action: TypeAlias = Deploy | Rollback | StateChanged | StageReleased
"""What the adapter must do (or record) after an engine call, in order."""


# --------------------------------------------------------------------------- values


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
class HealthSample:
    """One telemetry window, as kept for a device.

    Attributes:
        version: Model version served.
        predictions: Successful inference calls.
        errors: Failed inference calls.
        p95_ms: p95 latency of the successful calls, milliseconds.
        at: Coordinator clock when it arrived.
    """

    version: int
    predictions: int
    errors: int
    p95_ms: float
    at: float

    @property
    def calls(self) -> int:
        """Successful and failed calls."""
        return self.predictions + self.errors

    @property
    def error_rate(self) -> float:
        """Failed calls over all calls (0 without calls)."""
        return self.errors / self.calls if self.calls else 0.0

    def to_json(self) -> dict[str, Any]:
        """Give a JSON-able dict of every field."""
        return {
            "version": self.version,
            "predictions": self.predictions,
            "errors": self.errors,
            "p95_ms": self.p95_ms,
            "at": self.at,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any] | None) -> HealthSample | None:
        """Rebuild from :meth:`to_json` (None stays None)."""
        if data is None:
            return None
        return cls(
            version=int(data["version"]),
            predictions=int(data["predictions"]),
            errors=int(data["errors"]),
            p95_ms=float(data["p95_ms"]),
            at=float(data["at"]),
        )


BASELINE_WINDOWS = 5
"""Windows of the previous version a device's baseline combines."""


def combine_baseline(windows: Sequence[HealthSample]) -> HealthSample:
    """One device's recent windows of a version as one baseline.

    Calls are summed; the p95 is the median of the windows' p95s (those with a
    successful call), so one noisy window does not make or break the gate.

    Args:
        windows: At least one window, oldest first, all of one version.
    """
    latencies = [w.p95_ms for w in windows if w.predictions > 0]
    return HealthSample(
        version=windows[-1].version,
        predictions=sum(w.predictions for w in windows),
        errors=sum(w.errors for w in windows),
        p95_ms=float(statistics.median(latencies)) if latencies else 0.0,
        at=windows[-1].at,
    )


@dataclass(frozen=True)
class RolloutDevice:
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
        if self.health_failed or self.install in _FAILURES:
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
    def from_json(cls, data: Mapping[str, Any]) -> RolloutDevice:
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
            released_at=_opt_float(data["released_at"]),
            deployed_at=_opt_float(data["deployed_at"]),
            installed_at=_opt_float(data["installed_at"]),
            baseline_windows=tuple(_samples(windows)),
            last_health=HealthSample.from_json(data["last_health"]),
            detail=None if data["detail"] is None else str(data["detail"]),
            updated_at=float(data["updated_at"]),
        )


@dataclass(frozen=True)
class DeviceRow:
    """What the service persists per device of a rollout.

    Attributes:
        stage: Stage index.
        state: :attr:`RolloutDevice.status`.
        detail: :attr:`RolloutDevice.detail`.
        updated_at: :attr:`RolloutDevice.updated_at`.
    """

    stage: int
    state: DeviceStatus
    detail: str | None
    updated_at: float


@dataclass(frozen=True)
class _Stage:
    released_at: float | None = None
    soak_from: float | None = None


@dataclass(frozen=True)
class _Stats:
    size: int
    reported: int
    failed: int
    undecided_online: int

    @property
    def failure_rate(self) -> float | None:
        return self.failed / self.reported if self.reported else None


def _samples(items: Iterable[Mapping[str, Any]]) -> Iterable[HealthSample]:
    for item in items:
        sample = HealthSample.from_json(item)
        if sample is not None:
            yield sample


def _opt_float(value: object) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"not a number: {value!r}")
    return float(value)


def _sorted_json(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _sorted_json(value[k]) for k in sorted(value)}
    if isinstance(value, list):
        return [_sorted_json(v) for v in value]
    return value


# --------------------------------------------------------------------------- engine


class Rollout:
    """The state of one staged rollout and its rules (not thread-safe).

    Args:
        rollout_id: The rollout's id.
        artifact: What is rolled out.
        policy: How.
        devices: The target's devices, resolved now (duplicates kept once).
        online: Devices online now (others in the collection are ignored).
        seed: Seed of the shuffle that orders the devices into stages.
        now: The coordinator's current time, unix seconds.

    Raises:
        RolloutError: No device, an invalid device id, or an empty rollout id.
    """

    def __init__(
        self,
        *,
        rollout_id: str,
        artifact: RolloutArtifact,
        policy: RolloutPolicy,
        devices: Sequence[str],
        online: Collection[str],
        seed: int,
        now: float,
    ) -> None:
        if not rollout_id:
            raise RolloutError("a rollout needs an id")
        ids = list(dict.fromkeys(devices))
        if not ids:
            raise RolloutError(f"rollout {rollout_id}: the target has no device")
        bad = [i for i in ids if not is_valid_device_id(i)]
        if bad:
            raise RolloutError(f"rollout {rollout_id}: invalid device id {bad[0]!r}")
        # Online devices first, each group shuffled with the seed: a canary made of
        # offline devices would have nothing to report and hold the rollout.
        shuffle = random.Random(seed).shuffle  # noqa: S311 (a reproducible order, no secret)
        up = set(online)
        present = sorted(i for i in ids if i in up)
        absent = sorted(i for i in ids if i not in up)
        shuffle(present)
        shuffle(absent)
        order = present + absent
        self.rollout_id = rollout_id
        self.artifact = artifact
        self.policy = policy
        self.seed = seed
        self._state = RolloutState.CREATED
        self._stage = 0
        self._order = order
        self._devices: dict[str, RolloutDevice] = {}
        start = 0
        sizes = policy.stage_sizes(len(order))
        for index, size in enumerate(sizes):
            for device_id in order[start : start + size]:
                self._devices[device_id] = RolloutDevice(
                    device_id, index, online=device_id in up, updated_at=now
                )
            start += size
        self._stages = [_Stage() for _ in sizes]
        self._rollback_stages: list[int] = []
        self._rollback_reason: str | None = None
        self._reason: str | None = None
        self._halt_reason: str | None = None
        self._created_at = now
        self._started_at: float | None = None
        self._finished_at: float | None = None
        self._state_since = now
        self._updated_at = now

    # ----------------------------------------------------------------- properties

    @property
    def state(self) -> RolloutState:
        """Where the rollout stands."""
        return self._state

    @property
    def stage(self) -> int:
        """Index of the current stage (0 = canary, also before the start)."""
        return self._stage

    @property
    def stages(self) -> int:
        """Number of stages."""
        return len(self._stages)

    @property
    def halt_reason(self) -> str | None:
        """Why the rollout halted, or None."""
        return self._halt_reason

    def stage_devices(self, stage: int) -> tuple[str, ...]:
        """Give the devices of a stage, sorted."""
        return _ids(d.device_id for d in self._devices.values() if d.stage == stage)

    def device(self, device_id: str) -> RolloutDevice | None:
        """Give one device's record, or None if it is not part of the rollout."""
        return self._devices.get(device_id)

    def devices(self) -> list[RolloutDevice]:
        """Give every device's record, sorted by id."""
        return [self._devices[k] for k in sorted(self._devices)]

    def device_states(self) -> dict[str, DeviceRow]:
        """Give each device's persistable row (stage, state, detail), sorted by id."""
        return {
            d.device_id: DeviceRow(d.stage, d.status, d.detail, d.updated_at)
            for d in self.devices()
        }

    # ----------------------------------------------------------------- internals

    def _put(self, device: RolloutDevice, now: float) -> bool:
        old = self._devices[device.device_id]
        if replace(device, updated_at=old.updated_at) == old:
            return False
        self._devices[device.device_id] = replace(device, updated_at=now)
        self._updated_at = now
        return True

    def _set_state(self, new: RolloutState, now: float, reason: str) -> StateChanged:
        old = self._state
        self._state = new
        self._reason = reason
        self._state_since = now
        self._updated_at = now
        if new in _FINAL and self._finished_at is None:
            self._finished_at = now
        logger.info("rollout %s: %s -> %s (%s)", self.rollout_id, old, new, reason)
        return StateChanged(old, new, reason)

    def _stats(self, stage: int) -> _Stats:
        require = self.policy.health.require_health
        size = reported = failed = undecided = 0
        for device in self._devices.values():
            if device.stage != stage:
                continue
            size += 1
            verdict = device.verdict(require_health=require)
            if verdict is None:
                if device.online and device.install is not DeviceState.OFFLINE:
                    undecided += 1
            else:
                reported += 1
                failed += verdict == "failed"
        return _Stats(size, reported, failed, undecided)

    def _release(self, stage: int, now: float) -> list[Action]:
        self._stages[stage] = _Stage(released_at=now, soak_from=now)
        members = [d for d in self._devices.values() if d.stage == stage]
        online = []
        for device in members:
            if device.online:
                online.append(device.device_id)
                released = replace(
                    device,
                    marker=None,
                    install=DeviceState.PENDING,
                    released_at=now,
                    deployed_at=now,
                )
            else:
                released = replace(device, marker=None, install=DeviceState.OFFLINE)
            self._put(released, now)
        logger.info("rollout %s: stage %d released", self.rollout_id, stage)
        actions: list[Action] = [StageReleased(stage, _ids(d.device_id for d in members))]
        if online:
            actions.append(Deploy(_ids(online)))
        return actions

    def _halt(self, now: float, reason: str) -> list[Action]:
        self._halt_reason = reason
        actions: list[Action] = [self._set_state(RolloutState.HALTED, now, reason)]
        if self.policy.rollback_on_halt:
            actions += self._revert(
                [self._stage], now, f"rollout {self.rollout_id} halted: {reason}"
            )
        return actions

    def _revert(self, stages: Iterable[int], now: float, reason: str) -> list[Action]:
        """Mark installed devices of ``stages`` REVERTING; Rollback the online ones."""
        new = [s for s in stages if s not in self._rollback_stages]
        self._rollback_stages = sorted({*self._rollback_stages, *new})
        if self._rollback_reason is None:
            self._rollback_reason = reason
        online = []
        for device_id in sorted(self._devices):
            device = self._devices[device_id]
            installed = device.marker is None and device.install is DeviceState.INSTALLED
            if installed and device.stage in new:
                self._put(replace(device, marker=Marker.REVERTING), now)
                if device.online:
                    online.append(device_id)
        return [Rollback(_ids(online), reason)] if online else []

    def _check_halt(self, now: float) -> list[Action]:
        """Halt at once if the current stage's failures exceed the whole stage's share."""
        if self._state not in _JUDGING:
            return []
        stats = self._stats(self._stage)
        if not _exceeds(stats.failed, stats.size, self.policy.max_failure):
            return []
        return self._halt(
            now,
            f"{stats.failed} of {stats.size} devices of stage {self._stage} failed; "
            f"at most {self.policy.max_failure * 100:g}% may fail",
        )

    def _judge(self, now: float) -> list[Action]:
        """After the soak, advance, complete, wait, or halt (module docstring)."""
        soak_from = self._stages[self._stage].soak_from
        if soak_from is None or now < soak_from + self.policy.soak_s:
            return []
        stats = self._stats(self._stage)
        if stats.reported < min(self.policy.min_reports, stats.size):
            return []
        if not _exceeds(stats.failed, stats.reported, self.policy.max_failure):
            if self._stage + 1 < len(self._stages):
                self._stage += 1
                return self._release(self._stage, now)
            return [self._set_state(RolloutState.COMPLETED, now, "every stage passed")]
        if stats.undecided_online:
            return []
        return self._halt(
            now,
            f"{stats.failed} of {stats.reported} reporting devices of stage {self._stage} "
            f"failed after the soak; at most {self.policy.max_failure * 100:g}% may fail",
        )

    def _expire(self, now: float) -> None:
        timeout = self.policy.install_timeout_s
        for device_id in sorted(self._devices):
            device = self._devices[device_id]
            if (
                device.marker is None
                and device.online
                and device.install in _RANK
                and device.deployed_at is not None
                and now >= device.deployed_at + timeout
            ):
                self._put(
                    replace(
                        device,
                        install=DeviceState.TIMED_OUT,
                        detail=f"still {device.install} {timeout:g}s after the deploy",
                    ),
                    now,
                )

    def _redeploy(self, device: RolloutDevice, now: float) -> bool:
        """Prepare a catch-up deploy to a released device that just came online."""
        if self._state not in _DEPLOYING or device.marker is not None:
            return False
        if device.install not in (DeviceState.OFFLINE, DeviceState.TIMED_OUT):
            return False
        install = DeviceState.PENDING if device.install is DeviceState.OFFLINE else device.install
        self._put(
            replace(
                device,
                install=install,
                deployed_at=now,
                released_at=now if device.released_at is None else device.released_at,
            ),
            now,
        )
        return True

    def _go_offline(self, device: RolloutDevice, now: float) -> None:
        install = device.install
        if device.marker is None and install in _RANK:
            install = DeviceState.OFFLINE
        self._put(replace(device, online=False, install=install), now)

    # ----------------------------------------------------------------- operations

    def start(self, now: float) -> list[Action]:
        """Start the rollout: release the canary.

        Args:
            now: The coordinator's current time, unix seconds.

        Returns:
            ``StateChanged``, ``StageReleased`` and ``Deploy`` to the online canary
            devices (when any).

        Raises:
            RolloutError: The rollout was started (or aborted) already.
        """
        if self._state is not RolloutState.CREATED:
            raise RolloutError(f"rollout {self.rollout_id} is {self._state}; it starts only once")
        self._started_at = now
        actions: list[Action] = [self._set_state(RolloutState.RUNNING, now, "started")]
        return actions + self._release(0, now)

    def pause(self, now: float, actor: str) -> list[Action]:
        """Stop releasing new stages (catch-ups of released devices continue).

        Args:
            now: The coordinator's current time, unix seconds.
            actor: Who asks (for the audit log).

        Returns:
            ``StateChanged``, or nothing if already paused.

        Raises:
            RolloutError: The rollout is not running.
        """
        if self._state is RolloutState.PAUSED:
            return []
        if self._state is not RolloutState.RUNNING:
            raise RolloutError(f"rollout {self.rollout_id} is {self._state}; cannot pause it")
        return [self._set_state(RolloutState.PAUSED, now, f"paused by {actor}")]

    def resume(self, now: float, actor: str) -> list[Action]:
        """Let a paused rollout advance again (the soak keeps counting while paused).

        Args:
            now: The coordinator's current time, unix seconds.
            actor: Who asks (for the audit log).

        Returns:
            ``StateChanged``, or nothing if already running.

        Raises:
            RolloutError: The rollout is not paused (halted, aborted and completed
                rollouts never resume; a created one is started with ``start``).
        """
        if self._state is RolloutState.RUNNING:
            return []
        if self._state is not RolloutState.PAUSED:
            extra = f" ({self._halt_reason}); start a new rollout" if self._halt_reason else ""
            raise RolloutError(
                f"rollout {self.rollout_id} is {self._state}{extra}; only a paused rollout resumes"
            )
        return [self._set_state(RolloutState.RUNNING, now, f"resumed by {actor}")]

    def abort(self, now: float, actor: str, *, rollback: bool = False) -> list[Action]:
        """Stop the rollout for good, optionally rolling back every installed device.

        Args:
            now: The coordinator's current time, unix seconds.
            actor: Who asks (for the audit log).
            rollback: Roll back the devices of every released stage that installed
                the new version (offline ones when they come back).

        Returns:
            ``StateChanged`` (unless already aborted) and ``Rollback`` (if asked and
            any online device installed the version).

        Raises:
            RolloutError: The rollout completed.
        """
        if self._state is RolloutState.COMPLETED:
            raise RolloutError(f"rollout {self.rollout_id} completed; roll the model back instead")
        actions: list[Action] = []
        if self._state is not RolloutState.ABORTED:
            actions.append(self._set_state(RolloutState.ABORTED, now, f"aborted by {actor}"))
        if rollback:
            released = [i for i, s in enumerate(self._stages) if s.released_at is not None]
            actions += self._revert(released, now, f"rollout {self.rollout_id} aborted by {actor}")
        return actions

    def tick(self, now: float) -> list[Action]:
        """Apply the timers: install timeouts, then judge the current stage.

        Args:
            now: The coordinator's current time, unix seconds.

        Returns:
            A halt (``StateChanged``, ``Rollback``), the next stage
            (``StageReleased``, ``Deploy``), completion (``StateChanged``), or
            nothing.
        """
        if self._state is RolloutState.CREATED:
            return []
        self._expire(now)
        actions = self._check_halt(now)
        if self._state is RolloutState.RUNNING:
            actions += self._judge(now)
        return actions

    # ----------------------------------------------------------------- events

    def on_install_status(
        self, device_id: str, state: DeviceState, now: float, *, error: str | None = None
    ) -> list[Action]:
        """Apply a device's install report (rules in the module docstring).

        Args:
            device_id: The reporting device.
            state: The reported state, as the adapter mapped it.
            now: The coordinator's current time, unix seconds.
            error: The device's error code or reason, kept as the device's detail.

        Returns:
            A halt, or a ``Rollback`` for a device that installed after its stage
            was rolled back, or nothing.
        """
        device = self._devices.get(device_id)
        if device is None or state not in _REPORTABLE or device.marker is Marker.WAITING:
            return []
        if device.marker is not None:  # REVERTING, REVERTED, REVERT_FAILED
            if state is DeviceState.ROLLED_BACK and device.marker is not Marker.REVERTED:
                self._put(
                    replace(device, marker=Marker.REVERTED, detail=error or device.detail), now
                )
            elif state in (DeviceState.FAILED, DeviceState.REJECTED) and (
                device.marker is Marker.REVERTING
            ):
                self._put(replace(device, marker=Marker.REVERT_FAILED, detail=error), now)
            return []
        if not _admits(device.install, state):
            return []
        updated = replace(device, install=state, detail=error)
        if state is DeviceState.INSTALLED and device.install is not DeviceState.INSTALLED:
            updated = replace(updated, installed_at=now)
        if state is DeviceState.INSTALLED and device.install is DeviceState.INSTALLED:
            updated = replace(updated, detail=device.detail)  # a duplicate keeps the verdict
        if not self._put(updated, now):
            return []
        if state is DeviceState.INSTALLED and device.stage in self._rollback_stages:
            reason = self._rollback_reason or f"rollout {self.rollout_id} rolled back"
            self._put(replace(updated, marker=Marker.REVERTING), now)
            return [Rollback((device_id,), reason)]  # the report proves it is connected
        return self._check_halt(now) if device.stage == self._stage else []

    def on_health(
        self,
        device_id: str,
        *,
        model: str,
        version: int,
        predictions: int,
        errors: int,
        p95_ms: float,
        now: float,
    ) -> list[Action]:
        """Apply a telemetry window: a baseline, or a health verdict on the new version.

        Windows of other models, with fewer than ``health.min_predictions`` calls
        (``predictions + errors``) or with impossible figures are ignored.

        Args:
            device_id: The reporting device.
            model: Model served in the window.
            version: Its version.
            predictions: Successful inference calls in the window.
            errors: Failed inference calls in the window.
            p95_ms: p95 latency of the successful calls, milliseconds.
            now: The coordinator's current time, unix seconds.

        Returns:
            A halt, or nothing.
        """
        device = self._devices.get(device_id)
        health = self.policy.health
        if (
            device is None
            or model != self.artifact.model
            or min(predictions, errors) < 0
            or not math.isfinite(p95_ms)
            or p95_ms < 0
            or predictions + errors < health.min_predictions
        ):
            return []
        sample = HealthSample(version, predictions, errors, float(p95_ms), now)
        if version != self.artifact.version:
            kept = [w for w in device.baseline_windows if w.version == version]
            windows = (*kept[-(BASELINE_WINDOWS - 1) :], sample)
            self._put(replace(device, baseline_windows=windows), now)
            return []
        if device.marker is not None or device.install is not DeviceState.INSTALLED:
            return []
        problem = self._health_problem(sample, device.baseline)
        if device.health_failed:
            updated = replace(device, last_health=sample)
        elif problem is not None:
            updated = replace(device, last_health=sample, health_failed=True, detail=problem)
        else:
            updated = replace(device, last_health=sample, health_ok=True)
        self._put(updated, now)
        return self._check_halt(now) if device.stage == self._stage else []

    def _health_problem(self, sample: HealthSample, baseline: HealthSample | None) -> str | None:
        health = self.policy.health
        base_rate = 0.0 if baseline is None else baseline.error_rate
        if sample.error_rate > base_rate + health.max_error_rate + _EPS:
            return (
                f"unhealthy: error rate {sample.error_rate:.1%} "
                f"(baseline {base_rate:.1%}, allowed +{health.max_error_rate:.1%})"
            )
        if (
            baseline is not None
            and baseline.predictions > 0
            and sample.predictions > 0
            and baseline.p95_ms > 0
            and sample.p95_ms > baseline.p95_ms * health.max_p95_ratio + _EPS
        ):
            return (
                f"unhealthy: p95 latency {sample.p95_ms:g} ms "
                f"(baseline {baseline.p95_ms:g} ms, allowed x{health.max_p95_ratio:g})"
            )
        return None

    def on_online(self, device_id: str, now: float) -> list[Action]:
        """Note that a device came online; released devices catch up.

        Args:
            device_id: The device.
            now: The coordinator's current time, unix seconds.

        Returns:
            ``Deploy`` for a released device that was offline or timed out (while
            the rollout is running, paused or completed), ``Rollback`` for a
            device whose rollback is pending, or nothing (also when the device was
            online already).
        """
        device = self._devices.get(device_id)
        if device is None or device.online:
            return []
        device = replace(device, online=True)
        self._put(device, now)
        if device.marker is Marker.REVERTING:
            return [Rollback((device_id,), self._rollback_reason or "rollout rolled back")]
        return [Deploy((device_id,))] if self._redeploy(device, now) else []

    def on_offline(self, device_id: str, now: float) -> list[Action]:
        """Note that a device went offline: one still installing becomes ``offline``.

        Args:
            device_id: The device.
            now: The coordinator's current time, unix seconds.

        Returns:
            Nothing (a list for symmetry with the other events).
        """
        device = self._devices.get(device_id)
        if device is not None and device.online:
            self._go_offline(device, now)
        return []

    def add_device(self, device_id: str, now: float, *, online: bool) -> list[Action]:
        """Take a device that joined the target (placement in the module docstring).

        Args:
            device_id: The device.
            now: The coordinator's current time, unix seconds.
            online: Whether it is online now.

        Returns:
            ``Deploy`` if its stage is released and it is online, else nothing
            (also for a device already in the rollout, and in a halted or aborted
            rollout, which does not take it).

        Raises:
            RolloutError: The device id is invalid.
        """
        if not is_valid_device_id(device_id):
            raise RolloutError(f"rollout {self.rollout_id}: invalid device id {device_id!r}")
        if device_id in self._devices or self._state in (
            RolloutState.HALTED,
            RolloutState.ABORTED,
        ):
            return []
        # Past the canary: the current stage; else the first wave (or the only stage).
        stage = self._stage or min(1, len(self._stages) - 1)
        self._order.append(device_id)
        device = RolloutDevice(device_id, stage, online=online, updated_at=now)
        self._devices[device_id] = device
        self._updated_at = now
        info = self._stages[stage]
        if info.released_at is None:
            return []
        if online and self._state in _DEPLOYING:
            if self._state in _JUDGING:
                self._stages[stage] = replace(info, soak_from=now)
            self._put(
                replace(
                    device,
                    marker=None,
                    install=DeviceState.PENDING,
                    released_at=now,
                    deployed_at=now,
                ),
                now,
            )
            return [Deploy((device_id,))]
        self._put(replace(device, marker=None, install=DeviceState.OFFLINE), now)
        return []

    def resume_after_restart(self, now: float, online: Collection[str]) -> list[Action]:
        """Re-send what a restarted service may have lost.

        Presence is first reconciled with ``online`` (devices that went offline
        meanwhile become ``offline`` if still installing; devices that came back
        catch up as in :meth:`on_online`). Then every released online device
        still installing gets ``Deploy`` again (an agent resumes its transfer, or
        answers ``installed`` again), and every online ``reverting`` device gets
        ``Rollback`` again. Install timeouts keep counting from the last deploy
        sent before the restart.

        Args:
            now: The coordinator's current time, unix seconds.
            online: Devices online now.

        Returns:
            At most one ``Deploy`` and one ``Rollback``.
        """
        deploy: list[str] = []
        for device_id in sorted(self._devices):
            device = self._devices[device_id]
            is_online = device_id in online
            if device.online and not is_online:
                self._go_offline(device, now)
            elif is_online and not device.online:
                device = replace(device, online=True)
                self._put(device, now)
                if self._redeploy(device, now):
                    deploy.append(device_id)
            elif (
                is_online
                and self._state in _DEPLOYING
                and device.marker is None
                and device.install in _RANK
            ):
                deploy.append(device_id)
        reverting = [
            d.device_id for d in self._devices.values() if d.marker is Marker.REVERTING and d.online
        ]
        actions: list[Action] = []
        if deploy:
            actions.append(Deploy(_ids(deploy)))
        if reverting:
            reason = self._rollback_reason or f"rollout {self.rollout_id} rolled back"
            actions.append(Rollback(_ids(reverting), reason))
        return actions

    # ----------------------------------------------------------------- reports

    def summary(self) -> dict[str, Any]:
        """Give a JSON-able summary for the API and the CLI.

        Returns:
            ``rollout_id``, ``artifact``, ``state``, ``reason`` (of the last state
            change), ``halt_reason``, ``stage``, ``stages``, ``counts`` (devices per
            status, every status), ``failure_rate`` (of the current stage, None
            without reports), ``stage_details`` (per stage: ``size``,
            ``released_at``, ``reported``, ``failed``, ``failure_rate``, non-zero
            ``counts``), the timestamps ``created_at``, ``started_at``,
            ``finished_at``, ``state_since``, ``updated_at``, and ``policy``.
        """
        statuses: list[DeviceStatus] = [*Marker, *DeviceState]
        counts = {str(s): 0 for s in statuses}
        per_stage: list[dict[str, int]] = [{} for _ in self._stages]
        for device in self._devices.values():
            key = str(device.status)
            counts[key] += 1
            per_stage[device.stage][key] = per_stage[device.stage].get(key, 0) + 1
        details = []
        for index, info in enumerate(self._stages):
            stats = self._stats(index)
            details.append(
                {
                    "stage": index,
                    "size": stats.size,
                    "released_at": info.released_at,
                    "reported": stats.reported,
                    "failed": stats.failed,
                    "failure_rate": stats.failure_rate,
                    "counts": dict(sorted(per_stage[index].items())),
                }
            )
        return {
            "rollout_id": self.rollout_id,
            "artifact": self.artifact.to_json(),
            "state": str(self._state),
            "reason": self._reason,
            "halt_reason": self._halt_reason,
            "stage": self._stage,
            "stages": len(self._stages),
            "counts": counts,
            "failure_rate": self._stats(self._stage).failure_rate,
            "stage_details": details,
            "created_at": self._created_at,
            "started_at": self._started_at,
            "finished_at": self._finished_at,
            "state_since": self._state_since,
            "updated_at": self._updated_at,
            "policy": self.policy.to_json(),
        }

    # ----------------------------------------------------------------- persistence

    def snapshot(self) -> dict[str, Any]:
        """Give the whole state as a JSON-able dict (keys sorted, ``"format": 1``).

        :meth:`restore` rebuilds an engine that behaves exactly as this one.
        """
        snapshot: dict[str, Any] = _sorted_json(
            {
                "format": FORMAT,
                "rollout_id": self.rollout_id,
                "artifact": self.artifact.to_json(),
                "policy": self.policy.to_json(),
                "seed": self.seed,
                "state": str(self._state),
                "stage": self._stage,
                "stages": [
                    {"released_at": s.released_at, "soak_from": s.soak_from} for s in self._stages
                ],
                "order": list(self._order),
                "devices": [d.to_json() for d in self.devices()],
                "rollback_stages": list(self._rollback_stages),
                "rollback_reason": self._rollback_reason,
                "reason": self._reason,
                "halt_reason": self._halt_reason,
                "created_at": self._created_at,
                "started_at": self._started_at,
                "finished_at": self._finished_at,
                "state_since": self._state_since,
                "updated_at": self._updated_at,
            }
        )
        return snapshot

    @classmethod
    def restore(cls, snapshot: Mapping[str, Any]) -> Rollout:
        """Rebuild an engine from :meth:`snapshot` (also after a JSON round trip).

        Args:
            snapshot: The dict.

        Returns:
            The engine, in the state it was saved in.

        Raises:
            RolloutError: Not a snapshot of a known format, or malformed.
        """
        if not isinstance(snapshot, Mapping) or snapshot.get("format") != FORMAT:
            found = snapshot.get("format") if isinstance(snapshot, Mapping) else None
            raise RolloutError(f"not a rollout snapshot of format {FORMAT} (format {found!r})")
        try:
            engine = cls.__new__(cls)
            engine.rollout_id = str(snapshot["rollout_id"])
            engine.artifact = RolloutArtifact(**snapshot["artifact"])
            engine.policy = RolloutPolicy.from_json(snapshot["policy"])
            engine.seed = int(snapshot["seed"])
            engine._state = RolloutState(snapshot["state"])
            engine._stage = int(snapshot["stage"])
            engine._stages = [
                _Stage(_opt_float(s["released_at"]), _opt_float(s["soak_from"]))
                for s in snapshot["stages"]
            ]
            engine._order = [str(i) for i in snapshot["order"]]
            devices = [RolloutDevice.from_json(d) for d in snapshot["devices"]]
            engine._devices = {d.device_id: d for d in devices}
            engine._rollback_stages = [int(i) for i in snapshot["rollback_stages"]]
            engine._rollback_reason = snapshot["rollback_reason"]
            engine._reason = snapshot["reason"]
            engine._halt_reason = snapshot["halt_reason"]
            engine._created_at = float(snapshot["created_at"])
            engine._started_at = _opt_float(snapshot["started_at"])
            engine._finished_at = _opt_float(snapshot["finished_at"])
            engine._state_since = float(snapshot["state_since"])
            engine._updated_at = float(snapshot["updated_at"])
        except (KeyError, TypeError, ValueError) as exc:
            raise RolloutError(f"malformed rollout snapshot: {exc!r}") from None
        if (
            not 0 <= engine._stage < len(engine._stages)
            or sorted(engine._order) != sorted(engine._devices)
            or any(not 0 <= d.stage < len(engine._stages) for d in devices)
        ):
            raise RolloutError("malformed rollout snapshot: inconsistent stages or devices")
        return engine
