"""The HTTP API's routes: thin adapters from HTTP to :class:`Operations`.

Workflow of a route: the request was authenticated by the app's
:class:`~coordinator.service.api.auth.AuthMiddleware` before it got here; FastAPI runs the
route's :class:`~coordinator.service.api.auth.Guard` dependency (the actor, and a 403 if
its role is too weak for the route), validates the path, query and JSON body against
:mod:`coordinator.service.api.schemas` (422), calls one :class:`Operations` method and
converts the returned rows with ``*Out.model_validate``. Errors raised by the
operations object travel up to the handlers in :mod:`coordinator.service.api.app`, which
turn them into status codes.

Routes are plain ``def`` functions, so FastAPI runs the blocking operations calls
in its threadpool; the artifact upload is ``async`` because it streams the body,
and hands the blocking call to the threadpool itself.

Roles: every ``GET`` needs ``viewer``, every ``POST`` needs ``operator``;
``/v1/health`` is the only public route. ``tests/test_api.py`` walks
``app.routes`` to check this holds for every route, present and future.

This module does not use ``from __future__ import annotations``: FastAPI reads the
endpoints' annotations at runtime, and they refer to the dependencies local to
:func:`add_routes`.
"""

import logging
from typing import Annotated, Any

from fastapi import (
    APIRouter,
    Body,
    Depends,
    HTTPException,
    Path,
    Query,
    Request,
    Response,
    params,
    status,
)
from starlette.concurrency import run_in_threadpool

from coordinator.service.api.auth import Guard, RoleDependency
from coordinator.service.api.metrics import new_registry, render
from coordinator.service.api.policies import add_policy_routes
from coordinator.service.api.schemas import (
    AbortBody,
    ArtifactOut,
    AuditOut,
    DeployCreate,
    DeploymentViewOut,
    DeviceOut,
    DriftOut,
    ErrorOut,
    HealthOut,
    PresenceOut,
    RollbackCreate,
    RolloutCreate,
    RolloutOut,
    RolloutViewOut,
    RunCreate,
    RunOut,
    RunViewOut,
    TelemetryOut,
)
from coordinator.service.operations import Actor, Operations
from coordinator.service.tokens import Role

__all__ = ["ARTIFACTS_PATH", "ARTIFACT_MEDIA_TYPE", "PUBLIC_PATHS", "add_routes"]

logger = logging.getLogger(__name__)

ARTIFACTS_PATH = "/v1/artifacts"
"""Where artifacts are uploaded (the one route with the larger body limit)."""

ARTIFACT_MEDIA_TYPE = "application/octet-stream"
"""The ``Content-Type`` of an artifact upload (the raw ``.fedge`` bytes)."""

PUBLIC_PATHS = frozenset({"/v1/health"})
"""Routes that answer without a token (besides the docs)."""

MAX_LIMIT = 1000
"""Largest ``?limit=`` of the telemetry and audit listings."""

_ID = Path(min_length=1, max_length=256)


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    descriptions = {
        400: "The operation failed (a bad policy, target or state).",
        401: "No valid API token (`WWW-Authenticate: Bearer`).",
        403: "The token's role does not allow this call (it needs `operator`).",
        404: "No such device, artifact, rollout, deployment or run.",
        409: "Conflicts with an existing row.",
        413: "The request body is too large.",
        415: "The body is not `application/octet-stream`.",
        422: "The request (or the uploaded artifact) failed validation.",
        429: "Too many failed authentications from this address; wait `Retry-After` s.",
        500: "The coordinator's store failed; its log has the details.",
    }
    return {code: {"model": ErrorOut, "description": descriptions[code]} for code in codes}


_BINARY = {"type": "string", "format": "binary"}
_READ = _errors(401, 429, 500)
_READ_PAGE = _errors(401, 422, 429, 500)
_READ_ONE = _errors(401, 404, 422, 429, 500)
_WRITE = _errors(400, 401, 403, 409, 413, 422, 429, 500)


def add_routes(router: APIRouter, ops: Operations, guard: Guard) -> None:
    """Add every route of the API (``/v1/...`` and ``/metrics``) to a router.

    The app passes its own router (``app.router``), so that ``app.routes`` lists
    every route itself (FastAPI's ``include_router`` nests them instead).

    Args:
        router: Where to add the routes.
        ops: What the routes call.
        guard: Authenticates requests and checks roles.
    """
    viewer = Depends(guard.require(Role.VIEWER))
    operator = guard.require(Role.OPERATOR)

    @router.get("/v1/health", tags=["health"])
    async def health() -> HealthOut:
        """Liveness: the process answers HTTP. Public; reveals nothing else."""
        return HealthOut()

    _add_observation(router, ops, viewer)
    _add_artifacts(router, ops, viewer, operator)
    _add_rollouts(router, ops, viewer, operator)
    _add_deployments(router, ops, viewer, operator)
    _add_runs(router, ops, viewer, operator)
    add_policy_routes(router, ops, viewer, operator)


def _add_observation(router: APIRouter, ops: Operations, viewer: params.Depends) -> None:
    """Metrics, devices and their telemetry, drift scores, the audit log: reads only."""
    registry = new_registry(ops)

    @router.get(
        "/metrics",
        tags=["metrics"],
        dependencies=[viewer],
        response_class=Response,
        responses={
            200: {
                "description": "Prometheus text (or OpenMetrics, by `Accept`).",
                "content": {"text/plain": {"schema": {"type": "string"}}},
            },
            **_READ,
        },
    )
    def metrics(request: Request) -> Response:
        """Fleet figures in the Prometheus exposition format, gathered now."""
        body, content_type = render(registry, request.headers.get("accept"))
        return Response(body, media_type=content_type)

    @router.get("/v1/devices", tags=["devices"], dependencies=[viewer], responses=_READ)
    def list_devices() -> list[DeviceOut]:
        """Every device seen, sorted by id."""
        return [DeviceOut.model_validate(row) for row in ops.devices()]

    @router.get(
        "/v1/devices/{device_id}/telemetry",
        tags=["devices"],
        dependencies=[viewer],
        responses=_READ_ONE,
    )
    def device_telemetry(
        device_id: Annotated[str, _ID],
        limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = 100,
    ) -> list[TelemetryOut]:
        """A device's latest telemetry windows, newest first."""
        rows = ops.telemetry(device_id, limit=limit)
        return [TelemetryOut.model_validate(row) for row in rows]

    @router.get(
        "/v1/devices/{device_id}/presence",
        tags=["devices"],
        dependencies=[viewer],
        responses=_READ_ONE,
    )
    def device_presence(
        device_id: Annotated[str, _ID],
        limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = 100,
    ) -> list[PresenceOut]:
        """A device's latest online/offline changes (first sight included), newest first."""
        rows = ops.presence(device_id, limit=limit)
        return [PresenceOut.model_validate(row) for row in rows]

    @router.get("/v1/drift", tags=["drift"], dependencies=[viewer], responses=_READ_ONE)
    def drift(
        device: Annotated[str | None, Query(min_length=1, max_length=256)] = None,
        model: Annotated[str | None, Query(min_length=1, max_length=256)] = None,
    ) -> list[DriftOut]:
        """The latest drift score of each device and each fleet, per model version:
        fleet scores first; with ``device``, that device's only (404 if unknown)."""
        scores = ops.drift(device_id=device, model=model)
        return [DriftOut.model_validate(score) for score in scores]

    @router.get("/v1/audit", tags=["audit"], dependencies=[viewer], responses=_READ_PAGE)
    def audit_log(limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = 100) -> list[AuditOut]:
        """The latest operator actions, oldest first."""
        return [AuditOut.model_validate(row) for row in ops.audit_log(limit=limit)]


def _add_artifacts(
    router: APIRouter, ops: Operations, viewer: params.Depends, operator: RoleDependency
) -> None:
    """Upload and list artifacts."""

    @router.post(
        ARTIFACTS_PATH,
        tags=["artifacts"],
        status_code=status.HTTP_201_CREATED,
        responses={**_WRITE, **_errors(415)},
        openapi_extra={
            "requestBody": {
                "required": True,
                "description": "The raw `.fedge` artifact bytes.",
                "content": {ARTIFACT_MEDIA_TYPE: {"schema": _BINARY}},
            }
        },
    )
    async def upload_artifact(
        request: Request, actor: Annotated[Actor, Depends(operator)]
    ) -> ArtifactOut:
        """Upload a signed artifact: verified against the trusted keys, then stored.

        Idempotent: uploading the same bytes again returns the stored row. The
        body is streamed; the app's body limit stops reading (413) as soon as it
        exceeds ``max_artifact_bytes``.
        """
        media_type = request.headers.get("content-type", ARTIFACT_MEDIA_TYPE)
        if media_type.split(";")[0].strip().lower() != ARTIFACT_MEDIA_TYPE:
            raise HTTPException(
                status.HTTP_415_UNSUPPORTED_MEDIA_TYPE,
                f"send the artifact's bytes as Content-Type: {ARTIFACT_MEDIA_TYPE}",
            )
        chunks = [chunk async for chunk in request.stream()]
        data = b"".join(chunks)
        del chunks
        row = await run_in_threadpool(ops.upload_artifact, data, actor=actor)
        return ArtifactOut.model_validate(row)

    @router.get(ARTIFACTS_PATH, tags=["artifacts"], dependencies=[viewer], responses=_READ)
    def list_artifacts() -> list[ArtifactOut]:
        """Every stored artifact, newest first."""
        return [ArtifactOut.model_validate(row) for row in ops.artifacts()]


def _add_deployments(
    router: APIRouter, ops: Operations, viewer: params.Depends, operator: RoleDependency
) -> None:
    """One-shot deployments and rollbacks: start one, follow it."""

    @router.post(
        "/v1/deployments",
        tags=["deployments"],
        status_code=status.HTTP_201_CREATED,
        responses={**_WRITE, **_errors(404)},
    )
    def create_deployment(
        body: DeployCreate,
        request: Request,
        response: Response,
        actor: Annotated[Actor, Depends(operator)],
    ) -> DeploymentViewOut:
        """Send an uploaded artifact to every targeted device at once; follow it with GET."""
        view = ops.deploy(body.to_request(), actor=actor)
        deployment_id = view.result.deployment_id
        response.headers["Location"] = str(
            request.url_for("get_deployment", deployment_id=deployment_id)
        )
        return DeploymentViewOut.model_validate(view)

    @router.post(
        "/v1/rollbacks",
        tags=["deployments"],
        status_code=status.HTTP_201_CREATED,
        responses=_WRITE,
    )
    def create_rollback(
        body: RollbackCreate,
        request: Request,
        response: Response,
        actor: Annotated[Actor, Depends(operator)],
    ) -> DeploymentViewOut:
        """Make the targeted devices go back to their previous good model; follow it with GET."""
        view = ops.rollback(body.to_request(), actor=actor)
        deployment_id = view.result.deployment_id
        response.headers["Location"] = str(
            request.url_for("get_deployment", deployment_id=deployment_id)
        )
        return DeploymentViewOut.model_validate(view)

    @router.get(
        "/v1/deployments/{deployment_id}",
        tags=["deployments"],
        dependencies=[viewer],
        responses=_READ_ONE,
    )
    def get_deployment(deployment_id: Annotated[str, _ID]) -> DeploymentViewOut:
        """A one-shot deployment or rollback: every device's progress so far."""
        return DeploymentViewOut.model_validate(ops.deployment(deployment_id))


def _add_rollouts(
    router: APIRouter, ops: Operations, viewer: params.Depends, operator: RoleDependency
) -> None:
    """Create, list, inspect, pause, resume and abort rollouts."""

    @router.post(
        "/v1/rollouts",
        tags=["rollouts"],
        status_code=status.HTTP_201_CREATED,
        responses={**_WRITE, **_errors(404)},
    )
    def create_rollout(
        body: RolloutCreate,
        request: Request,
        response: Response,
        actor: Annotated[Actor, Depends(operator)],
    ) -> RolloutViewOut:
        """Start a staged rollout of an uploaded artifact."""
        view = ops.create_rollout(body.to_request(), actor=actor)
        response.headers["Location"] = str(
            request.url_for("get_rollout", rollout_id=view.rollout.rollout_id)
        )
        return RolloutViewOut.model_validate(view)

    @router.get("/v1/rollouts", tags=["rollouts"], dependencies=[viewer], responses=_READ)
    def list_rollouts() -> list[RolloutOut]:
        """Every rollout, newest first."""
        return [RolloutOut.model_validate(row) for row in ops.rollouts()]

    @router.get(
        "/v1/rollouts/{rollout_id}",
        tags=["rollouts"],
        dependencies=[viewer],
        responses=_READ_ONE,
    )
    def get_rollout(rollout_id: Annotated[str, _ID]) -> RolloutViewOut:
        """One rollout with its devices and a summary."""
        return RolloutViewOut.model_validate(ops.rollout(rollout_id))

    @router.post(
        "/v1/rollouts/{rollout_id}/pause",
        tags=["rollouts"],
        responses={**_WRITE, **_errors(404)},
    )
    def pause_rollout(
        rollout_id: Annotated[str, _ID], actor: Annotated[Actor, Depends(operator)]
    ) -> RolloutViewOut:
        """Stop releasing new stages (devices already updated keep the model)."""
        return RolloutViewOut.model_validate(ops.pause_rollout(rollout_id, actor=actor))

    @router.post(
        "/v1/rollouts/{rollout_id}/resume",
        tags=["rollouts"],
        responses={**_WRITE, **_errors(404)},
    )
    def resume_rollout(
        rollout_id: Annotated[str, _ID], actor: Annotated[Actor, Depends(operator)]
    ) -> RolloutViewOut:
        """Go on after a pause."""
        return RolloutViewOut.model_validate(ops.resume_rollout(rollout_id, actor=actor))

    @router.post(
        "/v1/rollouts/{rollout_id}/abort",
        tags=["rollouts"],
        responses={**_WRITE, **_errors(404)},
    )
    def abort_rollout(
        rollout_id: Annotated[str, _ID],
        actor: Annotated[Actor, Depends(operator)],
        body: Annotated[AbortBody | None, Body()] = None,
    ) -> RolloutViewOut:
        """End a rollout now; with ``{"rollback": true}`` also roll its devices back."""
        rollback = body is not None and body.rollback
        return RolloutViewOut.model_validate(
            ops.abort_rollout(rollout_id, actor=actor, rollback=rollback)
        )


def _add_runs(
    router: APIRouter, ops: Operations, viewer: params.Depends, operator: RoleDependency
) -> None:
    """Start, list, inspect and stop federated runs."""

    @router.post(
        "/v1/runs",
        tags=["runs"],
        status_code=status.HTTP_202_ACCEPTED,
        responses=_WRITE,
    )
    def start_run(
        body: RunCreate,
        request: Request,
        response: Response,
        actor: Annotated[Actor, Depends(operator)],
    ) -> RunViewOut:
        """Start a federated run in the background; poll ``GET /v1/runs/{id}``."""
        view = ops.start_run(body.to_request(), actor=actor)
        response.headers["Location"] = str(request.url_for("get_run", run_id=view.run.run_id))
        return RunViewOut.model_validate(view)

    @router.get("/v1/runs", tags=["runs"], dependencies=[viewer], responses=_READ)
    def list_runs() -> list[RunOut]:
        """Every federated run, newest first."""
        return [RunOut.model_validate(row) for row in ops.runs()]

    @router.get(
        "/v1/runs/{run_id}",
        tags=["runs"],
        dependencies=[viewer],
        responses=_READ_ONE,
    )
    def get_run(run_id: Annotated[str, _ID]) -> RunViewOut:
        """One run and its rounds."""
        return RunViewOut.model_validate(ops.run(run_id))

    @router.post(
        "/v1/runs/{run_id}/stop",
        tags=["runs"],
        responses={**_WRITE, **_errors(404)},
    )
    def stop_run(
        run_id: Annotated[str, _ID], actor: Annotated[Actor, Depends(operator)]
    ) -> RunViewOut:
        """Stop a running run: its current round fails and the run is ``interrupted``."""
        return RunViewOut.model_validate(ops.stop_run(run_id, actor=actor))
