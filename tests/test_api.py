"""Tests for coordinator.api: auth, roles, limits, error mapping, metrics, serving.

The app runs over :class:`tests.api_support.FakeOperations` (an in-memory twin of
:class:`coordinator.service.operations.Operations`) through Starlette's ``TestClient``; one
test serves it with a real uvicorn on a loopback socket.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import warnings
from collections.abc import Iterator
from typing import Any

import anyio
import httpx
import pytest
from fastapi import FastAPI
from fastapi.routing import APIRoute
from prometheus_client.parser import text_string_to_metric_families
from pydantic import BaseModel
from starlette.exceptions import StarletteDeprecationWarning
from starlette.types import Message

from coordinator.delivery.tracker import DeployResult, DeviceProgress
from coordinator.errors import (
    ArtifactCorruptError,
    ArtifactRejectedError,
    ConflictError,
    CoordinatorError,
    NotFoundError,
    RolloutError,
    RunError,
    StoreError,
    TargetError,
)
from coordinator.monitoring.scores import DriftScore, FeatureDrift
from coordinator.service.api import ApiConfig, create_app
from coordinator.service.api.app import status_for
from coordinator.service.api.auth_limits import AuthLimits
from coordinator.service.api.routes import PUBLIC_PATHS
from coordinator.service.api.schemas import (
    ArtifactOut,
    AuditOut,
    DeployCreate,
    DeploymentViewOut,
    DeployResultOut,
    DeviceOut,
    DeviceProgressOut,
    DriftOut,
    FeatureDriftOut,
    RollbackCreate,
    RolloutCreate,
    RolloutDeviceOut,
    RolloutOut,
    RolloutViewOut,
    RoundOut,
    RunCreate,
    RunOut,
    RunViewOut,
    TelemetryOut,
)
from coordinator.service.operations import (
    Actor,
    DeploymentView,
    DeployRequest,
    Operations,
    RollbackRequest,
    RolloutRequest,
    RolloutView,
    RunRequest,
    RunView,
)
from coordinator.service.store.records import (
    ArtifactRow,
    AuditRow,
    DeviceRow,
    RolloutDevice,
    RolloutInfo,
    RoundRow,
    RunRow,
    RunState,
    TelemetryRow,
)
from tests.api_support import (
    ARTIFACT_MAGIC,
    NOW,
    OPERATOR,
    OPERATOR_TOKEN,
    VIEWER_TOKEN,
    FakeOperations,
    authenticate,
    bearer,
    serve,
)

with warnings.catch_warnings():
    # Starlette 1.x prefers httpx2 for its TestClient and warns when it falls back
    # to httpx (which fedge depends on), and names an anyio alias that anyio 4.16
    # deprecates; neither changes how the client works.
    warnings.filterwarnings(
        "ignore", message="Using `httpx` with", category=StarletteDeprecationWarning
    )
    warnings.filterwarnings(
        "ignore", message="The anyio.abc.BlockingPortal alias", category=DeprecationWarning
    )
    from fastapi.testclient import TestClient

MAX_BODY = 2048
MAX_ARTIFACT = 4096
CONFIG = ApiConfig(max_body_bytes=MAX_BODY, max_artifact_bytes=MAX_ARTIFACT)
AS_VIEWER = bearer(VIEWER_TOKEN)
AS_OPERATOR = bearer(OPERATOR_TOKEN)
OCTETS = {"Content-Type": "application/octet-stream"}
ARTIFACT = ARTIFACT_MAGIC + bytes(range(256)) * 4
DOC_PATHS = {"/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"}


# --- fixtures and helpers ---------------------------------------------------------------


@pytest.fixture
def ops() -> FakeOperations:
    return FakeOperations.seeded()


@pytest.fixture
def app(ops: FakeOperations) -> FastAPI:
    typed: Operations = ops  # the twin satisfies the Protocol (checked by mypy)
    return create_app(typed, authenticate=authenticate, config=CONFIG)


@pytest.fixture
def client(app: FastAPI) -> Iterator[TestClient]:
    with TestClient(app) as client:
        yield client


def api_routes(app: FastAPI) -> list[APIRoute]:
    return [route for route in app.routes if isinstance(route, APIRoute)]


def methods(route: APIRoute) -> set[str]:
    return route.methods or set()


def concrete(path: str) -> str:
    """A route's path with every parameter filled in."""
    return re.sub(r"\{[^}]+\}", "x", path)


def error_of(response: httpx.Response) -> dict[str, Any]:
    body = response.json()
    assert set(body) == {"error"}
    error: dict[str, Any] = body["error"]
    assert isinstance(error["code"], str)
    assert isinstance(error["message"], str)
    return error


def upload(client: TestClient, data: bytes = ARTIFACT) -> str:
    response = client.post("/v1/artifacts", content=data, headers={**AS_OPERATOR, **OCTETS})
    assert response.status_code == 201, response.text
    sha: str = response.json()["sha256"]
    return sha


def create_rollout(client: TestClient, **fields: Any) -> str:
    body = {"artifact_sha256": upload(client), **fields}
    response = client.post("/v1/rollouts", json=body, headers=AS_OPERATOR)
    assert response.status_code == 201, response.text
    rollout_id: str = response.json()["rollout"]["rollout_id"]
    return rollout_id


def chunks(total: int, size: int = 512, head: bytes = ARTIFACT_MAGIC) -> Iterator[bytes]:
    """``total`` bytes in chunks of ``size``, without a declared length."""
    data = head + b"\0" * (total - len(head))
    for start in range(0, total, size):
        yield data[start : start + size]


# --- authentication -----------------------------------------------------------------


def test_route_table_is_the_documented_one(app: FastAPI) -> None:
    table = {(method, route.path) for route in api_routes(app) for method in methods(route)}
    assert table == {
        ("GET", "/v1/health"),
        ("GET", "/metrics"),
        ("GET", "/v1/devices"),
        ("GET", "/v1/devices/{device_id}/telemetry"),
        ("GET", "/v1/devices/{device_id}/presence"),
        ("POST", "/v1/artifacts"),
        ("GET", "/v1/artifacts"),
        ("POST", "/v1/rollouts"),
        ("GET", "/v1/rollouts"),
        ("GET", "/v1/rollouts/{rollout_id}"),
        ("POST", "/v1/rollouts/{rollout_id}/pause"),
        ("POST", "/v1/rollouts/{rollout_id}/resume"),
        ("POST", "/v1/rollouts/{rollout_id}/abort"),
        ("POST", "/v1/deployments"),
        ("GET", "/v1/deployments/{deployment_id}"),
        ("POST", "/v1/rollbacks"),
        ("POST", "/v1/runs"),
        ("GET", "/v1/runs"),
        ("GET", "/v1/runs/{run_id}"),
        ("POST", "/v1/runs/{run_id}/stop"),
        ("GET", "/v1/audit"),
        ("GET", "/v1/drift"),
        ("GET", "/v1/policies"),
        ("GET", "/v1/policies/{name}"),
        ("POST", "/v1/policies/{name}"),
        ("POST", "/v1/policies/{name}/delete"),
        ("GET", "/v1/retrainings"),
        ("POST", "/v1/retrainings/{run_id}/approve"),
    }
    # Nothing but the docs is served outside FastAPI's routes (and their checks).
    others = {getattr(route, "path", None) for route in app.routes} - {
        route.path for route in api_routes(app)
    }
    assert others == DOC_PATHS


def test_every_route_but_health_needs_a_token(ops: FakeOperations) -> None:
    # 21 refusals from one address: more than the failed-authentication limit
    # (tests/test_api_auth_limits.py has that), so this app allows more.
    config = dataclasses.replace(CONFIG, auth_limits=AuthLimits(max_failures=100))
    app = create_app(ops, authenticate=authenticate, config=config)
    with TestClient(app) as client:
        checked = _refused_everywhere(app, client)
    assert checked == 27
    assert ops.mutations == []


def _refused_everywhere(app: FastAPI, client: TestClient) -> int:
    checked = 0
    for route in api_routes(app):
        for method in methods(route):
            response = client.request(method, concrete(route.path), json={})
            if route.path in PUBLIC_PATHS:
                assert response.status_code == 200
                continue
            assert response.status_code == 401, (method, route.path)
            assert response.headers["WWW-Authenticate"].startswith("Bearer")
            assert error_of(response)["code"] == "unauthorized"
            checked += 1
    return checked


@pytest.mark.parametrize(
    "authorization",
    [
        "Bearer fedge_not-a-known-token",
        "Bearer not-even-a-fedge-token",
        "Bearer fedge_" + "x" * 200,
        "Bearer ",
        "Bearer",
        f"Basic {VIEWER_TOKEN}",
        VIEWER_TOKEN,
        f"Token {OPERATOR_TOKEN}",
    ],
)
def test_missing_malformed_unknown_tokens_are_401(client: TestClient, authorization: str) -> None:
    response = client.get("/v1/devices", headers={"Authorization": authorization})
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert "token" in error_of(response)["message"]


def test_bearer_scheme_is_case_insensitive(client: TestClient) -> None:
    response = client.get("/v1/devices", headers={"Authorization": f"bearer {VIEWER_TOKEN}"})
    assert response.status_code == 200


def test_revoked_token_is_401(ops: FakeOperations) -> None:
    revoked: set[str] = set()

    def check(token: str) -> Actor | None:
        return None if token in revoked else authenticate(token)

    with TestClient(create_app(ops, authenticate=check, config=CONFIG)) as client:
        assert client.get("/v1/devices", headers=AS_OPERATOR).status_code == 200
        revoked.add(OPERATOR_TOKEN)
        response = client.get("/v1/devices", headers=AS_OPERATOR)
        assert response.status_code == 401
        assert response.headers["WWW-Authenticate"] == 'Bearer error="invalid_token"'


def test_refusals_are_logged_at_info_without_the_token(
    client: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    unknown = "fedge_an-unknown-but-plausible-token"
    with caplog.at_level(logging.INFO, logger="coordinator.service.api"):
        client.get("/v1/devices")
        client.get("/v1/devices", headers=bearer(unknown))
        client.post("/v1/runs", json={}, headers=AS_VIEWER)
    refusals = [r for r in caplog.records if r.getMessage().startswith("refused")]
    assert len(refusals) == 3
    for record in refusals:
        assert record.levelno == logging.INFO
        message = record.getMessage()
        assert "testclient" in message  # TestClient's client address
        for secret in (unknown, VIEWER_TOKEN, OPERATOR_TOKEN):
            assert secret not in message
    assert "no Authorization header" in refusals[0].getMessage()
    assert "unknown, revoked or expired token" in refusals[1].getMessage()
    assert "viewer" in refusals[2].getMessage()


def test_a_failing_token_store_is_a_500(ops: FakeOperations) -> None:
    def broken(token: str) -> Actor | None:
        raise StoreError("database is locked at /var/lib/fedge/state.db")

    with TestClient(create_app(ops, authenticate=broken, config=CONFIG)) as client:
        response = client.get("/v1/devices", headers=AS_VIEWER)
    assert response.status_code == 500
    assert error_of(response)["code"] == "internal_error"
    assert "/var/lib" not in response.text


def test_no_body_is_read_before_the_token_is_checked(app: FastAPI) -> None:
    """A client without a token gets its 401 before the server parses its body."""
    with TestClient(app) as client:
        for headers in ({}, AS_VIEWER):
            response = client.post(
                "/v1/rollouts",
                content=b"{not json at all",
                headers={**headers, "Content-Type": "application/json"},
            )
            assert response.status_code == (403 if headers else 401)
            assert "JSON" not in response.text
        # With the right token the same body is parsed, and refused for what it is.
        response = client.post(
            "/v1/rollouts",
            content=b"{not json at all",
            headers={**AS_OPERATOR, "Content-Type": "application/json"},
        )
        assert response.status_code == 422


def test_unknown_paths_need_a_token_too(client: TestClient) -> None:
    assert client.get("/v1/nothing-here").status_code == 401
    assert client.get("/v1/nothing-here", headers=AS_VIEWER).status_code == 404


# --- roles --------------------------------------------------------------------------


def test_viewer_is_refused_every_post(
    app: FastAPI, client: TestClient, ops: FakeOperations
) -> None:
    posts = [route for route in api_routes(app) if "POST" in methods(route)]
    assert len(posts) == 12
    for route in posts:
        for body in ({}, {"rollback": True}, None):
            response = client.post(concrete(route.path), json=body, headers=AS_VIEWER)
            assert response.status_code == 403, route.path
            assert error_of(response)["code"] == "forbidden"
    response = client.post("/v1/artifacts", content=ARTIFACT, headers={**AS_VIEWER, **OCTETS})
    assert response.status_code == 403
    assert ops.mutations == []
    assert ops.artifact_rows == {}


def test_viewer_may_call_every_get(app: FastAPI, client: TestClient) -> None:
    for route in api_routes(app):
        if "GET" in methods(route):
            response = client.get(concrete(route.path), headers=AS_VIEWER)
            # Unknown ids are 404; what matters is that the role is enough.
            assert response.status_code in {200, 404}, (route.path, response.text)


def test_viewer_reads(client: TestClient) -> None:
    devices = client.get("/v1/devices", headers=AS_VIEWER)
    assert devices.status_code == 200
    assert [d["device_id"] for d in devices.json()] == ["pi-1", "pi-2", "pi-3"]
    first = devices.json()[0]
    assert first["tags"] == ["lab", "pi4"]
    assert first["model"] == "digits"
    assert first["version"] == 3
    telemetry = client.get("/v1/devices/pi-1/telemetry?limit=2", headers=AS_VIEWER)
    assert telemetry.status_code == 200
    assert [row["seq"] for row in telemetry.json()] == [0, 1]
    assert telemetry.json()[0]["p95"] == 5.5
    presence = client.get("/v1/devices/pi-1/presence?limit=2", headers=AS_VIEWER)
    assert presence.status_code == 200
    assert presence.json() == [
        {"device_id": "pi-1", "online": True, "at": NOW - 30},
        {"device_id": "pi-1", "online": False, "at": NOW - 90},
    ]
    assert client.get("/v1/devices/pi-2/presence", headers=AS_VIEWER).json() == []
    for path in ("/v1/artifacts", "/v1/rollouts", "/v1/runs", "/v1/audit"):
        response = client.get(path, headers=AS_VIEWER)
        assert response.status_code == 200
        assert response.json() == []


def test_a_rollout_body_carries_the_whole_policy(client: TestClient, ops: FakeOperations) -> None:
    sha = upload(client)
    body = {
        "artifact_sha256": sha, "target": "all", "canary": "2", "waves": "50,100",
        "soak": "30s", "max_failure": "10%", "min_reports": 3, "rollback_on_halt": False,
        "install_timeout": "2m", "max_error_increase": "1%", "max_p95_ratio": 2.5,
        "require_health": True, "min_failed_devices": 3,
    }  # fmt: skip
    response = client.post("/v1/rollouts", json=body, headers=AS_OPERATOR)
    assert response.status_code == 201, response.text
    assert ops.rollout_requests == [RolloutRequest(**body)]
    # Defaults are the request's own.
    client.post("/v1/rollouts", json={"artifact_sha256": sha}, headers=AS_OPERATOR)
    assert ops.rollout_requests[-1] == RolloutRequest(sha)
    assert ops.rollout_requests[-1].min_failed_devices is None  # the service's setting
    bad = {"artifact_sha256": sha, "min_failed_devices": 0}
    assert client.post("/v1/rollouts", json=bad, headers=AS_OPERATOR).status_code == 422


def test_one_shot_deployment_and_rollback(client: TestClient, ops: FakeOperations) -> None:
    sha = upload(client)
    body = {"artifact_sha256": sha, "target": "tag:lab", "timeout_s": 30.0}
    created = client.post("/v1/deployments", json=body, headers=AS_OPERATOR)
    assert created.status_code == 201, created.text
    view = created.json()
    deployment_id = view["result"]["deployment_id"]
    assert created.headers["Location"].endswith(f"/v1/deployments/{deployment_id}")
    assert (view["done"], view["delivered"]) == (False, False)
    assert [(d["device_id"], d["state"]) for d in view["result"]["devices"]] == [
        ("pi-1", "pending"),
        ("pi-2", "pending"),
    ]
    got = client.get(f"/v1/deployments/{deployment_id}", headers=AS_VIEWER).json()
    assert got["done"] is True
    assert got["result"]["succeeded"] is True
    assert {d["state"] for d in got["result"]["devices"]} == {"installed"}

    rolled = client.post(
        "/v1/rollbacks",
        json={"model": "digits", "target": "device:pi-1", "reason": "bad", "timeout_s": 5},
        headers=AS_OPERATOR,
    )
    assert rolled.status_code == 201, rolled.text
    rollback_id = rolled.json()["result"]["deployment_id"]
    got = client.get(f"/v1/deployments/{rollback_id}", headers=AS_VIEWER).json()
    assert [d["state"] for d in got["result"]["devices"]] == ["rolled_back"]
    assert ops.deployment_requests == [
        DeployRequest(sha, target="tag:lab", timeout_s=30.0),
        RollbackRequest("digits", target="device:pi-1", reason="bad", timeout_s=5.0),
    ]
    assert [m for m, _ in ops.mutations] == [
        "artifact.upload", "deployment.create", "rollback.create"
    ]  # fmt: skip
    # Defaults are the requests' own.
    client.post("/v1/deployments", json={"artifact_sha256": sha}, headers=AS_OPERATOR)
    client.post("/v1/rollbacks", json={"model": "digits"}, headers=AS_OPERATOR)
    assert ops.deployment_requests[-2:] == [DeployRequest(sha), RollbackRequest("digits")]


@pytest.mark.parametrize(
    ("path", "body", "status", "code"),
    [
        ("/v1/deployments", {"artifact_sha256": "f" * 64}, 404, "not_found"),
        ("/v1/deployments", {"target": "everything"}, 400, "bad_target"),
        ("/v1/deployments", {"timeout_s": 0}, 422, "invalid_request"),
        ("/v1/deployments", {"timeuot_s": 5}, 422, "invalid_request"),
        ("/v1/rollbacks", {"model": "digits", "target": "tag:none"}, 400, "bad_target"),
        ("/v1/rollbacks", {}, 422, "invalid_request"),
    ],
)
def test_bad_deployments_are_refused(
    client: TestClient, ops: FakeOperations, path: str, body: dict[str, Any], status: int, code: str
) -> None:
    if path == "/v1/deployments":
        body = {"artifact_sha256": upload(client), **body}
    response = client.post(path, json=body, headers=AS_OPERATOR)
    assert response.status_code == status, response.text
    assert error_of(response)["code"] == code
    assert [m for m, _ in ops.mutations if m != "artifact.upload"] == []
    response = client.get("/v1/deployments/nope", headers=AS_VIEWER)
    assert response.status_code == 404


def test_operator_workflow(client: TestClient, ops: FakeOperations) -> None:
    sha = upload(client)
    listed = client.get("/v1/artifacts", headers=AS_VIEWER).json()
    assert [a["sha256"] for a in listed] == [sha]
    assert listed[0]["size"] == len(ARTIFACT)
    assert listed[0]["uploaded_by"] == OPERATOR.name
    assert upload(client) == sha  # idempotent

    created = client.post(
        "/v1/rollouts",
        json={"artifact_sha256": sha, "target": "tag:lab", "canary": "1", "waves": "50,100"},
        headers=AS_OPERATOR,
    )
    assert created.status_code == 201
    view = created.json()
    rollout_id = view["rollout"]["rollout_id"]
    assert created.headers["Location"].endswith(f"/v1/rollouts/{rollout_id}")
    assert view["rollout"]["state"] == "running"
    assert {d["device_id"] for d in view["devices"]} == {"pi-1", "pi-2"}
    assert view["summary"] == {"stage": 0, "pending": 2}

    got = client.get(f"/v1/rollouts/{rollout_id}", headers=AS_VIEWER)
    assert got.json() == view
    base = f"/v1/rollouts/{rollout_id}"
    paused = client.post(f"{base}/pause", headers=AS_OPERATOR)
    assert paused.status_code == 200
    assert paused.json()["rollout"]["state"] == "paused"
    resumed = client.post(f"{base}/resume", headers=AS_OPERATOR)
    assert resumed.json()["rollout"]["state"] == "running"
    aborted = client.post(f"{base}/abort", json={"rollback": True}, headers=AS_OPERATOR)
    assert aborted.status_code == 200
    assert aborted.json()["rollout"]["state"] == "aborted"
    assert ops.aborted == {rollout_id: True}

    started = client.post(
        "/v1/runs", json={"rounds": 3, "config": {"family": "mlp"}}, headers=AS_OPERATOR
    )
    assert started.status_code == 202
    run_id = started.json()["run"]["run_id"]
    assert started.headers["Location"].endswith(f"/v1/runs/{run_id}")
    assert started.json()["run"]["state"] == "running"
    assert started.json()["run"]["config"]["family"] == "mlp"
    assert client.get(f"/v1/runs/{run_id}", headers=AS_VIEWER).json() == started.json()
    assert [r["run_id"] for r in client.get("/v1/runs", headers=AS_VIEWER).json()] == [run_id]

    audit = client.get("/v1/audit?limit=3", headers=AS_VIEWER).json()
    assert [a["action"] for a in audit] == ["rollout.resume", "rollout.abort", "run.start"]
    assert {a["actor"] for a in audit} == {OPERATOR.name}
    assert {a["role"] for a in audit} == {"operator"}
    assert ops.mutations[0] == ("artifact.upload", OPERATOR.name)


def start_run(client: TestClient) -> str:
    response = client.post("/v1/runs", json={}, headers=AS_OPERATOR)
    assert response.status_code == 202, response.text
    run_id: str = response.json()["run"]["run_id"]
    return run_id


def test_operator_stops_a_running_run(client: TestClient, ops: FakeOperations) -> None:
    run_id = start_run(client)
    view = ops.run_views[run_id]
    done = RoundRow(run_id, 1, "ok", "", {"accuracy": 0.5}, NOW, NOW + 1)
    going = RoundRow(run_id, 2, "running", "", {}, NOW + 1, None)
    ops.run_views[run_id] = dataclasses.replace(view, rounds=(done, going))

    response = client.post(f"/v1/runs/{run_id}/stop", headers=AS_OPERATOR)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["run"]["state"] == "interrupted"
    assert body["rounds"][0] == RoundOut.model_validate(done).model_dump(mode="json")
    assert body["rounds"][1]["status"] == "failed"
    assert body["rounds"][1]["reason"] == f"stopped by {OPERATOR.name}"
    assert client.get(f"/v1/runs/{run_id}", headers=AS_VIEWER).json() == body
    assert ops.mutations[-1] == ("run.stop", OPERATOR.name)
    [entry] = client.get("/v1/audit?limit=1", headers=AS_VIEWER).json()
    assert (entry["action"], entry["target"], entry["actor"]) == ("run.stop", run_id, OPERATOR.name)


def test_viewer_may_not_stop_a_run(client: TestClient, ops: FakeOperations) -> None:
    run_id = start_run(client)
    response = client.post(f"/v1/runs/{run_id}/stop", headers=AS_VIEWER)
    assert response.status_code == 403
    assert error_of(response)["code"] == "forbidden"
    assert ops.run_views[run_id].run.state is RunState.RUNNING
    assert [method for method, _ in ops.mutations] == ["run.start"]


def test_stopping_an_unknown_run_is_404(client: TestClient, ops: FakeOperations) -> None:
    response = client.post("/v1/runs/run-9/stop", headers=AS_OPERATOR)
    assert response.status_code == 404
    assert error_of(response) == {"code": "not_found", "message": "no run 'run-9'"}
    assert ops.mutations == []


def test_stopping_a_run_that_ended_is_400(client: TestClient, ops: FakeOperations) -> None:
    run_id = start_run(client)
    assert client.post(f"/v1/runs/{run_id}/stop", headers=AS_OPERATOR).status_code == 200
    response = client.post(f"/v1/runs/{run_id}/stop", headers=AS_OPERATOR)
    assert response.status_code == 400
    assert error_of(response) == {
        "code": "training_failed",
        "message": f"run {run_id} is interrupted; cannot stop",
    }
    assert [method for method, _ in ops.mutations] == ["run.start", "run.stop"]


def test_abort_without_a_body_does_not_roll_back(client: TestClient, ops: FakeOperations) -> None:
    rollout_id = create_rollout(client)
    response = client.post(f"/v1/rollouts/{rollout_id}/abort", headers=AS_OPERATOR)
    assert response.status_code == 200
    assert ops.aborted == {rollout_id: False}


def test_request_defaults_are_the_operations_defaults(
    client: TestClient, ops: FakeOperations
) -> None:
    rollout_id = create_rollout(client)
    policy = ops.rollout_views[rollout_id].rollout.policy
    defaults = RolloutRequest(artifact_sha256="")
    assert policy == {"canary": defaults.canary, "waves": defaults.waves}
    client.post("/v1/runs", json={}, headers=AS_OPERATOR)
    config = next(iter(ops.run_views.values())).run.config
    assert config["rounds"] == RunRequest().rounds
    assert config["strategy"] == RunRequest().strategy


# --- artifact upload ----------------------------------------------------------------


def test_artifact_at_the_limit_is_accepted(client: TestClient) -> None:
    data = ARTIFACT_MAGIC + b"\0" * (MAX_ARTIFACT - len(ARTIFACT_MAGIC))
    assert len(upload(client, data)) == 64


def test_artifact_over_the_limit_is_413(client: TestClient, ops: FakeOperations) -> None:
    data = ARTIFACT_MAGIC + b"\0" * MAX_ARTIFACT
    response = client.post("/v1/artifacts", content=data, headers={**AS_OPERATOR, **OCTETS})
    assert response.status_code == 413
    assert error_of(response)["code"] == "payload_too_large"
    assert str(MAX_ARTIFACT) in error_of(response)["message"]
    assert ops.artifact_rows == {}


def test_chunked_artifact_over_the_limit_is_413(client: TestClient, ops: FakeOperations) -> None:
    response = client.post(
        "/v1/artifacts", content=chunks(MAX_ARTIFACT + 1), headers={**AS_OPERATOR, **OCTETS}
    )
    assert response.status_code == 413
    assert ops.artifact_rows == {}
    assert ops.mutations == []


def test_chunked_artifact_under_the_limit_is_stored(
    client: TestClient, ops: FakeOperations
) -> None:
    response = client.post(
        "/v1/artifacts", content=chunks(MAX_ARTIFACT), headers={**AS_OPERATOR, **OCTETS}
    )
    assert response.status_code == 201
    assert next(iter(ops.artifact_rows.values())).size == MAX_ARTIFACT


def test_upload_stops_reading_once_over_the_limit(app: FastAPI, ops: FakeOperations) -> None:
    """Driven as raw ASGI: the body is an endless stream of 100-byte messages."""
    received = 0
    sent: list[Message] = []

    async def receive() -> Message:
        nonlocal received
        received += 1
        return {"type": "http.request", "body": b"FEDGE" + b"\0" * 95, "more_body": True}

    async def send(message: Message) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/artifacts",
        "raw_path": b"/v1/artifacts",
        "root_path": "",
        "query_string": b"",
        "headers": [
            (b"authorization", f"Bearer {OPERATOR_TOKEN}".encode()),
            (b"content-type", b"application/octet-stream"),
            (b"transfer-encoding", b"chunked"),
        ],
        "client": ("127.0.0.1", 5000),
        "server": ("127.0.0.1", 8000),
    }

    async def main() -> None:
        with anyio.fail_after(10):
            await app(scope, receive, send)

    anyio.run(main)
    assert sent[0]["type"] == "http.response.start"
    assert sent[0]["status"] == 413
    assert received == MAX_ARTIFACT // 100 + 1
    assert ops.artifact_rows == {}


def test_too_large_content_length_is_refused_before_reading(
    client: TestClient, ops: FakeOperations, caplog: pytest.LogCaptureFixture
) -> None:
    headers = {**AS_OPERATOR, **OCTETS, "Content-Length": str(MAX_ARTIFACT + 1)}
    request = client.build_request("POST", "/v1/artifacts", content=b"", headers=headers)
    with caplog.at_level(logging.INFO, logger="coordinator.service.api"):
        response = client.send(request)
    assert response.status_code == 413
    assert response.headers["Connection"] == "close"
    assert ops.mutations == []
    assert any("body over" in r.getMessage() for r in caplog.records)


def test_rejected_artifact_is_422_and_not_stored(client: TestClient, ops: FakeOperations) -> None:
    response = client.post(
        "/v1/artifacts", content=b"garbage" * 10, headers={**AS_OPERATOR, **OCTETS}
    )
    assert response.status_code == 422
    error = error_of(response)
    assert error["code"] == "artifact_rejected"
    assert "bad magic" in error["message"]
    assert ops.artifact_rows == {}


@pytest.mark.parametrize("content_type", ["application/json", "multipart/form-data; b=x"])
def test_artifact_must_be_octet_stream(
    client: TestClient, ops: FakeOperations, content_type: str
) -> None:
    response = client.post(
        "/v1/artifacts", content=ARTIFACT, headers={**AS_OPERATOR, "Content-Type": content_type}
    )
    assert response.status_code == 415
    assert "application/octet-stream" in error_of(response)["message"]
    assert ops.artifact_rows == {}


# --- JSON body limit and validation -------------------------------------------------


def test_json_body_over_the_limit_is_413(client: TestClient, ops: FakeOperations) -> None:
    body = {"rounds": 1, "config": {"padding": "x" * MAX_BODY}}
    response = client.post("/v1/runs", json=body, headers=AS_OPERATOR)
    assert response.status_code == 413
    assert error_of(response)["code"] == "payload_too_large"
    assert ops.run_views == {}


def test_chunked_json_body_over_the_limit_is_413(client: TestClient, ops: FakeOperations) -> None:
    def body() -> Iterator[bytes]:
        yield b'{"rounds": 1, "config": {"padding": "'
        for _ in range(MAX_BODY // 100 + 1):
            yield b"x" * 100
        yield b'"}}'

    headers = {**AS_OPERATOR, "Content-Type": "application/json"}
    response = client.post("/v1/runs", content=body(), headers=headers)
    assert response.status_code == 413
    assert ops.run_views == {}


def test_artifact_limit_applies_only_to_the_upload(client: TestClient) -> None:
    # A JSON body between the two limits is too large for every other route.
    body = {"artifact_sha256": "a" * 64, "target": "device:" + "d" * (MAX_BODY + 100)}
    response = client.post("/v1/rollouts", json=body, headers=AS_OPERATOR)
    assert response.status_code == 413


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/runs", {"rounds": "many"}),
        ("/v1/runs", {"rounds": 2, "stratgy": "fedprox"}),
        ("/v1/rollouts", {"target": "all"}),
        ("/v1/rollouts", {"artifact_sha256": "a" * 64, "canery": "5%"}),
        ("/v1/rollouts/ro-1/abort", {"rollback": "sometimes"}),
    ],
)
def test_invalid_json_is_422(
    client: TestClient, ops: FakeOperations, path: str, body: dict[str, Any]
) -> None:
    response = client.post(path, json=body, headers=AS_OPERATOR)
    assert response.status_code == 422
    error = error_of(response)
    assert error["code"] == "invalid_request"
    assert error["details"]
    assert ops.mutations == []


def test_malformed_json_is_422(client: TestClient) -> None:
    headers = {**AS_OPERATOR, "Content-Type": "application/json"}
    response = client.post("/v1/runs", content=b'{"rounds": ', headers=headers)
    assert response.status_code == 422


@pytest.mark.parametrize("limit", ["0", "1001", "-1", "ten"])
def test_limit_query_is_bounded(client: TestClient, limit: str) -> None:
    for path in ("/v1/devices/pi-1/telemetry", "/v1/devices/pi-1/presence", "/v1/audit"):
        response = client.get(f"{path}?limit={limit}", headers=AS_VIEWER)
        assert response.status_code == 422
        assert "limit" in error_of(response)["message"]


# --- error mapping ------------------------------------------------------------------


def test_unknown_ids_are_404(client: TestClient) -> None:
    for path in (
        "/v1/rollouts/nope",
        "/v1/runs/nope",
        "/v1/devices/nope/telemetry",
        "/v1/devices/nope/presence",
    ):
        response = client.get(path, headers=AS_VIEWER)
        assert response.status_code == 404
        assert error_of(response) == {
            "code": "not_found",
            "message": response.json()["error"]["message"],
        }
        assert "nope" in error_of(response)["message"]
    response = client.post("/v1/rollouts/nope/pause", headers=AS_OPERATOR)
    assert response.status_code == 404
    response = client.post("/v1/rollouts", json={"artifact_sha256": "f" * 64}, headers=AS_OPERATOR)
    assert response.status_code == 404


def test_unknown_route_is_404_in_the_error_format(client: TestClient) -> None:
    response = client.get("/v1/nothing-here", headers=AS_VIEWER)
    assert response.status_code == 404
    assert error_of(response)["code"] == "not_found"


@pytest.mark.parametrize(
    ("fields", "code"),
    [({"target": "everything"}, "bad_target"), ({"waves": "25,50"}, "rollout_error")],
)
def test_bad_rollouts_are_400(client: TestClient, fields: dict[str, str], code: str) -> None:
    body = {"artifact_sha256": upload(client), **fields}
    response = client.post("/v1/rollouts", json=body, headers=AS_OPERATOR)
    assert response.status_code == 400
    assert error_of(response)["code"] == code


def test_forbidden_state_change_is_400(client: TestClient) -> None:
    rollout_id = create_rollout(client)
    response = client.post(f"/v1/rollouts/{rollout_id}/resume", headers=AS_OPERATOR)
    assert response.status_code == 400
    assert error_of(response) == {
        "code": "rollout_error",
        "message": f"rollout {rollout_id} is running; cannot resume",
    }


def test_second_run_is_400(client: TestClient) -> None:
    assert client.post("/v1/runs", json={}, headers=AS_OPERATOR).status_code == 202
    response = client.post("/v1/runs", json={}, headers=AS_OPERATOR)
    assert response.status_code == 400
    assert error_of(response)["code"] == "training_failed"


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (NotFoundError("x"), 404),
        (ConflictError("x"), 409),
        (ArtifactRejectedError("x"), 422),
        (RolloutError("x"), 400),
        (TargetError("x"), 400),
        (RunError("x"), 400),
        (CoordinatorError("x"), 400),
        (StoreError("x"), 500),
        (ArtifactCorruptError("x"), 500),
    ],
)
def test_status_for(error: CoordinatorError, status: int) -> None:
    assert status_for(error) == status


def test_conflict_is_409(client: TestClient, ops: FakeOperations) -> None:
    ops.fail = ConflictError("rollout ro-1 already exists")
    response = client.post("/v1/runs", json={}, headers=AS_OPERATOR)
    assert response.status_code == 409
    assert error_of(response) == {"code": "conflict", "message": "rollout ro-1 already exists"}


def test_store_error_is_a_generic_500_with_the_detail_logged(
    client: TestClient, ops: FakeOperations, caplog: pytest.LogCaptureFixture
) -> None:
    ops.fail = StoreError("disk I/O error in /var/lib/fedge/state.db")
    with caplog.at_level(logging.ERROR, logger="coordinator.service.api"):
        response = client.get("/v1/devices", headers=AS_VIEWER)
    assert response.status_code == 500
    assert error_of(response)["code"] == "internal_error"
    assert "/var/lib" not in response.text
    assert any("/var/lib/fedge/state.db" in r.getMessage() for r in caplog.records)


# --- metrics ------------------------------------------------------------------------


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_metrics_need_a_token(client: TestClient) -> None:
    response = client.get("/metrics")
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"].startswith("Bearer")


def test_metrics_expose_the_fleet(client: TestClient) -> None:
    create_rollout(client)
    response = client.get("/metrics", headers=AS_VIEWER)
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/plain")
    found = samples(response.text)
    assert found[("fedge_devices_online", ())] == 2
    assert found[("fedge_devices_total", ())] == 3
    assert found[("fedge_models", (("model", "digits"), ("version", "3")))] == 2
    assert found[("fedge_rollouts", (("state", "running"),))] == 1
    assert found[("fedge_rollout_stage", (("rollout", "ro-1"),))] == 0
    assert found[("fedge_rollout_devices", (("rollout", "ro-1"), ("state", "pending")))] == 3
    assert found[("fedge_round_accuracy", (("round", "1"), ("run", "run-0")))] == 0.8125
    assert ("fedge_round_accuracy", (("round", "2"), ("run", "run-0"))) not in found
    assert found[("fedge_round_uplink_bytes", (("round", "2"), ("run", "run-0")))] == 10
    assert found[("fedge_round_downlink_bytes", (("round", "1"), ("run", "run-0")))] == 5000
    assert found[("fedge_fleet_latency_ms", (("quantile", "0.95"),))] == 5.5
    assert found[("fedge_telemetry_ingested_total", ())] == 42
    assert found[("fedge_drift_psi", (("model", "digits"), ("version", "3")))] == 0.31
    major = (("model", "digits"), ("severity", "major"), ("version", "3"))
    assert found[("fedge_drift_devices", major)] == 1
    rejected = ("fedge_drift_summaries_rejected_total", (("reason", "wrong_features"),))
    assert found[rejected] == 2
    assert re.search(r"^# TYPE fedge_telemetry_ingested(_total)? counter$", response.text, re.M)
    assert not any(name.startswith(("python_", "process_")) for name, _ in found)


def test_metrics_speak_openmetrics_when_asked(client: TestClient) -> None:
    headers = {**AS_VIEWER, "Accept": "application/openmetrics-text; version=1.0.0"}
    response = client.get("/metrics", headers=headers)
    assert response.headers["Content-Type"].startswith("application/openmetrics-text")
    assert response.text.endswith("# EOF\n")


def test_two_apps_keep_their_own_metrics() -> None:
    small, large = FakeOperations(), FakeOperations.seeded()
    small.telemetry_ingested = 7
    with (
        TestClient(create_app(small, authenticate=authenticate, config=CONFIG)) as one,
        TestClient(create_app(large, authenticate=authenticate, config=CONFIG)) as two,
    ):
        first = samples(one.get("/metrics", headers=AS_VIEWER).text)
        second = samples(two.get("/metrics", headers=AS_VIEWER).text)
    assert first[("fedge_devices_total", ())] == 0
    assert first[("fedge_telemetry_ingested_total", ())] == 7
    assert second[("fedge_devices_total", ())] == 3


def test_metrics_errors_are_mapped(client: TestClient, ops: FakeOperations) -> None:
    ops.fail = StoreError("broken")
    assert client.get("/metrics", headers=AS_VIEWER).status_code == 500


# --- public routes and docs ---------------------------------------------------------


def test_health_is_public(client: TestClient) -> None:
    response = client.get("/v1/health")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


def test_docs_are_public_and_describe_the_api(client: TestClient) -> None:
    assert client.get("/docs").status_code == 200
    document = client.get("/openapi.json").json()
    schemas = document["components"]["schemas"]
    for name in ("DeviceOut", "ArtifactOut", "RolloutViewOut", "RunViewOut", "ErrorOut"):
        assert name in schemas
    assert document["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    devices = document["paths"]["/v1/devices"]["get"]
    assert devices["responses"]["200"]["content"]["application/json"]["schema"]["items"] == {
        "$ref": "#/components/schemas/DeviceOut"
    }
    assert devices["security"] == [{"bearer": []}]
    assert {"401", "429"} <= set(devices["responses"])  # the failed-authentication limit
    upload_body = document["paths"]["/v1/artifacts"]["post"]["requestBody"]
    assert "application/octet-stream" in upload_body["content"]
    assert "security" not in document["paths"]["/v1/health"]["get"]


def test_docs_can_be_turned_off(ops: FakeOperations) -> None:
    app = create_app(ops, authenticate=authenticate, config=ApiConfig(docs=False))
    with TestClient(app) as client:
        # No longer public: like any unknown path, 401 without a token, 404 with one.
        assert client.get("/docs").status_code == 401
        assert client.get("/docs", headers=AS_VIEWER).status_code == 404
        assert client.get("/openapi.json", headers=AS_VIEWER).status_code == 404
        assert client.get("/v1/health").status_code == 200


@pytest.mark.parametrize("field", ["max_body_bytes", "max_artifact_bytes"])
@pytest.mark.parametrize("value", [0, -1, True])
def test_config_limits_must_be_positive(field: str, value: int) -> None:
    changes: dict[str, Any] = {field: value}
    with pytest.raises(ValueError, match=field):
        ApiConfig(**changes)


# --- drift ------------------------------------------------------------------------------


def test_drift_lists_fleet_and_device_scores(client: TestClient) -> None:
    assert client.get("/v1/drift").status_code == 401
    response = client.get("/v1/drift", headers=AS_VIEWER)
    assert response.status_code == 200
    body = response.json()
    assert [(s["scope"], s["device_id"]) for s in body] == [
        ("fleet", None),
        ("device", "pi-1"),
        ("device", "pi-2"),
    ]
    assert body[0]["devices"] == ["pi-2", "pi-1"]
    assert body[2]["severity"] == "major"
    assert body[2]["top"][0] == {"index": 7, "psi": 0.6, "js": 0.12}
    assert body[2]["invalid"] == {"nan": 1}
    mine = client.get("/v1/drift", params={"device": "pi-2"}, headers=AS_VIEWER).json()
    assert [s["device_id"] for s in mine] == ["pi-2"]
    assert client.get("/v1/drift", params={"model": "other"}, headers=AS_VIEWER).json() == []


def test_drift_of_an_unknown_device_is_404(client: TestClient) -> None:
    response = client.get("/v1/drift", params={"device": "nobody"}, headers=AS_VIEWER)
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"
    assert client.get("/v1/drift", params={"device": ""}, headers=AS_VIEWER).status_code == 422


# --- schemas mirror the rows --------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "row"),
    [
        (DeviceOut, DeviceRow),
        (TelemetryOut, TelemetryRow),
        (ArtifactOut, ArtifactRow),
        (RolloutOut, RolloutInfo),
        (RolloutDeviceOut, RolloutDevice),
        (RolloutViewOut, RolloutView),
        (RunOut, RunRow),
        (RoundOut, RoundRow),
        (RunViewOut, RunView),
        (AuditOut, AuditRow),
        (RolloutCreate, RolloutRequest),
        (RunCreate, RunRequest),
        (DeviceProgressOut, DeviceProgress),
        (DeployResultOut, DeployResult),
        (DeploymentViewOut, DeploymentView),
        (DriftOut, DriftScore),
        (FeatureDriftOut, FeatureDrift),
        (DeployCreate, DeployRequest),
        (RollbackCreate, RollbackRequest),
    ],
)
def test_schemas_mirror_the_dataclasses(model: type[BaseModel], row: type[Any]) -> None:
    assert list(model.model_fields) == [f.name for f in dataclasses.fields(row)]


# --- a real server ------------------------------------------------------------------


def test_serves_over_real_http(app: FastAPI, ops: FakeOperations) -> None:
    with serve(app) as base, httpx.Client(base_url=base, timeout=10) as http:
        assert http.get("/v1/health").json() == {"status": "ok"}
        assert http.get("/v1/devices").status_code == 401
        devices = http.get("/v1/devices", headers=AS_VIEWER)
        assert devices.status_code == 200
        assert len(devices.json()) == 3
        uploaded = http.post(
            "/v1/artifacts", content=chunks(MAX_ARTIFACT), headers={**AS_OPERATOR, **OCTETS}
        )
        assert uploaded.status_code == 201
        too_large = http.post(
            "/v1/artifacts",
            content=chunks(MAX_ARTIFACT + 1, size=64),
            headers={**AS_OPERATOR, **OCTETS},
        )
        assert too_large.status_code == 413
    assert len(ops.artifact_rows) == 1
    assert [name for name, _ in ops.mutations] == ["artifact.upload"]
