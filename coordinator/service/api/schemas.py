"""The HTTP API's JSON shapes: pydantic models mirroring the store's rows.

Responses: each ``*Out`` model mirrors one frozen dataclass of
:mod:`coordinator.service.store.records` or :mod:`coordinator.service.operations` field for field
(tuples become JSON arrays, enums their string values) and is built from it by
:meth:`pydantic.BaseModel.model_validate` with ``from_attributes``: that is the one
converter every route uses (``DeviceOut.model_validate(row)``). The models exist so
that ``/docs`` shows real response schemas and so that the wire contract is written
down in one place; ``tests/test_api.py`` checks that each mirrors its dataclass.

Requests: :class:`RolloutCreate`, :class:`DeployCreate`, :class:`RollbackCreate`,
:class:`RunCreate` and :class:`AbortBody` take their defaults from the request
dataclasses of :mod:`coordinator.service.operations`, refuse unknown fields (a typo such as
``"canery"`` is a 422, not a silently ignored setting) and turn into those
dataclasses with ``to_request()``. They check shapes only; what the values mean
(a canary of ``"5%"``, a strategy name) is for the :class:`Operations` object to
judge.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from coordinator.service.operations import (
    DeployRequest,
    RollbackRequest,
    RolloutRequest,
    RunRequest,
)
from coordinator.service.store.records import RunState
from coordinator.service.tokens import Role

__all__ = [
    "AbortBody",
    "ArtifactOut",
    "AuditOut",
    "DeployCreate",
    "DeployResultOut",
    "DeploymentViewOut",
    "DeviceOut",
    "DeviceProgressOut",
    "DriftOut",
    "ErrorBody",
    "ErrorOut",
    "FeatureDriftOut",
    "HealthOut",
    "PresenceOut",
    "RollbackCreate",
    "RolloutCreate",
    "RolloutDeviceOut",
    "RolloutOut",
    "RolloutViewOut",
    "RoundOut",
    "RunCreate",
    "RunOut",
    "RunViewOut",
    "TelemetryOut",
]

_SHORT = 256
"""Longest accepted value of a short string field of a request (ids, policies)."""


class _Out(BaseModel):
    """Base of response models: built from a dataclass row's attributes."""

    model_config = ConfigDict(from_attributes=True, frozen=True)


class _In(BaseModel):
    """Base of request models: unknown fields are an error."""

    model_config = ConfigDict(extra="forbid", frozen=True)


# --- responses ----------------------------------------------------------------------


class ErrorBody(_Out):
    """What went wrong: a stable machine-readable code and a human message."""

    code: str = Field(description="Stable code, e.g. `not_found`, `rollout_error`.")
    message: str
    details: list[dict[str, Any]] | None = Field(
        default=None, description="Per-field problems of a request that failed validation."
    )


class ErrorOut(_Out):
    """Every error response: ``{"error": {"code": ..., "message": ...}}``."""

    error: ErrorBody


class HealthOut(_Out):
    """Liveness: the process answers HTTP."""

    status: str = "ok"


class DeviceOut(_Out):
    """A device the coordinator has seen."""

    device_id: str
    first_seen: float = Field(description="Unix seconds.")
    last_seen: float = Field(description="Unix seconds of the last message.")
    online: bool
    status: dict[str, Any] | None = Field(description="Its last retained status message.")
    tags: list[str]
    model: str | None = Field(description="The model it serves.")
    version: int | None


class PresenceOut(_Out):
    """One online/offline change of a device (its first sight included)."""

    device_id: str
    online: bool
    at: float = Field(description="Coordinator clock, unix seconds.")


class TelemetryOut(_Out):
    """One telemetry window of one device."""

    device_id: str
    received_at: float
    window_start: float = Field(description="Device clock, unix seconds.")
    window_end: float
    model: str | None
    version: int | None
    predictions: int
    errors: int
    p50: float = Field(description="Median inference latency, ms.")
    p95: float
    p99: float
    cpu_percent: float
    memory_bytes: int
    seq: int
    row_id: int | None


class FeatureDriftOut(_Out):
    """One feature's drift."""

    index: int = Field(description="The feature's index in the reference profile.")
    psi: float = Field(description="Population Stability Index.")
    js: float = Field(description="Jensen-Shannon divergence, bits (0..1).")


class DriftOut(_Out):
    """The latest drift score of a device (or the fleet) on one model version."""

    scope: str = Field(description="`device` or `fleet`.")
    device_id: str | None = Field(description="The device; null for the fleet.")
    model: str
    version: int
    at: float = Field(description="When the coordinator computed it, unix seconds.")
    windows: int = Field(description="Telemetry windows pooled.")
    n: int = Field(description="Inputs behind the counts.")
    psi_max: float = Field(description="The largest feature PSI.")
    js_max: float = Field(description="The largest feature JS divergence, bits.")
    severity: str = Field(
        description="`none` (PSI < 0.1), `moderate` (< 0.25), `major`, or `insufficient` "
        "(too few rows behind the score)."
    )
    signal: str = Field(description="What the severity comes from: features, confidence, classes.")
    top: tuple[FeatureDriftOut, ...] = Field(description="Most drifting features first.")
    confidence_psi: float | None = Field(description="PSI of the confidence signal.")
    classes_psi: float | None = Field(description="PSI of the predicted-class shares.")
    invalid: dict[str, int] = Field(description="Inputs the devices refused, by reason.")
    devices: tuple[str, ...] = Field(description="Fleet: the devices driving it, worst first.")


class ArtifactOut(_Out):
    """A stored, verified artifact."""

    sha256: str = Field(description="Hex SHA-256 of the artifact bytes: its id.")
    name: str = Field(description="Model name.")
    version: int = Field(description="Model version.")
    size: int = Field(description="Bytes.")
    manifest: dict[str, Any]
    uploaded_by: str = Field(description="Token id, or `cli:<login>` for a local operator.")
    uploaded_at: float


class RolloutOut(_Out):
    """A staged rollout."""

    rollout_id: str
    artifact_sha256: str
    target: str = Field(description="`all`, `tag:T` or `device:ID[,ID...]`.")
    policy: dict[str, Any] = Field(description="Stages and health thresholds.")
    state: str
    created_by: str
    created_at: float
    updated_at: float


class RolloutDeviceOut(_Out):
    """One device's place in a rollout."""

    device_id: str
    stage: int = Field(description="0-based rollout stage.")
    state: str
    updated_at: float
    detail: dict[str, Any]


class RolloutViewOut(_Out):
    """A rollout with its devices and a summary (counts per state, current stage)."""

    rollout: RolloutOut
    devices: list[RolloutDeviceOut]
    summary: dict[str, Any]


class DeviceProgressOut(_Out):
    """One device's progress in a one-shot deployment or rollback."""

    device_id: str
    state: str = Field(description="`pending`, `downloading`, `installed`, `rejected`...")
    chunks_held: int
    chunks_total: int
    version: int | None = Field(description="Model version the device last reported.")
    error_code: str | None = Field(description="The device's error code on failure.")
    reason: str | None
    updated_at: float = Field(description="Coordinator clock, unix seconds.")


class DeployResultOut(_Out):
    """The devices of a one-shot deployment or rollback."""

    deployment_id: str
    model: str
    version: int = Field(description="Model version deployed (0 for a rollback).")
    succeeded: bool = Field(
        description="At least one device installed it and every other one is offline."
    )
    devices: list[DeviceProgressOut]


class DeploymentViewOut(_Out):
    """Where a one-shot deployment (or rollback) stands."""

    result: DeployResultOut
    done: bool = Field(description="Every device has an outcome, or the timeout passed.")
    delivered: bool = Field(description="Every device has the payload or refused it.")


class RunOut(_Out):
    """A federated run."""

    run_id: str
    config: dict[str, Any]
    state: RunState
    created_by: str
    created_at: float
    updated_at: float


class RoundOut(_Out):
    """One round of a federated run."""

    run_id: str
    round: int = Field(description="1-based.")
    status: str = Field(description="`ok`, `failed` or `running`.")
    reason: str
    metrics: dict[str, Any] = Field(description="Accuracy, bytes up and down, clients...")
    started_at: float
    finished_at: float | None


class RunViewOut(_Out):
    """A federated run and its rounds."""

    run: RunOut
    rounds: list[RoundOut]


class AuditOut(_Out):
    """One audited operator action."""

    audit_id: int
    at: float
    actor: str = Field(description="Token id, or `cli:<login>` for a local operator.")
    role: Role
    action: str = Field(description="e.g. `rollout.create`.")
    target: str
    detail: dict[str, Any]


# --- requests -----------------------------------------------------------------------

_ROLLOUT = RolloutRequest(artifact_sha256="")
_RUN = RunRequest()
_DEPLOY = DeployRequest(artifact_sha256="")
_ROLLBACK = RollbackRequest(model="")


class RolloutCreate(_In):
    """Start a staged rollout of an uploaded artifact."""

    artifact_sha256: str = Field(min_length=1, max_length=_SHORT)
    target: str = Field(default=_ROLLOUT.target, min_length=1, max_length=_SHORT * 16)
    canary: str = Field(default=_ROLLOUT.canary, max_length=_SHORT, description="`2` or `5%`.")
    waves: str = Field(
        default=_ROLLOUT.waves, max_length=_SHORT, description="Cumulative percentages."
    )
    soak: str = Field(default=_ROLLOUT.soak, max_length=_SHORT, description="`60s`, `5m`.")
    max_failure: str = Field(default=_ROLLOUT.max_failure, max_length=_SHORT)
    min_reports: int = _ROLLOUT.min_reports
    rollback_on_halt: bool = _ROLLOUT.rollback_on_halt
    install_timeout: str = Field(
        default=_ROLLOUT.install_timeout, max_length=_SHORT, description="`10m`."
    )
    max_error_increase: str = Field(
        default=_ROLLOUT.max_error_increase,
        max_length=_SHORT,
        description="Rise of the error rate over the previous model allowed: `5%`.",
    )
    max_p95_ratio: float = Field(
        default=_ROLLOUT.max_p95_ratio,
        description="p95 latency allowed, as a multiple of the previous model's.",
    )
    require_health: bool = Field(
        default=_ROLLOUT.require_health,
        description="A device counts only once a healthy telemetry window arrived.",
    )
    min_failed_devices: int | None = Field(
        default=_ROLLOUT.min_failed_devices,
        ge=1,
        description="Fewest failed devices that can fail a stage (capped at its size); "
        "null: the service's rollouts.min_failed_devices.",
    )

    def to_request(self) -> RolloutRequest:
        """The :class:`~coordinator.service.operations.RolloutRequest` this body asks for."""
        return RolloutRequest(
            artifact_sha256=self.artifact_sha256,
            target=self.target,
            canary=self.canary,
            waves=self.waves,
            soak=self.soak,
            max_failure=self.max_failure,
            min_reports=self.min_reports,
            min_failed_devices=self.min_failed_devices,
            rollback_on_halt=self.rollback_on_halt,
            install_timeout=self.install_timeout,
            max_error_increase=self.max_error_increase,
            max_p95_ratio=self.max_p95_ratio,
            require_health=self.require_health,
        )


class DeployCreate(_In):
    """Send an uploaded artifact to every targeted device at once."""

    artifact_sha256: str = Field(min_length=1, max_length=_SHORT)
    target: str = Field(default=_DEPLOY.target, min_length=1, max_length=_SHORT * 16)
    timeout_s: float = Field(
        default=_DEPLOY.timeout_s, gt=0, description="Seconds the devices have."
    )

    def to_request(self) -> DeployRequest:
        """The :class:`~coordinator.service.operations.DeployRequest` this body asks for."""
        return DeployRequest(
            artifact_sha256=self.artifact_sha256, target=self.target, timeout_s=self.timeout_s
        )


class RollbackCreate(_In):
    """Make the targeted devices go back to their previous good model."""

    model: str = Field(min_length=1, max_length=_SHORT)
    target: str = Field(default=_ROLLBACK.target, min_length=1, max_length=_SHORT * 16)
    reason: str = Field(default=_ROLLBACK.reason, max_length=_SHORT * 4)
    timeout_s: float = Field(
        default=_ROLLBACK.timeout_s, gt=0, description="Seconds the devices have."
    )

    def to_request(self) -> RollbackRequest:
        """The :class:`~coordinator.service.operations.RollbackRequest` this body asks for."""
        return RollbackRequest(
            model=self.model, target=self.target, reason=self.reason, timeout_s=self.timeout_s
        )


class RunCreate(_In):
    """Start a federated run over the fleet."""

    rounds: int = _RUN.rounds
    strategy: str = Field(default=_RUN.strategy, min_length=1, max_length=_SHORT)
    codec: str = Field(default=_RUN.codec, min_length=1, max_length=_SHORT)
    min_clients: int = _RUN.min_clients
    round_timeout_s: float = _RUN.round_timeout_s
    config: dict[str, Any] = Field(
        default_factory=dict,
        description="Model (family and sizes, or model_spec, task, input_shape, "
        "num_outputs), learning rate...",
    )

    def to_request(self) -> RunRequest:
        """The :class:`~coordinator.service.operations.RunRequest` this body asks for."""
        return RunRequest(
            rounds=self.rounds,
            strategy=self.strategy,
            codec=self.codec,
            min_clients=self.min_clients,
            round_timeout_s=self.round_timeout_s,
            config=dict(self.config),
        )


class AbortBody(_In):
    """Options of ``POST /v1/rollouts/{id}/abort`` (the body may be left out)."""

    rollback: bool = Field(
        default=False, description="Also roll back every device the rollout updated."
    )
