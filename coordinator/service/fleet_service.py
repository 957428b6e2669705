"""The coordinator service: one :class:`~coordinator.service.operations.Operations` object.

:class:`FleetService` is what both front ends call: the HTTP API of
``fedge coordinator serve`` (:mod:`coordinator.service.api`) and the CLI's in-process
``--broker`` mode (:func:`local_service`). It composes

* a started :class:`~coordinator.link.hub.MqttHub` (the MQTT connection),
* the SQLite :class:`~coordinator.service.store.Store` (all state; a restart loses
  nothing acknowledged),
* :class:`~coordinator.service.ingest.Ingest` (presence and telemetry into the store, in
  batches, off the network thread), which hands window summaries to
  :class:`~coordinator.service.drift.DriftMonitor` (drift scores into the store),
* :class:`~coordinator.rollout.manager.RolloutManager` (staged rollouts, resumed at start),
* :class:`~coordinator.service.runs.RunManager` (federated runs in the background),
* :class:`~coordinator.service.deployments.OneShots` (one-shot deploys and rollbacks,
  sent through the rollout manager's deliveries).
* :class:`~coordinator.service.retraining.Retraining` (the operator's retraining
  policies, and the loop that starts runs on drift and rolls out better models;
  running only when the ``[fleet]`` keys are there to sign them).

Workflow::

    store = Store.open(db_path)
    hub = MqttHub(HubConfig(broker=broker))
    service = FleetService(store, hub, trusted_keys)
    service.start()            # listeners first, then connect: retained statuses count
    app = create_app(service, authenticate=service.authenticate,
                     on_auth_failure=service.record_auth_failure)
    ...
    service.stop()             # flushes telemetry, stops threads, disconnects
    store.close()

Its settings are a :class:`~coordinator.service.service_settings.ServiceSettings`
(re-exported here), its ``/metrics`` figures come from
:func:`~coordinator.service.fleet_metrics.fleet_metrics`, and
:mod:`coordinator.service.local` opens the store the way a service runs it
(:func:`~coordinator.service.local.open_store`) and runs the service inside a CLI
process (:func:`~coordinator.service.local.local_service`).

Uploads are verified before they are stored: the container and manifest must
parse, the manifest must carry signatures by ``threshold`` of the trusted keys and
must not have expired, and the payload's length and sha256 must be the manifest's.
Anything else is an :class:`~coordinator.errors.ArtifactRejectedError`, logged and
written to the audit log (``artifact.reject``). Every operator action that changes
something is written to the audit log with the actor's token id and role, and so
is every request the API refused for want of a valid token (``auth.fail``, see
:meth:`FleetService.record_auth_failure`).
"""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from compress.artifact import read_payload, read_signed_manifest
from compress.errors import CompressError
from compress.signing import TrustedKeys
from compress.trust import verify_manifest
from coordinator.delivery.deliveries import Artifact, Deliveries
from coordinator.delivery.fleet_statement import StatementPublisher
from coordinator.delivery.lineage import replaced_by, stored_link
from coordinator.errors import ArtifactRejectedError, NotFoundError
from coordinator.link.fleet import Target
from coordinator.link.port import Hub
from coordinator.monitoring.policy import Policy
from coordinator.monitoring.scores import DriftScore
from coordinator.monitoring.tracker import DriftTracker
from coordinator.rollout.engine import Rollout
from coordinator.rollout.manager import RolloutManager
from coordinator.rollout.policy import (
    HealthPolicy,
    RolloutPolicy,
    parse_fraction,
)
from coordinator.service.deployments import OneShots
from coordinator.service.drift import DriftMonitor
from coordinator.service.fleet_metrics import fleet_metrics
from coordinator.service.ingest import Ingest
from coordinator.service.operations import (
    Actor,
    DeploymentView,
    DeployRequest,
    FleetMetrics,
    RollbackRequest,
    RolloutRequest,
    RolloutView,
    RunRequest,
    RunView,
)
from coordinator.service.retraining import Retraining
from coordinator.service.runs import RunManager
from coordinator.service.service_settings import ServiceSettings
from coordinator.service.store import (
    ArtifactRow,
    AuditRow,
    DeviceRow,
    PolicyRow,
    PresenceRow,
    RetrainingRow,
    RolloutDevice,
    RolloutInfo,
    RunRow,
    Store,
    TelemetryRow,
)
from coordinator.service.tokens import Role

if TYPE_CHECKING:  # the API's record type; importing the API would load FastAPI
    from coordinator.service.api.auth import AuthFailure

__all__ = ["FleetService", "ServiceSettings"]

logger = logging.getLogger(__name__)


class FleetService:
    """The fleet's operations over MQTT and SQLite (see the module docstring)."""

    def __init__(
        self,
        store: Store,
        hub: Hub,
        trusted: TrustedKeys | None,
        *,
        settings: ServiceSettings | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """Compose the parts; nothing connects until :meth:`start`.

        Args:
            store: The state store (the caller closes it).
            hub: The MQTT hub, not yet started.
            trusted: Keys uploads must be signed by; None refuses every upload.
            settings: Timings and retention.
            clock: Unix time source.
        """
        settings = settings or ServiceSettings()
        self._store = store
        self._hub = hub
        self._trusted = trusted
        self._clock = clock
        self._drift = DriftMonitor(
            store,
            DriftTracker(windows=settings.drift_windows),
            clock=clock,
            fleet_every_s=settings.drift_fleet_every_s,
        )
        self._ingest = Ingest(store, settings.ingest(), clock=clock, drift=self._drift.add_windows)
        self._rollouts = RolloutManager(hub, store, clock=clock,
                                        tick_s=settings.rollout_tick_s,
                                        accept_wait_s=settings.accept_wait_s)  # fmt: skip
        self._runs = RunManager(
            hub,
            store,
            clock=clock,
            upload_budget_bytes=settings.upload_budget_bytes,
            upload_dir=settings.upload_dir,
        )
        self._min_failed_devices = settings.rollout_min_failed_devices
        self._retraining = Retraining(
            store, self._runs, audit=self._audit,
            keys=() if settings.fleet is None else settings.fleet.keys, trusted=trusted,
            upload=lambda data, actor: self.upload_artifact(data, actor=actor),
            start_rollout=lambda request, actor: self.create_rollout(request, actor=actor),
            clock=clock, every_s=settings.retraining_every_s,
        )  # fmt: skip
        self._one_shots = OneShots(self._rollouts.deliveries)
        self._statements = (
            None if settings.fleet is None else StatementPublisher(hub, settings.fleet, clock=clock)
        )
        self._rollouts.deliveries.announce_with(self._statements)  # names each deploy first
        self._started = False

    # ------------------------------------------------------------------ lifecycle

    @property
    def store(self) -> Store:
        """The state store."""
        return self._store

    @property
    def hub(self) -> Hub:
        """The MQTT side."""
        return self._hub

    @property
    def deliveries(self) -> Deliveries:
        """The deliveries of rollouts and one-shot deploys (what is still tracked)."""
        return self._rollouts.deliveries

    @property
    def ingest(self) -> Ingest:
        """Presence and telemetry ingestion (its counters)."""
        return self._ingest

    def start(self, timeout: float = 10.0) -> None:
        """Connect and resume: interrupted runs marked, rollouts resumed.

        Raises:
            BrokerError: the broker cannot be reached within ``timeout``.
            StoreError: the database failed.
        """
        self._runs.recover()
        self._rollouts.load()  # before connecting: queued reports are for these rollouts
        self._hub.add_listener(self._ingest.on_message)
        self._hub.add_listener(self._rollouts.on_message)
        self._ingest.start()
        try:
            self._hub.start(timeout)
            self._hub.sync_fleet()  # the retained statuses, before resuming
        except BaseException:
            self._ingest.stop()
            raise
        if self._statements is not None:
            self._statements.start()  # published now, before any rollout step
        self._rollouts.start()
        if self._statements is not None:  # its keys sign retrained models; else no policy
            self._retraining.start()
        self._started = True
        logger.info("coordinator service started (%d device(s) known)",
                    len(self._hub.fleet()))  # fmt: skip

    def stop(self) -> None:
        """Stop rollouts and runs, flush telemetry, disconnect (idempotent)."""
        if not self._started:
            return
        self._started = False
        self._one_shots.stop()
        self._retraining.stop()
        self._rollouts.stop()
        self._runs.stop()
        if self._statements is not None:
            self._statements.stop()
        self._hub.remove_listener(self._rollouts.on_message)
        self._hub.stop()
        self._hub.remove_listener(self._ingest.on_message)
        self._ingest.stop()
        logger.info("coordinator service stopped")

    def authenticate(self, token: str) -> Actor | None:
        """The actor a bearer token stands for, or None (unknown, revoked or expired).

        Raises:
            StoreError: the database failed.
        """
        row = self._store.authenticate(token, self._clock())
        return None if row is None else Actor(row.token_id, row.role)

    def record_auth_failure(self, failure: AuthFailure) -> None:
        """Audit a request the API refused for want of a valid token (``auth.fail``).

        The actor is ``client:<address>`` with the least role (``viewer``): the
        request proved no identity. The target is the public id of the token it
        presented (empty if none looked like a token); the detail has the reason,
        method, path, the address's failures within the window and the cool-down
        this failure started (``lockout_s``, else null). Never the token itself.

        Raises:
            StoreError: the database failed.
        """
        self._audit(
            Actor(f"client:{failure.address}", Role.VIEWER),
            "auth.fail",
            failure.token_id or "",
            {
                "reason": failure.reason,
                "method": failure.method,
                "path": failure.path,
                "failures": failure.failures,
                "lockout_s": failure.lockout_s,
            },
        )

    def recent_auth_failures(self, seconds: float) -> list[tuple[str, float]]:
        """The failed authentications audited in the last ``seconds``, for the
        API's rate limiter after a restart: ``(address, age in seconds)``, oldest
        first (see :meth:`~coordinator.service.api.auth_limits.FailedAuthLimiter.restore`).

        Raises:
            StoreError: the database failed.
        """
        now = self._clock()
        prefix = "client:"
        return [
            (actor.removeprefix(prefix), now - at)
            for actor, at in self._store.auth_failures_since(now - seconds)
            if actor.startswith(prefix)
        ]

    @property
    def retraining(self) -> Retraining:
        """The retraining policies and their loop."""
        return self._retraining

    def _audit(
        self, actor: Actor, action: str, target: str, detail: dict[str, Any] | None = None
    ) -> None:
        self._store.audit(actor.name, actor.role, action, target, detail=detail, at=self._clock())

    # ------------------------------------------------------------------ devices

    def devices(self) -> list[DeviceRow]:
        """Every device seen, sorted by id."""
        return self._store.devices()

    def telemetry(self, device_id: str, *, limit: int = 100) -> list[TelemetryRow]:
        """A device's latest telemetry windows, newest first.

        Raises:
            NotFoundError: no such device.
        """
        self._known(device_id)
        return self._store.telemetry(device_id, limit=limit)

    def presence(self, device_id: str, *, limit: int = 100) -> list[PresenceRow]:
        """A device's latest online/offline changes, newest first.

        Raises:
            NotFoundError: no such device.
        """
        self._known(device_id)
        return self._store.presence_history(device_id, limit=limit)

    def _known(self, device_id: str) -> None:
        if self._store.device(device_id) is None:
            raise NotFoundError(f"no device {device_id!r}")

    # ---------------------------------------------------------------- artifacts

    def upload_artifact(self, data: bytes, *, actor: Actor) -> ArtifactRow:
        """Verify an artifact against the trusted keys and store it (idempotent).

        Raises:
            ArtifactRejectedError: malformed, tampered, signed by the wrong keys,
                or expired.
        """
        try:
            if self._trusted is None:
                raise ArtifactRejectedError(
                    "this coordinator trusts no keys, so it accepts no artifact: "
                    "start it with --trust KEY.pub"
                )
            try:
                stream = io.BytesIO(data)
                signed = read_signed_manifest(stream)
                manifest = verify_manifest(signed, self._trusted, now=datetime.now(UTC))
                read_payload(stream, manifest)
            except CompressError as exc:
                raise ArtifactRejectedError(f"artifact refused: {exc}") from exc
        except ArtifactRejectedError as exc:
            logger.warning("upload by %s refused: %s", actor.name, exc)
            self._audit(actor, "artifact.reject", "", {"size": len(data), "reason": str(exc)})
            raise
        row = self._store.put_artifact(
            data, name=manifest.name, version=manifest.version, manifest=manifest.to_dict(),
            uploaded_by=actor.name, at=self._clock(),
        )  # fmt: skip
        self._audit(actor, "artifact.upload", row.sha256,
                    {"name": row.name, "version": row.version, "size": row.size})  # fmt: skip
        return row

    def artifacts(self) -> list[ArtifactRow]:
        """Every stored artifact, newest first."""
        return self._store.artifacts()

    # ----------------------------------------------------------------- rollouts

    def create_rollout(self, request: RolloutRequest, *, actor: Actor) -> RolloutView:
        """Start a staged rollout of an uploaded artifact.

        Raises:
            NotFoundError: unknown artifact.
            RolloutError: a bad policy, or no device matches the target.
            TargetError: a bad target.
        """
        if self._store.artifact(request.artifact_sha256) is None:
            raise NotFoundError(f"no artifact {request.artifact_sha256!r}: upload it first")
        health = HealthPolicy(
            max_error_rate=parse_fraction(request.max_error_increase),
            max_p95_ratio=request.max_p95_ratio,
            require_health=request.require_health,
        )
        policy = RolloutPolicy.parse(
            canary=request.canary, waves=request.waves, soak=request.soak,
            max_failure=request.max_failure, min_reports=request.min_reports,
            rollback_on_halt=request.rollback_on_halt,
            install_timeout=request.install_timeout, health=health,
            min_failed_devices=self._min_failed_devices if request.min_failed_devices is None
            else request.min_failed_devices,
        )  # fmt: skip
        target = Target.parse(request.target)
        artifact = Artifact.from_bytes(self._store.artifact_bytes(request.artifact_sha256))
        rollout_id = self._rollouts.create(
            artifact_sha256=request.artifact_sha256, artifact=artifact, policy=policy,
            target=target, actor=actor.name,
        )  # fmt: skip
        self._audit(actor, "rollout.create", rollout_id, {
            "artifact": request.artifact_sha256, "target": request.target,
            "canary": request.canary, "waves": request.waves, "soak": request.soak,
            "max_failure": request.max_failure,
            "min_failed_devices": policy.min_failed_devices,
        })  # fmt: skip
        return self.rollout(rollout_id)

    def rollouts(self) -> list[RolloutInfo]:
        """Every rollout, newest first."""
        rows = sorted(self._store.rollouts(), key=lambda r: r.created_at, reverse=True)
        return [row.info() for row in rows]

    def rollout(self, rollout_id: str) -> RolloutView:
        """One rollout with its devices and summary.

        Raises:
            NotFoundError: no such rollout.
        """
        row = self._store.rollout(rollout_id)
        if row is None:
            raise NotFoundError(f"no rollout {rollout_id!r}")
        summary = self._rollouts.summary(rollout_id)
        if summary is None:  # not running in this process: from its saved state
            summary = Rollout.restore(row.snapshot).summary()
        live = self._rollouts.devices(rollout_id)
        devices = tuple(live if live is not None else self._store.rollout_devices(rollout_id))
        summary = {**summary, "replaces": self._replaces(row.artifact_sha256, devices)}
        return RolloutView(rollout=row.info(), devices=devices, summary=summary)

    def _replaces(self, sha256: str, devices: tuple[RolloutDevice, ...]) -> dict[str, Any] | None:
        """What the rollout's model replaces (:func:`replaced_by`), None if its stored
        manifest does not parse."""
        artifact = self._store.artifact(sha256)
        link = None if artifact is None else stored_link(artifact.manifest, sha256)
        if link is None:
            return None
        known = {row.device_id: row for row in self._store.devices()} if devices else {}
        rows = (known.get(d.device_id) for d in devices)  # one query, not one per device
        return replaced_by(link.manifest, ((r.model, r.version) for r in rows if r is not None))

    def pause_rollout(self, rollout_id: str, *, actor: Actor) -> RolloutView:
        """Stop releasing new stages.

        Raises:
            NotFoundError: no such rollout.
            RolloutError: the rollout has ended.
        """
        self._rollouts.pause(rollout_id, actor=actor.name)
        self._audit(actor, "rollout.pause", rollout_id)
        return self.rollout(rollout_id)

    def resume_rollout(self, rollout_id: str, *, actor: Actor) -> RolloutView:
        """Go on after a pause.

        Raises:
            NotFoundError: no such rollout.
            RolloutError: the rollout has ended or halted.
        """
        self._rollouts.resume(rollout_id, actor=actor.name)
        self._audit(actor, "rollout.resume", rollout_id)
        return self.rollout(rollout_id)

    def abort_rollout(self, rollout_id: str, *, actor: Actor, rollback: bool) -> RolloutView:
        """End a rollout now, optionally rolling back every device it updated.

        Raises:
            NotFoundError: no such rollout.
            RolloutError: the rollout completed.
        """
        self._rollouts.abort(rollout_id, actor=actor.name, rollback=rollback)
        self._audit(actor, "rollout.abort", rollout_id, {"rollback": rollback})
        return self.rollout(rollout_id)

    # ------------------------------------------------------- one-shot deliveries

    def deploy(self, request: DeployRequest, *, actor: Actor) -> DeploymentView:
        """Send an uploaded artifact to every targeted device at once.

        Raises:
            NotFoundError: unknown artifact.
            TargetError: a bad target, or it matches no device or names unknown ones.
        """
        if self._store.artifact(request.artifact_sha256) is None:
            raise NotFoundError(f"no artifact {request.artifact_sha256!r}: upload it first")
        target = Target.parse(request.target)
        artifact = Artifact.from_bytes(self._store.artifact_bytes(request.artifact_sha256))
        view = self._one_shots.deploy(artifact, target, timeout_s=request.timeout_s)
        self._audit(actor, "deployment.create", view.result.deployment_id,
                    {"artifact": request.artifact_sha256, "target": request.target,
                     "model": view.result.model, "version": view.result.version})  # fmt: skip
        return view

    def rollback(self, request: RollbackRequest, *, actor: Actor) -> DeploymentView:
        """Ask the targeted devices to go back to their previous good model.

        Raises:
            TargetError: a bad target, or it matches no device.
        """
        target = Target.parse(request.target)
        view = self._one_shots.rollback(
            target, request.model, reason=request.reason, timeout_s=request.timeout_s
        )
        self._audit(actor, "rollback.create", view.result.deployment_id,
                    {"model": request.model, "target": request.target,
                     "reason": request.reason})  # fmt: skip
        return view

    def deployment(self, deployment_id: str) -> DeploymentView:
        """A one-shot deployment or rollback started by this service.

        Raises:
            NotFoundError: no such deployment (or the service restarted since).
        """
        return self._one_shots.view(deployment_id)

    # --------------------------------------------------------------------- runs

    def start_run(self, request: RunRequest, *, actor: Actor) -> RunView:
        """Start a federated run in the background.

        Raises:
            RunError: bad settings, or a run is already going.
        """
        row = self._runs.start(request, actor=actor.name)
        self._audit(actor, "run.start", row.run_id, dict(row.config))
        return RunView(run=row, rounds=())

    def stop_run(self, run_id: str, *, actor: Actor) -> RunView:
        """Stop a run (see :meth:`RunManager.stop_run`).

        Raises:
            NotFoundError: no such run.
            RunError: the run is not running.
        """
        self._runs.stop_run(run_id, actor=actor.name)
        self._audit(actor, "run.stop", run_id)
        return self.run(run_id)

    def runs(self) -> list[RunRow]:
        """Every federated run, newest first."""
        return self._store.runs()

    def run(self, run_id: str) -> RunView:
        """One run and its rounds.

        Raises:
            NotFoundError: no such run.
        """
        row = self._store.run(run_id)
        if row is None:
            raise NotFoundError(f"no run {run_id!r}")
        return RunView(run=row, rounds=tuple(self._store.rounds(run_id)))

    # -------------------------------------------------------------------- other

    def audit_log(self, *, limit: int = 100) -> list[AuditRow]:
        """The latest operator actions, oldest first."""
        return self._store.audit_log(limit)

    def metrics(self) -> FleetMetrics:
        """Figures for ``GET /metrics`` (devices, models, rollouts, rounds, latency)."""
        return fleet_metrics(self._hub, self._store, self._rollouts, self._ingest, self._drift)

    # -------------------------------------------------------------------- drift

    def drift(self, *, device_id: str | None = None, model: str | None = None) -> list[DriftScore]:
        """The latest drift score of each device and each fleet, by model version.

        Raises:
            NotFoundError: ``device_id`` names no device seen and none scored.
        """
        scores = self._drift.scores(device_id=device_id, model=model)
        if device_id is not None and not scores:
            self._known(device_id)
        return scores

    # ---------------------------------------------------------------- retraining

    def set_policy(self, policy: Policy, *, actor: Actor) -> PolicyRow:
        """Set a model's retraining policy (see :meth:`Retraining.set_policy`)."""
        return self._retraining.set_policy(policy, actor=actor)

    def policy(self, name: str) -> PolicyRow:
        """A model's retraining policy."""
        return self._retraining.policy(name)

    def policies(self) -> list[PolicyRow]:
        """Every retraining policy, by name."""
        return self._retraining.policies()

    def delete_policy(self, name: str, *, actor: Actor) -> PolicyRow:
        """Remove a model's retraining policy; give what it was."""
        return self._retraining.delete_policy(name, actor=actor)

    def retrainings(self, *, policy: str | None = None) -> list[RetrainingRow]:
        """The runs retraining policies started, newest first."""
        return self._retraining.retrainings(policy=policy)

    def approve_retraining(self, run_id: str, *, actor: Actor) -> RetrainingRow:
        """Roll out a retrained model waiting for approval (see :meth:`Retraining.approve`)."""
        return self._retraining.approve(run_id, actor=actor)
