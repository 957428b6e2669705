"""Rows the store returns (and a few it takes): frozen dataclasses, plain values.

JSON columns come back decoded (``dict`` / ``tuple``); timestamps are unix seconds
as the callers passed them in. Nothing here touches SQLite.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from coordinator.rollout.rows import RolloutDevice, RolloutInfo, RolloutRow
from coordinator.service.tokens import Role

__all__ = [
    "ArtifactRow",
    "AuditRow",
    "DeviceRow",
    "PresenceRow",
    "RolloutDevice",
    "RolloutInfo",
    "RolloutRow",
    "RoundRow",
    "RunRow",
    "RunState",
    "TelemetryRow",
    "TokenRow",
]


@dataclass(frozen=True)
class DeviceRow:
    """A device the coordinator has seen.

    Attributes:
        device_id: The device (also its MQTT username).
        first_seen: When it was first seen.
        last_seen: When it was last heard from (any upsert).
        online: Presence as last reported.
        status: The last retained status message as a JSON dict, or None.
        tags: Its tags.
        model: The model it serves, or None.
        version: That model's version, or None.
    """

    device_id: str
    first_seen: float
    last_seen: float
    online: bool
    status: dict[str, Any] | None
    tags: tuple[str, ...]
    model: str | None
    version: int | None


@dataclass(frozen=True)
class PresenceRow:
    """One presence change of a device (first sight included)."""

    device_id: str
    online: bool
    at: float


@dataclass(frozen=True)
class ArtifactRow:
    """A stored artifact; its bytes live in ``<artifact_dir>/<sha256>.fedge``.

    Attributes:
        sha256: Hex SHA-256 of the bytes (the key).
        name: Model name.
        version: Model version.
        size: Length of the bytes.
        manifest: The artifact's manifest as a JSON dict.
        uploaded_by: Token id or ``cli:<login>``.
        uploaded_at: When it was first stored.
    """

    sha256: str
    name: str
    version: int
    size: int
    manifest: dict[str, Any]
    uploaded_by: str
    uploaded_at: float


class RunState(StrEnum):
    """Lifecycle of a federated run."""

    RUNNING = "running"
    FINISHED = "finished"
    FAILED = "failed"
    INTERRUPTED = "interrupted"
    """Ended before its last round: stopped by an operator, or still running when
    the service stopped (or was killed: found at the next start)."""


@dataclass(frozen=True)
class RunRow:
    """A federated run.

    Attributes:
        run_id: The run.
        config: Its settings as a JSON dict.
        state: Where it stands.
        created_by: Token id or ``cli:<login>``.
        created_at: Start time.
        updated_at: Time of the last change (a round recorded, finished).
    """

    run_id: str
    config: dict[str, Any]
    state: RunState
    created_by: str
    created_at: float
    updated_at: float


@dataclass(frozen=True)
class RoundRow:
    """One round of a federated run.

    Attributes:
        run_id: The run.
        round: 1-based round number.
        status: ``ok``, ``failed`` or ``running`` (opaque to the store).
        reason: Why it failed (empty when ok).
        metrics: The round's figures as a JSON dict (``RoundReport`` fields).
        started_at: Round start.
        finished_at: Round end, or None while it runs.
    """

    run_id: str
    round: int
    status: str
    reason: str
    metrics: dict[str, Any]
    started_at: float
    finished_at: float | None


@dataclass(frozen=True)
class TelemetryRow:
    """One telemetry window of one device (given to and returned by the store).

    Attributes:
        device_id: The reporting device.
        received_at: Coordinator time the batch arrived (used for retention).
        window_start: Window start, device clock.
        window_end: Window end, device clock.
        model: Model served, or None.
        version: Its version, or None.
        predictions: Successful inference calls in the window.
        errors: Failed inference calls in the window.
        p50: Median latency, ms.
        p95: 95th percentile latency, ms.
        p99: 99th percentile latency, ms.
        cpu_percent: Agent CPU use.
        memory_bytes: Agent resident memory.
        seq: Sequence number of the batch the window came in.
        row_id: The store's id; None on rows not yet stored.
    """

    device_id: str
    received_at: float
    window_start: float
    window_end: float
    model: str | None
    version: int | None
    predictions: int
    errors: int
    p50: float
    p95: float
    p99: float
    cpu_percent: float
    memory_bytes: int
    seq: int
    row_id: int | None = None


@dataclass(frozen=True)
class AuditRow:
    """One audited action.

    Attributes:
        audit_id: Increasing id (use it to page with ``since_id``).
        at: When.
        actor: Token id, or ``cli:<login>``.
        role: The actor's role.
        action: What, e.g. ``rollout.create``.
        target: On what, e.g. a rollout id (may be empty).
        detail: Anything else as a JSON dict.
    """

    audit_id: int
    at: float
    actor: str
    role: Role
    action: str
    target: str
    detail: dict[str, Any]


@dataclass(frozen=True)
class TokenRow:
    """An API token, without its secret (the store keeps only the hash).

    Attributes:
        token_id: Public id (:func:`coordinator.service.tokens.token_id`).
        name: Human name given at creation.
        role: What it may do.
        created_at: Creation time.
        revoked_at: Revocation time, or None while valid.
        last_used_at: Last successful authentication, to within a minute, or None.
        expires_at: When it stops working, or None if it never expires (every token
            made before expiry existed).
    """

    token_id: str
    name: str
    role: Role
    created_at: float
    revoked_at: float | None
    last_used_at: float | None
    expires_at: float | None = None

    def expired(self, at: float) -> bool:
        """Tell whether the token has expired at ``at`` (unix seconds)."""
        return self.expires_at is not None and at >= self.expires_at
