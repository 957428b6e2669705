"""Tests for coordinator.service.api_client: the HTTP API's client is an ``Operations``.

The real app (:func:`coordinator.service.api.create_app` over
:class:`tests.api_support.FakeOperations`) runs in a real uvicorn on 127.0.0.1;
each call's result must equal what the fake holds, and each error answer must
come back as the error the in-process service raises. ``httpx.MockTransport``
stands in for the server only for answers the real app never gives (not JSON,
the wrong shape).
"""

from __future__ import annotations

import hashlib
import os
import pwd
import socket
from collections.abc import Iterator
from dataclasses import replace

import httpx
import pytest

from coordinator.delivery.tracker import DeviceState
from coordinator.errors import (
    ApiAuthError,
    ApiError,
    ApiUnavailableError,
    ArtifactRejectedError,
    ConflictError,
    CoordinatorError,
    NotFoundError,
    RolloutError,
    RunError,
    StoreError,
    StrategyError,
    TargetError,
)
from coordinator.service.api import ApiConfig, create_app
from coordinator.service.api_client import ApiClient
from coordinator.service.operations import (
    CLI_ACTOR,
    DeployRequest,
    Operations,
    RollbackRequest,
    RolloutRequest,
    RunRequest,
)
from coordinator.service.store.records import ArtifactRow, DeviceRow, PresenceRow, RunState
from coordinator.service.tokens import Role
from tests.api_support import (
    ARTIFACT_MAGIC,
    OPERATOR,
    OPERATOR_TOKEN,
    VIEWER_TOKEN,
    FakeOperations,
    authenticate,
    serve,
)

MAX_ARTIFACT = 4096
ARTIFACT = ARTIFACT_MAGIC + bytes(range(256)) * 4
SHA = hashlib.sha256(ARTIFACT).hexdigest()
WRONG_TOKEN = "fedge_not-a-token-this-api-knows"


@pytest.fixture
def ops() -> FakeOperations:
    return FakeOperations.seeded()


@pytest.fixture
def base_url(ops: FakeOperations) -> Iterator[str]:
    config = ApiConfig(max_body_bytes=2048, max_artifact_bytes=MAX_ARTIFACT)
    with serve(create_app(ops, authenticate=authenticate, config=config)) as url:
        yield url


@pytest.fixture
def client(base_url: str) -> Iterator[ApiClient]:
    with ApiClient(base_url, OPERATOR_TOKEN, timeout=10) as client:
        yield client


@pytest.fixture
def viewer(base_url: str) -> Iterator[ApiClient]:
    with ApiClient(base_url, VIEWER_TOKEN, timeout=10) as client:
        yield client


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def assert_no_token(exc: BaseException, *tokens: str) -> None:
    text = f"{exc} {exc!r}"
    for token in (OPERATOR_TOKEN, VIEWER_TOKEN, WRONG_TOKEN, *tokens):
        assert token not in text


# --- round trips ------------------------------------------------------------------------


def test_reads_equal_the_rows_the_service_holds(client: ApiClient, ops: FakeOperations) -> None:
    typed: Operations = client  # the client satisfies the Protocol (checked by mypy)
    devices = typed.devices()
    assert devices == ops.devices()
    assert all(isinstance(row, DeviceRow) for row in devices)
    assert devices[0].tags == ("lab", "pi4")  # a tuple again, not a list
    assert typed.telemetry("pi-1", limit=3) == ops.telemetry("pi-1", limit=3)
    assert len(typed.telemetry("pi-1")) == 5
    assert typed.presence("pi-1") == ops.presence("pi-1")
    assert typed.presence("pi-1", limit=1) == ops.presence("pi-1")[:1]
    assert all(isinstance(row, PresenceRow) for row in typed.presence("pi-1"))
    assert typed.artifacts() == []
    assert typed.rollouts() == []
    assert typed.runs() == []
    assert typed.audit_log() == []


def test_operator_workflow_round_trips(client: ApiClient, ops: FakeOperations) -> None:
    row = client.upload_artifact(ARTIFACT, actor=CLI_ACTOR)
    assert isinstance(row, ArtifactRow)
    assert row == ops.artifact_rows[SHA]
    assert row.uploaded_by == OPERATOR.name  # the token decides, not the actor argument
    assert client.upload_artifact(ARTIFACT, actor=CLI_ACTOR) == row  # idempotent
    assert client.artifacts() == ops.artifacts() == [row]

    request = RolloutRequest(
        SHA,
        target="tag:lab",
        canary="5%",
        waves="25,50,100",
        soak="5m",
        max_failure="10%",
        min_reports=2,
        rollback_on_halt=False,
    )
    view = client.create_rollout(request, actor=CLI_ACTOR)
    rollout_id = view.rollout.rollout_id
    assert ops.rollout_requests == [request]
    assert view == ops.rollout_views[rollout_id]
    assert [d.device_id for d in view.devices] == ["pi-1", "pi-2"]
    assert client.rollouts() == ops.rollouts()
    assert client.rollout(rollout_id) == ops.rollout_views[rollout_id]

    paused = client.pause_rollout(rollout_id, actor=CLI_ACTOR)
    assert paused.rollout.state == "paused"
    assert paused == ops.rollout_views[rollout_id]
    assert client.resume_rollout(rollout_id, actor=CLI_ACTOR).rollout.state == "running"
    aborted = client.abort_rollout(rollout_id, actor=CLI_ACTOR, rollback=True)
    assert aborted == ops.rollout_views[rollout_id]
    assert aborted.rollout.state == "aborted"
    assert ops.aborted == {rollout_id: True}

    run_request = RunRequest(
        rounds=3, strategy="fedprox", config={"features": 4, "train": {"lr": 0.1}}
    )
    run = client.start_run(run_request, actor=CLI_ACTOR)
    assert run == ops.run_views[run.run.run_id]
    assert run.run.state is RunState.RUNNING
    assert run.run.config["train"] == {"lr": 0.1}
    assert client.runs() == ops.runs()
    assert client.run(run.run.run_id) == ops.run_views[run.run.run_id]

    audit = client.audit_log(limit=100)
    assert audit == ops.audit_log()
    assert [entry.action for entry in audit] == [
        "artifact.upload",
        "artifact.upload",
        "rollout.create",
        "rollout.pause",
        "rollout.resume",
        "rollout.abort",
        "run.start",
    ]
    assert {entry.actor for entry in audit} == {OPERATOR.name}
    assert client.audit_log(limit=2) == ops.audit_log(limit=2)


def test_drift_round_trips(client: ApiClient, ops: FakeOperations) -> None:
    assert client.drift() == ops.drift()
    assert len(client.drift()) == 3
    assert client.drift(device_id="pi-2") == ops.drift(device_id="pi-2")
    assert client.drift(model="other") == []
    with pytest.raises(NotFoundError):
        client.drift(device_id="nobody")


def test_abort_without_rollback(client: ApiClient, ops: FakeOperations) -> None:
    client.upload_artifact(ARTIFACT, actor=CLI_ACTOR)
    rollout_id = client.create_rollout(RolloutRequest(SHA), actor=CLI_ACTOR).rollout.rollout_id
    client.abort_rollout(rollout_id, actor=CLI_ACTOR, rollback=False)
    assert ops.aborted == {rollout_id: False}


def test_stop_run_round_trips(client: ApiClient, ops: FakeOperations) -> None:
    run_id = client.start_run(RunRequest(), actor=CLI_ACTOR).run.run_id
    stopped = client.stop_run(run_id, actor=CLI_ACTOR)
    assert stopped == ops.run_views[run_id]
    assert stopped.run.state is RunState.INTERRUPTED
    assert client.run(run_id) == stopped
    last = client.audit_log(limit=1)[0]
    assert (last.action, last.target, last.actor) == ("run.stop", run_id, OPERATOR.name)


def test_deploy_and_rollback_round_trip(client: ApiClient, ops: FakeOperations) -> None:
    client.upload_artifact(ARTIFACT, actor=CLI_ACTOR)
    started = client.deploy(DeployRequest(SHA, target="tag:lab", timeout_s=9), actor=CLI_ACTOR)
    deployment_id = started.result.deployment_id
    assert started == ops.deployment_views[deployment_id]  # as it was when created
    assert not started.done
    done = client.deployment(deployment_id)
    assert done == ops.deployment_views[deployment_id]
    assert done.done
    assert done.result.succeeded
    assert {p.state for p in done.result.devices} == {DeviceState.INSTALLED}
    rolled = client.rollback(RollbackRequest("digits", target="device:pi-1"), actor=CLI_ACTOR)
    assert client.deployment(rolled.result.deployment_id).result.devices[0].state == (
        DeviceState.ROLLED_BACK
    )
    assert ops.deployment_requests == [
        DeployRequest(SHA, target="tag:lab", timeout_s=9),
        RollbackRequest("digits", target="device:pi-1"),
    ]
    with pytest.raises(NotFoundError, match="no deployment 'dep-9'"):
        client.deployment("dep-9")
    with pytest.raises(TargetError):
        client.rollback(RollbackRequest("digits", target="tag:none"), actor=CLI_ACTOR)


def test_metrics_are_not_available(client: ApiClient) -> None:
    with pytest.raises(ApiError, match="Prometheus"):
        client.metrics()


# --- errors -------------------------------------------------------------------------------


def test_unknown_token_is_an_auth_error(base_url: str) -> None:
    for token in (WRONG_TOKEN, "not-even-a-fedge-token"):
        with ApiClient(base_url, token) as client, pytest.raises(ApiAuthError) as caught:
            client.devices()
        assert caught.value.status == 401
        assert "FEDGE_TOKEN" in str(caught.value)
        assert "--token" in str(caught.value)
        assert_no_token(caught.value, token)


def test_viewer_may_read_but_not_write(viewer: ApiClient, ops: FakeOperations) -> None:
    assert viewer.devices() == ops.devices()
    with pytest.raises(ApiAuthError) as caught:
        viewer.create_rollout(RolloutRequest(SHA), actor=CLI_ACTOR)
    assert caught.value.status == 403
    assert "may not create rollouts" in str(caught.value)
    assert "operator" in str(caught.value)
    with pytest.raises(ApiAuthError, match="may not upload artifacts"):
        viewer.upload_artifact(ARTIFACT, actor=CLI_ACTOR)
    with pytest.raises(ApiAuthError, match="may not stop runs"):
        viewer.stop_run("run-1", actor=CLI_ACTOR)
    with pytest.raises(ApiAuthError, match="may not deploy"):
        viewer.deploy(DeployRequest(SHA), actor=CLI_ACTOR)
    with pytest.raises(ApiAuthError, match="may not roll back"):
        viewer.rollback(RollbackRequest("digits"), actor=CLI_ACTOR)
    assert_no_token(caught.value)
    assert ops.mutations == []


def test_unknown_ids_are_not_found(client: ApiClient) -> None:
    with pytest.raises(NotFoundError, match="no rollout 'ro-9'"):
        client.rollout("ro-9")
    with pytest.raises(NotFoundError, match="no device 'ghost'"):
        client.telemetry("ghost")
    with pytest.raises(NotFoundError, match="no run"):
        client.run("run-9")
    with pytest.raises(NotFoundError):
        client.pause_rollout("ro-9", actor=CLI_ACTOR)
    with pytest.raises(NotFoundError, match="no run 'run-9'"):
        client.stop_run("run-9", actor=CLI_ACTOR)
    with pytest.raises(NotFoundError, match="no artifact"):
        client.create_rollout(RolloutRequest("ab" * 32), actor=CLI_ACTOR)


def test_ids_cannot_escape_their_path_segment(client: ApiClient, ops: FakeOperations) -> None:
    with pytest.raises(NotFoundError):
        client.rollout("../devices")
    with pytest.raises(NotFoundError):
        client.telemetry("pi-1/../../../devices")
    assert ops.rollout_reads == {}


def test_rejected_upload_is_artifact_rejected(client: ApiClient, ops: FakeOperations) -> None:
    with pytest.raises(ArtifactRejectedError, match="bad magic"):
        client.upload_artifact(b"not an artifact", actor=CLI_ACTOR)
    assert ops.artifact_rows == {}


def test_operation_errors_come_back_typed(client: ApiClient, ops: FakeOperations) -> None:
    client.upload_artifact(ARTIFACT, actor=CLI_ACTOR)
    with pytest.raises(TargetError, match="bad target"):
        client.create_rollout(RolloutRequest(SHA, target="bogus"), actor=CLI_ACTOR)
    with pytest.raises(RolloutError, match="waves must end at 100"):
        client.create_rollout(RolloutRequest(SHA, waves="50"), actor=CLI_ACTOR)
    rollout_id = client.create_rollout(RolloutRequest(SHA), actor=CLI_ACTOR).rollout.rollout_id
    with pytest.raises(RolloutError, match="cannot resume"):
        client.resume_rollout(rollout_id, actor=CLI_ACTOR)
    with pytest.raises(RunError, match="at least 1"):
        client.start_run(RunRequest(rounds=0), actor=CLI_ACTOR)
    run_id = client.start_run(RunRequest(), actor=CLI_ACTOR).run.run_id
    with pytest.raises(RunError, match="already going"):
        client.start_run(RunRequest(), actor=CLI_ACTOR)
    client.stop_run(run_id, actor=CLI_ACTOR)
    with pytest.raises(RunError, match=f"run {run_id} is interrupted; cannot stop"):
        client.stop_run(run_id, actor=CLI_ACTOR)


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (StrategyError("no strategy 'fedfoo'"), StrategyError),
        (ConflictError("rollout ro-1 exists"), ConflictError),
        (NotFoundError("gone"), NotFoundError),
    ],
)
def test_error_classes_survive_the_wire(
    client: ApiClient, ops: FakeOperations, error: CoordinatorError, expected: type[Exception]
) -> None:
    ops.fail = error
    with pytest.raises(expected) as caught:
        client.runs()
    assert type(caught.value) is expected
    assert str(caught.value) == str(error)


def test_server_failure_is_a_generic_api_error(client: ApiClient, ops: FakeOperations) -> None:
    ops.fail = StoreError("disk on fire at /var/lib/secret")
    with pytest.raises(ApiError) as caught:
        client.devices()
    assert type(caught.value) is ApiError
    assert caught.value.status == 500
    assert caught.value.code == "internal_error"
    assert "internal error" in str(caught.value)
    assert "disk on fire" not in str(caught.value)


def test_invalid_request_is_an_api_error(client: ApiClient) -> None:
    with pytest.raises(ApiError) as caught:
        client.telemetry("pi-1", limit=0)
    assert type(caught.value) is ApiError
    assert caught.value.status == 422
    assert caught.value.code == "invalid_request"
    assert "limit" in str(caught.value)


def test_too_large_upload_is_an_api_error(client: ApiClient, ops: FakeOperations) -> None:
    with pytest.raises(ApiError) as caught:
        client.upload_artifact(ARTIFACT_MAGIC + bytes(MAX_ARTIFACT), actor=CLI_ACTOR)
    assert caught.value.status == 413
    assert str(MAX_ARTIFACT) in str(caught.value)
    assert ops.artifact_rows == {}


def test_server_down_is_unavailable_with_the_url() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    with (
        ApiClient(url, OPERATOR_TOKEN, timeout=5) as client,
        pytest.raises(ApiUnavailableError) as caught,
    ):
        client.devices()
    message = str(caught.value)
    assert url in message
    assert "\n" not in message
    assert caught.value.status is None
    assert_no_token(caught.value)


def test_silent_server_is_a_timeout_naming_the_url() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(1)  # accepts connections (the backlog) but never answers
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        with (
            ApiClient(url, OPERATOR_TOKEN, timeout=0.3) as client,
            pytest.raises(ApiUnavailableError, match="did not answer") as caught,
        ):
            client.rollouts()
    assert url in str(caught.value)
    assert_no_token(caught.value)


def test_construction_checks_url_and_token() -> None:
    with pytest.raises(ApiError, match="http"):
        ApiClient("ftp://127.0.0.1:21", OPERATOR_TOKEN)
    with pytest.raises(ApiError, match="http"):
        ApiClient("127.0.0.1:8443", OPERATOR_TOKEN)
    with pytest.raises(ApiError, match="FEDGE_TOKEN"):
        ApiClient("http://127.0.0.1:1", "")
    bad = "fedge_has a space\r\nX-Injected: 1"
    with pytest.raises(ApiError) as caught:
        ApiClient("http://127.0.0.1:1", bad)
    assert_no_token(caught.value, bad, "fedge_has")


def test_repr_and_url_hide_secrets() -> None:
    with ApiClient("http://admin:hunter2@127.0.0.1:1/base/", OPERATOR_TOKEN) as client:
        assert client.url == "http://127.0.0.1:1/base"
        assert "hunter2" not in repr(client)
        assert OPERATOR_TOKEN not in repr(client)


def test_sends_the_bearer_token_and_keeps_a_path_prefix() -> None:
    seen: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json=[])

    transport = httpx.MockTransport(answer)
    with ApiClient("https://fleet.example/fedge/", OPERATOR_TOKEN, transport=transport) as client:
        assert client.devices() == []
        assert client.audit_log(limit=7) == []
    assert [str(r.url) for r in seen] == [
        "https://fleet.example/fedge/v1/devices",
        "https://fleet.example/fedge/v1/audit?limit=7",
    ]
    assert seen[0].headers["authorization"] == f"Bearer {OPERATOR_TOKEN}"


def test_answers_that_are_not_the_api_are_api_errors() -> None:
    def answer(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("devices"):
            return httpx.Response(200, text="<html>a proxy's page</html>")
        if request.url.path.endswith("runs"):
            return httpx.Response(502, text="bad gateway")
        return httpx.Response(200, json=[{"rollout_id": 5}])

    transport = httpx.MockTransport(answer)
    with ApiClient("http://proxy.example", OPERATOR_TOKEN, transport=transport) as client:
        with pytest.raises(ApiError, match="without JSON"):
            client.devices()
        with pytest.raises(ApiError, match="unexpected answer") as shape:
            client.rollouts()
        with pytest.raises(ApiError, match="502") as gateway:
            client.runs()
    assert type(shape.value) is ApiError
    assert gateway.value.status == 502


def test_rows_compare_equal_after_replace(client: ApiClient, ops: FakeOperations) -> None:
    """A changed row on the service is seen as changed through the client."""
    ops.device_rows["pi-1"] = replace(ops.device_rows["pi-1"], online=False, tags=("moved",))
    row = client.devices()[0]
    assert row == ops.device_rows["pi-1"]
    assert row.tags == ("moved",)


def test_a_local_operator_is_named_by_their_login() -> None:
    assert CLI_ACTOR.name == f"cli:{pwd.getpwuid(os.geteuid()).pw_name}"
    assert CLI_ACTOR.role is Role.OPERATOR
