"""A client of the coordinator's HTTP API that is itself an :class:`Operations`.

:class:`ApiClient` speaks to ``fedge coordinator serve`` (:mod:`coordinator.service.api`)
with httpx and returns the same rows and views as the in-process service
(:class:`~coordinator.service.store.records.DeviceRow`,
:class:`~coordinator.service.operations.RolloutView`...), so code written against
:class:`~coordinator.service.operations.Operations`, such as the CLI's commands, cannot
tell the two apart::

    with ApiClient("https://coordinator:8443", token) as ops:
        view = ops.create_rollout(RolloutRequest(sha256, target="tag:lab"), actor=CLI_ACTOR)
        print(ops.rollout(view.rollout.rollout_id).rollout.state)

Workflow of a call: one request with ``Authorization: Bearer <token>``; a 2xx
answer's JSON is validated into the dataclasses (pydantic validates the
dataclasses of :mod:`coordinator.service.store.records` and :mod:`coordinator.service.operations`
directly, so the wire shapes of :mod:`coordinator.service.api.schemas` and these rows
cannot drift apart unnoticed); an error answer
``{"error": {"code": ..., "message": ...}}`` becomes the error the service raised:

=====================================  ==========================================
the body's ``code`` names a class      that class (``bad_target``
                                       :class:`~coordinator.errors.TargetError`,
                                       ``rollout_error``, ``training_failed``,
                                       ``bad_strategy``, ``artifact_rejected``...)
401                                    :class:`~coordinator.errors.ApiAuthError`
403                                    :class:`~coordinator.errors.ApiAuthError`
404, 409 otherwise                     ``NotFoundError``, ``ConflictError``
anything else (413, 422, 500...)       :class:`~coordinator.errors.ApiError`
no answer (refused, timeout, dropped)  :class:`~coordinator.errors.ApiUnavailableError`
=====================================  ==========================================

The ``actor`` argument of the mutating calls is ignored: the API decides who the
caller is from the token. :meth:`ApiClient.metrics` is not available (the API
exposes the fleet's figures to Prometheus at ``GET /metrics``, not as JSON).

The token is sent only in the ``Authorization`` header; it is never logged nor put
in an error message or the client's ``repr``. The requests, and the mapping of
error answers to errors, are :mod:`coordinator.service.api_http`'s.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any, TypeVar

import httpx
from pydantic import TypeAdapter

from coordinator.errors import ApiError
from coordinator.lifecycle import Closeable
from coordinator.monitoring.policy import Policy
from coordinator.monitoring.scores import DriftScore
from coordinator.service.api_http import DEFAULT_TIMEOUT_S, ApiConnection, parse, segment
from coordinator.service.enrollment import IssuedEnrollment
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
    RolloutInfo,
    RunRow,
    TelemetryRow,
)
from coordinator.service.store.registry import RegisteredDevice

__all__ = ["ARTIFACT_MEDIA_TYPE", "DEFAULT_TIMEOUT_S", "ApiClient"]

ARTIFACT_MEDIA_TYPE = "application/octet-stream"
"""The ``Content-Type`` of an artifact upload (as :mod:`coordinator.service.api.routes`)."""

_T = TypeVar("_T")

_DEVICES = TypeAdapter(list[DeviceRow])
_TELEMETRY = TypeAdapter(list[TelemetryRow])
_PRESENCE = TypeAdapter(list[PresenceRow])
_ARTIFACT = TypeAdapter(ArtifactRow)
_ARTIFACTS = TypeAdapter(list[ArtifactRow])
_ROLLOUT_VIEW = TypeAdapter(RolloutView)
_ROLLOUTS = TypeAdapter(list[RolloutInfo])
_DEPLOYMENT_VIEW = TypeAdapter(DeploymentView)
_RUN_VIEW = TypeAdapter(RunView)
_RUNS = TypeAdapter(list[RunRow])
_AUDIT = TypeAdapter(list[AuditRow])
_DRIFT = TypeAdapter(list[DriftScore])
_REGISTERED = TypeAdapter(RegisteredDevice)
_REGISTRY = TypeAdapter(list[RegisteredDevice])
_ISSUED = TypeAdapter(IssuedEnrollment)
_POLICY = TypeAdapter(PolicyRow)
_POLICIES = TypeAdapter(list[PolicyRow])
_RETRAININGS = TypeAdapter(list[RetrainingRow])
_RETRAINING = TypeAdapter(RetrainingRow)


class ApiClient(Closeable):
    """:class:`~coordinator.service.operations.Operations` over the coordinator's HTTP API.

    The arguments are :class:`~coordinator.service.api_http.ApiConnection`'s: the
    API's root URL (a path prefix is kept), an API token (``fedge token add``; its
    role decides what the client may do), the seconds to wait for each step of a
    request, and an httpx transport to use instead of the network (tests). It raises
    the same :class:`~coordinator.errors.ApiError` for a bad URL or token.
    """

    def __init__(
        self,
        base_url: str,
        token: str,
        *,
        timeout: float = DEFAULT_TIMEOUT_S,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        """Check the URL and the token and prepare the connection pool."""
        self._api = ApiConnection(base_url, token, timeout=timeout, transport=transport)

    @property
    def url(self) -> str:
        """The API's root URL (without any credentials)."""
        return self._api.url

    def __repr__(self) -> str:
        """Name the URL, never the token."""
        return f"ApiClient({self.url!r})"

    def close(self) -> None:
        """Close the connection pool (the client cannot be used afterwards)."""
        self._api.close()

    # --- Operations ----------------------------------------------------------------

    def devices(self) -> list[DeviceRow]:
        """Every device seen, sorted by id.

        Raises:
            ApiError: the API failed or could not be reached (see the module
                docstring for the subclasses).
        """
        return self._api.get(_DEVICES, "v1/devices")

    def telemetry(self, device_id: str, *, limit: int = 100) -> list[TelemetryRow]:
        """A device's latest telemetry windows, newest first.

        Args:
            device_id: The device.
            limit: Most windows to return (the API allows 1 to 1000).

        Raises:
            NotFoundError: no such device.
            ApiError: a limit out of range, or the API failed.
        """
        return self._device_rows(_TELEMETRY, device_id, "telemetry", limit)

    def presence(self, device_id: str, *, limit: int = 100) -> list[PresenceRow]:
        """A device's latest online/offline changes, newest first.

        Args:
            device_id: The device.
            limit: Most changes to return (the API allows 1 to 1000).

        Raises:
            NotFoundError: no such device.
            ApiError: a limit out of range, or the API failed.
        """
        return self._device_rows(_PRESENCE, device_id, "presence", limit)

    def _device_rows(
        self, adapter: TypeAdapter[list[_T]], device_id: str, what: str, limit: int
    ) -> list[_T]:
        """``GET /v1/devices/{device_id}/{what}?limit=``, parsed."""
        path = f"v1/devices/{segment(device_id)}/{what}"
        return self._api.get(adapter, path, params={"limit": limit})

    def upload_artifact(self, data: bytes, *, actor: Actor) -> ArtifactRow:  # noqa: ARG002
        """Upload an artifact's bytes; the API verifies and stores it (idempotent).

        Args:
            data: The ``.fedge`` file's bytes.
            actor: Ignored: the API takes the actor from the token.

        Raises:
            ArtifactRejectedError: malformed, tampered, signed by the wrong keys,
                or expired.
            ApiAuthError: the token's role may not upload.
            ApiError: the artifact is larger than the API accepts (413).
        """
        answer = self._api.call(
            "POST",
            "v1/artifacts",
            action="upload artifacts",
            content=data,
            headers={"Content-Type": ARTIFACT_MEDIA_TYPE},
        )
        return parse(_ARTIFACT, answer, self.url)

    def artifacts(self) -> list[ArtifactRow]:
        """Every stored artifact, newest first.

        Raises:
            ApiError: the API failed or could not be reached.
        """
        return self._api.get(_ARTIFACTS, "v1/artifacts")

    def create_rollout(self, request: RolloutRequest, *, actor: Actor) -> RolloutView:  # noqa: ARG002
        """Start a staged rollout (``actor`` is ignored: the token decides).

        Raises:
            NotFoundError: unknown artifact.
            RolloutError: a bad policy.
            TargetError: a bad target, or it matches no device.
            ApiAuthError: the token's role may not create rollouts.
        """
        answer = self._api.call(
            "POST", "v1/rollouts", action="create rollouts", json=asdict(request)
        )
        return parse(_ROLLOUT_VIEW, answer, self.url)

    def rollouts(self) -> list[RolloutInfo]:
        """Every rollout, newest first.

        Raises:
            ApiError: the API failed or could not be reached.
        """
        return self._api.get(_ROLLOUTS, "v1/rollouts")

    def rollout(self, rollout_id: str) -> RolloutView:
        """One rollout with its devices and summary.

        Raises:
            NotFoundError: no such rollout.
        """
        return self._api.get(_ROLLOUT_VIEW, f"v1/rollouts/{segment(rollout_id)}")

    def pause_rollout(self, rollout_id: str, *, actor: Actor) -> RolloutView:  # noqa: ARG002
        """Stop releasing new stages (``actor`` is ignored: the token decides).

        Raises:
            NotFoundError: no such rollout.
            RolloutError: the rollout has ended.
        """
        return self._rollout_action(rollout_id, "pause")

    def resume_rollout(self, rollout_id: str, *, actor: Actor) -> RolloutView:  # noqa: ARG002
        """Go on after a pause (``actor`` is ignored: the token decides).

        Raises:
            NotFoundError: no such rollout.
            RolloutError: the rollout has ended or halted.
        """
        return self._rollout_action(rollout_id, "resume")

    def abort_rollout(self, rollout_id: str, *, actor: Actor, rollback: bool) -> RolloutView:  # noqa: ARG002
        """End a rollout now, optionally rolling back every device it updated.

        Raises:
            NotFoundError: no such rollout.
            RolloutError: the rollout completed.
        """
        return self._rollout_action(rollout_id, "abort", json={"rollback": rollback})

    def deploy(self, request: DeployRequest, *, actor: Actor) -> DeploymentView:  # noqa: ARG002
        """Send an uploaded artifact to the targeted devices (``actor``: the token decides).

        Raises:
            NotFoundError: unknown artifact.
            TargetError: a bad target, or it matches no device.
            ApiAuthError: the token's role may not deploy.
        """
        answer = self._api.call("POST", "v1/deployments", action="deploy", json=asdict(request))
        return parse(_DEPLOYMENT_VIEW, answer, self.url)

    def rollback(self, request: RollbackRequest, *, actor: Actor) -> DeploymentView:  # noqa: ARG002
        """Make the targeted devices go back to their previous model (``actor``: the token
        decides).

        Raises:
            TargetError: a bad target, or it matches no device.
            ApiAuthError: the token's role may not roll back.
        """
        answer = self._api.call("POST", "v1/rollbacks", action="roll back", json=asdict(request))
        return parse(_DEPLOYMENT_VIEW, answer, self.url)

    def deployment(self, deployment_id: str) -> DeploymentView:
        """A one-shot deployment or rollback: every device's progress so far.

        Raises:
            NotFoundError: no such deployment.
        """
        return self._api.get(_DEPLOYMENT_VIEW, f"v1/deployments/{segment(deployment_id)}")

    def start_run(self, request: RunRequest, *, actor: Actor) -> RunView:  # noqa: ARG002
        """Start a federated run (``actor`` is ignored: the token decides).

        Raises:
            RunError: bad settings, or a run is already going.
            ApiAuthError: the token's role may not start runs.
        """
        answer = self._api.call("POST", "v1/runs", action="start runs", json=asdict(request))
        return parse(_RUN_VIEW, answer, self.url)

    def stop_run(self, run_id: str, *, actor: Actor) -> RunView:  # noqa: ARG002
        """Stop a running run (``actor`` is ignored: the token decides).

        Raises:
            NotFoundError: no such run.
            RunError: the run is not running (it ended already).
            ApiAuthError: the token's role may not stop runs.
        """
        answer = self._api.call("POST", f"v1/runs/{segment(run_id)}/stop", action="stop runs")
        return parse(_RUN_VIEW, answer, self.url)

    def runs(self) -> list[RunRow]:
        """Every federated run, newest first.

        Raises:
            ApiError: the API failed or could not be reached.
        """
        return self._api.get(_RUNS, "v1/runs")

    def run(self, run_id: str) -> RunView:
        """One run and its rounds.

        Raises:
            NotFoundError: no such run.
        """
        return self._api.get(_RUN_VIEW, f"v1/runs/{segment(run_id)}")

    def audit_log(self, *, limit: int = 100) -> list[AuditRow]:
        """The latest operator actions, oldest first.

        Raises:
            ApiError: a limit out of range (1 to 1000), or the API failed.
        """
        return self._api.get(_AUDIT, "v1/audit", params={"limit": limit})

    def drift(self, *, device_id: str | None = None, model: str | None = None) -> list[DriftScore]:
        """The latest drift score of each device and fleet, per model version.

        Raises:
            NotFoundError: no such device.
            ApiError: the API failed or could not be reached.
        """
        params = {key: value for key, value in (("device", device_id), ("model", model)) if value}
        return self._api.get(_DRIFT, "v1/drift", params=params or None)

    def set_policy(self, policy: Policy, *, actor: Actor) -> PolicyRow:  # noqa: ARG002
        """Set a model's retraining policy (``actor`` is ignored: the token decides).

        Raises:
            PolicyError: the service refused it (invalid, or no signing key).
            ApiAuthError: the token's role may not set policies.
        """
        body = policy.to_dict()
        del body["name"]
        path = f"v1/policies/{segment(policy.name)}"
        return parse(
            _POLICY, self._api.call("POST", path, action="set policies", json=body), self.url
        )

    def policy(self, name: str) -> PolicyRow:
        """A model's retraining policy.

        Raises:
            NotFoundError: none.
        """
        return self._api.get(_POLICY, f"v1/policies/{segment(name)}")

    def policies(self) -> list[PolicyRow]:
        """Every retraining policy, by name."""
        return self._api.get(_POLICIES, "v1/policies")

    def delete_policy(self, name: str, *, actor: Actor) -> PolicyRow:  # noqa: ARG002
        """Remove a model's retraining policy (``actor`` is ignored: the token decides).

        Raises:
            NotFoundError: none.
            ApiAuthError: the token's role may not delete policies.
        """
        path = f"v1/policies/{segment(name)}/delete"
        return parse(_POLICY, self._api.call("POST", path, action="delete policies"), self.url)

    def retrainings(self, *, policy: str | None = None) -> list[RetrainingRow]:
        """The runs retraining policies started, newest first."""
        return self._api.get(
            _RETRAININGS, "v1/retrainings", params={"policy": policy} if policy else None
        )

    def approve_retraining(self, run_id: str, *, actor: Actor) -> RetrainingRow:  # noqa: ARG002
        """Roll out a retrained model waiting for approval (``actor``: the token decides).

        Raises:
            NotFoundError: no such retraining run.
            PolicyError: it is not waiting for approval.
        """
        path = f"v1/retrainings/{segment(run_id)}/approve"
        answer = self._api.call("POST", path, action="approve retrainings")
        return parse(_RETRAINING, answer, self.url)

    def metrics(self) -> FleetMetrics:
        """Not available over the API (it serves Prometheus text at ``/metrics``).

        Raises:
            ApiError: always.
        """
        raise ApiError(
            f"fleet metrics are not available through the API client; "
            f"scrape {self.url}/metrics with Prometheus",
            code="not_available",
        )

    # --- enrollment (not part of Operations: the service alone holds the broker's
    # password file) -----------------------------------------------------------------

    def enroll_device(self, device_id: str, *, expires_in_s: float | None) -> IssuedEnrollment:
        """Put a device in the registry and get its one-time enrollment token.

        Raises:
            ConflictError: the device is enrolled (revoke it first).
            EnrollmentError: a malformed device id or lifetime.
            ApiAuthError: the token's role may not enroll devices.
        """
        body = {"device_id": device_id, "expires_in_s": expires_in_s}
        answer = self._api.call("POST", "v1/enrollments", action="enroll devices", json=body)
        return parse(_ISSUED, answer, self.url)

    def revoke_device(self, device_id: str) -> RegisteredDevice:
        """Cut a device's broker access and mark it revoked.

        Raises:
            NotFoundError: the device is not in the registry.
            EnrollmentError: its broker account could not be removed.
            ApiAuthError: the token's role may not revoke devices.
        """
        path = f"v1/enrollments/{segment(device_id)}/revoke"
        return parse(_REGISTERED, self._api.call("POST", path, action="revoke devices"), self.url)

    def enrollments(self) -> list[RegisteredDevice]:
        """The device registry (pending, accepted and revoked devices), sorted by id."""
        return self._api.get(_REGISTRY, "v1/enrollments")

    # --- plumbing ------------------------------------------------------------------

    def _rollout_action(
        self, rollout_id: str, verb: str, json: dict[str, Any] | None = None
    ) -> RolloutView:
        path = f"v1/rollouts/{segment(rollout_id)}/{verb}"
        answer = self._api.call("POST", path, action=f"{verb} rollouts", json=json)
        return parse(_ROLLOUT_VIEW, answer, self.url)
