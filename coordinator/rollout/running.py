"""What the rollout manager keeps per running rollout, and which rollouts to resume.

:class:`Running` is one rollout the manager runs: its engine, the artifact and
target, which deployment each device was last sent, and the deliveries still tracked
for it (:class:`Sent`). :meth:`Running.finished` tells which deliveries no device
needs any more, so the manager can forget them (see
:mod:`coordinator.rollout.manager`). :func:`to_resume` picks, after a restart, the
stored rollouts to run again; :func:`device_rows` gives the engine's devices as the
store keeps them.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

from coordinator.delivery.deliveries import Artifact, Delivery
from coordinator.delivery.tracker import IN_PROGRESS_STATES
from coordinator.errors import CoordinatorError
from coordinator.link.fleet import Target
from coordinator.rollout.actions import RolloutState
from coordinator.rollout.devices import Marker
from coordinator.rollout.engine import Rollout
from coordinator.rollout.rows import RolloutDevice, RolloutRow

__all__ = ["ENDED_STATES", "RESTORED", "Running", "Sent", "device_rows", "settled", "to_resume"]

logger = logging.getLogger(__name__)

RESTORED = "(restored)"
"""Stands for the deployment a previous process sent a device (its id is not kept)."""
ENDED_STATES = frozenset({RolloutState.HALTED, RolloutState.ABORTED})
"""Rollouts that do nothing more once every device has settled. A completed one
still deploys to devices that come back or join its target, until a newer rollout
of the same model replaces it."""


@dataclass(frozen=True)
class Sent:
    """A delivery tracked for a rollout, and which devices it went to."""

    delivery: Delivery
    device_ids: tuple[str, ...]
    rollback: bool


@dataclass
class Running:
    """One rollout the manager runs, and what it sent for it."""

    engine: Rollout
    artifact: Artifact
    target: Target
    sent: dict[str, str] = field(default_factory=dict)
    """Device -> the deployment id this process last sent it."""
    deliveries: dict[str, Sent] = field(default_factory=dict)
    """Deployment id -> a delivery still tracked."""
    unsaved: bool = False
    """A device's change not saved yet (the next tick saves it)."""

    def finished(self) -> list[Delivery]:
        """Pop the deliveries none of whose devices needs them any more."""
        done = [
            deployment_id
            for deployment_id, sent in self.deliveries.items()
            if not any(self._needs(device_id, deployment_id, sent) for device_id in sent.device_ids)
        ]
        return [self.deliveries.pop(deployment_id).delivery for deployment_id in done]

    def _needs(self, device_id: str, deployment_id: str, sent: Sent) -> bool:
        device = self.engine.device(device_id)
        if device is None:
            return False
        if sent.rollback:
            return device.marker is Marker.REVERTING
        return (
            self.sent.get(device_id) == deployment_id
            and device.marker is None
            and device.install in IN_PROGRESS_STATES
        )


def to_resume(rows: Sequence[RolloutRow]) -> list[tuple[RolloutRow, Rollout]]:
    """Rollouts still going, and the latest completed one of each model.

    Rows whose snapshot cannot be restored are logged and skipped.
    """
    keep: list[tuple[RolloutRow, Rollout]] = []
    completed: set[str] = set()
    for row in sorted(rows, key=lambda r: r.created_at, reverse=True):
        try:
            engine = Rollout.restore(row.snapshot)
        except (CoordinatorError, KeyError, TypeError, ValueError) as exc:
            logger.error("cannot resume rollout %s: %s", row.rollout_id, exc)
            continue
        if engine.state in ENDED_STATES and settled(engine):
            continue
        if engine.state is RolloutState.COMPLETED:
            if engine.artifact.model in completed:
                continue
            completed.add(engine.artifact.model)
        keep.append((row, engine))
    return keep


def device_rows(engine: Rollout) -> list[RolloutDevice]:
    """The engine's devices as the store keeps them, by stage then id."""
    rows = [
        RolloutDevice(
            device_id=device_id,
            stage=row.stage,
            state=str(row.state),
            updated_at=row.updated_at,
            detail={"detail": row.detail} if row.detail else {},
        )
        for device_id, row in engine.device_states().items()
    ]
    return sorted(rows, key=lambda r: (r.stage, r.device_id))


def settled(engine: Rollout) -> bool:
    """No device of the rollout is still installing or being reverted: an ended
    rollout keeps listening until then, so its last reports are recorded."""
    return not any(
        d.marker is Marker.REVERTING or d.status in IN_PROGRESS_STATES for d in engine.devices()
    )
