"""The operator's fleet commands (``fedge devices``, ``artifacts``, ``rollout``,
``deploy``, ``rollback``, ``rounds``, ``telemetry``, ``audit``) against a real API.

The API (:func:`coordinator.service.api.create_app` over
:class:`tests.api_support.FakeOperations`) runs in a real uvicorn on 127.0.0.1;
the commands run through Typer's ``CliRunner`` with ``--api`` pointed at it. The
in-process ``--broker`` mode is checked here for its wiring (``local_service`` is
replaced by the fake); ``tests/test_cli_broker_mode.py`` runs it against a real
mosquitto and real agents.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any
from unittest.mock import ANY

import pytest
from click.testing import Result
from typer.testing import CliRunner

import coordinator.service.local
from coordinator.cli import rollout as rollout_cli
from coordinator.cli import rounds as rounds_cli
from coordinator.cli.app import app
from coordinator.cli.device_views import device_json
from coordinator.cli.service_views import to_json
from coordinator.delivery.tracker import DeviceState
from coordinator.service.api import ApiConfig, create_app
from coordinator.service.operations import (
    CLI_ACTOR,
    DeployRequest,
    RollbackRequest,
    RolloutRequest,
)
from coordinator.service.store.records import RunState
from edge_agent.config.agent import BrokerConfig
from tests.api_support import (
    ARTIFACT_MAGIC,
    OPERATOR,
    OPERATOR_TOKEN,
    VIEWER_TOKEN,
    FakeOperations,
    authenticate,
    serve,
)

ARTIFACT = ARTIFACT_MAGIC + bytes(range(256)) * 4
SHA = hashlib.sha256(ARTIFACT).hexdigest()
WRONG_TOKEN = "fedge_not-a-token-this-api-knows"

pytestmark = pytest.mark.usefixtures("clean_fedge_env")

runner = CliRunner(mix_stderr=False)


@pytest.fixture
def ops() -> FakeOperations:
    return FakeOperations.seeded()


@pytest.fixture
def api(ops: FakeOperations) -> Iterator[str]:
    with serve(create_app(ops, authenticate=authenticate, config=ApiConfig())) as url:
        yield url


@pytest.fixture
def artifact_file(tmp_path: Path) -> Path:
    path = tmp_path / "digits.fedge"
    path.write_bytes(ARTIFACT)
    return path


def run(*args: str | Path, env: dict[str, str] | None = None) -> Result:
    return runner.invoke(app, [str(a) for a in args], env=env, catch_exceptions=False)


class Fedge:
    """Runs ``fedge`` commands against the test API with an operator token."""

    def __init__(self, url: str, token: str = OPERATOR_TOKEN) -> None:
        self.url = url
        self.token = token

    def __call__(self, *args: str | Path) -> Result:
        return run(*args, "--api", self.url, "--token", self.token)

    def json(self, *args: str | Path) -> Any:
        result = self(*args, "--json")
        assert result.exit_code == 0, result.stdout + result.stderr
        return json.loads(result.stdout)


@pytest.fixture
def fedge(api: str) -> Fedge:
    return Fedge(api)


@pytest.fixture
def local_calls(monkeypatch: pytest.MonkeyPatch, ops: FakeOperations) -> list[dict[str, Any]]:
    """``--broker`` mode on ``ops``: what each command passed to ``local_service``."""
    calls: list[dict[str, Any]] = []

    @contextmanager
    def local_service(broker: BrokerConfig, **kwargs: Any) -> Iterator[FakeOperations]:
        calls.append({"broker": broker, **kwargs})
        yield ops

    monkeypatch.setattr(coordinator.service.local, "local_service", local_service)
    return calls


def jsonable(value: Any) -> Any:
    return json.loads(json.dumps(to_json(value)))


def listed(ops: FakeOperations) -> Any:
    """What ``fedge devices --json`` prints for the fake's devices (ages vary)."""
    return {"devices": [{**device_json(row, 0.0), "last_seen_age_s": ANY} for row in ops.devices()]}


def one_line_error(result: Result) -> str:
    assert result.exit_code == 1, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert "Traceback" not in result.stderr
    return lines[0]


def create_rollout(fedge: Fedge, artifact: str | Path, *args: str) -> str:
    result = fedge("rollout", "create", artifact, *args)
    assert result.exit_code == 0, result.stdout + result.stderr
    return result.stdout.strip()


# --- reads ------------------------------------------------------------------------------


def test_devices_table_and_json(fedge: Fedge, ops: FakeOperations) -> None:
    result = fedge("devices")
    assert result.exit_code == 0, result.stderr
    assert "3 devices" in result.stdout
    for device_id in ("pi-1", "pi-2", "pi-3"):
        assert device_id in result.stdout
    assert "digits v3" in result.stdout
    assert "offline" in result.stdout
    assert fedge.json("devices") == listed(ops)
    # The name the command had before it went through Operations is a hidden alias.
    assert fedge.json("fleet") == listed(ops)


def test_telemetry(fedge: Fedge, ops: FakeOperations) -> None:
    assert fedge.json("telemetry", "pi-1", "--limit", "2") == jsonable(
        ops.telemetry("pi-1", limit=2)
    )
    result = fedge("telemetry", "pi-1")
    assert result.exit_code == 0, result.stderr
    assert "pi-1: 5 windows" in result.stdout
    assert "digits v3" in result.stdout
    line = one_line_error(fedge("telemetry", "ghost"))
    assert "no device 'ghost'" in line


def test_presence(fedge: Fedge, ops: FakeOperations) -> None:
    assert fedge.json("presence", "pi-1", "--limit", "2") == jsonable(ops.presence("pi-1", limit=2))
    result = fedge("presence", "pi-1")
    assert result.exit_code == 0, result.stderr
    assert "pi-1: 3 changes" in result.stdout
    assert "online" in result.stdout
    assert "offline" in result.stdout
    assert "1m" in result.stdout  # offline for the minute between two changes
    line = one_line_error(fedge("presence", "ghost"))
    assert "no device 'ghost'" in line


def test_audit(fedge: Fedge, ops: FakeOperations, artifact_file: Path) -> None:
    assert fedge.json("audit") == []
    assert fedge("artifacts", "upload", artifact_file).exit_code == 0
    entries = fedge.json("audit", "--limit", "5")
    assert entries == jsonable(ops.audit_log())
    assert [(e["action"], e["actor"], e["role"]) for e in entries] == [
        ("artifact.upload", OPERATOR.name, "operator")
    ]
    result = fedge("audit")
    assert result.exit_code == 0
    assert "artifact.upload" in result.stdout
    assert "1 action" in result.stdout


def test_drift(fedge: Fedge, ops: FakeOperations) -> None:
    assert fedge.json("drift") == jsonable(ops.drift())
    assert fedge.json("drift", "--device", "pi-2") == jsonable(ops.drift(device_id="pi-2"))
    assert fedge.json("drift", "--model", "other") == []
    result = fedge("drift")
    assert result.exit_code == 0, result.stderr
    assert "3 scores" in result.stdout
    assert "fleet (pi-2, pi-1)" in result.stdout
    assert "major" in result.stdout
    assert "f7=0.60" in result.stdout
    assert "nan=1" in result.stdout
    line = one_line_error(fedge("drift", "--device", "ghost"))
    assert "no device 'ghost'" in line


# --- artifacts ------------------------------------------------------------------------------


def test_artifacts_upload_and_list(fedge: Fedge, ops: FakeOperations, artifact_file: Path) -> None:
    result = fedge("artifacts", "upload", artifact_file)
    assert result.exit_code == 0, result.stderr
    assert result.stdout.strip() == SHA
    assert "uploaded digits v3" in result.stderr
    assert list(ops.artifact_rows) == [SHA]
    assert fedge.json("artifacts", "upload", artifact_file) == jsonable(ops.artifact_rows[SHA])

    listed = fedge("artifacts", "list")
    assert listed.exit_code == 0
    assert SHA[:12] in listed.stdout
    assert "1 artifact" in listed.stdout
    assert fedge.json("artifacts", "list") == jsonable(ops.artifacts())


def test_rejected_upload_is_one_line(fedge: Fedge, ops: FakeOperations, tmp_path: Path) -> None:
    bad = tmp_path / "bad.fedge"
    bad.write_bytes(b"not an artifact")
    line = one_line_error(fedge("artifacts", "upload", bad))
    assert "bad magic" in line
    assert ops.artifact_rows == {}


# --- rollouts -------------------------------------------------------------------------------


def test_rollout_create_from_a_file_uploads_it_first(
    fedge: Fedge, ops: FakeOperations, artifact_file: Path
) -> None:
    rollout_id = create_rollout(
        fedge,
        artifact_file,
        "--to", "tag:lab",
        "--canary", "5%",
        "--waves", "25,50,100",
        "--soak", "90s",
        "--max-failure", "10%",
        "--min-reports", "2",
        "--min-failed-devices", "3",
        "--no-rollback-on-halt",
        "--install-timeout", "2m",
        "--max-error-increase", "1%",
        "--max-p95-ratio", "2.5",
        "--require-health",
    )  # fmt: skip
    assert rollout_id == "ro-1"
    assert list(ops.artifact_rows) == [SHA]
    assert ops.rollout_requests == [
        RolloutRequest(
            artifact_sha256=SHA,
            target="tag:lab",
            canary="5%",
            waves="25,50,100",
            soak="90s",
            max_failure="10%",
            min_reports=2,
            rollback_on_halt=False,
            install_timeout="2m",
            max_error_increase="1%",
            max_p95_ratio=2.5,
            require_health=True,
            min_failed_devices=3,
        )
    ]
    result = fedge("rollout", "create", SHA, "--max-p95-ratio", "0.5")
    assert result.exit_code == 2  # refused by the option's range before any call
    assert len(ops.rollout_requests) == 1


def test_rollout_create_from_a_sha(fedge: Fedge, ops: FakeOperations, artifact_file: Path) -> None:
    assert fedge("artifacts", "upload", artifact_file).exit_code == 0
    assert create_rollout(fedge, SHA.upper(), "--to", "device:pi-2") == "ro-1"
    assert ops.rollout_requests == [RolloutRequest(SHA, target="device:pi-2")]
    assert [m for m, _ in ops.mutations] == ["artifact.upload", "rollout.create"]
    view = fedge.json("rollout", "create", SHA)
    assert view == jsonable(ops.rollout_views["ro-2"])


def test_rollout_create_refuses_what_is_neither(fedge: Fedge, ops: FakeOperations) -> None:
    result = fedge("rollout", "create", "no-such-file.fedge")
    assert result.exit_code == 2
    assert "ARTIFACT" in result.stderr
    assert ops.mutations == []


def test_rollout_create_errors_are_one_line(fedge: Fedge, artifact_file: Path) -> None:
    assert fedge("artifacts", "upload", artifact_file).exit_code == 0
    line = one_line_error(fedge("rollout", "create", SHA, "--to", "nowhere"))
    assert "bad target" in line
    line = one_line_error(fedge("rollout", "create", "ab" * 32))
    assert "no artifact" in line


def test_rollout_status_and_list(fedge: Fedge, ops: FakeOperations, artifact_file: Path) -> None:
    rollout_id = create_rollout(fedge, artifact_file)
    status = fedge("rollout", "status", rollout_id)
    assert status.exit_code == 0, status.stderr
    for text in ("ro-1", "running", SHA, "pi-1", "pi-3", "pending", "3 devices"):
        assert text in status.stdout
    assert fedge.json("rollout", "status", rollout_id) == jsonable(ops.rollout_views[rollout_id])

    listed = fedge("rollout", "list")
    assert listed.exit_code == 0
    assert "ro-1" in listed.stdout
    assert "1 rollout" in listed.stdout
    assert fedge.json("rollout", "list") == jsonable(ops.rollouts())
    assert "no rollout 'ro-9'" in one_line_error(fedge("rollout", "status", "ro-9"))


def test_pause_resume_abort(fedge: Fedge, ops: FakeOperations, artifact_file: Path) -> None:
    rollout_id = create_rollout(fedge, artifact_file)
    paused = fedge("rollout", "pause", rollout_id)
    assert paused.exit_code == 0, paused.stderr
    assert "rollout ro-1 is paused" in paused.stdout
    assert ops.rollout_views[rollout_id].rollout.state == "paused"
    assert "cannot pause" in one_line_error(fedge("rollout", "pause", rollout_id))

    resumed = fedge.json("rollout", "resume", rollout_id)
    assert resumed["rollout"]["state"] == "running"

    aborted = fedge("rollout", "abort", rollout_id, "--rollback")
    assert aborted.exit_code == 0, aborted.stderr
    assert "aborted" in aborted.stdout
    assert ops.aborted == {rollout_id: True}
    assert [m for m, _ in ops.mutations][-3:] == [
        "rollout.pause",
        "rollout.resume",
        "rollout.abort",
    ]


def test_abort_defaults_to_no_rollback(
    fedge: Fedge, ops: FakeOperations, artifact_file: Path
) -> None:
    rollout_id = create_rollout(fedge, artifact_file)
    assert fedge("rollout", "abort", rollout_id).exit_code == 0
    assert ops.aborted == {rollout_id: False}


def test_status_watch_ends_with_zero_when_completed(
    fedge: Fedge, ops: FakeOperations, artifact_file: Path
) -> None:
    rollout_id = create_rollout(fedge, artifact_file)
    ops.rollout_script[rollout_id] = ["running", "running", "completed"]
    result = fedge("rollout", "status", rollout_id, "--watch", "--interval", "0.1")
    assert result.exit_code == 0, result.stdout + result.stderr
    assert result.stdout.strip().endswith("rollout ro-1: completed")
    assert "devices per state" in result.stderr  # the live view
    assert ops.rollout_reads[rollout_id] == 3
    assert ops.rollout_script[rollout_id] == []


def test_create_watch_ends_with_one_when_halted(
    fedge: Fedge, ops: FakeOperations, artifact_file: Path
) -> None:
    ops.rollout_script["ro-1"] = ["running", "halted"]
    result = fedge("rollout", "create", artifact_file, "--watch", "--interval", "0.1")
    assert result.exit_code == 1, result.stdout + result.stderr
    assert result.stdout.splitlines()[0] == "ro-1"
    assert result.stdout.strip().endswith("rollout ro-1: halted")
    assert ops.rollout_reads["ro-1"] == 2


def test_watch_with_json_prints_the_final_view(
    fedge: Fedge, ops: FakeOperations, artifact_file: Path
) -> None:
    rollout_id = create_rollout(fedge, artifact_file)
    ops.rollout_script[rollout_id] = ["completed"]
    view = fedge.json("rollout", "status", rollout_id, "--watch")
    assert view["rollout"]["state"] == "completed"
    assert view == jsonable(ops.rollout_views[rollout_id])


def test_ctrl_c_stops_watching_with_130(
    fedge: Fedge, ops: FakeOperations, artifact_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rollout_id = create_rollout(fedge, artifact_file)

    def interrupted(seconds: float) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(rollout_cli, "_sleep", interrupted)
    result = fedge("rollout", "status", rollout_id, "--watch")
    assert result.exit_code == 130, result.stdout + result.stderr
    assert "stopped watching; rollout ro-1 continues on the coordinator service" in result.stderr
    assert "Traceback" not in result.stderr
    assert ops.rollout_views[rollout_id].rollout.state == "running"


# --- federated runs -----------------------------------------------------------------------


def test_rounds_start_status_list(fedge: Fedge, ops: FakeOperations) -> None:
    result = fedge(
        "rounds", "start",
        "--rounds", "3",
        "--strategy", "fedprox",
        "--codec", "int8",
        "--min-clients", "4",
        "--round-timeout", "30",
        "--model", "digits",
        "--family", "mlp",
        "--features", "64",
        "--classes", "10",
        "--hidden", "32",
        "--hidden", "16",
        "--clients-per-round", "5",
        "--seed", "7",
        "--strategy-arg", "proximal_mu=0.1",
        "--train-arg", "epochs=2",
        "--train-arg", "lr=0.05",
        "--train-arg", "optimizer=adam",
    )  # fmt: skip
    assert result.exit_code == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "run-1"
    assert ops.run_views["run-1"].run.config == {
        "rounds": 3,
        "strategy": "fedprox",
        "codec": "int8",
        "min_clients": 4,
        "round_timeout_s": 30.0,
        "model": "digits",
        "family": "mlp",
        "features": 64,
        "classes": 10,
        "hidden": [32, 16],
        "clients_per_round": 5,
        "seed": 7,
        "strategy_args": {"proximal_mu": 0.1},
        "train": {"epochs": 2, "lr": 0.05, "optimizer": "adam"},
    }

    latest = fedge("rounds", "status")
    assert latest.exit_code == 0, latest.stderr
    for text in ("run-1", "running", "0/3", "fedprox", "int8"):
        assert text in latest.stdout
    assert fedge.json("rounds", "status", "run-1") == jsonable(ops.run_views["run-1"])
    listed = fedge("rounds", "list")
    assert listed.exit_code == 0
    assert "run-1" in listed.stdout
    assert fedge.json("rounds", "list") == jsonable(ops.runs())
    assert "already going" in one_line_error(fedge("rounds", "start"))


def test_rounds_start_leaves_out_what_was_not_given(fedge: Fedge, ops: FakeOperations) -> None:
    view = fedge.json("rounds", "start")
    assert view["run"]["config"] == {
        "rounds": 10,
        "strategy": "fedavg",
        "codec": "fp32",
        "min_clients": 2,
        "round_timeout_s": 60.0,
    }
    assert view == jsonable(ops.run_views["run-1"])


def test_rounds_start_takes_the_options_of_fedge_train(fedge: Fedge, ops: FakeOperations) -> None:
    result = fedge(
        "rounds", "start", "--hidden", "128,64", "--epochs", "3", "--lr", "0.1",
        "--batch-size", "16", "--optimizer", "adam", "--train-arg", "weight-decay=0.01",
    )  # fmt: skip
    assert result.exit_code == 0, result.stdout + result.stderr
    config = ops.run_views["run-1"].run.config
    assert config["hidden"] == [128, 64]
    assert config["train"] == {
        "epochs": 3, "lr": 0.1, "batch_size": 16, "optimizer": "adam", "weight_decay": 0.01,
    }  # fmt: skip


def test_rounds_start_takes_the_aggregation_options(fedge: Fedge, ops: FakeOperations) -> None:
    result = fedge("rounds", "start", "--robust", "--max-examples-per-update", "500",
                   "--norm-multiple", "4")  # fmt: skip
    assert result.exit_code == 0, result.stdout + result.stderr
    config = ops.run_views["run-1"].run.config
    assert (config["robust"], config["max_examples_per_update"], config["norm_multiple"]) == (
        True, 500, 4.0,
    )  # fmt: skip
    refused = fedge("rounds", "start", "--norm-multiple", "0.5")
    assert refused.exit_code == 2


def test_rounds_start_of_a_pytorch_model(fedge: Fedge, ops: FakeOperations) -> None:
    result = fedge(
        "rounds", "start", "--model", "zoo:small_cnn", "--task", "classification",
        "--input-shape", "1, 8,8", "--outputs", "10", "--epochs", "2",
    )  # fmt: skip
    assert result.exit_code == 0, result.stdout + result.stderr
    config = ops.run_views["run-1"].run.config
    assert {
        key: config[key] for key in ("model", "model_spec", "task", "input_shape", "num_outputs")
    } == {
        "model": "small-cnn",
        "model_spec": "zoo:small_cnn",
        "task": "classification",
        "input_shape": [1, 8, 8],
        "num_outputs": 10,
    }
    assert "family" not in config


def test_rounds_start_names_a_pytorch_model_with_name(fedge: Fedge, ops: FakeOperations) -> None:
    result = fedge("rounds", "start", "--model", "mypkg.models:reg", "--name", "power",
                   "--task", "regression")  # fmt: skip
    assert result.exit_code == 0, result.stdout + result.stderr
    config = ops.run_views["run-1"].run.config
    assert (config["model"], config["model_spec"], config["task"]) == (
        "power", "mypkg.models:reg", "regression",
    )  # fmt: skip


@pytest.mark.parametrize(
    ("args", "option", "message"),
    [
        (["--model", "zoo:resnet"], "--model", "the zoo has no model 'resnet'"),
        (["--model", "a b:c"], "--model", "must be module.path:function"),
        (["--model", "zoo:small_cnn", "--family", "mlp"], "--family", "is a PyTorch model"),
        (["--model", "digits", "--task", "regression"], "--model", "need(s) a PyTorch model"),
        (["--model", "digits", "--input-shape", "4"], "--model", "--input-shape need(s)"),
        (["--model", "digits", "--name", "x"], "--model", "--name need(s)"),
        (["--model", "zoo:small_cnn", "--input-shape", "1,0"], "--input-shape", "positive"),
        (["--model", "zoo:small_cnn", "--input-shape", "1x8"], "--input-shape", "positive"),
        (["--model", "zoo:small_cnn", "--task", "ranking"], "--task", "ranking"),
    ],
)
def test_rounds_start_refuses_bad_model_options(
    fedge: Fedge, ops: FakeOperations, args: list[str], option: str, message: str
) -> None:
    result = fedge("rounds", "start", *args)
    assert result.exit_code == 2, result.stdout + result.stderr
    assert option in result.stderr
    assert message in " ".join(result.stderr.replace("│", " ").split())
    assert ops.mutations == []


def test_rounds_start_refuses_a_bad_train_arg(fedge: Fedge, ops: FakeOperations) -> None:
    result = fedge("rounds", "start", "--train-arg", "epochs")
    assert result.exit_code == 2
    assert "--train-arg" in result.stderr
    assert ops.mutations == []


def test_rounds_status_without_runs(fedge: Fedge) -> None:
    assert "no federated run yet" in one_line_error(fedge("rounds", "status"))
    assert "no run 'run-9'" in one_line_error(fedge("rounds", "status", "run-9"))


def test_rounds_status_watch_of_a_finished_run(fedge: Fedge, ops: FakeOperations) -> None:
    assert fedge("rounds", "start").exit_code == 0
    view = ops.run_views["run-1"]
    ops.run_views["run-1"] = replace(view, run=replace(view.run, state=RunState.FINISHED))
    result = fedge("rounds", "status", "--watch")
    assert result.exit_code == 0, result.stdout + result.stderr
    assert "run run-1: finished" in result.stdout
    ops.run_views["run-1"] = replace(view, run=replace(view.run, state=RunState.FAILED))
    assert fedge("rounds", "status", "--watch").exit_code == 1


def test_rounds_stop(fedge: Fedge, ops: FakeOperations) -> None:
    assert fedge("rounds", "start").exit_code == 0
    result = fedge("rounds", "stop", "run-1")
    assert result.exit_code == 0, result.stdout + result.stderr
    assert result.stdout == "run run-1: interrupted\n"
    assert ops.run_views["run-1"].run.state is RunState.INTERRUPTED
    assert ops.mutations[-1] == ("run.stop", OPERATOR.name)
    assert "is interrupted; cannot stop" in one_line_error(fedge("rounds", "stop", "run-1"))
    assert "no run 'run-9'" in one_line_error(fedge("rounds", "stop", "run-9"))


def test_rounds_stop_json(fedge: Fedge, ops: FakeOperations) -> None:
    assert fedge("rounds", "start").exit_code == 0
    view = fedge.json("rounds", "stop", "run-1")
    assert view["run"]["state"] == "interrupted"
    assert view == jsonable(ops.run_views["run-1"])
    view = ops.run_views["run-1"]
    ops.run_views["run-1"] = replace(view, run=replace(view.run, state=RunState.FINISHED))
    result = fedge("rounds", "stop", "run-1", "--json")
    assert result.exit_code == 1
    assert json.loads(result.stdout)["error"] == {
        "code": "training_failed",
        "message": "run run-1 is finished; cannot stop",
    }


# --- connection options -------------------------------------------------------------------


def test_env_vars_name_the_api_and_token(api: str, ops: FakeOperations) -> None:
    result = run("devices", "--json", env={"FEDGE_API": api, "FEDGE_TOKEN": OPERATOR_TOKEN})
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout) == listed(ops)


def test_command_line_api_beats_an_exported_broker(api: str) -> None:
    result = run(
        "devices", "--api", api, env={"FEDGE_TOKEN": OPERATOR_TOKEN, "FEDGE_BROKER": "mqtt://x"}
    )
    assert result.exit_code == 0, result.stderr


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        ((), {}, "say where to run"),
        (("--api", "http://127.0.0.1:1", "--broker", "mqtt://127.0.0.1:1"), {}, "not both"),
        ((), {"FEDGE_API": "http://127.0.0.1:1", "FEDGE_BROKER": "mqtt://x"}, "not both"),
        (("--api", "http://127.0.0.1:1"), {}, "FEDGE_TOKEN"),
    ],
)
def test_connection_usage_errors(args: tuple[str, ...], env: dict[str, str], message: str) -> None:
    for command in (["devices"], ["rollout", "list"], ["rounds", "status"]):
        result = run(*command, *args, env=env)
        assert result.exit_code == 2, result.stdout + result.stderr
        assert message in result.stderr
        assert "Traceback" not in result.stderr


def test_wrong_token_is_one_line(api: str, ops: FakeOperations) -> None:
    line = one_line_error(Fedge(api, WRONG_TOKEN)("rollout", "list"))
    assert "the API refused the token: set FEDGE_TOKEN or pass --token" in line
    result = Fedge(api, WRONG_TOKEN)("devices", "--json")
    assert result.exit_code == 1
    assert json.loads(result.stdout)["error"]["code"] == "api_auth"
    for out in (line, result.stdout, result.stderr):
        assert WRONG_TOKEN not in out


def test_viewer_token_may_not_create(api: str, ops: FakeOperations, artifact_file: Path) -> None:
    viewer = Fedge(api, VIEWER_TOKEN)
    assert viewer("devices").exit_code == 0
    line = one_line_error(viewer("artifacts", "upload", artifact_file))
    assert "may not upload artifacts" in line
    assert ops.mutations == []


def test_unreachable_api_is_one_line_naming_it() -> None:
    url = "http://127.0.0.1:9"  # discard: nothing listens there
    line = one_line_error(Fedge(url)("devices"))
    assert url in line
    assert OPERATOR_TOKEN not in line


def test_help_does_not_show_the_token() -> None:
    secret = "fedge_secret-value-that-must-not-show"
    for command in (["devices"], ["rollout", "create"], ["rounds", "start"]):
        result = run(*command, "--help", env={"FEDGE_TOKEN": secret})
        assert result.exit_code == 0
        assert "FEDGE_TOKEN" in result.stdout
        assert secret not in result.stdout


def test_broker_mode_runs_the_same_commands_in_process(
    local_calls: list[dict[str, Any]], ops: FakeOperations, tmp_path: Path, artifact_file: Path
) -> None:
    calls = local_calls
    key = tmp_path / "signing.pub"
    key.write_text("key")
    password = tmp_path / "password"
    password.write_text("s3cret\n")
    result = run(
        "rollout", "create", artifact_file,
        "--broker", "mqtt://127.0.0.1:1883",
        "--db", tmp_path / "state.db",
        "--trust", key,
        "--threshold", "1",
        "--username", "coordinator",
        "--password-file", password,
        "--connect-timeout", "3",
    )  # fmt: skip
    assert result.exit_code == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "ro-1"
    [call] = calls
    assert call["db"] == tmp_path / "state.db"
    assert call["trust"] == (key,)
    assert call["threshold"] == 1
    assert call["timeout"] == 3.0
    broker = call["broker"]
    assert isinstance(broker, BrokerConfig)
    assert broker.username == "coordinator"
    assert broker.password == "s3cret"
    # In-process, the local operator is the actor.
    assert ops.mutations == [
        ("artifact.upload", CLI_ACTOR.name),
        ("rollout.create", CLI_ACTOR.name),
    ]

    result = run("devices", "--json", env={"FEDGE_BROKER": "mqtt://127.0.0.1:1883"})
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout) == listed(ops)
    # Without --db, devices runs on a temporary database, removed when it ends ...
    temporary = calls[-1]["db"]
    assert temporary != Path("fedge-coordinator.db")
    assert not temporary.parent.exists()
    # ... and the commands that start something keep theirs in the default one.
    result = run("rollout", "list", env={"FEDGE_BROKER": "mqtt://127.0.0.1:1883"})
    assert result.exit_code == 0, result.stderr
    assert calls[-1]["db"] == Path("fedge-coordinator.db")


@pytest.mark.usefixtures("local_calls")
def test_broker_mode_rounds_start_waits_for_the_run(
    ops: FakeOperations, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In-process, a run lasts only while the command runs: ``start`` watches it."""

    def finish_the_run(seconds: float) -> None:
        view = ops.run_views["run-1"]
        ops.run_views["run-1"] = replace(view, run=replace(view.run, state=RunState.FINISHED))

    monkeypatch.setattr(rounds_cli, "_sleep", finish_the_run)
    result = run("rounds", "start", "--broker", "mqtt://127.0.0.1:1883")
    assert result.exit_code == 0, result.stdout + result.stderr
    assert result.stdout.splitlines() == ["run-1", "run run-1: finished"]
    assert ops.mutations == [("run.start", CLI_ACTOR.name)]


# --- deploy and rollback ------------------------------------------------------------


def test_deploy_wait_json_is_the_delivery_result(
    fedge: Fedge, ops: FakeOperations, artifact_file: Path
) -> None:
    result = fedge("deploy", artifact_file, "--to", "tag:lab", "--wait", "--timeout", "9", "--json")
    assert result.exit_code == 0, result.stdout + result.stderr
    view = ops.deployment_views["dep-1"]
    assert json.loads(result.stdout) == jsonable(view.result.to_json())
    assert json.loads(result.stdout)["counts"]["installed"] == 2
    assert ops.deployment_requests == [DeployRequest(SHA, target="tag:lab", timeout_s=9.0)]
    assert ops.mutations == [
        ("artifact.upload", OPERATOR.name),
        ("deployment.create", OPERATOR.name),
    ]
    # An uploaded artifact is named by its sha256 too.
    result = fedge("deploy", SHA, "--wait", "--json")
    assert result.exit_code == 0, result.stderr  # pi-3 is offline: it does not count
    assert [d["state"] for d in json.loads(result.stdout)["devices"]] == [
        "installed", "installed", "offline"
    ]  # fmt: skip
    assert ops.deployment_requests[-1] == DeployRequest(SHA)


@pytest.mark.parametrize(
    ("outcome", "wait", "status"),
    [
        (DeviceState.INSTALLED, True, 0),
        (DeviceState.REJECTED, True, 1),
        (DeviceState.INSTALLED, False, 0),
        (DeviceState.FAILED, False, 1),
    ],
)
def test_deploy_exit_status(
    fedge: Fedge,
    ops: FakeOperations,
    artifact_file: Path,
    outcome: DeviceState,
    wait: bool,
    status: int,
) -> None:
    ops.deployment_outcome = outcome
    result = fedge("deploy", artifact_file, "--to", "tag:lab", *(["--wait"] if wait else []))
    assert result.exit_code == status, result.stdout + result.stderr
    table = result.stderr if wait else result.stdout  # the live view's last frame, or the table
    assert "digits v3 -> tag:lab" in table
    assert all(f"pi-{n}" in table and str(outcome) in table for n in (1, 2))
    assert ("not installed everywhere" in result.stderr) == (wait and status == 1)


def test_deploy_refuses_what_is_neither_a_file_nor_a_sha(fedge: Fedge, ops: FakeOperations) -> None:
    result = fedge("deploy", "no-such-file.fedge")
    assert result.exit_code == 2
    assert "neither a .fedge file" in result.stderr
    assert ops.mutations == []


def test_deploy_errors_are_one_line(fedge: Fedge, ops: FakeOperations, artifact_file: Path) -> None:
    assert fedge("artifacts", "upload", artifact_file).exit_code == 0
    assert "matches no device" in one_line_error(fedge("deploy", SHA, "--to", "tag:x"))
    assert "bad target" in one_line_error(fedge("deploy", SHA, "--to", "everything"))
    assert "no artifact" in one_line_error(fedge("deploy", "ab" * 32))
    assert [m for m, _ in ops.mutations] == ["artifact.upload"]


def test_rollback_over_the_api(fedge: Fedge, ops: FakeOperations) -> None:
    out = fedge.json("rollback", "--model", "digits", "--to", "device:pi-1", "--reason", "bad")
    assert [(d["device_id"], d["state"]) for d in out["devices"]] == [("pi-1", "rolled_back")]
    assert ops.deployment_requests == [
        RollbackRequest("digits", target="device:pi-1", reason="bad")
    ]
    ops.deployment_outcome = DeviceState.FAILED
    result = fedge("rollback", "--model", "digits", "--to", "device:pi-1")
    assert result.exit_code == 1
    assert "rollback digits -> device:pi-1" in result.stdout


def test_viewer_token_may_not_deploy(api: str, ops: FakeOperations) -> None:
    viewer = Fedge(api, VIEWER_TOKEN)
    assert "may not deploy" in one_line_error(viewer("deploy", SHA))
    assert "may not roll back" in one_line_error(viewer("rollback", "--model", "digits"))
    assert ops.mutations == []


def test_broker_mode_deploy_runs_in_process_on_a_temporary_database(
    local_calls: list[dict[str, Any]], ops: FakeOperations, tmp_path: Path, artifact_file: Path
) -> None:
    calls = local_calls
    key = tmp_path / "signing.pub"
    key.write_text("key")
    broker = ["--broker", "mqtt://127.0.0.1:1883", "--trust", str(key)]
    result = run("deploy", artifact_file, "--to", "tag:lab", "--chunk-size", "2048", *broker)
    assert result.exit_code == 0, result.stdout + result.stderr
    [call] = calls
    assert call["chunk_size"] == 2048
    assert call["trust"] == (key,)
    assert not call["db"].parent.exists()  # temporary, removed when the command ended
    assert "this deployment is recorded in no audit log" in result.stderr
    assert ops.mutations == [
        ("artifact.upload", CLI_ACTOR.name),
        ("deployment.create", CLI_ACTOR.name),
    ]
    result = run("rollback", "--model", "digits", "--to", "device:pi-1", *broker)
    assert result.exit_code == 0, result.stdout + result.stderr
    assert ops.mutations[-1] == ("rollback.create", CLI_ACTOR.name)
    assert "this rollback is recorded in no audit log" in result.stderr
    # With --db the record is kept: no note.
    result = run("rollback", "--model", "digits", "--to", "device:pi-1", *broker,
                 "--db", tmp_path / "state.db")  # fmt: skip
    assert result.exit_code == 0, result.stdout + result.stderr
    assert "audit log" not in result.stderr


def test_policy_set_show_list_delete_runs(fedge: Fedge, ops: FakeOperations) -> None:
    answer = fedge.json(
        "policy", "set", "sensor", "--drift-psi", "0.25", "--windows", "3", "--approve",
        "--rounds", "4", "--clients", "6", "--features", "8", "--classes", "3",
        "--run-arg", "seed=7",
    )  # fmt: skip
    policy = answer["policy"]
    assert policy["name"] == "sensor"
    assert policy["drift_psi"] == 0.25
    assert policy["require_approval"] is True
    assert policy["run"]["rounds"] == 4
    assert policy["run"]["clients"] == 6
    assert policy["run"]["config"] == {"seed": 7, "features": 8, "classes": 3}
    assert ops.mutations[-1][0] == "set_policy"
    shown = fedge("policy", "show", "sensor")
    assert shown.exit_code == 0, shown.stderr
    assert "PSI >= 0.25 for 3 scores" in shown.stdout
    assert "required" in shown.stdout
    assert [p["policy"]["name"] for p in fedge.json("policy", "list")] == ["sensor"]
    assert fedge.json("policy", "runs") == []
    line = one_line_error(fedge("policy", "set", "other", "--windows", "2"))
    assert "no trigger" in line
    assert fedge.json("policy", "delete", "sensor")["policy"]["name"] == "sensor"
    assert "no retraining policy for model 'sensor'" in one_line_error(
        fedge("policy", "show", "sensor")
    )
    assert "no retraining run 'run-x'" in one_line_error(fedge("policy", "approve", "run-x"))
