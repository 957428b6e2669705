"""The state of one staged rollout: what it holds, how it is read, summarised and saved.

:class:`RolloutRecord` holds everything about one rollout (its devices in stage
order, the stages' release times, the state and its reasons, the timestamps) and
the low-level updates every rule uses (a device's new value, a state change, a
stage's counts). The rules that react to events and commands are its sub-class
:class:`~coordinator.rollout.engine.Rollout`.

Persistence: :meth:`RolloutRecord.snapshot` gives the whole state as a JSON-able
dict with sorted keys and ``"format": 1`` (:data:`FORMAT`); the adapter saves it
after every call that changed something, and :meth:`RolloutRecord.restore` rebuilds
an engine that behaves exactly as the saved one. :meth:`RolloutRecord.summary` is
the view the API and the CLI show. Pure: no clock, no I/O.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Self

from coordinator.delivery.tracker import DeviceState
from coordinator.errors import RolloutError
from coordinator.rollout.actions import FINAL_STATES, RolloutState, StateChanged
from coordinator.rollout.devices import (
    DeviceInRollout,
    DeviceStatus,
    Marker,
    RolloutArtifact,
    RolloutDeviceState,
    opt_float,
    sorted_ids,
)
from coordinator.rollout.policy import RolloutPolicy
from edge_agent.protocol import is_valid_device_id

__all__ = ["FORMAT", "RolloutRecord", "Stage", "StageStats"]

logger = logging.getLogger(__name__)

FORMAT = 1
"""Version of the :meth:`RolloutRecord.snapshot` layout."""


@dataclass(frozen=True)
class Stage:
    """When a stage was released, and since when its soak counts."""

    released_at: float | None = None
    soak_from: float | None = None


@dataclass(frozen=True)
class StageStats:
    """A stage's devices: how many, reported, failed, and online without a verdict."""

    size: int
    reported: int
    failed: int
    undecided_online: int

    @property
    def failure_rate(self) -> float | None:
        """Failures over reports, or None without reports."""
        return self.failed / self.reported if self.reported else None


def _sorted_json(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _sorted_json(value[k]) for k in sorted(value)}
    if isinstance(value, list):
        return [_sorted_json(v) for v in value]
    return value


class RolloutRecord:
    """The state of one staged rollout, read and saved (not thread-safe; the rules
    are :class:`~coordinator.rollout.engine.Rollout`).

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
        self._devices: dict[str, DeviceInRollout] = {}
        start = 0
        sizes = policy.stage_sizes(len(order))
        for index, size in enumerate(sizes):
            for device_id in order[start : start + size]:
                self._devices[device_id] = DeviceInRollout(
                    device_id, index, online=device_id in up, updated_at=now
                )
            start += size
        self._stages = [Stage() for _ in sizes]
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
        return sorted_ids(d.device_id for d in self._devices.values() if d.stage == stage)

    def device(self, device_id: str) -> DeviceInRollout | None:
        """Give one device's record, or None if it is not part of the rollout."""
        return self._devices.get(device_id)

    def devices(self) -> list[DeviceInRollout]:
        """Give every device's record, sorted by id."""
        return [self._devices[k] for k in sorted(self._devices)]

    def device_states(self) -> dict[str, RolloutDeviceState]:
        """Give each device's persistable row (stage, state, detail), sorted by id."""
        return {
            d.device_id: RolloutDeviceState(d.stage, d.status, d.detail, d.updated_at)
            for d in self.devices()
        }

    # ----------------------------------------------------------------- updates

    def _put(self, device: DeviceInRollout, now: float) -> bool:
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
        if new in FINAL_STATES and self._finished_at is None:
            self._finished_at = now
        logger.info("rollout %s: %s -> %s (%s)", self.rollout_id, old, new, reason)
        return StateChanged(old, new, reason)

    def _stats(self, stage: int) -> StageStats:
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
        return StageStats(size, reported, failed, undecided)

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
            **self._times(),
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
                **self._times(),
            }
        )
        return snapshot

    def _times(self) -> dict[str, float | None]:
        """When the rollout was created, started, finished, entered its state, last changed."""
        return {
            "created_at": self._created_at,
            "started_at": self._started_at,
            "finished_at": self._finished_at,
            "state_since": self._state_since,
            "updated_at": self._updated_at,
        }

    @classmethod
    def restore(cls, snapshot: Mapping[str, Any]) -> Self:
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
                Stage(opt_float(s["released_at"]), opt_float(s["soak_from"]))
                for s in snapshot["stages"]
            ]
            engine._order = [str(i) for i in snapshot["order"]]
            devices = [DeviceInRollout.from_json(d) for d in snapshot["devices"]]
            engine._devices = {d.device_id: d for d in devices}
            engine._rollback_stages = [int(i) for i in snapshot["rollback_stages"]]
            engine._rollback_reason = snapshot["rollback_reason"]
            engine._reason = snapshot["reason"]
            engine._halt_reason = snapshot["halt_reason"]
            engine._created_at = float(snapshot["created_at"])
            engine._started_at = opt_float(snapshot["started_at"])
            engine._finished_at = opt_float(snapshot["finished_at"])
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
