"""What an operator can do with a fleet: the one interface both front ends call.

The HTTP API (:mod:`coordinator.service.api`) and the CLI's in-process ``--broker`` mode
call the same :class:`Operations` object; the long-running service
(``fedge coordinator serve``) and a one-shot CLI command differ only in who holds
it. Every mutating call takes the :class:`Actor` on whose behalf it runs, for the
audit log; reads return the store's rows (:mod:`coordinator.service.store.records`) or the
small views defined here.

Errors: :class:`~coordinator.errors.NotFoundError` for an unknown id,
:class:`~coordinator.errors.ArtifactRejectedError` for an upload that fails
verification, :class:`~coordinator.errors.RolloutError` for a bad policy or an
operation the rollout's state forbids, :class:`~coordinator.errors.TargetError` for
a bad target, :class:`~coordinator.errors.RunError` for a bad run request,
:class:`~coordinator.errors.PolicyError` for a retraining policy the service refuses.
"""

from __future__ import annotations

import os
import pwd
from dataclasses import dataclass, field
from typing import Any, Protocol

from coordinator.delivery.tracker import DeployResult
from coordinator.monitoring.policy import Policy
from coordinator.monitoring.scores import DriftScore
from coordinator.service.store.policies import PolicyRow, RetrainingRow
from coordinator.service.store.records import (
    ArtifactRow,
    AuditRow,
    DeviceRow,
    PresenceRow,
    RolloutDevice,
    RolloutInfo,
    RoundRow,
    RunRow,
    TelemetryRow,
)
from coordinator.service.tokens import Role

__all__ = [
    "CLI_ACTOR",
    "Actor",
    "DeployRequest",
    "DeploymentView",
    "FleetMetrics",
    "Operations",
    "RollbackRequest",
    "RolloutRequest",
    "RolloutView",
    "RunRequest",
    "RunView",
]


@dataclass(frozen=True)
class Actor:
    """Who asks: a token's id and role, or the local CLI.

    Attributes:
        name: Token id (or ``cli:<login>`` for a local operator).
        role: What the actor may do.
    """

    name: str
    role: Role


def _login() -> str:
    """The account this process runs as (``uid<N>`` when it has no name).

    From the effective uid, not ``$USER``/``$LOGNAME`` (which anyone can set).
    """
    uid = os.geteuid()
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:  # no passwd entry (some containers)
        return f"uid{uid}"


CLI_ACTOR = Actor(f"cli:{_login()}", Role.OPERATOR)
"""A local operator running a one-shot CLI command against the broker or the
database directly; the audit log names their login (``cli:alice``)."""


@dataclass(frozen=True)
class RolloutRequest:
    """``fedge rollout create ARTIFACT --to ... --canary ... --waves ...``.

    Attributes:
        artifact_sha256: An uploaded artifact.
        target: ``all``, ``tag:T`` or ``device:ID[,ID...]``.
        canary: Count (``2``) or percent (``5%``).
        waves: Cumulative percentages after the canary (``25,50,100``).
        soak: Time each stage must run before the next (``60s``, ``5m``).
        max_failure: Largest failure rate a stage may have (``10%``).
        min_reports: Devices of a stage that must report before it is judged.
        min_failed_devices: Fewest failed devices that can fail a stage (capped at
            its size); None for the service's ``rollouts.min_failed_devices``.
        rollback_on_halt: Roll the failed stage back when the rollout halts.
        install_timeout: How long a device may take to install (``10m``) before it
            counts as failed.
        max_error_increase: How much a device's inference error rate may rise over
            what it had on its previous model (``5%``: 5 points).
        max_p95_ratio: How many times its previous model's p95 latency a device's
            p95 may reach (>= 1).
        require_health: Count a device as a success only once a healthy telemetry
            window of the new model arrived (not as soon as it installed).
    """

    artifact_sha256: str
    target: str = "all"
    canary: str = "1"
    waves: str = "100"
    soak: str = "60s"
    max_failure: str = "0%"
    min_reports: int = 1
    rollback_on_halt: bool = True
    install_timeout: str = "10m"
    max_error_increase: str = "5%"
    max_p95_ratio: float = 1.5
    require_health: bool = False
    min_failed_devices: int | None = None


@dataclass(frozen=True)
class RolloutView:
    """A rollout with its devices and a summary (counts per state, current stage)."""

    rollout: RolloutInfo
    devices: tuple[RolloutDevice, ...]
    summary: dict[str, Any]


@dataclass(frozen=True)
class DeployRequest:
    """``fedge deploy ARTIFACT --to ...``: one-shot delivery of an uploaded artifact.

    Every targeted device gets it at once (no stages, no health gate: that is a
    rollout); the service follows the devices until each has an outcome or
    ``timeout_s`` passed.

    Attributes:
        artifact_sha256: An uploaded artifact.
        target: ``all``, ``tag:T`` or ``device:ID[,ID...]``.
        timeout_s: Seconds the devices have; those still going then are ``timed_out``.
    """

    artifact_sha256: str
    target: str = "all"
    timeout_s: float = 120.0


@dataclass(frozen=True)
class RollbackRequest:
    """``fedge rollback --to ... --model NAME``: devices go back to their previous model.

    Attributes:
        model: The model name to roll back.
        target: ``all``, ``tag:T`` or ``device:ID[,ID...]``.
        reason: Why (logged by the agents).
        timeout_s: Seconds the devices have to answer.
    """

    model: str
    target: str = "all"
    reason: str = ""
    timeout_s: float = 60.0


@dataclass(frozen=True)
class DeploymentView:
    """Where a one-shot deployment (or rollback) stands.

    Attributes:
        result: Every targeted device's progress (``succeeded`` is final only
            once ``done``).
        done: Every device has an outcome, or the timeout passed: nothing changes
            any more.
        delivered: Every device has the payload or refused it (and none that
            dropped out is still away): what ``fedge deploy`` without ``--wait``
            waits for. Always true for a rollback.
    """

    result: DeployResult
    done: bool
    delivered: bool


@dataclass(frozen=True)
class RunRequest:
    """``fedge rounds start``: a federated run over the fleet's devices.

    Attributes:
        rounds: Number of rounds.
        strategy: A strategy name (see :mod:`coordinator.federated.strategies`).
        codec: The update codec devices use.
        min_clients: Fewest accepted updates for a round to count.
        round_timeout_s: Seconds a round may take.
        config: Further settings (model family, sizes, learning rate...).
    """

    rounds: int = 10
    strategy: str = "fedavg"
    codec: str = "fp32"
    min_clients: int = 2
    round_timeout_s: float = 60.0
    config: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RunView:
    """A federated run and its rounds."""

    run: RunRow
    rounds: tuple[RoundRow, ...]


@dataclass(frozen=True)
class FleetMetrics:
    """Figures ``GET /metrics`` exposes (gathered at scrape time).

    Attributes:
        devices_online: Devices online now.
        devices_total: Devices ever seen.
        models: Devices per ``(model, version)`` they serve.
        rollouts: Rollouts per state.
        latency_ms: Fleet-wide inference latency quantiles over recent telemetry
            (``{"0.5": ..., "0.95": ..., "0.99": ...}``).
        telemetry_ingested: Telemetry records stored since start.
        rounds: The latest run's rounds (accuracy, bytes up/down).
        rollout_stages: Current stage of each rollout still going (created,
            running or paused), by id.
        rollout_devices: Devices of each rollout still going, per
            ``(rollout id, device state)``.
        drift_psi: The latest fleet-wide drift (largest feature PSI) per
            ``(model, version)``.
        drift_devices: Devices per ``(model, version, severity)`` of their latest
            drift score (``none``, ``moderate``, ``major``).
        drift_rejected: Telemetry window summaries refused or not scored since
            start, by reason.
    """

    devices_online: int
    devices_total: int
    models: dict[tuple[str, int], int]
    rollouts: dict[str, int]
    latency_ms: dict[str, float]
    telemetry_ingested: int
    rounds: tuple[RoundRow, ...] = ()
    rollout_stages: dict[str, int] = field(default_factory=dict)
    rollout_devices: dict[tuple[str, str], int] = field(default_factory=dict)
    drift_psi: dict[tuple[str, int], float] = field(default_factory=dict)
    drift_devices: dict[tuple[str, int, str], int] = field(default_factory=dict)
    drift_rejected: dict[str, int] = field(default_factory=dict)


class Operations(Protocol):
    """The operator's verbs (see the module docstring)."""

    def devices(self) -> list[DeviceRow]:
        """Every device seen, sorted by id."""
        ...

    def telemetry(self, device_id: str, *, limit: int = 100) -> list[TelemetryRow]:
        """A device's latest telemetry windows, newest first.

        Raises:
            NotFoundError: no such device.
        """
        ...

    def presence(self, device_id: str, *, limit: int = 100) -> list[PresenceRow]:
        """A device's latest online/offline changes (first sight included), newest first.

        Raises:
            NotFoundError: no such device.
        """
        ...

    def upload_artifact(self, data: bytes, *, actor: Actor) -> ArtifactRow:
        """Verify an artifact against the trusted keys and store it (idempotent).

        Raises:
            ArtifactRejectedError: malformed, tampered, signed by the wrong keys,
                or expired.
        """
        ...

    def artifacts(self) -> list[ArtifactRow]:
        """Every stored artifact, newest first."""
        ...

    def create_rollout(self, request: RolloutRequest, *, actor: Actor) -> RolloutView:
        """Start a staged rollout.

        Raises:
            NotFoundError: unknown artifact.
            RolloutError: a bad policy.
            TargetError: a bad target, or it matches no device.
        """
        ...

    def rollouts(self) -> list[RolloutInfo]:
        """Every rollout, newest first."""
        ...

    def rollout(self, rollout_id: str) -> RolloutView:
        """One rollout.

        Raises:
            NotFoundError: no such rollout.
        """
        ...

    def pause_rollout(self, rollout_id: str, *, actor: Actor) -> RolloutView:
        """Stop releasing new stages.

        Raises:
            NotFoundError: no such rollout.
            RolloutError: the rollout has ended.
        """
        ...

    def resume_rollout(self, rollout_id: str, *, actor: Actor) -> RolloutView:
        """Go on after a pause.

        Raises:
            NotFoundError: no such rollout.
            RolloutError: the rollout has ended or halted.
        """
        ...

    def abort_rollout(self, rollout_id: str, *, actor: Actor, rollback: bool) -> RolloutView:
        """End a rollout now, optionally rolling back every device it updated.

        Raises:
            NotFoundError: no such rollout.
            RolloutError: the rollout completed.
        """
        ...

    def deploy(self, request: DeployRequest, *, actor: Actor) -> DeploymentView:
        """Send an uploaded artifact to every targeted device at once.

        Returns once the command went out and the payload was pushed; the
        devices' progress is then read with :meth:`deployment`.

        Raises:
            NotFoundError: unknown artifact.
            TargetError: a bad target, or it matches no device or names unknown ones.
        """
        ...

    def rollback(self, request: RollbackRequest, *, actor: Actor) -> DeploymentView:
        """Ask the targeted devices to go back to their previous good model.

        Raises:
            TargetError: a bad target, or it matches no device.
        """
        ...

    def deployment(self, deployment_id: str) -> DeploymentView:
        """A one-shot deployment or rollback started by :meth:`deploy` or :meth:`rollback`.

        Raises:
            NotFoundError: no such deployment (or the service restarted since).
        """
        ...

    def start_run(self, request: RunRequest, *, actor: Actor) -> RunView:
        """Start a federated run in the background.

        Raises:
            RunError: bad settings, or a run is already going.
        """
        ...

    def stop_run(self, run_id: str, *, actor: Actor) -> RunView:
        """Stop a run: no further round starts, the round going on ends ``failed``
        with the reason ``stopped by <actor>``, and the run becomes ``interrupted``.

        Returns once the run has ended (or after a few seconds, still ``running``,
        if its last step is slow to notice; it ends soon after).

        Raises:
            NotFoundError: no such run.
            RunError: the run is not running (it ended already).
        """
        ...

    def runs(self) -> list[RunRow]:
        """Every federated run, newest first."""
        ...

    def run(self, run_id: str) -> RunView:
        """One run and its rounds.

        Raises:
            NotFoundError: no such run.
        """
        ...

    def audit_log(self, *, limit: int = 100) -> list[AuditRow]:
        """The latest operator actions, oldest first."""
        ...

    def drift(self, *, device_id: str | None = None, model: str | None = None) -> list[DriftScore]:
        """The latest drift score of each device and of each fleet, per model version
        (fleet scores first; with ``device_id``, that device's only).

        Raises:
            NotFoundError: no such device.
        """
        ...

    def set_policy(self, policy: Policy, *, actor: Actor) -> PolicyRow:
        """Set (or replace) a model's retraining policy.

        Raises:
            PolicyError: the service holds no key to sign retrained models, or the
                policy's run would be refused.
        """
        ...

    def policy(self, name: str) -> PolicyRow:
        """A model's retraining policy.

        Raises:
            NotFoundError: none.
        """
        ...

    def policies(self) -> list[PolicyRow]:
        """Every retraining policy, by name."""
        ...

    def delete_policy(self, name: str, *, actor: Actor) -> PolicyRow:
        """Remove a model's retraining policy; give what it was.

        Raises:
            NotFoundError: none.
        """
        ...

    def retrainings(self, *, policy: str | None = None) -> list[RetrainingRow]:
        """The runs retraining policies started (trigger, state), newest first."""
        ...

    def approve_retraining(self, run_id: str, *, actor: Actor) -> RetrainingRow:
        """Roll out a retrained model that waits for approval.

        Raises:
            NotFoundError: no such retraining run.
            PolicyError: it is not waiting for approval.
        """
        ...

    def metrics(self) -> FleetMetrics:
        """Figures for ``GET /metrics``."""
        ...
