"""Test support for the HTTP API: an in-memory twin of :class:`Operations` and tokens.

* :class:`FakeOperations`: implements :class:`coordinator.service.operations.Operations` over
  dicts, with the documented errors (unknown ids, bad targets, state rules, a run
  already going, rejected artifacts), an audit log, and ``fail`` to make every
  call raise a given error. ``mutations`` records each mutating call that reached
  it, so tests can assert that a refused request never did.
* :data:`TOKENS` / :func:`authenticate`: a viewer and an operator token.
* :func:`serve`: an ASGI app served by a real uvicorn on a free loopback port.
* ``TestClient``: FastAPI's in-process test client, imported without the warnings
  Starlette gives about its httpx fallback and an anyio alias (harmless here).
"""

from __future__ import annotations

import hashlib
import socket
import threading
import warnings
from collections import Counter
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import replace
from typing import Any, TypeVar

import uvicorn
from starlette.types import ASGIApp

from coordinator.delivery.tracker import DeployResult, DeviceProgress, DeviceState
from coordinator.errors import (
    ArtifactRejectedError,
    CoordinatorError,
    NotFoundError,
    RolloutError,
    RunError,
    TargetError,
)
from coordinator.monitoring.drift import severity
from coordinator.monitoring.policy import Policy
from coordinator.monitoring.scores import DEVICE, FLEET, DriftScore, FeatureDrift
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
    RunState,
    TelemetryRow,
)
from coordinator.service.tokens import Role
from tests.fleet_support import wait_for

with warnings.catch_warnings():
    # Starlette warns about its httpx fallback and names a deprecated anyio alias;
    # neither changes how the client works.
    warnings.filterwarnings("ignore", message="Using `httpx` with")
    warnings.filterwarnings("ignore", message="The anyio.abc.BlockingPortal alias")
    from fastapi.testclient import TestClient

__all__ = [
    "ARTIFACT_MAGIC",
    "NOW",
    "OPERATOR",
    "OPERATOR_TOKEN",
    "TOKENS",
    "VIEWER",
    "VIEWER_TOKEN",
    "FakeOperations",
    "TestClient",
    "authenticate",
    "bearer",
    "serve",
]

NOW = 1_800_000_000.0

ARTIFACT_MAGIC = b"FEDGE"
"""The fake accepts bytes that start with this and rejects anything else."""

VIEWER_TOKEN = "fedge_viewer-token-for-the-api-tests"
OPERATOR_TOKEN = "fedge_operator-token-for-the-api-tests"
VIEWER = Actor("view0000id01", Role.VIEWER)
OPERATOR = Actor("oper0000id01", Role.OPERATOR)
TOKENS = {VIEWER_TOKEN: VIEWER, OPERATOR_TOKEN: OPERATOR}


def _drift(device_id: str | None, *, psi: float, devices: tuple[str, ...] = ()) -> DriftScore:
    return DriftScore(
        scope=FLEET if device_id is None else DEVICE,
        device_id=device_id,
        model="digits",
        version=3,
        at=NOW,
        windows=4,
        n=400,
        psi_max=psi,
        js_max=psi / 5,
        severity=severity(psi),
        top=(FeatureDrift(7, psi, psi / 5), FeatureDrift(1, psi / 2, psi / 10)),
        confidence_psi=0.01,
        classes_psi=None,
        invalid={"nan": 1},
        devices=devices,
    )


def authenticate(token: str) -> Actor | None:
    """The twin of ``Store.authenticate``: the actor of a known token, else None."""
    return TOKENS.get(token)


def bearer(token: str) -> dict[str, str]:
    """An ``Authorization`` header."""
    return {"Authorization": f"Bearer {token}"}


@contextmanager
def serve(app: ASGIApp, *, timeout: float = 10.0) -> Iterator[str]:
    """Serve ``app`` with uvicorn on a free 127.0.0.1 port, in a thread.

    Yields:
        The server's base URL, ``http://127.0.0.1:PORT``, once it accepts
        connections. The server is stopped, and its thread joined, on exit.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, lifespan="off", ws="none", log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:

        def started() -> bool:
            assert thread.is_alive(), "the server thread died"
            return bool(server.started)

        wait_for(started, timeout, what="the server to start")
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout)
        sock.close()
    assert not thread.is_alive(), "the server did not stop"


def _device(device_id: str, *, online: bool, model: str | None, version: int | None) -> DeviceRow:
    return DeviceRow(
        device_id=device_id,
        first_seen=NOW - 3600,
        last_seen=NOW - 5,
        online=online,
        status={"state": "serving"} if model else None,
        tags=("lab", "pi4") if online else (),
        model=model,
        version=version,
    )


def _telemetry(device_id: str, seq: int) -> TelemetryRow:
    return TelemetryRow(
        device_id=device_id,
        received_at=NOW - seq,
        window_start=NOW - 60 - seq,
        window_end=NOW - seq,
        model="digits",
        version=3,
        predictions=100 + seq,
        errors=seq % 2,
        p50=2.0,
        p95=5.5,
        p99=9.0,
        cpu_percent=12.5,
        memory_bytes=50_000_000,
        seq=seq,
        row_id=seq,
    )


_R = TypeVar("_R")


class FakeOperations:
    """In-memory :class:`Operations` (see the module docstring).

    Attributes:
        device_rows: Devices by id.
        telemetry_rows: Telemetry by device id, newest first.
        presence_rows: Presence changes by device id, newest first.
        artifact_rows: Stored artifacts by sha256.
        rollout_views: Rollouts by id.
        run_views: Runs by id.
        audit: Audited actions, oldest first.
        mutations: ``(method, actor name)`` of each mutating call received.
        aborted: ``rollback`` argument of each abort, by rollout id.
        fail: When set, every call raises it.
        telemetry_ingested: Reported by :meth:`metrics`.
        metric_rounds: Reported by :meth:`metrics` as the latest run's rounds.
        rollout_script: States a rollout moves to, by id: each :meth:`rollout`
            read of it first takes the next one (``["running", "completed"]``).
        rollout_reads: :meth:`rollout` reads, by id.
        rollout_requests: Each request :meth:`create_rollout` received.
        deployment_views: One-shot deployments and rollbacks by id.
        deployment_outcome: The state every online device of a deployment (or
            rollback) reaches at the first :meth:`deployment` read (offline ones
            stay offline); None: the default of each (installed, rolled back).
        deployment_requests: Each request :meth:`deploy` or :meth:`rollback` received.
    """

    def __init__(self) -> None:
        """An empty fleet."""
        self.device_rows: dict[str, DeviceRow] = {}
        self.telemetry_rows: dict[str, list[TelemetryRow]] = {}
        self.presence_rows: dict[str, list[PresenceRow]] = {}
        self.artifact_rows: dict[str, ArtifactRow] = {}
        self.rollout_views: dict[str, RolloutView] = {}
        self.run_views: dict[str, RunView] = {}
        self.audit: list[AuditRow] = []
        self.drift_scores: list[DriftScore] = []
        self.drift_rejected: dict[str, int] = {}
        self.policy_rows: dict[str, PolicyRow] = {}
        self.mutations: list[tuple[str, str]] = []
        self.aborted: dict[str, bool] = {}
        self.fail: CoordinatorError | None = None
        self.telemetry_ingested = 0
        self.metric_rounds: tuple[RoundRow, ...] = ()
        self.rollout_script: dict[str, list[str]] = {}
        self.rollout_reads: Counter[str] = Counter()
        self.rollout_requests: list[RolloutRequest] = []
        self.deployment_views: dict[str, DeploymentView] = {}
        self.deployment_outcome: DeviceState | None = None
        self.deployment_requests: list[DeployRequest | RollbackRequest] = []
        self._outcomes: dict[str, DeviceState] = {}

    @classmethod
    def seeded(cls) -> FakeOperations:
        """Three devices (two online), telemetry for one, a finished run's rounds."""
        ops = cls()
        for row in (
            _device("pi-1", online=True, model="digits", version=3),
            _device("pi-2", online=True, model="digits", version=3),
            _device("pi-3", online=False, model=None, version=None),
        ):
            ops.device_rows[row.device_id] = row
        ops.telemetry_rows["pi-1"] = [_telemetry("pi-1", seq) for seq in range(5)]
        ops.presence_rows["pi-1"] = [
            PresenceRow("pi-1", online=True, at=NOW - 30),
            PresenceRow("pi-1", online=False, at=NOW - 90),
            PresenceRow("pi-1", online=True, at=NOW - 7200),
        ]
        ops.telemetry_ingested = 42
        ops.drift_scores = [
            _drift(None, psi=0.31, devices=("pi-2", "pi-1")),
            _drift("pi-1", psi=0.02),
            _drift("pi-2", psi=0.6),
        ]
        ops.drift_rejected = {"wrong_features": 2}
        ops.metric_rounds = (
            RoundRow(
                run_id="run-0",
                round=1,
                status="ok",
                reason="",
                metrics={"accuracy": 0.8125, "uplink_bytes": 1000, "downlink_bytes": 5000},
                started_at=NOW - 100,
                finished_at=NOW - 90,
            ),
            RoundRow(
                run_id="run-0",
                round=2,
                status="failed",
                reason="too few clients",
                metrics={"accuracy": None, "uplink_bytes": 10, "downlink_bytes": 20},
                started_at=NOW - 90,
                finished_at=NOW - 80,
            ),
        )
        return ops

    # --- helpers --------------------------------------------------------------------

    def _check(self) -> None:
        if self.fail is not None:
            raise self.fail

    def _mutate(self, method: str, actor: Actor, target: str, **detail: Any) -> None:
        self.mutations.append((method, actor.name))
        self.audit.append(
            AuditRow(
                audit_id=len(self.audit) + 1,
                at=NOW,
                actor=actor.name,
                role=actor.role,
                action=method,
                target=target,
                detail=dict(detail),
            )
        )

    def _rollout_view(self, rollout_id: str) -> RolloutView:
        try:
            return self.rollout_views[rollout_id]
        except KeyError:
            raise NotFoundError(f"no rollout {rollout_id!r}") from None

    def _run_view(self, run_id: str) -> RunView:
        try:
            return self.run_views[run_id]
        except KeyError:
            raise NotFoundError(f"no run {run_id!r}") from None

    def _chosen(self, target: str) -> list[DeviceRow]:
        kind, _, value = target.partition(":")
        if target == "all":
            chosen = list(self.device_rows.values())
        elif kind == "tag" and value:
            chosen = [row for row in self.device_rows.values() if value in row.tags]
        elif kind == "device" and value:
            ids = value.split(",")
            chosen = [row for row in self.device_rows.values() if row.device_id in ids]
        else:
            raise TargetError(f"bad target {target!r}")
        if not chosen:
            raise TargetError(f"target {target!r} matches no device")
        return chosen

    def _start_deployment(
        self, model: str, version: int, target: str, outcome: DeviceState
    ) -> DeploymentView:
        devices = tuple(
            DeviceProgress(
                row.device_id,
                DeviceState.PENDING if row.online else DeviceState.OFFLINE,
                updated_at=NOW,
            )
            for row in self._chosen(target)
        )
        deployment_id = f"dep-{len(self.deployment_views) + 1}"
        result = DeployResult(deployment_id, model, version, succeeded=False, devices=devices)
        view = DeploymentView(result, done=False, delivered=False)
        self.deployment_views[deployment_id] = view
        self._outcomes[deployment_id] = self.deployment_outcome or outcome
        return view

    def _set_state(self, view: RolloutView, state: str) -> RolloutView:
        updated = replace(view, rollout=replace(view.rollout, state=state, updated_at=NOW + 1))
        self.rollout_views[view.rollout.rollout_id] = updated
        return updated

    # --- Operations -----------------------------------------------------------------

    def devices(self) -> list[DeviceRow]:
        """Every device, sorted by id."""
        self._check()
        return [self.device_rows[key] for key in sorted(self.device_rows)]

    def telemetry(self, device_id: str, *, limit: int = 100) -> list[TelemetryRow]:
        """A device's telemetry, newest first.

        Raises:
            NotFoundError: no such device.
        """
        return self._device_rows(self.telemetry_rows, device_id, limit)

    def presence(self, device_id: str, *, limit: int = 100) -> list[PresenceRow]:
        """A device's presence changes, newest first.

        Raises:
            NotFoundError: no such device.
        """
        return self._device_rows(self.presence_rows, device_id, limit)

    def _device_rows(self, rows: Mapping[str, list[_R]], device_id: str, limit: int) -> list[_R]:
        self._check()
        if device_id not in self.device_rows:
            raise NotFoundError(f"no device {device_id!r}")
        return rows.get(device_id, [])[:limit]

    def upload_artifact(self, data: bytes, *, actor: Actor) -> ArtifactRow:
        """Store bytes that start with :data:`ARTIFACT_MAGIC` (idempotent).

        Raises:
            ArtifactRejectedError: anything else.
        """
        self._check()
        if not data.startswith(ARTIFACT_MAGIC):
            raise ArtifactRejectedError("not a fedge artifact (bad magic)")
        sha256 = hashlib.sha256(data).hexdigest()
        row = self.artifact_rows.get(sha256)
        if row is None:
            row = ArtifactRow(
                sha256=sha256,
                name="digits",
                version=len(self.artifact_rows) + 3,
                size=len(data),
                manifest={"name": "digits", "format": "onnx"},
                uploaded_by=actor.name,
                uploaded_at=NOW,
            )
            self.artifact_rows[sha256] = row
        self._mutate("artifact.upload", actor, sha256)
        return row

    def artifacts(self) -> list[ArtifactRow]:
        """Every artifact, newest first."""
        self._check()
        return list(reversed(self.artifact_rows.values()))

    def create_rollout(self, request: RolloutRequest, *, actor: Actor) -> RolloutView:
        """Start a rollout to the devices the target names.

        Raises:
            NotFoundError: unknown artifact.
            TargetError: a target that is not ``all``, ``tag:T`` or ``device:ID``,
                or matches no device.
            RolloutError: waves that do not end at 100.
        """
        self._check()
        self.rollout_requests.append(request)
        if request.artifact_sha256 not in self.artifact_rows:
            raise NotFoundError(f"no artifact {request.artifact_sha256!r}")
        chosen = self._chosen(request.target)
        if not request.waves.endswith("100"):
            raise RolloutError(f"waves must end at 100, not {request.waves!r}")
        rollout_id = f"ro-{len(self.rollout_views) + 1}"
        view = RolloutView(
            rollout=RolloutInfo(
                rollout_id=rollout_id,
                artifact_sha256=request.artifact_sha256,
                target=request.target,
                policy={"canary": request.canary, "waves": request.waves},
                state="running",
                created_by=actor.name,
                created_at=NOW,
                updated_at=NOW,
            ),
            devices=tuple(
                RolloutDevice(row.device_id, stage=0, state="pending", updated_at=NOW)
                for row in chosen
            ),
            summary={"stage": 0, "pending": len(chosen)},
        )
        self.rollout_views[rollout_id] = view
        self._mutate("rollout.create", actor, rollout_id)
        return view

    def rollouts(self) -> list[RolloutInfo]:
        """Every rollout, newest first."""
        self._check()
        return [view.rollout for view in reversed(self.rollout_views.values())]

    def rollout(self, rollout_id: str) -> RolloutView:
        """One rollout.

        Raises:
            NotFoundError: no such rollout.
        """
        self._check()
        view = self._rollout_view(rollout_id)
        self.rollout_reads[rollout_id] += 1
        script = self.rollout_script.get(rollout_id)
        if script:
            view = self._set_state(view, script.pop(0))
        return view

    def pause_rollout(self, rollout_id: str, *, actor: Actor) -> RolloutView:
        """Pause a running rollout.

        Raises:
            NotFoundError: no such rollout.
            RolloutError: it is not running.
        """
        self._check()
        view = self._rollout_view(rollout_id)
        if view.rollout.state != "running":
            raise RolloutError(f"rollout {rollout_id} is {view.rollout.state}; cannot pause")
        self._mutate("rollout.pause", actor, rollout_id)
        return self._set_state(view, "paused")

    def resume_rollout(self, rollout_id: str, *, actor: Actor) -> RolloutView:
        """Resume a paused rollout.

        Raises:
            NotFoundError: no such rollout.
            RolloutError: it is not paused.
        """
        self._check()
        view = self._rollout_view(rollout_id)
        if view.rollout.state != "paused":
            raise RolloutError(f"rollout {rollout_id} is {view.rollout.state}; cannot resume")
        self._mutate("rollout.resume", actor, rollout_id)
        return self._set_state(view, "running")

    def abort_rollout(self, rollout_id: str, *, actor: Actor, rollback: bool) -> RolloutView:
        """Abort a rollout that has not ended.

        Raises:
            NotFoundError: no such rollout.
            RolloutError: it completed or was aborted.
        """
        self._check()
        view = self._rollout_view(rollout_id)
        if view.rollout.state in {"completed", "aborted"}:
            raise RolloutError(f"rollout {rollout_id} is {view.rollout.state}; cannot abort")
        self.aborted[rollout_id] = rollback
        self._mutate("rollout.abort", actor, rollout_id, rollback=rollback)
        return self._set_state(view, "aborted")

    def deploy(self, request: DeployRequest, *, actor: Actor) -> DeploymentView:
        """Start a one-shot deployment: online devices pending, offline ones offline.

        Raises:
            NotFoundError: unknown artifact.
            TargetError: a bad target, or it matches no device.
        """
        self._check()
        self.deployment_requests.append(request)
        artifact = self.artifact_rows.get(request.artifact_sha256)
        if artifact is None:
            raise NotFoundError(f"no artifact {request.artifact_sha256!r}")
        view = self._start_deployment(
            artifact.name, artifact.version, request.target, DeviceState.INSTALLED
        )
        self._mutate("deployment.create", actor, view.result.deployment_id)
        return view

    def rollback(self, request: RollbackRequest, *, actor: Actor) -> DeploymentView:
        """Start a one-shot rollback (like :meth:`deploy`).

        Raises:
            TargetError: a bad target, or it matches no device.
        """
        self._check()
        self.deployment_requests.append(request)
        view = self._start_deployment(request.model, 0, request.target, DeviceState.ROLLED_BACK)
        self._mutate("rollback.create", actor, view.result.deployment_id)
        return view

    def deployment(self, deployment_id: str) -> DeploymentView:
        """A deployment; the first read ends it with ``deployment_outcome``.

        Raises:
            NotFoundError: no such deployment.
        """
        self._check()
        try:
            view = self.deployment_views[deployment_id]
        except KeyError:
            raise NotFoundError(f"no deployment {deployment_id!r}") from None
        if view.done:
            return view
        outcome = self._outcomes[deployment_id]
        devices = tuple(
            replace(p, state=outcome) if p.state is DeviceState.PENDING else p
            for p in view.result.devices
        )
        states = {p.state for p in devices}
        succeeded = (
            outcome in states
            and states <= {outcome, DeviceState.OFFLINE}
            and outcome is DeviceState.INSTALLED
        )
        result = replace(view.result, devices=devices, succeeded=succeeded)
        view = DeploymentView(result, done=True, delivered=True)
        self.deployment_views[deployment_id] = view
        return view

    def start_run(self, request: RunRequest, *, actor: Actor) -> RunView:
        """Record a running run.

        Raises:
            RunError: fewer than one round, or a run is already going.
        """
        self._check()
        if request.rounds < 1:
            raise RunError(f"rounds must be at least 1, not {request.rounds}")
        if any(view.run.state is RunState.RUNNING for view in self.run_views.values()):
            raise RunError("a federated run is already going")
        run_id = f"run-{len(self.run_views) + 1}"
        view = RunView(
            run=RunRow(
                run_id=run_id,
                config={
                    "rounds": request.rounds,
                    "strategy": request.strategy,
                    "codec": request.codec,
                    "min_clients": request.min_clients,
                    "round_timeout_s": request.round_timeout_s,
                    **request.config,
                },
                state=RunState.RUNNING,
                created_by=actor.name,
                created_at=NOW,
                updated_at=NOW,
            ),
            rounds=(),
        )
        self.run_views[run_id] = view
        self._mutate("run.start", actor, run_id)
        return view

    def stop_run(self, run_id: str, *, actor: Actor) -> RunView:
        """Interrupt a running run; its running rounds fail, ``stopped by <actor>``.

        Raises:
            NotFoundError: no such run.
            RunError: it is not running.
        """
        self._check()
        view = self._run_view(run_id)
        if view.run.state is not RunState.RUNNING:
            raise RunError(f"run {run_id} is {view.run.state}; cannot stop")
        self._mutate("run.stop", actor, run_id)
        rounds = tuple(
            replace(row, status="failed", reason=f"stopped by {actor.name}", finished_at=NOW + 1)
            if row.status == "running"
            else row
            for row in view.rounds
        )
        run = replace(view.run, state=RunState.INTERRUPTED, updated_at=NOW + 1)
        stopped = RunView(run=run, rounds=rounds)
        self.run_views[run_id] = stopped
        return stopped

    def runs(self) -> list[RunRow]:
        """Every run, newest first."""
        self._check()
        return [view.run for view in reversed(self.run_views.values())]

    def run(self, run_id: str) -> RunView:
        """One run.

        Raises:
            NotFoundError: no such run.
        """
        self._check()
        return self._run_view(run_id)

    def audit_log(self, *, limit: int = 100) -> list[AuditRow]:
        """The latest ``limit`` actions, oldest first."""
        self._check()
        return self.audit[-limit:]

    def drift(self, *, device_id: str | None = None, model: str | None = None) -> list[DriftScore]:
        """The seeded scores, filtered as the service does."""
        self._check()
        if device_id is not None and device_id not in self.device_rows:
            raise NotFoundError(f"no device {device_id!r}")
        return [
            s
            for s in self.drift_scores
            if (device_id is None or s.device_id == device_id) and model in (None, s.model)
        ]

    def set_policy(self, policy: Policy, *, actor: Actor) -> PolicyRow:
        """Keep the policy."""
        self._check()
        self._mutate("set_policy", actor, policy.name)
        self.policy_rows[policy.name] = PolicyRow(policy, actor.name, NOW)
        return self.policy_rows[policy.name]

    def policy(self, name: str) -> PolicyRow:
        """A kept policy."""
        self._check()
        if name not in self.policy_rows:
            raise NotFoundError(f"no retraining policy for model {name!r}")
        return self.policy_rows[name]

    def policies(self) -> list[PolicyRow]:
        """The kept policies, by name."""
        self._check()
        return [self.policy_rows[name] for name in sorted(self.policy_rows)]

    def delete_policy(self, name: str, *, actor: Actor) -> PolicyRow:
        """Forget a kept policy."""
        row = self.policy(name)
        self._mutate("delete_policy", actor, name)
        del self.policy_rows[name]
        return row

    def retrainings(self, *, policy: str | None = None) -> list[RetrainingRow]:
        """None: the fake starts no run."""
        self._check()
        return []

    def approve_retraining(self, run_id: str, *, actor: Actor) -> RetrainingRow:
        """None waits: the fake starts no run."""
        self._check()
        raise NotFoundError(f"no retraining run {run_id!r}")

    def metrics(self) -> FleetMetrics:
        """Figures computed from the fake's state."""
        self._check()
        rows = self.device_rows.values()
        return FleetMetrics(
            devices_online=sum(row.online for row in rows),
            devices_total=len(self.device_rows),
            models=dict(
                Counter(
                    (row.model, row.version)
                    for row in rows
                    if row.model is not None and row.version is not None
                )
            ),
            rollouts=dict(Counter(view.rollout.state for view in self.rollout_views.values())),
            latency_ms={"0.5": 2.0, "0.95": 5.5, "0.99": 9.0},
            telemetry_ingested=self.telemetry_ingested,
            rounds=self.metric_rounds,
            rollout_stages={
                rollout_id: int(view.summary.get("stage", 0))
                for rollout_id, view in self.rollout_views.items()
                if view.rollout.state in ("created", "running", "paused")
            },
            rollout_devices=dict(
                Counter(
                    (rollout_id, device.state)
                    for rollout_id, view in self.rollout_views.items()
                    if view.rollout.state in ("created", "running", "paused")
                    for device in view.devices
                )
            ),
            drift_psi={
                (s.model, s.version): s.psi_max for s in self.drift_scores if s.scope == FLEET
            },
            drift_devices=dict(
                Counter(
                    (s.model, s.version, s.severity) for s in self.drift_scores if s.scope == DEVICE
                )
            ),
            drift_rejected=dict(self.drift_rejected),
        )
