"""What the rollout manager needs from a store: a small Protocol, kept by the service's.

:class:`~coordinator.rollout.manager.RolloutManager` records a new rollout
(:meth:`RolloutStore.create_rollout`), saves the engine's snapshot and the per-device
rows after changes (:meth:`RolloutStore.save_rollout`), reads them back when it starts
(:meth:`RolloutStore.rollouts`, :meth:`RolloutStore.artifact_bytes`) and asks for each
device's recent telemetry on the version it served before, its health baseline
(:meth:`RolloutStore.baselines`). The service's SQLite
:class:`~coordinator.service.store.Store` implements it; the rollout package imports
nothing from the service above it.

Every method may raise :class:`~coordinator.errors.StoreError` (``NotFoundError`` for
an unknown rollout or artifact).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from typing import Any, Protocol

from coordinator.rollout.rows import RolloutDevice, RolloutRow

__all__ = ["BaselineWindow", "RolloutStore"]


class BaselineWindow(Protocol):
    """One stored telemetry window of a device, as a health baseline reads it."""

    @property
    def version(self) -> int | None:
        """The model version the device served in the window."""

    @property
    def predictions(self) -> int:
        """Successful inference calls in the window."""

    @property
    def errors(self) -> int:
        """Failed inference calls in the window."""

    @property
    def p95(self) -> float:
        """95th percentile latency in the window, ms."""


class RolloutStore(Protocol):
    """Where rollouts are kept across restarts (see the module docstring)."""

    def artifact_bytes(self, sha256: str) -> bytes:
        """The artifact file stored under ``sha256``."""

    def create_rollout(
        self,
        rollout_id: str,
        *,
        artifact_sha256: str,
        target: str,
        policy: Mapping[str, Any],
        state: str,
        snapshot: Mapping[str, Any],
        created_by: str,
        at: float,
    ) -> RolloutRow:
        """Record a new rollout with no devices yet."""

    def save_rollout(
        self,
        rollout_id: str,
        *,
        state: str,
        snapshot: Mapping[str, Any],
        devices: Iterable[RolloutDevice],
        at: float,
    ) -> None:
        """Replace a rollout's state, snapshot and device rows, all or nothing."""

    def rollout(self, rollout_id: str) -> RolloutRow | None:
        """One rollout, or None."""

    def rollouts(self, states: Collection[str] | None = None) -> list[RolloutRow]:
        """Every rollout (in those states)."""

    def baselines(
        self,
        model: str,
        *,
        other_than: int,
        min_calls: int,
        since: float,
        windows: int = 5,
        device_ids: Collection[str] | None = None,
    ) -> Mapping[str, Sequence[BaselineWindow]]:
        """Each device's newest windows on another version of ``model``."""
