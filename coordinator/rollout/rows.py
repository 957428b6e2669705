"""The rows a staged rollout is saved as: what the rollout manager gives the store.

The manager (:mod:`coordinator.rollout.manager`) saves each rollout as a
:class:`RolloutRow` (the engine's snapshot beside what operators see,
:class:`RolloutInfo`) and one :class:`RolloutDevice` per device; the service's store
(:mod:`coordinator.service.store`) keeps them in SQLite and gives them back on a
restart. They are plain frozen values, defined here so that the rollout package needs
nothing from the service above it (:mod:`coordinator.rollout.persistence`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

__all__ = ["RolloutDevice", "RolloutInfo", "RolloutRow"]


@dataclass(frozen=True)
class RolloutInfo:
    """A staged rollout as operators see it (without the engine's saved state).

    Attributes:
        rollout_id: The rollout.
        artifact_sha256: The artifact being rolled out.
        target: ``all``, ``tag:T`` or ``device:ID[,ID...]``.
        policy: The rollout policy as a JSON dict (stages, health thresholds).
        state: The engine's state name (opaque to the store).
        created_by: Token id or ``cli:<login>``.
        created_at: Creation time.
        updated_at: Time of the last save.
    """

    rollout_id: str
    artifact_sha256: str
    target: str
    policy: dict[str, Any]
    state: str
    created_by: str
    created_at: float
    updated_at: float


@dataclass(frozen=True)
class RolloutRow(RolloutInfo):
    """A staged rollout and the rollout engine's last saved state.

    Attributes:
        snapshot: The engine's full serialized state (opaque to the store; it holds
            every device's record, so it stays inside the service).
    """

    snapshot: dict[str, Any]

    def info(self) -> RolloutInfo:
        """The rollout without the engine's state: what the API and CLI show."""
        return RolloutInfo(**{f.name: getattr(self, f.name) for f in fields(RolloutInfo)})


@dataclass(frozen=True)
class RolloutDevice:
    """One device's place in a rollout (given to and returned by the store).

    Attributes:
        device_id: The device.
        stage: The rollout stage it belongs to (0-based).
        state: Its state name (opaque to the store, e.g. a ``DeviceState``).
        updated_at: Time of its last change.
        detail: Anything else as a JSON dict (error code, reason, chunks).
    """

    device_id: str
    stage: int
    state: str
    updated_at: float
    detail: dict[str, Any] = field(default_factory=dict)
