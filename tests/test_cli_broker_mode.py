"""The operator's commands in-process (``--broker``) against a real fleet.

A real mosquitto, three in-process agents on one network loop, and the commands
run through Typer's ``CliRunner`` with ``--broker`` and ``--db``: each command
starts its own :class:`~coordinator.service.fleet_service.FleetService` (``local_service``) on
the same SQLite file, does its work over MQTT and stops. This is the path an
operator without a long-running service takes: ``fedge devices``, ``fedge
artifacts upload``, ``fedge rollout create ... --watch`` to completion, then the
stored rollout and audit log as a later command sees them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import Result
from typer.testing import CliRunner

from compress.keys import SigningKey, generate_signing_key
from coordinator.cli.app import app
from coordinator.service.operations import CLI_ACTOR
from edge_agent.agent import Agent
from tests.fleet_support import (
    InProcessFleet,
    Mosquitto,
    make_artifact,
    password,
    public_key_file,
    wait_for,
)

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("clean_fedge_env")]

DEVICES = ["cb0", "cb1", "cb2"]

runner = CliRunner(mix_stderr=False)


@pytest.fixture
def broker_users() -> list[str]:
    return DEVICES


@pytest.fixture
def agents(fleet: InProcessFleet) -> dict[str, Agent]:
    fleet.start_all(DEVICES)
    return fleet.agents


class Fedge:
    """``fedge ...`` in-process against the test broker, on one state file."""

    def __init__(self, tmp_path: Path, broker: Mosquitto, signing_key: SigningKey) -> None:
        secret = tmp_path / "coordinator.password"
        secret.write_text(password("coordinator") + "\n")
        self.db = tmp_path / "state.db"
        self.connection = [
            "--broker", broker.url,
            "--username", "coordinator",
            "--password-file", str(secret),
            "--db", str(self.db),
            "--trust", str(public_key_file(tmp_path / "operator-keys", signing_key)),
        ]  # fmt: skip

    def __call__(self, *args: str | Path) -> Result:
        command = [str(a) for a in args]
        return runner.invoke(app, [*command, *self.connection], catch_exceptions=False)

    def json(self, *args: str | Path) -> Any:
        result = self(*args, "--json")
        assert result.exit_code == 0, result.stdout + result.stderr
        return json.loads(result.stdout)


@pytest.fixture
def fedge(tmp_path: Path, broker: Mosquitto, signing_key: SigningKey) -> Fedge:
    return Fedge(tmp_path, broker, signing_key)


def wait_online(fedge: Fedge, count: int) -> list[dict[str, Any]]:
    """``fedge devices --json`` until ``count`` devices are online."""

    def online() -> list[dict[str, Any]] | None:
        rows: list[dict[str, Any]] = fedge.json("devices")["devices"]
        return rows if sum(bool(row["online"]) for row in rows) == count else None

    rows: list[dict[str, Any]] = wait_for(online, what=f"{count} devices online")
    return rows


def serving(agents: dict[str, Agent]) -> dict[str, int | None]:
    versions: dict[str, int | None] = {}
    for device, agent in agents.items():
        model = agent.model
        versions[device] = None if model is None else model.version
    return versions


def test_devices_upload_and_a_watched_rollout_to_completion_in_process(
    tmp_path: Path, signing_key: SigningKey, agents: dict[str, Agent], fedge: Fedge
) -> None:
    rows = wait_online(fedge, 3)
    assert sorted(row["device_id"] for row in rows) == DEVICES

    artifact = make_artifact(tmp_path, signing_key, version=2)
    result = fedge("artifacts", "upload", artifact)
    assert result.exit_code == 0, result.stdout + result.stderr
    [uploaded] = fedge.json("artifacts", "list")
    assert uploaded["version"] == 2
    assert uploaded["sha256"] in result.stdout

    tampered = make_artifact(tmp_path, signing_key, version=3, tamper_payload=True)
    result = fedge("artifacts", "upload", tampered)
    assert result.exit_code == 1
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("error: artifact refused: payload sha256"), line
    assert "Traceback" not in result.stderr
    assert [a["version"] for a in fedge.json("artifacts", "list")] == [2]

    result = fedge(
        "rollout", "create", artifact,
        "--canary", "1", "--waves", "100", "--soak", "1s", "--max-failure", "10%",
        "--watch", "--interval", "0.2",
    )  # fmt: skip
    assert result.exit_code == 0, result.stdout + result.stderr
    rollout_id = result.stdout.splitlines()[0]
    assert result.stdout.splitlines()[-1] == f"rollout {rollout_id}: completed"
    assert serving(agents) == dict.fromkeys(DEVICES, 2)

    # A later command opens the same state: the rollout, its devices and the audit log.
    [listed] = fedge.json("rollout", "list")
    assert listed["rollout_id"] == rollout_id
    assert listed["state"] == "completed"
    view = fedge.json("rollout", "status", rollout_id)
    # The engine's saved state (every device's record) stays inside the service.
    assert "snapshot" not in listed
    assert set(view["rollout"]) == set(listed)
    assert {d["device_id"]: d["state"] for d in view["devices"]} == dict.fromkeys(
        DEVICES, "installed"
    )
    assert sorted(d["stage"] for d in view["devices"]) == [0, 1, 1]
    actions = [(a["actor"], a["action"]) for a in fedge.json("audit")]
    assert (CLI_ACTOR.name, "artifact.reject") in actions
    assert [a for a in actions if a[1] != "artifact.reject"] == [
        (CLI_ACTOR.name, "artifact.upload"),
        (CLI_ACTOR.name, "artifact.upload"),  # create uploads again (idempotent) before starting
        (CLI_ACTOR.name, "rollout.create"),
    ]


def test_deploy_and_rollback_in_process_are_audited_like_the_api_path(
    tmp_path: Path, signing_key: SigningKey, agents: dict[str, Agent], fedge: Fedge
) -> None:
    wait_online(fedge, 3)
    first = make_artifact(tmp_path, signing_key, version=1)
    second = make_artifact(tmp_path, signing_key, version=2)
    for artifact in (first, second):
        result = fedge("deploy", artifact, "--wait")
        assert result.exit_code == 0, result.stdout + result.stderr
        assert "audit log" not in result.stderr  # --db given: the record is kept
    assert serving(agents) == dict.fromkeys(DEVICES, 2)
    result = fedge("rollback", "--model", "digits", "--to", "device:cb0", "--reason", "drift")
    assert result.exit_code == 0, result.stdout + result.stderr
    assert serving(agents) == {"cb0": 1, "cb1": 2, "cb2": 2}

    by_version = {row["version"]: row["sha256"] for row in fedge.json("artifacts", "list")}
    entries = [a for a in fedge.json("audit") if a["action"] != "artifact.upload"]
    assert [(a["actor"], a["role"], a["action"]) for a in entries] == [
        (CLI_ACTOR.name, "operator", "deployment.create"),
        (CLI_ACTOR.name, "operator", "deployment.create"),
        (CLI_ACTOR.name, "operator", "rollback.create"),
    ]
    assert CLI_ACTOR.name.startswith("cli:")
    for entry, version in zip(entries[:2], (1, 2), strict=True):
        assert entry["target"]  # the deployment's id
        assert entry["detail"] == {
            "artifact": by_version[version],
            "target": "all",
            "model": "digits",
            "version": version,
        }
    assert entries[2]["detail"] == {"model": "digits", "target": "device:cb0", "reason": "drift"}


def test_an_unreachable_broker_is_one_clear_line(tmp_path: Path, broker: Mosquitto) -> None:
    fedge = Fedge(tmp_path, broker, generate_signing_key())
    broker.stop()
    result = fedge("devices", "--connect-timeout", "1")
    assert result.exit_code != 0
    assert "Traceback" not in result.stderr
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(f"error: cannot connect to {broker.url}"), line
