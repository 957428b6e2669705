"""What the rollout engine tells its adapter: the rollout's states and the actions.

Every call of :class:`~coordinator.rollout.engine.Rollout` that changes something
returns a list of :data:`Action` values, in order; the adapter
(:class:`~coordinator.rollout.manager.RolloutManager`) executes them: ``SendDeploy`` and
``SendRollback`` become MQTT commands to the listed devices, ``StateChanged`` and
``StageReleased`` become audit-log lines and UI updates. Each action has a
``to_json`` form for the log. Pure values: no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any, TypeAlias

__all__ = [
    "DEPLOYING_STATES",
    "FINAL_STATES",
    "JUDGING_STATES",
    "Action",
    "RolloutState",
    "SendDeploy",
    "SendRollback",
    "StageReleased",
    "StateChanged",
]


class RolloutState(StrEnum):
    """Where a rollout stands (transitions in :mod:`coordinator.rollout.engine`)."""

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


FINAL_STATES = frozenset({RolloutState.HALTED, RolloutState.ABORTED, RolloutState.COMPLETED})
"""States a rollout does not leave (but ``halted`` by ``abort``)."""
DEPLOYING_STATES = frozenset({RolloutState.RUNNING, RolloutState.PAUSED, RolloutState.COMPLETED})
"""States in which devices that come back or join catch up."""
JUDGING_STATES = frozenset({RolloutState.RUNNING, RolloutState.PAUSED})
"""States in which the current stage is judged (a halt is possible)."""


@dataclass(frozen=True)
class SendDeploy:
    """Send the rollout's artifact to these devices (sorted ids)."""

    device_ids: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        """Give ``{"type": "deploy", "device_ids": [...]}``."""
        return {"type": "deploy", "device_ids": list(self.device_ids)}


@dataclass(frozen=True)
class SendRollback:
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


Action: TypeAlias = SendDeploy | SendRollback | StateChanged | StageReleased
"""What the adapter must do (or record) after an engine call, in order."""
